"""Triton kernels for invertible coupling layers (``bwskc.kernels``), one file a kernel family.

* ``coupling``: the Triton kernels, ``coupling_forward``, ``coupling_inverse``, ``coupling_backward``
  (exported here; importing them imports triton, so it happens on first use);
* ``reference``: the same three functions in plain torch, with the same dropout mask;
* ``dispatch``: ``BWSKC_KERNELS=auto|triton|torch``, the reversible runtime's seam ``stream_update`` and
  the differentiable layer ``coupling_layer``.
"""
from __future__ import annotations

from bwskc.kernels.dispatch import CouplingLayerFunction, coupling_layer, stream_update

_KERNELS = ("coupling_forward", "coupling_inverse", "coupling_backward")
__all__ = [*_KERNELS, "coupling_layer", "CouplingLayerFunction", "stream_update"]


def __getattr__(name: str):
    if name in _KERNELS:  # triton is imported here, not when the runtime imports the seam
        from bwskc.kernels import coupling as kernels
        return getattr(kernels, name)
    raise AttributeError(f"module 'bwskc.kernels' has no attribute {name!r}")
