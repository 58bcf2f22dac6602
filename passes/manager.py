"""The pass manager: named passes run in order, the IR verified between them.

Two kinds of pass, as in MLIR and xDSL:

* an **analysis** (``typing``, ``calm``) computes a result about the IR without changing it; the result
  is stored in ``program.analyses[name]``;
* a **rewrite** (``fusion``, later ``reversible``) returns a new program of the same meaning. The IR is
  verified after it, and the analyses that already ran are run again on the new IR, so every stored
  result always describes the program it is attached to.

A pass names what it needs (``requires``); the manager runs a missing prerequisite first and says so in
the log it returns.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from bwskc.errors import BwskError
from bwskc.ir import Program
from bwskc.verify import verify_program

# name -> module under bwskc.passes holding a class ``PASS`` (imported on first use)
REGISTRY: dict[str, str] = {
    "typing": "bwskc.passes.typing",
    "calm": "bwskc.passes.calm",
    "fusion": "bwskc.passes.fusion",
    "reversible": "bwskc.passes.reversible",
}


class Pass:
    """A pass: ``name``, ``requires`` (names of passes that must run before it) and one method."""

    name: str = ""
    requires: tuple[str, ...] = ()
    kind: str = "analysis"  # or "rewrite"

    def analyze(self, program: Program, options: dict) -> Any:  # analysis passes
        raise NotImplementedError

    def rewrite(self, program: Program, options: dict) -> Program:  # rewrite passes
        raise NotImplementedError


def get_pass(name: str) -> Pass:
    if name not in REGISTRY:
        raise BwskError(f"unknown pass {name!r}: choose from {', '.join(REGISTRY)}")
    return importlib.import_module(REGISTRY[name]).PASS


@dataclass
class PassRun:
    """What the manager did: the passes in the order they ran (prerequisites included)."""

    order: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)  # prerequisites the caller did not name


def plan(names: Iterable[str]) -> PassRun:
    """The passes to run for ``names``, each after its prerequisites, each once."""
    run = PassRun()
    asked = list(names)

    def visit(name, chain):
        if name in chain:
            raise BwskError(f"passes require each other in a cycle: {' -> '.join(chain + [name])}")
        p = get_pass(name)
        for r in p.requires:
            visit(r, chain + [name])
        if name not in run.order:
            run.order.append(name)
            if name not in asked:
                run.added.append(name)

    for n in asked:
        visit(n, [])
    return run


def run_passes(program: Program, names: Iterable[str], *, options: dict | None = None,
               print_after: Iterable[str] = (), printer: Callable[[str, Program], None] | None = None,
               verify: bool = True) -> Program:
    """Run the named passes (and their prerequisites) on ``program``; the result carries the analyses.

    ``print_after`` names passes after which ``printer(name, program)`` is called (the CLI prints the IR).
    """
    options = dict(options or {})
    schedule = plan(names)
    wanted_prints = set(print_after)
    unknown = wanted_prints - set(schedule.order)
    if unknown:
        raise BwskError(f"--print-after {sorted(unknown)[0]}: that pass is not run "
                        f"(running: {', '.join(schedule.order)})")
    if verify:
        verify_program(program)
    analyses_done: list[str] = []
    for name in schedule.order:
        p = get_pass(name)
        if p.kind == "analysis":
            program = _with_analysis(program, name, p.analyze(program, options))
            analyses_done.append(name)
        else:
            rewritten = p.rewrite(program, options)
            if verify:
                verify_program(rewritten, filename=f"<after {name}>")
            for done in analyses_done:  # the rewrite invalidated them: recompute on the new IR
                rewritten = _with_analysis(rewritten, done, get_pass(done).analyze(rewritten, options))
            program = rewritten
        if name in wanted_prints and printer is not None:
            printer(name, program)
    program.analyses["passes"] = schedule
    return program


def _with_analysis(program: Program, name: str, result: Any) -> Program:
    out = program.replace(keep_analyses=True)
    if "_sites" in program.__dict__:  # same IR: the leaf sites (and their inferred types) carry over
        out.__dict__["_sites"] = program.__dict__["_sites"]
    out.analyses[name] = result
    return out
