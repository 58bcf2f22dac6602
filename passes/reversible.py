"""The ``reversible`` pass: residual chains become two-stream coupling chains ``Rk(add, f1, .., fn)``.

The fusion pass outlines every maximal chain of residual blocks as a phase of role ``residual``
(``Def.role``; named ``OWNER.residualN``) with signature ``(m1 .. mk, x) -> x`` (k shared inputs, such as
an attention mask, then the stream); a phase this pass rewrites gets the role ``coupling``. This pass
reads each such phase symbolically (``bwskc.passes.residual``, the reducer the fusion pass uses to
recognise blocks): the phase
applied to fresh variables reduces, along its stream, to ``a_n + t_n`` where ``a_n`` is the stream
after n-1 blocks and ``t_n`` reaches ``x`` only through ``a_n``, and so on down to ``x``, possibly
through links (reshapes and copies). Each ``t_i`` is read back into a term and abstracted over its
stream (and the shared inputs) with the lowering's own bracket abstraction: the branch
``f_i = \\m.. s. t_i[a_i := s]``, so that block i is ``s -> s + f_i m.. s``. A block that ran on a
reshaped stream is conjugated by the reshape (``reshape_back . f_i . reshape``): every branch then has
the phase's input type and the chain one stream type.

The phase body becomes ``Rk(add, f1, .., fn)``: streams ``a = b = x``; branch i updates ``a`` from ``b``
(i odd) or ``b`` from ``a`` (i even); the result is ``a + b - x``. For a transformer whose blocks
alternate attention and MLP, each coupling layer is ``y1 = x1 + Attn(x2)``, ``y2 = x2 + MLP(y1)``
(Reformer's). Why this merge: ``a - x`` accumulates the odd branches' updates and ``b - x`` the even
ones', so ``a + b - x = x + sum of all updates``, which is the residual chain's own output to first order
in the branches; a pretrained model's function is kept as closely as a coupling allows (measured in
``benchmarks/memory.py --init-diff``), and the backward pass needs no stored activation for the merge
(it is linear). The averaged merge ``(a + b) / 2`` would halve every update.

The rewrite changes the architecture (a coupling chain is not its residual chain), so it does not
preserve meaning; what it preserves is checked instead: read sequentially, the branches give back the
original phase (``sequential_term``), and the coupling inverts exactly.

**Post-norm and post-activation chains** (BERT's ``LN(x + F(x))``, ResNet's ``relu(x + F(x))``): the
function ``T`` after each add moves into the next block's branch, as RevNet does with its ReLU. Block i
becomes ``u -> u + F_i(T_{i-1}(u))`` (``T_0`` the identity) and the chain's output is ``T_n`` of the
merged streams: ``T_n(Rk(add, F_1, F_2 . T_1, .., F_n . T_{n-1}))``. This is the pre-norm form of the
same blocks (the skip path no longer passes through ``T``): an architecture change larger than the
coupling's, so a fine-tuned post-norm model starts further from the original (``--init-diff`` measures
it); trained from scratch it is the usual pre-norm transformer or RevNet.

What is not lowered stays as it was, and ``program.analyses["reversible"]`` says what was lowered and
why the rest was not (a lone block is not a chain; a branch that reads an earlier stream value, a
projection shortcut or a stride-2 block are boundaries).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from bwskc import abstraction as ab
from bwskc._deep import run_deep
from bwskc.errors import BwskError
from bwskc.ir import (
    HOLE,
    REV_KINDS,
    Comb,
    Def,
    Prim,
    Program,
    Ref,
    Term,
    TensorType,
    TupleType,
    is_layer,
    reachable_defs,
    stack_of,
    subterms,
    walk_terms,
)
from bwskc.passes.manager import Pass
from bwskc.runtime.random_ops import unreplayable_draw
from bwskc.passes.residual import (
    Call,
    OutOfSteps,
    Pap,
    Reducer,
    Stuck,
    Thunk,
    Var,
    depends,
    is_link,
    is_post_op,
    is_residual_add,
    value_type,
)

class NotLowered(Exception):
    """Why a residual chain cannot become a coupling chain (reported, never raised to the user)."""


@dataclass
class ReversibleReport:
    """What the pass did: the chains it lowered and the residual structure it left, with reasons."""

    chains: list[dict] = field(default_factory=list)  # {"name", "blocks", "couplings", "shared"}
    not_lowered: list[dict] = field(default_factory=list)  # {"where", "reason"}

    def summary(self) -> dict:
        return {"chains": len(self.chains), "blocks": sum(c["blocks"] for c in self.chains),
                "couplings": sum(c["couplings"] for c in self.chains), "not_lowered": len(self.not_lowered)}


# ------------------------------------------------------------------------------------ reading back

def _reshape(to: TensorType) -> Prim:
    return Prim("aten.reshape.default", (HOLE, tuple(to.shape)), (), to)


class _Readback:
    """A symbolic value (reducer nodes over variables) as an applicative term over ``ab`` variables."""

    def __init__(self, env: dict[int, object]):
        self.env = env  # id(node) -> ab term standing for it
        self.seen: set[int] = set()

    def __call__(self, n):
        return run_deep(self.read, n)

    def read(self, n):
        if id(n) in self.env:
            return self.env[id(n)]
        if isinstance(n, Term):
            return ab.Lit(n)
        if isinstance(n, Var):
            raise NotLowered("a branch reads the stream other than through its block's input")
        if isinstance(n, Call) or (isinstance(n, Thunk) and n.args):  # a computation, not a term
            if id(n) in self.seen:  # reading it twice would compute it twice
                raise NotLowered("a branch shares a computation between two uses")
            self.seen.add(id(n))
        if isinstance(n, Thunk):
            return ab.apply(self.read(n.fun), *[self.read(a) for a in n.args])
        if isinstance(n, Call):
            return ab.apply(ab.Lit(n.prim), *[self.read(a) for a in n.args])
        if isinstance(n, Pap):
            return ab.apply(ab.Lit(n.term), *[self.read(a) for a in n.args])
        if isinstance(n, Stuck) and n.args:
            return ab.apply(self.read(n.args[0]), *[self.read(a) for a in n.args[1:]])
        raise NotLowered(f"a branch holds a value that is not a term ({type(n).__name__})")


@dataclass
class _Block:
    stream: object  # the reducer node of the stream this block adds to
    branch: object  # the reducer node of the update
    type: TensorType  # the stream's type at this block
    post: Prim | None = None  # a post-norm or post-activation T applied after the add: T(x + F(x))


def branch_term(block: _Block, shared: list[Var], stream_type: TensorType, pre: Prim | None = None) -> Term:
    """``\\m.. s. t[a := s]``, conjugated by reshapes when the block ran on a reshaped stream; with
    ``pre`` (the previous block's post-op T), ``\\m.. s. t[a := T s]``: the branch reads the stream
    through T, which the skip path no longer applies."""
    ms = [ab.Var(i) for i in range(1, len(shared) + 1)]
    s = ab.Var(0)
    conj = block.type != stream_type
    if pre is not None and conj:
        raise NotLowered("a post-norm block on a reshaped stream")
    stream_value = ab.App(ab.Lit(_reshape(block.type)), s) if conj else s
    if pre is not None:
        stream_value = ab.App(ab.Lit(pre), stream_value)
    env = {id(block.stream): stream_value}
    env.update((id(m), v) for m, v in zip(shared, ms))
    body = _Readback(env)(block.branch)
    if conj:
        body = ab.App(ab.Lit(_reshape(stream_type)), body)
    for v in [s] + list(reversed(ms)):
        body = ab.abstract(v.id, body)
    try:
        return ab.to_term(body)
    except ValueError as exc:
        raise NotLowered(f"a branch is not expressible point-free ({exc})") from None


def sequential_term(chain: Comb) -> Term:
    """The residual chain a coupling chain was read from: ``B(S(add, fn), .., S(add, f1))`` (k = 0).
    Equal in meaning to the phase the pass replaced (up to reshapes): the test of the read-back."""
    if chain.kind != "R":
        raise BwskError("sequential_term takes a chain without shared inputs")
    add = chain.args[0]
    blocks = [Comb("S", (add, f)) for f in chain.args[1:]]
    return blocks[0] if len(blocks) == 1 else Comb("B", tuple(reversed(blocks)))


# ------------------------------------------------------------------------------------------ the pass

def _residual_sites(program: Program, names) -> list[dict]:
    """Residual adds ``S(add, F)`` in the definitions ``names`` that no chain holds, with a reason."""
    out = []
    for name in names:
        d = program.defs[name]
        if d.role in ("residual", "coupling"):
            continue
        for t in subterms(d.body):
            if isinstance(t, Comb) and t.kind == "S" and len(t.args) == 2 and isinstance(t.args[0], Prim) \
                    and is_residual_add(t.args[0]) and _reads_parameters(program, t.args[1]):
                out.append({"where": name, "reason": _why_not(program, d)})
                break
    return out


def _reads_parameters(program: Program, term: Term) -> bool:
    """Whether a residual function has weights (GELU's ``x + 0.044715 x^3`` is an add of that shape, not
    a residual block)."""
    return any(isinstance(t, Prim) and any(True for _ in t.tensor_refs())
               for _, t in walk_terms(program, [term]))


def _why_not(program: Program, d: Def) -> str:
    body = d.body
    if isinstance(body, Comb) and body.kind == "B" and len(body.args) >= 2:
        head = body.args[0]
        last = body.args[-1]
        if isinstance(last, Comb) and last.kind == "S" and not (isinstance(head, Comb) and head.kind == "S"):
            what = head.op if isinstance(head, Prim) else (head.name if isinstance(head, Ref) else head.kind)
            return (f"{what} is applied after the residual add, and the block is not in a chain of "
                    "two or more blocks (post-norm or post-activation blocks are coupled when chained)")
    blocks = sum(1 for t in subterms(body) if isinstance(t, Comb) and t.kind == "S" and len(t.args) == 2
                 and isinstance(t.args[0], Prim) and is_residual_add(t.args[0])
                 and _reads_parameters(program, t.args[1]))
    if blocks <= 1:
        return "a lone residual block: a chain needs two or more blocks in a row on one stream"
    return (f"{blocks} residual blocks that do not form a chain: a branch reads an earlier stream value "
            "than the block's own input, so no block's input is the previous block's output alone")


def reversible_rewrite(program: Program) -> Program:
    """``fusion`` then ``reversible``, as ``bwskc.compile`` and ``bwskc check-gradients`` run them: the
    chains are all the rewrite needs, so fusion runs without the typing analysis (``s_regions=False``:
    every term GRAY, no S-phase outlined), a fraction of the full pipeline's cost. Through the pass
    manager, verified once, after the rewrite."""
    from bwskc.passes.manager import run_passes
    from bwskc.verify import verify_program
    program = run_passes(program, ["fusion", "reversible"], options={"fusion": {"s_regions": False}},
                         verify=False)
    verify_program(program, filename="<after reversible>")
    return program


def to_reversible(program: Program) -> Program:
    """``program`` with every phase of role ``residual`` that can be coupled rewritten into a coupling
    chain (its role then ``coupling``), the definitions only those chains used dropped, and
    ``analyses["reversible"]`` a ``ReversibleReport`` of what was lowered and what was not, and why."""
    report = ReversibleReport()
    defs = dict(program.defs)
    for name, d in program.defs.items():
        if d.role != "residual":
            continue
        if isinstance(d.body, Comb) and d.body.kind in REV_KINDS:
            continue  # already coupled (the pass is idempotent)
        try:
            body = run_deep(_coupling_body, program, d)
        except NotLowered as exc:
            report.not_lowered.append({"where": name, "reason": str(exc)})
            continue
        chain = next(t for t in subterms(body) if isinstance(t, Comb) and t.kind in REV_KINDS)
        n = len(chain.args) - 1
        report.chains.append({"name": name, "blocks": n, "couplings": (n + 1) // 2,
                              "shared": len(d.inputs) - 1})
        defs[name] = dataclasses.replace(d, body=body, role="coupling")
    before = set(reachable_defs(program))
    out = program.replace(defs=defs)
    after = set(reachable_defs(out))
    # definitions only the replaced chains used (the blocks' own wrappers) are dropped
    out = out.replace(defs={n: d for n, d in defs.items() if n in after or n not in before})
    report.not_lowered.extend(_residual_sites(out, [n for n in out.defs if n in after]))
    reported = {r["where"] for r in report.not_lowered}
    in_chains = set(reachable_defs(out, [Ref(c["name"]) for c in report.chains]))
    for n in out.defs:  # module-list layers outside every chain (and not inside a branch)
        if n in after and n not in reported | in_chains and out.defs[n].kind == "def" \
                and is_layer(n):
            report.not_lowered.append({"where": n, "reason": (
                "not a residual block in a chain (a projection or stride-2 block, a lone block, or "
                "no skip connection): kept, and checkpointed in reversible mode")})
    _explain_side_outputs(out, report, in_chains)
    out.analyses["reversible"] = report
    return out


def side_outputs(program: Program, d: Def) -> list | None:
    """The types of the values a residual block returns besides its stream, if ``d`` is one: applied to
    fresh variables it reduces to ``tuple(.., a + t, ..)`` (through projections of tuples) where
    ``a + t`` is a residual add on its last input (a mixture-of-experts layer returning its router's
    logits: Switch Transformers exported with ``output_router_logits``); None otherwise."""
    if not d.inputs or not isinstance(d.output, TupleType):
        return None
    reducer = Reducer(program)
    args = [Var(t) for t in d.inputs]
    x = args[-1]

    def value(n):
        v = reducer.whnf(n)
        while isinstance(v, Call) and v.prim.op == "getitem" and len(v.args) == 1 \
                and len(v.prim.args) == 2 and isinstance(v.prim.args[1], int):
            inner = reducer.whnf(v.args[0])
            if not (isinstance(inner, Call) and inner.prim.op == "tuple"):
                break
            v = reducer.whnf(inner.args[v.prim.args[1]])
        return v
    try:
        v = value(Thunk(Ref(d.name), args))
        if not (isinstance(v, Call) and v.prim.op == "tuple"):
            return None
        items = [value(a) for a in v.args]
    except (OutOfSteps, IndexError):
        return None
    for i, it in enumerate(items):
        if isinstance(it, Call) and is_residual_add(it.prim) and it.prim.type == d.inputs[-1] \
                and any(depends(o, x, None) for o in it.args):
            return [t for j, t in enumerate(d.output.items) if j != i]
    return None


def _explain_side_outputs(program: Program, report: ReversibleReport, in_chains: set) -> None:
    """Residual blocks that return side outputs besides their stream are reported as such, and the
    layers of their stacks left outside every chain say which blocks broke the chain."""
    sides = {}
    for n, d in program.defs.items():
        if d.kind == "def" and n not in in_chains:
            found = side_outputs(program, d)
            if found is not None:
                sides[n] = found
    if not sides:
        return
    layers = sorted(n for n in sides if is_layer(n) and not any(
        n != o and n.startswith(o + ".") for o in sides))  # the outermost: the stack's layers
    for r in report.not_lowered:
        n = r["where"]
        if n in sides:
            types = ", ".join(str(t) for t in sides[n])
            r["reason"] = (f"a residual block that also returns side outputs ({types}: a router's "
                           "logits, say) besides its stream: a coupling chain's branches map the stream "
                           "to the stream (Rk's s -> s), with no place for values that leave the chain, "
                           "so the chain ends before it")
            continue
        stack = stack_of(n)
        breakers = [o for o in layers if stack is not None and stack_of(o) == stack]
        if breakers:
            r["reason"] += ("; the chain of its stack is broken by the blocks that return side outputs "
                            f"besides their stream ({', '.join(breakers)}): the stream between them reaches "
                            "each next block through a tuple projection")


def _coupling_body(program: Program, d: Def) -> Term:
    inputs = list(d.inputs)
    k = len(inputs) - 1
    reducer = Reducer(program)
    args = [Var(t) for t in inputs]
    x = args[-1]
    blocks = _walk(reducer, d.body, args, x)
    if len(blocks) < 2:
        raise NotLowered("fewer than two residual blocks")
    stream = inputs[-1]
    if not isinstance(stream, TensorType) or not isinstance(d.output, TensorType):
        raise NotLowered("the stream is not a single tensor")
    if k >= len(REV_KINDS):
        raise NotLowered(f"{k} shared inputs (at most {len(REV_KINDS) - 1})")
    branches = [branch_term(b, args[:k], stream, blocks[i - 1].post if i else None)
                for i, b in enumerate(blocks)]
    for f in branches:
        _check_replayable(program, f)
    add = Prim("aten.add.Tensor", (HOLE, HOLE), (), stream)
    chain = Comb(REV_KINDS[k], (add, *branches))
    last = blocks[-1].post  # the last block's post-op stays on the chain's output
    if d.output == stream and last is None:
        return chain
    if d.output.numel != stream.numel or d.output.dtype != stream.dtype:
        raise NotLowered("the chain's output is not a reshape of its input")
    if last is not None and d.output != stream:
        raise NotLowered("a post-norm chain whose output is reshaped")
    ms = [ab.Var(i) for i in range(1, k + 1)]
    xv = ab.Var(0)
    end = last if last is not None else _reshape(d.output)
    body = ab.App(ab.Lit(end), ab.apply(ab.Lit(chain), *ms, xv))
    for v in [xv] + list(reversed(ms)):
        body = ab.abstract(v.id, body)
    return ab.to_term(body)


def _check_replayable(program: Program, term: Term) -> None:
    """Backward recomputes each branch: every random draw in it must be replayable
    (``bwskc.runtime.random_ops``), or the block stays out of the coupling."""
    reason = unreplayable_draw(program, term)
    if reason is not None:
        raise NotLowered(f"a branch cannot be recomputed exactly: {reason}")


def _walk(reducer: Reducer, body: Term, args: list, x) -> list[_Block]:
    cur, blocks, post = Thunk(body, args), [], None
    try:
        while True:
            v = reducer.whnf(cur)
            if post is not None and not (isinstance(v, Call) and is_residual_add(v.prim)):
                raise NotLowered(f"{post.op} on the stream is not right after a residual add")
            if v is x:
                return blocks[::-1]
            if not isinstance(v, Call):
                raise NotLowered("the stream does not reduce to residual adds and reshapes")
            p = v.prim
            if is_residual_add(p):
                a, t = v.args
                if depends(t, x, a):
                    a, t = t, a
                    if depends(t, x, a):
                        raise NotLowered("both operands of a residual add read the stream")
                blocks.append(_Block(a, t, p.type, post))
                cur, post = a, None
            elif is_post_op(p) and v.args:
                cur, post = v.args[0], p
            elif v.args and is_link(p, value_type(reducer.whnf(v.args[0]))):
                cur = v.args[0]
            else:
                raise NotLowered(f"{p.op} on the stream is neither a residual add nor a reshape")
    except OutOfSteps:
        raise NotLowered("the chain is too large to read symbolically") from None


@dataclass(frozen=True)
class ReversibleOptions:
    """The reversible pass takes no options yet (any given is an error naming it)."""


class ReversiblePass(Pass):
    name = "reversible"
    kind = "rewrite"
    requires = ("fusion",)
    Options = ReversibleOptions

    def rewrite(self, program: Program, options) -> Program:
        self.options_from(options)
        return to_reversible(program)


PASS = ReversiblePass()
