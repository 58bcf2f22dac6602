"""Leaf rules for data movement: selection (slice, index, gather, cat, pad, getitem...), reshape, identity,
permutation, broadcast, constants of an input's shape (zeros_like...), sort and topk.

Every output element is a copy of an input element or a constant: running the op once on coded inputs
(element k holds 2**40 + k) shows which elements are read (docs/typing.md, "Leaf rules").
"""
from __future__ import annotations

import torch

from bwskc.evidence import Verdict, erasing, gray, injective, no_rule
from bwskc.ir import TensorType, TupleType
from bwskc.leaf import Leaf
from bwskc.passes.typing.table import dof, is_float, numel, rule


_BASE = float(2 ** 40)
SELECTION_LIMIT = 1 << 24  # input elements above which an op is too large to run on coded inputs


def _coded(types, start: int):
    out = []
    for t in types:
        if isinstance(t, TupleType):
            items, start = _coded(t.items, start)
            out.append(tuple(items))
        else:
            n = t.numel
            out.append((torch.arange(n, dtype=torch.float64) + _BASE + start).reshape(t.shape))
            start += n
    return out, start


def out_parts(y) -> list[torch.Tensor]:
    """Every tensor of an output (tuples flattened in order, any dtype), each flattened."""
    if isinstance(y, (tuple, list)):
        return [p for i in y for p in out_parts(i)]
    if isinstance(y, torch.Tensor):
        return [y.reshape(-1)]
    return []


def _tensor_types(t) -> list[TensorType]:
    if isinstance(t, TupleType):
        return [i for item in t.items for i in _tensor_types(item)]
    return [t] if isinstance(t, TensorType) else []


def _rebuild(types, parts: list[torch.Tensor], part_of: torch.Tensor, local: torch.Tensor, start: int = 0):
    """The inputs of ``types`` (tuples nested as they are) whose element k is the output element
    ``parts[part_of[k]][local[k]]``, each in its own dtype (exact: no common dtype in between)."""
    out = []
    for t in types:
        if isinstance(t, TupleType):
            items, start = _rebuild(t.items, parts, part_of, local, start)
            out.append(tuple(items))
            continue
        values = torch.empty(t.numel, dtype=t.torch_dtype)
        pj, lj = part_of[start:start + t.numel], local[start:start + t.numel]
        for j in pj.unique().tolist():
            m = pj == j
            values[m] = parts[j][lj[m]].to(t.torch_dtype)
        out.append(values.reshape(t.shape))
        start += t.numel
    return out, start


def _bump(types, values, k: int, start: int = 0):
    """``values`` (of ``types``) with input element k changed: flipped if bool, plus 1 otherwise."""
    out = []
    for t, v in zip(types, values):
        if isinstance(t, TupleType):
            items, start = _bump(t.items, v, k, start)
            out.append(tuple(items))
            continue
        if start <= k < start + t.numel:
            v = v.clone().reshape(-1)
            v[k - start] = ~v[k - start] if v.dtype == torch.bool else v[k - start] + 1
            v = v.reshape(t.shape)
        out.append(v)
        start += t.numel
    return out, start


@rule("aten.slice", "aten.select", "aten.index", "aten.index_select", "aten.gather", "aten.cat",
      "aten.stack", "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind", "aten.narrow",
      "aten.flip", "aten.roll", "aten.repeat", "aten.constant_pad_nd", "aten.unfold", "aten.diagonal",
      "aten.as_strided", "aten.movedim", "aten.tensor_split", "aten.take", "getitem", "tuple",
      "aten.pixel_shuffle", "aten.pixel_unshuffle", "aten.channel_shuffle", "aten.tril", "aten.triu",
      "aten.im2col", "aten.pad", "aten.reflection_pad1d", "aten.reflection_pad2d", "aten.reflection_pad3d",
      "aten.replication_pad1d", "aten.replication_pad2d", "aten.replication_pad3d",
      "aten.upsample_nearest1d", "aten.upsample_nearest2d", "aten.upsample_nearest3d",
      "aten._upsample_nearest_exact1d", "aten._upsample_nearest_exact2d", "aten._upsample_nearest_exact3d",
      "aten.broadcast_tensors")
def selection(leaf: Leaf) -> Verdict:
    """Output elements are copies of input elements (or constants): decide by running on codes.

    Every input (floating, integer or bool) is coded in float64; the inverse gathers each input element
    from the output tensor holding its first copy, in that input's own dtype."""
    total = sum(numel(t) for t in leaf.inputs)
    if total > SELECTION_LIMIT or not leaf.bound_known():
        why = "too large to code here" if total > SELECTION_LIMIT else "its bound indices are unknown"
        return gray("selection", f"{leaf.op} copies input elements: injective iff it reads every one",
                    "every input element appears in the output", f"coding its inputs ({why})", None)
    coded, n = _coded(leaf.inputs, 0)
    parts = out_parts(leaf.call(*coded))
    flat = torch.cat([p.to(torch.float64) for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)
    codes = flat - _BASE
    valid = (codes >= 0) & (codes < n) & (codes == codes.round())
    pos = torch.nonzero(valid).flatten()
    code_at = codes[pos].long()
    first = torch.full((n,), -1, dtype=torch.long)
    first.scatter_reduce_(0, code_at, pos, reduce="amin", include_self=False)
    unread = torch.nonzero(first < 0).flatten()
    if len(unread) == 0:
        sizes = torch.tensor([len(p) for p in parts], dtype=torch.long)
        ends = torch.cumsum(sizes, 0)
        part_of = torch.searchsorted(ends, first, right=True)
        local = first - (ends - sizes)[part_of]

        def inverse(y, part_of=part_of, local=local, types=leaf.inputs):
            return tuple(_rebuild(types, out_parts(y), part_of, local)[0])
        # onto its type when the copies are a bijection and each keeps its element's dtype
        ins = [t.torch_dtype for t in _tensor_types(TupleType(tuple(leaf.inputs)))]
        outs = [t.torch_dtype for t in _tensor_types(leaf.out)]
        onto = len(pos) == n and len(flat) == n and len(outs) == len(parts)
        if onto:
            in_dt = torch.tensor([i for i, t in enumerate(_tensor_types(TupleType(tuple(leaf.inputs))))
                                  for _ in range(t.numel)], dtype=torch.long)
            out_dt = torch.repeat_interleave(torch.arange(len(parts)), sizes)
            onto = all(ins[int(i)] == outs[int(o)] for i, o in
                       torch.unique(torch.stack([in_dt[code_at], out_dt[pos]]), dim=1).T)
        return injective("selection", f"{leaf.op} copies every input element to the output "
                         "(checked by running it on coded inputs): a gather recovers the inputs",
                         inverse, "gather of the first output position of each input element",
                         surjective=onto)
    k = int(unread[0])

    def witness(g, k=k, leaf=leaf):
        a = leaf.random(g)
        return a, tuple(_bump(leaf.inputs, a, k)[0])
    return erasing("selection", f"{leaf.op} never reads {len(unread)} of its {n} input elements",
                   witness, f"change input element {k} (not read)", dof(leaf, len(unread)),
                   "unread input elements")


def _reshape_back(leaf: Leaf):
    shape = leaf.x.shape
    return lambda y: (y.reshape(shape),)


@rule("aten.view", "aten._unsafe_view", "aten.reshape", "aten.flatten", "aten.unflatten",
      "aten.squeeze", "aten.unsqueeze", "aten.view_as")
def reshape(leaf: Leaf) -> Verdict:
    if leaf.x is None or numel(leaf.out) != leaf.x.numel:
        return selection(leaf)
    return injective("reshape", "a reshape keeps every element in row-major order: reshaping back "
                     "inverts it", _reshape_back(leaf), "reshape to the input shape", surjective=True)


@rule("aten.clone", "aten.alias", "aten.contiguous", "aten.detach", "aten.lift_fresh_copy",
      "aten.positive", "aten.resolve_conj", "aten.resolve_neg")
def identity(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return selection(leaf)
    return injective("identity", f"{leaf.op} returns its input's values", lambda y: (y,), "identity",
                     surjective=True)


@rule("aten.transpose", "aten.permute", "aten.t", "aten.swapaxes", "aten.numpy_T")
def permute(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return selection(leaf)
    rank = len(leaf.x.shape)
    if leaf.packet == "aten.permute":
        dims = [d % rank for d in leaf.arg("dims")]
    else:
        dims = list(range(rank))
        if leaf.packet != "aten.t" or rank == 2:
            i, j = (leaf.arg("dim0", 0), leaf.arg("dim1", 1)) if leaf.packet != "aten.t" else (0, 1)
            i, j = i % max(rank, 1), j % max(rank, 1)
            dims[i], dims[j] = dims[j], dims[i]
    back = [dims.index(i) for i in range(rank)]
    return injective("permutation", "a permutation of axes is inverted by the inverse permutation",
                     lambda y: (y.permute(back),), f"permute {back}", surjective=True)


@rule("aten.expand", "aten.expand_as", "aten.broadcast_to")
def expand(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return selection(leaf)
    src, dst = leaf.x.shape, leaf.out.shape
    lead = len(dst) - len(src)

    def inverse(y):
        y = y[(0,) * lead] if lead else y
        for i, s in enumerate(src):
            if s == 1 and y.shape[i] != 1:
                y = y.narrow(i, 0, 1)
        return (y.contiguous(),)
    return injective("broadcast", "a broadcast copies each element at least once: one copy of each "
                     "recovers the input", inverse, "first copy along each broadcast axis")


@rule("aten.zeros_like", "aten.ones_like", "aten.full_like", "aten.empty_like", "aten.new_zeros",
      "aten.new_ones", "aten.new_full", "aten.new_empty", "aten.scalar_tensor", "aten.rand_like",
      "aten.randn_like", "aten.sym_size", "aten.size")
def constant_of(leaf: Leaf) -> Verdict:
    def witness(g):
        a = leaf.random(g)
        return a, tuple(x + 1 if x.dtype != torch.bool else ~x for x in a)
    return erasing("constant", f"{leaf.packet} reads only its input's shape", witness, "x and x + 1",
                   dof(leaf, sum(numel(t) for t in leaf.inputs)))


def _permutation_witness(leaf: Leaf, dim: int):
    """x and x reversed along ``dim``: a different input (random values are distinct) with the same
    multiset of values in every slice."""
    def witness(g):
        a = leaf.random(g)[0]
        return (a,), (a.flip(dim),)
    return witness


def _scatter_back(dim: int):
    """The input from (values, indices) of a sort: x[..., indices[i], ...] = values[i]."""
    def inverse(y):
        values, indices = y[0], y[1]
        return (torch.empty_like(values).scatter_(dim, indices, values),)
    return inverse


@rule("aten.sort")
def sort(leaf: Leaf) -> Verdict:
    """(values, indices) of a sort is a bijection onto its image: scattering the values back to the
    indices recovers x. The values alone erase the order: x and a permutation of it collide."""
    if leaf.x is None or not leaf.x.shape:
        return no_rule(leaf.op)
    dim = leaf.arg("dim", -1) % len(leaf.x.shape)
    size = leaf.x.shape[dim]
    v = injective("sort", "values and indices together: x[indices] = values", _scatter_back(dim),
                  "scatter the values back to their indices")
    if size >= 2:
        v.extra["output_only"] = erasing(
            "sort", "the sorted values alone do not depend on the order: x and a permutation of it "
            "sort alike", _permutation_witness(leaf, dim), "x and x reversed along the sorted axis",
            None, "the order (a permutation: discrete)")
    return v


@rule("aten.topk")
def topk(leaf: Leaf) -> Verdict:
    """topk with k < n never reads the n - k smallest (largest=False: largest) elements beyond their
    rank: lowering the smallest changes neither values nor indices. With k = n it is a sort."""
    if leaf.x is None or not leaf.x.shape or not is_float(leaf.x):
        return no_rule(leaf.op)
    dim = leaf.arg("dim", -1) % len(leaf.x.shape)
    k, n, largest = leaf.arg("k"), leaf.x.shape[dim], leaf.arg("largest", True)
    if k == n:
        v = injective("sort", f"topk with k = n = {n} returns every element with its index",
                      _scatter_back(dim), "scatter the values back to their indices")
        if n >= 2:
            v.extra["output_only"] = erasing("sort", "the values alone do not depend on the order",
                                             _permutation_witness(leaf, dim),
                                             "x and x reversed along the axis", None, "the order")
        return v

    def witness(g):
        a = leaf.random(g)[0].clone()
        # the extreme element away from the kept end, in every slice, pushed further out
        ext = a.amin(dim, keepdim=True) if largest else a.amax(dim, keepdim=True)
        step = -1 if largest else 1
        b = torch.where(a == ext, a + step, a)
        return (a,), (b,)
    return erasing("top k", f"topk with k = {k} < {n} keeps only the {k} {'largest' if largest else 'smallest'} "
                   "of each slice: the others can move away", witness,
                   f"the {'smallest' if largest else 'largest'} element of each slice moved further out",
                   None, "data-dependent")
