"""The language-model head split off a compiled module, so training never builds the full logits.

A causal, seq2seq or masked LM ends in ``logits = linear(hidden, W[, b])`` (``[batch, seq, vocab]``):
at GPT-2's vocabulary, for a few thousand tokens, that one tensor and its softmax gradient outweigh all
the activations a reversible model keeps. ``split_head(module)`` finds that head in the module's
training graph and puts it behind a switch: by default the module computes its logits exactly as
before (the same ATen ops), and inside ``split.hidden()`` it returns the head's input ``hidden`` (shaped
like the logits with the vocabulary dimension replaced by the model's width) in the logits' place, and
``split.weight()``/``split.bias()`` give the head's parameters, for
``bwskc.kernels.cross_entropy.linear_cross_entropy`` to compute the loss chunk by chunk.

The pattern, after torch.export's decompositions: the output named ``logits`` (the entry's first output
where no output has that name) is, through shape-only wrappers (``view``/``reshape``/``_unsafe_view``
keeping the vocabulary as the last dimension, ``alias``, ``clone``) and at most one added bias, one of
``aten.linear(x, W[, b])``, ``aten.mm``/``aten.matmul(x, t(W))`` (``t``, ``permute [1, 0]`` or
``transpose``), ``aten.addmm(b, x, t(W))`` with ``W`` (``[V, d]``) and ``b`` (``[V]``) read from the
module (``get_attr``), every node between the head and the output used once. Anything else (logit
softcapping, a final scale or temperature, logits also used inside the model) is refused with a reason
and the trainer uses the full logits.

Only the training graph changes (the evaluation capture of a module compiled from a model keeps its
logits; ``module.eval()``/``train()`` switch between the two as before); a module with one graph (from
an IR file) gets the switch in that graph, off by default. A deep copy of a split module is split too
and shares the switch (``split_head(copy)`` finds it).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SAME = {aten.alias.default, aten.clone.default, aten.detach.default}
_CORE = {aten.linear.default, aten.mm.default, aten.matmul.default, aten.addmm.default}


def _fetch(module: torch.nn.Module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _HeadCall:
    """The fx call target standing for the head and its wrappers: ``(x, weight, bias) -> logits`` by
    default (the original nodes, copied into a small graph), ``-> hidden`` while ``emit_hidden``."""

    def __init__(self, logits_gm: fx.GraphModule, hidden_ops: list, width: int, vocab: int,
                 names: tuple):
        self.logits_gm, self.hidden_ops, self.width, self.vocab = logits_gm, hidden_ops, width, vocab
        self.names = names  # (weight's name, bias's name or None, whether the weight is stored [d, V])
        self.emit_hidden = False
        self.__name__ = self.__qualname__ = "lm_head"

    def __deepcopy__(self, memo):
        return self  # as the graph's node targets are: a module's deep copy shares the switch

    def __call__(self, x, weight, bias=None):
        if not self.emit_hidden:
            return self.logits_gm(x, weight, bias)
        for op, args, kwargs in self.hidden_ops:
            x = op(x, *args, **kwargs)
        return x


@dataclass
class HeadSplit:
    """A module's head behind a switch (see the module docstring). ``index``: the logits' position
    among the module's outputs; ``weight_name``/``bias_name``: the state-dict names of the head's
    tensors (``transposed``: the weight is stored ``[d, V]``)."""
    module: torch.nn.Module
    graph: fx.Graph
    call: _HeadCall
    index: int
    weight_name: str
    bias_name: str | None
    transposed: bool = False

    @property
    def vocab(self) -> int:
        return self.call.vocab

    @property
    def width(self) -> int:
        return self.call.width

    def weight(self) -> torch.Tensor:
        """The head's weight as ``[V, d]`` (the module's own tensor: a tied embedding's Parameter)."""
        w = _fetch(self.module, self.weight_name)
        return w.t() if self.transposed else w

    def bias(self) -> torch.Tensor | None:
        return None if self.bias_name is None else _fetch(self.module, self.bias_name)

    def running(self) -> bool:
        """Whether the graph the module runs now is the one with the switch (not the eval capture)."""
        return self.module.graph is self.graph

    @contextlib.contextmanager
    def hidden(self):
        """Forward calls inside return ``hidden`` in the logits' place. Yields this split, or None when
        the module is running its evaluation capture (which computes logits as always)."""
        previous = self.call.emit_hidden
        self.call.emit_hidden = True
        try:
            yield self if self.running() else None
        finally:
            self.call.emit_hidden = previous

    def named(self, named: dict) -> dict:
        """Outputs keyed by name (``objectives.outputs_by_name``) of a call inside ``hidden()``: the
        logits' entries become ``hidden``, and ``head`` is ``(weight, bias)``."""
        program = getattr(self.module, "program", None)
        names = list(program.entry.output_names) if program is not None else []
        out = dict(named)
        key = names[self.index] if self.index < len(names) else "logits"
        hidden = out.pop(key)
        if out.get("logits") is hidden:
            del out["logits"]
        out["hidden"] = hidden
        out["head"] = (self.weight(), self.bias())
        return out


def scope(split: HeadSplit | None):
    """``split.hidden()``, or a scope yielding None when there is no split."""
    return contextlib.nullcontext(None) if split is None else split.hidden()


def split_head(module: torch.nn.Module) -> HeadSplit | None:
    """The module's head behind a switch, or None where the pattern is not found
    (``try_split_head`` says why)."""
    return try_split_head(module)[0]


def _logits_index(module) -> int:
    program = getattr(module, "program", None)
    names = list(program.entry.output_names) if program is not None else []
    return names.index("logits") if "logits" in names else 0


def try_split_head(module: torch.nn.Module) -> tuple[HeadSplit | None, str | None]:
    """``(split, None)``, or ``(None, reason)`` when the module's logits are not a plain linear head.
    Splitting a module twice returns the split it already has."""
    graphs = module.__dict__.get("_graphs")
    graph = graphs[True] if graphs is not None else getattr(module, "graph", None)
    if not isinstance(graph, fx.Graph):
        return None, "the module has no fx graph"
    existing = module.__dict__.get("_head_split")
    if existing is not None and existing.graph is graph:
        return existing, None
    index = _logits_index(module)
    call = _installed(graph, index)
    if call is not None:  # split already (a deep copy of a split module): the same switch
        split = HeadSplit(module, graph, call, index, *call.names)
        module.__dict__["_head_split"] = split
        return split, None
    found = _match(module, graph, index)
    if isinstance(found, str):
        return None, found
    split = _install(module, graph, index, found)
    module.__dict__["_head_split"] = split
    return split, None


@dataclass
class _Match:
    logits: fx.Node           # the output value
    wrappers: list            # from the output inwards: shape-only nodes
    bias_add: fx.Node | None  # an add of the bias after the matmul
    core: fx.Node             # linear / mm / matmul / addmm
    x: fx.Node
    weight: fx.Node           # get_attr
    weight_t: fx.Node | None  # the transposing node between the weight and the matmul
    bias: fx.Node | None      # get_attr
    transposed: bool
    vocab: int
    width: int


def _output_values(graph: fx.Graph) -> list | None:
    out = next((n for n in reversed(graph.nodes) if n.op == "output"), None)
    if out is None:
        return None
    values = out.args[0]
    return list(values) if isinstance(values, (tuple, list)) else [values]


def _installed(graph: fx.Graph, index: int) -> _HeadCall | None:
    flat = _output_values(graph) or []
    node = flat[index] if index < len(flat) else None
    if isinstance(node, fx.Node) and node.op == "call_function" and isinstance(node.target, _HeadCall):
        return node.target
    return None


def _attr(module, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            value = _fetch(module, node.target)
        except AttributeError:
            return None
        return value if isinstance(value, torch.Tensor) else None
    return None


def _is_transpose(node) -> bool:
    if not (isinstance(node, fx.Node) and node.op == "call_function"):
        return False
    if node.target in (aten.t.default, aten.numpy_T.default):
        return True
    if node.target == aten.permute.default:
        return list(node.args[1]) == [1, 0]
    if node.target == aten.transpose.int:
        return sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]
    return False


def _match(module, graph: fx.Graph, index: int) -> _Match | str:
    flat = _output_values(graph)
    if flat is None:
        return "the graph has no output"
    if index >= len(flat) or not isinstance(flat[index], fx.Node):
        return "the module has no logits output"
    logits = flat[index]
    if sum(1 for v in flat if v is logits) != 1 or len(logits.users) != 1:
        return "the logits are also used elsewhere in the graph (or output twice)"
    wrappers, bias_add, n = [], None, logits
    while True:
        if n.op != "call_function":
            return f"the logits come from a {n.op} node, not a linear head"
        if n.target in _CORE:
            break
        if n.target in _VIEWS or n.target in _SAME:
            wrappers.append(n)
        elif n.target == aten.add.Tensor and bias_add is None and len(n.args) == 2 and not n.kwargs:
            bias_add = n
        else:
            name = getattr(n.target, "__name__", str(n.target))
            return (f"the logits are {name} of the head's output (softcapping, a scale or another "
                    "op after the linear head): the full logits are used")
        nxt = n.args[0] if n is not bias_add else None
        if n is bias_add:
            a, b = n.args
            if _attr(module, b) is not None and isinstance(a, fx.Node) and _attr(module, a) is None:
                nxt = a
            elif _attr(module, a) is not None and isinstance(b, fx.Node) and _attr(module, b) is None:
                nxt = b
            else:
                return "the logits add something other than a bias read from the module"
        if not isinstance(nxt, fx.Node) or len(nxt.users) != 1:
            return "a value between the head and the logits output is used elsewhere"
        n = nxt
    core = n
    weight_t, bias = None, None
    if core.target == aten.linear.default:
        x, w = core.args[0], core.args[1]
        bias = core.args[2] if len(core.args) > 2 else core.kwargs.get("bias")
        transposed = False
    else:
        if core.target == aten.addmm.default:
            if any(float(core.kwargs.get(k, 1)) != 1.0 for k in ("beta", "alpha")):
                return "the head's addmm scales its terms (beta or alpha not 1)"
            bias, x, wt = core.args[0], core.args[1], core.args[2]
        else:
            x, wt = core.args[0], core.args[1]
        if _is_transpose(wt) and _attr(module, wt.args[0]) is not None:
            weight_t, w, transposed = wt, wt.args[0], False
        elif _attr(module, wt) is not None:
            w, transposed = wt, True  # stored [d, V]
        else:
            return "the head's weight is not a tensor read from the module"
    wv = _attr(module, w)
    if wv is None or wv.dim() != 2:
        return "the head's weight is not a matrix read from the module"
    vocab, width = (wv.shape[1], wv.shape[0]) if transposed else (wv.shape[0], wv.shape[1])
    if not isinstance(x, fx.Node):
        return "the head's input is not a graph value"
    if bias is not None and bias_add is not None:
        return "the head has two biases"
    if bias_add is not None:
        a, b = bias_add.args
        bias = b if _attr(module, b) is not None else a
    if bias is not None:
        bv = _attr(module, bias)
        if bv is None or tuple(bv.shape) != (vocab,):
            return "the head's bias is not a [vocab] tensor read from the module"
    for wrap in wrappers:
        if wrap.target in _VIEWS:
            shape = list(wrap.args[1])
            if len(shape) < 2 or shape[-1] != vocab:
                return "a reshape of the logits does not keep the vocabulary as its last dimension"
    return _Match(logits, wrappers, bias_add, core, x, w, weight_t, bias, transposed, int(vocab), int(width))


def _install(module, graph: fx.Graph, index: int, m: _Match) -> HeadSplit:
    # the original computation, copied into its own small graph (x, weight, bias) -> logits
    sub = fx.Graph()
    env = {m.x: sub.placeholder("x"), m.weight: sub.placeholder("weight")}
    bias_ph = sub.placeholder("bias")
    if m.bias is not None:
        env[m.bias] = bias_ph
    chain = ([m.weight_t] if m.weight_t is not None else []) + [m.core] + \
        ([m.bias_add] if m.bias_add is not None else [])
    inner = list(reversed(m.wrappers))
    # bias_add sits somewhere in the wrapper chain: order everything as the graph does
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(chain + inner, key=order.__getitem__):
        env[node] = sub.node_copy(node, lambda a: env[a])
    sub.output(env[m.logits])
    logits_gm = fx.GraphModule(torch.nn.Module(), sub)
    hidden_ops = []
    for wrap in inner:
        if wrap.target in _VIEWS:
            shape = list(wrap.args[1])[:-1] + [m.width]
            hidden_ops.append((wrap.target, (shape,), {}))
        else:
            hidden_ops.append((wrap.target, tuple(wrap.args[1:]), dict(wrap.kwargs)))
    names = (m.weight.target, None if m.bias is None else m.bias.target, m.transposed)
    call = _HeadCall(logits_gm, hidden_ops, m.width, m.vocab, names)
    with graph.inserting_before(m.logits):
        node = graph.call_function(call, (m.x, m.weight, m.bias))
    m.logits.replace_all_uses_with(node)
    for dead in sorted(set(m.wrappers) | {m.core} | ({m.bias_add} if m.bias_add is not None else set()),
                       key=order.__getitem__, reverse=True):  # users before what they use
        graph.erase_node(dead)
    if m.weight_t is not None and not m.weight_t.users:
        graph.erase_node(m.weight_t)
    graph.lint()
    if module.graph is graph:
        module.recompile()
    return HeadSplit(module, graph, call, index, *names)
