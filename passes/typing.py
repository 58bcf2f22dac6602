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
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

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
    from bwskc.runtime.interp import _EagerBackend
    fn = Denoter(result._program, _EagerBackend({})).term(term)

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
    return erasing("pointwise fold", f"the composite applies one scalar map to every element, and that "
                   f"map has an interior minimum: phi({a:.6g}) = phi({b:.6g})", witness,
                   f"{a:.6g} and {b:.6g} (every element)", 0, "a fold")


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
