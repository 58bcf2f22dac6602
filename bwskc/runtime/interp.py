"""The reference interpreter: evaluates a program's terms eagerly on tensors.

``EagerBackend`` is the denotation's eager backend (each primitive calls its ATen op at once), also used
by the typing rules, the leaf checks and the coupling evidence; ``Interpreter`` runs a program's entry
with its bound weights (``program(*args)``), checking the inputs against the entry's types.
"""
from __future__ import annotations

import torch

from bwskc._deep import run_deep
from bwskc.errors import BwskError
from bwskc.ir import Program, type_of_value
from bwskc.op_values import resolve_op
from bwskc.runtime.denote import Denoter


class EagerBackend:
    """Primitives run at once on tensors; bound tensors are the given weights."""

    def __init__(self, weights):
        self.weights = weights

    def prim(self, prim, args, kwargs):
        return resolve_op(prim.op)(*args, **kwargs)

    def tensor(self, name):
        return self.weights[name]


def bind_inputs(program: Program, args, kwargs) -> list:
    """Positional and keyword inputs in entry order, checked against the entry's static types."""
    names = program.entry.input_names
    if len(args) > len(names):
        raise BwskError(f"{program.name} takes {len(names)} inputs, got {len(args)}")
    values = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise BwskError(f"{program.name} has no input {k!r} (inputs: {', '.join(names)})")
        if k in values:
            raise BwskError(f"input {k!r} given twice")
        values[k] = v
    missing = [n for n in names if n not in values]
    if missing:
        raise BwskError(f"missing input {missing[0]!r}")
    out = []
    for name, typ in zip(names, program.entry.inputs):
        v = values[name]
        if not isinstance(v, torch.Tensor) or type_of_value(v) != typ:
            got = type_of_value(v) if isinstance(v, torch.Tensor) else type(v).__name__
            raise BwskError(f"input {name!r}: expected {typ}, got {got}")
        out.append(v)
    return out


class Interpreter:
    def __init__(self, program: Program):
        self.program = program

    def __call__(self, *args, **kwargs):
        program = self.program
        missing = [n for n in program.tensors if n not in program.weights]
        if missing:
            raise BwskError(f"no weights bound for {missing[0]!r} ({len(missing)} missing): "
                            "use program.with_weights(state_dict)")
        inputs = bind_inputs(program, args, kwargs)
        denoter = Denoter(program, EagerBackend(program.weights))
        return run_deep(denoter.run_entry, inputs)
