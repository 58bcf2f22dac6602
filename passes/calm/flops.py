"""A FLOP estimate per leaf application (for the free share of FLOPs), and a site's operand types."""
from __future__ import annotations

import math

from bwskc.passes.calm.context import slot_positions
from bwskc.passes.calm.convolution import CONV, POOL
from bwskc.passes.calm.movement import PERMUTES, VIEWS
from bwskc.passes.calm.reductions import ALONG, REDUCE, SORTS

from bwskc.ir import Prim, Program, TensorType, TupleType
from bwskc.sites import Site

ZERO_FLOP = (VIEWS | PERMUTES | {"expand", "expand_copy", "select", "slice", "narrow", "split",
                                     "split_with_sizes", "chunk", "unbind", "cat", "stack", "clone",
                                     "_to_copy", "to", "alias", "detach", "lift_fresh_copy",
                                     "contiguous", "copy", "zeros_like", "ones_like", "full_like",
                                     "empty_like", "fill", "new_zeros", "new_ones", "new_full",
                                     "new_empty", "embedding", "index", "gather", "index_select",
                                     "one_hot", "repeat", "repeat_interleave", "flip", "roll",
                                     "constant_pad_nd", "pad", "getitem", "tuple", "arange", "zeros",
                                     "ones", "full", "empty", "scalar_tensor", "unfold",
                                     "_assert_tensor_metadata"})


def numel(t) -> int:
    if isinstance(t, TensorType):
        return t.numel
    if isinstance(t, TupleType):
        return sum(numel(i) for i in t.items)
    return 0


def estimate_flops(prim: Prim, slot_types: list, out_type) -> int:
    """FLOPs of one application: contractions by formula (2 per multiply-add), elementwise ops the
    result's elements, reductions and normalisations the input's elements, views and copies 0."""
    op = prim.op
    name = op.split(".")[1] if op.count(".") == 2 else op
    if name in ZERO_FLOP:
        return 0
    shapes = [t.shape if isinstance(t, TensorType) else None for t in slot_types]
    first = out_type.items[0] if isinstance(out_type, TupleType) else out_type
    out_n = first.numel if isinstance(first, TensorType) else 0
    try:
        if name in ("linear", "addmm", "mm", "bmm", "baddbmm", "matmul", "addbmm", "mv", "addmv"):
            a = {"addmm": 1, "baddbmm": 1, "addbmm": 1, "addmv": 1}.get(name, 0)
            k = shapes[a][-1]
            f = 2 * out_n * k
            if name == "addbmm":
                f *= shapes[a][0]
            if name in ("addmm", "baddbmm", "addbmm", "addmv") or (name == "linear" and len(shapes) > 2):
                f += out_n
            return f
        if name in ("dot", "vdot"):
            return 2 * shapes[0][0]
        if name in CONV:
            w = shapes[1]  # [Cout, Cin/groups, *k] (transposed: [Cin, Cout/groups, *k])
            transposed = name.startswith("conv_transpose") or (
                len(prim.args) > 6 and prim.args[6] is True)
            per = w[1] * math.prod(w[2:])
            bias = out_n if len(shapes) > 2 and shapes[2] else 0
            return 2 * (numel(slot_types[0]) if transposed else out_n) * per + bias
        if name == "scaled_dot_product_attention":
            q, k, v = shapes[0], shapes[1], shapes[2]
            L, E, S, Ev = q[-2], q[-1], k[-2], v[-1]
            batch = out_n // max(L * Ev, 1)
            return batch * L * S * (2 * E + 2 * Ev + 3)
        if name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
            gates = {"lstm": 4, "gru": 3}.get(name, 1)
            x, out = shapes[0], first.shape
            steps = math.prod(x[:-1])
            return 2 * steps * gates * (x[-1] + out[-1]) * out[-1]
        if name == "einsum":
            return 2 * max(out_n, 1) * max(1, math.prod(s[-1] for s in shapes if s))
        if name in POOL:
            return numel(slot_types[0])
    except (IndexError, TypeError):
        pass
    if name in REDUCE or name in ALONG or name in SORTS or name in (
            "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm",
            "native_group_norm", "batch_norm", "native_batch_norm", "_native_batch_norm_legit",
            "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional"):
        return numel(slot_types[0]) if slot_types else out_n
    return out_n


def site_slot_types(program: Program, site: Site) -> list:
    """The types of a site's operand slots (holes from inference, bound tensors, constants)."""
    out = []
    for kind, ref in slot_positions(site.prim):
        if kind == "hole":
            out.append(site.inputs[ref] if ref < len(site.inputs) else None)
        elif kind == "tensor":
            out.append(program.tensors[ref].type)
        else:
            out.append(program.consts[ref].type)
    return out
