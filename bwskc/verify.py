"""The IR verifier: every name bound, no recursion between definitions, every term well typed.

Typing is inference by unification over simple types: a tensor/tuple/scalar type or a function type.
Combinators have their usual principal types (``S : (a -> b -> c) -> (a -> b) -> a -> c`` ...), a
primitive with k holes has type ``h1 -> ... -> hk -> T`` with fresh ``h_i``, and a definition has its
declared signature. Inference fixes the type of every hole, and then each primitive is re-run on meta
tensors of those types: the type it declares must be the type its inputs give.
"""
from __future__ import annotations

import itertools

import networkx as nx
import torch

from bwskc._deep import run_deep
from bwskc.errors import BwskError, VerifyError
from bwskc.ir import (
    REV_KINDS,
    rev_shared,
    HOLE,
    Comb,
    Const,
    ConstRef,
    Prim,
    Program,
    Ref,
    TensorRef,
    TensorType,
    TupleType,
    iter_args,
    subterms,
    type_of_value,
)
from bwskc.runtime.denote import fill, resolve_op


class TVar:
    __slots__ = ("id",)
    _ids = itertools.count()

    def __init__(self):
        self.id = next(TVar._ids)

    def __repr__(self):
        return f"t{self.id}"


class Fn:
    __slots__ = ("arg", "res")

    def __init__(self, arg, res):
        self.arg, self.res = arg, res


def fn_type(inputs, output):
    t = output
    for i in reversed(inputs):
        t = Fn(i, t)
    return t


class _Where(Exception):
    """A type error at a term; converted to VerifyError with its position."""

    def __init__(self, message, term=None):
        super().__init__(message)
        self.term = term


class Inference:
    def __init__(self, program: Program):
        self.program = program
        self.subst: dict[int, object] = {}
        self.hole_types: dict[int, list] = {}  # id(prim) -> hole type variables
        self.prims: list[Prim] = []

    def resolve(self, t):
        while isinstance(t, TVar) and t.id in self.subst:
            t = self.subst[t.id]
        return t

    def show(self, t) -> str:
        t = self.resolve(t)
        if isinstance(t, Fn):
            return f"({self.show(t.arg)} -> {self.show(t.res)})"
        return "?" if isinstance(t, TVar) else str(t)

    def occurs(self, v: TVar, t) -> bool:
        t = self.resolve(t)
        if t is v:
            return True
        return isinstance(t, Fn) and (self.occurs(v, t.arg) or self.occurs(v, t.res))

    def unify(self, a, b, term):
        a, b = self.resolve(a), self.resolve(b)
        if a is b:
            return
        if isinstance(a, TVar) or isinstance(b, TVar):
            v, t = (a, b) if isinstance(a, TVar) else (b, a)
            if self.occurs(v, t):
                raise _Where("infinite type: a function applied to itself", term)
            self.subst[v.id] = t
            return
        if isinstance(a, Fn) and isinstance(b, Fn):
            self.unify(a.arg, b.arg, term)
            self.unify(a.res, b.res, term)
            return
        if isinstance(a, Fn) or isinstance(b, Fn):
            raise _mismatch(self, a, b, term)
        if a != b:
            raise _mismatch(self, a, b, term)

    def infer(self, t):
        if isinstance(t, Prim):
            self.prims.append(t)
            n = t.arity
            if t.op == "tuple":
                k = len(t.args)
                if not isinstance(t.type, TupleType) or len(t.type.items) != k:
                    raise _Where(f"tuple of {k} values must have a {k}-tuple type", t)
                holes = [typ for a, typ in zip(t.args, t.type.items) if a is HOLE]
            else:
                holes = [TVar() for _ in range(n)]
            self.hole_types[id(t)] = holes
            return fn_type(holes, t.type)
        if isinstance(t, Ref):
            if t.name in self.program.defs:
                d = self.program.defs[t.name]
                return fn_type(d.inputs, d.output)
            if t.name in self.program.tensors:
                return self.program.tensors[t.name].type
            raise _Where(f"unbound name {t.name!r}", t)
        if isinstance(t, Const):
            if not 0 <= t.index < len(self.program.consts):
                raise _Where(f"unbound constant %{t.index}", t)
            return self.program.consts[t.index].type
        if isinstance(t, Comb):
            if t.kind in REV_KINDS:  # Rk : (s -> s -> s) -> (m.. -> s -> s)^n -> m.. -> s -> s
                add = t.args[0]
                if not (isinstance(add, Prim) and add.op == "aten.add.Tensor" and add.args == (HOLE, HOLE)
                        and not add.kwargs):
                    raise _Where(f"{t.kind} combines its streams with aten.add.Tensor(_, _)", add)
                s = TVar()
                branch = fn_type([TVar() for _ in range(rev_shared(t.kind))], Fn(s, s))
                self.unify(self.infer(t.args[0]), Fn(s, Fn(s, s)), t.args[0])
                for f in t.args[1:]:
                    self.unify(self.infer(f), branch, f)
                return branch
            if t.kind == "B" and len(t.args) >= 2:
                a = TVar()
                cur = a
                for f in reversed(t.args):
                    r = TVar()
                    self.unify(self.infer(f), Fn(cur, r), f)
                    cur = r
                return Fn(a, cur)
            cur = self.scheme(t.kind)
            for arg in t.args:
                r = TVar()
                self.unify(cur, Fn(self.infer(arg), r), arg)
                cur = r
            return cur
        raise _Where(f"not a term: {t!r}", None)

    @staticmethod
    def scheme(kind):
        a, b, c = TVar(), TVar(), TVar()
        return {
            "I": lambda: Fn(a, a),
            "K": lambda: Fn(a, Fn(b, a)),
            "W": lambda: Fn(Fn(a, Fn(a, b)), Fn(a, b)),
            "B": lambda: Fn(Fn(b, c), Fn(Fn(a, b), Fn(a, c))),
            "C": lambda: Fn(Fn(a, Fn(b, c)), Fn(b, Fn(a, c))),
            "S": lambda: Fn(Fn(a, Fn(b, c)), Fn(Fn(a, b), Fn(a, c))),
        }[kind]()


def _mismatch(inf: Inference, a, b, term) -> _Where:
    return _Where(f"type mismatch: {inf.show(a)} versus {inf.show(b)}", term)


def _meta(t):
    if isinstance(t, TensorType):
        return torch.empty(t.shape, dtype=t.torch_dtype, device="meta")
    if isinstance(t, TupleType):
        return tuple(_meta(i) for i in t.items)
    raise _SkipCheck


class _SkipCheck(Exception):
    pass


def _check_shapes(program: Program, inf: Inference, where):
    """Re-run each primitive on meta tensors of its inferred input types."""
    def bound_value(ref):
        if isinstance(ref, TensorRef):
            return _meta(program.tensors[ref.name].type)
        return _meta(program.consts[ref.index].type)

    for prim in inf.prims:
        if prim.op in ("tuple", "getitem") or isinstance(prim.type, TupleType):
            # ops with several results: meta kernels disagree with CPU kernels on auxiliary results
            # (batch norm's saved statistics are [C] on meta, [0] on CPU in eval), so only
            # single-result ops are re-checked
            continue
        try:
            op = resolve_op(prim.op)
        except BwskError as exc:
            raise where(str(exc), prim) from None
        holes = [inf.resolve(h) for h in inf.hole_types[id(prim)]]
        if any(isinstance(h, (TVar, Fn)) for h in holes):
            raise where(f"{prim.op}: cannot infer the type of its arguments", prim)
        try:
            operands = [_meta(h) for h in holes]
            args = fill(prim.args, operands, bound_value)
            kwargs = dict(zip((k for k, _ in prim.kwargs),
                              fill(tuple(v for _, v in prim.kwargs), operands, bound_value)))
            with torch.no_grad():
                out = op(*args, **kwargs)
            got = type_of_value(out)
        except _SkipCheck:
            continue
        except NotImplementedError:
            continue  # no meta kernel for this op: the declared type stands
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise where(f"{prim.op}: inputs ({', '.join(map(str, holes))}) are rejected: {first}",
                        prim) from None
        if got != prim.type:
            raise where(f"{prim.op}: declared {prim.type} but its inputs "
                        f"({', '.join(map(str, holes))}) give {got}", prim)


def verify_program(program: Program, *, filename: str = "<program>", lines=None,
                   check_shapes: bool = True) -> None:
    run_deep(_verify, program, filename, lines, check_shapes)


def _verify(program: Program, filename, lines, check_shapes):
    def where(message, term=None, scope=None):
        pos = getattr(term, "pos", None)
        if pos:
            return VerifyError(f"{filename}:{pos[0]}:{pos[1]}: {message}")
        return VerifyError(f"{filename}: {scope + ': ' if scope else ''}{message}")

    # constants: bound, closed (no holes), earlier constants only
    for i, c in enumerate(program.consts):
        if c.arity:
            raise where(f"constant %{i} has free arguments (_)", c, f"%{i}")
        for name in c.tensor_refs():
            if name not in program.tensors:
                raise where(f"constant %{i}: unbound tensor {name!r}", c, f"%{i}")
        for j in c.const_refs():
            if j >= i:
                raise where(f"constant %{i} uses %{j}, which is not defined before it", c, f"%{i}")
    calls = nx.DiGraph()
    bodies = [(d.name, d.body) for d in program.defs.values()] + [("entry", program.entry.body)]
    for scope, body in bodies:
        calls.add_node(scope)
        for t in subterms(body):
            if isinstance(t, Prim):
                for a in iter_args(t.args + tuple(v for _, v in t.kwargs)):
                    if isinstance(a, TensorRef) and a.name not in program.tensors:
                        raise where(f"unbound tensor {a.name!r}", t, scope)
                    if isinstance(a, ConstRef) and a.index >= len(program.consts):
                        raise where(f"unbound constant %{a.index}", t, scope)
            elif isinstance(t, Ref):
                if t.name in program.defs:
                    calls.add_edge(scope, t.name)
                elif t.name not in program.tensors:
                    raise where(f"unbound name {t.name!r}", t, scope)
    if not nx.is_directed_acyclic_graph(calls):
        cycle = " -> ".join(u for u, _ in nx.find_cycle(calls))
        raise where(f"definitions call each other recursively: {cycle}")
    for scope, decl_inputs, decl_output, body, pos_holder in (
            [(d.name, d.inputs, d.output, d.body, d) for d in program.defs.values()]
            + [("entry", program.entry.inputs, program.entry.output, program.entry.body,
                program.entry)]):
        inf = Inference(program)
        try:
            inf.unify(inf.infer(body), fn_type(decl_inputs, decl_output), pos_holder)
        except _Where as exc:
            raise where(f"in {scope}: {exc}", exc.term or pos_holder, scope) from None
        if check_shapes:
            _check_shapes(program, inf, lambda m, t: where(f"in {scope}: {m}", t, scope))
