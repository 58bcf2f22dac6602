"""The collectives a sharded run makes: ``torch.distributed``'s functional collectives (differentiable:
an all-gather's backward is a reduce-scatter, an all-reduce's an all-reduce), each logged with its site
and payload so a run's communication can be compared with its schedule's prediction.

Gradient convention (Megatron's): a sharded value's gradient is exact on its shard; a replicated value's
gradient is ``Partial()``, each process holding a share that sums to it. The outputs a module returns
whole enter it with ``grad / n`` (``split_grad``) and the parameters' gradients are all-reduced.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from bwskc.passes.calm.plan import Part


class Comm:
    """One process's view of the group: its rank, the size, and the log of the collectives it ran."""

    def __init__(self, group=None):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.n = dist.get_world_size(self.group)
        self.log: list[tuple[int | None, str, int]] = []
        self.site: int | None = None  # the leaf site being run (what the log entries are keyed by)

    def _record(self, collective: str, t: torch.Tensor) -> None:
        self.log.append((self.site, collective, t.numel() * t.element_size()))

    def all_gather(self, local: torch.Tensor, part: Part) -> torch.Tensor:
        """The whole tensor from every process's shard along ``part`` (equal shards)."""
        shape = list(local.shape)
        d = part.dim
        s = shape[d] // (part.outer * part.inner)
        v = local.reshape(shape[:d] + [part.outer, s, part.inner] + shape[d + 1:])
        whole = funcol.wait_tensor(funcol.all_gather_single_autograd(v.contiguous(), d + 1, self.group))
        out = whole.reshape(shape[:d] + [part.outer * s * self.n * part.inner] + shape[d + 1:])
        self._record("all-gather", out)
        return out

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The sum (or max, min) of ``t`` over the processes; differentiable for ``sum``."""
        self._record("all-reduce", t)
        return funcol.wait_tensor(funcol.all_reduce(t.contiguous(), op, self.group))

    def reduce_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        """A parameter's gradient: the sum of every process's share (not logged per site)."""
        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", self.group))


class _SplitGrad(torch.autograd.Function):
    """Identity forward; backward divides by n: a loss every process computes alike on a whole output
    gives each the whole gradient, of which its ``Partial()`` share is 1/n."""

    @staticmethod
    def forward(ctx, x, n):
        ctx.n = n
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g / ctx.n, None


def split_grad(x: torch.Tensor, n: int) -> torch.Tensor:
    return _SplitGrad.apply(x, n) if x.requires_grad else x
