"""The expression DAG of a unary term (its input, its nodes, its bound tensors), the term's own evaluation
(as typed, or all in float64), and the helpers the DAG families share.
"""
from __future__ import annotations

import torch


class Var:
    """The term's (single) input."""
    __slots__ = ("type",)

    def __init__(self):
        self.type = None


class Node:
    """One primitive application of the DAG; ``args``/``kwargs`` filled (holes replaced by operands)."""
    __slots__ = ("prim", "args", "kwargs", "operands", "active")

    def __init__(self, prim, args, kwargs):
        self.prim, self.args, self.kwargs, self.operands, self.active = prim, args, kwargs, [], False

    @property
    def op(self) -> str:
        return self.prim.op

    @property
    def packet(self) -> str:
        return self.prim.op.rsplit(".", 1)[0] if self.prim.op.count(".") == 2 else self.prim.op


class Bound:
    """A bound tensor (by name)."""
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


class Dag:
    """A unary term as an expression DAG: ``root`` (a node, the input, or a constant node), ``x`` the
    input with its type, ``nodes`` the active nodes in evaluation order."""

    def __init__(self, term, root, x, nodes):
        self.term, self.root, self.x, self.nodes = term, root, x, nodes

    @property
    def out_type(self):
        return self.root.prim.type if isinstance(self.root, Node) else self.x.type


def values_in(v):
    """Every node and input inside a (nested) argument, in order."""
    if isinstance(v, (list, tuple)):
        for i in v:
            yield from values_in(i)
    elif isinstance(v, (Node, Var)):
        yield v


class _Backend64:
    def __init__(self, weights):
        self.weights, self.cache = weights, {}

    def prim(self, prim, args, kwargs):
        from bwskc.runtime.denote import resolve_op
        return resolve_op(prim.op)(*args, **kwargs)

    def tensor(self, name):
        if name not in self.cache:
            w = self.weights[name]
            self.cache[name] = w.double() if w.is_floating_point() else w
        return self.cache[name]


def term_call(term, result, f64: bool = False):
    """The term's own evaluation as a callable of its inputs (eager as typed, or all in float64)."""
    from bwskc.runtime.denote import Denoter
    from bwskc.runtime.interp import EagerBackend
    program = result._program
    backend = _Backend64(program.weights) if f64 else EagerBackend(program.weights)
    f = Denoter(program, backend).term(term)

    def call(*xs):
        out = f
        with torch.no_grad():
            for x in xs:
                out = out(x)
        return out
    return call


# ops (by packet) that only move elements
MOVE = {
    "aten.slice", "aten.select", "aten.index", "aten.index_select", "aten.gather", "aten.cat", "aten.stack",
    "aten.split", "aten.split_with_sizes", "aten.chunk", "aten.unbind", "aten.narrow", "aten.flip",
    "aten.roll", "aten.repeat", "aten.movedim", "aten.tensor_split", "getitem", "tuple", "aten.view",
    "aten._unsafe_view", "aten.reshape", "aten.unsqueeze", "aten.squeeze", "aten.clone", "aten.alias",
    "aten.transpose", "aten.permute", "aten.expand", "aten.t", "aten.contiguous", "aten.diagonal",
    "aten.unfold", "aten.pixel_shuffle", "aten.pixel_unshuffle",
}


def literal_scalar(v):
    """A literal scalar's value (not a bool), else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def alpha_of(n) -> float | None:
    """The literal ``alpha`` of an add, sub or rsub node, else None."""
    alpha = n.kwargs.get("alpha", n.args[2] if len(n.args) > 2 else 1)
    return literal_scalar(alpha)
