"""Data movement rules: views and reshapes track the partition's factor (all-to-all when it is split),
permutes/expand/repeat/stack move it, and cat, slice, split, select, flip, roll, pad and tril/triu
across the partitioned dim name their collective."""
from __future__ import annotations

import math

from bwskc.passes.calm.context import Ctx, norm_dim, norm_dims
from bwskc.passes.calm.letters import by_letters
from bwskc.passes.calm.plan import Part, Plan
from bwskc.passes.calm.table import rule, single

from bwskc.ir import TensorType, TupleType

VIEWS = {"view", "reshape", "_unsafe_view", "view_copy", "_reshape_alias", "squeeze", "unsqueeze",
         "flatten", "unflatten", "squeeze_copy", "unsqueeze_copy"}
PERMUTES = {"permute", "transpose", "t", "numpy_T", "mT", "mH", "adjoint", "movedim", "swapaxes",
            "swapdims", "permute_copy", "transpose_copy"}


def reshape_part(in_shape, p: Part, out_shape) -> Part | None:
    """Where a partition goes through a row-major reshape; None if its factor is split across dims."""
    lo = p.inner * math.prod(in_shape[p.dim + 1:])
    hi = lo * p.factor(in_shape)
    stride = 1
    for j in reversed(range(len(out_shape))):
        t = out_shape[j]
        if stride <= lo and hi <= stride * t and lo % stride == 0 and (stride * t) % hi == 0:
            return Part(j, (stride * t) // hi, lo // stride)
        stride *= t
    return None


@rule(*VIEWS)
@single
def rule_reshape(ctx: Ctx) -> Plan:
    x = 0
    p = ctx.part(x)
    if p is None or not isinstance(ctx.out_type, TensorType):
        return ctx.barrier("unknown", f"{ctx.short}: no rule for this operand layout")
    q = reshape_part(ctx.shape(x), p, ctx.out_type.shape)
    if q is None:
        return ctx.barrier("all-to-all", f"{ctx.short} {tuple(ctx.shape(x))} -> "
                           f"{tuple(ctx.out_type.shape)} splits the dim {ctx.axis} partitions "
                           f"(size {p.factor(ctx.shape(x))}) across output dims")
    return ctx.free(q)


def perm_of(ctx: Ctx):
    r = len(ctx.shape(0))
    name = ctx.op.split(".")[1]
    if name == "permute":
        return [norm_dim(d, r) for d in ctx.val("dims")]
    if name in ("t", "numpy_T", "mT", "mH", "adjoint"):
        perm = list(range(r))
        if r >= 2:
            perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm if name != "numpy_T" else list(reversed(range(r)))
    if name == "movedim":
        src, dst = ctx.val("source"), ctx.val("destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [norm_dim(d, r) for d in src], [norm_dim(d, r) for d in dst]
        rest = [d for d in range(r) if d not in src]
        perm = [None] * r
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(rest)
        return [next(it) if v is None else v for v in perm]
    d0 = norm_dim(ctx.val("dim0", ctx.val("axis0", 0)), r)
    d1 = norm_dim(ctx.val("dim1", ctx.val("axis1", 1)), r)
    perm = list(range(r))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


@rule(*PERMUTES)
@single
def rule_permute(ctx: Ctx) -> Plan:
    perm = perm_of(ctx)
    p = ctx.part(0)
    return ctx.free(Part(perm.index(p.dim), p.outer, p.inner))


@rule("expand", "expand_copy")
@single
def rule_expand(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    R = len(ctx.out_type.shape)
    d = p.dim + R - len(ctx.shape(0))
    if ctx.out_type.shape[d] != ctx.shape(0)[p.dim]:
        return ctx.barrier("all-gather", f"expand changes the dim {ctx.axis} partitions")
    return ctx.free(Part(d, p.outer, p.inner))


@rule("repeat")
@single
def rule_repeat(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    reps = list(ctx.val("repeats"))
    R = len(reps)
    d = p.dim + R - len(ctx.shape(0))
    return ctx.free(Part(d, p.outer * reps[d], p.inner))


@rule("repeat_interleave")
@single
def rule_repeat_interleave(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    dim, reps = ctx.val("dim"), ctx.val("repeats")
    if dim is None or not isinstance(reps, int):
        return ctx.barrier("all-to-all", "repeat_interleave over a flattened or data-dependent layout")
    dim = norm_dim(dim, len(ctx.shape(0)))
    if dim != p.dim:
        return ctx.free(p)
    return ctx.free(Part(p.dim, p.outer, p.inner * reps))


@rule("select", "select_copy")
@single
def rule_select(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    r = len(ctx.shape(0))
    dim = norm_dim(ctx.val("dim"), r)
    if dim == p.dim:
        return ctx.barrier("broadcast", f"select index {ctx.val('index')} of dim {dim}, which "
                           f"{ctx.axis} partitions: one shard holds it")
    return ctx.free(Part(p.dim - (dim < p.dim), p.outer, p.inner))


@rule("slice", "narrow", "slice_copy")
@single
def rule_slice(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    shape = ctx.shape(0)
    r = len(shape)
    name = ctx.op.split(".")[1]
    dim = norm_dim(ctx.val("dim", 0), r)
    if dim != p.dim:
        return ctx.free(p)
    n = shape[dim]
    if name == "narrow":
        start, length = ctx.val("start"), ctx.val("length")
        full = start in (0, -n) and length == n
        what = f"[{start}:{start}+{length}]"
    else:
        start, end, step = ctx.val("start"), ctx.val("end"), ctx.val("step", 1)
        s = 0 if start is None else (start + n if start < 0 else start)
        e = n if end is None else (end + n if end < 0 else end)
        full = s <= 0 and e >= n and (step in (None, 1))
        what = f"[{start}:{end}:{step}]"
    if full:
        return ctx.free(p)
    return ctx.barrier("all-gather", f"{name}{what} along dim {dim}, which {ctx.axis} partitions, "
                       "reads across shards")


@rule("split", "split_with_sizes", "chunk", "unbind", "unsafe_split",
      "split_with_sizes_copy", "unsafe_split_with_sizes")
@single
def rule_split(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    shape = ctx.shape(0)
    r = len(shape)
    name = ctx.op.split(".")[1]
    dim = norm_dim(ctx.val("dim", 0), r)
    items = ctx.out_type.items if isinstance(ctx.out_type, TupleType) else ()
    if name == "unbind":
        if dim == p.dim:
            return ctx.barrier("all-gather", f"unbind of dim {dim}, which {ctx.axis} partitions")
        return ctx.free(tuple(Part(p.dim - (dim < p.dim), p.outer, p.inner) for _ in items))
    if dim != p.dim:
        return ctx.free(tuple(p for _ in items))
    if len(items) == 1:
        return ctx.free((p,))
    return ctx.barrier("all-gather", f"{name} cuts dim {dim}, which {ctx.axis} partitions, into "
                       f"{len(items)} pieces across shards")


@rule("cat")
def rule_cat(ctx: Ctx) -> Plan:
    tens = [i for i in ctx.sis("tensors") if i is not None]
    shapes = {i: ctx.shape(i) for i in tens}
    live = [i for i in tens if not (len(shapes[i]) == 1 and shapes[i][0] == 0)]  # legacy empty
    R = len(ctx.out_type.shape)
    dim = norm_dim(ctx.val("dim", 0), R)
    on_dim = [i for i in live if ctx.part(i) is not None and ctx.part(i).dim == dim]
    if on_dim:
        lays = {(shapes[i][dim], ctx.part(i).outer, ctx.part(i).inner) for i in live
                if ctx.part(i) is not None}
        if len(on_dim) == len(live) and len(lays) == 1:
            p = ctx.part(on_dim[0])
            return ctx.free(Part(dim, p.outer * len(live), p.inner))
        return ctx.barrier("all-gather", f"cat along dim {dim}, which {ctx.axis} partitions, of "
                           "operands that are not partitioned alike")
    letters = {i: tuple(k if k != dim else ("cat", i) for k in range(R)) for i in live}
    return by_letters(ctx, letters, tuple(k if k != dim else "cat" for k in range(R)))


@rule("stack")
def rule_stack(ctx: Ctx) -> Plan:
    tens = [i for i in ctx.sis("tensors") if i is not None]
    R = len(ctx.out_type.shape)
    dim = norm_dim(ctx.val("dim", 0), R)
    letters = {i: tuple(k if k < dim else k + 1 for k in range(R - 1)) for i in tens}
    return by_letters(ctx, letters, tuple(range(R)))


@rule("flip")
@single
def rule_flip(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    r = len(ctx.shape(0))
    dims = norm_dims(ctx.val("dims"), r)
    if p.dim in dims:
        return ctx.barrier("all-to-all", f"flip reverses dim {p.dim}, which {ctx.axis} partitions "
                           "(shards trade places)", out=p)
    return ctx.free(p)


@rule("roll")
@single
def rule_roll(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    r = len(ctx.shape(0))
    dims = ctx.val("dims")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return ctx.barrier("all-to-all", "roll of the flattened tensor moves data between shards")
    if p.dim in norm_dims(dims, r):
        return ctx.barrier("halo-exchange", f"roll along dim {p.dim}, which {ctx.axis} partitions, "
                           "shifts elements into the neighbouring shard", out=p)
    return ctx.free(p)


@rule("constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
      "replication_pad1d", "replication_pad2d", "replication_pad3d")
@single
def rule_pad(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    pad = list(ctx.val("pad", ctx.val("padding", [])))
    r = len(ctx.shape(0))
    padded = {r - 1 - k // 2 for k in range(len(pad)) if pad[k] != 0}
    if p.dim in padded:
        return ctx.barrier("halo-exchange", f"padding dim {p.dim}, which {ctx.axis} partitions, "
                           "touches only the edge shards")
    return ctx.free(p)


@rule("tril", "triu")
@single
def rule_tri(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    r = len(ctx.shape(0))
    if p.dim >= r - 2:
        return ctx.barrier("position-offset", f"{ctx.short} depends on the global position along "
                           f"dim {p.dim}, which {ctx.axis} partitions: each shard needs its offset",
                           out=p)
    return ctx.free(p)
