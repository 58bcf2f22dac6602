"""Step time of reversible training under ``torch.compile(fullgraph=True)``, against conventional.

The brief's CPU comparison block: GPT-2 (the zoo's ``GPT2LMHeadModel`` config with ``n_embd`` 256,
``n_head`` 4, dropout 0.1 everywhere, random weights, seed 0), ``--blocks`` residual blocks (two a layer;
default 8), ``--seq`` 256, ``--batch`` 4, lowered in training mode once. For each mode (``conventional``,
``reversible``) and backend (``eager``: the ``bwskc.compile`` module itself; ``inductor``, ``aot_eager``:
``torch.compile(module, fullgraph=True, backend=...)``), in one process:

* ``first s``: the first step's wall time (with a backend: tracing and code generation included);
* ``step ms``: median wall time of ``--repeats`` training steps (zero_grad, forward, mean-square loss
  of the logits, backward; no optimizer) after ``--warmup`` more;
* ``grad err``: relative L2 error of the parameter gradients against the eager module of the same
  mode at the same step (the same dropout masks: counter-based, keyed on seed, step and site).

Then the ratios the brief asks for: reversible under a backend over conventional under the same
backend, and over the eager modules (reversible's and conventional's). ``--smoke``: 2 blocks, d 32,
seq 32, batch 2, two repeats (checks the script, not a figure). Inductor on CPU needs a C++ compiler;
on a cold cache it compiles for minutes (``TORCHINDUCTOR_CACHE_DIR`` keeps the kernels between runs).

    python benchmarks/compiled.py                                    # 8 blocks, eager and inductor
    python benchmarks/compiled.py --blocks 8,32 --repeats 10 --jsonl compiled.jsonl
    python benchmarks/compiled.py --smoke --backends eager,inductor
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

BACKENDS = ("eager", "inductor", "aot_eager")
MODES = ("conventional", "reversible")


def build(blocks: int, d: int, heads: int, seq: int, batch: int):
    """The lowered training program of the configuration and its inputs in entry order."""
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    import bwskc
    from bwskc.frontend import default_inputs
    from bwskc.testing import ZOO_SPECS
    _, config_cls, kwargs = ZOO_SPECS["gpt2"]
    kwargs = dict(kwargs, n_layer=max(1, blocks // 2), n_embd=d, n_head=heads, n_positions=max(seq, 64),
                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(getattr(transformers, config_cls)(**kwargs))
    args, kw = default_inputs(model, batch=batch, seq=seq)
    program = bwskc.lower(model, args, kw, train=True)
    values = dict(zip(program.entry.input_names, list(args) + list(kw.values())))
    return program, [values[n] for n in program.entry.input_names]


def _loss(out):
    import torch.utils._pytree as pytree
    return sum(o.float().pow(2).mean() for o in pytree.tree_leaves(out)
               if hasattr(o, "is_floating_point") and o.is_floating_point())


def measure(program, inputs, mode: str, backend: str, repeats: int, warmup: int) -> dict:
    import torch

    import bwskc
    module = bwskc.compile(program, mode=mode, seed=0)
    reference = bwskc.compile(program, mode=mode, seed=0) if backend != "eager" else None
    fn = module if backend == "eager" else torch.compile(module, fullgraph=True, backend=backend)

    def step(mod, f):
        mod.zero_grad(set_to_none=True)
        _loss(f(*inputs)).backward()
        return {n: p.grad for n, p in mod.named_parameters() if p.grad is not None}

    t = time.perf_counter()
    got = step(module, fn)
    first = time.perf_counter() - t
    err = None
    if reference is not None:  # the first step's gradients against eager's (same seed, same step)
        want = step(reference, reference)
        num = sum(float((got[n] - want[n]).double().norm() ** 2) for n in want)
        den = sum(float(want[n].double().norm() ** 2) for n in want)
        err = (num / den) ** 0.5
        del reference
    for _ in range(warmup):
        step(module, fn)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step(module, fn)
        times.append(time.perf_counter() - t)
    return {"mode": mode, "backend": backend, "first_s": round(first, 2),
            "step_ms": round(1000 * statistics.median(times), 2), "grad_rel_err": err}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", default="8", help="residual blocks, comma-separated (default: %(default)s)")
    p.add_argument("--d", type=int, default=256, help="model width (default: %(default)s)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    p.add_argument("--seq", type=int, default=256, help="sequence length (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="batch size (default: %(default)s)")
    p.add_argument("--backends", default="eager,inductor",
                   help=f"comma-separated, from {', '.join(BACKENDS)} (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch threads, 0: every core (default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="2 blocks, d 32, seq 32, batch 2, 2 repeats (default: off)")
    p.add_argument("--jsonl", default=None, help="also append each row to this file (default: none)")
    a = p.parse_args(argv)
    if a.smoke:
        a.blocks, a.d, a.heads, a.seq, a.batch, a.repeats, a.warmup = "2", 32, 2, 32, 2, 2, 1
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    bad = set(backends) - set(BACKENDS)
    if bad:
        p.error(f"--backends: unknown {', '.join(sorted(bad))}; choose from {', '.join(BACKENDS)}")
    if "eager" not in backends:
        backends.insert(0, "eager")  # the ratios' reference
    import torch
    torch.set_num_threads(a.threads or max(1, os.cpu_count() or 1))
    print(f"GPT-2 d {a.d}, {a.heads} heads, seq {a.seq}, batch {a.batch}, dropout 0.1; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("blocks | mode | backend | first s | step ms | grad err vs eager")
    for blocks in (int(b) for b in a.blocks.split(",")):
        program, inputs = build(blocks, a.d, a.heads, a.seq, a.batch)
        rows = {}
        for backend in backends:
            for mode in MODES:
                r = measure(program, inputs, mode, backend, a.repeats, a.warmup) | {"blocks": blocks}
                rows[mode, backend] = r
                err = "-" if r["grad_rel_err"] is None else f"{r['grad_rel_err']:.1e}"
                print(f"{blocks} | {mode} | {backend} | {r['first_s']} | {r['step_ms']} | {err}", flush=True)
                if a.jsonl:
                    with open(a.jsonl, "a") as f:
                        f.write(json.dumps(r) + "\n")
        conv_eager = rows["conventional", "eager"]["step_ms"]
        rev_eager = rows["reversible", "eager"]["step_ms"]
        print(f"{blocks} blocks, eager: reversible / conventional = {rev_eager / conv_eager:.3f}")
        for backend in backends:
            if backend == "eager":
                continue
            rev, conv = rows["reversible", backend]["step_ms"], rows["conventional", backend]["step_ms"]
            print(f"{blocks} blocks, {backend}: reversible / conventional {backend} = {rev / conv:.3f}; "
                  f"reversible {backend} / reversible eager = {rev / rev_eager:.3f}; "
                  f"/ conventional eager = {rev / conv_eager:.3f}; "
                  f"conventional {backend} / conventional eager = {conv / conv_eager:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
