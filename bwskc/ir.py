"""BWSK IR: combinator terms over primitive ATen ops, with tensor types on every binding.

A program is a set of named definitions. Each definition is a closed, point-free term denoting a curried
function of its activation inputs. Terms are built from

* ``Prim``: a primitive leaf. An ATen op (``aten.add.Tensor``) with its parameters, constants and
  attributes bound and its activation arguments left free as holes (``_``), in order. It carries the type
  of the value it produces once every hole is filled.
* ``Comb``: a combinator applied to zero or more terms, curried: ``B f g x = f (g x)`` (n-ary:
  ``B(f1,...,fn) x = f1 (... (fn x))``), ``W f x = f x x``, ``S f g x = f x (g x)``, ``K c x = c``,
  ``C f g x = f x g`` and ``I x = x``.
* ``Comb("R", (add, f1, ..., fn))``: a reversible coupling chain (the reversible pass writes it in place
  of a residual chain ``x -> bn(..(b1 x))`` with ``bi x = x + fi x``). It runs two streams from
  ``a = b = x``: ``a = a + f1 b``, ``b = b + f2 a``, ``a = a + f3 b``, ... (odd branches update ``a`` from
  ``b``, even ones ``b`` from ``a``: each step is invertible whatever ``fi`` is) and returns
  ``a + b - x``, which equals the residual chain to first order in the branches. ``R1`` .. ``R4`` take
  1 to 4 shared inputs first (``Rk(add, f..) m1 .. mk x``, every ``fi m1 .. mk`` a branch).
* ``Ref``: a reference to another definition (or, rarely, to a bound tensor used as a whole value).
* ``ConstRef``: a reference to a constant value ``%N`` computed from parameters and literals only.

Equality is structural (positions from parsed text are carried but never compared).

Also here: ``reachable_defs``/``walk_terms`` (the definitions and terms a program reaches from its
entry, following references), the front end's layer naming (``is_layer``, ``layer_of``, ``stack_of``)
and the executor hook through which ``bwskc.runtime`` runs programs (``register_executor``: this module
imports nothing from the runtime).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from bwskc._deep import run_deep

# ---------------------------------------------------------------------------------------------- types

DTYPES: dict[torch.dtype, str] = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool", torch.complex64: "c64", torch.complex128: "c128",
    torch.float8_e4m3fn: "f8e4m3fn", torch.float8_e5m2: "f8e5m2",
}
DTYPE_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPES.items()}
SCALAR_KINDS = ("int", "float", "bool")


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_BY_NAME[self.dtype]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class TupleType:
    items: tuple[Type, ...]

    def __str__(self) -> str:
        return "(" + ", ".join(map(str, self.items)) + ")"


@dataclass(frozen=True)
class ScalarType:
    """A Python number produced by an op (``aten._local_scalar_dense``); rare with static shapes."""

    kind: str

    def __str__(self) -> str:
        return self.kind


Type = Union[TensorType, TupleType, ScalarType]


def type_of_value(value: Any) -> Type:
    """The IR type of a tensor (real, fake or meta), a tuple/list of them, or a Python scalar."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in DTYPES:
            raise TypeError(f"unsupported dtype {value.dtype}")
        return TensorType(DTYPES[value.dtype], tuple(int(d) for d in value.shape))
    if isinstance(value, (tuple, list)):
        return TupleType(tuple(type_of_value(v) for v in value))
    if isinstance(value, bool):
        return ScalarType("bool")
    if isinstance(value, int) or type(value).__name__ == "SymInt":
        return ScalarType("int")
    if isinstance(value, float) or type(value).__name__ == "SymFloat":
        return ScalarType("float")
    raise TypeError(f"no IR type for {type(value).__name__}")


# ----------------------------------------------------------------------------------- bound arguments


class _HoleType:
    """The free activation slot of a primitive leaf, printed ``_``."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "_"

    def __reduce__(self):
        return (_HoleType, ())


HOLE = _HoleType()


@dataclass(frozen=True)
class TensorRef:
    """A bound tensor (parameter, buffer or lifted constant) named by its state-dict key."""

    name: str


@dataclass(frozen=True)
class ConstRef:
    """A constant value ``%index`` computed from tensors and literals only."""

    index: int


# A bound argument is HOLE, a TensorRef, a ConstRef, a literal (None, bool, int, float, str, torch.dtype,
# torch.device, torch.layout, torch.memory_format) or a tuple of bound arguments (an ATen list).
Arg = Any


def iter_args(args: tuple) -> Iterator[Arg]:
    """Every bound argument, depth-first, lists flattened."""
    for a in args:
        if isinstance(a, tuple):
            yield from iter_args(a)
        else:
            yield a


# ---------------------------------------------------------------------------------------------- terms


class Term:
    """Base of the term language. Subclasses are frozen dataclasses; ``pos`` is (line, col) or None."""

    __slots__ = ()


def _typed(a):
    """A literal with its type made part of its identity: 1, 1.0 and True differ, nan equals nan."""
    if isinstance(a, tuple):
        return ("list", tuple(_typed(b) for b in a))
    if isinstance(a, float):
        return ("float", repr(a))
    if isinstance(a, (bool, int, str)) or a is None:
        return (type(a).__name__, a)
    return (type(a).__name__, a)


@dataclass(frozen=True, eq=False)
class Prim(Term):
    op: str
    args: tuple = ()
    kwargs: tuple[tuple[str, Arg], ...] = ()
    type: Type = None
    pos: Any = field(default=None, compare=False, repr=False)

    def _key(self):
        return (self.op, _typed(self.args), tuple((k, _typed(v)) for k, v in self.kwargs), self.type)

    def __eq__(self, other):
        return isinstance(other, Prim) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    @property
    def arity(self) -> int:
        return sum(1 for a in iter_args(self.args) if a is HOLE) + sum(
            1 for _, a in self.kwargs for b in iter_args((a,)) if b is HOLE)

    def tensor_refs(self) -> Iterator[str]:
        for a in iter_args(self.args + tuple(v for _, v in self.kwargs)):
            if isinstance(a, TensorRef):
                yield a.name

    def const_refs(self) -> Iterator[int]:
        for a in iter_args(self.args + tuple(v for _, v in self.kwargs)):
            if isinstance(a, ConstRef):
                yield a.index


COMBINATORS = {"I": 1, "K": 2, "W": 2, "B": 3, "C": 3, "S": 3}  # arity when saturated
REV_KINDS = ("R", "R1", "R2", "R3", "R4")  # coupling chains with 0..4 shared inputs (never partial)
COMBINATORS.update({k: 0 for k in REV_KINDS})


def rev_shared(kind: str) -> int:
    """How many shared inputs a coupling chain ``R``, ``R1`` .. ``R4`` takes before its stream."""
    return int(kind[1:] or 0)


@dataclass(frozen=True)
class Comb(Term):
    """A combinator applied to ``args`` (curried, possibly partially). ``B`` with n >= 2 args is n-ary."""

    kind: str
    args: tuple[Term, ...] = ()
    pos: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.kind not in COMBINATORS:
            raise ValueError(f"unknown combinator {self.kind}")
        if self.kind in REV_KINDS:
            if len(self.args) < 2:
                raise ValueError(f"{self.kind} needs its combining op and at least one branch")
            return
        if self.kind != "B" and len(self.args) >= COMBINATORS[self.kind]:
            raise ValueError(f"{self.kind} applied to {len(self.args)} arguments is saturated")


@dataclass(frozen=True)
class Ref(Term):
    """A definition used as a function, or a bound tensor used as a whole value."""

    name: str
    pos: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Const(Term):
    """A constant value ``%index`` used as a whole term (the argument of ``K``)."""

    index: int
    pos: Any = field(default=None, compare=False, repr=False)


def subterms(term: Term) -> Iterator[Term]:
    """Every subterm, pre-order, without recursion (terms can be deep)."""
    stack = [term]
    while stack:
        t = stack.pop()
        yield t
        if isinstance(t, Comb):
            stack.extend(reversed(t.args))


def prims(term: Term) -> Iterator[Prim]:
    return (t for t in subterms(term) if isinstance(t, Prim))


# -------------------------------------------------------------------------------------------- program

TENSOR_KINDS = ("param", "buffer", "constant")


@dataclass(frozen=True)
class TensorDecl:
    kind: str  # param | buffer | constant
    type: TensorType


# What a pass made a definition for (``Def.role``), set by the pass that creates or rewrites it and
# tested by the passes that read it; names are for people (``OWNER.residualN``), never matched.
ROLES: dict[str, str] = {
    "s_phase": "an S-region the fusion pass outlined (OWNER.phaseN)",
    "residual": "a maximal residual chain the fusion pass outlined (OWNER.residualN)",
    "coupling": "a residual chain the reversible pass rewrote into a coupling chain Rk(add, f1, .., fn)",
}


@dataclass(frozen=True)
class Def:
    """A named definition: a closed term of the given signature.

    ``module`` is the owning module path from ``nn_module_stack`` ('' for the model itself); the name is the
    module path, with ``@k`` for the k-th extra call of the same module. ``kind`` is ``def`` for a module
    call, ``phase`` for a region the fusion pass outlined (its name is ``OWNER.phaseN`` or
    ``OWNER.residualN``; its module is the owner's). ``role`` (one of ``ROLES``, or None) says what a pass
    made the definition for; the text form prints it as ``{role=residual}`` after the name.
    """

    name: str
    inputs: tuple[Type, ...]
    output: Type
    body: Term
    pos: Any = field(default=None, compare=False, repr=False)
    kind: str = "def"
    role: str | None = None

    def __post_init__(self):
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r} (known: {', '.join(ROLES)})")

    @property
    def module(self) -> str:
        name = self.name.rsplit(".", 1)[0] if self.kind == "phase" and "." in self.name else (
            "" if self.kind == "phase" else self.name)
        return name.split("@", 1)[0]


@dataclass(frozen=True)
class Entry:
    """The program's entry: named inputs, named outputs (a tuple when more than one) and a body."""

    input_names: tuple[str, ...]
    inputs: tuple[Type, ...]
    output_names: tuple[str, ...]
    outputs: tuple[Type, ...]
    body: Term
    pos: Any = field(default=None, compare=False, repr=False)

    @property
    def output(self) -> Type:
        return self.outputs[0] if len(self.outputs) == 1 else TupleType(self.outputs)


class Program:
    """A lowered model: tensor declarations, constants, definitions (callees first) and the entry.

    ``weights`` maps tensor names to values; ``analyses`` maps an analysis pass's name to its result (see
    ``bwskc.passes``). Neither is part of structural equality (the text form carries declarations, not
    values or analyses). Call the program to evaluate it eagerly.
    """

    def __init__(self, name: str, tensors: dict[str, TensorDecl], consts: list[Prim],
                 defs: dict[str, Def], entry: Entry, weights: dict[str, torch.Tensor] | None = None,
                 analyses: dict[str, Any] | None = None):
        self.name = name
        self.tensors = dict(tensors)
        self.consts = list(consts)
        self.defs = dict(defs)
        self.entry = entry
        self.weights = dict(weights or {})
        self.analyses = dict(analyses or {})
        self._interpreter = None

    def replace(self, *, defs: dict[str, Def] | None = None, entry: Entry | None = None,
                consts: list[Prim] | None = None, keep_analyses: bool = False) -> Program:
        """A copy with new definitions, entry or constants; weights kept, analyses dropped unless kept
        (a rewrite invalidates them: the pass manager re-runs them)."""
        return Program(self.name, self.tensors, self.consts if consts is None else consts,
                       self.defs if defs is None else defs, self.entry if entry is None else entry,
                       self.weights, self.analyses if keep_analyses else None)

    # structural equality, without recursion limits
    def _key(self):
        return (self.name, tuple(self.tensors.items()), tuple(self.consts), tuple(self.defs.items()),
                self.entry)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Program):
            return NotImplemented
        return run_deep(lambda: self._key() == other._key())

    def __hash__(self) -> int:
        return run_deep(lambda: hash(self._key()))

    def __repr__(self) -> str:
        return f"<bwskc.Program {self.name}: {len(self.defs)} defs, {self.num_prims()} primitive leaves>"

    # queries
    def num_prims(self) -> int:
        bodies = [d.body for d in self.defs.values()] + [self.entry.body]
        return len(self.consts) + sum(1 for b in bodies for _ in prims(b))

    def text(self) -> str:
        from bwskc.printer import print_program
        return print_program(self)

    def with_weights(self, weights: dict[str, torch.Tensor]) -> Program:
        """A copy bound to ``weights`` (a state dict); names must match the declarations."""
        missing = sorted(set(self.tensors) - set(weights))
        if missing:
            from bwskc.errors import BwskError
            raise BwskError(f"weights missing for {len(missing)} tensors, e.g. {missing[0]}")
        return Program(self.name, self.tensors, self.consts, self.defs, self.entry,
                       {k: weights[k] for k in self.tensors}, self.analyses)

    def __call__(self, *args, **kwargs):
        """Evaluate the program eagerly (the registered interpreter: ``bwskc.runtime``'s)."""
        if self._interpreter is None:
            self._interpreter = executor("interpret")(self)
        return self._interpreter(*args, **kwargs)

    def to_fx(self):
        """A ``torch.fx.GraphModule`` running this program as a flat graph of ATen calls (the registered
        codegen: ``bwskc.runtime``'s)."""
        return executor("to_fx")(self)


# ---------------------------------------------------------------------------------- reachable terms

def walk_terms(program: Program, roots: Iterable[Term] | None = None) -> Iterator[tuple[str | None, Term]]:
    """Every subterm reachable from ``roots`` (default: the entry's body), as ``(scope, term)``: the
    roots' subterms with scope None, then, following each ``Ref`` to a definition of ``program``, that
    definition's subterms with its name as scope, each definition walked once (in the order first
    reached). Pre-order within a body, without recursion. A generator: stop it early to search."""
    roots = [program.entry.body] if roots is None else list(roots)
    seen: set[str] = set()
    stack: list[tuple[str | None, Term]] = [(None, r) for r in reversed(roots)]
    while stack:
        scope, body = stack.pop()
        later = []
        for t in subterms(body):
            yield scope, t
            if isinstance(t, Ref) and t.name in program.defs and t.name not in seen:
                seen.add(t.name)
                later.append((t.name, program.defs[t.name].body))
        stack.extend(reversed(later))


def reachable_defs(program: Program, roots: Iterable[Term] | None = None) -> list[str]:
    """The names of the definitions ``roots`` (default: the entry's body) reach through references,
    directly or through other definitions, in the order first reached (a root that is a ``Ref`` counts)."""
    found: list[str] = []
    seen: set[str] = set()
    for _, t in walk_terms(program, roots):
        if isinstance(t, Ref) and t.name in program.defs and t.name not in seen:
            seen.add(t.name)
            found.append(t.name)
    return found


# ------------------------------------------------------------------------------- the front end's names

_LAYER_NAME = re.compile(r".+\.[0-9]+")  # a module-list element: ``transformer.h.3``
_FIRST_LAYER = re.compile(r"^(.*?\.[0-9]+)(\.|$)")  # a module path up to its first numbered component
_STACK = re.compile(r"(.+?)\.[0-9]+(\.|$)")


def is_layer(name: str) -> bool:
    """Whether a definition's name is a module-list element (``transformer.h.3``, ``layers.0``): one layer
    of a stack, as the front end names module calls (``bwskc.lowering``)."""
    return _LAYER_NAME.fullmatch(name) is not None


def layer_of(module: str) -> str | None:
    """The layer a module path belongs to: the path up to its first numbered component
    (``transformer.h.3`` for ``transformer.h.3.attn.c_attn``), or None if it has none."""
    m = _FIRST_LAYER.match(module)
    return m.group(1) if m else None


def stack_of(name: str) -> str | None:
    """The module list a layer belongs to (``encoder.block`` for ``encoder.block.2.layer.1``), or None."""
    m = _STACK.match(name)
    return m.group(1) if m else None


# ------------------------------------------------------------------------------------- executor hook

_EXECUTORS: dict[str, Callable] = {}


def register_executor(*, interpret: Callable[[Program], Callable], to_fx: Callable[[Program], Any]) -> None:
    """Install how programs run: ``interpret(program)`` gives a callable evaluating it eagerly
    (``program(*args)``), ``to_fx(program)`` a ``torch.fx.GraphModule`` (``program.to_fx()``).
    ``bwskc.runtime`` registers its interpreter and codegen when it is imported."""
    _EXECUTORS.update(interpret=interpret, to_fx=to_fx)


def executor(what: str) -> Callable:
    """The registered ``interpret`` or ``to_fx`` function. If none is registered yet, the package's
    default provider (``bwskc.DEFAULT_EXECUTOR``, a module name the package root chooses) is imported
    once, to register itself; a clear error if that leaves none."""
    if what not in _EXECUTORS:
        import importlib

        import bwskc
        provider = getattr(bwskc, "DEFAULT_EXECUTOR", None)
        if provider:
            importlib.import_module(provider)
    if what not in _EXECUTORS:
        raise RuntimeError(f"no executor registered to {what.replace('_', ' ')} a BWSK program: import "
                           "bwskc.runtime (it registers the interpreter and the fx codegen), or call "
                           "bwskc.ir.register_executor")
    return _EXECUTORS[what]
