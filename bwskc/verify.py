"""The IR verifier: every name bound, no recursion between definitions, every term well typed.

Typing is inference by unification over simple types: a tensor/tuple/scalar type or a function type.
Combinators have their usual principal types (``S : (a -> b -> c) -> (a -> b) -> a -> c`` ...), a
primitive with k holes has type ``h1 -> ... -> hk -> T`` with fresh ``h_i``, and a definition has its
declared signature. Inference fixes the type of every hole, and then each primitive is re-run on meta
tensors of those types: the type it declares must be the type its inputs give. Ops and their filled-in
arguments come from ``bwskc.op_values``: the verifier imports nothing from ``bwskc.runtime``.
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
from bwskc.op_values import fill, resolve_op
from bwskc.ops import lookup_overload
from bwskc.text import MAX_TENSOR_BYTES


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


class _Classes:
    """Union-find of type nodes: a class's root is its Fn or ground type when it has one."""

    def __init__(self):
        self.parent: dict[object, object] = {}  # a TVar or Fn -> a node of its class nearer the root

    def resolve(self, t):
        root = t
        while root in self.parent:
            root = self.parent[root]
        while t is not root:  # path compression
            self.parent[t], t = root, self.parent[t]
        return root

    def merge(self, a, b):
        """Merge the classes of a and b (not two distinct ground types), a structure staying root."""
        a, b = self.resolve(a), self.resolve(b)
        if a is b:
            return
        if isinstance(b, TVar) and not isinstance(a, TVar):
            a, b = b, a
        self.parent[a] = b


class Inference:
    """Unification over a union-find of type nodes (Huet's algorithm): a class's root is its Fn or
    ground type when it has one, else a variable. Unifying is linear in the types' size; the occurs
    check is one search for a cycle per scope (``check_acyclic``), not a walk of the type at every
    binding (quadratic on deep terms: 10,000 nested ``B(`` took minutes)."""

    def __init__(self, program: Program):
        self.program = program
        self.classes = _Classes()
        self.links: list[tuple] = []  # (node, node, term) in order, replayed to blame a cycle
        self.hole_types: dict[int, list] = {}  # id(prim) -> hole type variables
        self.prims: list[Prim] = []

    def resolve(self, t):
        return self.classes.resolve(t)

    def show(self, t, depth: int = 8) -> str:
        t = self.resolve(t)
        if isinstance(t, Fn):
            if depth == 0:
                return "..."  # types may be deep, or cyclic before the occurs check
            return f"({self.show(t.arg, depth - 1)} -> {self.show(t.res, depth - 1)})"
        return "?" if isinstance(t, TVar) else str(t)

    def _link(self, a, b, term):
        self.classes.merge(a, b)
        self.links.append((a, b, term))

    def unify(self, a, b, term):
        work = [(a, b)]
        while work:
            x, y = work.pop()
            x, y = self.resolve(x), self.resolve(y)
            if x is y:
                continue
            if isinstance(x, TVar) or isinstance(y, TVar):
                self._link(x, y, term)
            elif isinstance(x, Fn) and isinstance(y, Fn):
                self._link(x, y, term)  # merged first, so unifying cyclic types terminates
                work += [(x.res, y.res), (x.arg, y.arg)]
            elif isinstance(x, Fn) or isinstance(y, Fn) or x != y:
                raise _mismatch(self, x, y, term)

    def check_acyclic(self):
        """The occurs check for everything unified so far: an infinite type names the term whose
        unification closed the first cycle."""
        if _has_cycle(self.links, len(self.links)):
            lo, hi = 1, len(self.links)  # the shortest prefix of the links that makes a cycle
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if _has_cycle(self.links, mid) else (mid + 1, hi)
            raise _Where("infinite type: a function applied to itself", self.links[lo - 1][2])

    def infer(self, t):
        if isinstance(t, Prim):
            self.prims.append(t)
            n = t.arity
            if t.op == "tuple":
                k = len(t.args)
                if not isinstance(t.type, TupleType) or len(t.type.items) != k:
                    raise _Where(f"tuple of {k} values must have a {k}-tuple type", t)
                if t.kwargs or any(a is HOLE for a in iter_args(tuple(a for a in t.args
                                                                    if isinstance(a, tuple)))):
                    raise _Where("tuple takes its values as plain arguments", t)
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


def _has_cycle(links, k: int) -> bool:
    """Whether the first k links make a type contain itself (an iterative search of the Fn graph)."""
    uf = _Classes()
    fns = []
    for a, b, _ in links[:k]:
        uf.merge(a, b)
        fns += [n for n in (a, b) if isinstance(n, Fn)]
    state: dict[object, int] = {}  # 1: on the search path, 2: done
    for start in fns:
        root = uf.resolve(start)
        if root in state:
            continue
        state[root] = 1
        path = [(root, iter((root.arg, root.res)))]
        while path:
            node, children = path[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                path.pop()
                continue
            child = uf.resolve(child)
            if not isinstance(child, Fn) or state.get(child) == 2:
                continue
            if state.get(child) == 1:
                return True
            state[child] = 1
            path.append((child, iter((child.arg, child.res))))
    return False


def _meta(t):
    if isinstance(t, TensorType):
        return torch.empty(t.shape, dtype=t.torch_dtype, device="meta")
    if isinstance(t, TupleType):
        return tuple(_meta(i) for i in t.items)
    raise _SkipCheck


class _SkipCheck(Exception):
    pass


_META = torch.device("meta")
# a shape given as a literal (ones, full, view, expand ..) is bounded like a declared type
_SIZE_ARGS = ("size", "shape")
_MAX_LIST_RESULTS = 4096  # split/unbind/chunk results a meta run may make beyond the declared ones


def _schema_argument(schema, args: list, kwargs: dict, name: str):
    """(where, key) of schema argument ``name`` in a call: ("args", index) or ("kwargs", name)."""
    for i, a in enumerate(schema.arguments):
        if a.name == name:
            if i < len(args) and not a.kwarg_only:
                return "args", i
            return "kwargs", name
    return None


def _check_literal_sizes(schema, args: list, kwargs: dict):
    for name in _SIZE_ARGS:
        slot = _schema_argument(schema, args, kwargs, name)
        if slot is None:
            continue
        value = args[slot[1]] if slot[0] == "args" else kwargs.get(name)
        if not isinstance(value, (list, tuple)) or not all(isinstance(d, int) for d in value):
            continue
        numel = 1
        for d in value:
            if d < -1:
                raise _Refused(f"negative size {d} in {name}")
            numel *= max(d, 1)
        if numel > MAX_TENSOR_BYTES:
            raise _Refused(f"literal {name} of {numel} elements is too large")


def _on_meta(schema, args: list, kwargs: dict) -> bool:
    """Point every device argument at the meta device (factories included, so nothing is
    allocated); False when the call would see no meta tensor and so must not run at all."""
    forced = False
    for name, value in (("device", _META), ("pin_memory", None)):
        slot = _schema_argument(schema, args, kwargs, name)
        if slot is None:
            continue
        if slot[0] == "args":
            args[slot[1]] = value
        else:
            kwargs[name] = value
        forced = forced or name == "device"
    return forced or any(isinstance(a, torch.Tensor) for a in _flat(args + list(kwargs.values())))


def _flat(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v


def _call_values(schema, args: list, kwargs: dict) -> dict:
    """Argument name -> value of a call, defaults included."""
    values = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    values.update({a.name: v for a, v in zip(schema.arguments, args)})
    values.update(kwargs)
    return values


def _split_count(v):
    size, step = v["self"].shape[v["dim"]], v["split_size"]
    return -(-size // step) if step > 0 and size else 1


def _chunk_count(v):
    size, chunks = v["self"].shape[v["dim"]], v["chunks"]
    return -(-size // -(-size // chunks)) if chunks > 0 and size else max(min(chunks, 1), 1)


# how many results a list-returning op makes, from its arguments (without running it)
_RESULT_COUNTS = {
    **dict.fromkeys(["aten.split.Tensor", "aten.unsafe_split.Tensor", "aten.split_copy.Tensor"],
                    _split_count),
    **dict.fromkeys(["aten.split_with_sizes.default", "aten.unsafe_split_with_sizes.default",
                     "aten.split_with_sizes_copy.default"], lambda v: len(v["split_sizes"])),
    **dict.fromkeys(["aten.unbind.int", "aten.unbind_copy.int"],
                    lambda v: v["self"].shape[v["dim"]]),
    "aten.chunk.default": _chunk_count,
    "aten.tensor_split.sections": lambda v: max(v["sections"], 1),
    "aten.tensor_split.indices": lambda v: len(v["indices"]) + 1,
}


def _runs_bounded(schema, prim: Prim, args: list, kwargs: dict) -> bool:
    """Whether a list-returning op (split, unbind, chunk) can run on meta: it must not make far more
    results than the declared ones (a [10**9] input unbound on meta makes 10**9 tensors). A known
    op's count is computed, and refused when it is out of bounds; another's is bounded by the
    largest dimension or integer it is given, and it does not run when that bound is too large."""
    if not any("Tensor[]" in str(r.type) or "List[Tensor]" in str(r.type) for r in schema.returns):
        return True
    declared = len(prim.type.items) if isinstance(prim.type, TupleType) else 1
    limit = max(_MAX_LIST_RESULTS, 2 * declared)
    count = _RESULT_COUNTS.get(prim.op)
    if count is not None:
        try:
            n = count(_call_values(schema, args, kwargs))
        except (KeyError, IndexError, TypeError, ZeroDivisionError):
            return True  # arguments the op itself rejects, with its own message
        if n > limit:
            raise _Refused(f"makes {n} results, {declared} declared")
        return True
    dims = [d for t in _flat(args + list(kwargs.values())) if isinstance(t, torch.Tensor)
            for d in t.shape]
    ints = [abs(a) for a in _flat(args + list(kwargs.values()))
            if isinstance(a, int) and not isinstance(a, bool)]
    return max(dims + ints + [0]) <= limit


class _Refused(Exception):
    """A primitive the verifier will not run, with the reason."""


def _check_prim(program: Program, prim: Prim, holes: list, where):
    """Re-run one primitive on meta tensors of its input types; its declared type must come out."""
    if prim.op == "tuple":
        return  # typed by inference: the tuple of its values' types
    if any(isinstance(h, (TVar, Fn)) for h in holes):
        raise where(f"{prim.op}: cannot infer the type of its arguments", prim)

    def bound_value(ref):
        if isinstance(ref, TensorRef):
            return _meta(program.tensors[ref.name].type)
        return _meta(program.consts[ref.index].type)

    try:
        op = resolve_op(prim.op)
        schema = lookup_overload(prim.op)._schema if prim.op != "getitem" else None
        operands = [_meta(h) for h in holes]
        unfilled = list(operands)  # holes are filled left to right, positional ones first
        args = fill(prim.args, unfilled, bound_value)
        kwargs = dict(zip((k for k, _ in prim.kwargs),
                          fill(tuple(v for _, v in prim.kwargs), unfilled, bound_value)))
        if schema is not None:
            _check_literal_sizes(schema, args, kwargs)
            if not (_on_meta(schema, args, kwargs) and _runs_bounded(schema, prim, args, kwargs)):
                return
        with torch.no_grad():
            out = op(*args, **kwargs)
        got = type_of_value(out)
    except _SkipCheck:
        return
    except (BwskError, _Refused) as exc:
        raise where(f"{prim.op}: {exc}" if isinstance(exc, _Refused) else str(exc), prim) from None
    except NotImplementedError:
        return  # no meta kernel for this op: the declared type stands
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise where(f"{prim.op}: inputs ({', '.join(map(str, holes))}) are rejected: {first}",
                    prim) from None
    if not _same_results(got, prim.type):
        raise where(f"{prim.op}: declared {prim.type} but its inputs "
                    f"({', '.join(map(str, holes))}) give {got}", prim)


def _same_results(got, declared) -> bool:
    """The declared type, where a multi-result op's auxiliary results may be empty on one side: meta
    kernels disagree with CPU kernels there (batch norm in eval saves statistics [C] on meta, [0] on
    CPU, and the lowering records the latter). The first result, dtypes and counts are exact."""
    if got == declared:
        return True
    if not (isinstance(got, TupleType) and isinstance(declared, TupleType)
            and len(got.items) == len(declared.items) and got.items[0] == declared.items[0]):
        return False
    return all(g == d or (isinstance(g, TensorType) and isinstance(d, TensorType)
                          and g.dtype == d.dtype and 0 in (g.numel, d.numel))
               for g, d in zip(got.items[1:], declared.items[1:]))


def _check_shapes(program: Program, inf: Inference, where):
    """Re-run each primitive on meta tensors of its inferred input types."""
    for prim in inf.prims:
        _check_prim(program, prim, [inf.resolve(h) for h in inf.hole_types[id(prim)]], where)


def verify_program(program: Program, *, filename: str = "<program>", lines=None,
                   check_shapes: bool = True) -> None:
    run_deep(_verify, program, filename, lines, check_shapes)


def _verify(program: Program, filename, lines, check_shapes):
    def where(message, term=None, scope=None):
        pos = getattr(term, "pos", None) or scope_pos.get(scope)
        if pos:
            return VerifyError(f"{filename}:{pos[0]}:{pos[1]}: {message}")
        return VerifyError(f"{filename}: {scope + ': ' if scope else ''}{message}")

    # where a scope's own errors are reported when the term has no position
    scope_pos = {d.name: d.pos for d in program.defs.values() if d.pos}
    if program.entry.pos:
        scope_pos["entry"] = program.entry.pos
    _check_consts(program, where, check_shapes)
    calls = nx.DiGraph()  # the entry's node is a tuple: a definition may be called "entry" too
    bodies = [(d.name, d.name, d.body) for d in program.defs.values()] + [(("entry",), "entry",
                                                                          program.entry.body)]
    for node, scope, body in bodies:
        calls.add_node(node)
        for t in subterms(body):
            if isinstance(t, Prim):
                _check_bound_args(program, t, lambda m, t=t, s=scope: where(m, t, s))
            elif isinstance(t, Ref):
                if t.name in program.defs:
                    calls.add_edge(node, t.name)
                elif t.name not in program.tensors:
                    raise where(f"unbound name {t.name!r}", t, scope)
    if not nx.is_directed_acyclic_graph(calls):
        cycle = [u for u, _ in nx.find_cycle(calls)]
        raise where(f"definitions call each other recursively: {' -> '.join(cycle)}", None, cycle[0])
    for scope, decl_inputs, decl_output, body, pos_holder in (
            [(d.name, d.inputs, d.output, d.body, d) for d in program.defs.values()]
            + [("entry", program.entry.inputs, program.entry.output, program.entry.body,
                program.entry)]):
        inf = Inference(program)
        try:
            inf.unify(inf.infer(body), fn_type(decl_inputs, decl_output), pos_holder)
            inf.check_acyclic()
        except _Where as exc:
            raise where(f"in {scope}: {exc}", exc.term or pos_holder, scope) from None
        if check_shapes:
            _check_shapes(program, inf, lambda m, t: where(f"in {scope}: {m}", t, scope))


def _check_bound_args(program: Program, prim: Prim, where):
    """The op is an allowed overload; its tensor and constant references are bound."""
    if prim.op not in ("tuple", "getitem"):
        try:
            resolve_op(prim.op)
        except BwskError as exc:
            raise where(str(exc)) from None
    for a in iter_args(prim.args + tuple(v for _, v in prim.kwargs)):
        if isinstance(a, TensorRef) and a.name not in program.tensors:
            raise where(f"unbound tensor {a.name!r}")
        if isinstance(a, ConstRef) and a.index >= len(program.consts):
            raise where(f"unbound constant %{a.index}")


def _check_consts(program: Program, where, check_shapes: bool):
    """Constants: allowed ops, closed (no holes), earlier constants only, and typed as declared (on
    meta tensors: a constant is never computed while verifying)."""
    for i, c in enumerate(program.consts):
        scope = f"%{i}"
        _check_bound_args(program, c, lambda m: where(f"constant {scope}: {m}", c, scope))
        if c.arity:
            raise where(f"constant {scope} has free arguments (_)", c, scope)
        for j in c.const_refs():
            if j >= i:
                raise where(f"constant {scope} uses %{j}, which is not defined before it", c, scope)
        if check_shapes:
            _check_prim(program, c, [], lambda m, t: where(f"constant {scope}: {m}", t, scope))
