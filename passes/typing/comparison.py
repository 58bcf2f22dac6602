"""Leaf rules for predicates (comparisons, isnan, logical and/or) and for ``where`` and ``masked_fill``."""
from __future__ import annotations

import math

import torch

from bwskc.evidence import Verdict, erasing, gray, injective
from bwskc.ir import HOLE, TensorType
from bwskc.leaf import Leaf
from bwskc.passes.typing.arithmetic import unbroadcast
from bwskc.passes.typing.movement import selection
from bwskc.passes.typing.table import rule


_AND = ("aten.__and__", "aten.logical_and", "aten.bitwise_and")
_OR = ("aten.__or__", "aten.logical_or", "aten.bitwise_or")


@rule("aten.le", "aten.lt", "aten.ge", "aten.gt", "aten.eq", "aten.ne", "aten.isnan", "aten.isinf",
      "aten.isfinite", *_AND, *_OR)
def predicate(leaf: Leaf) -> Verdict:
    """Comparisons keep one bit of real inputs; and/or of two masks lose the operand that is masked."""
    boolean = all(isinstance(t, TensorType) and t.torch_dtype == torch.bool for t in leaf.inputs)
    if leaf.packet in _AND + _OR and boolean:
        if len(leaf.inputs) == 2:
            fill = leaf.packet in _OR  # the second operand decides: False for and, True for or

            def witness(g):
                t = leaf.inputs[0]
                other = torch.full(t.shape, fill, dtype=torch.bool)
                return (torch.zeros(t.shape, dtype=torch.bool), other), (
                    torch.ones(t.shape, dtype=torch.bool), other)
            return erasing("boolean", f"{leaf.packet}(a, b) ignores a where b is "
                           f"{'True' if fill else 'False'}", witness, "a flipped where b decides", None,
                           "discrete input")
        passing = leaf.packet in _AND  # the bound value that lets the activation through
        mask = leaf.arg("other" if leaf.is_hole("self") else "self")
        if mask is None:
            return gray("boolean", f"{leaf.packet} with one bound mask is injective iff the mask lets "
                        "every bit through", "the bound mask is all True (and) or all False (or)",
                        "its value")
        blocked = torch.broadcast_to(torch.as_tensor(mask) != passing, leaf.out.shape)
        if not bool(blocked.any()):
            return injective("boolean", f"the bound mask is all {passing}: {leaf.packet} passes its "
                             "operand through", lambda y: (unbroadcast(y, leaf.x),), "identity")

        def witness(g):
            a = leaf.random(g)[0]
            flip = unbroadcast(blocked, TensorType("bool", leaf.x.shape)) if blocked.shape != tuple(
                leaf.x.shape) else blocked
            return (a,), (a ^ flip,)
        return erasing("boolean", f"where the bound mask is {not passing}, {leaf.packet} ignores its "
                       "operand", witness, "the operand flipped where the mask decides", None,
                       "discrete input")
    if len(leaf.inputs) == 2:
        def witness(g):  # move both operands by the same integer: order and equality are kept
            a = tuple(_integral(t, g) for t in leaf.inputs)
            return a, tuple(x + 3 for x in a)
        text = "(x, y) and (x + 3, y + 3)"
    else:
        other = leaf.arg("other")
        far = 1000.0 + (float(torch.as_tensor(other).double().abs().max()) * 2
                        if isinstance(other, (int, float, torch.Tensor)) and torch.as_tensor(other).numel()
                        and bool(torch.isfinite(torch.as_tensor(other)).all()) else 0.0)

        def witness(g, far=far):  # two finite inputs beyond the threshold, on the same side of it
            x = _integral(leaf.inputs[0], g)
            x = (x.abs() + math.ceil(far)).to(x.dtype)
            return (x,), (x * 2,)
        text = "x and 2x, beyond the threshold"
    return erasing("predicate", f"{leaf.packet} is boolean-valued: it keeps one bit of each element",
                   witness, text, None, "a step function: its Jacobian is 0 almost everywhere")


def _integral(t: TensorType, g) -> torch.Tensor:
    if t.torch_dtype == torch.bool:
        return torch.rand(t.shape, generator=g) < 0.5
    return torch.randint(-4, 4, t.shape, generator=g).to(t.torch_dtype)


@rule("aten.where")
def where(leaf: Leaf) -> Verdict:
    if leaf.names.get("condition") is HOLE:
        branch = 1 if leaf.is_hole("self") else (2 if leaf.is_hole("other") else None)

        def witness(g):  # the condition picks the other branch everywhere: this one is not read
            a = list(leaf.random(g))
            a[0] = torch.full_like(a[0], branch != 1, dtype=torch.bool)
            b = list(a)
            if branch is not None:
                b[branch] = a[branch] + 1
            else:
                b[0] = ~a[0] & False
                a[0] = a[0] & False
            return tuple(a), tuple(b)
        if branch is None:
            a, b = leaf.arg("self"), leaf.arg("other")
            if a is None or b is None:
                return gray("selection", "where with only the condition free is injective iff its two "
                            "bound branches differ everywhere", "the branches differ everywhere",
                            "the branches' values")
            differ = torch.broadcast_to(torch.as_tensor(a) != torch.as_tensor(b), leaf.out.shape)
            if bool(differ.all()):
                return injective("selection", "the two bound branches differ everywhere, so the output "
                                 "tells which one the condition picked", lambda y: (unbroadcast(
                                     y == torch.as_tensor(a).to(y.dtype), leaf.x),),
                                 "condition = (y == first branch)")
            return gray("selection", "the bound branches agree somewhere: the condition is lost there "
                        "unless it is broadcast from positions where they differ",
                        "each condition element meets a position where the branches differ",
                        "a per-element check")
        return erasing("selection", "where(c, x, y) does not read x where c is False (nor y where it "
                       "is True)", witness, "the condition picks the other branch; this one moved",
                       None, "data-dependent: the unread branch")
    if not leaf.bound_known():
        return gray("selection", "where with a bound condition reads each branch only where it selects",
                    "the condition selects every element of each activation branch",
                    "the condition's value")
    return selection(leaf)


@rule("aten.masked_fill")
def masked_fill(leaf: Leaf) -> Verdict:
    if leaf.is_hole("mask"):
        return gray("selection", "masked_fill with an activation mask hides the masked values",
                    "the mask is all False", "a rule for activation masks")
    return selection(leaf) if leaf.bound_known() else gray(
        "selection", "masked_fill erases the masked elements", "the mask is all False", "its value")
