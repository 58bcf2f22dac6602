"""CALM coordination analysis: which leaves can run on shards of the input without talking to each other.

The inputs are partitioned along named **axes** (``batch``, ``sequence``, or the user's: ``--axes``). An
axis partitions some entry inputs along one dim each; the pass propagates it through the program by
abstract interpretation (``bwskc.runtime.denote.Denoter`` with an abstract backend) and decides, for
every leaf site and axis, whether the leaf is **coordination-free** along it:

    f(cat(a, b, d)) == cat(f(a), f(b), d')          (d' is where the axis sits in f's output)

or a **barrier** that needs a named collective (``all-reduce``, ``all-gather``, ``halo-exchange``,
``scan``, ``all-to-all``, ``broadcast``, ``position-offset``, ``unknown``). This is checked per op by
rules over shapes, not read off S/K typing: a sum erases information and needs an all-reduce, but so does
an injective linear map that contracts over the partitioned dim, and an erasing ReLU needs nothing.

**Where an axis sits.** A partition is a ``Part(dim, outer, inner)``: the dim, of size
``outer * P * inner``, is read as ``[outer, P, inner]`` (row-major) and the shards split the ``P`` factor
into contiguous pieces. A plain partition has ``outer = inner = 1``. The factors appear when a reshape
merges the partitioned dim with its neighbours: ``[B, T, D] -> [B*T, D]`` keeps a sequence partition as
``Part(0, outer=B)`` (every worker holds its tokens of every sequence), the linear on the rows stays
free, and the reshape back to ``[B, T, N]`` finds the partition on dim 1 again. A reshape keeps the
partition if the ``P`` factor lands inside one output dim; if it is split across several, that is an
all-to-all.

**Replicated values.** Parameters, constants and anything computed from them only are replicated: every
worker has the whole value. When a replicated operand meets a partitioned one along the partitioned dim
(a position-embedding table, a causal mask, a bias), each worker uses its slice: the plan says how to
cut it. Index constants that are an ``arange`` along the partitioned dim (T5's mask gathers) are
*rebased*: the worker uses its own positions.

**After a barrier** the value is what the collective gives: an all-reduce of partial sums is
replicated, while the statistics of a layer norm, the keys and values of an attention, the halo of a
same-size convolution or the carry of a scan leave the output partitioned like the input.
An op without a rule is a barrier ``unknown`` ("no rule"), never silently free; its output is taken as
gathered (replicated). An op whose operands are all replicated is free (every worker computes the same).

**Rules.** Most ops go through one engine: every dim of every operand and of the result carries a
letter (an einsum view of the op). A partitioned letter that reaches the result is free (replicated
operands that carry it are sliced); one that does not is contracted (all-reduce); operands partitioned
on different letters need a gather; some letters name their own collective. So: elementwise ops
(ATen's ``pointwise`` tag, broadcasting aligned from the right) are free; linear/matmul/mm/bmm/addmm/
einsum contracting the partitioned dim are all-reduce, partitioned rows or columns are free;
reductions (sum, mean, amax, max, argmax, var, norm...) over it are all-reduce; softmax/log_softmax and
layer/RMS/group norm over it are all-reduce with the result still partitioned; training batch norm over
the batch or positions is all-reduce (eval batch norm is free); cumsum/cumprod and LSTM/GRU/RNN along
it are scan; sort/topk along it all-gather; scaled_dot_product_attention is free along batch and head
dims and along the queries alone, all-gather over the key/value positions, all-reduce over the head
dim, position-offset for ``is_causal`` with split queries; conv/pool/interpolation windows along it
are halo-exchange (1x1 windows and integer nearest upsampling are free, adaptive pooling to 1 is
all-reduce); embedding, one_hot, gather, index_select and index keep the indices' partition and gather
(all-gather) a partitioned table; views/reshapes track the factor (all-to-all when it is split),
transpose/permute/unsqueeze/expand/repeat/repeat_interleave/stack move it, cat of equally partitioned
operands along it is free (the factor gains an outer ``n``), a cat, split, slice or unbind across
shards is all-gather, select of one position is broadcast, flip is all-to-all, roll and padding are
halo-exchange, tril/triu are position-offset.

**Plans.** For every application of a leaf the rule gives a ``Plan``: how each tensor operand is cut
for a shard (``ins``, one entry per operand slot: holes, bound tensors and constants in argument order),
where the axis sits in the output (``out``), and the collective for a barrier. ``shard``, ``unshard``
and ``local_literals`` run a plan (the tests check every free claim of the zoo with them, and that
barrier plans really fail).

**Results.** ``CalmResult`` (below): a verdict for every site and axis, the maximal dataflow-connected
free regions, barrier counts per collective, a FLOP estimate per site and the share of FLOPs in free
sites. Everything is linear in the size of the IR: one abstract evaluation, one rule application per
leaf application and axis, one union-find per axis.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import torch
from bwskc.passes.manager import Pass

from bwskc._deep import run_deep
from bwskc.errors import BwskError
from bwskc.ir import (
    HOLE,
    ConstRef,
    Prim,
    Program,
    ScalarType,
    TensorRef,
    TensorType,
    TupleType,
    iter_args,
)
from bwskc.runtime.denote import Denoter, resolve_op
from bwskc.sites import Site, sites

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "halo-exchange", "scan", "broadcast",
               "position-offset", "unknown")
DEFAULT_AXES = ("batch", "sequence")
MAX_PLANS = 4  # distinct plans kept per site and axis (a definition applied many times)
_CONST_EVAL_LIMIT = 1 << 20  # elements: constants larger than this are not evaluated for index rules


# ------------------------------------------------------------------------------------------- partitions


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


@dataclass(frozen=True)
class Plan:
    """What one application of a leaf does along one axis.

    ``ins``: per operand slot, how a worker cuts it (its own partition for a partitioned operand, a
    slice for a replicated one that meets the partitioned dim, None to use it whole). ``out``: where the
    axis sits in the result (a tuple for a tuple result; None: replicated). ``collective``: None when
    coordination-free. ``rebase``: slots holding global positions along the partitioned dim (a worker
    subtracts its offset). ``random``: the op draws random numbers (equal in distribution only).
    """

    ins: tuple
    out: Any
    collective: str | None = None
    reason: str | None = None
    rebase: tuple[int, ...] = ()
    random: bool = False

    @property
    def free(self) -> bool:
        return self.collective is None


# ------------------------------------------------------------------------------------------- results


@dataclass
class CalmResult:
    axes: dict[str, list[tuple[str, int]]]
    coordination: dict[int, dict[str, str | None]]
    regions: dict[str, list[list[int]]]
    barriers: dict[str, dict[str, int]]
    flops: dict[int, int]
    free_flops_fraction: dict[str, float]
    reasons: dict[int, dict[str, str]]
    # extras (not part of the emitter's contract)
    plans: dict[int, dict[str, list[Plan]]] = field(default_factory=dict, repr=False)
    applications: dict[int, int] = field(default_factory=dict, repr=False)
    partitioned_flops_fraction: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "axes": {a: [[n, d] for n, d in v] for a, v in self.axes.items()},
            "barriers": {a: dict(sorted(v.items())) for a, v in self.barriers.items()},
            "barrier_sites": {a: sum(v.values()) for a, v in self.barriers.items()},
            "free_flops_fraction": {a: round(v, 6) for a, v in self.free_flops_fraction.items()},
            "partitioned_flops_fraction": {a: round(v, 6)
                                           for a, v in self.partitioned_flops_fraction.items()},
            "regions": {a: {"count": len(r), "sizes": [len(x) for x in r]}
                        for a, r in self.regions.items()},
            "total_flops": int(sum(self.flops[i] * self.applications.get(i, 0) for i in self.flops)),
            "notes": list(self.notes),
        }


# ------------------------------------------------------------------------------------------- --axes

_AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def default_axes(program: Program) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """batch on dim 0 of every input; sequence on dim 1 of integer/bool [B, T] and float [B, T, D]
    inputs. Dims of size 1 cannot be split with static shapes and are left out (with a note)."""
    axes: dict[str, list[tuple[str, int]]] = {"batch": [], "sequence": []}
    notes = []
    e = program.entry
    for name, t in zip(e.input_names, e.inputs):
        if not isinstance(t, TensorType) or not t.shape:
            continue
        wanted = [("batch", 0)]
        is_int = t.dtype.startswith(("i", "u")) or t.dtype == "bool"
        if (is_int and len(t.shape) == 2) or (not is_int and len(t.shape) == 3):
            wanted.append(("sequence", 1))
        for axis, dim in wanted:
            if t.shape[dim] < 2:
                notes.append(f"{axis}: {name} dim {dim} has size {t.shape[dim]}; not partitioned "
                             "(lower with a larger example to analyse it)")
            else:
                axes[axis].append((name, dim))
    return {a: v for a, v in axes.items() if v}, notes


def parse_axes(spec: str | None, program: Program) -> dict[str, list[tuple[str, int]]]:
    """``--axes``: None/empty for the defaults, or a comma list of ``AXIS=INPUT:DIM`` items (an axis may
    name several inputs) and bare default axis names (``batch``, ``sequence``)."""
    defaults, _ = default_axes(program)
    if spec is None or not str(spec).strip():
        return defaults
    e = program.entry
    types = dict(zip(e.input_names, e.inputs))
    out: dict[str, list[tuple[str, int]]] = {}
    bare: set[str] = set()
    for raw in str(spec).split(","):
        item = raw.strip()
        if not item:
            raise BwskError(f"--axes {spec!r}: empty item (expected AXIS=INPUT:DIM or a default axis "
                            f"name, comma-separated)")
        if "=" not in item:
            if item not in DEFAULT_AXES:
                raise BwskError(f"--axes: {item!r} is not a default axis (batch, sequence); write "
                                f"{item}=INPUT:DIM")
            if item not in defaults:
                raise BwskError(f"--axes: no input of {program.name} has a default {item} dim "
                                f"(inputs: {', '.join(f'{n}: {t}' for n, t in types.items())})")
            if item in out:
                raise BwskError(f"--axes: axis {item!r} given twice")
            out[item] = list(defaults[item])
            bare.add(item)
            continue
        axis, _, target = (s.strip() for s in item.partition("="))
        if not _AXIS_NAME.match(axis):
            raise BwskError(f"--axes: bad axis name {axis!r} in {item!r}")
        if axis in bare:
            raise BwskError(f"--axes: axis {axis!r} given twice")
        inp, colon, dim_s = (s.strip() for s in target.rpartition(":"))
        if not colon or not inp or not re.fullmatch(r"-?\d+", dim_s):
            raise BwskError(f"--axes: {item!r} is not AXIS=INPUT:DIM (e.g. batch=input_ids:0)")
        if inp not in types:
            raise BwskError(f"--axes: {program.name} has no input {inp!r} "
                            f"(inputs: {', '.join(types) or 'none'})")
        t = types[inp]
        if not isinstance(t, TensorType) or not t.shape:
            raise BwskError(f"--axes: input {inp!r} is {t}, which has no dim to partition")
        dim = int(dim_s)
        if not -len(t.shape) <= dim < len(t.shape):
            raise BwskError(f"--axes: input {inp!r} is {t}: dim {dim} is out of range")
        dim %= len(t.shape)
        if t.shape[dim] < 2:
            raise BwskError(f"--axes: input {inp!r} dim {dim} has size {t.shape[dim]}, which cannot "
                            "be split (lower with a larger example)")
        entries = out.setdefault(axis, [])
        if any(n == inp for n, _ in entries):
            raise BwskError(f"--axes: axis {axis!r} names input {inp!r} twice")
        entries.append((inp, dim))
    return out


# ------------------------------------------------------------------------------------- running a plan


def shard(t: torch.Tensor, part: Part, sizes: list[int]) -> list[torch.Tensor]:
    """Cut ``t`` into shards along ``part``: the ``P`` factor split into pieces of ``sizes``."""
    shape = list(t.shape)
    d = part.dim
    p = part.factor(shape)
    assert sum(sizes) == p, (shape, part, sizes)
    v = t.reshape(shape[:d] + [part.outer, p, part.inner] + shape[d + 1:])
    return [piece.reshape(shape[:d] + [part.outer * s * part.inner] + shape[d + 1:])
            for piece, s in zip(torch.split(v, sizes, dim=d + 1), sizes)]


def unshard(pieces: list[torch.Tensor], part: Part, sizes: list[int]) -> torch.Tensor:
    """The inverse of ``shard``: the whole tensor from its shards."""
    d = part.dim
    shape = list(pieces[0].shape)
    views = [x.reshape(shape[:d] + [part.outer, s, part.inner] + shape[d + 1:])
             for x, s in zip(pieces, sizes)]
    whole = torch.cat(views, dim=d + 1)
    return whole.reshape(shape[:d] + [part.outer * sum(sizes) * part.inner] + shape[d + 1:])


# ops whose argument is the output's shape: a worker passes its local shape
_SHAPE_ARG = {"aten.view.default": 1, "aten.reshape.default": 1, "aten._unsafe_view.default": 1,
              "aten.expand.default": 1, "aten.view_copy.default": 1, "aten.expand_copy.default": 1}


def local_literals(prim: Prim, args: list, kwargs: dict, local_out_shape) -> tuple[list, dict]:
    """The arguments a worker passes: shape literals (view sizes, adaptive pools' and interpolations'
    output sizes) rewritten to its local shape."""
    if local_out_shape is None:
        return args, kwargs
    i = _SHAPE_ARG.get(prim.op)
    if i is not None:
        args = list(args)
        if len(args) > i:
            args[i] = list(local_out_shape)
        else:
            kwargs = dict(kwargs)
            kwargs[next(iter(k for k in kwargs if k in ("size", "shape")))] = list(local_out_shape)
        return args, kwargs
    name = prim.op.split(".")[1] if prim.op.count(".") == 2 else ""
    if name.startswith(("adaptive_", "_adaptive_", "upsample_", "_upsample_")):
        key = 1 if len(args) > 1 else "output_size"
        size = args[1] if key == 1 else kwargs.get(key)
        if size is not None:
            local = list(local_out_shape[len(local_out_shape) - len(size):])
            if key == 1:
                args = list(args)
                args[1] = local
            else:
                kwargs = {**kwargs, key: local}
    return args, kwargs


def local_shape(shape, part: Part | None, size: int):
    if part is None:
        return tuple(shape)
    s = list(shape)
    s[part.dim] = part.outer * size * part.inner
    return tuple(s)


# ------------------------------------------------------------------------------- abstract values


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


def _walk_slots(args, kwargs):
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


# ------------------------------------------------------------------------------------ op schemas


@cache
def _overload(op: str):
    from bwskc.ops import UnknownOp, lookup_overload  # the one safe resolver (names may be untrusted)
    try:
        return lookup_overload(op)
    except UnknownOp:
        return None


@cache
def _schema_names(op: str) -> tuple:
    ov = _overload(op)
    if ov is None:
        return ()
    return tuple((a.name, a.default_value if a.has_default_value() else None)
                 for a in ov._schema.arguments)


@cache
def _pointwise(op: str) -> bool:
    """ATen's own tag for elementwise ops with broadcasting."""
    ov = _overload(op)
    return ov is not None and torch.Tag.pointwise in ov.tags


# --------------------------------------------------------------------------------------- the rules


class Ctx:
    """One application of a leaf, seen along one axis."""

    def __init__(self, an: _Analysis, prim: Prim, args, kwargs, slots, locs, a: int):
        self.an, self.prim, self.op = an, prim, prim.op
        self.args, self.kwargs, self.slots, self.a = args, kwargs, slots, a
        self.axis = an.axis_names[a]
        self.slot_at = {loc: i for i, loc in enumerate(locs)}
        self.out_type = prim.type
        self.short = prim.op.split(".")[1] if prim.op.count(".") == 2 else prim.op
        names = _schema_names(prim.op)
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


def _norm_dim(d, rank):
    r = max(rank, 1)
    return d % r if -r <= d < r else d


def _norm_dims(dims, rank):
    if dims is None:
        return list(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    dims = list(dims)
    if not dims:
        return list(range(rank))
    return sorted({_norm_dim(d, rank) for d in dims})


def _engine(ctx: Ctx, letters: dict, out_letters, special=None, contract=None, rebase=(),
            random=False, prefer=None) -> Plan:
    """The generic rule: every dim of every operand and of the result carries a letter (None: not
    carried, e.g. broadcast from size 1). A partitioned letter that reaches the result is free; one
    that does not is contracted (``contract``, default all-reduce); ``special`` letters name their own
    collective: letter -> (collective, reason, the result stays partitioned along it). When operands
    are partitioned on several kept dims, the one of slot ``prefer`` (a matmul's rows: the queries)
    or else the largest keeps its partition and the others are gathered."""
    special = special or {}
    outs = out_letters if isinstance(out_letters, list) else [out_letters]
    out_shapes = ctx.out_shapes()
    if not isinstance(out_letters, list):
        out_shapes = [out_shapes]
    by_letter: dict = {}
    for i in ctx.parted():
        p = ctx.part(i)
        ls = letters.get(i)
        if ls is None or p.dim >= len(ls) or ls[p.dim] is None:
            return ctx.barrier("all-gather", f"{ctx.short}: operand {i} is partitioned along "
                               f"{ctx.axis} on dim {p.dim}, which the op does not carry through")
        by_letter.setdefault(ls[p.dim], set()).add((ctx.shape(i)[p.dim], p.outer, p.inner))
    for lays in by_letter.values():
        if len(lays) > 1:
            return ctx.barrier("all-to-all", f"{ctx.short}: operands partitioned along {ctx.axis} "
                               "with different layouts must be redistributed")
    in_out = {L for o in outs if o is not None for L in o if L is not None}
    order = sorted(by_letter, key=lambda L: min(i for i in ctx.parted()
                                                 if letters[i][ctx.part(i).dim] == L))
    # a real collective names the barrier before a position offset (causal attention along the
    # sequence needs the keys and values first)
    specials = sorted((L for L in order if L in special),
                      key=lambda L: special[L][0] == "position-offset")
    kept = [L for L in order if (L in special and special[L][2]) or (L not in special and L in in_out)]
    contracted = [L for L in order if L not in special and L not in in_out]
    collective = reason = None
    if specials:
        collective, reason = special[specials[0]][:2]
    elif contracted and not kept:
        collective, reason = contract or (
            "all-reduce", (f"{ctx.short} reduces over the dim that {ctx.axis} partitions "
                           "(partial results per shard)"))
    elif contracted:
        collective, reason = "all-gather", (
            f"{ctx.short}: one operand is partitioned along {ctx.axis} on a dim the op contracts, "
            "another on a dim it keeps: the first must be gathered")
    elif len(kept) > 1:
        collective, reason = "all-gather", (
            f"{ctx.short}: operands are partitioned along {ctx.axis} on different dims: all but one "
            "must be gathered")
    if len(kept) > 1:  # the largest operands keep their partition; the others are gathered
        weight = {L: sum(math.prod(ctx.shape(i)) for i in ctx.parted()
                         if letters[i][ctx.part(i).dim] == L) for L in kept}
        mine = ctx.part(prefer) is not None and letters[prefer][ctx.part(prefer).dim] \
            if prefer is not None else None
        kept.sort(key=lambda L: (L != mine, -weight[L]))
    X = kept[0] if kept else None
    ins = []
    for i in range(len(ctx.slots)):
        p = ctx.part(i)
        if p is not None:
            ins.append(p)
            continue
        ls = letters.get(i)
        if X is None or ls is None or X not in ls:
            ins.append(None)
            continue
        j = ls.index(X)
        size, outer, inner = next(iter(by_letter[X]))
        n = ctx.shape(i)[j] if j < len(ctx.shape(i)) else 1
        if n == size:
            ins.append(Part(j, outer, inner))
        elif n == 1:
            ins.append(None)
        else:
            return ctx.barrier("all-to-all", f"{ctx.short}: a replicated operand does not line up with "
                               f"the {ctx.axis} partition")
    outp = []
    for o, shp in zip(outs, out_shapes):
        if X is None or o is None or shp is None or X not in o:
            outp.append(None)
            continue
        j = o.index(X)
        size, outer, inner = next(iter(by_letter[X]))
        outp.append(Part(j, outer, inner) if shp[j] == size else None)
    out = outp if isinstance(out_letters, list) else outp[0]
    if isinstance(out_letters, list):
        out = tuple(out)
    return Plan(tuple(ins), out, collective, reason, tuple(rebase) if collective is None else (),
                random and collective is None)


def _tuple_out(ctx, letters_one):
    """Letters for every item of a tuple result (same letters each), or the letters themselves."""
    if isinstance(ctx.out_type, TupleType):
        return [letters_one if isinstance(t, TensorType) and len(t.shape) == len(letters_one) else None
                for t in ctx.out_type.items]
    return letters_one


def _elementwise(ctx: Ctx, random=False) -> Plan:
    out = ctx.out_type
    oshape = out.items[0].shape if isinstance(out, TupleType) else out.shape
    R = len(oshape)
    letters = {}
    for i, s in enumerate(ctx.slots):
        if not isinstance(s.type, TensorType):
            continue
        r = len(s.shape)
        if r > R:
            letters[i] = None
            continue
        letters[i] = tuple((R - r + k) if (s.shape[k] == oshape[R - r + k]) else None
                           for k in range(r))
    return _engine(ctx, letters, _tuple_out(ctx, tuple(range(R))), random=random)


# view-like -------------------------------------------------------------------------------------------


def reshape_part(in_shape, p: Part, out_shape) -> Part | None:
    """Where a partition goes through a row-major reshape; None if its factor is split across dims."""
    lo = p.inner * math.prod(in_shape[p.dim + 1:])
    hi = lo * p.factor(in_shape)
    stride = 1
    for j in reversed(range(len(out_shape))):
        t = out_shape[j]
        if stride <= lo and hi <= stride * t and lo % stride == 0 and (stride * t) % hi == 0:
            return Part(j, (stride * t) // hi, lo // stride)
        stride *= t
    return None


def _rule_reshape(ctx: Ctx) -> Plan:
    x = 0
    p = ctx.part(x)
    if p is None or not isinstance(ctx.out_type, TensorType):
        return ctx.barrier("unknown", f"{ctx.short}: no rule for this operand layout")
    q = reshape_part(ctx.shape(x), p, ctx.out_type.shape)
    if q is None:
        return ctx.barrier("all-to-all", f"{ctx.short} {tuple(ctx.shape(x))} -> "
                           f"{tuple(ctx.out_type.shape)} splits the dim {ctx.axis} partitions "
                           f"(size {p.factor(ctx.shape(x))}) across output dims")
    return ctx.free(q)


def _rule_permute(ctx: Ctx, perm) -> Plan:
    p = ctx.part(0)
    return ctx.free(Part(perm.index(p.dim), p.outer, p.inner))


def _perm_of(ctx: Ctx):
    r = len(ctx.shape(0))
    name = ctx.op.split(".")[1]
    if name == "permute":
        return [_norm_dim(d, r) for d in ctx.val("dims")]
    if name in ("t", "numpy_T", "mT", "mH", "adjoint"):
        perm = list(range(r))
        if r >= 2:
            perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm if name != "numpy_T" else list(reversed(range(r)))
    if name == "movedim":
        src, dst = ctx.val("source"), ctx.val("destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [_norm_dim(d, r) for d in src], [_norm_dim(d, r) for d in dst]
        rest = [d for d in range(r) if d not in src]
        perm = [None] * r
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(rest)
        return [next(it) if v is None else v for v in perm]
    d0 = _norm_dim(ctx.val("dim0", ctx.val("axis0", 0)), r)
    d1 = _norm_dim(ctx.val("dim1", ctx.val("axis1", 1)), r)
    perm = list(range(r))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


def _rule_expand(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    R = len(ctx.out_type.shape)
    d = p.dim + R - len(ctx.shape(0))
    if ctx.out_type.shape[d] != ctx.shape(0)[p.dim]:
        return ctx.barrier("all-gather", f"expand changes the dim {ctx.axis} partitions")
    return ctx.free(Part(d, p.outer, p.inner))


def _rule_repeat(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    reps = list(ctx.val("repeats"))
    R = len(reps)
    d = p.dim + R - len(ctx.shape(0))
    return ctx.free(Part(d, p.outer * reps[d], p.inner))


def _rule_repeat_interleave(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    dim, reps = ctx.val("dim"), ctx.val("repeats")
    if dim is None or not isinstance(reps, int):
        return ctx.barrier("all-to-all", "repeat_interleave over a flattened or data-dependent layout")
    dim = _norm_dim(dim, len(ctx.shape(0)))
    if dim != p.dim:
        return ctx.free(p)
    return ctx.free(Part(p.dim, p.outer, p.inner * reps))


def _rule_select(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    r = len(ctx.shape(0))
    dim = _norm_dim(ctx.val("dim"), r)
    if dim == p.dim:
        return ctx.barrier("broadcast", f"select index {ctx.val('index')} of dim {dim}, which "
                           f"{ctx.axis} partitions: one shard holds it")
    return ctx.free(Part(p.dim - (dim < p.dim), p.outer, p.inner))


def _rule_slice(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    shape = ctx.shape(0)
    r = len(shape)
    name = ctx.op.split(".")[1]
    dim = _norm_dim(ctx.val("dim", 0), r)
    if dim != p.dim:
        return ctx.free(p)
    n = shape[dim]
    if name == "narrow":
        start, length = ctx.val("start"), ctx.val("length")
        full = start in (0, -n) and length == n
        what = f"[{start}:{start}+{length}]"
    else:
        start, end, step = ctx.val("start"), ctx.val("end"), ctx.val("step", 1)
        s = 0 if start is None else (start + n if start < 0 else start)
        e = n if end is None else (end + n if end < 0 else end)
        full = s <= 0 and e >= n and (step in (None, 1))
        what = f"[{start}:{end}:{step}]"
    if full:
        return ctx.free(p)
    return ctx.barrier("all-gather", f"{name}{what} along dim {dim}, which {ctx.axis} partitions, "
                       "reads across shards")


def _rule_split(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    shape = ctx.shape(0)
    r = len(shape)
    name = ctx.op.split(".")[1]
    dim = _norm_dim(ctx.val("dim", 0), r)
    items = ctx.out_type.items if isinstance(ctx.out_type, TupleType) else ()
    if name == "unbind":
        if dim == p.dim:
            return ctx.barrier("all-gather", f"unbind of dim {dim}, which {ctx.axis} partitions")
        return ctx.free(tuple(Part(p.dim - (dim < p.dim), p.outer, p.inner) for _ in items))
    if dim != p.dim:
        return ctx.free(tuple(p for _ in items))
    if len(items) == 1:
        return ctx.free((p,))
    return ctx.barrier("all-gather", f"{name} cuts dim {dim}, which {ctx.axis} partitions, into "
                       f"{len(items)} pieces across shards")


def _rule_cat(ctx: Ctx) -> Plan:
    tens = [i for i in ctx.sis("tensors") if i is not None]
    shapes = {i: ctx.shape(i) for i in tens}
    live = [i for i in tens if not (len(shapes[i]) == 1 and shapes[i][0] == 0)]  # legacy empty
    R = len(ctx.out_type.shape)
    dim = _norm_dim(ctx.val("dim", 0), R)
    on_dim = [i for i in live if ctx.part(i) is not None and ctx.part(i).dim == dim]
    if on_dim:
        lays = {(shapes[i][dim], ctx.part(i).outer, ctx.part(i).inner) for i in live
                if ctx.part(i) is not None}
        if len(on_dim) == len(live) and len(lays) == 1:
            p = ctx.part(on_dim[0])
            return ctx.free(Part(dim, p.outer * len(live), p.inner))
        return ctx.barrier("all-gather", f"cat along dim {dim}, which {ctx.axis} partitions, of "
                           "operands that are not partitioned alike")
    letters = {i: tuple(k if k != dim else ("cat", i) for k in range(R)) for i in live}
    return _engine(ctx, letters, tuple(k if k != dim else "cat" for k in range(R)))


def _rule_stack(ctx: Ctx) -> Plan:
    tens = [i for i in ctx.sis("tensors") if i is not None]
    R = len(ctx.out_type.shape)
    dim = _norm_dim(ctx.val("dim", 0), R)
    letters = {i: tuple(k if k < dim else k + 1 for k in range(R - 1)) for i in tens}
    return _engine(ctx, letters, tuple(range(R)))


def _rule_flip(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    r = len(ctx.shape(0))
    dims = _norm_dims(ctx.val("dims"), r)
    if p.dim in dims:
        return ctx.barrier("all-to-all", f"flip reverses dim {p.dim}, which {ctx.axis} partitions "
                           "(shards trade places)", out=p)
    return ctx.free(p)


def _rule_roll(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    r = len(ctx.shape(0))
    dims = ctx.val("dims")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        return ctx.barrier("all-to-all", "roll of the flattened tensor moves data between shards")
    if p.dim in _norm_dims(dims, r):
        return ctx.barrier("halo-exchange", f"roll along dim {p.dim}, which {ctx.axis} partitions, "
                           "shifts elements into the neighbouring shard", out=p)
    return ctx.free(p)


def _rule_pad(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    pad = list(ctx.val("pad", ctx.val("padding", [])))
    r = len(ctx.shape(0))
    padded = {r - 1 - k // 2 for k in range(len(pad)) if pad[k] != 0}
    if p.dim in padded:
        return ctx.barrier("halo-exchange", f"padding dim {p.dim}, which {ctx.axis} partitions, "
                           "touches only the edge shards")
    return ctx.free(p)


def _rule_tri(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    r = len(ctx.shape(0))
    if p.dim >= r - 2:
        return ctx.barrier("position-offset", f"{ctx.short} depends on the global position along "
                           f"dim {p.dim}, which {ctx.axis} partitions: each shard needs its offset",
                           out=p)
    return ctx.free(p)


def _rule_new(ctx: Ctx) -> Plan:
    """new_zeros(x, size) and the like: the result does not depend on x's values."""
    return ctx.free(None, ins=tuple(None for _ in ctx.slots))


# reductions and normalisations ---------------------------------------------------------------------


def _rule_reduce(ctx: Ctx, collective="all-reduce", verb="reduces over") -> Plan:
    x = 0
    r = len(ctx.shape(x))
    name = ctx.op.split(".")[1]
    dims = ctx.val("dim", None)
    if ctx.op.endswith(".default") and name in ("sum", "mean", "max", "min", "prod", "any", "all",
                                                  "amax", "amin", "nansum", "count_nonzero") \
            and "dim" not in ctx.names:
        dims = None
    if name in ("amax", "amin") and dims in ([], ()):
        dims = None
    red = _norm_dims(dims, r)
    keep = bool(ctx.val("keepdim", False))
    xl = tuple(k if k not in red else ("r", k) for k in range(r))
    ol = tuple(None if k in red else k for k in range(r)) if keep else \
        tuple(k for k in range(r) if k not in red)
    p = ctx.part(x)
    special = {}
    if p is not None and p.dim in red:
        special[("r", p.dim)] = (collective, (f"{name} {verb} dim {p.dim}, which {ctx.axis} "
                                 "partitions"), False)
    return _engine(ctx, {x: xl}, _tuple_out(ctx, ol), special=special)


def _rule_along(ctx: Ctx, collective, verb, stays=True) -> Plan:
    """An op along one dim (softmax, cumsum, sort): free unless that dim is the partitioned one."""
    x = 0
    r = len(ctx.shape(x))
    dim = _norm_dim(ctx.val("dim", -1), r)
    p = ctx.part(x)
    letters = tuple(range(r))
    special = {}
    if p is not None and p.dim == dim:
        special[dim] = (collective, f"{ctx.short} {verb} dim {dim}, which {ctx.axis} partitions",
                        stays)
    out = _tuple_out(ctx, letters)
    if isinstance(out, list):
        out = [o if o is not None and len(o) == r else None for o in out]
    return _engine(ctx, {x: letters}, out, special=special)


def _rule_layer_norm(ctx: Ctx) -> Plan:
    x = ctx.si("input")
    r = len(ctx.shape(x))
    k = len(ctx.val("normalized_shape"))
    normed = list(range(r - k, r))
    letters = {x: tuple(range(r))}
    for name in ("weight", "bias"):
        i = ctx.si(name)
        if i is not None:
            letters[i] = tuple(range(r - len(ctx.shape(i)), r))
    special = {d: ("all-reduce", (f"{ctx.short} normalizes over dim {d}, which {ctx.axis} partitions "
                   "(statistics need every shard)"), True) for d in normed}
    full = tuple(range(r))
    stats = tuple(d if d not in normed else None for d in range(r))
    if isinstance(ctx.out_type, TupleType):
        out = [full] + [stats if isinstance(t, TensorType) and len(t.shape) == r else None
                        for t in ctx.out_type.items[1:]]
    else:
        out = full
    return _engine(ctx, letters, out, special=special)


def _rule_group_norm(ctx: Ctx) -> Plan:
    x = ctx.si("input")
    r = len(ctx.shape(x))
    xl = ("n", "c") + tuple(("s", k) for k in range(2, r))
    letters = {x: xl}
    for name in ("weight", "bias"):
        i = ctx.si(name)
        if i is not None:
            letters[i] = ("c",)
    special = {L: ("all-reduce", (f"{ctx.short} normalizes over groups of channels and positions, "
                   f"which {ctx.axis} partitions"), True) for L in xl[1:]}
    if isinstance(ctx.out_type, TupleType):
        out = [xl] + [("n", None) for _ in ctx.out_type.items[1:]]
    else:
        out = xl
    return _engine(ctx, letters, out, special=special)


def _rule_batch_norm(ctx: Ctx) -> Plan:
    x = ctx.si("input")
    r = len(ctx.shape(x))
    xl = ("n", "c") + tuple(("s", k) for k in range(2, r))
    letters = {x: xl}
    for name in ("weight", "bias", "running_mean", "running_var"):
        i = ctx.si(name)
        if i is not None:
            letters[i] = ("c",)
    name = ctx.op.split(".")[1]
    training = name != "_native_batch_norm_legit_no_training" and bool(ctx.val("training", False))
    special = {}
    if training:
        special = {L: ("all-reduce", (f"training batch norm averages over dim {k}, which {ctx.axis} "
                       "partitions (batch statistics)"), True)
                   for k, L in enumerate(xl) if L != "c"}
    if isinstance(ctx.out_type, TupleType):
        C = ctx.shape(x)[1] if r > 1 else 0
        out = [xl] + [("c",) if isinstance(t, TensorType) and t.shape == (C,) else None
                      for t in ctx.out_type.items[1:]]
    else:
        out = xl
    return _engine(ctx, letters, out, special=special)


# contractions ---------------------------------------------------------------------------------------


def _right_aligned(shape, target_letters, target_shape):
    """Letters for an operand broadcast against a result (aligned from the right)."""
    R, r = len(target_shape), len(shape)
    return tuple(target_letters[R - r + k] if shape[k] == target_shape[R - r + k] else None
                 for k in range(r))


def _contract_reason(ctx):
    return ("all-reduce", (f"{ctx.short} contracts over the dim that {ctx.axis} partitions "
            "(each shard has a partial sum)"))


def _rule_matmul(ctx: Ctx) -> Plan:
    name = ctx.op.split(".")[1]
    out_shape = ctx.out_type.shape
    if name in ("mm", "addmm"):
        a, b = ctx.si("mat1" if name == "addmm" else "self"), ctx.si("mat2")
        letters = {a: ("m", "k"), b: ("k", "n")}
        ol = ("m", "n")
    elif name in ("bmm", "baddbmm"):
        a, b = ctx.si("batch1" if name == "baddbmm" else "self"), ctx.si("batch2" if name == "baddbmm"
                                                                         else "mat2")
        letters = {a: ("b", "m", "k"), b: ("b", "k", "n")}
        ol = ("b", "m", "n")
    elif name == "addbmm":
        a, b = ctx.si("batch1"), ctx.si("batch2")
        letters = {a: ("b", "m", "k"), b: ("b", "k", "n")}
        ol = ("m", "n")
    elif name in ("mv", "addmv"):
        a, b = ctx.si("mat" if name == "addmv" else "self"), ctx.si("vec")
        letters = {a: ("m", "k"), b: ("k",)}
        ol = ("m",)
    elif name in ("dot", "vdot"):
        letters = {ctx.si("self"): ("k",), ctx.si("tensor"): ("k",)}
        ol = ()
    elif name in ("outer", "ger"):
        letters = {ctx.si("self"): ("i",), ctx.si("vec2"): ("j",)}
        ol = ("i", "j")
    elif name == "linear":
        x, w, bias = ctx.si("input"), ctx.si("weight"), ctx.si("bias")
        rx = len(ctx.shape(x))
        xl = tuple(("b", k) for k in range(rx - 1)) + ("k",)
        wl = ("n", "k") if len(ctx.shape(w)) == 2 else ("k",)
        ol = xl[:-1] + (("n",) if len(ctx.shape(w)) == 2 else ())
        letters = {x: xl, w: wl}
        if bias is not None:
            letters[bias] = _right_aligned(ctx.shape(bias), ol, out_shape)
        return _engine(ctx, letters, ol, contract=_contract_reason(ctx), prefer=x)
    else:  # matmul
        a, b = ctx.si("self"), ctx.si("other")
        ra, rb = len(ctx.shape(a)), len(ctx.shape(b))
        if ra == 1 and rb == 1:
            letters, ol = {a: ("k",), b: ("k",)}, ()
        else:
            nb = len(out_shape) - (ra >= 2) - (rb >= 2)
            bl = tuple(("b", k) for k in range(nb))
            bshape = out_shape[:nb]
            al = (_right_aligned(ctx.shape(a)[:-2], bl, bshape) + ("m", "k")) if ra >= 2 else ("k",)
            blt = (_right_aligned(ctx.shape(b)[:-2], bl, bshape) + ("k", "n")) if rb >= 2 else ("k",)
            letters = {a: al, b: blt}
            ol = bl + (("m",) if ra >= 2 else ()) + (("n",) if rb >= 2 else ())
        return _engine(ctx, letters, ol, contract=_contract_reason(ctx), prefer=a)
    bias = ctx.si("self") if name in ("addmm", "baddbmm", "addbmm", "addmv") else None
    if bias is not None:
        letters[bias] = _right_aligned(ctx.shape(bias), ol, out_shape)
    return _engine(ctx, letters, ol, contract=_contract_reason(ctx),
                   prefer=next(iter(letters)) if name not in ("dot", "vdot") else None)


def _rule_einsum(ctx: Ctx) -> Plan:
    eq = ctx.val("equation").replace(" ", "")
    tens = ctx.sis("tensors")
    lhs, arrow, rhs = eq.partition("->")
    specs = lhs.split(",")
    if len(specs) != len(tens) or any(t is None for t in tens):
        return ctx.barrier("unknown", "einsum: unsupported equation")
    ell_rank = 0
    for s, t in zip(specs, tens):
        if "..." in s:
            ell_rank = max(ell_rank, len(ctx.shape(t)) - (len(s) - 3))
    if not arrow:
        # implicit output: letters appearing once, sorted, ellipsis first
        counts = {}
        for s in specs:
            for c in s.replace("...", ""):
                counts[c] = counts.get(c, 0) + 1
        rhs = ("..." if ell_rank else "") + "".join(sorted(c for c, n in counts.items() if n == 1))
    ell = tuple(("e", k) for k in range(ell_rank))
    ell_shape = ()

    def expand(s, t):
        if "..." not in s:
            return tuple(s)
        pre, post = s.split("...")
        n = len(ctx.shape(t)) - len(pre) - len(post) if t is not None else ell_rank
        return tuple(pre) + ell[ell_rank - n:] + tuple(post)

    out_l = expand(rhs, None)
    ell_shape = ctx.out_type.shape[rhs.find("..."):rhs.find("...") + ell_rank] if "..." in rhs else ()
    letters = {}
    for s, t in zip(specs, tens):
        ls = list(expand(s, t))
        for k, L in enumerate(ls):  # broadcast ellipsis dims of size 1
            if isinstance(L, tuple) and ell_shape and ctx.shape(t)[k] == 1 and \
                    ell_shape[L[1]] != 1:
                ls[k] = None
        letters[t] = tuple(ls)
    return _engine(ctx, letters, out_l, contract=_contract_reason(ctx))


def _rule_sdpa(ctx: Ctx) -> Plan:
    q, k, v, m = ctx.si("query"), ctx.si("key"), ctx.si("value"), ctx.si("attn_mask")
    out_shape = ctx.out_type.shape if isinstance(ctx.out_type, TensorType) else \
        ctx.out_type.items[0].shape
    nb = len(out_shape) - 2
    bl = tuple(("b", j) for j in range(nb))
    letters = {q: bl + ("L", "E")}
    for i, last in ((k, ("S", "E")), (v, ("S", "Ev"))):
        letters[i] = _right_aligned(ctx.shape(i)[:-2], bl, out_shape[:nb]) + last
    if m is not None:
        target = out_shape[:-1] + (ctx.shape(k)[-2],)
        letters[m] = _right_aligned(ctx.shape(m), bl + ("L", "S"), target)
    special = {"S": ("all-gather", (f"attention over the key/value positions, which {ctx.axis} "
                     "partitions: every query needs every key and value"), False),
               "E": ("all-reduce", (f"attention scores contract over the head dim, which {ctx.axis} "
                     "partitions"), False)}
    if ctx.val("is_causal", False):
        special["L"] = ("position-offset", (f"is_causal masks by the global query position, which "
                        f"{ctx.axis} partitions"), True)
    out = bl + ("L", "Ev")
    if isinstance(ctx.out_type, TupleType):
        out = [out] + [None for _ in ctx.out_type.items[1:]]
    return _engine(ctx, letters, out, special=special,
                   random=bool(ctx.val("dropout_p", 0.0)))


def _rule_embedding(ctx: Ctx) -> Plan:
    w, idx = ctx.si("weight"), ctx.si("indices")
    r = len(ctx.shape(idx))
    letters = {w: ("v", "e"), idx: tuple(range(r))}
    special = {"v": ("all-gather", f"looks up rows of a table that {ctx.axis} partitions", False)}
    return _engine(ctx, letters, tuple(range(r)) + ("e",), special=special)


def _rule_one_hot(ctx: Ctx) -> Plan:
    r = len(ctx.shape(0))
    return _engine(ctx, {0: tuple(range(r))}, tuple(range(r)) + ("c",))


def _rule_gather(ctx: Ctx) -> Plan:
    x, idx = ctx.si("self"), ctx.si("index")
    r = len(ctx.shape(x))
    dim = _norm_dim(ctx.val("dim"), r)
    xs, isz = ctx.shape(x), ctx.shape(idx)
    xl = tuple(("x", k) if k == dim or xs[k] != isz[k] else k for k in range(r))
    il = tuple(("i", k) if k == dim else k for k in range(r))
    special = {("x", dim): ("all-gather", (f"gather along dim {dim}, which {ctx.axis} partitions, "
                            "reads data-dependent positions across shards"), False)}
    return _engine(ctx, {x: xl, idx: il}, il, special=special)


def _rule_index_select(ctx: Ctx) -> Plan:
    x, idx = ctx.si("self"), ctx.si("index")
    r = len(ctx.shape(x))
    dim = _norm_dim(ctx.val("dim"), r)
    xl = tuple(k if k != dim else "x" for k in range(r))
    special = {"x": ("all-gather", (f"index_select along dim {dim}, which {ctx.axis} partitions, reads "
                     "data-dependent positions across shards"), False)}
    return _engine(ctx, {x: xl, idx: ("i",)}, tuple(k if k != dim else "i" for k in range(r)),
                   special=special)


def _rule_index(ctx: Ctx) -> Plan:
    """aten.index.Tensor(x, [i0, None, i2...]): advanced indexing; an index constant that is an arange
    along the partitioned dim is a rebased slice, not a gather."""
    x = ctx.si("self")
    xs = ctx.shape(x)
    r = len(xs)
    idx_vals = ctx.val("indices")
    isl = ctx.sis("indices")
    indexed = [j for j, v in enumerate(idx_vals) if v is not None]
    if any(isl[j] is None for j in indexed):
        return ctx.barrier("unknown", "index: an index that is not a tensor")
    bshape = torch.broadcast_shapes(*[tuple(ctx.shape(isl[j])) for j in indexed])
    nbd = len(bshape)
    bl = tuple(("b", e) for e in range(nbd))
    contiguous = indexed == list(range(indexed[0], indexed[-1] + 1))
    rest = [k for k in range(r) if k not in indexed]
    if contiguous:
        ol = tuple(k for k in rest if k < indexed[0]) + bl + tuple(k for k in rest if k > indexed[-1])
    else:
        ol = bl + tuple(rest)
    xl = [k if k not in indexed else ("x", k) for k in range(r)]
    letters = {}
    for j in indexed:
        letters[isl[j]] = _right_aligned(ctx.shape(isl[j]), bl, bshape)
    rebase = []
    special = {}
    p = ctx.part(x)
    if p is not None and p.dim in indexed:
        s = isl[p.dim]
        e = _arange_dim(ctx, s, xs[p.dim], bshape)
        if e is not None and p.outer == p.inner == 1 and ctx.part(s) is None:
            xl[p.dim] = ("b", e)
            rebase.append(s)
        else:
            special[("x", p.dim)] = ("all-gather", (f"index along dim {p.dim}, which {ctx.axis} "
                                     "partitions, with data-dependent positions"), False)
    letters[x] = tuple(xl)
    return _engine(ctx, letters, ol, special=special, rebase=rebase)


def _arange_dim(ctx: Ctx, slot, n, bshape):
    """The broadcast dim along which a constant index tensor is ``arange(n)`` (1 elsewhere), or None."""
    av = ctx.slots[slot]
    if av.const is None:
        return None
    shape = av.shape
    R = len(bshape)
    dims = [R - len(shape) + k for k in range(len(shape)) if shape[k] != 1]
    if len(dims) != 1 or shape[dims[0] - (R - len(shape))] != n:
        return None
    value = ctx.an.const_value(av.const)
    if value is None or not torch.equal(value.reshape(-1).to(torch.int64), torch.arange(n)):
        return None
    return dims[0]


def _conv_geometry(ctx: Ctx):
    name = ctx.op.split(".")[1]
    w = ctx.si("weight")
    nsp = len(ctx.shape(w)) - 2

    def tup(v, default):
        if v is None:
            v = default
        if isinstance(v, int):
            return [v] * nsp
        v = list(v)
        return v * nsp if len(v) == 1 else v
    transposed = name.startswith("conv_transpose") or bool(ctx.val("transposed", False))
    stride = tup(ctx.val("stride"), 1)
    dilation = tup(ctx.val("dilation"), 1)
    ksize = list(ctx.shape(w)[2:])
    pad = ctx.val("padding", 0)
    if isinstance(pad, str):
        pad = [0] * nsp if pad == "valid" else [d * (k - 1) // 2 for d, k in zip(dilation, ksize)]
        pad = [p if k == 1 else max(p, 1) for p, k in zip(pad, ksize)]
    else:
        pad = tup(pad, 0)
    outpad = tup(ctx.val("output_padding"), 0)
    return nsp, transposed, stride, pad, ksize, outpad, int(ctx.val("groups", 1) or 1)


def _rule_conv(ctx: Ctx) -> Plan:
    x, w, b = ctx.si("input"), ctx.si("weight"), ctx.si("bias")
    nsp, transposed, stride, pad, ksize, outpad, groups = _conv_geometry(ctx)
    rx = len(ctx.shape(x))
    batched = rx == nsp + 2
    sl = tuple(("s", k) for k in range(nsp))
    cin = ctx.shape(x)[1 if batched else 0]
    cout = ctx.out_type.shape[1 if batched else 0]
    depthwise = not transposed and groups > 1 and groups == cin == cout
    ci, co = ("c", "c") if depthwise else ("ci", "co")
    xl = (("n",) if batched else ()) + (ci,) + sl
    ol = (("n",) if batched else ()) + (co,) + sl
    if transposed:
        wl = (ci, co if groups == 1 else None) + (None,) * nsp
    else:
        wl = (co, ci if groups == 1 else None) + (None,) * nsp
    letters = {x: xl, w: wl}
    if b is not None:
        letters[b] = (co,)
    special = {}
    for k in range(nsp):
        if not (ksize[k] == 1 and stride[k] == 1 and pad[k] == 0 and outpad[k] == 0):
            special[sl[k]] = ("halo-exchange", (f"{ctx.short} kernel {ksize[k]} stride {stride[k]} "
                              f"padding {pad[k]} along dim {k + rx - nsp}, which {ctx.axis} "
                              "partitions, reads neighbouring shards"), True)
    if groups > 1 and not depthwise:
        special[ci] = ("all-gather", (f"grouped {ctx.short} over the channel dim {ctx.axis} "
                       "partitions"), False)
    return _engine(ctx, letters, ol, special=special, contract=_contract_reason(ctx))


def _rule_pool(ctx: Ctx) -> Plan:
    name = ctx.op.split(".")[1]
    nsp = int(re.search(r"(\d)d", name).group(1))
    x = 0
    xs = ctx.shape(x)
    rx = len(xs)
    lead = rx - nsp
    sl = tuple(("s", k) for k in range(nsp))
    xl = tuple(range(lead)) + sl
    out_shape = ctx.out_type.items[0].shape if isinstance(ctx.out_type, TupleType) else \
        ctx.out_type.shape
    special = {}
    adaptive = "adaptive" in name

    def tup(v, default):
        if v is None or (isinstance(v, (list, tuple)) and not v):
            v = default
        if isinstance(v, int):
            return [v] * nsp
        v = list(v)
        return v * nsp if len(v) == 1 else v
    if not adaptive:
        ks = tup(ctx.val("kernel_size"), 1)
        st = tup(ctx.val("stride"), ks)
        pd = tup(ctx.val("padding"), 0)
    for k in range(nsp):
        d = lead + k
        if adaptive:
            if out_shape[d] == xs[d]:
                continue
            if out_shape[d] == 1:
                special[sl[k]] = ("all-reduce", (f"{name} pools over all of dim {d}, which "
                                  f"{ctx.axis} partitions"), False)
                continue
        elif ks[k] == 1 and st[k] == 1 and pd[k] == 0:
            continue
        special[sl[k]] = ("halo-exchange", (f"{name} window along dim {d}, which {ctx.axis} "
                          "partitions, reads neighbouring shards"), True)
    return _engine(ctx, {x: xl}, _tuple_out(ctx, xl), special=special)


def _rule_unfold(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    r = len(ctx.shape(0))
    dim = _norm_dim(ctx.val("dimension"), r)
    if dim == p.dim:
        return ctx.barrier("halo-exchange", f"unfold windows along dim {dim}, which {ctx.axis} "
                           "partitions, straddle shards")
    return ctx.free(p)


def _rule_glu(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    r = len(ctx.shape(0))
    if _norm_dim(ctx.val("dim", -1), r) == p.dim:
        return ctx.barrier("all-to-all", f"glu halves dim {p.dim}, which {ctx.axis} partitions")
    return ctx.free(p)


def _rule_prelu(ctx: Ctx) -> Plan:
    x, w = 0, 1
    r = len(ctx.shape(x))
    letters = {x: tuple(range(r)), w: (1,) if ctx.shape(w) and ctx.shape(w)[0] > 1 else (None,)}
    return _engine(ctx, letters, tuple(range(r)))


def _rule_upsample(ctx: Ctx) -> Plan:
    name = ctx.op.split(".")[1]
    nsp = int(re.search(r"(\d)d", name).group(1))
    p = ctx.part(0)
    xs, os_ = ctx.shape(0), ctx.out_type.shape
    d = p.dim
    if d < len(xs) - nsp:
        return ctx.free(p)
    if "nearest" in name and os_[d] % xs[d] == 0:
        # nearest with an integer ratio repeats every element: the factor stays, each element wider
        return ctx.free(Part(d, p.outer, p.inner * (os_[d] // xs[d])))
    return ctx.barrier("halo-exchange", f"{name} interpolates along dim {d}, which {ctx.axis} "
                       "partitions, from neighbouring shards", out=p if os_[d] == xs[d] else None)


def _rule_rnn(ctx: Ctx) -> Plan:
    """aten.lstm/gru/rnn_tanh/rnn_relu .input: a recurrence along the time dim."""
    x = ctx.si("input")
    rx = len(ctx.shape(x))
    batch_first = bool(ctx.val("batch_first", False))
    if rx == 3:
        xl = ("n", "t", "f") if batch_first else ("t", "n", "f")
        hl = (None, "n", "h")
    else:
        xl, hl = ("t", "f"), (None, "h")
    letters = {x: xl}
    for i in ctx.sis("hx") or [ctx.si("hx")]:
        if i is not None:
            letters[i] = hl
    ol = tuple("o" if L == "f" else L for L in xl)
    hy = tuple(None if L == "h" else L for L in hl)
    special = {"t": ("scan", (f"{ctx.short} carries its state along the time dim, which {ctx.axis} "
                     "partitions: each shard needs the previous one's final state"), True)}
    out = [ol] + [hy for _ in ctx.out_type.items[1:]]
    return _engine(ctx, letters, out, special=special, contract=_contract_reason(ctx))


def _single(rule):
    """Rules that read one partitioned tensor (operand 0) and ignore the other operands' layout."""
    def wrapped(ctx: Ctx) -> Plan:
        others = [i for i in ctx.parted() if i != 0]
        if others or ctx.part(0) is None:
            return ctx.barrier("unknown", f"{ctx.short}: no rule for a partitioned operand "
                               f"{others[0] if others else 0}")
        return rule(ctx)
    return wrapped


_VIEWS = {"view", "reshape", "_unsafe_view", "view_copy", "_reshape_alias", "squeeze", "unsqueeze",
          "flatten", "unflatten", "squeeze_copy", "unsqueeze_copy"}
_PERMUTES = {"permute", "transpose", "t", "numpy_T", "mT", "mH", "adjoint", "movedim", "swapaxes",
             "swapdims", "permute_copy", "transpose_copy"}
_IDENTITY = {"clone", "_to_copy", "to", "alias", "detach", "lift_fresh_copy", "contiguous", "copy",
             "zeros_like", "ones_like", "full_like", "empty_like", "fill", "type_as", "masked_fill",
             "where", "__and__", "__or__", "__xor__", "__lshift__", "__rshift__", "bitwise_and",
             "bitwise_or", "bitwise_xor", "logical_and", "logical_or", "logical_xor", "floor_divide",
             "hardswish", "hardsigmoid", "relu6", "alias_copy", "detach_copy", "clamp_min",
             "clamp_max", "copysign", "positive", "_conj", "resolve_conj", "resolve_neg",
             "_assert_tensor_metadata"}
_RANDOM = {"rand_like", "randn_like", "randint_like", "bernoulli", "native_dropout", "dropout",
           "feature_dropout", "alpha_dropout", "normal", "uniform", "exponential", "geometric",
           "cauchy", "log_normal", "poisson"}
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "prod", "any", "all",
           "var", "std", "var_mean", "std_mean", "logsumexp", "linalg_vector_norm", "norm",
           "count_nonzero", "nansum", "nanmean", "aminmax"}
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "outer", "ger",
           "linear", "matmul"}
_CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
         "conv_transpose2d", "conv_transpose3d"}
_POOL = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
         "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_avg_pool1d",
         "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
         "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"}
_ALONG = {
    "softmax": ("all-reduce", "normalizes over"), "_softmax": ("all-reduce", "normalizes over"),
    "log_softmax": ("all-reduce", "normalizes over"), "_log_softmax": ("all-reduce", "normalizes over"),
    "cumsum": ("scan", "accumulates along"), "cumprod": ("scan", "accumulates along"),
    "cummax": ("scan", "accumulates along"), "cummin": ("scan", "accumulates along"),
    "logcumsumexp": ("scan", "accumulates along"),
}
_SORTS = {"sort", "argsort", "topk", "kthvalue", "median", "nanmedian", "mode", "msort"}


def _dispatch(ctx: Ctx) -> Plan:
    name = ctx.op.split(".")[1] if ctx.op.count(".") == 2 else ctx.op
    if name in _RANDOM:
        if name == "dropout" and not ctx.val("train", False):
            return _elementwise(ctx)
        return _elementwise(ctx, random=True)
    if name in _IDENTITY or _pointwise(ctx.op):
        return _elementwise(ctx)
    if name in _VIEWS:
        return _single(_rule_reshape)(ctx)
    if name in _PERMUTES:
        return _single(lambda c: _rule_permute(c, _perm_of(c)))(ctx)
    if name in ("expand", "expand_copy"):
        return _single(_rule_expand)(ctx)
    if name == "repeat":
        return _single(_rule_repeat)(ctx)
    if name == "repeat_interleave":
        return _single(_rule_repeat_interleave)(ctx)
    if name in ("select", "select_copy"):
        return _single(_rule_select)(ctx)
    if name in ("slice", "narrow", "slice_copy"):
        return _single(_rule_slice)(ctx)
    if name in ("split", "split_with_sizes", "chunk", "unbind", "unsafe_split",
                "split_with_sizes_copy", "unsafe_split_with_sizes"):
        return _single(_rule_split)(ctx)
    if name == "cat":
        return _rule_cat(ctx)
    if name == "stack":
        return _rule_stack(ctx)
    if name == "flip":
        return _single(_rule_flip)(ctx)
    if name == "roll":
        return _single(_rule_roll)(ctx)
    if name in ("constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
                "replication_pad1d", "replication_pad2d", "replication_pad3d"):
        return _single(_rule_pad)(ctx)
    if name in ("tril", "triu"):
        return _single(_rule_tri)(ctx)
    if name in ("new_zeros", "new_ones", "new_full", "new_empty", "new_empty_strided"):
        return _rule_new(ctx)
    if name in _REDUCE:
        return _single(_rule_reduce)(ctx)
    if name in _ALONG:
        coll, verb = _ALONG[name]
        return _single(lambda c: _rule_along(c, coll, verb))(ctx)
    if name in _SORTS:
        return _single(lambda c: _rule_along(c, "all-gather", "orders along", stays=False))(ctx)
    if name in ("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"):
        return _rule_layer_norm(ctx)
    if name in ("group_norm", "native_group_norm"):
        return _rule_group_norm(ctx)
    if name in ("batch_norm", "native_batch_norm", "_native_batch_norm_legit",
                "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional"):
        return _rule_batch_norm(ctx)
    if name in _MATMUL:
        return _rule_matmul(ctx)
    if name == "einsum":
        return _rule_einsum(ctx)
    if name == "scaled_dot_product_attention":
        return _rule_sdpa(ctx)
    if name == "embedding":
        return _rule_embedding(ctx)
    if name == "one_hot":
        return _rule_one_hot(ctx)
    if name == "gather":
        return _rule_gather(ctx)
    if name == "index_select":
        return _rule_index_select(ctx)
    if name == "index" and ctx.op.endswith(".Tensor"):
        return _rule_index(ctx)
    if name in _CONV:
        return _rule_conv(ctx)
    if name in _POOL:
        return _single(_rule_pool)(ctx)
    if name == "unfold":
        return _single(_rule_unfold)(ctx)
    if name == "glu":
        return _single(_rule_glu)(ctx)
    if name in ("prelu", "_prelu_kernel"):
        return _rule_prelu(ctx)
    if name.startswith(("upsample_", "_upsample_")):
        return _single(_rule_upsample)(ctx)
    if name in ("lstm", "gru", "rnn_tanh", "rnn_relu") and ctx.op.endswith(".input"):
        return _rule_rnn(ctx)
    return ctx.barrier("unknown", f"no rule for {ctx.op}")


def rule(ctx: Ctx) -> Plan:
    """The plan of one application along one axis."""
    if not ctx.parted():
        # every operand replicated: every worker computes the same value
        out = None if not isinstance(ctx.out_type, TupleType) else tuple(None for _ in
                                                                          ctx.out_type.items)
        return Plan(tuple(None for _ in ctx.slots), out)
    try:
        return _dispatch(ctx)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        return ctx.barrier("unknown", f"{ctx.short}: no rule for these arguments "
                           f"({type(exc).__name__})")


# ------------------------------------------------------------------------------------------- FLOPs

_ZERO_FLOP = (_VIEWS | _PERMUTES | {"expand", "expand_copy", "select", "slice", "narrow", "split",
                                     "split_with_sizes", "chunk", "unbind", "cat", "stack", "clone",
                                     "_to_copy", "to", "alias", "detach", "lift_fresh_copy",
                                     "contiguous", "copy", "zeros_like", "ones_like", "full_like",
                                     "empty_like", "fill", "new_zeros", "new_ones", "new_full",
                                     "new_empty", "embedding", "index", "gather", "index_select",
                                     "one_hot", "repeat", "repeat_interleave", "flip", "roll",
                                     "constant_pad_nd", "pad", "getitem", "tuple", "arange", "zeros",
                                     "ones", "full", "empty", "scalar_tensor", "unfold",
                                     "_assert_tensor_metadata"})


def _numel(t) -> int:
    if isinstance(t, TensorType):
        return t.numel
    if isinstance(t, TupleType):
        return sum(_numel(i) for i in t.items)
    return 0


def estimate_flops(prim: Prim, slot_types: list, out_type) -> int:
    """FLOPs of one application: contractions by formula (2 per multiply-add), elementwise ops the
    result's elements, reductions and normalisations the input's elements, views and copies 0."""
    op = prim.op
    name = op.split(".")[1] if op.count(".") == 2 else op
    if name in _ZERO_FLOP:
        return 0
    shapes = [t.shape if isinstance(t, TensorType) else None for t in slot_types]
    first = out_type.items[0] if isinstance(out_type, TupleType) else out_type
    out_n = first.numel if isinstance(first, TensorType) else 0
    try:
        if name in ("linear", "addmm", "mm", "bmm", "baddbmm", "matmul", "addbmm", "mv", "addmv"):
            a = {"addmm": 1, "baddbmm": 1, "addbmm": 1, "addmv": 1}.get(name, 0)
            k = shapes[a][-1]
            f = 2 * out_n * k
            if name == "addbmm":
                f *= shapes[a][0]
            if name in ("addmm", "baddbmm", "addbmm", "addmv") or (name == "linear" and len(shapes) > 2):
                f += out_n
            return f
        if name in ("dot", "vdot"):
            return 2 * shapes[0][0]
        if name in _CONV:
            w = shapes[1]  # [Cout, Cin/groups, *k] (transposed: [Cin, Cout/groups, *k])
            transposed = name.startswith("conv_transpose") or (
                len(prim.args) > 6 and prim.args[6] is True)
            per = w[1] * math.prod(w[2:])
            bias = out_n if len(shapes) > 2 and shapes[2] else 0
            return 2 * (_numel(slot_types[0]) if transposed else out_n) * per + bias
        if name == "scaled_dot_product_attention":
            q, k, v = shapes[0], shapes[1], shapes[2]
            L, E, S, Ev = q[-2], q[-1], k[-2], v[-1]
            batch = out_n // max(L * Ev, 1)
            return batch * L * S * (2 * E + 2 * Ev + 3)
        if name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
            gates = {"lstm": 4, "gru": 3}.get(name, 1)
            x, out = shapes[0], first.shape
            steps = math.prod(x[:-1])
            return 2 * steps * gates * (x[-1] + out[-1]) * out[-1]
        if name == "einsum":
            return 2 * max(out_n, 1) * max(1, math.prod(s[-1] for s in shapes if s))
        if name in _POOL:
            return _numel(slot_types[0])
    except (IndexError, TypeError):
        pass
    if name in _REDUCE or name in _ALONG or name in _SORTS or name in (
            "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm", "group_norm",
            "native_group_norm", "batch_norm", "native_batch_norm", "_native_batch_norm_legit",
            "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional"):
        return _numel(slot_types[0]) if slot_types else out_n
    return out_n


def site_slot_types(program: Program, site: Site) -> list:
    """The types of a site's operand slots (holes from inference, bound tensors, constants)."""
    out = []
    for kind, ref in slot_positions(site.prim):
        if kind == "hole":
            out.append(site.inputs[ref] if ref < len(site.inputs) else None)
        elif kind == "tensor":
            out.append(program.tensors[ref].type)
        else:
            out.append(program.consts[ref].type)
    return out


# ----------------------------------------------------------------------------------- the analysis


class _Backend:
    def __init__(self, an: _Analysis):
        self.an = an
        self.tensors: dict[str, AVal] = {}

    def tensor(self, name):
        v = self.tensors.get(name)
        if v is None:
            v = self.tensors[name] = AVal(self.an.program.tensors[name].type, self.an.none_parts)
        return v

    def prim(self, prim, args, kwargs):
        return self.an.apply(prim, args, kwargs)


class _Analysis:
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
        if not isinstance(c.type, TensorType) or c.type.numel > _CONST_EVAL_LIMIT:
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
        from bwskc.runtime.denote import fill
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
        locs_vals = _walk_slots(args, kwargs)
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
            plan = rule(ctx)
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
        run_deep(denoter.run_entry, inputs)

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
    an = _Analysis(program, parsed)
    an.run()
    result = an.result()
    result.notes = notes
    return result


class CalmPass(Pass):
    name = "calm"
    kind = "analysis"
    requires = ()

    def analyze(self, program: Program, options: dict) -> CalmResult:
        return analyze(program, options.get("axes"))


PASS = CalmPass()
