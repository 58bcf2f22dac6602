"""Lowering: a torch.export ExportedProgram becomes a BWSK Program.

1. The graph is made functional ATen (``run_decompositions({})``: in-place ops and higher-order wrappers
   go, ``linear``, ``layer_norm``, ``scaled_dot_product_attention`` stay whole).
2. Nodes computed from parameters and literals only become constants ``%N``; a primitive leaf binds them,
   its parameters (by state-dict key) and its attributes, and leaves its activation arguments as holes.
3. ``nn_module_stack`` splits the graph into module calls. Each call whose nodes form a convex region (no
   path leaves it and comes back) becomes a definition named after the module (``h.0.attn``); a
   non-convex call is inlined into its parent, its own children still outlined.
4. Each region is turned into a point-free term by bracket abstraction (``bwskc.abstraction``).

The pieces, in the order ``_lower`` runs them: ``_read_signature`` (declarations, inputs, outputs),
``_Leaves`` and ``_classify`` (node-by-node translation into leaves; constants versus activations),
``_ScopeNames`` (definition names for module calls), ``_Regions`` (region assembly, one method per step
of ``lower_region``: partition, order, interfaces, translate, close; ``_Bindings`` keeps a region's
substitutions and lets).
"""
from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import (
    ConstantArgument,
    InputKind,
    OutputKind,
    TensorArgument,
)
from torch.fx import Node

from bwskc import abstraction as ab
from bwskc._deep import run_deep
from bwskc.rewrites import differentiable, fuse_tanh_gelu, quiet_leafspec
from bwskc.errors import BwskError
from bwskc.runtime.denote import IMPLIED_UPDATES, UPDATE_PREFIX
from bwskc.runtime.random_ops import is_random_target
from bwskc.ir import (
    HOLE,
    Comb,
    Const,
    ConstRef,
    Def,
    Entry,
    Prim,
    Program,
    Ref,
    TensorDecl,
    Term,
    TensorRef,
    TupleType,
    type_of_value,
)

_LITERAL_TYPES = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.layout,
                  torch.memory_format)
_COMMUTATIVE = {torch.ops.aten.add.Tensor, torch.ops.aten.mul.Tensor}
_KIND = {InputKind.PARAMETER: "param", InputKind.BUFFER: "buffer",
         InputKind.CONSTANT_TENSOR: "constant"}


def op_name(target) -> str:
    """The IR name of an fx call target: the ATen overload name, or ``getitem``."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if target is operator.getitem:
        return "getitem"
    raise BwskError(f"cannot lower call to {getattr(target, '__name__', target)!r}: "
                    "only ATen operators and getitem are supported")


def run_decompositions(ep: ExportedProgram) -> ExportedProgram:
    """``ep.run_decompositions({})``, without torch's own LeafSpec FutureWarning from inside it
    (``bwskc.rewrites.quiet_leafspec``: only that message is silenced)."""
    with quiet_leafspec():
        return ep.run_decompositions({})


def lower_exported(ep: ExportedProgram, name: str | None = None, *, decompose: bool = True) -> Program:
    """Lower an ExportedProgram to a Program bound to the program's weights."""
    if decompose:
        ep = run_decompositions(ep)
    given = ep
    ep = differentiable(ep, owned=decompose)
    ep = fuse_tanh_gelu(ep, owned=decompose or ep is not given)
    return run_deep(lambda: _lower(ep, name))


def _lower(ep: ExportedProgram, name: str | None) -> Program:
    """The steps in order: signature, constants and activations, scope names, then the entry region."""
    sig = _read_signature(ep)
    leaves = _Leaves(sig.bound, {n: i for i, n in enumerate(ep.graph.nodes)})
    body_nodes = _classify(ep.graph, sig, leaves)
    scopes = _ScopeNames()
    chains = {n: scopes.chain(n) for n in body_nodes}
    regions = _Regions(leaves, chains, scopes.def_names, sig)
    body = regions.lower_region(body_nodes, sig.inputs, sig.outputs, scope=())
    in_types = tuple(type_of_value(n.meta["val"]) for n in sig.inputs)
    out_types = tuple(sig.value_type(o) for o in sig.outputs)
    entry = Entry(tuple(sig.input_names), in_types, tuple(sig.output_names), out_types, body)
    return Program(name or _model_name(ep), sig.tensors, leaves.consts, dict(regions.defs), entry,
                   sig.weights)


# ---------------------------------------------------------------------------------------- signature
@dataclass
class _Signature:
    """What the graph signature says: tensor declarations and weights, the placeholders bound to them
    (or to literals), the user inputs and the entry outputs (user outputs, then buffer updates)."""

    tensors: dict[str, TensorDecl] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    bound: dict[Node, Any] = field(default_factory=dict)  # placeholder -> TensorRef or literal
    inputs: list[Node] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)

    def value_type(self, v):
        """The type of an entry output: its tensor declaration's, or its fx value's."""
        if isinstance(v, Node):
            if v in self.bound and isinstance(self.bound[v], TensorRef):
                return self.tensors[self.bound[v].name].type
            return type_of_value(v.meta["val"])
        raise BwskError(f"unsupported output {v!r}")


def _read_signature(ep: ExportedProgram) -> _Signature:
    """The program's signature: its inputs (``_read_inputs``), then its outputs (``_read_outputs``)."""
    sig = _Signature()
    buffers = _read_inputs(ep, sig)
    _read_outputs(ep, sig, buffers)
    return sig


def _read_inputs(ep: ExportedProgram, sig: _Signature) -> dict[str, Node]:
    """Declare tensors, bind placeholders and list the user inputs; returns buffer name -> placeholder."""
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    state = {**ep.state_dict, **ep.constants}
    placeholder_of: dict[str, Node] = {}
    for spec in ep.graph_signature.input_specs:
        node = nodes[spec.arg.name]
        if spec.kind == InputKind.BUFFER:
            placeholder_of[spec.target] = node
        if spec.kind in _KIND:
            value = state.get(spec.target)
            val = node.meta.get("val", value)
            sig.tensors[spec.target] = TensorDecl(_KIND[spec.kind], type_of_value(val))
            if value is not None:
                sig.weights[spec.target] = value
            sig.bound[node] = TensorRef(spec.target)
        elif spec.kind == InputKind.USER_INPUT:
            if isinstance(spec.arg, TensorArgument):
                sig.inputs.append(node)
                sig.input_names.append(spec.arg.name)
            elif isinstance(spec.arg, ConstantArgument):
                sig.bound[node] = _literal(spec.arg.value, node)
            else:
                raise BwskError(f"unsupported input {spec.arg} ({type(spec.arg).__name__})")
        else:
            raise BwskError(f"unsupported input kind {spec.kind.name} for {spec.arg.name}")
    return placeholder_of


def _read_outputs(ep: ExportedProgram, sig: _Signature, placeholder_of: dict[str, Node]) -> None:
    """The entry outputs: the user outputs, named from the output pytree, then the buffer updates."""
    flat = list(ep.graph.output_node().args[0])
    specs = ep.graph_signature.output_specs
    sig.outputs = [flat[i] for i, spec in enumerate(specs) if spec.kind == OutputKind.USER_OUTPUT]
    sig.output_names = _output_names(ep, len(sig.outputs))
    # buffer updates (batch norm in training mode): those a functional leaf implies need nothing
    # more; the others become entry outputs ``update:<buffer>`` after the user outputs
    for i, spec in enumerate(specs):
        if spec.kind == OutputKind.BUFFER_MUTATION \
                and not _implied_update(flat[i], placeholder_of.get(spec.target)):
            sig.outputs.append(flat[i])
            sig.output_names.append(UPDATE_PREFIX + spec.target)


# ------------------------------------------------------------------------------------------- leaves
def _literal(value, node: Node | None = None):
    """A literal argument as the IR carries it (lists become tuples); anything else is refused."""
    if isinstance(value, (list, tuple)):
        return tuple(_literal(v, node) for v in value)
    if isinstance(value, _LITERAL_TYPES):
        return value
    where = f" in {node.name}" if node is not None else ""
    raise BwskError(f"cannot lower argument of type {type(value).__name__}{where}")


class _Leaves:
    """Node-by-node translation: an fx call as a primitive leaf with its tensors, constants and literals
    bound and its activation arguments left as holes; and the constants ``%N`` found so far."""

    def __init__(self, bound: dict[Node, Any], position: dict[Node, int]):
        self.bound = bound  # placeholder -> TensorRef or literal
        self.position = position  # node -> index in the graph
        self.activation: set[Node] = set()
        self.consts: list[Prim] = []
        self.const_index: dict[Node, int] = {}

    def add_constant(self, node: Node) -> None:
        """Make ``node`` (computed from tensors and literals only) the next constant ``%N``."""
        prim, _ = self.leaf(node)
        self.const_index[node] = len(self.consts)
        self.consts.append(prim)

    def leaf(self, node: Node) -> tuple[Prim, list[Node]]:
        """The node's primitive leaf and its activation operands, in hole order."""
        operands: list[Node] = []
        fx_args = list(node.args)
        if (node.target in _COMMUTATIVE and len(fx_args) == 2 and not node.kwargs
                and all(a in self.activation for a in fx_args if isinstance(a, Node))
                and all(isinstance(a, Node) for a in fx_args)
                and self.position[fx_args[1]] < self.position[fx_args[0]]):
            # x + F(x) and F(x) + x are the same value; putting the earlier operand first makes every
            # residual connection read S(add, F) whichever way the model wrote it.
            fx_args.reverse()
        args = tuple(self._arg(a, operands, node) for a in fx_args)
        kwargs = tuple((k, self._arg(v, operands, node)) for k, v in node.kwargs.items())
        try:
            typ = type_of_value(node.meta["val"])
        except (KeyError, TypeError) as exc:
            raise BwskError(f"{node.name} ({node.target}): no static type ({exc})") from None
        return Prim(op_name(node.target), args, kwargs, typ), operands

    def _arg(self, a, operands: list[Node], node: Node):
        if isinstance(a, Node):
            if a in self.activation:
                operands.append(a)
                return HOLE
            if a in self.bound:
                return self.bound[a]
            if a in self.const_index:
                return ConstRef(self.const_index[a])
            raise BwskError(f"{node.name}: argument {a.name} is neither an input nor a constant")
        if isinstance(a, (list, tuple)):
            return tuple(self._arg(b, operands, node) for b in a)
        return _literal(a, node)


def _classify(graph, sig: _Signature, leaves: _Leaves) -> list[Node]:
    """Each call node an activation or a constant (into ``leaves``); the activations the outputs need."""
    leaves.activation.update(sig.inputs)
    live: list[Node] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if not node.users and node.meta.get("val") is None:
            continue  # an assertion (_assert_tensor_metadata and kin): no value, no meaning
        if any(i in leaves.activation for i in node.all_input_nodes) or is_random_target(node.target):
            # a random draw is never a constant: the runtime redraws it per step, keyed on its
            # site, so that a reversible backward can replay it (bwskc.runtime.random_ops)
            leaves.activation.add(node)
            live.append(node)
        else:
            leaves.add_constant(node)
    # drop activation nodes that no output needs (torch.export leaves few; assertions leave some)
    needed: set[Node] = set()
    stack = [o for o in sig.outputs if isinstance(o, Node)]
    while stack:
        n = stack.pop()
        if n in needed or n not in leaves.activation:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in live if n in needed]


# -------------------------------------------------------------------------------------------- names
class _ScopeNames:
    """Definition names for module calls: the module path, ``path@k`` for the module's k-th extra call."""

    def __init__(self):
        self.def_names: dict[str, str] = {}  # scope key -> definition name
        self._paths: dict[str, str] = {}  # scope key -> module path

    def chain(self, node: Node) -> tuple[str, ...]:
        """Scope keys of the module calls enclosing node, outermost first, the model itself left out."""
        stack = node.meta.get("nn_module_stack") or {}
        keys = []
        for key, (path, _type) in stack.items():
            if path == "":
                continue
            keys.append(key)
            if key not in self.def_names:
                self._name(key, path)
        return tuple(keys)

    def _name(self, key: str, path: str):
        taken = sum(1 for k in self._paths if self._paths[k] == path)
        self._paths[key] = path
        self.def_names[key] = path if taken == 0 else f"{path}@{taken}"


# ------------------------------------------------------------------------------------------ regions
class _Bindings:
    """A region's values as abstraction expressions: one used once is substituted into its use, one
    used more than once (or not at all) is let-bound to a fresh variable."""

    def __init__(self, uses: dict[Node, int], fresh):
        self.uses = uses
        self.fresh = fresh
        self.exprs: dict[Node, Any] = {}
        self.lets: list[tuple[int, Any]] = []

    def input(self, node: Node) -> int:
        """A fresh variable for a region input."""
        v = self.fresh()
        self.exprs[node] = ab.Var(v)
        return v

    def bind(self, node: Node, expr) -> None:
        """``node``'s value is ``expr``: substituted where used once, else let-bound."""
        if self.uses.get(node, 0) == 1:
            self.exprs[node] = expr
        else:
            v = self.fresh()
            self.lets.append((v, expr))
            self.exprs[node] = ab.Var(v)


class _Regions:
    """Region assembly: a region (the model, or a module call) becomes a closed point-free term, and each
    convex child call in it a definition, lowered first (``defs`` lists callees first)."""

    def __init__(self, leaves: _Leaves, chains: dict[Node, tuple[str, ...]], def_names: dict[str, str],
                 sig: _Signature):
        self.leaves = leaves
        self.chains = chains  # node -> scope keys around it
        self.def_names = def_names
        self.sig = sig
        self.defs: OrderedDict[str, Def] = OrderedDict()
        self.next_var = 0

    def fresh(self) -> int:
        """A variable number not used before in the program."""
        self.next_var += 1
        return self.next_var

    def lower_region(self, nodes, inputs, outputs, scope) -> Term:
        """The region's nodes as a term of its inputs to its outputs: the five steps below, in order."""
        region = set(nodes)
        groups, own = self._partition(nodes, scope, region)
        order = self._order(nodes, own, groups)
        calls, uses = self._interfaces(order, groups, region, outputs)
        in_vars, b = self._translate(order, calls, uses, inputs, scope)
        return self._close(outputs, b, in_vars)

    def _partition(self, nodes, scope, region: set) -> tuple[OrderedDict[str, list[Node]], list[Node]]:
        """1. The child calls (convex ones; a non-convex call is inlined) and the region's own nodes."""
        inlined: set[str] = set()
        while True:
            groups, own = self._groups(nodes, scope, inlined)
            bad = [k for k, g in groups.items() if not _convex(set(g), region)]
            if not bad:
                return groups, own
            inlined.update(bad)

    def _groups(self, nodes, scope, inlined):
        groups: OrderedDict[str, list[Node]] = OrderedDict()
        own = []
        for n in nodes:
            child = next((k for k in self.chains[n][len(scope):] if k not in inlined), None)
            if child is None:
                own.append(n)
            else:
                groups.setdefault(child, []).append(n)
        return groups, own

    def _order(self, nodes, own, groups) -> list:
        """2. Units (own nodes and child calls) in a topological order, ties broken by graph position."""
        unit_of: dict[Node, Any] = {n: n for n in own}
        for key, g in groups.items():
            for n in g:
                unit_of[n] = key
        position = self.leaves.position
        first: dict[Any, int] = {}
        dag = nx.DiGraph()
        for n in nodes:
            u = unit_of[n]
            first.setdefault(u, position[n])
            dag.add_node(u)
            for a in n.all_input_nodes:
                ua = unit_of.get(a)
                if ua is not None and ua != u:
                    dag.add_edge(ua, u)
        return list(nx.lexicographical_topological_sort(dag, key=lambda u: first[u]))

    def _interfaces(self, order, groups, region: set, outputs) -> tuple[dict, dict[Node, int]]:
        """3. Each child call's nodes, inputs and outputs, and how often each value is used."""
        out_set = set(o for o in outputs if isinstance(o, Node))
        uses: dict[Node, int] = {}
        calls = {}
        for unit in order:
            if isinstance(unit, Node):
                for a in self.leaves.leaf(unit)[1]:
                    uses[a] = uses.get(a, 0) + 1
            else:
                g = groups[unit]
                gset = set(g)
                ins = sorted({a for n in g for a in n.all_input_nodes
                              if a in self.leaves.activation and a not in gset},
                             key=self.leaves.position.__getitem__)
                outs = [n for n in g if n in out_set
                        or any(u in region and u not in gset for u in n.users)]
                calls[unit] = (g, ins, outs)
                for a in ins:
                    uses[a] = uses.get(a, 0) + 1
        for o in outputs:
            if isinstance(o, Node):
                uses[o] = uses.get(o, 0) + 1
        return calls, uses

    def _translate(self, order, calls, uses, inputs, scope) -> tuple[list[int], _Bindings]:
        """4. Every unit as an expression: a leaf applied to its operands, or a call of a definition."""
        b = _Bindings(uses, self.fresh)
        in_vars = [b.input(n) for n in inputs]
        for unit in order:
            if isinstance(unit, Node):
                prim, operands = self.leaves.leaf(unit)
                if not operands:  # a random draw (all else without activation operands is a constant)
                    b.bind(unit, _draw_expr(unit, prim, in_vars))
                else:
                    b.bind(unit, ab.apply(ab.Lit(prim), *(b.exprs[a] for a in operands)))
            else:
                self._call(unit, calls[unit], b, scope)
        return in_vars, b

    def _call(self, unit: str, call, b: _Bindings, scope) -> None:
        """A child call: its definition (lowered now), applied to its inputs, its results bound."""
        g, ins, outs = call
        name = self.def_names[unit]
        body = self.lower_region(g, ins, outs, scope + (unit,))
        out_types = [type_of_value(o.meta["val"]) for o in outs]
        out_type = out_types[0] if len(outs) == 1 else TupleType(tuple(out_types))
        self.defs[name] = Def(name, tuple(type_of_value(i.meta["val"]) for i in ins), out_type, body)
        call_expr = ab.apply(ab.Lit(Ref(name)), *(b.exprs[a] for a in ins))
        if len(outs) == 1:
            b.bind(outs[0], call_expr)
            return
        tv = self.fresh()
        b.lets.append((tv, call_expr))
        for i, o in enumerate(outs):
            b.bind(o, ab.App(ab.Lit(Prim("getitem", (HOLE, i), (), out_types[i])), ab.Var(tv)))

    def _close(self, outputs, b: _Bindings, in_vars: list[int]) -> Term:
        """5. The outputs' expression, wrapped in the region's lets, abstracted over its inputs."""
        if len(outputs) == 1:
            body = _output_expr(outputs[0], b.exprs, self.leaves)
        else:
            body = _tuple_expr(outputs, b.exprs, self.leaves, self.sig)
        for v, e in reversed(b.lets):
            body = ab.let(v, e, body)
        for v in reversed(in_vars):
            body = ab.abstract(v, body)
        return ab.to_term(body)


def _tuple_expr(outputs, exprs, leaves: _Leaves, sig: _Signature):
    """Several outputs as one ``tuple`` leaf: constants bound in it, activations its holes."""
    slots, results = [], []
    for o in outputs:
        if o in exprs:
            slots.append(HOLE)
            results.append(exprs[o])
        elif o in leaves.const_index:
            slots.append(ConstRef(leaves.const_index[o]))
        elif isinstance(leaves.bound.get(o), TensorRef):
            slots.append(leaves.bound[o])
        else:
            raise BwskError(f"unsupported output {o!r}")
    types = tuple(sig.value_type(o) for o in outputs)
    return ab.apply(ab.Lit(Prim("tuple", tuple(slots), (), TupleType(types))), *results)


def _output_expr(o, exprs, leaves: _Leaves):
    """One output: its expression, or the constant or tensor it is."""
    if o in exprs:
        return exprs[o]
    if isinstance(o, Node) and o in leaves.const_index:
        return ab.Lit(Const(leaves.const_index[o]))
    if isinstance(o, Node) and isinstance(leaves.bound.get(o), TensorRef):
        return ab.Lit(Ref(leaves.bound[o].name))
    raise BwskError(f"unsupported output {o!r}")


def _convex(group: set, region: set) -> bool:
    """Whether no path leaves ``group`` and comes back (a search from its outside successors)."""
    frontier = [u for g in group for u in g.users if u in region and u not in group]
    seen = set()
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if u in group:
                return False
            if u in region and u not in seen:
                frontier.append(u)
    return True


def _draw_expr(node: Node, prim: Prim, in_vars: list[int]):
    """A draw with no activation operand (``torch.rand(shape)``) as ``K(draw) x``, x the region's
    innermost input: a term has no closed application, and the draw must stay in the region (a
    constant would be computed once and treated as fixed by the analyses). ``K`` ignores x, so
    the value is the draw, evaluated where the region runs (a recomputed branch draws again,
    keyed on its site)."""
    if not in_vars:
        raise BwskError(f"{node.name} ({node.target}): a random draw in a module call with no "
                        "activation input cannot be placed")
    return ab.App(ab.Lit(Comb("K", (prim,))), ab.Var(in_vars[-1]))


def _implied_update(value, buffer: Node | None) -> bool:
    """Whether a buffer's new value is a result of a functional leaf that read the buffer itself
    (``getitem(_native_batch_norm_legit_functional(x, w, b, running_mean, ...), 3)``): the leaf then says
    what the buffer becomes (``bwskc.runtime.denote.IMPLIED_UPDATES``), and no output carries it."""
    if buffer is None or not isinstance(value, Node) or value.target is not operator.getitem:
        return False
    call, index = value.args[0], value.args[1]
    if not isinstance(call, Node) or not isinstance(call.target, torch._ops.OpOverload):
        return False
    return any(result == index and arg < len(call.args) and call.args[arg] is buffer
               for arg, result in IMPLIED_UPDATES.get(str(call.target), ()))


def _model_name(ep: ExportedProgram) -> str:
    for n in ep.graph.nodes:
        stack = n.meta.get("nn_module_stack")
        if stack:
            path, typ = next(iter(stack.values()))
            if path == "":
                return str(typ).rsplit(".", 1)[-1]
    return "program"


def _output_names(ep: ExportedProgram, count: int) -> list[str]:
    """Names for the user outputs from the output pytree (``logits``), else ``out0``, ``out1``..."""
    names: list[str] = []
    try:
        spec = ep.call_spec.out_spec

        def walk(s, prefix):
            if s.is_leaf():
                names.append(prefix or "out")
                return
            ctx = s.context
            keys = list(ctx) if isinstance(ctx, (list, tuple)) and len(ctx) == s.num_children else None
            for i, child in enumerate(s.children()):
                k = str(keys[i]) if keys is not None else str(i)
                walk(child, f"{prefix}.{k}" if prefix else k)

        walk(spec, "")
    except Exception:
        names = []
    if len(names) != count or len(set(names)) != count or any(n.startswith(UPDATE_PREFIX) for n in names):
        names = [f"out{i}" for i in range(count)]
    return names
