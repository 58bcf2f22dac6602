"""``bwskc train --nproc 2 --shard-axis sequence``: each step's program split along the sequence over 2
gloo processes (the CALM plan ``bwskc lower --shard sequence=2`` prints) against one process on the same
batch: the same losses, gradient norms, validation losses and weights within 1e-5, the collectives that
ran equal to the plan's, each rank storing fewer activation bytes than one process; and the options it
cannot honour refused in one line before anything is written.

Dropout is on (GPT-2's 0.1 in the embeddings, the residual branches and the attention): each shard draws
the single-process masks at its global coordinates (``bwskc.runtime.rng.Window``), so the comparison is
exact with it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bwskc.cli import main

from test_train import _args, _corpus, _metrics

GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "vocab_size": 300,
        "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "bos_token_id": 0, "eos_token_id": 0,
        "use_cache": False}
FLAGS = ["--experiment", "scratch", "--mode", "conventional", "--max-steps", "4", "--eval-every", "2"]
RUN = "scratch-conventional"
REL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard_axis")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(GPT2))
    return root, root / "model" / "config.json", _corpus(root / "corpus")


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= REL * max(abs(a), abs(b), 1e-12)


def test_sequence_sharded_training_equals_one_process(setup):
    root, model, data = setup
    one, two = root / "one", root / "two"
    assert main(_args(model, data, one, *FLAGS)) == 0
    assert main(_args(model, data, two, *FLAGS, "--nproc", "2", "--shard-axis", "sequence")) == 0
    a, b = _metrics(one / RUN / "metrics.jsonl"), _metrics(two / RUN / "metrics.jsonl")
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    compared = 0
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "val_loss", "val_perplexity"):
            if key in x:
                assert _close(x[key], y[key]), (key, x, y)
                compared += 1
    assert compared == 2 * 4 + 2 * 2  # every step's loss and norm, both evaluations
    wa, wb = load_file(one / RUN / "model.safetensors"), load_file(two / RUN / "model.safetensors")
    assert wa.keys() == wb.keys()
    lr, width = json.loads((one / RUN / "training_results.json").read_text())["hyperparameters"]["lr"], 32
    for k in wa:
        if tuple(wa[k].shape) == (3 * width,):
            # c_attn's bias [query | key | value]: softmax is shift invariant, so the key bias's exact
            # gradient is zero and autograd's is rounding noise, different for every split (test_fsdp
            # says the same of FSDP2); AdamW scales it to steps of at most lr: held to that bound
            key = slice(width, 2 * width)
            assert float((wa[k][key] - wb[k][key]).abs().max()) <= 4 * lr, k
            # the query's and value's slices compared as every weight
            wa[k], wb[k] = (torch.cat([t[:width], t[2 * width:]]) for t in (wa[k], wb[k]))
        diff = float((wa[k].double() - wb[k].double()).norm())
        assert diff <= REL * max(float(wa[k].double().norm()), 1e-6), (k, diff)
    ra = json.loads((one / RUN / "training_results.json").read_text())
    rb = json.loads((two / RUN / "training_results.json").read_text())
    along = rb["sharded_along"]
    assert along["axis"] == "sequence" and along["nproc"] == 2 and along["comm_as_planned"] is True
    assert along["barrier_sites"] == 2  # one attention per layer
    assert "sharded_along" not in ra and rb["data_parallel"] is None
    # each rank holds its half of every sharded activation, plus the gathered keys and values
    assert 0 < rb["activation_bytes"] < ra["activation_bytes"]
    assert _close(ra["test_perplexity"], rb["test_perplexity"])
    # the communication `bwskc lower --emit report` predicts for this model and batch is what ran
    report = root / "report.md"
    assert main(["lower", str(model), "--train", "--input", "int64[4,32]", "--emit", "report",
                 "--shard", "sequence=2", "-o", str(report)]) == 0
    from bwskc.report import _mb
    section = report.read_text().split("### sequence, 2 processes", 1)[1]
    assert (f"{along['barrier_sites']} barrier site(s); {along['forward_collectives']} forward "
            "collective(s) per step") in section
    (total,) = [ln for ln in section.splitlines() if ln.startswith("| **Total**")]
    assert total.split("|")[6].strip() == _mb(along["forward_payload_bytes"] + 4 * rb["parameters"])
    # the saved model is one process's: the same layout and per-process batch
    assert json.loads((two / RUN / "bwskc.json").read_text())["batch_size"] == 4


@pytest.mark.parametrize("extra, says", [
    (["--shard-axis", "sequence"], "--shard-axis needs --nproc 2"),
    (["--nproc", "2", "--shard-axis", "sequence", "--mode", "reversible"], "reversible coupling chains"),
    (["--nproc", "2", "--shard-axis", "sequence", "--shard"], "choose one"),
    (["--nproc", "2", "--shard-axis", "sequence", "--compile", "aot_eager"], "--compile with --shard-axis"),
    (["--nproc", "2", "--shard-axis", "sequence", "--seq-len", "33"], "does not split evenly"),
    (["--nproc", "3", "--shard-axis", "batch"], "--batch-size 4 does not split evenly"),
])
def test_what_shard_axis_cannot_do_is_refused(setup, tmp_path, capsys, extra, says):
    _, model, data = setup
    argv = _args(model, data, tmp_path / "out", "--experiment", "scratch", "--max-steps", "1", *extra)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not (tmp_path / "out").exists()


def test_all_modes_under_shard_axis_skip_the_reversible_variant():
    from bwskc.train.run import _variants

    class A:
        experiment, mode, shard_axis = "scratch", "all", "sequence"
    assert _variants(A()) == [("scratch", "conventional"), ("scratch", "analyzed")]
    A.shard_axis = None
    assert ("scratch", "reversible") in _variants(A())
