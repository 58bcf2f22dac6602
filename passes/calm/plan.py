"""What the CALM analysis says: where an axis sits (``Part``), one application's ``Plan``, the
``CalmResult``, and running a plan on real tensors (``shard``, ``unshard``, ``local_literals``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bwskc.ir import Prim
from bwskc.placement import Part  # noqa: F401  (the analysis' vocabulary, defined with the IR)

COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "halo-exchange", "scan", "broadcast",
               "position-offset", "unknown")


# --------------------------------------------------------------------------------------- partitions


@dataclass(frozen=True)
class Plan:
    """What one application of a leaf does along one axis.

    ``ins``: per operand slot, how a worker cuts it (its own partition for a partitioned operand, a
    slice for a replicated one that meets the partitioned dim, None to use it whole). ``out``: where the
    axis sits in the result (a tuple for a tuple result; None: replicated). ``collective``: None when
    coordination-free. ``rebase``: slots holding global positions along the partitioned dim (a worker
    subtracts its offset). ``random``: the op draws random numbers (a sharded run draws each shard's slice
    of the single-process numbers: ``bwskc.runtime.rng.Window``).
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


# ------------------------------------------------------------------------------------------ results


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


# ----------------------------------------------------------------------------------- running a plan


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
SHAPE_ARG = {"aten.view.default": 1, "aten.reshape.default": 1, "aten._unsafe_view.default": 1,
             "aten.expand.default": 1, "aten.view_copy.default": 1, "aten.expand_copy.default": 1}


def local_literals(prim: Prim, args: list, kwargs: dict, local_out_shape) -> tuple[list, dict]:
    """The arguments a worker passes: shape literals (view sizes, adaptive pools' and interpolations'
    output sizes) rewritten to its local shape."""
    if local_out_shape is None:
        return args, kwargs
    i = SHAPE_ARG.get(prim.op)
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
