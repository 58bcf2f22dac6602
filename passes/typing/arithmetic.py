"""Leaf rules for binary arithmetic: translations (add, sub, rsub), scalings (mul, div), powers, each
with one activation operand or judged jointly with two, and absorption of an operand in floating point.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from bwskc.evidence import Verdict, erasing, gray, injective, no_rule
from bwskc.ir import TensorType
from bwskc.leaf import Leaf
from bwskc.passes.typing.elementwise import is_unary, random_pair
from bwskc.passes.typing.movement import identity
from bwskc.passes.typing.table import dof, is_float, numel, rule


_ADDITIVE = ("aten.add", "aten.sub", "aten.rsub")


def _scalar_or_tensor(v):
    return torch.as_tensor(v) if isinstance(v, (int, float, bool)) else v


def _other_name(leaf: Leaf) -> str:
    return "other" if leaf.is_hole("self") else "self"


@rule("aten.add", "aten.sub", "aten.rsub")
def additive(leaf: Leaf) -> Verdict:
    alpha = leaf.arg("alpha", 1)
    holes = leaf.hole_args
    if holes == ["self", "other"]:
        return _joint_additive(leaf, alpha)
    if len(holes) != 1 or leaf.x is None:
        return no_rule(leaf.op)
    hole = holes[0]
    if alpha == 0 and hole == "other":
        return erasing("zero", "alpha = 0 discards the activation", lambda g: random_pair(
            leaf, g, lambda x: x, lambda x: x + 1), "x and x + 1", leaf.x.numel)
    sign = {"aten.add": 1, "aten.sub": -1, "aten.rsub": -1}[leaf.packet]
    if hole == "other":
        sign = sign * (1 if leaf.packet == "aten.add" else -1) * alpha
        sign = sign if leaf.packet == "aten.add" else -sign

    def inverse(y, hole=hole):
        other = _scalar_or_tensor(leaf.arg("other" if hole == "self" else "self"))
        if leaf.packet == "aten.rsub":  # other - alpha * x
            x = (other - y) / alpha
        elif hole == "self":
            x = y - alpha * other if leaf.packet == "aten.add" else y + alpha * other
        else:
            x = (y - other) / alpha if leaf.packet == "aten.add" else (other - y) / alpha
        return (unbroadcast(x, leaf.x),)
    if leaf.arg("other" if hole == "self" else "self") is None:
        return gray("translation", f"{leaf.packet} with one activation operand is a translation, "
                    "injective in exact arithmetic; in floating point a bound operand far larger than "
                    "the activation absorbs it (x + c == c: an attention mask's finfo.min)",
                    "the bound operand does not absorb the activation (|c| < 2**24 |x|)",
                    "its value (known with the weights)", 0)
    absorbed = _absorption(leaf)
    if absorbed is not None:
        return absorbed
    return injective("translation", f"{leaf.packet} with one activation operand is a translation "
                     "(times a nonzero alpha): subtracting the other operand inverts it", inverse,
                     "subtract the bound operand", surjective=_same_shape(leaf))


def _same_shape(leaf: Leaf) -> bool:
    """Output of the input's shape and dtype: a bijective elementwise map is then onto its type (a
    promoted dtype is not: x + 0.5 on integers gives only the values k + 0.5)."""
    return isinstance(leaf.out, TensorType) and leaf.x is not None and leaf.out.shape == leaf.x.shape \
        and leaf.out.dtype == leaf.x.dtype


def unbroadcast(y: torch.Tensor, t: TensorType) -> torch.Tensor:
    """The input back from an output it was broadcast into: first copy along broadcast axes."""
    lead = y.dim() - len(t.shape)
    if lead > 0:
        y = y[(0,) * lead]
    for i, s in enumerate(t.shape):
        if s == 1 and y.shape[i] != 1:
            y = y.narrow(i, 0, 1)
    return y.to(t.torch_dtype).reshape(t.shape)


def _is_bool(t) -> bool:
    return isinstance(t, TensorType) and t.torch_dtype == torch.bool


def _discrete(t) -> bool:
    return isinstance(t, TensorType) and not t.torch_dtype.is_floating_point and not t.torch_dtype.is_complex


def _bumped(x: torch.Tensor) -> torch.Tensor:
    return ~x if x.dtype == torch.bool else x + 1


def _joint_additive(leaf: Leaf, alpha) -> Verdict:
    """x + a y, x - a y and y - a x (rsub) of two activations: move x and y so that the sum stays (in
    their own dtypes; a bool operand is a 0/1 summand, and bool + bool is or)."""
    p = leaf.packet
    tx, ty = leaf.inputs
    if alpha == 0:  # add, sub: y is ignored; rsub: x is
        return joint_collision(leaf, f"{p} with alpha = 0 ignores an operand", lambda x, y: (
            (x, _bumped(y)) if p != "aten.rsub" else (_bumped(x), y)))
    if p == "aten.add" and _is_bool(tx) and _is_bool(ty):
        return joint_collision(leaf, "x or y is unchanged by y where x is True", lambda x, y: (
            torch.ones_like(x), ~y), lambda x, y: (torch.ones_like(x), y))
    if p == "aten.add" and _is_bool(ty):  # x + a y = (x + a) + a * 0 where y is True
        return joint_collision(leaf, "x + a y with y bool: (x, True) and (x + a, False)", lambda x, y: (
            x + alpha, torch.zeros_like(y)), lambda x, y: (x, torch.ones_like(y)))
    if p == "aten.add" and _is_bool(tx) and alpha == 1:  # True + y = False + (y + 1)
        return joint_collision(leaf, "x + y with x bool: (True, y) and (False, y + 1)", lambda x, y: (
            torch.zeros_like(x), y + 1), lambda x, y: (torch.ones_like(x), y))
    move = {"aten.add": lambda x, y: (x + alpha, y - 1), "aten.sub": lambda x, y: (x + alpha, y + 1),
            "aten.rsub": lambda x, y: (x + 1, y + alpha)}[p]
    claim = {"aten.add": "x + a y is unchanged by (x + a, y - 1)",
             "aten.sub": "x - a y is unchanged by (x + a, y + 1)",
             "aten.rsub": "y - a x is unchanged by (x + 1, y + a)"}[p]
    return joint_collision(leaf, claim, move)


def _joint_multiplicative(leaf: Leaf) -> Verdict:
    """x * y and x / y of two activations. Real operands: (2x, y/2), (2x, 2y). A discrete operand
    keeps its dtype: x * 0 = (x + 1) * 0, 0 / y = 0 / 2y, x / False = inf for x > 0."""
    p = leaf.packet
    tx, ty = leaf.inputs
    if p == "aten.mul":
        if not (_discrete(tx) or _discrete(ty)):
            return joint_collision(leaf, "x * y is unchanged by (2x, y/2)", lambda x, y: (x * 2, y / 2))
        return joint_collision(leaf, "x * 0 = x' * 0: (x, 0) and (x + 1, 0)", lambda x, y: (
            _bumped(x), torch.zeros_like(y)), lambda x, y: (x, torch.zeros_like(y)))
    if not (_discrete(tx) or _discrete(ty)):
        return joint_collision(leaf, "x / y is unchanged by (2x, 2y)", lambda x, y: (x * 2, y * 2))
    if _is_bool(tx) and _is_bool(ty):  # 1, 0, inf, nan: the four inputs give four outputs
        def inverse(out):
            return ((out == 1) | torch.isinf(out), torch.isfinite(out))
        return injective("joint", "x / y of two bools takes the four values 1, 0, inf and nan on the four "
                         "inputs", inverse, "x = (y == 1 or y == inf), y = y is finite")
    if _is_bool(ty):  # x / False = inf for every x > 0
        return joint_collision(leaf, "x / False = inf for every x > 0: (x, False) and (x + 1, False)",
                                lambda x, y: (x.abs() + 2, torch.zeros_like(y)),
                                lambda x, y: (x.abs() + 1, torch.zeros_like(y)))
    return joint_collision(leaf, "0 / y = 0 / 2y: (0, y) and (0, 2y)", lambda x, y: (
        torch.zeros_like(x), y * 2), lambda x, y: (torch.zeros_like(x), y))


def joint_collision(leaf: Leaf, claim: str, move: Callable, start: Callable | None = None) -> Verdict:
    """K of two activation operands: the witness is ``start(x, y)`` (default: random x, y) and ``move``
    of it."""
    def witness(g):
        a = leaf.random(g)
        if start is not None:
            a = tuple(start(*a))
        return a, tuple(move(*a))
    lost = dof(leaf, sum(numel(t) for t in leaf.inputs) - numel(leaf.out))
    return erasing("joint", f"as a function of both activation operands: {claim}", witness, claim, lost,
                   "generic rank of the Jacobian: at most the output size")


@rule("aten.mul", "aten.div")
def multiplicative(leaf: Leaf) -> Verdict:
    holes = leaf.hole_args
    if holes == ["self", "other"]:
        return _joint_multiplicative(leaf)
    if len(holes) != 1 or leaf.x is None or not is_float(leaf.x):
        return no_rule(leaf.op)
    hole = holes[0]
    other = leaf.arg("other" if hole == "self" else "self")
    if leaf.packet == "aten.div" and hole == "other":  # c / x
        if other is None:
            return gray("reciprocal", "c / x is injective iff c has no zero", "the numerator has no zero",
                        "its value (known with the weights)")
        if bool((_scalar_or_tensor(other) != 0).all()):
            return injective("reciprocal", "c / x with c nonzero is injective (x = c / y)",
                             lambda y: (unbroadcast(_scalar_or_tensor(other) / y, leaf.x),), "c / y")
        return _zero_factor(leaf, other)
    if other is None:
        return gray("scaling", f"{leaf.packet} by a bound factor is injective iff the factor has no zero",
                    "the bound factor has no zero element", "its value (known with the weights)")
    c = _scalar_or_tensor(other)
    if bool((c != 0).all()):
        absorbed = _absorption(leaf)
        if absorbed is not None:  # an infinite or overflowing factor
            return absorbed
    if bool((c != 0).all()) and bool(torch.isfinite(torch.as_tensor(c)).all()):
        inv = (lambda y: (unbroadcast(y / c, leaf.x),)) if leaf.packet == "aten.mul" else (
            lambda y: (unbroadcast(y * c, leaf.x),))
        return injective("scaling", f"{leaf.packet} by a factor with no zero is injective: "
                         f"{'dividing' if leaf.packet == 'aten.mul' else 'multiplying'} by it inverts it",
                         inv, "divide by the factor" if leaf.packet == "aten.mul" else "multiply back",
                         surjective=_same_shape(leaf))
    return _zero_factor(leaf, c)


_FLAT_PROBES = ((-1.0, 1.0), (2.0, 4.0), (-4.0, -2.0))


def _erased_inputs(leaf: Leaf, out_mask: torch.Tensor) -> torch.Tensor:
    """The input elements all of whose (broadcast) output copies are in ``out_mask``."""
    z = out_mask
    lead = z.dim() - len(leaf.x.shape)
    z = z.all(dim=tuple(range(lead))) if lead else z
    for i, s in enumerate(leaf.x.shape):
        if s == 1 and z.shape[i] != 1:
            z = z.all(dim=i, keepdim=True)
    return torch.ones(leaf.x.shape, dtype=torch.bool) & z


def _absorption(leaf: Leaf) -> Verdict | None:
    """Floating-point absorption by a bound operand, for an elementwise map monotone in its activation
    (a translation or a scaling): where the output at lo equals the output at hi, every input in
    [lo, hi] gives that output (rounding is monotone). x + finfo(f32).min == finfo.min for every
    |x| < 1e31 (t5's and switch's attention masks); x * finfo.min is -inf for every x > 1; x + inf and
    x * inf are constant. Probed on [-1, 1], [2, 4] and [-4, -2]; None if no input element is flat."""
    if not isinstance(leaf.out, TensorType) or not leaf.out.torch_dtype.is_floating_point or \
            leaf.x.torch_dtype == torch.bool:
        return None
    for lo, hi in _FLAT_PROBES:
        y_lo = leaf.call(torch.full(leaf.x.shape, lo, dtype=leaf.x.torch_dtype))
        y_hi = leaf.call(torch.full(leaf.x.shape, hi, dtype=leaf.x.torch_dtype))
        flat = (y_lo == y_hi) | (torch.isnan(y_lo) & torch.isnan(y_hi))
        erased = _erased_inputs(leaf, flat)
        if bool(erased.any()):
            break
    else:
        return None
    idx = int(torch.nonzero(erased.flatten())[0])
    count = int(erased.sum())

    def witness(g, lo=lo, hi=hi):
        a = leaf.random(g)[0].clone().reshape(-1)
        b = a.clone()
        a[idx], b[idx] = lo, hi
        return (a.reshape(leaf.x.shape),), (b.reshape(leaf.x.shape),)
    return _in_float(erasing("absorption", f"in {leaf.out.dtype}, {leaf.packet} by the bound operand maps every "
                   f"input in [{lo:g}, {hi:g}] to one value at {count} of the {leaf.x.numel} input elements "
                   "(rounding absorbs the activation: x + c == c for |c| >= 2**24 |x|, or it overflows)",
                   witness, f"input element {idx} at {lo:g} and at {hi:g}", count,
                   "the absorbed elements: the computed map is constant around them"))


def _in_float(v: Verdict) -> Verdict:
    """Label a verdict as a claim about the floating-point map only (absorption, conversions)."""
    v.extra["domain"] = "float"
    return v


def _zero_factor(leaf: Leaf, c) -> Verdict:
    c = torch.as_tensor(c)
    probe = leaf.call(torch.ones(leaf.x.shape, dtype=leaf.x.torch_dtype) * 0 + 1)
    zero_out = torch.broadcast_to(c == 0, probe.shape)
    # x elements all of whose copies meet a zero factor are erased
    erased = torch.ones(leaf.x.shape, dtype=torch.bool)
    lead = zero_out.dim() - len(leaf.x.shape)
    z = zero_out.all(dim=tuple(range(lead))) if lead else zero_out
    for i, s in enumerate(leaf.x.shape):
        if s == 1 and z.shape[i] != 1:
            z = z.all(dim=i, keepdim=True)
    erased &= z
    if not bool(erased.any()):
        return gray("scaling", "some factors are zero but every input element meets a nonzero one",
                    "always (not decided by this rule)", "a per-element inverse")
    idx = int(torch.nonzero(erased.flatten())[0])

    def witness(g):
        a = leaf.random(g)[0]
        b = a.clone().reshape(-1)
        b[idx] += 1
        return (a,), (b.reshape(a.shape),)
    return erasing("zero factor", "a zero factor erases the inputs it multiplies", witness,
                   f"change input element {idx}", int(erased.sum()))


@rule("aten.pow")
def power(leaf: Leaf) -> Verdict:
    if leaf.op != "aten.pow.Tensor_Scalar" or not is_unary(leaf):
        return no_rule(leaf.op)
    e = leaf.arg("exponent")
    if e == 1:
        return identity(leaf)
    if e == 0:
        return erasing("constant", "x ** 0 = 1 for every x", lambda g: random_pair(leaf, g, lambda x: x,
                                                                             lambda x: x + 1),
                       "x and x + 1", leaf.x.numel)
    if float(e).is_integer() and int(e) % 2 == 0:
        return erasing("even", f"x ** {e} is even: (-x) ** {e} = x ** {e}", lambda g: random_pair(
            leaf, g, lambda x: x.abs() + 0.5, lambda x: -x), "x and -x", 0,
            "even power: the Jacobian is invertible almost everywhere")
    if float(e).is_integer():
        k = int(e)
        return injective("strictly monotone", f"x ** {k} (odd) is strictly monotone",
                         lambda y: (torch.sign(y) * y.abs() ** (1.0 / k),), f"sign(y) |y| ** (1/{k})")
    return gray("domain", f"x ** {e} is strictly monotone on x >= 0; negative inputs map to nan",
                "every input is >= 0", "a range analysis of its input", 0,
                sample=lambda g: (leaf.random(g)[0].abs() + 0.1,))
