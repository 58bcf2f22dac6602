"""Codegen: a program becomes a torch.fx GraphModule, one node per primitive application.

The same denotation as the interpreter runs once with fx nodes for values, so combinators cost nothing
at run time. Parameters and buffers are registered under their state-dict names. ``FxBackend``,
``module_tree``, ``register_tensor`` and ``placeholder_name`` are shared with ``bwskc.compile``'s
training codegen (``bwskc.runtime.compiled``).
"""
from __future__ import annotations

import torch
from torch import fx

from bwskc._deep import run_deep
from bwskc.ir import Program
from bwskc.op_values import resolve_op
from bwskc.runtime.denote import Denoter


class FxBackend:
    """The denotation's backend that emits fx: a primitive becomes a ``call_function`` node, a bound
    tensor a ``get_attr`` node (one per name); ``tuple``/``getitem`` of Python tuples fold away."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.attrs: dict[str, fx.Node] = {}

    def prim(self, prim, args, kwargs):
        if prim.op == "tuple":
            return tuple(args)
        if prim.op == "getitem" and isinstance(args[0], tuple):
            return args[0][args[1]]
        return self.graph.call_function(resolve_op(prim.op), tuple(args), kwargs)

    def tensor(self, name):
        if name not in self.attrs:
            self.attrs[name] = self.graph.get_attr(name)
        return self.attrs[name]


def module_tree(program: Program) -> torch.nn.Module:
    """A module holding the program's tensors under their dotted names (meta where no weight is bound)."""
    root = torch.nn.Module()
    for name, decl in program.tensors.items():
        register_tensor(root, name, decl, program.weights.get(name))
    return root


def register_tensor(root: torch.nn.Module, name: str, decl, value) -> None:
    """``value`` (a meta placeholder when None) as parameter or buffer ``name`` of ``root``, its
    submodules created along the dotted path."""
    *path, leaf = name.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if value is None:
        value = torch.empty(decl.type.shape, dtype=decl.type.torch_dtype, device="meta")
    if decl.kind == "param":
        mod.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=value.is_floating_point()))
    else:
        mod.register_buffer(leaf, value, persistent=decl.kind == "buffer")


def placeholder_name(name: str, index: int) -> str:
    """Entry input names as fx argument names, unless they would clash with Python or fx codegen."""
    import keyword
    if name.isidentifier() and not keyword.iskeyword(name) and name not in ("self", "torch"):
        return name
    return f"input_{index}"


def to_graph_module(program: Program) -> fx.GraphModule:
    def build():
        graph = fx.Graph()
        placeholders = [graph.placeholder(placeholder_name(n, i))
                        for i, n in enumerate(program.entry.input_names)]
        out = Denoter(program, FxBackend(graph)).run_entry(placeholders)
        graph.output(out)
        return graph
    graph = run_deep(build)
    gm = fx.GraphModule(module_tree(program), graph, class_name=program.name)
    return gm
