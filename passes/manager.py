"""The pass manager: named passes run in order, the IR verified between them.

Two kinds of pass, as in MLIR and xDSL:

* an **analysis** (``typing``, ``calm``) computes a result about the IR without changing it; the result
  is stored in ``program.analyses[name]``;
* a **rewrite** (``fusion``, ``reversible``) returns a new program (for fusion, of the same meaning). The
  IR is verified after it, and the analyses that already ran are run again on the new IR, so every
  stored result always describes the program it is attached to.

A pass is a small class (``Pass``): its ``name``, its ``kind``, what it ``requires`` (the manager runs a
missing prerequisite first and says so in the ``PassRun`` it records) and its options, a dataclass
``Options`` (``FusionOptions``: ``s_regions``, ``typing``). Options are given to ``run_passes`` per pass,
``{"fusion": {"s_regions": False}}`` (or an ``Options`` instance), or qualified, ``{"fusion.typing": t}``;
an option the pass does not declare, or of the wrong type, is an error naming the pass and the option.
Unqualified keys (``{"axes": ...}``, what the CLI gives) are shared: each pass that declares an option of
that name takes it, and a pass without an ``Options`` dataclass receives them all as a plain dict.

Passes are found by name in ``REGISTRY`` (a module under ``bwskc.passes`` holding an instance ``PASS``,
imported on first use; the CLI reads the names from this file without importing it). An exception raised
inside a pass is re-raised naming it, ``pass 'fusion' failed: ...``: a ``BwskError`` (or subclass)
keeps its type and exit code with the prefix added to its message; any other error becomes a
``BwskError`` with the original type and message, exit code 1 (an internal error), chained to it.
"""
from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bwskc.errors import BwskError
from bwskc.ir import Program
from bwskc.verify import verify_program

# name -> module under bwskc.passes holding an instance ``PASS`` (imported on first use)
REGISTRY: dict[str, str] = {
    "typing": "bwskc.passes.typing",
    "calm": "bwskc.passes.calm",
    "fusion": "bwskc.passes.fusion",
    "reversible": "bwskc.passes.reversible",
}
KINDS = ("analysis", "rewrite")


class Pass:
    """A pass: ``name``, ``kind`` (``analysis`` or ``rewrite``), ``requires`` (names of passes that must
    run before it), ``Options`` (a dataclass of its options, or None: it receives a plain dict) and one
    method, ``analyze`` or ``rewrite``, called with the program and the pass's options."""

    name: str = ""
    requires: tuple[str, ...] = ()
    kind: str = "analysis"  # or "rewrite"
    Options: type | None = None

    def analyze(self, program: Program, options) -> Any:  # analysis passes
        raise NotImplementedError

    def rewrite(self, program: Program, options) -> Program:  # rewrite passes
        raise NotImplementedError

    def required(self, options) -> tuple[str, ...]:
        """The prerequisites with these options (``requires`` unless a pass says otherwise)."""
        return tuple(self.requires)

    def options_from(self, given=None):
        """``given`` (None, a mapping of option names, plain or qualified ``NAME.option``, or an
        ``Options`` instance) as this pass's options: an ``Options`` instance, checked, or a dict for a
        pass without ``Options``."""
        return make_options(self, given)


def make_options(p: Pass, given=None):
    """The options of pass ``p`` from ``given`` (see ``Pass.options_from``)."""
    options_type = getattr(p, "Options", None)
    if options_type is None:
        return dict(given or {})
    if isinstance(given, options_type):
        return given
    if given is not None and not isinstance(given, Mapping):
        raise BwskError(f"pass {p.name!r}: options must be a mapping or {options_type.__name__}, not "
                        f"{type(given).__name__}")
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    try:
        hints = typing.get_type_hints(options_type)
    except Exception:  # an annotation that does not resolve: values are not checked
        hints = {}
    values = {}
    for key, value in (given or {}).items():
        name = key[len(p.name) + 1:] if isinstance(key, str) and key.startswith(p.name + ".") else key
        if name not in fields:
            known = ", ".join(fields) or "none"
            raise BwskError(f"pass {p.name!r} has no option {name!r} (its options: {known})")
        problem = _type_problem(value, hints.get(name))
        if problem:
            raise BwskError(f"pass {p.name!r}: option {name!r} must be {problem}, not "
                            f"{type(value).__name__} ({value!r})")
        values[name] = value
    return options_type(**values)


_SIMPLE = (bool, int, float, str)


def _type_problem(value, hint) -> str | None:
    """What ``value`` should be if it does not fit a simple annotation (bool, int, float, str, or one
    of those or None); None if it fits or the annotation is not a simple one."""
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    simple = [a for a in allowed if a in _SIMPLE]
    if not simple or len(simple) + (type(None) in allowed) != len(allowed):
        return None
    if value is None and type(None) in allowed:
        return None
    for a in simple:
        if isinstance(value, a) and not (a in (int, float) and isinstance(value, bool)):
            return None
        if a is float and isinstance(value, int) and not isinstance(value, bool):
            return None
    names = [a.__name__ for a in simple] + (["None"] if type(None) in allowed else [])
    return " or ".join(names)


def get_pass(name: str) -> Pass:
    if name not in REGISTRY:
        raise BwskError(f"unknown pass {name!r}: choose from {', '.join(REGISTRY)}")
    p = importlib.import_module(REGISTRY[name]).PASS
    if p.kind not in KINDS:
        raise BwskError(f"pass {name!r} has kind {p.kind!r}: expected one of {', '.join(KINDS)}")
    return p


@dataclass
class PassRun:
    """What the manager did: the passes in the order they ran (prerequisites included)."""

    order: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)  # prerequisites the caller did not name


def _split_options(options: Mapping | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` as (per pass: a dict or an Options instance, shared: unqualified keys)."""
    per_pass: dict[str, Any] = {}
    shared: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if key in REGISTRY and (isinstance(value, Mapping) or dataclasses.is_dataclass(value)):
            if dataclasses.is_dataclass(value):
                per_pass[key] = value
            else:
                per_pass.setdefault(key, {}).update(value)
        elif isinstance(key, str) and "." in key and key.split(".", 1)[0] in REGISTRY:
            name, option = key.split(".", 1)
            own = per_pass.setdefault(name, {})
            if not isinstance(own, dict):
                raise BwskError(f"pass {name!r}: option {option!r} given besides an options object")
            own[option] = value
        else:
            shared[key] = value
    return per_pass, shared


def _options_of(p: Pass, per_pass: dict, shared: dict):
    own = per_pass.get(p.name, {})
    if getattr(p, "Options", None) is None:
        return {**shared, **(own if isinstance(own, Mapping) else vars(own))}
    if not isinstance(own, Mapping):
        return make_options(p, own)
    declared = {f.name for f in dataclasses.fields(p.Options)}
    return make_options(p, {**{k: v for k, v in shared.items() if k in declared}, **own})


def plan(names: Iterable[str], *, options: Mapping | None = None) -> PassRun:
    """The passes to run for ``names``, each after its prerequisites (with ``options``), each once."""
    return _plan(list(names), *_split_options(options))[0]


def _plan(asked: list[str], per_pass: dict, shared: dict) -> tuple[PassRun, dict[str, Any]]:
    run = PassRun()
    resolved: dict[str, Any] = {}

    def visit(name, chain):
        if name in chain:
            raise BwskError(f"passes require each other in a cycle: {' -> '.join(chain + [name])}")
        p = get_pass(name)
        if name not in resolved:
            resolved[name] = _options_of(p, per_pass, shared)
        for r in p.required(resolved[name]):
            visit(r, chain + [name])
        if name not in run.order:
            run.order.append(name)
            if name not in asked:
                run.added.append(name)

    for n in asked:
        visit(n, [])
    return run, resolved


def run_passes(program: Program, names: Iterable[str], *, options: Mapping | None = None,
               print_after: Iterable[str] = (), printer: Callable[[str, Program], None] | None = None,
               verify: bool = True) -> Program:
    """Run the named passes (and their prerequisites) on ``program``; the result carries the analyses.

    ``options``: per pass (``{"fusion": {"s_regions": False}}``), qualified (``{"fusion.typing": t}``)
    or shared (``{"axes": "batch=input_ids:0"}``); see the module's docstring. ``print_after`` names
    passes after which ``printer(name, program)`` is called (the CLI prints the IR).
    """
    per_pass, shared = _split_options(options)
    schedule, resolved = _plan(list(names), per_pass, shared)
    idle = sorted(set(per_pass) - set(schedule.order))
    if idle:
        raise BwskError(f"options for pass {idle[0]!r}, which does not run "
                        f"(running: {', '.join(schedule.order) or 'none'})")
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
            program = _with_analysis(program, name, _call(p, p.analyze, program, resolved[name]))
            analyses_done.append(name)
        else:
            rewritten = _call(p, p.rewrite, program, resolved[name])
            if verify:
                verify_program(rewritten, filename=f"<after {name}>")
            for done in analyses_done:  # the rewrite invalidated them: recompute on the new IR
                q = get_pass(done)
                rewritten = _with_analysis(rewritten, done, _call(q, q.analyze, rewritten, resolved[done]))
            program = rewritten
        if name in wanted_prints and printer is not None:
            printer(name, program)
    program.analyses["passes"] = schedule
    return program


def _call(p: Pass, method, program: Program, options):
    """``method(program, options)``, an error inside it re-raised naming the pass."""
    prefix = f"pass {p.name!r} failed: "
    try:
        return method(program, options)
    except BwskError as exc:
        message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else None
        if message and not message.startswith(prefix):  # empty: already said (a child process)
            exc.args = (prefix + message,) + exc.args[1:]
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines() or [""]  # one line (the CLI's rule); the rest is chained
        more = " (...)" if len(lines) > 1 else ""
        failed = BwskError(f"{prefix}internal error: {type(exc).__name__}: {lines[0]}{more}")
        failed.exit_code = 1  # a bug, not bad input (the CLI's code for an internal error)
        raise failed from exc


def _with_analysis(program: Program, name: str, result: Any) -> Program:
    out = program.replace(keep_analyses=True)
    if "_sites" in program.__dict__:  # same IR: the leaf sites (and their inferred types) carry over
        out.__dict__["_sites"] = program.__dict__["_sites"]
    out.analyses[name] = result
    return out
