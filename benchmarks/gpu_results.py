"""The GPU run's results (``benchmarks/gpu.sh``) as one Markdown section, and its merge into the docs.

``render`` reads what gpu.sh leaves in its output folder (``kernels.txt``: benchmarks/kernels.py's
lines; ``step_time.jsonl``: benchmarks/step_time.py's; ``long_context.jsonl``: benchmarks/long_context.py's)
and writes ``gpu-results.md`` (a ``## GPU`` section: the device's name, the date, the versions, each
part's exit status, then the three tables) and ``gpu-results.json`` (the same, parsed). gpu.sh calls it
after every part, so a run cut short still leaves the parts that finished.

``merge`` puts a ``gpu-results.md`` into ``docs/benchmarks.md``: the document's ``## GPU`` section (up to
the next ``## `` heading) is replaced by the file's, or the file's is appended where there is none.

    python benchmarks/gpu_results.py render --dir out/gpu --device-name "NVIDIA H200" --date 2026-12-02
    python benchmarks/gpu_results.py merge out/gpu/gpu-results.md [--doc docs/benchmarks.md] [--dry-run]

Kernel table columns (kernels.py): ``GB/s``, the bytes a kernel must move over its median time;
``% copy``, that against the measured device-to-device copy bandwidth (goal 80%); the unfused torch
sequence's and ``torch.compile``'s effective GB/s for the same work. Step-time and long-context columns:
see benchmarks/step_time.py's and benchmarks/long_context.py's docstrings.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HEADING = "## GPU"


def _load(name: str):
    """A sibling benchmark script as a module, without putting benchmarks/ on sys.path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _jsonl(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by a timeout
                        pass
    return rows


def parse_kernels(path: str) -> dict:
    """kernels.py's output: the copy bandwidth, the table's rows, and the last error line if any."""
    out = {"copy": None, "header": None, "rows": [], "error": None, "notes": []}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        lines = [ln.rstrip("\n") for ln in f]
    for ln in lines:
        if ln.startswith("#"):
            out["notes"].append(ln.lstrip("# ").strip())
        elif " | copy bandwidth | " in ln:
            out["copy"] = ln.split(" | ")[-1].strip()
        elif ln.startswith("device | "):
            out["header"] = [c.strip() for c in ln.split("|")]
        elif " | " in ln:
            out["rows"].append([c.strip() for c in ln.split("|")])
    errors = [ln for ln in lines if re.match(r"^\w*(Error|Exception)\b", ln)]
    if errors:
        out["error"] = errors[-1][:300]
    return out


def kernels_md(k: dict) -> str:
    if not (k["rows"] or k["error"]):
        return "not run (no kernels.txt)"
    parts = []
    if k["notes"]:
        parts.append("; ".join(k["notes"]) + ".")
    if k["copy"]:
        parts.append(f"Measured device-to-device copy bandwidth: {k['copy']}.")
    if k["rows"]:
        head = k["header"] or ["device", "dtype", "kind", "kernel", "GB/s", "% copy", "torch eager GB/s",
                               "torch.compile GB/s"]
        width = len(head)
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * width]
        for r in k["rows"]:
            r = (r + [""] * width)[:width]
            lines.append("| " + " | ".join(r) + " |")
        parts.append("\n".join(lines))
    if k["error"]:
        parts.append(f"kernels.py stopped with: `{k['error']}`")
    return "\n\n".join(parts)


def render(d: str, device_name: str, date: str, versions: str = "", revision: str = "", status: str = "",
           wall_s: str = "", smoke: bool = False) -> tuple[str, dict]:
    kern = parse_kernels(os.path.join(d, "kernels.txt"))
    step_rows = _jsonl(os.path.join(d, "step_time.jsonl"))
    long_rows = _jsonl(os.path.join(d, "long_context.jsonl"))
    st, lc = _load("step_time"), _load("long_context")
    parts = [f"{HEADING}", ""]
    parts.append(f"Device: **{device_name}**; measured {date}" + (f"; {versions}" if versions else "")
                 + (f"; checkout {revision}" if revision else "") + ".")
    parts.append("Command: " + ("`bash benchmarks/gpu.sh --smoke` (CPU smoke run: tiny shapes, not figures)"
                                if smoke else "`bash benchmarks/gpu.sh`") + (f"; {wall_s} s in all" if wall_s else "")
                 + (f"; parts' exit status: {status} (0 ok, 124 timed out)" if status else "") + ".")
    parts += ["", "### Coupling kernels (benchmarks/kernels.py)", "", kernels_md(kern)]
    parts += ["", "### Training-step time (benchmarks/step_time.py)", ""]
    meta = next((r["meta"] for r in step_rows if "meta" in r), None)
    pts = [r for r in step_rows if "mode" in r]
    if meta:
        c = meta.get("config", {})
        parts.append(f"GPT-2 {c.get('n_layer')} layers, d {c.get('n_embd')}, {c.get('n_head')} heads, vocab "
                     f"{c.get('vocab_size')}; batch {meta.get('batch')}, seq {meta.get('seq')}, autocast "
                     f"{meta.get('autocast')}, attention dropout {meta.get('attn_pdrop')}; torch.compile backend "
                     f"{meta.get('backend')}; device {meta.get('device_name')}; triton {meta.get('triton')}.")
        parts.append("")
    parts.append(st.table(pts) if pts else "not run (no step_time.jsonl rows)")
    parts += ["", "### Long context (benchmarks/long_context.py)", ""]
    lmeta = next((r for r in long_rows if "summary" in r), {})
    probe = lmeta.get("probe") or next((r["probe"] for r in long_rows if "probe" in r), None)
    lpts = [r for r in long_rows if "mode" in r]
    budget = lmeta.get("budget_gb") or next((r["meta"].get("budget_gb") for r in long_rows if "meta" in r), None)
    if lpts:
        summary = lmeta.get("summary") or lc.summarise(lpts, [m for m in lc.MODES if any(r["mode"] == m for r in lpts)],
                                                       sorted({r["seq"] for r in lpts}), budget or 8.0)
        parts.append(lc.table(long_rows, summary, probe, budget))
        png = os.path.join(d, "long_context.png")
        if not os.path.exists(png):  # the run was cut before its own plot: draw it from the rows
            try:
                lc.plot(lpts, png, budget or 8.0, f"GPT-2, batch 1, {lpts[0].get('device')} (partial run)")
            except Exception as e:  # noqa: BLE001 - the table matters more than the plot
                parts += ["", f"(plot failed: {type(e).__name__}: {e})"]
        if os.path.exists(png):
            parts += ["", "Plot: `long_context.png` (peak against sequence, log2 axis)."]
    else:
        parts.append("not run (no long_context.jsonl rows)")
    md = "\n".join(parts).rstrip() + "\n"
    data = {"device_name": device_name, "date": date, "versions": versions, "revision": revision,
            "status": status, "wall_s": wall_s, "smoke": smoke, "kernels": kern, "step_time": step_rows,
            "long_context": long_rows}
    return md, data


def replace_section(text: str, heading_pattern: str, section: str) -> str:
    """``text`` with the ``## `` section whose heading line matches ``heading_pattern`` replaced by
    ``section`` (through the next ``## `` heading), or ``section`` appended when there is none."""
    m = re.search(heading_pattern, text, flags=re.M)
    if not m:
        return text.rstrip("\n") + "\n\n" + section
    nxt = re.search(r"^## ", text[m.end():], flags=re.M)
    end = m.end() + nxt.start() if nxt else len(text)
    return text[:m.start()] + section + ("\n" if nxt else "") + text[end:]


def merge(md_path: str, doc: str, dry_run: bool = False) -> str:
    with open(md_path) as f:
        section = f.read().strip() + "\n"
    if not section.startswith(HEADING):
        section = f"{HEADING}\n\n{section}"
    with open(doc) as f:
        text = f.read()
    new = replace_section(text, rf"^{re.escape(HEADING)}\b.*$", section)
    if not dry_run:
        with open(doc, "w") as f:
            f.write(new)
    return new


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="write gpu-results.md and gpu-results.json from gpu.sh's files")
    r.add_argument("--dir", required=True)
    r.add_argument("--device-name", default="unknown")
    r.add_argument("--date", default="")
    r.add_argument("--versions", default="")
    r.add_argument("--revision", default="")
    r.add_argument("--status", default="")
    r.add_argument("--wall-s", default="")
    r.add_argument("--smoke", action="store_true")
    m = sub.add_parser("merge", help="replace (or add) docs/benchmarks.md's '## GPU' section")
    m.add_argument("results", help="a gpu-results.md")
    m.add_argument("--doc", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    m.add_argument("--dry-run", action="store_true", help="print the merged document instead")
    a = ap.parse_args(argv)
    if a.cmd == "render":
        md, data = render(a.dir, a.device_name, a.date, a.versions, a.revision, a.status, a.wall_s, a.smoke)
        with open(os.path.join(a.dir, "gpu-results.md"), "w") as f:
            f.write(md)
        with open(os.path.join(a.dir, "gpu-results.json"), "w") as f:
            json.dump(data, f, indent=1)
        return 0
    text = merge(a.results, a.doc, a.dry_run)
    if a.dry_run:
        sys.stdout.write(text)
    else:
        print(f"merged {a.results} into {a.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
