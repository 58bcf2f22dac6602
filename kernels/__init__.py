"""Triton kernels for invertible coupling layers (``bwskc.kernels``), one file a kernel family.

* ``coupling``: the Triton kernels, ``coupling_forward``, ``coupling_inverse``, ``coupling_backward``;
  the functions of those names exported here dispatch on the first tensor's device as
  ``BWSKC_KERNELS`` says (Triton on CUDA, the torch reference with the same mask on CPU), so triton is
  imported only when a kernel runs;
* ``reference``: the same three functions in plain torch, with the same dropout mask;
* ``dispatch``: ``BWSKC_KERNELS=auto|triton|torch``, the reversible runtime's seam ``stream_update`` and
  the differentiable layer ``coupling_layer``.
"""
from __future__ import annotations

from bwskc.kernels.dispatch import CouplingLayerFunction, coupling_layer, stream_update

_KERNELS = ("coupling_forward", "coupling_inverse", "coupling_backward")
__all__ = [*_KERNELS, "coupling_layer", "CouplingLayerFunction", "stream_update"]


def _dispatching(name: str):
    def run(x, *args, **kwargs):
        from bwskc.kernels.dispatch import implementation
        return getattr(implementation(x), name)(x, *args, **kwargs)
    from bwskc.kernels import reference
    run.__name__, run.__doc__ = name, getattr(reference, name).__doc__
    return run


coupling_forward, coupling_inverse, coupling_backward = (_dispatching(n) for n in _KERNELS)
