"""S/K typing: every verdict's evidence is checked against the function it describes, never trusted.

1. Zoo sweeps (ten models, random weights): every leaf site typed S is inverted on inputs drawn by
   hypothesis (its inverse gives the inputs back), every site typed K has a witness whose two inputs
   differ and collide, every verdict is well formed (rule, claim; GRAY: condition and what decides it),
   no zoo op is left without a rule, and knowing the weights only decides verdicts (never flips them).
2. Hard cases, each a tiny ``nn.Module`` lowered and typed: normalisations, activations, linear maps by
   shape and rank, dropout by mode and p, binary ops with bound and activation operands, embeddings.
3. Degrees of freedom: where a rule states ``dof_lost``, it equals the input size minus the rank of the
   Jacobian at a random point (float64).
4. Composite verdicts of definitions and entries: on random programs (the generators of
   ``test_random_graphs.py`` and a chain generator of S-heavy steps) and on hand-built combinator terms.
   S: the inverse gives the input back, and the Jacobian has full column rank at random points; K: the
   witness (when there is one) collides.

Known bugs are pinned by strict xfail tests at the end of the file (``test_bug_*``); the sites they
concern are left out of the sweeps by ``_known_bug`` (remove an entry there with its xfail).
"""
from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import ZOO_NAMES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_random_graphs import Dag1, Dag2, outputs_st, steps_st
from torch import nn

import bwskc
from bwskc.evidence import GRAY, K, S, check_witness, outputs_equal
from bwskc.ir import Comb, Prim, Ref, TensorType, TupleType, subterms
from bwskc.leaf import Leaf, Values
from bwskc.runtime.denote import Denoter, fill, resolve_op
from bwskc.runtime.interp import EagerBackend

# run_deep raises the recursion limit during a test, which hypothesis reports at every test
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")

SETTINGS = {"deadline": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}

# ops for which "no rule" would be acceptable on the zoo, with the reason (none today)
NO_RULE_ALLOWED: dict[str, str] = {}


# ------------------------------------------------------------------------------------------ helpers

def typing_of(program):
    q = bwskc.run_passes(program, ["typing"])
    return q, q.analyses["typing"]


def lower_typed(module, args, **kwargs):
    return typing_of(bwskc.lower(module, args, **kwargs))


_LOWERED: dict = {}  # key -> (program, typing result): lowered once per session, not per example


def once(key, make):
    """``make()`` (a lowering, typed) the first time ``key`` is asked for, the cached result after."""
    if key not in _LOWERED:
        _LOWERED[key] = make()
    return _LOWERED[key]


class Fn(nn.Module):
    """A module computing ``f`` of its inputs."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, *xs):
        return self.f(*xs)


def _tensors(v):
    if isinstance(v, (tuple, list)):
        for i in v:
            yield from _tensors(i)
    elif isinstance(v, torch.Tensor):
        yield v


def differ(a, b) -> bool:
    """Two input tuples differ somewhere (tuples of tensors compared item by item, recursively)."""
    if isinstance(a, (tuple, list)):
        return len(a) != len(b) or any(differ(x, y) for x, y in zip(a, b))
    return a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b)


def mismatch(got, want, rtol: float) -> str | None:
    """Why ``got`` does not reproduce ``want`` (None if it does): floats to ``rtol`` relative in norm
    (per tensor, and no element off by more than 10 rtol of the largest), discrete values exactly."""
    got, want = list(_tensors(got)), list(_tensors(want))
    if len(got) != len(want):
        return f"{len(got)} tensors back for {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            return f"tensor {i}: shape {tuple(g.shape)} for {tuple(w.shape)}"
        if not w.is_floating_point():
            if not torch.equal(g.to(w.dtype), w):
                return f"tensor {i}: discrete values differ"
            continue
        g64, w64 = g.double(), w.double()
        if not w64.numel():
            continue
        if not bool(torch.isfinite(g64).all()):
            return f"tensor {i}: non-finite values back"
        scale = max(float(w64.norm()), 1e-3 * math.sqrt(w64.numel()))
        err = float((g64 - w64).norm())
        worst = float((g64 - w64).abs().max())
        if err > rtol * scale or worst > 10 * rtol * max(float(w64.abs().max()), 1e-3):
            return f"tensor {i}: relative error {err / scale:.3g} (largest {worst:.3g})"
    return None


def witness_pair(verdict, g):
    """The witness's two inputs and, for a verdict that replays a seed (dropout), the seed it drew."""
    if not verdict.extra.get("replay_seed"):
        return verdict.witness(g), None
    seeds = []
    real = torch.manual_seed

    def spy(s):
        seeds.append(int(s))
        return real(s)
    with torch.random.fork_rng(), mock.patch.object(torch, "manual_seed", spy):
        pair = verdict.witness(g)
    assert seeds, "a replay_seed witness must seed the global generator"
    return pair, seeds[-1]


def run_seeded(fn, inputs, seed):
    if seed is None:
        return fn(*inputs)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn(*inputs)


def collide(ya, yb) -> bool:
    """Same output: equal to float32 rounding (element-wise, or 1e-5 relative in norm per tensor, as
    attention with unscaled scores rounds q.(k + c) and q.k + q.c differently), discrete parts exactly."""
    if outputs_equal(ya, yb):
        return True
    ta, tb = list(_tensors(ya)), list(_tensors(yb))
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
        elif float((x.double() - y.double()).norm()) > 1e-5 * float(x.double().norm()):
            return False
    return True


def collision_failure(fn, verdict, g) -> str | None:
    """Why the verdict's witness is not a collision of ``fn`` (None if it is one)."""
    (a, b), seed = witness_pair(verdict, g)
    if not differ(a, b):
        return "the witness's two inputs are equal"
    ya, yb = run_seeded(fn, a, seed), run_seeded(fn, b, seed)
    if not collide(ya, yb):
        return "the witness's outputs differ"
    return None


def unique_sites(result, kind=None):
    """(site, verdict) for each distinct (prim, input types), optionally of one verdict type."""
    seen, out = set(), []
    for s in result.sites:
        v = result.verdicts[s.id]
        if (kind is not None and v.type != kind) or (s.prim, s.inputs) in seen:
            continue
        seen.add((s.prim, s.inputs))
        out.append((s, v))
    return out


class Many(nn.Module):
    """Every case as its own submodule (definition ``cases.i``) of one module: one export for a table."""

    def __init__(self, fs):
        super().__init__()
        self.cases = nn.ModuleList(f if isinstance(f, nn.Module) else Fn(f) for f in fs)

    def forward(self, *xs):
        return tuple(m(*xs) for m in self.cases)


def lower_table(name, table, x):
    """(program, result) of a whole table lowered at once (each case's sites have scope ``cases.i``)."""
    return once(("table", name), lambda: lower_typed(Many([c[1] for c in table]), (x,)))


def site_of(result, op: str, scope: str | None = None):
    """The first site of ``op`` (and its verdict)."""
    for s in result.sites:
        if s.prim.op == op and (scope is None or s.scope == scope):
            return s, result.verdicts[s.id]
    raise AssertionError(f"no site of {op}: {[s.prim.op for s in result.sites]}")


def leaf_of(program, site) -> Leaf:
    return Leaf(site.prim, site.inputs, Values(program))


def term_fn(program, term, weights=None):
    """The curried function a term denotes, as a function of all its inputs at once."""
    f = Denoter(program, EagerBackend(program.weights if weights is None else weights)).term(term)

    def call(*xs):
        out = f
        for x in xs:
            out = out(x)
        return out
    return call


def def_of(program, name):
    """(function, input types) of a definition or of the entry."""
    if name == "entry":
        return term_fn(program, program.entry.body), program.entry.inputs
    return term_fn(program, Ref(name)), program.defs[name].inputs


def grad_call(program, prim: Prim):
    """The leaf as a differentiable function of its holes (``Leaf.call`` runs under no_grad)."""
    values = Values(program)

    def call(*operands):
        ops = list(operands)
        args = fill(prim.args, ops, values.get)
        kwargs = dict(zip((k for k, _ in prim.kwargs), fill(tuple(v for _, v in prim.kwargs), ops,
                                                            values.get)))
        return resolve_op(prim.op)(*args, **kwargs)
    return call


def jacobian_rank(fn, inputs) -> tuple[int, int]:
    """(number of real inputs, rank of the Jacobian of fn's real outputs) at ``inputs`` (float64)."""
    inputs = tuple(x.detach().double() for x in inputs)

    def flat(*xs):
        outs = [t.reshape(-1) for t in _tensors(fn(*xs)) if t.is_floating_point()]
        return torch.cat(outs)
    jac = torch.autograd.functional.jacobian(flat, inputs)
    jac = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
    s = torch.linalg.svdvals(jac)
    rank = int((s > 1e-9 * float(s.max())).sum()) if len(s) and float(s.max()) > 0 else 0
    return sum(x.numel() for x in inputs), rank


def random_inputs(types, g, scale=1.0, dtype=None):
    out = []
    for t in types:
        assert isinstance(t, TensorType), t
        x = torch.randn(t.shape, generator=g, dtype=torch.float64) * scale
        out.append(x.to(dtype or t.torch_dtype))
    return tuple(out)


def _has_discrete(types) -> bool:
    for t in types:
        if isinstance(t, TupleType):
            if _has_discrete(t.items):
                return True
        elif isinstance(t, TensorType) and not t.torch_dtype.is_floating_point:
            return True
    return False


def _known_bug(program, site, verdict) -> str | None:
    """The xfail test that pins this site's bug, or None. Remove an entry when its xfail is removed.
    (None today: every test_bug_* passes.)"""
    return None


# ----------------------------------------------------------------------------------------- the zoo

@pytest.fixture(scope="module")
def typed_zoo(zoo):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = typing_of(zoo[name].program)
        return cache[name]
    return get


# ops whose inverse amplifies float32 rounding near saturation: inputs are drawn in a range where they
# are well conditioned (their domain in any real use)
_SATURATING = {"aten.tanh.default", "aten.sigmoid.default", "aten.erf.default", "aten.atan.default",
               "aten.softplus.default", "aten.elu.default"}


_CONV = ("aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default", "aten.convolution.default")


def _slow_inverse(site) -> bool:
    """A convolution's inverse is the pseudo-inverse of its whole operator (seconds at 1024 inputs per
    example): checked in the slow run; the default run checks its rank certificate."""
    x = site.inputs[0] if site.inputs else None
    return site.prim.op in _CONV and isinstance(x, TensorType) and x.numel // x.shape[0] > 256


def leaf_inverse_failure(program, site, verdict, g, scale, full=True) -> str | None:
    leaf = leaf_of(program, site)
    if verdict.inverse is None or (not full and _slow_inverse(site)):
        rank = verdict.rank or {}
        if not (rank.get("rank") is not None and rank.get("rank") == rank.get("columns")):
            return f"S without an inverse or a full-rank certificate ({rank})"
        return None
    if site.prim.op in _SATURATING:
        scale = min(scale, 0.5)
    x = verdict.sample(g) if verdict.sample is not None else leaf.random(g, scale)
    back = verdict.inverse(leaf.call(*x))
    return mismatch(tuple(back), tuple(x), 1e-4)


def s_leaf_failures(program, result, seed, scale, full) -> list[str]:
    failures = []
    for site, v in unique_sites(result, S):
        if _known_bug(program, site, v):
            continue
        g = torch.Generator().manual_seed(seed)
        why = leaf_inverse_failure(program, site, v, g, scale, full)
        if why:
            failures.append(f"{site.prim} on {site.inputs} ({v.rule}): {why}")
    return failures


def k_leaf_failures(program, result, seed) -> list[str]:
    failures = []
    for site, v in unique_sites(result, K):
        if _known_bug(program, site, v):
            continue
        if v.witness is None:
            failures.append(f"{site.prim} on {site.inputs} ({v.rule}): K without a witness")
            continue
        try:
            why = collision_failure(leaf_of(program, site).call, v, torch.Generator().manual_seed(seed))
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # no witness, then
            why = f"the witness raised {exc!r}"
        if why:
            failures.append(f"{site.prim} on {site.inputs} ({v.rule}): {why}")
    return failures


@pytest.mark.parametrize("name", ZOO_NAMES)
@settings(max_examples=1, **SETTINGS)  # more in test_zoo_evidence_many_seeds (slow)
@given(seed=st.integers(0, 2 ** 31 - 1), scale=st.sampled_from([1.0, 0.3, 3.0]))
def test_zoo_s_leaves_are_inverted(typed_zoo, name, seed, scale):
    program, result = typed_zoo(name)
    failures = s_leaf_failures(program, result, seed, scale, full=False)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", ZOO_NAMES)
@settings(max_examples=1, **SETTINGS)  # more in test_zoo_evidence_many_seeds (slow)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_zoo_k_leaves_have_colliding_witnesses(typed_zoo, name, seed):
    program, result = typed_zoo(name)
    assert Values(program).known  # the zoo has real weights: every K leaf must carry a witness
    failures = k_leaf_failures(program, result, seed)
    assert not failures, "\n".join(failures)


def _well_formed(v) -> str | None:
    if v.type not in (S, K, GRAY):
        return f"type {v.type!r}"
    if not v.rule or not v.claim:
        return "no rule or no claim"
    if v.type == GRAY and (not v.condition or not v.decided_by):
        return "GRAY without a condition or without what decides it"
    if v.type == S and v.inverse is None and v.rank is not None and v.rank.get("rank") != v.rank.get(
            "columns"):
        return f"S with a rank certificate that is not full column rank: {v.rank}"
    ev = v.evidence()
    if ev.get("rule") != v.rule or ev.get("claim") != v.claim:
        return "evidence() does not state the rule and the claim"
    return None


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_verdicts_are_well_formed(typed_zoo, name):
    _, result = typed_zoo(name)
    assert set(result.verdicts) == {s.id for s in result.sites}
    failures = []
    for site in result.sites:
        v = result.verdicts[site.id]
        why = _well_formed(v)
        if v.rule in ("no rule", "rule failed", "untyped") and site.prim.op not in NO_RULE_ALLOWED:
            why = f"{v.rule}: {v.claim}"
        if v.type == S and v.inverse is None and not v.rank and v.rule != "nullary":
            why = "S leaf without an inverse or a rank certificate"
        if why:
            failures.append(f"site {site.id} {site.prim.op} on {site.inputs}: {why}")
    for def_name, v in result.defs.items():
        why = _well_formed(v)
        if why:
            failures.append(f"definition {def_name}: {why}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", ["gpt2", "llama", "resnet"])
def test_zoo_weights_only_decide_verdicts(typed_zoo, name):
    """Without weight values (the program parsed from its text) a verdict is S, K or GRAY; the weights
    may decide a GRAY, but never turn an S into K or a K into S."""
    program, result = typed_zoo(name)
    bare, bare_result = typing_of(bwskc.parse(program.text()))
    assert not Values(bare).known or not bare.tensors
    assert [s.prim for s in bare_result.sites] == [s.prim for s in result.sites]
    flipped = []
    for s in result.sites:
        without, with_ = bare_result.verdicts[s.id], result.verdicts[s.id]
        if {without.type, with_.type} == {S, K}:
            flipped.append(f"{s.prim.op} on {s.inputs}: {without.type} without weights, {with_.type} with")
        if without.type == K and without.witness is None:
            assert without.rule == "rank-nullity", (s.prim.op, without.rule)
    assert not flipped, "\n".join(flipped)


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_NAMES)
@settings(max_examples=15, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), scale=st.sampled_from([0.1, 0.3, 1.0, 3.0]))
def test_zoo_evidence_many_seeds(typed_zoo, name, seed, scale):
    program, result = typed_zoo(name)
    failures = s_leaf_failures(program, result, seed, scale, full=True) + k_leaf_failures(
        program, result, seed)
    assert not failures, "\n".join(failures)


def _single_input_defs(program, result, kind):
    for name, v in result.defs.items():
        if v.type != kind:
            continue
        fn, types = def_of(program, name)
        if len(types) == 1 and isinstance(types[0], TensorType) and types[0].torch_dtype.is_floating_point:
            yield name, v, fn, types


@pytest.mark.parametrize("name", ZOO_NAMES)
@settings(max_examples=1, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), scale=st.sampled_from([1e-3, 3e-3]))
def test_zoo_composite_evidence(typed_zoo, name, seed, scale):
    """Definitions of the zoo typed S with an inverse are inverted; K definitions with a witness collide.
    Inputs are small (1e-3): RMSNorm with eps = 1e-6 is injective, but at |x| ~ 1 its float32 output
    keeps too little of the scale to invert (its inverse divides by 1 - |y|^2/d ~ eps / mean(x^2))."""
    program, result = typed_zoo(name)
    buggy = {id(result.verdicts[s.id]) for s in result.sites
             if _known_bug(program, s, result.verdicts[s.id])}
    failures = []
    for def_name, v, fn, types in _single_input_defs(program, result, S):
        if v.inverse is None:
            continue
        x = random_inputs(types, torch.Generator().manual_seed(seed), scale)
        with torch.no_grad():
            why = mismatch(tuple(v.inverse(fn(*x))), x, 1e-4)
        if why:
            failures.append(f"S definition {def_name} ({v.rule}): {why}")
    for def_name, v, fn, _ in _single_input_defs(program, result, K):
        if v.witness is None or id(v) in buggy:  # a definition that is one leaf has the leaf's verdict
            continue
        try:
            with torch.no_grad():
                why = collision_failure(fn, v, torch.Generator().manual_seed(seed))
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            why = f"the witness raised {exc!r}"
        if why:
            failures.append(f"K definition {def_name} ({v.rule}): {why}")
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------- hard cases

def check_s(fn, verdict, inputs, rtol=1e-4):
    """The S evidence: the inverse gives ``inputs`` back from ``fn(*inputs)``; or a full-rank certificate."""
    assert verdict.type == S, (verdict.type, verdict.rule, verdict.claim)
    if verdict.inverse is None:
        assert verdict.rank and verdict.rank["rank"] == verdict.rank["columns"], verdict.rank
        return
    with torch.no_grad():
        why = mismatch(tuple(verdict.inverse(fn(*inputs))), tuple(inputs), rtol)
    assert why is None, why


def check_k(fn, verdict, seed):
    """The K evidence: the witness's two inputs differ and ``fn`` maps them to one output."""
    assert verdict.type == K, (verdict.type, verdict.rule, verdict.claim)
    assert verdict.witness is not None, f"K ({verdict.rule}) without a witness"
    with torch.no_grad():
        why = collision_failure(fn, verdict, torch.Generator().manual_seed(seed))
    assert why is None, why


def only_leaf(program, result):
    """The one non-constant site of a one-op program, its verdict and its Leaf."""
    sites = [s for s in result.sites if s.inputs]
    assert len(sites) == 1, [s.prim.op for s in sites]
    return sites[0], result.verdicts[sites[0].id], leaf_of(program, sites[0])


_X = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
# (id, f, expected type, input range): unary ops as functions of their one activation input
UNARY = [
    ("sigmoid", torch.sigmoid, S, 4.0),
    ("tanh", torch.tanh, S, 3.0),
    ("elu", nn.ELU(), S, 3.0),
    ("elu-alpha-0.3", nn.ELU(0.3), S, 3.0),
    ("leaky-relu", nn.LeakyReLU(0.1), S, 3.0),
    ("leaky-relu-negative-slope", nn.LeakyReLU(-0.5), K, 3.0),
    # torch's softplus switches to x above threshold/beta, and log1p(e^t) > t: the branches overlap
    # (at the default threshold 20 on (20, 20 + 2e-9]): K, with a float64 witness
    ("softplus", nn.Softplus(), K, 3.0),
    ("softplus-no-threshold", nn.Softplus(threshold=math.inf), S, 3.0),
    ("exp", torch.exp, S, 3.0),
    ("neg", torch.neg, S, 3.0),
    ("x+3", lambda x: x + 3, S, 3.0),
    ("3-x", lambda x: 3 - x, S, 3.0),
    ("x/4", lambda x: x / 4, S, 3.0),
    ("x**3", lambda x: x ** 3, S, 2.0),
    ("cumsum", lambda x: torch.cumsum(x, -1), S, 3.0),
    ("transpose", lambda x: x.t(), S, 3.0),
    ("gelu", nn.GELU(), K, 3.0),
    ("gelu-tanh", nn.GELU("tanh"), K, 3.0),
    ("silu", nn.SiLU(), K, 3.0),
    ("mish", nn.Mish(), K, 3.0),
    ("relu", nn.ReLU(), K, 3.0),
    ("abs", torch.abs, K, 3.0),
    ("x**2", lambda x: x ** 2, K, 3.0),
    ("x*0", lambda x: x * 0, K, 3.0),
    ("softmax", nn.Softmax(-1), K, 3.0),
    ("log-softmax", nn.LogSoftmax(-1), K, 3.0),
    ("layer-norm", nn.LayerNorm(5), K, 3.0),
    ("layer-norm-eps-0", nn.LayerNorm(5, eps=0.0), K, 3.0),
    ("group-norm", nn.GroupNorm(1, 5), K, 3.0),
    ("mean", lambda x: x.mean(-1), K, 3.0),
    ("amax", lambda x: x.amax(-1), K, 3.0),
    ("slice", lambda x: x[:, 1:4], K, 3.0),
    ("round", torch.round, K, 3.0),
]


@pytest.mark.parametrize("case", UNARY, ids=[c[0] for c in UNARY])
@settings(max_examples=3, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), scale=st.floats(0.05, 1.0))
def test_unary_table(case, seed, scale):
    """Each op typed as its math says (leaf and entry agree), with working evidence."""
    _, _, want, span = case
    program, result = lower_table("unary", UNARY, _X)
    scope = f"cases.{UNARY.index(case)}"
    sites = [s for s in result.sites if s.scope == scope and s.inputs]
    assert len(sites) == 1, [s.prim.op for s in sites]
    v, leaf = result.verdicts[sites[0].id], leaf_of(program, sites[0])
    assert v.type == want, (v.type, v.rule, v.claim)
    assert result.defs[scope].type == want
    if want == S:
        g = torch.Generator().manual_seed(seed)
        x = (torch.rand(_X.shape, generator=g, dtype=torch.float64) * 2 - 1) * span * scale
        check_s(leaf.call, v, (x.float(),))
        # and the math: strictly monotone (or linear) maps separate a random pair of nearby inputs
        y = x.float() + 1e-2
        assert differ(leaf.call(x.float()), leaf.call(y))
    else:
        check_k(leaf.call, v, seed)


def test_monotone_ops_are_strictly_monotone():
    """The S activations really are strictly increasing (so injective), GELU and SiLU really fold."""
    grid = torch.linspace(-6, 6, 4001, dtype=torch.float64)
    for f in (torch.sigmoid, torch.tanh, nn.ELU(), nn.ELU(0.3), nn.LeakyReLU(0.1), nn.Softplus()):
        assert bool((torch.diff(f(grid)) > 0).all()), f
    for f in (nn.GELU(), nn.SiLU()):
        assert not bool((torch.diff(f(grid)) > 0).all()), f


class LlamaRMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.eps = eps

    def forward(self, x):
        v = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(v + self.eps))


class Outer(nn.Module):
    """Wraps a module so that the lowering outlines it as a definition named ``norm``."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x) + 1


def test_torch_rmsnorm_lowers_to_the_rms_norm_op():
    """In torch 2.13, nn.RMSNorm exports as one aten.rms_norm leaf (not pow/mean/rsqrt)."""
    program, _ = lower_typed(Outer(nn.RMSNorm(5, eps=1e-6)), (_X,))
    ops = [t.op for t in subterms(program.defs["norm"].body) if isinstance(t, Prim)]
    assert ops == ["aten.rms_norm.default"]


@pytest.mark.parametrize("eps", [1e-6, 1e-2, None])
@settings(max_examples=3, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), mult=st.sampled_from([0.1, 1.0, 10.0, 1e3]))
def test_torch_rmsnorm_with_eps_is_s(eps, seed, mult):
    """nn.RMSNorm (aten.rms_norm) with eps > 0 (None: finfo(float64).eps) is injective. Its inverse
    divides by 1 - |y|^2/d = eps / (mean(x^2) + eps): checked in float64 at |x| up to 1000 sqrt(eps)."""
    scale = mult * math.sqrt(eps if eps is not None else torch.finfo(torch.float64).eps)
    torch.manual_seed(0)
    x = _X.double()
    program, result = once(("torch-rms", eps), lambda: lower_typed(Outer(nn.RMSNorm(5, eps=eps)).double(),
                                                                   (x,)))
    site, v = site_of(result, "aten.rms_norm.default")
    assert v.type == S and result.defs["norm"].type == S
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(x.shape, generator=g, dtype=torch.float64) * scale
    check_s(leaf_of(program, site).call, v, (xs,), rtol=1e-6)
    fn, _ = def_of(program, "norm")
    check_s(fn, result.defs["norm"], (xs,), rtol=1e-6)


def test_torch_rmsnorm_without_eps_is_k():
    program, result = lower_typed(Outer(nn.RMSNorm(5, eps=0.0)), (_X,))
    site, v = site_of(result, "aten.rms_norm.default")
    assert v.type == K and result.defs["norm"].type == K
    check_k(leaf_of(program, site).call, v, 0)
    assert v.dof_lost == _X.shape[0]  # the scale, per row


def _rms_idiom(program):
    """The S(mul, B(rsqrt, add eps, mean, pow 2)) subterm of the Llama-style norm."""
    for t in subterms(program.defs["norm"].body):
        if isinstance(t, Comb) and t.kind == "S":
            return t
    raise AssertionError(program.text())


@pytest.mark.parametrize("eps", [1e-6, 1e-3, 0.5])
@settings(max_examples=3, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), scale=st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
def test_llama_rmsnorm_with_eps_is_s_as_a_composite(eps, seed, scale):
    """x * rsqrt(mean(x^2) + eps) * w: its leaves pow and mean erase, the composite does not."""
    torch.manual_seed(0)
    x = _X.double()
    program, result = once(("llama-rms", eps), lambda: lower_typed(Outer(LlamaRMSNorm(5, eps)).double(),
                                                                   (x,)))
    assert site_of(result, "aten.pow.Tensor_Scalar")[1].type == K
    assert site_of(result, "aten.mean.dim")[1].type == K
    idiom = _rms_idiom(program)
    assert result.term_verdict(idiom).type == S
    v = result.defs["norm"]
    assert v.type == S, (v.rule, v.claim)
    xs = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    fn, _ = def_of(program, "norm")
    check_s(fn, v, (xs,), rtol=1e-6)
    check_s(term_fn(program, idiom), result.term_verdict(idiom), (xs,), rtol=1e-6)


def test_llama_rmsnorm_float32_is_inverted_where_well_conditioned():
    torch.manual_seed(0)
    program, result = lower_typed(Outer(LlamaRMSNorm(5, 0.1)), (_X,))
    fn, _ = def_of(program, "norm")
    check_s(fn, result.defs["norm"], (torch.randn(3, 5) * 0.3,))


def test_llama_rmsnorm_without_eps_is_k():
    torch.manual_seed(0)
    program, result = lower_typed(Outer(LlamaRMSNorm(5, 0.0)), (_X,))
    assert result.defs["norm"].type == K
    idiom = _rms_idiom(program)
    v = result.term_verdict(idiom)
    check_k(term_fn(program, idiom), v, 0)
    # and the definition itself collides at the idiom's witness (the weight is applied after it)
    fn, _ = def_of(program, "norm")
    (a, b), _ = witness_pair(v, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert differ(a, b) and collide(fn(*a), fn(*b))


# ------------------------------------------------------------------------------------- linear maps

def _linear(d, k, rank=None, bias=True):
    torch.manual_seed(0)
    lin = nn.Linear(d, k, bias=bias)
    if rank is not None:  # an exact dependence: small integer factors multiply exactly in float32
        with torch.no_grad():
            lin.weight.copy_(_int_product(k, rank, d))
    return lin


def _int_product(k, rank, d):
    """A k x d matrix of exact rank <= ``rank`` (a product of small-integer factors, exact in float32;
    a product of float32 Gaussians is only rank-deficient up to rounding, and full rank as stored)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randint(-3, 4, (k, rank), generator=g) @ torch.randint(-3, 4, (rank, d), generator=g)).float()


@pytest.mark.parametrize("d,k,rank,want", [
    (5, 3, None, K),  # narrowing: rank-nullity
    (5, 5, None, S),  # square, full rank
    (5, 5, 3, K),  # square, rank-deficient
    (5, 8, None, S),  # widening, full column rank
    (5, 8, 4, K),  # widening, rank-deficient
])
@pytest.mark.parametrize("bias", [True, False])
@settings(max_examples=3, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_linear_by_shape_and_rank(d, k, rank, want, bias, seed):
    lin = _linear(d, k, rank, bias)
    x = torch.randn(4, d)
    program, result = once(("linear", d, k, rank, bias), lambda: lower_typed(lin, (x,)))
    _, v, leaf = only_leaf(program, result)
    assert v.type == want, (v.rule, v.claim)
    w = lin.weight.detach().double()
    true_rank = int(torch.linalg.matrix_rank(lin.weight.detach()))  # float32 tolerance
    if want == S:
        # the certificate, checked independently: full column rank
        assert v.rank is not None and v.rank["rank"] == v.rank["columns"] == d == true_rank, v.rank
        xs = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        check_s(leaf.call, v, (xs,))
        assert v.dof_lost == 0
    else:
        check_k(leaf.call, v, seed)
        (a, b), _ = witness_pair(v, torch.Generator().manual_seed(seed))
        delta = (b[0] - a[0]).double()  # the witness moves x along the weight's null space
        assert float((delta @ w.T).norm()) <= 1e-4 * float(delta.norm()) * float(w.norm())
        assert v.dof_lost == (d - true_rank) * x.shape[0]


@pytest.mark.parametrize("rank", [None, 3])
def test_right_matmul_against_a_weight(rank):
    """x @ W with W a bound parameter: the same rule from the other side."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            w = torch.randn(5, 5) if rank is None else _int_product(5, rank, 5)
            self.w = nn.Parameter(w)

        def forward(self, x):
            return x @ self.w
    program, result = lower_typed(M(), (torch.randn(4, 5),))
    _, v, leaf = only_leaf(program, result)
    if rank is None:
        check_s(leaf.call, v, (torch.randn(4, 5),))
    else:
        check_k(leaf.call, v, 0)


# ----------------------------------------------------------------------------------------- dropout

@settings(max_examples=5, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1), p=st.sampled_from([0.3, 0.5, 0.9]))
def test_dropout_in_training_erases(seed, p):
    """(The witness draws masks until one drops an element: see test_bug_dropout_witness_when_nothing_is_dropped.)"""
    x = torch.randn(4, 16)
    program, result = once(("dropout-train", p), lambda: lower_typed(nn.Dropout(p), (x,), train=True))
    site, v = site_of(result, "aten.native_dropout.default")
    assert v.type == K and v.extra.get("replay_seed")
    assert result.defs["entry"].type == K
    check_k(leaf_of(program, site).call, v, seed)  # both calls replay the witness's own seed


@pytest.mark.parametrize("p,train", [(0.5, False), (0.0, True), (0.0, False)])
def test_dropout_in_eval_or_with_p_0_is_the_identity(p, train):
    program, result = lower_typed(nn.Dropout(p), (_X,), train=train)
    _, v, leaf = only_leaf(program, result)
    assert v.type == S and result.defs["entry"].type == S
    check_s(leaf.call, v, (torch.randn(_X.shape),))


@pytest.mark.parametrize("op,p,train,want", [
    ("aten.native_dropout.default", 0.0, True, S), ("aten.native_dropout.default", 0.5, False, S),
    ("aten.native_dropout.default", 0.5, True, K), ("aten.dropout.default", 0.5, False, S),
    ("aten.dropout.default", 0.0, True, S), ("aten.dropout.default", 0.3, True, K),
])
def test_dropout_rule_on_the_ops_themselves(op, p, train, want):
    """torch.export turns eval and p = 0 dropout into clone; the rule itself is checked on IR text."""
    out = "(f32[3,5], bool[3,5])" if op == "aten.native_dropout.default" else "f32[3,5]"
    program, result = typing_of(bwskc.parse(
        f"bwsk 1 program D\n\nentry (x: f32[3,5]) -> (out: {out}) =\n  {op}(_, {p}, {train}) : {out}\n"))
    _, v, leaf = only_leaf(program, result)
    assert v.type == want, (v.rule, v.claim)
    if want == S:
        check_s(leaf.call, v, (torch.randn(3, 5),))
    else:
        check_k(leaf.call, v, 0)


# -------------------------------------------------------------------------- erasing ops of all kinds

# (id, f on a (3, 5) input, op of the site checked): K, with a witness that collides
ERASING = [
    ("sum", lambda x: x.sum(-1), "aten.sum.dim_IntList"),
    ("sum-all", lambda x: x.sum(), "aten.sum.default"),
    ("mean-keepdim", lambda x: x.mean(0, keepdim=True), "aten.mean.dim"),
    ("prod", lambda x: x.prod(-1), "aten.prod.dim_int"),
    ("std", lambda x: x.std(-1), "aten.std.dim"),
    ("var", lambda x: x.var(-1), "aten.var.dim"),
    ("amax", lambda x: x.amax(-1), "aten.amax.default"),
    ("amin", lambda x: x.amin(0), "aten.amin.default"),
    ("argmax", lambda x: x.argmax(-1), "aten.argmax.default"),
    ("argmin", lambda x: x.argmin(-1), "aten.argmin.default"),
    ("max", lambda x: x.max(), "aten.max.default"),
    ("max-dim", lambda x: x.max(-1).values, "aten.max.dim"),
    ("max-pool", lambda x: F.max_pool1d(x[None], 2), "aten.max_pool1d.default"),
    ("avg-pool", lambda x: F.avg_pool1d(x[None], 2), "aten.avg_pool1d.default"),
    ("adaptive-avg-pool", lambda x: F.adaptive_avg_pool1d(x[None], 2), "aten.adaptive_avg_pool1d.default"),
    ("clamp", lambda x: x.clamp(-0.5, 0.5), "aten.clamp.default"),
    ("clamp-max", lambda x: x.clamp(max=0.5), "aten.clamp.default"),
    ("hardtanh", nn.Hardtanh(), "aten.hardtanh.default"),
    ("hardsigmoid", nn.Hardsigmoid(), "aten.hardsigmoid.default"),
    ("hardswish", nn.Hardswish(), "aten.hardswish.default"),
    ("threshold", nn.Threshold(0.1, 20.0), "aten.threshold.default"),
    ("sin", torch.sin, "aten.sin.default"),
    ("cos", torch.cos, "aten.cos.default"),
    ("floor", torch.floor, "aten.floor.default"),
    ("sign", torch.sign, "aten.sign.default"),
    ("x**0", lambda x: x ** 0, "aten.pow.Tensor_Scalar"),
    ("x**4", lambda x: x ** 4, "aten.pow.Tensor_Scalar"),
    ("gt", lambda x: x > 0.3, "aten.gt.Scalar"),
    ("to-bf16", lambda x: x.to(torch.bfloat16), "aten._to_copy.default"),
    ("to-f16", lambda x: x.half(), "aten._to_copy.default"),
    ("tril", lambda x: x.tril(), "aten.tril.default"),
    ("diagonal", lambda x: x.diagonal(), "aten.diagonal.default"),
    ("index-select", lambda x: x.index_select(-1, torch.tensor([0, 2, 4])), "aten.index_select.default"),
    ("gather", lambda x: x.gather(-1, torch.tensor([[0, 1], [2, 3], [4, 0]])), "aten.gather.default"),
    ("where-bound-condition", lambda x: torch.where(torch.tensor([True, False, True, True, False]), x, 0.0),
     "aten.where.ScalarOther"),
    ("masked-fill", lambda x: x.masked_fill(torch.tensor([True, False, True, True, False]), 0.0),
     "aten.masked_fill.Scalar"),
    ("zeros-like", lambda x: torch.zeros_like(x) + x.sum(), "aten.zeros_like.default"),
]


@pytest.mark.parametrize("case", ERASING, ids=[c[0] for c in ERASING])
@settings(max_examples=2, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_erasing_table(case, seed):
    program, result = lower_table("erasing", ERASING, _X)
    site, v = site_of(result, case[2], f"cases.{ERASING.index(case)}")
    check_k(leaf_of(program, site).call, v, seed)


_C = torch.rand(5, generator=torch.Generator().manual_seed(1)) + 1  # a constant factor with no zero

# (id, f, op): S, with an inverse that gives the input back
INJECTIVE = [
    ("roll", lambda x: x.roll(1, -1), "aten.roll.default"),
    ("flip", lambda x: x.flip(-1), "aten.flip.default"),
    ("repeat", lambda x: x.repeat(2, 1), "aten.repeat.default"),
    ("unfold", lambda x: x.unfold(-1, 2, 1), "aten.unfold.default"),
    ("unbind", lambda x: x.unbind(0), "aten.unbind.int"),
    ("expand", lambda x: x[:, None].expand(3, 2, 5), "aten.expand.default"),
    ("permute", lambda x: x[None].permute(2, 0, 1), "aten.permute.default"),
    ("to-f64", lambda x: x.double(), "aten._to_copy.default"),
    ("reciprocal", torch.reciprocal, "aten.reciprocal.default"),
    ("x**-1", lambda x: x ** -1, "aten.pow.Tensor_Scalar"),
    ("atan", torch.atan, "aten.atan.default"),
    ("asinh", torch.asinh, "aten.asinh.default"),
    ("sinh", torch.sinh, "aten.sinh.default"),
    ("expm1", torch.expm1, "aten.expm1.default"),
    ("erf", torch.erf, "aten.erf.default"),
    ("2/x", lambda x: 2.0 / x, "aten.reciprocal.default"),
    ("1-x", lambda x: 1.0 - x, "aten.rsub.Scalar"),
    ("sub-alpha", lambda x: torch.sub(x, 1.0, alpha=2), "aten.sub.Tensor"),
    ("add-alpha-activation-second", lambda x: torch.add(torch.ones(5), x, alpha=3), "aten.add.Tensor"),
    ("bound-minus-x", lambda x: torch.ones(5) - x, "aten.sub.Tensor"),
    ("bound-over-x", lambda x: _C / x, "aten.div.Tensor"),
]


@pytest.mark.parametrize("case", INJECTIVE, ids=[c[0] for c in INJECTIVE])
@settings(max_examples=2, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_injective_table(case, seed):
    program, result = lower_table("injective", INJECTIVE, _X)
    site, v = site_of(result, case[2], f"cases.{INJECTIVE.index(case)}")
    assert v.type == S, (v.rule, v.claim)
    leaf = leaf_of(program, site)
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(site.inputs[0].shape, generator=g) + 0.2) * torch.sign(torch.randn(
        site.inputs[0].shape, generator=g))  # away from 0 (reciprocals) and within erf's range
    check_s(leaf.call, v, (x,))


# ---------------------------------------------------------------------------------- binary, embeddings

def test_x_times_x_is_k_as_W_mul():
    program, result = lower_typed(Fn(lambda x: x * x), (_X,))
    body = program.entry.body
    assert isinstance(body, Comb) and body.kind == "W"
    v = result.defs["entry"]
    assert v.type == K
    fn, _ = def_of(program, "entry")
    x = torch.randn(_X.shape)
    assert collide(fn(x), fn(-x))  # the stated collision: x and -x
    if v.witness is not None:
        check_k(fn, v, 0)
    site, leaf_v, leaf = only_leaf(program, result)  # the leaf mul(_, _), judged on its two holes
    assert len(site.inputs) == 2
    check_k(leaf.call, leaf_v, 0)


@pytest.mark.parametrize("op", [torch.mul, torch.add, torch.sub, torch.div])
@settings(max_examples=3, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_two_activation_operands_are_judged_jointly(op, seed):
    """x * y, x + y, x - y, x / y as functions of (x, y): K, with a witness."""
    program, result = once(("joint", op.__name__), lambda: lower_typed(Fn(op), (_X, _X + 2)))
    site, v, leaf = only_leaf(program, result)
    assert len(site.inputs) == 2
    check_k(leaf.call, v, seed)
    assert v.dof_lost == _X.numel()  # 2n inputs, n outputs, Jacobian [diag, diag] of rank n


def test_x_plus_3_is_s_and_x_times_0_is_k():
    program, result = lower_typed(Fn(lambda x: x + 3), (_X,))
    _, v, leaf = only_leaf(program, result)
    check_s(leaf.call, v, (torch.randn(_X.shape),))
    assert v.surjective
    program, result = lower_typed(Fn(lambda x: x * 0), (_X,))
    _, v, leaf = only_leaf(program, result)
    check_k(leaf.call, v, 0)
    assert v.dof_lost == _X.numel()


@pytest.mark.parametrize("zeros", [0, 1, 5])
def test_product_with_a_bound_factor(zeros):
    """x * c with c a parameter: S iff c has no zero (a zero factor erases what it multiplies)."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            c = torch.rand(5) + 0.5
            c[:zeros] = 0
            self.c = nn.Parameter(c)

        def forward(self, x):
            return x * self.c
    program, result = lower_typed(M(), (_X,))
    _, v, leaf = only_leaf(program, result)
    if zeros == 0:
        check_s(leaf.call, v, (torch.randn(_X.shape),))
    else:
        check_k(leaf.call, v, 0)
        assert v.dof_lost == zeros * _X.shape[0]


@pytest.mark.parametrize("dup", [False, True])
@settings(max_examples=3, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_embedding_by_its_rows(dup, seed):
    """S when the rows are distinct (the nearest row gives the id back), K when two rows are equal."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4)
    if dup:
        with torch.no_grad():
            emb.weight[7] = emb.weight[3]
    ids = torch.randint(0, 10, (2, 6))
    program, result = once(("embedding", dup), lambda: lower_typed(emb, (ids,)))
    _, v, leaf = only_leaf(program, result)
    g = torch.Generator().manual_seed(seed)
    if not dup:
        x = v.sample(g) if v.sample else (torch.randint(0, 10, ids.shape, generator=g),)
        assert bool((x[0] >= 0).all() and (x[0] < 10).all())
        check_s(leaf.call, v, x)
    else:
        check_k(leaf.call, v, seed)
        (a, b), _ = witness_pair(v, g)
        assert {int(a[0].flatten()[0]), int(b[0].flatten()[0])} == {3, 7}


# ------------------------------------------------------------------------------ degrees of freedom

def _lin(d, k, rank=None):
    """A float64 linear layer; with ``rank``, a weight of exactly that rank in float64."""
    torch.manual_seed(0)
    lin = nn.Linear(d, k).double()
    if rank is not None:
        with torch.no_grad():
            lin.weight.copy_(_int_product(k, rank, d).double())
    return lin


class MatMul(nn.Module):
    def forward(self, a, b):
        return a @ b


# (id, module, input shapes, op whose site is checked)
DOF_CASES = [
    ("layer-norm", lambda: nn.LayerNorm(5), [(3, 5)], "aten.layer_norm.default"),
    ("layer-norm-eps-0.1", lambda: nn.LayerNorm(5, eps=0.1), [(3, 5)], "aten.layer_norm.default"),
    ("layer-norm-eps-0", lambda: nn.LayerNorm(5, eps=0.0), [(3, 5)], "aten.layer_norm.default"),
    ("layer-norm-2d", lambda: nn.LayerNorm((2, 3)), [(4, 2, 3)], "aten.layer_norm.default"),
    ("softmax", lambda: nn.Softmax(-1), [(3, 5)], "aten.softmax.int"),
    ("softmax-dim0", lambda: nn.Softmax(0), [(3, 5)], "aten.softmax.int"),
    ("log-softmax", lambda: nn.LogSoftmax(-1), [(3, 5)], "aten.log_softmax.int"),
    ("rms-norm-eps-0", lambda: nn.RMSNorm(5, eps=0.0), [(3, 5)], "aten.rms_norm.default"),
    ("rms-norm-eps", lambda: nn.RMSNorm(5, eps=0.1), [(3, 5)], "aten.rms_norm.default"),
    ("linear-narrow", lambda: _lin(5, 3), [(2, 5)], "aten.linear.default"),
    ("linear-square-rank-3", lambda: _lin(5, 5, 3), [(2, 5)], "aten.linear.default"),
    ("linear-wide", lambda: _lin(5, 8), [(2, 5)], "aten.linear.default"),
    ("mean-last", lambda: Fn(lambda x: x.mean(-1)), [(3, 4)], "aten.mean.dim"),
    ("sum-keepdim", lambda: Fn(lambda x: x.sum(0, keepdim=True)), [(3, 4)], "aten.sum.dim_IntList"),
    ("mean-two-dims", lambda: Fn(lambda x: x.mean((0, 2))), [(2, 3, 4)], "aten.mean.dim"),
    ("slice", lambda: Fn(lambda x: x[:, 1:4]), [(3, 6)], "aten.slice.Tensor"),
    ("slice-step", lambda: Fn(lambda x: x[:, ::2]), [(3, 6)], "aten.slice.Tensor"),
    ("select", lambda: Fn(lambda x: x[1]), [(3, 4)], "aten.select.int"),
    ("mul-joint", lambda: Fn(torch.mul), [(3, 4), (3, 4)], "aten.mul.Tensor"),
    ("add-joint-broadcast", lambda: Fn(torch.add), [(3, 4), (1, 4)], "aten.add.Tensor"),
    ("matmul-thin", lambda: MatMul(), [(3, 2), (2, 4)], "aten.matmul.default"),
    ("matmul-wide", lambda: MatMul(), [(2, 3), (3, 2)], "aten.matmul.default"),
    ("matmul-batched", lambda: MatMul(), [(2, 4, 2), (2, 2, 3)], "aten.matmul.default"),
    ("x*0", lambda: Fn(lambda x: x * 0), [(3, 4)], "aten.mul.Tensor"),
    ("tanh", lambda: Fn(torch.tanh), [(3, 4)], "aten.tanh.default"),
    ("sigmoid", lambda: Fn(torch.sigmoid), [(3, 4)], "aten.sigmoid.default"),
    ("elu", lambda: nn.ELU(), [(3, 4)], "aten.elu.default"),
    ("leaky-relu", lambda: nn.LeakyReLU(0.2), [(3, 4)], "aten.leaky_relu.default"),
    ("gelu", lambda: nn.GELU(), [(3, 4)], "aten.gelu.default"),
    ("silu", lambda: nn.SiLU(), [(3, 4)], "aten.silu.default"),
    ("x**2", lambda: Fn(lambda x: x ** 2), [(3, 4)], "aten.pow.Tensor_Scalar"),
    ("x+3", lambda: Fn(lambda x: x + 3), [(3, 4)], "aten.add.Tensor"),
    ("cumsum", lambda: Fn(lambda x: x.cumsum(-1)), [(3, 4)], "aten.cumsum.default"),
    ("cat", lambda: Fn(lambda x, y: torch.cat([x, y], -1)), [(3, 4), (3, 2)], "aten.cat.default"),
    ("transpose", lambda: Fn(lambda x: x.transpose(0, 1)), [(3, 4)], "aten.transpose.int"),
]


@pytest.mark.parametrize("case", DOF_CASES, ids=[c[0] for c in DOF_CASES])
@settings(max_examples=2, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_dof_lost_is_the_jacobian_rank_deficit(case, seed):
    """dof_lost = input size - rank of the Jacobian, at a random point, in float64."""
    _, _, shapes, op = case
    group = [c for c in DOF_CASES if c[2] == shapes]  # one export per input signature
    program, result = once(("dof", tuple(shapes)), lambda: lower_typed(
        Many([c[1]() for c in group]).double(), tuple(torch.randn(s, dtype=torch.float64) for s in shapes)))
    site, v = site_of(result, op, f"cases.{group.index(case)}")
    assert v.dof_lost is not None, f"{op}: no dof formula ({v.rule}, {v.dof_note})"
    g = torch.Generator().manual_seed(seed)
    inputs = random_inputs(site.inputs, g, dtype=torch.float64)
    n, rank = jacobian_rank(grad_call(program, site.prim), inputs)
    assert n - rank == v.dof_lost, f"{v.type} {v.rule}: Jacobian rank {rank} of {n}, dof_lost {v.dof_lost}"
    if v.type == S:
        assert v.dof_lost == 0


# ------------------------------------------------------------------------------ composite verdicts

def pulled_back_witness(program, result, term, g):
    """For ``B(f1, ..., fn)`` typed K because a component fj erases and every map inside it is a
    bijection: fj's witness mapped back through those maps' inverses (None if not constructible)."""
    if not (isinstance(term, Comb) and term.kind == "B" and len(term.args) >= 2):
        return None
    parts = [result.term_verdict(a) for a in term.args]
    j = max(i for i, p in enumerate(parts) if p.type != S)
    if parts[j].type != K or parts[j].witness is None:
        return None
    if any(p.inverse is None for p in parts[j + 1:]):
        return None
    (a, b), seed = witness_pair(parts[j], g)
    if seed is not None or len(a) != 1:
        return None
    a, b = a[0], b[0]
    with torch.no_grad():
        for p in parts[j + 1:]:
            a, b = p.inverse(a)[0], p.inverse(b)[0]
    return (a,), (b,)


def s_composite_failure(fn, v, types, seed, jacobian=True) -> str | None:
    """Why an S composite is not shown injective at random inputs (None if it is): its inverse gives
    them back and its Jacobian has full column rank. Tried at scales 1, 0.1 and 0.01 in turn: a chain of
    growing steps into tanh saturates in float64 at large inputs (tanh'(300) = 0), an injective map
    that is numerically flat there; a wrong inverse or an erasing map fails at every scale."""
    why = None
    for scale in (1.0, 0.1, 0.01):
        x = random_inputs(types, torch.Generator().manual_seed(seed), scale)
        why = None
        if v.inverse is not None:
            with torch.no_grad():
                back = tuple(v.inverse(fn(*x)))
            why = mismatch(back, x, 1e-5)
        if why is None and jacobian and sum(t.numel for t in types) <= 400:
            n, rank = jacobian_rank(fn, x)
            if rank < n:
                why = f"the Jacobian has rank {rank} < {n} at a random point"
        if why is None:
            return None
    return why


def composite_failures(program, result, seed, jacobian=True) -> list[str]:
    """Every definition and the entry: S is inverted (if it has an inverse) and has a Jacobian of full
    column rank; K's witness (if any) collides, and a pulled-back collision is rebuilt and collides;
    GRAY states its condition."""
    failures = []
    for name in [*program.defs, "entry"]:
        v = result.defs[name]
        fn, types = def_of(program, name)
        if not types or not all(isinstance(t, TensorType) and t.torch_dtype.is_floating_point
                                for t in types):
            continue
        why = None
        if v.type == S:
            why = s_composite_failure(fn, v, types, seed, jacobian)
        elif v.type == K:
            if v.witness is not None:
                with torch.no_grad():
                    why = collision_failure(fn, v, torch.Generator().manual_seed(seed))
            body = program.entry.body if name == "entry" else program.defs[name].body
            if why is None and v.rule == "B: pulled-back collision" and len(types) == 1:
                pair = pulled_back_witness(program, result, body, torch.Generator().manual_seed(seed))
                if pair is not None:
                    with torch.no_grad():
                        if not (differ(*pair) and collide(fn(*pair[0]), fn(*pair[1]))):
                            why = "the pulled-back witness does not collide"
        elif not v.condition or not v.decided_by:
            why = "GRAY without a condition"
        if why:
            failures.append(f"{name}: {v.type} ({v.rule}): {why}")
    return failures


@settings(max_examples=10, **SETTINGS)
@given(steps=steps_st, outputs=outputs_st, two_inputs=st.booleans(), d=st.sampled_from([3, 4]),
       seed=st.integers(0, 2 ** 16))
def test_composites_on_random_graphs(steps, outputs, two_inputs, d, seed):
    torch.manual_seed(seed)
    module = (Dag2 if two_inputs else Dag1)(steps, outputs, d).eval().double()
    inputs = tuple(torch.randn(2, d, dtype=torch.float64) for _ in range(2 if two_inputs else 1))
    program, result = lower_typed(module, inputs)
    failures = composite_failures(program, result, seed)
    assert not failures, "\n".join(failures) + "\n" + program.text()


class Sub(nn.Module):
    """A square linear layer then tanh: an S definition with an inverse."""

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, h):
        return torch.tanh(self.fc(h))


class Chain(nn.Module):
    """A chain of mostly injective steps (with erasing ones mixed in), each on the last value and
    sometimes an earlier one: long B compositions, W and S sharing, definitions. No step grows its input
    much, so that a later tanh does not saturate in float64 (where atanh(tanh(20)) is already inf)."""

    N_OPS = 22

    def __init__(self, ops, d):
        super().__init__()
        self.ops = ops
        self.lin = nn.Linear(d, d)
        self.w = nn.Parameter(torch.linalg.qr(torch.randn(d, d))[0])  # orthogonal: no growth
        self.sub = Sub(d)
        self.ln = nn.LayerNorm(d)

    def step(self, op, h, prev):
        steps = [lambda: torch.tanh(h), lambda: torch.sigmoid(h), lambda: -h, lambda: h + 0.5,
                 lambda: h * 0.75, lambda: self.lin(h), lambda: h @ self.w, lambda: h.t().t(),
                 lambda: torch.exp(torch.tanh(h)), lambda: torch.relu(h), lambda: F.gelu(h),
                 lambda: h * torch.sigmoid(h), lambda: h * h, lambda: (h + h) * 0.5, lambda: h.softmax(-1),
                 lambda: self.ln(h), lambda: F.leaky_relu(h, 0.2), lambda: h + torch.tanh(prev),
                 lambda: F.elu(h), lambda: self.sub(h), lambda: torch.cat([h, prev], -1)[:, 1:5],
                 lambda: h.flip(-1)]
        return steps[op]()

    def forward(self, x):
        vals = [x]
        for op, back in self.ops:
            vals.append(self.step(op, vals[-1], vals[-1 - back % len(vals)]))
        return vals[-1]


@settings(max_examples=15, **SETTINGS)
@given(ops=st.lists(st.tuples(st.integers(0, Chain.N_OPS - 1), st.integers(0, 3)), min_size=1,
                    max_size=6),
       seed=st.integers(0, 2 ** 16))
def test_composites_on_random_chains(ops, seed):
    torch.manual_seed(seed)
    module = Chain(ops, 4).double()
    program, result = lower_typed(module, (torch.randn(3, 4, dtype=torch.float64),))
    failures = composite_failures(program, result, seed)
    assert not failures, "\n".join(failures) + "\n" + program.text()


# (f, verdicts allowed by the rules' stated conditions, the rule expected today, the truth)
HAND_BUILT = [
    (lambda x: torch.tanh(torch.relu(x)), {K}, "B: pulled-back collision", False),  # B(tanh, relu)
    (lambda x: torch.relu(torch.tanh(x)), {GRAY, K}, None, False),  # B(relu, tanh): tanh is not onto
    (lambda x: torch.tanh(-x), {S}, "B: composition", True),  # B(tanh, neg)
    (lambda x: torch.tanh(torch.relu(-x)), {K}, "B: pulled-back collision", False),  # B(tanh, relu, neg)
    (lambda x: torch.sigmoid(torch.tanh(x + 1) * 2), {S}, "B: composition", True),
    (lambda x: x + x, {S}, None, True),  # W(add)
    (lambda x: x * torch.sigmoid(x), {K}, None, False),  # SiLU written out: a pointwise fold
    (lambda x: x + torch.tanh(x), {GRAY, S}, None, True),  # S(add, tanh): 1 + tanh' > 0, injective
    (lambda x: x - torch.tanh(2 * x), {GRAY, K}, None, False),  # a residual that folds
    (lambda x: torch.cat([x, torch.tanh(x)], -1), {S}, None, True),  # S(cat, tanh): a pairing
]


@pytest.mark.parametrize("case", HAND_BUILT, ids=[f"case{i}" for i in range(len(HAND_BUILT))])
@settings(max_examples=3, **SETTINGS)
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_hand_built_composites(case, seed):
    f, allowed, rule, injective = case
    program, result = once(("hand-built", id(f)), lambda: lower_typed(
        Fn(f).double(), (torch.randn(3, 4, dtype=torch.float64),)))
    v = result.defs["entry"]
    assert v.type in allowed, (v.type, v.rule, v.claim, program.text())
    assert v.type != (K if injective else S)  # never against the truth
    if rule is not None:
        assert v.rule == rule
    failures = composite_failures(program, result, seed)
    assert not failures, "\n".join(failures)
    if v.rule == "B: pulled-back collision":  # the rule's own argument, made concrete
        assert pulled_back_witness(program, result, program.entry.body,
                                   torch.Generator().manual_seed(seed)) is not None


def test_hand_built_truths():
    """The truths the table above relies on."""
    grid = torch.linspace(-4, 4, 2001, dtype=torch.float64)
    assert bool((torch.diff(grid + torch.tanh(grid)) > 0).all())  # x + tanh x increases
    assert not bool((torch.diff(grid - torch.tanh(2 * grid)) > 0).all())  # x - tanh 2x folds
    assert torch.relu(torch.tanh(torch.tensor(-1.0))) == torch.relu(torch.tanh(torch.tensor(-2.0)))


# ------------------------------------------------------------------------------------- known bugs

def test_bug_check_witness_on_tuple_valued_holes():
    program, result = lower_typed(Fn(lambda x: x.split(2, dim=-1)[0]), (torch.randn(3, 4),))
    site, v = site_of(result, "getitem")
    assert isinstance(site.inputs[0], TupleType) and v.type == K
    assert collision_failure(leaf_of(program, site).call, v, torch.Generator().manual_seed(0)) is None
    assert check_witness(leaf_of(program, site).call, v)


class _ArgmaxAndSum(nn.Module):
    def forward(self, x):
        return x.argmax(-1), x.sum(-1)


class _UsesPair(nn.Module):
    def __init__(self):
        super().__init__()
        self.pair = _ArgmaxAndSum()

    def forward(self, x):
        i, s = self.pair(x)
        return i + 1, s * 2


def test_bug_selection_evidence_with_discrete_inputs():
    x = torch.randn(3, 4)
    cases = [
        (Fn(lambda x: x.max(dim=-1).values), (x,), {}, "getitem"),
        (nn.Dropout(0.5), (x,), {"train": True}, "getitem"),
        (_UsesPair(), (x,), {}, "tuple"),
        (Fn(lambda m: m[torch.tensor([2, 0, 1])]), (x > 0,), {}, "aten.index.Tensor"),
    ]
    failures = []
    for module, args, kw, op in cases:
        program, result = lower_typed(module, args, **kw)
        for site in result.sites:
            v = result.verdicts[site.id]
            if site.prim.op != op or not site.inputs:
                continue
            assert v.rule == "selection" and _has_discrete(site.inputs)
            g = torch.Generator().manual_seed(0)
            try:
                why = (leaf_inverse_failure(program, site, v, g, 1.0) if v.type == S else
                       collision_failure(leaf_of(program, site).call, v, g))
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                why = repr(exc)
            if why:
                failures.append(f"{op} on {site.inputs} ({v.type}): {why}")
    assert not failures, "\n".join(failures)


def test_bug_joint_witness_with_discrete_operands():
    program, result = lower_typed(Fn(lambda x, y: x * (y > 0)),
                                  (torch.randint(0, 5, (3, 4)), torch.randn(3, 4)))
    site, v = site_of(result, "aten.mul.Tensor")
    assert v.rule == "joint" and _has_discrete(site.inputs)
    (a, b), _ = witness_pair(v, torch.Generator().manual_seed(0))
    assert [t.dtype for t in b] == [t.dtype for t in a]
    check_k(leaf_of(program, site).call, v, 0)


def test_bug_float32_absorption_of_a_mask_constant():
    mask = torch.tensor([0.0, torch.finfo(torch.float32).min])
    program, result = lower_typed(Fn(lambda x: x + mask), (torch.randn(3, 2),))
    _, v, leaf = only_leaf(program, result)
    x = torch.randn(3, 2)
    assert v.type != S or mismatch(tuple(v.inverse(leaf.call(x))), (x,), 1e-4) is None


def test_bug_no_witness_for_large_convolutions_and_pools():
    torch.manual_seed(0)
    failures = []
    for module, x in [(nn.Conv2d(3, 4, 3, stride=2), torch.randn(1, 3, 40, 40)),
                      (nn.AdaptiveAvgPool2d(1), torch.randn(1, 2, 50, 50))]:
        program, result = lower_typed(module, (x,))
        site, v, leaf = only_leaf(program, result)
        assert v.type == K
        try:
            why = "no witness" if v.witness is None else collision_failure(
                leaf.call, v, torch.Generator().manual_seed(0))
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            why = repr(exc)
        if why:
            failures.append(f"{site.prim.op}: {why}")
    assert not failures, failures


@pytest.mark.parametrize("p,train", [(0.0, True), (0.5, False)])
def test_bug_native_dropout_identity_is_not_onto(p, train):
    out = "(f32[3,5], bool[3,5])"
    program, result = typing_of(bwskc.parse(
        "bwsk 1 program D\n\nentry (x: f32[3,5]) -> (out: f32[3,5]) =\n"
        f"  B(getitem(_, 0) : f32[3,5], aten.native_dropout.default(_, {p}, {train}) : {out})\n"))
    x = torch.randn(3, 5)
    assert torch.equal(program(x), x)  # the identity
    assert result.defs["entry"].type != K


class _TanhCat(nn.Module):
    def forward(self, a, b):
        return torch.cat([torch.tanh(a), b], -1)


class _UsesTanhCat(nn.Module):
    def __init__(self):
        super().__init__()
        self.u = _TanhCat()

    def forward(self, x, y):
        return self.u(x, y) * 2


def test_bug_composite_inverse_with_a_binary_outer_component():
    x = torch.randn(3, 4, dtype=torch.float64)
    failures = []
    for module, name in [(_UsesTanhCat(), "u"),  # a definition: B(cat([_, _]), tanh)
                         (Fn(lambda x, y: (x + x, y)), "entry")]:  # the entry: B(tuple(_, _), W(add))
        program, result = lower_typed(module.double(), (x, x + 1))
        v = result.defs[name]
        assert v.type == S and v.rule == "B: composition"
        fn, types = def_of(program, name)
        inputs = random_inputs(types, torch.Generator().manual_seed(0))
        with torch.no_grad():
            why = mismatch(tuple(v.inverse(fn(*inputs))), inputs, 1e-6)
        if why:
            failures.append(f"{name}: {why}")
    assert not failures, failures


def test_bug_dtype_promotion_is_not_onto():
    program, result = lower_typed(Fn(lambda x: torch.floor(x + 0.5)), (torch.randint(-5, 5, (3, 4)),))
    xs = torch.randint(-1000, 1000, (3, 4))
    assert torch.equal(program(xs), xs.float())  # injective: it is x itself
    assert result.defs["entry"].type != K


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bug_check_witness_cannot_replay_dropout(seed):
    program, result = lower_typed(nn.Dropout(0.5), (_X,), train=True)
    site, v = site_of(result, "aten.native_dropout.default")
    assert collision_failure(leaf_of(program, site).call, v, torch.Generator().manual_seed(seed)) is None
    with torch.random.fork_rng():
        assert check_witness(leaf_of(program, site).call, v, seed)


@pytest.mark.parametrize("name,f,op", [
    ("logsumexp", lambda x: torch.logsumexp(x, -1), "aten.logsumexp.default"),
    ("norm", lambda x: x.norm(dim=-1), "aten.linalg_vector_norm.default"),
    ("all", lambda x: (x > 0).all(-1), "aten.all.dim"),
    ("any", lambda x: (x > 0).any(-1), "aten.any.dim"),
    ("var_mean", lambda x: torch.var_mean(x, -1), "aten.var_mean.dim"),
])
def test_bug_reduction_witness_moves_the_wrong_way(name, f, op):
    program, result = lower_typed(Fn(f), (_X,))
    site, v = site_of(result, op)
    for seed in range(40):
        check_k(leaf_of(program, site).call, v, seed)


def test_bug_frac_is_not_a_step_function():
    program, result = lower_typed(Fn(torch.frac), (_X,))
    _, v, leaf = only_leaf(program, result)
    check_k(leaf.call, v, 0)
    assert v.dof_lost == 0


def test_bug_float_to_int_witness_with_negative_values():
    program, result = lower_typed(Fn(lambda x: x.long()), (_X,))
    _, v, leaf = only_leaf(program, result)
    for seed in range(4):
        check_k(leaf.call, v, seed)


@pytest.mark.parametrize("op,args,out", [
    ("aten._native_batch_norm_legit_functional.default", "None, None, bn.rm, bn.rv, True, 0.1, 1e-05",
     "(f32[2,4,3], f32[4], f32[4], f32[4], f32[4])"),
    ("aten._native_batch_norm_legit.no_stats", "None, None, True, 0.1, 1e-05",
     "(f32[2,4,3], f32[4], f32[4])"),
    ("aten.native_group_norm.default", "None, None, 2, 4, 3, 2, 1e-05", "(f32[2,4,3], f32[2,2], f32[2,2])"),
])
def test_bug_normalisations_returning_their_statistics(op, args, out):
    params = "buffer bn.rm : f32[4]\nbuffer bn.rv : f32[4]\n\n" if "bn.rm" in args else ""
    program = bwskc.parse(f"bwsk 1 program D\n\n{params}entry (x: f32[2,4,3]) -> (out: {out}) =\n"
                          f"  {op}(_, {args}) : {out}\n")
    if params:
        program = program.with_weights({"bn.rm": torch.zeros(4), "bn.rv": torch.ones(4)})
    program, result = typing_of(program)
    _, v, leaf = only_leaf(program, result)
    if v.type == K:
        check_k(leaf.call, v, 0)
    x = torch.randn(2, 4, 3)
    assert v.type != K and differ(leaf.call(x), leaf.call(x + 1.5))


def test_bug_dropout_witness_when_nothing_is_dropped():
    program, result = lower_typed(nn.Dropout(0.1), (_X,), train=True)
    site, v = site_of(result, "aten.native_dropout.default")
    for seed in range(30):
        check_k(leaf_of(program, site).call, v, seed)
