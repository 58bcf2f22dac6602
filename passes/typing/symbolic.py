"""Decided composites: a unary term the combinator rules leave GRAY is run through the interpreter's own
denotation on symbolic values into an expression DAG (``dag``), and the families ``dag_movement``,
``dag_symmetry``, ``dag_monotone``, ``dag_linear`` decide it, in that order. Each decided verdict's witness
or inverse is evaluated on the term itself before it is emitted, and turns GRAY with the reason when it
fails. Also the pointwise fold of a scalar map (docs/typing.md, "Composites").
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bwskc.evidence import K, S, Verdict, erasing
from bwskc.ir import Comb, Const, Prim, Ref, TensorType, Term
from bwskc.passes.typing.dag import Bound, Dag, Node, Var, term_call, values_in
from bwskc.passes.typing.dag_linear import decide_linear
from bwskc.passes.typing.dag_monotone import decide_monotone
from bwskc.passes.typing.dag_movement import decide_movement
from bwskc.passes.typing.dag_symmetry import decide_symmetry
from bwskc.passes.typing.elementwise import fold_point

if TYPE_CHECKING:
    from bwskc.passes.typing.typing_pass import TypingResult


_POINTWISE = {
    "aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor", "aten.pow.Tensor_Scalar",
    "aten.tanh.default", "aten.sigmoid.default", "aten.exp.default", "aten.neg.default",
    "aten.gelu.default", "aten.silu.default", "aten.relu.default", "aten.erf.default",
    "aten.softplus.default", "aten.elu.default", "aten.clone.default", "aten.alias.default",
    "aten.rsub.Scalar", "aten.log1p.default", "aten.expm1.default", "aten.abs.default",
}


def _pointwise_unary(term: Term) -> TensorType | None:
    """The type x of a term that is a unary map applying one scalar function to every element: only
    pointwise leaves, no bound tensors, every value of x's shape and dtype."""
    from bwskc.ir import TensorRef, ConstRef, iter_args, subterms
    shape = None
    for t in subterms(term):
        if isinstance(t, (Ref, Const)):
            return None
        if isinstance(t, Comb) and t.kind == "K":
            return None
        if isinstance(t, Prim):
            if t.op not in _POINTWISE or not isinstance(t.type, TensorType) or not t.type.dtype.startswith(
                    ("f", "bf")):
                return None
            if any(isinstance(a, (TensorRef, ConstRef)) for a in iter_args(t.args + tuple(
                    v for _, v in t.kwargs))):
                return None
            if shape is None:
                shape = t.type
            elif t.type != shape:
                return None
    return shape


def pointwise_fold(term: Term, result: TypingResult) -> Verdict | None:
    """A pointwise composite is a scalar map phi applied elementwise. A verified collision of phi (an
    interior minimum, then bisection) proves K; finding none proves nothing (None)."""
    x_type = _pointwise_unary(term)
    if x_type is None or result._program is None:
        return None
    from bwskc.runtime.denote import Denoter
    from bwskc.runtime.interp import EagerBackend
    fn = Denoter(result._program, EagerBackend({})).term(term)

    def phi(t):
        with torch.no_grad():
            return fn(t)
    try:
        grid = torch.linspace(-8, 8, 16001, dtype=torch.float64)
        values = phi(grid)
        i = int(torch.argmin(values))
        if i in (0, len(grid) - 1) or not bool(torch.isfinite(values).all()):
            return None
        a, b = fold_point(phi)
        fa, fb = phi(torch.tensor([a, b], dtype=torch.float64))
    except Exception:  # not evaluable on a scalar grid: no claim
        return None
    if abs(a - b) < 1e-3 or not torch.isclose(fa, fb, rtol=1e-9, atol=1e-12):
        return None
    dt = x_type.torch_dtype

    def witness(g):
        return (torch.full(x_type.shape, a, dtype=dt),), (torch.full(x_type.shape, b, dtype=dt),)
    v = erasing("pointwise fold", f"the composite applies one scalar map to every element, and that "
                f"map has an interior minimum: phi({a:.6g}) = phi({b:.6g})", witness,
                f"{a:.6g} and {b:.6g} (every element)", 0, "a fold")
    v.extra["domain"] = "reals"  # bisection to 1e-9 in float64; checked on the term in float64 below
    x = Var()
    x.type = x_type
    return _checked(Dag(term, None, x, []), v, result)  # evaluated on the term before it is emitted


_NODE_LIMIT = 20000


class _TooLarge(Exception):
    pass


class _SymBackend:
    def __init__(self):
        self.count = 0

    def prim(self, prim, args, kwargs):
        self.count += 1
        if self.count > _NODE_LIMIT:
            raise _TooLarge()
        return Node(prim, args, kwargs)

    def tensor(self, name):
        return Bound(name)


def _sym_denoter(program):
    from bwskc.runtime.denote import Denoter

    class _SymDenoter(Denoter):
        def call_prim(self, prim, operands):
            node = super().call_prim(prim, operands)
            node.operands = list(operands)
            node.active = any(isinstance(o, Var) or (isinstance(o, Node) and o.active) for o in operands)
            return node
    return _SymDenoter(program, _SymBackend())


def _site_types(result) -> dict:
    if result._site_types is None:
        by_id, by_value = {}, {}
        for s in result.sites:
            by_id.setdefault(id(s.prim), s.inputs)
            by_value.setdefault(s.prim, s.inputs)
        result._site_types = (by_id, by_value)
    return result._site_types


def _dag(term, result) -> Dag | None:
    """The DAG of a unary term whose input type is known, or None (several inputs, a random op, too
    large, no type)."""
    from bwskc.runtime.random_ops import draws
    program = result._program
    if program is None:
        return None
    try:
        f = _sym_denoter(program).term(term)
        x = Var()
        root = f(x)
    except Exception:  # a term the symbolic run cannot follow: no decision
        return None
    if callable(root) or not isinstance(root, (Node, Var)):
        return None
    order, seen = [], set()
    stack = [(root, False)]
    while stack:  # post-order over active nodes
        n, done = stack.pop()
        if not isinstance(n, Node) or not n.active:
            continue
        if done:
            order.append(n)
            continue
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.append((n, True))
        for v in values_in((n.args, list(n.kwargs.values()))):
            if isinstance(v, Node) and v.active and id(v) not in seen:
                stack.append((v, False))
    by_id, by_value = _site_types(result)
    for n in order:
        if draws(n.op, (), {}):
            return None
        if x.type is None:
            for j, o in enumerate(n.operands):
                if o is x:
                    types = by_id.get(id(n.prim)) or by_value.get(n.prim)
                    if types is not None and j < len(types):
                        x.type = types[j]
                    break
    if not isinstance(x.type, TensorType):
        return None
    return Dag(term, root, x, order)


def _checked(dag: Dag, verdict: Verdict, result, seed: int = 0) -> Verdict:
    """The verdict if its evidence holds on the term itself (measured values in ``extra["checked"]``),
    else GRAY saying why (``evidence.rejected``)."""
    from bwskc.evidence import rejected
    try:
        if verdict.type == K and verdict.witness is not None:
            return _check_collision(dag, verdict, result, seed)
        if verdict.type == S and verdict.inverse is not None:
            return _check_round_trip(dag, verdict, result, seed)
    except Exception as exc:  # evidence that cannot be evaluated is no evidence
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return rejected(verdict, f"its evidence could not be evaluated on the term: {text}")
    return verdict


def _check_collision(dag, verdict, result, seed) -> Verdict:
    from types import SimpleNamespace

    from bwskc.evidence_codec import max_abs_diff, number
    from bwskc.evidence import encode_pair, rejected, to64, inputs_differ, outputs_equal
    a, b = verdict.witness(torch.Generator().manual_seed(seed))
    if not inputs_differ(a, b):
        return rejected(verdict, "the witness's two inputs are equal")
    fn = term_call(dag.term, result)
    ya, yb = fn(*a), fn(*b)
    own = outputs_equal(ya, yb)
    diff = max_abs_diff(ya, yb)
    try:
        fn64 = term_call(dag.term, result, f64=True)
        za, zb = fn64(*to64(a)), fn64(*to64(b))
        f64 = {"max_abs_diff": number(max_abs_diff(za, zb)), "collides": outputs_equal(za, zb)}
    except Exception as exc:  # a term that fixes its dtype
        f64 = {"not_run": f"the term does not run in float64: {type(exc).__name__}"}
    domain = verdict.extra.get("domain", "float")
    if not own and not (domain == "reals" and f64.get("collides")):
        return rejected(verdict, f"witness did not collide on the term: max |f(a)-f(b)| = {diff:.3g}")
    checked = {"seed": seed, "replay_seed": None, "dtype": dag.x.type.dtype, "collides": own,
               "max_abs_diff": number(diff), "tolerance": {"rtol": 1e-5, "atol": 1e-6}, "float64": f64,
               "domain": domain, "domain_source": "rule", "evaluated_on": "the composite term"}
    if not own:
        checked["collides_in"] = "float64"
    checked.update(encode_pair(SimpleNamespace(inputs=(dag.x.type,)), a, b, seed))
    verdict.extra["checked"] = checked
    return verdict


def _check_round_trip(dag, verdict, result, seed) -> Verdict:
    from bwskc.evidence_codec import number
    from bwskc.evidence import rejected, relative_error, to64, tolerance
    from bwskc.leaf import random_value
    x = (random_value(dag.x.type, torch.Generator().manual_seed(seed)),)
    name, tol = tolerance(x)
    checks = {}
    for label, call, xs, limit in ((name, term_call(dag.term, result), x, tol),
                                   ("f64", None, to64(x), 1e-6)):
        if label == "f64":
            if checks[name].get("passed") or not x[0].is_floating_point():
                break
            call = term_call(dag.term, result, f64=True)
        try:
            err, rel = relative_error(tuple(verdict.inverse(call(*xs))), xs)
        except Exception as exc:  # an inverse that fails here is no evidence from this run
            checks[label] = {"error": type(exc).__name__}
            continue
        checks[label] = {"max_abs_error": number(err), "relative_error": number(rel), "tolerance": limit,
                         "passed": rel <= limit}
    ok = [k for k, c in checks.items() if c.get("passed")]
    if not ok:
        return rejected(verdict, f"the inverse did not round-trip on the term: {checks}")
    verdict.extra["checked"] = {"round_trip": {"seed": seed, "sample": "bwskc's random construction",
                                               "checks": checks, "passed": True, "dtype": ok[0],
                                               "relative_error": checks[ok[0]]["relative_error"],
                                               "max_abs_error": checks[ok[0]]["max_abs_error"],
                                               "evaluated_on": "the composite term"}}
    return verdict


def decide(term, result) -> Verdict | None:
    """A decided verdict (evaluated) for a composite the combinator rules leave GRAY, a GRAY saying why
    a family's evidence failed, or None (no family applies)."""
    cache = result._decided
    hit = cache.get(id(term))
    if hit is not None and hit[0] is term:
        return hit[1]
    try:
        dag = _dag(term, result)
    except _TooLarge:
        dag = None
    v = None
    if dag is not None and isinstance(dag.root, Node):
        for family in (decide_movement, decide_symmetry, decide_monotone, decide_linear):
            try:
                v = family(dag, result)
            except Exception:  # a family that cannot judge this term decides nothing
                v = None
            if v is not None:
                v = _checked(dag, v, result)
                break
    cache[id(term)] = (term, v)
    return v
