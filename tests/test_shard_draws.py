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
    assert w.indices([1, 4, 3], "cpu") == 12  # one contiguous run of the whole: its start
    with pytest.raises(BwskError) as e:
        w.indices([2, 5, 3], "cpu")
    assert "\n" not in str(e.value) and "does not align with its shard" in str(e.value)


@pytest.mark.parametrize("local", [1, 2])
def test_feature_dropout_noise_over_a_split_sequence_is_one_process_noise(local):
    """Feature dropout draws one value a channel (``[N, C, 1]``): split along the sequence, every shard
    draws the whole noise, even with one position a shard (the size-1 dim is then ambiguous)."""
    n = 2
    x = torch.randn(2, 3, local * n, dtype=torch.float64)
    part, sizes = Part(2), [local] * n
    key, where = rng.make_key(3, 1), (-1, -1, 0)
    whole = random_ops.draw("aten.feature_dropout.default", (x, 0.5, True), {}, (key, 0), where)
    pieces = [random_ops.draw("aten.feature_dropout.default", (t, 0.5, True), {}, (key, w), where)
              for t, w in zip(shard(x, part, sizes), windows(list(x.shape), part, n))]
    assert torch.equal(unshard(pieces, part, sizes), whole)


def test_attention_split_along_the_values_last_dim_keeps_the_whole_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    key, where = rng.make_key(9), (0, 0, 0)
    whole = rng.attention(q, k, v, None, 0.5, seed=(key, 0), where=where)
    ws = windows([1, 2, 4, 4], Part(3), 2)
    parts = [rng.attention(q, k, vi, None, 0.5, seed=(key, w), where=where)
             for vi, w in zip(v.chunk(2, 3), ws)]
    torch.testing.assert_close(torch.cat(parts, 3), whole, rtol=0, atol=1e-12)


def test_pure_draws_in_evaluation_go_through_the_window():
    x = torch.zeros(2, 6)
    part, n = Part(1), 2
    where = (-1, -1, 1)
    whole = random_ops.draw("aten.rand_like.default", (x,), {}, None, where)
    pieces = []
    for t, w in zip(shard(x, part, [3, 3]), windows([2, 6], part, n)):
        with random_ops.evaluating_through(w):
            pieces.append(random_ops.draw("aten.rand_like.default", (t,), {}, None, where))
    assert torch.equal(unshard(pieces, part, [3, 3]), whole)
    assert not torch.equal(pieces[0], pieces[1])


@pytest.fixture()
def one_rank_group():
    import socket

    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_sharded_module_starts_from_compiles_seed_and_refuses_coupling_chains(one_rank_group):
    import bwskc
    from bwskc.passes.reversible import reversible_rewrite
    from bwskc.testing import build_zoo_model
    model = build_zoo_model("gpt2").train()  # dropout 0.1
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    program = bwskc.lower(model, (ids,), train=True)
    one = bwskc.compile(program, seed=5)
    split = bwskc.compile(program, seed=5, shard={"sequence": 1})
    assert split.bwskc_rng_state.tolist() == one.bwskc_rng_state.tolist() == [5, 0, 1, 0]
    a, b = one(ids), split(ids)
    a, b = (t[0] if isinstance(t, tuple) else t for t in (a, b))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # the same masks (others differ by ~0.1)
    with pytest.raises(BwskError, match="coupling chains"):
        bwskc.compile(reversible_rewrite(program), shard={"sequence": 1})
