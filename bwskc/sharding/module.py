"""Running a program split along one axis over N processes (``torch.distributed``: gloo on CPU, nccl on
CUDA), as its CALM schedule says (``passes/calm/schedule.py``).

Every process runs the whole program on its shard. A value is a ``Placed``: the process's local tensor
and the abstract value the analysis gives it (its global type and where the axis sits). At each leaf the
executor redoes the analysis' step for the placements it meets (the same rule, the same derivation) and
checks the step is one the schedule holds, so what runs is what the schedule printed: a free plan on the
shards alone (replicated operands that meet the partitioned dim sliced by the shard's offset, global
positions rebased, view sizes made local), an all-reduce executor, or the gathers then the free plan.
Outputs come back whole on every process; parameters are replicated and their gradients all-reduced
(``collectives.py`` has the gradient convention).
"""
from __future__ import annotations

import torch
from torch import nn

from bwskc._deep import run_deep
from bwskc.errors import BwskError
from bwskc.ir import Program, TensorType, TupleType
from bwskc.op_values import resolve_op
from bwskc.passes.calm.context import AVal, Ctx, walk_slots
from bwskc.passes.calm.engine import plan_of
from bwskc.passes.calm.plan import Part, local_literals, local_shape, shard
from bwskc.passes.calm.schedule import Schedule, Scheduler, derive_step, local_size
from bwskc.sharding.collectives import Comm, split_grad
from bwskc.runtime import random_ops, rng
from bwskc.runtime.compiled import RNG_BUFFER
from bwskc.runtime.denote import Denoter, implied_updates, update_target
from bwskc.runtime.interp import bind_inputs
from bwskc.sharding.reducers import RUNS


class Placed:
    """A value on one process: its local tensor (or tuple of them) and its abstract value."""

    __slots__ = ("aval", "local")

    def __init__(self, local, aval: AVal):
        self.local, self.aval = local, aval

    @property
    def part(self) -> Part | None:
        return self.aval.parts[0]


def _map(args, fn):
    """``args`` with every ``Placed`` (also inside lists) replaced by ``fn(placed)``."""
    out = []
    for a in args:
        if isinstance(a, Placed):
            out.append(fn(a))
        elif isinstance(a, (list, tuple)):
            out.append(type(a)(fn(b) if isinstance(b, Placed) else b for b in a))
        else:
            out.append(a)
    return out


def _at(args, kwargs, loc):
    v = args[loc[1]] if loc[0] == "a" else kwargs[loc[1]]
    return v if len(loc) == 2 else v[loc[2]]


def _put(args: list, kwargs: dict, locs: list, values: list) -> tuple[list, dict]:
    """``args``/``kwargs`` with the operand slot at each location set to its local value."""
    args, kwargs = [list(a) if isinstance(a, (list, tuple)) else a for a in args], dict(kwargs)
    for loc, v in zip(locs, values):
        where = args if loc[0] == "a" else kwargs
        if len(loc) == 2:
            where[loc[1]] = v
        else:
            where[loc[1]][loc[2]] = v
    return args, kwargs


class ShardedBackend:
    def __init__(self, module: ShardedModule, seed=None):
        self.m = module
        self.an = module.scheduler
        self.comm = module.comm
        self.updates: list[tuple[str, torch.Tensor]] = []
        # random ops draw as the single-process conventional module does (bwskc.runtime.compiled): the
        # step's seed, sites numbered in the walk's order, and each shard's numbers the slice of the
        # whole draw at its global coordinates (``rng.Window``), so a split run drops what one process
        # drops, not the same local pattern on every shard
        self.seed = seed
        self.draws = 0

    def tensor(self, name):
        return Placed(self.m.tensor(name), AVal(self.m.program.tensors[name].type, (None,)))

    # -- placements
    def _size(self, part: Part, shape) -> int:
        return local_size(part, shape, self.comm.n)

    def localize(self, v: Placed, want: Part | None) -> torch.Tensor:
        """``v``'s local tensor placed as ``want``: sliced from a whole value, gathered from a shard."""
        have, t = v.part, v.local
        if have == want:
            return t
        if have is not None:
            t = self.comm.all_gather(t, have)
        if want is None:
            return t
        n = self.comm.n
        return shard(t, want, [want.factor(t.shape) // n] * n)[self.comm.rank]

    def offset(self, part: Part, shape) -> int:
        return self.comm.rank * self._size(part, shape)

    # -- one leaf
    def prim(self, prim, args, kwargs):
        sids = self.an.by_prim.get(id(prim), [])
        sid = sids[0] if sids else None
        site = self.an.sites[sid] if sids else None
        where = None
        if prim.op in random_ops.REPLAY and random_ops.draws(prim.op, args, kwargs):
            where = (-1, -1, self.draws)  # the conventional module's site of this draw
            self.draws += 1
        if site is not None and site.is_const:  # computed from parameters and literals: replicated
            return self._whole(prim, args, kwargs, where)
        if prim.op == "getitem":
            tup, i = args[0], args[1]
            it = tup.aval.items[i] if tup.aval.items is not None else AVal(prim.type, (None,))
            return Placed(tup.local[i], it)
        if prim.op == "tuple":
            items = [a if isinstance(a, Placed) else Placed(a, AVal(prim.type, (None,))) for a in args]
            return Placed(tuple(a.local for a in items),
                          AVal(prim.type, (None,), None, tuple(a.aval for a in items)))
        aargs = _map(args, lambda p: p.aval)
        akwargs = dict(zip(kwargs, _map(list(kwargs.values()), lambda p: p.aval)))
        locs_vals = walk_slots(aargs, akwargs)
        locs = [loc for loc, _ in locs_vals]
        placed = [_at(args, kwargs, loc) for loc in locs]
        ctx = Ctx(self.an, prim, aargs, akwargs, [v for _, v in locs_vals], locs, 0)
        step = derive_step(ctx, plan_of(ctx))
        if sid is not None and step not in self.m.schedule.steps.get(sid, []):
            raise BwskError(f"sharded run: site {sid} ({prim.op} in {site.scope}) met placements its "
                            "schedule holds no step for")
        self.comm.site = sid
        try:
            out = self._run(prim, args, kwargs, ctx, step, placed, locs, where)
            for _arg, result, name in implied_updates(prim):
                item = Placed(out.local[result], out.aval.items[result])
                self.updates.append((name, self.localize(item, None)))
        finally:
            self.comm.site = None
        return out

    def _whole(self, prim, args, kwargs, where=None):
        """A leaf no partitioned value reaches (a constant, or all operands replicated): run whole."""
        lv = _map(args, lambda p: p.local)
        lk = dict(zip(kwargs, _map(list(kwargs.values()), lambda p: p.local)))
        return Placed(self._op(prim, where, None)(*lv, **lk), self.an._make(prim.type, [None], None))

    def _op(self, prim, where, made):
        """The leaf's function: the op, or for a draw its counter-based rule through this shard's window
        of the result (``made``: where the local run puts it)."""
        if where is None:
            return resolve_op(prim.op)
        part = next((q for q in made if q is not None), None) if isinstance(made, tuple) else made
        window = 0
        if isinstance(part, Part):
            ty = prim.type.items[0] if isinstance(prim.type, TupleType) else prim.type
            local = self._size(part, ty.shape)
            window = rng.Window(part.dim, part.outer, part.inner, self.comm.rank * local, local,
                                part.factor(ty.shape))
        if self.seed is None:  # evaluation: a pure draw's eval key, through the same window
            def draw(*a, **k):
                with random_ops.evaluating_through(window):
                    return random_ops.draw(prim.op, a, k, None, where)
            return draw
        seed = (self.seed[0], window)
        return lambda *a, **k: random_ops.draw(prim.op, a, k, seed, where)

    def _run(self, prim, args, kwargs, ctx: Ctx, step, placed: list[Placed], locs, where=None):
        local = step.local
        shapes = [ctx.shape(i) for i in range(len(placed))]
        vals = []
        for i, v in enumerate(placed):
            want = None if i in step.gather else local.ins[i]
            t = self.localize(v, want) if isinstance(v.aval.type, TensorType) else v.local
            if i in local.rebase and want is not None:
                t = t - self.offset(want, shapes[i])
            vals.append(t)
        largs = _map(args, lambda p: p.local)
        lkwargs = dict(zip(kwargs, _map(list(kwargs.values()), lambda p: p.local)))
        largs, lkwargs = _put(largs, lkwargs, locs, vals)
        fn = self._op(prim, where, local.out)
        if step.reducer is not None:
            result = RUNS[step.reducer](self.comm, ctx, fn, largs, lkwargs)
        else:
            out_shape = local_shape(prim.type.shape, local.out, self._size(local.out, prim.type.shape)) \
                if isinstance(local.out, Part) and isinstance(prim.type, TensorType) else None
            largs, lkwargs = local_literals(prim, largs, lkwargs, out_shape)
            result = fn(*largs, **lkwargs)
        return self._place(prim, result, local.out, step.plan.out)

    def _place(self, prim, result, made, want):
        """The result moved from the local plan's placement (``made``) to the analysis' (``want``)."""
        if isinstance(prim.type, TupleType):
            made = made if isinstance(made, tuple) else tuple(None for _ in prim.type.items)
            want = want if isinstance(want, tuple) else tuple(None for _ in prim.type.items)
            items = []
            for k, r in enumerate(result):
                if isinstance(r, torch.Tensor) and k < len(made) and made[k] != want[k]:
                    r = self.localize(Placed(r, AVal(prim.type.items[k], (made[k],))), want[k])
                items.append(r)
            return Placed(tuple(items), self.an._make(prim.type, [want], None))
        if made != want:
            result = self.localize(Placed(result, AVal(prim.type, (made,))), want)
        return Placed(result, self.an._make(prim.type, [want], None))


def _attach(root: nn.Module, name: str, value: torch.Tensor, param: bool) -> None:
    *path, leaf = name.split(".")
    m = root
    for p in path:
        if not hasattr(m, p):
            m.add_module(p, nn.Module())
        m = getattr(m, p)
    if param:
        m.register_parameter(leaf, value)
    else:
        m.register_buffer(leaf, value)


class ShardedModule(nn.Module):
    """The program split along ``schedule.axis`` over the group's processes. Call it on every process
    with the same whole inputs: each process takes its shard, runs its part, and returns the outputs
    whole. A loss computed alike on every process and ``backward()`` give every process the gradients
    of one process running the whole program (they are all-reduced as they are produced).

    ``module.comm.log`` lists the forward collectives each call ran (site id, collective, payload
    bytes), the same list as ``module.schedule.comm`` for one call.
    """

    def __init__(self, program: Program, sch: Schedule, group=None, eval_program: Program | None = None,
                 eval_schedule: Schedule | None = None, seed: int = 0):
        super().__init__()
        self.comm = Comm(group)
        self.captures = {True: (program, sch)}
        if eval_program is not None:
            self.captures[False] = (eval_program, eval_schedule)
        for _prog, s in self.captures.values():
            if s.problems:
                raise BwskError(f"shard: {s.problems[0]}")
            if self.comm.n != s.nproc:
                raise BwskError(f"shard: the schedule is for {s.nproc} processes, the group has "
                                f"{self.comm.n}")
        self.schedulers = {k: Scheduler(p, s.axis, [(n, q.dim) for n, q in s.inputs.items()
                                                     if q is not None], s.nproc)
                           for k, (p, s) in self.captures.items()}
        seen, made = set(), {}
        for prog, _s in self.captures.values():  # the captures share their parameters and buffers
            for name, value in prog.weights.items():
                if name in seen:
                    continue
                seen.add(name)
                decl = prog.tensors.get(name)
                is_param = decl is not None and decl.kind == "param" and value.dtype.is_floating_point
                # tied weights (an LM head sharing the embedding) stay one tensor under both names
                own = made.get(id(value))
                if own is None:
                    own = made[id(value)] = nn.Parameter(value.detach().clone()) if is_param else \
                        value.detach().clone()
                _attach(self, name, own, is_param)
        self._params = {n for n, _ in self.named_parameters(remove_duplicate=False)}
        for p in self.parameters():
            p.register_hook(self.comm.reduce_gradient)
        # the step's seed as the compiled module keeps it ([base, step, training, shard]): the same
        # seed and step give the single-process module's random numbers
        self.register_buffer(RNG_BUFFER, torch.tensor([seed, 0, 1, 0], dtype=torch.int64), persistent=False)

    def reseed(self, seed: int, step: int = 0):
        """Restart the random stream: the next call draws what a single-process module compiled from
        the same program draws after ``reseed(seed, step)``."""
        state = getattr(self, RNG_BUFFER)
        state[0], state[1] = seed, step

    @property
    def _mode(self) -> bool:
        return self.training if self.training in self.captures else True

    @property
    def program(self) -> Program:
        """The capture a call runs: training, or evaluation after ``eval()`` when one was captured."""
        return self.captures[self._mode][0]

    @property
    def schedule(self) -> Schedule:
        return self.captures[self._mode][1]

    @property
    def scheduler(self) -> Scheduler:
        return self.schedulers[self._mode]

    def tensor(self, name: str) -> torch.Tensor:
        return self.get_parameter(name) if name in self._params else self.get_buffer(name)

    def forward(self, *args, **kwargs):
        inputs = bind_inputs(self.program, args, kwargs)
        placed = []
        for name, x in zip(self.program.entry.input_names, inputs):
            part = self.schedule.inputs.get(name)
            n = self.comm.n
            local = x if part is None else shard(x, part, [x.shape[part.dim] // n] * n)[self.comm.rank]
            placed.append(Placed(local, AVal(type_of(x), (part,))))
        self.comm.log = []
        backend = ShardedBackend(self, rng.step_seed(getattr(self, RNG_BUFFER), self.training))
        out, updates = run_deep(Denoter(self.program, backend).run_entry, placed, updates=True)
        names = self.program.entry.output_names
        if isinstance(out, Placed) and len(names) > 1 and isinstance(out.local, tuple):
            # the entry's tuple as one value: split it into the user outputs and the buffer updates
            values = [Placed(v, a) for v, a in zip(out.local, out.aval.items)]
            user = [v for n, v in zip(names, values) if update_target(n) is None]
            updates = [(update_target(n), v) for n, v in zip(names, values) if update_target(n)]
            out = user[0] if len(user) == 1 else tuple(user)
        if self.training:
            with torch.no_grad():
                for name, v in backend.updates + [(n, backend.localize(v, None)) for n, v in updates]:
                    self.tensor(name).copy_(v)
        whole = [split_grad(backend.localize(v, None), self.comm.n) for v in
                 (out if isinstance(out, tuple) else (out,))]
        return tuple(whole) if isinstance(out, tuple) else whole[0]


def type_of(x: torch.Tensor):
    from bwskc.ir import type_of_value
    return type_of_value(x)
