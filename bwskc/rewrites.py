"""Rewrites of the ATen graph before lowering: ops autograd cannot differentiate, made differentiable.

``run_decompositions`` turns an in-place ``dst.copy_(src)`` into the functional ``aten.copy.default(dst,
src)``, which has no derivative ("derivative for aten::copy is not implemented": RWKV's CPU time loop
fails in backward in every mode). Its value is ``src`` broadcast to ``dst``'s shape and converted to
its dtype and device; ``dst``'s values are not read. So it becomes ``expand`` (where the shapes differ)
and ``_to_copy`` (where the dtype or device differs) or ``clone``, each differentiable, with the same
value and type. ``dst`` no longer feeds it; the lowering drops it if nothing else uses it.
"""
from __future__ import annotations

import copy

import torch
from torch.export import ExportedProgram

aten = torch.ops.aten


def differentiable(ep: ExportedProgram, *, owned: bool) -> ExportedProgram:
    """``ep`` with every ``aten.copy.default`` rewritten; ``owned`` says ``ep`` may be changed in place
    (a fresh result of ``run_decompositions``), otherwise a copy is rewritten."""
    copies = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is aten.copy.default]
    if not copies:
        return ep
    if not owned:
        ep = copy.deepcopy(ep)
        copies = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is aten.copy.default]
    graph = ep.graph
    for node in copies:
        dst, src = node.args[0], node.args[1]
        want, have = dst.meta["val"], src.meta["val"]
        with graph.inserting_before(node):
            value = src
            if tuple(have.shape) != tuple(want.shape):
                value = _call(graph, node, aten.expand.default, (value, list(want.shape)),
                              _meta(want.shape, have.dtype))
            if have.dtype != want.dtype or have.device != want.device:
                value = _call(graph, node, aten._to_copy.default, (value,),
                              node.meta["val"], {"dtype": want.dtype, "device": want.device})
            else:  # a fresh tensor, as copy_'s destination is (not a stride-0 view of the source)
                value = _call(graph, node, aten.clone.default, (value,), node.meta["val"])
        node.replace_all_uses_with(value)
        graph.erase_node(node)
    graph.lint()
    ep.graph_module.recompile()
    return ep


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _call(graph, like, target, args, val, kwargs=None):
    """A new call node carrying ``like``'s module stack (so it lowers inside the same module call)."""
    node = graph.call_function(target, args, kwargs or {})
    node.meta.update({k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace")})
    node.meta["val"] = val
    return node
