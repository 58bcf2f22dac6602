"""Counter-based dropout: masks are a pure function of (seed, chain, branch, site, element index).

Reversible backward recomputes each branch once, so its dropout masks must be drawn again exactly as in
the forward pass. Saving and restoring a global generator's state (what revlib, memcnn and
``torch.utils.checkpoint`` do) replays correctly only if nothing else draws in between, and it breaks
``torch.compile(fullgraph=True)``. Here a mask element is a hash of its coordinates instead: ``key``
mixes the step's seed with the place of the dropout in the program, and element ``j`` is kept when
half ``j % 2`` of the hashed word ``hash(j // 2, key)``, as a 16-bit fraction, is at least ``p`` (see
``keep_mask``; in data-parallel training ``j`` counts from the rank's offset in the global batch, see
``step_seed``). The hash is an integer finaliser (Wellons's two-round
xorshift-multiply), done on int32 words whose products wrap modulo 2**32 (int64 words past 2**31 of them):
the same masks on any device and any backend, from about five in-place integer operations a round.
(The Triton coupling kernels of ``bwskc.kernels`` draw their own masks with Philox; the branches'
dropout stays here, so the runtime does not yet use the kernels' fused dropout.)

Under ``torch.compile`` the seed is a tensor, not Python integers: ``step_seed`` then returns the int64
tensor ``[key, shard]`` computed from the state buffer with tensor operations (reading the buffer into
Python would be a data-dependent guard, ``GuardOnDataDependentSymNode``, and a new graph per step), and
every function here takes a key, seed or start that is a 0-dim int64 tensor as well as an int, with
the same bits: ``make_key`` and ``hash32_int`` run the same integer operations on either, and ``words``
adds the start to the element indices as a 32-bit word (the hash depends on an index modulo 2**32
only). One compiled graph then serves every step and shard, with eager's masks.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from bwskc.errors import BwskError

M32 = 0xFFFFFFFF
# Wellons' two-round 32-bit finaliser [16 21f0aaad 15 735a2d97 15] (bias 0.1076, lower than lowbias32's).
# Both multipliers are below 2**31, which is what makes the tensor version cheap (see ``hash32_``).
_C1, _C2 = 0x21F0AAAD, 0x735A2D97
_SHIFTS = (16, 15, 15)
DROPOUT_OPS = ("aten.native_dropout.default", "aten.dropout.default")


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of 32-bit words held in ``x`` (int32 shifts arithmetically: mask the sign)."""
    return (x >> k) & ((1 << (32 - k)) - 1)


def hash32_(x: torch.Tensor) -> torch.Tensor:
    """The finaliser on a tensor of 32-bit words, in place; ``x`` is int32 (two's complement words) or
    int64 (words in ``[0, 2**32)``), the same bits either way.

    int32 is the fast path (half the memory traffic of int64, and one multiply per round): its products
    wrap modulo 2**32, as the hash wants. int64 is kept exact without wrapping: a word below 2**32
    times a multiplier below 2**31 stays below 2**63, and the product is reduced modulo 2**32 at once.
    ``tests/test_reversible.py`` checks both against the same finaliser on Python integers."""
    wide = x.dtype == torch.int64
    tmp = torch.empty_like(x)  # one scratch word per element: every step in place (no allocations)
    for c, k in zip((_C1, _C2, None), _SHIFTS):
        torch.bitwise_right_shift(x, k, out=tmp)
        tmp &= (1 << (32 - k)) - 1  # logical shift: int32 shifts arithmetically
        x ^= tmp
        if c is not None:
            x *= c
            if wide:
                x &= M32
    return x


def hash32_int(x):
    """The same finaliser on a Python int (the reference, and how a key's parts are combined), or on a
    0-dim int64 tensor (a key under ``torch.compile``: the same operations, never in place)."""
    x = x & M32
    for c, k in zip((_C1, _C2, None), _SHIFTS):
        x = x ^ (x >> k)
        if c is not None:
            x = (x * c) & M32
    return x


def _mix_int(h, v):
    return hash32_int(h ^ (v & M32))


def make_key(seed, *parts):
    """A 32-bit key from a 64-bit seed and the parts of a place (ints; ``seed`` and the parts may be
    0-dim int64 tensors, giving the same key as a tensor)."""
    h = _mix_int(0x9E3779B9, seed)
    h = _mix_int(h, seed >> 32)
    for p in parts:
        h = _mix_int(h, p + 1)
    return h


def _word(v, dtype: torch.dtype):
    """A 32-bit word as a Python int that fits ``dtype`` (int32 holds words of 2**31 and up negative);
    of a 0-dim int64 tensor, a 0-dim tensor of ``dtype`` (two's complement without a branch)."""
    if isinstance(v, torch.Tensor):
        v = v & M32
        if dtype == torch.int32:
            v = ((v + (1 << 31)) & M32) - (1 << 31)
        return v.to(dtype)
    v &= M32
    return v - (1 << 32) if dtype == torch.int32 and v >= 1 << 31 else v


def words(n: int, key: int, device, start: int = 0) -> torch.Tensor:
    """Hashed 32-bit words for element indices ``start..start+n-1`` under ``key``: two rounds of the
    finaliser, the second keyed again so that streams of different keys are not index permutations of
    each other.

    ``key`` or ``start`` a 0-dim tensor (``torch.compile``): the indices are ``arange(n)`` plus the
    start's 32-bit word, int32 whenever ``n`` fits (the sum wraps as the multiplies do), which hashes
    to the same words as the integer path, whose int64 indices past 2**31 hash modulo 2**32."""
    if _indexed(start):  # the words at given element indices (a Window's): the int64 path, exact
        x = start.reshape(-1).to(torch.int64) & M32
        x ^= _word(key, torch.int64)
        hash32_(x)
        x ^= _word(_mix_int(key, 0x5BD1E995), torch.int64)
        return hash32_(x)
    if isinstance(key, torch.Tensor) or isinstance(start, torch.Tensor):
        dtype = torch.int32 if n < 1 << 31 else torch.int64
        x = torch.arange(n, dtype=dtype, device=device)
        x += _word(start, dtype)
        key = key if isinstance(key, torch.Tensor) else torch.tensor(key, dtype=torch.int64)
        x ^= _word(key, dtype).to(device)
        hash32_(x)
        x ^= _word(_mix_int(key, 0x5BD1E995), dtype).to(device)
        return hash32_(x)
    dtype = torch.int32 if start + n < 1 << 31 else torch.int64
    x = torch.arange(start, start + n, dtype=dtype, device=device)
    x ^= _word(key, dtype)
    hash32_(x)
    x ^= _word(_mix_int(key, 0x5BD1E995), dtype)
    return hash32_(x)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


@dataclass(frozen=True)
class Window:
    """Where one process's part of a tensor sits in the whole, for a run split along an axis
    (``bwskc.sharding``): dim ``dim`` read as ``[outer, P, inner]`` (``bwskc.placement.Part``), this
    process holding ``P`` indices ``offset .. offset + local - 1`` of ``size``. A draw made through a
    window is the single-process draw's slice: the same numbers at the same global coordinates."""

    dim: int
    outer: int
    inner: int
    offset: int
    local: int
    size: int

    def indices(self, shape, device):
        """The global flat indices of a local tensor of ``shape`` (int64, that shape), or the start
        of one contiguous run of them (an int: a split of the leading extent, a batch split)."""
        shape = tuple(int(d) for d in shape)
        d = self.dim
        if d >= len(shape) or shape[d] != self.outer * self.local * self.inner:
            raise BwskError(f"sharded run: a random draw of shape {list(shape)} does not align with its "
                            f"shard (dim {d}, {self.local} of {self.size} a process)")
        q = _numel(shape[:d]) * self.outer
        r = self.inner * _numel(shape[d + 1:])
        if q == 1:  # the local elements are one run of the whole's: the integer path
            return self.offset * r
        rows = torch.arange(q, dtype=torch.int64, device=device)[:, None] * self.size
        rows = (rows + (torch.arange(self.local, dtype=torch.int64, device=device) + self.offset))
        return (rows[:, :, None] * r + torch.arange(r, dtype=torch.int64, device=device)).reshape(shape)


def origin(shard, shape, device):
    """The ``start`` of a draw of ``shape`` from a seed's second part: ``shard * numel`` for a
    data-parallel rank (an int, or a 0-dim tensor under ``torch.compile``: its rows of a batch-leading
    tensor), or a ``Window``'s global indices (a run split along an axis)."""
    if isinstance(shard, Window):
        return shard.indices(shape, device)
    return shard * _numel(shape)


def _indexed(start) -> bool:
    """``start`` is a tensor of element indices (a ``Window``'s), not one start."""
    return isinstance(start, torch.Tensor) and start.dim() > 0


def uniform(shape, key: int, device, start: int = 0) -> torch.Tensor:
    """Uniform numbers in [0, 1) (24 bits) for element indices ``start..start+numel-1`` under ``key``
    (or at the indices ``start`` holds, a tensor of ``shape``)."""
    n = _numel(shape)
    return (_srl(words(n, key, device, start), 8).to(torch.float32) * (1.0 / (1 << 24))).reshape(shape)


def keep_mask(shape, p: float, key: int, device, start: int = 0) -> torch.Tensor:
    """Element j is kept when its 16-bit half-word, as a fraction of 2**16, is at least ``p``.

    One hashed 32-bit word serves two elements: element ``j`` is half ``j % 2`` (low half first) of
    word ``j // 2`` of ``words``. The hash, 25 integer passes per word, is the whole cost of a mask,
    so this halves it (and the int16 compare moves half the bytes): with one word per element the mask
    was a third of a GPT-2 block's forward on CPU, and a reversible step draws it twice. ``p`` is
    quantised to 2**-16 (the dropped fraction is ``ceil(p * 2**16) / 2**16``: 0.1000061 for 0.1;
    FlashAttention's dropout compares 8 bits). The halves are read by viewing int32 words as int16
    pairs on a little-endian machine (shifted out otherwise: ``_halves``); unsigned halves compare as
    signed ones once their sign bit is flipped. A start that is a 0-dim tensor (``torch.compile``) has a parity unknown at trace time:
    one word more is drawn and the two alignments are selected with ``where``."""
    n = _numel(shape)
    t = math.ceil(p * (1 << 16)) - (1 << 15)
    if t >= 1 << 15:  # p = 1: no 16-bit half reaches 2**16 (and the threshold does not fit int16)
        return torch.zeros(tuple(shape), dtype=torch.bool, device=device)
    if _indexed(start):  # element indices (a Window's): half idx % 2 of word idx // 2, unsigned
        idx = start.reshape(-1).to(torch.int64)
        w = words(n, key, device, idx >> 1)
        half = torch.where((idx & 1) == 1, w >> 16, w & 0xFFFF)
        return (half >= t + (1 << 15)).reshape(shape)
    traced = isinstance(start, torch.Tensor)
    first = start // 2
    count = n // 2 + 1 if traced else (start + n - 1) // 2 - first + 1
    h = _halves(words(count, key, device, first))
    h = h[:n + 1] if traced else h[start % 2:start % 2 + n]
    h ^= -(1 << 15)
    keep = h >= t
    if traced:
        keep = torch.where((start % 2).to(device) == 1, keep[1:], keep[:n])
    return keep.reshape(shape)


def _halves(w: torch.Tensor, view: bool = sys.byteorder == "little") -> torch.Tensor:
    """The 16-bit halves of 32-bit words, low half first, as int16 (int64 words, past 2**31 words,
    are narrowed to their int32 two's complement first). On a little-endian machine (every platform
    torch ships for) a view, free; otherwise computed with shifts, the same values."""
    if w.dtype == torch.int64:
        w = (((w + (1 << 31)) & M32) - (1 << 31)).to(torch.int32)
    if view:
        return w.view(torch.int16)
    lo = (w & 0xFFFF) - ((w & 0x8000) << 1)  # the half's bits read as a signed int16
    hi = ((w >> 16) & 0xFFFF) - (((w >> 16) & 0x8000) << 1)
    return torch.stack([lo, hi], -1).reshape(-1).to(torch.int16)


def native_dropout(x: torch.Tensor, p: float, seed, where: tuple):
    """``aten.native_dropout`` with a counter-based mask: ``(x * mask / (1 - p), mask)``; the identity
    when ``seed`` is None (evaluation) or ``p == 0``."""
    if seed is None or p == 0:
        return x, torch.ones_like(x, dtype=torch.bool)
    if p >= 1:
        return torch.zeros_like(x), torch.zeros_like(x, dtype=torch.bool)
    key, shard = seed
    mask = keep_mask(x.shape, p, make_key(key, *where), x.device, start=origin(shard, x.shape, x.device))
    return x * mask * (1.0 / (1.0 - p)), mask


def dropout(x: torch.Tensor, p: float, seed, where: tuple) -> torch.Tensor:
    return native_dropout(x, p, seed, where)[0]


def step_seed(state: torch.Tensor, training: bool | None = None):
    """The seed of this forward call from a module's ``[base, step, training, shard]`` state, advancing
    the step: ``(key, shard)``, or None in evaluation mode (dropout off). ``training``: the module's
    own flag (``module.training``, which ``train()`` and ``eval()`` keep equal to the state's third
    entry); None reads the state's.

    ``shard`` makes data-parallel masks those of one process: rank r of a data-parallel run holds rows
    ``r*b .. (r+1)*b`` of the global batch, so its element i of a batch-leading tensor is element
    ``r * numel + i`` of the global one; drawing from index ``shard * numel`` on gives every rank its
    slice of the single-process mask (same seed on every rank).

    Under ``torch.compile`` (``torch.compiler.is_compiling()``) the seed is the int64 tensor
    ``[key, shard]`` instead, computed from the buffer with tensor operations (the same bits), and the
    step advances in place in the buffer: the values never become Python integers, so one graph serves
    every step (``training``, a Python bool, is guarded on, as any module flag)."""
    if torch.compiler.is_compiling():
        if training is None:
            raise RuntimeError("bwskc: step_seed under torch.compile needs the module's training flag")
        if not training:
            return None
        base, step, shard = state[0].clone(), state[1].clone(), state[3].clone()
        state[1] += 1
        return torch.stack([make_key(base, step) | (step << 32), shard])
    base, step, flag, shard = (int(v) for v in state.tolist())
    if not (flag if training is None else training):
        return None
    state[1] += 1
    return make_key(base, step) | (step << 32), shard


def attention(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False, *, scale=None,
              enable_gqa: bool = False, seed=None, where: tuple = ()):
    """``aten.scaled_dot_product_attention`` whose attention dropout is counter-based (the fused
    kernel draws from the global generator, which a replay cannot reproduce); without dropout (or in
    evaluation, ``seed`` None) it is the fused op itself."""
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    if seed is None or dropout_p == 0:
        return sdpa(q, k, v, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa)
    e = q.shape[-1]
    scale = 1.0 / (e ** 0.5) if scale is None else scale
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    # The scale goes into q ([.., n, e]) rather than the scores ([.., n, s]); the causal mask and an
    # attention mask are applied in place (matmul's backward does not read its output), where the mask
    # broadcasts to the scores without changing their shape or dtype; the dropout is a ``where`` on the
    # probabilities and its 1 / (1 - p) is applied to the [.., n, e] output: four passes over the
    # [batch, heads, n, s] scores fewer than the textbook form, the same function.
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if is_causal:
        n, s = q.shape[-2], k.shape[-2]  # top-left aligned, as the fused op: key j > query i is masked
        scores.masked_fill_(torch.ones(n, s, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    if attn_mask is not None:
        boolean = attn_mask.dtype == torch.bool
        if torch.broadcast_shapes(attn_mask.shape, scores.shape) != scores.shape or not (
                boolean or attn_mask.dtype == scores.dtype):
            scores = scores.masked_fill(~attn_mask, float("-inf")) if boolean else scores + attn_mask
        elif boolean:
            scores.masked_fill_(~attn_mask, float("-inf"))
        else:
            scores.add_(attn_mask)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p >= 1:
        return torch.matmul(torch.zeros_like(probs), v)
    key, shard = seed
    if isinstance(shard, Window) and shard.dim >= probs.dim() - 1:
        shard = 0  # the output split along the values' last dim: every shard holds the whole mask
    keep = keep_mask(probs.shape, dropout_p, make_key(key, *where), probs.device,
                     start=origin(shard, probs.shape, probs.device))
    return torch.matmul(torch.where(keep, probs, 0.0), v) * (1.0 / (1.0 - dropout_p))
