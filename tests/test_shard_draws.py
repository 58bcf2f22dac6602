"""Random numbers in a run split along an axis (bwskc.runtime.rng.Window, bwskc/sharding/module.py):
each shard draws the slice of the single-process draw at its global coordinates, so the shards put
together are the whole draw, bit for bit, for masks, uniforms, dropout and attention's dropout.
(tests/test_shard.py checks the same end to end: GPT-2 and BERT trained with dropout on 2 processes
equal the single-process module.)"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bwskc.errors import BwskError
from bwskc.passes.calm.plan import Part, shard, unshard
from bwskc.runtime import random_ops, rng


@st.composite
def splits(draw):
    """A whole shape, a Part of it and a process count that divides the Part's factor."""
    rank = draw(st.integers(1, 4))
    shape = [draw(st.integers(1, 5)) for _ in range(rank)]
    dim = draw(st.integers(0, rank - 1))
    n = draw(st.integers(1, 3))
    outer, inner = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    shape[dim] = outer * n * draw(st.integers(1, 3)) * inner
    return shape, Part(dim, outer, inner), n


def windows(shape, part: Part, n: int):
    p = part.factor(shape)
    return [rng.Window(part.dim, part.outer, part.inner, r * (p // n), p // n, p) for r in range(n)]


def local_shape(shape, part, n):
    out = list(shape)
    out[part.dim] //= n
    return out


@settings(max_examples=60, deadline=None)
@given(splits(), st.integers(0, 2**32 - 1), st.sampled_from([0.1, 0.5, 0.9]))
def test_shards_of_a_draw_are_the_whole_draw(split, key, p):
    shape, part, n = split
    ws = windows(shape, part, n)
    loc = local_shape(shape, part, n)
    pieces = [rng.keep_mask(loc, p, key, "cpu", start=w.indices(loc, "cpu")) for w in ws]
    assert torch.equal(unshard(pieces, part, [part.factor(shape) // n] * n), rng.keep_mask(shape, p, key, "cpu"))
    pieces = [rng.uniform(loc, key, "cpu", start=w.indices(loc, "cpu")) for w in ws]
    assert torch.equal(unshard(pieces, part, [part.factor(shape) // n] * n), rng.uniform(shape, key, "cpu"))
    # and the shards differ from one another (no coincident local pattern) wherever they are big
    if n > 1 and pieces[0].numel() >= 16:
        assert not torch.equal(pieces[0], pieces[1])


@settings(max_examples=30, deadline=None)
@given(splits(), st.integers(0, 2**31), st.sampled_from(["aten.native_dropout.default",
                                                          "aten.bernoulli.p", "aten.rand_like.default",
                                                          "aten.randn_like.default"]))
def test_a_rule_drawn_through_windows_is_the_single_process_rule(split, base, op):
    """What the sharded backend runs for a draw: the rule with the seed ``(key, window)``."""
    shape, part, n = split
    x = torch.randn(shape, generator=torch.Generator().manual_seed(base % 1000), dtype=torch.float64)
    args = {"aten.native_dropout.default": lambda t: (t, 0.3, True), "aten.bernoulli.p": lambda t: (t, 0.4),
            "aten.rand_like.default": lambda t: (t,), "aten.randn_like.default": lambda t: (t,)}[op]
    where, key = (-1, -1, 3), rng.make_key(base, 1)
    whole = random_ops.draw(op, args(x), {}, (key, 0), where)
    sizes = [part.factor(shape) // n] * n
    locals_ = [random_ops.draw(op, args(t), {}, (key, w), where)
               for t, w in zip(shard(x, part, sizes), windows(shape, part, n))]
    if isinstance(whole, tuple):
        for k in range(len(whole)):
            assert torch.equal(unshard([o[k] for o in locals_], part, sizes), whole[k])
    else:
        assert torch.equal(unshard(locals_, part, sizes), whole)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_dropout_over_query_shards_is_the_whole_attention(causal):
    """Sequence sharding: each process holds its queries and all keys (gathered); its attention
    dropout mask is its rows of the whole one."""
    g = torch.Generator().manual_seed(0)
    b, h, s, e, n = 2, 3, 8, 4, 2
    q, k, v = (torch.randn(b, h, s, e, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(s, s, dtype=torch.bool).tril() if causal else None
    seed, where = (rng.make_key(5, 6), 0), (0, 1, 2)
    whole = rng.attention(q, k, v, mask, 0.3, seed=seed, where=where)
    part = Part(2)
    ws = windows([b, h, s, e], part, n)
    rows = [rng.attention(qi, k, v, None if mask is None else mi, 0.3, seed=(seed[0], w), where=where)
            for qi, mi, w in zip(q.chunk(n, 2), (mask.chunk(n, 0) if causal else [None] * n), ws)]
    torch.testing.assert_close(torch.cat(rows, 2), whole, rtol=0, atol=1e-12)


def test_a_draw_that_does_not_fit_its_window_is_refused_in_one_line():
    w = rng.Window(1, 1, 1, 4, 4, 8)
    assert w.indices([2, 1, 3], "cpu") == 0  # spans no split (a per-channel draw): the whole draw
    with pytest.raises(BwskError) as e:
        w.indices([2, 5, 3], "cpu")
    assert "\n" not in str(e.value) and "does not align with its shard" in str(e.value)
