"""The table of leaf typing rules: ``RULES`` (op or op packet -> rule), the ``rule`` decorator that
fills it, ``type_leaf`` that looks a leaf's rule up, and the small helpers every rule family uses.

A rule takes a ``Leaf`` (``bwskc.leaf``) and returns a ``Verdict`` with its evidence (``bwskc.evidence``);
an op without a rule is GRAY with the reason "no rule". The families, one a file, are listed in
``bwskc.passes.typing``; their proofs are in docs/typing.md.
"""
from __future__ import annotations

from collections.abc import Callable

from bwskc.evidence import Verdict, no_rule
from bwskc.ir import TensorType, TupleType
from bwskc.leaf import Leaf


RULES: dict[str, Callable[[Leaf], Verdict]] = {}


def rule(*ops: str):
    """Registers the decorated rule in ``RULES`` for each op (or op packet) named."""
    def register(fn):
        for op in ops:
            RULES[op] = fn
        return fn
    return register


def type_leaf(leaf: Leaf) -> Verdict:
    """The verdict of a leaf by its rule (a nullary leaf is S; an op without a rule is GRAY)."""
    if not leaf.inputs:
        return Verdict("S", "nullary", "no activation input: a function of the one-point domain is "
                       "injective (a constant; not counted in ratios)", 0, inverse=lambda y: (),
                       extra={"inverse_text": "()"})
    fn = RULES.get(leaf.op) or RULES.get(leaf.packet)
    if fn is None:
        return no_rule(leaf.op)
    v = fn(leaf)
    if v.type in ("S", "K"):  # a claim about the real-valued map unless the rule says floating point
        v.extra.setdefault("domain", "reals")
    return v


def numel(t) -> int:
    """The number of elements of a type (a tuple's items summed; a non-tensor counts 1)."""
    if isinstance(t, TupleType):
        return sum(numel(i) for i in t.items)
    return t.numel if isinstance(t, TensorType) else 1


def is_float(t) -> bool:
    """Whether a type is a floating-point tensor."""
    return isinstance(t, TensorType) and t.torch_dtype.is_floating_point


def dof(leaf: Leaf, lost: int):
    """Degrees of freedom are counted for real-valued inputs only (discrete inputs have none)."""
    return lost if all(is_float(t) for t in leaf.inputs) else None
