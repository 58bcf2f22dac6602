"""The partition axes: ``--axes`` parsed, or the defaults (batch on dim 0 of every input, sequence on
dim 1 of token and ``[B, T, D]`` inputs)."""
from __future__ import annotations

import re

from bwskc.errors import BwskError
from bwskc.ir import Program, TensorType

DEFAULT_AXES = ("batch", "sequence")
AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")


def default_axes(program: Program) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """batch on dim 0 of every input; sequence on dim 1 of integer/bool [B, T] and float [B, T, D]
    inputs. Dims of size 1 cannot be split with static shapes and are left out (with a note)."""
    axes: dict[str, list[tuple[str, int]]] = {"batch": [], "sequence": []}
    notes = []
    e = program.entry
    for name, t in zip(e.input_names, e.inputs):
        if not isinstance(t, TensorType) or not t.shape:
            continue
        wanted = [("batch", 0)]
        is_int = t.dtype.startswith(("i", "u")) or t.dtype == "bool"
        if (is_int and len(t.shape) == 2) or (not is_int and len(t.shape) == 3):
            wanted.append(("sequence", 1))
        for axis, dim in wanted:
            if t.shape[dim] < 2:
                notes.append(f"{axis}: {name} dim {dim} has size {t.shape[dim]}; not partitioned "
                             "(lower with a larger example to analyse it)")
            else:
                axes[axis].append((name, dim))
    return {a: v for a, v in axes.items() if v}, notes


def parse_axes(spec: str | None, program: Program) -> dict[str, list[tuple[str, int]]]:
    """``--axes``: None/empty for the defaults, or a comma list of ``AXIS=INPUT:DIM`` items (an axis may
    name several inputs) and bare default axis names (``batch``, ``sequence``)."""
    defaults, _ = default_axes(program)
    if spec is None or not str(spec).strip():
        return defaults
    e = program.entry
    types = dict(zip(e.input_names, e.inputs))
    out: dict[str, list[tuple[str, int]]] = {}
    bare: set[str] = set()
    for raw in str(spec).split(","):
        item = raw.strip()
        if not item:
            raise BwskError(f"--axes {spec!r}: empty item (expected AXIS=INPUT:DIM or a default axis "
                            f"name, comma-separated)")
        if "=" not in item:
            if item not in DEFAULT_AXES:
                raise BwskError(f"--axes: {item!r} is not a default axis (batch, sequence); write "
                                f"{item}=INPUT:DIM")
            if item not in defaults:
                raise BwskError(f"--axes: no input of {program.name} has a default {item} dim "
                                f"(inputs: {', '.join(f'{n}: {t}' for n, t in types.items())})")
            if item in out:
                raise BwskError(f"--axes: axis {item!r} given twice")
            out[item] = list(defaults[item])
            bare.add(item)
            continue
        axis, _, target = (s.strip() for s in item.partition("="))
        if not AXIS_NAME.match(axis):
            raise BwskError(f"--axes: bad axis name {axis!r} in {item!r}")
        if axis in bare:
            raise BwskError(f"--axes: axis {axis!r} given twice")
        inp, colon, dim_s = (s.strip() for s in target.rpartition(":"))
        if not colon or not inp or not re.fullmatch(r"-?\d+", dim_s):
            raise BwskError(f"--axes: {item!r} is not AXIS=INPUT:DIM (e.g. batch=input_ids:0)")
        if inp not in types:
            raise BwskError(f"--axes: {program.name} has no input {inp!r} "
                            f"(inputs: {', '.join(types) or 'none'})")
        t = types[inp]
        if not isinstance(t, TensorType) or not t.shape:
            raise BwskError(f"--axes: input {inp!r} is {t}, which has no dim to partition")
        dim = int(dim_s)
        if not -len(t.shape) <= dim < len(t.shape):
            raise BwskError(f"--axes: input {inp!r} is {t}: dim {dim} is out of range")
        dim %= len(t.shape)
        if t.shape[dim] < 2:
            raise BwskError(f"--axes: input {inp!r} dim {dim} has size {t.shape[dim]}, which cannot "
                            "be split (lower with a larger example)")
        entries = out.setdefault(axis, [])
        if any(n == inp for n, _ in entries):
            raise BwskError(f"--axes: axis {axis!r} names input {inp!r} twice")
        entries.append((inp, dim))
    return out
