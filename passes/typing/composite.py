"""Composite verdicts of terms: the combinator rules (B, S, W, K, I, coupling chains, the RMSNorm idiom, the
structural rule), and, where they leave a term GRAY, the symbolic decision (``symbolic.decide``).

The rules and their soundness arguments are in docs/typing.md, "Composite rules".
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from bwskc.evidence import GRAY, K, S, Verdict, erasing, gray
from bwskc.ir import REV_KINDS, Comb, Const, Prim, Ref, TensorType, Term
from bwskc.passes.typing.normalisation import rms_verdict
from bwskc.passes.typing.symbolic import decide, pointwise_fold

if TYPE_CHECKING:
    from bwskc.passes.typing.typing_pass import TypingResult


def _is_binary(p, op: str) -> bool:
    return isinstance(p, Prim) and p.op == op and p.arity == 2


_PAIRING = ("tuple", "aten.cat.default", "aten.stack.default")


def composite(term: Term, result: TypingResult) -> Verdict:
    """The composite verdict of a term: the combinator rules, then, where they leave it GRAY, the
    families that decide a unary term from its expression DAG (evaluated before they are emitted)."""
    v = _combinator_rules(term, result)
    if v.type == GRAY and isinstance(term, Comb) and term.kind not in REV_KINDS:
        decided = decide(term, result)
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
                        "injective whatever F is)", None)
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
        folded = pointwise_fold(term, result)
        if folded is not None:
            return folded
    if worst == S:
        return Verdict(S, "structural", "every leaf is jointly injective and no K discards a value: "
                       "each combinator passes an injective image of its inputs on", 0)
    return gray("composite", "a composite with an erasing or undecided part", "its parts' collisions "
                "do not survive the combination", "a finer rule for this combinator shape", None)


# Degrees of freedom of composites. The leaves' counts do not add up: a leaf's count is relative to its
# own inputs, and a joint binary op fed twice from one value (S(mul, sigmoid) x = x * sigmoid(x)) counts
# a domain twice the composite's. Only a composition whose erasing part is preceded by bijections and
# followed by injective maps has a count that follows from its parts: the erasing part's (bijections
# and injective smooth maps keep the generic rank). Everywhere else the count is not derived (None).


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
                       parts[j].dof_lost)
    if parts[j].type == K:
        return gray("B: erasing after injective", f"component {j + 1} erases, after injective maps that "
                    "are not onto", "its collisions miss the image of the maps inside it",
                    "the image of the inner maps", None)
    folded = pointwise_fold(term, result)
    if folded is not None:
        return folded
    return gray("B: undecided part", f"component {j + 1} is GRAY: {parts[j].claim}", parts[j].condition,
                parts[j].decided_by, None)


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
