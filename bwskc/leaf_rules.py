"""S/K typing rules for ATen ops, judged as functions of their activation inputs (their holes).

Each rule returns a ``Verdict`` with its evidence (see ``bwskc.evidence``). The one-line proofs are in
``claim`` and collected in docs/typing.md. An op without a rule is GRAY with the reason "no rule".
Families:

* data movement (view, transpose, slice, cat, getitem, index with known indices...): every output element
  is a copy of an input element or a constant. Running the op once on *coded* inputs (element k holds the
  number 2**40 + k) shows which inputs are read: all read gives a gather as the left inverse; an unread
  element gives a witness (change it: the output does not move). Exact, and decided per site.
* elementwise maps: strictly monotone ones are injective (inverse in closed form); folds (GELU, SiLU),
  saturations (ReLU, clamp), even powers and periodic maps collide (witness in closed form or by bisection).
* binary arithmetic with one activation operand: a translation is a bijection; a product is injective iff
  the other factor has no zero. With two activation operands it is judged jointly: ``x + y`` collides at
  ``(x + 1, y - 1)``, ``x * y`` at ``(2x, y / 2)``.
* linear maps (linear, addmm, mm/matmul against a weight, convolution): injective iff full column rank;
  decided from the weights (a rank certificate or a null vector), by shape (rank-nullity) without them.
* normalisations and reductions: shift (LayerNorm, softmax, attention keys) or scale invariances give
  witnesses; the degrees of freedom lost are counted per row.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from bwskc.evidence import Verdict, erasing, gray, injective, inputs_differ, no_rule, outputs_equal
from bwskc.ir import HOLE, TensorType, TupleType
from bwskc.leaf import Leaf, random_value

RULES: dict[str, Callable[[Leaf], Verdict]] = {}


def rule(*ops: str):
    def register(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return register


def type_leaf(leaf: Leaf) -> Verdict:
    if not leaf.inputs:
        return Verdict("S", "nullary", "no activation input: a function of the one-point domain is "
                       "injective (a constant; not counted in ratios)", 0, inverse=lambda y: (),
                       extra={"inverse_text": "()"})
    fn = RULES.get(leaf.op) or RULES.get(leaf.packet)
    if fn is None:
        return no_rule(leaf.op)
    v = fn(leaf)
    if v.type in ("S", "K"):  # a claim about the real-valued map unless the rule says floating point
        v.extra.setdefault("domain", "reals")
    return v


def _numel(t) -> int:
    if isinstance(t, TupleType):
        return sum(_numel(i) for i in t.items)
    return t.numel if isinstance(t, TensorType) else 1


def _float(t) -> bool:
    return isinstance(t, TensorType) and t.torch_dtype.is_floating_point


def _dof(leaf: Leaf, lost: int):
    """Degrees of freedom are counted for real-valued inputs only (discrete inputs have none)."""
    return lost if all(_float(t) for t in leaf.inputs) else None


# ------------------------------------------------------------------------------------- data movement

_BASE = float(2 ** 40)
_SELECTION_LIMIT = 1 << 24


def _coded(types, start: int):
    out = []
    for t in types:
        if isinstance(t, TupleType):
            items, start = _coded(t.items, start)
            out.append(tuple(items))
        else:
            n = t.numel
            out.append((torch.arange(n, dtype=torch.float64) + _BASE + start).reshape(t.shape))
            start += n
    return out, start


def _out_parts(y) -> list[torch.Tensor]:
    """Every tensor of an output (tuples flattened in order, any dtype), each flattened."""
    if isinstance(y, (tuple, list)):
        return [p for i in y for p in _out_parts(i)]
    if isinstance(y, torch.Tensor):
        return [y.reshape(-1)]
    return []


def _tensor_types(t) -> list[TensorType]:
    if isinstance(t, TupleType):
        return [i for item in t.items for i in _tensor_types(item)]
    return [t] if isinstance(t, TensorType) else []


def _rebuild(types, parts: list[torch.Tensor], part_of: torch.Tensor, local: torch.Tensor, start: int = 0):
    """The inputs of ``types`` (tuples nested as they are) whose element k is the output element
    ``parts[part_of[k]][local[k]]``, each in its own dtype (exact: no common dtype in between)."""
    out = []
    for t in types:
        if isinstance(t, TupleType):
            items, start = _rebuild(t.items, parts, part_of, local, start)
            out.append(tuple(items))
            continue
        values = torch.empty(t.numel, dtype=t.torch_dtype)
        pj, lj = part_of[start:start + t.numel], local[start:start + t.numel]
        for j in pj.unique().tolist():
            m = pj == j
            values[m] = parts[j][lj[m]].to(t.torch_dtype)
        out.append(values.reshape(t.shape))
        start += t.numel
    return out, start


def _bump(types, values, k: int, start: int = 0):
    """``values`` (of ``types``) with input element k changed: flipped if bool, plus 1 otherwise."""
    out = []
    for t, v in zip(types, values):
        if isinstance(t, TupleType):
            items, start = _bump(t.items, v, k, start)
            out.append(tuple(items))
            continue
        if start <= k < start + t.numel:
            v = v.clone().reshape(-1)
            v[k - start] = ~v[k - start] if v.dtype == torch.bool else v[k - start] + 1
            v = v.reshape(t.shape)
        out.append(v)
        start += t.numel
    return out, start


@rule("aten.slice", "aten.select", "aten.index", "aten.index_select", "aten.gather", "aten.cat",
      "aten.stack", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind", "aten.narrow",
      "aten.flip", "aten.roll", "aten.repeat", "aten.constant_pad_nd", "aten.unfold", "aten.diagonal",
      "aten.as_strided", "aten.movedim", "aten.tensor_split", "aten.take", "getitem", "tuple",
      "aten.pixel_shuffle", "aten.pixel_unshuffle", "aten.channel_shuffle", "aten.tril", "aten.triu",
      "aten.im2col", "aten.pad", "aten.reflection_pad1d", "aten.reflection_pad2d", "aten.reflection_pad3d",
      "aten.replication_pad1d", "aten.replication_pad2d", "aten.replication_pad3d",
      "aten.upsample_nearest1d", "aten.upsample_nearest2d", "aten.upsample_nearest3d",
      "aten._upsample_nearest_exact1d", "aten._upsample_nearest_exact2d", "aten._upsample_nearest_exact3d",
      "aten.broadcast_tensors")
def selection(leaf: Leaf) -> Verdict:
    """Output elements are copies of input elements (or constants): decide by running on codes.

    Every input (floating, integer or bool) is coded in float64; the inverse gathers each input element
    from the output tensor holding its first copy, in that input's own dtype."""
    total = sum(_numel(t) for t in leaf.inputs)
    if total > _SELECTION_LIMIT or not leaf.bound_known():
        why = "too large to code here" if total > _SELECTION_LIMIT else "its bound indices are unknown"
        return gray("selection", f"{leaf.op} copies input elements: injective iff it reads every one",
                    "every input element appears in the output", f"coding its inputs ({why})", None)
    coded, n = _coded(leaf.inputs, 0)
    parts = _out_parts(leaf.call(*coded))
    flat = torch.cat([p.to(torch.float64) for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)
    codes = flat - _BASE
    valid = (codes >= 0) & (codes < n) & (codes == codes.round())
    pos = torch.nonzero(valid).flatten()
    code_at = codes[pos].long()
    first = torch.full((n,), -1, dtype=torch.long)
    first.scatter_reduce_(0, code_at, pos, reduce="amin", include_self=False)
    unread = torch.nonzero(first < 0).flatten()
    if len(unread) == 0:
        sizes = torch.tensor([len(p) for p in parts], dtype=torch.long)
        ends = torch.cumsum(sizes, 0)
        part_of = torch.searchsorted(ends, first, right=True)
        local = first - (ends - sizes)[part_of]

        def inverse(y, part_of=part_of, local=local, types=leaf.inputs):
            return tuple(_rebuild(types, _out_parts(y), part_of, local)[0])
        # onto its type when the copies are a bijection and each keeps its element's dtype
        ins = [t.torch_dtype for t in _tensor_types(TupleType(tuple(leaf.inputs)))]
        outs = [t.torch_dtype for t in _tensor_types(leaf.out)]
        onto = len(pos) == n and len(flat) == n and len(outs) == len(parts)
        if onto:
            in_dt = torch.tensor([i for i, t in enumerate(_tensor_types(TupleType(tuple(leaf.inputs))))
                                  for _ in range(t.numel)], dtype=torch.long)
            out_dt = torch.repeat_interleave(torch.arange(len(parts)), sizes)
            onto = all(ins[int(i)] == outs[int(o)] for i, o in
                       torch.unique(torch.stack([in_dt[code_at], out_dt[pos]]), dim=1).T)
        return injective("selection", f"{leaf.op} copies every input element to the output "
                         "(checked by running it on coded inputs): a gather recovers the inputs",
                         inverse, "gather of the first output position of each input element",
                         surjective=onto)
    k = int(unread[0])

    def witness(g, k=k, leaf=leaf):
        a = leaf.random(g)
        return a, tuple(_bump(leaf.inputs, a, k)[0])
    return erasing("selection", f"{leaf.op} never reads {len(unread)} of its {n} input elements",
                   witness, f"change input element {k} (not read)", _dof(leaf, len(unread)),
                   "unread input elements")


def _reshape_back(leaf: Leaf):
    shape = leaf.x.shape
    return lambda y: (y.reshape(shape),)


@rule("aten.view", "aten._unsafe_view", "aten.reshape", "aten.flatten", "aten.unflatten",
      "aten.squeeze", "aten.unsqueeze", "aten.view_as")
def reshape(leaf: Leaf) -> Verdict:
    if leaf.x is None or _numel(leaf.out) != leaf.x.numel:
        return selection(leaf)
    return injective("reshape", "a reshape keeps every element in row-major order: reshaping back "
                     "inverts it", _reshape_back(leaf), "reshape to the input shape", surjective=True)


@rule("aten.clone", "aten.alias", "aten.contiguous", "aten.detach", "aten.lift_fresh_copy",
      "aten.positive", "aten.resolve_conj", "aten.resolve_neg")
def identity(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return selection(leaf)
    return injective("identity", f"{leaf.op} returns its input's values", lambda y: (y,), "identity",
                     surjective=True)


@rule("aten.transpose", "aten.permute", "aten.t", "aten.swapaxes", "aten.numpy_T")
def permute(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return selection(leaf)
    rank = len(leaf.x.shape)
    if leaf.packet == "aten.permute":
        dims = [d % rank for d in leaf.arg("dims")]
    else:
        dims = list(range(rank))
        if leaf.packet != "aten.t" or rank == 2:
            i, j = (leaf.arg("dim0", 0), leaf.arg("dim1", 1)) if leaf.packet != "aten.t" else (0, 1)
            i, j = i % max(rank, 1), j % max(rank, 1)
            dims[i], dims[j] = dims[j], dims[i]
    back = [dims.index(i) for i in range(rank)]
    return injective("permutation", "a permutation of axes is inverted by the inverse permutation",
                     lambda y: (y.permute(back),), f"permute {back}", surjective=True)


@rule("aten.expand", "aten.expand_as", "aten.broadcast_to")
def expand(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return selection(leaf)
    src, dst = leaf.x.shape, leaf.out.shape
    lead = len(dst) - len(src)

    def inverse(y):
        y = y[(0,) * lead] if lead else y
        for i, s in enumerate(src):
            if s == 1 and y.shape[i] != 1:
                y = y.narrow(i, 0, 1)
        return (y.contiguous(),)
    return injective("broadcast", "a broadcast copies each element at least once: one copy of each "
                     "recovers the input", inverse, "first copy along each broadcast axis")


# ----------------------------------------------------------------------------------- elementwise maps

def _unary(leaf: Leaf) -> bool:
    return leaf.x is not None and _float(leaf.x)


def _monotone(inverse: Callable, text: str, surjective=False, domain=None):
    def make(leaf: Leaf) -> Verdict:
        if not _unary(leaf):
            return no_rule(leaf.op)
        return injective("strictly monotone", f"{leaf.op} is strictly monotone, hence injective; "
                         f"{text} inverts it", lambda y: (inverse(leaf, y),), text, surjective=surjective,
                         sample=domain and (lambda g: (domain(leaf, g),)))
    return make


RULES.update({
    "aten.tanh": _monotone(lambda leaf, y: torch.atanh(y.double()).to(y.dtype), "atanh"),
    "aten.sigmoid": _monotone(lambda leaf, y: torch.logit(y.double()).to(y.dtype), "logit"),
    "aten.exp": _monotone(lambda leaf, y: torch.log(y), "log"),
    "aten.expm1": _monotone(lambda leaf, y: torch.log1p(y), "log1p"),
    "aten.neg": _monotone(lambda leaf, y: -y, "negation", surjective=True),
    "aten.atan": _monotone(lambda leaf, y: torch.tan(y), "tan"),
    "aten.asinh": _monotone(lambda leaf, y: torch.sinh(y), "sinh", surjective=True),
    "aten.sinh": _monotone(lambda leaf, y: torch.asinh(y), "asinh", surjective=True),
    "aten.erf": _monotone(lambda leaf, y: torch.erfinv(y.double()).to(y.dtype), "erfinv"),
    "aten.reciprocal": _monotone(lambda leaf, y: torch.reciprocal(y), "reciprocal"),
    "aten.logical_not": _monotone(lambda leaf, y: ~y, "not", surjective=True),
    "aten.bitwise_not": _monotone(lambda leaf, y: ~y, "not", surjective=True),
})


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
    if not _unary(leaf):
        return no_rule(leaf.op)
    return _elu_verdict(leaf, float(leaf.arg("alpha", 1)), float(leaf.arg("scale", 1)),
                        float(leaf.arg("input_scale", 1)))


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


@rule("aten.selu")
def selu(leaf: Leaf) -> Verdict:
    if not _unary(leaf):
        return no_rule(leaf.op)
    return _elu_verdict(leaf, _SELU_ALPHA, _SELU_SCALE, 1.0, "SELU")


@rule("aten.celu")
def celu(leaf: Leaf) -> Verdict:
    """max(0, x) + min(0, alpha (exp(x/alpha) - 1)): ELU with alpha and input scale 1/alpha, and
    alpha * (1/alpha) = 1 > 0, so injective for every alpha != 0 (negative alpha too: its branch below 0
    is alpha (exp(x/alpha) - 1) < 0, increasing)."""
    if not _unary(leaf):
        return no_rule(leaf.op)
    alpha = float(leaf.arg("alpha", 1.0))
    if alpha == 0:
        return no_rule(leaf.op)
    return _elu_verdict(leaf, alpha, 1.0, 1.0 / alpha, "CELU")


@rule("aten.log_sigmoid", "aten.log_sigmoid_forward")
def log_sigmoid(leaf: Leaf) -> Verdict:
    """log sigmoid(x) = -softplus(-x): strictly increasing onto (-inf, 0); x = -log(expm1(-y))."""
    if not _unary(leaf):
        return no_rule(leaf.op)

    def inverse(y):
        out = y[0] if isinstance(y, tuple) else y
        return ((-torch.log(torch.expm1(-out.double()))).to(out.dtype),)
    return injective("strictly monotone", "log sigmoid(x) = -log(1 + exp(-x)) is strictly increasing "
                     "(its derivative is sigmoid(-x) > 0)", inverse, "-log(expm1(-y))")


@rule("aten.leaky_relu")
def leaky_relu(leaf: Leaf) -> Verdict:
    slope = leaf.arg("negative_slope", 0.01)
    if not _unary(leaf):
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
    if not _unary(leaf):
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
    if not _unary(leaf):
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
    if not _unary(leaf):
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


def _fold_point(fn) -> tuple[float, float]:
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
    if not _unary(leaf):
        return no_rule(leaf.op)
    a, b = _fold_point(lambda t: leaf.call(t))
    dt = leaf.x.torch_dtype

    def witness(g, a=a, b=b):
        return (torch.full(leaf.x.shape, a, dtype=dt),), (torch.full(leaf.x.shape, b, dtype=dt),)
    return erasing("fold", f"{leaf.op} has an interior minimum, so it takes every value just above the "
                   f"minimum twice: f({a:.6g}) = f({b:.6g})", witness, f"{a:.6g} and {b:.6g} "
                   "(every element)", 0, "a fold: the Jacobian is invertible almost everywhere")


@rule("aten.abs", "aten.square", "aten.sign", "aten.floor", "aten.ceil", "aten.round", "aten.trunc",
      "aten.frac", "aten.cos", "aten.sin", "aten.sgn")
def even_or_step(leaf: Leaf) -> Verdict:
    if not _unary(leaf):
        return no_rule(leaf.op)
    p = leaf.packet
    if p in ("aten.abs", "aten.square", "aten.cos"):
        return erasing("even", f"{p} is even: f(-x) = f(x)", lambda g: _pair(
            leaf, g, lambda x: x.abs() + 0.5, lambda x: -x), "x and -x", 0,
            "even: the Jacobian is invertible almost everywhere")
    if p == "aten.frac":  # x - trunc(x): slope 1 between integers, not a step
        return erasing("periodic", "frac(x) = x - trunc(x) has period 1 on x >= 0: frac(x + 1) = frac(x)",
                       lambda g: _pair(leaf, g, lambda x: (x.abs() * 8).round() / 8 + 1 / 16,
                                       lambda x: x + 1), "x and x + 1 (x >= 0, a multiple of 1/16)", 0,
                       "periodic: the Jacobian is the identity almost everywhere")
    if p == "aten.sin":
        return erasing("periodic", "sin(x) = sin(pi - x)", lambda g: _pair(
            leaf, g, lambda x: x * 0.5, lambda x: math.pi - x), "x and pi - x", 0)
    return erasing("step", f"{p} is constant on intervals", lambda g: _pair(
        leaf, g, lambda x: x.round() + 0.125, lambda x: x + 0.125), "x and x + 1/8 (x = k + 1/8)", None,
        "a step function: its Jacobian is 0 almost everywhere")


def _pair(leaf: Leaf, g, make_a, make_b):
    a = make_a(leaf.random(g)[0])
    return (a,), (make_b(a),)


@rule("aten.rsqrt", "aten.sqrt", "aten.log", "aten.log2", "aten.log10", "aten.log1p", "aten.acos",
      "aten.asin", "aten.atanh", "aten.logit")
def domain_restricted(leaf: Leaf) -> Verdict:
    if not _unary(leaf):
        return no_rule(leaf.op)
    dom = {"aten.log1p": "x > -1", "aten.acos": "-1 <= x <= 1", "aten.asin": "-1 <= x <= 1",
           "aten.atanh": "-1 < x < 1", "aten.logit": "0 < x < 1"}.get(leaf.packet, "x >= 0")
    return gray("domain", f"{leaf.packet} is strictly monotone on {dom}; every input outside maps to "
                "nan", f"every input satisfies {dom}", "a range analysis of its input (the RMSNorm "
                "composite rule decides rsqrt(mean(x^2) + eps))", 0,
                sample=lambda g: (leaf.random(g)[0].abs() * 0.5 + 0.1,))


# --------------------------------------------------------------------------------- binary arithmetic

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
        return erasing("zero", "alpha = 0 discards the activation", lambda g: _pair(
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
        return (_unbroadcast(x, leaf.x),)
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


def _unbroadcast(y: torch.Tensor, t: TensorType) -> torch.Tensor:
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
        return _joint_collision(leaf, f"{p} with alpha = 0 ignores an operand", lambda x, y: (
            (x, _bumped(y)) if p != "aten.rsub" else (_bumped(x), y)))
    if p == "aten.add" and _is_bool(tx) and _is_bool(ty):
        return _joint_collision(leaf, "x or y is unchanged by y where x is True", lambda x, y: (
            torch.ones_like(x), ~y), lambda x, y: (torch.ones_like(x), y))
    if p == "aten.add" and _is_bool(ty):  # x + a y = (x + a) + a * 0 where y is True
        return _joint_collision(leaf, "x + a y with y bool: (x, True) and (x + a, False)", lambda x, y: (
            x + alpha, torch.zeros_like(y)), lambda x, y: (x, torch.ones_like(y)))
    if p == "aten.add" and _is_bool(tx) and alpha == 1:  # True + y = False + (y + 1)
        return _joint_collision(leaf, "x + y with x bool: (True, y) and (False, y + 1)", lambda x, y: (
            torch.zeros_like(x), y + 1), lambda x, y: (torch.ones_like(x), y))
    move = {"aten.add": lambda x, y: (x + alpha, y - 1), "aten.sub": lambda x, y: (x + alpha, y + 1),
            "aten.rsub": lambda x, y: (x + 1, y + alpha)}[p]
    claim = {"aten.add": "x + a y is unchanged by (x + a, y - 1)",
             "aten.sub": "x - a y is unchanged by (x + a, y + 1)",
             "aten.rsub": "y - a x is unchanged by (x + 1, y + a)"}[p]
    return _joint_collision(leaf, claim, move)


def _joint_multiplicative(leaf: Leaf) -> Verdict:
    """x * y and x / y of two activations. Real operands: (2x, y/2), (2x, 2y). A discrete operand
    keeps its dtype: x * 0 = (x + 1) * 0, 0 / y = 0 / 2y, x / False = inf for x > 0."""
    p = leaf.packet
    tx, ty = leaf.inputs
    if p == "aten.mul":
        if not (_discrete(tx) or _discrete(ty)):
            return _joint_collision(leaf, "x * y is unchanged by (2x, y/2)", lambda x, y: (x * 2, y / 2))
        return _joint_collision(leaf, "x * 0 = x' * 0: (x, 0) and (x + 1, 0)", lambda x, y: (
            _bumped(x), torch.zeros_like(y)), lambda x, y: (x, torch.zeros_like(y)))
    if not (_discrete(tx) or _discrete(ty)):
        return _joint_collision(leaf, "x / y is unchanged by (2x, 2y)", lambda x, y: (x * 2, y * 2))
    if _is_bool(tx) and _is_bool(ty):  # 1, 0, inf, nan: the four inputs give four outputs
        def inverse(out):
            return ((out == 1) | torch.isinf(out), torch.isfinite(out))
        return injective("joint", "x / y of two bools takes the four values 1, 0, inf and nan on the four "
                         "inputs", inverse, "x = (y == 1 or y == inf), y = y is finite")
    if _is_bool(ty):  # x / False = inf for every x > 0
        return _joint_collision(leaf, "x / False = inf for every x > 0: (x, False) and (x + 1, False)",
                                lambda x, y: (x.abs() + 2, torch.zeros_like(y)),
                                lambda x, y: (x.abs() + 1, torch.zeros_like(y)))
    return _joint_collision(leaf, "0 / y = 0 / 2y: (0, y) and (0, 2y)", lambda x, y: (
        torch.zeros_like(x), y * 2), lambda x, y: (torch.zeros_like(x), y))


def _joint_collision(leaf: Leaf, claim: str, move: Callable, start: Callable | None = None) -> Verdict:
    """K of two activation operands: the witness is ``start(x, y)`` (default: random x, y) and ``move``
    of it."""
    def witness(g):
        a = leaf.random(g)
        if start is not None:
            a = tuple(start(*a))
        return a, tuple(move(*a))
    lost = _dof(leaf, sum(_numel(t) for t in leaf.inputs) - _numel(leaf.out))
    return erasing("joint", f"as a function of both activation operands: {claim}", witness, claim, lost,
                   "generic rank of the Jacobian: at most the output size")


@rule("aten.mul", "aten.div")
def multiplicative(leaf: Leaf) -> Verdict:
    holes = leaf.hole_args
    if holes == ["self", "other"]:
        return _joint_multiplicative(leaf)
    if len(holes) != 1 or leaf.x is None or not _float(leaf.x):
        return no_rule(leaf.op)
    hole = holes[0]
    other = leaf.arg("other" if hole == "self" else "self")
    if leaf.packet == "aten.div" and hole == "other":  # c / x
        if other is None:
            return gray("reciprocal", "c / x is injective iff c has no zero", "the numerator has no zero",
                        "its value (known with the weights)")
        if bool((_scalar_or_tensor(other) != 0).all()):
            return injective("reciprocal", "c / x with c nonzero is injective (x = c / y)",
                             lambda y: (_unbroadcast(_scalar_or_tensor(other) / y, leaf.x),), "c / y")
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
        inv = (lambda y: (_unbroadcast(y / c, leaf.x),)) if leaf.packet == "aten.mul" else (
            lambda y: (_unbroadcast(y * c, leaf.x),))
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
    if leaf.op != "aten.pow.Tensor_Scalar" or not _unary(leaf):
        return no_rule(leaf.op)
    e = leaf.arg("exponent")
    if e == 1:
        return identity(leaf)
    if e == 0:
        return erasing("constant", "x ** 0 = 1 for every x", lambda g: _pair(leaf, g, lambda x: x,
                                                                             lambda x: x + 1),
                       "x and x + 1", leaf.x.numel)
    if float(e).is_integer() and int(e) % 2 == 0:
        return erasing("even", f"x ** {e} is even: (-x) ** {e} = x ** {e}", lambda g: _pair(
            leaf, g, lambda x: x.abs() + 0.5, lambda x: -x), "x and -x", 0,
            "even power: the Jacobian is invertible almost everywhere")
    if float(e).is_integer():
        k = int(e)
        return injective("strictly monotone", f"x ** {k} (odd) is strictly monotone",
                         lambda y: (torch.sign(y) * y.abs() ** (1.0 / k),), f"sign(y) |y| ** (1/{k})")
    return gray("domain", f"x ** {e} is strictly monotone on x >= 0; negative inputs map to nan",
                "every input is >= 0", "a range analysis of its input", 0,
                sample=lambda g: (leaf.random(g)[0].abs() + 0.1,))


# ------------------------------------------------------------------------------------------ compares

_AND = ("aten.__and__", "aten.logical_and", "aten.bitwise_and")
_OR = ("aten.__or__", "aten.logical_or", "aten.bitwise_or")


@rule("aten.le", "aten.lt", "aten.ge", "aten.gt", "aten.eq", "aten.ne", "aten.isnan", "aten.isinf",
      "aten.isfinite", *_AND, *_OR)
def predicate(leaf: Leaf) -> Verdict:
    """Comparisons keep one bit of real inputs; and/or of two masks lose the operand that is masked."""
    boolean = all(isinstance(t, TensorType) and t.torch_dtype == torch.bool for t in leaf.inputs)
    if leaf.packet in _AND + _OR and boolean:
        if len(leaf.inputs) == 2:
            fill = leaf.packet in _OR  # the second operand decides: False for and, True for or

            def witness(g):
                t = leaf.inputs[0]
                other = torch.full(t.shape, fill, dtype=torch.bool)
                return (torch.zeros(t.shape, dtype=torch.bool), other), (
                    torch.ones(t.shape, dtype=torch.bool), other)
            return erasing("boolean", f"{leaf.packet}(a, b) ignores a where b is "
                           f"{'True' if fill else 'False'}", witness, "a flipped where b decides", None,
                           "discrete input")
        passing = leaf.packet in _AND  # the bound value that lets the activation through
        mask = leaf.arg("other" if leaf.is_hole("self") else "self")
        if mask is None:
            return gray("boolean", f"{leaf.packet} with one bound mask is injective iff the mask lets "
                        "every bit through", "the bound mask is all True (and) or all False (or)",
                        "its value")
        blocked = torch.broadcast_to(torch.as_tensor(mask) != passing, leaf.out.shape)
        if not bool(blocked.any()):
            return injective("boolean", f"the bound mask is all {passing}: {leaf.packet} passes its "
                             "operand through", lambda y: (_unbroadcast(y, leaf.x),), "identity")

        def witness(g):
            a = leaf.random(g)[0]
            flip = _unbroadcast(blocked, TensorType("bool", leaf.x.shape)) if blocked.shape != tuple(
                leaf.x.shape) else blocked
            return (a,), (a ^ flip,)
        return erasing("boolean", f"where the bound mask is {not passing}, {leaf.packet} ignores its "
                       "operand", witness, "the operand flipped where the mask decides", None,
                       "discrete input")
    if len(leaf.inputs) == 2:
        def witness(g):  # move both operands by the same integer: order and equality are kept
            a = tuple(_integral(t, g) for t in leaf.inputs)
            return a, tuple(x + 3 for x in a)
        text = "(x, y) and (x + 3, y + 3)"
    else:
        other = leaf.arg("other")
        far = 1000.0 + (float(torch.as_tensor(other).double().abs().max()) * 2
                        if isinstance(other, (int, float, torch.Tensor)) and torch.as_tensor(other).numel()
                        and bool(torch.isfinite(torch.as_tensor(other)).all()) else 0.0)

        def witness(g, far=far):  # two finite inputs beyond the threshold, on the same side of it
            x = _integral(leaf.inputs[0], g)
            x = (x.abs() + math.ceil(far)).to(x.dtype)
            return (x,), (x * 2,)
        text = "x and 2x, beyond the threshold"
    return erasing("predicate", f"{leaf.packet} is boolean-valued: it keeps one bit of each element",
                   witness, text, None, "a step function: its Jacobian is 0 almost everywhere")


def _integral(t: TensorType, g) -> torch.Tensor:
    if t.torch_dtype == torch.bool:
        return torch.rand(t.shape, generator=g) < 0.5
    return torch.randint(-4, 4, t.shape, generator=g).to(t.torch_dtype)


@rule("aten.where")
def where(leaf: Leaf) -> Verdict:
    if leaf.names.get("condition") is HOLE:
        branch = 1 if leaf.is_hole("self") else (2 if leaf.is_hole("other") else None)

        def witness(g):  # the condition picks the other branch everywhere: this one is not read
            a = list(leaf.random(g))
            a[0] = torch.full_like(a[0], branch != 1, dtype=torch.bool)
            b = list(a)
            if branch is not None:
                b[branch] = a[branch] + 1
            else:
                b[0] = ~a[0] & False
                a[0] = a[0] & False
            return tuple(a), tuple(b)
        if branch is None:
            a, b = leaf.arg("self"), leaf.arg("other")
            if a is None or b is None:
                return gray("selection", "where with only the condition free is injective iff its two "
                            "bound branches differ everywhere", "the branches differ everywhere",
                            "the branches' values")
            differ = torch.broadcast_to(torch.as_tensor(a) != torch.as_tensor(b), leaf.out.shape)
            if bool(differ.all()):
                return injective("selection", "the two bound branches differ everywhere, so the output "
                                 "tells which one the condition picked", lambda y: (_unbroadcast(
                                     y == torch.as_tensor(a).to(y.dtype), leaf.x),),
                                 "condition = (y == first branch)")
            return gray("selection", "the bound branches agree somewhere: the condition is lost there "
                        "unless it is broadcast from positions where they differ",
                        "each condition element meets a position where the branches differ",
                        "a per-element check")
        return erasing("selection", "where(c, x, y) does not read x where c is False (nor y where it "
                       "is True)", witness, "the condition picks the other branch; this one moved",
                       None, "data-dependent: the unread branch")
    if not leaf.bound_known():
        return gray("selection", "where with a bound condition reads each branch only where it selects",
                    "the condition selects every element of each activation branch",
                    "the condition's value")
    return selection(leaf)


@rule("aten.masked_fill")
def masked_fill(leaf: Leaf) -> Verdict:
    if leaf.is_hole("mask"):
        return gray("selection", "masked_fill with an activation mask hides the masked values",
                    "the mask is all False", "a rule for activation masks")
    return selection(leaf) if leaf.bound_known() else gray(
        "selection", "masked_fill erases the masked elements", "the mask is all False", "its value")


@rule("aten.zeros_like", "aten.ones_like", "aten.full_like", "aten.empty_like", "aten.new_zeros",
      "aten.new_ones", "aten.new_full", "aten.new_empty", "aten.scalar_tensor", "aten.rand_like",
      "aten.randn_like", "aten.sym_size", "aten.size")
def constant_of(leaf: Leaf) -> Verdict:
    def witness(g):
        a = leaf.random(g)
        return a, tuple(x + 1 if x.dtype != torch.bool else ~x for x in a)
    return erasing("constant", f"{leaf.packet} reads only its input's shape", witness, "x and x + 1",
                   _dof(leaf, sum(_numel(t) for t in leaf.inputs)))


# --------------------------------------------------------------------------------------- conversions

def _significand_bits(dt: torch.dtype) -> int:
    """p of a float dtype: every integer of magnitude <= 2**p is exact (float32: 24)."""
    return round(-math.log2(torch.finfo(dt).eps)) + 1


def _int_exact_in(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every value of the integer dtype ``src`` is exact in the float dtype ``dst``."""
    info = torch.iinfo(src)
    return max(abs(info.min), info.max) <= 2 ** _significand_bits(dst) and info.max <= torch.finfo(dst).max


def _float_exact_in(src: torch.dtype, dst: torch.dtype) -> bool:
    """Every value of the float dtype ``src`` is exact in ``dst``: no less precision, range or
    subnormal reach."""
    a, b = torch.finfo(src), torch.finfo(dst)
    return b.eps <= a.eps and b.max >= a.max and b.smallest_normal * b.eps <= a.smallest_normal * a.eps


def _float_collision(src: torch.dtype, dst: torch.dtype) -> tuple[float, float, str] | None:
    """Two distinct ``src`` values that ``dst`` rounds to one: 1 and the next float after it (less
    precision), two values past dst's largest (overflow to inf), or two subnormals (flush to 0)."""
    a, b = torch.finfo(src), torch.finfo(dst)
    if b.eps > a.eps:
        return 1.0, 1.0 + a.eps, f"1 and 1 + 2**{round(math.log2(a.eps))} (the next {src} after 1)"
    if b.max < a.max:
        top = 2.0 ** math.floor(math.log2(a.max))
        return a.max, top, f"{a.max:g} and {top:g} (both beyond {dst}'s largest)"
    tiny = a.smallest_normal * a.eps
    return tiny, 2 * tiny, f"{tiny:g} and {2 * tiny:g} (below {dst}'s smallest subnormal)"


def _conversion_pair(leaf: Leaf, src: torch.dtype, dst: torch.dtype):
    """(u, v, text): two distinct ``src`` values with one ``dst`` value, or None when every value of src
    survives (the conversion is injective)."""
    if dst == torch.bool:
        return 1, 2, "1 and 2 (both True)"
    if src.is_floating_point and not dst.is_floating_point:
        return 1.0, 1.5, "1 and 1.5 (truncation toward zero)"
    if not src.is_floating_point and not dst.is_floating_point:  # two's complement wraps mod 2**bits
        bits = torch.iinfo(dst).bits
        if torch.iinfo(src).bits <= bits:
            return None
        return 0, 2 ** bits, f"0 and 2**{bits} (wrap-around modulo 2**{bits})"
    if not src.is_floating_point:  # integer -> float: exact up to 2**p; 2**p + 1 rounds to even 2**p
        if _int_exact_in(src, dst):
            return None
        p = _significand_bits(dst)
        return 2 ** p, 2 ** p + 1, f"2**{p} and 2**{p} + 1 (rounded to even)"
    if _float_exact_in(src, dst):
        return None
    return _float_collision(src, dst)


@rule("aten._to_copy", "aten.to", "aten._to_dtype", "aten.type_as", "aten._autocast_to_reduced_precision",
      "aten._autocast_to_full_precision", "prims.convert_element_type")
def convert(leaf: Leaf) -> Verdict:
    """A dtype conversion as a map of the finite set of ``src`` values (a claim about the dtypes, not
    the reals: in the reals a conversion is the identity). Injective iff every src value has its own
    dst value: bool -> anything, integers to at least as many bits (uint8 <-> int8 is a bijection of
    256 values), integers into a float whose significand holds them (int32 -> float64), floats to a
    float with no less precision, range and subnormals. Otherwise two src values that really round (or
    wrap) to one dst value, checked by converting them."""
    if leaf.x is None or not isinstance(leaf.out, TensorType):
        return no_rule(leaf.op)
    src, dst = leaf.x.torch_dtype, leaf.out.torch_dtype
    if src == dst:
        return identity(leaf)
    if src.is_complex or dst.is_complex:
        return no_rule(leaf.op)
    pair = None if src == torch.bool else _conversion_pair(leaf, src, dst)
    if pair is None:
        def inverse(y):
            return ((y != 0) if src == torch.bool else y.to(src),)
        v = injective("exact conversion", f"every {src} value is exactly representable as a distinct "
                      f"{dst} value", inverse, f"convert back to {src}",
                      surjective=_conversion_onto(src, dst))
        v.extra["domain"] = "float"
        return v
    u, w, text = pair

    def witness(g, u=u, w=w):
        return (torch.full(leaf.x.shape, u, dtype=src),), (torch.full(leaf.x.shape, w, dtype=src),)
    (a,), (b,) = witness(None)
    if not (inputs_differ(a, b) and outputs_equal(leaf.call(a), leaf.call(b), 0, 0)):
        return gray("conversion", f"{src} -> {dst}: the expected collision {text} did not occur",
                    "every value converts distinctly", "an exact model of this conversion")
    v = erasing("rounding" if dst.is_floating_point or src.is_floating_point else "narrowing",
                f"{src} -> {dst} maps two {src} values to one: {text}", witness, text,
                0 if src.is_floating_point and dst.is_floating_point else None,
                "a floating-point collision: the map is the identity on the reals")
    v.extra["domain"] = "float"
    return v


def _conversion_onto(src: torch.dtype, dst: torch.dtype) -> bool:
    """An injective conversion onto its type: a bijection between integer dtypes of equal width."""
    return not src.is_floating_point and not dst.is_floating_point and src != torch.bool and \
        dst != torch.bool and torch.iinfo(src).bits == torch.iinfo(dst).bits


# --------------------------------------------------------------------------------------- linear maps

def _null_vector(w: torch.Tensor) -> torch.Tensor:
    """A unit vector v with w @ v = 0 (w has more columns than its rank)."""
    _, _, vh = torch.linalg.svd(w.double(), full_matrices=True)
    return vh[-1]


_EXACT_LIMIT = 32 * 32 * 128  # k d min(k, d): exact rational elimination well under a second


def _exact_rank(w: torch.Tensor) -> tuple[int, torch.Tensor | None] | None:
    """The rank of ``w`` in exact rational arithmetic on its stored values (every float is a dyadic
    rational), with a null vector (float64, unit norm) when it is deficient; None when too large."""
    from fractions import Fraction
    k, d = w.shape
    if k * d * min(k, d) > _EXACT_LIMIT:
        return None
    rows = [[Fraction(v) for v in row] for row in w.double().tolist()]
    pivots: list[int] = []
    r = 0
    for c in range(d):
        p = next((i for i in range(r, k) if rows[i][c] != 0), None)
        if p is None:
            continue
        rows[r], rows[p] = rows[p], rows[r]
        inv = 1 / rows[r][c]
        rows[r] = [v * inv for v in rows[r]]
        for i in range(k):
            if i != r and rows[i][c] != 0:
                f = rows[i][c]
                rows[i] = [a - f * b for a, b in zip(rows[i], rows[r])]
        pivots.append(c)
        r += 1
        if r == k:
            break
    if r == d:
        return r, None
    free = next(c for c in range(d) if c not in pivots)
    v = [Fraction(0)] * d
    v[free] = Fraction(1)
    for i, c in enumerate(pivots):  # reduced row echelon form: x_c = -R[i, free] x_free
        v[c] = -rows[i][free]
    out = torch.tensor([float(x) for x in v], dtype=torch.float64)
    return r, out / out.norm()


def _rank_info(w: torch.Tensor) -> tuple[str, dict, torch.Tensor | None]:
    """Whether ``w`` (k x d) has full column rank d, from its exact stored values:

    * "full": a float64 SVD of the stored values (exact in float64) gives sigma_min > tol =
      max(k, d) eps64 sigma_max. The computed singular values are those of w + E with
      ||E|| <= c eps64 ||w|| (backward stability), so each is within that of the true one: the true
      sigma_min > 0. The certificate records the method, tolerance and margin sigma_min / tol.
    * "deficient": exact rational elimination on the stored values finds rank < d (with an exact null
      vector), or d > k (rank-nullity).
    * "numerical": sigma_min <= tol and no exact decision (too large, or exactly full rank but
      sigma_min inside the rounding bound: injective in the reals, with no inverse to working precision).
    Returns (status, certificate, null vector or None)."""
    w64 = w.detach().to(torch.float64)
    k, d = w64.shape
    if d > k and k * d > _SVD_LIMIT and _gram_certificate(w64.T) is not None:
        # rank-nullity, and rank exactly k (full row rank, certified on W^T): no SVD of a large map
        return "deficient", {"method": "rank-nullity; full row rank by the Gram certificate of W^T",
                             "rank": k, "numerical_rank": k}, _null_vector_of(w64)
    if k * d > _SVD_LIMIT:
        gram = _gram_certificate(w64)
        if gram is not None:
            return "full", gram, None
    s = torch.linalg.svdvals(w64)
    smax = float(s.max()) if len(s) else 0.0
    smin = float(s[-1]) if k >= d and len(s) else 0.0
    tol = max(k, d) * float(torch.finfo(torch.float64).eps) * smax
    cert = {"method": "float64 SVD of the stored weight", "sigma_min": smin, "sigma_max": smax,
            "tolerance": tol, "tolerance_rule": "max(k, d) * eps64 * sigma_max",
            "margin": (smin / tol) if tol > 0 else 0.0, "numerical_rank": int((s > tol).sum())}
    if k >= d and smin > tol:
        cert["rank"] = d
        return "full", cert, None
    if d > k:
        cert["rank"] = int((s > tol).sum())
        return "deficient", cert, _null_vector(w64)
    exact = _exact_rank(w64)
    if exact is not None:
        cert["exact_rank"] = exact[0]
        cert["rank"] = exact[0]
        if exact[0] < d:
            cert["method"] = "exact rational elimination of the stored weight"
            return "deficient", cert, exact[1]
    cert["rank"] = cert["numerical_rank"]
    return "numerical", cert, None


_SVD_LIMIT = 1 << 16  # weight elements above which the Gram bound is tried before a float64 SVD


def _gram_certificate(w64: torch.Tensor) -> dict | None:
    """Full column rank of a large ``w`` (k x d, k >= d) from its float64 Gram matrix and Cholesky
    factorisations of shifted copies: a verified lower bound of sigma_min at a fraction of an SVD's
    cost (one d x d product and a few d x d Choleskys; the 50257 x 768 GPT-2 head included).

    The computed Gram G' = fl(W^T W) satisfies ||G' - W^T W||_2 <= e1 = gamma_k ||W||_F^2. A Cholesky
    of H = G' - s I that runs to completion in floating point factors H + E exactly with
    ||E||_2 <= e2 = c (||G'||_2 + s), c = d gamma_{d+1} / (1 - d gamma_{d+1}) (Demmel; Higham 10.5),
    so H + E is positive definite and
    lambda_min(W^T W) >= s - e1 - e2. With s = e1 + e2 + t, sigma_min(W) >= sqrt(t). The target t is
    tried from a tenth of the mean eigenvalue down; the last Cholesky pivot alone would bound sigma_min
    from above, not below, which is why the shift carries the bound. None when no shift succeeds (the
    caller falls back to the SVD)."""
    k, d = w64.shape
    u = float(torch.finfo(torch.float64).eps) / 2

    def gamma(n):
        return n * u / (1 - n * u)
    g = w64.T @ w64
    fro2 = float(w64.pow(2).sum())  # >= ||G'||_2 up to rounding
    e1 = gamma(k) * fro2
    mean = fro2 / d
    eye = torch.eye(d, dtype=torch.float64)
    c = d * gamma(d + 1) / (1 - d * gamma(d + 1))  # Higham, Theorem 10.5, with its 1/(1 - d gamma)
    for t in (mean * 1e-1, mean * 1e-3, mean * 1e-6, mean * 1e-10):
        # s = e1 + t + c (||G'|| + s), solved for s; then a relative 1e-6 and 8 u ||W||_F^2 more for the
        # rounding of fro2 itself and of forming G' - s I
        shift = (e1 + t + c * fro2 * (1 + gamma(k))) / (1 - c) * (1 + 1e-6) + 8 * u * fro2
        _, info = torch.linalg.cholesky_ex(g - shift * eye)
        if int(info) == 0:
            tol = (shift - t) ** 0.5
            return {"method": "float64 Gram matrix, Cholesky of a shifted copy (verified bound)",
                    "sigma_min": t ** 0.5, "sigma_min_is": "a verified lower bound",
                    "sigma_max_upper_bound": fro2 ** 0.5, "tolerance": tol,
                    "tolerance_rule": "sqrt(s - t): gamma_k ||W||_F^2 + c (||W||_F^2 + s), "
                                      "c = d gamma_(d+1) / (1 - d gamma_(d+1)), plus rounding slack",
                    "margin": t ** 0.5 / tol if tol > 0 else float("inf"), "numerical_rank": d, "rank": d}
    return None


def _linear_verdict(leaf: Leaf, w: torch.Tensor | None, d: int, k: int, rows: int, apply_pinv,
                    shift_input) -> Verdict:
    """y = x W^T (+ b) per row, x in R^d, y in R^k, ``rows`` independent rows."""
    if w is None:
        if k < d:
            return erasing("rank-nullity", f"a linear map R^{d} -> R^{k} has a null space of dimension "
                           f">= {d - k}", None, "x and x + v, v in the weight's null space (needs the "
                           "weights)", (d - k) * rows, "per row: d - k")
        return gray("rank", f"a linear map R^{d} -> R^{k} is injective iff its weight has full column "
                    f"rank {d}", f"rank(W) = {d}", "the weights (an SVD)", None)
    status, cert, null = _rank_info(w)
    if status == "full":
        cert["columns"] = d
        return injective("full column rank", f"W ({k}x{d}) has rank {d} = its column count "
                         f"({cert['method']}: sigma_min {cert['sigma_min']:.3g} > tolerance "
                         f"{cert['tolerance']:.3g}): W^+ W = I", apply_pinv,
                         "pseudo-inverse: x = (y - b) W^+^T", rank=cert, surjective=k == d)
    if status == "numerical":
        exact = "; exact rank full: injective in the reals" if cert.get("exact_rank") == d else ""
        v = gray("rank", f"W ({k}x{d}) is numerically rank-deficient: sigma_min {cert['sigma_min']:.3g} "
                 f"at tolerance {cert['tolerance']:.3g}{exact}", f"rank(W) = {d}",
                 "exact arithmetic on the weight (too large here), or a better-conditioned weight", None)
        v.rank = cert
        return v
    r = cert["rank"]

    def witness(g, null=null):
        a = leaf.random(g)
        return a, shift_input(a, null)
    v = erasing("rank-nullity", f"W ({k}x{d}) has rank {r} < {d} ({cert['method']}): x and x + v collide "
                "for v in its null space", witness, "x and x + v, v a null vector of W", (d - r) * rows,
                "per row: d - rank(W)")
    v.rank = cert
    return v


def _add_to_last(a: tuple, v: torch.Tensor, index: int = 0):
    x = a[index]
    scale = x.abs().max().clamp(min=1)
    out = list(a)
    out[index] = x + (v * scale).to(x.dtype)
    return tuple(out)


@rule("aten.linear")
def linear(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["input"] or leaf.x is None:
        return _bilinear_or_none(leaf)
    w = leaf.arg("weight")
    d, k = leaf.x.shape[-1], leaf.out.shape[-1]
    rows = leaf.x.numel // max(d, 1)

    def inverse(y, w=w):
        b = leaf.arg("bias")
        yd = y.double() - (b.double() if b is not None else 0)
        return ((yd @ torch.linalg.pinv(w.double()).T).to(y.dtype),)
    return _linear_verdict(leaf, w, d, k, rows, inverse, lambda a, v: _add_to_last(a, v))


@rule("aten.addmm")
def addmm(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["mat1"] or leaf.x is None:
        return _bilinear_or_none(leaf)
    m2 = leaf.arg("mat2")
    w = m2.T if m2 is not None else None
    beta, alpha = leaf.arg("beta", 1), leaf.arg("alpha", 1)
    d, k = leaf.x.shape[-1], leaf.out.shape[-1]

    def inverse(y, w=w):
        b = leaf.arg("self")
        yd = y.double() - beta * (b.double() if b is not None else 0)
        return ((yd / alpha @ torch.linalg.pinv(w.double()).T).to(y.dtype),)
    if alpha == 0:
        return constant_of(leaf)
    return _linear_verdict(leaf, w, d, k, leaf.x.shape[0], inverse, lambda a, v: _add_to_last(a, v))


@rule("aten.mm", "aten.matmul", "aten.bmm")
def matmul(leaf: Leaf) -> Verdict:
    if leaf.hole_args == ["self"] and leaf.x is not None and leaf.x.shape:
        w2 = leaf.arg("mat2" if "mat2" in leaf.names else "other")
        if w2 is None or w2.dim() == 2:
            w = w2.T if w2 is not None else None
            d = leaf.x.shape[-1]
            k = leaf.out.shape[-1] if leaf.out.shape else 1

            def inverse(y, w=w):
                return ((y.double() @ torch.linalg.pinv(w.double()).T).to(y.dtype),)
            return _linear_verdict(leaf, w, d, k, leaf.x.numel // max(d, 1), inverse,
                                   lambda a, v: _add_to_last(a, v))
    if leaf.hole_args == ["other"] and len(leaf.inputs) == 1 and leaf.x is not None and \
            len(leaf.x.shape) >= 2:
        w = leaf.arg("self")
        if w is None or w.dim() == 2:  # y = W x on each column of x
            d = leaf.x.shape[-2]
            k = leaf.out.shape[-2]

            def inverse(y, w=w):
                return ((torch.linalg.pinv(w.double()) @ y.double()).to(y.dtype),)

            def shift(a, v):
                x = a[0]
                scale = x.abs().max().clamp(min=1)
                return (x + (v * scale).reshape(-1, 1).to(x.dtype),)
            return _linear_verdict(leaf, w, d, k, leaf.x.numel // max(d, 1), inverse, shift)
    return _bilinear_or_none(leaf)


def _bilinear_or_none(leaf: Leaf) -> Verdict:
    if len(leaf.inputs) == 1 and _float(leaf.x) and len(leaf.hole_args) == 1:  # a batched bound operand
        return _operator_verdict(leaf)
    if len(leaf.hole_args) == 2 and all(_float(t) for t in leaf.inputs):
        a_t, b_t = leaf.inputs
        lost = None
        if len(a_t.shape) >= 2 and len(b_t.shape) >= 2:
            m, n = a_t.shape[-2:]
            p = b_t.shape[-1]
            batch = _numel(leaf.out) // max(m * p, 1)
            per = n * n if n < min(m, p) else n * (m + p) - m * p
            lost = per * batch
        return erasing("bilinear", "a product of two activations is unchanged by (2a, b/2)",
                       lambda g: (lambda a: (a, (a[0] * 2, a[1] / 2)))(leaf.random(g)),
                       "(a, b) and (2a, b/2)", lost,
                       "per product: n^2 if n < min(m, p) (A G, G^-1 B), else n(m + p) - mp")
    return no_rule(leaf.op)


@rule("aten.convolution", "aten.conv1d", "aten.conv2d", "aten.conv3d")
def convolution(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["input"] or leaf.x is None:
        return no_rule(leaf.op)
    per_in = leaf.x.numel // leaf.x.shape[0]
    per_out = leaf.out.numel // leaf.out.shape[0]
    batch = leaf.x.shape[0]
    small = per_in <= 4096 and per_in * per_out <= 1 << 21  # an SVD in well under a second
    operator = _conv_operator(leaf) if small and leaf.bound_known() else None
    if operator is None:
        if per_out < per_in:
            local = _conv_local_plan(leaf) if leaf.bound_known() else None
            return erasing("rank-nullity", f"a convolution R^{per_in} -> R^{per_out} per example has a "
                           f"null space of dimension >= {per_in - per_out}",
                           _local_witness(leaf, local) if local is not None else None,
                           "x + v, v a null vector of the operator restricted to a block of inputs with "
                           "more elements than the outputs it touches (needs the weights)",
                           (per_in - per_out) * batch)
        return gray("rank", f"a convolution R^{per_in} -> R^{per_out} per example is injective iff its "
                    "operator has full column rank", f"rank = {per_in}",
                    "the operator's SVD (weights known, at most 4096 inputs per example)")

    def pinv_apply(y, op=operator):
        b = leaf.arg("bias")
        shape = leaf.out.shape
        bias = b.double().reshape((1, -1) + (1,) * (len(shape) - 2)) if b is not None else 0
        flat = (y.double() - bias).reshape(batch, -1)
        return ((flat @ torch.linalg.pinv(op).T).reshape(leaf.x.shape).to(y.dtype),)

    def shift(a, v):
        out = a[0].clone()
        scale = out.abs().max().clamp(min=1)
        out[0] += (v * scale).reshape(out.shape[1:]).to(out.dtype)
        return (out,)
    return _linear_verdict(leaf, operator, per_in, per_out, batch, pinv_apply, shift)


_LOCAL_COLUMNS = 4096  # the largest block (input elements) a local null vector is sought on


def _null_vector_of(a: torch.Tensor) -> torch.Tensor:
    """A unit vector v with a @ v = 0, for a matrix with fewer rows than columns (float64). Small: the
    SVD; large: solve on the first columns (a check, and QR as the fallback)."""
    rows, cols = a.shape
    if rows == 0:
        return torch.nn.functional.one_hot(torch.tensor(0), cols).double()
    if cols <= 1024:
        return _null_vector(a)
    try:
        z = torch.linalg.solve(a[:, :rows], -a[:, rows])
        v = torch.cat([z, torch.ones(1, dtype=a.dtype), torch.zeros(cols - rows - 1, dtype=a.dtype)])
        v = v / v.norm()
        if bool(torch.isfinite(v).all()) and float((a @ v).norm()) <= 1e-10 * float(a.norm()):
            return v
    except RuntimeError:  # singular leading block
        pass
    q, _ = torch.linalg.qr(a.T, mode="complete")
    return q[:, -1]


def _local_witness(leaf: Leaf, plan: Callable[[], tuple[tuple, torch.Tensor]]):
    """The witness x and x + v, v a null vector of a linear op supported on one block of example 0.
    ``plan()`` gives (the block's index into an example, v shaped as the block); computed once."""
    cache: list = []

    def witness(g):
        if not cache:
            cache.append(plan())
        index, v = cache[0]
        a = leaf.random(g)[0]
        b = a.clone()
        b[(0, *index)] += (v * a.abs().max().clamp(min=1)).to(a.dtype)
        return (a,), (b,)
    return witness


def _conv_local_plan(leaf: Leaf):
    """A block of input elements (all channels, a box of positions) whose count exceeds the number of
    outputs its elements reach, found from the convolution's geometry; None if none within
    ``_LOCAL_COLUMNS`` elements. Returns a callable building (block index, null vector on the block):
    the convolution of the block alone, placed in a crop of the zero-padded input, gives exactly the
    outputs it reaches (valid convolution on the crop; those outside the output are dropped)."""
    names = dict(leaf.names)
    if leaf.packet == "aten.convolution" and names.get("transposed"):
        return None
    w = leaf.arg("weight")
    nd = len(leaf.x.shape) - 2
    if w is None or nd < 1 or nd > 3:
        return None

    def per_dim(v, default):
        v = default if v is None else v
        v = [v] if isinstance(v, int) else list(v)
        return v * nd if len(v) == 1 else v
    ks = list(w.shape[2:])
    stride, dil = per_dim(leaf.arg("stride"), 1), per_dim(leaf.arg("dilation"), 1)
    groups = leaf.arg("groups") or 1
    padding = leaf.arg("padding")
    if isinstance(padding, str):
        pad = [0] * nd if padding == "valid" else [d * (k - 1) // 2 for d, k in zip(dil, ks)]
    else:
        pad = per_dim(padding, 0)
    c_in, c_out = leaf.x.shape[1], leaf.out.shape[1]
    sizes, outs = leaf.x.shape[2:], leaf.out.shape[2:]

    def dim_plan(i, length):
        """(rows reached, offset r, first and last output) of a block of ``length`` along dim i."""
        n, s, p, ext = sizes[i], stride[i], pad[i], (ks[i] - 1) * dil[i]
        best = None
        centre = max(0, (n - length) // 2)
        for r in {0, *range(centre, min(centre + s, n - length + 1))}:
            lo = max(0, -((ext - r - p) // s))  # ceil((r + p - ext) / s)
            hi = min(outs[i] - 1, (r + p + length - 1) // s)
            count = max(0, hi - lo + 1)
            if best is None or count < best[0]:
                best = (count, r, lo, hi)
        return best
    for length in range(1, max(sizes) + 1):
        lengths = [min(length, n) for n in sizes]
        plans = [dim_plan(i, m) for i, m in enumerate(lengths)]
        cols = c_in * math.prod(lengths)
        if cols > _LOCAL_COLUMNS:
            return None
        if cols > c_out * math.prod(pl[0] for pl in plans):
            break
        if all(m == n for m, n in zip(lengths, sizes)):
            return None
    else:
        return None

    def build():
        fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
              3: torch.nn.functional.conv3d}[nd]
        crop, place, keep = [], [], []
        for i, ((count, r, lo, hi), m) in enumerate(zip(plans, lengths)):
            s, p, ext = stride[i], pad[i], (ks[i] - 1) * dil[i]
            c0 = s * (min(lo * s, r + p) // s)
            c1 = max(hi * s + ext + 1, r + p + m, c0 + ext + 1)
            crop.append(c1 - c0)
            place.append(slice(r + p - c0, r + p - c0 + m))
            first = c0 // s
            keep.append(slice(lo - first, hi - first + 1) if count else slice(0, 0))
        basis = torch.zeros((cols, c_in, *crop), dtype=torch.float64)
        eye = torch.eye(cols, dtype=torch.float64).reshape((cols, c_in, *lengths))
        basis[(slice(None), slice(None), *place)] = eye
        out = fn(basis, w.double(), None, stride, 0, dil, groups)
        rows = out[(slice(None), slice(None), *keep)].reshape(cols, -1).T
        v = _null_vector_of(rows)
        index = (slice(None),) + tuple(slice(pl[1], pl[1] + m) for pl, m in zip(plans, lengths))
        return index, v.reshape(c_in, *lengths)
    return build


def _conv_operator(leaf: Leaf) -> torch.Tensor:
    """The per-example matrix of a convolution without bias (columns: input elements)."""
    per_in = leaf.x.numel // leaf.x.shape[0]
    basis = torch.eye(per_in, dtype=torch.float64).reshape((per_in,) + tuple(leaf.x.shape[1:]))
    names = dict(leaf.names)
    w = leaf.arg("weight").double()
    args = {k: leaf.arg(k) for k in ("stride", "padding", "dilation", "groups")}
    fn = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d,
          5: torch.nn.functional.conv3d}[len(leaf.x.shape)]
    if leaf.packet == "aten.convolution" and names.get("transposed"):
        raise ValueError("transposed convolution")
    padding = args["padding"]
    if isinstance(padding, str):
        out = fn(basis, w, None, args["stride"], padding, args["dilation"], args["groups"])
    else:
        out = fn(basis, w, None, args["stride"], tuple(padding), args["dilation"], args["groups"])
    return out.reshape(per_in, -1).T


@rule("aten.embedding")
def embedding(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["indices"] or leaf.x is None:
        return no_rule(leaf.op)
    w = leaf.arg("weight")
    vocab = w.shape[0] if w is not None else None

    def sample(g):
        n = vocab or 8
        return (torch.randint(0, n, leaf.x.shape, generator=g, dtype=leaf.x.torch_dtype),)
    if w is None:
        return gray("distinct rows", "an embedding is injective on token ids iff its rows are distinct",
                    "the rows of the weight are pairwise distinct", "the weights", None, sample=sample)
    _, inverse_idx, counts = torch.unique(w, dim=0, return_inverse=True, return_counts=True)
    if int(counts.max()) == 1:
        def inverse(y, w=w):
            flat = y.reshape(-1, w.shape[1]).double()
            idx = torch.cdist(flat, w.double()).argmin(dim=1)
            return (idx.reshape(leaf.x.shape).to(leaf.x.torch_dtype),)
        v = sample
        return Verdict("S", "distinct rows", f"the {vocab} rows of the weight are pairwise distinct "
                       "(checked): the nearest row recovers the id", None, "discrete input",
                       inverse=inverse, sample=v, extra={"inverse_text": "nearest row of the weight"})
    dup = int(torch.nonzero(counts > 1)[0])
    ids = torch.nonzero(inverse_idx == dup).flatten()[:2]

    def witness(g):
        return ((torch.full(leaf.x.shape, int(ids[0]), dtype=leaf.x.torch_dtype),),
                (torch.full(leaf.x.shape, int(ids[1]), dtype=leaf.x.torch_dtype),))
    return erasing("equal rows", f"rows {int(ids[0])} and {int(ids[1])} of the weight are equal",
                   witness, f"ids {int(ids[0])} and {int(ids[1])}", None, "discrete input",
                   sample=sample)


@rule("aten.one_hot")
def one_hot(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return no_rule(leaf.op)
    n = leaf.arg("num_classes", -1)
    n = leaf.out.shape[-1] if n in (None, -1) else n
    return Verdict("S", "one-hot", "one_hot(i) has its single 1 at i: argmax recovers i (ids in range)",
                   None, "discrete input", inverse=lambda y: (y.argmax(-1).to(leaf.x.torch_dtype),),
                   sample=lambda g: (torch.randint(0, n, leaf.x.shape, generator=g,
                                                   dtype=leaf.x.torch_dtype),),
                   extra={"inverse_text": "argmax"})


@rule("aten.cumsum")
def cumsum(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return no_rule(leaf.op)
    dim = leaf.arg("dim") % max(len(leaf.x.shape), 1)

    def inverse(y):
        return (torch.diff(y.double(), dim=dim, prepend=torch.zeros_like(y.double().narrow(dim, 0, 1)))
                .to(leaf.x.torch_dtype),)
    return injective("triangular", "a running sum is a unit lower-triangular linear map: differences "
                     "invert it", inverse, "differences along the summed axis",
                     surjective=leaf.out.dtype == leaf.x.dtype)


# ------------------------------------------------------------------------- normalisations, reductions

def _rows(leaf: Leaf, per_row: int) -> int:
    return leaf.x.numel // max(per_row, 1)


def _shift_witness(leaf: Leaf, index: int = 0, scale: float = 1.0):
    def witness(g):
        a = leaf.random(g)
        b = list(a)
        b[index] = a[index] + 1.5 * scale
        return a, tuple(b)
    return witness


@rule("aten.layer_norm", "aten.native_layer_norm")
def layer_norm(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["input"] or leaf.x is None:
        return no_rule(leaf.op)
    shape = list(leaf.arg("normalized_shape"))
    d = math.prod(shape)
    eps = leaf.arg("eps", 1e-5)
    rows = _rows(leaf, d)
    per = 1 if eps > 0 else 2
    plain = erasing("shift invariance", "LN(x + c) = LN(x) for any c added to a whole row"
                    + ("" if eps > 0 else "; with eps = 0 also LN(a x) = LN(x)"),
                    _shift_witness(leaf), "x and x + 1.5 (every element)", per * rows,
                    "per row: 1 (the mean) with eps > 0; scale is kept, since mean(z^2) = var/(var + eps) "
                    "determines var; 2 with eps = 0")
    if leaf.packet == "aten.native_layer_norm":
        return _with_statistics(leaf, plain, lambda t: t, lambda t: t, "each row's mean and 1/std",
                                per_channel=False)  # weight and bias of the normalised shape
    return plain


def _with_statistics(leaf: Leaf, plain: Verdict, grouped, ungrouped, what: str, stats=lambda t: t,
                     per_channel: bool = True) -> Verdict:
    """A normalisation that also returns the mean and 1/std it used: ``out = (x - mean) rstd w + b``
    per group, so ``x = ((out - b) / w) / rstd + mean``, injective when w has no zero (rstd > 0; with
    eps = 0 a constant group has rstd = 1/0, returned as inf or, on CPU, 0: there x is the mean). ``grouped`` reshapes a tensor of x's
    shape so that the mean and 1/std (reshaped by ``stats``) broadcast against it, ``ungrouped`` reshapes
    it back. The verdict of the
    normalised output alone (``B(getitem(_, 0), op)``, shift invariant) is ``extra["output_only"]``."""
    w, b = leaf.arg("weight"), leaf.arg("bias")
    if w is None and leaf.names.get("weight") is not None:
        v = gray("normalisation with statistics", f"{leaf.packet} also returns {what}, from which the "
                 "input is recovered when the weight has no zero", "the weight has no zero element",
                 "the weight's value", 0)
    elif w is not None and not bool((w != 0).all()):
        v = gray("normalisation with statistics", f"{leaf.packet} also returns {what}, but a zero weight "
                 "hides its features' deviations", "at most one feature per group has a zero weight "
                 "(then the mean recovers it)", "a finer rule for zero weights", None)
    else:
        shape = (1, -1) + (1,) * (len(leaf.x.shape) - 2) if per_channel else None  # w, b: channels

        def inverse(y):
            out, mean, rstd = y[0], y[1], y[2]
            z = out.double()
            if b is not None:
                z = z - (b.double().reshape(shape) if shape else b.double())
            if w is not None:
                z = z / (w.double().reshape(shape) if shape else w.double())
            z, m, r = grouped(z), stats(mean.double()), stats(rstd.double())
            x = torch.where(torch.isinf(r) | (r == 0), m, z / r + m)  # 1/0: inf, or 0 on CPU
            return (ungrouped(x).reshape(leaf.x.shape).to(out.dtype),)
        v = injective("normalisation with statistics", f"{leaf.packet} also returns {what}: out = (x - "
                      "mean) rstd w + b with rstd > 0 and w without zeros, so x = (out - b) / (w rstd) + "
                      "mean", inverse, "x = (out - b) / (w rstd) + mean")
    v.extra["output_only"] = plain
    return v


@rule("aten.group_norm", "aten.native_group_norm")
def group_norm(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["input"] or leaf.x is None:
        return no_rule(leaf.op)
    groups = leaf.arg("num_groups", leaf.arg("group", 1))
    plain = erasing("shift invariance", "GN(x + c) = GN(x) for c constant over a group",
                    _shift_witness(leaf), "x and x + 1.5", groups * leaf.x.shape[0],
                    "1 per (example, group)")
    if leaf.packet == "aten.native_group_norm":
        n = leaf.x.shape[0]
        return _with_statistics(leaf, plain, lambda t: t.reshape(n, groups, -1), lambda t: t,
                                "each (example, group)'s mean and 1/std", lambda t: t.reshape(n, groups, 1))
    return plain


@rule("aten.rms_norm")
def rms_norm(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["input"] or leaf.x is None:
        return no_rule(leaf.op)
    d = math.prod(leaf.arg("normalized_shape"))
    eps = leaf.arg("eps")
    eps = float(torch.finfo(leaf.x.torch_dtype).eps) if eps is None else eps
    w = leaf.arg("weight")
    return rms_verdict(leaf.x, d, eps, w, leaf)


def rms_verdict(x_type: TensorType, d: int, eps: float, weight, leaf=None) -> Verdict:
    """x -> x / sqrt(mean(x^2) + eps) (* w): injective iff eps > 0 (and w has no zero)."""
    rows = x_type.numel // max(d, 1)
    if eps <= 0:
        def witness(g):
            a = random_value(x_type, g)
            return (a,), (a * 2,)
        return erasing("scale invariance", "with eps = 0, RMSNorm(a x) = RMSNorm(x) for a > 0", witness,
                       "x and 2x", rows, "1 per row (the scale)")
    if weight is not None and not bool((weight != 0).all()):
        return gray("RMSNorm", "a zero weight erases its feature", "the weight has no zero",
                    "its value", None)

    def inverse(y):
        yd = y.double()
        if weight is not None:
            yd = yd / weight.double()
        s = (yd * yd).sum(-1, keepdim=True)
        u = eps / (1 - s / d)
        return ((yd * torch.sqrt(u)).to(y.dtype),)
    # the inverse divides by 1 - |y|^2/d = eps / (mean(x^2) + eps): well conditioned for |x| ~ sqrt(eps),
    # where its round trip is sampled (at |x| >> sqrt(eps) the map is injective but flat in |x|)
    return injective("RMSNorm, eps > 0", "y = x / sqrt(|x|^2/d + eps) keeps x's direction, and |y| is "
                     "strictly increasing in |x| when eps > 0: |x|^2/d + eps = eps / (1 - |y|^2/d)",
                     inverse, "x = y sqrt(eps / (1 - |y|^2/d))",
                     sample=lambda g: (random_value(x_type, g, math.sqrt(eps)),))


@rule("aten._softmax", "aten.softmax", "aten._log_softmax", "aten.log_softmax")
def softmax(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return no_rule(leaf.op)
    dim = leaf.arg("dim") % len(leaf.x.shape)
    return erasing("shift invariance", f"{leaf.packet}(x + c) = {leaf.packet}(x) for c constant along "
                   "the normalised axis", _shift_witness(leaf), "x and x + 1.5",
                   _rows(leaf, leaf.x.shape[dim]), "1 per row")


@rule("aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
      "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_flash_attention")
def attention(leaf: Leaf) -> Verdict:
    names = leaf.hole_args
    if "key" in names:
        index = names.index("key")

        def witness(g):
            a = leaf.random(g)
            b = list(a)
            b[index] = a[index] + 0.75  # the same vector added to every key: q.(k + c) shifts a row
            return a, tuple(b)
        return erasing("shift invariance", "adding one vector c to every key adds q.c to a whole row of "
                       "scores, which softmax ignores", witness, "keys k and k + 0.75", None,
                       "not derived (at least the head size per batch and head: the key shift)")
    return no_rule(leaf.op)


def _reduced(leaf: Leaf) -> list[int]:
    dims = leaf.arg("dim")
    rank = len(leaf.x.shape)
    if dims is None or dims == ():
        return list(range(rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(d % rank for d in dims)


@rule("aten.mean", "aten.sum", "aten.prod", "aten.var", "aten.std", "aten.amax", "aten.amin",
      "aten.max", "aten.min", "aten.argmax", "aten.argmin", "aten.logsumexp", "aten.norm",
      "aten.linalg_vector_norm", "aten.all", "aten.any", "aten.var_mean")
def reduction(leaf: Leaf) -> Verdict:
    if leaf.x is None or not leaf.x.shape:
        return no_rule(leaf.op)
    if leaf.packet in ("aten.max", "aten.min") and leaf.op.endswith((".default", ".dim")) is False:
        return no_rule(leaf.op)
    dims = _reduced(leaf) if leaf.packet not in ("aten.max", "aten.min") or leaf.op.endswith(".dim") \
        else list(range(len(leaf.x.shape)))
    group = math.prod(leaf.x.shape[d] for d in dims)
    if group <= 1:
        return selection(leaf)
    extreme = leaf.packet in ("aten.amax", "aten.amin", "aten.max", "aten.min", "aten.argmax",
                              "aten.argmin")
    lowest = leaf.packet in ("aten.amax", "aten.max", "aten.argmax")

    def witness(g):
        a = leaf.random(g)[0]
        if extreme:  # push every non-extreme element further from the extreme
            b = a.clone().double()
            ref = b.amax(dim=dims, keepdim=True) if lowest else b.amin(dim=dims, keepdim=True)
            b = torch.where(b != ref, b - 1 if lowest else b + 1, b)
            return (a,), (b.to(a.dtype),)
        # a symmetric reduction (sum, mean, prod, var, std, norms, logsumexp, all, any, var_mean) is
        # unchanged when two unequal elements of one group trade places: in every group, the elements at
        # index 0 and 1 of a reduced axis of size >= 2 (index 0 on the other reduced axes)
        axis = next(d for d in dims if leaf.x.shape[d] >= 2)
        first, second = [slice(None)] * a.dim(), [slice(None)] * a.dim()
        for d in dims:
            first[d] = second[d] = 0
        first[axis], second[axis] = 0, 1
        first, second = tuple(first), tuple(second)
        a = a.clone()
        if a.dtype == torch.bool:
            a[first], a[second] = True, False
        else:
            a[second] = a[first] + 1
        b = a.clone()
        b[first], b[second] = a[second], a[first]
        return (a,), (b,)
    lost = leaf.x.numel - leaf.x.numel // group
    return erasing("reduction", f"{leaf.packet} summarises groups of {group} elements by one value",
                   witness, "two unequal elements of a group swapped (symmetric reductions), or the "
                   "non-extreme ones moved further from the extreme (max)", _dof(leaf, lost) if not extreme else None,
                   "input size minus output size" if not extreme else "data-dependent (a step function)")


@rule("aten.max_pool2d", "aten.max_pool1d", "aten.max_pool3d", "aten.max_pool2d_with_indices",
      "aten.max_pool1d_with_indices", "aten.max_pool3d_with_indices", "aten.adaptive_max_pool2d",
      "aten.adaptive_max_pool1d", "aten.adaptive_max_pool3d")
def max_pool(leaf: Leaf) -> Verdict:
    """A max pool is injective iff every input element is the only (real, unpadded) element of some
    window: then that window's output is a copy of it. Otherwise an element e that is in no window, or
    only in windows holding another element, is erased: make it the strict minimum of its map and lower
    it further; no window's maximum (nor argmax) moves. Windows are read off by running the pool on
    distinct codes: a window is a singleton iff its max and its min (the pool of -codes) agree."""
    if leaf.x is None or not _float(leaf.x):
        return no_rule(leaf.op)
    n = leaf.x.numel
    if n > _SELECTION_LIMIT:
        return gray("max pool", "a max pool is injective iff every element is alone in some window",
                    "every element is alone in some window", "coding its inputs (too large here)")
    codes = torch.arange(n, dtype=torch.float64).reshape(leaf.x.shape)
    top = _out_parts(leaf.call(codes))[0]
    bottom = -_out_parts(leaf.call(-codes))[0]
    alone = top == bottom
    owner = torch.full((n,), -1, dtype=torch.long)
    where = torch.nonzero(alone).flatten()
    owner.scatter_reduce_(0, top[where].long(), where, reduce="amin", include_self=False)
    erased = torch.nonzero(owner < 0).flatten()
    if len(erased) == 0:
        def inverse(y, owner=owner, shape=leaf.x.shape):
            return (_out_parts(y)[0][owner].reshape(shape),)
        return injective("max pool", "every input element is alone in some window (kernel 1 or "
                         "non-overlapping singleton windows), whose output copies it", inverse,
                         "gather each element from its singleton window")
    e = int(erased[0])

    def witness(g, e=e):
        a = leaf.random(g)[0].clone().reshape(-1)
        a[e] = a.min() - 1  # the strict minimum of everything: no window's maximum
        b = a.clone()
        b[e] = a[e] - 1
        return (a.reshape(leaf.x.shape),), (b.reshape(leaf.x.shape),)
    return erasing("max pool", f"{len(erased)} of the {n} input elements are alone in no window: such an "
                   "element, made the strict minimum, is no window's maximum", witness,
                   f"input element {e} as the strict minimum, then lowered by 1", None, "data-dependent")


@rule("aten.adaptive_avg_pool2d", "aten.adaptive_avg_pool1d", "aten.avg_pool2d", "aten.avg_pool1d",
      "aten._adaptive_avg_pool2d", "aten.mean_pool")
def avg_pool(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return no_rule(leaf.op)
    if leaf.out.numel >= leaf.x.numel:
        return gray("rank", "an average pool that does not shrink is injective iff its operator has full "
                    "column rank", "full column rank", "the operator's SVD")
    per_in = leaf.x.numel // max(leaf.x.shape[0], 1)
    witness = (lambda g: _avg_witness(leaf, g)) if per_in <= 4096 else _pool_local_witness(leaf)
    return erasing("rank-nullity", f"an average pool R^{leaf.x.numel} -> R^{leaf.out.numel} is linear "
                   "and shrinks", witness, "a null vector of the pooling operator (restricted to a block "
                   "of one map when it is large)", leaf.x.numel - leaf.out.numel,
                   "input minus output size (each window's average is one linear form)")


def _pool_local_witness(leaf: Leaf):
    """For a large pool: a box of elements of the first map whose count exceeds the number of outputs
    they reach (the rows of the pool on the box's basis vectors that are not zero), then a null vector
    on it. None if no box of up to 256 elements at a corner does."""
    if len(leaf.x.shape) < 3:
        return None
    sizes = leaf.x.shape[2:]
    for length in range(1, 17):
        lengths = [min(length, n) for n in sizes]
        cols = math.prod(lengths)
        if cols > 256:
            return None
        basis = torch.zeros((cols, *leaf.x.shape[1:]), dtype=torch.float64)
        index = (0, *(slice(0, m) for m in lengths))
        basis[(slice(None), *index)] = torch.eye(cols, dtype=torch.float64).reshape((cols, *lengths))
        out = leaf.call(basis).reshape(cols, -1)
        rows = out[:, (out != 0).any(0)].T
        if rows.shape[0] < cols:
            v = _null_vector_of(rows).reshape(lengths)
            return _local_witness(leaf, lambda: (index, v))
        if all(m == n for m, n in zip(lengths, sizes)):
            return None
    return None


def _avg_witness(leaf: Leaf, g):
    a = leaf.random(g)[0]
    per_in = a[0:1].numel()
    if per_in > 4096:
        raise ValueError("operator too large for a witness")
    basis = torch.eye(per_in, dtype=torch.float64).reshape((per_in,) + tuple(a.shape[1:]))
    op = leaf.call(basis.to(a.dtype)).reshape(per_in, -1).T.double()
    v = _null_vector(op)
    b = a.clone()
    b[0] += (v * 2).reshape(a.shape[1:]).to(a.dtype)
    return (a,), (b,)


# ------------------------------------------------------------------------------- modes: dropout, BN

@rule("aten.native_dropout", "aten.dropout", "aten.feature_dropout", "aten.alpha_dropout")
def dropout(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return no_rule(leaf.op)
    p, train = leaf.arg("p"), leaf.arg("train")
    if not train or p == 0:
        v = injective("identity", f"dropout with p = {p} in {'training' if train else 'eval'} mode is "
                      "the identity", lambda y: ((y[0] if isinstance(y, tuple) else y),), "identity",
                      surjective=isinstance(leaf.out, TensorType))  # native_dropout: (x, all-True mask)
        return v
    if p >= 1:
        return constant_of(leaf)

    def seeded(g, tries=1000):
        """(a, b, seed): under torch.manual_seed(seed) the mask drops at least one element, and b is a
        plus 1 on the dropped elements. Dropped elements are those whose output does not move when
        the input does (dropout, feature and alpha dropout alike). The last global seed set is the
        one returned (a caller replays it)."""
        a = leaf.random(g)[0]
        with torch.random.fork_rng(devices=[]):
            for _ in range(tries):
                seed = int(torch.randint(0, 2 ** 31, (1,), generator=g))
                outs = []
                for x in (a, a + 1):
                    torch.manual_seed(seed)
                    y = leaf.call(x)
                    outs.append(y[0] if isinstance(y, tuple) else y)
                dropped = outs[0] == outs[1]
                if bool(dropped.any()):
                    torch.manual_seed(seed)
                    return (a,), (torch.where(dropped, a + 1, a),), seed
        raise ValueError(f"no element dropped in {tries} draws of the mask")

    def witness(g):
        return seeded(g)[:2]
    v = erasing("dropout", f"dropout with p = {p} in training zeroes each element with probability p: "
                "a dropped element is erased (for the mask drawn, replayed by seed)", witness,
                "x and x + 1 on the dropped elements (same seed, drawn until the mask drops one)", None,
                f"data-dependent: p n = {p * leaf.x.numel:g} expected")
    v.extra["seeded_witness"] = seeded
    v.extra["replay_seed"] = True
    return v


@rule("aten._native_batch_norm_legit_no_training", "aten._native_batch_norm_legit_functional",
      "aten._native_batch_norm_legit", "aten.native_batch_norm", "aten.batch_norm",
      "aten._batch_norm_with_update", "aten._batch_norm_no_update")
def batch_norm(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["input"] or leaf.x is None:
        return no_rule(leaf.op)
    train = leaf.arg("training", leaf.packet in ("aten._native_batch_norm_legit_functional",
                                                 "aten._batch_norm_with_update"))
    if leaf.op == "aten._native_batch_norm_legit_no_training.default" or \
            leaf.packet == "aten._batch_norm_no_update":
        train = False
    if train:
        c = leaf.x.shape[1]
        plain = erasing("shift invariance", "in training, batch norm uses the batch's statistics: adding "
                        "a constant to one channel across the whole batch changes nothing",
                        _shift_witness(leaf), "x and x + 1.5", c, "1 per channel, over the batch")
        if isinstance(leaf.out, TupleType) and len(leaf.out.items) >= 3:  # (out, mean, 1/std, ...)
            return _with_statistics(leaf, plain, lambda t: t.movedim(1, -1), lambda t: t.movedim(-1, 1),
                                    "each channel's batch mean and 1/std")
        return plain
    return _affine_per_channel(leaf, "in eval, batch norm")


# ------------------------------------------------------------------------- sorting, selection of k

def _permutation_witness(leaf: Leaf, dim: int):
    """x and x reversed along ``dim``: a different input (random values are distinct) with the same
    multiset of values in every slice."""
    def witness(g):
        a = leaf.random(g)[0]
        return (a,), (a.flip(dim),)
    return witness


def _scatter_back(dim: int):
    """The input from (values, indices) of a sort: x[..., indices[i], ...] = values[i]."""
    def inverse(y):
        values, indices = y[0], y[1]
        return (torch.empty_like(values).scatter_(dim, indices, values),)
    return inverse


@rule("aten.sort")
def sort(leaf: Leaf) -> Verdict:
    """(values, indices) of a sort is a bijection onto its image: scattering the values back to the
    indices recovers x. The values alone erase the order: x and a permutation of it collide."""
    if leaf.x is None or not leaf.x.shape:
        return no_rule(leaf.op)
    dim = leaf.arg("dim", -1) % len(leaf.x.shape)
    size = leaf.x.shape[dim]
    v = injective("sort", "values and indices together: x[indices] = values", _scatter_back(dim),
                  "scatter the values back to their indices")
    if size >= 2:
        v.extra["output_only"] = erasing(
            "sort", "the sorted values alone do not depend on the order: x and a permutation of it "
            "sort alike", _permutation_witness(leaf, dim), "x and x reversed along the sorted axis",
            None, "the order (a permutation: discrete)")
    return v


@rule("aten.topk")
def topk(leaf: Leaf) -> Verdict:
    """topk with k < n never reads the n - k smallest (largest=False: largest) elements beyond their
    rank: lowering the smallest changes neither values nor indices. With k = n it is a sort."""
    if leaf.x is None or not leaf.x.shape or not _float(leaf.x):
        return no_rule(leaf.op)
    dim = leaf.arg("dim", -1) % len(leaf.x.shape)
    k, n, largest = leaf.arg("k"), leaf.x.shape[dim], leaf.arg("largest", True)
    if k == n:
        v = injective("sort", f"topk with k = n = {n} returns every element with its index",
                      _scatter_back(dim), "scatter the values back to their indices")
        if n >= 2:
            v.extra["output_only"] = erasing("sort", "the values alone do not depend on the order",
                                             _permutation_witness(leaf, dim),
                                             "x and x reversed along the axis", None, "the order")
        return v

    def witness(g):
        a = leaf.random(g)[0].clone()
        # the extreme element away from the kept end, in every slice, pushed further out
        ext = a.amin(dim, keepdim=True) if largest else a.amax(dim, keepdim=True)
        step = -1 if largest else 1
        b = torch.where(a == ext, a + step, a)
        return (a,), (b,)
    return erasing("top k", f"topk with k = {k} < {n} keeps only the {k} {'largest' if largest else 'smallest'} "
                   "of each slice: the others can move away", witness,
                   f"the {'smallest' if largest else 'largest'} element of each slice moved further out",
                   None, "data-dependent")


# ------------------------------------------------------------------------ instance norm, losses

@rule("aten.instance_norm")
def instance_norm(leaf: Leaf) -> Verdict:
    """With the input's statistics, each (example, channel) is normalised on its own: adding a constant
    to one instance's map changes nothing (K). With running statistics it is a per-channel affine map,
    injective iff the weight has no zero."""
    if leaf.hole_args != ["input"] or leaf.x is None:
        return no_rule(leaf.op)
    if leaf.arg("use_input_stats", True):
        n, c = leaf.x.shape[0], leaf.x.shape[1]
        return erasing("shift invariance", "instance norm subtracts each (example, channel)'s own mean: "
                       "IN(x + c) = IN(x)", _shift_witness(leaf), "x and x + 1.5", n * c,
                       "1 per (example, channel)")
    return _affine_per_channel(leaf, "instance norm with running statistics")


def _affine_per_channel(leaf: Leaf, what: str) -> Verdict:
    """(x - running_mean) / sqrt(running_var + eps) * w + b per channel (dim 1): injective iff no w is
    zero; a zero weight makes its channel's output the bias (K: move that channel)."""
    w, var, eps = leaf.arg("weight"), leaf.arg("running_var"), leaf.arg("eps", 1e-5)
    if (w is None and leaf.names.get("weight") is not None) or var is None:
        return gray("affine", f"{what} is a per-channel affine map: injective iff its weight has no zero",
                    "the weight has no zero", "the weight's value", 0)
    shape = (1, -1) + (1,) * (len(leaf.x.shape) - 2)
    if w is not None and not bool((w != 0).all()):
        zero = (w == 0).reshape(shape)
        count = int((w == 0).sum()) * (leaf.x.numel // leaf.x.shape[1])

        def witness(g):
            a = leaf.random(g)[0]
            return (a,), (torch.where(zero, a + 1, a),)
        return erasing("zero weight", f"{what}: a zero weight makes its channel's output the bias, "
                       "whatever the input", witness, "x and x + 1 on the zero-weight channels", count,
                       "the elements of the zero-weight channels")

    def inverse(y):
        out = y[0] if isinstance(y, tuple) else y
        mean, b = leaf.arg("running_mean"), leaf.arg("bias")
        scale = torch.rsqrt(var.double() + eps) * (w.double() if w is not None else 1)
        x = (out.double() - (b.double().reshape(shape) if b is not None else 0)) / scale.reshape(shape)
        return ((x + (mean.double().reshape(shape) if mean is not None else 0)).to(out.dtype),)
    return injective("affine", f"{what} is (x - mean) / sqrt(var + eps) * w + b per channel, injective "
                     "with w nonzero", inverse, "undo the per-channel affine map")


_REGRESSION = ("aten.mse_loss", "aten.l1_loss", "aten.smooth_l1_loss", "aten.huber_loss")


@rule(*_REGRESSION)
def regression_loss(leaf: Leaf) -> Verdict:
    """mse, l1, smooth l1 and huber losses are even functions of x - target, elementwise, then reduced:
    reflecting x through the target (x' = 2t - x) leaves every element's loss, so every reduction,
    unchanged; with both operands activations, (x + 1, t + 1) keeps x - t."""
    holes = leaf.hole_args
    out_n = _numel(leaf.out)
    lost = _dof(leaf, sum(_numel(t) for t in leaf.inputs) - out_n) if out_n > 1 else None
    if holes == ["self", "target"]:
        return _joint_collision(leaf, f"{leaf.packet} depends on x - target only", lambda x, t: (x + 1, t + 1))
    if len(holes) != 1 or leaf.x is None or not _float(leaf.x):
        return no_rule(leaf.op)
    other = leaf.arg("target" if holes == ["self"] else "self")
    if other is None:
        return gray("even loss", f"{leaf.packet} is even in x - target: K by reflection through the "
                    "target", "never (a reflection collides)", "the target's value", None)
    t = torch.as_tensor(other)

    def witness(g):
        a = leaf.random(g)[0]
        b = (2 * t.double() - a.double()).to(a.dtype)
        if not inputs_differ(a, b):
            b = a + 1
        return (a,), (b,)
    return erasing("even loss", f"{leaf.packet} is even in x - target: x and 2 target - x have the same "
                   "loss", witness, "x and its reflection 2 target - x", lost if lost is not None else None,
                   "the Jacobian of a reduction to a scalar has rank <= 1" if out_n == 1 else "")


@rule("aten.cross_entropy_loss")
def cross_entropy(leaf: Leaf) -> Verdict:
    """cross entropy is a function of log_softmax over the class axis: shift invariant (K)."""
    if leaf.hole_args[:1] != ["self"] or leaf.x is None or not _float(leaf.x):
        return no_rule(leaf.op)
    return erasing("shift invariance", "cross_entropy(x + c) = cross_entropy(x): it reads x through "
                   "log_softmax over the class axis", _shift_witness(leaf), "x and x + 1.5", None,
                   "at least 1 per sample")


@rule("aten.nll_loss_forward", "aten.nll_loss", "aten.nll_loss2d_forward", "aten.nll_loss_nd",
      "aten.nll_loss2d")
def nll_loss(leaf: Leaf) -> Verdict:
    """nll reads one class of each sample, -x[i, target_i]: with C >= 2 classes the others are unread.
    Found by moving one element of a class other than sample 0's target."""
    if leaf.hole_args != ["self"] or leaf.x is None or not _float(leaf.x) or not leaf.bound_known():
        return no_rule(leaf.op)
    shape = leaf.x.shape
    cdim = 0 if len(shape) == 1 else 1
    if shape[cdim] < 2:
        return no_rule(leaf.op)
    target = torch.as_tensor(leaf.arg("target"))
    first = int(target.reshape(-1)[0]) if target.numel() else 0
    cls = 1 if first == 0 else 0
    index = tuple([0] * len(shape))
    index = index[:cdim] + (cls,) + index[cdim + 1:]

    def witness(g):
        a = leaf.random(g)[0]
        b = a.clone()
        b[index] += 1
        return (a,), (b,)
    return erasing("unread class", "nll_loss reads only the target class of each sample", witness,
                   f"input element {index} (not sample 0's target class) moved", None,
                   "the classes that are not targets")


@rule("aten.binary_cross_entropy_with_logits", "aten.binary_cross_entropy", "aten.kl_div",
      "aten.soft_margin_loss", "aten.poisson_nll_loss", "aten.multilabel_margin_loss",
      "aten.hinge_embedding_loss", "aten.margin_ranking_loss", "aten.multi_margin_loss")
def scalar_loss(leaf: Leaf) -> Verdict:
    """A loss reduced to one number (reduction mean or sum) of n >= 2 inputs: a continuous map
    R^n -> R has level sets of dimension n - 1. The witness is found on one: move element j, then
    solve for element i by bisection to the original value (checked)."""
    reduction = leaf.arg("reduction", 1)
    if leaf.x is None or not _float(leaf.x) or reduction == 0 or _numel(leaf.out) != 1:
        return gray("loss", f"{leaf.packet} without reduction is judged elementwise, which depends on "
                    "its targets", "the elementwise loss is injective for these targets",
                    "a rule for the unreduced loss") if leaf.x is not None else no_rule(leaf.op)
    pair = _level_set_pair(leaf)
    if pair is None:
        return gray("loss", f"{leaf.packet} reduces {leaf.x.numel} inputs to one number, but no "
                    "collision was found on its level set", "never (by dimension), if it is continuous",
                    "a witness search that succeeds", None)
    return erasing("reduction to a scalar", f"{leaf.packet} reduces {leaf.x.numel} inputs to one number: "
                   "its level sets have dimension n - 1", lambda g, pair=pair: pair,
                   "a point of the level set through a random input (bisection, checked)",
                   _dof(leaf, leaf.x.numel - 1), "n - 1: the Jacobian of a scalar has rank <= 1")


def _level_set_pair(leaf: Leaf):
    """(a,), (b,) with f(a) == f(b), a != b, for a scalar-valued continuous f of one input: b moves one
    element by h, then another by the s that brings f back (sign change, then bisection)."""
    if leaf.x.numel < 2:
        return None
    g = torch.Generator().manual_seed(0)
    a = leaf.random(g, 0.5)[0]
    flat = a.reshape(-1)

    def f(t):
        return float(torch.as_tensor(_out_parts(leaf.call(t.reshape(a.shape)))[0].double().sum()))
    target = f(flat)
    for j, i in ((0, 1), (1, 0), (0, flat.numel() - 1)):
        moved = flat.clone()
        moved[j] += 0.25
        if f(moved) == target:
            return (a,), (moved.reshape(a.shape),)

        def gap(s):
            t = moved.clone()
            t[i] += s
            return f(t) - target
        g0 = gap(0.0)
        bracket = None
        for s in (0.125 * 2 ** e * sign for e in range(12) for sign in (1, -1)):
            if math.isfinite(gap(s)) and (gap(s) > 0) != (g0 > 0):
                bracket = (0.0, s)
                break
        if bracket is None:
            continue
        lo, hi = bracket
        for _ in range(80):
            mid = (lo + hi) / 2
            if (gap(mid) > 0) == (g0 > 0):
                lo = mid
            else:
                hi = mid
        for s in (lo, hi):
            b = moved.clone()
            b[i] += s
            b = b.reshape(a.shape)
            if inputs_differ(a, b) and outputs_equal(leaf.call(a), leaf.call(b), 1e-6, 1e-9):
                return (a,), (b,)
    return None


# --------------------------------------------------------------- linear maps with a bound operand

_OPERATOR_LIMIT = 1024  # input elements: the operator is built column by column, then an SVD


def _operator_verdict(leaf: Leaf) -> Verdict:
    """An op linear in its one activation input (bmm, matmul, einsum with a bound operand): its matrix
    is read off by evaluating it on basis vectors (each entry a single product of stored values: exact),
    then judged by its rank like a linear layer."""
    t = leaf.x
    n = t.numel
    if n > _OPERATOR_LIMIT or not leaf.bound_known():
        why = "too large to build here" if n > _OPERATOR_LIMIT else "its bound operand is unknown"
        return gray("rank", f"{leaf.packet} is linear in its activation: injective iff its operator has "
                    f"full column rank {n}", f"rank = {n}", f"the operator's SVD ({why})", None)
    zero = torch.zeros(t.shape, dtype=t.torch_dtype)
    columns = []
    for j in range(n):
        e = zero.clone().reshape(-1)
        e[j] = 1
        columns.append(_out_parts(leaf.call(e.reshape(t.shape)))[0].double())
    op = torch.stack(columns, 1)
    out_shape = leaf.out.shape

    def inverse(y, op=op):
        flat = y.double().reshape(-1)
        return ((torch.linalg.pinv(op) @ flat).reshape(t.shape).to(y.dtype),)

    def shift(a, v):
        x = a[0]
        scale = x.abs().max().clamp(min=1)
        return (x + (v * scale).reshape(t.shape).to(x.dtype),)
    del out_shape
    v = _linear_verdict(leaf, op, n, op.shape[0], 1, inverse, shift)
    if v.rank is not None:
        v.rank["operator"] = "the matrix of the map on the whole input, from basis vectors"
    return v


@rule("aten.einsum")
def einsum(leaf: Leaf) -> Verdict:
    """einsum is multilinear in its operands: with one activation operand a linear map (rank), with
    several a product, unchanged by (2a, b/2)."""
    if len(leaf.inputs) == 1 and _float(leaf.x):
        return _operator_verdict(leaf)
    if len(leaf.inputs) >= 2 and all(_float(t) for t in leaf.inputs):
        def witness(g):
            a = leaf.random(g)
            return a, (a[0] * 2, a[1] / 2, *a[2:])
        return erasing("bilinear", "einsum is multilinear: (a, b) and (2a, b/2) give the same product",
                       witness, "(a, b) and (2a, b/2)", None, "not derived")
    return no_rule(leaf.op)
