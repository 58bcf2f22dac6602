"""Triton kernels for invertible coupling layers (``bwskc.kernels``), one file a kernel family.

The additive and affine coupling kernels arrive with the kernels issue; the runtime's CPU path does not
need them.
"""
