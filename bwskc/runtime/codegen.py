"""Codegen: a program becomes a torch.fx GraphModule, one node per primitive application.

The same denotation as the interpreter runs once with fx nodes for values, so combinators cost nothing
at run time. Parameters and buffers are registered under their state-dict names.
"""
from __future__ import annotations

import torch
from torch import fx

from bwskc._deep import run_deep
from bwskc.ir import Program
from bwskc.runtime.denote import Denoter, resolve_op


class _FxBackend:
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


def _module_tree(program: Program) -> torch.nn.Module:
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


def _placeholder_name(name: str, index: int) -> str:
    """Entry input names as fx argument names, unless they would clash with Python or fx codegen."""
    import keyword
    if name.isidentifier() and not keyword.iskeyword(name) and name not in ("self", "torch"):
        return name
    return f"input_{index}"


def to_graph_module(program: Program) -> fx.GraphModule:
    def build():
        graph = fx.Graph()
        placeholders = [graph.placeholder(_placeholder_name(n, i))
                        for i, n in enumerate(program.entry.input_names)]
        out = Denoter(program, _FxBackend(graph)).run_entry(placeholders)
        graph.output(out)
        return graph
    graph = run_deep(build)
    gm = fx.GraphModule(_module_tree(program), graph, class_name=program.name)
    return gm
