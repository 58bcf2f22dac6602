"""The IR's text form, printed: deterministic byte for byte, names quoted where they are not plain
identifiers or collide with a keyword, types where a value is bound, bare names where it is used, and
the sharding plans (``program.analyses["shard"]``) as ``shard AXIS N { ... }`` blocks after the entry.
``bwskc.text`` parses what this prints: ``parse_program(print_program(p)) == p``.
"""
from __future__ import annotations

import json
import math
import re

import torch

from bwskc._deep import run_deep
from bwskc.errors import BwskError
from bwskc.ir import DTYPE_BY_NAME, HOLE, Comb, ConstRef, Prim, Program, Ref, TensorRef, TupleType, Type
from bwskc.placement import plan_lines

FORMAT_VERSION = 1
_WIDTH = 100
_MAX_INDENT = 40  # deeper nesting is printed at this indent, so text stays linear in the term's size
_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.@]*$")
KEYWORDS = {"bwsk", "program", "param", "buffer", "constant", "const", "def", "phase", "entry", "B", "C",
            "I", "K", "S", "W", "R", "R1", "R2", "R3", "R4", "True", "False", "None", "inf", "nan", "_",
            "shard"}
TORCH_ATTRS = {str(v): v for v in [
    *DTYPE_BY_NAME.values(), torch.strided, torch.sparse_coo, torch.sparse_csr, torch._mkldnn,
    torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format]}


def name_text(name: str) -> str:
    if _PLAIN.match(name) and name not in KEYWORDS and not name.startswith("torch."):
        return name
    if "`" in name or "\n" in name:
        raise BwskError(f"name {name!r} cannot be printed")
    return f"`{name}`"


def type_text(t: Type) -> str:
    if isinstance(t, TupleType):
        if len(t.items) == 1:
            return f"({type_text(t.items[0])},)"
        return "(" + ", ".join(type_text(i) for i in t.items) + ")"
    return str(t)


def literal_text(a) -> str:
    if a is HOLE:
        return "_"
    if a is None or isinstance(a, bool):
        return str(a)
    if isinstance(a, int):
        return str(a)
    if isinstance(a, float):
        if math.isnan(a):
            return "nan"
        if math.isinf(a):
            return "inf" if a > 0 else "-inf"
        return repr(a)
    if isinstance(a, str):
        return json.dumps(a)
    if isinstance(a, tuple):
        return "[" + ", ".join(literal_text(b) for b in a) + "]"
    if isinstance(a, TensorRef):
        return name_text(a.name)
    if isinstance(a, ConstRef):
        return f"%{a.index}"
    if isinstance(a, torch.device):
        return f'torch.device("{a}")'
    if str(a) in TORCH_ATTRS:
        return str(a)
    raise BwskError(f"cannot print literal {a!r}")


def prim_text(p: Prim) -> str:
    parts = [literal_text(a) for a in p.args] + [f"{name_text(k)}={literal_text(v)}" for k, v in p.kwargs]
    return f"{name_text(p.op)}({', '.join(parts)}) : {type_text(p.type)}"


class _TermPrinter:
    def __init__(self):
        self.widths: dict[int, int] = {}

    def width(self, t) -> int:
        """Flat width, capped just above the line limit (so computing it is linear)."""
        key = id(t)
        if key in self.widths:
            return self.widths[key]
        if isinstance(t, Prim):
            w = len(prim_text(t))
        elif isinstance(t, Comb):
            w = 1
            if t.args:
                w += 2 + sum(self.width(a) + 2 for a in t.args) - 2
                w = min(w, _WIDTH + 1)
        elif isinstance(t, Ref):
            w = len(name_text(t.name))
        else:
            w = len(f"%{t.index}")
        self.widths[key] = min(w, _WIDTH + 1)
        return self.widths[key]

    def flat(self, t) -> str:
        if isinstance(t, Prim):
            return prim_text(t)
        if isinstance(t, Comb):
            return t.kind + ("(" + ", ".join(self.flat(a) for a in t.args) + ")" if t.args else "")
        if isinstance(t, Ref):
            return name_text(t.name)
        return f"%{t.index}"

    def render(self, t, indent: int, out: list[str]):
        if not isinstance(t, Comb) or not t.args or indent + self.width(t) <= _WIDTH:
            out.append(self.flat(t))
            return
        out.append(t.kind + "(\n")
        inner = min(indent + 2, _MAX_INDENT)
        for i, a in enumerate(t.args):
            out.append(" " * inner)
            self.render(a, inner, out)
            out.append(",\n" if i + 1 < len(t.args) else "\n")
        out.append(" " * indent + ")")


def term_text(t, indent: int = 0) -> str:
    out: list[str] = []
    _TermPrinter().render(t, indent, out)
    return "".join(out)


def print_program(p: Program) -> str:
    return run_deep(_print_program, p)


def _print_program(p: Program) -> str:
    lines = [f"bwsk {FORMAT_VERSION} program {name_text(p.name)}", ""]
    for name, decl in p.tensors.items():
        lines.append(f"{decl.kind} {name_text(name)} : {type_text(decl.type)}")
    if p.tensors:
        lines.append("")
    for i, c in enumerate(p.consts):
        lines.append(f"const %{i} = {prim_text(c)}")
    if p.consts:
        lines.append("")
    printer = _TermPrinter()
    for d in p.defs.values():
        sig = ", ".join(type_text(t) for t in d.inputs)
        keyword = "phase" if d.kind == "phase" else "def"
        attrs = f" {{role={name_text(d.role)}}}" if d.role is not None else ""
        out = [f"{keyword} {name_text(d.name)}{attrs} : ({sig}) -> {type_text(d.output)} =\n  "]
        printer.render(d.body, 2, out)
        lines.append("".join(out))
        lines.append("")
    e = p.entry
    ins = ", ".join(f"{name_text(n)}: {type_text(t)}" for n, t in zip(e.input_names, e.inputs))
    outs = ", ".join(f"{name_text(n)}: {type_text(t)}" for n, t in zip(e.output_names, e.outputs))
    out = [f"entry ({ins}) -> ({outs}) =\n  "]
    printer.render(e.body, 2, out)
    lines.append("".join(out))
    plans = p.analyses.get("shard") or {}
    if plans:
        from bwskc.sites import sites
        scope = {s.id: s.scope for s in sites(p)}
        for plan in plans.values():
            lines += [""] + plan_lines(plan, name_text, scope.get)
    return "\n".join(lines) + "\n"
