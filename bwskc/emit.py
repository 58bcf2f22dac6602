"""Machine-readable views of a program: versioned JSON (``bwskc.ir/2``) and a graphviz DOT graph.

``bwskc.ir/2`` is a compatible superset of ``/1`` (every /1 field kept): each node also records its
``call`` (the op's bound arguments, structured, and its holes' types), each typed node's evidence says
what the typing pass measured, and small weights that claims read are embedded (``weights``), so that
``bwskc check-evidence`` re-verifies the claims with torch alone (docs/typing.md, "Evidence schema")."""
from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import torch

from bwskc.ir import Program, TensorType, Type, prims
from bwskc.text import literal_text, type_text

SCHEMA = "bwskc.ir/2"
WEIGHT_EMBED_LIMIT = 1 << 16  # weights (elements in all) written into the file for check-evidence


def _type_fields(t: Type) -> dict:
    if isinstance(t, TensorType):
        return {"shape": list(t.shape), "dtype": t.dtype}
    return {"shape": None, "dtype": None}


def nodes(program: Program) -> list[dict]:
    """One node per leaf site (``bwskc.sites``), in print order: constants first, then each definition's
    leaves. ``type``/``evidence`` come from the typing pass, ``coordination`` from calm, when they ran."""
    from bwskc.sites import sites
    typing = program.analyses.get("typing")
    calm = program.analyses.get("calm")
    out = []
    for site in sites(program):
        node = _node(site.id, site.prim, site.module, site.scope, site.inputs)
        if typing is not None:
            v = typing.verdicts[site.id]
            node["type"], node["evidence"] = v.type, v.evidence()
        if calm is not None:
            node["coordination"] = dict(calm.coordination.get(site.id, {}))
        out.append(node)
    return out


def _node(index: int, p, module: str, scope: str, holes=()) -> dict:
    args = [literal_text(a) for a in p.args] + [f"{k}={literal_text(v)}" for k, v in p.kwargs]
    return {"id": index, "op": p.op, "type": None, **_type_fields(p.type), "result": type_text(p.type),
            "module": module, "def": scope, "args": args, "evidence": None, "call": encode_call(p, holes)}


def encode_arg(a, holes):
    """A bound argument as JSON: a hole ``{"hole": i}`` (``holes`` counts them), a bound tensor
    ``{"tensor": name}``, a constant ``{"const": index}``, a list, a number, ``{"float": "nan"}``,
    ``{"str": s}``, ``{"torch": "torch.float32"}`` (dtype, layout, memory format) or ``{"device": d}``."""
    from bwskc.ir import HOLE, ConstRef, TensorRef
    if a is HOLE:
        return {"hole": next(holes)}
    if isinstance(a, tuple):
        return [encode_arg(b, holes) for b in a]
    if isinstance(a, TensorRef):
        return {"tensor": a.name}
    if isinstance(a, ConstRef):
        return {"const": a.index}
    if a is None or isinstance(a, (bool, int)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": literal_text(a)}
    if isinstance(a, str):
        return {"str": a}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    return {"torch": str(a)}


def encode_call(p, holes) -> dict:
    """What check-evidence needs to rebuild the op: arguments and keyword arguments as ``encode_arg``
    writes them, and the types of the holes in order."""
    from bwskc.evidence import encode_types
    count = itertools.count()
    return {"args": [encode_arg(a, count) for a in p.args],
            "kwargs": {k: encode_arg(v, count) for k, v in p.kwargs},
            "holes": encode_types(holes)}


def _claim_weights(program: Program, ns: list[dict]) -> dict:
    """The bound tensors that typed claims read, written out while they total at most
    ``WEIGHT_EMBED_LIMIT`` elements (smallest first); the rest are named by claims as not at hand."""
    from bwskc.evidence_codec import encode_tensor
    names = set()
    for n in ns:
        if n.get("type") in ("S", "K"):
            names.update(_tensor_names(n["call"]))
    out, total = {}, 0
    for name in sorted(names, key=lambda k: (program.tensors[k].type.numel, k)):
        w = program.weights.get(name)
        if w is None or w.device.type == "meta" or total + w.numel() > WEIGHT_EMBED_LIMIT:
            continue
        out[name] = encode_tensor(w)
        total += w.numel()
    return out


def _tensor_names(v):
    if isinstance(v, dict):
        if "tensor" in v:
            yield v["tensor"]
        for x in v.values():
            yield from _tensor_names(x)
    elif isinstance(v, list):
        for x in v:
            yield from _tensor_names(x)


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
    if "typing" in program.analyses:
        doc["weights"] = _claim_weights(program, ns)
    for name in ("typing", "calm"):
        if name in program.analyses:
            doc["summary"][name] = program.analyses[name].summary()
    phases = [d.name for d in program.defs.values() if d.kind == "phase"]
    if "fusion" in getattr(program.analyses.get("passes"), "order", []):
        doc["summary"]["phases"] = phases
    return json.dumps(doc, indent=1) + "\n"


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


_COLOURS = {"S": "#b7e4c7", "K": "#f4a6a6", "GRAY": "#d9d9d9"}


def to_dot(program: Program) -> str:
    """Definitions as nodes (name, signature, leaf count), calls as edges. After typing a definition is
    filled by its composite verdict (S green, K red, GRAY grey) and labelled with its leaf counts; after
    calm a definition holding barriers gets a bold red border and the collectives they need; phases are
    dashed."""
    from bwskc.ir import Ref, subterms
    from bwskc.sites import sites
    typing, calm = program.analyses.get("typing"), program.analyses.get("calm")
    by_scope: dict[str, list] = {}
    if typing is not None or calm is not None:
        for site in sites(program):
            by_scope.setdefault(site.scope, []).append(site.id)
    lines = [f"digraph {_q(program.name)} {{", "  rankdir=TB;",
             '  node [shape=box, fontname="monospace", style=filled, fillcolor=white];']
    bodies = [(d.name, d.inputs, d.output, d.body, d.kind) for d in program.defs.values()]
    bodies.append(("entry", program.entry.inputs, program.entry.output, program.entry.body, "def"))
    for name, ins, out, body, kind in bodies:
        sig = f"({', '.join(type_text(t) for t in ins)}) -> {type_text(out)}"
        count = sum(1 for _ in prims(body))
        label = [name, sig, f"{count} {'leaf' if count == 1 else 'leaves'}"]
        attrs = []
        if typing is not None:
            c = typing.counts(by_scope.get(name, []))
            verdict = typing.defs[name].type
            label.append(f"{verdict}  (S {c['S']}, K {c['K']}, GRAY {c['GRAY']})")
            attrs.append(f'fillcolor="{_COLOURS[verdict]}"')
        if calm is not None:
            barriers = Counter(coll for i in by_scope.get(name, [])
                               for coll in calm.coordination.get(i, {}).values() if coll)
            if barriers:
                label.append("barriers: " + ", ".join(f"{k} x{v}" for k, v in sorted(barriers.items())))
                attrs.append('color="#c00000", penwidth=3')
        if kind == "phase":
            attrs.append('style="filled,dashed"')
        text = "\\n".join(_q(x)[1:-1] for x in label)
        lines.append(f"  {_q(name)} [label=\"{text}\"{''.join(', ' + a for a in attrs)}];")
    for name, _, _, body, _ in bodies:
        callees = []
        for t in subterms(body):
            if isinstance(t, Ref) and t.name in program.defs and t.name not in callees:
                callees.append(t.name)
        for c in callees:
            lines.append(f"  {_q(name)} -> {_q(c)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_dot(path: str) -> str:
    """Render a written DOT file to SVG beside it with graphviz's ``dot``; say what happened."""
    import shutil
    import subprocess
    exe = shutil.which("dot")
    if exe is None:
        return f"bwskc: wrote {path}; graphviz is not installed, so no SVG (install graphviz: dot -Tsvg)"
    svg = path.rsplit(".", 1)[0] + ".svg" if path.endswith(".dot") else path + ".svg"
    done = subprocess.run([exe, "-Tsvg", path, "-o", svg], capture_output=True, text=True)
    if done.returncode != 0:
        return f"bwskc: wrote {path}; graphviz failed: {done.stderr.strip().splitlines()[0]}"
    return f"bwskc: wrote {path} and {svg}"
