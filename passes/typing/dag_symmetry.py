"""DAG family: symmetries. An abstract interpretation of how each node transforms when the input is shifted
(x + c), positively scaled (lam x) or negated (-x); an output that provably does not change is K.
"""
from __future__ import annotations

from typing import Any

from bwskc.evidence import Verdict, erasing
from bwskc.ir import TensorType
from bwskc.passes.typing.dag import MOVE, Node, Var, alpha_of, literal_scalar


def _vtype(v, dag):
    if isinstance(v, Var):
        return dag.x.type
    if isinstance(v, Node):
        return v.prim.type
    return None


def _no_bias(n) -> bool:
    bias = n.kwargs.get("bias", n.args[2] if len(n.args) > 2 else None)
    return bias is None


_SOFTMAX = {"aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax"}
_COMPARE = {"aten.gt", "aten.lt", "aten.ge", "aten.le", "aten.eq", "aten.ne"}
_ODD = {"aten.tanh", "aten.sinh", "aten.asinh", "aten.atan", "aten.erf", "aten.sign", "aten.sgn",
        "aten.sin", "aten.tan", "aten.atanh", "aten.asin", "aten.erfinv", "aten.neg"}
_EVEN = {"aten.abs", "aten.cos", "aten.cosh", "aten.square", "aten.linalg_vector_norm", "aten.norm"}


class _Shift:
    """x -> x + c (c a real scalar): a node's tag k says it becomes v + k c (None: no such law)."""
    name, input, const = "shift", 1.0, 0.0

    @staticmethod
    def invariant(t):
        return t == 0

    @staticmethod
    def rule(n, tag, dag):
        p, a = n.packet, n.args
        if p in MOVE or p in ("aten.amax", "aten.amin", "aten.maximum", "aten.minimum"):
            ts = {tag(o) for o in n.operands}
            return ts.pop() if len(ts) == 1 else None
        if p in ("aten.add", "aten.sub", "aten.rsub"):
            alpha = alpha_of(n)
            if alpha is None:
                return None
            u, w = tag(a[0]), tag(a[1])
            return u + alpha * w if p == "aten.add" else u - alpha * w if p == "aten.sub" else w - alpha * u
        if p == "aten.mul":
            s0, s1 = literal_scalar(a[0]), literal_scalar(a[1])
            if s1 is not None or s0 is not None:
                return tag(a[0]) * s1 if s1 is not None else tag(a[1]) * s0
            return None
        if p == "aten.div" and "rounding_mode" not in n.kwargs and len(a) == 2:
            s = literal_scalar(a[1])
            return tag(a[0]) / s if s else None
        if p == "aten.mean":
            return tag(a[0])
        if p == "aten.sum":
            ti, to = _vtype(a[0], dag), n.prim.type
            if isinstance(ti, TensorType) and isinstance(to, TensorType) and to.numel:
                return tag(a[0]) * (ti.numel // to.numel)
            return None
        if p in _SOFTMAX or p in ("aten.layer_norm", "aten.var", "aten.std"):
            return 0.0
        if p == "aten.where":
            return tag(a[1]) if tag(a[0]) == 0 and tag(a[1]) == tag(a[2]) else None
        if p in _COMPARE and n.op.endswith(".Tensor"):
            return 0.0 if tag(a[0]) == tag(a[1]) else None
        return None

    @staticmethod
    def witness(x_type):
        def witness(g):
            from bwskc.leaf import random_value
            a = random_value(x_type, g)
            return (a,), ((a.double() + 1.5).to(a.dtype),)
        return witness, "x and x + 1.5", "shift invariant: f(x + c) = f(x) for every real c"


class _Scale:
    """x -> lam x (lam > 0): a node's tag (d, local) says it becomes lam^d v (local: only where every
    clamp is inactive, an open region)."""
    name, input, const = "scale", (1.0, False), (0.0, False)

    @staticmethod
    def invariant(t):
        return t[0] == 0

    @staticmethod
    def rule(n, tag, dag):
        p, a = n.packet, n.args
        ins = [tag(o) for o in n.operands]
        local = any(t[1] for t in ins)
        deg = [t[0] for t in ins]

        def same(vals):
            vals = [tag(v) for v in vals if literal_scalar(v) != 0.0]
            ds = {t[0] for t in vals}
            return (ds.pop(), any(t[1] for t in vals)) if len(ds) == 1 else None
        if p in MOVE or p in ("aten.amax", "aten.amin", "aten.maximum", "aten.minimum", "aten.mean",
                               "aten.sum", "aten.abs", "aten.relu", "aten.leaky_relu", "aten.neg",
                               "aten.linalg_vector_norm", "aten.norm"):
            return (deg[0], local) if len(set(deg)) == 1 else None
        if p in ("aten.add", "aten.sub", "aten.rsub"):
            return same(a[:2])
        if p in ("aten.mul", "aten.matmul", "aten.mm", "aten.bmm"):
            return (tag(a[0])[0] + tag(a[1])[0], local)
        if p == "aten.div" and "rounding_mode" not in n.kwargs:
            return (tag(a[0])[0] - tag(a[1])[0], local)
        if p == "aten.linear" and _no_bias(n):
            return (deg[0], local)
        powers = {"aten.sqrt": 0.5, "aten.rsqrt": -0.5, "aten.reciprocal": -1.0}
        if p in powers:
            return (deg[0] * powers[p], local)
        if p == "aten.pow" and n.op.endswith("Tensor_Scalar") and literal_scalar(a[1]) is not None:
            return (deg[0] * literal_scalar(a[1]), local)
        if p in ("aten.clamp_min", "aten.clamp"):
            return (deg[0], True)
        if p == "aten.where":
            return same(a[1:3]) if tag(a[0])[0] == 0 else None
        if p in _COMPARE:
            if n.op.endswith(".Scalar"):
                return (0.0, local) if literal_scalar(a[1]) == 0.0 else None
            return (0.0, local) if tag(a[0])[0] == tag(a[1])[0] else None
        return None

    @staticmethod
    def witness(x_type):
        def witness(g):
            from bwskc.leaf import random_value
            a = random_value(x_type, g)
            return (a,), ((a.double() * 2).to(a.dtype),)
        return witness, "x and 2x", "scale invariant: f(lam x) = f(x) for every lam > 0"


class _Sign:
    """x -> -x: a node's tag s in {1, -1} says it becomes s v."""
    name, input, const = "sign", -1.0, 1.0

    @staticmethod
    def invariant(t):
        return t == 1

    @staticmethod
    def rule(n, tag, dag):
        p, a = n.packet, n.args
        ins = [tag(o) for o in n.operands]
        if p in MOVE or p in ("aten.mean", "aten.sum") or p in _ODD:
            return ins[0] if len(set(ins)) == 1 else None
        if p in _EVEN:
            return 1.0
        if p in ("aten.add", "aten.sub", "aten.rsub"):
            ts = {tag(v) for v in a[:2] if literal_scalar(v) != 0.0}
            return ts.pop() if len(ts) == 1 else None
        if p in ("aten.mul", "aten.div", "aten.matmul", "aten.mm", "aten.bmm") and \
                "rounding_mode" not in n.kwargs:
            return tag(a[0]) * tag(a[1])
        if p == "aten.linear" and _no_bias(n):
            return ins[0]
        if p == "aten.pow" and n.op.endswith("Tensor_Scalar"):
            s = literal_scalar(a[1])
            return ins[0] ** int(s) if s is not None and s == int(s) else None
        if p == "aten.where":
            return tag(a[1]) if tag(a[0]) == 1 and tag(a[1]) == tag(a[2]) else None
        return None

    @staticmethod
    def witness(x_type):
        def witness(g):
            from bwskc.leaf import random_value
            a = random_value(x_type, g)
            return (a,), (-a,)
        return witness, "x and -x", "even: f(-x) = f(x)"


def _propagate(dag, fam):
    """Each active node's tag under the family's transformation of x (None: no law derived)."""
    tags: dict[int, Any] = {}

    def tag(v):
        if isinstance(v, Var):
            return fam.input
        if isinstance(v, Node) and v.active:
            return tags[id(v)]
        return fam.const
    for n in dag.nodes:
        ins = [tag(o) for o in n.operands]
        if any(t is None for t in ins):
            tags[id(n)] = None
        elif all(fam.invariant(t) for t in ins):  # a function of unchanged values is unchanged
            tags[id(n)] = fam.const if fam.name != "scale" else (0.0, any(t[1] for t in ins))
        else:
            try:
                t = fam.rule(n, tag, dag)
            except (TypeError, IndexError, KeyError):  # arguments the rule does not read
                t = None
            tags[id(n)] = t
    return tags


def decide_symmetry(dag, result) -> Verdict | None:
    """K for a term invariant under x + c, lam x (lam > 0) or -x, else None."""
    if not dag.x.type.torch_dtype.is_floating_point or not dag.x.type.numel:
        return None
    for fam in (_Shift, _Scale, _Sign):
        tags = _propagate(dag, fam)
        t = tags.get(id(dag.root))
        if t is None or not fam.invariant(t):
            continue
        local = fam.name == "scale" and t[1]
        witness, text, law = fam.witness(dag.x.type)
        why = {"shift": "every node is shift-equivariant (moves, sums and scalings of x + c), and the "
                        "output's coefficients of c cancel (or a shift-invariant op absorbs them)",
               "scale": "every node is positively homogeneous (degrees add under products, halve under "
                        "sqrt, ...) and the output has degree 0",
               "sign": "every node is odd or even in x (odd times odd is even) and the output is even"}
        claim = f"{law}: {why[fam.name]}" + (" (on the open region where every clamp is inactive)"
                                             if local else "")
        v = erasing(f"composite {fam.name} invariance", claim, witness, text,
                    None, "at least 1 (a one-parameter symmetry)" if fam.name != "sign" else "")
        v.extra["domain"] = "reals"
        return v
    return None
