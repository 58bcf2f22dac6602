"""Every op a program applies has a working backward, with gradients equal to eager autograd.

``aten.copy.default`` (what ``run_decompositions`` leaves for an in-place ``copy_``) has no derivative;
the lowering rewrites it (``bwskc.rewrites``). These tests run backward through the zoo's programs and
random programs, and compare a model full of in-place copies with eager autograd.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bwskc
from bwskc.ir import prims
from conftest import ZOO_NAMES
from test_random_graphs import Dag1, outputs_st, steps_st


class TimeLoop(nn.Module):
    """RWKV's CPU time loop in miniature: a state written in place, per step and whole."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))
        self.decay = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        state = torch.zeros(x.shape[0], 4)
        out = torch.empty_like(x)
        for t in range(x.shape[1]):
            state = state * self.decay + x[:, t] * self.w
            out[:, t] = state
        y = torch.zeros_like(x)
        y.copy_(out * 2)  # same shape and dtype
        z = torch.empty(x.shape[0], 4, dtype=torch.float64)
        z.copy_(x[:, 0])  # another dtype
        b = torch.empty(x.shape[0], 3, 4)
        b.copy_(self.w)  # broadcast
        return y + z.float().unsqueeze(1) * b


def _grads(fn, params, x):
    xx = x.clone().requires_grad_()
    out = fn(xx)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return [p.grad.clone() for p in params] + [xx.grad]


@pytest.mark.parametrize("mode", ["conventional", "reversible"])
def test_in_place_copies_lower_to_differentiable_ops_with_eager_gradients(mode):
    torch.manual_seed(0)
    model, x = TimeLoop(), torch.randn(2, 3, 4)
    program = bwskc.lower(model, (x,))
    assert not any(p.op == "aten.copy.default" for d in program.defs.values() for p in prims(d.body))
    assert not any(p.op == "aten.copy.default" for p in prims(program.entry.body))
    module = bwskc.compile(model, (x,), mode=mode)
    got = _grads(module, [module.get_parameter("w"), module.get_parameter("decay")], x)
    want = _grads(model, [model.w, model.decay], x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_every_zoo_op_has_a_backward(zoo, name):
    entry = zoo[name]
    module = bwskc.compile(entry.program.with_weights(entry.program.weights), mode="conventional")
    outs = module(*entry.positional_inputs())
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum(o.float().sum() for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point())
    loss.backward()  # raises for an op without a derivative
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps_st, outputs=outputs_st, seed=st.integers(0, 2 ** 16))
def test_random_programs_have_eager_gradients(steps, outputs, seed):
    torch.manual_seed(seed)
    model = Dag1(steps, outputs, 4).eval()
    x = torch.randn(3, 4)
    module = bwskc.compile(model, (x,), mode="conventional")

    def total(fn):
        xx = x.clone().requires_grad_()
        outs = fn(xx)
        outs = outs if isinstance(outs, tuple) else (outs,)
        s = sum((o * (i + 1)).sum() for i, o in enumerate(outs) if o.requires_grad)
        if not isinstance(s, torch.Tensor):
            return None
        s.backward()
        return xx.grad
    got, want = total(module), total(model)
    if want is None or got is None:
        assert (want is None) == (got is None)
        return
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_broadcast_copy_is_a_fresh_tensor_not_a_view():
    class Fill(nn.Module):
        def forward(self, x):
            out = torch.empty(3, 4)
            out.copy_(x)  # x: [4], broadcast
            out += 1  # in place on the copy: a stride-0 view of x would refuse this
            return out
    x = torch.randn(4)
    torch.testing.assert_close(bwskc.lower(Fill(), (x,))(x), Fill()(x))


class GeluMLP(nn.Module):
    """A GPT-2 MLP: NewGELUActivation written out, and (``reuse``) a variant whose cube is read again,
    which the pattern must leave alone (an intermediate used elsewhere)."""

    def __init__(self, reuse: bool = False):
        super().__init__()
        import transformers.activations as acts
        self.fc, self.act, self.reuse = nn.Linear(6, 12), acts.NewGELUActivation(), reuse

    def forward(self, x):
        h = self.fc(x)
        if self.reuse:
            import math
            cube = torch.pow(h, 3.0)
            return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * cube))) + cube
        return self.act(h)


@settings(max_examples=10, deadline=None)
@given(scale=st.sampled_from([1e-3, 1.0, 4.0, 30.0]), seed=st.integers(0, 2**31 - 1))
def test_written_out_tanh_gelu_lowers_to_one_op_with_eager_values_and_gradients(scale, seed):
    """GPT-2's GELU becomes ``aten.gelu(approximate="tanh")`` in its module's definition, equal to the
    eager module within 4 float32 ulps of the output's scale, gradients too; where an intermediate is
    used elsewhere nothing is fused and the program is the eager one exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 6, generator=g) * scale
    for reuse in (False, True):
        torch.manual_seed(seed % 1000)
        model = GeluMLP(reuse)
        program = bwskc.lower(model, (x,))
        ops = [p.op for body in [d.body for d in program.defs.values()] + [program.entry.body]
               for p in prims(body)]
        assert ("aten.gelu.default" in ops) is not reuse and ("aten.tanh.default" in ops) is reuse
        run = bwskc.compile(program, mode="conventional")
        params = list(run.parameters())
        want_params = [model.fc.weight, model.fc.bias]
        got, want = _grads(run, params, x), _grads(model, want_params, x)
        with torch.no_grad():
            out, ref = run(x), model(x)
        ulp = 4 * torch.finfo(torch.float32).eps * max(1.0, float(ref.abs().max()))
        if reuse:
            assert torch.equal(out, ref)
        assert float((out - ref).abs().max()) <= ulp
        for a, b in zip(got, want):
            assert float((a - b).abs().max()) <= 8 * torch.finfo(torch.float32).eps * max(1.0, float(b.abs().max()))


def test_the_gelu_rewrite_leaves_a_callers_exported_program_alone():
    """``lower_exported(ep, decompose=False)`` rewrites a copy: the caller's graph keeps its eight ops."""
    from bwskc.lowering import lower_exported, run_decompositions
    x = torch.randn(2, 3, 6)
    ep = run_decompositions(torch.export.export(GeluMLP(), (x,)))
    before = [str(n.target) for n in ep.graph.nodes]
    program = lower_exported(ep, decompose=False)
    assert [str(n.target) for n in ep.graph.nodes] == before and "aten.tanh.default" in before
    assert "aten.gelu.default" in [p.op for body in [d.body for d in program.defs.values()]
                                   + [program.entry.body] for p in prims(body)]


class RoundedGelu(nn.Module):
    """The written-out tanh GELUs whose sqrt(2/pi) is rounded: ``gelu_fast`` and BLOOM's."""

    def __init__(self, form: str, dtype):
        super().__init__()
        self.fc = nn.Linear(6, 12).to(dtype)
        self.form = form

    def forward(self, x):
        h = self.fc(x)
        if self.form == "fast":
            import transformers.activations as acts
            return acts.FastGELUActivation()(h)
        from transformers.models.bloom.modeling_bloom import bloom_gelu_forward
        return bloom_gelu_forward(h)


@pytest.mark.parametrize("form", ["fast", "bloom"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rounded_tanh_gelus_fuse_where_the_dtype_rounds_the_constant_away(form, dtype):
    """In float32 the rounded forms are the tanh GELU to rounding, so they fuse, within a few ulps of
    the eager module, gradients too; in float64 their constant's 1e-9 difference is above rounding,
    so they are left as written and the program is the eager one exactly."""
    torch.manual_seed(0)
    model = RoundedGelu(form, dtype)
    x = torch.randn(3, 5, 6, dtype=dtype) * 3
    program = bwskc.lower(model, (x,))
    ops = [p.op for body in [d.body for d in program.defs.values()] + [program.entry.body]
           for p in prims(body)]
    fused = dtype == torch.float32
    assert ("aten.gelu.default" in ops) is fused and ("aten.tanh.default" in ops) is not fused
    run = bwskc.compile(program, mode="conventional")
    with torch.no_grad():
        out, ref = run(x), model(x)
    eps = torch.finfo(dtype).eps
    if fused:
        assert float((out - ref).abs().max()) <= 4 * eps * max(1.0, float(ref.abs().max()))
    else:
        assert torch.equal(out, ref)
    got, want = _grads(run, list(run.parameters()), x), _grads(model, [model.fc.weight, model.fc.bias], x)
    for a, b in zip(got, want):
        assert float((a - b).abs().max()) <= 8 * eps * max(1.0, float(b.abs().max()))
