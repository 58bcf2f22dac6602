"""Leaf rules for elementwise maps of one activation: strictly monotone maps (tanh, exp...), the ELU
family, log_sigmoid, leaky ReLU, softplus, saturations (relu, clamp, threshold), folds (gelu, silu, mish,
hardswish), even, periodic and step maps (abs, cos, floor...), and domain-restricted maps (sqrt, log...).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bwskc.evidence import Verdict, erasing, gray, injective, inputs_differ, no_rule, outputs_equal
from bwskc.leaf import Leaf
from bwskc.passes.typing.movement import identity
from bwskc.passes.typing.table import is_float, rule


def is_unary(leaf: Leaf) -> bool:
    """Whether the leaf has one activation input, of a floating dtype."""
    return leaf.x is not None and is_float(leaf.x)


def _monotone(inverse: Callable, text: str, surjective=False, domain=None):
    def make(leaf: Leaf) -> Verdict:
        if not is_unary(leaf):
            return no_rule(leaf.op)
        return injective("strictly monotone", f"{leaf.op} is strictly monotone, hence injective; "
                         f"{text} inverts it", lambda y: (inverse(leaf, y),), text, surjective=surjective,
                         sample=domain and (lambda g: (domain(leaf, g),)))
    return make


rule("aten.tanh")(_monotone(lambda leaf, y: torch.atanh(y.double()).to(y.dtype), "atanh"))
rule("aten.sigmoid")(_monotone(lambda leaf, y: torch.logit(y.double()).to(y.dtype), "logit"))
rule("aten.exp")(_monotone(lambda leaf, y: torch.log(y), "log"))
rule("aten.expm1")(_monotone(lambda leaf, y: torch.log1p(y), "log1p"))
rule("aten.neg")(_monotone(lambda leaf, y: -y, "negation", surjective=True))
rule("aten.atan")(_monotone(lambda leaf, y: torch.tan(y), "tan"))
rule("aten.asinh")(_monotone(lambda leaf, y: torch.sinh(y), "sinh", surjective=True))
rule("aten.sinh")(_monotone(lambda leaf, y: torch.asinh(y), "asinh", surjective=True))
rule("aten.erf")(_monotone(lambda leaf, y: torch.erfinv(y.double()).to(y.dtype), "erfinv"))
rule("aten.reciprocal")(_monotone(lambda leaf, y: torch.reciprocal(y), "reciprocal"))
rule("aten.logical_not")(_monotone(lambda leaf, y: ~y, "not", surjective=True))
rule("aten.bitwise_not")(_monotone(lambda leaf, y: ~y, "not", surjective=True))


def _constant_pair(leaf: Leaf, a: float, b: float):
    """The inputs (every element a) and (every element b): in the input's dtype when a and b stay
    distinct there and collide there, else in float64 (a collision of the real map that the input's
    dtype cannot represent, such as softplus's branches overlapping on an interval of width 2e-9).
    None when they do not collide in either: no witness is better than a false one."""
    for dt in (leaf.x.torch_dtype, torch.float64):
        pa = torch.full(leaf.x.shape, a, dtype=dt)
        pb = torch.full(leaf.x.shape, b, dtype=dt)
        if inputs_differ(pa, pb) and outputs_equal(leaf.call(pa), leaf.call(pb), 1e-6, 1e-9):
            return (pa,), (pb,)
    return None


def _pair_verdict(leaf: Leaf, rule_name: str, claim: str, a: float, b: float, dof=0, note=""):
    """K with the constant witness (a, b), checked before it is emitted; GRAY if it does not collide."""
    pair = _constant_pair(leaf, a, b)
    if pair is None:
        return gray(rule_name, f"{claim}, but the witness f({a:.6g}) = f({b:.6g}) does not collide when "
                    "evaluated (the collision is narrower than float64 resolution)",
                    "no two floating-point inputs collide", "exact arithmetic", dof)
    return erasing(rule_name, claim, lambda g, pair=pair: pair, f"{a:.9g} and {b:.9g} (every element)",
                   dof, note)


def _elu_inverse(alpha: float, scale: float, iscale: float):
    """Inverse of y = scale * (x if x > 0 else alpha (exp(iscale x) - 1)), alpha iscale > 0."""
    def inverse(y):
        z = y.double() / scale
        neg = torch.log1p((z / alpha).clamp(min=-1 + 1e-16)) / iscale
        return (torch.where(z > 0, z, neg).to(y.dtype),)
    return inverse


def _elu_verdict(leaf: Leaf, alpha: float, scale: float, iscale: float, name: str = "ELU") -> Verdict:
    """scale * (x for x > 0, alpha (exp(iscale x) - 1) for x <= 0). The negative branch g has
    g' = alpha iscale exp(iscale x): with alpha iscale > 0 it is strictly increasing and g < 0 = g(0) on
    x < 0, disjoint from the positive branch's (0, inf): injective (scale != 0). With alpha iscale < 0,
    g > 0 on x < 0: g(-1) = c > 0 is also the positive branch's value at c (a fold). With alpha = 0 or
    iscale = 0, g is 0: every x <= 0 maps to 0."""
    if scale == 0:
        return _pair_verdict(leaf, "constant", f"{name} with scale 0 is constant", 1.0, 2.0,
                             leaf.x.numel)
    if alpha * iscale > 0:
        return injective("strictly monotone", f"{name} with alpha * input_scale > 0 is strictly "
                         "monotone (slope 1 for x > 0; alpha input_scale exp(input_scale x) > 0 below, "
                         "with values below 0)", _elu_inverse(alpha, scale, iscale),
                         "y/scale for y/scale > 0, log1p(y/(scale alpha))/input_scale below",
                         # the round trip is sampled above -8/input_scale: further down exp() < 4e-4
                         # and a float keeps too few of its digits (injective, but saturated)
                         sample=lambda g: (leaf.random(g)[0].clamp(min=-8.0 / abs(iscale)),))
    if alpha == 0 or iscale == 0:
        return _saturating(leaf, f"{name} with alpha * input_scale = 0 maps every x <= 0 to 0", 0.0)
    c = alpha * math.expm1(-iscale)  # g(-1) > 0: the positive branch takes it at x = c
    return _pair_verdict(leaf, "fold", f"{name} with alpha * input_scale < 0 takes positive values "
                         f"below 0: f(-1) = f({c:.6g})", c, -1.0)


@rule("aten.elu")
def elu(leaf: Leaf) -> Verdict:
    if not is_unary(leaf):
        return no_rule(leaf.op)
    return _elu_verdict(leaf, float(leaf.arg("alpha", 1)), float(leaf.arg("scale", 1)),
                        float(leaf.arg("input_scale", 1)))


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


@rule("aten.selu")
def selu(leaf: Leaf) -> Verdict:
    if not is_unary(leaf):
        return no_rule(leaf.op)
    return _elu_verdict(leaf, _SELU_ALPHA, _SELU_SCALE, 1.0, "SELU")


@rule("aten.celu")
def celu(leaf: Leaf) -> Verdict:
    """max(0, x) + min(0, alpha (exp(x/alpha) - 1)): ELU with alpha and input scale 1/alpha, and
    alpha * (1/alpha) = 1 > 0, so injective for every alpha != 0 (negative alpha too: its branch below 0
    is alpha (exp(x/alpha) - 1) < 0, increasing)."""
    if not is_unary(leaf):
        return no_rule(leaf.op)
    alpha = float(leaf.arg("alpha", 1.0))
    if alpha == 0:
        return no_rule(leaf.op)
    return _elu_verdict(leaf, alpha, 1.0, 1.0 / alpha, "CELU")


@rule("aten.log_sigmoid", "aten.log_sigmoid_forward")
def log_sigmoid(leaf: Leaf) -> Verdict:
    """log sigmoid(x) = -softplus(-x): strictly increasing onto (-inf, 0); x = -log(expm1(-y))."""
    if not is_unary(leaf):
        return no_rule(leaf.op)

    def inverse(y):
        out = y[0] if isinstance(y, tuple) else y
        return ((-torch.log(torch.expm1(-out.double()))).to(out.dtype),)
    return injective("strictly monotone", "log sigmoid(x) = -log(1 + exp(-x)) is strictly increasing "
                     "(its derivative is sigmoid(-x) > 0)", inverse, "-log(expm1(-y))")


@rule("aten.leaky_relu")
def leaky_relu(leaf: Leaf) -> Verdict:
    slope = leaf.arg("negative_slope", 0.01)
    if not is_unary(leaf):
        return no_rule(leaf.op)
    if slope > 0:
        return injective("strictly monotone", f"leaky ReLU with slope {slope} > 0 is strictly "
                         "increasing and onto", lambda y: (torch.where(y >= 0, y, y / slope),),
                         "y for y >= 0, y/slope below", surjective=True)
    if slope == 0:
        return _saturating(leaf, "slope 0: every negative input maps to 0", 0.0)
    return _pair_verdict(leaf, "fold", f"leaky ReLU with slope {slope} < 0 maps x > 0 and x/slope to "
                         "the same value", 1.0, 1.0 / slope)


@rule("aten.softplus")
def softplus(leaf: Leaf) -> Verdict:
    """softplus(x) = x where beta x > threshold, log(1 + exp(beta x)) / beta elsewhere. The smooth
    branch's largest value log1p(exp(t)) / beta exceeds t / beta for every t (log(1 + e^t) > t), so
    the linear branch's values (t/beta, log1p(e^t)/beta] are taken twice: non-injective for every
    finite threshold (an interval of width log1p(e^-t)/beta: 2e-9 at the default t = 20). With an
    infinite threshold it is the strictly increasing log(1 + exp(beta x)) / beta."""
    beta, t = float(leaf.arg("beta", 1)), float(leaf.arg("threshold", 20))
    if not is_unary(leaf):
        return no_rule(leaf.op)
    if beta <= 0:
        return gray("softplus", "softplus with beta <= 0 is not decided by this rule", "unknown",
                    "a rule for beta <= 0")
    if math.isinf(t) and t > 0:
        def inverse(y):
            yd = y.double()
            return ((torch.log(torch.expm1(beta * yd)) / beta).to(y.dtype),)
        return injective("strictly monotone", "softplus with an infinite threshold is "
                         "log(1 + exp(beta x)) / beta, strictly increasing", inverse, "log(expm1(b*y))/b")
    top = math.log1p(math.exp(t)) if t < 700 else t
    a = (max(t, 0.0) + top) / 2 / beta  # on the linear branch, inside the smooth branch's (0, top]
    b = math.log(math.expm1(beta * a)) / beta  # its preimage on the smooth branch (< t / beta)
    return _pair_verdict(leaf, "branch overlap", f"softplus with a finite threshold {t:g}: the linear "
                         f"branch x > {t / beta:.6g} repeats the smooth branch's values up to "
                         f"log1p(exp({t:g}))/{beta:g}: f({a!r}) = f({b!r})", a, b)


def _below(bound: float, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two distinct inputs strictly below ``bound`` (spread relative to it, so that rounding keeps
    them apart and below)."""
    a = bound - 1 - abs(bound) - r.abs()
    return a, a - 1 - a.abs()


def _saturating(leaf: Leaf, why: str, bound: float = 0.0, above: bool = False) -> Verdict:
    """Every input below ``bound`` (above it, if ``above``) gives the same output: two such inputs."""
    def witness(g):
        r = leaf.random(g)[0]
        a, b = _below(-bound, r) if above else _below(bound, r)
        return ((-a, ), (-b,)) if above else ((a,), (b,))
    side = "above" if above else "below"
    return erasing("saturation", why, witness, f"two inputs {side} {bound:g}", None,
                   "data-dependent: the saturated inputs")


@rule("aten.relu")
def relu(leaf: Leaf) -> Verdict:
    if not is_unary(leaf):
        return no_rule(leaf.op)
    return _saturating(leaf, "every negative input maps to 0", 0.0)


def _bound_value(v, pick) -> float | None:
    """A literal or bound-tensor clamp bound as one float (``pick``: min or max of a tensor), None if
    absent or unknown."""
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        return float(pick(v.double())) if v.numel() else None
    return float(v)


@rule("aten.hardtanh", "aten.relu6", "aten.clamp", "aten.clamp_min", "aten.clamp_max", "aten.threshold",
      "aten.hardsigmoid")
def clamp(leaf: Leaf) -> Verdict:
    """Every input below the lower bound gives one value (threshold: every x <= threshold gives
    ``value``); likewise above the upper bound. The witness is two inputs past the op's own bound."""
    if not is_unary(leaf):
        return no_rule(leaf.op)
    p = leaf.packet
    lo = {"aten.hardtanh": leaf.arg("min_val", -1.0), "aten.relu6": 0.0, "aten.hardsigmoid": -3.0,
          "aten.threshold": leaf.arg("threshold")}.get(p)
    hi = {"aten.hardtanh": leaf.arg("max_val", 1.0), "aten.relu6": 6.0, "aten.hardsigmoid": 3.0}.get(p)
    if p in ("aten.clamp", "aten.clamp_min"):
        lo = leaf.arg("min")
    if p in ("aten.clamp", "aten.clamp_max"):
        hi = leaf.arg("max")
    unknown = any(leaf.names.get(n) is not None and leaf.arg(n) is None for n in ("min", "max"))
    lo, hi = _bound_value(lo, torch.min), _bound_value(hi, torch.max)
    if lo is not None and math.isfinite(lo):
        return _saturating(leaf, f"every input below {lo:g} maps to the same value", lo)
    if hi is not None and math.isfinite(hi):
        return _saturating(leaf, f"every input above {hi:g} maps to the same value", hi, above=True)
    if unknown:
        return gray("saturation", f"{leaf.op} with bounds that are not known", "the bounds are infinite",
                    "the values of its bounds")
    return identity(leaf)


def fold_point(fn) -> tuple[float, float]:
    """Two inputs a != b with fn(a) == fn(b), for a smooth map with one interior minimum (a fold):
    the minimum on a grid, then bisection on its left for the value at its right."""
    grid = torch.linspace(-8, 8, 16001, dtype=torch.float64)
    vals = fn(grid)
    i = int(torch.argmin(vals))
    xmin = float(grid[i])
    a = xmin + 0.4
    target = float(fn(torch.tensor([a], dtype=torch.float64))[0])
    lo, hi = -30.0, xmin  # fn decreasing on (lo, xmin): fn(lo) > target > fn(xmin)
    for _ in range(200):
        mid = (lo + hi) / 2
        if float(fn(torch.tensor([mid], dtype=torch.float64))[0]) > target:
            lo = mid
        else:
            hi = mid
    return a, (lo + hi) / 2


@rule("aten.gelu", "aten.silu", "aten.mish", "aten.hardswish")
def fold(leaf: Leaf) -> Verdict:
    if not is_unary(leaf):
        return no_rule(leaf.op)
    a, b = fold_point(lambda t: leaf.call(t))
    dt = leaf.x.torch_dtype

    def witness(g, a=a, b=b):
        return (torch.full(leaf.x.shape, a, dtype=dt),), (torch.full(leaf.x.shape, b, dtype=dt),)
    return erasing("fold", f"{leaf.op} has an interior minimum, so it takes every value just above the "
                   f"minimum twice: f({a:.6g}) = f({b:.6g})", witness, f"{a:.6g} and {b:.6g} "
                   "(every element)", 0, "a fold: the Jacobian is invertible almost everywhere")


@rule("aten.abs", "aten.square", "aten.sign", "aten.floor", "aten.ceil", "aten.round", "aten.trunc",
      "aten.frac", "aten.cos", "aten.sin", "aten.sgn")
def even_or_step(leaf: Leaf) -> Verdict:
    if not is_unary(leaf):
        return no_rule(leaf.op)
    p = leaf.packet
    if p in ("aten.abs", "aten.square", "aten.cos"):
        return erasing("even", f"{p} is even: f(-x) = f(x)", lambda g: random_pair(
            leaf, g, lambda x: x.abs() + 0.5, lambda x: -x), "x and -x", 0,
            "even: the Jacobian is invertible almost everywhere")
    if p == "aten.frac":  # x - trunc(x): slope 1 between integers, not a step
        return erasing("periodic", "frac(x) = x - trunc(x) has period 1 on x >= 0: frac(x + 1) = frac(x)",
                       lambda g: random_pair(leaf, g, lambda x: (x.abs() * 8).round() / 8 + 1 / 16,
                                       lambda x: x + 1), "x and x + 1 (x >= 0, a multiple of 1/16)", 0,
                       "periodic: the Jacobian is the identity almost everywhere")
    if p == "aten.sin":
        return erasing("periodic", "sin(x) = sin(pi - x)", lambda g: random_pair(
            leaf, g, lambda x: x * 0.5, lambda x: math.pi - x), "x and pi - x", 0)
    return erasing("step", f"{p} is constant on intervals", lambda g: random_pair(
        leaf, g, lambda x: x.round() + 0.125, lambda x: x + 0.125), "x and x + 1/8 (x = k + 1/8)", None,
        "a step function: its Jacobian is 0 almost everywhere")


def random_pair(leaf: Leaf, g, make_a, make_b):
    """The witness ``(a,), (make_b(a),)`` with ``a = make_a(x)``, x a random input."""
    a = make_a(leaf.random(g)[0])
    return (a,), (make_b(a),)


@rule("aten.rsqrt", "aten.sqrt", "aten.log", "aten.log2", "aten.log10", "aten.log1p", "aten.acos",
      "aten.asin", "aten.atanh", "aten.logit")
def domain_restricted(leaf: Leaf) -> Verdict:
    if not is_unary(leaf):
        return no_rule(leaf.op)
    dom = {"aten.log1p": "x > -1", "aten.acos": "-1 <= x <= 1", "aten.asin": "-1 <= x <= 1",
           "aten.atanh": "-1 < x < 1", "aten.logit": "0 < x < 1"}.get(leaf.packet, "x >= 0")
    return gray("domain", f"{leaf.packet} is strictly monotone on {dom}; every input outside maps to "
                "nan", f"every input satisfies {dom}", "a range analysis of its input (the RMSNorm "
                "composite rule decides rsqrt(mean(x^2) + eps))", 0,
                sample=lambda g: (leaf.random(g)[0].abs() * 0.5 + 0.1,))
