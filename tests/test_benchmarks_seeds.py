"""Smoke test of benchmarks/seeds.py on tiny configs of the seeds' classes (the full-size run is a
benchmark, docs/benchmarks.md "The seeds' shapes")."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seeds():
    """benchmarks/seeds.py as a module, without putting benchmarks/ on sys.path (its kernels.py would
    shadow names other tests import)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_seeds", os.path.join(ROOT, "benchmarks", "seeds.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seeds_tiny(tmp_path):
    """In a subprocess: the benchmark's in-process run imports the Triton kernels in a state that a
    later test of this process (tests/test_kernels.py) must not inherit."""
    import subprocess
    out = tmp_path / "seeds.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "seeds.py"), "--tiny", "--model",
                          "pythia", "--modes", "conventional,reversible", "--steps", "1", "--in-process",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = {r["mode"]: r for r in data["rows"]}
    assert set(rows) == {"conventional", "reversible"}
    for r in rows.values():
        assert r["peak_bytes"] >= r["base_bytes"] > 0 and r["step_s"] > 0 and r["saved_bytes"] > 0
        assert all(v == v for v in r["losses"])  # finite
    # reversible stores only the chains' outputs: less saved for backward than conventional
    assert rows["reversible"]["saved_bytes"] < rows["conventional"]["saved_bytes"]
    (s,) = data["savings"]
    assert s["model"] == "pythia" and s["seed_pct"] == 6.4
    text = run.stdout
    assert "Memory savings (reversible vs conventional)" in text and "machine:" in text


def test_seed_configs_are_the_hub_architectures():
    seeds = _seeds()
    p = seeds.load_config("pythia")
    assert (p.hidden_size, p.num_hidden_layers, p.num_attention_heads, p.intermediate_size, p.vocab_size,
            p.max_position_embeddings) == (1024, 24, 16, 4096, 50304, 2048)
    assert p.rope_parameters["partial_rotary_factor"] == 0.25  # rotary_pct, as transformers 5 reads it
    s = seeds.load_config("switch")
    assert (s.d_model, s.d_ff, s.num_layers, s.num_decoder_layers, s.num_heads, s.d_kv, s.num_experts,
            s.expert_capacity, s.vocab_size, s.encoder_sparse_step, s.decoder_sparse_step) == (
        768, 3072, 12, 12, 12, 64, 8, 64, 32128, 2, 2)
