"""Leaf rules for convolutions (conv1d/2d/3d, ``aten.convolution``): the weight's rank per output
position, and a null vector on one block of the input when the geometry loses elements.
"""
from __future__ import annotations

import math

import torch

from bwskc.evidence import Verdict, erasing, gray, no_rule
from bwskc.leaf import Leaf
from bwskc.passes.typing.rank import linear_verdict, local_witness, null_vector_of
from bwskc.passes.typing.table import rule


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
                           local_witness(leaf, local) if local is not None else None,
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
    return linear_verdict(leaf, operator, per_in, per_out, batch, pinv_apply, shift)


_LOCAL_COLUMNS = 4096  # the largest block (input elements) a local null vector is sought on


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
        v = null_vector_of(rows)
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
