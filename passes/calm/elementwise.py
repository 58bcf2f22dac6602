"""Elementwise rules: ATen's ``pointwise`` tag and copy-like ops (free, broadcasting aligned from the
right), random ops (free: a shard draws its slice of the whole draw), ``new_*`` (independent of the
input), prelu and glu."""
from __future__ import annotations

from bwskc.passes.calm.context import Ctx, norm_dim, pointwise
from bwskc.passes.calm.letters import by_letters, tuple_out
from bwskc.passes.calm.plan import Plan
from bwskc.passes.calm.table import fallback, rule, single

from bwskc.ir import TensorType, TupleType

IDENTITY = {"clone", "_to_copy", "to", "alias", "detach", "lift_fresh_copy", "contiguous", "copy",
            "zeros_like", "ones_like", "full_like", "empty_like", "fill", "type_as", "masked_fill",
            "where", "__and__", "__or__", "__xor__", "__lshift__", "__rshift__", "bitwise_and",
            "bitwise_or", "bitwise_xor", "logical_and", "logical_or", "logical_xor", "floor_divide",
            "hardswish", "hardsigmoid", "relu6", "alias_copy", "detach_copy", "clamp_min",
            "clamp_max", "copysign", "positive", "_conj", "resolve_conj", "resolve_neg",
            "_assert_tensor_metadata"}
RANDOM = {"rand_like", "randn_like", "randint_like", "bernoulli", "native_dropout", "dropout",
          "feature_dropout", "alpha_dropout", "normal", "uniform", "exponential", "geometric",
          "cauchy", "log_normal", "poisson"}


def elementwise(ctx: Ctx, random=False) -> Plan:
    out = ctx.out_type
    oshape = out.items[0].shape if isinstance(out, TupleType) else out.shape
    R = len(oshape)
    letters = {}
    for i, s in enumerate(ctx.slots):
        if not isinstance(s.type, TensorType):
            continue
        r = len(s.shape)
        if r > R:
            letters[i] = None
            continue
        letters[i] = tuple((R - r + k) if (s.shape[k] == oshape[R - r + k]) else None
                           for k in range(r))
    return by_letters(ctx, letters, tuple_out(ctx, tuple(range(R))), random=random)


def tagged_pointwise(ctx: Ctx) -> bool:
    """ATen tags the op ``pointwise``. Tried before the table: ``aten.max.other`` is elementwise although
    ``max`` names a reduction. Random ops keep their own rule."""
    return ctx.short not in RANDOM and pointwise(ctx.op)


@rule(*IDENTITY)
@fallback(tagged_pointwise, before_table=True)
def rule_elementwise(ctx: Ctx) -> Plan:
    return elementwise(ctx)


@rule(*RANDOM)
def rule_random(ctx: Ctx) -> Plan:
    if ctx.short == "dropout" and not ctx.val("train", False):
        return elementwise(ctx)
    return elementwise(ctx, random=True)


@rule("new_zeros", "new_ones", "new_full", "new_empty", "new_empty_strided")
def rule_new(ctx: Ctx) -> Plan:
    """new_zeros(x, size) and the like: the result does not depend on x's values."""
    return ctx.free(None, ins=tuple(None for _ in ctx.slots))


@rule("prelu", "_prelu_kernel")
def rule_prelu(ctx: Ctx) -> Plan:
    x, w = 0, 1
    r = len(ctx.shape(x))
    letters = {x: tuple(range(r)), w: (1,) if ctx.shape(w) and ctx.shape(w)[0] > 1 else (None,)}
    return by_letters(ctx, letters, tuple(range(r)))


@rule("glu")
@single
def rule_glu(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    r = len(ctx.shape(0))
    if norm_dim(ctx.val("dim", -1), r) == p.dim:
        return ctx.barrier("all-to-all", f"glu halves dim {p.dim}, which {ctx.axis} partitions")
    return ctx.free(p)
