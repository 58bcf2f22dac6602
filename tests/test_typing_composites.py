"""Definition-level (composite) verdicts decided from their parts (issue 14).

Each case's truth is argued here in a line of real arithmetic and checked independently of the rule:
a K verdict's witness collides on the program's own evaluation of the definition, and the collision is
the argued one; an S verdict's inverse gives random inputs back. The verdicts were also evaluated by the
pass before they were emitted (``extra["checked"]``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_typing import SETTINGS, Fn, collide, differ, lower_typed, mismatch, term_fn

from bwskc.evidence import GRAY, K, S, Verdict
from bwskc.passes.typing import symbolic as T

pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")


def entry(f, shape, dtype=torch.float32):
    program, result = lower_typed(Fn(f), (torch.randn(*shape, dtype=dtype),))
    return program, result, result.defs["entry"], term_fn(program, program.entry.body)


def assert_k(v, fn, law=None, seed=0):
    """K, evaluated by the pass, and its witness collides on the program's own evaluation; ``law``
    (a, b) -> bool checks that the pair is the argued collision."""
    assert v.type == K, (v.type, v.rule, v.claim, v.condition)
    assert v.extra["checked"]["collides"] or v.extra["checked"]["float64"]["collides"]
    (a,), (b,) = v.witness(torch.Generator().manual_seed(seed))
    assert differ((a,), (b,))
    with torch.no_grad():
        assert collide(fn(a), fn(b))
    if law is not None:
        assert law(a, b)


def assert_s(v, fn, shape, dtype=torch.float32, seed=0, rtol=1e-4):
    assert v.type == S, (v.type, v.rule, v.claim, v.condition)
    assert v.extra["checked"]["round_trip"]["passed"]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    with torch.no_grad():
        back = tuple(v.inverse(fn(x)))
    assert mismatch(back, (x,), rtol) is None


# ----------------------------------------------------------------------------- the six argued cases

def test_split_then_cat_is_the_identity():
    # cat(split(x, 2, -1), -1) puts every element back where it was: the identity, inverse identity
    _, _, v, fn = entry(lambda x: torch.cat(torch.split(x, 2, -1), -1), (3, 6))
    assert v.rule == "data movement: identity" and v.extra["inverse_text"] == "identity"
    assert_s(v, fn, (3, 6), rtol=0)
    x = torch.randn(3, 6)
    assert torch.equal(fn(x), x)


def test_split_then_cat_out_of_order_is_s_and_a_subset_is_k():
    _, _, v, fn = entry(lambda x: torch.cat(torch.split(x, 2, -1)[::-1], -1), (3, 6))
    assert v.rule == "data movement"
    assert_s(v, fn, (3, 6), rtol=0)
    _, _, v, fn = entry(lambda x: torch.cat(torch.split(x, 2, -1)[:2], -1), (3, 6))  # drops a piece
    assert_k(v, fn)


def test_centering_erases_shifts():
    # (x + c) - mean(x + c) = x - mean(x): x and x + c collide
    _, _, v, fn = entry(lambda x: x - x.mean(-1, keepdim=True), (3, 4))
    assert v.rule == "composite shift invariance" and v.extra["domain"] == "reals"
    assert_k(v, fn, law=lambda a, b: torch.allclose(b.double() - a.double(), torch.full_like(
        a.double(), 1.5), atol=1e-6))


def test_gram_matrix_is_even():
    # (-x)(-x)^T = x x^T: x and -x collide
    _, _, v, fn = entry(lambda x: x @ x.transpose(-1, -2), (3, 4))
    assert v.rule == "composite sign invariance"
    assert_k(v, fn, law=lambda a, b: torch.equal(b, -a))


def test_plus_roll_erases_the_alternating_vector():
    # roll(a, 1) = -a for a = (1, -1, 1, -1): x and x + a collide (even length)
    _, _, v, fn = entry(lambda x: x + torch.roll(x, 1, -1), (3, 4))
    assert v.rule == "linear composite" and v.dof_lost == 3  # one alternating vector per row
    assert_k(v, fn)
    (a,), (b,) = v.witness(torch.Generator().manual_seed(0))
    d = (b.double() - a.double()).reshape(3, 4)
    row = d[d.abs().sum(-1) > 1e-3][0]
    assert torch.allclose(row, row[0] * torch.tensor([1.0, -1, 1, -1], dtype=torch.float64), atol=1e-6)


def test_normalize_is_scale_invariant():
    # (2x) / |2x| = x / |x| (the clamp at 1e-12 is inactive): x and 2x collide
    _, _, v, fn = entry(lambda x: F.normalize(x, dim=-1), (3, 4))
    assert v.rule == "composite scale invariance"
    assert_k(v, fn, law=lambda a, b: torch.equal(b, 2 * a))


def test_hand_written_leaky_relu_is_injective():
    # x on (0, inf) and 0.1 x on (-inf, 0] are increasing and meet at 0: strictly increasing
    _, _, v, fn = entry(lambda x: torch.where(x > 0, x, 0.1 * x), (3, 4))
    assert v.rule == "piecewise strictly monotone"
    assert_s(v, fn, (3, 4))
    y = fn(torch.randn(3, 4))
    assert torch.allclose(v.inverse(y)[0], torch.where(y > 0, y, y / 0.1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ random variants

@settings(max_examples=4, **SETTINGS)
@given(rows=st.integers(1, 3), d=st.integers(1, 5), scale=st.sampled_from([1.0, -2.0, 0.5]),
       dim=st.sampled_from([-1, 0]))
def test_centering_variants(rows, d, scale, dim):
    # s x - s mean(x, dim): the coefficients of c cancel (s - s = 0) along any dim
    _, _, v, fn = entry(lambda x: scale * x - scale * x.mean(dim, keepdim=True), (rows, d))
    assert_k(v, fn)


@settings(max_examples=4, **SETTINGS)
@given(rows=st.integers(1, 3), d=st.integers(1, 5), c=st.sampled_from([1.0, 3.0]))
def test_gram_and_even_variants(rows, d, c):
    _, _, v, fn = entry(lambda x: c * (x @ x.t()) + torch.tanh(x).abs().sum(-1, keepdim=True), (rows, d))
    assert_k(v, fn, law=lambda a, b: torch.equal(b, -a))


@settings(max_examples=6, **SETTINGS)
@given(rows=st.integers(1, 2), n=st.integers(2, 7), shift=st.integers(1, 3))
def test_roll_variants(rows, n, shift):
    # x + roll(x, s): the circulant I + P^s is singular iff some n-th root of unity w has w^s = -1,
    # i.e. iff n / gcd(n, s) is even
    import math
    _, _, v, fn = entry(lambda x: x + torch.roll(x, shift, -1), (rows, n))
    singular = (n // math.gcd(n, shift)) % 2 == 0
    if singular:
        assert_k(v, fn)
    else:
        assert_s(v, fn, (rows, n))


@settings(max_examples=4, **SETTINGS)
@given(rows=st.integers(1, 3), d=st.integers(2, 5), p=st.sampled_from([1.0, 2.0, 3.0]))
def test_normalize_variants(rows, d, p):
    _, _, v, fn = entry(lambda x: F.normalize(x, p=p, dim=-1), (rows, d))
    assert_k(v, fn, law=lambda a, b: torch.equal(b, 2 * a))


@settings(max_examples=8, **SETTINGS)
@given(slope=st.sampled_from([0.01, 0.1, 0.5, 1.5, -0.3]), t=st.sampled_from([0.0, 0.5, -0.5]),
       op=st.sampled_from(["gt", "ge", "lt"]))
def test_piecewise_variants(slope, t, op):
    # where(x > t, x, s x): both pieces increasing iff s > 0; the lower ends at s t, the upper starts
    # at t: injective iff s t <= t. With "lt" the pieces swap: where(x < t, x, s x) injective iff
    # t <= s t. s < 0: the lower piece decreases, a fold at t (K).
    cmp = {"gt": torch.gt, "ge": torch.ge, "lt": torch.lt}[op]
    _, _, v, fn = entry(lambda x: torch.where(cmp(x, t), x, slope * x), (2, 3))
    injective = slope > 0 and ((slope * t <= t) if op != "lt" else (t <= slope * t))
    if injective:
        assert_s(v, fn, (2, 3))
    else:
        assert v.type != S
        if slope > 0:  # the pieces' images overlap: one value from each side
            assert v.rule == "piecewise overlap"
            assert_k(v, fn)


# ------------------------------------------------------------------------ what stays GRAY, and why

def test_injective_radial_map_stays_gray_with_a_reason():
    # x / (|x| + 1e-3): radius r -> r / (r + eps) increases, so the map is injective; no rule proves it
    _, _, v, _ = entry(lambda x: x / (x.norm(dim=-1, keepdim=True) + 1e-3), (3, 4))
    assert v.type == GRAY and v.condition and v.decided_by


def test_rmsnorm_with_eps_is_not_called_scale_invariant():
    # x rsqrt(mean(x^2) + eps) is injective (eps > 0): adding eps breaks the homogeneity
    _, _, v, _ = entry(lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), (3, 4))
    assert v.type == S


def test_affine_composite_with_real_coefficients():
    # x - 0.5 mean(x): eigenvalues 1 and 0.5, full rank: S with a rank certificate and an inverse
    _, _, v, fn = entry(lambda x: x - 0.5 * x.mean(-1, keepdim=True), (3, 4))
    assert v.rule == "linear composite" and v.rank["sigma_min"] > v.rank["tolerance"]
    assert_s(v, fn, (3, 4))


def test_failing_evidence_turns_gray():
    program, result, _, _ = entry(lambda x: x @ x.transpose(-1, -2), (3, 4))
    dag = T._dag(program.entry.body, result)

    def wrong(g):  # x and 2x do not collide under x x^T
        x = torch.randn(3, 4, generator=g)
        return (x,), (2 * x,)
    v = T._checked(dag, Verdict(K, "bogus", "not a collision", 0, witness=wrong), result)
    assert v.type == GRAY and "did not collide" in v.extra["rejected"]["why"]
    v = T._checked(dag, Verdict(S, "bogus", "not injective", 0, inverse=lambda y: (y[:, :1],)), result)
    assert v.type == GRAY and "round-trip" in v.extra["rejected"]["why"]


# ------------------------------------------------------------------- degrees of freedom of composites

_DOF_CASES = {
    "shifted sum": lambda x: (x + 1).sum(-1),  # a bijection, then a sum: the sum's count (K, pulled back)
    "scaled mean": lambda x: (2 * x).mean(-1, keepdim=True),
    "x * sigmoid(x)": lambda x: x * torch.sigmoid(x),  # a joint product fed twice from x
    "residual": lambda x: x + torch.tanh(x).sum(-1, keepdim=True),
    "sum of tanh": lambda x: torch.tanh(x).sum(-1),
    "centering": lambda x: x - x.mean(-1, keepdim=True),
}


@pytest.mark.parametrize("name", list(_DOF_CASES))
def test_composite_dof_is_the_jacobian_deficit_or_not_claimed(name):
    """A composite's ``dof_lost``, where it states one, is the input size minus the rank of the
    Jacobian at a random point (float64), and never more than the input size; the leaves' counts summed
    (a joint op fed twice from one value counts its domain twice) is not a count."""
    shape = (3, 4)
    _, _, v, fn = entry(_DOF_CASES[name], shape, dtype=torch.float64)
    if v.dof_lost is None:
        assert v.type != S
        return
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    jac = torch.autograd.functional.jacobian(lambda t: fn(t).reshape(-1), x).reshape(-1, x.numel())
    rank = int(torch.linalg.matrix_rank(jac))
    assert 0 <= v.dof_lost <= x.numel()
    assert v.dof_lost == x.numel() - rank, (v.type, v.rule, v.dof_lost, rank)
