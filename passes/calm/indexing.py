"""Lookups: embedding, one_hot, gather, index_select and index keep the indices' partition and gather a
partitioned table (all-gather); an index constant that is an ``arange`` along the partitioned dim is
rebased (each worker uses its own positions)."""
from __future__ import annotations

import torch
from bwskc.passes.calm.context import Ctx, norm_dim
from bwskc.passes.calm.letters import by_letters, right_aligned
from bwskc.passes.calm.plan import Plan
from bwskc.passes.calm.table import rule


@rule("embedding")
def rule_embedding(ctx: Ctx) -> Plan:
    w, idx = ctx.si("weight"), ctx.si("indices")
    r = len(ctx.shape(idx))
    letters = {w: ("v", "e"), idx: tuple(range(r))}
    special = {"v": ("all-gather", f"looks up rows of a table that {ctx.axis} partitions", False)}
    return by_letters(ctx, letters, tuple(range(r)) + ("e",), special=special)


@rule("one_hot")
def rule_one_hot(ctx: Ctx) -> Plan:
    r = len(ctx.shape(0))
    return by_letters(ctx, {0: tuple(range(r))}, tuple(range(r)) + ("c",))


@rule("gather")
def rule_gather(ctx: Ctx) -> Plan:
    x, idx = ctx.si("self"), ctx.si("index")
    r = len(ctx.shape(x))
    dim = norm_dim(ctx.val("dim"), r)
    xs, isz = ctx.shape(x), ctx.shape(idx)
    xl = tuple(("x", k) if k == dim or xs[k] != isz[k] else k for k in range(r))
    il = tuple(("i", k) if k == dim else k for k in range(r))
    special = {("x", dim): ("all-gather", (f"gather along dim {dim}, which {ctx.axis} partitions, "
                            "reads data-dependent positions across shards"), False)}
    return by_letters(ctx, {x: xl, idx: il}, il, special=special)


@rule("index_select")
def rule_index_select(ctx: Ctx) -> Plan:
    x, idx = ctx.si("self"), ctx.si("index")
    r = len(ctx.shape(x))
    dim = norm_dim(ctx.val("dim"), r)
    xl = tuple(k if k != dim else "x" for k in range(r))
    special = {"x": ("all-gather", (f"index_select along dim {dim}, which {ctx.axis} partitions, reads "
                     "data-dependent positions across shards"), False)}
    return by_letters(ctx, {x: xl, idx: ("i",)}, tuple(k if k != dim else "i" for k in range(r)),
                      special=special)


@rule("index", overload="Tensor")
def rule_index(ctx: Ctx) -> Plan:
    """aten.index.Tensor(x, [i0, None, i2...]): advanced indexing; an index constant that is an arange
    along the partitioned dim is a rebased slice, not a gather."""
    x = ctx.si("self")
    xs = ctx.shape(x)
    r = len(xs)
    idx_vals = ctx.val("indices")
    isl = ctx.sis("indices")
    indexed = [j for j, v in enumerate(idx_vals) if v is not None]
    if any(isl[j] is None for j in indexed):
        return ctx.barrier("unknown", "index: an index that is not a tensor")
    bshape = torch.broadcast_shapes(*[tuple(ctx.shape(isl[j])) for j in indexed])
    nbd = len(bshape)
    bl = tuple(("b", e) for e in range(nbd))
    contiguous = indexed == list(range(indexed[0], indexed[-1] + 1))
    rest = [k for k in range(r) if k not in indexed]
    if contiguous:
        ol = tuple(k for k in rest if k < indexed[0]) + bl + tuple(k for k in rest if k > indexed[-1])
    else:
        ol = bl + tuple(rest)
    xl = [k if k not in indexed else ("x", k) for k in range(r)]
    letters = {}
    for j in indexed:
        letters[isl[j]] = right_aligned(ctx.shape(isl[j]), bl, bshape)
    rebase = []
    special = {}
    p = ctx.part(x)
    if p is not None and p.dim in indexed:
        s = isl[p.dim]
        e = arange_dim(ctx, s, xs[p.dim], bshape)
        if e is not None and p.outer == p.inner == 1 and ctx.part(s) is None:
            xl[p.dim] = ("b", e)
            rebase.append(s)
        else:
            special[("x", p.dim)] = ("all-gather", (f"index along dim {p.dim}, which {ctx.axis} "
                                     "partitions, with data-dependent positions"), False)
    letters[x] = tuple(xl)
    return by_letters(ctx, letters, ol, special=special, rebase=rebase)


def arange_dim(ctx: Ctx, slot, n, bshape):
    """The broadcast dim along which a constant index tensor is ``arange(n)`` (1 elsewhere), or None."""
    av = ctx.slots[slot]
    if av.const is None:
        return None
    shape = av.shape
    R = len(bshape)
    dims = [R - len(shape) + k for k in range(len(shape)) if shape[k] != 1]
    if len(dims) != 1 or shape[dims[0] - (R - len(shape))] != n:
        return None
    value = ctx.an.const_value(av.const)
    if value is None or not torch.equal(value.reshape(-1).to(torch.int64), torch.arange(n)):
        return None
    return dims[0]
