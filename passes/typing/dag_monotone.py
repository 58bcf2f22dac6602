"""DAG family: piecewise strictly monotone scalar maps. Each node of a pointwise term is tagged increasing
or decreasing; ``where(x > t, g1, g2)`` of one direction is S when its pieces meet or jump the right way
(inverse by bisection), K when they overlap.
"""
from __future__ import annotations

from typing import Any

import torch

from bwskc.evidence import S, Verdict, erasing
from bwskc.ir import TensorType
from bwskc.passes.typing.dag import Bound, Node, Var, alpha_of, literal_scalar, term_call, values_in


_INCREASING = {"aten.tanh", "aten.sigmoid", "aten.exp", "aten.expm1", "aten.atan", "aten.asinh", "aten.sinh",
               "aten.erf", "aten.clone", "aten.alias", "aten.contiguous"}


def _pointwise_dag(dag) -> bool:
    """Every active node maps each element of x to the same position (its output has x's shape) and
    takes no tensor but x's images: the DAG is one scalar map applied to every element."""
    shape = dag.x.type.shape
    for n in dag.nodes:
        t = n.prim.type
        if not isinstance(t, TensorType) or t.shape != shape:
            return False
        for v in values_in((n.args, list(n.kwargs.values()))):
            if isinstance(v, Node) and not v.active:
                return False
        if any(isinstance(v, Bound) for v in _flat_args(n)):
            return False
    return True


def _flat_args(n):
    stack = list(n.args) + list(n.kwargs.values())
    while stack:
        v = stack.pop()
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        else:
            yield v


def _eval_dag(dag, node, x):
    """The node's value with the input bound to ``x`` (ops run as the interpreter runs them)."""
    from bwskc.runtime.denote import resolve_op
    memo = {}

    def val(v):
        if isinstance(v, Var):
            return x
        if isinstance(v, Node):
            if id(v) not in memo:
                memo[id(v)] = resolve_op(v.op)(*[val(i) for i in v.args],
                                               **{k: val(i) for k, i in v.kwargs.items()})
            return memo[id(v)]
        if isinstance(v, (list, tuple)):
            return [val(i) for i in v]
        return v
    with torch.no_grad():
        return val(node)


def _exact_at(node, t):
    """The node's value at x = t in exact rational arithmetic when it is affine in x with literal
    coefficients, else None."""
    from fractions import Fraction

    def val(v):
        if isinstance(v, Var):
            return Fraction(t)
        if isinstance(v, Node):
            p, a = v.packet, v.args
            if p in ("aten.clone", "aten.alias", "aten.contiguous"):
                return val(a[0])
            if p == "aten.neg":
                return -val(a[0])
            if p in ("aten.add", "aten.sub", "aten.rsub"):
                alpha = alpha_of(v)
                u, w = val(a[0]), val(a[1])
                if alpha is None or u is None or w is None:
                    return None
                al = Fraction(alpha)
                return u + al * w if p == "aten.add" else u - al * w if p == "aten.sub" else w - al * u
            if p in ("aten.mul", "aten.div") and "rounding_mode" not in v.kwargs and len(a) == 2:
                u, w = val(a[0]), val(a[1])
                if u is None or w is None:
                    return None
                return u * w if p == "aten.mul" else (u / w if w != 0 else None)
            return None
        s = literal_scalar(v)
        return Fraction(s) if s is not None else None
    return val(node)


_CMP_SCALAR = {"aten.gt.Scalar": (True, False), "aten.ge.Scalar": (True, True),
               "aten.lt.Scalar": (False, False), "aten.le.Scalar": (False, True)}  # (upper, closed)


def _monotone_tags(dag):
    """Each node's (direction, continuous): +1 strictly increasing, -1 strictly decreasing on the
    whole real line; None when no law is derived. Also the where-nodes' threshold facts."""
    tags: dict[int, Any] = {}
    facts = []

    def tag(v):
        if isinstance(v, Var):
            return (1, True)
        if isinstance(v, Node):
            return tags[id(v)]
        return (0, True) if literal_scalar(v) is not None else None
    for n in dag.nodes:
        p, a = n.packet, n.args
        t = None
        try:
            if p in _INCREASING:
                t = tag(a[0])
            elif p == "aten.neg":
                u = tag(a[0])
                t = (-u[0], u[1]) if u else None
            elif p in ("aten.add", "aten.sub", "aten.rsub"):
                alpha, u, w = alpha_of(n), tag(a[0]), tag(a[1])
                if alpha is not None and u and w:
                    if p == "aten.rsub":
                        u, w = w, (-u[0], u[1])
                    elif p == "aten.sub":
                        w = (-w[0], w[1])
                    dw = w[0] * (1 if alpha > 0 else -1 if alpha < 0 else 0)
                    ds = {d for d in (u[0], dw) if d != 0}
                    if len(ds) == 1:
                        t = (ds.pop(), u[1] and w[1])
            elif p in ("aten.mul", "aten.div") and len(a) == 2 and "rounding_mode" not in n.kwargs:
                s0, s1 = literal_scalar(a[0]), literal_scalar(a[1])
                s = u = None
                if s1 is not None and s0 is None:
                    s, u = (s1 if p == "aten.mul" else (1 / s1 if s1 else None)), tag(a[0])
                elif s0 is not None and s1 is None and p == "aten.mul":
                    s, u = s0, tag(a[1])
                if s and u:
                    t = (u[0] * (1 if s > 0 else -1), u[1])
            elif p == "aten.leaky_relu":
                slope = literal_scalar(a[1]) if len(a) > 1 else 0.01
                t = tag(a[0]) if slope is not None and slope > 0 else None
            elif p == "aten.pow" and n.op.endswith("Tensor_Scalar"):
                s = literal_scalar(a[1])
                t = tag(a[0]) if s is not None and s == int(s) and s > 0 and int(s) % 2 == 1 else None
            elif p == "aten.where" and n.op == "aten.where.self":
                t = _where_tag(n, tag, dag, facts)
        except (TypeError, IndexError, KeyError):
            t = None
        tags[id(n)] = t if t and t[0] != 0 else None
    return tags, facts


def _where_tag(n, tag, dag, facts):
    cond, hi, lo = n.args[0], n.args[1], n.args[2]
    if not isinstance(cond, Node) or cond.op not in _CMP_SCALAR or cond.args[0] is not dag.x:
        return None
    t = literal_scalar(cond.args[1])
    upper, _ = _CMP_SCALAR[cond.op]
    if t is None:
        return None
    if not upper:
        hi, lo = lo, hi  # hi: the piece on the upper region
    th, tl = tag(hi), tag(lo)
    if not th or not tl or th[0] == 0 or th[0] != tl[0] or not (th[1] and tl[1]):
        return None
    d = th[0]
    eh, el = _exact_at(hi, t), _exact_at(lo, t)
    if eh is not None and el is not None:
        gap, exact = d * (eh - el), True
        gh, gl = float(eh), float(el)
    else:
        x = torch.full(dag.x.type.shape, t, dtype=torch.float64)
        gh = float(_eval_dag(dag, hi, x).reshape(-1)[0]) if not isinstance(hi, (int, float)) else float(hi)
        gl = float(_eval_dag(dag, lo, x).reshape(-1)[0]) if not isinstance(lo, (int, float)) else float(lo)
        gap, exact = d * (gh - gl), False
        if abs(gap) <= 1e-9 * (1 + abs(gh) + abs(gl)):  # inside float64's resolution: undecided
            facts.append(("undecided", t, gh, gl, d))
            return None
    if gap < 0:
        facts.append(("overlap", t, gh, gl, d, hi, lo, upper))
        return None
    facts.append(("meets" if gap == 0 else "jumps", t, gh, gl, d, exact))
    return (d, gap == 0)


def _bisect(phi, y, d, lo=None, hi=None, steps=200):
    """x with phi(x) = y elementwise, phi strictly monotone (direction d), inside [lo, hi] if given."""
    y = y.double()
    a = torch.full_like(y, -1.0) if lo is None else torch.full_like(y, lo)
    b = torch.full_like(y, 1.0) if hi is None else torch.full_like(y, hi)
    for _ in range(64):  # widen the bracket
        if lo is None:
            a = torch.where(d * phi(a) > d * y, a * 2 - 1, a)
        if hi is None:
            b = torch.where(d * phi(b) < d * y, b * 2 + 1, b)
    for _ in range(steps):
        m = (a + b) / 2
        below = d * phi(m) < d * y
        a, b = torch.where(below, m, a), torch.where(below, b, m)
    return (a + b) / 2


def decide_monotone(dag, result) -> Verdict | None:
    """S for a piecewise strictly monotone scalar map, K for overlapping pieces, else None."""
    if not dag.x.type.torch_dtype.is_floating_point or not _pointwise_dag(dag):
        return None
    if not any(n.packet == "aten.where" for n in dag.nodes) and len(dag.nodes) < 2:
        return None
    tags, facts = _monotone_tags(dag)
    t = tags.get(id(dag.root))
    dtype = dag.x.type.torch_dtype
    if t is not None:
        d = t[0]
        fn64 = term_call(dag.term, result, f64=True)

        def inverse(y, d=d):
            return (_bisect(fn64, y, d).to(dtype),)
        pieces = "; ".join(f"at the threshold {f[1]:g} the pieces {f[0][:-1]} ({f[3]:.6g} below, {f[2]:.6g} "
                           f"above{', exactly' if f[5] else ''})" for f in facts if f[0] in ("meets", "jumps"))
        claim = ("the composite applies one scalar map to every element, built from strictly monotone "
                 f"pieces of one direction ({'increasing' if d > 0 else 'decreasing'})" +
                 (f"; {pieces}, so the pieces' images do not overlap" if pieces else "") +
                 ": a strictly monotone map is injective")
        return Verdict(S, "piecewise strictly monotone", claim, 0, inverse=inverse,
                       extra={"inverse_text": "elementwise bisection of the strictly monotone scalar map "
                              "(float64)", "domain": "reals"})
    overlap = [f for f in facts if f[0] == "overlap"]
    if overlap and tags.get(id(dag.root)) is None and _root_is_where(dag, overlap[0]):
        _, th, gh, gl, d, hi, lo, upper = overlap[0]
        return _overlap_witness(dag, th, gh, gl, d, hi, lo)
    return None


def _root_is_where(dag, fact) -> bool:
    root = dag.root
    return isinstance(root, Node) and root.op == "aten.where.self" and \
        {id(fact[5]), id(fact[6])} == {id(root.args[1]), id(root.args[2])}


def _overlap_witness(dag, t, gh, gl, d, hi, lo) -> Verdict | None:
    """Pieces of one direction whose images overlap near the threshold: a value y between the upper
    piece's start and the lower piece's end is taken once on each side."""
    y = (gh + gl) / 2
    shape, dtype = dag.x.type.shape, dag.x.type.torch_dtype
    phi_hi = lambda v: _eval_dag(dag, hi, v)  # noqa: E731
    phi_lo = lambda v: _eval_dag(dag, lo, v)  # noqa: E731
    target = torch.full(shape, y, dtype=torch.float64)
    xa = _bisect(phi_hi, target, d, lo=t, hi=None)
    xb = _bisect(phi_lo, target, d, lo=None, hi=t)
    a, b = float(xa.reshape(-1)[0]), float(xb.reshape(-1)[0])
    if not (a > t > b):
        return None

    def witness(g):
        return (torch.full(shape, a, dtype=dtype),), (torch.full(shape, b, dtype=dtype),)
    v = erasing("piecewise overlap", f"the composite applies one scalar map built from two pieces of one "
                f"direction split at {t:g}, and the lower piece ends beyond the upper one's start "
                f"({gl:.6g} against {gh:.6g}): the value {y:.6g} is taken on both sides", witness,
                f"{a:.6g} and {b:.6g} (every element)", 0)
    v.extra["domain"] = "reals"
    return v
