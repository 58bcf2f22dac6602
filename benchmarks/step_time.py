"""Training-step time of the training modes, each with torch.compile off and on, in one process.

A GPT-2-medium-size model (``transformers.GPT2LMHeadModel``, ``GPT2Config``: 24 layers, d 1024, 16 heads,
vocabulary 50257, random weights, seed 0, dropout as the config defaults, ``attn_implementation="sdpa"``),
``--batch`` 4, ``--seq`` 1024, forward and loss under ``torch.autocast`` (``--autocast bf16``, the default;
``none`` for fp32), next-token cross entropy on the logits. Modes (``--modes``):

* ``conventional``: ``bwskc.compile(bwskc.lower(model, (ids,), {}, train=True), mode="conventional")``;
* ``reversible``: ``bwskc.compile(..., mode="reversible")`` with ``BWSKC_KERNELS=auto`` (the Triton
  coupling kernels on CUDA; torch on CPU, where ``auto`` picks torch);
* ``reversible-torch``: the same module with ``BWSKC_KERNELS=torch`` (the torch seam);
* ``checkpoint``: the Hugging Face model with ``gradient_checkpointing_enable()`` (per-layer
  ``torch.utils.checkpoint``, non-reentrant);
* ``eager``: the Hugging Face model as it is.

Each mode runs with ``--compile off`` (the module itself) and ``on`` (``torch.compile(module,
backend=--backend, fullgraph=True)``; ``--fullgraph fallback``, the default, retries with
``fullgraph=False`` when the full-graph compile fails, and records the failure line either way). All
compile-off runs go first, then the compiled ones, so a cut (``--deadline``, or the caller's timeout)
keeps the cheap figures; every result is a JSON line, printed (and written to ``--jsonl``) as it ends.

Per (mode, compile):

* ``step ms``: median wall time of ``--repeats`` training steps (zero_grad, forward, loss, backward; no
  optimizer; synchronised on a GPU) after ``--warmup`` steps (the first of which compiles);
* ``x conv``: that over conventional's with the same compile setting; ``x conv eager`` over
  conventional's without compile (both measured in this process);
* ``peak GiB``: ``torch.cuda.max_memory_allocated()`` over the measured steps (GPU only);
* ``first s``: the first step's wall time (with compile on: tracing and code generation included);
* ``kernels``: which coupling implementation ``BWSKC_KERNELS`` picked on this device (reversible modes).

    python benchmarks/step_time.py --device cuda --jsonl step.jsonl        # GPT-2 medium, bf16
    python benchmarks/step_time.py --device cuda --compile off --modes conventional,reversible
    python benchmarks/step_time.py --smoke      # CPU: 2 layers, d 64, seq 32, aot_eager backend
    python benchmarks/step_time.py --table step.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

MODES = ("conventional", "reversible", "reversible-torch", "checkpoint", "eager")
DEFAULT_MODES = ("conventional", "reversible", "checkpoint")
MEDIUM = dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257)
SMOKE = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000)
SEAM = {"reversible": "auto", "reversible-torch": "torch"}


def build(a):
    """The modules, the input ids and the loss: one model, lowered once, compiled per bwskc mode."""
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    import bwskc
    kw = dict(SMOKE if a.smoke else MEDIUM)
    if a.layers:
        kw["n_layer"] = a.layers
    kw["n_positions"] = max(a.seq, 1024)
    if a.attn_pdrop is not None:
        kw["attn_pdrop"] = a.attn_pdrop
    config = transformers.GPT2Config(**kw, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).to(a.device).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (a.batch, a.seq), generator=gen).to(a.device)
    info = {"config": {k: kw[k] for k in ("n_layer", "n_embd", "n_head", "vocab_size")},
            "attn_pdrop": config.attn_pdrop, "params": sum(p.numel() for p in model.parameters())}
    mods, setup = {}, {}
    wanted = set(a.modes)
    if wanted & {"conventional", "reversible", "reversible-torch"}:
        t0 = time.perf_counter()
        program = bwskc.lower(model, (ids,), {}, train=True)
        setup["lower_s"] = round(time.perf_counter() - t0, 2)
        if "conventional" in wanted:
            t0 = time.perf_counter()
            mods["conventional"] = bwskc.compile(program, mode="conventional").train()
            setup["compile_conventional_s"] = round(time.perf_counter() - t0, 2)
        if wanted & {"reversible", "reversible-torch"}:
            t0 = time.perf_counter()
            rev = bwskc.compile(program, mode="reversible").train()
            setup["compile_reversible_s"] = round(time.perf_counter() - t0, 2)
            info["chains"] = rev.analyses["reversible"].summary()
            mods["reversible"] = mods["reversible-torch"] = rev
        del program
    if wanted & {"checkpoint", "eager"}:
        if "eager" in wanted:
            mods["eager"] = model
        if "checkpoint" in wanted:
            ck = model
            if "eager" in wanted:  # a second copy: gradient checkpointing is a flag on the model
                ck = transformers.GPT2LMHeadModel(config).to(a.device).train()
                ck.load_state_dict(model.state_dict())
            ck.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            mods["checkpoint"] = ck
    info["setup"] = setup
    F = torch.nn.functional
    targets = ids[:, 1:].reshape(-1)

    def loss_of(out):
        logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets)
    return mods, ids, loss_of, info


def measure(mode, module, compiled, ids, loss_of, a) -> dict:
    import torch
    cuda = a.device.startswith("cuda")
    hf = mode in ("checkpoint", "eager")
    if mode in SEAM:
        os.environ["BWSKC_KERNELS"] = SEAM[mode]
    else:
        os.environ.pop("BWSKC_KERNELS", None)
    fn = module
    row = {"mode": mode, "compile": "off"}
    if compiled:
        torch._dynamo.reset()
        row["compile"] = "on"
        row["backend"] = a.backend
        row["fullgraph"] = compiled == "fullgraph"
        fn = torch.compile(module, backend=a.backend, fullgraph=compiled == "fullgraph")
    cast = (torch.autocast(a.device.split(":")[0], dtype=torch.bfloat16) if a.autocast == "bf16"
            else torch.autocast(a.device.split(":")[0], enabled=False))

    def step():
        module.zero_grad(set_to_none=True)
        with cast:
            out = fn(input_ids=ids, use_cache=False) if hf else fn(ids)
            value = loss_of(out)
        value.backward()
        if cuda:
            torch.cuda.synchronize()
        return float(value.detach())

    if mode in SEAM:
        from bwskc.kernels import dispatch
        row["kernels"] = dispatch.implementation(ids.float()).__name__.rsplit(".", 1)[-1]
    t0 = time.perf_counter()
    losses = [step()]
    row["first_s"] = round(time.perf_counter() - t0, 3)
    for _ in range(max(a.warmup - 1, 0)):
        losses.append(step())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    samples = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        losses.append(step())
        samples.append(time.perf_counter() - t0)
    row.update(step_ms=round(1e3 * statistics.median(samples), 2),
               step_ms_samples=[round(1e3 * s, 2) for s in samples],
               loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4))
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if not all(v == v for v in losses):
        row["note"] = "non-finite loss"
    return row


def device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def add_ratios(rows: list[dict]) -> None:
    conv = {r["compile"]: r["step_ms"] for r in rows if r["mode"] == "conventional" and "step_ms" in r}
    for r in rows:
        if "step_ms" not in r:
            continue
        if r["compile"] in conv:
            r["x_conv"] = round(r["step_ms"] / conv[r["compile"]], 3)
        if "off" in conv:
            r["x_conv_eager"] = round(r["step_ms"] / conv["off"], 3)


def table(rows: list[dict]) -> str:
    rows = [r for r in rows if "mode" in r]
    add_ratios(rows)
    head = ["mode", "compile", "step ms", "x conv", "x conv eager", "peak GiB", "first s", "kernels", "note"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        comp = r["compile"] + ("" if r["compile"] == "off" else
                               f" ({r.get('backend', '?')}{', fullgraph' if r.get('fullgraph') else ''})")
        note = r.get("error") or r.get("note") or ""
        if r.get("fullgraph_error"):
            note = (note + "; " if note else "") + f"fullgraph=True failed: {r['fullgraph_error']}"
        cells = [r["mode"], comp, f"{r['step_ms']:.1f}" if "step_ms" in r else "failed",
                 f"{r['x_conv']:.2f}x" if "x_conv" in r else "-",
                 f"{r['x_conv_eager']:.2f}x" if "x_conv_eager" in r else "-",
                 f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-",
                 f"{r['first_s']:.1f}" if "first_s" in r else "-", r.get("kernels", "-"),
                 note.replace("|", "/")[:240]]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _err(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--compile", default="off,on", help="off, on, or off,on (default)")
    ap.add_argument("--backend", default=None, help="torch.compile backend (inductor; smoke aot_eager)")
    ap.add_argument("--fullgraph", default="fallback", choices=("on", "off", "fallback"))
    ap.add_argument("--seq", type=int, default=None, help="default 1024 (smoke 32)")
    ap.add_argument("--batch", type=int, default=None, help="default 4 (smoke 2)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--attn-pdrop", type=float, default=None, help="attention dropout (default: the config's 0.1)")
    ap.add_argument("--autocast", default="bf16", choices=("bf16", "none"))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default=None, help="cuda when available, else cpu")
    ap.add_argument("--deadline", type=float, default=None, help="start no new run after this many seconds")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (seconds)")
    ap.add_argument("--jsonl", metavar="PATH")
    ap.add_argument("--md", metavar="PATH")
    ap.add_argument("--table", metavar="JSONL", help="print the Markdown table of a --jsonl file and exit")
    a = ap.parse_args(argv)
    if a.table:
        with open(a.table) as f:
            print(table([json.loads(ln) for ln in f if ln.strip()]))
        return 0
    import torch
    a.modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in a.modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode {bad[0]!r}: choose from {', '.join(MODES)}")
    a.device = a.device or ("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    a.backend = a.backend or ("aot_eager" if a.smoke else "inductor")
    a.seq = a.seq or (32 if a.smoke else 1024)
    a.batch = a.batch or (2 if a.smoke else 4)
    if a.smoke:
        a.warmup, a.repeats = min(a.warmup, 1), min(a.repeats, 2)
    compiles = [c for c in a.compile.split(",") if c]
    t_all = time.perf_counter()
    jsonl = open(a.jsonl, "w") if a.jsonl else None

    def emit(obj):
        line = json.dumps(obj)
        print(line, flush=True)
        if jsonl:
            jsonl.write(line + "\n")
            jsonl.flush()
    command = "python " + " ".join([os.path.relpath(os.path.abspath(__file__))]
                                   + list(sys.argv[1:] if argv is None else argv))
    meta = {"command": command, "device": a.device, "device_name": device_name(a.device),
            "torch": torch.__version__, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "seq": a.seq, "batch": a.batch, "autocast": a.autocast, "backend": a.backend}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    mods, ids, loss_of, info = build(a)
    meta.update(info)
    emit({"meta": meta})
    rows = []
    plan = [(m, c) for c in compiles for m in a.modes]
    for mode, comp in plan:
        if a.deadline is not None and time.perf_counter() - t_all > a.deadline:
            row = {"mode": mode, "compile": comp, "error": "skipped: deadline"}
            rows.append(row)
            emit(row)
            continue
        attempts = {"off": [None], "on": {"on": ["fullgraph"], "off": ["graph"],
                                          "fallback": ["fullgraph", "graph"]}[a.fullgraph]}[comp]
        first_error = None
        row = None
        for how in attempts:
            try:
                row = measure(mode, mods[mode], how, ids, loss_of, a)
                break
            except Exception as e:  # noqa: BLE001 - a failing mode is a result
                if first_error is None and how == "fullgraph":
                    first_error = _err(e)
                row = {"mode": mode, "compile": comp, "backend": a.backend if comp == "on" else None,
                       "fullgraph": how == "fullgraph", "error": _err(e)}
                if a.device.startswith("cuda"):
                    torch.cuda.empty_cache()
        if first_error and row.get("error") != first_error:
            row["fullgraph_error"] = first_error
        rows.append(row)
        add_ratios(rows)
        emit(row)
    os.environ.pop("BWSKC_KERNELS", None)
    md = table(rows)
    total = round(time.perf_counter() - t_all, 1)
    emit({"summary": {"total_wall_s": total, "failed": [f"{r['mode']}/{r['compile']}" for r in rows
                                                         if "error" in r]}})
    if jsonl:
        jsonl.close()
    header = (f"{meta['device_name']}: GPT-2 {info['config']['n_layer']} layers, d {info['config']['n_embd']}, "
              f"{info['config']['n_head']} heads, batch {a.batch}, seq {a.seq}, autocast {a.autocast}, attention "
              f"dropout {info['attn_pdrop']}, torch {torch.__version__}")
    print()
    print(header)
    print(md)
    print(f"\ntotal wall time: {total} s")
    if a.md:
        with open(a.md, "w") as f:
            f.write(header + "\n\n" + md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
