"""Rewrites of the ATen graph before lowering: ops autograd cannot differentiate, made differentiable.

``run_decompositions`` turns an in-place ``dst.copy_(src)`` into the functional ``aten.copy.default(dst,
src)``, which has no derivative ("derivative for aten::copy is not implemented": RWKV's CPU time loop
fails in backward in every mode). Its value is ``src`` broadcast to ``dst``'s shape and converted to
its dtype and device; ``dst``'s values are not read. So it becomes ``expand`` (where the shapes differ)
and ``_to_copy`` (where the dtype or device differs) or ``clone``, each differentiable, with the same
value and type. ``dst`` no longer feeds it; the lowering drops it if nothing else uses it.

``fuse_tanh_gelu`` (a speed rewrite, not a correctness one): the tanh GELU written out, as GPT-2's
``NewGELUActivation`` does (``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, eight ATen ops), is
``aten.gelu(x, approximate="tanh")``, one op whose backward is one op too: a training step runs seven
passes over the ``[batch, seq, 4d]`` activation fewer forward, more backward, and stores one tensor
instead of four. The two agree to rounding (at most a few float32 ulps; the tests bound it). The
``gelu_fast`` and BLOOM forms, whose sqrt(2/pi) is rounded to 10 and 8 digits, are fused where the
input's dtype rounds that difference away (not in float64).
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings

import torch
from torch.export import ExportedProgram
from torch.fx.subgraph_rewriter import replace_pattern_with_filters

aten = torch.ops.aten


def differentiable(ep: ExportedProgram, *, owned: bool) -> ExportedProgram:
    """``ep`` with every ``aten.copy.default`` rewritten; ``owned`` says ``ep`` may be changed in place
    (a fresh result of ``run_decompositions``), otherwise a copy is rewritten."""
    copies = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is aten.copy.default]
    if not copies:
        return ep
    if not owned:
        ep = _copy(ep)
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


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)  # the literal as NewGELUActivation computes it


def _written_out_tanh_gelu(x):
    inner = aten.add.Tensor(x, aten.mul.Tensor(aten.pow.Tensor_Scalar(x, 3.0), 0.044715))
    t = aten.tanh.default(aten.mul.Tensor(inner, _SQRT_2_OVER_PI))
    return aten.mul.Tensor(aten.mul.Tensor(x, 0.5), aten.add.Tensor(t, 1.0))


# The other written-out forms, ``0.5 x (1 + tanh(c x (1 + 0.044715 x x)))``: FastGELUActivation's
# (``gelu_fast``, c = 0.7978845608) and BLOOM's (c = 0.79788456, its 1 an int). Their c differs from
# sqrt(2/pi) by 3e-12 and 1e-9 relative: below float32's rounding (and bf16's, fp16's), so they are
# the tanh GELU there; in float64 the difference is above rounding and they are left as written.
_ROUNDED = (0.7978845608, 0.79788456)


def _written_out_fast_gelu(c, one):
    def pattern(x):
        inner = aten.add.Tensor(aten.mul.Tensor(aten.mul.Tensor(x, 0.044715), x), one)
        t = aten.tanh.default(aten.mul.Tensor(aten.mul.Tensor(x, c), inner))
        return aten.mul.Tensor(aten.mul.Tensor(x, 0.5), aten.add.Tensor(t, 1.0))
    return pattern


def _tanh_gelu(x):
    return aten.gelu.default(x, approximate="tanh")


def _candidate(node) -> bool:
    """A ``tanh`` of ``v * sqrt(2/pi)`` (or of ``(x * c) * v``, c a rounded sqrt(2/pi)) on a floating
    value: where a pattern can match (checked before anything is copied: BERT's pooler ``tanh`` is no
    GELU)."""
    if node.op != "call_function" or node.target is not aten.tanh.default:
        return False
    arg = node.args[0]
    val = node.meta.get("val")
    if val is None or not val.dtype.is_floating_point or getattr(arg, "target", None) is not aten.mul.Tensor \
            or len(arg.args) != 2:
        return False
    first = arg.args[0]
    return arg.args[1] == _SQRT_2_OVER_PI or (getattr(first, "target", None) is aten.mul.Tensor
                                              and len(first.args) == 2 and first.args[1] in _ROUNDED)


def _floating_input(match, original, pattern) -> bool:
    val = match.placeholder_nodes[0].meta.get("val")
    return val is not None and val.dtype.is_floating_point


def _rounding_hides(c):
    """A match filter: the input's dtype rounds away ``c``'s difference from sqrt(2/pi)."""
    def keep(match, original, pattern) -> bool:
        val = match.placeholder_nodes[0].meta.get("val")
        return (val is not None and val.dtype.is_floating_point
                and abs(c / _SQRT_2_OVER_PI - 1) < torch.finfo(val.dtype).eps / 2)
    return keep


def fuse_tanh_gelu(ep: ExportedProgram, *, owned: bool) -> ExportedProgram:
    """``ep`` with every written-out tanh GELU on a floating value replaced by ``aten.gelu``: matched
    as a pattern (``torch.fx``'s subgraph rewriter: the same ops, the same literals, no intermediate
    used elsewhere), the new node taking the matched output's module stack and value. ``owned``: ``ep``
    may be changed in place, otherwise a copy is rewritten, made only where a match is possible."""
    if not any(_candidate(n) for n in ep.graph.nodes):
        return ep
    if not owned:
        ep = _copy(ep)
    done = replace_pattern_with_filters(ep.graph_module, _written_out_tanh_gelu, _tanh_gelu,
                                        match_filters=[_floating_input])
    for c in _ROUNDED:
        for one in (1.0, 1):
            done += replace_pattern_with_filters(ep.graph_module, _written_out_fast_gelu(c, one), _tanh_gelu,
                                                 match_filters=[_rounding_hides(c)])
    for match in done:
        out = match.nodes_map[match.anchor]
        for node in match.replacements:
            node.meta.update({k: v for k, v in out.meta.items()
                              if k in ("nn_module_stack", "stack_trace", "val")})
    if done:
        ep.graph.lint()
        ep.graph_module.recompile()
    return ep


@contextlib.contextmanager
def quiet_leafspec():
    """Silences only torch 2.13's own FutureWarning from copying an ExportedProgram's module call graph:
    ``torch.export`` built its specs as ``LeafSpec``, and unpickling each (``copyreg``, in a deep copy
    or in ``run_decompositions``) warns ``isinstance(treespec, LeafSpec) is deprecated``. Nothing of
    bwskc's makes a LeafSpec."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                category=FutureWarning)
        yield


def _copy(ep: ExportedProgram) -> ExportedProgram:
    with quiet_leafspec():
        return copy.deepcopy(ep)
