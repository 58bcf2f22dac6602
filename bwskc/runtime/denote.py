"""The meaning of terms as curried Python functions, shared by the interpreter and the fx codegen.

A backend decides what a primitive does (call the ATen op, or emit an fx node) and what a bound tensor
is (a tensor, or a ``get_attr`` node); the combinators are the same for both. Every value is computed
once per application, so the fx graph holds exactly one node per primitive application. What an op
name and a primitive's arguments are as values (``resolve_op``, ``fill``) is ``bwskc.op_values``'s,
re-exported here; a coupling chain's steps follow ``bwskc.runtime.steps``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from bwskc.errors import BwskError
from bwskc.ir import HOLE, REV_KINDS, Comb, Const, Prim, Program, Ref, TensorRef, rev_shared
from bwskc.op_values import fill, resolve_op  # re-exported: the runtime and the passes import them from here
from bwskc.runtime.steps import forward_step

_COMB: dict[str, Callable] = {
    "I": lambda x: x,
    "K": lambda c: lambda x: c,
    "W": lambda f: lambda x: f(x)(x),
    "B": lambda f: lambda g: lambda x: f(g(x)),
    "C": lambda f: lambda g: lambda x: f(x)(g),
    "S": lambda f: lambda g: lambda x: f(x)(g(x)),
}


# Buffer updates. A model exported in training mode mutates buffers (batch norm's running statistics and
# ``num_batches_tracked``); torch.export's functional graph returns each buffer's new value. Two forms
# reach the IR:
# * implied by a functional leaf: the ATen ``*_functional`` variant of an op that mutates its inputs
#   returns their new values, so a batch-norm leaf bound to ``bn.running_mean`` says by itself what the
#   buffer becomes (``IMPLIED_UPDATES``: argument index -> result index); the term is unchanged, and a
#   coupled branch or a checkpointed layer holding it stays what it was;
# * any other update is an extra entry output named ``update:<buffer>`` (``num_batches_tracked + 1``, a
#   constant of the step), after the user outputs, carried by the text form like any output.
# ``run_entry`` returns the user outputs only (the program's value); ``bwskc.compile``'s module applies
# the updates (``bwskc.runtime.compiled``).
UPDATE_PREFIX = "update:"
IMPLIED_UPDATES: dict[str, tuple[tuple[int, int], ...]] = {
    "aten._native_batch_norm_legit_functional.default": ((3, 3), (4, 4)),
    "aten._batch_norm_with_update_functional.default": ((3, 4), (4, 5)),
}


def update_target(output_name: str) -> str | None:
    """The buffer an entry output updates (``update:bn.running_mean`` -> ``bn.running_mean``), or None
    for a user output."""
    return output_name[len(UPDATE_PREFIX):] if output_name.startswith(UPDATE_PREFIX) else None


def implied_updates(prim: Prim) -> list[tuple[int, int, str]]:
    """``(argument index, result index, buffer name)`` of each buffer a functional leaf updates."""
    out = []
    for arg, result in IMPLIED_UPDATES.get(prim.op, ()):
        if arg < len(prim.args) and isinstance(prim.args[arg], TensorRef):
            out.append((arg, result, prim.args[arg].name))
    return out


def sub_prim(add: Prim) -> Prim:
    """``aten.sub.Tensor(_, _)`` of the same type as a coupling chain's combining ``add``: the inverse
    of each coupling step and the ``- x`` of the merge."""
    return Prim("aten.sub.Tensor", (HOLE, HOLE), (), add.type)


class Denoter:
    """Builds the curried function of each term for one evaluation (constants computed once)."""

    def __init__(self, program: Program, backend):
        self.program = program
        self.backend = backend
        self.const_values: dict[int, Any] = {}
        self.def_values: dict[str, Any] = {}

    def bound(self, ref):
        if isinstance(ref, TensorRef):
            return self.backend.tensor(ref.name)
        return self.const(ref.index)

    def const(self, index: int):
        if index not in self.const_values:
            self.const_values[index] = self.call_prim(self.program.consts[index], [])
        return self.const_values[index]

    def call_prim(self, prim: Prim, operands: list):
        operands = list(operands)
        args = fill(prim.args, operands, self.bound)
        kwargs = {k: v for k, v in zip((k for k, _ in prim.kwargs),
                                       fill(tuple(v for _, v in prim.kwargs), operands, self.bound))}
        return self.backend.prim(prim, args, kwargs)

    def prim(self, prim: Prim):
        arity = prim.arity
        if arity == 0:
            return self.call_prim(prim, [])

        def collect(got):
            if len(got) == arity:
                return self.call_prim(prim, got)
            return lambda x: collect(got + [x])
        return collect([])

    def term(self, t):
        if isinstance(t, Prim):
            return self.prim(t)
        if isinstance(t, Comb):
            if t.kind in REV_KINDS:
                return self.rev(t)
            if t.kind == "B" and len(t.args) >= 2:
                fs = [self.term(a) for a in t.args]

                def composed(x, fs=fs):
                    for f in reversed(fs):
                        x = f(x)
                    return x
                return composed
            if t.kind == "K" and len(t.args) == 1 and isinstance(t.args[0], Prim) and t.args[0].arity == 0:
                # ``K(draw)``: a random draw with no activation operand (``torch.rand(shape)``), made
                # when the term is applied, so it runs where its region runs (inside a branch scope)
                draw = t.args[0]
                return lambda x: self.call_prim(draw, [])
            v = _COMB[t.kind]
            for a in t.args:
                v = v(self.term(a))
            return v
        if isinstance(t, Ref):
            if t.name in self.program.defs:
                if t.name not in self.def_values:
                    value = self.term(self.program.defs[t.name].body)
                    wrap = getattr(self.backend, "wrap_def", None)  # e.g. checkpoint a layer's call
                    if wrap is not None:
                        value = wrap(self.program.defs[t.name], value, self)
                    self.def_values[t.name] = value
                return self.def_values[t.name]
            if t.name in self.program.tensors:
                return self.backend.tensor(t.name)
            raise BwskError(f"unbound name {t.name!r}")
        if isinstance(t, Const):
            return self.const(t.index)
        raise TypeError(f"not a term: {t!r}")

    def rev(self, t: Comb):
        """A coupling chain ``Rk(add, f1, .., fn)`` as a curried function of its k shared inputs and
        its stream. A backend with a ``rev`` method runs it (the reversible runtime); otherwise the
        chain is unrolled into the backend's own primitive calls (plain autograd stores everything)."""
        k = rev_shared(t.kind)
        branches = [self.term(f) for f in t.args[1:]]
        add, sub = t.args[0], sub_prim(t.args[0])
        hook = getattr(self.backend, "rev", None)

        def combine(stream, y):
            return self.call_prim(add, [stream, y])

        def run(shared, x):
            fs = []
            for f in branches:
                for m in shared:
                    f = f(m)
                fs.append(f)
            if hook is not None:
                return hook(t, fs, shared, x, self)
            a = b = x
            for i, f in enumerate(fs):
                with self.branch_scope(t, i):
                    a, b = forward_step(i, a, b, f, combine)
            return self.call_prim(add, [a, self.call_prim(sub, [b, x])])

        def collect(got):
            if len(got) == k + 1:
                return run(got[:k], got[k])
            return lambda v: collect(got + [v])
        return collect([])

    def branch_scope(self, t: Comb, i: int):
        """A context in which branch ``i`` of chain ``t`` is evaluated (backends key dropout masks on
        it, so a replayed branch draws the same masks)."""
        scope = getattr(self.backend, "branch_scope", None)
        return scope(t, i) if scope is not None else contextlib.nullcontext()

    def run_entry(self, inputs: list, *, updates: bool = False):
        """The entry applied to ``inputs``: its user outputs (one value, or a tuple when several), and
        with ``updates=True`` also the explicit buffer updates as ``[(buffer name, value)]``."""
        f = self.term(self.program.entry.body)
        for x in inputs:
            f = f(x)
        names = self.program.entry.output_names
        targets = [update_target(n) for n in names]
        if not any(t is not None for t in targets) or (len(names) > 1 and not isinstance(f, (tuple, list))):
            return (f, []) if updates else f  # (an analysis's abstract tuple is left whole)
        values = list(f) if len(names) > 1 else [f]
        user = [v for t, v in zip(targets, values) if t is None]
        out = user[0] if len(user) == 1 else tuple(user)
        return (out, [(t, v) for t, v in zip(targets, values) if t is not None]) if updates else out
