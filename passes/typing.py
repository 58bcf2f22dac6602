"""The ``typing`` pass: every leaf site gets S, K or GRAY with evidence; definitions get composite verdicts.

Leaf verdicts come from ``bwskc.leaf_rules`` (a rule per op, judged on its activation inputs with its
bound parameters). Composite verdicts follow sound combinator rules, so a composite is S only when that is
proven and K only when a collision lifts to it:

* ``B(f1, ..., fn)``: injective maps compose (S if every fi is S). If the innermost non-S component fj is
  K and every map inside it (f(j+1)..fn) is an injective map onto its type, fj's collision pulls back
  through their inverses: K. Otherwise GRAY.
* ``S f g x = f x (g x)``: ``x -> (x, g x)`` is injective for any g, so S when f is jointly injective
  (a pairing such as ``tuple`` or ``cat``). ``S(add, F)`` (a residual) is GRAY: injective when ``x + F(x)``
  is (e.g. Lip(F) < 1), which the reversible rewrite makes unconditional. The RMSNorm idiom
  ``S(mul, B(rsqrt, add eps, mean, pow 2))`` is S with eps > 0 and K with eps = 0 (its own rule).
* ``W f x = f x x``: S when f is jointly injective; ``W(mul)`` is ``x * x`` (K: x and -x), ``W(add)`` is
  ``2x`` (S).
* ``K c``: ignores its argument (K). ``I``: S.
* A term whose leaves are all jointly injective and which uses no ``K`` is injective whatever its arity
  (each combinator passes an injective image of the inputs on), so it is S.

Where these leave a unary composite GRAY, ``_decide`` reads it as an expression DAG and tries the
families of docs/typing.md, "Composites": data movement, shift / scale / sign invariance, piecewise
strictly monotone scalar maps, linear maps. Their witnesses and inverses are evaluated on the term
itself before they are emitted (``_checked``); evidence that fails makes the verdict GRAY.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from bwskc.passes.manager import Pass

from bwskc._deep import run_deep
from bwskc.evidence import GRAY, K, S, Verdict, erasing, evaluate, gray
from bwskc.ir import REV_KINDS, Comb, Const, Prim, Program, Ref, TensorType, Term, prims
from bwskc.leaf import Leaf, Values
from bwskc.leaf_rules import rms_verdict, type_leaf
from bwskc.sites import Site, sites


@dataclass
class TypingResult:
    program_name: str
    verdicts: dict[int, Verdict]  # site id -> verdict
    sites: list[Site]
    defs: dict[str, Verdict] = field(default_factory=dict)  # definition name (and "entry") -> composite
    _by_id: dict[int, Verdict] = field(default_factory=dict, repr=False)
    _by_value: dict[Prim, Verdict] = field(default_factory=dict, repr=False)
    _program: Program | None = field(default=None, repr=False)
    _site_types: Any = field(default=None, repr=False)  # (id(prim) -> input types, prim -> input types)
    _decided: dict = field(default_factory=dict, repr=False)  # id(term) -> (term, decided verdict)

    # --- queries used by other passes and the report
    def leaf_verdict(self, prim: Prim) -> Verdict:
        v = self._by_id.get(id(prim)) or self._by_value.get(prim)
        return v if v is not None else gray("unknown", "a leaf the typing pass did not see",
                                            "unknown", "running the typing pass on this program")

    def term_verdict(self, term: Term) -> Verdict:
        return run_deep(composite, term, self)

    def term_type(self, term: Term) -> str:
        return self.term_verdict(term).type

    def counts(self, site_ids=None) -> Counter:
        ids = self.verdicts if site_ids is None else site_ids
        return Counter(self.verdicts[i].type for i in ids if not self.sites[i].is_const
                       and self.verdicts[i].rule != "nullary")

    def summary(self) -> dict:
        c = self.counts()
        total = sum(c.values()) or 1
        dof = [v.dof_lost for i, v in self.verdicts.items() if not self.sites[i].is_const]
        return {"S": c[S], "K": c[K], "GRAY": c[GRAY], "S_ratio": round(c[S] / total, 4),
                "K_ratio": round(c[K] / total, 4), "GRAY_ratio": round(c[GRAY] / total, 4),
                "dof_lost": sum(d for d in dof if d is not None),
                "dof_data_dependent": sum(1 for d in dof if d is None),
                "constants": sum(1 for s in self.sites if s.is_const or not s.inputs),
                "defs": {n: v.type for n, v in self.defs.items()}}


# ------------------------------------------------------------------------------------ composite rules

def _is_binary(p, op: str) -> bool:
    return isinstance(p, Prim) and p.op == op and p.arity == 2


_PAIRING = ("tuple", "aten.cat.default", "aten.stack.default")


def composite(term: Term, result: TypingResult) -> Verdict:
    """The composite verdict of a term: the combinator rules, then, where they leave it GRAY, the
    families that decide a unary term from its expression DAG (evaluated before they are emitted)."""
    v = _combinator_rules(term, result)
    if v.type == GRAY and isinstance(term, Comb) and term.kind not in REV_KINDS:
        decided = _decide(term, result)
        if decided is not None:
            return decided
    return v


def _combinator_rules(term: Term, result: TypingResult) -> Verdict:
    if isinstance(term, Prim):
        return result.leaf_verdict(term)
    if isinstance(term, Ref):
        if term.name in result.defs:
            return result.defs[term.name]
        return gray("value", "a bound value used as a term", "not a function", "its use")
    if isinstance(term, Const):
        return gray("value", "a constant used as a term", "not a function", "its use")
    if term.kind == "I":
        return Verdict(S, "I", "I x = x", 0, inverse=lambda y: (y,), surjective=True,
                       extra={"inverse_text": "identity"})
    if term.kind == "K" and len(term.args) == 1:
        return erasing("K", "K c x = c ignores x", None, "any two inputs", None, "everything")
    if term.kind == "B" and len(term.args) >= 2:
        return _compose(term, result)
    if term.kind in REV_KINDS:
        return _coupling_chain(term, result)
    if term.kind == "S" and len(term.args) == 2:
        rms = _rms_idiom(term, result)
        if rms is not None:
            return rms
        f, g = term.args
        if _is_binary(f, "aten.add.Tensor"):
            return gray("residual", "x + F(x) is injective when F is a contraction (Lip(F) < 1) and "
                        "not in general (F = -x)", "x -> x + F(x) is injective (e.g. Lip(F) < 1)",
                        "a Lipschitz bound on F, or the reversible rewrite (a coupling layer is "
                        "injective whatever F is)", _dof_sum(term, result))
        if isinstance(f, Prim) and f.op in _PAIRING:
            return Verdict(S, "pairing", "S f g x = f x (g x) and x -> (x, g x) is injective; f pairs "
                           "its arguments injectively", 0)
    if term.kind == "W" and len(term.args) == 1:
        f = term.args[0]
        if _is_binary(f, "aten.mul.Tensor"):
            return erasing("even", "W(mul) x = x * x is even", None, "x and -x", 0)
        if _is_binary(f, "aten.add.Tensor"):
            return Verdict(S, "scaling", "W(add) x = 2x", 0, inverse=lambda y: (y / 2,),
                           surjective=True, extra={"inverse_text": "y / 2"})
        if isinstance(f, Prim) and f.op in _PAIRING:
            return Verdict(S, "pairing", "W f x = f x x with f pairing injectively", 0)
    return _structural(term, result)


def _coupling_chain(term: Comb, result: TypingResult) -> Verdict:
    """``Rk(add, f1..fn)``: the two-stream coupling ``x -> (a, b)`` is S whatever the branches are (its
    inverse undoes the steps in reverse order); the merge ``a + b - x`` makes the whole chain a residual
    map, GRAY like ``S(add, F)``. The coupling's verdict, with its inverse, is ``extra["coupling"]``."""
    from bwskc.runtime.coupling import coupling_functions
    forward = inverse = None
    if result._program is not None:
        forward, inverse = coupling_functions(result._program, term)
    coupling = Verdict(S, "coupling", "a coupling step s <- s + f(t) is inverted by s <- s - f(t) "
                       "(t is unchanged by the step), whatever f is; x -> (x, x) is injective",
                       0, inverse=inverse, extra={"forward": forward, "inverse_text": (
                           "for i = n..1: a <- a - f_i(b) (i odd) or b <- b - f_i(a) (i even); x = a")})
    verdict = gray("coupling chain", "the coupling x -> (a, b) is injective (inverse in "
                   "extra['coupling']); the merge a + b - x = x + sum of branch updates is a residual map",
                   "x -> a + b - x is injective (e.g. the branch updates are a contraction)",
                   "a Lipschitz bound on the branch updates; the coupling itself needs none",
                   None)
    verdict.extra["coupling"] = coupling
    return verdict


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


def _pointwise_fold(term: Term, result: TypingResult) -> Verdict | None:
    """A pointwise composite is a scalar map phi applied elementwise. A verified collision of phi (an
    interior minimum, then bisection) proves K; finding none proves nothing (None)."""
    x_type = _pointwise_unary(term)
    if x_type is None or result._program is None:
        return None
    from bwskc.leaf_rules import _fold_point
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
        a, b = _fold_point(phi)
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
    x = _Var()
    x.type = x_type
    return _checked(_Dag(term, None, x, []), v, result)  # evaluated on the term before it is emitted


def _structural(term: Term, result: TypingResult) -> Verdict:
    """S if every leaf is jointly injective and no K occurs; a pointwise fold is K; otherwise GRAY."""
    from bwskc.ir import subterms
    worst = S
    for t in subterms(term):
        if isinstance(t, Comb) and t.kind == "K":
            worst = GRAY
            break
        if isinstance(t, Prim):
            v = result.leaf_verdict(t)
        elif isinstance(t, Ref) and t.name in result.defs:
            v = result.defs[t.name]
        else:
            continue
        if v.type != S:
            worst = GRAY
            break
    if worst != S:
        folded = _pointwise_fold(term, result)
        if folded is not None:
            return folded
    if worst == S:
        return Verdict(S, "structural", "every leaf is jointly injective and no K discards a value: "
                       "each combinator passes an injective image of its inputs on", 0)
    return gray("composite", "a composite with an erasing or undecided part", "its parts' collisions "
                "do not survive the combination", "a finer rule for this combinator shape",
                _dof_sum(term, result))


def _dof_sum(term: Term, result: TypingResult):
    total = 0
    for p in prims(term):
        d = result.leaf_verdict(p).dof_lost
        if d is None:
            return None
        total += d
    return total


def _compose(term: Comb, result: TypingResult) -> Verdict:
    parts = _output_only([composite(a, result) for a in term.args], term.args)  # outermost first
    if all(p.type == S for p in parts):
        inverses = [p.inverse for p in parts]
        inverse = None
        if all(i is not None for i in inverses):
            def inverse(y, inverses=inverses):
                # B(f1, ..., fn) x y1 .. ym = f1(f2(... fn(x)), y1, .., ym): f1's inverse gives back
                # (f2(... fn(x)), y1, .., ym); the inner components are unary: undo them on the first
                first, *rest = inverses[0](y)
                for inv in inverses[1:]:  # then f2, ..., fn
                    back = tuple(inv(first))
                    if len(back) != 1:
                        raise ValueError("an inner component of B takes more than one input")
                    first = back[0]
                return (first, *rest)
        return Verdict(S, "B: composition", "a composition of injective maps is injective", 0,
                       inverse=inverse, surjective=all(p.surjective for p in parts),
                       extra={"inverse_text": "the components' inverses, outermost first (the outermost "
                              "one's extra inputs kept)"})
    j = max(i for i, p in enumerate(parts) if p.type != S)
    inner = parts[j + 1:]
    if parts[j].type == K and all(p.surjective for p in inner):
        return erasing("B: pulled-back collision", f"component {j + 1} of {len(parts)} erases and the "
                       "maps inside it are bijections, so its collision pulls back", None,
                       "the component's witness mapped back through the inverses inside it",
                       _dof_sum(term, result))
    if parts[j].type == K:
        return gray("B: erasing after injective", f"component {j + 1} erases, after injective maps that "
                    "are not onto", "its collisions miss the image of the maps inside it",
                    "the image of the inner maps", _dof_sum(term, result))
    folded = _pointwise_fold(term, result)
    if folded is not None:
        return folded
    return gray("B: undecided part", f"component {j + 1} is GRAY: {parts[j].claim}", parts[j].condition,
                parts[j].decided_by, _dof_sum(term, result))


def _output_only(parts: list[Verdict], args) -> list[Verdict]:
    """``getitem(_, 0)`` right after an op that also returns statistics (native_layer_norm, batch norm in
    training, native_group_norm: S, since the statistics recover the input) is the plain op, judged as
    such (shift invariant: K): the pair is replaced by that verdict (``extra["output_only"]``)."""
    out, i = [], 0
    while i < len(parts):
        a = args[i]
        if i + 1 < len(parts) and isinstance(a, Prim) and a.op == "getitem" and a.args[1:] == (0,) \
                and a.args[0] is _hole() and "output_only" in parts[i + 1].extra:
            out.append(parts[i + 1].extra["output_only"])
            i += 2
            continue
        out.append(parts[i])
        i += 1
    return out


def _rms_idiom(term: Comb, result: TypingResult) -> Verdict | None:
    """S(mul(_, _), B(rsqrt, add(_, eps), mean(_, [-1], True), pow(_, 2))): x / sqrt(mean(x^2) + eps)."""
    f, g = term.args
    if not (_is_binary(f, "aten.mul.Tensor") and isinstance(g, Comb) and g.kind == "B"
            and len(g.args) == 4):
        return None
    rsqrt, add, mean, power = g.args
    ops = [getattr(p, "op", None) for p in g.args]
    if ops != ["aten.rsqrt.default", "aten.add.Tensor", "aten.mean.dim", "aten.pow.Tensor_Scalar"]:
        return None
    if power.args[1:] != (2,) or add.args[0] is not _hole() or not isinstance(add.args[1], (int, float)):
        return None
    if not isinstance(mean.args[1], tuple) or len(mean.args[1]) != 1 or mean.args[2:3] != (True,):
        return None
    x_type = power.type
    if not isinstance(x_type, TensorType) or mean.args[1][0] not in (-1, len(x_type.shape) - 1):
        return None
    return rms_verdict(x_type, x_type.shape[-1], float(add.args[1]), None)


def _hole():
    from bwskc.ir import HOLE
    return HOLE


# ------------------------------------------------------------------ decided composites (issue 14)
#
# A composite the combinator rules leave GRAY is read once more as an expression DAG: the term is run
# through the interpreter's own denotation (``Denoter``) on symbolic values, so that every combinator
# arrangement of the same computation gives the same DAG. Families of rules then decide it:
#
# * data movement: every node only moves elements; run on coded inputs (as the selection leaf rule):
#   every element read is S (inverse: a gather of first copies, the identity when nothing moves), an
#   unread element is K;
# * symmetries: an abstract interpretation of how each node transforms when the input is (a) shifted,
#   x -> x + c, (b) scaled, x -> lam x with lam > 0, (c) negated, x -> -x. An output that provably does
#   not change is K, with the witness (x, x + 1.5), (x, 2x) or (x, -x);
# * piecewise strictly monotone scalar maps: a pointwise term of x with literal scalars, each node
#   tagged increasing or decreasing (and continuous); a ``where(x > t, g1, g2)`` with pieces of the same
#   direction is strictly monotone iff the lower piece ends at or below the upper one at t (S, inverse
#   by bisection), and erases when they overlap (K, one value from each piece);
# * linear maps: a term linear in x, its matrix read off basis vectors in float64; with integer
#   coefficients (data movement, add, sub, neg, integer scalings) the rank is exact (rational
#   elimination) and a null vector is a K witness; otherwise float64 singular values decide with a
#   margin (S with a rank certificate), GRAY inside it.
#
# Each decided verdict's witness or inverse is evaluated on the term itself (the program's own eager
# evaluation) before it is emitted, and turns GRAY with the reason when it fails.

_NODE_LIMIT = 20000
_LINEAR_LIMIT = 256  # inputs whose matrix is read off basis vectors
_EXACT_LIMIT = 64  # inputs for exact rational elimination


class _TooLarge(Exception):
    pass


class _Var:
    """The term's (single) input."""
    __slots__ = ("type",)

    def __init__(self):
        self.type = None


class _Node:
    """One primitive application of the DAG; ``args``/``kwargs`` filled (holes replaced by operands)."""
    __slots__ = ("prim", "args", "kwargs", "operands", "active")

    def __init__(self, prim, args, kwargs):
        self.prim, self.args, self.kwargs, self.operands, self.active = prim, args, kwargs, [], False

    @property
    def op(self) -> str:
        return self.prim.op

    @property
    def packet(self) -> str:
        return self.prim.op.rsplit(".", 1)[0] if self.prim.op.count(".") == 2 else self.prim.op


class _Bound:
    """A bound tensor (by name)."""
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


class _SymBackend:
    def __init__(self):
        self.count = 0

    def prim(self, prim, args, kwargs):
        self.count += 1
        if self.count > _NODE_LIMIT:
            raise _TooLarge()
        return _Node(prim, args, kwargs)

    def tensor(self, name):
        return _Bound(name)


def _sym_denoter(program):
    from bwskc.runtime.denote import Denoter

    class _SymDenoter(Denoter):
        def call_prim(self, prim, operands):
            node = super().call_prim(prim, operands)
            node.operands = list(operands)
            node.active = any(isinstance(o, _Var) or (isinstance(o, _Node) and o.active) for o in operands)
            return node
    return _SymDenoter(program, _SymBackend())


class _Dag:
    """A unary term as an expression DAG: ``root`` (a node, the input, or a constant node), ``x`` the
    input with its type, ``nodes`` the active nodes in evaluation order."""

    def __init__(self, term, root, x, nodes):
        self.term, self.root, self.x, self.nodes = term, root, x, nodes

    @property
    def out_type(self):
        return self.root.prim.type if isinstance(self.root, _Node) else self.x.type


def _values_in(v):
    if isinstance(v, (list, tuple)):
        for i in v:
            yield from _values_in(i)
    elif isinstance(v, (_Node, _Var)):
        yield v


def _site_types(result) -> dict:
    if result._site_types is None:
        by_id, by_value = {}, {}
        for s in result.sites:
            by_id.setdefault(id(s.prim), s.inputs)
            by_value.setdefault(s.prim, s.inputs)
        result._site_types = (by_id, by_value)
    return result._site_types


def _dag(term, result) -> _Dag | None:
    """The DAG of a unary term whose input type is known, or None (several inputs, a random op, too
    large, no type)."""
    from bwskc.runtime.random_ops import draws
    program = result._program
    if program is None:
        return None
    try:
        f = _sym_denoter(program).term(term)
        x = _Var()
        root = f(x)
    except Exception:  # a term the symbolic run cannot follow: no decision
        return None
    if callable(root) or not isinstance(root, (_Node, _Var)):
        return None
    order, seen = [], set()
    stack = [(root, False)]
    while stack:  # post-order over active nodes
        n, done = stack.pop()
        if not isinstance(n, _Node) or not n.active:
            continue
        if done:
            order.append(n)
            continue
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.append((n, True))
        for v in _values_in((n.args, list(n.kwargs.values()))):
            if isinstance(v, _Node) and v.active and id(v) not in seen:
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
    return _Dag(term, root, x, order)


# ---- the term's own evaluation (the interpreter's denotation), float32 as typed or all in float64

class _Backend64:
    def __init__(self, weights):
        self.weights, self.cache = weights, {}

    def prim(self, prim, args, kwargs):
        from bwskc.runtime.denote import resolve_op
        return resolve_op(prim.op)(*args, **kwargs)

    def tensor(self, name):
        if name not in self.cache:
            w = self.weights[name]
            self.cache[name] = w.double() if w.is_floating_point() else w
        return self.cache[name]


def _term_call(term, result, f64: bool = False):
    from bwskc.runtime.denote import Denoter
    from bwskc.runtime.interp import EagerBackend
    program = result._program
    backend = _Backend64(program.weights) if f64 else EagerBackend(program.weights)
    f = Denoter(program, backend).term(term)

    def call(*xs):
        out = f
        with torch.no_grad():
            for x in xs:
                out = out(x)
        return out
    return call


def _checked(dag: _Dag, verdict: Verdict, result, seed: int = 0) -> Verdict:
    """The verdict if its evidence holds on the term itself (measured values in ``extra["checked"]``),
    else GRAY saying why (``evidence.rejected``)."""
    from bwskc.evidence import _rejected
    try:
        if verdict.type == K and verdict.witness is not None:
            return _check_collision(dag, verdict, result, seed)
        if verdict.type == S and verdict.inverse is not None:
            return _check_round_trip(dag, verdict, result, seed)
    except Exception as exc:  # evidence that cannot be evaluated is no evidence
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return _rejected(verdict, f"its evidence could not be evaluated on the term: {text}")
    return verdict


def _check_collision(dag, verdict, result, seed) -> Verdict:
    from types import SimpleNamespace

    from bwskc.check_evidence import max_abs_diff, number
    from bwskc.evidence import _encode_pair, _rejected, _to64, inputs_differ, outputs_equal
    a, b = verdict.witness(torch.Generator().manual_seed(seed))
    if not inputs_differ(a, b):
        return _rejected(verdict, "the witness's two inputs are equal")
    fn = _term_call(dag.term, result)
    ya, yb = fn(*a), fn(*b)
    own = outputs_equal(ya, yb)
    diff = max_abs_diff(ya, yb)
    try:
        fn64 = _term_call(dag.term, result, f64=True)
        za, zb = fn64(*_to64(a)), fn64(*_to64(b))
        f64 = {"max_abs_diff": number(max_abs_diff(za, zb)), "collides": outputs_equal(za, zb)}
    except Exception as exc:  # a term that fixes its dtype
        f64 = {"not_run": f"the term does not run in float64: {type(exc).__name__}"}
    domain = verdict.extra.get("domain", "float")
    if not own and not (domain == "reals" and f64.get("collides")):
        return _rejected(verdict, f"witness did not collide on the term: max |f(a)-f(b)| = {diff:.3g}")
    checked = {"seed": seed, "replay_seed": None, "dtype": dag.x.type.dtype, "collides": own,
               "max_abs_diff": number(diff), "tolerance": {"rtol": 1e-5, "atol": 1e-6}, "float64": f64,
               "domain": domain, "domain_source": "rule", "evaluated_on": "the composite term"}
    if not own:
        checked["collides_in"] = "float64"
    checked.update(_encode_pair(SimpleNamespace(inputs=(dag.x.type,)), a, b, seed))
    verdict.extra["checked"] = checked
    return verdict


def _check_round_trip(dag, verdict, result, seed) -> Verdict:
    from bwskc.check_evidence import number
    from bwskc.evidence import _rejected, _relative_error, _to64, _tolerance
    from bwskc.leaf import random_value
    x = (random_value(dag.x.type, torch.Generator().manual_seed(seed)),)
    name, tol = _tolerance(x)
    checks = {}
    for label, call, xs, limit in ((name, _term_call(dag.term, result), x, tol),
                                   ("f64", None, _to64(x), 1e-6)):
        if label == "f64":
            if checks[name].get("passed") or not x[0].is_floating_point():
                break
            call = _term_call(dag.term, result, f64=True)
        try:
            err, rel = _relative_error(tuple(verdict.inverse(call(*xs))), xs)
        except Exception as exc:  # an inverse that fails here is no evidence from this run
            checks[label] = {"error": type(exc).__name__}
            continue
        checks[label] = {"max_abs_error": number(err), "relative_error": number(rel), "tolerance": limit,
                         "passed": rel <= limit}
    ok = [k for k, c in checks.items() if c.get("passed")]
    if not ok:
        return _rejected(verdict, f"the inverse did not round-trip on the term: {checks}")
    verdict.extra["checked"] = {"round_trip": {"seed": seed, "sample": "bwskc's random construction",
                                               "checks": checks, "passed": True, "dtype": ok[0],
                                               "relative_error": checks[ok[0]]["relative_error"],
                                               "max_abs_error": checks[ok[0]]["max_abs_error"],
                                               "evaluated_on": "the composite term"}}
    return verdict


# ---- entry point

def _decide(term, result) -> Verdict | None:
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
    if dag is not None and isinstance(dag.root, _Node):
        for family in (_data_movement, _symmetry, _monotone, _linear):
            try:
                v = family(dag, result)
            except Exception:  # a family that cannot judge this term decides nothing
                v = None
            if v is not None:
                v = _checked(dag, v, result)
                break
    cache[id(term)] = (term, v)
    return v


# ---- data movement

_MOVE = {
    "aten.slice", "aten.select", "aten.index", "aten.index_select", "aten.gather", "aten.cat", "aten.stack",
    "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind", "aten.narrow", "aten.flip",
    "aten.roll", "aten.repeat", "aten.movedim", "aten.tensor_split", "getitem", "tuple", "aten.view",
    "aten._unsafe_view", "aten.reshape", "aten.unsqueeze", "aten.squeeze", "aten.clone", "aten.alias",
    "aten.transpose", "aten.permute", "aten.expand", "aten.t", "aten.contiguous", "aten.diagonal",
    "aten.unfold", "aten.pixel_shuffle", "aten.pixel_unshuffle",
}


class _TermLeaf:
    """A unary term seen as a leaf by the selection rule: its call is the term's own evaluation."""

    def __init__(self, dag, result):
        self.inputs = (dag.x.type,)
        self.out = dag.out_type
        self.op = "the composite"
        self._call = _term_call(dag.term, result)

    def call(self, *xs):
        return self._call(*xs)

    def bound_known(self):
        return True

    def random(self, g, scale=1.0):
        from bwskc.leaf import random_value
        return tuple(random_value(t, g, scale) for t in self.inputs)


def _data_movement(dag, result) -> Verdict | None:
    if not all(n.packet in _MOVE for n in dag.nodes):
        return None
    from bwskc.leaf_rules import selection
    leaf = _TermLeaf(dag, result)
    v = selection(leaf)
    if v.type == GRAY:
        return None
    ops = sorted({n.packet.removeprefix("aten.") for n in dag.nodes})
    if v.type == S:
        coded = (torch.arange(dag.x.type.numel, dtype=torch.float64) + 2.0 ** 40).reshape(dag.x.type.shape)
        y = leaf.call(coded)
        if isinstance(y, torch.Tensor) and y.shape == coded.shape and torch.equal(y.double(), coded) \
                and isinstance(dag.out_type, TensorType) and dag.out_type.dtype == dag.x.type.dtype:
            return Verdict(S, "data movement: identity", f"the composite only moves elements ({', '.join(ops)}) "
                           "and, run on coded inputs (element k holds 2^40 + k), puts every element back "
                           "where it was: it is the identity", 0, inverse=lambda y: (y,), surjective=True,
                           extra={"inverse_text": "identity", "domain": "reals"})
        v.rule, v.claim = "data movement", (f"the composite only moves elements ({', '.join(ops)}); run on "
                                            "coded inputs it copies every input element: a gather inverts it")
        v.extra["domain"] = "reals"
        return v
    v.rule = "data movement"
    v.claim = f"the composite only moves elements ({', '.join(ops)}): {v.claim.split(': ', 1)[-1]}"
    v.extra["domain"] = "reals"
    return v


# ---- symmetries: shift, positive scaling, sign

def _num(v):
    """A literal scalar's value (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _alpha(n) -> float | None:
    alpha = n.kwargs.get("alpha", n.args[2] if len(n.args) > 2 else 1)
    return _num(alpha)


def _vtype(v, dag):
    if isinstance(v, _Var):
        return dag.x.type
    if isinstance(v, _Node):
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
        if p in _MOVE or p in ("aten.amax", "aten.amin", "aten.maximum", "aten.minimum"):
            ts = {tag(o) for o in n.operands}
            return ts.pop() if len(ts) == 1 else None
        if p in ("aten.add", "aten.sub", "aten.rsub"):
            alpha = _alpha(n)
            if alpha is None:
                return None
            u, w = tag(a[0]), tag(a[1])
            return u + alpha * w if p == "aten.add" else u - alpha * w if p == "aten.sub" else w - alpha * u
        if p == "aten.mul":
            s0, s1 = _num(a[0]), _num(a[1])
            if s1 is not None or s0 is not None:
                return tag(a[0]) * s1 if s1 is not None else tag(a[1]) * s0
            return None
        if p == "aten.div" and "rounding_mode" not in n.kwargs and len(a) == 2:
            s = _num(a[1])
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
            vals = [tag(v) for v in vals if _num(v) != 0.0]
            ds = {t[0] for t in vals}
            return (ds.pop(), any(t[1] for t in vals)) if len(ds) == 1 else None
        if p in _MOVE or p in ("aten.amax", "aten.amin", "aten.maximum", "aten.minimum", "aten.mean",
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
        if p == "aten.pow" and n.op.endswith("Tensor_Scalar") and _num(a[1]) is not None:
            return (deg[0] * _num(a[1]), local)
        if p in ("aten.clamp_min", "aten.clamp"):
            return (deg[0], True)
        if p == "aten.where":
            return same(a[1:3]) if tag(a[0])[0] == 0 else None
        if p in _COMPARE:
            if n.op.endswith(".Scalar"):
                return (0.0, local) if _num(a[1]) == 0.0 else None
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
        if p in _MOVE or p in ("aten.mean", "aten.sum") or p in _ODD:
            return ins[0] if len(set(ins)) == 1 else None
        if p in _EVEN:
            return 1.0
        if p in ("aten.add", "aten.sub", "aten.rsub"):
            ts = {tag(v) for v in a[:2] if _num(v) != 0.0}
            return ts.pop() if len(ts) == 1 else None
        if p in ("aten.mul", "aten.div", "aten.matmul", "aten.mm", "aten.bmm") and \
                "rounding_mode" not in n.kwargs:
            return tag(a[0]) * tag(a[1])
        if p == "aten.linear" and _no_bias(n):
            return ins[0]
        if p == "aten.pow" and n.op.endswith("Tensor_Scalar"):
            s = _num(a[1])
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
        if isinstance(v, _Var):
            return fam.input
        if isinstance(v, _Node) and v.active:
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


def _symmetry(dag, result) -> Verdict | None:
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


# ---- piecewise strictly monotone scalar maps

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
        for v in _values_in((n.args, list(n.kwargs.values()))):
            if isinstance(v, _Node) and not v.active:
                return False
        if any(isinstance(v, _Bound) for v in _flat_args(n)):
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
        if isinstance(v, _Var):
            return x
        if isinstance(v, _Node):
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
        if isinstance(v, _Var):
            return Fraction(t)
        if isinstance(v, _Node):
            p, a = v.packet, v.args
            if p in ("aten.clone", "aten.alias", "aten.contiguous"):
                return val(a[0])
            if p == "aten.neg":
                return -val(a[0])
            if p in ("aten.add", "aten.sub", "aten.rsub"):
                alpha = _alpha(v)
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
        s = _num(v)
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
        if isinstance(v, _Var):
            return (1, True)
        if isinstance(v, _Node):
            return tags[id(v)]
        return (0, True) if _num(v) is not None else None
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
                alpha, u, w = _alpha(n), tag(a[0]), tag(a[1])
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
                s0, s1 = _num(a[0]), _num(a[1])
                s = u = None
                if s1 is not None and s0 is None:
                    s, u = (s1 if p == "aten.mul" else (1 / s1 if s1 else None)), tag(a[0])
                elif s0 is not None and s1 is None and p == "aten.mul":
                    s, u = s0, tag(a[1])
                if s and u:
                    t = (u[0] * (1 if s > 0 else -1), u[1])
            elif p == "aten.leaky_relu":
                slope = _num(a[1]) if len(a) > 1 else 0.01
                t = tag(a[0]) if slope is not None and slope > 0 else None
            elif p == "aten.pow" and n.op.endswith("Tensor_Scalar"):
                s = _num(a[1])
                t = tag(a[0]) if s is not None and s == int(s) and s > 0 and int(s) % 2 == 1 else None
            elif p == "aten.where" and n.op == "aten.where.self":
                t = _where_tag(n, tag, dag, facts)
        except (TypeError, IndexError, KeyError):
            t = None
        tags[id(n)] = t if t and t[0] != 0 else None
    return tags, facts


def _where_tag(n, tag, dag, facts):
    cond, hi, lo = n.args[0], n.args[1], n.args[2]
    if not isinstance(cond, _Node) or cond.op not in _CMP_SCALAR or cond.args[0] is not dag.x:
        return None
    t = _num(cond.args[1])
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


def _monotone(dag, result) -> Verdict | None:
    if not dag.x.type.torch_dtype.is_floating_point or not _pointwise_dag(dag):
        return None
    if not any(n.packet == "aten.where" for n in dag.nodes) and len(dag.nodes) < 2:
        return None
    tags, facts = _monotone_tags(dag)
    t = tags.get(id(dag.root))
    dtype = dag.x.type.torch_dtype
    if t is not None:
        d = t[0]
        fn64 = _term_call(dag.term, result, f64=True)

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
    return isinstance(root, _Node) and root.op == "aten.where.self" and \
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


# ---- linear maps

def _linear_tags(dag):
    """Each node's linearity: "int" (linear with integer coefficients, computed exactly in float64 on
    integer inputs), "real" (affine in x), None (not affine)."""
    tags: dict[int, Any] = {}

    def tag(v):
        if isinstance(v, _Var):
            return "int"
        if isinstance(v, _Node) and v.active:
            return tags[id(v)]
        return "const"

    def join(ts):
        ts = [t for t in ts if t != "const"]
        return "int" if all(t == "int" for t in ts) else "real"
    for n in dag.nodes:
        p, a = n.packet, n.args
        ins = [tag(o) for o in n.operands]
        t = None
        if any(i is None for i in ins):
            t = None
        elif p in _MOVE or p == "aten.neg":
            t = join(ins)
        elif p in ("aten.add", "aten.sub", "aten.rsub"):
            alpha = _alpha(n)
            if alpha is not None:
                consts = [v for v in a[:2] if tag(v) == "const" and _num(v) != 0.0]
                t = join(ins) if not consts and alpha == int(alpha) else "real"
        elif p in ("aten.mul", "aten.div") and "rounding_mode" not in n.kwargs:
            if sum(1 for v in a[:2] if tag(v) != "const") == 1:
                s = [_num(v) for v in a[:2] if tag(v) == "const"][0]
                if p == "aten.div":
                    s = (1 / s) if s else None
                t = join(ins) if s is not None and s == int(s) else "real"
        elif p == "aten.sum":
            t = join(ins)
        elif p == "aten.mean":
            t = "real"
        elif p in ("aten.linear", "aten.matmul", "aten.mm", "aten.bmm", "aten.conv1d", "aten.conv2d"):
            if sum(1 for v in a[:2] if tag(v) != "const") == 1:
                t = "real"
        tags[id(n)] = t
    return tags


def _rref_null(rows: list[list[int]], n: int):
    """(rank, a null vector or None) of an integer matrix, by exact rational elimination."""
    from fractions import Fraction
    m = [[Fraction(v) for v in r] for r in rows]
    pivots, r = [], 0
    for c in range(n):
        piv = next((i for i in range(r, len(m)) if m[i][c] != 0), None)
        if piv is None:
            continue
        m[r], m[piv] = m[piv], m[r]
        inv = 1 / m[r][c]
        m[r] = [v * inv for v in m[r]]
        for i in range(len(m)):
            if i != r and m[i][c] != 0:
                f = m[i][c]
                m[i] = [vi - f * vr for vi, vr in zip(m[i], m[r])]
        pivots.append(c)
        r += 1
        if r == len(m):
            break
    if r == n:
        return r, None
    free = next(c for c in range(n) if c not in pivots)
    v = [Fraction(0)] * n
    v[free] = Fraction(1)
    for i, c in enumerate(pivots):
        v[c] = -m[i][free]
    import math
    lcm = 1
    for q in v:
        lcm = lcm * q.denominator // math.gcd(lcm, q.denominator)
    return r, [int(q * lcm) for q in v]


def _linear(dag, result) -> Verdict | None:
    x_type = dag.x.type
    n = x_type.numel
    if not x_type.torch_dtype.is_floating_point or not 0 < n <= _LINEAR_LIMIT:
        return None
    tags = _linear_tags(dag)
    kind = tags.get(id(dag.root))
    if kind not in ("int", "real"):
        return None
    from bwskc.leaf_rules import _out_parts
    fn64 = _term_call(dag.term, result, f64=True)

    def flat(y):
        parts = _out_parts(y)
        return torch.cat([q.double() for q in parts]) if parts else torch.zeros(0, dtype=torch.float64)
    zero = torch.zeros(x_type.shape, dtype=torch.float64)
    b = flat(fn64(zero))
    eye = torch.eye(n, dtype=torch.float64)
    cols = [flat(fn64(eye[i].reshape(x_type.shape))) - b for i in range(n)]
    A = torch.stack(cols, 1)  # (outputs, n)
    dtype = x_type.torch_dtype
    exact = kind == "int" and n <= _EXACT_LIMIT and bool((A == A.round()).all()) and bool((b == 0).all()) \
        and (A.numel() == 0 or float(A.abs().max()) < 2 ** 20)
    shape = x_type.shape

    def s_verdict(rank_cert, claim):
        pinv = torch.linalg.pinv(A)

        def inverse(y, pinv=pinv):
            return ((pinv @ (flat(y) - b)).reshape(shape).to(dtype),)
        return Verdict(S, "linear composite", claim, 0, inverse=inverse, rank=rank_cert,
                       extra={"inverse_text": "pseudo-inverse of the map's matrix (read off basis vectors, "
                              "float64) applied to y - f(0)", "domain": "reals"})
    if exact:
        rank, null = _rref_null([[int(v) for v in row] for row in A.tolist()], n)
        if null is None:
            return s_verdict({"method": "exact rational elimination of the integer matrix", "rank": rank,
                              "columns": n}, f"the composite is linear with integer coefficients; its "
                             f"{A.shape[0]}x{n} matrix has rank {n} (exact rational elimination)")
        v = torch.tensor(null, dtype=torch.float64)
        v = v / v.abs().max()

        def witness(g, v=v):
            from bwskc.leaf import random_value
            a = random_value(x_type, g)
            return (a,), ((a.double() + v.reshape(shape)).to(dtype),)
        verdict = erasing("linear composite", f"the composite is linear with integer coefficients; its "
                          f"{A.shape[0]}x{n} matrix has rank {rank} < {n} (exact rational elimination), "
                          f"so f(x + v) = f(x) for its null vector v", witness,
                          f"x and x + v, v = {null if n <= 16 else 'a null vector'} (scaled)", n - rank)
        verdict.extra["domain"] = "reals"
        return verdict
    s = torch.linalg.svdvals(A)
    smax = float(s[0]) if len(s) else 0.0
    smin = float(s[n - 1]) if len(s) >= n else 0.0
    floor = max(A.shape) * torch.finfo(torch.float64).eps * smax
    tol = 1e3 * floor
    if smin > tol:
        return s_verdict({"method": "float64 SVD of the matrix read off basis vectors", "rank": n,
                          "columns": n, "sigma_min": smin, "sigma_max": smax, "tolerance": tol,
                          "margin": smin / tol if tol else None},
                         f"the composite is affine; its matrix has sigma_min {smin:.3g} above the "
                         f"tolerance {tol:.3g} (1e3 times the SVD's rounding bound)")
    return gray("linear composite", f"the composite is affine, but its matrix is numerically "
                f"rank-deficient: sigma_min {smin:.3g} at tolerance {tol:.3g}",
                "the matrix has full column rank in exact arithmetic",
                "exact arithmetic on the map's coefficients", None)


# ------------------------------------------------------------------------------------------ the pass

class TypingPass(Pass):
    name = "typing"
    kind = "analysis"
    requires = ()

    def analyze(self, program: Program, options: dict) -> TypingResult:
        values = Values(program)
        all_sites = sites(program)
        cache: dict = {}
        verdicts: dict[int, Verdict] = {}
        result = TypingResult(program.name, verdicts, all_sites, _program=program)
        for site in all_sites:
            key = (site.prim, site.inputs)
            v = cache.get(key)
            if v is None:
                v = _type_site(site, values)
                cache[key] = v
            verdicts[site.id] = v
            result._by_id[id(site.prim)] = v
            old = result._by_value.get(site.prim)
            if old is None or _worse(v, old):
                result._by_value[site.prim] = v
        for d in program.defs.values():  # callees first
            result.defs[d.name] = result.term_verdict(d.body)
        result.defs["entry"] = result.term_verdict(program.entry.body)
        return result


def _worse(a: Verdict, b: Verdict) -> bool:
    order = {S: 0, K: 1, GRAY: 2}
    return order[a.type] > order[b.type]


def _type_site(site: Site, values: Values) -> Verdict:
    if site.is_const or not site.inputs:
        return type_leaf(Leaf(site.prim, (), values))
    if any(t is None for t in site.inputs):
        return gray("untyped", "an operand's type could not be inferred", "unknown", "type inference")
    leaf = Leaf(site.prim, site.inputs, values)
    try:
        with torch.no_grad():
            verdict = type_leaf(leaf)
    except Exception as exc:  # a rule that cannot judge this instance says so instead of guessing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return gray("rule failed", f"the rule for {site.prim.op} could not judge this instance: {first}",
                    "unknown", "a rule that handles this instance")
    # a witness or inverse is evidence only once evaluated on this op: failing evidence makes it GRAY
    with torch.no_grad():
        return evaluate(leaf, verdict)


PASS = TypingPass()
