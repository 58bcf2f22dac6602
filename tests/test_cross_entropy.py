"""The chunked linear cross entropy (``bwskc.kernels.cross_entropy``) and the LM head split
(``bwskc.runtime.head``): loss and gradients equal ``F.cross_entropy(F.linear(...))`` for any shapes,
chunk sizes, ignored rows, bias or none and reduction; what it keeps for backward and the largest tensor
it makes are far below the ``[N, V]`` logits; the head split off tiny GPT-2 (tied head), Llama (untied),
BERT (a biased decoder) and T5 gives the full logits' loss and gradients in conventional and reversible
mode, leaves evaluation alone, and is refused where the logits are not a plain linear head."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import bwskc
from bwskc.kernels.cross_entropy import chunk_rows, linear_cross_entropy
from bwskc.runtime.head import scope, split_head, try_split_head
from bwskc.train.objectives import IGNORE, CausalLM, MaskedLM, Seq2SeqLM, outputs_by_name

# float32: the chunked sums add in another order than one matmul (a few ulps over up to 37 rows)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=2e-5)}


def _case(n, d, v, bias, dtype, ignored, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignored] = IGNORE
    return h, w, b, t, g


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 37), d=st.integers(1, 9), v=st.integers(2, 31), chunk=st.integers(1, 45),
       bias=st.booleans(), reduction=st.sampled_from(["none", "sum", "mean"]),
       dtype=st.sampled_from([torch.float64, torch.float32]), ignored=st.sampled_from([0.0, 0.3, 1.0]),
       seed=st.integers(0, 2**31 - 1))
def test_loss_and_gradients_equal_full_logits(n, d, v, chunk, bias, reduction, dtype, ignored, seed):
    h, w, b, t, g = _case(n, d, v, bias, dtype, ignored, seed)
    params = [p for p in (h, w, b) if p is not None]
    ref = F.cross_entropy(F.linear(h, w, b), t, ignore_index=IGNORE, reduction=reduction)
    out = linear_cross_entropy(h, w, b, t, ignore_index=IGNORE, reduction=reduction, chunk=chunk)
    assert out.dtype == dtype and out.shape == ref.shape
    if reduction == "mean" and not (t != IGNORE).any():  # nothing counts: NaN, as F.cross_entropy
        assert torch.isnan(out) and torch.isnan(ref)
        return
    torch.testing.assert_close(out, ref, **TOL[dtype])
    grad_out = torch.randn(ref.shape, generator=g, dtype=dtype)
    expected = torch.autograd.grad(ref, params, grad_out)
    got = torch.autograd.grad(out, params, grad_out)
    for a, e in zip(got, expected):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, **TOL[dtype])


def test_default_chunk_bounds_the_logits_and_bad_input_is_refused():
    assert chunk_rows(50257) * 50257 * 4 <= 64 << 20 < (chunk_rows(50257) + 1) * 50257 * 4
    assert chunk_rows(10**9) == 1
    h, w, b, t, _ = _case(4, 3, 5, True, torch.float32, 0.0, 0)
    with pytest.raises(ValueError, match="out of bounds"):
        linear_cross_entropy(h, w, b, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, b, t, reduction="avg")
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, w.t(), b, t)


def test_bf16_hidden_under_autocast_computes_in_float32():
    h, w, b, t, _ = _case(24, 8, 40, True, torch.float32, 0.2, 1)
    hb = h.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(hb, w, b, t, reduction="mean", chunk=5)
    ref = F.cross_entropy(F.linear(hb.detach().float().requires_grad_(), w, b), t, ignore_index=IGNORE)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    out.backward()
    assert hb.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_no_graph_when_nothing_needs_a_gradient():
    h, w, b, t, _ = _case(10, 4, 7, False, torch.float64, 0.0, 2)
    with torch.no_grad():
        out = linear_cross_entropy(h, w, None, t, reduction="sum", chunk=3)
    assert out.grad_fn is None
    torch.testing.assert_close(out, F.cross_entropy(F.linear(h, w), t, reduction="sum").detach())


class _Largest(TorchDispatchMode):
    """The bytes of the largest tensor any op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel() * o.element_size())
        return out


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_memory_is_bounded_by_a_chunk_never_the_logits(reduction):
    """Saved for backward (counted through saved_tensors_hooks, as bwskc.runtime.memory does) and the
    largest tensor made, forward and backward, stay far below the N x V float32 logits."""
    n, d, v, chunk = 512, 16, 1000, 64
    h, w, b, t, _ = _case(n, d, v, True, torch.float32, 0.1, 3)
    saved: dict[int, int] = {}
    skip = {p.untyped_storage().data_ptr() for p in (h, w, b)}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in skip:
            saved[st.data_ptr()] = st.nbytes()
        return x
    mode = _Largest()
    with mode:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = linear_cross_entropy(h, w, b, t, reduction=reduction, chunk=chunk)
        (out.sum() if reduction == "none" else out).backward()
    logits = n * v * 4
    assert sum(saved.values()) <= (n * d + v * d + v + 2 * n) * 8 < logits
    assert mode.largest <= max(chunk * v, n * d, v * d) * 4 < logits
    # and the reference does make the logits
    ref_mode = _Largest()
    with ref_mode:
        F.cross_entropy(F.linear(h, w, b), t, reduction=reduction).sum().backward()
    assert ref_mode.largest >= logits


# ------------------------------------------------------------------------------------------ the head split
def _compiled(name: str, mode: str):
    from conftest import build_zoo_model
    from bwskc.frontend import default_inputs
    warnings.filterwarnings("ignore")
    model = build_zoo_model(name).train()  # dropout on: the masks replay from (seed, step)
    args, kwargs = default_inputs(model)
    module = bwskc.compile(model, args, kwargs, mode=mode)
    values = dict(zip(module.program.entry.input_names, list(args) + list(kwargs.values())))
    return module, {n: values[n] for n in module.program.entry.input_names}


def _objective(task, config):
    cls = {"causal": CausalLM, "seq2seq": Seq2SeqLM, "masked": MaskedLM}[task]
    return cls(config, {}, {"mask_token_id": 1}, seed=0, global_batch=2)


def _batch(task, inputs, vocab):
    if task == "causal":
        return dict(inputs)
    shape = inputs["decoder_input_ids" if task == "seq2seq" else "input_ids"].shape
    labels = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(5))
    if task == "masked":
        labels[:, ::3] = IGNORE
    return {**inputs, "labels": labels}


def _loss_and_grads(module, obj, batch, split):
    module.zero_grad(set_to_none=True)
    module.reseed(7, 3)
    with scope(split) as active:
        out = module(*[batch[n] for n in module.program.entry.input_names])
    named = outputs_by_name(module, out)
    if split is not None:
        assert active is split
        named = split.named(named)
        assert "logits" not in named and named["hidden"].shape[-1] == split.width
    loss, _ = obj.loss(named, batch)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("name,task,mode", [
    ("gpt2", "causal", "conventional"), ("gpt2", "causal", "reversible"),
    ("llama", "causal", "conventional"), ("llama", "causal", "reversible"),
    ("bert", "masked", "reversible"), ("t5", "seq2seq", "reversible")])
def test_split_head_loss_and_gradients_equal_full_logits(name, task, mode):
    module, inputs = _compiled(name, mode)
    obj = _objective(task, type("Config", (), {"decoder_start_token_id": 0, "vocab_size": 100})())
    batch = _batch(task, inputs, 100)
    module.reseed(7, 3)
    before = module(*[batch[n] for n in module.program.entry.input_names])
    ref_loss, ref_grads = _loss_and_grads(module, obj, batch, None)
    split = split_head(module)
    assert split is not None and split_head(module) is split  # splitting twice: the same split
    if name == "gpt2":  # the tied head: the embedding's own Parameter
        assert split.weight() is dict(module.named_parameters())[split.weight_name]
    assert (split.bias_name is not None) == (name == "bert")
    module.reseed(7, 3)
    after = module(*[batch[n] for n in module.program.entry.input_names])  # outside hidden(): logits
    assert all(torch.equal(a, b) for a, b in zip(torch.utils._pytree.tree_leaves(before),
                                                  torch.utils._pytree.tree_leaves(after)))
    loss, grads = _loss_and_grads(module, obj, batch, split)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6, msg=k)
    # evaluation still runs its own capture, with logits, inside the scope too
    module.eval()
    with split.hidden() as active:
        assert active is None
        logits = outputs_by_name(module, module(*[batch[n] for n in module.program.entry.input_names]))["logits"]
    assert logits.shape[-1] == 100
    module.train()
    assert split.running()


class _TinyLM(nn.Module):
    def __init__(self, bias=False, tie=False, post=None):
        super().__init__()
        self.emb, self.ln, self.fc = nn.Embedding(50, 8), nn.LayerNorm(8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 50, bias=bias)
        self.post = post
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc(self.ln(h))
        z = self.head(self.ln(h))
        return z if self.post is None else self.post(z)


@pytest.mark.parametrize("bias,tie", [(True, False), (False, True)])
def test_decomposed_heads_split(bias, tie):
    """After torch.export's decompositions the head is permute + addmm (or mm) between reshapes."""
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    exported = torch.export.export(_TinyLM(bias, tie), (ids,)).run_decompositions()
    module = bwskc.compile(bwskc.lower(exported), mode="conventional")
    targets = {n.target for n in module.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.linear.default not in targets
    ref = F.cross_entropy(outputs_by_name(module, module(ids))["logits"][:, :-1].reshape(-1, 50),
                          ids[:, 1:].reshape(-1))
    params = list(module.parameters())
    expected = torch.autograd.grad(ref, params)
    split = split_head(module)
    assert split is not None
    with split.hidden():
        hidden = outputs_by_name(module, module(ids))["logits"]  # hidden, in the logits' place
    assert hidden.shape == (2, 6, 8)
    loss = linear_cross_entropy(hidden[:, :-1].reshape(-1, 8), split.weight(), split.bias(),
                                ids[:, 1:].reshape(-1), reduction="mean")
    assert abs(float(loss) - float(ref)) <= 1e-6
    for a, e in zip(torch.autograd.grad(loss, params), expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("post,why", [
    (lambda z: 30.0 * torch.tanh(z / 30.0), "tanh|div|mul"),  # logit softcapping (Gemma 2)
    (lambda z: z * 0.5, "mul"),  # a final scale
    (lambda z: (z, z.sum(-1)), "used elsewhere"),  # the logits also feed another output
])
def test_split_is_refused_with_a_reason(post, why):
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    module = bwskc.compile(_TinyLM(post=post), (ids,), mode="conventional")
    before = module(ids)
    split, reason = try_split_head(module)
    assert split is None and reason
    import re
    assert re.search(why, reason), reason
    torch.testing.assert_close(module(ids), before)  # the module untouched


@pytest.mark.parametrize("mode", ["conventional", "reversible"])
def test_training_numbers_equal_the_full_logits_path(mode, tmp_path, monkeypatch, capsys):
    """``bwskc train`` with the split head (the default) against the same run with the split refused:
    every step's loss and gradient norm, and the evaluations, within float rounding."""
    import bwskc.train.loop as loop
    from bwskc.cli import main
    from test_train import _args, _corpus, _metrics, _model
    model, data = _model(tmp_path / "model"), _corpus(tmp_path / "corpus", lines=(60, 12, 12))
    runs = {}
    for label in ("split", "full"):
        if label == "full":
            monkeypatch.setattr(loop, "try_split_head", lambda module: (None, "refused by the test"))
        out = tmp_path / label
        assert main(_args(model, data, out, "--mode", mode, "--experiment", "scratch", "--max-steps", "3",
                          "--eval-every", "3")) == 0
        said = capsys.readouterr()
        assert ("training computes the full logits" in said.out + said.err) == (label == "full")
        variant = next(p for p in out.iterdir() if p.is_dir() and (p / "metrics.jsonl").exists())
        runs[label] = _metrics(variant / "metrics.jsonl")
    assert len(runs["split"]) == len(runs["full"]) > 0
    for a, b in zip(runs["split"], runs["full"]):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, float) and k not in ("lr",):
                assert v == pytest.approx(b[k], rel=1e-5, abs=1e-6), (k, a, b)
            else:
                assert v == b[k], (k, a, b)


def test_a_deep_copy_of_a_split_module_is_split():
    """An EMA or teacher copy (``copy.deepcopy``) finds its own split: the same switch, its own module."""
    import copy
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    module = bwskc.compile(_TinyLM(bias=True), (ids,), mode="conventional")
    split = split_head(module)
    twin = copy.deepcopy(module)
    again = split_head(twin)
    assert again is not None and again.module is twin and again.running()
    assert again.weight() is dict(twin.named_parameters())["head.weight"]
    with again.hidden() as active:
        assert active is again
        assert outputs_by_name(twin, twin(ids))["logits"].shape == (2, 6, 8)
    torch.testing.assert_close(outputs_by_name(twin, twin(ids))["logits"],
                               outputs_by_name(module, module(ids))["logits"])
    assert split.running()
