"""Reversible mode on a mixture-of-experts model (Switch Transformers, the Switch-Base-8 seed's family).

Diagnosis, tested here: the sparse (MoE) layers of a Switch model exported with
``output_router_logits=True`` (as ``bwskc.train.tasks.example_inputs`` exports it, so that the z-loss and
aux-loss are outputs) return ``(router_logits, stream)``; the logits leave the residual chain (they are
entry outputs, and the losses are computed from them), so every chain ends before a sparse layer and the
dense layers between two sparse ones reach their stream through a tuple projection, not as chain
elements. Exported without router outputs, every block of the same model couples (20 of 20), so neither
the expert dispatch nor the position bias (a constant shared by every layer) is in the way.

Coupling chains whose branches carry side outputs are not implemented yet: ``Rk``'s branches are typed
``s -> s`` (``bwskc.verify``) and the reference unrolling (``bwskc.runtime.denote``) knows no other
shape. The tests of the target are marked xfail with that reason.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bwskc  # noqa: E402
from bwskc.train import tasks  # noqa: E402

CONFIG = "examples/switch-wikitext2"  # 4+4 layers, 8 experts, sparse every other layer


def _switch(router_outputs: bool = True):
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.from_pretrained(CONFIG)
    m = transformers.AutoModelForSeq2SeqLM.from_config(cfg).train()
    b = {"input_ids": torch.randint(1, 4096, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long),
         "decoder_input_ids": torch.randint(1, 4096, (2, 16))}
    args, kw = tasks.example_inputs("seq2seq", cfg, b)
    kw = dict(kw)
    if not router_outputs:
        kw["output_router_logits"] = False
    return m, args, kw


@pytest.fixture(scope="module")
def switch():
    return _switch()


@pytest.fixture(scope="module")
def switch_reversible(switch):
    m, args, kw = switch
    return bwskc.compile(m, args, kw, mode="reversible")


def test_without_router_outputs_every_block_couples():
    m, args, kw = _switch(router_outputs=False)
    rev = bwskc.compile(m, args, kw, mode="reversible").analyses["reversible"]
    assert rev.summary()["blocks"] == 20 and not rev.not_lowered


def test_sparse_layers_are_reported_as_returning_side_outputs(switch_reversible):
    rev = switch_reversible.analyses["reversible"]
    why = {r["where"]: r["reason"] for r in rev.not_lowered}
    for layer in ("encoder.block.1", "encoder.block.3", "decoder.block.1", "decoder.block.3"):
        assert "side outputs" in why[layer] and "f32[2,16,8]" in why[layer]
    # the dense layers between sparse ones say which blocks broke their chain
    assert "encoder.block.1, encoder.block.3" in why["encoder.block.2"]


def _mid(name: str) -> bool:
    return name.startswith(("encoder.", "decoder."))


@pytest.mark.xfail(strict=True, reason="coupling chains with side outputs (a MoE layer's router logits "
                   "that leave the chain) are not implemented: Rk's branches are s -> s")
def test_switch_couples_blocks_on_both_sides_of_a_sparse_layer(switch_reversible):
    rev = switch_reversible.analyses["reversible"]
    assert rev.summary()["blocks"] == 20, rev.summary()
    assert not [r for r in rev.not_lowered if r["where"].startswith(("encoder.block.1", "decoder.block.1"))]


@pytest.mark.xfail(strict=True, reason="coupling chains with side outputs are not implemented (see above): "
                   "the check covers only the chains before the first sparse layer")
def test_switch_check_covers_the_moe_blocks(switch):
    m, args, kw = switch
    module = bwskc.compile(m, args, kw, mode="reversible", check=True)
    assert module.check_report["ok"]
    assert sum(c["blocks"] for c in module.check_report["chains"]) == 20


def test_switch_forward_equals_store_activations(switch, switch_reversible):
    """Holds today for the chains that are coupled; the target keeps it for the MoE chains too."""
    m, args, kw = switch
    ref = bwskc.compile(m, args, kw, mode="reversible", store_activations=True, seed=0)
    switch_reversible.reseed(0)
    ref.reseed(0)
    got, want = switch_reversible(*args, **kw_inputs(kw)), ref(*args, **kw_inputs(kw))
    got, want = _flat(got), _flat(want)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def kw_inputs(kw):
    return {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _flat(o)]
