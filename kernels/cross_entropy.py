"""Cross entropy of a linear head without the full logits (``bwskc.kernels.cross_entropy``).

``linear_cross_entropy(hidden, weight, bias, targets)`` equals
``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=..., reduction=...)``
and its gradients, but processes the rows in chunks: one chunk's logits ``[chunk, V]`` exist at a
time, in float32 for float32, bfloat16 and float16 inputs (float64 for float64; autocast is switched
off inside), so the extra memory is
``O(chunk * V + N * d + V * d)``, never ``O(N * V)``. The idea is Liger Kernel's fused linear cross
entropy and Apple's Cut Cross-Entropy (the log-sum-exp of each row from a chunked matmul); this is a
plain torch implementation, the same on CPU and CUDA.

Gradients, exact for any ``grad_output``:

* ``reduction="sum"`` or ``"mean"``: the loss is a scalar, so its gradient is
  ``grad_output * d(loss)/d(inputs)`` for a scalar ``grad_output``. The forward computes
  ``d(loss)/d(hidden)`` ``[N, d]``, ``d(loss)/d(weight)`` ``[V, d]`` and ``d(loss)/d(bias)`` chunk by chunk
  while each chunk's logits exist (as Liger does), saves them for backward, and backward only scales
  them: one pass over the head instead of two. They are saved with ``save_for_backward`` (so they show
  in ``saved_tensors_hooks`` counts and are released after backward) and scaled in place: a second
  backward through a retained graph fails loudly (a modified saved tensor) rather than silently.
* ``reduction="none"``: ``grad_output`` is one number per row, and ``d/d(weight)`` sums rows weighted by
  it, so nothing row-independent can be computed before it is known. The forward saves each row's
  log-sum-exp ``[N]``; backward recomputes each chunk's logits, forms ``grad_output[n] * (softmax -
  onehot)`` and accumulates the three gradients.

Rows whose target is ``ignore_index`` have loss 0 and no gradient; ``"mean"`` divides by the rows not
ignored (NaN when there are none, as ``F.cross_entropy``). A target outside ``[0, V)`` that is not
``ignore_index`` raises ``ValueError``. Tied weights (an LM head sharing the embedding) need nothing
special: the gradient goes to the same Parameter.
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 64 << 20  # one chunk's float32 logits, by default
REDUCTIONS = ("none", "sum", "mean")


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk's float32 logits take at most ``chunk_bytes`` (at least 1)."""
    return max(1, int(chunk_bytes) // (4 * max(1, int(vocab))))


def _compute_dtype(*tensors) -> torch.dtype:
    """float32, or float64 when an input is float64 (half and bfloat16 inputs compute in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _logits(h, w, b):
    """One chunk's logits ``h @ w.T + b`` (in the compute dtype)."""
    return torch.addmm(b, h, w.t()) if b is not None else h @ w.t()


def _softmax_(z: torch.Tensor) -> torch.Tensor:
    """``z`` (logits) becomes its softmax, in place; returns each row's log-sum-exp."""
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m).exp_()
    s = z.sum(dim=1, keepdim=True)
    z.div_(s)
    return (m + s.log()).squeeze(1)


def _lse(z: torch.Tensor) -> torch.Tensor:
    """Each row's log-sum-exp of ``z`` without keeping a second [rows, V] buffer (``z`` is consumed)."""
    m = z.amax(dim=1, keepdim=True)
    s = z.sub_(m).exp_().sum(dim=1, keepdim=True)
    return (m + s.log()).squeeze(1)


def _prepare(hidden, weight, bias, targets, ignore_index):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, d] and weight [V, d], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    valid = targets != ignore_index
    vocab = weight.shape[0]
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        raise ValueError(f"target {int(targets[bad][0])} is out of bounds for a vocabulary of {vocab}")
    return valid


def _rows(valid: torch.Tensor):
    """The indices of the rows not ignored, or None when every row counts (no gather needed)."""
    return None if bool(valid.all()) else valid.nonzero().squeeze(1)


class LinearCrossEntropy(torch.autograd.Function):
    """The autograd Function behind ``linear_cross_entropy`` (see the module's docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, chunk):
        n, vocab = hidden.shape[0], weight.shape[0]
        valid = _prepare(hidden, weight, bias, targets, ignore_index)
        idx = _rows(valid)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        scalar = reduction != "none"
        fused = scalar and (need_h or need_w or need_b)  # gradients computed here, scaled in backward
        cdt = _compute_dtype(hidden, weight, bias)
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdt)
            b = None if bias is None else bias.to(cdt)
            h_all = hidden if idx is None else hidden.index_select(0, idx)
            t_all = targets if idx is None else targets.index_select(0, idx)
            m = h_all.shape[0]
            losses = torch.empty(m, dtype=cdt, device=hidden.device)
            lse_all = None if fused or not any(ctx.needs_input_grad[:3]) else torch.empty_like(losses)
            gh = torch.empty(m, hidden.shape[1], dtype=cdt, device=hidden.device) if fused and need_h else None
            gw = torch.zeros(vocab, w.shape[1], dtype=cdt, device=hidden.device) if fused and need_w else None
            gb = torch.zeros(vocab, dtype=cdt, device=hidden.device) if fused and need_b else None
            scale = 1.0
            if reduction == "mean":
                scale = 1.0 / m if m else float("nan")
            for s in range(0, m, chunk):
                h = h_all[s:s + chunk].to(cdt)
                t = t_all[s:s + chunk]
                z = _logits(h, w, b)
                picked = z.gather(1, t[:, None]).squeeze(1)
                if not fused:
                    lse = _lse(z)
                    if lse_all is not None:
                        lse_all[s:s + chunk] = lse
                    losses[s:s + chunk] = lse - picked
                    continue
                lse = _softmax_(z)  # z is now the softmax
                losses[s:s + chunk] = lse - picked
                z[torch.arange(z.shape[0], device=z.device), t] -= 1.0  # d(loss_n)/d(logits_n)
                if scale != 1.0:
                    z.mul_(scale)
                if gh is not None:
                    torch.mm(z, w, out=gh[s:s + chunk])
                if gw is not None:
                    gw.addmm_(z.t(), h)
                if gb is not None:
                    gb.add_(z.sum(dim=0))
                del z
        if idx is None:
            per_row = losses
        else:
            per_row = torch.zeros(n, dtype=cdt, device=hidden.device).index_copy_(0, idx, losses)
        ctx.reduction, ctx.chunk, ctx.fused, ctx.cdt = reduction, chunk, fused, cdt
        ctx.dtypes = hidden.dtype, weight.dtype, None if bias is None else bias.dtype
        ctx.has_bias = bias is not None
        ctx.n, ctx.d = n, hidden.shape[1]
        if fused:
            ctx.save_for_backward(gh, gw, gb, idx)
        elif lse_all is not None:
            ctx.save_for_backward(hidden, weight, bias, targets, idx, lse_all)
        if reduction == "none":
            return per_row
        total = losses.sum()
        return total * scale if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        none = (None,) * 4
        if ctx.fused:
            gh, gw, gb, idx = ctx.saved_tensors
            g = grad_out.to(ctx.cdt)
            out = []
            if gh is not None:
                gh.mul_(g)
                if idx is not None:
                    gh = torch.zeros(ctx.n, ctx.d, dtype=gh.dtype, device=gh.device).index_copy_(0, idx, gh)
                gh = gh.to(ctx.dtypes[0])
            out.append(gh)
            out.append(None if gw is None else gw.mul_(g).to(ctx.dtypes[1]))
            out.append(None if gb is None else gb.mul_(g).to(ctx.dtypes[2]))
            return (*out, *none)
        hidden, weight, bias, targets, idx, lse_all = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunk, cdt = ctx.chunk, ctx.cdt
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(cdt)
            b = None if bias is None else bias.to(cdt)
            h_all = hidden if idx is None else hidden.index_select(0, idx)
            t_all = targets if idx is None else targets.index_select(0, idx)
            g_all = (grad_out if idx is None else grad_out.index_select(0, idx)).to(cdt)
            m = h_all.shape[0]
            gh = torch.empty(m, ctx.d, dtype=cdt, device=hidden.device) if need_h else None
            gw = torch.zeros_like(w) if need_w else None
            gb = torch.zeros(w.shape[0], dtype=cdt, device=w.device) if need_b else None
            for s in range(0, m, chunk):
                h = h_all[s:s + chunk].to(cdt)
                t = t_all[s:s + chunk]
                z = _logits(h, w, b)
                z.sub_(lse_all[s:s + chunk, None]).exp_()  # softmax from the saved log-sum-exp
                z[torch.arange(z.shape[0], device=z.device), t] -= 1.0
                z.mul_(g_all[s:s + chunk, None])
                if gh is not None:
                    torch.mm(z, w, out=gh[s:s + chunk])
                if gw is not None:
                    gw.addmm_(z.t(), h)
                if gb is not None:
                    gb.add_(z.sum(dim=0))
                del z
        if gh is not None:
            if idx is not None:
                gh = torch.zeros(ctx.n, ctx.d, dtype=gh.dtype, device=gh.device).index_copy_(0, idx, gh)
            gh = gh.to(ctx.dtypes[0])
        return (gh, None if gw is None else gw.to(ctx.dtypes[1]),
                None if gb is None else gb.to(ctx.dtypes[2]), *none)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, ignore_index: int = -100, reduction: str = "none",
                         chunk: int | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ...)`` over rows ``[N, d]``
    (weight ``[V, d]``, bias ``[V]`` or None, targets ``[N]``) in chunks of ``chunk`` rows (default:
    ``chunk_rows(V)``, 64 MB of float32 logits), without the ``[N, V]`` logits. ``reduction``:
    ``none`` (``[N]``, float32, or float64 for float64 inputs), ``sum`` or ``mean`` (over the rows not
    ignored)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    chunk = chunk_rows(weight.shape[0]) if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    targets = targets.long()
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return LinearCrossEntropy.apply(hidden, weight, bias, targets, int(ignore_index), reduction, chunk)
    with torch.no_grad():  # no graph: the loss alone, nothing computed or kept for backward
        return LinearCrossEntropy.forward(_NoCtx(), hidden, weight, bias, targets, int(ignore_index),
                                          reduction, chunk)


class _NoCtx:
    """The ``ctx`` of a forward run outside autograd (nothing needs a gradient, nothing is saved)."""
    needs_input_grad = (False,) * 7

    def save_for_backward(self, *tensors):
        pass
