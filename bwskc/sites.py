"""Leaf sites: every primitive occurrence of a program, in print order, with its inferred input types.

A site is what the analyses annotate and what ``--emit json`` calls a node: constants first (``%0``...),
then each definition's leaves in pre-order, then the entry's. Its ``id`` is its index in that order, so
the ids agree between the JSON, the report and the analyses' results. The input types of a leaf's holes
are not written in the IR (only its result type is); they come from the verifier's type inference.
"""
from __future__ import annotations

from dataclasses import dataclass

from bwskc._deep import run_deep
from bwskc.ir import Prim, Program, Type, prims
from bwskc.verify import Fn, Inference, TVar, fn_type


@dataclass(frozen=True)
class Site:
    id: int
    scope: str  # definition name, "entry", or "%N" for a constant
    module: str  # owning module path ('' for the model itself)
    prim: Prim
    inputs: tuple[Type, ...]  # types of the holes, in order (empty for a constant)

    @property
    def is_const(self) -> bool:
        return self.scope.startswith("%")


def scopes(program: Program):
    """(scope name, module, body, declared inputs, declared output) of every definition and the entry."""
    for d in program.defs.values():
        yield d.name, d.module, d.body, d.inputs, d.output
    e = program.entry
    yield "entry", "", e.body, e.inputs, e.output


def sites(program: Program) -> list[Site]:
    """Every leaf site of a verified program (cached on the program: programs are immutable)."""
    cached = program.__dict__.get("_sites")
    if cached is None:
        cached = run_deep(_sites, program)
        program.__dict__["_sites"] = cached
    return cached


def _sites(program: Program) -> list[Site]:
    out: list[Site] = []
    for i, c in enumerate(program.consts):
        out.append(Site(len(out), f"%{i}", "", c, ()))
    for scope, module, body, ins, outp in scopes(program):
        inf = Inference(program)
        inf.unify(inf.infer(body), fn_type(ins, outp), None)
        for p in prims(body):
            holes = tuple(_ground(inf, h) for h in inf.hole_types[id(p)])
            out.append(Site(len(out), scope, module, p, holes))
    return out


def _ground(inf: Inference, t):
    """A hole's type once inference fixed it; None if it is still a variable or a function (a hole
    filled with a function is not a tensor operand)."""
    t = inf.resolve(t)
    return None if isinstance(t, (TVar, Fn)) else t
