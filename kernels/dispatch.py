"""Which implementation runs a coupling: the Triton kernels or torch, chosen per call.

``BWSKC_KERNELS`` (read at every call, so tests and users can switch it without re-importing):

* ``auto`` (default): the Triton kernels for CUDA tensors when triton imports, torch otherwise;
* ``triton``: always the kernels; on CPU tensors they need the interpreter (``TRITON_INTERPRET=1`` set
  before triton is imported), else a RuntimeError says so;
* ``torch``: always ``bwskc.kernels.reference`` (the same formulas and dropout mask).

``stream_update`` is the reversible runtime's seam (``bwskc.runtime.coupling``): a coupling step's
``stream + y`` and its undoing ``stream - y``. ``coupling_layer`` is the general layer as an autograd
Function: forward kernel, fused backward kernel, storing only its output.
"""
from __future__ import annotations

import os

import torch

from bwskc.kernels import reference

CHOICES = ("auto", "triton", "torch")


def choice() -> str:
    value = os.environ.get("BWSKC_KERNELS", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"BWSKC_KERNELS must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


def _triton_module():
    try:
        from bwskc.kernels import coupling
    except ImportError as e:
        raise RuntimeError(f"BWSKC_KERNELS=triton but triton does not import: {e}") from e
    return coupling


def implementation(t: torch.Tensor):
    """The module (``bwskc.kernels.coupling`` or ``reference``) whose functions run on ``t``."""
    value = choice()
    if value == "torch" or (value == "auto" and t.device.type != "cuda"):
        return reference
    if value == "auto":
        try:
            return _triton_module()
        except RuntimeError:
            return reference
    return _triton_module()  # forced: the kernels themselves refuse CPU tensors without the interpreter


class _StreamUpdate(torch.autograd.Function):
    """``stream +/- y`` through the kernels where a graph is being recorded (the runtime's steps run
    under no_grad; this keeps the seam correct anywhere else)."""

    @staticmethod
    def forward(ctx, stream, y, subtract, impl):
        ctx.dtypes = stream.dtype, y.dtype
        ctx.subtract = subtract
        return (impl.coupling_inverse if subtract else impl.coupling_forward)(stream, y)

    @staticmethod
    def backward(ctx, g):
        gy = -g if ctx.subtract else g
        return g.to(ctx.dtypes[0]), gy.to(ctx.dtypes[1]), None, None


def stream_update(stream: torch.Tensor, y: torch.Tensor, subtract: bool = False) -> torch.Tensor:
    """``stream + y`` (``stream - y`` with ``subtract``): additive coupling without dropout or bias, in
    the implementation ``BWSKC_KERNELS`` picks. Operands the kernels do not take (different shapes, which
    would broadcast, or non-float tensors) use torch's own operator."""
    impl = implementation(stream)
    if impl is reference or stream.shape != y.shape or not (stream.is_floating_point()
                                                           and y.is_floating_point()):
        return stream - y if subtract else stream + y
    if torch.is_grad_enabled() and (stream.requires_grad or y.requires_grad):
        return _StreamUpdate.apply(stream, y, subtract, impl)
    return (impl.coupling_inverse if subtract else impl.coupling_forward)(stream, y)


class CouplingLayerFunction(torch.autograd.Function):
    """The coupling layer ``y = x * exp(s) + D(f + bias)`` with the fused backward: saves ``y``, ``f``,
    ``bias`` and ``s`` (not ``x``, which the backward reconstructs)."""

    @staticmethod
    def forward(ctx, x, f, bias, scale, p, seed, offset):
        impl = implementation(x)
        y = impl.coupling_forward(x, f, bias=bias, scale=scale, p=p, seed=seed, offset=offset)
        ctx.impl, ctx.args, ctx.x_dtype = impl, dict(p=p, seed=seed, offset=offset), x.dtype
        ctx.save_for_backward(y, f, bias, scale)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y, f, bias, scale = ctx.saved_tensors
        _, gx, gf, gb, gs = ctx.impl.coupling_backward(y, f, grad_y, bias=bias, scale=scale, **ctx.args)
        return gx.to(ctx.x_dtype), gf, gb, gs, None, None, None


def coupling_layer(x, f, *, bias=None, scale=None, p: float = 0.0, seed: int = 0, offset: int = 0):
    """Differentiable coupling layer (``bwskc.kernels.reference`` gives the formulas), run by the
    implementation ``BWSKC_KERNELS`` picks for ``x``'s device."""
    return CouplingLayerFunction.apply(x, f, bias, scale, p, seed, offset)
