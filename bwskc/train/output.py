"""The published summary of a ``bwskc train`` run: ``results.json``, ``README.md`` with the seeds'
tables, a loss-curve PNG per variant and one comparing the modes; and ``load_trained``.
"""
from __future__ import annotations

import json
from pathlib import Path

from bwskc.errors import BwskError
from bwskc.files import write_text_atomic
from bwskc.train.loop import MODE_DIRS

SCHEMA = "bwskc.train/1"
MODE_NAMES = {"conventional": "Conventional", "analyzed": "BWSK analyzed", "reversible": "BWSK reversible"}
TASK_NAMES = {"causal": "causal language modelling (next-token cross entropy; perplexity)",
              "seq2seq": "sequence-to-sequence language modelling (the decoder, teacher-forced, predicts the "
                         "block after the encoder's; perplexity over decoder tokens; a mixture of experts' "
                         "router losses added as its config says, reported apart)",
              "masked": "masked language modelling (15% of tokens chosen, 80/10/10 mask/random/keep; "
                        "pseudo-perplexity over the chosen tokens, fixed evaluation masks)",
              "image": "image classification (cross entropy; top-1 accuracy)"}


def write_summary(out: Path, results: dict, args) -> dict:
    """The summary of every variant in ``out``: this command's and those earlier commands finished
    there (``--experiment finetune`` after ``--experiment scratch`` gives one table of both)."""
    results = {**_finished(out), **results}
    data = next(iter(results.values()))["data"] if results else {}
    summary = {"schema": SCHEMA, "model": args.model, "model_name": getattr(args, "model_label", args.model),
               "data": data, "variants": results,
               "memory_savings": memory_savings(results)}
    write_text_atomic(out / "results.json", json.dumps(summary, indent=1) + "\n")
    for name in results:
        plot_run(out / name)
    plot_comparison(out, results)
    write_text_atomic(out / "README.md", readme(summary))
    return summary


def _finished(out: Path) -> dict:
    found = {}
    for experiment in ("scratch", "finetune"):
        for d in MODE_DIRS.values():
            path = out / f"{experiment}-{d}" / "training_results.json"
            if path.is_file():
                found[path.parent.name] = read_results(path)
    return found


def read_results(path: Path) -> dict:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BwskError(f"{path}: unreadable ({type(exc).__name__}); remove it to run the variant again") from None
    if not isinstance(results, dict) or not isinstance(results.get("data"), dict):
        raise BwskError(f"{path}: not a variant's results; remove it to run the variant again")
    return results


def memory_savings(results: dict) -> dict:
    """Reversible against conventional, per experiment: activation bytes and peak memory, and the
    metric's gap (perplexity: relative, in %; accuracy: in percentage points)."""
    out = {}
    for experiment in ("scratch", "finetune"):
        conv = results.get(f"{experiment}-{MODE_DIRS['conventional']}")
        rev = results.get(f"{experiment}-{MODE_DIRS['reversible']}")
        if conv and rev:
            row = {
                "activation_ratio": rev["activation_bytes"] / max(1, conv["activation_bytes"]),
                "activation_saved_pct": 100 * (1 - rev["activation_bytes"] / max(1, conv["activation_bytes"])),
                "peak_ratio": rev["peak_memory_bytes"] / max(1, conv["peak_memory_bytes"]),
                "peak_saved_pct": 100 * (1 - rev["peak_memory_bytes"] / max(1, conv["peak_memory_bytes"])),
            }
            if "val_accuracy" in conv:
                for split in ("val", "test"):
                    row[f"{split}_accuracy_gap_pts"] = 100 * (rev[f"{split}_accuracy"] - conv[f"{split}_accuracy"])
            else:
                for split in ("val", "test"):
                    row[f"{split}_perplexity_gap_pct"] = 100 * (rev[f"{split}_perplexity"]
                                                                / conv[f"{split}_perplexity"] - 1)
            out[experiment] = row
    return out


def _metric_name(r: dict) -> str:
    return {"pseudo-perplexity": "Pseudo-Perplexity", "accuracy": "Accuracy"}.get(r.get("metric"), "Perplexity")


def _metric_columns(r: dict):
    """The metric's columns for a task's table, and how a row fills them."""
    if r.get("task") == "image":
        return (["Val Loss", "Val Accuracy", "Test Loss", "Test Accuracy"],
                lambda r: [f"{r['val_loss']:.4f}", f"{100 * r['val_accuracy']:.2f}%", f"{r['test_loss']:.4f}",
                           f"{100 * r['test_accuracy']:.2f}%"])
    name = _metric_name(r)
    columns = [f"Val {name}", f"Test {name}"]
    if "final_router_aux_loss" in r or "final_router_z_loss" in r:  # a mixture of experts
        columns.append("Router Loss (z / aux)")
    return columns, lambda r: [f"{r['val_perplexity']:.2f}", f"{r['test_perplexity']:.2f}"] + (
        [f"{r.get('final_router_z_loss', 0):.4f} / {r.get('final_router_aux_loss', 0):.4f}"]
        if len(columns) == 3 else [])


def _mib(n) -> str:
    return f"{n / 2**20:.1f} MiB"


def _shares(blocks, before=None) -> str:
    """``train 7251 (83.9%), valid 286 (3.3%), test 1108 (12.8%)``: the rows of each split and their share
    of the split's rows; with --eval-rows, ``valid 128 of 286 (3.3%)``, the share the whole split's."""
    if not isinstance(blocks, dict) or not blocks:
        return str(blocks)
    whole = before if isinstance(before, dict) and set(before) == set(blocks) else blocks
    total = max(1, sum(whole.values()))
    return ", ".join(f"{k} {v}{f' of {whole[k]}' if whole[k] != v else ''} ({100 * whole[k] / total:.1f}%)"
                     for k, v in blocks.items())


def readme(summary: dict) -> str:
    data = summary["data"]
    task = data.get("task", "causal")
    lines = [f"# bwskc train results: {summary.get('model_name') or summary['model']}", "",
             f"Task: {TASK_NAMES.get(task, task)}."]
    if task == "image":
        lines += [f"Data: {data.get('source', '?')}; {len(data.get('classes', []))} classes, images cropped to "
                  f"{data.get('image_size')}x{data.get('image_size')}: "
                  f"{_shares(data.get('blocks'), data.get('rows_before_cap'))}."]
    else:
        unit = (f"blocks of {data.get('seq_len')} tokens read by the encoder, each followed by the "
                f"{data.get('seq_len')} its decoder predicts" if task == "seq2seq"
                else f"blocks of {data.get('seq_len')} tokens")
        lines += [f"Data: {data.get('source', '?')}. Tokenizer: {data.get('tokenizer', '?')}; {unit}: "
                  f"{_shares(data.get('blocks'), data.get('rows_before_cap'))}."]
    if data.get("note"):
        lines += ["", f"**Split convention:** {data['note']}"]
    variants = summary["variants"]
    any_run = next(iter(variants.values()), {})
    lines += ["", f"Device: {any_run.get('device', '?')}. Peak memory: {any_run.get('peak_memory_kind', '?')}; "
              "activation memory: bytes saved for backward by one training forward (deduplicated by "
              "storage, parameters excluded).", ""]
    for experiment in ("finetune", "scratch"):
        rows = [(m, variants.get(f"{experiment}-{d}")) for m, d in MODE_DIRS.items()]
        rows = [(m, r) for m, r in rows if r]
        if not rows:
            continue
        columns, cells = _metric_columns(rows[0][1])
        lines += [f"## {experiment.capitalize()}", "",
                  f"| Mode | Final Loss | {' | '.join(columns)} | Peak Memory | Activation Memory "
                  "| Time | Epochs | Steps |", "|---" * (7 + len(columns)) + "|"]
        for mode, r in rows:
            final = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "-"
            lines.append(f"| {MODE_NAMES[mode]} | {final} | {' | '.join(cells(r))} | "
                         f"{_mib(r['peak_memory_bytes'])} | "
                         f"{_mib(r['activation_bytes'])} | {r['time_s']:.1f} s | {r['epochs']:.2f} | "
                         f"{r['steps']} ({r['stopped']}) |")
        lines.append("")
    if any(f"{e}-{d}" in variants for e in ("finetune", "scratch") for d in MODE_DIRS.values()):
        lines += ["Time: wall-clock seconds of the training steps alone (compilation and evaluation not "
                  "counted), measured under whatever else ran on the machine then: on a shared or loaded "
                  "machine it varies by a factor of several between runs, so compare it only within a run "
                  "on an otherwise idle machine.", ""]
    savings = summary["memory_savings"]
    if savings:
        accuracy = any("val_accuracy_gap_pts" in s for s in savings.values())
        gap = "accuracy gap (points)" if accuracy else f"{_metric_name(any_run)} gap"
        lines += ["## Memory savings (reversible against conventional)", "",
                  f"| Experiment | Activation memory | Activation saved | Peak memory ratio | Peak saved "
                  f"| Val {gap} | Test {gap} |", "|---|---|---|---|---|---|---|"]
        for experiment, s in savings.items():
            if accuracy:
                gaps = f"{s['val_accuracy_gap_pts']:+.2f} | {s['test_accuracy_gap_pts']:+.2f}"
            else:
                gaps = f"{s['val_perplexity_gap_pct']:+.2f}% | {s['test_perplexity_gap_pct']:+.2f}%"
            lines.append(f"| {experiment} | {s['activation_ratio']:.3f}x | {s['activation_saved_pct']:.1f}% | "
                         f"{s['peak_ratio']:.3f}x | {s['peak_saved_pct']:.1f}% | {gaps} |")
        lines.append("")
    typed = [r for r in variants.values() if r.get("typing")]
    if typed:
        t = typed[0]["typing"]
        total = t["S"] + t["K"] + t["GRAY"]
        lines += ["## S/K classification", "",
                  "Every operation of the lowered program, typed by the `typing` pass with evidence "
                  "(`bwskc lower MODEL --passes typing --emit report` lists them).", "",
                  "| Operations | S | K | GRAY | S ratio | K ratio | DOF erased per example |",
                  "|---|---|---|---|---|---|---|",
                  f"| {total} | {t['S']} | {t['K']} | {t['GRAY']} | {100 * t['S_ratio']:.1f}% | "
                  f"{100 * t['K_ratio']:.1f}% | {t['dof_lost']} (+{t['dof_data_dependent']} data-dependent) |",
                  ""]
    rev = [r for r in variants.values() if r.get("reversible")]
    for r in rev:
        check = r.get("gradient_check")
        if isinstance(check, dict):
            lines += [f"Gradient check ({r['variant']}): the reversible gradients against plain autograd through "
                      f"the same architecture, {check['dtype']}, dropout on, first batch: largest relative "
                      f"error {check['max_rel_error']:.1e} (tolerance {check['tolerance']:.0e}).", ""]
        elif check:
            lines += [f"Gradient check ({r['variant']}): {check}.", ""]
    if rev:
        s = rev[0]["reversible"]
        lines += [f"Reversible rewrite: {s['blocks']} residual blocks in {s['chains']} chain(s) became "
                  f"{s['couplings']} coupling layers; {s['not_lowered']} residual connection(s) left as they "
                  "were. A reversible variant's weights belong to the rewired model: load it with "
                  "`bwskc.load_trained(path)`; `from_pretrained` alone would run the original wiring, a "
                  "different function.", ""]
    lines += ["Loss curves: `loss_curves.png` (modes compared), `<variant>/loss_curve.png`; per-step "
              "metrics in `<variant>/metrics.jsonl`.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- plots
def _metrics(directory: Path) -> list[dict]:
    path = directory / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_run(directory: Path) -> None:
    rows = _metrics(directory)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train loss")
    ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats per target)")
    ax.set_title(directory.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "loss_curve.png", dpi=100)
    plt.close(fig)


_MODE_STYLES = {"conventional": ("-", "o", 9), "analyzed": ("--", "s", 6), "reversible": (":", "^", 6)}


def plot_comparison(out: Path, results: dict) -> None:
    plt = _pyplot()
    experiments = [e for e in ("scratch", "finetune") if any(k.startswith(e) for k in results)]
    fig, axes = plt.subplots(1, max(1, len(experiments)), figsize=(6 * max(1, len(experiments)), 4),
                             squeeze=False)
    for ax, experiment in zip(axes[0], experiments):
        labelled = False
        for mode, d in MODE_DIRS.items():
            name = f"{experiment}-{d}"
            if name not in results:
                continue
            rows = _metrics(out / name)
            steps = [r for r in rows if "loss" in r]
            evals = [r for r in rows if "val_loss" in r]
            # analyzed computes what conventional does, so their curves coincide: each mode has its own
            # line style and marker (hollow, of decreasing size) so that one drawn over another still shows
            style, marker, size = _MODE_STYLES[mode]
            line, = ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.6, alpha=0.5,
                            linestyle=style, label=None if labelled else "training loss per step (faint; "
                            "the mode's colour)")
            labelled = True
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], marker=marker, linestyle=style,
                    markersize=size, markerfacecolor="none", color=line.get_color(),
                    label=f"{MODE_NAMES[mode]} (validation)")
        ax.set_title(experiment)
        ax.set_xlabel("step")
        ax.set_ylabel("cross entropy (nats per target)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------- loading back
from bwskc.train.pretrained import load_trained  # noqa: E402,F401  (bwskc.load_trained's home)
