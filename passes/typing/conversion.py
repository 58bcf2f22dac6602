"""Leaf rules for dtype conversions (``_to_copy``, ``to``, ``type_as``, autocast): S iff every source value
has its own target value, K with a checked collision otherwise (a claim about the floating-point map).
"""
from __future__ import annotations

import math

import torch

from bwskc.evidence import Verdict, erasing, gray, injective, inputs_differ, no_rule, outputs_equal
from bwskc.ir import TensorType
from bwskc.leaf import Leaf
from bwskc.passes.typing.movement import identity
from bwskc.passes.typing.table import rule


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
