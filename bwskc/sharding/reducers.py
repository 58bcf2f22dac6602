"""The all-reduce executors of a sharded run, keyed by the reducer names of ``passes/calm/schedule.py``:
each shard computes its partial statistics, an all-reduce combines them, the shard finishes locally.
Shards are equal (the schedule refuses uneven splits), so a mean of means is the mean."""
from __future__ import annotations

from collections.abc import Callable

import torch

from bwskc.passes.calm.context import Ctx, norm_dim
from bwskc.sharding.collectives import Comm

RUNS: dict[str, Callable] = {}


def runs(name: str):
    def register(fn):
        RUNS[name] = fn
        return fn
    return register


class Args:
    """A leaf's local arguments by schema name (what ``Ctx.val`` reads, with shard values)."""

    def __init__(self, ctx: Ctx, args: list, kwargs: dict):
        self.ctx, self.args, self.kwargs = ctx, args, kwargs

    def __getitem__(self, name):
        loc = self.ctx.names.get(name)
        if loc is None:
            return self.ctx.defaults.get(name)
        return self.args[loc[1]] if loc[0] == "a" else self.kwargs[loc[1]]


@runs("sum")
def run_sum(comm: Comm, ctx: Ctx, fn, args: list, kwargs: dict):
    """sum and mean over the partitioned dim: the shard's own, then their sum (a mean: over n)."""
    total = comm.all_reduce(fn(*args, **kwargs))
    return total / comm.n if ctx.short == "mean" else total


@runs("softmax")
def run_softmax(comm: Comm, ctx: Ctx, fn, args: list, kwargs: dict):
    """softmax / log_softmax along the partitioned dim: the global max (for stability only, so no
    gradient flows through it), then the global sum of exponentials."""
    x = args[0]
    dim = norm_dim(ctx.val("dim", -1), x.dim())
    m = comm.all_reduce(x.detach().amax(dim, keepdim=True), "max")
    e = torch.exp(x - m)
    s = comm.all_reduce(e.sum(dim, keepdim=True))
    return x - m - torch.log(s) if "log" in ctx.short else e / s


@runs("_native_batch_norm_legit_functional")
def run_batch_norm(comm: Comm, ctx: Ctx, fn, args: list, kwargs: dict):
    """Training batch norm over a partitioned batch (or positions): the global mean from all-reduced
    sums, the global biased variance from all-reduced squared deviations (two passes, as precise as one
    process's), then the shard normalises itself. Returns what the functional ATen op returns: the
    output, the batch mean and inverse std, the new running mean and (unbiased) running variance."""
    a = Args(ctx, args, kwargs)
    x, w, b = a["input"], a["weight"], a["bias"]
    rm, rv = a["running_mean"], a["running_var"]
    momentum, eps = float(a["momentum"]), float(a["eps"])
    dims = [0] + list(range(2, x.dim()))
    shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
    count = x.numel() // x.shape[1] * comm.n
    mean = comm.all_reduce(x.sum(dims)) / count
    dev = x - mean.view(shape)
    var = comm.all_reduce((dev * dev).sum(dims)) / count
    rstd = torch.rsqrt(var + eps)
    out = dev * rstd.view(shape)
    if w is not None:
        out = out * w.view(shape)
    if b is not None:
        out = out + b.view(shape)
    with torch.no_grad():
        new_rm = rm * (1 - momentum) + mean * momentum
        new_rv = rv * (1 - momentum) + var * (count / max(count - 1, 1)) * momentum
    return out, mean, rstd, new_rm, new_rv
