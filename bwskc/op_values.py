"""What an IR primitive's op and arguments are as Python values: the op's callable and its filled-in
arguments.

Both are about the IR's ops, not about running a program: the verifier re-runs each primitive on meta
tensors with them (``bwskc.verify``), the runtime's denotation calls them on real tensors or fx nodes
(``bwskc.runtime.denote``, which re-exports both), and the passes use them for their evidence. This
module imports only the IR and the op table (``bwskc.ops``), never ``bwskc.runtime``.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from bwskc.ir import HOLE, ConstRef, TensorRef

# view ops run as reshape (see ``resolve_op``)
AS_RESHAPE = ("aten.view.default", "aten._unsafe_view.default")


@cache
def resolve_op(name: str) -> Callable:
    """The callable for an IR op name: ``aten.add.Tensor`` -> ``torch.ops.aten.add.Tensor``."""
    if name == "getitem":
        return operator.getitem
    if name == "tuple":
        return lambda *xs: tuple(xs)
    if name in AS_RESHAPE:
        # The IR is functional: a view's meaning is its values, not its strides. torch.export's fake
        # strides can disagree with a CPU kernel's (T5's attention output), so run views as reshape.
        return torch.ops.aten.reshape.default
    # never getattr from torch.ops on an untrusted name: the registry-checked allow-list does it
    from bwskc.ops import lookup_overload
    return lookup_overload(name)


def fill(args: tuple, operands: list, bound: Callable[[Any], Any]) -> list:
    """Replace holes by operands (consumed in order) and references by their values; tuples -> lists."""
    out = []
    for a in args:
        if a is HOLE:
            out.append(operands.pop(0))
        elif isinstance(a, tuple):
            out.append(fill(a, operands, bound))
        elif isinstance(a, (TensorRef, ConstRef)):
            out.append(bound(a))
        else:
            out.append(a)
    return out
