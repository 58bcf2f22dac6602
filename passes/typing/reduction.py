"""Leaf rules for reductions: mean, sum, prod, var, std, amax/amin, max, argmax, logsumexp, norms."""
from __future__ import annotations

import math

import torch

from bwskc.evidence import Verdict, erasing, no_rule
from bwskc.leaf import Leaf
from bwskc.passes.typing.movement import selection
from bwskc.passes.typing.table import dof, rule


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
                   "non-extreme ones moved further from the extreme (max)", dof(leaf, lost) if not extreme else None,
                   "input size minus output size" if not extreme else "data-dependent (a step function)")
