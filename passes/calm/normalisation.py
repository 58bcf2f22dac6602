"""Normalisations: layer/RMS/group norm over the partitioned dim are all-reduce with the result still
partitioned; training batch norm over the batch or positions is all-reduce, eval batch norm is free."""
from __future__ import annotations

from bwskc.passes.calm.context import Ctx
from bwskc.passes.calm.letters import by_letters
from bwskc.passes.calm.plan import Plan
from bwskc.passes.calm.table import rule

from bwskc.ir import TensorType, TupleType

LAYER_NORMS = ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
GROUP_NORMS = ("group_norm", "native_group_norm")
BATCH_NORMS = ("batch_norm", "native_batch_norm", "_native_batch_norm_legit",
               "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional")


@rule(*LAYER_NORMS)
def rule_layer_norm(ctx: Ctx) -> Plan:
    x = ctx.si("input")
    r = len(ctx.shape(x))
    k = len(ctx.val("normalized_shape"))
    normed = list(range(r - k, r))
    letters = {x: tuple(range(r))}
    for name in ("weight", "bias"):
        i = ctx.si(name)
        if i is not None:
            letters[i] = tuple(range(r - len(ctx.shape(i)), r))
    special = {d: ("all-reduce", (f"{ctx.short} normalizes over dim {d}, which {ctx.axis} partitions "
                   "(statistics need every shard)"), True) for d in normed}
    full = tuple(range(r))
    stats = tuple(d if d not in normed else None for d in range(r))
    if isinstance(ctx.out_type, TupleType):
        out = [full] + [stats if isinstance(t, TensorType) and len(t.shape) == r else None
                        for t in ctx.out_type.items[1:]]
    else:
        out = full
    return by_letters(ctx, letters, out, special=special)


@rule(*GROUP_NORMS)
def rule_group_norm(ctx: Ctx) -> Plan:
    x = ctx.si("input")
    r = len(ctx.shape(x))
    xl = ("n", "c") + tuple(("s", k) for k in range(2, r))
    letters = {x: xl}
    for name in ("weight", "bias"):
        i = ctx.si(name)
        if i is not None:
            letters[i] = ("c",)
    special = {L: ("all-reduce", (f"{ctx.short} normalizes over groups of channels and positions, "
                   f"which {ctx.axis} partitions"), True) for L in xl[1:]}
    if isinstance(ctx.out_type, TupleType):
        out = [xl] + [("n", None) for _ in ctx.out_type.items[1:]]
    else:
        out = xl
    return by_letters(ctx, letters, out, special=special)


@rule(*BATCH_NORMS)
def rule_batch_norm(ctx: Ctx) -> Plan:
    x = ctx.si("input")
    r = len(ctx.shape(x))
    xl = ("n", "c") + tuple(("s", k) for k in range(2, r))
    letters = {x: xl}
    for name in ("weight", "bias", "running_mean", "running_var"):
        i = ctx.si(name)
        if i is not None:
            letters[i] = ("c",)
    name = ctx.op.split(".")[1]
    training = name != "_native_batch_norm_legit_no_training" and bool(ctx.val("training", False))
    special = {}
    if training:
        special = {L: ("all-reduce", (f"training batch norm averages over dim {k}, which {ctx.axis} "
                       "partitions (batch statistics)"), True)
                   for k, L in enumerate(xl) if L != "c"}
    if isinstance(ctx.out_type, TupleType):
        C = ctx.shape(x)[1] if r > 1 else 0
        out = [xl] + [("c",) if isinstance(t, TensorType) and t.shape == (C,) else None
                      for t in ctx.out_type.items[1:]]
    else:
        out = xl
    return by_letters(ctx, letters, out, special=special)
