"""A leaf site as the typing rules see it: its op, its bound arguments by schema name, its input types,
the values of its bound tensors and constants when known, and a way to call it on activation inputs."""
from __future__ import annotations

from typing import Any

import torch

from bwskc.ir import (
    HOLE,
    ConstRef,
    Prim,
    Program,
    TensorRef,
    TensorType,
    TupleType,
    Type,
)
from bwskc.runtime.denote import Denoter, fill, resolve_op
from bwskc.runtime.interp import EagerBackend


class Values:
    """Values of a program's bound tensors and constants, when its weights are real (not meta)."""

    def __init__(self, program: Program):
        self.program = program
        self.known = bool(program.tensors) and all(
            n in program.weights and program.weights[n].device.type != "meta" for n in program.tensors)
        if not program.tensors:
            self.known = True
        self._denoter = Denoter(program, EagerBackend(program.weights)) if self.known else None

    def get(self, ref) -> torch.Tensor | None:
        if not self.known:
            return None
        if isinstance(ref, TensorRef):
            return self.program.weights[ref.name]
        try:
            with torch.no_grad():
                return self._denoter.const(ref.index)
        except Exception:  # a constant that cannot be computed here: unknown
            return None


def _schema_names(op: str) -> list[tuple[str, Any]] | None:
    try:
        fn = resolve_op(op)
        schema = fn._schema
    except Exception:
        return None
    out = []
    for a in schema.arguments:
        default = a.default_value if a.has_default_value() else None
        out.append((a.name, default))
    return out


class Leaf:
    """One leaf site: ``prim`` with its inferred input types, judged as a function of its holes."""

    def __init__(self, prim: Prim, inputs: tuple[Type, ...], values: Values):
        self.prim = prim
        self.op = prim.op
        self.packet = prim.op.rsplit(".", 1)[0] if prim.op.count(".") == 2 else prim.op
        self.inputs = inputs
        self.out = prim.type
        self.values = values
        self.names: dict[str, Any] = {}
        names = _schema_names(prim.op) if prim.op.count(".") == 2 else None
        if names is not None:
            for (n, default), a in zip(names, prim.args):
                self.names[n] = a
            for n, default in names[len(prim.args):]:
                self.names[n] = default
            self.names.update(dict(prim.kwargs))
        self.hole_args = [n for n, a in self.names.items() if a is HOLE]

    # bound arguments
    def arg(self, name: str, default=None):
        """The literal bound to ``name`` (a tensor or constant reference resolved to its value, or None
        when unknown)."""
        a = self.names.get(name, default)
        if isinstance(a, (TensorRef, ConstRef)):
            return self.values.get(a)
        return a

    def is_hole(self, name: str) -> bool:
        return self.names.get(name) is HOLE

    def bound_known(self) -> bool:
        """Every bound tensor and constant of this leaf has a known value."""
        refs = [a for a in _flat(tuple(self.prim.args) + tuple(v for _, v in self.prim.kwargs))
                if isinstance(a, (TensorRef, ConstRef))]
        return all(self.values.get(r) is not None for r in refs)

    # evaluation
    def call(self, *operands):
        """Run the op with ``operands`` filling its holes in order."""
        ops = list(operands)
        args = fill(self.prim.args, ops, self.values.get)
        kwargs = dict(zip((k for k, _ in self.prim.kwargs),
                          fill(tuple(v for _, v in self.prim.kwargs), ops, self.values.get)))
        with torch.no_grad():
            return resolve_op(self.op)(*args, **kwargs)

    def random(self, g: torch.Generator, scale: float = 1.0) -> tuple:
        return tuple(random_value(t, g, scale) for t in self.inputs)

    @property
    def x(self) -> TensorType | None:
        """The type of the only hole, when there is exactly one tensor hole."""
        if len(self.inputs) == 1 and isinstance(self.inputs[0], TensorType):
            return self.inputs[0]
        return None


def _flat(args):
    for a in args:
        if isinstance(a, tuple):
            yield from _flat(a)
        else:
            yield a


def random_value(t: Type, g: torch.Generator, scale: float = 1.0):
    if isinstance(t, TupleType):
        return tuple(random_value(i, g, scale) for i in t.items)
    if not isinstance(t, TensorType):
        raise TypeError(f"no random value of type {t}")
    dt = t.torch_dtype
    if dt == torch.bool:
        return torch.rand(t.shape, generator=g) < 0.5
    if not dt.is_floating_point and not dt.is_complex:
        return torch.randint(0, 8, t.shape, generator=g, dtype=dt)
    return (torch.randn(t.shape, generator=g, dtype=torch.float64) * scale).to(dt)
