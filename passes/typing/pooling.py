"""Leaf rules for pooling: max pool (with indices, adaptive) from its windows, average pool (a linear map
that shrinks).
"""
from __future__ import annotations

import math

import torch

from bwskc.evidence import Verdict, erasing, gray, injective, no_rule
from bwskc.leaf import Leaf
from bwskc.passes.typing.comparison import where
from bwskc.passes.typing.movement import SELECTION_LIMIT, out_parts
from bwskc.passes.typing.rank import local_witness, null_vector, null_vector_of
from bwskc.passes.typing.table import is_float, rule


@rule("aten.max_pool2d", "aten.max_pool1d", "aten.max_pool3d", "aten.max_pool2d_with_indices",
      "aten.max_pool1d_with_indices", "aten.max_pool3d_with_indices", "aten.adaptive_max_pool2d",
      "aten.adaptive_max_pool1d", "aten.adaptive_max_pool3d")
def max_pool(leaf: Leaf) -> Verdict:
    """A max pool is injective iff every input element is the only (real, unpadded) element of some
    window: then that window's output is a copy of it. Otherwise an element e that is in no window, or
    only in windows holding another element, is erased: make it the strict minimum of its map and lower
    it further; no window's maximum (nor argmax) moves. Windows are read off by running the pool on
    distinct codes: a window is a singleton iff its max and its min (the pool of -codes) agree."""
    if leaf.x is None or not is_float(leaf.x):
        return no_rule(leaf.op)
    n = leaf.x.numel
    if n > SELECTION_LIMIT:
        return gray("max pool", "a max pool is injective iff every element is alone in some window",
                    "every element is alone in some window", "coding its inputs (too large here)")
    codes = torch.arange(n, dtype=torch.float64).reshape(leaf.x.shape)
    top = out_parts(leaf.call(codes))[0]
    bottom = -out_parts(leaf.call(-codes))[0]
    alone = top == bottom
    owner = torch.full((n,), -1, dtype=torch.long)
    where = torch.nonzero(alone).flatten()
    owner.scatter_reduce_(0, top[where].long(), where, reduce="amin", include_self=False)
    erased = torch.nonzero(owner < 0).flatten()
    if len(erased) == 0:
        def inverse(y, owner=owner, shape=leaf.x.shape):
            return (out_parts(y)[0][owner].reshape(shape),)
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
            v = null_vector_of(rows).reshape(lengths)
            return local_witness(leaf, lambda: (index, v))
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
    v = null_vector(op)
    b = a.clone()
    b[0] += (v * 2).reshape(a.shape[1:]).to(a.dtype)
    return (a,), (b,)
