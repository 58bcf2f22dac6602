"""Sharding plans in the IR text (passes/calm/shard_plan.py, bwskc/text.py, bwskc/cli.py, bwskc/report.py).

* A printed plan parses back to the plan the schedule derives, and prints byte-identically: zoo models
  along the sequence and the batch (a training-mode ResNet: its batch norms all-reduce), and random
  programs along the sequence over 1, 2 and 4 processes.
* A plan that is not the analysis' is refused at the line that says otherwise (``FILE:LINE:COL``), in
  one line, by ``parse_checked`` (bwskc.parse) and by ``bwskc parse`` (exit 2, nothing written).
* ``bwskc lower --shard AXIS=N`` prints a plan ``bwskc parse`` accepts, refuses bad specs and uneven
  splits in one line, and derives a carried plan again after passes renumber the sites.
* ``--emit report``'s communication table is the schedule's: its sites, calls and bytes.
"""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_calm import RandNet

import bwskc
from bwskc.cli import main
from bwskc.errors import BwskError, IRSyntaxError
from bwskc.passes.calm.schedule import schedule
from bwskc.passes.calm.shard_plan import ShardPlan, placement_text, plan_of
from bwskc.sites import sites
from bwskc.passes.calm.shard_plan import parse_checked

GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "vocab_size": 300,
        "bos_token_id": 0, "eos_token_id": 0, "use_cache": False}
_STEP = re.compile(r"^  @(\d+) (\S+) : (all_gather\[[\d, ]*\]|all_reduce\(\S+\)) -> ")


# --------------------------------------------------------------------------------------- helpers


def with_plan(program, axis: str, nproc: int):
    """A copy of ``program`` carrying the plan its schedule along ``axis`` derives (the zoo's programs
    are shared by the session: they are not changed)."""
    sch = schedule(program, axis, nproc)
    assert not sch.problems, sch.problems
    copy = program.replace()
    plan = plan_of(sch, copy)
    copy.analyses["shard"] = {axis: plan}
    return copy, sch, plan


def block(text: str, axis: str) -> tuple[int, list[str]]:
    """The 0-based index of the ``shard AXIS N {`` line and the block's lines, through its ``}``."""
    lines = text.split("\n")
    (start,) = [i for i, ln in enumerate(lines) if re.match(rf"shard {re.escape(axis)} \d+ \{{$", ln)]
    end = lines.index("}", start)
    return start, lines[start:end + 1]


def check_round_trip(program, axis: str, nproc: int, filename: str = "plan.bwsk") -> tuple[str, ShardPlan]:
    carrying, sch, plan = with_plan(program, axis, nproc)
    text = carrying.text()
    parsed = parse_checked(text, filename)
    got = parsed.analyses["shard"]
    assert list(got) == [axis]
    assert got[axis] == plan
    assert (got[axis].axis, got[axis].nproc) == (axis, nproc)
    assert got[axis].payloads == sch.bytes_by_site()  # the parser fills them from its derivation
    assert parsed.text() == text
    # one @SITE line per barrier step, in site order, naming the site's op and its collective
    _, lines = block(text, axis)
    assert lines[0] == f"shard {axis} {nproc} {{"
    ops = {s.id: s.prim.op for s in sites(program)}
    want = [(sid, st_) for sid, lst in sorted(sch.steps.items()) for st_ in lst if st_.collective]
    steps = [ln for ln in lines if ln.startswith("  @")]
    assert len(steps) == len(want), (steps, want)
    assert sorted({sid for sid, _ in want}) == sch.barrier_sites()
    bytes_by_site = sch.bytes_by_site()
    for ln, (sid, st_) in zip(steps, want):
        m = _STEP.match(ln)
        assert m, ln
        assert int(m.group(1)) == sid and m.group(2) == ops[sid], ln
        if st_.reducer is not None:
            assert m.group(3) == f"all_reduce({st_.reducer})", ln
        else:
            assert m.group(3) == "all_gather[" + ", ".join(map(str, st_.gather)) + "]", ln
        made = placement_text(tuple(st_.local.out) if isinstance(st_.local.out, list) else st_.local.out)
        assert ln[m.end():].startswith(made), ln
        sizes = ", ".join(f"{c} {b} B" for c, b in bytes_by_site.get(sid, []))
        if sizes:
            assert ln.endswith(sizes), ln
    inputs = [ln for ln in lines[1:] if not ln.startswith(("  @", "  ->")) and ln != "}"]
    assert inputs == [f"  {n} : {placement_text(sch.inputs[n])}" for n in program.entry.input_names]
    outputs = [ln for ln in lines if ln.startswith("  -> ")]
    assert outputs == [f"  -> {n} : {placement_text(p)}" for n, p in sch.outputs.items()]
    return text, plan


# ---------------------------------------------------------------------------------- 1. round trip


@pytest.mark.parametrize("name,axis", [("gpt2", "sequence"), ("llama", "sequence"), ("bert", "sequence"),
                                       ("gpt2", "batch")])
def test_zoo_plans_round_trip(zoo, name, axis):
    program = zoo[name].program
    text, plan = check_round_trip(program, axis, 2, f"{name}.bwsk")
    if axis == "sequence":  # attention gathers: the plan has steps (not a vacuous round trip)
        assert plan.steps and all(s.gather for s in plan.steps)
    assert text.count("\nshard ") == 1


def test_training_resnet_batch_plan_round_trips():
    from bwskc import _lower_both_modes
    from bwskc.testing import build_zoo_model
    program, _eval, _ = _lower_both_modes(build_zoo_model("resnet"), (torch.randn(4, 3, 32, 32),), None)
    text, plan = check_round_trip(program, "batch", 2, "resnet.bwsk")
    # its batch norms all-reduce: the tuple placements and the executor's name round-trip too
    assert plan.steps and all(s.reducer is not None and isinstance(s.made, tuple) for s in plan.steps)


def _random_program(steps, t, seed):
    torch.manual_seed(seed)
    return bwskc.lower(RandNet([tuple(s) for s in steps], 4).eval(), (torch.randn(2, t, 4),))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.integers(0, 17), st.integers(0, 9), st.integers(0, 9)),
                      min_size=1, max_size=5),
       t=st.sampled_from([4, 8]), nproc=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2 ** 16))
def test_random_programs_plans_round_trip(steps, t, nproc, seed):
    program = _random_program(steps, t, seed)
    assume(not schedule(program, "sequence", nproc).problems)
    check_round_trip(program, "sequence", nproc, "random.bwsk")


@pytest.mark.parametrize("steps", [
    [(6, 0, 0), (4, 1, 0), (2, 2, 1)],  # attention gathering all, then a mean: `=>` and all_reduce(sum)
    [(12, 0, 0), (11, 1, 0), (2, 2, 1), (15, 3, 0)],  # matmuls: `=>` between two shardings
])
def test_random_plans_with_every_step_form_round_trip(steps):
    program = _random_program(steps, 4, 0)
    text, plan = check_round_trip(program, "sequence", 2)
    _, lines = block(text, "sequence")
    # each step whose region reads the result elsewhere says so after `=>`
    assert any(s.want != s.made for s in plan.steps)
    for ln, s in zip([x for x in lines if x.startswith("  @")], plan.steps):
        assert (" => " in ln) == (s.want != s.made), ln


# -------------------------------------------------------------------------------- 2. mutated plans


@pytest.fixture(scope="module")
def gpt2_text(zoo):
    carrying, sch, plan = with_plan(zoo["gpt2"].program, "sequence", 2)
    text = carrying.text()
    start, lines = block(text, "sequence")
    assert len(plan.steps) == 2 and len(lines) == 6  # header, input, two steps, output, }
    return text, start, plan


def _replace(index, old, new):
    def mutate(lines, plan):
        assert old(plan) in lines[index], (lines[index], old(plan))
        lines[index] = lines[index].replace(old(plan), new(plan), 1)
        return index
    return mutate


def _const(s):
    return lambda plan: s


def _delete(index):
    def mutate(lines, plan):
        del lines[index]
        return None  # the check points at the block's line where the derivation and the text part
    return mutate


def _duplicate(index):
    def mutate(lines, plan):
        lines.insert(index + 1, lines[index])
        return index + 1
    return mutate


H, IN, S0, S1, OUT = 0, 1, 2, 3, 4  # lines of the block, from its header
MUTATIONS = {
    "barrier site": (_replace(S0, lambda p: f"@{p.steps[0].site} ", lambda p: f"@{p.steps[0].site + 1} "),
                     "the plan says"),
    "second barrier site": (_replace(S1, lambda p: f"@{p.steps[1].site} ",
                                     lambda p: f"@{p.steps[1].site - 1} "), "the plan says"),
    "gathered slots": (_replace(S0, _const("all_gather[1, 2]"), _const("all_gather[1]")), "all_gather[1]"),
    "gather to all-reduce": (_replace(S0, _const("all_gather[1, 2]"), _const("all_reduce(sum)")),
                             "all_reduce(sum)"),
    "step placement": (_replace(S1, _const("-> Shard(2)"), _const("-> Shard(1)")), "-> Shard(1)"),
    "step read elsewhere": (_replace(S0, _const("-> Shard(2)"), _const("-> Shard(2) => Replicate()")),
                            "=> Replicate()"),
    "step op": (_replace(S0, _const("aten.scaled_dot_product_attention.default"), _const("aten.mm.default")),
                "aten.mm.default"),
    "first step deleted": (_delete(S0), "shard sequence"),
    "last step deleted": (_delete(S1), "the plan lacks"),
    "first step duplicated": (_duplicate(S0), "the plan says"),
    "last step duplicated": (_duplicate(S1), "is not a barrier step"),
    "output placement": (_replace(OUT, _const("-> logits : Shard(1)"), _const("-> logits : Replicate()")),
                         "output logits is made as Shard(1)"),
    "input renamed": (_replace(IN, _const("input_ids : "), _const("input_idz : ")), "not an entry input"),
    "process count 3": (_replace(H, _const("shard sequence 2 {"), _const("shard sequence 3 {")),
                        "does not split evenly over 3 processes"),
    "process count 0": (_replace(H, _const("shard sequence 2 {"), _const("shard sequence 0 {")),
                        "0 processes"),
    "second plan along the axis": (None, "a second shard plan"),
    "malformed placement": (_replace(IN, _const("Shard(1)"), _const("Shard(x)")), "unexpected 'x'"),
    "unknown placement": (_replace(IN, _const("Shard(1)"), _const("Partial()")), "unknown placement"),
    "unknown collective": (_replace(S0, _const("all_gather["), _const("all_scatter[")), "unknown collective"),
    # the input placements are the plan's premise: one that splits no input is refused as a whole...
    "input replicated": (_replace(IN, _const("Shard(1)"), _const("Replicate()")), "no input is split"),
    # ...one that splits another dim derives another plan, refused where the text leaves it
    "input split along the batch": (_replace(IN, _const("Shard(1)"), _const("Shard(0)")), "shard sequence"),
    "input split along a factor": (_replace(IN, _const("Shard(1)"), _const("Shard(1, outer=2)")),
                                   "split along a whole dim"),
    "input dim beyond its rank": (_replace(IN, _const("Shard(1)"), _const("Shard(5)")), "has no dim 5"),
}


def _entry(name):
    """(mutate, what the message says) of a mutation; a ``pytest.param`` holds them in ``.values``."""
    v = MUTATIONS[name]
    return tuple(v.values) if hasattr(v, "marks") else v


def _mutated(gpt2_text, name):
    """The mutated text, the 1-based line the refusal must name (None: a deleted line) and the block's
    lines (1-based)."""
    text, start, plan = gpt2_text
    lines = text.split("\n")
    if name == "second plan along the axis":
        at = len(lines)
        lines += lines[start:start + 6] + [""]
        return "\n".join(lines), at + 1, range(at + 1, at + 7)
    blk = lines[start:start + 6]  # the mutations index the block's lines
    at = _entry(name)[0](blk, plan)
    lines[start:start + 6] = blk
    return "\n".join(lines), (None if at is None else start + at + 1), range(start + 1, start + 7)


def _location(message: str, path: str) -> tuple[int, int]:
    m = re.match(rf"{re.escape(path)}:(\d+):(\d+): ", message)
    assert m, message
    return int(m.group(1)), int(m.group(2))


@pytest.mark.parametrize("mutation", [pytest.param(n, marks=getattr(MUTATIONS[n], "marks", ()))
                                      for n in MUTATIONS])
def test_mutated_plan_is_refused_at_its_line(gpt2_text, mutation, tmp_path, capsys):
    says = _entry(mutation)[1]
    text, line, block_lines = _mutated(gpt2_text, mutation)
    path = str(tmp_path / "mutated.bwsk")
    with pytest.raises(BwskError) as info:
        parse_checked(text, path)
    message = str(info.value)
    assert "\n" not in message, message
    got_line, got_col = _location(message, path)
    source = text.split("\n")[got_line - 1]
    if line is None:  # a deleted line: somewhere in the block, at or after where it was
        assert got_line in block_lines, message
    elif mutation == "input replicated":  # the plan as a whole, or its input
        assert got_line in (block_lines[0], line), message
    elif mutation == "input split along the batch":  # the first step the other split does not derive
        assert got_line == block_lines[S0], message
    else:
        assert got_line == line, (message, line)
    if isinstance(info.value, IRSyntaxError):
        assert got_col >= 1 and says in message
    else:
        assert "shard" in message and says in message, message
        # the column is where the line's item starts (the `}` of a plan that lacks a step: after it)
        assert got_col in (len(source) - len(source.lstrip()) + 1, len(source) + 1), (message, source)
    if mutation == "malformed placement":
        assert got_col == source.index("x") + 1
    # the command line: exit 2, the same diagnostic, nothing written
    (tmp_path / "mutated.bwsk").write_text(text)
    out = tmp_path / "out.bwsk"
    capsys.readouterr()
    assert main(["parse", path, "-o", str(out)]) == 2
    stdout, stderr = capsys.readouterr()
    err = stderr.splitlines()
    assert stdout == "" and "Traceback" not in stderr
    assert err[0] == f"bwskc: {message}", stderr
    assert len(err) == (3 if isinstance(info.value, IRSyntaxError) else 1), stderr  # + line and caret
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mutated.bwsk"]


def test_the_unmutated_text_is_accepted_by_the_cli(gpt2_text, tmp_path, capsys):
    text, _, _ = gpt2_text
    src, out = tmp_path / "plan.bwsk", tmp_path / "out.bwsk"
    src.write_text(text)
    assert main(["parse", str(src), "-o", str(out)]) == 0
    assert out.read_text() == text


def test_the_axis_name_is_a_label_the_placements_define(gpt2_text):
    """The inputs' placements define the axis (as ``--axes AXIS=INPUT:DIM`` does): the sequence plan
    under another name is the same claim about the program, derived and accepted as such."""
    text, _, _ = gpt2_text
    relabelled = text.replace("shard sequence 2 {", "shard tokens 2 {")
    parsed = parse_checked(relabelled, "tokens.bwsk")
    (plan,) = parsed.analyses["shard"].values()
    assert plan.axis == "tokens" and parsed.text() == relabelled
    original = parse_checked(text, "plan.bwsk").analyses["shard"]["sequence"]
    assert (plan.inputs, plan.steps, plan.outputs) == (original.inputs, original.steps, original.outputs)


def test_the_text_layer_parses_plans_as_claims_and_the_calm_layer_checks_them(gpt2_text):
    """``bwskc.text.parse_program`` (the IR layer: no analysis) parses a plan's form; the claim is
    checked by ``check_parsed``, which every reader of IR text in bwskc runs (bwskc.parse, the CLI,
    the trainer)."""
    import bwskc
    from bwskc.passes.calm.shard_plan import check_parsed
    from bwskc.text import parse_program
    text, _, _ = gpt2_text
    false = text.replace("all_gather[1, 2]", "all_gather[1]", 1)
    program = parse_program(false, "false.bwsk")  # well-formed IR with a false plan
    with pytest.raises(BwskError, match=r"^false\.bwsk:\d+:\d+: shard sequence: the plan says"):
        check_parsed(program, "false.bwsk")
    with pytest.raises(BwskError, match="the plan says"):
        bwskc.parse(false, "false.bwsk")


# ------------------------------------------------------------------------------ 3. lower --shard


def _run(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, err.splitlines()


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """``bwskc lower CONFIG --shard sequence=2`` once: the text, and the same IR without its plan."""
    root = tmp_path_factory.mktemp("shard_cli")
    (root / "model").mkdir()
    cfg = root / "model" / "config.json"
    cfg.write_text(json.dumps(GPT2))
    out = root / "sharded.bwsk"
    assert main(["lower", str(cfg), "--shard", "sequence=2", "-o", str(out)]) == 0
    text = out.read_text()
    plain = root / "plain.bwsk"
    plain.write_text(text[:text.index("\nshard ") + 1])
    return root, cfg, out, plain


def test_lower_shard_prints_a_plan_parse_accepts(lowered, capsys):
    root, cfg, out, plain = lowered
    text = out.read_text()
    assert "\nshard sequence 2 {\n" in text
    rc, err = _run(["parse", out, "-o", root / "reparsed.bwsk"], capsys)
    assert rc == 0 and err == []
    assert (root / "reparsed.bwsk").read_text() == text
    program = parse_checked(text, str(out))
    plan = program.analyses["shard"]["sequence"]
    assert plan == plan_of(schedule(program, "sequence", 2), program) and plan.steps
    # the plan is what was added: the same IR without it parses to no plan
    assert parse_checked(plain.read_text(), str(plain)).analyses.get("shard") is None


def test_lower_shard_refuses_an_uneven_split_in_one_line(lowered, capsys):
    root, cfg, out, plain = lowered
    target = root / "uneven.bwsk"
    rc, err = _run(["lower", cfg, "--shard", "sequence=3", "-o", target], capsys)
    seq = parse_checked(plain.read_text()).entry.inputs[0].shape[1]
    assert seq % 3  # the default example input's sequence length does not split over 3
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("bwskc: --shard sequence=3: ") and f"size {seq}" in err[0], err
    assert "does not split evenly over 3 processes" in err[0]
    assert not target.exists()


@pytest.mark.parametrize("spec,says", [("nonsense", "give AXIS=N"), ("sequence=", "give AXIS=N"),
                                       ("sequence=0", "give AXIS=N"), ("=2", "give AXIS=N"),
                                       ("time=2", "no 'time' axis")])
def test_lower_shard_refuses_bad_specs_in_one_line(lowered, capsys, spec, says):
    root, cfg, out, plain = lowered
    target = root / "bad.bwsk"
    rc, err = _run(["lower", plain, "--shard", spec, "-o", target], capsys)
    assert rc == 2 and len(err) == 1 and says in err[0], err
    assert not target.exists()


@pytest.mark.parametrize("extra,says", [(["--emit", "json"], "--emit ir or report"),
                                        (["--shard", "sequence=4"], "an axis is given twice"),
                                        (["--shard", "sequence=²"], "give AXIS=N")])
def test_lower_shard_refuses_what_it_would_drop_in_one_line(lowered, capsys, extra, says):
    root, cfg, out, plain = lowered
    target = root / "dropped.out"
    rc, err = _run(["lower", plain, "--shard", "sequence=2", *extra, "-o", target], capsys)
    assert rc == 2 and len(err) == 1 and says in err[0], err
    assert not target.exists()


def test_lower_with_passes_derives_a_carried_plan_again(lowered, capsys):
    root, cfg, out, plain = lowered
    fused = root / "fused.bwsk"
    rc, err = _run(["lower", out, "--passes", "fusion", "-o", fused], capsys)
    assert rc == 0 and err == []
    text = fused.read_text()
    program = parse_checked(text, str(fused))  # the output parses: its plan is the fused program's
    plan = program.analyses["shard"]["sequence"]
    assert plan == plan_of(schedule(program, "sequence", 2), program)
    before = parse_checked(out.read_text(), str(out)).analyses["shard"]["sequence"]
    assert plan.inputs == before.inputs and plan.nproc == before.nproc
    assert [s.op for s in plan.steps] == [s.op for s in before.steps]
    # fusion renumbered the sites: the plan carried from the input would be refused on the output
    assert [s.site for s in plan.steps] != [s.site for s in before.steps]
    start, lines = block(text, "sequence")
    _, old = block(out.read_text(), "sequence")
    stale = "\n".join(text.split("\n")[:start] + old + text.split("\n")[start + len(lines):])
    with pytest.raises(BwskError, match=rf"^stale\.bwsk:{start + 3}:3: shard sequence: the plan says"):
        parse_checked(stale, "stale.bwsk")


def test_lower_shard_along_an_axes_axis_round_trips(lowered, capsys):
    root, cfg, out, plain = lowered
    target = root / "feature.bwsk"
    rc, err = _run(["lower", plain, "--axes", "feature=input_ids:0", "--shard", "feature=2", "-o", target],
                   capsys)
    assert rc == 0 and err == []
    text = target.read_text()
    assert "\nshard feature 2 {\n  input_ids : Shard(0)\n" in text
    rc, err = _run(["parse", target, "-o", root / "feature2.bwsk"], capsys)
    assert rc == 0 and (root / "feature2.bwsk").read_text() == text


# ---------------------------------------------------------------------------------------- 4. report


def _comm_tables(report: str) -> dict[str, list[list[str]]]:
    """``{"AXIS, N processes": rows}`` of the communication section (cells stripped)."""
    section = report.split("## Communication (sharded execution)\n", 1)[1].split("\n## ", 1)[0]
    out = {}
    for part in section.split("\n### ")[1:]:
        title, body = part.split("\n", 1)
        rows = [ln for ln in body.split("\n") if ln.startswith("|")]
        out[title] = [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]
    return out


@pytest.fixture(scope="module")
def report_run(lowered):
    root, cfg, out, plain = lowered
    target = root / "report.md"
    assert main(["lower", str(cfg), "--emit", "report", "--shard", "sequence=2", "-o", str(target)]) == 0
    from bwskc.frontend import load_model
    from bwskc.lowering import lower_exported
    from bwskc.passes.manager import run_passes
    loaded = load_model(str(cfg))  # as the CLI lowers it, with its weights (typing reads them)
    program = run_passes(lower_exported(loaded.exported, loaded.name), ["typing", "calm", "fusion"])
    return target.read_text(), program


def _ring(payload, collective, n):  # bytes one process receives, forward and backward
    f = (n - 1) / n
    return 2 * payload * (2 * f if collective == "all-reduce" else f)


def test_report_communication_is_the_schedule(report_run):
    from bwskc.report import _mb
    report, program = report_run
    tables = _comm_tables(report)
    assert list(tables) == ["sequence, 2 processes"]
    rows = tables["sequence, 2 processes"]
    sch = schedule(program, "sequence", 2)
    assert not sch.problems and sch.barrier_sites()
    by_site = {s.id: s for s in sites(program)}
    site_rows = [r for r in rows if r[0].isdigit()]
    assert sorted({int(r[0]) for r in site_rows}) == sch.barrier_sites()
    calls = Counter((sid, c) for sid, c, _ in sch.comm if sid is not None)
    payload = Counter()
    for sid, c, b in sch.comm:
        payload[sid, c] += b
    assert [(int(r[0]), r[3]) for r in site_rows] == sorted(calls)
    for r in site_rows:
        sid, coll = int(r[0]), r[3]
        assert r[1] == f"`{by_site[sid].prim.op}`" and r[2] == f"`{by_site[sid].scope}`", r
        assert int(r[4]) == calls[sid, coll], r
        assert r[5] == _mb(payload[sid, coll]) and r[6] == _mb(_ring(payload[sid, coll], coll, 2)), r
    outputs = [r for r in rows if r[2] == "(outputs returned whole)"]
    whole = [b for sid, _, b in sch.comm if sid is None]  # outputs made sharded, gathered to return
    assert [(r[4], r[5]) for r in outputs] == ([(str(len(whole)), _mb(sum(whole)))] if whole else [])
    import transformers
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: one tensor, once
    (grad,) = [r for r in rows if r[2] == "(parameter gradients)"]
    assert grad[5] == _mb(params)
    (total,) = [r for r in rows if r[0] == "**Total**"]
    assert total[5] == _mb(sum(b for _, _, b in sch.comm) + params)
    grad_received = params * 2 * (2 - 1) / 2  # one ring all-reduce of the gradients, after backward
    assert grad[6] == _mb(grad_received)
    assert total[6] == _mb(sum(_ring(b, c, 2) for _, c, b in sch.comm) + grad_received)
    assert f"{len(sch.barrier_sites())} barrier site(s); {len(sch.comm)} forward collective(s)" in report


def test_report_parameter_gradients_count_a_tied_weight_once(report_run):
    import transformers
    from bwskc.report import _mb
    report, program = report_run
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    distinct = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: one tensor
    (grad,) = [r for r in _comm_tables(report)["sequence, 2 processes"] if r[2] == "(parameter gradients)"]
    assert grad[5] == _mb(distinct)


def test_report_without_shard_covers_every_calm_axis(lowered, capsys):
    from bwskc.passes.calm.axes import parse_axes
    root, cfg, out, plain = lowered
    target = root / "report0.md"
    rc, err = _run(["lower", plain, "--emit", "report", "-o", target], capsys)
    assert rc == 0 and err == []
    report = target.read_text()
    section = report.split("## Communication (sharded execution)\n", 1)[1].split("\n## ", 1)[0]
    assert "over 2 processes" in section
    axes = list(parse_axes(None, parse_checked(plain.read_text())))
    assert axes and list(_comm_tables(report)) == [f"{a}, 2 processes" for a in axes]
