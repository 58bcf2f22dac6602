"""What a rule sees: abstract values (``AVal``), the operand slots of a leaf, op schemas, and ``Ctx``,
one application of a leaf along one axis (arguments by schema name, operand partitions, plan makers)."""
from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

import torch
from bwskc.passes.calm.plan import Part, Plan

from bwskc.ir import HOLE, ConstRef, Prim, TensorRef, TensorType, TupleType, iter_args

if TYPE_CHECKING:
    from bwskc.passes.calm.engine import Analysis


# ---------------------------------------------------------------------------------- abstract values


class AVal:
    """An abstract value: its type, per axis where the axis sits (``Part`` or None), the site that
    produced it, tuple items, and the constant index when it is a constant's value."""

    __slots__ = ("const", "items", "parts", "src", "type")

    def __init__(self, type, parts, src=None, items=None, const=None):
        self.type, self.parts, self.src, self.items, self.const = type, parts, src, items, const

    @property
    def shape(self):
        return self.type.shape if isinstance(self.type, TensorType) else ()

    def __repr__(self):
        return f"AVal({self.type}, {self.parts}, src={self.src})"


def walk_slots(args, kwargs):
    """(location, value) of every abstract value in filled arguments: args then kwargs, lists inline."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, AVal):
            out.append((("a", i), a))
        elif isinstance(a, (list, tuple)):
            for j, b in enumerate(a):
                if isinstance(b, AVal):
                    out.append((("a", i, j), b))
    for k, a in kwargs.items():
        if isinstance(a, AVal):
            out.append((("k", k), a))
        elif isinstance(a, (list, tuple)):
            for j, b in enumerate(a):
                if isinstance(b, AVal):
                    out.append((("k", k, j), b))
    return out


def slot_positions(prim: Prim) -> list:
    """The operand slots of a leaf in order (what ``Plan.ins`` is indexed by): ``("hole", k)`` for its
    k-th hole, ``("tensor", name)``, ``("const", index)``."""
    out, k = [], 0
    for a in iter_args(prim.args + tuple(v for _, v in prim.kwargs)):
        if a is HOLE:
            out.append(("hole", k))
            k += 1
        elif isinstance(a, TensorRef):
            out.append(("tensor", a.name))
        elif isinstance(a, ConstRef):
            out.append(("const", a.index))
    return out


# --------------------------------------------------------------------------------------- op schemas


@cache
def overload(op: str):
    from bwskc.ops import UnknownOp, lookup_overload  # the one safe resolver (names may be untrusted)
    try:
        return lookup_overload(op)
    except UnknownOp:
        return None


@cache
def schema_names(op: str) -> tuple:
    ov = overload(op)
    if ov is None:
        return ()
    return tuple((a.name, a.default_value if a.has_default_value() else None)
                 for a in ov._schema.arguments)


@cache
def pointwise(op: str) -> bool:
    """ATen's own tag for elementwise ops with broadcasting."""
    ov = overload(op)
    return ov is not None and torch.Tag.pointwise in ov.tags


# ---------------------------------------------------------------------------------- one application


class Ctx:
    """One application of a leaf, seen along one axis."""

    def __init__(self, an: Analysis, prim: Prim, args, kwargs, slots, locs, a: int):
        self.an, self.prim, self.op = an, prim, prim.op
        self.args, self.kwargs, self.slots, self.a = args, kwargs, slots, a
        self.axis = an.axis_names[a]
        self.slot_at = {loc: i for i, loc in enumerate(locs)}
        self.out_type = prim.type
        self.short = prim.op.split(".")[1] if prim.op.count(".") == 2 else prim.op
        names = schema_names(prim.op)
        self.names = {}
        for i in range(len(args)):
            if i < len(names):
                self.names[names[i][0]] = ("a", i)
        for k in kwargs:
            self.names[k] = ("k", k)
        self.defaults = dict(names)

    # arguments by schema name
    def val(self, name, default=None):
        loc = self.names.get(name)
        if loc is None:
            d = self.defaults.get(name, default)
            return default if d is None else d
        return self.args[loc[1]] if loc[0] == "a" else self.kwargs[loc[1]]

    def si(self, name):
        """Slot index of a tensor argument (None when absent or None)."""
        loc = self.names.get(name)
        return None if loc is None else self.slot_at.get(loc)

    def sis(self, name) -> list:
        loc = self.names.get(name)
        if loc is None:
            return []
        v = self.val(name)
        return [self.slot_at.get(loc + (j,)) for j in range(len(v))] if isinstance(v, (list, tuple)) \
            else []

    def part(self, i) -> Part | None:
        if i is None:
            return None
        s = self.slots[i]
        return s.parts[self.a] if isinstance(s.type, TensorType) else None

    def shape(self, i):
        return self.slots[i].shape

    def parted(self) -> list[int]:
        return [i for i in range(len(self.slots)) if self.part(i) is not None]

    def own_ins(self):
        return tuple(self.part(i) for i in range(len(self.slots)))

    def out_shapes(self):
        t = self.out_type
        if isinstance(t, TupleType):
            return [i.shape if isinstance(i, TensorType) else None for i in t.items]
        return t.shape if isinstance(t, TensorType) else None

    def barrier(self, collective, reason, out=None, ins=None):
        if out is None and isinstance(self.out_type, TupleType):
            out = tuple(None for _ in self.out_type.items)
        return Plan(self.own_ins() if ins is None else ins, out, collective, reason)

    def free(self, out, ins=None, **kw):
        return Plan(self.own_ins() if ins is None else ins, out, None, None, **kw)


def norm_dim(d, rank):
    r = max(rank, 1)
    return d % r if -r <= d < r else d


def norm_dims(dims, rank):
    if dims is None:
        return list(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    dims = list(dims)
    if not dims:
        return list(range(rank))
    return sorted({norm_dim(d, rank) for d in dims})
