"""Placements of values along a sharded axis, and a sharding plan as the IR text carries it: the data
and its printed form (the IR layer: no analysis here; ``passes/calm/shard_plan.py`` derives and checks
plans).

``Part(dim, outer, inner)`` is DTensor's ``Shard(dim)`` generalised to a factor of a dim (a dim read as
``[outer, P, inner]``, the shards splitting ``P``); ``None`` is ``Replicate()``; a tuple places each
item of a tuple value. A ``ShardPlan`` is one ``shard AXIS N { ... }`` block: the entry inputs'
placements, each barrier step and each user output's placement.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Part:
    """Where an axis sits in a tensor: ``dim`` read as ``[outer, P, inner]``, shards split ``P``."""

    dim: int
    outer: int = 1
    inner: int = 1

    def factor(self, shape) -> int:
        return shape[self.dim] // (self.outer * self.inner)

    def __str__(self) -> str:
        extra = "" if self.outer == self.inner == 1 else f"[{self.outer}x.x{self.inner}]"
        return f"dim {self.dim}{extra}"


Placement = Part | None | tuple


@dataclass(frozen=True)
class PlanStep:
    """One barrier step: the site, its op, the gathered operand slots, the all-reduce executor, where
    its local run puts the result (``made``) and where the region after it reads it (``want``)."""

    site: int
    op: str
    gather: tuple[int, ...] = ()
    reducer: str | None = None
    made: Placement = None
    want: Placement = None
    note: str | None = None


@dataclass
class ShardPlan:
    axis: str
    nproc: int
    inputs: dict[str, Part | None]
    steps: list[PlanStep]
    outputs: dict[str, Part | None]
    payloads: dict[int, list[tuple[str, int]]] = field(default_factory=dict, compare=False)
    # where each item was written (parsed text): key -> (line, column)
    pos: dict = field(default_factory=dict, compare=False, repr=False)


def as_placement(p) -> Placement:
    """A step's placement (a Part, None, or a list or tuple of them) in the plan's form (tuples)."""
    return tuple(p) if isinstance(p, (tuple, list)) else p


def placement_text(p: Placement) -> str:
    if isinstance(p, tuple):
        return "(" + ", ".join(placement_text(q) for q in p) + ("," if len(p) == 1 else "") + ")"
    if p is None:
        return "Replicate()"
    extra = "" if p.outer == p.inner == 1 else f", outer={p.outer}, inner={p.inner}"
    return f"Shard({p.dim}{extra})"


def plan_lines(plan: ShardPlan, name_text, scope_of=None) -> list[str]:
    """The block's lines; ``name_text`` quotes names as the IR printer does, ``scope_of(site)`` gives
    the comment's definition."""
    out = [f"shard {name_text(plan.axis)} {plan.nproc} {{"]
    for name, part in plan.inputs.items():
        out.append(f"  {name_text(name)} : {placement_text(part)}")
    for st in plan.steps:
        coll = (f"all_reduce({name_text(st.reducer)})" if st.reducer is not None else
                "all_gather[" + ", ".join(map(str, st.gather)) + "]")
        line = f"  @{st.site} {name_text(st.op)} : {coll} -> {placement_text(st.made)}"
        if st.want != st.made:
            line += f" => {placement_text(st.want)}"
        if st.note is not None:
            line += " " + _json(st.note)
        comm = plan.payloads.get(st.site)
        where = scope_of(st.site) if scope_of else None
        if comm or where:
            sizes = ", ".join(f"{c} {b} B" for c, b in comm or [])
            line += f"  # {where or ''}{': ' if where and sizes else ''}{sizes}"
        out.append(line)
    for name, part in plan.outputs.items():
        out.append(f"  -> {name_text(name)} : {placement_text(part)}")
    out.append("}")
    return out


def _json(s: str) -> str:
    return json.dumps(s)
