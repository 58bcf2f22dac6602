"""Machine-readable views of a program: versioned JSON (``bwskc.ir/1``) and a graphviz DOT graph."""
from __future__ import annotations

import json
from collections import Counter

from bwskc.ir import Program, TensorType, Type, prims
from bwskc.text import literal_text, type_text

SCHEMA = "bwskc.ir/1"


def _type_fields(t: Type) -> dict:
    if isinstance(t, TensorType):
        return {"shape": list(t.shape), "dtype": t.dtype}
    return {"shape": None, "dtype": None}


def nodes(program: Program) -> list[dict]:
    """One node per primitive leaf, in print order: constants first, then each definition's leaves."""
    out = []
    for i, c in enumerate(program.consts):
        out.append(_node(len(out), c, "", f"%{i}"))
    for d in list(program.defs.values()) + [program.entry]:
        name = getattr(d, "name", "entry")
        module = getattr(d, "module", "")
        for p in prims(d.body):
            out.append(_node(len(out), p, module, name))
    return out


def _node(index: int, p, module: str, scope: str) -> dict:
    args = [literal_text(a) for a in p.args] + [f"{k}={literal_text(v)}" for k, v in p.kwargs]
    return {"id": index, "op": p.op, "type": None, **_type_fields(p.type), "result": type_text(p.type),
            "module": module, "def": scope, "args": args, "evidence": None}


def to_json(program: Program) -> str:
    ns = nodes(program)
    ops = Counter(n["op"] for n in ns)
    params = [d for d in program.tensors.values() if d.kind == "param"]
    doc = {
        "schema": SCHEMA,
        "program": program.name,
        "inputs": [{"name": n, "type": type_text(t)} for n, t in
                   zip(program.entry.input_names, program.entry.inputs)],
        "outputs": [{"name": n, "type": type_text(t)} for n, t in
                    zip(program.entry.output_names, program.entry.outputs)],
        "tensors": [{"name": n, "kind": d.kind, **_type_fields(d.type)} for n, d in program.tensors.items()],
        "defs": [{"name": d.name, "module": d.module, "inputs": [type_text(t) for t in d.inputs],
                  "output": type_text(d.output)} for d in program.defs.values()],
        "nodes": ns,
        "summary": {
            "nodes": len(ns),
            "constants": len(program.consts),
            "defs": len(program.defs),
            "params": len(params),
            "param_elements": sum(d.type.numel for d in params),
            "ops": dict(sorted(ops.items())),
        },
    }
    return json.dumps(doc, indent=1) + "\n"


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(program: Program) -> str:
    """Definitions as nodes (label: name, signature, leaf count), calls as edges."""
    from bwskc.ir import Ref, subterms
    lines = [f"digraph {_q(program.name)} {{", "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
    bodies = [(d.name, d.inputs, d.output, d.body) for d in program.defs.values()]
    bodies.append(("entry", program.entry.inputs, program.entry.output, program.entry.body))
    for name, ins, out, body in bodies:
        sig = f"({', '.join(type_text(t) for t in ins)}) -> {type_text(out)}"
        count = sum(1 for _ in prims(body))
        label = _q(name)[:-1] + "\\n" + _q(sig)[1:-1] + "\\n" + f'{count} leaves"'
        lines.append(f"  {_q(name)} [label={label}];")
    for name, _, _, body in bodies:
        callees = []
        for t in subterms(body):
            if isinstance(t, Ref) and t.name in program.defs and t.name not in callees:
                callees.append(t.name)
        for c in callees:
            lines.append(f"  {_q(name)} -> {_q(c)};")
    lines.append("}")
    return "\n".join(lines) + "\n"
