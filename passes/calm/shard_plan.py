"""A schedule as the IR text prints it (``ShardPlan``), and the check that a parsed plan is the one the
analysis derives for its program.

The text form is one block per axis after the entry::

    shard sequence 2 {
      input_ids : Shard(1)
      @41 aten.scaled_dot_product_attention.default : all_gather[1, 2] -> Shard(2)  # h.0.attn: ...
      @57 aten.sum.dim_IntList : all_reduce(sum) -> Replicate()
      @63 aten.cumsum.default : all_gather[0] -> Replicate() => Shard(1)
      -> logits : Shard(1)
    }

Each entry input's placement starts the first region; each barrier (``@SITE OP``) names its collective
(``all_gather[slots]``: the operand slots gathered first; ``all_reduce(EXECUTOR)``), the placement its
local run makes and, after ``=>``, the one the region after it reads when they differ (a
sharded result gathered, a replicated one sliced); ``-> OUTPUT : P`` is where a user output is made
(returned whole: gathered when sharded). Coordination-free steps are not printed: their placements
follow from these by the same rules. A plan is a claim about its program: ``check_parsed`` (run by
``bwskc.parse``, the CLI and the trainer on every IR text they read) derives the schedule again and
refuses text whose plan differs, at the first line that does. The axis's name is a label: the inputs'
placements define the axis (as ``--axes AXIS=INPUT:DIM`` does), and everything after follows from them.

The data and the printed form are the IR layer's (``bwskc/placement.py``); this module is the analysis
side: deriving a plan from a schedule and checking one.
"""
from __future__ import annotations

from bwskc.errors import BwskError, VerifyError
from bwskc.passes.calm.schedule import Schedule, schedule
from bwskc.placement import Part, PlanStep, ShardPlan, as_placement, placement_text


def plan_of(sch: Schedule, program) -> ShardPlan:
    """The printed form of a schedule."""
    from bwskc.sites import sites
    ops = {s.id: s.prim.op for s in sites(program)}
    steps = []
    for sid, lst in sorted(sch.steps.items()):
        for st in lst:
            if st.collective is None:
                continue
            steps.append(PlanStep(sid, ops[sid], st.gather, st.reducer,
                                  as_placement(st.local.out), as_placement(st.plan.out), st.note))
    return ShardPlan(sch.axis, sch.nproc, dict(sch.inputs), steps, dict(sch.outputs),
                     sch.bytes_by_site())


def derive_plan(program, axis: str, nproc: int, inputs: dict[str, Part | None]) -> ShardPlan:
    """The plan the analysis derives for ``program`` along ``axis`` with the inputs placed as given."""
    for name, part in inputs.items():
        if part is not None and (part.outer, part.inner) != (1, 1):
            raise BwskError(f"shard {axis}: input {name} is split along a whole dim, not a factor of one")
    dims = {axis: [(n, p.dim) for n, p in inputs.items() if p is not None]}
    if not dims[axis]:
        raise BwskError(f"shard {axis}: no input is split along the axis")
    sch = schedule(program, axis, nproc, dims)
    if sch.problems:
        raise BwskError(f"shard {axis}: {sch.problems[0]}")
    return plan_of(sch, program)


def check_plan(program, plan: ShardPlan) -> tuple[tuple[int, int] | None, str] | None:
    """None if ``plan`` is the one derived for ``program``; else (position, what differs)."""
    if list(plan.inputs) != list(program.entry.input_names):
        missing = [n for n in program.entry.input_names if n not in plan.inputs]
        extra = [n for n in plan.inputs if n not in program.entry.input_names]
        what = (f"input {extra[0]!r} is not an entry input" if extra else
                f"input {missing[0]!r} has no placement" if missing else
                "inputs are not in the entry's order")
        return plan.pos.get(("input", extra[0]) if extra else "header"), f"shard {plan.axis}: {what}"
    types = dict(zip(program.entry.input_names, program.entry.inputs))
    for name, part in plan.inputs.items():  # each input's own placement, refused at its line
        shape = getattr(types[name], "shape", None)
        where = plan.pos.get(("input", name), plan.pos.get("header"))
        if part is None:
            continue
        if shape is None or part.dim >= len(shape):
            return where, (f"shard {plan.axis}: input {name} {types[name]} has no dim {part.dim}")
        if (part.outer, part.inner) != (1, 1):
            return where, (f"shard {plan.axis}: input {name} is split along a whole dim, not a factor "
                           "of one")
        if shape[part.dim] % plan.nproc:  # at the header: its process count is what does not divide
            return plan.pos.get("header"), (f"shard {plan.axis}: input {name} {types[name]}: dim {part.dim} of size "
                           f"{shape[part.dim]} does not split evenly over {plan.nproc} processes")
    try:
        want = derive_plan(program, plan.axis, plan.nproc, plan.inputs)
    except BwskError as exc:
        return plan.pos.get("header"), str(exc)
    for k, (got, der) in enumerate(zip(plan.steps, want.steps)):
        if got != der:
            return plan.pos.get(("step", k)), (
                f"shard {plan.axis}: the plan says {_step_text(got)}, the analysis derives "
                f"{_step_text(der)}")
    if len(plan.steps) != len(want.steps):
        k = min(len(plan.steps), len(want.steps))
        if len(plan.steps) > k:
            return plan.pos.get(("step", k)), (f"shard {plan.axis}: {_step_text(plan.steps[k])} is not "
                                               "a barrier step the analysis derives")
        return plan.pos.get("end"), f"shard {plan.axis}: the plan lacks {_step_text(want.steps[k])}"
    if plan.outputs != want.outputs:
        extra = [n for n in plan.outputs if n not in want.outputs]
        if extra:
            return plan.pos.get(("output", extra[0])), f"shard {plan.axis}: {extra[0]!r} is not an output"
        for name, part in want.outputs.items():
            if plan.outputs.get(name, "missing") != part:
                return plan.pos.get(("output", name), plan.pos.get("end")), (
                    f"shard {plan.axis}: output {name} is made as {placement_text(part)}, not "
                    f"{placement_text(plan.outputs[name]) if name in plan.outputs else 'unplaced'}")
    return None


def check_parsed(program, filename: str = "<string>") -> None:
    """Every plan parsed with ``program`` is the one the analysis derives (its payloads filled in), or
    a VerifyError ``FILE:LINE:COL: shard AXIS: ...`` at the first line that differs."""
    for plan in (program.analyses.get("shard") or {}).values():
        bad = check_plan(program, plan)
        if bad is not None:
            pos, message = bad
            where = f"{filename}:{pos[0]}:{pos[1]}" if pos else filename
            raise VerifyError(f"{where}: {message}")
        payloads_of(program, plan)


def parse_checked(text: str, filename: str = "<string>"):
    """``bwskc.text.parse_program`` (syntax and IR verified), then the plans' claims checked."""
    from bwskc.text import parse_program
    program = parse_program(text, filename)
    check_parsed(program, filename)
    return program


def _step_text(st: PlanStep) -> str:
    coll = f"all_reduce({st.reducer})" if st.reducer else f"all_gather{list(st.gather)}"
    tail = "" if st.want == st.made else f" => {placement_text(st.want)}"
    return f"@{st.site} {st.op} : {coll} -> {placement_text(st.made)}{tail}"


def payloads_of(program, plan: ShardPlan) -> None:
    """Fill ``plan.payloads`` (bytes of each forward collective) from the derived schedule."""
    plan.payloads = derive_plan(program, plan.axis, plan.nproc, plan.inputs).payloads


def parse_shard_spec(spec: str) -> tuple[str, int]:
    """``AXIS=N`` (the CLI's ``--shard``) as (axis, N)."""
    axis, eq, n = spec.partition("=")
    n = n.strip()
    if not eq or not axis.strip() or not (n.isascii() and n.isdigit()) or int(n) < 1:
        raise BwskError(f"--shard {spec!r}: give AXIS=N, a CALM axis and a process count >= 1, "
                        "e.g. sequence=2")
    return axis.strip(), int(n)


def plans_for(program, specs: list[tuple[str, int]], axes=None, kept: dict | None = None) -> dict:
    """``{axis: ShardPlan}`` for ``program``: one per ``(axis, N)`` of ``specs`` (the axis as the CALM
    analysis defines it, or as ``axes`` does), and the ``kept`` plans (parsed with the program, before
    passes rewrote it) derived again on the program as it is now, with the same input placements."""
    out = {}
    for axis, plan in (kept or {}).items():
        out[axis] = derive_plan(program, axis, plan.nproc, plan.inputs)
    for axis, n in specs:
        sch = schedule(program, axis, n, axes)
        if sch.problems:
            raise BwskError(f"--shard {axis}={n}: {sch.problems[0]}")
        out[axis] = plan_of(sch, program)
    return out
