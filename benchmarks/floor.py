"""Where the reversible step's time goes: the recompute floor measured, not assumed (issue 16, item 1).

Reversible backward replays each branch once, so a step costs ``F_nograd + F + B`` against
conventional's ``F + B``: the ratio's floor is ``1 + F_nograd / (F + B)``, which is 4/3 only when
backward costs twice the forward. This script measures, on ``benchmarks/memory.py``'s GPT-2 blocks and
in one process, with the modes interleaved round by round (each round's median step, the median of
the rounds' ratios, so that load drifting during the run moves both modes alike):

* ``ratio_median`` (``_min``, ``_max``): forward + backward of reversible over conventional;
* ``*_forward_s``, ``*_backward_s``: each mode's forward and backward (reversible's forward runs its
  chains without a graph, its backward recomputes and back-propagates), and the ``floor`` they imply;
* with ``--free-masks``: the same with dropout's counter-based masks replaced by one cached mask per
  shape (a diagnostic, not a training mode): how much of the gap the mask hash is.

    OMP_NUM_THREADS=2 python benchmarks/floor.py --blocks 16 --rounds 5
    OMP_NUM_THREADS=2 python benchmarks/floor.py --blocks 16 --rounds 5 --free-masks
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def free_masks():
    """Dropout masks from a per-shape cache: what the step would cost if masks were free."""
    import torch

    from bwskc.runtime import rng
    cache: dict = {}

    def keep_mask(shape, p, key, device, start=0):
        if (tuple(shape), p) not in cache:
            cache[tuple(shape), p] = torch.rand(tuple(shape), device=device) >= p
        return cache[tuple(shape), p]
    rng.keep_mask = keep_mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per mode per round (median taken)")
    ap.add_argument("--free-masks", action="store_true")
    a = ap.parse_args()
    if a.free_masks:
        free_masks()
    import torch

    from memory import setup
    runs, step, out, ctx = setup("gpt2", a.blocks, a.seq, a.batch)
    inputs, loss = ctx["inputs"], ctx["loss"]
    modes = ("conventional", "reversible")

    def timed(fn):
        t = time.perf_counter()
        r = fn()
        return time.perf_counter() - t, r

    def phases(mod):
        mod.zero_grad(set_to_none=True)
        f, o = timed(lambda: mod(*inputs))
        value = loss(o)
        b, _ = timed(value.backward)
        return f, b

    for mode in modes:
        step(runs[mode])  # warm up
    ratios, rows = [], []
    for _ in range(a.rounds):
        med = {m: statistics.median(timed(lambda m=m: step(runs[m]))[0] for _ in range(a.steps)) for m in modes}
        ratios.append(med["reversible"] / med["conventional"])
        rows.append({m: phases(runs[m]) for m in modes})
    cf, cb = (statistics.median(r["conventional"][i] for r in rows) for i in range(2))
    rf, rb = (statistics.median(r["reversible"][i] for r in rows) for i in range(2))
    print(json.dumps({
        "blocks": a.blocks, "free_masks": a.free_masks, "threads": torch.get_num_threads(),
        "ratio_median": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "conventional_forward_s": round(cf, 4), "conventional_backward_s": round(cb, 4),
        "reversible_forward_s": round(rf, 4), "reversible_backward_s": round(rb, 4),
        "floor": round(1 + rf / (cf + cb), 3),
        "backward_over_forward": round(cb / cf, 3)}))


if __name__ == "__main__":
    main()
