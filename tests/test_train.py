"""``bwskc train`` end to end: the six variants' layout and schema, what they load back as, resume after
a kill, two-process DDP against one process, divergence, and bad input (exit 2, nothing touched)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bwskc.cli import main
from bwskc.train.loop import lm_loss

TINY = {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "vocab_size": 300, "hidden_dropout": 0.1,
        "bos_token_id": 0, "eos_token_id": 0, "use_cache": False}
WORDS = "the a of to in model graph layer residual coupling tensor gradient memory train loss step".split()
VARIANTS = [f"{e}-{m}" for e in ("finetune", "scratch")
            for m in ("conventional", "bwsk-analyzed", "bwsk-reversible")]
RESULT_KEYS = {"mode", "experiment", "final_loss", "val_perplexity", "test_perplexity", "peak_memory_bytes",
               "activation_bytes", "time_s", "epochs", "steps", "hyperparameters"}


def _corpus(directory: Path, lines=(400, 40, 40), seed=0) -> Path:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in zip(("train", "valid", "test"), lines):
        (directory / f"{name}.txt").write_text(
            "".join(" ".join(rng.choice(WORDS) for _ in range(12)) + "\n" for _ in range(n)))
    return directory


def _model(directory: Path, **overrides) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(TINY | overrides))
    return path


def _args(model, data, out, *extra) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--seq-len", "32", *extra]


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """All six variants, four steps each, evaluated every two."""
    root = tmp_path_factory.mktemp("train")
    model, data, out = _model(root / "model"), _corpus(root / "corpus"), root / "out"
    assert main(_args(model, data, out, "--max-steps", "4", "--eval-every", "2")) == 0
    return out, data


def test_layout_and_schema(trained):
    out, _ = trained
    summary = json.loads((out / "results.json").read_text())
    assert summary["schema"] == "bwskc.train/1" and sorted(summary["variants"]) == sorted(VARIANTS)
    for name in VARIANTS:
        d = out / name
        for f in ("model.safetensors", "config.json", "training_results.json", "metrics.jsonl",
                  "loss_curve.png", "tokenizer.json", "bwskc.json"):
            assert (d / f).is_file(), f"{name}/{f}"
        r = json.loads((d / "training_results.json").read_text())
        assert RESULT_KEYS <= set(r), RESULT_KEYS - set(r)
        assert r["steps"] == 4 and r["variant"] == name and r["stopped"] == "max_steps"
        assert math.isclose(r["val_perplexity"], math.exp(r["val_loss"]))
        assert r["activation_bytes"] > 0 and r["peak_memory_bytes"] > 0
        evals = [row for row in _metrics(d / "metrics.jsonl") if "val_loss" in row]
        assert [row["step"] for row in evals] == [2, 4]
        assert min(row["val_loss"] for row in evals) == pytest.approx(r["val_loss"])
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (out / "README.md").read_text()
    for heading in ("## Finetune", "## Scratch", "## Memory savings", "## S/K classification"):
        assert heading in readme
    # the fine-tune of a config-only model starts from the scratch conventional run's best weights
    assert summary["variants"]["finetune-conventional"]["init_from"].endswith("scratch-conventional")
    # analyzed trains the same program as conventional: the same losses, step for step
    conv = _metrics(out / "scratch-conventional" / "metrics.jsonl")
    analyzed = _metrics(out / "scratch-bwsk-analyzed" / "metrics.jsonl")
    assert [r.get("loss") for r in conv] == [r.get("loss") for r in analyzed]
    # reversible stores less for backward than conventional
    s = summary["memory_savings"]["scratch"]
    assert s["activation_ratio"] < 1


def _test_loss(logits_of, out: Path, batch: int = 4) -> float:
    """Mean next-token loss over the test blocks, recomputed from a model (``ids -> logits``)."""
    from bwskc.train.checkpoint import load_blocks
    blocks, _ = load_blocks(out / "data")
    test = blocks["test"]
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, test.shape[0], batch):
            ids = test[start:start + batch]
            weight = torch.ones(batch)
            if ids.shape[0] < batch:
                weight[ids.shape[0]:] = 0
                ids = torch.cat([ids, ids[-1:].expand(batch - ids.shape[0], -1)])
            s, c = lm_loss(logits_of(ids), ids, weight)
            total, count = total + float(s), count + float(c)
    return total / count


def test_outputs_load_back_as_trained(trained):
    """A conventional output is a plain Hugging Face model; a reversible one, through load_trained, gives
    the test loss the run reported, and plain from_pretrained would not (a different wiring)."""
    import transformers

    import bwskc
    out, _ = trained
    conv = out / "scratch-conventional"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(conv)).eval()
    reported = json.loads((conv / "training_results.json").read_text())["test_loss"]
    assert _test_loss(lambda ids: hf(ids).logits, out) == pytest.approx(reported, rel=1e-5)

    rev = out / "scratch-bwsk-reversible"
    reported = json.loads((rev / "training_results.json").read_text())["test_loss"]
    module = bwskc.load_trained(rev)
    assert module.bwskc_mode == "reversible" and not module.training
    assert _test_loss(lambda ids: module(ids).logits, out) == pytest.approx(reported, rel=1e-5)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(rev)).eval()
    assert abs(_test_loss(lambda ids: plain(ids).logits, out) - reported) > 1e-4


def test_resume_after_kill_loses_and_repeats_no_step(tmp_path):
    """A run SIGKILLed at step 5 (checkpoint at 4) and resumed writes the same records and weights as a
    run that never stopped (reversible mode, dropout on: masks keyed on the step replay exactly)."""
    model, data = _model(tmp_path / "model"), _corpus(tmp_path / "corpus")
    flags = ["--mode", "reversible", "--experiment", "scratch", "--max-steps", "7", "--eval-every", "2"]
    assert main(_args(model, data, tmp_path / "whole", *flags)) == 0
    env = dict(os.environ, BWSKC_FAULT_KILL_AT_STEP="5")
    killed = subprocess.run([sys.executable, "-m", "bwskc.cli", *_args(model, data, tmp_path / "cut", *flags)],
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    cut = tmp_path / "cut" / "scratch-bwsk-reversible"
    assert max(r["step"] for r in _metrics(cut / "metrics.jsonl")) == 5
    assert main(_args(model, data, tmp_path / "cut", *flags, "--resume")) == 0
    whole = tmp_path / "whole" / "scratch-bwsk-reversible"
    assert _metrics(cut / "metrics.jsonl") == _metrics(whole / "metrics.jsonl")
    from safetensors.torch import load_file
    a, b = load_file(str(cut / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_two_processes_match_one(tmp_path):
    """Two gloo processes with half the global batch each give one process's loss curve, dropout on:
    each rank draws its rows' slice of the single process's masks."""
    model, data = _model(tmp_path / "model"), _corpus(tmp_path / "corpus")
    flags = ["--mode", "reversible", "--experiment", "scratch", "--max-steps", "4", "--eval-every", "2"]
    assert main(_args(model, data, tmp_path / "one", *flags)) == 0
    assert main(_args(model, data, tmp_path / "two", *flags, "--nproc", "2")) == 0
    one = _metrics(tmp_path / "one" / "scratch-bwsk-reversible" / "metrics.jsonl")
    two = _metrics(tmp_path / "two" / "scratch-bwsk-reversible" / "metrics.jsonl")
    assert [sorted(r) for r in one] == [sorted(r) for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    r = json.loads((tmp_path / "two" / "scratch-bwsk-reversible" / "training_results.json").read_text())
    assert r["hyperparameters"]["nproc"] == 2


def test_divergence_stops_with_last_good_checkpoint(tmp_path, capsys):
    model, data, out = _model(tmp_path / "model"), _corpus(tmp_path / "corpus"), tmp_path / "out"
    code = main(_args(model, data, out, "--mode", "conventional", "--experiment", "scratch", "--lr", "1e30",
                      "--max-steps", "20", "--eval-every", "1"))
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert ("is nan" in err or "is inf" in err) and "last good checkpoint (step" in err
    step = int(err.split("last good checkpoint (step ")[1].split(")")[0])
    from safetensors.torch import load_file
    weights = load_file(str(out / "scratch-conventional" / "checkpoint" / "module.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    state = json.loads((out / "scratch-conventional" / "checkpoint" / "state.json").read_text())
    assert state["state"]["step"] == step


# ------------------------------------------------------------------------------------------ bad input
def _bad(argv, capsys, untouched: Path | None = None) -> str:
    before = _tree_digest(untouched) if untouched is not None and untouched.exists() else None
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    if before is not None:
        assert _tree_digest(untouched) == before
    return err


def test_bad_inputs_exit_2_and_touch_nothing(tmp_path, capsys, trained):
    out, data = trained
    model = _model(tmp_path / "model")
    missing = tmp_path / "nowhere"
    assert str(missing) in _bad(_args(model, missing, tmp_path / "o1"), capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("train", "valid", "test"):
        (empty / f"{name}.txt").write_text("\n  \n")
    assert "empty" in _bad(_args(model, empty, tmp_path / "o2"), capsys)
    assert "no-such-model" in _bad(_args(tmp_path / "no-such-model" / "config.json", data, tmp_path / "o3"),
                                   capsys)
    assert "hub is not reachable" in _bad(_args("EleutherAI/no-such-model", data, tmp_path / "o4"), capsys)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert str(blocker) in _bad(_args(model, data, blocker / "out"), capsys)
    for p in (tmp_path / "o1", tmp_path / "o2", tmp_path / "o3", tmp_path / "o4"):
        assert not p.exists()
    # an existing output is not overwritten without --resume
    assert "already exists" in _bad(_args(model, data, out, "--max-steps", "4"), capsys, untouched=out)
    # too little text for one batch, or for one block: refused before anything is written
    assert "fewer than one batch" in _bad(_args(model, data, tmp_path / "o5", "--batch-size", "4096"), capsys)
    small = _corpus(tmp_path / "small", lines=(400, 1, 40))
    assert "valid split" in _bad(_args(model, small, tmp_path / "o6", "--seq-len", "64"), capsys)
    for flag, value in (("--grad-clip", "-1"), ("--seed", str(2**63)), ("--device", "gpu7")):
        assert flag in _bad(_args(model, data, tmp_path / "o7", flag, value), capsys)
    for p in (tmp_path / "o5", tmp_path / "o6", tmp_path / "o7"):
        assert not p.exists()


def test_corrupt_checkpoint_is_one_line(tmp_path, capsys, trained):
    import shutil
    out, data = trained
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    variant = copy / "scratch-conventional"
    (variant / "training_results.json").unlink()  # unfinished: --resume will read its checkpoint
    blob = variant / "checkpoint" / "module.safetensors"
    blob.write_bytes(blob.read_bytes()[:100])
    err = _bad(["train", "--model", str(copy / "scratch-conventional"), "--data", str(data), "--out", str(copy),
                "--mode", "conventional", "--experiment", "scratch", "--batch-size", "4", "--seq-len", "32",
                "--max-steps", "6", "--resume"], capsys, untouched=copy)
    assert "corrupt checkpoint" in err and "module.safetensors" in err
    argv = ["train", "--model", str(copy / "scratch-conventional"), "--data", str(data), "--out", str(copy),
            "--mode", "conventional", "--experiment", "scratch", "--batch-size", "4", "--seq-len", "32",
            "--max-steps", "4", "--eval-every", "2", "--resume"]
    shutil.copy2(out / "scratch-conventional" / "checkpoint" / "module.safetensors", blob)
    state = variant / "checkpoint" / "state.json"
    good = state.read_bytes()
    state.write_text("{")  # a damaged state must stop the resume, not restart the run from step 0
    assert "corrupt checkpoint" in _bad(argv, capsys, untouched=copy)
    state.write_bytes(good)
    changed = argv[:-3] + ["--lr", "0.1", "--resume"]  # other settings: the run would not continue
    assert "other settings" in _bad(changed, capsys, untouched=copy)


# ------------------------------------------------------------------------------------------ properties
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 5), t=st.integers(2, 6), v=st.integers(2, 7), pad=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_padded_loss_is_the_unpadded_mean(n, t, v, pad, seed):
    """Evaluation pads its last batch with weight-zero copies: the weighted loss is the plain mean."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, t, v, generator=g)
    ids = torch.randint(0, v, (n, t), generator=g)
    padded_logits = torch.cat([logits, logits[-1:].expand(pad, -1, -1)])
    padded_ids = torch.cat([ids, ids[-1:].expand(pad, -1)])
    weight = torch.cat([torch.ones(n), torch.zeros(pad)])
    total, count = lm_loss(padded_logits, padded_ids, weight)
    assert float(total / count) == pytest.approx(float(lm_loss(logits, ids)), rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(blocks=st.integers(8, 60), per_rank=st.integers(1, 4), nproc=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 1000))
def test_data_order_partitions_each_epoch(blocks, per_rank, nproc, seed):
    """Within an epoch no block is drawn twice, and the ranks' slices make up the global batch."""
    from bwskc.train.loop import Trainer, World
    from bwskc.train.objectives import CausalLM
    batch = per_rank * nproc
    if blocks < batch:
        return
    data = {"train": torch.arange(blocks)[:, None]}

    def trainer(rank):
        t = Trainer.__new__(Trainer)
        t.cfg = type("C", (), {"seed": seed, "batch_size": batch})()
        t.world = t.dp = World(rank, nproc)  # dp: the data-parallel group (all ranks without --shard-axis)
        t.local, t.blocks = per_rank, data
        t.per_epoch, t.device = blocks // batch, torch.device("cpu")
        t.objective = CausalLM(None, data, {}, seed=seed, global_batch=batch)
        return t
    ranks = [trainer(r) for r in range(nproc)]
    for epoch in range(2):
        seen = []
        for i in range(ranks[0].per_epoch):
            step = epoch * ranks[0].per_epoch + i
            seen += [int(x) for r in ranks for x in r.batch(step)["input_ids"].flatten()]
        assert len(seen) == len(set(seen)) == ranks[0].per_epoch * batch


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    """--precision bf16 runs the step under autocast: a different loss in the low bits, not a different
    model (the first step's loss within bf16's resolution of fp32's)."""
    model, data = _model(tmp_path / "model"), _corpus(tmp_path / "corpus")
    flags = ["--mode", "conventional", "--experiment", "scratch", "--max-steps", "2", "--eval-every", "2"]
    assert main(_args(model, data, tmp_path / "fp32", *flags)) == 0
    assert main(_args(model, data, tmp_path / "bf16", *flags, "--precision", "bf16")) == 0
    a = _metrics(tmp_path / "fp32" / "scratch-conventional" / "metrics.jsonl")[0]["loss"]
    b = _metrics(tmp_path / "bf16" / "scratch-conventional" / "metrics.jsonl")[0]["loss"]
    assert a != b and b == pytest.approx(a, rel=2 ** -6)
    r = json.loads((tmp_path / "bf16" / "scratch-conventional" / "training_results.json").read_text())
    assert r["hyperparameters"]["precision"] == "bf16" and math.isfinite(r["test_loss"])
