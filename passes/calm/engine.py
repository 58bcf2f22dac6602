"""The propagation engine: one abstract run of the program (the interpreter's denotation on ``AVal``s),
a rule looked up and applied per leaf application and axis, then verdicts, regions and FLOP shares."""
from __future__ import annotations

from typing import Any

import torch
from bwskc.passes.calm.axes import default_axes, parse_axes
from bwskc.passes.calm.context import AVal, Ctx, walk_slots
from bwskc.passes.calm.flops import estimate_flops, site_slot_types
from bwskc.passes.calm.plan import CalmResult, Part, Plan
from bwskc.passes.calm.table import FALLBACKS, OVERLOADS, RULES, Rule

from bwskc._deep import run_deep
from bwskc.ir import Prim, Program, ScalarType, TensorRef, TensorType, TupleType
from bwskc.op_values import resolve_op
from bwskc.runtime.denote import Denoter
from bwskc.sites import sites

MAX_PLANS = 4  # distinct plans kept per site and axis (a definition applied many times)
CONST_EVAL_LIMIT = 1 << 20  # elements: constants larger than this are not evaluated for index rules


# -------------------------------------------------------------------------------------- rule lookup


def find_rule(ctx: Ctx) -> Rule | None:
    """The rule for an op: the fallbacks registered ``before_table`` (ATen's pointwise tag), then
    ``RULES`` by name (``OVERLOADS`` restricts some names to one overload), then the other fallbacks
    (name prefixes), each list in registration order. None: no rule."""
    for fb in FALLBACKS:
        if fb.before_table and fb.applies(ctx):
            return fb.rule
    fn = RULES.get(ctx.short)
    want = OVERLOADS.get(ctx.short)
    if fn is not None and (want is None or ctx.op.endswith("." + want)):
        return fn
    for fb in FALLBACKS:
        if not fb.before_table and fb.applies(ctx):
            return fb.rule
    return None


def plan_of(ctx: Ctx) -> Plan:
    """The plan of one application along one axis."""
    if not ctx.parted():
        # every operand replicated: every worker computes the same value
        out = None if not isinstance(ctx.out_type, TupleType) else tuple(None for _ in
                                                                          ctx.out_type.items)
        return Plan(tuple(None for _ in ctx.slots), out)
    try:
        fn = find_rule(ctx)
        if fn is None:
            return ctx.barrier("unknown", f"no rule for {ctx.op}")
        return fn(ctx)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        return ctx.barrier("unknown", f"{ctx.short}: no rule for these arguments "
                           f"({type(exc).__name__})")


# ------------------------------------------------------------------------------------- the analysis


class _Backend:
    def __init__(self, an: Analysis):
        self.an = an
        self.tensors: dict[str, AVal] = {}

    def tensor(self, name):
        v = self.tensors.get(name)
        if v is None:
            v = self.tensors[name] = AVal(self.an.program.tensors[name].type, self.an.none_parts)
        return v

    def prim(self, prim, args, kwargs):
        return self.an.apply(prim, args, kwargs)


class Analysis:
    def __init__(self, program: Program, axes: dict[str, list[tuple[str, int]]]):
        self.program = program
        self.axes = axes
        self.axis_names = list(axes)
        self.none_parts = tuple(None for _ in self.axis_names)
        self.sites = sites(program)
        self.by_prim: dict[int, list[int]] = {}
        for s in self.sites:
            self.by_prim.setdefault(id(s.prim), []).append(s.id)
        n = len(self.sites)
        self.verdict: list[list] = [[None] * len(self.axis_names) for _ in range(n)]  # (coll, why)
        self.plans: list[list[list[Plan]]] = [[[] for _ in self.axis_names] for _ in range(n)]
        self.parted_in: list[list[bool]] = [[False] * len(self.axis_names) for _ in range(n)]
        self.apps = [0] * n
        self.edges: list[tuple[int, int]] = []
        self._const_values: dict[int, Any] = {}

    # constants' values, for the index rule (only those computable from literals and known weights)
    def const_value(self, index: int):
        if index in self._const_values:
            return self._const_values[index]
        self._const_values[index] = None
        c = self.program.consts[index]
        if not isinstance(c.type, TensorType) or c.type.numel > CONST_EVAL_LIMIT:
            return None
        for name in c.tensor_refs():
            if name not in self.program.weights:
                return None
        deps = {}
        for j in c.const_refs():
            deps[j] = self.const_value(j)
            if deps[j] is None:
                return None

        def bound(ref):
            return self.program.weights[ref.name] if isinstance(ref, TensorRef) else deps[ref.index]
        from bwskc.op_values import fill
        try:
            args = fill(c.args, [], bound)
            kwargs = dict(zip((k for k, _ in c.kwargs), fill(tuple(v for _, v in c.kwargs), [],
                                                             bound)))
            with torch.no_grad():
                value = resolve_op(c.op)(*args, **kwargs)
        except Exception:  # noqa: BLE001 - a constant we cannot evaluate is simply unknown
            return None
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            self._const_values[index] = value
        return self._const_values[index]

    def _make(self, typ, parts_per_axis, src, const=None):
        """The abstract result: ``parts_per_axis`` holds, per axis, a Part/None or a tuple of them."""
        if isinstance(typ, TupleType):
            items = []
            for k, t in enumerate(typ.items):
                ps = tuple(p[k] if isinstance(p, tuple) and k < len(p) else None
                           for p in parts_per_axis)
                items.append(AVal(t, ps, src, None, None))
            return AVal(typ, self.none_parts, src, tuple(items), const)
        ps = tuple(p if isinstance(p, Part) else None for p in parts_per_axis)
        return AVal(typ, ps, src, None, const)

    def apply(self, prim: Prim, args, kwargs):
        sids = self.by_prim.get(id(prim), [])
        site = self.sites[sids[0]] if sids else None
        src = sids[0] if sids else None
        for s in sids:
            self.apps[s] += 1
        locs_vals = walk_slots(args, kwargs)
        for _, v in locs_vals:
            if v.src is not None:
                for s in sids:
                    self.edges.append((v.src, s))
        if site is not None and site.is_const:  # computed from parameters only: replicated
            return self._make(prim.type, self.none_parts, src, const=int(site.scope[1:]))
        if prim.op == "getitem":
            tup, i = args[0], args[1]
            if isinstance(tup, AVal) and tup.items is not None:
                it = tup.items[i]
                return AVal(it.type, it.parts, src, it.items, None)
            return AVal(prim.type, self.none_parts, src)
        if prim.op == "tuple":
            items = tuple(a if isinstance(a, AVal) else AVal(ScalarType("int"), self.none_parts)
                          for a in args)
            return AVal(prim.type, self.none_parts, src, items)
        locs = [loc for loc, _ in locs_vals]
        slots = [v for _, v in locs_vals]
        outs = []
        for a in range(len(self.axis_names)):
            ctx = Ctx(self, prim, args, kwargs, slots, locs, a)
            plan = plan_of(ctx)
            self.on_plan(sids, ctx, plan)
            outs.append(plan.out)
            parted = bool(ctx.parted())
            for s in sids:
                if parted:
                    self.parted_in[s][a] = True
                if plan.collective is not None and self.verdict[s][a] is None:
                    self.verdict[s][a] = (plan.collective, plan.reason)
                lst = self.plans[s][a]
                if plan not in lst and len(lst) < MAX_PLANS:
                    lst.append(plan)
        return self._make(prim.type, outs, src)

    def on_plan(self, sids: list[int], ctx: Ctx, plan: Plan) -> None:
        """Called with every application's plan (a subclass derives its run from it: ``Scheduler``)."""

    def run(self):
        e = self.program.entry
        inputs = []
        for name, t in zip(e.input_names, e.inputs):
            parts = []
            for axis in self.axis_names:
                dims = [d for n, d in self.axes[axis] if n == name]
                parts.append(Part(dims[0]) if dims else None)
            inputs.append(AVal(t, tuple(parts)))
        denoter = Denoter(self.program, _Backend(self))
        return run_deep(denoter.run_entry, inputs)

    def result(self) -> CalmResult:
        names = self.axis_names
        coordination, reasons, plans = {}, {}, {}
        barriers = {a: {} for a in names}
        flops = {}
        for s in self.sites:
            coordination[s.id] = {}
            plans[s.id] = {}
            for k, a in enumerate(names):
                v = self.verdict[s.id][k]
                coordination[s.id][a] = None if v is None else v[0]
                if v is not None:
                    reasons.setdefault(s.id, {})[a] = v[1]
                    barriers[a][v[0]] = barriers[a].get(v[0], 0) + 1
                plans[s.id][a] = list(self.plans[s.id][k])
            flops[s.id] = 0 if s.is_const else int(
                estimate_flops(s.prim, site_slot_types(self.program, s), s.prim.type))
        # applications: an object shared by several sites counts once overall
        apps = {}
        for ids in self.by_prim.values():
            for i in ids:
                apps[i] = self.apps[i] / len(ids) if len(ids) > 1 else self.apps[i]
        total = sum(flops[i] * apps[i] for i in flops)
        free_frac, part_frac = {}, {}
        for k, a in enumerate(names):
            free = sum(flops[i] * apps[i] for i in flops if coordination[i][a] is None)
            parted = sum(flops[i] * apps[i] for i in flops
                         if coordination[i][a] is None and self.parted_in[i][k])
            free_frac[a] = free / total if total else 1.0
            part_frac[a] = parted / total if total else 0.0
        regions = {a: self._regions(k) for k, a in enumerate(names)}
        return CalmResult(axes={a: list(v) for a, v in self.axes.items()}, coordination=coordination,
                          regions=regions, barriers={a: dict(sorted(b.items()))
                                                     for a, b in barriers.items()},
                          flops=flops, free_flops_fraction=free_frac, reasons=reasons, plans=plans,
                          applications={i: round(v) for i, v in apps.items()},
                          partitioned_flops_fraction=part_frac)

    def _regions(self, k: int) -> list[list[int]]:
        n = len(self.sites)
        parent = list(range(n))

        def find(x):
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x
        free = [self.verdict[i][k] is None for i in range(n)]
        for u, v in self.edges:
            if free[u] and free[v]:
                ru, rv = find(u), find(v)
                if ru != rv:
                    parent[max(ru, rv)] = min(ru, rv)
        groups: dict[int, list[int]] = {}
        for i in range(n):
            if free[i]:
                groups.setdefault(find(i), []).append(i)
        return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def analyze(program: Program, axes: str | dict | None = None) -> CalmResult:
    """Run the analysis with ``axes`` (a ``--axes`` string, a parsed dict, or None for the defaults)."""
    notes = []
    if axes is None or isinstance(axes, str):
        parsed = parse_axes(axes, program)
        bare = {a.strip() for a in (axes or "").split(",") if "=" not in a}
        notes = [n for n in default_axes(program)[1]
                 if not (axes or "").strip() or n.split(":", 1)[0] in bare]
    else:
        parsed = {a: [(n, int(d)) for n, d in v] for a, v in axes.items()}
    an = Analysis(program, parsed)
    an.run()
    result = an.result()
    result.notes = notes
    return result
