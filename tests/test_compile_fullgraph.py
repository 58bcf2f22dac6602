"""``torch.compile(module, fullgraph=True)`` of a ``bwskc.compile`` module, reversible and conventional.

revlib, memcnn and per-block checkpointing break under ``fullgraph=True`` because they save and restore
the global RNG state; bwskc's masks are counter-based (seed, step, site) and its step seed stays a
tensor inside the graph (``rng.step_seed``), so one graph serves every step, and a coupling chain traces
through a Function whose backward is ``torch.func.vjp`` per branch. Checked here on a tiny GPT-2 with
dropout on: the compiled module's outputs and gradients equal eager's (the same masks) at two
consecutive steps, from one compiled graph, with the step counter advanced in the module's buffer.
The aot_eager backend (dynamo and AOT autograd, no C++ toolchain) runs in the default suite; inductor
(C++ codegen) is marked slow: on a cold cache it takes minutes on these 2-core machines.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.utils._pytree as pytree
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

import bwskc
from bwskc.frontend import default_inputs
from bwskc.runtime import rng
from bwskc.runtime.compiled import RNG_BUFFER
from bwskc.runtime.memory import saved_bytes
from conftest import ZOO_SPECS

P = 0.1


@functools.lru_cache(maxsize=None)
def _gpt2(n_layer: int = 2):
    """The zoo's tiny GPT-2 (2 layers: one chain of 4 blocks) with every dropout at ``P``, lowered in
    training mode, and its inputs in entry order."""
    _, config_cls, kwargs = ZOO_SPECS["gpt2"]
    kwargs = dict(kwargs, n_layer=n_layer, resid_pdrop=P, embd_pdrop=P, attn_pdrop=P)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(getattr(transformers, config_cls)(**kwargs))
    args, kw = default_inputs(model)
    program = bwskc.lower(model, args, kw, train=True)
    values = dict(zip(program.entry.input_names, list(args) + list(kw.values())))
    return program, [values[n] for n in program.entry.input_names]


def _loss(out):
    return sum(o.float().pow(2).mean() for o in pytree.tree_leaves(out)
               if isinstance(o, torch.Tensor) and o.is_floating_point())


def _step(fn, module, inputs):
    module.zero_grad()
    out = fn(*inputs)
    _loss(out).backward()
    return out.detach().clone(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _rel_err(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    num = sum(float((got[n] - want[n]).double().norm() ** 2) for n in want)
    den = sum(float(want[n].double().norm() ** 2) for n in want)
    return (num / den) ** 0.5


def _compare(mode: str, backend: str, steps: int = 2, tol: float = 1e-6):
    """Eager and ``torch.compile(fullgraph=True)`` copies of the same module, stepped side by side."""
    program, inputs = _gpt2()
    eager = bwskc.compile(program, mode=mode, seed=4)
    module = bwskc.compile(program, mode=mode, seed=4)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    outs = []
    for step in range(steps):
        want_out, want = _step(eager, eager, inputs)
        got_out, got = _step(compiled, module, inputs)
        assert torch.allclose(got_out, want_out, rtol=0, atol=tol), (step, (got_out - want_out).abs().max())
        err = _rel_err(got, want)
        assert err <= tol, (step, err)
        outs.append(got_out)
    assert counter.frame_count == 1  # one graph for every step: the seed is never a Python constant
    assert torch.equal(getattr(module, RNG_BUFFER), getattr(eager, RNG_BUFFER))
    assert int(getattr(module, RNG_BUFFER)[1]) == steps  # the counter advanced in the module's buffer
    assert not torch.equal(outs[0], outs[1])  # a new step draws new masks
    return eager, module, compiled, inputs, counter


@pytest.mark.parametrize("mode", ["reversible", "conventional"])
def test_fullgraph_aot_eager_gives_eager_gradients_and_masks_at_consecutive_steps(mode):
    eager, module, compiled, inputs, counter = _compare(mode, "aot_eager")
    if mode == "reversible":
        assert module.chains  # the coupling survived: a chain, traced as one Function
    # reseed (what the trainer calls every step) writes the buffer the graph reads: a step's masks
    # again, with no new graph (gradients on: no_grad is a graph of its own)
    module.reseed(4, 1), eager.reseed(4, 1)
    assert torch.allclose(compiled(*inputs), eager(*inputs), rtol=0, atol=1e-6)
    module.reseed(9, 0, shard=1), eager.reseed(9, 0, shard=1)  # another seed, a data-parallel rank
    assert torch.allclose(compiled(*inputs), eager(*inputs), rtol=0, atol=1e-6)
    assert counter.frame_count == 1
    # evaluation: dropout off, the same outputs as eager's, the step counter left alone
    eager.eval(), module.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(*inputs), eager(*inputs), rtol=0, atol=1e-6)
    assert int(getattr(module, RNG_BUFFER)[1]) == 1


def test_fullgraph_batch_norm_chain_updates_its_statistics_once_as_eager():
    """A coupled ResNet stage (batch norm inside the branches): the compiled forward applies the
    running-statistics updates once per call, as eager does, and not again in the backward dynamo
    traces along with it; gradients and buffers equal eager's after two steps."""
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], layer_type="basic",
                                       depths=[2, 2], num_labels=3, image_size=32)
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config).train()
    args, kw = default_inputs(model, batch=2)
    program = bwskc.lower(model, args, kw, train=True)
    values = dict(zip(program.entry.input_names, list(args) + list(kw.values())))
    inputs = [values[n] for n in program.entry.input_names]
    eager = bwskc.compile(program, mode="reversible", seed=2)
    module = bwskc.compile(program, mode="reversible", seed=2)
    assert module.chains
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for step in range(2):
        _, want = _step(eager, eager, inputs)
        _, got = _step(compiled, module, inputs)
        assert _rel_err(got, want) <= 1e-6, step
        for (name, a), (_, b) in zip(eager.named_buffers(), module.named_buffers()):
            assert torch.allclose(a.float(), b.float(), rtol=0, atol=1e-6), (step, name)


def _graph_saved_bytes(module, out) -> int:
    """Bytes the autograd graph behind ``out`` holds for backward, found by walking it (AOT autograd's
    compiled Function keeps its saved tensors on its node, built-in nodes as ``_saved_*``): one storage
    once, parameters excluded. (Saved tensor hooks cannot count a compiled reversible module:
    ``torch.func.vjp``, which its backward traces, refuses to be traced while hooks are set.)"""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        tensors = []
        for name in dir(node):
            if name.startswith("_saved_") or name == "saved_tensors":
                try:
                    value = getattr(node, name)
                except RuntimeError:
                    continue
                tensors += [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]
        for t in tensors:
            st = t.untyped_storage()
            if st.data_ptr() not in params and st.nbytes():
                storages[st.data_ptr()] = st.nbytes()
        stack += [f for f, _ in node.next_functions]
    return sum(storages.values())


def test_fullgraph_reversible_still_stores_less_than_conventional():
    """Under the compiler the reversible chain keeps its memory: the bytes its compiled graph holds for
    backward are well below conventional's under the same compiler, and no more than eager's."""
    program, inputs = _gpt2()
    saved = {}
    for mode in ("reversible", "conventional"):
        module = bwskc.compile(program, mode=mode, seed=1)
        compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
        saved[mode] = _graph_saved_bytes(module, _loss(compiled(*inputs)))
        saved[mode, "eager"] = saved_bytes(bwskc.compile(program, mode=mode, seed=1), *inputs, loss=_loss)[0]
    assert saved["reversible"] < 0.5 * saved["conventional"], saved
    assert saved["reversible"] <= 1.1 * saved["reversible", "eager"], saved
    assert saved["conventional"] <= 1.1 * saved["conventional", "eager"], saved  # the walk misses nothing


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2 ** 63 - 1), step=st.integers(0, 2 ** 31 - 1),
       shard=st.integers(0, 2 ** 40), site=st.tuples(st.integers(-1, 50), st.integers(-1, 8),
                                                      st.integers(0, 40)))
def test_tensor_keys_and_starts_give_the_integer_paths_words(n, seed, step, shard, site):
    """What the compiled graph computes from tensors (key, step, shard offset) is bit for bit what eager
    computes from Python integers, including starts past 2**31 and 2**32 (eager's int64 indices)."""
    t = functools.partial(torch.tensor, dtype=torch.int64)
    key = rng.make_key(seed, step) | (step << 32)
    tkey = rng.make_key(t(seed), t(step)) | (t(step) << 32)
    assert int(tkey) == key
    assert int(rng.make_key(tkey, *site)) == rng.make_key(key, *site)
    where = rng.make_key(key, *site)
    start = shard * n
    def word(w):
        return w.to(torch.int64) & rng.M32
    assert torch.equal(word(rng.words(n, t(where), "cpu", t(start))), word(rng.words(n, where, "cpu", start)))
    x = torch.ones(n)
    assert torch.equal(rng.native_dropout(x, P, torch.stack([tkey, t(shard)]), site)[1],
                       rng.native_dropout(x, P, (key, shard), site)[1])


def test_step_seed_tensor_path_matches_and_advances():
    state = torch.tensor([123456789012, 41, 1, 3], dtype=torch.int64)
    want = rng.step_seed(state.clone(), True)
    got = torch.compile(lambda s: rng.step_seed(s, True), fullgraph=True, backend="aot_eager")(state)
    assert [int(v) for v in got] == list(want)
    assert state.tolist() == [123456789012, 42, 1, 3]
    assert rng.step_seed(state, False) is None and state.tolist()[1] == 42


@pytest.mark.slow  # inductor's C++ codegen: about 6 minutes on a cold cache on a loaded 2-core machine
def test_fullgraph_inductor_gives_eager_gradients_and_masks():
    """The inductor backend fuses the mask hash into its own C++ kernels (int32 words that wrap, as
    eager's do): the same masks, gradients equal to eager's."""
    _compare("reversible", "inductor", tol=1e-5)


@pytest.mark.slow  # two trainer runs and a compile: about 2 minutes on a loaded 2-core machine
def test_train_compile_aot_eager_steps_as_eager(tmp_path):
    """``bwskc train --compile aot_eager`` trains the tiny default-style model step for step as eager
    does: the same losses and gradient norms (the same masks, from the buffer ``reseed`` writes)."""
    import json

    from bwskc.cli import main
    from test_train import _args, _corpus, _model
    data, model = _corpus(tmp_path / "data"), _model(tmp_path / "model")
    flags = ("--mode", "reversible", "--experiment", "scratch", "--max-steps", "2", "--check-gradients", "off")
    rows = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile", "aot_eager"))):
        out = tmp_path / name
        assert main(_args(model, data, out, *flags, *extra)) == 0
        lines = (out / "scratch-bwsk-reversible" / "metrics.jsonl").read_text().splitlines()
        rows[name] = [(r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if "loss" in r]
        results = json.loads((out / "scratch-bwsk-reversible" / "training_results.json").read_text())
        assert results["compile"] == (extra[1] if extra else "off")
    assert len(rows["eager"]) == 2
    for (loss, norm), (want_loss, want_norm) in zip(rows["compiled"], rows["eager"]):
        assert abs(loss - want_loss) <= 1e-5 * abs(want_loss) and abs(norm - want_norm) <= 1e-4 * want_norm
