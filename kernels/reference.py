"""Coupling layers in plain torch: the meaning of the Triton kernels, and the path used where they do not run.

Formulas (``D`` is dropout with keep mask ``m`` and keep scale ``k = 1 / (1 - p)``: ``D(v) = v * m * k``;
``t = D(f + bias)``; bias broadcast over the last dimension; ``s`` the log-scale)::

    additive   y = x + t                  x = y - t
    affine     y = x * exp(s) + t         x = (y - t) * exp(-s)
    backward   grad_x = g * exp(s)  (g for additive)     grad_f = g * m * k
               grad_s = g * x * exp(s) = g * (y - t)     grad_bias = grad_f summed over all but the last dim

``s`` has ``x``'s shape (an elementwise log-scale, as a coupling network's output) or the shape of the
last dimension (a per-feature log-scale, broadcast like the bias; its gradient is then reduced the same
way). Arithmetic is done in float32 and rounded once to the result dtype, as the kernels do.

The mask is the kernels' own, computed here bit for bit: Triton's Philox4x32-10 (``tl.rand4x``,
reimplemented below in int64 arithmetic) at counter ``offset + r * ceil(N / 4) + c // 4`` gives four
uniforms, of which element ``(r, c)`` of the ``[R, N]`` view (N the last dimension) takes word ``c % 4``,
and the element is kept when its uniform is ``>= p``. One Philox evaluation serves four elements (the
kernels would otherwise be bound by integer arithmetic, not memory). So the torch path and the Triton
path drop exactly the same elements: the tests check the words bit for bit against ``tl.rand4x`` under
the interpreter; on a GPU the same holds by construction (32-bit integer Philox, then one int-to-float
conversion and one float32 multiply, both fixed by IEEE rounding), not yet checked on one.
"""
from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_UNIFORM_SCALE = 4.6566127342e-10  # tl.rand's int32 -> [0, 1) factor (largest with MAX_INT * scale < 1)


def _mulhilo(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * x`` for a 32-bit constant and int64 tensors holding 32-bit values,
    from 16-bit partial products so no int64 product overflows."""
    ah, al = a >> 16, a & 0xFFFF
    xh, xl = x >> 16, x & 0xFFFF
    ll = al * xl
    mid = ah * xl + al * xh + (ll >> 16)  # < 2**34
    hi = (ah * xh + (mid >> 16)) & M32
    lo = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox4x32 (Salmon et al. 2011) as ``triton.language.random.philox_impl`` computes it: counters are
    int64 tensors of 32-bit values, the key two 32-bit ints; returns the four output words."""
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & M32, (k1 + _KEY_B) & M32
    return c0, c1, c2, c3


def uint_to_uniform(w: torch.Tensor) -> torch.Tensor:
    """``tl.rand``'s map of a 32-bit word to float32 in [0, 1): read as int32, fold negatives with ``~``,
    convert (round to nearest) and multiply by a float32 constant, exactly as the kernel does."""
    w = torch.where(w >= 1 << 31, w - (1 << 32), w)
    w = torch.where(w < 0, ~w, w)
    return w.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32, device=w.device)


def check_seed(seed: int, offset: int) -> None:
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if not 0 <= offset < 2 ** 62:
        raise ValueError(f"offset must be in [0, 2**62), got {offset}")


def uniforms(shape, seed: int, offset: int = 0, device="cpu") -> torch.Tensor:
    """The kernels' uniform draw for a tensor of ``shape`` (see the module docstring)."""
    check_seed(seed, offset)
    n = shape[-1] if len(shape) else 1
    r = 1
    for d in shape[:-1]:
        r *= int(d)
    groups = (n + 3) // 4
    cnt = offset + torch.arange(r * groups, dtype=torch.int64, device=device)
    zero = torch.zeros_like(cnt)
    words = philox4x32(cnt & M32, cnt >> 32, zero, zero, seed & M32, (seed >> 32) & M32)
    u = torch.stack([uint_to_uniform(w) for w in words], dim=-1).reshape(r, groups * 4)
    return u[:, :n].reshape(shape)


def keep_mask(shape, p: float, seed: int, offset: int = 0, device="cpu") -> torch.Tensor:
    """Boolean mask of the elements dropout keeps (all of them when ``p == 0``)."""
    if p == 0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    return uniforms(shape, seed, offset, device) >= torch.tensor(p, dtype=torch.float32, device=device)


def check_args(x: torch.Tensor, f: torch.Tensor, bias, scale, p: float) -> None:
    if f.shape != x.shape:
        raise ValueError(f"f must have the stream's shape {tuple(x.shape)}, got {tuple(f.shape)}")
    last = tuple(x.shape[-1:])
    if bias is not None and tuple(bias.shape) != last:
        raise ValueError(f"bias must have shape {last} (the last dimension), got {tuple(bias.shape)}")
    if scale is not None and scale.shape != x.shape and tuple(scale.shape) != last:
        raise ValueError(f"scale must have shape {tuple(x.shape)} or {last}, got {tuple(scale.shape)}")
    if not 0 <= p < 1:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")


def result_dtype(*tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _shift(f, bias, p, seed, offset):
    """``t = D(f + bias)`` in float32, and the per-element factor ``m * k``."""
    v = f.float() if bias is None else f.float() + bias.float()
    if p == 0:
        return v, None
    keep = keep_mask(f.shape, p, seed, offset, f.device)
    factor = keep.float() * torch.tensor(1.0 / (1.0 - p), dtype=torch.float32, device=f.device)
    return v * factor, factor


def coupling_forward(x, f, *, bias=None, scale=None, p: float = 0.0, seed: int = 0, offset: int = 0):
    """``y = x + D(f + bias)`` (additive, ``scale`` None) or ``y = x * exp(scale) + D(f + bias)``."""
    check_args(x, f, bias, scale, p)
    t, _ = _shift(f, bias, p, seed, offset)
    y = x.float() + t if scale is None else x.float() * torch.exp(scale.float()) + t
    return y.to(result_dtype(x, f, bias, scale))


def coupling_inverse(y, f, *, bias=None, scale=None, p: float = 0.0, seed: int = 0, offset: int = 0):
    """``x = y - D(f + bias)`` or ``x = (y - D(f + bias)) * exp(-scale)``: the forward's inverse."""
    check_args(y, f, bias, scale, p)
    t, _ = _shift(f, bias, p, seed, offset)
    x = y.float() - t if scale is None else (y.float() - t) * torch.exp(-scale.float())
    return x.to(result_dtype(y, f, bias, scale))


def coupling_backward(y, f, grad_y, *, bias=None, scale=None, p: float = 0.0, seed: int = 0,
                      offset: int = 0):
    """``(x, grad_x, grad_f, grad_bias, grad_scale)`` from the output: the input reconstructed and every
    input gradient (None for an absent bias or scale); ``x`` and ``grad_x`` in ``y``'s dtype, the others in
    their input's dtype."""
    check_args(y, f, bias, scale, p)
    t, factor = _shift(f, bias, p, seed, offset)
    g = grad_y.float()
    diff = y.float() - t
    x = diff if scale is None else diff * torch.exp(-scale.float())
    grad_x = g if scale is None else g * torch.exp(scale.float())
    grad_f = g if factor is None else g * factor
    grad_bias = None if bias is None else _reduce(grad_f, bias)
    grad_scale = None
    if scale is not None:
        gs = g * diff
        grad_scale = gs.to(scale.dtype) if scale.shape == y.shape else _reduce(gs, scale)
    return x.to(y.dtype), grad_x.to(y.dtype), grad_f.to(f.dtype), grad_bias, grad_scale


def _reduce(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Sum over all but the last dimension, in ``like``'s shape and dtype."""
    return v.reshape(-1, like.numel()).sum(0).reshape(like.shape).to(like.dtype)
