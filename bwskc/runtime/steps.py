"""One coupling step: which stream a step reads and which it updates, in one place.

A coupling chain ``Rk(add, f1..fn)`` (``bwskc.ir``) runs two streams ``(a, b)``. Step ``i`` (counting
from 0) reads one stream, its *source*, and adds ``f_i(source)`` to the other, its *destination*: even
steps read ``b`` and update ``a``, odd steps read ``a`` and update ``b``. Every runtime that runs a chain
(the eager evidence of ``coupling.coupling_functions``, the autograd ``coupling.CouplingFunction``, its
traceable twin ``compiled.TracedCouplingFunction``, and the unrolled store-activations denotation in
``denote.Denoter.rev``) goes through these functions, so the alternation rule is written once.

The functions only choose and reassemble streams: they create no tensor. The arithmetic is the
caller's (``combine`` / ``add`` / ``sub``), called exactly once per step with ``(destination, y)``, so
each runtime keeps its own ops (``stream_update`` kernels, ``+``, an fx node) in their own order.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def updates_a(i: int) -> bool:
    """Whether step ``i`` updates stream ``a`` (reading ``b``): the even steps. The alternation rule."""
    return i % 2 == 0


def step_streams(i: int, a: T, b: T) -> tuple[T, T]:
    """``(source, destination)`` of step ``i``: the stream its branch reads and the one it updates
    (``(b, a)`` for even ``i``, ``(a, b)`` for odd). Any per-stream pair works, e.g. the streams'
    gradients: the destination's gradient is then the cotangent of the branch output ``y``."""
    return (b, a) if updates_a(i) else (a, b)


def with_destination(i: int, a: T, b: T, new: T) -> tuple[T, T]:
    """``(a, b)`` with step ``i``'s destination replaced by ``new``."""
    return (new, b) if updates_a(i) else (a, new)


def with_source(i: int, a: T, b: T, new: T) -> tuple[T, T]:
    """``(a, b)`` with step ``i``'s source replaced by ``new``."""
    return (a, new) if updates_a(i) else (new, b)


def update_step(i: int, a: T, b: T, y, combine: Callable) -> tuple[T, T]:
    """``(a, b)`` after step ``i``'s destination becomes ``combine(destination, y)``, ``y`` being the
    branch's output on the source (computed by the caller, e.g. with a graph it keeps)."""
    return with_destination(i, a, b, combine(step_streams(i, a, b)[1], y))


def forward_step(i: int, a: T, b: T, branch: Callable, add: Callable = operator.add) -> tuple[T, T]:
    """Step ``i`` of the chain: ``destination <- add(destination, branch(source))`` (the branch runs
    first, then ``add``, once each)."""
    return update_step(i, a, b, branch(step_streams(i, a, b)[0]), add)


def inverse_step(i: int, a: T, b: T, y, sub: Callable = operator.sub) -> tuple[T, T]:
    """Step ``i`` undone: ``destination <- sub(destination, y)`` with ``y = branch(source)`` recomputed by
    the caller (the source is what the step left unchanged, so ``y`` is the forward's own)."""
    return update_step(i, a, b, y, sub)


def backward_step(i: int, grad_a: T, grad_b: T, grad_source, add: Callable = operator.add) -> tuple[T, T]:
    """The streams' gradients before step ``i``, from those after it and ``grad_source``, the gradient
    of the branch's input through ``y`` (the VJP of the destination's gradient, see ``step_streams``):
    the source's gradient becomes ``add(its gradient, grad_source)``; the destination's passes through
    (its step adds to it). ``grad_source`` None (the branch ignores its input) changes nothing."""
    if grad_source is None:
        return grad_a, grad_b
    return with_source(i, grad_a, grad_b, add(step_streams(i, grad_a, grad_b)[0], grad_source))
