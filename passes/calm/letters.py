"""The generic rule most ops go through: every dim of every operand and of the result carries a letter
(an einsum view of the op); ``by_letters`` decides free or barrier from where partitioned letters go."""
from __future__ import annotations

import math

from bwskc.passes.calm.context import Ctx
from bwskc.passes.calm.plan import Part, Plan

from bwskc.ir import TensorType, TupleType


def by_letters(ctx: Ctx, letters: dict, out_letters, special=None, contract=None, rebase=(),
               random=False, prefer=None) -> Plan:
    """The generic rule: every dim of every operand and of the result carries a letter (None: not
    carried, e.g. broadcast from size 1). A partitioned letter that reaches the result is free; one
    that does not is contracted (``contract``, default all-reduce); ``special`` letters name their own
    collective: letter -> (collective, reason, the result stays partitioned along it). When operands
    are partitioned on several kept dims, the one of slot ``prefer`` (a matmul's rows: the queries)
    or else the largest keeps its partition and the others are gathered."""
    special = special or {}
    outs = out_letters if isinstance(out_letters, list) else [out_letters]
    out_shapes = ctx.out_shapes()
    if not isinstance(out_letters, list):
        out_shapes = [out_shapes]
    by_letter: dict = {}
    for i in ctx.parted():
        p = ctx.part(i)
        ls = letters.get(i)
        if ls is None or p.dim >= len(ls) or ls[p.dim] is None:
            return ctx.barrier("all-gather", f"{ctx.short}: operand {i} is partitioned along "
                               f"{ctx.axis} on dim {p.dim}, which the op does not carry through")
        by_letter.setdefault(ls[p.dim], set()).add((ctx.shape(i)[p.dim], p.outer, p.inner))
    for lays in by_letter.values():
        if len(lays) > 1:
            return ctx.barrier("all-to-all", f"{ctx.short}: operands partitioned along {ctx.axis} "
                               "with different layouts must be redistributed")
    in_out = {L for o in outs if o is not None for L in o if L is not None}
    order = sorted(by_letter, key=lambda L: min(i for i in ctx.parted()
                                                 if letters[i][ctx.part(i).dim] == L))
    # a real collective names the barrier before a position offset (causal attention along the
    # sequence needs the keys and values first)
    specials = sorted((L for L in order if L in special),
                      key=lambda L: special[L][0] == "position-offset")
    kept = [L for L in order if (L in special and special[L][2]) or (L not in special and L in in_out)]
    contracted = [L for L in order if L not in special and L not in in_out]
    collective = reason = None
    if specials:
        collective, reason = special[specials[0]][:2]
    elif contracted and not kept:
        collective, reason = contract or (
            "all-reduce", (f"{ctx.short} reduces over the dim that {ctx.axis} partitions "
                           "(partial results per shard)"))
    elif contracted:
        collective, reason = "all-gather", (
            f"{ctx.short}: one operand is partitioned along {ctx.axis} on a dim the op contracts, "
            "another on a dim it keeps: the first must be gathered")
    elif len(kept) > 1:
        collective, reason = "all-gather", (
            f"{ctx.short}: operands are partitioned along {ctx.axis} on different dims: all but one "
            "must be gathered")
    if len(kept) > 1:  # the largest operands keep their partition; the others are gathered
        weight = {L: sum(math.prod(ctx.shape(i)) for i in ctx.parted()
                         if letters[i][ctx.part(i).dim] == L) for L in kept}
        mine = ctx.part(prefer) is not None and letters[prefer][ctx.part(prefer).dim] \
            if prefer is not None else None
        kept.sort(key=lambda L: (L != mine, -weight[L]))
    X = kept[0] if kept else None
    ins = []
    for i in range(len(ctx.slots)):
        p = ctx.part(i)
        if p is not None:
            ins.append(p)
            continue
        ls = letters.get(i)
        if X is None or ls is None or X not in ls:
            ins.append(None)
            continue
        j = ls.index(X)
        size, outer, inner = next(iter(by_letter[X]))
        n = ctx.shape(i)[j] if j < len(ctx.shape(i)) else 1
        if n == size:
            ins.append(Part(j, outer, inner))
        elif n == 1:
            ins.append(None)
        else:
            return ctx.barrier("all-to-all", f"{ctx.short}: a replicated operand does not line up with "
                               f"the {ctx.axis} partition")
    outp = []
    for o, shp in zip(outs, out_shapes):
        if X is None or o is None or shp is None or X not in o:
            outp.append(None)
            continue
        j = o.index(X)
        size, outer, inner = next(iter(by_letter[X]))
        outp.append(Part(j, outer, inner) if shp[j] == size else None)
    out = outp if isinstance(out_letters, list) else outp[0]
    if isinstance(out_letters, list):
        out = tuple(out)
    return Plan(tuple(ins), out, collective, reason, tuple(rebase) if collective is None else (),
                random and collective is None)


def tuple_out(ctx, letters_one):
    """Letters for every item of a tuple result (same letters each), or the letters themselves."""
    if isinstance(ctx.out_type, TupleType):
        return [letters_one if isinstance(t, TensorType) and len(t.shape) == len(letters_one) else None
                for t in ctx.out_type.items]
    return letters_one


def right_aligned(shape, target_letters, target_shape):
    """Letters for an operand broadcast against a result (aligned from the right)."""
    R, r = len(target_shape), len(shape)
    return tuple(target_letters[R - r + k] if shape[k] == target_shape[R - r + k] else None
                 for k in range(r))


def contract_reason(ctx):
    return ("all-reduce", (f"{ctx.short} contracts over the dim that {ctx.axis} partitions "
            "(each shard has a partial sum)"))
