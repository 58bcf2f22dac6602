"""DAG family: a term that only moves elements is judged by the leaf selection rule run on the whole
term (S iff every element is read; the identity when each lands where it was).
"""
from __future__ import annotations

import torch

from bwskc.evidence import GRAY, S, Verdict
from bwskc.ir import TensorType
from bwskc.passes.typing.dag import MOVE, term_call
from bwskc.passes.typing.movement import selection


class _TermLeaf:
    """A unary term seen as a leaf by the selection rule: its call is the term's own evaluation."""

    def __init__(self, dag, result):
        self.inputs = (dag.x.type,)
        self.out = dag.out_type
        self.op = "the composite"
        self._call = term_call(dag.term, result)

    def call(self, *xs):
        return self._call(*xs)

    def bound_known(self):
        return True

    def random(self, g, scale=1.0):
        from bwskc.leaf import random_value
        return tuple(random_value(t, g, scale) for t in self.inputs)


def decide_movement(dag, result) -> Verdict | None:
    """A verdict for a term that only moves elements, else None."""
    if not all(n.packet in MOVE for n in dag.nodes):
        return None
    leaf = _TermLeaf(dag, result)
    v = selection(leaf)
    if v.type == GRAY:
        return None
    ops = sorted({n.packet.removeprefix("aten.") for n in dag.nodes})
    if v.type == S:
        coded = (torch.arange(dag.x.type.numel, dtype=torch.float64) + 2.0 ** 40).reshape(dag.x.type.shape)
        y = leaf.call(coded)
        if isinstance(y, torch.Tensor) and y.shape == coded.shape and torch.equal(y.double(), coded) \
                and isinstance(dag.out_type, TensorType) and dag.out_type.dtype == dag.x.type.dtype:
            return Verdict(S, "data movement: identity", f"the composite only moves elements ({', '.join(ops)}) "
                           "and, run on coded inputs (element k holds 2^40 + k), puts every element back "
                           "where it was: it is the identity", 0, inverse=lambda y: (y,), surjective=True,
                           extra={"inverse_text": "identity", "domain": "reals"})
        v.rule, v.claim = "data movement", (f"the composite only moves elements ({', '.join(ops)}); run on "
                                            "coded inputs it copies every input element: a gather inverts it")
        v.extra["domain"] = "reals"
        return v
    v.rule = "data movement"
    v.claim = f"the composite only moves elements ({', '.join(ops)}): {v.claim.split(': ', 1)[-1]}"
    v.extra["domain"] = "reals"
    return v
