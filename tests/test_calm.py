"""CALM coordination analysis (passes/calm/): every claim is checked by running it.

A leaf is coordination-free along an axis if ``f(cat(a, b, d)) == cat(f(a), f(b), d')``. The pass gives,
for every application of a leaf and every axis, a plan: how each operand is cut for a shard and where the
axis sits in the result. ``check_plan`` runs the leaf on the whole inputs and on 2 or 3 uneven shards
(view sizes rewritten for the shard, replicated constants sliced, arange index constants rebased) and
compares. Every "free" claim must pass it, on the zoo and on random programs; known barriers must be
reported with the right collective, and their naive local plan must fail it (so a barrier is not vacuous).
"""
from __future__ import annotations

import itertools
import json
import math
import random
import time

import pytest
import torch
import torch.nn.functional as F
from bwskc.passes.calm import (
    COLLECTIVES,
    CalmResult,
    Part,
    analyze,
    local_literals,
    local_shape,
    parse_axes,
    reshape_part,
    shard,
    site_slot_types,
    slot_positions,
    unshard,
)
from bwskc.passes.manager import run_passes
from conftest import ZOO_NAMES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bwskc
from bwskc.errors import BwskError
from bwskc.ir import (
    HOLE,
    Comb,
    ConstRef,
    Def,
    Entry,
    Prim,
    Program,
    Ref,
    TensorDecl,
    TensorRef,
    TensorType,
    TupleType,
    type_of_value,
)
from bwskc.runtime.denote import Denoter, resolve_op
from bwskc.sites import sites

# --------------------------------------------------------------------------------------- the harness


class _Eager:
    def __init__(self, weights):
        self.weights = weights

    def prim(self, prim, args, kwargs):
        return resolve_op(prim.op)(*args, **kwargs)

    def tensor(self, name):
        return self.weights[name]


def rand_value(t, gen):
    if isinstance(t, TensorType):
        dt = t.torch_dtype
        if dt.is_floating_point:
            return torch.randn(t.shape, generator=gen, dtype=dt)
        if dt == torch.bool:
            return torch.randint(0, 2, t.shape, generator=gen).bool()
        return torch.randint(0, 2, t.shape, generator=gen, dtype=dt)
    return 1


def slot_values(program, site, gen, const):
    """Concrete operands of a site: random activations, the program's weights, evaluated constants."""
    vals = []
    for kind, ref in slot_positions(site.prim):
        if kind == "hole":
            vals.append(rand_value(site.inputs[ref], gen))
        elif kind == "tensor":
            vals.append(program.weights[ref])
        else:
            vals.append(const(ref))
    return vals


def call(prim, vals, local_out_shape=None):
    it = iter(vals)

    def sub(args):
        out = []
        for a in args:
            if a is HOLE or isinstance(a, (TensorRef, ConstRef)):
                out.append(next(it))
            elif isinstance(a, tuple):
                out.append(sub(a))
            else:
                out.append(a)
        return out
    args = sub(prim.args)
    kwargs = dict(zip([k for k, _ in prim.kwargs], sub(tuple(v for _, v in prim.kwargs))))
    if local_out_shape is not None:
        args, kwargs = local_literals(prim, args, kwargs, local_out_shape)
    return resolve_op(prim.op)(*args, **kwargs)


def _close(a, b, random_=False):
    if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if random_:
        return True
    if a.dtype.is_floating_point:
        return torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
    return torch.equal(a, b)


def check_plan(prim, plan, vals, n, rnd) -> bool:
    """Run ``plan`` on ``n`` uneven shards: True iff the shards' results put together equal the whole
    result (a replicated result: every shard's equals it)."""
    full = call(prim, vals)
    factors = {p.factor(v.shape) for p, v in zip(plan.ins, vals) if p is not None}
    if len(factors) != 1:  # shards of different sizes: no local plan lines them up
        assert not plan.free, f"{prim.op}: free, but operands cut with different factors {factors}"
        return False
    P = factors.pop()
    n = min(n, P)
    cuts = sorted(rnd.sample(range(1, P), n - 1))
    sizes = [b - a for a, b in zip([0] + cuts, cuts + [P])]
    pieces = [shard(v, p, sizes) if p is not None else None for p, v in zip(plan.ins, vals)]
    outs = []
    for k in range(n):
        local = []
        for i, (p, v) in enumerate(zip(plan.ins, vals)):
            x = pieces[i][k] if p is not None else v
            if i in plan.rebase:
                x = x - sum(sizes[:k])
            local.append(x)
        ls = local_shape(full.shape, plan.out, sizes[k]) if isinstance(plan.out, Part) and \
            isinstance(full, torch.Tensor) else None
        try:
            outs.append(call(prim, local, ls))
        except Exception:  # noqa: BLE001 - the local op refusing its shard is a failed check
            return False

    def together(part, whole, items):
        if part is None:
            return all(_close(whole, x, plan.random) for x in items)
        try:
            return _close(whole, unshard(items, part, sizes), plan.random)
        except RuntimeError:
            return False
    if isinstance(full, (tuple, list)):
        outp = plan.out if plan.out is not None else (None,) * len(full)
        return all(together(outp[j], full[j], [o[j] for o in outs]) for j in range(len(full))
                   if isinstance(full[j], torch.Tensor) and full[j].numel() > 0)
    return together(plan.out, full, outs)


def check_program(program, result: CalmResult, seed=0, barriers_must_fail=True):
    """Check every plan of every site; returns (free checks, barrier checks) done."""
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    const = Denoter(program, _Eager(program.weights)).const
    n_free = n_barrier = 0
    seen = set()  # repeated layers: the same leaf, shapes and plan are checked once
    for s in sites(program):
        if s.is_const or s.prim.op in ("getitem", "tuple"):
            continue
        shape_key = (s.prim.op, _literal_key(s.prim.args), _literal_key(s.prim.kwargs),
                     tuple(map(str, site_slot_types(program, s))))
        for axis, plans in result.plans[s.id].items():
            for plan in plans:
                if all(p is None for p in plan.ins) or (shape_key, plan) in seen:
                    continue  # every operand replicated (nothing to cut), or checked already
                seen.add((shape_key, plan))
                vals = slot_values(program, s, gen, const)
                if plan.free:
                    n = rnd.choice((2, 3))
                    assert check_plan(s.prim, plan, vals, n, rnd), (
                        f"site {s.id} {s.prim.op} in {s.scope} is claimed free along {axis} "
                        f"but its {n} shards disagree: ins={plan.ins} out={plan.out}")
                    n_free += 1
                elif barriers_must_fail and plan.collective != "unknown":
                    assert not check_plan(s.prim, plan, vals, 2, rnd), (
                        f"site {s.id} {s.prim.op} is a {plan.collective} barrier along {axis} but its "
                        "naive local plan works")
                    n_barrier += 1
    return n_free, n_barrier


def _literal_key(args):
    """Bound arguments with tensor and constant names left out (their types are in the key)."""
    return tuple(_literal_key(a) if isinstance(a, tuple) else
                 (type(a).__name__ if isinstance(a, (TensorRef, ConstRef)) else repr(a)) for a in args)


def calm(program, axes=None) -> CalmResult:
    return run_passes(program, ["calm"], options={"axes": axes}).analyses["calm"]


# -------------------------------------------------------------------------- hand-built single leaves


def single(op, args, inputs, weights=None, kwargs=(), consts=()):
    """A program ``entry (x0, x1...) = op(args)``: HOLEs take the inputs in order; ``weights`` are
    bound by name (TensorRef), ``consts`` are closed prims referenced as ConstRef(i)."""
    weights = dict(weights or {})
    names = tuple(inputs)

    def fill(a, vals):
        if a is HOLE:
            return vals.pop(0)
        if isinstance(a, TensorRef):
            return weights[a.name]
        if isinstance(a, ConstRef):
            return const_vals[a.index]
        if isinstance(a, tuple):
            return [fill(b, vals) for b in a]
        return a
    const_vals = []
    for c in consts:
        const_vals.append(resolve_op(c.op)(*[fill(a, []) for a in c.args],
                                           **{k: fill(v, []) for k, v in c.kwargs}))
    vals = list(inputs.values())
    out = resolve_op(op)(*[fill(a, vals) for a in args], **{k: fill(v, vals) for k, v in kwargs})
    typ = type_of_value(out)
    prim = Prim(op, tuple(args), tuple(kwargs), typ)
    outs = typ.items if isinstance(typ, TupleType) and len(typ.items) > 1 else (typ,)
    entry = Entry(names, tuple(type_of_value(v) for v in inputs.values()),
                  tuple(f"out{i}" for i in range(len(outs))), tuple(outs), prim)
    tensors = {k: TensorDecl("param", type_of_value(v)) for k, v in weights.items()}
    return Program("single", tensors, list(consts), {}, entry, weights)


def leaf_site(program):
    return next(s for s in sites(program) if not s.is_const)


def verdict(program, axes):
    r = calm(program, axes)
    s = leaf_site(program)
    axis = next(iter(r.axes))
    return r, s, r.coordination[s.id][axis], r.plans[s.id][axis]


def _x(*shape, dtype=torch.float32):
    if dtype.is_floating_point:
        return torch.randn(*shape, dtype=dtype)
    return torch.randint(0, 2, shape, dtype=dtype)


# known barriers: (name, builder -> (program, --axes), collective)
def _ln():
    return single("aten.layer_norm.default", (HOLE, [8], TensorRef("w"), TensorRef("b"), 1e-5, False),
                  {"x": _x(2, 6, 8)}, {"w": torch.randn(8), "b": torch.randn(8)}), "p=x:2"


def _sdpa_seq():
    q = _x(2, 2, 6, 4)
    return single("aten.scaled_dot_product_attention.default", (HOLE, HOLE, HOLE),
                  {"q": q, "k": _x(2, 2, 6, 4), "v": _x(2, 2, 6, 4)}), "seq=q:2,seq=k:2,seq=v:2"


def _mean_batch():
    return single("aten.mean.dim", (HOLE, [0]), {"x": _x(4, 3)}), "batch=x:0"


def _sum_all():
    return single("aten.sum.default", (HOLE,), {"x": _x(4, 3)}), "batch=x:0"


def _linear_contract():
    return single("aten.linear.default", (HOLE, TensorRef("w")), {"x": _x(2, 6)},
                  {"w": torch.randn(5, 6)}), "p=x:1"


def _softmax():
    return single("aten.softmax.int", (HOLE, -1), {"x": _x(2, 6)}), "p=x:1"


def _cumsum():
    return single("aten.cumsum.default", (HOLE, 1), {"x": _x(2, 6)}), "sequence=x:1"


def _conv_seq():
    return single("aten.conv1d.default", (HOLE, TensorRef("w"), None, [1], [1]), {"x": _x(2, 3, 8)},
                  {"w": torch.randn(4, 3, 3)}), "sequence=x:2"


def _reshape_bad():
    return single("aten.view.default", (HOLE, [2, 3, 2, 4]), {"x": _x(2, 6, 4)}), "sequence=x:1"


def _select():
    return single("aten.select.int", (HOLE, 1, 0), {"x": _x(2, 6, 4)}), "sequence=x:1"


def _slice():
    return single("aten.slice.Tensor", (HOLE, 1, 1, 5), {"x": _x(2, 6, 4)}), "sequence=x:1"


def _cat_mixed():
    return single("aten.cat.default", ((HOLE, HOLE), 1), {"x": _x(2, 6), "y": _x(2, 3)}), "p=x:1"


def _batch_norm_train():
    return single("aten._native_batch_norm_legit_functional.default",
                  (HOLE, TensorRef("w"), TensorRef("b"), TensorRef("rm"), TensorRef("rv"), True, 0.1,
                   1e-5), {"x": _x(4, 3, 5)},
                  {"w": torch.randn(3), "b": torch.randn(3), "rm": torch.zeros(3),
                   "rv": torch.ones(3)}), "batch=x:0"


def _max_batch():
    return single("aten.max.dim", (HOLE, 0), {"x": _x(4, 3)}), "batch=x:0"


def _matmul_qk():
    return single("aten.matmul.default", (HOLE, HOLE), {"q": _x(2, 6, 4), "kt": _x(2, 4, 6)}), \
        "seq=q:1,seq=kt:2"


def _pool_seq():
    return single("aten.max_pool2d.default", (HOLE, [2, 2]), {"x": _x(2, 3, 4, 4)}), "h=x:2"


def _causal():
    return single("aten.scaled_dot_product_attention.default", (HOLE, HOLE, HOLE),
                  {"q": _x(2, 6, 4), "k": _x(2, 6, 4), "v": _x(2, 6, 4)},
                  kwargs=(("is_causal", True),)), "seq=q:1"


def _flip():
    return single("aten.flip.default", (HOLE, [1]), {"x": _x(2, 6)}), "p=x:1"


def _bilinear():
    return single("aten.upsample_bilinear2d.vec", (HOLE, None, False, [2.0, 2.0]),
                  {"x": _x(2, 3, 4, 4)}), "h=x:2"


KNOWN_BARRIERS = [
    ("layer_norm over a partitioned last dim", _ln, "all-reduce"),
    ("sdpa along the sequence", _sdpa_seq, "all-gather"),
    ("sdpa with only the keys and values split", lambda: (_sdpa_seq()[0], "s=k:2,s=v:2"),
     "all-gather"),
    ("mean over the batch", _mean_batch, "all-reduce"),
    ("sum of everything", _sum_all, "all-reduce"),
    ("linear contracting the partitioned dim", _linear_contract, "all-reduce"),
    ("softmax over the partitioned dim", _softmax, "all-reduce"),
    ("max over the batch", _max_batch, "all-reduce"),
    ("cumsum along the sequence", _cumsum, "scan"),
    ("conv1d along the sequence", _conv_seq, "halo-exchange"),
    ("max_pool2d along a spatial dim", _pool_seq, "halo-exchange"),
    ("reshape splitting the partitioned dim", _reshape_bad, "all-to-all"),
    ("select along the sequence", _select, "broadcast"),
    ("slice along the sequence", _slice, "all-gather"),
    ("cat of a partitioned and a replicated operand along the dim", _cat_mixed, "all-gather"),
    ("training batch norm over the batch", _batch_norm_train, "all-reduce"),
    ("q @ k^T with q and k split on the sequence", _matmul_qk, "all-gather"),
    ("causal sdpa with the queries split", _causal, "position-offset"),
    ("flip along the partitioned dim", _flip, "all-to-all"),
    ("bilinear upsampling along a spatial dim", _bilinear, "halo-exchange"),
]


@pytest.mark.parametrize("name,build,collective", KNOWN_BARRIERS, ids=[k[0] for k in KNOWN_BARRIERS])
def test_known_barriers_name_their_collective_and_really_need_it(name, build, collective):
    torch.manual_seed(0)
    program, axes = build()
    r, s, got, plans = verdict(program, axes)
    axis = next(iter(r.axes))
    assert got == collective, (name, got, r.reasons.get(s.id))
    why = r.reasons[s.id][axis]
    assert why and "\n" not in why
    assert r.barriers[axis] == {collective: 1}
    # the naive local plan (each shard alone, replicated operands sliced) gives a different result
    gen, rnd = torch.Generator().manual_seed(1), random.Random(1)
    vals = slot_values(program, s, gen, None)
    for plan in plans:
        assert not plan.free
        for n in (2, 3):
            assert not check_plan(s.prim, plan, vals, n, rnd), f"{name}: the barrier is vacuous"


def test_an_op_without_a_rule_is_an_unknown_barrier_never_free():
    program = single("aten.diagonal.default", (HOLE,), {"x": _x(4, 4)})
    r, s, got, _ = verdict(program, "batch=x:0")
    assert got == "unknown"
    assert "no rule" in r.reasons[s.id]["batch"]
    assert r.free_flops_fraction["batch"] < 1.0


# known free ops, the plan checked (a free claim that is wrong fails here too)
KNOWN_FREE = [
    ("layer_norm along the batch", lambda: (_ln()[0], "b=x:0")),
    ("sdpa along the batch", lambda: (_sdpa_seq()[0], "b=q:0,b=k:0,b=v:0")),
    ("sdpa with only the queries split", lambda: (_sdpa_seq()[0], "s=q:2")),
    ("sdpa along the heads", lambda: (_sdpa_seq()[0], "h=q:1,h=k:1,h=v:1")),
    ("linear over rows", lambda: (_linear_contract()[0], "b=x:0")),
    ("cumsum across", lambda: (_cumsum()[0], "b=x:0")),
    ("conv1d along the batch", lambda: (_conv_seq()[0], "b=x:0")),
    ("pool along channels", lambda: (_pool_seq()[0], "c=x:1")),
    ("view merging the partitioned dim", lambda: (
        single("aten.view.default", (HOLE, [12, 4]), {"x": _x(2, 6, 4)}), "s=x:1")),
    ("cat of two partitioned operands along the dim", lambda: (
        single("aten.cat.default", ((HOLE, HOLE), 1), {"x": _x(2, 6), "y": _x(2, 6)}), "p=x:1,p=y:1")),
    ("embedding of partitioned indices", lambda: (
        single("aten.embedding.default", (TensorRef("w"), HOLE), {"i": _x(2, 6, dtype=torch.int64)},
               {"w": torch.randn(3, 4)}), "s=i:1")),
    ("add of a position table", lambda: (
        single("aten.add.Tensor", (HOLE, TensorRef("pos")), {"x": _x(2, 6, 4)},
               {"pos": torch.randn(1, 6, 4)}), "s=x:1")),
    ("select across", lambda: (_select()[0], "b=x:0")),
    ("nearest upsampling along a spatial dim", lambda: (
        single("aten.upsample_nearest2d.vec", (HOLE, None, [2.0, 3.0]), {"x": _x(2, 3, 4, 4)}),
        "w=x:3")),
    ("bilinear upsampling along the channels", lambda: (_bilinear()[0], "c=x:1")),
]


@pytest.mark.parametrize("name,build", KNOWN_FREE, ids=[k[0] for k in KNOWN_FREE])
def test_known_free_ops_are_free_and_their_plan_works(name, build):
    torch.manual_seed(0)
    program, axes = build()
    r, s, got, _ = verdict(program, axes)
    assert got is None, (name, r.reasons.get(s.id))
    assert r.free_flops_fraction[next(iter(r.axes))] == 1.0
    n_free, _ = check_program(program, r)
    assert n_free == 1


def test_index_by_an_arange_constant_is_a_rebased_slice():
    """T5's mask gather ``mask[arange(B)[:, None], arange(T)[None, :]]``: free along both axes."""
    consts = [Prim("aten.arange.default", (2,), (), TensorType("i64", (2,))),
              Prim("aten.view.default", (ConstRef(0), [2, 1]), (), TensorType("i64", (2, 1))),
              Prim("aten.arange.default", (6,), (), TensorType("i64", (6,)))]
    program = single("aten.index.Tensor", (HOLE, (ConstRef(1), ConstRef(2))),
                     {"m": _x(2, 6, dtype=torch.int64)}, consts=consts)
    r = calm(program, "batch=m:0,sequence=m:1")
    s = leaf_site(program)
    assert r.coordination[s.id] == {"batch": None, "sequence": None}
    assert all(p.rebase for plans in r.plans[s.id].values() for p in plans)
    assert check_program(program, r)[0] == 2
    # the same gather with a permuted index is data movement across shards
    consts = consts[:2] + [Prim("aten.arange.default", (6,), (), TensorType("i64", (6,))),
                           Prim("aten.flip.default", (ConstRef(2), [0]), (), TensorType("i64", (6,)))]
    program = single("aten.index.Tensor", (HOLE, (ConstRef(1), ConstRef(3))),
                     {"m": _x(2, 6, dtype=torch.int64)}, consts=consts)
    r = calm(program, "sequence=m:1")
    assert r.coordination[leaf_site(program).id]["sequence"] == "all-gather"


# ------------------------------------------------------------------------ random single-leaf programs


def _factors(n):
    out, p = [], 2
    while n > 1:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    return out


LEAF_KINDS = ["reshape", "permute", "unary", "binary", "reduce", "along", "layer_norm", "linear",
              "matmul", "sdpa", "expand", "repeat", "repeat_interleave", "cat", "stack", "split",
              "select", "slice", "gather", "index_select", "one_hot", "embedding", "pad", "conv", "pool",
              "einsum", "flip", "tril", "unsqueeze"]


@st.composite
def leaf_programs(draw, kind):
    """A random leaf of one kind of op with random shapes, and a random partition of its inputs."""
    dim_st = st.sampled_from([2, 3, 4, 6])
    shape = tuple(draw(st.lists(dim_st, min_size=2, max_size=4)))
    r = len(shape)
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, dtype=torch.float32):
        return torch.randn(tuple(s), generator=g, dtype=dtype)
    x = rnd(*shape)
    ins, w, kw = {"x": x}, {}, ()
    dim = draw(st.integers(0, r - 1))
    if kind == "reshape":
        fs = [f for d in shape for f in _factors(d)]
        cuts = sorted(draw(st.sets(st.integers(1, len(fs) - 1), max_size=len(fs) - 1))) \
            if len(fs) > 1 else []
        bounds = [0] + cuts + [len(fs)]
        target = [math.prod(fs[a:b]) for a, b in itertools.pairwise(bounds)]
        if draw(st.booleans()):
            target[draw(st.integers(0, len(target) - 1))] = -1
        op, args = "aten.view.default", (HOLE, target)
    elif kind == "permute":
        op, args = "aten.permute.default", (HOLE, draw(st.permutations(list(range(r)))))
    elif kind == "unsqueeze":
        op, args = "aten.unsqueeze.default", (HOLE, draw(st.integers(-r - 1, r)))
    elif kind == "unary":
        op = draw(st.sampled_from(["aten.gelu.default", "aten.tanh.default", "aten.relu.default",
                                   "aten.exp.default", "aten.sigmoid.default"]))
        args = (HOLE,)
    elif kind == "binary":
        k = draw(st.integers(0, r))
        yshape = tuple(1 if draw(st.booleans()) else d for d in shape[k:])
        ins["y"] = rnd(*yshape)
        op = draw(st.sampled_from(["aten.add.Tensor", "aten.mul.Tensor", "aten.maximum.default",
                                   "aten.sub.Tensor"]))
        args = (HOLE, HOLE) if draw(st.booleans()) else (HOLE, TensorRef("w"))
        if args[1] != HOLE:
            w["w"] = ins.pop("y")
    elif kind == "reduce":
        op = draw(st.sampled_from(["aten.sum.dim_IntList", "aten.mean.dim", "aten.amax.default"]))
        dims = sorted(draw(st.sets(st.integers(0, r - 1), min_size=1)))
        args = (HOLE, dims, draw(st.booleans()))
    elif kind == "along":
        op = draw(st.sampled_from(["aten.softmax.int", "aten.log_softmax.int", "aten.cumsum.default"]))
        args = (HOLE, dim)
    elif kind == "layer_norm":
        k = draw(st.integers(1, r))
        op, args = "aten.layer_norm.default", (HOLE, list(shape[r - k:]), TensorRef("w"), None, 1e-5)
        w["w"] = rnd(*shape[r - k:])
    elif kind == "linear":
        op, args = "aten.linear.default", (HOLE, TensorRef("w"), TensorRef("b"))
        w["w"], w["b"] = rnd(5, shape[-1]), rnd(5)
    elif kind == "matmul":
        yshape = tuple(1 if draw(st.booleans()) else d for d in shape[:-2]) + (shape[-1], 3)
        ins["y"] = rnd(*yshape[draw(st.integers(0, len(yshape) - 2)):])
        op, args = "aten.matmul.default", (HOLE, HOLE)
    elif kind == "sdpa":
        if r < 3:
            shape = (2,) + shape
            ins["x"] = x = rnd(*shape)
        S = draw(dim_st)
        ins["k"] = rnd(*shape[:-2], S, shape[-1])
        ins["v"] = rnd(*shape[:-2], S, 5)
        args = (HOLE, HOLE, HOLE)
        if draw(st.booleans()):
            ins["m"] = rnd(*shape[:-1], S) > 0
            ins["m"][..., 0] = True
            args = args + (HOLE,)
        op = "aten.scaled_dot_product_attention.default"
    elif kind == "expand":
        op, args = "aten.expand.default", (HOLE, [3] + [-1] * r)
    elif kind == "repeat":
        op, args = "aten.repeat.default", (HOLE, [draw(st.integers(1, 3)) for _ in range(r)])
    elif kind == "repeat_interleave":
        op, args = "aten.repeat_interleave.self_int", (HOLE, draw(st.integers(1, 3)), dim)
    elif kind == "cat":
        ins["y"] = rnd(*shape)
        op, args = "aten.cat.default", ((HOLE, HOLE), dim)
    elif kind == "stack":
        ins["y"] = rnd(*shape)
        op, args = "aten.stack.default", ((HOLE, HOLE), draw(st.integers(0, r)))
    elif kind == "split":
        op = "aten.split.Tensor"
        args = (HOLE, draw(st.integers(1, shape[dim])), dim)
    elif kind == "select":
        op, args = "aten.select.int", (HOLE, dim, draw(st.integers(0, shape[dim] - 1)))
    elif kind == "slice":
        a = draw(st.integers(0, shape[dim] - 1))
        op, args = "aten.slice.Tensor", (HOLE, dim, a, draw(st.integers(a + 1, shape[dim] + 2)))
    elif kind == "gather":
        ins["i"] = torch.randint(0, shape[dim], shape, generator=g)
        op, args = "aten.gather.default", (HOLE, dim, HOLE)
    elif kind == "index_select":
        ins["i"] = torch.randint(0, shape[dim], (draw(dim_st),), generator=g)
        op, args = "aten.index_select.default", (HOLE, dim, HOLE)
    elif kind == "one_hot":
        ins["x"] = torch.randint(0, 3, shape, generator=g)
        op, args = "aten.one_hot.default", (HOLE, 3)
    elif kind == "embedding":
        ins["x"] = torch.randint(0, 4, shape, generator=g)
        w["w"] = rnd(4, 3)
        op, args = "aten.embedding.default", (TensorRef("w"), HOLE)
    elif kind == "pad":
        op = "aten.constant_pad_nd.default"
        args = (HOLE, [draw(st.integers(0, 1)) for _ in range(2 * draw(st.integers(1, r)))], 0.0)
    elif kind == "conv":
        shape = (shape + (3, 4))[:3] if r < 3 else shape[:3]
        ins["x"] = rnd(*shape)
        k = draw(st.integers(1, 3))
        w["w"] = rnd(4, shape[1], k)
        op = "aten.conv1d.default"
        args = (HOLE, TensorRef("w"), None, [draw(st.integers(1, 2))], [draw(st.integers(0, 1))])
    elif kind == "pool":
        shape = (shape + (4, 4, 4))[:4]
        ins["x"] = rnd(*shape)
        op = draw(st.sampled_from(["aten.max_pool2d.default", "aten.avg_pool2d.default",
                                   "aten.adaptive_avg_pool2d.default"]))
        if op.endswith("adaptive_avg_pool2d.default"):
            args = (HOLE, [draw(st.sampled_from([1, shape[2]])), draw(st.sampled_from([1, shape[3]]))])
        else:
            ks = draw(st.integers(1, 2))
            args = (HOLE, [ks, ks], [draw(st.integers(1, 2))] * 2)
    elif kind == "einsum":
        ins = {"x": rnd(2, 3, 4), "y": rnd(2, 4, 5)}
        op, args = "aten.einsum.default", (draw(st.sampled_from(
            ["bij,bjk->bik", "bij,bjk->bk", "bij,bjk->ik", "...ij,...jk->...ik"])), (HOLE, HOLE))
    elif kind == "flip":
        op, args = "aten.flip.default", (HOLE, sorted(draw(st.sets(st.integers(0, r - 1), min_size=1))))
    else:
        op, args = "aten.tril.default", (HOLE,)
    # partition: each input on a random dim (or none), the first one always
    items = []
    for i, (name, v) in enumerate(ins.items()):
        cand = [d for d in range(v.dim()) if v.shape[d] >= 2]
        if cand and (i == 0 or draw(st.booleans())):
            items.append(f"p={name}:{draw(st.sampled_from(cand))}")
    if not items:
        return None
    return op, args, ins, w, kw, ",".join(items)


@pytest.mark.parametrize("kind", LEAF_KINDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_leaves_every_free_claim_holds(kind, data):
    case = data.draw(leaf_programs(kind))
    if case is None:
        return
    op, args, ins, w, kw, axes = case
    try:
        program = single(op, args, ins, w, kw)
    except (RuntimeError, IndexError, ValueError, TypeError):
        return  # the random arguments are not valid for this op
    r = calm(program, axes)
    s = leaf_site(program)
    assert set(r.coordination[s.id]) == {"p"}
    check_program(program, r, barriers_must_fail=False)


# ------------------------------------------------------------------------------ random whole models


class RandNet(nn.Module):
    """A random stack of sequence-model steps over [B, T, D], each reading one or two earlier values."""

    def __init__(self, steps, d):
        super().__init__()
        self.steps = steps
        self.lin = nn.Linear(d, d)
        self.ln = nn.LayerNorm(d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.w = nn.Parameter(torch.randn(d, d) / d)
        self.register_buffer("pos", torch.randn(64, d))

    def forward(self, x):
        vals = [x]
        B, T, D = x.shape
        for op, i, j in self.steps:
            a, b = vals[i % len(vals)], vals[j % len(vals)]
            if op == 0:
                v = a + b * torch.sigmoid(a)
            elif op == 1:
                v = self.ln(a)
            elif op == 2:
                v = F.gelu(self.lin(a))
            elif op == 3:
                v = torch.softmax(a, -1) * b
            elif op == 4:
                q = a.view(B, T, 2, D // 2).transpose(1, 2)
                k = b.view(B, T, 2, D // 2).transpose(1, 2)
                v = F.scaled_dot_product_attention(q, k, k, is_causal=bool(i % 2)).transpose(1, 2)
                v = v.reshape(B, T, D)
            elif op == 5:
                v = torch.cumsum(a, 1)
            elif op == 6:
                v = a.mean(1, keepdim=True) + b
            elif op == 7:
                v = a.mean(0, keepdim=True) * b
            elif op == 8:
                v = self.conv(a.transpose(1, 2)).transpose(1, 2)
            elif op == 9:
                v = (a.reshape(B * T, D) @ self.w).reshape(B, T, D)
            elif op == 10:
                v = torch.cat([a[:, :, : D // 2], b[:, :, D // 2:]], -1)
            elif op == 11:
                v = torch.flip(a, [1]) + a
            elif op == 12:
                v = (a @ b.transpose(1, 2)) @ b
            elif op == 13:
                v = torch.roll(a, 1, 1)
            elif op == 14:
                v = a * a[:, :1, :]
            elif op == 15:
                v = a + self.pos[:T]
            elif op == 16:
                v = a * torch.rsqrt(a.pow(2).mean(-1, keepdim=True) + 1e-6)
            else:
                v = a.max(-1, keepdim=True).values + b
            vals.append(v)
        return vals[-1]


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.integers(0, 17), st.integers(0, 9), st.integers(0, 9)),
                      min_size=1, max_size=6),
       shape=st.sampled_from([(2, 4, 4), (3, 6, 4), (4, 4, 8)]), seed=st.integers(0, 2 ** 16))
def test_random_models_every_free_claim_holds_and_every_barrier_is_real(steps, shape, seed):
    torch.manual_seed(seed)
    model = RandNet(steps, shape[2]).eval()
    program = bwskc.lower(model, (torch.randn(*shape),))
    r = calm(program, "batch=x:0,sequence=x:1,feature=x:2")
    assert set(r.axes) == {"batch", "sequence", "feature"}
    check_program(program, r, seed=seed)
    for s in sites(program):
        assert set(r.coordination[s.id]) == {"batch", "sequence", "feature"}
    # along the batch only the batch mean needs coordination
    for s in sites(program):
        if r.coordination[s.id]["batch"] is not None:
            assert s.prim.op == "aten.mean.dim" and r.coordination[s.id]["batch"] == "all-reduce"


# --------------------------------------------------------------------------------------------- the zoo


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_every_site_has_a_verdict_and_every_claim_holds(zoo, name):
    program = zoo[name].program
    r = calm(program)
    ss = sites(program)
    assert set(r.coordination) == {s.id for s in ss}
    assert set(r.flops) == {s.id for s in ss}
    axes = set(r.axes)
    assert axes == ({"batch"} if name in ("vit", "resnet") else {"batch", "sequence"})
    for s in ss:
        assert set(r.coordination[s.id]) == axes
        for a, c in r.coordination[s.id].items():
            if s.is_const:
                assert c is None
            if c is None:
                assert a not in r.reasons.get(s.id, {})
            else:
                assert c in COLLECTIVES
                assert r.reasons[s.id][a]
    for a in axes:
        free = {s.id for s in ss if r.coordination[s.id][a] is None}
        regions = r.regions[a]
        assert sorted(i for g in regions for i in g) == sorted(free)  # a partition of the free sites
        assert [len(g) for g in regions] == sorted((len(g) for g in regions), reverse=True)
        n_bar = sum(1 for s in ss if r.coordination[s.id][a] is not None)
        assert sum(r.barriers[a].values()) == n_bar
        assert 0.0 <= r.free_flops_fraction[a] <= 1.0
        assert "unknown" not in r.barriers[a], (name, a, {
            ss[i].prim.op: why for i, d in r.reasons.items() for ax, why in d.items() if ax == a})
        # nothing is free along the batch that is not, and the batch needs no coordination in eval
        assert r.barriers["batch"] == {}
    json.dumps(r.summary())
    n_free, _ = check_program(program, r)
    assert n_free > 0


def test_gpt2_batch_is_free_and_sequence_gathers_for_attention(zoo):
    program = zoo["gpt2"].program
    r = calm(program)
    ss = sites(program)
    assert r.barriers["batch"] == {}
    assert r.free_flops_fraction["batch"] == 1.0
    attn = [s.id for s in ss if s.prim.op == "aten.scaled_dot_product_attention.default"]
    assert len(attn) == 2
    assert r.barriers["sequence"] == {"all-gather": 2}
    assert {i for i, d in r.coordination.items() if d["sequence"]} == set(attn)
    assert 0.8 < r.free_flops_fraction["sequence"] < 1.0
    # the FLOPs of the attention are the part that is not free
    total = sum(r.flops[i] * r.applications[i] for i in r.flops)
    attn_share = sum(r.flops[i] * r.applications[i] for i in attn) / total
    assert r.free_flops_fraction["sequence"] == pytest.approx(1 - attn_share)
    # one free region holds the whole network along the batch
    assert len(r.regions["batch"][0]) >= sum(1 for s in ss if not s.is_const) - 1
    summary = r.summary()
    assert summary["barriers"]["sequence"] == {"all-gather": 2}
    assert summary["regions"]["batch"]["count"] == len(r.regions["batch"])


def test_zoo_specifics(zoo):
    r = calm(zoo["switch"].program)
    assert r.barriers["sequence"].get("scan") == 4  # the router's capacity cumsum over tokens
    r = calm(zoo["mamba"].program)
    assert r.barriers["sequence"] == {"halo-exchange": 2}  # the causal depthwise conv
    r = calm(zoo["t5"].program)
    assert r.barriers["sequence"] == {"all-gather": 6}  # 2 encoder, 2 decoder, 2 cross attentions
    assert r.barriers["batch"] == {}


def test_user_axes_and_several_inputs(zoo):
    program = zoo["t5"].program
    r = calm(program, "batch")
    assert list(r.axes) == ["batch"]
    assert r.axes["batch"] == [("input_ids", 0), ("attention_mask", 0), ("decoder_input_ids", 0)]
    r = calm(program, "enc=input_ids:1,enc=attention_mask:-1")
    assert r.axes == {"enc": [("input_ids", 1), ("attention_mask", 1)]}
    check_program(program, r)


def test_recurrences_scan_along_time_and_are_free_along_the_batch():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 5, batch_first=True)
            self.gru = nn.GRU(5, 3, batch_first=True)

        def forward(self, x):
            return self.gru(self.lstm(x)[0])[0]

    torch.manual_seed(0)
    program = bwskc.lower(M().eval(), (torch.randn(2, 6, 4),))
    r = calm(program)
    assert r.axes == {"batch": [("x", 0)], "sequence": [("x", 1)]}
    assert r.barriers == {"batch": {}, "sequence": {"scan": 2}}
    ops = {s.id: s.prim.op for s in sites(program)}
    assert sorted(ops[i] for i, d in r.coordination.items() if d["sequence"]) == [
        "aten.gru.input", "aten.lstm.input"]
    n_free, n_barrier = check_program(program, r)
    assert n_free >= 2 and n_barrier == 2


def test_a_definition_applied_twice_is_joined_conservatively():
    t = TensorType("f32", (4, 4))
    f = Def("f", (t,), t, Prim("aten.softmax.int", (HOLE, -1), (), t))
    body = Comb("B", (Ref("f"), Prim("aten.transpose.int", (HOLE, 0, 1), (), t), Ref("f")))
    program = Program("twice", {}, [], {"f": f}, Entry(("x",), (t,), ("y",), (t,), body))
    r = calm(program, "b=x:0")
    soft = next(s for s in sites(program) if s.prim.op == "aten.softmax.int")
    assert r.applications[soft.id] == 2
    assert r.coordination[soft.id]["b"] == "all-reduce"  # the second call is over the split dim
    assert sorted(p.free for p in r.plans[soft.id]["b"]) == [False, True]
    check_program(program, r)


# ---------------------------------------------------------------------------------- regions and FLOPs


def test_regions_are_split_by_barriers():
    class M(nn.Module):
        def forward(self, x):
            h = torch.relu(x) * 2.0
            s = h.sum(0, keepdim=True)  # a barrier along the batch
            return torch.exp(s) + 1.0

    program = bwskc.lower(M(), (torch.randn(4, 3),))
    r = calm(program, "batch=x:0")
    ss = sites(program)
    ops = {s.id: s.prim.op for s in ss}
    assert [ops[i] for i, d in r.coordination.items() if d["batch"]] == ["aten.sum.dim_IntList"]
    by_op = sorted(sorted(ops[i] for i in g) for g in r.regions["batch"])
    assert by_op == [["aten.add.Tensor", "aten.exp.default"], ["aten.mul.Tensor", "aten.relu.default"]]
    assert r.barriers == {"batch": {"all-reduce": 1}}


def test_flop_estimates():
    program = single("aten.linear.default", (HOLE, TensorRef("w"), TensorRef("b")), {"x": _x(2, 6, 8)},
                     {"w": torch.randn(5, 8), "b": torch.randn(5)})
    r = calm(program, "batch=x:0")
    assert r.flops[leaf_site(program).id] == 2 * 2 * 6 * 5 * 8 + 2 * 6 * 5
    program = single("aten.conv2d.default", (HOLE, TensorRef("w")), {"x": _x(2, 3, 5, 5)},
                     {"w": torch.randn(4, 3, 3, 3)})
    r = calm(program, "batch=x:0")
    assert r.flops[leaf_site(program).id] == 2 * (2 * 4 * 3 * 3) * 3 * 3 * 3
    r, s, _, _ = verdict(_sdpa_seq()[0], "b=q:0")
    assert r.flops[s.id] == 2 * 2 * 6 * 6 * (2 * 4 + 2 * 4 + 3)
    r, s, _, _ = verdict(_reshape_bad()[0], "b=x:0")
    assert r.flops[s.id] == 0
    r, s, _, _ = verdict(_mean_batch()[0], "b=x:0")
    assert r.flops[s.id] == 12
    r, s, _, _ = verdict(single("aten.gelu.default", (HOLE,), {"x": _x(3, 5)}), "b=x:0")
    assert r.flops[s.id] == 15


# --------------------------------------------------------------------------------------- partitions


@given(st.lists(st.sampled_from([1, 2, 3, 4, 6]), min_size=1, max_size=4), st.data())
@settings(max_examples=80, deadline=None)
def test_reshape_part_tracks_the_partitioned_factor(shape, data):
    """The factor a reshape keeps is the same elements: cut before or after the reshape alike."""
    d = data.draw(st.integers(0, len(shape) - 1))
    if shape[d] < 2:
        return
    fs = [f for n in shape for f in _factors(n)]
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(fs) - 1, 1)), max_size=len(fs))))
    bounds = [0] + [c for c in cuts if 0 < c < len(fs)] + [len(fs)]
    target = [math.prod(fs[a:b]) for a, b in itertools.pairwise(bounds)] or [1]
    x = torch.arange(math.prod(shape)).reshape(shape)
    q = reshape_part(shape, Part(d), target)
    P = shape[d]
    sizes = [P // 2, P - P // 2]
    if q is None:  # the factor is split: cutting after the reshape cannot give the same pieces
        return
    before = shard(x, Part(d), sizes)
    after = shard(x.reshape(target), q, sizes)
    for a, b in zip(before, after):
        assert torch.equal(a.reshape(-1).sort().values, b.reshape(-1).sort().values)
    assert torch.equal(unshard(after, q, sizes), x.reshape(target))


def test_shard_and_unshard_are_inverse():
    x = torch.arange(2 * 12 * 3).reshape(2, 12, 3)
    for part in (Part(1), Part(1, 2, 3), Part(1, 3, 1), Part(0)):
        P = part.factor(x.shape)
        sizes = [1, P - 1]
        assert torch.equal(unshard(shard(x, part, sizes), part, sizes), x)


# -------------------------------------------------------------------------------------------- --axes


def test_default_axes(zoo):
    assert parse_axes(None, zoo["gpt2"].program) == {"batch": [("input_ids", 0)],
                                                     "sequence": [("input_ids", 1)]}
    assert parse_axes("", zoo["vit"].program) == {"batch": [("pixel_values", 0)]}
    p = single("aten.gelu.default", (HOLE,), {"h": _x(2, 5, 4)})
    assert parse_axes(None, p) == {"batch": [("h", 0)], "sequence": [("h", 1)]}
    p = single("aten.gelu.default", (HOLE,), {"h": _x(1, 5, 4)})
    assert parse_axes(None, p) == {"sequence": [("h", 1)]}
    r = calm(p)
    assert r.notes and "size 1" in r.notes[0]


BAD_AXES = [
    "batch=nope:0", "batch=input_ids:2", "batch=input_ids:-3", "batch=input_ids", "=input_ids:0",
    "batch=input_ids:x", "foo", "batch,batch", ",", "batch,", "batch=input_ids:0,batch=input_ids:1",
    "sequence,sequence=input_ids:1", "ba tch=input_ids:0", "batch=:0",
]


@pytest.mark.parametrize("spec", BAD_AXES)
def test_bad_axes_raise_one_clear_line(zoo, spec):
    program = zoo["gpt2"].program
    with pytest.raises(BwskError) as info:
        parse_axes(spec, program)
    msg = str(info.value)
    assert "\n" not in msg and "--axes" in msg
    with pytest.raises(BwskError):
        run_passes(program, ["calm"], options={"axes": spec})


def test_axes_that_do_not_fit_the_model(zoo):
    with pytest.raises(BwskError, match="no input .* default sequence"):
        parse_axes("sequence", zoo["vit"].program)
    p = single("aten.gelu.default", (HOLE,), {"h": _x(1, 5, 4)})
    with pytest.raises(BwskError, match="size 1"):
        parse_axes("b=h:0", p)


# ---------------------------------------------------------------------------------------- linearity


def _chain(n):
    """entry x = B(leaf_n, ..., leaf_1) x over f32[2,8,4], cycling views, elementwise ops and norms."""
    t = TensorType("f32", (2, 8, 4))
    flat = TensorType("f32", (16, 4))
    leaves = []
    for i in range(n):
        k = i % 4
        if k == 0:
            leaves.append(Prim("aten.view.default", (HOLE, [16, 4]), (), flat))
        elif k == 1:
            leaves.append(Prim("aten.relu.default", (HOLE,), (), flat))
        elif k == 2:
            leaves.append(Prim("aten.view.default", (HOLE, [2, 8, 4]), (), t))
        else:
            leaves.append(Prim("aten.layer_norm.default", (HOLE, [4]), (), t))
    if n % 4 in (1, 2):
        leaves.append(Prim("aten.view.default", (HOLE, [2, 8, 4]), (), t))
    body = Comb("B", tuple(reversed(leaves)))
    entry = Entry(("x",), (t,), ("y",), (t,), body)
    return Program("chain", {}, [], {}, entry)


def test_analysis_is_linear_in_ir_size():
    def cost(n):
        p = _chain(n)
        sites(p)  # the leaf sites are the verifier's work, not the analysis'
        best = math.inf
        for _ in range(3):
            t = time.perf_counter()
            r = analyze(p, "s=x:1")
            best = min(best, time.perf_counter() - t)
        assert r.barriers == {"s": {}}
        return best
    small, big = cost(500), cost(4000)
    assert big / small < 8 * 2.5, f"8x the leaves took {big / small:.1f}x the time"


@pytest.mark.slow
def test_gpt2_48_layers_analyses_in_linear_time():
    import transformers

    from bwskc.frontend import default_inputs, export_module
    from bwskc.lowering import lower_exported

    times = {}
    for n in (12, 48):
        cfg = transformers.GPT2Config(n_layer=n, n_embd=32, n_head=2, vocab_size=100, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg).eval()
        args, kwargs = default_inputs(model)
        loaded = export_module(model, args, kwargs)
        program = lower_exported(loaded.exported, loaded.name)
        sites(program)
        t = time.perf_counter()
        r = analyze(program)
        times[n] = time.perf_counter() - t
        assert r.barriers["sequence"] == {"all-gather": n}
    assert times[48] / times[12] < 4 * 2.5
