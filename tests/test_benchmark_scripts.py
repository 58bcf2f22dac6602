"""Smoke tests of the long-context, step-time, memory, floor and GPU benchmark scripts
(benchmarks/long_context.py, step_time.py, memory.py, floor.py, gpu.sh, gpu_results.py): their tiny
CPU modes run in a subprocess (the benchmarks import the Triton kernels in a state later tests must not
inherit) and write the fields the docs read."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _load(name):
    """A benchmark script as a module, without putting benchmarks/ on sys.path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args, timeout=300, **kw):
    run = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=kw.pop("env", ENV), **kw)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-3000:])
    return run


def _rows(path):
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_long_context_smoke(tmp_path):
    jsonl, md, png = tmp_path / "lc.jsonl", tmp_path / "lc.md", tmp_path / "lc.png"
    run = _run([sys.executable, os.path.join(BENCH, "long_context.py"), "--smoke", "--jsonl", str(jsonl),
                "--md", str(md), "--plot", str(png)])
    rows = _rows(jsonl)
    meta = rows[0]["meta"]
    assert meta["seqs"] == [64, 128] and meta["budget_gb"] == 8.0 and meta["loss"] in ("linear-ce", "hidden")
    points = [r for r in rows if "mode" in r]
    assert {(r["mode"], r["seq"]) for r in points} == {(m, s) for m in ("conventional", "checkpoint", "reversible")
                                                      for s in (64, 128)}
    for r in points:
        assert r["status"] == "ok", r
        assert r["peak_bytes"] >= 0 and r["step_s"] > 0 and r["setup_s"] > 0 and r["loss"] == meta["loss"]
        assert all(v == v for v in r["losses"])  # finite
        assert r["config"] == {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000}
    assert next(r for r in points if r["mode"] == "reversible")["chains"]["couplings"] == 2
    end = rows[-1]
    assert set(end["summary"]) == {"conventional", "checkpoint", "reversible"}
    assert all(v["longest_fitting_seq"] == 128 for v in end["summary"].values())
    probe = end["probe"]
    for mode in ("conventional", "checkpoint", "reversible"):  # the score-matrix check ran per mode
        assert isinstance(probe[mode]["score_matrix"], bool) and "attention_kernels" in probe[mode]
    text = md.read_text()
    assert "| seq | conventional peak GB / step s |" in text and "Score-matrix probe" in text
    assert f"loss: {meta['loss']}" in text and "Longest sequence within the budget (8 GB)" in text
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "| 128 |" in run.stdout


def test_long_context_fresh_process_point(tmp_path):
    """The real benchmark's path: one point in a fresh child process, its peak from VmHWM."""
    jsonl = tmp_path / "lc.jsonl"
    _run([sys.executable, os.path.join(BENCH, "long_context.py"), "--smoke", "--fresh", "--seqs", "64",
          "--modes", "reversible", "--no-probe", "--jsonl", str(jsonl)])
    (point,) = [r for r in _rows(jsonl) if "mode" in r]
    assert point["status"] == "ok" and "in_process" not in point
    assert point["peak_bytes"] > 0 and point["base_bytes"] > 0 and point["wall_s"] > 0


def test_long_context_budget_and_failures_summary():
    lc = _load("long_context")
    gb = lc.GB
    rows = [{"mode": "conventional", "seq": 64, "status": "ok", "peak_bytes": 2 * gb, "step_s": 1.0},
            {"mode": "conventional", "seq": 128, "status": "ok", "peak_bytes": 9 * gb, "step_s": 2.0},
            {"mode": "reversible", "seq": 64, "status": "ok", "peak_bytes": 1 * gb, "step_s": 1.0},
            {"mode": "reversible", "seq": 128, "status": "timeout", "error": "timeout: over 5 s"},
            {"mode": "checkpoint", "seq": 64, "status": "ok", "peak_bytes": 1 * gb, "step_s": 1.0},
            {"mode": "checkpoint", "seq": 128, "status": "ok", "peak_bytes": 1.5 * gb, "step_s": 1.0}]
    s = lc.summarise(rows, ["conventional", "reversible", "checkpoint"], [64, 128], 8.0)
    assert s["conventional"]["longest_fitting_seq"] == 64 and "over the 8 GB budget" in s["conventional"]["stopped"]
    assert s["reversible"]["longest_fitting_seq"] == 64 and "timeout" in s["reversible"]["stopped"]
    assert s["checkpoint"]["longest_fitting_seq"] == 128 and "every length tried fits" in s["checkpoint"]["stopped"]
    text = lc.table(rows, s, None, 8.0)
    assert "| 128 | 9 >B / 2 | 1.5 / 1 | timeout |" in text


def test_step_time_smoke_without_compile(tmp_path):
    jsonl = tmp_path / "st.jsonl"
    run = _run([sys.executable, os.path.join(BENCH, "step_time.py"), "--smoke", "--compile", "off", "--modes",
                "conventional,reversible,checkpoint", "--jsonl", str(jsonl)])
    rows = _rows(jsonl)
    assert rows[0]["meta"]["device"] == "cpu" and rows[0]["meta"]["autocast"] == "bf16"
    points = {r["mode"]: r for r in rows if "mode" in r}
    assert set(points) == {"conventional", "reversible", "checkpoint"}
    for r in points.values():
        assert "error" not in r, r
        assert r["compile"] == "off" and r["step_ms"] > 0 and len(r["step_ms_samples"]) == 2
    assert points["conventional"]["x_conv"] == 1.0 and points["reversible"]["x_conv"] > 0
    assert points["reversible"]["kernels"] == "reference"  # BWSKC_KERNELS=auto on CPU tensors
    assert rows[-1]["summary"]["failed"] == []
    assert "| mode | compile | step ms | x conv |" in run.stdout


def test_gpu_results_merge_replaces_the_gpu_section(tmp_path):
    gr = _load("gpu_results")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## A\n\na\n\n## GPU\n\nold\n\n## B\n\nb\n")
    res = tmp_path / "gpu-results.md"
    res.write_text("## GPU\n\nDevice: **X**\n")
    gr.merge(str(res), str(doc))
    text = doc.read_text()
    assert "old" not in text and "Device: **X**" in text and text.index("## GPU") < text.index("## B")
    assert text.count("## GPU") == 1 and "## A\n\na" in text and "## B\n\nb" in text
    doc.write_text("# Benchmarks\n\n## A\n\na\n")
    gr.merge(str(res), str(doc))
    assert doc.read_text().endswith("## GPU\n\nDevice: **X**\n")


@pytest.mark.slow  # reason: about 2 minutes on the 2-core machine (three parts, torch.compile of two modes)
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_sh_smoke(tmp_path):
    out = tmp_path / "out"
    env = dict(ENV, OUT=str(out), PYTHON=sys.executable)
    run = _run(["bash", os.path.join(BENCH, "gpu.sh"), "--smoke"], timeout=600, env=env)
    assert "done: kernels=0,step_time=0,long_context=0" in run.stdout
    files = {p.name for p in out.iterdir()}
    assert {"gpu-results.md", "gpu-results.json", "gpu.log", "kernels.txt", "step_time.jsonl",
            "long_context.jsonl", "long_context.png"} <= files and len(files) <= 8  # the device tool's limit
    md = (out / "gpu-results.md").read_text()
    assert md.startswith("## GPU") and "cpu (smoke" in md
    for heading in ("### Coupling kernels", "### Training-step time", "### Long context"):
        assert heading in md
    data = json.loads((out / "gpu-results.json").read_text())
    assert data["smoke"] and data["status"] == "kernels=0,step_time=0,long_context=0"
    assert len(data["kernels"]["rows"]) == 18  # 3 dtypes x 2 kinds x 3 kernels
    steps = [r for r in data["step_time"] if "mode" in r]
    assert {(r["mode"], r["compile"]) for r in steps} == {(m, c) for m in ("conventional", "reversible")
                                                           for c in ("off", "on")}


def test_shard_quick(tmp_path):
    """benchmarks/shard.py --quick: sequence sharding of a tiny GPT-2 on 2 spawned processes; the
    communication that ran is the schedule's prediction, each process saves less than one process
    running the whole sequence, and --write puts the section into the given document."""
    jsonl, doc = tmp_path / "shard.jsonl", tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## A\n\na\n")
    run = _run([sys.executable, os.path.join(BENCH, "shard.py"), "--quick", "--seqs", "64", "--jsonl",
                str(jsonl), "--write", "--doc", str(doc)], timeout=120)
    rows = _rows(jsonl)
    assert rows[0]["meta"]["nproc"] == 2 and rows[0]["meta"]["config"]["n_layer"] == 2
    (point,) = [r for r in rows if "seq" in r]
    assert "error" not in point, point.get("error")
    assert len(point["ranks"]) == 2
    for r in point["ranks"]:
        assert r["log"] == r["predicted"] and r["log_equals_prediction"]
        assert 0 < r["saved_bytes"] < point["single_saved_bytes"]
    assert point["log_equals_prediction"] and point["barrier_sites"] == 2  # one attention per layer
    assert [c for _, c, _ in point["ranks"][0]["log"]] == ["all-gather"] * 5  # K, V per layer; logits
    assert point["loss_rel_diff"] < 1e-4
    assert point["total_recv_bytes"] == (point["forward_recv_bytes"] + point["backward_recv_bytes"]
                                         + point["grad_recv_bytes"]) > 0
    text = doc.read_text()
    assert text.count("## CALM sequence sharding") == 1 and "## A\n\na" in text
    assert "| 64 |" in text and "python benchmarks/shard.py --quick" in text
    assert "| 64 |" in run.stdout


def memory_table(row: dict) -> str:
    import importlib.util
    spec = importlib.util.spec_from_file_location("memory_bench", os.path.join(BENCH, "memory.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.table([row])


def test_memory_step_times_are_interleaved_rounds():
    """memory.py's one configuration (tiny GPT-2 blocks) runs and writes what the docs read: saved bytes
    per mode, each mode's median step and the median and range of its per-round ratios, to bwskc's
    conventional module and to Hugging Face's eager one."""
    run = _run([sys.executable, os.path.join(BENCH, "memory.py"), "--one", "gpt2:2", "--seq", "16",
                "--batch", "1", "--repeats", "3", "--steps", "1"])
    row = json.loads(run.stdout.strip().splitlines()[-1])
    conv, rev = row["conventional"], row["reversible"]
    assert conv["time_ratio"] == 1.0 and conv["time_ratio_range"] == [1.0, 1.0]
    for mode in ("reversible", "eager", "checkpoint"):
        lo, hi = row[mode]["time_ratio_range"]
        assert 0 < lo <= row[mode]["time_ratio"] <= hi and row[mode]["step_s"] > 0
        lo, hi = row[mode]["time_ratio_eager_range"]
        assert 0 < lo <= row[mode]["time_ratio_eager"] <= hi
    # the eager mode is Hugging Face's module without checkpointing: it saves what checkpointing spares
    eager = row["eager"]
    assert eager["time_ratio_eager"] == 1.0 and eager["saved_bytes"] > row["checkpoint"]["saved_bytes"]
    assert 0 < rev["saved_bytes"] < conv["saved_bytes"]
    assert row["chains"]["blocks"] == 2
    assert "rev / eager time" in memory_table(row)


def test_floor_smoke():
    """floor.py on tiny blocks: the ratio's median within its range, and the floor it reports is
    1 + reversible forward / (conventional forward + backward), from the same medians."""
    run = _run([sys.executable, os.path.join(BENCH, "floor.py"), "--blocks", "2", "--seq", "16", "--batch",
                "1", "--rounds", "3", "--steps", "1"])
    r = json.loads(run.stdout.strip().splitlines()[-1])
    assert r["blocks"] == 2 and r["free_masks"] is False
    assert 0 < r["ratio_min"] <= r["ratio_median"] <= r["ratio_max"]
    # the times are printed rounded to 0.1 ms: the floor lies between its values at the rounding's ends
    h = 5e-5
    rf, cf, cb = r["reversible_forward_s"], r["conventional_forward_s"], r["conventional_backward_s"]
    lo, hi = 1 + (rf - h) / (cf + cb + 2 * h), 1 + (rf + h) / (cf + cb - 2 * h)
    assert lo - 1e-3 <= r["floor"] <= hi + 1e-3
