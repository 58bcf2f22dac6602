"""Training-step memory and time at the seeds' own shapes: Pythia-410M and Switch-Base-8.

The two published BWSK model cards report "Memory savings (reversible vs conventional)" of 6.4%
(Pythia-410M, batch 2, sequence 512) and 0.0% (Switch-Base-8, batch 1, sequence 256). This script
trains the full-size configurations (``benchmarks/configs/``: the hub configs' architecture fields,
random weights, float32, CPU) for a few AdamW steps in each mode, each mode in a fresh process:

* ``conventional``: ``bwskc.compile(model, args, kwargs, mode="conventional")``;
* ``reversible``: ``bwskc.compile(..., mode="reversible")`` (coupling chains that store their outputs);
* ``checkpoint``: the eager Hugging Face model with ``gradient_checkpointing_enable()`` (per-layer
  ``torch.utils.checkpoint``, non-reentrant);
* ``eager``: the eager Hugging Face model as it is (a reference).

Per mode:

* ``peak``: the training step's peak resident memory, absolute (Linux ``VmHWM``): weights, gradients,
  AdamW state, activations, the allocator's slack and the process's own code (torch, transformers)
  are all counted. The high-water mark is reset through ``/proc/self/clear_refs`` (as the trainer's
  ``_reset_peak_rss`` does) after the model is built and compiled, one warm-up step runs (it creates the
  AdamW state), and it is reset again before each measured step; the figure is the largest of the
  measured steps. ``base`` is the resident size just before a measured step (weights, AdamW state, and
  the gradients the previous step left, which ``zero_grad(set_to_none=True)`` frees at the start of the
  step), ``peak - base`` what the step adds;
* ``saved``: bytes saved for backward by one training forward and its loss
  (``bwskc.runtime.memory.saved_bytes``: storages packed by ``saved_tensors_hooks``, deduplicated,
  parameters excluded): the activation memory;
* ``step``: median wall time of the measured steps (zero_grad, forward, loss, backward, AdamW step);
* ``setup``: building the model with random weights, and for the bwskc modes compiling it
  (``bwskc.compile``: torch.export of the training and evaluation captures, lowering, the rewrite,
  codegen).

Losses: Pythia, causal next-token cross entropy on its own ids; Switch, the Hugging Face formula:
cross entropy of the decoder's logits against the labels (``decoder_input_ids`` are the labels shifted
right) plus ``router_z_loss_coef * (enc_z + dec_z) + router_aux_loss_coef * (enc_aux + dec_aux)``.

The child processes run with ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB (glibc's default, but fixed:
no dynamic raise up to 32 MiB), so freed activations go back to the system and the resident peak
follows the live tensors rather than heap fragmentation; ``--malloc default`` leaves glibc alone.

    python benchmarks/seeds.py --model all --steps 3 --json seeds.json
    python benchmarks/seeds.py --model pythia --modes conventional,reversible --steps 2
    python benchmarks/seeds.py --tiny --steps 1          # tiny configs, a smoke run
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {"pythia": os.path.join(HERE, "configs", "pythia-410m.json"),
           "switch": os.path.join(HERE, "configs", "switch-base-8.json")}
NAMES = {"pythia": "Pythia-410M", "switch": "Switch-Base-8"}
SHAPES = {"pythia": dict(batch=2, seq=512), "switch": dict(batch=1, seq=256, dec_seq=256)}
SEED_SAVINGS = {"pythia": 6.4, "switch": 0.0}  # the model cards' "Memory savings (reversible vs conventional)"
MODES = ("conventional", "reversible", "checkpoint", "eager")
TINY = {  # the same classes, small: a smoke run in seconds
    "pythia": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                   vocab_size=128, max_position_embeddings=64),
    "switch": dict(d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2, num_decoder_layers=2,
                   num_experts=4, expert_capacity=8, vocab_size=128, num_sparse_encoder_layers=1,
                   num_sparse_decoder_layers=1),
}
TINY_SHAPES = {"pythia": dict(batch=2, seq=16), "switch": dict(batch=1, seq=16, dec_seq=16)}
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


# ---------------------------------------------------------------- memory probes (Linux)
def _reset_peak_rss() -> None:
    """Start VmHWM at the current resident size (as ``bwskc.train.loop._reset_peak_rss``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status(key: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    import torch
    import transformers
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": ram, "ram_gib": round(ram / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "loadavg_at_start": os.getloadavg()}


# ---------------------------------------------------------------- one model in one mode
def load_config(name: str, tiny: bool = False):
    import transformers
    with open(CONFIGS[name]) as f:
        fields = json.load(f)
    fields.pop("_comment", None)
    if tiny:
        fields.update(TINY[name])
    return transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)


def build(name: str, tiny: bool = False):
    """The Hugging Face model (random weights, seed 0, training mode), its batch, the keyword inputs it
    is compiled with and the loss of its outputs (given by name)."""
    import torch
    import transformers

    from bwskc.train import tasks
    config = load_config(name, tiny)
    shape = (TINY_SHAPES if tiny else SHAPES)[name]
    task = "causal" if name == "pythia" else "seq2seq"
    cls = tasks.auto_class(task)._model_mapping[type(config)]
    torch.manual_seed(0)
    model = cls._from_config(config, **tasks.model_kwargs(cls)).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (shape["batch"], shape["seq"]), generator=gen)
    if task == "causal":
        batch = {"input_ids": ids}
        labels = None
    else:
        labels = torch.randint(0, config.vocab_size, (shape["batch"], shape["dec_seq"]), generator=gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "decoder_input_ids": model._shift_right(labels)}
    args, kwargs = tasks.example_inputs(task, config, batch)
    F = torch.nn.functional

    def loss(out: dict):
        logits = out["logits"]
        if task == "causal":
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   ids[:, 1:].reshape(-1))
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        return (ce + config.router_z_loss_coef * (out["encoder_z_loss"] + out["decoder_z_loss"])
                + config.router_aux_loss_coef * (out["encoder_aux_loss"] + out["decoder_aux_loss"]))

    return model, config, shape, args, kwargs, loss


def one(name: str, mode: str, steps: int, tiny: bool = False) -> dict:
    import warnings
    warnings.filterwarnings("ignore")
    import torch

    import bwskc
    from bwskc.runtime.memory import saved_bytes
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    model, config, shape, args, kwargs, loss_of = build(name, tiny)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    row = {"model": name, "mode": mode, "tiny": tiny, **shape, "params": n_params,
           "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
           "build_s": round(build_s, 2), "rss_after_import_bytes": rss0}
    if mode in ("conventional", "reversible"):
        t0 = time.perf_counter()
        module = bwskc.compile(model, args, kwargs, mode=mode)
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["compile_peak_rss_bytes"] = _status("VmHWM")
        if mode == "reversible":
            row["chains"] = module.analyses["reversible"].summary()
        del model  # the module holds its own copy of the weights
        gc.collect()
        names = module.program.entry.output_names
        values = dict(zip(module.program.entry.input_names, args))
        values.update({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        inputs = [values[n] for n in module.program.entry.input_names]

        def forward():
            out = module(*inputs)  # one output comes back bare, several as a tuple
            return dict(zip(names, out if isinstance(out, (tuple, list)) else (out,)))
    elif mode in ("checkpoint", "eager"):
        module = model
        if mode == "checkpoint":
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf_kwargs = {**kwargs, "use_cache": False}

        def forward():
            return module(*args, **hf_kwargs)
    else:
        raise SystemExit(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    module.train()
    opt = torch.optim.AdamW(module.parameters(), lr=1e-5)
    gc.collect()
    row["rss_after_setup_bytes"] = _status("VmRSS")

    class Forward(torch.nn.Module):  # saved_bytes calls a module; parameters are the model's (excluded)
        def __init__(self):
            super().__init__()
            self.inner = module

        def forward(self):
            return forward()

    nbytes, out = saved_bytes(Forward(), loss=loss_of)
    del out
    row["saved_bytes"] = nbytes
    gc.collect()

    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_of(forward())
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    _reset_peak_rss()
    t0 = time.perf_counter()
    step()  # warm-up: creates the AdamW state
    row["warmup_s"] = round(time.perf_counter() - t0, 2)
    row["warmup_peak_bytes"] = _status("VmHWM")
    times, peaks, bases = [], [], []
    for _ in range(steps):
        gc.collect()
        _reset_peak_rss()
        bases.append(_status("VmRSS"))
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        peaks.append(_status("VmHWM"))
    row.update(step_s=round(statistics.median(times), 3), step_times_s=[round(t, 3) for t in times],
               peak_bytes=max(peaks), peaks_bytes=peaks, base_bytes=bases[peaks.index(max(peaks))],
               losses=[round(v, 4) for v in losses])
    row["step_add_bytes"] = row["peak_bytes"] - row["base_bytes"]
    row["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]  # other work on a shared machine
    return row


# ---------------------------------------------------------------- driver
def _run_child(name: str, mode: str, a) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--one", f"{name}:{mode}", "--steps", str(a.steps)]
    if a.tiny:
        cmd.append("--tiny")
    env = dict(os.environ)
    if a.malloc == "fixed":
        env.update(MALLOC_ENV)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = round(time.perf_counter() - t0, 1)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"model": name, "mode": mode, "error": err, "returncode": proc.returncode, "wall_s": wall}
    row = json.loads(lines[-1])
    row["wall_s"] = wall
    return row


def _mb(v) -> str:
    if v is None:
        return "-"
    v = v / 2**20
    return f"{v:,.0f}" if abs(v) >= 10 else f"{v:.2f}"


def table(rows: list[dict]) -> str:
    head = ["model", "mode", "peak MiB", "base MiB", "step adds MiB", "saved for backward MiB",
            "step s (median)", "setup s", "losses"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"| {NAMES.get(r['model'], r['model'])} | {r['mode']} | error: {r['error']} |"
                       + " |" * (len(head) - 3))
            continue
        setup = r["build_s"] + r.get("compile_s", 0.0)
        setup_txt = (f"{setup:.0f} (compile {r['compile_s']:.0f})" if "compile_s" in r else f"{setup:.0f}")
        out.append("| " + " | ".join([
            NAMES.get(r["model"], r["model"]) + (" (tiny)" if r.get("tiny") else ""), r["mode"],
            _mb(r["peak_bytes"]), _mb(r["base_bytes"]), _mb(r["step_add_bytes"]), _mb(r["saved_bytes"]),
            f"{r['step_s']:.2f}", setup_txt, ", ".join(f"{v:.3f}" for v in r["losses"])]) + " |")
    return "\n".join(out)


def savings(rows: list[dict]) -> list[dict]:
    """Per model: the peak saving of reversible against conventional, set against the seed's figure,
    and the activation (saved-for-backward) saving."""
    out = []
    by = {(r["model"], r["mode"]): r for r in rows if "error" not in r}
    for name in dict.fromkeys(r["model"] for r in rows):
        conv, rev = by.get((name, "conventional")), by.get((name, "reversible"))
        if not (conv and rev):
            continue
        s = {"model": name, "peak_saving_pct": round(100 * (1 - rev["peak_bytes"] / conv["peak_bytes"]), 1),
             "seed_pct": SEED_SAVINGS[name],
             "step_add_saving_pct": round(100 * (1 - rev["step_add_bytes"] / conv["step_add_bytes"]), 1)
             if conv["step_add_bytes"] else None,
             "activation_saving_pct": round(100 * (1 - rev["saved_bytes"] / conv["saved_bytes"]), 1),
             "time_ratio": round(rev["step_s"] / conv["step_s"], 2)}
        ck = by.get((name, "checkpoint"))
        if ck:
            s["peak_saving_vs_checkpoint_pct"] = round(100 * (1 - rev["peak_bytes"] / ck["peak_bytes"]), 1)
        out.append(s)
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1f}%"


def savings_lines(sv: list[dict]) -> list[str]:
    lines = []
    for s in sv:
        lines.append(
            f"{NAMES[s['model']]}: Memory savings (reversible vs conventional): {s['peak_saving_pct']:.1f}% "
            f"(seed model card: {s['seed_pct']:.1f}%); activation memory (saved for backward) "
            f"{s['activation_saving_pct']:.1f}% less; the step's own addition above the resident base "
            f"{_pct(s['step_add_saving_pct'])} less; step time {s['time_ratio']:.2f}x conventional")
    return lines


NOTE = ("peak: the process's resident high-water mark (VmHWM) during a measured training step, absolute: "
        "weights, gradients, AdamW state, activations, allocator slack and the libraries' own memory all "
        "count. Reset (/proc/self/clear_refs) after building and compiling, one warm-up step (creates the "
        "AdamW state), then reset before each measured step; the largest is shown. base: resident size just "
        "before a measured step; step adds: peak - base. saved for backward: bytes autograd saves in one "
        "forward + loss (bwskc.runtime.memory.saved_bytes, deduplicated storages, parameters excluded). "
        "step s: median of zero_grad + forward + loss + backward + AdamW step. setup s: model built with "
        "random weights, plus bwskc.compile for the bwskc modes.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="all", choices=("pythia", "switch", "all"))
    ap.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--json", metavar="PATH", help="write the rows, savings and machine here")
    ap.add_argument("--tiny", action="store_true", help="tiny configs of the same classes (a smoke run)")
    ap.add_argument("--malloc", default="fixed", choices=("fixed", "default"),
                    help="fixed: children run with MALLOC_MMAP_THRESHOLD_=131072 (see the module docstring)")
    ap.add_argument("--in-process", action="store_true", help="run every case in this process (tests)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        name, mode = a.one.split(":")
        print(json.dumps(one(name, mode, a.steps, a.tiny)), flush=True)
        return 0
    models = ["pythia", "switch"] if a.model == "all" else [a.model]
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode {bad[0]!r}: choose from {', '.join(MODES)}")
    command = "python " + " ".join([os.path.relpath(os.path.abspath(__file__))] + list(
        sys.argv[1:] if argv is None else argv))
    info = machine()
    print(f"command: {command}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM; torch {info['torch']}, "
          f"transformers {info['transformers']}", flush=True)
    rows = []
    t_all = time.perf_counter()
    for name in models:
        for mode in modes:
            if a.in_process:
                row = one(name, mode, a.steps, a.tiny)
            else:
                row = _run_child(name, mode, a)
            rows.append(row)
            brief = {k: row.get(k) for k in ("model", "mode", "error", "compile_s", "step_s", "peak_bytes",
                                             "saved_bytes", "wall_s") if k in row}
            print(json.dumps(brief), flush=True)
    total_s = round(time.perf_counter() - t_all, 1)
    sv = savings(rows)
    print()
    print(table(rows))
    print()
    for line in savings_lines(sv):
        print(line)
    print()
    print(NOTE)
    print(f"total wall time: {total_s} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"command": command, "machine": info, "malloc": a.malloc, "steps": a.steps,
                       "note": NOTE, "rows": rows, "savings": sv, "savings_lines": savings_lines(sv),
                       "total_wall_s": total_s}, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
