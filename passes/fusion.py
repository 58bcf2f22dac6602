"""The ``fusion`` pass: maximal S-regions and maximal residual chains become named phases.

A phase is an outlined region: a definition of kind ``phase`` whose body is the region's term, while the
place the region held becomes a reference to it. The pass marks each phase with its role
(``Def.role``: ``s_phase`` or ``residual``, printed ``{role=residual}``), which later passes test (the
``reversible`` pass rewrites the ``residual`` ones); names are for people. The symbolic reduction that
recognises residual blocks is ``bwskc.passes.residual``. Phases are named after the definition they were found
in (their *owner*): ``OWNER.phaseN`` for an S-region, ``OWNER.residualN`` for a residual chain, N counting
from 0 within the owner in the order regions are found (an enclosing region before those inside it).
Regions found in the entry are owned by ``entry`` (``entry.phase0``); a name already taken is skipped.
A phase is inserted into ``program.defs`` just before its owner (the entry's after every definition), so
definitions stay ordered callees first. Outlining changes no value, and the interpreter and the fx
codegen treat a phase like any definition, so meaning is preserved by construction (and tested).

Both kinds of region are runs of consecutive components of an n-ary composition ``B(f1, ..., fn)``
(applied right to left), judged per component *in context*: each component's type is inferred within
its owner (``bwskc.verify.Inference``), so a unary function from a value to a value is recognised
whatever its shape (a one-hole leaf, a reference, a combinator term).

**S-regions.** A maximal run of at least two consecutive components that are unary and S-typed
(``program.analyses["typing"].term_type(f) == "S"``) becomes ``OWNER.phaseN = B(fi, ..., fj)``;
composition preserves injectivity, so the phase is S. Inside an S-region nothing more is outlined (it
would not be maximal); a definition whose whole body is such a run is its own region (not outlined:
it is one S component where it is used). The entry is not used anywhere, so a whole-body run of the
entry is outlined (``entry.phase0``), which gives the S-phase a name the runtime and the report see.

**Residual chains.** A residual block is a function ``x -> x + F(x)``, recognised semantically rather
than by the shape of its term: the component is applied to a fresh variable ``x`` and reduced
symbolically (combinator rules, definitions unfolded, primitives left as calls); the result must be
``aten.add.Tensor(a, t)`` (no ``alpha``; either order) where ``t`` depends on ``x`` only through ``a``,
the residual stream, and ``a`` must in turn reduce to ``x``, possibly through further blocks (the
component then counts several) and through *links*: reshapes and identity copies (``view``,
``reshape``, ``_unsafe_view``, ``clone``, ``alias``, same number of elements), which are bijections.
So ``S(add, F)``, a reference to GPT-2's ``transformer.h.0 = B(S(add, ..), S(add, ..))`` (2 blocks),
Pythia's parallel block ``S(add, S(B(add, attn..), mlp..))`` (1 block) and OPT's
``B(view, S(add, ..), view, S(add, ..))`` (2 blocks) are chain elements, and so are post-norm
``LN(x + F(x))`` (BERT) and post-activation ``relu(x + F(x))`` (ResNet) blocks (below), while one
whose ``F`` reads an earlier value of the stream is not. A maximal run of chain elements (links and
post-ops allowed between elements, not at its ends) holding at least two blocks in total becomes
``OWNER.residualN``.

*Post-norm and post-activation blocks.* A block may apply a normalisation or an activation to the stream
right after its add, ``x -> T(x + F(x))`` (BERT's LayerNorm, ResNet's ReLU; ``POST_OPS``, one-input,
weights bound): it counts as a block too, ``T`` belonging to the add right below it (a ``T`` with no
add below it ends the chain). Outlining does not change them; the ``reversible`` pass moves each ``T``
into the next block's branch, as RevNet does.

*Conditioned chains.* A block may take extra inputs ``m1..mk`` besides its stream (the attention mask;
a decoder block also the encoder's output): ``b : (m.., x) -> x`` with ``b m x = x + F(m, x)``. The
lowering composes such blocks, sharing ``m``, as ``lift_k(b)`` components (``S(b)``, ``S(B(S, b))``,
...: ``g -> \\m. b m (g m)``) ending, on the right, with one ``clift_k(b)`` (``C(b)``, ``C(B(C, b))``,
...: ``x -> \\m. b m x``) or with a block ``b : (x, m..) -> x`` that reads its stream first (the
lowering orders inputs by definition, and the first layer's stream may be computed before the mask:
Llama). A run of those with the same ``m`` types becomes a phase ``P : (m.., x) -> x`` equal to
``\\m x. bn m (.. (b1 m x))``, written point-free by the lowering's bracket abstraction (e.g.
``S(B(B, b2), b1)``), and the run is replaced by ``lift_k(P)`` or ``clift_k(P)``, the shape it had.

**Chains are found where they are used.** A definition that is itself a chain element is one element
of the chains it is used in: no residual run is outlined along its stream (in the compositions the
stream passes through, which the symbolic check records; the residual functions ``F`` are off the
stream, and chains inside them are outlined). So GPT-2's ``transformer.h.0`` holds no phase, and
``transformer.residual0 = B(h.1, h.0)`` is the one chain, of 4 blocks; a lone chain element that holds
two blocks or more is a phase by itself (a one-layer GPT-2: ``transformer.residual0 = transformer.h.0``).
A lone reference to a phase is not outlined again, which makes the pass idempotent. A phase without a
role (text printed before roles existed) whose body is a chain of two blocks or more gets the role
``residual``.

Subterms are searched everywhere (the arguments of ``S``, ``W``, ``C``, ``K`` and partial ``B``, and
components not outlined). The pass is linear in the IR size: one type inference per definition, one
bounded symbolic check per component (memoised per definition for references), templates of fixed
size.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bwskc.passes.manager import Pass

from bwskc import abstraction as ab
from bwskc._deep import run_deep
from bwskc.errors import BwskError
from bwskc.ir import (
    HOLE,
    REV_KINDS,
    Comb,
    Def,
    Entry,
    Prim,
    Program,
    Ref,
    ScalarType,
    TensorType,
    Term,
    TupleType,
)
from bwskc.passes.residual import (  # noqa: F401  (LINK_OPS, POST_OPS, chain_blocks: public here too)
    LINK_OPS,
    POST_OPS,
    RESIDUAL_ADD,
    Call,
    OutOfSteps,
    Reducer,
    Thunk,
    Var,
    chain_and_path,
    chain_blocks,
    is_link,
    is_post_op,
)
from bwskc.verify import Fn, Inference, TVar, fn_type

MAX_SHARED = 4  # extra inputs a conditioned block may take (T5's decoder blocks take 2)
_VALUE_TYPES = (TensorType, TupleType, ScalarType)


def _is_value(t) -> bool:
    return isinstance(t, _VALUE_TYPES)


# ------------------------------------------------------------------------------- types in context

@dataclass(frozen=True)
class Arrow:
    """A ground function type ``arg -> res`` (``None`` where inference left a variable)."""

    arg: Any
    res: Any


class _ContextTypes(Inference):
    """Type inference over one definition that remembers the type of every subterm occurrence."""

    def __init__(self, program: Program):
        super().__init__(program)
        self.seen: dict[int, list] = {}
        self.grounded: dict[int, Any] = {}  # id(Fn) -> Arrow, once inference is done (shared parts)

    def infer(self, t):
        ty = super().infer(t)
        self.seen.setdefault(id(t), []).append(ty)
        return ty

    def ground(self, t):
        t = self.resolve(t)
        if not isinstance(t, Fn):
            return None if isinstance(t, TVar) else t
        if id(t) not in self.grounded:
            self.grounded[id(t)] = Arrow(self.ground(t.arg), self.ground(t.res))
        return self.grounded[id(t)]

    def type_of(self, term: Term):
        """The ground type of ``term`` where every occurrence of this object agrees, else None."""
        first, *rest = [self.ground(t) for t in self.seen.get(id(term), ())] or [None]
        return first if all(t == first for t in rest) else None


def _unary(ty) -> bool:
    return isinstance(ty, Arrow) and _is_value(ty.arg) and _is_value(ty.res)


def _curried(ty, n: int) -> tuple[list, Any] | None:
    """``(a1 .. an, r)`` if ``ty`` is ``a1 -> .. -> an -> r`` with value types, else None."""
    args = []
    for _ in range(n):
        if not isinstance(ty, Arrow) or not _is_value(ty.arg):
            return None
        args.append(ty.arg)
        ty = ty.res
    return (args, ty) if _is_value(ty) else None


def _arrow(inputs, output):
    for i in reversed(inputs):
        output = Arrow(i, output)
    return output


# ------------------------------------------------------------------------------ lifting templates

_MARK = "\x00block"  # a name no program has: the place of the block in a template


def _template(k: int, lifted: bool) -> Term:
    """``lift_k(b) = \\g m.. . b m.. (g m..)`` (lifted) or ``clift_k(b) = \\x m.. . b m.. x``, point-free
    by the lowering's own bracket abstraction, so they read as the lowering writes them."""
    b = ab.Lit(Ref(_MARK))
    ms = [ab.Var(i) for i in range(1, k + 1)]
    s = ab.Var(0)
    body = ab.apply(b, *ms, ab.apply(s, *ms) if lifted else s)
    for v in reversed([s] + ms):
        body = ab.abstract(v.id, body)
    return ab.to_term(body)


_TEMPLATES = {(k, lifted): _template(k, lifted) for k in range(1, MAX_SHARED + 1) for lifted in (True, False)}


def _match(template: Term, term: Term):
    """The subterm of ``term`` at the template's mark if the rest is equal, else None."""
    stack, found = [(template, term)], None
    while stack:
        tp, t = stack.pop()
        if isinstance(tp, Ref) and tp.name == _MARK:
            found = t
        elif isinstance(tp, Comb):
            if not isinstance(t, Comb) or t.kind != tp.kind or len(t.args) != len(tp.args):
                return None
            stack.extend(zip(tp.args, t.args))
        elif tp != t:
            return None
    return found


def _instantiate(template: Term, b: Term) -> Term:
    if isinstance(template, Ref) and template.name == _MARK:
        return b
    if isinstance(template, Comb):
        return Comb(template.kind, tuple(_instantiate(a, b) for a in template.args))
    return template


def _chain_body(elems: list, k: int) -> Term:
    """``\\m1 .. mk x. bn m.. (.. (b1 m.. x))`` point-free (``elems`` outermost first; ``b1 x m..``
    for an element whose stream is its first input)."""
    ms = [ab.Var(i) for i in range(1, k + 1)]
    x = ab.Var(0)
    body = x
    for block, stream_first in reversed(elems):
        body = ab.apply(ab.Lit(block), body, *ms) if stream_first else ab.apply(ab.Lit(block), *ms, body)
    for v in [x] + list(reversed(ms)):
        body = ab.abstract(v.id, body)
    return ab.to_term(body)


# ------------------------------------------------------------------------------------ the rewrite

@dataclass
class _Elem:
    """A chain element: ``lift_k(block)``, ``clift_k(block)`` or a block taking its stream first (then
    its k shared inputs: the first block of a chain whose stream was defined before them); k = 0: the
    block itself."""

    block: Term
    k: int
    lifted: bool  # lift_k(block): it can be followed (to its right) by further elements
    count: int  # residual blocks it holds
    shared: tuple  # types of the k shared inputs
    stream: Any  # type of the stream in
    output: Any
    stream_terms: frozenset  # the compositions its stream passes through
    stream_first: bool = False


class _Fuser:
    def __init__(self, program: Program, term_type: Callable[[Term], str]):
        self.program = program
        self.term_type = term_type
        self.taken = set(program.defs) | set(program.tensors)
        self.counters: dict[tuple[str, str], int] = {}
        self.chain_cache: dict[tuple[str, int, int], tuple[int, frozenset]] = {}
        self.post_cache: dict[int, tuple[Term, bool]] = {}  # id -> (term kept alive, is a post-op)
        self.stream_terms: set[int] = set()  # compositions on the stream of a chain: not outlined
        self.phases: dict[str, list[Def]] = {}  # owner -> phases, in creation order (callees first)
        self.s_cache: dict[int, tuple[Term, bool]] = {}  # id -> (term kept alive, is S)

    def run(self) -> Program:
        defs: dict[str, Def] = {}
        for d in self.program.defs.values():
            if d.kind == "phase" and d.role is None and len(d.inputs) <= MAX_SHARED + 1 \
                    and chain_blocks(self.program, Ref(d.name), list(d.inputs)) >= 2:
                d = dataclasses.replace(d, role="residual")  # a chain outlined before roles existed
            s_phase = d.role == "s_phase"
            body = self.scope(d.name, d.body, d.inputs, d.output, whole_ok=False, s_on=not s_phase)
            defs.update((p.name, p) for p in self.phases.get(d.name, []))
            defs[d.name] = d if body is d.body else dataclasses.replace(d, body=body)
        e = self.program.entry
        body = self.scope("entry", e.body, e.inputs, e.output, whole_ok=True)
        defs.update((p.name, p) for p in self.phases.get("entry", []))
        entry = e if body is e.body else Entry(e.input_names, e.inputs, e.output_names, e.outputs,
                                               body, e.pos)
        return self.program.replace(defs=defs, entry=entry)

    # one definition (or the entry)
    def scope(self, owner, body, inputs, output, whole_ok, s_on=True):
        self.owner, self.inf = owner, _ContextTypes(self.program)
        self.inf.unify(self.inf.infer(body), fn_type(inputs, output), None)
        # A definition that is itself a chain element is one unit of the chains it is used in: no
        # residual run is outlined along its stream. Its whole body, when an S-run, is its own S-region
        # (searched as a phase's body).
        self.whole = None if whole_ok else body
        if not whole_ok:
            for stream in (-1, 0) if len(inputs) > 1 else (-1,):
                self.stream_terms |= self.blocks(Ref(owner), list(inputs), stream)[1]
        return self.term(body, s_on)

    def term(self, t, s_on):
        """``t`` with its regions outlined (``s_on``: S-regions may be, i.e. not inside one)."""
        if isinstance(t, Comb) and t.kind == "B" and len(t.args) >= 2:
            return self.compose(t, s_on)
        if isinstance(t, Comb) and t.args:
            args = tuple(self.term(a, s_on) for a in t.args)
            return t if all(a is b for a, b in zip(args, t.args)) else Comb(t.kind, args, t.pos)
        return t

    def compose(self, t: Comb, s_on: bool):
        comps = t.args
        types = [self.inf.type_of(c) for c in comps]
        out: list[Term] = []
        i = 0
        for lo, hi, kind, elems in self.runs(t, types, s_on):
            out.extend(self.term(c, s_on) for c in comps[i:lo])
            if kind == "skip":  # a residual run left in place: its blocks are searched inside
                out.extend(self.term(c, s_on) for c in comps[lo:hi])
            elif kind == "s-body":
                out.extend(self.term(c, False) for c in comps[lo:hi])
            else:
                out.append(self.outline(comps[lo:hi], types[lo:hi], kind, elems))
            i = hi
        out.extend(self.term(c, s_on) for c in comps[i:])
        if len(out) == 1:
            return out[0]
        if len(out) == len(comps) and all(a is b for a, b in zip(out, comps)):
            return t
        return Comb("B", tuple(out), t.pos)

    # finding runs
    def runs(self, t: Comb, types, s_on):
        """Disjoint runs ``(lo, hi, kind, elements)`` of ``t``'s components, left to right; kind is
        ``residual``, ``phase`` or ``skip`` (a residual run that stays: a whole body, a fused phase)."""
        comps, n = t.args, len(t.args)
        elems = [self.element(c, ty) for c, ty in zip(comps, types)]
        found, taken = [], [False] * n
        i = 0
        while i < n:
            # a run starts at an element (a post-op after the last block stays outside: the same
            # function either way, and pre-norm models keep their final norm out of the chain)
            if elems[i] is None:
                i += 1
                continue
            last, j = i, i + 1
            while j < n:
                if elems[j] is not None and self.continues(elems[last], elems[j]):
                    last = j
                elif not (elems[last].k == 0 and (self.is_link(comps[j], types[j]) or (
                        j + 1 < n and self.post_before(elems[j + 1], comps[j], types[j])))):
                    break
                j += 1
            run = elems[i:last + 1]
            if sum(e.count for e in run if e is not None) >= 2:
                skip = id(t) in self.stream_terms or self.is_fused(run)
                found.append((i, last + 1, "skip" if skip else "residual", run))
                taken[i:last + 1] = [True] * len(run)
                for e in run:  # the chain's stream runs through its elements: nothing to outline there
                    self.stream_terms |= e.stream_terms if e is not None else frozenset()
            i = last + 1
        if s_on:
            i = 0
            while i < n:
                j = i
                while j < n and not taken[j] and _unary(types[j]) and self.is_s(comps[j]):
                    j += 1
                if j - i >= 2:  # a definition's whole body is its own region: searched as in a phase
                    found.append((i, j, "s-body" if self.whole is t and j - i == n else "phase", None))
                i = max(j, i + 1)
        return sorted(found, key=lambda r: r[0])

    def is_s(self, c: Term) -> bool:
        key = id(c)
        if key not in self.s_cache:
            self.s_cache[key] = (c, self.term_type(c) == "S")
        return self.s_cache[key][1]

    @staticmethod
    def is_link(c: Term, ty) -> bool:
        return isinstance(c, Prim) and _unary(ty) and is_link(c, ty.arg)

    def post_before(self, elem: _Elem | None, c: Term, ty) -> bool:
        """Whether component ``c`` is a post-op (``LN``, ``relu``) applied right after the unconditioned
        chain element ``elem``: ``T(x + F(x))`` written as two components of a composition."""
        if elem is None or elem.k != 0 or not _unary(ty) or ty.arg != elem.output:
            return False
        key = id(c)
        if key not in self.post_cache:
            x = Var(ty.arg)
            reducer = Reducer(self.program)
            try:
                v = reducer.whnf(Thunk(c, [x]))
                ok = isinstance(v, Call) and is_post_op(v.prim) and len(v.args) == 1 \
                    and reducer.whnf(v.args[0]) is x
            except OutOfSteps:
                ok = False
            self.post_cache[key] = (c, ok)  # the term is kept alive with its id
        return self.post_cache[key][1]

    @staticmethod
    def continues(prev: _Elem, nxt: _Elem) -> bool:
        """Whether ``nxt`` (applied before ``prev``) extends a run ending at ``prev``."""
        if prev.k != nxt.k:
            return False
        if prev.k == 0:
            return True
        return prev.lifted and prev.shared == nxt.shared

    def is_fused(self, run) -> bool:
        if len(run) != 1 or not isinstance(run[0].block, Ref):
            return False
        d = self.program.defs.get(run[0].block.name)
        return d is not None and d.kind == "phase"

    def element(self, c: Term, ty) -> _Elem | None:
        """``c`` as a chain element, or None."""
        if _unary(ty):
            n, via = self.blocks(c, [ty.arg])
            return _Elem(c, 0, False, n, (), ty.arg, ty.res, via) if n else None
        for (k, lifted), tpl in _TEMPLATES.items() if isinstance(c, Comb) else ():
            b = _match(tpl, c)
            if b is None:
                continue
            if isinstance(b, Ref) and b.name in self.program.defs:
                d = self.program.defs[b.name]
                sig = (list(d.inputs), d.output) if len(d.inputs) == k + 1 else None
            else:
                sig = _curried(self.inf.type_of(b), k + 1)
            n, via = self.blocks(b, sig[0]) if sig else (0, None)
            if n:
                return _Elem(b, k, lifted, n, tuple(sig[0][:-1]), sig[0][-1], sig[1], via)
        for k in range(1, MAX_SHARED + 1):  # x m.. -> x': a block taking its stream first
            sig = _curried(ty, k + 1)
            n, via = self.blocks(c, sig[0], stream=0) if sig else (0, None)
            if n:
                return _Elem(c, k, False, n, tuple(sig[0][1:]), sig[0][0], sig[1], via, stream_first=True)
        return None

    def blocks(self, term: Term, inputs: list, stream: int = -1) -> tuple[int, frozenset]:
        """Residual blocks of ``term`` and the compositions its stream passes through."""
        key = (term.name, len(inputs), stream) if isinstance(term, Ref) else None
        if key is not None and key in self.chain_cache:
            return self.chain_cache[key]
        found = chain_and_path(self.program, term, inputs, stream)
        if key is not None:
            self.chain_cache[key] = found
        return found

    # outlining
    def outline(self, comps, types, kind, elems) -> Term:
        name = self.fresh("residual" if kind == "residual" else "phase")
        role = "residual" if kind == "residual" else "s_phase"
        k = elems[0].k if kind == "residual" else 0
        if k:  # a conditioned chain: P m.. x = bn m.. (.. (b1 m.. x)), used as lift_k(P) or clift_k(P)
            blocks = [(self.term(e.block, True), e.stream_first) for e in elems]
            self.add_phase(name, elems[0].shared + (elems[-1].stream,), elems[0].output,
                           _chain_body(blocks, k), role)
            return _instantiate(_TEMPLATES[(k, elems[-1].lifted)], Ref(name))
        inner = [self.term(c, kind == "residual") for c in comps]
        body = inner[0] if len(inner) == 1 else Comb("B", tuple(inner))
        self.add_phase(name, (types[-1].arg,), types[0].res, body, role)
        return Ref(name)

    def fresh(self, label: str) -> str:
        key = (self.owner, label)
        n = self.counters.get(key, 0)
        while f"{self.owner}.{label}{n}" in self.taken:
            n += 1
        self.counters[key] = n + 1
        name = f"{self.owner}.{label}{n}"
        self.taken.add(name)
        return name

    def add_phase(self, name, inputs, output, body, role):
        self.phases.setdefault(self.owner, []).append(
            Def(name, tuple(inputs), output, body, kind="phase", role=role))


def fuse(program: Program, typing) -> Program:
    """``program`` with its maximal S-regions and residual chains outlined as phases. ``typing`` is an
    object with ``term_type(term) -> "S" | "K" | "GRAY"`` (the ``typing`` analysis) or such a function."""
    term_type = typing if callable(typing) and not hasattr(typing, "term_type") else typing.term_type
    return run_deep(lambda: _Fuser(program, term_type).run())


@dataclass(frozen=True)
class FusionOptions:
    """``s_regions``: outline S-regions, which needs the typing analysis (False: residual chains only,
    every term taken as GRAY, and typing is not required: what the reversible rewrite needs);
    ``typing``: a typing result (an object with ``term_type``, or such a function) used instead of the
    ``typing`` analysis (which still runs first)."""

    s_regions: bool = True
    typing: Any = None


def _gray(term: Term) -> str:
    return "GRAY"


class FusionPass(Pass):
    name = "fusion"
    kind = "rewrite"
    requires = ("typing",)
    Options = FusionOptions

    def required(self, options) -> tuple[str, ...]:
        return self.requires if self.options_from(options).s_regions else ()

    def rewrite(self, program: Program, options) -> Program:
        """``options``: ``FusionOptions`` (or a mapping of its fields)."""
        options = self.options_from(options)
        if not options.s_regions:
            return fuse(program, _gray)
        typing = options.typing or program.analyses.get("typing")
        if typing is None:
            raise BwskError("the fusion pass needs the typing analysis: run it with --passes typing,fusion")
        return fuse(program, typing)


PASS = FusionPass()
