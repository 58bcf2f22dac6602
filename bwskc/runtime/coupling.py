"""Coupling chains at run time: the exact inverse, and an autograd Function that stores only the streams.

A chain ``Rk(add, f1..fn)`` (see ``bwskc.ir``) runs two streams from ``a = b = x``: step i adds
``f_i(b)`` to ``a`` (i odd, counting from 1) or ``f_i(a)`` to ``b`` (i even), and the chain returns
``a + b - x``. A step changes one stream by a function of the other, which it leaves alone, so it is
undone by subtracting the same value: walking the steps backwards from ``(a, b)`` gives back ``x``
(twice: ``a == b == x`` at the start, a check of the reconstruction).

``CouplingFunction`` is the chain as one ``torch.autograd.Function``: forward runs the steps without
recording a graph and saves only the final streams ``a`` and ``b`` (plus the parameters and shared
inputs, which exist anyway). Backward walks the steps in reverse: for step i it recomputes ``y = f_i(t)``
on the unchanged stream ``t`` with a graph (this layer only), reconstructs the updated stream's previous
value as ``s - y``, and back-propagates through ``y`` alone, then frees it. Each branch is replayed with
the dropout masks of its forward run: they are drawn from a counter-based generator keyed on the step's
seed, the chain, the branch and the site (``bwskc.runtime.rng``), never from global RNG state. The
steps' own ``+ y`` and ``- y`` go through ``bwskc.kernels.stream_update`` (Triton on CUDA, torch on CPU,
``BWSKC_KERNELS`` to force one). Which stream a step reads and which it updates is
``bwskc.runtime.steps``'s rule, shared with the traced twin (``compiled.TracedCouplingFunction``) and the
unrolled denotation.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bwskc.ir import Comb, Program, rev_shared
from bwskc.kernels.dispatch import stream_update  # the steps' add/subtract: Triton kernels on CUDA
from bwskc.runtime.steps import backward_step, forward_step, inverse_step, step_streams, update_step

# chains of this many steps and more record their last step's graph in forward instead of recomputing it
# first thing in backward (a shorter chain would store a large share of its activations that way)
KEEP_LAST_FROM = 4


def coupling_functions(program: Program, chain: Comb) -> tuple[Callable, Callable]:
    """Eager ``forward(*m, x) -> (a, b)`` and ``inverse(*m, a, b) -> (x,)`` of a chain's coupling (the
    typing pass's evidence; no merge), evaluated with the program's bound weights."""
    from bwskc.runtime.denote import Denoter
    from bwskc.runtime.interp import EagerBackend
    k = rev_shared(chain.kind)

    def branches(shared):
        den = Denoter(program, EagerBackend(program.weights))
        fs = []
        for f in chain.args[1:]:
            g = den.term(f)
            for m in shared:
                g = g(m)
            fs.append(g)
        return fs

    def forward(*args):
        shared, x = args[:k], args[k]
        with torch.no_grad():
            a, b = x, x
            for i, f in enumerate(branches(shared)):
                a, b = forward_step(i, a, b, f)
        return a, b

    def inverse(*args):
        shared, a, b = args[:k], args[k], args[k + 1]
        with torch.no_grad():
            fs = branches(shared)
            for i in reversed(range(len(fs))):
                a, b = inverse_step(i, a, b, fs[i](step_streams(i, a, b)[0]))
        return (a,)
    return forward, inverse


@dataclass
class ChainSpec:
    """What the Function needs to run a chain: one callable per branch taking
    ``(*shared, stream, seed, *its tensors)``, and for each branch the indices of its tensors among the
    chain's tensors (parameters, buffers and constants, passed to the Function so autograd sees them)."""

    branches: Sequence[Callable]
    tensor_index: Sequence[Sequence[int]]
    shared: int
    drift: list = field(default_factory=list)  # filled by backward when record_drift is set
    record_drift: bool = False


def autocast_state():
    """``(device type, enabled, dtype)`` of the autocast in effect: what a recomputation re-enters."""
    dev = "cuda" if torch.cuda.is_available() and torch.is_autocast_enabled("cuda") else "cpu"
    return dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)


def _stream_subtract(stream, y):
    return stream_update(stream, y, subtract=True)


class CouplingFunction(torch.autograd.Function):
    """``(spec, seed, x, *shared, *tensors) -> (a, b)``: the coupling of one chain (merge outside)."""

    @staticmethod
    def forward(ctx, spec: ChainSpec, seed: int, x, *rest):
        shared, tensors = rest[:spec.shared], rest[spec.shared:]
        n = len(spec.branches)
        keep = n >= KEEP_LAST_FROM
        a, b = x, x
        with torch.no_grad():
            for i, f in enumerate(spec.branches[:n - 1] if keep else spec.branches):
                mine = [tensors[j] for j in spec.tensor_index[i]]
                a, b = forward_step(i, a, b, lambda src: f(*shared, src, seed, *mine), stream_update)
        ctx.kept = None
        if keep:
            # the last step's activations are what backward needs first: recorded now, as revlib keeps
            # its final block, instead of recomputed at once (one branch stored per chain, any depth)
            i = n - 1
            src_in = step_streams(i, a, b)[0].detach().requires_grad_(True)
            shared_in = [m.detach().requires_grad_(m.requires_grad) for m in shared]
            mine = [tensors[j] for j in spec.tensor_index[i]]
            with torch.enable_grad():
                y = spec.branches[i](*shared_in, src_in, seed, *mine)
            with torch.no_grad():
                a, b = update_step(i, a, b, y.detach(), stream_update)
            ctx.kept = (y, src_in, shared_in, mine)
        if n == 1:
            b = b.clone()  # an output must not be the input itself
        ctx.spec, ctx.seed, ctx.autocast = spec, seed, autocast_state()
        ctx.save_for_backward(a, b, *shared, *tensors)
        return a, b

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        spec: ChainSpec = ctx.spec
        a, b, *rest = ctx.saved_tensors
        shared, tensors = rest[:spec.shared], rest[spec.shared:]
        grad_a = torch.zeros_like(a) if grad_a is None else grad_a
        grad_b = torch.zeros_like(b) if grad_b is None else grad_b
        shared_grads: list = [None] * len(shared)
        tensor_grads: list = [None] * len(tensors)
        dev, enabled, dtype = ctx.autocast
        shared_in = [m.detach().requires_grad_(m.requires_grad) for m in shared]
        kept, ctx.kept = ctx.kept, None  # used once: a second backward (retain_graph) recomputes
        for i in reversed(range(len(spec.branches))):
            f = spec.branches[i]
            index = spec.tensor_index[i]
            mine = [tensors[j] for j in index]
            if kept is not None and i == len(spec.branches) - 1:
                y, src_in, kept_shared, mine = kept  # the forward's own tensors: y's graph reads them
                kept = None
                wrt_shared = kept_shared
            else:
                src_in = step_streams(i, a, b)[0].detach().requires_grad_(True)
                with torch.enable_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
                    y = f(*shared_in, src_in, ctx.seed, *mine)
                wrt_shared = shared_in
            with torch.no_grad():  # undo the step: the updated stream loses y again
                a, b = inverse_step(i, a, b, y, _stream_subtract)
            wrt = [src_in] + [m for m in wrt_shared if m.requires_grad] + [t for t in mine if t.requires_grad]
            grads = torch.autograd.grad(y, wrt, step_streams(i, grad_a, grad_b)[1], allow_unused=True)
            del y
            it = iter(grads)
            grad_a, grad_b = backward_step(i, grad_a, grad_b, next(it))
            for j, m in enumerate(wrt_shared):
                if m.requires_grad:
                    g = next(it)
                    if g is not None:
                        shared_grads[j] = g if shared_grads[j] is None else shared_grads[j] + g
            for j, t in zip(index, mine):
                if t.requires_grad:
                    g = next(it)
                    if g is not None:
                        tensor_grads[j] = g if tensor_grads[j] is None else tensor_grads[j] + g
        if spec.record_drift:  # both streams are x again: their difference is the drift
            spec.drift[:] = [float((a - b).abs().max())]
        return (None, None, grad_a + grad_b, *shared_grads, *tensor_grads)
