"""``bwskc train`` for every task family: seq2seq (a Switch mixture of experts), masked LM (BERT) and
image classification (ViT on the shared handwritten digits). Each family's three modes train and
write the layout, a reversible run SIGKILLed and resumed equals one that never stopped, the reversible
gradients equal the store-activations reference with dropout on, the masked LM's masks are
reproducible, two DDP processes of a seq2seq model equal one, and bad input is one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

from bwskc.cli import main
from test_train import _bad, _corpus, _metrics, _model

DIGITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "digits"
needs_digits = pytest.mark.skipif(not DIGITS.is_dir(), reason="../shared/data/digits is absent (a user's "
                                  "machine without the shared data); the image tests read it")

SWITCH = {"model_type": "switch_transformers", "vocab_size": 300, "d_model": 32, "d_kv": 8, "d_ff": 64,
          "num_layers": 2, "num_decoder_layers": 2, "num_heads": 4, "num_experts": 4, "expert_capacity": 16,
          "encoder_sparse_step": 2, "decoder_sparse_step": 2, "dropout_rate": 0.1, "pad_token_id": 0,
          "eos_token_id": 0, "decoder_start_token_id": 0, "use_cache": False}
BERT = {"model_type": "bert", "vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.0}
VIT = {"model_type": "vit", "image_size": 8, "patch_size": 4, "num_channels": 3, "hidden_size": 32,
       "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "hidden_dropout_prob": 0.1}
FAMILIES = {"seq2seq": SWITCH, "masked": BERT, "image": VIT}
MODES = ("conventional", "bwsk-analyzed", "bwsk-reversible")


def _config(directory: Path, config: dict) -> Path:
    overrides = {k: v for k, v in config.items() if k != "model_type"}
    return _model(directory, model_type=config["model_type"], **overrides)


def _argv(task: str, model: Path, data: Path, out: Path, *extra) -> list[str]:
    shape = ["--batch-size", "8"] if task == "image" else ["--batch-size", "4", "--seq-len", "16"]
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), *shape, *extra]


def _data(task: str, root: Path) -> Path:
    return DIGITS if task == "image" else _corpus(root / "corpus", lines=(200, 30, 30))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    """Each family's three scratch modes, four steps, evaluated every two."""
    task = request.param
    if task == "image" and not DIGITS.is_dir():
        pytest.skip("../shared/data/digits is absent: the image family trains on it")
    root = tmp_path_factory.mktemp(task)
    model, data, out = _config(root / "model", FAMILIES[task]), _data(task, root), root / "out"
    assert main(_argv(task, model, data, out, "--experiment", "scratch", "--max-steps", "4",
                      "--eval-every", "2")) == 0
    return task, model, data, out


def test_every_mode_trains_and_writes_the_layout(family):
    task, _, _, out = family
    summary = json.loads((out / "results.json").read_text())
    assert sorted(summary["variants"]) == sorted(f"scratch-{m}" for m in MODES)
    metric = {"seq2seq": "perplexity", "masked": "pseudo-perplexity", "image": "accuracy"}[task]
    for name, r in summary["variants"].items():
        assert r["task"] == task and r["metric"] == metric and r["steps"] == 4
        keys = ("val_accuracy", "test_accuracy", "val_loss", "test_loss") if task == "image" else (
            "val_perplexity", "test_perplexity", "val_loss", "test_loss")
        assert all(isinstance(r[k], float) for k in keys + ("final_loss",)), name
        meta = json.loads((out / name / "bwskc.json").read_text())
        assert meta["task"] == task
        for f in ("model.safetensors", "config.json", "metrics.jsonl", "loss_curve.png"):
            assert (out / name / f).is_file(), f
    if task == "image":
        r = summary["variants"]["scratch-conventional"]
        assert 0 <= r["val_accuracy"] <= 1 and r["data"]["classes"] == [str(i) for i in range(10)]
    if task == "seq2seq":  # the router's losses are reported apart, weighted as the config says
        r = summary["variants"]["scratch-conventional"]
        assert r["final_router_z_loss"] > 0 and r["final_router_aux_loss"] > 0
        assert r["final_loss"] == pytest.approx(
            r["final_lm_loss"] + r["final_router_z_loss"] + r["final_router_aux_loss"], rel=1e-5)
    # conventional and analyzed run the same program: the same numbers
    a, b = summary["variants"]["scratch-conventional"], summary["variants"]["scratch-bwsk-analyzed"]
    assert a["val_loss"] == b["val_loss"] and a["final_loss"] == b["final_loss"]
    readme = (out / "README.md").read_text()
    header = {"seq2seq": "Val Perplexity", "masked": "Val Pseudo-Perplexity", "image": "Val Accuracy"}[task]
    assert header in readme and "Memory savings" in readme
    gap = "val_accuracy_gap_pts" if task == "image" else "val_perplexity_gap_pct"
    assert gap in summary["memory_savings"]["scratch"]


def test_resume_after_kill_is_bit_for_bit(family, tmp_path):
    """Reversible mode, dropout (and masks, augmentations, router jitter) on: killed at step 3 with a
    checkpoint at 2, resumed, the records and weights equal a run that never stopped."""
    task, model, data, _ = family
    flags = ["--mode", "reversible", "--experiment", "scratch", "--max-steps", "4", "--eval-every", "2"]
    assert main(_argv(task, model, data, tmp_path / "whole", *flags)) == 0
    env = dict(os.environ, BWSKC_FAULT_KILL_AT_STEP="3")
    killed = subprocess.run([sys.executable, "-m", "bwskc.cli", *_argv(task, model, data, tmp_path / "cut", *flags)],
                            env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert main(_argv(task, model, data, tmp_path / "cut", *flags, "--resume")) == 0
    cut, whole = (tmp_path / d / "scratch-bwsk-reversible" for d in ("cut", "whole"))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(_metrics(cut / "metrics.jsonl")) == strip(_metrics(whole / "metrics.jsonl"))
    from safetensors.torch import load_file
    a, b = load_file(str(cut / "model.safetensors")), load_file(str(whole / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _example(task: str, config):
    """A model of the family and one training batch of its objective."""
    import transformers

    from bwskc.train import objectives, tasks
    torch.manual_seed(0)
    cls = tasks.auto_class(task)._model_mapping[type(config)]
    model = cls._from_config(config, **tasks.model_kwargs(cls)).train()
    if task == "image":
        data = {"train": torch.randint(0, 256, (4, 3, 10, 10), dtype=torch.uint8),
                "train_labels": torch.arange(4) % config.num_labels}
        info = {"image_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3}
    else:
        length = 32 if task == "seq2seq" else 16
        data = {"train": torch.randint(1, config.vocab_size, (4, length))}
        info = {"mask_token_id": 3}
    obj = objectives.objective(task, config, data, info, seed=0, global_batch=4)
    batch = obj.batch("train", torch.arange(4), step=0)
    return transformers, model, obj, batch


@pytest.mark.parametrize("task", sorted(FAMILIES))
def test_reversible_gradients_equal_store_activations(task):
    """The coupling chains' gradients against the same architecture run by plain autograd, in float64,
    dropout on (bwskc.compile(check=True) raises above 1e-8 relative)."""
    import bwskc
    from bwskc.train import tasks
    transformers, model, _, batch = _example(task, transformers_config(task))
    args, kwargs = tasks.example_inputs(task, model.config, batch)
    module = bwskc.compile(model, args, kwargs, mode="reversible", check=True)
    report = module.check_report
    assert report["ok"] and report["max_rel_error"] < 1e-8, report
    assert report["chains"], report  # something was coupled


def transformers_config(task: str):
    import transformers
    raw = dict(FAMILIES[task])
    return transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)


def test_seq2seq_objective_is_the_model_class_loss():
    """Decoder inputs are the targets shifted right by the start token; cross entropy plus the router's
    z-loss and load-balancing loss with the config's coefficients is the loss Switch computes itself."""
    import bwskc
    from bwskc.train import tasks
    from bwskc.train.objectives import outputs_by_name
    _, model, obj, batch = _example("seq2seq", transformers_config("seq2seq"))
    assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
    assert (batch["decoder_input_ids"][:, 0] == model.config.decoder_start_token_id).all()
    model.eval()  # no dropout, no router jitter: one function on both sides
    args, kwargs = tasks.example_inputs("seq2seq", model.config, batch)
    module = bwskc.compile(model, args, kwargs).eval()
    out = outputs_by_name(module, module(*[batch[n] for n in module.program.entry.input_names]))
    loss, parts = obj.loss(out, batch)
    with torch.no_grad():
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=batch["decoder_input_ids"], labels=batch["labels"],
                    output_router_logits=True)
    assert float(loss) == pytest.approx(float(own.loss), rel=1e-5)
    assert parts["router_z_loss"] == pytest.approx(
        model.config.router_z_loss_coef * float(own.encoder_z_loss + own.decoder_z_loss), rel=1e-5)


# ------------------------------------------------------------------------------------------ masks
def _masked(seed=0, global_batch=8, rows=40, length=24, vocab=300):
    from bwskc.train.objectives import MaskedLM
    data = {"train": torch.randint(4, vocab, (rows, length), generator=torch.Generator().manual_seed(1)),
            "valid": torch.randint(4, vocab, (rows, length), generator=torch.Generator().manual_seed(2))}
    config = transformers_config("masked")
    return MaskedLM(config, data, {"mask_token_id": 3}, seed=seed, global_batch=global_batch), data


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), step=st.integers(0, 10_000), nproc=st.sampled_from([1, 2, 4]))
def test_masks_are_keyed_on_seed_and_step_and_sliced_by_rank(seed, step, nproc):
    obj, _ = _masked(seed)
    rows = torch.arange(8)
    whole = obj.batch("train", rows, step=step)
    again = _masked(seed)[0].batch("train", rows, step=step)
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    local = 8 // nproc
    for rank in range(nproc):
        part = obj.batch("train", rows[rank * local:(rank + 1) * local], step=step, offset=rank * local)
        assert all(torch.equal(part[k], whole[k][rank * local:(rank + 1) * local]) for k in whole)
    other = obj.batch("train", rows, step=step + 1)
    assert not torch.equal(other["labels"], whole["labels"])
    chosen = whole["labels"] != -100
    assert chosen.any(dim=1).all()  # every block has a target
    assert torch.equal(whole["labels"][chosen], obj.data["train"][rows][chosen])
    assert torch.equal(whole["input_ids"][~chosen], obj.data["train"][rows][~chosen])


def test_mask_rates_and_fixed_evaluation_masks():
    """15% chosen; of those 80% masked, 10% random, 10% kept (within sampling error over 96k tokens);
    evaluation masks do not depend on --seed and are the same on every call."""
    obj, data = _masked(global_batch=4000, rows=4000, length=24)
    b = obj.batch("train", torch.arange(4000), step=3)
    chosen = b["labels"] != -100
    # 15%, plus the forced target of a block that drew none (probability 0.85**24)
    assert abs(chosen.float().mean().item() - (0.15 + 0.85**24 / 24)) < 0.005
    masked = (b["input_ids"] == 3) & chosen
    kept = (b["input_ids"] == data["train"]) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.01
    assert abs(kept.sum().item() / chosen.sum().item() - 0.1) < 0.01 + 1 / 300  # a random draw may keep
    a = obj.batch("valid", torch.arange(10), step=None)
    other_seed = _masked(seed=99)[0].batch("valid", torch.arange(10), step=None)
    assert all(torch.equal(a[k], other_seed[k]) for k in a)
    assert torch.equal(obj.batch("valid", torch.arange(5, 10), step=None)["labels"], a["labels"][5:])


# ------------------------------------------------------------------------------------------ DDP
@pytest.mark.slow  # two gloo processes of a Switch model, 75 s on 2 cores; DDP itself is checked on the
# causal LM in the default run (test_train.py), and FSDP2 in test_fsdp.py
def test_ddp_two_processes_equal_one_for_seq2seq(tmp_path):
    """Two gloo processes of a Switch model, half the global batch each, reversible, dropout and router
    jitter on: the single process's loss curve."""
    model, data = _config(tmp_path / "model", SWITCH), _data("seq2seq", tmp_path)
    flags = ["--mode", "reversible", "--experiment", "scratch", "--max-steps", "2", "--eval-every", "2"]
    assert main(_argv("seq2seq", model, data, tmp_path / "one", *flags)) == 0
    assert main(_argv("seq2seq", model, data, tmp_path / "two", *flags, "--nproc", "2")) == 0
    one, two = (_metrics(tmp_path / d / "scratch-bwsk-reversible" / "metrics.jsonl") for d in ("one", "two"))
    assert [sorted(r) for r in one] == [sorted(r) for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "val_loss", "grad_norm", "train_lm_loss", "train_router_z_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    # the router's losses are logged as the mean over both ranks (the load-balancing loss is a product
    # of two batch means, so half-batch values differ from the whole batch's: close, not equal)
    logged = [r for r in two if "train_router_aux_loss" in r]
    assert logged and all(r["train_router_aux_loss"] == pytest.approx(a["train_router_aux_loss"], rel=0.2)
                          for r, a in zip(logged, [r for r in one if "train_router_aux_loss" in r]))


# ------------------------------------------------------------------------------------------ bad input
def test_task_follows_from_the_model():
    from bwskc.train.tasks import choose_task, detect_task
    import transformers
    cases = {"bert": "masked", "roberta": "masked", "albert": "masked", "t5": "seq2seq",
             "switch_transformers": "seq2seq", "bart": "seq2seq", "vit": "image", "resnet": "image",
             "convnext": "image", "gpt2": "causal", "gpt_neox": "causal", "llama": "causal"}
    for model_type, task in cases.items():
        assert detect_task(transformers.AutoConfig.for_model(model_type)) == task, model_type
    gpt2 = transformers.AutoConfig.for_model("gpt2", architectures=["GPT2LMHeadModel"])
    assert choose_task("m", gpt2, None) == "causal"
    # a causal head on an encoder (BertLMHeadModel without is_decoder) is bidirectional: not causal
    encoder = transformers.AutoConfig.for_model("bert", architectures=["BertLMHeadModel"])
    assert choose_task("m", encoder, None) == "masked"
    decoder = transformers.AutoConfig.for_model("bert", architectures=["BertLMHeadModel"], is_decoder=True)
    assert choose_task("m", decoder, None) == "causal"


def test_a_checkpoint_from_before_the_task_families_resumes(tmp_path):
    """State fields added since (router-loss sums, the best evaluation's metrics) default when absent."""
    from dataclasses import asdict

    from bwskc.train import checkpoint as ckpt
    from bwskc.train.loop import State
    old = asdict(State(step=4))
    for name in ckpt.NEWER_STATE_FIELDS:
        del old[name]
    (tmp_path / "state.json").write_text(json.dumps({"state": old, "param_groups": [], "hyperparameters": {},
                                                     "scheduler": {}, "scaler": {}}))
    example = {"state": asdict(State()), "param_groups": [], "hyperparameters": {}, "scheduler": {}, "scaler": {}}
    saved = ckpt._read_state(tmp_path, example)
    assert saved["state"]["step"] == 4 and saved["state"]["best_metrics"] == {}


def test_bad_input_per_task_is_one_line(tmp_path, capsys):
    text = _corpus(tmp_path / "corpus", lines=(50, 10, 10))
    vit, bert = _config(tmp_path / "vit", VIT), _config(tmp_path / "bert", BERT)
    gpt = _model(tmp_path / "gpt")
    err = _bad(_argv("image", vit, text, tmp_path / "o1"), capsys)
    assert "not an image folder" in err and str(text) in err
    if DIGITS.is_dir():
        err = _bad(_argv("causal", gpt, DIGITS, tmp_path / "o2"), capsys)
        assert "an image folder" in err and "trains on text" in err
    assert "--task masked" in _bad(_argv("masked", bert, text, tmp_path / "o3", "--task", "causal"), capsys)
    assert "cannot train --task image" in _bad(_argv("masked", bert, text, tmp_path / "o4", "--task", "image"),
                                               capsys)
    one = tmp_path / "one-class" / "only"
    one.mkdir(parents=True)
    from PIL import Image
    for i in range(5):
        Image.new("L", (8, 8), color=i * 40).save(one / f"{i}.png")
    assert "class" in _bad(_argv("image", vit, one.parent, tmp_path / "o5"), capsys)
    broken = tmp_path / "broken"
    for cls in ("a", "b"):
        (broken / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (8, 8), color=i * 40).save(broken / cls / f"{i}.png")
    (broken / "b" / "9.png").write_bytes(b"\x89PNG not really")
    assert "9.png" in _bad(_argv("image", vit, broken, tmp_path / "o6"), capsys)
    for i in range(1, 7):
        assert not (tmp_path / f"o{i}").exists()


IMAGE_ZOO = {  # the prototype's image classifiers, tiny: batch-norm stacks and a layer-scaled ConvNeXt
    "resnet": dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type="bottleneck"),
    "efficientnet": dict(image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320),
    "convnext": dict(num_channels=3, hidden_sizes=[8, 16], depths=[2, 1], num_stages=2, image_size=32),
}


@pytest.mark.parametrize("name", sorted(IMAGE_ZOO))
def test_image_classifiers_train_with_checked_gradients(name):
    """One training step of each through the image objective: reversible gradients equal plain autograd
    (float64, drop path and dropout on), and batch-norm running statistics move as eager training's."""
    import transformers

    import bwskc
    from bwskc.train import objectives, tasks
    config = transformers.AutoConfig.for_model(name, num_labels=4, **IMAGE_ZOO[name])
    torch.manual_seed(0)
    model = transformers.AutoModelForImageClassification.from_config(config).train()
    data = {"train": torch.randint(0, 256, (4, 3, 36, 36), dtype=torch.uint8), "train_labels": torch.arange(4)}
    obj = objectives.objective("image", config, data, {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
                               seed=0, global_batch=4)
    batch = obj.batch("train", torch.arange(4), step=0)
    args, kwargs = tasks.example_inputs("image", config, batch)
    module = bwskc.compile(model, args, kwargs, mode="reversible", check=True)
    assert module.check_report["ok"]
    before = {k: v.clone() for k, v in module.state_dict().items() if "running_mean" in k}
    module.reseed(0, 0)
    loss, _ = obj.loss(objectives.outputs_by_name(module, module(batch["pixel_values"])), batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in module.parameters() if p.requires_grad)
    after = module.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # statistics were updated
