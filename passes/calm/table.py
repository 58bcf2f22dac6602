"""The rule table: ``RULES`` maps an op's name to its rule, ``FALLBACKS`` are the rules chosen by a
predicate instead (``engine.find_rule`` says in which order they are tried)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps

from bwskc.passes.calm.context import Ctx
from bwskc.passes.calm.plan import Plan

Rule = Callable[[Ctx], Plan]

# keyed by the op's name without namespace and overload (``aten.view.default`` -> ``view``)
RULES: dict[str, Rule] = {}
# names whose rule takes one overload only (``index.Tensor``); other overloads have no rule
OVERLOADS: dict[str, str] = {}


@dataclass(frozen=True)
class Fallback:
    """A rule for the ops ``applies`` accepts, tried before the table or after it."""

    applies: Callable[[Ctx], bool]
    rule: Rule
    before_table: bool


FALLBACKS: list[Fallback] = []  # in registration order (the family modules' import order)


def rule(*names: str, overload: str | None = None):
    """Register a rule for these op names (every overload, or only ``overload``)."""
    def register(fn: Rule) -> Rule:
        for name in names:
            if name in RULES:
                raise ValueError(f"two CALM rules for {name!r}: {RULES[name].__name__}, {fn.__name__}")
            RULES[name] = fn
            if overload is not None:
                OVERLOADS[name] = overload
        return fn
    return register


def fallback(applies: Callable[[Ctx], bool], *, before_table: bool = False):
    """Register a rule for the ops ``applies`` accepts: tried after the table, or before it."""
    def register(fn: Rule) -> Rule:
        FALLBACKS.append(Fallback(applies, fn, before_table))
        return fn
    return register


def single(fn: Rule) -> Rule:
    """Rules that read one partitioned tensor (operand 0) and ignore the other operands' layout."""
    @wraps(fn)
    def wrapped(ctx: Ctx) -> Plan:
        others = [i for i in ctx.parted() if i != 0]
        if others or ctx.part(0) is None:
            return ctx.barrier("unknown", f"{ctx.short}: no rule for a partitioned operand "
                               f"{others[0] if others else 0}")
        return fn(ctx)
    return wrapped
