"""Activation memory and step time of reversible training against conventional and checkpointing.

For each model family and depth (in residual blocks), in a fresh process per configuration:

* ``saved``: bytes saved for backward in one training step (``bwskc.runtime.memory.saved_bytes``:
  storages packed by ``saved_tensors_hooks``, parameters excluded), for conventional (the compiled
  program), reversible (coupling chains) and per-block checkpointing (Hugging Face's
  ``gradient_checkpointing_enable()``, which wraps every layer in ``torch.utils.checkpoint``);
* ``peak``: the step's resident-memory peak above the resident memory before it (Linux ``VmHWM``
  after resetting it through ``/proc/self/clear_refs``);
* ``time``: forward + backward over ``--repeats`` rounds in one process, the modes interleaved (each
  runs ``--steps`` steps a round, their median kept; the order rotated round by round): each mode's
  median step (``step_s``) and the median (and range) of its per-round ratios to conventional
  (``time_ratio``, ``time_ratio_range``).

The step's loss (``--loss``): ``square`` (default) is the mean square of every float output, a
stand-in that keeps the comparison about the blocks; ``ce`` is real next-token cross entropy, as each
user would compute it: bwskc's modules split their LM head off (``bwskc.runtime.head``) and use the
chunked loss (``bwskc.kernels.cross_entropy``: never the ``[batch, seq, vocab]`` logits), Hugging Face
checkpointing passes ``labels=`` to the model, revlib and memcnn apply their plain head and
``F.cross_entropy``. ``--vocab`` sets the vocabulary (default: the zoo config's 100; GPT-2's is 50257).

``--init-diff`` instead reports, for the zoo, the relative output difference at initialisation
between the reversible model and the original (the cost of the coupling's first-order merge when
fine-tuning a pretrained model), and the inverse's reconstruction error.

    python benchmarks/memory.py --models gpt2,pythia --blocks 4,8,16,32
    python benchmarks/memory.py --models gpt2 --blocks 16,32 --repeats 7 --steps 3
    python benchmarks/memory.py --init-diff
    python benchmarks/memory.py --models gpt2 --blocks 32 --loss ce --vocab 50257 --repeats 1

revlib and memcnn are not dependencies; on GPT-2 they are compared, on the same blocks, when installed
(``benchmarks/revnets.py`` says how).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import time


FAMILIES = {  # name -> (layers per block count, seq, hidden) on top of the zoo's tiny configs
    "gpt2": dict(depth=("n_layer",), per_layer=2, extra=dict(n_embd=256, n_head=4, n_positions=256)),
    "pythia": dict(depth=("num_hidden_layers",), per_layer=1,
                   extra=dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024,
                              max_position_embeddings=256)),
    "switch": dict(depth=("num_layers",), per_layer=2,
                   extra=dict(d_model=256, d_kv=64, num_heads=4, d_ff=1024, num_decoder_layers=1)),
    "mamba": dict(depth=("num_hidden_layers",), per_layer=1, extra=dict(hidden_size=256)),
    # two stages of basic blocks: the second stage's first block (stride 2, projection) is a boundary
    "resnet": dict(depth=None, per_layer=1, extra=dict(embedding_size=64, hidden_sizes=[64, 128],
                                                        layer_type="basic", image_size=64)),
}


def _rss_peak_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def setup(name: str, blocks: int, seq: int, batch: int, device: str = "cpu", extra: dict | None = None,
          loss_kind: str = "square"):
    """The three trainable modules of one configuration (``conventional``, ``reversible`` and, where the
    model supports it, ``checkpoint``), a ``step(module)`` running forward and backward (synchronised on
    a GPU, so wall time is the step's), and what was measured on the way (``out``). ``loss_kind``:
    ``square`` or ``ce`` (the module docstring)."""
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import torch.utils._pytree as pytree
    import transformers

    import bwskc
    from bwskc.frontend import default_inputs
    from bwskc.testing import ZOO_SPECS
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    fam = FAMILIES[name]
    model_cls, config_cls, kwargs = ZOO_SPECS[name]
    kwargs = {**kwargs, **fam["extra"], **(extra or {})}
    if fam["depth"]:
        for key in fam["depth"]:
            kwargs[key] = max(1, blocks // fam["per_layer"])
    elif name == "resnet":
        kwargs["depths"] = [blocks // 2, blocks - blocks // 2]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(device)
    args, kw = default_inputs(model, batch=batch, seq=seq, device=device)
    t0 = time.perf_counter()
    program = bwskc.lower(model, args, kw, train=True)
    lower_s = time.perf_counter() - t0
    values = dict(zip(program.entry.input_names, list(args) + list(kw.values())))
    inputs = [values[n] for n in program.entry.input_names]

    def loss(out):
        return sum(o.float().pow(2).mean() for o in pytree.tree_leaves(out)
                   if isinstance(o, torch.Tensor) and o.is_floating_point())

    # Hugging Face's own module under plain autograd (``eager``: the baseline a user leaves) is a copy
    # taken before checkpointing is switched on in the model itself
    runs = {"conventional": bwskc.compile(program, mode="conventional"),
            "reversible": bwskc.compile(program, mode="reversible"),
            "eager": copy.deepcopy(model).train()}
    ckpt = model.train()
    hf = [runs["eager"], ckpt]
    if getattr(ckpt, "supports_gradient_checkpointing", False):
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        runs["checkpoint"] = ckpt
    if name == "gpt2":  # the same blocks as RevNet couplings run by revlib and memcnn, when installed
        from revnets import RevGPT2, available
        for lib in available():
            runs[lib] = RevGPT2(model, lib).train()
    out = {"model": name, "blocks": blocks, "seq": seq, "batch": batch, "lower_s": round(lower_s, 2),
           "chains": runs["reversible"].analyses["reversible"].summary()}

    heads = {}
    if loss_kind == "ce":
        from bwskc.runtime.head import try_split_head
        for label in ("conventional", "reversible"):
            heads[label], why = try_split_head(runs[label])
            if why:
                out.setdefault("head_refused", {})[label] = why
        out["loss"], out["vocab"] = "ce", config.vocab_size
    ce = ce_losses(runs, heads, hf, args, kw, inputs) if loss_kind == "ce" else None

    def step(mod):
        mod.zero_grad(set_to_none=True)
        if ce is not None:
            ce[id(mod)]().backward()
        elif any(mod is m for m in hf):
            loss(mod(*args, **kw, use_cache=False) if "use_cache" in mod.forward.__code__.co_varnames
                 else mod(*args, **kw)).backward()
        elif getattr(mod, "takes_ids_only", False):
            loss(mod(args[0])).backward()
        else:
            loss(mod(*inputs)).backward()
        if device != "cpu":
            torch.cuda.synchronize()

    return runs, step, out, dict(args=args, kw=kw, inputs=inputs, loss=loss, hf=hf, ce=ce)


def ce_losses(runs: dict, heads: dict, hf: list, args, kw, inputs) -> dict:
    """``id(module) -> (() -> loss)``: one forward and the mean next-token cross entropy, each as its
    user would compute it (the module docstring)."""
    import torch.nn.functional as F

    from bwskc.kernels.cross_entropy import linear_cross_entropy
    from bwskc.runtime.head import scope
    ids = args[0]
    targets = ids[:, 1:].reshape(-1)

    def full(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets)

    def bwskc_loss(mod, split):
        def run():
            with scope(split) as active:
                out = mod(*inputs)
            first = out[0] if isinstance(out, (tuple, list)) else out
            if active is None:
                return full(first)
            return linear_cross_entropy(first[:, :-1].reshape(-1, active.width), active.weight(),
                                        active.bias(), targets, reduction="mean")
        return run

    fns = {}
    for label, mod in runs.items():
        if label in heads:
            fns[id(mod)] = bwskc_loss(mod, heads[label])
        elif any(mod is m for m in hf):  # Hugging Face's own loss: the model shifts the labels itself
            fns[id(mod)] = lambda mod=mod: mod(*args, **kw, labels=ids, use_cache=False).loss
        else:  # revlib, memcnn: their head, then F.cross_entropy
            fns[id(mod)] = lambda mod=mod: full(mod(ids))
    return fns


@contextlib.contextmanager
def _counting(params):
    """Bytes saved for backward inside (``bwskc.runtime.memory.saved_bytes``'s count), parameters
    excluded: yields a dict filled in as tensors are saved."""
    import torch
    skip = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip and st.nbytes():
            storages[st.data_ptr()] = st.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield storages


def one(name: str, blocks: int, seq: int, batch: int, repeats: int, only: str | None = None,
        loss_kind: str = "square", vocab: int | None = None, steps: int = 1) -> dict:
    from bwskc.runtime.memory import saved_bytes
    extra = None if vocab is None else {"vocab_size": vocab}
    runs, step, out, ctx = setup(name, blocks, seq, batch, extra=extra, loss_kind=loss_kind)
    args, kw, inputs, loss, hf = ctx["args"], ctx["kw"], ctx["inputs"], ctx["loss"], ctx["hf"]

    if only is not None:  # a fresh process measures one mode's first step: nothing cached before it
        mod = runs[only]
        base = _status("VmRSS")
        _rss_peak_reset()
        step(mod)
        return {"step_peak_bytes": max(_status("VmHWM") - base, 0)}
    for label, mod in runs.items():
        if ctx["ce"] is not None:
            with _counting(mod.parameters()) as storages:
                ctx["ce"][id(mod)]()
            nbytes = sum(storages.values())
        elif any(mod is m for m in hf):
            nbytes = saved_bytes(mod, *args, loss=loss, **kw)[0]
        elif label in ("revlib", "memcnn"):  # what they pass to save_for_backward (they also keep
            nbytes = saved_bytes(mod, args[0], loss=loss)[0]  # tensors on ctx: peak is the fair figure)
        else:
            nbytes = saved_bytes(mod, *inputs, loss=loss)[0]
        step(mod)  # warm up
        out[label] = {"saved_bytes": nbytes}
    # The modes interleaved, ``steps`` steps each per round (their median kept) in an order rotated
    # round by round, so that load drifting during the run (a shared machine) moves every mode alike;
    # each round's ratios to its own conventional step, and their median.
    labels = list(runs)
    times = {label: [] for label in labels}
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            round_times = []
            for _ in range(steps):
                t = time.perf_counter()
                step(runs[label])
                round_times.append(time.perf_counter() - t)
            times[label].append(statistics.median(round_times))
    for label in labels:
        ratios = [t / c for t, c in zip(times[label], times["conventional"])]
        out[label].update(step_s=statistics.median(times[label]),
                          time_ratio=round(statistics.median(ratios), 3),
                          time_ratio_range=[round(min(ratios), 3), round(max(ratios), 3)])
        if "eager" in times:  # the same, to Hugging Face's module under plain autograd
            ratios = [t / c for t, c in zip(times[label], times["eager"])]
            out[label].update(time_ratio_eager=round(statistics.median(ratios), 3),
                              time_ratio_eager_range=[round(min(ratios), 3), round(max(ratios), 3)])
    return out


def init_diff() -> list[dict]:
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import torch.utils._pytree as pytree

    import bwskc
    from bwskc.frontend import default_inputs
    from bwskc.testing import ZOO_SPECS, build_zoo_model
    rows = []
    for name in ZOO_SPECS:
        model = build_zoo_model(name)
        args, kw = default_inputs(model)
        program = bwskc.lower(model, args, kw)
        rev = bwskc.compile(program, mode="reversible").eval()
        conv = bwskc.compile(program, mode="conventional").eval()
        values = dict(zip(program.entry.input_names, list(args) + list(kw.values())))
        inputs = [values[n] for n in program.entry.input_names]
        with torch.no_grad():
            a = [t for t in pytree.tree_leaves(rev(*inputs)) if t.is_floating_point()]
            b = [t for t in pytree.tree_leaves(conv(*inputs)) if t.is_floating_point()]
        diff = max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))
        rows.append({"model": name, "chains": rev.analyses["reversible"].summary()["chains"],
                     "output_rel_diff": diff})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gpt2,pythia,switch,mamba,resnet")
    ap.add_argument("--blocks", default="4,8,16,32")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of interleaved steps")
    ap.add_argument("--steps", type=int, default=1, help="steps per mode per round (median kept)")
    ap.add_argument("--loss", choices=("square", "ce"), default="square",
                    help="the step's loss: mean square of the outputs, or next-token cross entropy")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the zoo config's)")
    ap.add_argument("--init-diff", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--table", metavar="JSONL", help="print a Markdown table of rows this script wrote")
    a = ap.parse_args()
    if a.table:
        with open(a.table) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return
    if a.init_diff:
        for row in init_diff():
            print(json.dumps(row))
        return
    if a.one:
        name, blocks, *only = a.one.split(":")
        print(json.dumps(one(name, int(blocks), a.seq, a.batch, a.repeats, only[0] if only else None,
                             loss_kind=a.loss, vocab=a.vocab, steps=a.steps)))
        return
    for name in a.models.split(","):
        for blocks in [int(b) for b in a.blocks.split(",")]:
            row = _run(f"{name}:{blocks}", a)
            for mode in MODES:
                if mode in row:
                    row[mode].update(_run(f"{name}:{blocks}:{mode}", a))
            print(json.dumps(row), flush=True)


MODES = ("conventional", "reversible", "eager", "checkpoint", "revlib", "memcnn")


def table(rows: list[dict]) -> str:
    """Saved bytes, step peak and step time (ratio to conventional) per mode, one row per configuration;
    the reversible step's time also as a ratio to Hugging Face's eager module."""
    def mb(v):
        return f"{v / 1e6:.3g} MB"
    head = (["model", "blocks", "coupled"] + [f"{m} saved / peak / time" for m in MODES]
            + ["rev / conv", "rev / ckpt", "rev / eager time"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['spec']} | error: {' '.join(r['error'])} |")
            continue
        cells = [r["model"], str(r["blocks"]), str(r["chains"]["blocks"])]
        for m in MODES:
            v = r.get(m)
            peak = v.get("step_peak_bytes", 0) if v else 0
            cells.append(f"{mb(v['saved_bytes'])} / {mb(peak)} / {v['time_ratio']:.2f}x" if v else "-")
        rev, conv, ck = r["reversible"]["saved_bytes"], r["conventional"]["saved_bytes"], r.get("checkpoint")
        cells.append(f"{rev / conv:.1%}")
        cells.append(f"{rev / ck['saved_bytes']:.0%}" if ck else "-")
        eager = r["reversible"].get("time_ratio_eager")
        cells.append(f"{eager:.2f}x" if eager is not None else "-")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _run(spec: str, a) -> dict:
    extra = ["--loss", a.loss] + ([] if a.vocab is None else ["--vocab", str(a.vocab)])
    proc = subprocess.run([sys.executable, __file__, "--one", spec, "--seq", str(a.seq), "--batch",
                           str(a.batch), "--repeats", str(a.repeats), "--steps", str(a.steps), *extra],
                          capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"spec": spec, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
