"""CALM you can run (passes/calm/schedule.py, bwskc/sharding/module.py): a program split along an axis
over 2 processes gives the eager model's outputs and gradients, and runs the collectives its schedule
predicts.

The multi-process checks spawn their own 2 gloo processes once (``check_sharded``) for every case: GPT-2,
Llama (rotary tables sliced by the shard's offset), BERT along the sequence (attention gathers keys and
values); ViT and a training-mode ResNet along the batch (batch norm's statistics all-reduced); random
sequence programs that mix free steps, all-reduces and gathers; and GPT-2 and BERT trained with dropout,
against the single-process module whose counter-based masks the shards slice. In-process, every step of the
zoo's and random programs' schedules is run on uneven shards by test_calm's harness.
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_calm import RandNet, check_plan, slot_values

import bwskc
from bwskc.errors import BwskError
from bwskc.passes.calm.schedule import REDUCERS, placement, schedule
from bwskc.runtime.denote import Denoter
from bwskc.runtime.interp import EagerBackend
from bwskc.sharding.check import check_sharded
from bwskc.sites import sites

TOL = 1e-5

RANDOM_STEPS = [  # sequence programs: mean over the sequence, attention, cumsum, conv, roll, flip...
    [(6, 0, 0), (4, 1, 0), (2, 2, 1)],
    [(5, 0, 0), (8, 1, 0), (3, 2, 1), (13, 2, 0)],
    [(12, 0, 0), (11, 1, 0), (2, 2, 1), (15, 3, 0)],
    [(1, 0, 0), (3, 1, 1), (6, 2, 0), (17, 3, 1), (4, 4, 2)],
]


def build_random(case):
    torch.manual_seed(case["seed"])
    model = RandNet([tuple(s) for s in case["steps"]], 8)
    return model, (torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(case["seed"])),)


CASES = {
    "gpt2-sequence": dict(model="gpt2", axis="sequence", shape=[2, 16]),
    "llama-sequence": dict(model="llama", axis="sequence", shape=[2, 16]),
    "bert-sequence": dict(model="bert", axis="sequence", shape=[2, 16]),
    "gpt2-batch": dict(model="gpt2", axis="batch", shape=[2, 16]),
    "vit-batch-train": dict(model="vit", axis="batch", shape=[4, 3, 16, 16], train=True),
    "resnet-batch-train": dict(model="resnet", axis="batch", shape=[4, 3, 32, 32], train=True),
    **{f"random{i}-sequence": dict(build="test_shard:build_random", steps=s, seed=i, axis="sequence")
       for i, s in enumerate(RANDOM_STEPS)},
    # training with dropout (GPT-2's and BERT's 0.1, attention dropout too) against the single-process
    # conventional module: the shards draw its masks, sliced at their global coordinates
    **{f"{m}-{axis}-dropout": dict(model=m, axis=axis, shape=[2, 16], train=True, reference="compiled")
       for m, axis in (("gpt2", "sequence"), ("gpt2", "batch"), ("bert", "sequence"))},
}


@pytest.fixture(scope="module")
def sharded_runs():
    names = list(CASES)
    return dict(zip(names, check_sharded([CASES[n] for n in names], nproc=2)))


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one(sharded_runs, name):
    r = sharded_runs[name]
    assert "error" not in r, r.get("error")
    assert r["forward"] <= TOL, f"{name}: outputs differ by {r['forward']:.2e} (relative)"
    assert r["gradients_checked"] > 0 and not r["missing_gradients"]
    assert r["gradient"] <= TOL, f"{name}: {r['worst']} gradient differs by {r['gradient']:.2e}"
    assert r["buffers"] <= TOL
    if "eval" in r:
        assert r["eval"] <= TOL
    # the communication the schedule predicted is the communication that ran
    assert [tuple(x) for x in r["log"]] == [tuple(x) for x in r["predicted"]]


@pytest.mark.parametrize("name", [n for n in CASES if n.endswith("-dropout")])
def test_training_with_dropout_on_shards_drops_what_one_process_drops(sharded_runs, name):
    """Not vacuous: dropout was on (training's output is far from evaluation's), and yet the two
    processes' output equals the single-process module's (test_two_processes_equal_one)."""
    r = sharded_runs[name]
    assert "error" not in r, r.get("error")
    assert r["train_vs_eval"] > 1e-2, r["train_vs_eval"]
    assert r["forward"] <= TOL


def test_what_ran_is_what_the_analysis_named(sharded_runs):
    for name in ("gpt2-sequence", "llama-sequence", "bert-sequence"):
        # two layers: one attention each, gathering its keys and values
        assert list(sharded_runs[name]["steps"].values()) == [["all-gather"], ["all-gather"]], name
    assert sharded_runs["gpt2-batch"]["steps"] == {}  # coordination-free along the batch
    assert sharded_runs["vit-batch-train"]["steps"] == {}
    bn = sharded_runs["resnet-batch-train"]["steps"]
    assert len(bn) == 8 and all(v == ["all-reduce"] for v in bn.values())  # every batch norm
    kinds = {c for n in CASES if n.startswith("random") for _, c, _ in sharded_runs[n]["log"]}
    assert kinds == {"all-reduce", "all-gather"}  # the random programs exercise both


# ------------------------------------------------------------------------------ in one process


def test_attention_gathers_exactly_its_keys_and_values(zoo):
    program = zoo["gpt2"].program
    sch = schedule(program, "sequence", 2)
    ss = sites(program)
    barriers = sch.barrier_sites()
    assert [ss[s].prim.op for s in barriers] == ["aten.scaled_dot_product_attention.default"] * 2
    for s in barriers:
        (step,) = sch.steps[s]
        assert step.gather == (1, 2)  # key and value; the queries stay sharded
        assert placement(step.plan.out) == "Shard(2)"
        k = ss[s].inputs[1]
        assert sch.bytes_by_site()[s] == [("all-gather", k.numel * 4)] * 2


def test_training_batch_norm_is_an_all_reduce_of_its_statistics():
    from bwskc import _lower_both_modes
    from bwskc.testing import build_zoo_model
    model = build_zoo_model("resnet")
    program, _ev, _ = _lower_both_modes(model, (torch.randn(4, 3, 32, 32),), None)
    sch = schedule(program, "batch", 2)
    ss = sites(program)
    bns = [s for s in sch.barrier_sites()]
    assert bns and all(ss[s].prim.op == "aten._native_batch_norm_legit_functional.default"
                       for s in bns)
    for s in bns:
        (step,) = sch.steps[s]
        assert step.reducer == REDUCERS["_native_batch_norm_legit_functional"].name
        channels = ss[s].inputs[0].shape[1] if ss[s].inputs else None
        assert [b for _, b in sch.bytes_by_site()[s]] == [channels * 4] * 2 or channels is None


def test_uneven_splits_and_unknown_axes_are_refused(zoo):
    program = zoo["gpt2"].program  # sequence 16
    assert "does not split evenly over 3 processes" in schedule(program, "sequence", 3).problems[0]
    with pytest.raises(BwskError, match="no 'time' axis"):
        schedule(program, "time", 2)
    with pytest.raises(BwskError, match="at least 1"):
        schedule(program, "batch", 0)


def test_compile_shard_refuses_in_one_line(zoo):
    program = zoo["gpt2"].program
    with pytest.raises(BwskError, match="initialise the process group"):
        bwskc.compile(program, shard={"sequence": 2})
    with pytest.raises(BwskError, match="reversible"):
        bwskc.compile(program, mode="reversible", shard={"sequence": 2})
    for bad in ({"sequence": 0}, {"sequence": 2, "batch": 2}, ["sequence"]):
        with pytest.raises(BwskError):
            bwskc.compile(program, shard=bad)


def check_schedule_steps(program, sch, seed=0) -> int:
    """Every step's local plan (after its gathers) run on uneven shards equals the whole leaf."""
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    const = Denoter(program, EagerBackend(program.weights)).const
    checked = 0
    for sid, steps in sch.steps.items():
        site = sites(program)[sid]
        for step in steps:
            if step.reducer is not None:  # an all-reduce executor: checked on two processes
                assert step.plan.collective == "all-reduce"
                continue
            assert step.local.free
            if all(p is None for p in step.local.ins):
                continue
            vals = slot_values(program, site, gen, const)
            assert check_plan(site.prim, step.local, vals, rnd.choice((2, 3)), rnd), (
                f"site {sid} {site.prim.op}: the local plan after gathering {step.gather} fails")
            checked += 1
    return checked


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit", "t5"])
def test_zoo_schedule_steps_hold_on_shards(zoo, name):
    program = zoo[name].program
    for axis in ("batch", "sequence"):
        try:
            sch = schedule(program, axis, 2)
        except BwskError:
            continue  # the model has no such axis (ViT: its input is pixels)
        assert check_schedule_steps(program, sch) > 0


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.integers(0, 17), st.integers(0, 9), st.integers(0, 9)),
                      min_size=1, max_size=5), seed=st.integers(0, 2 ** 16))
def test_random_programs_every_step_holds_on_shards(steps, seed):
    torch.manual_seed(seed)
    program = bwskc.lower(RandNet(steps, 4).eval(), (torch.randn(2, 4, 4),))
    for axis in ("batch", "sequence"):
        sch = schedule(program, axis, 2)
        check_schedule_steps(program, sch, seed)
        for sid, lst in sch.steps.items():  # a step that gathers says so, an unknown one why
            for st_ in lst:
                if st_.plan.collective == "unknown":
                    assert st_.note and "gathers every partitioned operand" in st_.note
