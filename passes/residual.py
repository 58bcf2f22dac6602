"""The residual reducer: combinator terms applied to symbolic values, reduced to see residual blocks.

Shared by the ``fusion`` pass (which counts the residual blocks of a term to find chains) and the
``reversible`` pass (which reads each block's stream and branch back into terms).

**What it reduces.** A closed term (a ``Prim``, ``Comb``, ``Ref`` to a definition of the program, ...)
applied to symbolic arguments: fresh variables ``Var(type)`` or other nodes. ``Reducer(program).whnf(node)``
performs weak-head reduction by the combinator rules (``I``, ``K``, ``W``, ``B`` n-ary, ``C``, ``S``),
unfolding definitions, lazily (arguments are ``Thunk`` s reduced at most once, on demand) and within a
step budget (``OutOfSteps`` past ``STEP_BUDGET`` steps; well-typed terms always normalise). Coupling
chains ``R``..``R4`` are opaque.

**What it returns.** A node, one of

* ``Var``: a symbolic input (``.type``);
* ``Call(prim, args)``: a primitive applied to as many arguments as it has holes (a value: never
  reduced further, so ``aten.add.Tensor(a, t)`` exposes its operands ``a`` and ``t``);
* ``Pap(term, args)``: a term applied to too few arguments (a function value);
* ``Stuck(args)``: an application that cannot reduce (a variable or a bound value applied);
* ``Thunk(fun, args)``: an unevaluated application (only inside the arguments of the above).

``depends(node, target, barrier)`` says whether a node was built from ``target`` other than through
``barrier`` (how a residual add ``a + t`` is told apart: ``t`` reaches the stream only through ``a``);
``chain_blocks`` counts the residual blocks a term applies to its stream (0: not a chain).
"""
from __future__ import annotations

from bwskc.ir import HOLE, REV_KINDS, Comb, Prim, Program, Ref, TensorType, Term

__all__ = ["LINK_OPS", "POST_OPS", "RESIDUAL_ADD", "STEP_BUDGET", "Call", "OutOfSteps", "Pap", "Reducer",
           "Stuck", "Thunk", "Var", "chain_and_path", "chain_blocks", "depends", "is_link", "is_post_op",
           "is_residual_add", "value_type"]

RESIDUAL_ADD = "aten.add.Tensor"
LINK_OPS = frozenset({"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default",
                      "aten.clone.default", "aten.alias.default"})
# normalisations and activations a post-norm or post-activation block applies after its residual add
POST_OPS = frozenset({"aten.layer_norm.default", "aten.rms_norm.default", "aten.relu.default",
                      "aten.gelu.default", "aten.silu.default", "aten.tanh.default",
                      "aten.hardtanh.default", "aten.leaky_relu.default", "aten.elu.default"})
STEP_BUDGET = 20_000  # symbolic reduction steps per chain check (well-typed terms always normalise)


class Var:
    """A symbolic input of the given type."""

    __slots__ = ("type",)

    def __init__(self, type):
        self.type = type


class Thunk:
    """``fun args``, unevaluated: ``fun`` is a closed term or a node; reduced once, on demand."""

    __slots__ = ("args", "fun", "value")

    def __init__(self, fun, args=()):
        self.fun, self.args, self.value = fun, tuple(args), None


class Call:
    """A primitive applied to all its holes (a value, not reduced further)."""

    __slots__ = ("args", "prim")

    def __init__(self, prim, args):
        self.prim, self.args = prim, tuple(args)


class Pap:
    """A term applied to too few arguments (a function value)."""

    __slots__ = ("args", "term")

    def __init__(self, term, args):
        self.term, self.args = term, tuple(args)


class Stuck:
    """Something that is not a function application we can reduce (a variable applied, a bound value)."""

    __slots__ = ("args",)

    def __init__(self, args=()):
        self.args = tuple(args)


class OutOfSteps(Exception):
    """The reduction took more than ``STEP_BUDGET`` steps (the term is too large to read)."""


def _node(x):
    return x if isinstance(x, (Var, Thunk, Call, Pap, Stuck)) else Thunk(x)


class Reducer:
    """Weak-head reduction of combinator terms applied to symbolic values, definitions unfolded."""

    def __init__(self, program: Program):
        self.defs = program.defs
        self.steps = 0
        self.reduced: set[int] = set()  # ids of the combinator terms reduced (the stream's path)

    def whnf(self, n):
        if not isinstance(n, Thunk):
            return n
        if n.value is None:
            n.value = self._reduce(n.fun, list(n.args))
        return n.value

    def _reduce(self, fun, args):
        while True:
            self.steps += 1
            if self.steps > STEP_BUDGET:
                raise OutOfSteps
            if isinstance(fun, (Var, Thunk, Call, Pap, Stuck)):
                fun = self.whnf(fun)
                if isinstance(fun, Pap):
                    fun, args = fun.term, list(fun.args) + args
                    continue
                return fun if not args else Stuck((fun, *args))
            if isinstance(fun, Prim):
                n = fun.arity
                return Pap(fun, args) if len(args) < n else (
                    Call(fun, args) if len(args) == n else Stuck(args))
            if isinstance(fun, Ref) and fun.name in self.defs:
                if not args:
                    return Pap(fun, ())
                fun = self.defs[fun.name].body
                continue
            if not isinstance(fun, Comb):  # a bound tensor or constant used as a value
                return Stuck(args)
            if fun.kind in REV_KINDS:  # a coupling chain is opaque here: not a residual chain of adds
                return Stuck(args)
            self.reduced.add(id(fun))
            kind, cargs = fun.kind, fun.args
            if kind == "B" and len(cargs) >= 2:
                if not args:
                    return Pap(fun, ())
                inner = args[0]
                for f in reversed(cargs[1:]):
                    inner = Thunk(f, (inner,))
                fun, args = cargs[0], [inner] + args[1:]
                continue
            full = [_node(a) for a in cargs] + args
            need = {"I": 1, "K": 2, "W": 2, "B": 3, "C": 3, "S": 3}[kind]
            if len(full) < need:
                return Pap(fun, args)
            rest = full[need:]
            if kind in ("I", "K"):
                fun, args = full[0], rest
            elif kind == "W":
                fun, args = full[0], [full[1], full[1]] + rest
            elif kind == "B":
                fun, args = full[0], [Thunk(full[1], (full[2],))] + rest
            elif kind == "C":
                fun, args = full[0], [full[2], full[1]] + rest
            else:  # S
                fun, args = full[0], [full[2], Thunk(full[1], (full[2],))] + rest


def depends(node, target, barrier) -> bool:
    """Whether ``node`` can reach ``target`` without passing through ``barrier`` (structurally: the
    arguments a node was built from; terms are closed, so only nodes carry free variables)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is barrier or id(n) in seen:
            continue
        if n is target:
            return True
        seen.add(id(n))
        if isinstance(n, Thunk):
            stack.extend(a for a in (n.fun, *n.args) if not isinstance(a, Term))
        elif isinstance(n, (Call, Pap, Stuck)):
            stack.extend(n.args)
    return False


def value_type(v):
    """The IR type of a variable or of a primitive call's result; None for other nodes."""
    return v.type if isinstance(v, Var) else (v.prim.type if isinstance(v, Call) else None)


def is_residual_add(p: Prim) -> bool:
    """``aten.add.Tensor(_, _)`` (``alpha`` 1 at most): the add of a residual connection."""
    return (p.op == RESIDUAL_ADD and p.args == (HOLE, HOLE)
            and all(k == "alpha" and v == 1 and not isinstance(v, bool) for k, v in p.kwargs))


def is_post_op(p: Prim) -> bool:
    """A normalisation or activation applied to the stream right after a residual add (BERT's
    ``LN(x + F(x))``, ResNet's ``relu(x + F(x))``): a one-input primitive from the stream's type to
    itself whose other operands (weights, constants) are bound."""
    return p.op in POST_OPS and p.arity == 1 and isinstance(p.type, TensorType)


def is_link(p: Prim, in_type) -> bool:
    """A reshape or identity copy (``LINK_OPS``) of ``in_type`` to as many elements of its dtype: a
    bijection the stream may pass through between blocks."""
    out = p.type
    return (p.op in LINK_OPS and p.arity == 1 and isinstance(out, TensorType)
            and isinstance(in_type, TensorType) and out.dtype == in_type.dtype
            and out.numel == in_type.numel)


def chain_blocks(program: Program, term: Term, inputs: list, stream: int = -1) -> int:
    """How many residual blocks ``term`` applies to its input number ``stream`` (the last by default;
    its other inputs are shared by every block), or 0 if it is not a chain: ``term`` applied to fresh
    variables must reduce to the stream ``x`` through residual adds ``a + t`` (``t`` reaching ``x``
    only through the stream ``a``) and links."""
    return chain_and_path(program, term, inputs, stream)[0]


def chain_and_path(program: Program, term: Term, inputs: list, stream: int = -1) -> tuple[int, frozenset]:
    """``chain_blocks`` and the ids of the combinator terms the stream passes through (the residual
    functions ``t`` are never reduced, so the terms inside them are not among these)."""
    reducer = Reducer(program)
    count = _chain_count(reducer, term, inputs, stream)
    return count, frozenset(reducer.reduced) if count else frozenset()


def _chain_count(reducer: Reducer, term: Term, inputs: list, stream: int) -> int:
    args = [Var(t) for t in inputs]
    x = args[stream]
    cur, expect, count, post = Thunk(term, args), None, 0, False
    try:
        while True:
            v = reducer.whnf(cur)
            if expect is not None and value_type(v) != expect:
                return 0
            if post and not (isinstance(v, Call) and is_residual_add(v.prim)):
                return 0  # a post-op belongs to the residual add right below it
            if v is x:
                return count
            if not isinstance(v, Call):
                return 0
            p, post = v.prim, False
            if is_residual_add(p):
                a, t = v.args
                if not depends(t, x, a):
                    cur = a
                elif not depends(a, x, t):
                    cur = t
                else:
                    return 0
                count += 1
                expect = p.type
            elif is_post_op(p) and v.args and value_type(reducer.whnf(v.args[0])) == p.type:
                cur, expect, post = v.args[0], p.type, True
            elif is_link(p, value_type(reducer.whnf(v.args[0])) if v.args else None):
                cur, expect = v.args[0], None
            else:
                return 0
    except OutOfSteps:
        return 0
