"""Long context: the peak memory of one training step against sequence length, per training mode.

A 12-layer GPT-2-small-size model (``transformers.GPT2Config``: d 768, 12 heads, vocabulary 50257,
random weights, seed 0, dropout as the config defaults, 0.1 everywhere, ``attn_implementation="sdpa"``),
batch 1, at each sequence length of ``--seqs``, in three modes:

* ``conventional``: ``bwskc.compile(bwskc.lower(model, (ids,), {}, train=True), mode="conventional")``;
* ``checkpoint``: the Hugging Face model with ``gradient_checkpointing_enable()`` (per-layer
  ``torch.utils.checkpoint``, non-reentrant);
* ``reversible``: ``bwskc.compile(..., mode="reversible")`` (coupling chains storing their outputs);
* ``eager`` (not in the default list): the Hugging Face model as it is, a reference.

The loss (``--loss``):

* ``linear-ce`` (what ``auto`` picks when ``bwskc.kernels.cross_entropy.linear_cross_entropy`` and
  ``bwskc.runtime.head.split_head`` both import): ``GPT2LMHeadModel``, next-token cross entropy by the
  fused chunked linear-cross-entropy, so the ``[seq, 50257]`` logits (3.3 GB in fp32 at 16k) never exist
  at once. The bwskc modes split the head off the compiled module (``split_head``: the module returns the
  head's input, and the tied embedding is the head's weight); the Hugging Face modes run
  ``model.transformer`` and use ``model.lm_head.weight``;
* ``hidden`` (``auto``'s fallback): ``GPT2Model`` (the block stack without the vocabulary head), the
  mean square of the final hidden state;
* ``logits-ce``: ``GPT2LMHeadModel`` with the full logits and ``F.cross_entropy``, to see what the head
  alone costs.
The loss that ran is written on every row and in the table's heading.

Each (mode, seq) point runs in a FRESH subprocess (``--one``) that builds and compiles the model, then
measures one training step (zero_grad, forward, loss, backward; no optimizer):

* ``peak``: the step's peak above the baseline just before it. CPU: the resident high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs``) minus ``VmRSS`` before the step, as
  ``benchmarks/memory.py`` measures; the children run with ``MALLOC_MMAP_THRESHOLD_=131072`` (fixed,
  as ``benchmarks/seeds.py``), so freed tensors return to the system. CUDA (``--device cuda``):
  ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before the step. The parameters'
  gradients (0.5 GB for the 124M parameters in fp32) are part of every mode's peak;
* ``time``: the step's wall time (synchronised on a GPU); with ``--steps N > 1`` the peak is the
  largest of the N steps and the time the median of steps 2..N (the first step is also reported);
* ``setup``: building the model and, for the bwskc modes, lowering and compiling it.

``--budget-gb B`` (GB = 1e9 bytes): sequences are tried in increasing order (all modes at one length,
then the next length); a mode stops at the first length whose peak exceeds B or whose point fails. A
point fails as ``OOM`` (an allocation error), ``killed`` (the child died by a signal: the kernel's OOM
killer, or this script's own watchdog, which kills a CPU child whose resident size passes
``--cap-gb``, default 2B + 4 and at most the memory available at start less 1 GB, so that the machine
is never driven into swap), ``timeout`` (``--timeout`` seconds) or ``error``. Per mode the summary gives
the longest sequence whose peak fits B, and why the next one did not. ``--deadline`` stops starting new
points after that many seconds (the table and plot are still written).

Score matrix check (``--probe``, on by default; ``--no-probe`` skips it): in one more fresh process, a
1-layer model of the same width at ``--probe-seq`` runs one step per mode under a
``TorchDispatchMode`` and ``saved_tensors_hooks``, recording every tensor of shape ``[B, H, S, S]``
(one score per head and query/key pair) that an op produces (``materialised``) or autograd saves
(``saved``), and which attention kernels ran. The table's heading says, per mode, whether a score
matrix exists. Note: bwskc's counter-based attention dropout (``bwskc.runtime.rng.attention``) takes
the math path whenever attention dropout is on, which materialises the scores; ``--attn-pdrop 0``
keeps the fused kernel in every mode (residual and embedding dropout stay at the config's 0.1).

Output: one JSON line per point on stdout (and in ``--jsonl``), then a summary JSON line
(``{"summary": ...}``), then the Markdown table (also ``--md``); ``--plot PATH`` draws peak against
sequence per mode (log2 x axis, the budget as a line, failed points as crosses at the top).

Table columns: ``seq``; per mode ``peak GB / step s``: the peak above the baseline (GB) and the step's
wall time in seconds, or the failure (``OOM``, ``killed``, ``timeout``, ``error``), ``>B`` marking a peak
over the budget, ``-`` a point not run (the mode had stopped, or the deadline passed).

    python benchmarks/long_context.py --budget-gb 8 --jsonl lc.jsonl --md lc.md --plot lc.png
    python benchmarks/long_context.py --seqs 1024 --modes reversible          # one medium point
    python benchmarks/long_context.py --device cuda --seqs 1024,2048,4096,8192,16384,32768
    python benchmarks/long_context.py --smoke          # tiny: 2 layers, d 64, seq 64,128, in-process
    python benchmarks/long_context.py --smoke --fresh  # the same, a fresh process per point
    python benchmarks/long_context.py --table lc.jsonl  # the Markdown table of rows written before
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("conventional", "checkpoint", "reversible", "eager")
DEFAULT_MODES = ("conventional", "checkpoint", "reversible")
FULL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
SMOKE = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000)
DEFAULT_SEQS = "1024,2048,4096,8192,16384"
SMOKE_SEQS = "64,128"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
GB = 1e9


# ---------------------------------------------------------------- memory probes
def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _status(key: str, pid: str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _meminfo(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- the model and its loss
def loss_available() -> dict:
    """Which of the fused head's pieces import (``linear-ce`` needs both)."""
    have = {}
    try:
        from bwskc.kernels.cross_entropy import linear_cross_entropy  # noqa: F401
        have["linear_cross_entropy"] = True
    except Exception as e:  # ImportError, or the module failing to import
        have["linear_cross_entropy"] = f"{type(e).__name__}: {e}"
    try:
        from bwskc.runtime.head import split_head  # noqa: F401
        have["split_head"] = True
    except Exception as e:
        have["split_head"] = f"{type(e).__name__}: {e}"
    return have


def resolve_loss(choice: str) -> str:
    if choice != "auto":
        return choice
    have = loss_available()
    return "linear-ce" if have["linear_cross_entropy"] is True and have["split_head"] is True else "hidden"


def config_kwargs(smoke: bool, seq: int, layers: int | None = None, attn_pdrop: float | None = None) -> dict:
    kw = dict(SMOKE if smoke else FULL)
    if layers is not None:
        kw["n_layer"] = layers
    kw["n_positions"] = max(seq, 1024)
    if attn_pdrop is not None:
        kw["attn_pdrop"] = attn_pdrop
    return kw


def build(mode: str, seq: int, kw: dict, loss: str, device: str, autocast: str):
    """``(step, info)``: ``step()`` runs zero_grad, forward, loss and backward of ``mode`` once and
    returns the loss; ``info`` what was measured on the way (setup time, parameter count).

    ``linear-ce`` and ``logits-ce`` build ``GPT2LMHeadModel``; for the bwskc modes ``linear-ce`` splits
    the head off the compiled module (``bwskc.runtime.head.split_head``: inside ``split.hidden()`` the
    module returns the head's input, ``split.weight()`` is the tied embedding) and the eager modes run
    ``model.transformer`` with ``model.lm_head.weight``. ``hidden`` builds ``GPT2Model``."""
    import warnings
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    F = torch.nn.functional

    import bwskc
    t0 = time.perf_counter()
    config = transformers.GPT2Config(**kw, bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    head = loss in ("linear-ce", "logits-ce")
    model = (transformers.GPT2LMHeadModel if head else transformers.GPT2Model)(config).to(device).train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (1, seq), generator=gen).to(device)
    info = {"params": sum(p.numel() for p in model.parameters()),
            "attn_implementation": model.config._attn_implementation,
            "model_class": type(model).__name__}

    def first(out):
        return out[0] if isinstance(out, (tuple, list)) else out
    if mode in ("conventional", "reversible"):
        program = bwskc.lower(model, (ids,), {}, train=True)
        module = bwskc.compile(program, mode=mode)
        if mode == "reversible":
            info["chains"] = module.analyses["reversible"].summary()
        text = program.text()
        info["ir_sdpa_ops"] = text.count("aten.scaled_dot_product_attention")
        del model, program, text
        gc.collect()
        module.train()
        if loss == "linear-ce":
            from bwskc.runtime.head import try_split_head
            split, why = try_split_head(module)
            if split is None:
                raise RuntimeError(f"split_head refused the module: {why}")
            info["head"] = f"split_head: {split.weight_name}"

            def forward():  # the head's input [1, S, d] and its weight [V, d]
                with split.hidden():
                    out = module(ids)
                return (out[split.index] if isinstance(out, (tuple, list)) else out), split.weight()
        else:
            def forward():
                return first(module(ids)), None
    else:
        module = model
        if mode == "checkpoint":
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if loss == "linear-ce":
            def forward():
                return module.transformer(input_ids=ids, use_cache=False).last_hidden_state, module.lm_head.weight
        elif loss == "logits-ce":
            def forward():
                return module(input_ids=ids, use_cache=False).logits, None
        else:
            def forward():
                return module(input_ids=ids, use_cache=False).last_hidden_state, None
    info["setup_s"] = round(time.perf_counter() - t0, 2)
    targets = ids[0, 1:]
    if loss == "linear-ce":
        from bwskc.kernels.cross_entropy import linear_cross_entropy

        def loss_of(h, w):
            return linear_cross_entropy(h[0, :-1], w, None, targets, reduction="mean")
    elif loss == "logits-ce":
        def loss_of(logits, _):
            return F.cross_entropy(logits[0, :-1].float(), targets)
    elif loss == "hidden":
        def loss_of(h, _):
            return h.float().pow(2).mean()
    else:
        raise SystemExit(f"unknown loss {loss!r}")
    cast = (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if autocast == "bf16"
            else torch.autocast(device.split(":")[0], enabled=False))

    def step():
        module.zero_grad(set_to_none=True)
        with cast:
            value = loss_of(*forward())
        value.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return float(value.detach())

    return step, info


# ---------------------------------------------------------------- one point, in a fresh process
def one(mode: str, seq: int, a) -> dict:
    import torch
    cuda = a.device.startswith("cuda")
    row = {"mode": mode, "seq": seq, "batch": 1, "device": a.device, "loss": a.loss, "autocast": a.autocast,
           "rss_after_import_bytes": _status("VmRSS")}
    kw = config_kwargs(a.smoke, seq, a.layers, a.attn_pdrop)
    row["config"] = {k: kw[k] for k in ("n_layer", "n_embd", "n_head", "vocab_size")}
    row["attn_pdrop"] = 0.1 if a.attn_pdrop is None else a.attn_pdrop
    try:
        step, info = build(mode, seq, kw, a.loss, a.device, a.autocast)
        row.update(info)
        peaks, times, losses, bases = [], [], [], []
        for _ in range(a.steps):
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                base = _status("VmRSS")
                _reset_peak_rss()
            t0 = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t0)
            peak = (torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")) - base
            peaks.append(max(peak, 0))
            bases.append(base)
        i = peaks.index(max(peaks))
        row.update(status="ok", peak_bytes=peaks[i], base_bytes=bases[i], peaks_bytes=peaks,
                   first_step_s=round(times[0], 3),
                   step_s=round(statistics.median(times[1:]) if len(times) > 1 else times[0], 3),
                   step_times_s=[round(t, 3) for t in times], losses=[round(v, 4) for v in losses])
        if cuda:
            row["max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    except Exception as e:  # noqa: BLE001 - every failure is a result here
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        oom = (isinstance(e, MemoryError) or "out of memory" in msg.lower() or "can't allocate" in msg.lower()
               or type(e).__name__ == "OutOfMemoryError")
        row.update(status="OOM" if oom else "error", error=msg)
    return row


# ---------------------------------------------------------------- score-matrix probe
def probe(a) -> dict:
    """Per mode: ``[B, H, S, S]`` tensors produced by any op (forward and backward, the reversible
    recomputation included) or saved for backward, and the attention kernels that ran."""
    import torch
    from torch.autograd.graph import saved_tensors_hooks
    from torch.utils._python_dispatch import TorchDispatchMode
    import torch.utils._pytree as pytree
    seq = a.probe_seq
    kw = config_kwargs(a.smoke, seq, 1, a.attn_pdrop)
    heads = kw["n_head"]

    def is_scores(t):
        return (isinstance(t, torch.Tensor) and t.dim() == 4 and tuple(t.shape[-2:]) == (seq, seq)
                and t.shape[1] == heads)

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.made, self.kernels = set(), set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            if "attention" in name or "scaled_dot" in name:
                self.kernels.add(name)
            for t in pytree.tree_leaves(out):
                if is_scores(t):
                    self.made.add(f"{name}:{list(t.shape)}")
            return out

    result = {"probe_seq": seq, "layers": 1, "heads": heads}
    for mode in a.modes:
        try:
            step, info = build(mode, seq, kw, a.loss, a.device, a.autocast)
            saved = set()

            def pack(t):
                if is_scores(t):
                    saved.add(str(list(t.shape)))
                return t
            watch = Watch()
            with saved_tensors_hooks(pack, lambda t: t), watch:
                step()
            result[mode] = {"materialised": sorted(watch.made), "saved": sorted(saved),
                            "attention_kernels": sorted(watch.kernels),
                            "score_matrix": bool(watch.made or saved)}
        except Exception as e:  # noqa: BLE001
            result[mode] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    return result


# ---------------------------------------------------------------- driver
def _child_cmd(a, extra: list[str]) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), *extra, "--device", a.device, "--loss", a.loss,
           "--steps", str(a.steps), "--autocast", a.autocast, "--probe-seq", str(a.probe_seq),
           "--modes", ",".join(a.modes)]
    if a.smoke:
        cmd.append("--smoke")
    if a.layers is not None:
        cmd += ["--layers", str(a.layers)]
    if a.attn_pdrop is not None:
        cmd += ["--attn-pdrop", str(a.attn_pdrop)]
    return cmd


_CHILDREN: set[int] = set()


def _on_term(signum, frame):
    """A driver stopped from outside (``timeout``) takes its children (own sessions) with it."""
    for pid in list(_CHILDREN):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    sys.exit(128 + signum)


def _run_child(cmd: list[str], timeout: float, cap_bytes: int | None) -> tuple[dict | None, str, float]:
    """``(row or None, failure, wall)``: the child's last JSON line, or why there is none."""
    env = dict(os.environ, **MALLOC_ENV)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    _CHILDREN.add(proc.pid)
    over = {"rss": 0}
    stop = threading.Event()

    def watchdog():  # a CPU child over the cap is killed before the machine swaps
        while not stop.wait(0.05):
            rss = _status("VmRSS", str(proc.pid))
            if cap_bytes and rss > cap_bytes:
                over["rss"] = rss
                os.killpg(proc.pid, signal.SIGKILL)
                return
    th = threading.Thread(target=watchdog, daemon=True)
    th.start()
    try:
        out, err = proc.communicate(timeout=timeout)
        failure = ""
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        failure = f"timeout: over {timeout:g} s"
    stop.set()
    th.join()
    _CHILDREN.discard(proc.pid)
    wall = round(time.perf_counter() - t0, 1)
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    if failure:
        return None, failure, wall
    if over["rss"]:
        return None, f"killed: resident size {over['rss'] / GB:.1f} GB passed the {cap_bytes / GB:.1f} GB cap", wall
    if proc.returncode < 0:
        return None, f"killed: signal {-proc.returncode} (the kernel's OOM killer?)", wall
    if not lines:
        tail = (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return None, f"error: {tail[:300]}", wall
    return json.loads(lines[-1]), "", wall


def machine(device: str) -> dict:
    import torch
    import transformers
    info = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cores": os.cpu_count(),
            "ram_gb": round(_meminfo("MemTotal") / GB, 1), "loadavg_at_start": os.getloadavg(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.machine()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    return info


def summarise(rows: list[dict], modes, seqs, budget: float) -> dict:
    out = {}
    for mode in modes:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["seq"])
        fits = [r["seq"] for r in mine if r.get("status") == "ok" and r["peak_bytes"] <= budget * GB]
        stop = next((r for r in mine if r.get("status") != "ok" or r["peak_bytes"] > budget * GB), None)
        if stop is None:
            why = (f"every length tried fits (up to {mine[-1]['seq']})" if mine else "not run")
            if mine and mine[-1]["seq"] < max(seqs):
                why += f"; {max(seqs)} not reached (the run was cut: deadline or timeout)"
        elif stop.get("status") == "ok":
            why = f"seq {stop['seq']}: peak {stop['peak_bytes'] / GB:.2f} GB over the {budget:g} GB budget"
        else:
            why = f"seq {stop['seq']}: {stop.get('error') or stop['status']}"
        out[mode] = {"longest_fitting_seq": max(fits) if fits else None, "stopped": why}
    return out


def _kernels(names: list[str]) -> str:
    short = sorted({n.split(".")[1] if n.count(".") >= 2 else n for n in names if "backward" not in n})
    return ", ".join(short) if short else "math path: no fused attention kernel ran"


def _cell(r: dict | None, budget: float) -> str:
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return r["status"]
    over = " >B" if r["peak_bytes"] > budget * GB else ""
    return f"{r['peak_bytes'] / GB:.3g}{over} / {r['step_s']:.3g}"


def table(rows: list[dict], summary: dict | None = None, probe_result: dict | None = None,
          budget: float | None = None) -> str:
    """The Markdown table of the points (one row per sequence length, a column per mode)."""
    pts = [r for r in rows if "mode" in r]
    modes = [m for m in MODES if any(r["mode"] == m for r in pts)]
    seqs = sorted({r["seq"] for r in pts})
    budget = budget if budget is not None else float("inf")
    by = {(r["mode"], r["seq"]): r for r in pts}
    head = []
    if pts:
        r0 = pts[0]
        c = r0.get("config", {})
        head.append(f"GPT-2 {c.get('n_layer')} layers, d {c.get('n_embd')}, {c.get('n_head')} heads, vocab "
                    f"{c.get('vocab_size')}, batch 1, attention dropout {r0.get('attn_pdrop')}, device "
                    f"{r0.get('device')}, autocast {r0.get('autocast')}; loss: {r0.get('loss')}. Cells: peak GB "
                    f"above the baseline / step s.")
    if probe_result:
        bits = []
        for m in modes:
            p = probe_result.get(m)
            if not p:
                continue
            if "error" in p:
                bits.append(f"{m}: probe failed ({p['error']})")
            else:
                bits.append(f"{m}: " + ("[B,H,S,S] scores MATERIALISED" + (" and saved" if p["saved"] else "")
                                        if p["score_matrix"] else "no [B,H,S,S] tensor")
                            + f" ({_kernels(p['attention_kernels'])})")
        head.append(f"Score-matrix probe (1 layer, seq {probe_result['probe_seq']}): " + "; ".join(bits) + ".")
    lines = ["| seq | " + " | ".join(f"{m} peak GB / step s" for m in modes) + " |",
             "|" + "---|" * (len(modes) + 1)]
    for s in seqs:
        lines.append(f"| {s} | " + " | ".join(_cell(by.get((m, s)), budget) for m in modes) + " |")
    tail = []
    if summary:
        tail.append("Longest sequence within the budget" + (f" ({budget:g} GB)" if budget != float("inf") else "")
                    + ": " + "; ".join(f"{m} {v['longest_fitting_seq'] or 'none'} ({v['stopped']})"
                                       for m, v in summary.items()) + ".")
    return "\n".join(head + [""] + lines + ([""] + tail if tail else []))


def plot(rows: list[dict], path: str, budget: float, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ok = [r for r in rows if r.get("status") == "ok"]
    top = max([r["peak_bytes"] / GB for r in ok] + [budget]) * 1.15
    for mode in MODES:
        mine = sorted((r for r in rows if r.get("mode") == mode), key=lambda r: r["seq"])
        if not mine:
            continue
        good = [r for r in mine if r.get("status") == "ok"]
        line, = ax.plot([r["seq"] for r in good], [r["peak_bytes"] / GB for r in good], marker="o", label=mode,
                        color=f"C{MODES.index(mode)}")
        bad = [r for r in mine if r.get("status") != "ok"]
        if bad:
            ax.scatter([r["seq"] for r in bad], [top] * len(bad), marker="x", color=line.get_color())
            for r in bad:
                ax.annotate(r["status"], (r["seq"], top), textcoords="offset points", xytext=(3, -10),
                            fontsize=7, color=line.get_color())
    ax.axhline(budget, color="grey", linestyle="--", linewidth=1, label=f"budget {budget:g} GB")
    ax.set_xscale("log", base=2)
    seqs = sorted({r["seq"] for r in rows if "seq" in r})
    ax.set_xticks(seqs)
    ax.set_xticklabels([str(v) for v in seqs])
    ax.minorticks_off()
    ax.set_xlabel("sequence length (batch 1)")
    ax.set_ylabel("peak above baseline, GB")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", default=None, help=f"comma-separated (default {DEFAULT_SEQS}; smoke {SMOKE_SEQS})")
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--budget-gb", type=float, default=8.0, help="GB = 1e9 bytes (default %(default)s)")
    ap.add_argument("--cap-gb", type=float, default=None,
                    help="CPU: kill a child whose resident size passes this (default 2*budget+4, at most the "
                         "memory available at start less 1 GB)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per point (default %(default)s)")
    ap.add_argument("--deadline", type=float, default=None, help="start no new point after this many seconds")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--loss", default="auto", choices=("auto", "linear-ce", "hidden", "logits-ce"))
    ap.add_argument("--autocast", default="none", choices=("none", "bf16"))
    ap.add_argument("--attn-pdrop", type=float, default=None, help="attention dropout (default: the config's 0.1)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (12; smoke 2)")
    ap.add_argument("--steps", type=int, default=1, help="training steps measured per point (default 1)")
    ap.add_argument("--probe-seq", type=int, default=None, help="the score-matrix probe's length (256; smoke 64)")
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny: 2 layers, d 64, seqs 64,128, every point in this process (--fresh: not)")
    ap.add_argument("--in-process", action="store_true",
                    help="run the points and the probe in this process (fast; not fresh-process peaks)")
    ap.add_argument("--fresh", action="store_true", help="with --smoke: a fresh process per point anyway")
    ap.add_argument("--jsonl", metavar="PATH", help="write the JSON lines here too")
    ap.add_argument("--md", metavar="PATH", help="write the Markdown table here")
    ap.add_argument("--plot", metavar="PATH", help="write the plot (PNG) here")
    ap.add_argument("--table", metavar="JSONL", help="print the Markdown table of a --jsonl file and exit")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--probe-child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in a.modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode {bad[0]!r}: choose from {', '.join(MODES)}")
    a.probe_seq = a.probe_seq or (64 if a.smoke else 256)
    if a.table:
        with open(a.table) as f:
            rows = [json.loads(ln) for ln in f if ln.strip()]
        meta = next((r for r in rows if "summary" in r), {})
        print(table(rows, meta.get("summary"), meta.get("probe"), meta.get("budget_gb")))
        return 0
    a.loss = resolve_loss(a.loss)
    if a.one:
        mode, seq = a.one.split(":")
        print(json.dumps(one(mode, int(seq), a)), flush=True)
        return 0
    if a.probe_child:
        print(json.dumps(probe(a)), flush=True)
        return 0

    import warnings
    warnings.filterwarnings("ignore")
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    seqs = sorted(int(s) for s in (a.seqs or (SMOKE_SEQS if a.smoke else DEFAULT_SEQS)).split(","))
    cuda = a.device.startswith("cuda")
    cap = None
    if not cuda:
        avail = _meminfo("MemAvailable")
        cap = int((a.cap_gb if a.cap_gb is not None else 2 * a.budget_gb + 4) * GB)
        if avail:
            cap = min(cap, avail - int(1 * GB))
    command = "python " + " ".join([os.path.relpath(os.path.abspath(__file__))]
                                   + list(sys.argv[1:] if argv is None else argv))
    info = machine(a.device)
    head = {"command": command, "machine": info, "loss": a.loss, "loss_available": loss_available(),
            "budget_gb": a.budget_gb, "cap_gb": round(cap / GB, 1) if cap else None, "seqs": seqs,
            "modes": a.modes, "in_process": a.in_process or (a.smoke and not a.fresh)}
    jsonl = open(a.jsonl, "w") if a.jsonl else None

    def emit(obj):
        line = json.dumps(obj)
        print(line, flush=True)
        if jsonl:
            jsonl.write(line + "\n")
            jsonl.flush()
    emit({"meta": head})
    t_all = time.perf_counter()
    probe_result = None
    in_process = a.in_process or (a.smoke and not a.fresh)
    if not a.no_probe:
        t0 = time.perf_counter()
        if in_process:
            res, failure = probe(a), ""
        else:
            res, failure, _ = _run_child(_child_cmd(a, ["--probe-child"]), a.timeout, cap)
        probe_result = res or {"probe_seq": a.probe_seq, "error": failure}
        probe_result["wall_s"] = round(time.perf_counter() - t0, 1)
        emit({"probe": probe_result})
    rows, stopped = [], set()
    for seq in seqs:
        for mode in a.modes:
            if mode in stopped:
                continue
            if a.deadline is not None and time.perf_counter() - t_all > a.deadline:
                stopped.add(mode)
                continue
            if in_process:
                t0 = time.perf_counter()
                row, failure = one(mode, seq, a), ""
                row["in_process"] = True
                wall = round(time.perf_counter() - t0, 1)
            else:
                row, failure, wall = _run_child(_child_cmd(a, ["--one", f"{mode}:{seq}"]), a.timeout, cap)
            if row is None:
                row = {"mode": mode, "seq": seq, "device": a.device, "loss": a.loss,
                       "status": failure.split(":")[0], "error": failure}
            row["wall_s"] = wall
            rows.append(row)
            emit(row)
            if row["status"] != "ok" or row["peak_bytes"] > a.budget_gb * GB:
                stopped.add(mode)
    summary = summarise(rows, a.modes, seqs, a.budget_gb)
    total = round(time.perf_counter() - t_all, 1)
    emit({"summary": summary, "probe": probe_result, "budget_gb": a.budget_gb, "loss": a.loss,
          "total_wall_s": total})
    if jsonl:
        jsonl.close()
    md = table(rows, summary, probe_result, a.budget_gb)
    print()
    print(md)
    print(f"\ntotal wall time: {total} s; command: {command}")
    if a.md:
        with open(a.md, "w") as f:
            f.write(md + "\n")
    if a.plot and rows:
        c = rows[0].get("config") or {}
        plot(rows, a.plot, a.budget_gb, f"GPT-2 {c.get('n_layer', '?')}L d{c.get('n_embd', '?')}, batch 1, "
                                         f"{a.device}, loss {a.loss}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
