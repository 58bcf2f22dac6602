"""Leaf rules for linear maps with a bound weight: linear, addmm, mm/matmul/bmm, einsum with one
activation operand, embedding, one_hot and cumsum (rank certificates: ``rank``).
"""
from __future__ import annotations

import torch

from bwskc.evidence import Verdict, erasing, gray, injective, no_rule
from bwskc.leaf import Leaf
from bwskc.passes.typing.movement import constant_of, out_parts
from bwskc.passes.typing.rank import linear_verdict
from bwskc.passes.typing.table import is_float, numel, rule


def _add_to_last(a: tuple, v: torch.Tensor, index: int = 0):
    x = a[index]
    scale = x.abs().max().clamp(min=1)
    out = list(a)
    out[index] = x + (v * scale).to(x.dtype)
    return tuple(out)


@rule("aten.linear")
def linear(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["input"] or leaf.x is None:
        return _bilinear_or_none(leaf)
    w = leaf.arg("weight")
    d, k = leaf.x.shape[-1], leaf.out.shape[-1]
    rows = leaf.x.numel // max(d, 1)

    def inverse(y, w=w):
        b = leaf.arg("bias")
        yd = y.double() - (b.double() if b is not None else 0)
        return ((yd @ torch.linalg.pinv(w.double()).T).to(y.dtype),)
    return linear_verdict(leaf, w, d, k, rows, inverse, lambda a, v: _add_to_last(a, v))


@rule("aten.addmm")
def addmm(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["mat1"] or leaf.x is None:
        return _bilinear_or_none(leaf)
    m2 = leaf.arg("mat2")
    w = m2.T if m2 is not None else None
    beta, alpha = leaf.arg("beta", 1), leaf.arg("alpha", 1)
    d, k = leaf.x.shape[-1], leaf.out.shape[-1]

    def inverse(y, w=w):
        b = leaf.arg("self")
        yd = y.double() - beta * (b.double() if b is not None else 0)
        return ((yd / alpha @ torch.linalg.pinv(w.double()).T).to(y.dtype),)
    if alpha == 0:
        return constant_of(leaf)
    return linear_verdict(leaf, w, d, k, leaf.x.shape[0], inverse, lambda a, v: _add_to_last(a, v))


@rule("aten.mm", "aten.matmul", "aten.bmm")
def matmul(leaf: Leaf) -> Verdict:
    if leaf.hole_args == ["self"] and leaf.x is not None and leaf.x.shape:
        w2 = leaf.arg("mat2" if "mat2" in leaf.names else "other")
        if w2 is None or w2.dim() == 2:
            w = w2.T if w2 is not None else None
            d = leaf.x.shape[-1]
            k = leaf.out.shape[-1] if leaf.out.shape else 1

            def inverse(y, w=w):
                return ((y.double() @ torch.linalg.pinv(w.double()).T).to(y.dtype),)
            return linear_verdict(leaf, w, d, k, leaf.x.numel // max(d, 1), inverse,
                                   lambda a, v: _add_to_last(a, v))
    if leaf.hole_args == ["other"] and len(leaf.inputs) == 1 and leaf.x is not None and \
            len(leaf.x.shape) >= 2:
        w = leaf.arg("self")
        if w is None or w.dim() == 2:  # y = W x on each column of x
            d = leaf.x.shape[-2]
            k = leaf.out.shape[-2]

            def inverse(y, w=w):
                return ((torch.linalg.pinv(w.double()) @ y.double()).to(y.dtype),)

            def shift(a, v):
                x = a[0]
                scale = x.abs().max().clamp(min=1)
                return (x + (v * scale).reshape(-1, 1).to(x.dtype),)
            return linear_verdict(leaf, w, d, k, leaf.x.numel // max(d, 1), inverse, shift)
    return _bilinear_or_none(leaf)


def _bilinear_or_none(leaf: Leaf) -> Verdict:
    if len(leaf.inputs) == 1 and is_float(leaf.x) and len(leaf.hole_args) == 1:  # a batched bound operand
        return _operator_verdict(leaf)
    if len(leaf.hole_args) == 2 and all(is_float(t) for t in leaf.inputs):
        a_t, b_t = leaf.inputs
        lost = None
        if len(a_t.shape) >= 2 and len(b_t.shape) >= 2:
            m, n = a_t.shape[-2:]
            p = b_t.shape[-1]
            batch = numel(leaf.out) // max(m * p, 1)
            per = n * n if n < min(m, p) else n * (m + p) - m * p
            lost = per * batch
        return erasing("bilinear", "a product of two activations is unchanged by (2a, b/2)",
                       lambda g: (lambda a: (a, (a[0] * 2, a[1] / 2)))(leaf.random(g)),
                       "(a, b) and (2a, b/2)", lost,
                       "per product: n^2 if n < min(m, p) (A G, G^-1 B), else n(m + p) - mp")
    return no_rule(leaf.op)


@rule("aten.embedding")
def embedding(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["indices"] or leaf.x is None:
        return no_rule(leaf.op)
    w = leaf.arg("weight")
    vocab = w.shape[0] if w is not None else None

    def sample(g):
        n = vocab or 8
        return (torch.randint(0, n, leaf.x.shape, generator=g, dtype=leaf.x.torch_dtype),)
    if w is None:
        return gray("distinct rows", "an embedding is injective on token ids iff its rows are distinct",
                    "the rows of the weight are pairwise distinct", "the weights", None, sample=sample)
    _, inverse_idx, counts = torch.unique(w, dim=0, return_inverse=True, return_counts=True)
    if int(counts.max()) == 1:
        def inverse(y, w=w):
            flat = y.reshape(-1, w.shape[1]).double()
            idx = torch.cdist(flat, w.double()).argmin(dim=1)
            return (idx.reshape(leaf.x.shape).to(leaf.x.torch_dtype),)
        v = sample
        return Verdict("S", "distinct rows", f"the {vocab} rows of the weight are pairwise distinct "
                       "(checked): the nearest row recovers the id", None, "discrete input",
                       inverse=inverse, sample=v, extra={"inverse_text": "nearest row of the weight"})
    dup = int(torch.nonzero(counts > 1)[0])
    ids = torch.nonzero(inverse_idx == dup).flatten()[:2]

    def witness(g):
        return ((torch.full(leaf.x.shape, int(ids[0]), dtype=leaf.x.torch_dtype),),
                (torch.full(leaf.x.shape, int(ids[1]), dtype=leaf.x.torch_dtype),))
    return erasing("equal rows", f"rows {int(ids[0])} and {int(ids[1])} of the weight are equal",
                   witness, f"ids {int(ids[0])} and {int(ids[1])}", None, "discrete input",
                   sample=sample)


@rule("aten.one_hot")
def one_hot(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return no_rule(leaf.op)
    n = leaf.arg("num_classes", -1)
    n = leaf.out.shape[-1] if n in (None, -1) else n
    return Verdict("S", "one-hot", "one_hot(i) has its single 1 at i: argmax recovers i (ids in range)",
                   None, "discrete input", inverse=lambda y: (y.argmax(-1).to(leaf.x.torch_dtype),),
                   sample=lambda g: (torch.randint(0, n, leaf.x.shape, generator=g,
                                                   dtype=leaf.x.torch_dtype),),
                   extra={"inverse_text": "argmax"})


@rule("aten.cumsum")
def cumsum(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return no_rule(leaf.op)
    dim = leaf.arg("dim") % max(len(leaf.x.shape), 1)

    def inverse(y):
        return (torch.diff(y.double(), dim=dim, prepend=torch.zeros_like(y.double().narrow(dim, 0, 1)))
                .to(leaf.x.torch_dtype),)
    return injective("triangular", "a running sum is a unit lower-triangular linear map: differences "
                     "invert it", inverse, "differences along the summed axis",
                     surjective=leaf.out.dtype == leaf.x.dtype)


_OPERATOR_LIMIT = 1024  # input elements: the operator is built column by column, then an SVD


def _operator_verdict(leaf: Leaf) -> Verdict:
    """An op linear in its one activation input (bmm, matmul, einsum with a bound operand): its matrix
    is read off by evaluating it on basis vectors (each entry a single product of stored values: exact),
    then judged by its rank like a linear layer."""
    t = leaf.x
    n = t.numel
    if n > _OPERATOR_LIMIT or not leaf.bound_known():
        why = "too large to build here" if n > _OPERATOR_LIMIT else "its bound operand is unknown"
        return gray("rank", f"{leaf.packet} is linear in its activation: injective iff its operator has "
                    f"full column rank {n}", f"rank = {n}", f"the operator's SVD ({why})", None)
    zero = torch.zeros(t.shape, dtype=t.torch_dtype)
    columns = []
    for j in range(n):
        e = zero.clone().reshape(-1)
        e[j] = 1
        columns.append(out_parts(leaf.call(e.reshape(t.shape)))[0].double())
    op = torch.stack(columns, 1)
    out_shape = leaf.out.shape

    def inverse(y, op=op):
        flat = y.double().reshape(-1)
        return ((torch.linalg.pinv(op) @ flat).reshape(t.shape).to(y.dtype),)

    def shift(a, v):
        x = a[0]
        scale = x.abs().max().clamp(min=1)
        return (x + (v * scale).reshape(t.shape).to(x.dtype),)
    del out_shape
    v = linear_verdict(leaf, op, n, op.shape[0], 1, inverse, shift)
    if v.rank is not None:
        v.rank["operator"] = "the matrix of the map on the whole input, from basis vectors"
    return v


@rule("aten.einsum")
def einsum(leaf: Leaf) -> Verdict:
    """einsum is multilinear in its operands: with one activation operand a linear map (rank), with
    several a product, unchanged by (2a, b/2)."""
    if len(leaf.inputs) == 1 and is_float(leaf.x):
        return _operator_verdict(leaf)
    if len(leaf.inputs) >= 2 and all(is_float(t) for t in leaf.inputs):
        def witness(g):
            a = leaf.random(g)
            return a, (a[0] * 2, a[1] / 2, *a[2:])
        return erasing("bilinear", "einsum is multilinear: (a, b) and (2a, b/2) give the same product",
                       witness, "(a, b) and (2a, b/2)", None, "not derived")
    return no_rule(leaf.op)
