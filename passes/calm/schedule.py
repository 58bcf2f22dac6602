"""From the analysis to a run on N processes: how each leaf application executes on shards (``Step``),
and the program's ``Schedule`` (the steps of every site, the inputs' placements, the communication).

A coordination-free application runs its CALM plan on each shard alone. A barrier becomes one of:
* an **all-reduce executor** (``REDUCERS``: sums and means, softmax over the partitioned dim, training
  batch norm): each shard computes its partial statistics, one all-reduce combines them;
* an **all-gather**: the smallest set of operands whose gathering makes the leaf coordination-free is
  gathered (attention gathers its keys and values; its queries stay sharded), then the free plan runs.
  Where the analysis says ``unknown`` (no rule, GRAY), every partitioned operand is gathered, the leaf
  runs whole, and the step says so.
Either way the result is then put where the analysis placed it (``Plan.out``): a replicated result the
region after it reads sharded is sliced (no communication), a sharded one it reads whole is gathered.

Placements use DTensor's vocabulary: ``Shard(d)`` (``Shard(d)[o x . x i]`` when the axis is the middle
factor of a merged dim), ``Replicate()``; gradients of replicated values are ``Partial()`` (each process
holds its share, their sum is the gradient). The communication of a step is its forward collectives'
payloads (bytes of the tensor each collective produces); backward runs each one's transpose (a gather's
is a reduce-scatter, an all-reduce's an all-reduce) with the same payload, and the parameters' gradients
are all-reduced once per step.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from bwskc.passes.calm.context import AVal, Ctx
from bwskc.passes.calm.engine import Analysis, plan_of
from bwskc.passes.calm.plan import Part, Plan

from bwskc.errors import BwskError
from bwskc.ir import Program, TensorType, TupleType
from bwskc.sites import sites

MAX_GATHER_SEARCH = 6  # partitioned operands beyond this: gather them all (2^6 subsets at most)


# ------------------------------------------------------------------------------------- all-reduces


@dataclass(frozen=True)
class Reducer:
    """An all-reduce executor for one family of ops: ``applies(ctx, plan)``, the all-reduce payloads
    in bytes (``payload(ctx)``), and ``run`` (in ``bwskc.sharding.reducers``)."""

    name: str
    applies: object
    payload: object


REDUCERS: dict[str, Reducer] = {}


def reducer(*names: str, applies, payload):
    r = Reducer(names[0], applies, payload)
    for n in names:
        REDUCERS[n] = r
    return r


def _itemsize(t: TensorType) -> int:
    return t.torch_dtype.itemsize


def _only_operand0_parted(ctx: Ctx) -> bool:
    return ctx.parted() == [0] and isinstance(ctx.slots[0].type, TensorType)


def _float(ctx: Ctx) -> bool:
    return ctx.slots[0].type.torch_dtype.is_floating_point


reducer("sum", "mean",
        applies=lambda ctx, plan: _only_operand0_parted(ctx) and _float(ctx) and (
            ctx.op.endswith((".dim_IntList", ".dim", ".default"))) and ctx.val("dtype") is None,
        payload=lambda ctx: [ctx.out_type.numel * _itemsize(ctx.out_type)])


def _softmax_payload(ctx: Ctx):
    t = ctx.slots[0].type
    return [2 * t.numel // t.shape[ctx.part(0).dim] * _itemsize(t)]  # the max, then the sum


reducer("softmax", "_softmax", "log_softmax", "_log_softmax",
        applies=lambda ctx, plan: _only_operand0_parted(ctx) and _float(ctx) and ctx.part(0).outer == 1
        and ctx.part(0).inner == 1 and not ctx.val("half_to_float", False)
        and ctx.val("dtype") is None,
        payload=_softmax_payload)


def _bn_applies(ctx: Ctx, plan: Plan) -> bool:
    x = ctx.si("input")
    p = ctx.part(x)
    return (ctx.op == "aten._native_batch_norm_legit_functional.default" and ctx.parted() == [x]
            and p is not None and p.dim != 1 and p.outer == 1 and p.inner == 1
            and bool(ctx.val("training", False)))


def _bn_payload(ctx: Ctx):
    t = ctx.slots[ctx.si("input")].type
    return [t.shape[1] * _itemsize(t), t.shape[1] * _itemsize(t)]  # the sums, then the squared deviations


reducer("_native_batch_norm_legit_functional", applies=_bn_applies, payload=_bn_payload)


# -------------------------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class Step:
    """How one application runs on shards. ``plan``: the analysis' plan (``plan.out`` is where the
    region after it reads the result); ``local``: the free plan each shard runs (the plan itself for an
    all-reduce executor); ``gather``: operand slots all-gathered first; ``reducer``: the all-reduce
    executor's name; ``note``: why a step gathers everything (no rule, GRAY)."""

    plan: Plan
    local: Plan
    gather: tuple[int, ...] = ()
    reducer: str | None = None
    note: str | None = None

    @property
    def collective(self) -> str | None:
        if self.reducer is not None:
            return "all-reduce"
        if self.gather or self.regathers():
            return "all-gather"
        return None

    def regathers(self) -> tuple[int, ...]:
        """Result items (0 for a single result) the local run leaves sharded but ``plan.out`` wants
        whole: gathered after the run."""
        made, want = _items(self.local.out), _items(self.plan.out)
        return tuple(k for k, (m, w) in enumerate(zip(made, want)) if m is not None and m != w)


def _items(out) -> tuple:
    return tuple(out) if isinstance(out, tuple) else (out,)


def _replicated(v: AVal) -> AVal:
    return AVal(v.type, tuple(None for _ in v.parts), v.src, v.items, v.const)


def _bytes(v: AVal) -> int:
    return v.type.numel * _itemsize(v.type) if isinstance(v.type, TensorType) else 0


def derive_step(ctx: Ctx, plan: Plan) -> Step:
    """The step of one application (``ctx``, along its axis) whose CALM plan is ``plan``."""
    if plan.free:
        return Step(plan, plan)
    r = REDUCERS.get(ctx.short)
    if r is not None and plan.collective == "all-reduce" and r.applies(ctx, plan):
        return Step(plan, plan, reducer=r.name)
    parted = ctx.parted()
    note = None
    if plan.collective == "unknown":
        note = f"{plan.reason}: gathers every partitioned operand and runs whole"
        subsets = [tuple(parted)]
    elif len(parted) > MAX_GATHER_SEARCH:
        subsets = [tuple(parted)]
    else:
        subsets = [s for k in range(1, len(parted) + 1) for s in itertools.combinations(parted, k)]
        subsets.sort(key=lambda s: (sum(_bytes(ctx.slots[i]) for i in s), len(s)))
    for subset in subsets:
        slots = [(_replicated(v) if i in subset else v) for i, v in enumerate(ctx.slots)]
        local = plan_of(Ctx(ctx.an, ctx.prim, ctx.args, ctx.kwargs, slots, _locs(ctx), ctx.a))
        if local.free:
            return Step(plan, local, gather=subset, note=note)
    raise AssertionError(f"{ctx.op}: gathering every operand left a barrier")  # all replicated is free


def _locs(ctx: Ctx) -> list:
    locs = [None] * len(ctx.slot_at)
    for loc, i in ctx.slot_at.items():
        locs[i] = loc
    return locs


def step_payloads(ctx: Ctx, step: Step) -> list[tuple[str, int]]:
    """The forward collectives of a step: ``(collective, payload bytes)`` each, in the order they run."""
    out = []
    if step.reducer is not None:
        out += [("all-reduce", b) for b in REDUCERS[ctx.short].payload(ctx)]
    out += [("all-gather", _bytes(ctx.slots[i])) for i in step.gather]
    items = ctx.out_type.items if isinstance(ctx.out_type, TupleType) else (ctx.out_type,)
    for k in step.regathers():
        t = items[k]
        out.append(("all-gather", t.numel * _itemsize(t)))
    return out


def local_size(part: Part, shape, n: int) -> int:
    return part.factor(shape) // n


# ---------------------------------------------------------------------------------------- schedule


@dataclass
class Schedule:
    """The steps of a program along one axis over ``nproc`` processes.

    ``inputs``: entry input name -> its Part (None: every process reads it whole); ``steps``: site id ->
    the distinct steps of its applications (a definition applied several times may see several);
    ``comm``: one entry per forward collective of one forward run, ``(site id, collective, bytes)``
    (site None: an output gathered to be returned whole);
    ``problems``: why the program cannot run on this many processes (a dim that does not split evenly).
    """

    axis: str
    nproc: int
    inputs: dict[str, Part | None]
    steps: dict[int, list[Step]] = field(default_factory=dict)
    comm: list[tuple[int, str, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    outputs: dict[str, Part | None] = field(default_factory=dict)  # user output -> where it is made

    def barrier_sites(self) -> list[int]:
        return [s for s, steps in sorted(self.steps.items()) if any(st.collective for st in steps)]

    def bytes_by_site(self) -> dict[int, list[tuple[str, int]]]:
        out: dict[int, list[tuple[str, int]]] = {}
        for s, c, b in self.comm:
            out.setdefault(s, []).append((c, b))
        return out

    def forward_bytes(self) -> int:
        return sum(b for _, _, b in self.comm)


class Scheduler(Analysis):
    """The CALM analysis along one axis, deriving each application's step as it goes."""

    def __init__(self, program: Program, axis: str, dims: list[tuple[str, int]], nproc: int):
        super().__init__(program, {axis: dims})
        self.schedule = Schedule(axis, nproc, {
            n: (Part(d[0]) if (d := [k for m, k in dims if m == n]) else None)
            for n in program.entry.input_names})

    def on_plan(self, sids: list[int], ctx: Ctx, plan: Plan) -> None:
        if not sids:
            return
        step = derive_step(ctx, plan)
        sch = self.schedule
        lst = sch.steps.setdefault(sids[0], [])
        if step not in lst:
            lst.append(step)
            self._check_split(sids[0], ctx, step)
        for c, b in step_payloads(ctx, step):
            sch.comm.append((sids[0], c, b))

    def run(self):
        out = super().run()
        names = self.program.entry.output_names
        if isinstance(out, tuple):
            pairs = list(zip(names, out))
        elif len(names) > 1 and isinstance(out, AVal) and out.items is not None:
            pairs = list(zip(names, out.items))
        else:
            pairs = [(names[0], out)]
        for name, v in pairs:
            made = v.parts[0] if isinstance(v, AVal) else None
            if not name.startswith("update:"):  # a buffer update is a buffer's new value, not an output
                self.schedule.outputs[name] = made
            if made is not None:  # returned whole (an update too): one gather each
                self.schedule.comm.append((None, "all-gather", _bytes(v)))
        return out

    def _check_split(self, sid: int, ctx: Ctx, step: Step) -> None:
        n = self.schedule.nproc
        shapes = [ctx.shape(i) for i in range(len(ctx.slots))]
        out_items = ctx.out_type.items if isinstance(ctx.out_type, TupleType) else (ctx.out_type,)
        pairs = list(zip(step.local.ins, shapes)) + list(zip(_items(step.local.out),
                                                             (getattr(t, "shape", ()) for t in out_items)))
        pairs += list(zip(_items(step.plan.out), (getattr(t, "shape", ()) for t in out_items)))
        for part, shape in pairs:
            if isinstance(part, Part) and part.factor(shape) % n:
                self.schedule.problems.append(
                    f"site {sid} ({ctx.op} in {self.sites[sid].scope}): dim {part.dim} of {list(shape)} "
                    f"holds {part.factor(shape)} positions along {self.schedule.axis}, which do not "
                    f"split evenly over {n} processes")


def schedule(program: Program, axis: str, nproc: int, axes: str | dict | None = None) -> Schedule:
    """The schedule of ``program`` along ``axis`` (a default axis, or one ``axes`` defines as in
    ``--axes``) over ``nproc`` processes."""
    from bwskc.passes.calm.axes import parse_axes
    if nproc < 1:
        raise BwskError(f"shard: {nproc} processes; give at least 1")
    parsed = parse_axes(axes, program) if axes is None or isinstance(axes, str) else axes
    if axis not in parsed:
        have = ", ".join(parsed) or "none"
        raise BwskError(f"shard: {program.name} has no {axis!r} axis (its axes: {have}; define one "
                        "with --axes AXIS=INPUT:DIM)")
    sch = Scheduler(program, axis, [(n, int(d)) for n, d in parsed[axis]], nproc)
    for name, part in sch.schedule.inputs.items():
        t = dict(zip(program.entry.input_names, program.entry.inputs))[name]
        if part is not None and t.shape[part.dim] % nproc:
            sch.schedule.problems.insert(0, f"input {name} {t}: dim {part.dim} of size "
                                         f"{t.shape[part.dim]} does not split evenly over {nproc} "
                                         "processes")
    sch.run()
    return sch.schedule


def site_of(program: Program, sid: int):
    return sites(program)[sid]


def placement(part: Part | None) -> str:
    """A Part in DTensor's vocabulary."""
    if part is None:
        return "Replicate()"
    extra = "" if part.outer == part.inner == 1 else f"[{part.outer}x.x{part.inner}]"
    return f"Shard({part.dim}){extra}"


def comm_volume(payload: int, collective: str, n: int) -> float:
    """Bytes one process receives for a collective producing ``payload`` bytes (ring algorithms): an
    all-gather (n-1)/n of it, an all-reduce 2(n-1)/n."""
    f = (n - 1) / n
    return payload * (2 * f if collective == "all-reduce" else f)
