"""``bwskc.compile(..., mode="reversible", check=True)``: the reversible gradients against plain autograd
through the same coupling architecture, in float64 with dropout and drop path on, on every zoo model."""
from __future__ import annotations

import pytest
import torch
import transformers

import bwskc
from bwskc.errors import BwskError
from bwskc.frontend import default_inputs
from bwskc.runtime import check as check_mod
from conftest import ZOO_NAMES, build_zoo_model
from test_randomness import Stack


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_check_passes_on_every_zoo_model_with_dropout_on(name):
    model = build_zoo_model(name)
    args, kwargs = default_inputs(model)
    program = bwskc.lower(model, args, kwargs, train=True)  # the training capture: dropout on
    module = bwskc.compile(program, args, kwargs, mode="reversible", check=True)
    report = module.check_report
    assert report["ok"] and report["dtype"] == "float64"
    assert len(report["chains"]) == len(module.chains)
    assert all(c["max_rel_error"] <= check_mod.TOLERANCE for c in report["chains"])


def test_check_covers_drop_path_in_a_beit():
    cfg = transformers.BeitConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2,
                                  intermediate_size=64, image_size=16, patch_size=4, num_labels=3,
                                  drop_path_rate=0.3, hidden_dropout_prob=0.1, use_mask_token=False)
    torch.manual_seed(0)
    model = transformers.BeitForImageClassification(cfg)
    module = bwskc.compile(model, (torch.randn(2, 3, 16, 16),), mode="reversible", check=True)
    assert [c["blocks"] for c in module.check_report["chains"]] == [6]
    assert module.check_report["ok"]


@pytest.mark.parametrize("drop", [(0.1, 0.0), (0.0, 0.1)], ids=["drop-path", "dropout"])
def test_a_checkpointed_layer_holding_a_chain_draws_the_references_masks(drop):
    """Swin's stage is a module-list layer (checkpointed) whose blocks form a chain: the chain's draws
    inside the checkpoint keep the keys they have in the store-activations reference (the enclosing
    graph's chain numbering), so forward and gradients equal it (they drew other masks once: 0.58)."""
    cfg = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                  window_size=4, num_labels=4, drop_path_rate=drop[0],
                                  hidden_dropout_prob=drop[1])
    torch.manual_seed(0)
    model = transformers.SwinForImageClassification(cfg).train()
    x = torch.randn(2, 3, 32, 32)
    module = bwskc.compile(model, (x,), mode="reversible", check=True)
    assert module.check_report["ok"] and module.check_report["chains"]
    reference = bwskc.compile(model, (x,), mode="reversible", store_activations=True)
    module.reseed(3, 1), reference.reseed(3, 1)
    assert torch.allclose(module(x), reference(x), atol=1e-6)


def test_check_refuses_a_chain_whose_backward_is_wrong(monkeypatch):
    """Plant a bug: the reversible backward's reconstruction skips one branch's dropout replay (its
    draws come from another site). The check must name the chain."""
    from bwskc.runtime import random_ops
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(3, 5, 8)
    calls = {"n": 0}
    real = random_ops.REPLAY["aten.rand.default"]

    def drifting(args, kwargs, seed, where):  # a different draw on every call: no exact replay
        calls["n"] += 1
        return real(args, kwargs, seed, where + (calls["n"],))
    monkeypatch.setitem(random_ops.REPLAY, "aten.rand.default", drifting)
    with pytest.raises(BwskError, match=r"reversible chain 0 \(4 blocks\).*float64"):
        bwskc.compile(model, (x,), mode="reversible", check=True)


def test_check_is_only_for_reversible_mode():
    torch.manual_seed(0)
    with pytest.raises(BwskError, match="mode='reversible'"):
        bwskc.compile(Stack(), (torch.randn(3, 5, 8),), mode="conventional", check=True)


def test_promotion_to_float64_keeps_the_program_meaning():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    program = bwskc.lower(Stack().eval(), (x,))
    p64 = check_mod.promote_to_float64(program)
    bwskc.verify(p64)
    torch.testing.assert_close(p64(x.double()).float(), program(x), rtol=1e-5, atol=1e-6)


def test_cli_check_gradients_prints_each_chain(capsys):
    from pathlib import Path

    from bwskc.cli import main
    config = Path(__file__).resolve().parents[1] / "examples" / "gpt2-tiny" / "config.json"
    assert main(["check-gradients", str(config)]) == 0
    out = capsys.readouterr().out
    assert "chain 0: 4 blocks" in out and "ok: every gradient within 1e-08" in out
    assert main(["check-gradients", "/nonexistent/config.json"]) == 2
