"""Bracket abstraction: from let-bound dataflow to point-free combinator terms.

A region of the graph is the lambda term ``\\x1 ... xn. let v1 = e1 in ... in out``. A value used once is
substituted into its single use (no duplication); a value used more than once is let-bound, and
``let v = e in b`` is ``([v] b) e``, so the shared subgraph ``e`` appears exactly once. Variables are
removed with Turner's optimised rules (first matching rule wins, ``fv`` = free variables):

    [x] M        = K M            if x not in fv(M)
    [x] x        = I
    [x] (M x)    = M              if x not in fv(M)        (eta)
    [x] (M N)    = B M ([x] N)    if x not in fv(M)
    [x] (M N)    = C ([x] M) N    if x not in fv(N)
    [x] (M x)    = W ([x] M)                              (S f I = W f)
    [x] (M N)    = S ([x] M) ([x] N)

Each rule adds one combinator per application on a path from the root to an occurrence of x, so the
result grows by the live range of each variable: linear in the graph for bounded liveness.
``to_term`` then turns the remaining applications (all headed by combinators) into ``Comb`` nodes and
flattens compositions into n-ary ``B(...)``.
"""
from __future__ import annotations

from bwskc.ir import Comb, Term


class Var:
    __slots__ = ("fv", "id")

    def __init__(self, id: int):
        self.id = id
        self.fv = frozenset((id,))


class Lit:
    """A closed IR term (a primitive leaf, a definition reference, a constant, a combinator)."""

    __slots__ = ("fv", "term")

    def __init__(self, term):
        self.term = term
        self.fv = frozenset()


class App:
    __slots__ = ("arg", "fn", "fv")

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg
        self.fv = fn.fv | arg.fv if arg.fv else fn.fv


_COMB = {k: Lit(Comb(k)) for k in "IKWBCS"}


def apply(fn, *args):
    for a in args:
        fn = App(fn, a)
    return fn


def abstract(x: int, m):
    """``[x] m`` by the rules in the module docstring."""
    if x not in m.fv:
        return App(_COMB["K"], m)
    if isinstance(m, Var):
        return _COMB["I"]
    assert isinstance(m, App)
    fn, arg = m.fn, m.arg
    if x not in fn.fv:
        if isinstance(arg, Var):  # arg is x itself, since x is free in m
            return fn
        return apply(_COMB["B"], fn, abstract(x, arg))
    if x not in arg.fv:
        return apply(_COMB["C"], abstract(x, fn), arg)
    if isinstance(arg, Var):
        return App(_COMB["W"], abstract(x, fn))
    return apply(_COMB["S"], abstract(x, fn), abstract(x, arg))


def let(var: int, value, body):
    """``let var = value in body`` as ``([var] body) value``."""
    return App(abstract(var, body), value)


def to_term(m) -> Term:
    """Turn a closed applicative term into IR combinator terms, with n-ary B."""
    if m.fv:
        raise ValueError(f"term still has free variables {sorted(m.fv)}")
    spine = []
    while isinstance(m, App):
        spine.append(m.arg)
        m = m.fn
    spine.reverse()
    head = m.term
    if not spine:
        return head
    if not isinstance(head, Comb) or head.args:
        raise ValueError(f"application of a non-combinator {head!r} survived abstraction")
    args = tuple(to_term(a) for a in spine)
    if head.kind == "B" and len(args) > 2:
        raise ValueError("saturated B survived abstraction")
    if head.kind == "B" and len(args) == 2:
        return compose(args[0], args[1])
    return Comb(head.kind, args)


def compose(f: Term, g: Term) -> Term:
    """``B f g`` flattened: composition is associative, so nested binary B's become one n-ary B."""
    fs = f.args if isinstance(f, Comb) and f.kind == "B" and len(f.args) >= 2 else (f,)
    gs = g.args if isinstance(g, Comb) and g.kind == "B" and len(g.args) >= 2 else (g,)
    return Comb("B", fs + gs)
