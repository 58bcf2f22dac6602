"""Lowering: a torch.export ExportedProgram becomes a BWSK Program.

1. The graph is made functional ATen (``run_decompositions({})``: in-place ops and higher-order wrappers
   go, ``linear``, ``layer_norm``, ``scaled_dot_product_attention`` stay whole).
2. Nodes computed from parameters and literals only become constants ``%N``; a primitive leaf binds them,
   its parameters (by state-dict key) and its attributes, and leaves its activation arguments as holes.
3. ``nn_module_stack`` splits the graph into module calls. Each call whose nodes form a convex region (no
   path leaves it and comes back) becomes a definition named after the module (``h.0.attn``); a
   non-convex call is inlined into its parent, its own children still outlined.
4. Each region is turned into a point-free term by bracket abstraction (``bwskc.abstraction``).
"""
from __future__ import annotations

import operator
import warnings
from collections import OrderedDict
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
from bwskc.rewrites import differentiable
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
    """``ep.run_decompositions({})``, without torch's own FutureWarning from inside it: torch 2.13's
    ``run_decompositions`` deep-copies the module call graph, whose specs ``torch.export`` itself built as
    ``LeafSpec``, and unpickling each (``copyreg``) warns ``isinstance(treespec, LeafSpec) is
    deprecated``. Nothing of bwskc's makes a LeafSpec; only that message is silenced, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        return ep.run_decompositions({})


def lower_exported(ep: ExportedProgram, name: str | None = None, *, decompose: bool = True) -> Program:
    """Lower an ExportedProgram to a Program bound to the program's weights."""
    if decompose:
        ep = run_decompositions(ep)
    ep = differentiable(ep, owned=decompose)
    return run_deep(lambda: _Lowerer(ep, name).run())


class _Lowerer:
    def __init__(self, ep: ExportedProgram, name: str | None):
        self.ep = ep
        self.graph = ep.graph
        self.name = name or _model_name(ep)
        self.tensors: dict[str, TensorDecl] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.bound: dict[Node, Any] = {}  # placeholder -> TensorRef or literal
        self.inputs: list[Node] = []
        self.input_names: list[str] = []
        self.consts: list[Prim] = []
        self.const_index: dict[Node, int] = {}
        self.defs: OrderedDict[str, Def] = OrderedDict()
        self.def_names: dict[str, str] = {}  # scope key -> definition name
        self.next_var = 0

    # ------------------------------------------------------------------------------------ signature
    def _signature(self):
        sig = self.ep.graph_signature
        nodes = {n.name: n for n in self.graph.nodes if n.op == "placeholder"}
        state = {**self.ep.state_dict, **self.ep.constants}
        placeholder_of: dict[str, Node] = {}
        for spec in sig.input_specs:
            node = nodes[spec.arg.name]
            if spec.kind == InputKind.BUFFER:
                placeholder_of[spec.target] = node
            if spec.kind in _KIND:
                value = state.get(spec.target)
                val = node.meta.get("val", value)
                self.tensors[spec.target] = TensorDecl(_KIND[spec.kind], type_of_value(val))
                if value is not None:
                    self.weights[spec.target] = value
                self.bound[node] = TensorRef(spec.target)
            elif spec.kind == InputKind.USER_INPUT:
                if isinstance(spec.arg, TensorArgument):
                    self.inputs.append(node)
                    self.input_names.append(spec.arg.name)
                elif isinstance(spec.arg, ConstantArgument):
                    self.bound[node] = self._literal(spec.arg.value, node)
                else:
                    raise BwskError(f"unsupported input {spec.arg} ({type(spec.arg).__name__})")
            else:
                raise BwskError(f"unsupported input kind {spec.kind.name} for {spec.arg.name}")
        out_node = self.graph.output_node()
        flat = list(out_node.args[0])
        self.outputs = [flat[i] for i, spec in enumerate(sig.output_specs)
                        if spec.kind == OutputKind.USER_OUTPUT]
        self.output_names = _output_names(self.ep, len(self.outputs))
        # buffer updates (batch norm in training mode): those a functional leaf implies need nothing
        # more; the others become entry outputs ``update:<buffer>`` after the user outputs
        for i, spec in enumerate(sig.output_specs):
            if spec.kind == OutputKind.BUFFER_MUTATION \
                    and not _implied_update(flat[i], placeholder_of.get(spec.target)):
                self.outputs.append(flat[i])
                self.output_names.append(UPDATE_PREFIX + spec.target)

    # -------------------------------------------------------------------------------------- leaves
    def _literal(self, value, node: Node | None = None):
        if isinstance(value, (list, tuple)):
            return tuple(self._literal(v, node) for v in value)
        if isinstance(value, _LITERAL_TYPES):
            return value
        where = f" in {node.name}" if node is not None else ""
        raise BwskError(f"cannot lower argument of type {type(value).__name__}{where}")

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
        return self._literal(a, node)

    def leaf(self, node: Node) -> tuple[Prim, list[Node]]:
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

    # -------------------------------------------------------------------------------- classification
    def _classify(self):
        self.activation: set[Node] = set(self.inputs)
        self.position = {n: i for i, n in enumerate(self.graph.nodes)}
        live: list[Node] = []
        for node in self.graph.nodes:
            if node.op != "call_function":
                continue
            if not node.users and node.meta.get("val") is None:
                continue  # an assertion (_assert_tensor_metadata and kin): no value, no meaning
            if any(i in self.activation for i in node.all_input_nodes) or is_random_target(node.target):
                # a random draw is never a constant: the runtime redraws it per step, keyed on its
                # site, so that a reversible backward can replay it (bwskc.runtime.random_ops)
                self.activation.add(node)
                live.append(node)
            else:
                prim, _ = self.leaf(node)
                self.const_index[node] = len(self.consts)
                self.consts.append(prim)
        # drop activation nodes that no output needs (torch.export leaves few; assertions leave some)
        needed: set[Node] = set()
        stack = [o for o in self.outputs if isinstance(o, Node)]
        while stack:
            n = stack.pop()
            if n in needed or n not in self.activation:
                continue
            needed.add(n)
            stack.extend(n.all_input_nodes)
        self.body_nodes = [n for n in live if n in needed]

    def chain(self, node: Node) -> tuple[str, ...]:
        """Scope keys of the module calls enclosing node, outermost first, the model itself left out."""
        stack = node.meta.get("nn_module_stack") or {}
        keys = []
        for key, (path, _type) in stack.items():
            if path == "":
                continue
            keys.append(key)
            if key not in self.def_names:
                self._name_scope(key, path)
        return tuple(keys)

    def _name_scope(self, key: str, path: str):
        taken = sum(1 for k in self.scope_paths if self.scope_paths[k] == path)
        self.scope_paths[key] = path
        self.def_names[key] = path if taken == 0 else f"{path}@{taken}"

    # ------------------------------------------------------------------------------------- regions
    def run(self) -> Program:
        self.scope_paths: dict[str, str] = {}
        self._signature()
        self._classify()
        self.chains = {n: self.chain(n) for n in self.body_nodes}
        body = self.lower_region(self.body_nodes, self.inputs, self.outputs, scope=(), top=True)
        in_types = tuple(type_of_value(n.meta["val"]) for n in self.inputs)
        out_types = tuple(self._value_type(o) for o in self.outputs)
        entry = Entry(tuple(self.input_names), in_types, tuple(self.output_names), out_types, body)
        return Program(self.name, self.tensors, self.consts, dict(self.defs), entry, self.weights)

    def _value_type(self, v):
        if isinstance(v, Node):
            if v in self.bound and isinstance(self.bound[v], TensorRef):
                return self.tensors[self.bound[v].name].type
            return type_of_value(v.meta["val"])
        raise BwskError(f"unsupported output {v!r}")

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

    @staticmethod
    def _convex(group: set, region: set) -> bool:
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

    def lower_region(self, nodes, inputs, outputs, scope, top=False):
        region = set(nodes)
        inlined: set[str] = set()
        while True:
            groups, own = self._groups(nodes, scope, inlined)
            bad = [k for k, g in groups.items() if not self._convex(set(g), region)]
            if not bad:
                break
            inlined.update(bad)
        unit_of: dict[Node, Any] = {n: n for n in own}
        for key, g in groups.items():
            for n in g:
                unit_of[n] = key
        order = self._order(nodes, unit_of)
        out_set = set(o for o in outputs if isinstance(o, Node))

        # use counts decide inlining (one use) versus let-binding (several)
        uses: dict[Node, int] = {}
        calls = {}
        for unit in order:
            if isinstance(unit, Node):
                for a in self.leaf(unit)[1]:
                    uses[a] = uses.get(a, 0) + 1
            else:
                g = groups[unit]
                gset = set(g)
                ins = sorted({a for n in g for a in n.all_input_nodes
                              if a in self.activation and a not in gset},
                             key=self.position.__getitem__)
                outs = [n for n in g if n in out_set
                        or any(u in region and u not in gset for u in n.users)]
                calls[unit] = (g, ins, outs)
                for a in ins:
                    uses[a] = uses.get(a, 0) + 1
        for o in outputs:
            if isinstance(o, Node):
                uses[o] = uses.get(o, 0) + 1

        exprs: dict[Node, Any] = {}
        lets: list[tuple[int, Any]] = []

        def fresh() -> int:
            self.next_var += 1
            return self.next_var

        def bind(node, expr):
            if uses.get(node, 0) == 1:
                exprs[node] = expr
            else:
                v = fresh()
                lets.append((v, expr))
                exprs[node] = ab.Var(v)

        in_vars = []
        for n in inputs:
            v = fresh()
            in_vars.append(v)
            exprs[n] = ab.Var(v)
        for unit in order:
            if isinstance(unit, Node):
                prim, operands = self.leaf(unit)
                if not operands:  # a random draw (all else without activation operands is a constant)
                    bind(unit, self._draw_expr(unit, prim, in_vars))
                    continue
                bind(unit, ab.apply(ab.Lit(prim), *(exprs[a] for a in operands)))
                continue
            g, ins, outs = calls[unit]
            name = self.def_names[unit]
            body = self.lower_region(g, ins, outs, scope + (unit,))
            out_types = [type_of_value(o.meta["val"]) for o in outs]
            out_type = out_types[0] if len(outs) == 1 else TupleType(tuple(out_types))
            self.defs[name] = Def(name, tuple(type_of_value(i.meta["val"]) for i in ins), out_type, body)
            call = ab.apply(ab.Lit(Ref(name)), *(exprs[a] for a in ins))
            if len(outs) == 1:
                bind(outs[0], call)
            else:
                tv = fresh()
                lets.append((tv, call))
                for i, o in enumerate(outs):
                    bind(o, ab.App(ab.Lit(Prim("getitem", (HOLE, i), (), out_types[i])), ab.Var(tv)))

        if len(outputs) == 1:
            body = self._output_expr(outputs[0], exprs)
        else:
            # constant outputs are bound in the tuple leaf itself, activations are its holes
            slots, results = [], []
            for o in outputs:
                if o in exprs:
                    slots.append(HOLE)
                    results.append(exprs[o])
                elif o in self.const_index:
                    slots.append(ConstRef(self.const_index[o]))
                elif isinstance(self.bound.get(o), TensorRef):
                    slots.append(self.bound[o])
                else:
                    raise BwskError(f"unsupported output {o!r}")
            types = tuple(self._value_type(o) for o in outputs)
            body = ab.apply(ab.Lit(Prim("tuple", tuple(slots), (), TupleType(types))), *results)
        for v, e in reversed(lets):
            body = ab.let(v, e, body)
        for v in reversed(in_vars):
            body = ab.abstract(v, body)
        return ab.to_term(body)

    @staticmethod
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

    def _output_expr(self, o, exprs):
        if o in exprs:
            return exprs[o]
        if isinstance(o, Node) and o in self.const_index:
            return ab.Lit(Const(self.const_index[o]))
        if isinstance(o, Node) and isinstance(self.bound.get(o), TensorRef):
            return ab.Lit(Ref(self.bound[o].name))
        raise BwskError(f"unsupported output {o!r}")

    def _order(self, nodes, unit_of):
        """Units (own nodes and child calls) in a topological order, ties broken by graph position."""
        first: dict[Any, int] = {}
        g = nx.DiGraph()
        for n in nodes:
            u = unit_of[n]
            first.setdefault(u, self.position[n])
            g.add_node(u)
            for a in n.all_input_nodes:
                ua = unit_of.get(a)
                if ua is not None and ua != u:
                    g.add_edge(ua, u)
        return list(nx.lexicographical_topological_sort(g, key=lambda u: first[u]))


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
