"""Triton kernels for additive and affine coupling layers: forward, inverse, and a fused backward.

The formulas, the shapes accepted and the dropout mask are those of ``bwskc.kernels.reference`` (its
docstring): the kernels compute the same values (bit for bit for additive coupling, whose arithmetic is
the same float32 sequence; to a few float32 ulps for affine, whose ``exp`` is the device's) and drop the
same elements.

Layout: every tensor is viewed as ``[R, N]`` (N its last dimension) and cut into ``[BR, BN]`` tiles, so a
bias (and a per-feature log-scale) is one ``[BN]`` load per tile. Inputs that are not contiguous are
copied to contiguous ones first (``.contiguous()``, free when they already are): element ``(r, c)`` is
then at ``r * N + c``, and the mask depends on the logical index, never on the memory layout.

The backward reconstructs ``x`` and writes every gradient in one pass over memory (reads ``y``, ``f``,
``grad_y`` and ``s``, writes ``x`` and the gradients that are not plain copies: for additive coupling
``grad_x`` is ``grad_y`` itself, and without dropout so is ``grad_f``). The bias gradient (and a
per-feature log-scale's) is a sum over rows: each program sums its rows into one float32 row of a
``[G, N]`` buffer and a small torch sum finishes. Chosen over atomics because the result is then the same
run to run (float atomics add in arrival order), works for bfloat16 and float16 biases alike, and costs
``G * N * 4`` bytes with ``G`` at most a few times the SM count (about 2% of a GPT-2-medium backward's
traffic).

Block sizes: ``triton.autotune`` over the tile size (elements) and warps on a GPU; under the interpreter
(``TRITON_INTERPRET=1``, CPU) one small fixed tile, since timing the interpreter would tune nothing.
The interpreter works only if ``TRITON_INTERPRET=1`` was set before triton was first imported (triton's
own ``tl.rand`` is compiled or interpreted at that import): ``interpreting()`` checks it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from bwskc.kernels import reference as ref

INTERPRET = bool(knobs.runtime.interpret)  # fixed when this module's kernels are decorated
_KEY = ["R", "N", "HAS_BIAS", "AFFINE", "SCALE_ROW", "DROPOUT"]  # autotune also keys on the dtypes


def interpreting() -> bool:
    """True when the kernels run under the interpreter (and triton's library does too)."""
    from triton.runtime.interpreter import InterpretedFunction
    lib = isinstance(tl.rand, InterpretedFunction)
    if lib != INTERPRET:
        raise RuntimeError("TRITON_INTERPRET changed between importing triton and bwskc.kernels.coupling; "
                           "set it before either is imported")
    return INTERPRET


def _configs():
    if INTERPRET:
        return [triton.Config({"TILE": 256}, num_warps=1)]
    return [triton.Config({"TILE": t}, num_warps=w) for t in (1024, 2048, 4096, 8192) for w in (4, 8)]


def _bn(a):
    """Columns per tile: the last dimension rounded up to a power of two (at least 4, one Philox group)."""
    return min(max(triton.next_power_of_2(a["N"]), 4), a["TILE"])


def _br(a):
    """Rows per tile: what the tile has left, but no more than the rows there are (per program)."""
    rows = a["rows_per_prog"] if "rows_per_prog" in a else a["R"]
    return max(1, min(a["TILE"] // a["BN"], triton.next_power_of_2(rows)))


@triton.jit
def _shift(f_ptr, b_ptr, idx, mask, rows, cols, N, seed, offset, p, keep_scale,
           HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
    """``t = D(f + bias)`` in float32 and the dropout factor ``m * k`` of each element of the tile (whose
    columns are column block ``program_id(1)``)."""
    v = tl.load(f_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    factor = tl.full((BR, BN), 1.0, tl.float32)
    if DROPOUT:
        # one Philox evaluation per 4 columns; its 4 words are interleaved back into column order
        groups = (N + 3) // 4
        g = tl.program_id(1) * (BN // 4) + tl.arange(0, BN // 4)  # column groups of this tile
        cnt = offset + rows[:, None].to(tl.int64) * groups + g[None, :]
        u1, u2, u3, u4 = tl.rand4x(seed, cnt)
        u = tl.interleave(tl.interleave(u1, u3), tl.interleave(u2, u4))
        factor = tl.where(u >= p, keep_scale, 0.0)
        v = v * factor
    return v, factor


@triton.jit
def _scale_tile(s_ptr, idx, mask, cols, N, SCALE_ROW: tl.constexpr):
    """The log-scale over the tile: one row broadcast (per feature) or the tile itself (elementwise)."""
    if SCALE_ROW:
        s = tl.load(s_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    else:
        s = tl.load(s_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return s


@triton.autotune(configs=_configs(), key=_KEY + ["INVERSE"])
@triton.heuristics({"BN": _bn, "BR": _br})
@triton.jit(do_not_specialize=["seed", "offset"])
def _coupling_kernel(x_ptr, f_ptr, b_ptr, s_ptr, out_ptr, R, N, seed, offset, p, keep_scale,
                     HAS_BIAS: tl.constexpr, AFFINE: tl.constexpr, SCALE_ROW: tl.constexpr,
                     DROPOUT: tl.constexpr, INVERSE: tl.constexpr,
                     TILE: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """Forward ``out = x * exp(s) + t`` or, with INVERSE, ``out = (x - t) * exp(-s)`` (x is then y)."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    idx = rows[:, None].to(tl.int64) * N + cols[None, :]
    mask = (rows[:, None] < R) & (cols[None, :] < N)
    t, _ = _shift(f_ptr, b_ptr, idx, mask, rows, cols, N, seed, offset, p, keep_scale,
                  HAS_BIAS, DROPOUT, BR, BN)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        out = x - t
        if AFFINE:
            out = out * tl.exp(-_scale_tile(s_ptr, idx, mask, cols, N, SCALE_ROW))
    else:
        if AFFINE:
            out = x * tl.exp(_scale_tile(s_ptr, idx, mask, cols, N, SCALE_ROW)) + t
        else:
            out = x + t
    tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(), key=_KEY)
@triton.heuristics({"BN": _bn, "BR": _br})
@triton.jit(do_not_specialize=["seed", "offset"])
def _coupling_bwd_kernel(y_ptr, f_ptr, g_ptr, b_ptr, s_ptr, x_ptr, gx_ptr, gf_ptr, gs_ptr, pb_ptr, ps_ptr,
                         R, N, rows_per_prog, seed, offset, p, keep_scale,
                         HAS_BIAS: tl.constexpr, AFFINE: tl.constexpr, SCALE_ROW: tl.constexpr,
                         DROPOUT: tl.constexpr,
                         TILE: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr):
    """One pass: ``x``, ``grad_x`` (affine), ``grad_f`` (dropout), ``grad_s`` (elementwise) stored; the
    column sums of ``grad_f`` and of a per-feature ``grad_s`` over this program's rows into row
    ``program_id(0)`` of the partial buffers."""
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    start = tl.program_id(0) * rows_per_prog
    end = tl.minimum(start + rows_per_prog, R)
    acc_b = tl.zeros((BN,), tl.float32)
    acc_s = tl.zeros((BN,), tl.float32)
    for r0 in range(start, end, BR):
        rows = r0 + tl.arange(0, BR)
        idx = rows[:, None].to(tl.int64) * N + cols[None, :]
        mask = (rows[:, None] < end) & (cols[None, :] < N)
        t, factor = _shift(f_ptr, b_ptr, idx, mask, rows, cols, N, seed, offset, p, keep_scale,
                           HAS_BIAS, DROPOUT, BR, BN)
        diff = tl.load(y_ptr + idx, mask=mask, other=0.0).to(tl.float32) - t
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)  # unused loads are removed
        if AFFINE:
            s = _scale_tile(s_ptr, idx, mask, cols, N, SCALE_ROW)
            tl.store(x_ptr + idx, (diff * tl.exp(-s)).to(x_ptr.dtype.element_ty), mask=mask)
            tl.store(gx_ptr + idx, (g * tl.exp(s)).to(gx_ptr.dtype.element_ty), mask=mask)
            gs = g * diff  # = g * x * exp(s), without a second rounding of x
            if SCALE_ROW:
                acc_s += tl.sum(gs, axis=0)
            else:
                tl.store(gs_ptr + idx, gs.to(gs_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(x_ptr + idx, diff.to(x_ptr.dtype.element_ty), mask=mask)
        gf = g * factor
        if DROPOUT:
            tl.store(gf_ptr + idx, gf.to(gf_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            acc_b += tl.sum(gf, axis=0)
    part = tl.program_id(0).to(tl.int64) * N + cols
    if HAS_BIAS:
        tl.store(pb_ptr + part, acc_b, mask=cols < N)
    if SCALE_ROW:
        tl.store(ps_ptr + part, acc_s, mask=cols < N)


def _rows_cols(x: torch.Tensor) -> tuple[int, int]:
    n = x.shape[-1] if x.dim() else 1
    return x.numel() // n, n


def _prepare(x, f, bias, scale, p, seed, offset):
    ref.check_args(x, f, bias, scale, p)
    ref.check_seed(seed, offset)
    devices = {t.device for t in (x, f, bias, scale) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"coupling tensors must be on one device, got {sorted(map(str, devices))}")
    if x.device.type == "cpu" and not interpreting():
        raise RuntimeError("Triton coupling kernels on CPU tensors run only under the interpreter: set "
                           "TRITON_INTERPRET=1 before triton is imported (or use bwskc.kernels.reference)")
    keep_scale = 1.0 / (1.0 - p)
    flags = dict(HAS_BIAS=bias is not None, AFFINE=scale is not None,
                 SCALE_ROW=scale is not None and scale.shape != x.shape, DROPOUT=p > 0)
    tensors = [None if t is None else t.contiguous() for t in (x, f, bias, scale)]
    return tensors, keep_scale, flags


def _launch(inverse, x, f, bias, scale, p, seed, offset):
    (x, f, b, s), keep_scale, flags = _prepare(x, f, bias, scale, p, seed, offset)
    out = torch.empty(x.shape, dtype=ref.result_dtype(x, f, b, s), device=x.device)
    if x.numel() == 0:
        return out
    r, n = _rows_cols(x)
    grid = lambda meta: (triton.cdiv(r, meta["BR"]), triton.cdiv(n, meta["BN"]))  # noqa: E731
    _coupling_kernel[grid](x, f, x if b is None else b, x if s is None else s, out, r, n, seed, offset,
                           float(p), keep_scale, INVERSE=inverse, **flags)
    return out


def coupling_forward(x, f, *, bias=None, scale=None, p: float = 0.0, seed: int = 0, offset: int = 0):
    """``y = x + D(f + bias)`` (``scale`` None) or ``y = x * exp(scale) + D(f + bias)``, with
    ``D(v) = v * m / (1 - p)`` and the keep mask ``m`` of ``(seed, offset)`` (see
    ``bwskc.kernels.reference``). ``y`` has torch's promoted dtype of the inputs."""
    return _launch(False, x, f, bias, scale, p, seed, offset)


def coupling_inverse(y, f, *, bias=None, scale=None, p: float = 0.0, seed: int = 0, offset: int = 0):
    """``x = y - D(f + bias)`` or ``x = (y - D(f + bias)) * exp(-scale)``, the same mask as the forward's."""
    return _launch(True, y, f, bias, scale, p, seed, offset)


def _programs(r: int, device: torch.device) -> int:
    """Programs along the rows in the backward: a few per SM, so the partial sums stay small."""
    if device.type == "cuda":
        return min(r, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(r, 2)  # the interpreter: still more than one program, so the partials are summed


def coupling_backward(y, f, grad_y, *, bias=None, scale=None, p: float = 0.0, seed: int = 0,
                      offset: int = 0):
    """Fused backward from the output: ``(x, grad_x, grad_f, grad_bias, grad_scale)``.

    ``x = (y - t) * exp(-s)``, ``grad_x = g * exp(s)``, ``grad_f = g * m / (1 - p)``,
    ``grad_s = g * (y - t)`` (summed over rows for a per-feature ``s``), ``grad_bias = sum of grad_f over
    all but the last dim``; with ``g = grad_y``, ``t = D(f + bias)``, and ``s = 0`` for additive coupling.
    For additive coupling ``grad_x`` is ``grad_y`` itself, and without dropout ``grad_f`` is too (cast to
    ``f``'s dtype): no copy is written. Absent bias or scale give None."""
    (y, f, b, s), keep_scale, flags = _prepare(y, f, bias, scale, p, seed, offset)
    if grad_y.shape != y.shape:
        raise ValueError(f"grad_y must have shape {tuple(y.shape)}, got {tuple(grad_y.shape)}")
    g = grad_y.contiguous()
    affine, dropout = scale is not None, p > 0
    x = torch.empty_like(y)
    gx = torch.empty_like(g) if affine else g
    gf = torch.empty_like(f) if dropout else g.to(f.dtype)
    gs = torch.empty_like(s) if affine and not flags["SCALE_ROW"] else None
    r, n = _rows_cols(y) if y.numel() else (0, y.shape[-1] if y.dim() else 1)
    progs = _programs(r, y.device)
    pb = torch.empty((progs, n), dtype=torch.float32, device=y.device) if b is not None else None
    ps = torch.empty((progs, n), dtype=torch.float32, device=y.device) if flags["SCALE_ROW"] else None
    if y.numel():
        rows_per_prog = triton.cdiv(r, progs)
        grid = lambda meta: (progs, triton.cdiv(n, meta["BN"]))  # noqa: E731
        _coupling_bwd_kernel[grid](y, f, g, y if b is None else b, y if s is None else s, x, gx, gf,
                                   y if gs is None else gs, y if pb is None else pb, y if ps is None else ps,
                                   r, n, rows_per_prog, seed, offset, float(p), keep_scale, **flags)
    grad_bias = None if b is None else pb.sum(0).reshape(bias.shape).to(bias.dtype)
    if flags["SCALE_ROW"]:
        gs = ps.sum(0).reshape(scale.shape).to(scale.dtype)
    return x, gx, gf, grad_bias, gs
