"""Trainable modules from programs: ``bwskc.compile``'s codegen.

The program becomes one ``torch.fx.GraphModule`` (parameters under their state-dict names), as
``program.to_fx()`` does, with two differences that training needs:

* dropout runs through ``bwskc.runtime.rng`` (counter-based masks keyed on a per-call seed and the
  dropout's place), switched off by ``module.eval()``;
* a training forward updates the buffers the model's own training forward mutates (batch norm's running
  statistics and ``num_batches_tracked``), in place, once per call, with that call's values: the
  updates a functional leaf implies where the leaf runs, the ``update:<buffer>`` entry outputs at the end
  (``assign_buffer``); a region recomputed in backward (a coupled branch, a checkpointed layer) applies
  its updates in the forward run only, never in the recomputation, and gradients do not depend on them;
* in reversible mode each coupling chain ``Rk(add, f..)`` is one call of ``CouplingFunction`` whose
  branches are compiled to their own small graphs (taking the parameters they use as inputs), so the
  chain stores only its two final streams. With ``store_activations=True`` (the reference) the chain is
  unrolled into plain ATen calls with the same masks: plain autograd over the same architecture.

Under ``torch.compile`` a chain runs as ``TracedCouplingFunction``, the traceable twin of
``CouplingFunction``; both take their steps from ``bwskc.runtime.steps``.
"""
from __future__ import annotations

import contextlib
import threading
from collections import Counter

import torch
from torch import fx

from bwskc._deep import run_deep
from bwskc.errors import BwskError
from bwskc.ir import Comb, Const, Prim, Program, Ref, is_layer, rev_shared, subterms, walk_terms
from bwskc.op_values import resolve_op
from bwskc.runtime import random_ops, rng
from bwskc.runtime.codegen import FxBackend, module_tree, placeholder_name, register_tensor
from bwskc.runtime.coupling import ChainSpec, CouplingFunction, autocast_state
from bwskc.runtime.denote import Denoter, implied_updates, sub_prim, update_target
from bwskc.runtime.steps import backward_step, forward_step, inverse_step, step_streams
from bwskc.runtime.random_ops import unreplayable_draw

RNG_BUFFER = "bwskc_rng_state"


_FORWARD = threading.local()  # depth of forward runs of recomputed regions (chains, checkpointed layers)


@contextlib.contextmanager
def _forward_run():
    """The forward run of a region backward recomputes: its buffer updates apply here, not in the
    recomputation (which runs outside this scope, in backward)."""
    _FORWARD.depth = getattr(_FORWARD, "depth", 0) + 1
    try:
        yield
    finally:
        _FORWARD.depth -= 1


def assign_buffer(buffer: torch.Tensor, value: torch.Tensor, seed, when: str, statistics: bool = False) -> None:
    """``buffer <- value`` in place, detached, under no_grad (a buffer update of a training forward).
    ``when``: ``train`` (the training capture's graph: in training mode only, ``seed`` None meaning
    evaluation), ``forward`` (inside a region backward recomputes: also only in its forward run),
    ``always`` (the evaluation capture's own updates, which the model's eval forward makes too).

    ``statistics``: the running statistics a functional batch norm implies. Autograd saves them (the
    batch-norm backward's signature takes them; a checkpoint saves its inputs), and a training-mode
    batch norm's value and gradients never read them, so they are written through ``.data``: the same
    storage, without the version bump that would make backward refuse a saved tensor that changed.
    Any other update is a plain in-place copy, which autograd checks: a buffer that a saved value
    depends on and that is then overwritten is an error, as in eager mode, not a silent wrong gradient."""
    if when != "always" and seed is None:
        return
    if when == "forward" and not getattr(_FORWARD, "depth", 0):
        return
    with torch.no_grad():
        (buffer.data if statistics else buffer).copy_(value.detach())


class _TrainBackend(FxBackend):
    """fx emission with counter-based dropout; ``reversible`` turns chains into CouplingFunction calls.
    ``updates`` is how buffer updates apply in this graph (``assign_buffer``'s ``when``)."""

    def __init__(self, graph: fx.Graph, seed, reversible: bool, chains: list, checkpoint: bool = False,
                 updates: str = "train"):
        super().__init__(graph)
        self.updates = updates
        self.checkpoint = checkpoint  # layers outside coupling chains: checkpointed, inputs stored
        self.seed = seed  # an fx node (the step's seed) or a placeholder in a branch graph
        self.reversible = reversible
        self.chains = chains  # shared list: chain-call counter and specs (for drift reports)
        self.where = (-1, -1)
        self.sites: Counter = Counter()
        if reversible:
            self.rev = self._rev

    def prim(self, prim, args, kwargs):
        if prim.op in random_ops.REPLAY and random_ops.draws(prim.op, args, kwargs):
            # every draw is counter-based, keyed on its site: a recomputation draws the same numbers
            site = self.sites[self.where]
            self.sites[self.where] += 1
            return self.graph.call_function(random_ops.draw, (prim.op, tuple(args), dict(kwargs), self.seed,
                                                              self.where + (site,)))
        implied = implied_updates(prim)
        if not implied:
            return super().prim(prim, args, kwargs)
        # a functional batch norm: its new running statistics are assigned to the buffers it read
        node = super().prim(prim, args, kwargs)
        for arg, result, _name in implied:
            new = self.graph.call_function(_getitem, (node, result))
            self.graph.call_function(assign_buffer, (args[arg], new, self.seed, self.updates, True))
        return node

    def wrap_def(self, d, value, denoter: Denoter):
        """A layer the rewrite left (``bert.encoder.layer.3``: a module-list element) runs under
        ``torch.utils.checkpoint``: its inputs are stored, its interior recomputed in backward. Its
        dropout sites keep the keys they have in conventional mode, so the masks are the same."""
        if not self.checkpoint or d.kind != "def" or not is_layer(d.name) or not d.inputs:
            return value
        if unreplayable_draw(denoter.program, Ref(d.name)) is not None:
            return value  # a recomputation would draw other numbers: stored, as conventional does
        n = len(d.inputs)

        def collect(got):
            if len(got) < n:
                return lambda v: collect(got + [v])
            start, chained = self.sites[self.where], len(self.chains)
            gm, needed, used = _branch_module(denoter.program, Ref(d.name), n - 1, self.where, frozenset(),
                                              site_start=start, chains=self.chains)
            decls = [denoter.program.tensors[key[1]] for key in needed]
            if not checkpoint_pays(gm, d, [(t.type, t.kind == "param") for t in decls]):
                # storing the layer's inputs would cost more than its interior saves: run it as
                # conventional does (its draws keep their sites, which the interior now numbers, and
                # its chains their numbers, given again)
                del self.chains[chained:]
                f = value
                for v in got:
                    f = f(v)
                return f
            self.sites[self.where] = start + used
            tensors = [self.tensor(key[1]) for key in needed]
            return self.graph.call_function(_CheckpointCall(gm, n), (self.seed, *got, *tensors))
        return collect([])

    @contextlib.contextmanager
    def branch_scope(self, t: Comb, i: int):
        if i == 0:
            self.chains.append(None)
        saved = self.where
        self.where = (len(self.chains) - 1, i)
        try:
            yield
        finally:
            self.where = saved

    def _rev(self, t: Comb, fs, shared, x, denoter: Denoter):
        self.chains.append(None)
        chain_id = len(self.chains) - 1
        k = rev_shared(t.kind)
        inputs: list = []  # root-graph nodes of the tensors and constants the branches read
        keys: dict = {}
        branches, index = [], []
        passed = _passed_consts(denoter.program, t.args[1:])
        for i, f in enumerate(t.args[1:]):
            gm, needed = _branch_module(denoter.program, f, k, (chain_id, i), passed)
            mine = []
            for key in needed:
                if key not in keys:
                    keys[key] = len(inputs)
                    inputs.append(self.tensor(key[1]) if key[0] == "tensor" else denoter.const(key[1]))
                mine.append(keys[key])
            branches.append(gm)
            index.append(tuple(mine))
        spec = ChainSpec(branches, index, k)
        spec.tensor_names = [key[1] for key in keys if key[0] == "tensor"]  # what the chain's branches read
        self.chains[chain_id] = spec
        pair = self.graph.call_function(_ChainCall(spec), (self.seed, x, *shared, *inputs))
        a = self.graph.call_function(_getitem, (pair, 0))
        b = self.graph.call_function(_getitem, (pair, 1))
        add, sub = resolve_op("aten.add.Tensor"), resolve_op(sub_prim(t.args[0]).op)
        return self.graph.call_function(add, (a, self.graph.call_function(sub, (b, x))))


def checkpoint_pays(gm: fx.GraphModule, d, tensors: list) -> bool:
    """Whether checkpointing a layer saves memory: the bytes its interior saves for backward (counted
    on fake tensors, which hold no memory: one storage once, parameters excluded) exceed the bytes of
    its activation inputs, which a checkpoint stores instead. Counted per layer, ignoring that a
    neighbour may save the same input anyway, so it errs towards storing, never above conventional;
    so does a layer fake tensors cannot run. ``tensors``: (type, whether a parameter) of what it reads
    besides its inputs. The layer's own factory calls (T5's relative-position ``arange(.., device=cpu)``)
    and constants become fake tensors too (``allow_non_fake_inputs``): on the meta device they met
    real CPU tensors and every such layer was stored, not checkpointed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(t, grad):
        x = torch.empty(t.shape, dtype=t.torch_dtype)
        return x.requires_grad_() if grad and x.is_floating_point() else x
    try:
        with mode:
            inputs = [fake(t, True) for t in d.inputs]
            tensors = [fake(t, is_param) for t, is_param in tensors]  # buffers take no gradient
    except (AttributeError, TypeError):
        return True  # tuple-typed inputs and the like: not counted
    skip = {t.untyped_storage()._cdata for t in tensors}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in skip:
            saved[st._cdata] = st.nbytes()
        return t
    try:
        with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            gm(*inputs, (0, 0), *tensors)
    except Exception:  # an op fake tensors cannot run (data-dependent shapes): not counted, so stored
        return False
    stored = sum(x.untyped_storage().nbytes() for x in inputs)
    return sum(saved.values()) > stored


def _getitem(pair, i):
    return pair[i]


class _ChainCall:
    """The fx call target of one chain (a named callable holding its spec)."""

    def __init__(self, spec: ChainSpec):
        self.spec = spec
        self.__name__ = self.__qualname__ = "coupling_chain"

    def __call__(self, seed, x, *rest):
        if torch.compiler.is_compiling():  # its forward run is scoped inside (dynamo traces backward too)
            return TracedCouplingFunction.apply(self.spec, seed, x, *rest)
        with _forward_run():
            return CouplingFunction.apply(self.spec, seed, x, *rest)


class TracedCouplingFunction(torch.autograd.Function):
    """``CouplingFunction`` as ``torch.compile`` traces it (``fullgraph=True``): the same steps, the
    same saved tensors (the two final streams, the shared inputs and the chain's tensors, plus the
    step's seed tensor, see ``rng.step_seed``), the same masks. Two things differ, both because the
    backward must be traceable: each branch's vector-Jacobian product is ``torch.func.vjp`` (dynamo
    does not trace ``torch.autograd.grad``), differentiating only what ``ctx.needs_input_grad`` asks
    for; and the stream updates are plain ``+`` and ``-``, which the compiler fuses itself (the Triton
    seam of ``bwskc.kernels`` is for eager). No reconstruction drift is recorded (``record_drift`` is
    the eager check's)."""

    @staticmethod
    def forward(ctx, spec: ChainSpec, seed, x, *rest):
        shared, tensors = rest[:spec.shared], rest[spec.shared:]
        a, b = x, x
        # the buffer updates of the forward run: scoped here, not around apply, since dynamo traces the
        # backward while tracing apply (its recomputation must not update them again)
        with torch.no_grad(), _forward_run():
            for i, f in enumerate(spec.branches):
                mine = [tensors[j] for j in spec.tensor_index[i]]
                a, b = forward_step(i, a, b, lambda src: f(*shared, src, seed, *mine))
        if len(spec.branches) == 1:
            b = b.clone()  # an output must not be the input itself
        ctx.spec, ctx.autocast, ctx.seeded = spec, autocast_state(), seed is not None
        ctx.save_for_backward(*((seed,) if seed is not None else ()), a, b, *shared, *tensors)
        return a, b

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        spec: ChainSpec = ctx.spec
        saved = list(ctx.saved_tensors)
        seed = saved.pop(0) if ctx.seeded else None
        a, b, *rest = saved
        k = spec.shared
        shared, tensors = rest[:k], rest[k:]
        needs = ctx.needs_input_grad  # (spec, seed, x, *shared, *tensors)
        shared_need = [j for j in range(k) if needs[3 + j]]
        grad_a = torch.zeros_like(a) if grad_a is None else grad_a
        grad_b = torch.zeros_like(b) if grad_b is None else grad_b
        shared_grads: list = [None] * k
        tensor_grads: list = [None] * len(tensors)
        dev, enabled, dtype = ctx.autocast
        for i in reversed(range(len(spec.branches))):
            f, index = spec.branches[i], spec.tensor_index[i]
            mine = [tensors[j] for j in index]
            mine_need = [m for m, j in enumerate(index) if needs[3 + k + j]]

            def branch(src, *diff, f=f, mine=mine, mine_need=mine_need):
                sh, mn = list(shared), list(mine)
                for j, v in zip(shared_need, diff):
                    sh[j] = v
                for m, v in zip(mine_need, diff[len(shared_need):]):
                    mn[m] = v
                with torch.autocast(dev, dtype=dtype, enabled=enabled):
                    return f(*sh, src, seed, *mn)
            y, vjp = torch.func.vjp(branch, step_streams(i, a, b)[0], *(shared[j] for j in shared_need),
                                    *(mine[m] for m in mine_need))
            grads = vjp(step_streams(i, grad_a, grad_b)[1].to(y.dtype))
            a, b = inverse_step(i, a, b, y)  # undo the step: the updated stream loses y again
            grad_a, grad_b = backward_step(i, grad_a, grad_b, grads[0], _add_cast)
            del y
            for j, gj in zip(shared_need, grads[1:]):
                shared_grads[j] = gj if shared_grads[j] is None else shared_grads[j] + gj
            for m, gm in zip(mine_need, grads[1 + len(shared_need):]):
                j = index[m]
                tensor_grads[j] = gm if tensor_grads[j] is None else tensor_grads[j] + gm
        return (None, None, grad_a + grad_b, *shared_grads, *tensor_grads)


def _add_cast(grad, g):
    """``grad + g`` in ``grad``'s dtype (a branch's input gradient comes in the branch's dtype)."""
    return grad + g.to(grad.dtype)


class _CheckpointCall:
    """The fx call target of one checkpointed layer. Masks are counter-based, so the recomputation
    needs no saved RNG state."""

    def __init__(self, gm: fx.GraphModule, n_inputs: int):
        self.gm, self.n_inputs = gm, n_inputs
        self.__name__ = self.__qualname__ = "checkpointed_layer"

    def __call__(self, seed, *args):
        inputs, tensors = args[:self.n_inputs], args[self.n_inputs:]
        with _forward_run():  # the recomputation in backward runs outside: no second update
            return torch.utils.checkpoint.checkpoint(self.gm, *inputs, seed, *tensors, use_reentrant=False,
                                                     preserve_rng_state=False)


class _BranchBackend(_TrainBackend):
    """A branch graph: bound tensors and constants become placeholders (inputs of the Function)."""

    def __init__(self, graph, seed, where, chains: list | None = None):
        super().__init__(graph, seed, False, [] if chains is None else chains, updates="forward")
        self.where = where
        self.inputs: dict = {}  # ("tensor", name) | ("const", index) -> placeholder
        # a checkpointed layer numbers the chains inside it in the enclosing graph's sequence (the keys
        # they have when nothing is checkpointed: the same masks as the store-activations reference);
        # a coupling branch keys a chain nested in it under the branch itself
        self.layer = chains is not None

    @contextlib.contextmanager
    def branch_scope(self, t, i):
        if self.layer:
            with super().branch_scope(t, i):
                yield
        else:
            yield

    def tensor(self, name):
        return self._input(("tensor", name))

    def _input(self, key):
        if key not in self.inputs:
            self.inputs[key] = self.graph.placeholder(f"in_{len(self.inputs)}")
        return self.inputs[key]


class _BranchDenoter(Denoter):
    """Constants computed from parameters (Mamba's ``-exp(A_log)``) are recomputed in the branch, so
    that backward saves the parameters, not a per-layer copy; the others (masks, rotary tables) come in
    as inputs, computed once per forward call and shared by every layer."""

    def __init__(self, program, backend, passed: frozenset):
        super().__init__(program, backend)
        self.passed = passed

    def const(self, index: int):
        if index in self.passed:
            return self.backend._input(("const", index))
        return super().const(index)


def _consts_used(program: Program, term) -> set[int]:
    """Constants a term reads, through the definitions it calls."""
    out: set[int] = set()
    for _, t in walk_terms(program, [term]):
        if isinstance(t, Prim):
            out.update(t.const_refs())
        elif isinstance(t, Const):
            out.add(t.index)
    return out


def _passed_consts(program: Program, branches) -> frozenset:
    """Constants a chain takes as inputs: those two or more branches read and that no parameter
    feeds (an attention mask, rotary tables: computed once per call, saved once for all layers). A
    constant one branch reads (Mamba's initial state) or one computed from parameters (``-exp(A_log)``)
    is recomputed inside its branch, so that nothing per layer is saved beyond the parameters."""
    uses = Counter(i for f in branches for i in _consts_used(program, f))
    return frozenset(i for i, n in uses.items() if n >= 2 and not _reads_tensors(program, i))


def _reads_tensors(program: Program, index: int) -> bool:
    memo = program.__dict__.setdefault("_const_reads_tensors", {})
    if index not in memo:
        prim = program.consts[index]
        memo[index] = any(True for _ in prim.tensor_refs()) or any(
            _reads_tensors(program, j) for j in prim.const_refs())
    return memo[index]


def _branch_module(program: Program, f, k: int, where: tuple, passed: frozenset, site_start=None,
                   chains: list | None = None):
    """``f`` as a GraphModule ``(*shared, stream, seed, *inputs)`` and the keys of its inputs; with
    ``site_start``, also how many dropout sites it used (numbered from ``site_start``). ``chains``: a
    checkpointed layer's, the enclosing graph's chain list (chains inside continue its numbering)."""
    def build():
        graph = fx.Graph()
        args = [graph.placeholder(f"shared_{j}") for j in range(k)] + [graph.placeholder("stream")]
        seed = graph.placeholder("seed")
        backend = _BranchBackend(graph, seed, where, chains)
        if site_start is not None:
            backend.sites[where] = site_start
        fn = _BranchDenoter(program, backend, passed).term(f)
        for a in args:
            fn = fn(a)
        graph.output(fn)
        anchor = seed  # lazily created input placeholders move right after the seed, in order
        for ph in backend.inputs.values():
            anchor.append(ph)
            anchor = ph
        return graph, list(backend.inputs), backend.sites[where] - (site_start or 0)
    graph, keys, used = run_deep(build)
    gm = fx.GraphModule(torch.nn.Module(), graph)
    return (gm, keys) if site_start is None else (gm, keys, used)


class CompiledModule(fx.GraphModule):
    """A trainable program. ``train()``/``eval()`` switch dropout; ``chains`` are the coupling chains
    (reversible mode), ``program`` the IR it runs, ``mode`` how it was compiled."""

    def train(self, mode: bool = True):
        """Training or evaluation. A module compiled from a model holds two captured programs, the
        model exported in training mode and in evaluation mode (drop path, Bernoulli dropout and batch
        statistics differ between them), over the same parameters: this switches the graph that runs."""
        super().train(mode)
        state = getattr(self, RNG_BUFFER, None)
        if state is not None:
            state[2] = int(mode)
        graphs = self.__dict__.get("_graphs")
        if graphs is not None and self.graph is not graphs[bool(mode)]:
            self.graph = graphs[bool(mode)]  # the setter regenerates forward
        return self

    _KEPT = ("chains", "program", "eval_program", "mode", "analyses", "check_report", "eval_capture")

    def __deepcopy__(self, memo):
        """fx's deepcopy rebuilds a GraphModule from its active graph only: the other capture and the
        attributes ``bwskc.compile`` sets are carried over here (an EMA or teacher copy must still
        switch to its evaluation capture)."""
        import copy
        res = super().__deepcopy__(memo)
        if RNG_BUFFER in res._buffers:  # fx's copy registers it persistent: not state, as in the original
            res.register_buffer(RNG_BUFFER, res._buffers[RNG_BUFFER], persistent=False)
        for name in self._KEPT:
            if name in self.__dict__:
                res.__dict__[name] = self.__dict__[name]  # read-only descriptions: shared
        graphs = self.__dict__.get("_graphs")
        if graphs is not None:
            active = next(mode for mode, g in graphs.items() if g is self.graph)
            other = copy.deepcopy(graphs[not active], memo)
            other.owning_module = res
            res.__dict__["_graphs"] = {active: res.graph, not active: other}
        return res

    def __reduce__(self):
        if "_graphs" in self.__dict__:
            # fx pickles a GraphModule as the code of its one graph: the other capture would be lost,
            # and eval() would silently run the training capture
            raise TypeError("a bwskc module with training and evaluation captures cannot be pickled "
                            "whole: save module.state_dict() and build it again with bwskc.compile")
        return super().__reduce__()

    def reseed(self, seed: int, step: int = 0, shard: int = 0):
        """Restart the dropout stream: the masks of the next forward call are those of ``(seed, step)``;
        ``shard`` r draws them from batch row ``r * b`` on (rank r of a data-parallel run of ``b`` rows
        a rank: the single-process masks, sliced)."""
        state = getattr(self, RNG_BUFFER)
        state[0], state[1], state[3] = seed, step, shard


def _program_graph(program: Program, *, reversible: bool, checkpoint: bool, chains: list,
                   updates: str = "train") -> fx.Graph:
    """The module's graph: the entry's user outputs, and the buffer updates (implied by leaves, where
    they run; the ``update:<buffer>`` outputs, at the end) assigned to the module's buffers."""
    def build():
        graph = fx.Graph()
        placeholders = [graph.placeholder(placeholder_name(n, i))
                        for i, n in enumerate(program.entry.input_names)]
        state = graph.get_attr(RNG_BUFFER)
        # the module's training flag as a Python bool (torch.compile guards on it; the state's copy of
        # it is a tensor, which a compiled graph cannot branch on)
        training = graph.get_attr("training")
        seed_node = graph.call_function(rng.step_seed, (state, training))
        backend = _TrainBackend(graph, seed_node, reversible, chains, checkpoint, updates)
        out, assigned = Denoter(program, backend).run_entry(placeholders, updates=True)
        for name, value in assigned:
            graph.call_function(assign_buffer, (backend.tensor(name), value, seed_node, updates))
        graph.output(out)
        return graph
    return run_deep(build)


def updated_buffers(program: Program) -> list[str]:
    """The buffers a forward of ``program`` updates: those its functional leaves imply and those its
    ``update:<buffer>`` outputs name, sorted."""
    names = {t for t in (update_target(n) for n in program.entry.output_names) if t is not None}
    bodies = [c for c in program.consts] + [d.body for d in program.defs.values()] + [program.entry.body]
    for body in bodies:
        for t in subterms(body):
            if isinstance(t, Prim):
                names.update(name for _a, _r, name in implied_updates(t))
    return sorted(names)


def compile_program(program: Program, *, reversible: bool, seed: int = 0, checkpoint: bool = False,
                    eval_program: Program | None = None) -> CompiledModule:
    """``program`` as a trainable module; with ``eval_program`` (the same model captured in evaluation
    mode), ``module.eval()`` runs that one, over the same parameters and buffers."""
    chains: list = []
    graph = _program_graph(program, reversible=reversible, checkpoint=checkpoint, chains=chains)
    root = module_tree(program)
    updated = set(updated_buffers(program)) | (set() if eval_program is None else set(updated_buffers(eval_program)))
    for name in sorted(updated & set(program.tensors)):
        value = program.weights.get(name)
        if value is not None:  # the module's own tensor: its updates touch no one else's (the program's)
            register_tensor(root, name, program.tensors[name], value.detach().clone())
    root.register_buffer(RNG_BUFFER, torch.tensor([seed, 0, 1, 0], dtype=torch.int64), persistent=False)
    gm = CompiledModule(root, graph, class_name=program.name.replace("-", "_").replace(".", "_") or "Model")
    gm.register_buffer(RNG_BUFFER, getattr(gm, RNG_BUFFER), persistent=False)  # fx copied it as persistent
    gm.chains = [c for c in chains if c is not None]
    if eval_program is not None:
        _check_same_signature(program, eval_program)
        _add_missing_tensors(gm, program, eval_program)
        eval_graph = _program_graph(eval_program, reversible=False, checkpoint=False, chains=[],
                                    updates="always")
        eval_graph.owning_module = gm
        gm.__dict__["_graphs"] = {True: graph, False: eval_graph}
        # the IR it runs, without the weights it was lowered with (the module's own are the ones used)
        gm.eval_program = Program(eval_program.name, eval_program.tensors, eval_program.consts,
                                  eval_program.defs, eval_program.entry)
    return gm


def _check_same_signature(train: Program, eval_: Program) -> None:
    a, b = train.entry, eval_.entry
    if (a.input_names, a.inputs) != (b.input_names, b.inputs):
        raise BwskError("the model's training and evaluation captures take different inputs: "
                        f"{list(a.input_names)} versus {list(b.input_names)}")
    for name in set(train.tensors) & set(eval_.tensors):
        if train.tensors[name].type != eval_.tensors[name].type:
            raise BwskError(f"{name} is {train.tensors[name].type} in training but "
                            f"{eval_.tensors[name].type} in evaluation")


def _add_missing_tensors(gm: fx.GraphModule, program: Program, eval_program: Program) -> None:
    """Tensors only the evaluation capture reads become attributes too (shared ones already are)."""
    for name, decl in eval_program.tensors.items():
        if name not in program.tensors:
            value = eval_program.weights.get(name)
            register_tensor(gm, name, decl, None if value is None else value.detach().clone())
