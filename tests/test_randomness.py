"""Every random op replays (or its block is not coupled), and train and eval are separate captures.

Reversible backward recomputes each branch and a checkpointed layer its interior: both are exact only
if every random number is drawn again as in the forward pass. These tests put drop path (BEiT's
``floor(keep + rand)`` and timm's ``bernoulli_``), in-place dropout (``bernoulli.p``) and other draws
into residual blocks and compare the reversible gradients with plain autograd through the same
coupling architecture (``store_activations=True``), masks on.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import bwskc
from bwskc.ir import Comb, Prim, subterms
from bwskc.runtime import random_ops


def drop_path_beit(x, p, training):
    if p == 0 or not training:
        return x
    keep = 1 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    r = keep + torch.rand(shape, dtype=x.dtype, device=x.device)
    r.floor_()
    return x.div(keep) * r


def drop_path_timm(x, p, training):
    if p == 0 or not training:
        return x
    keep = 1 - p
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    return x * x.new_empty(shape).bernoulli_(keep) / keep


class Block(nn.Module):
    def __init__(self, d, kind, noise=None):
        super().__init__()
        self.ln, self.fc, self.kind, self.noise = nn.LayerNorm(d), nn.Linear(d, d), kind, noise
        self.drop = nn.Dropout(0.1, inplace=True)

    def forward(self, x):
        h = self.drop(torch.tanh(self.fc(self.ln(x))))
        if self.noise is not None:
            h = self.noise(h)
        h = (drop_path_beit if self.kind == 0 else drop_path_timm)(h, 0.3, self.training)
        return x + h


class Stack(nn.Module):
    def __init__(self, n=4, d=8, noise=None):
        super().__init__()
        self.layers = nn.ModuleList([Block(d, i % 2, noise) for i in range(n)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _grads(model, x, **kw):
    module = bwskc.compile(model, (x,), seed=3, **kw)
    xx = x.clone().requires_grad_()
    out = module(xx)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return module, out.detach(), {k: p.grad for k, p in module.named_parameters()}, xx.grad


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_drop_path_and_inplace_dropout_replay_in_reversible_backward():
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(3, 5, 8)
    rev, out, grads, gx = _grads(model, x, mode="reversible")
    ref, out_ref, grads_ref, gx_ref = _grads(model, x, mode="reversible", store_activations=True)
    report = rev.program.analyses["reversible"]
    assert [c["blocks"] for c in report.chains] == [4]  # every block coupled, none left out
    assert torch.equal(out, out_ref)  # the same draws in both
    assert _rel(gx, gx_ref) < 1e-5
    assert max(_rel(grads[k], grads_ref[k]) for k in grads) < 1e-5
    # the draws are in the program, not constants computed once
    assert not any(random_ops.is_random_target(_target(c.op)) for c in rev.program.consts)


def _target(op):
    ns, name, overload = op.split(".") if op.count(".") == 2 else ("", "", "")
    return getattr(getattr(torch.ops.aten, name, None), overload, None) if ns == "aten" else None


def test_draws_change_with_the_step_and_stay_within_a_step():
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(3, 5, 8)
    module = bwskc.compile(model, (x,), mode="conventional", seed=5)
    first, second = module(x), module(x)
    assert not torch.equal(first, second)  # the step advanced: new masks and drop paths
    module.reseed(5)
    assert torch.equal(module(x), first)  # the same step draws the same numbers


def test_unreplayable_draw_keeps_its_block_out_of_the_coupling_and_says_why():
    torch.manual_seed(0)

    def poisson_noise(h):
        return h + 0.01 * torch.poisson(torch.ones_like(h))
    model, x = Stack(noise=poisson_noise), torch.randn(3, 5, 8)
    rev, _, grads, gx = _grads(model, x, mode="reversible")
    report = rev.program.analyses["reversible"]
    assert not report.chains
    assert any("aten.poisson.default" in r["reason"] for r in report.not_lowered)
    # the layers are stored, not checkpointed: a recomputation would draw other poisson numbers, so
    # the gradient equals that of the conventional module given the same draws
    assert not rev.chains
    assert gx is not None and torch.isfinite(gx).all()


def _coupled_eval(model, x):
    """The coupling architecture of ``Stack`` by hand, in evaluation: branch i is layer i's residual
    branch ``layer(h) - h``; even i update ``a`` from ``b``, odd ``b`` from ``a``; out ``a + b - x``."""
    a = b = x
    for i, layer in enumerate(model.eval().layers):
        if i % 2 == 0:
            a = a + (layer(b) - b)
        else:
            b = b + (layer(a) - a)
    return a + b - x


@pytest.mark.parametrize("mode", ["conventional", "reversible"])
def test_eval_runs_the_evaluation_capture_over_the_same_parameters(mode):
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(3, 5, 8)
    module = bwskc.compile(model, (x,), mode=mode)
    assert model.training  # compile leaves the model's flags as they were

    def want():
        with torch.no_grad():
            out = model.eval()(x) if mode == "conventional" else _coupled_eval(model, x)
        model.train()
        return out
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), want(), rtol=1e-5, atol=1e-6)
        # an update of the (shared) parameters shows in the evaluation capture
        module.get_parameter("layers.0.fc.bias").add_(1.0)
        model.layers[0].fc.bias.add_(1.0)
        torch.testing.assert_close(module(x), want(), rtol=1e-5, atol=1e-6)
    module.train()
    assert module(x).shape == x.shape


def test_batch_norm_models_evaluate_on_the_running_statistics_training_updates():
    """The training capture keeps batch norm's running-statistics updates and the compiled module
    applies them, so eval runs the evaluation capture (running statistics, no dropout) on what
    training gathered, as the eager model does (tests/test_buffer_updates.py has the rest)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Dropout(0.2), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(4, 3, 6, 6)
    module = bwskc.compile(model, (x,), mode="conventional")
    assert module.eval_capture.startswith("the model's evaluation capture, reading the 3 buffers")
    module.train()
    model.train()
    with torch.no_grad():
        module(x)
        model(x)
    module.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-5)
    drop_path = bwskc.compile(Stack(), (torch.randn(3, 5, 8),), mode="conventional")
    assert drop_path.eval_capture == "the model's evaluation capture"


# ------------------------------------------------------------------------- the rules one by one
def _x(shape=(4, 6)):
    return torch.linspace(0.1, 0.9, math.prod(shape)).reshape(shape)


CASES = {  # op -> (args, kwargs): an application that draws
    "aten.rand.default": (([5, 7],), {"dtype": torch.float32}),
    "aten.rand_like.default": ((_x(),), {}),
    "aten.randn.default": (([64, 64],), {}),
    "aten.randn_like.default": ((_x(),), {}),
    "aten.uniform.default": ((_x(), -2.0, 3.0), {}),
    "aten.normal_functional.default": ((_x(), 1.0, 2.0), {}),
    "aten.normal.Tensor_float": ((_x(), 0.5), {}),
    "aten.normal.float_float": ((0.0, 1.0, [3, 4]), {}),
    "aten.bernoulli.p": ((_x(), 0.3), {}),
    "aten.bernoulli.default": ((_x(),), {}),
    "aten.exponential.default": ((_x(), 2.0), {}),
    "aten.geometric.default": ((_x(), 0.3), {}),
    "aten.cauchy.default": ((_x(), 0.0, 1.0), {}),
    "aten.log_normal.default": ((_x(), 0.0, 0.5), {}),
    "aten.randint.default": ((10, [6, 5]), {}),
    "aten.randint.low": ((-3, 4, [6, 5]), {}),
    "aten.randint_like.default": ((_x(), 7), {}),
    "aten.randint_like.low_dtype": ((_x(), 2, 9), {}),
    "aten.random.from": ((_x(), 1, 5), {}),
    "aten.randperm.default": ((33,), {}),
    "aten.multinomial.default": ((torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.5, 0.0]]), 2, False), {}),
    "aten.native_dropout.default": ((_x(), 0.4, True), {}),
    "aten.dropout.default": ((_x(), 0.4, True), {}),
    "aten.alpha_dropout.default": ((_x(), 0.4, True), {}),
    "aten.feature_dropout.default": ((_x((2, 3, 4)), 0.5, True), {}),
    "aten.feature_alpha_dropout.default": ((_x((2, 3, 4)), 0.5, True), {}),
    "aten.rrelu.default": ((_x() - 0.5, 0.1, 0.3, True), {}),
}


def _draw(op, args, kwargs, seed, where):
    return random_ops.REPLAY[op](args, kwargs, seed, where)


def _leaves(v):
    return list(v) if isinstance(v, tuple) else [v]


@pytest.mark.parametrize("op", sorted(CASES))
def test_each_rule_matches_the_op_in_shape_and_dtype_and_replays_exactly(op):
    args, kwargs = CASES[op]
    eager = _leaves(_target(op)(*args, **kwargs))
    got = _leaves(_draw(op, args, kwargs, (11, 0), (0, 1, 2)))
    assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in eager]
    again = _leaves(_draw(op, args, kwargs, (11, 0), (0, 1, 2)))
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # the same site draws the same numbers
    other = _leaves(_draw(op, args, kwargs, (11, 0), (0, 1, 3)))
    assert any(not torch.equal(a, b) for a, b in zip(got, other))  # another site draws others


def test_every_rule_has_a_case_and_every_tagged_op_is_replayed_or_refused():
    assert set(REPLAY_WITH_CASES := CASES) <= set(random_ops.REPLAY)
    # an op without a rule is refused by name, never silently drawn from the global generator
    assert random_ops.unreplayable_reason("aten.poisson.default", (None,), ()) is not None
    assert random_ops.unreplayable_reason("aten.binomial.default", (None, None), ()) is not None
    assert random_ops.unreplayable_reason("aten.rand.default", ([2],), ()) is None
    assert random_ops.unreplayable_reason("aten.dropout.default", (None, 0.5, False), ()) is None
    assert not random_ops.draws("aten.scaled_dot_product_attention.default", (None,) * 3, ())
    assert REPLAY_WITH_CASES


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**40), site=st.integers(0, 1000), p=st.floats(0.05, 0.95))
def test_draws_follow_their_distributions(seed, site, p):
    """Moments of 4096 draws within 5 standard errors (a wrong rule misses by far more)."""
    key = ((seed, 0), (0, 0, site))
    u = _draw("aten.rand.default", ([4096],), {}, *key)
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12) ** 0.5 / 64
    z = _draw("aten.randn.default", ([4096],), {}, *key)
    assert abs(z.mean().item()) < 5 / 64 and abs(z.std().item() - 1) < 0.1
    b = _draw("aten.bernoulli.p", (torch.zeros(4096), p), {}, *key)
    assert abs(b.mean().item() - p) < 5 * (p * (1 - p)) ** 0.5 / 64
    e = _draw("aten.exponential.default", (torch.zeros(4096), 2.0), {}, *key)
    assert abs(e.mean().item() - 0.5) < 5 * 0.5 / 64
    perm = _draw("aten.randperm.default", (257,), {}, *key)
    assert torch.equal(perm.sort().values, torch.arange(257))
    ints = _draw("aten.randint.low", (-3, 4, [4096]), {}, *key)
    assert ints.min() >= -3 and ints.max() <= 3 and len(ints.unique()) == 7
    picks = _draw("aten.multinomial.default", (torch.tensor([[0.2, 0.3, 0.5, 0.0]]), 3, False), {}, *key)
    assert sorted(picks[0].tolist()) == [0, 1, 2]  # without replacement, never the zero-probability one


def test_a_draw_with_no_activation_operand_is_a_term_of_its_region():
    torch.manual_seed(0)
    program = bwskc.lower(Stack(2), (torch.randn(3, 5, 8),), train=True)
    draws = [t for d in program.defs.values() for t in subterms(d.body)
             if isinstance(t, Comb) and t.kind == "K" and isinstance(t.args[0], Prim)
             and t.args[0].op == "aten.rand.default"]
    assert len(draws) == 1  # layers.0's drop path (layers.1 draws with bernoulli on an activation)
    assert bwskc.parse(program.text()) == program


def test_a_deep_copy_still_switches_to_its_evaluation_capture():
    import copy
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(3, 5, 8)
    for mode in ("conventional", "reversible"):
        module = bwskc.compile(model, (x,), mode=mode)
        twin = copy.deepcopy(module).eval()
        with torch.no_grad():
            torch.testing.assert_close(twin(x), module.eval()(x))
            assert not torch.equal(twin.train()(x), twin.eval()(x))
        assert twin.mode == mode and twin.eval_capture == module.eval_capture
        assert twin.get_parameter("layers.0.fc.weight") is not module.get_parameter("layers.0.fc.weight")
        module.train()


def test_a_module_with_two_captures_refuses_to_pickle_and_says_what_to_do(tmp_path):
    torch.manual_seed(0)
    model, x = Stack(), torch.randn(3, 5, 8)
    with pytest.raises(TypeError, match="cannot be pickled whole: save module.state_dict"):
        torch.save(bwskc.compile(model, (x,), mode="conventional"), tmp_path / "two.pt")
    assert not (tmp_path / "two.pt").exists() or (tmp_path / "two.pt").stat().st_size < 1024


def test_rules_follow_aten_where_it_is_specific():
    seed, where = (3, 0), (0, 0, 0)
    # a sample's mean and std get no gradient (ATen's derivative is zero)
    mean, std = torch.zeros(4, requires_grad=True), torch.ones(4, requires_grad=True)
    assert not _draw("aten.normal.Tensor_Tensor", (mean, std), {}, seed, where).requires_grad
    # random_() ranges: [0, 2**24] for float32, [0, 127] for int8, [from, top] with to=None
    f = _draw("aten.random.default", (torch.zeros(50000),), {}, seed, where)
    assert f.min() >= 0 and f.max() <= 2 ** 24 and f.max() > 2 ** 23 and torch.equal(f, f.round())
    i8 = _draw("aten.random.from", (torch.zeros(5000, dtype=torch.int8), 100, None), {}, seed, where)
    assert i8.min() >= 100 and i8.max() <= 127
    # RReLU at 0 takes the slope, as ATen's x <= 0 branch does: its noise there is the slope
    x = torch.tensor([-1.0, 0.0, 1.0])
    _, noise = _draw("aten.rrelu_with_noise_functional.default", (x, torch.zeros(3), 0.1, 0.3, True), {},
                     seed, where)
    assert 0.1 <= noise[1] <= 0.3 and noise[2] == 1
    # multinomial without replacement refuses more samples than categories it can draw
    with pytest.raises(RuntimeError, match="without replacement"):
        _draw("aten.multinomial.default", (torch.tensor([[0.5, 0.5, 0.0]]), 3, False), {}, seed, where)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 6), s=st.integers(1, 6),
       e=st.integers(1, 4), mask=st.sampled_from(["none", "bool", "bool-rows", "float", "float-heads",
                                                   "float32", "causal"]),
       p=st.sampled_from([0.0, 0.25, 0.6]), shard=st.integers(0, 2), data=st.data())
def test_attention_with_counter_based_dropout_is_the_textbook_formula(b, h, n, s, e, mask, p, shard, data):
    """``rng.attention`` (what a replayed SDPA runs) against softmax(q k^T * scale + mask), the keep
    mask applied to the probabilities, times v / (1 - p): values and the gradients of q, k, v, for
    boolean and additive masks broadcast to the scores (applied in place), an additive mask of another
    dtype (added out of place), and causal."""
    from bwskc.runtime import rng
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31)))
    q, k, v = (torch.randn(b, h, rows, e, generator=g, dtype=torch.float64, requires_grad=True)
               for rows in (n, s, s))
    attn_mask, is_causal = None, mask == "causal"
    if mask.startswith("bool"):
        attn_mask = torch.rand((b, 1, n, s) if mask == "bool" else (n, s), generator=g) > 0.4
        attn_mask[..., 0] = True  # no row fully masked (NaN in every implementation)
    elif mask == "float":
        attn_mask = torch.randn(n, s, generator=g, dtype=torch.float64)
    elif mask == "float-heads":
        attn_mask = torch.randn(1, h, n, s, generator=g, dtype=torch.float64)
    elif mask == "float32":  # another dtype than the scores: added out of place (type promotion)
        attn_mask = torch.randn(n, s, generator=g, dtype=torch.float32)
        p = p or 0.25  # the counter-based path (p = 0 is the fused op, which wants one dtype)
    seed, where = (12345, shard), (0, 1, 2)
    out = rng.attention(q, k, v, attn_mask, p, is_causal, seed=seed, where=where)

    scores = q @ k.transpose(-2, -1) / math.sqrt(e)
    if is_causal:
        scores = scores.masked_fill(torch.ones(n, s, dtype=torch.bool).triu(1), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if p:
        keep = rng.keep_mask(probs.shape, p, rng.make_key(12345, *where), "cpu", start=shard * probs.numel())
        probs = probs * keep / (1 - p)
    want = probs @ v
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12, equal_nan=True)
    cot = torch.randn(want.shape, generator=g, dtype=torch.float64)
    got_g = torch.autograd.grad(out, (q, k, v), cot, allow_unused=True)
    want_g = torch.autograd.grad(want, (q, k, v), cot, allow_unused=True)
    for a, w in zip(got_g, want_g):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-11, equal_nan=True)
