"""Leaf rules for losses: regression losses (mse, l1, smooth l1, huber), cross entropy, nll_loss, and
scalar losses reduced to one value (binary cross entropy, kl_div...).
"""
from __future__ import annotations

import math

import torch

from bwskc.evidence import Verdict, erasing, gray, inputs_differ, no_rule, outputs_equal
from bwskc.leaf import Leaf
from bwskc.passes.typing.arithmetic import joint_collision
from bwskc.passes.typing.movement import out_parts
from bwskc.passes.typing.normalisation import shift_witness
from bwskc.passes.typing.reduction import reduction
from bwskc.passes.typing.table import dof, is_float, numel, rule


_REGRESSION = ("aten.mse_loss", "aten.l1_loss", "aten.smooth_l1_loss", "aten.huber_loss")


@rule(*_REGRESSION)
def regression_loss(leaf: Leaf) -> Verdict:
    """mse, l1, smooth l1 and huber losses are even functions of x - target, elementwise, then reduced:
    reflecting x through the target (x' = 2t - x) leaves every element's loss, so every reduction,
    unchanged; with both operands activations, (x + 1, t + 1) keeps x - t."""
    holes = leaf.hole_args
    out_n = numel(leaf.out)
    lost = dof(leaf, sum(numel(t) for t in leaf.inputs) - out_n) if out_n > 1 else None
    if holes == ["self", "target"]:
        return joint_collision(leaf, f"{leaf.packet} depends on x - target only", lambda x, t: (x + 1, t + 1))
    if len(holes) != 1 or leaf.x is None or not is_float(leaf.x):
        return no_rule(leaf.op)
    other = leaf.arg("target" if holes == ["self"] else "self")
    if other is None:
        return gray("even loss", f"{leaf.packet} is even in x - target: K by reflection through the "
                    "target", "never (a reflection collides)", "the target's value", None)
    t = torch.as_tensor(other)

    def witness(g):
        a = leaf.random(g)[0]
        b = (2 * t.double() - a.double()).to(a.dtype)
        if not inputs_differ(a, b):
            b = a + 1
        return (a,), (b,)
    return erasing("even loss", f"{leaf.packet} is even in x - target: x and 2 target - x have the same "
                   "loss", witness, "x and its reflection 2 target - x", lost if lost is not None else None,
                   "the Jacobian of a reduction to a scalar has rank <= 1" if out_n == 1 else "")


@rule("aten.cross_entropy_loss")
def cross_entropy(leaf: Leaf) -> Verdict:
    """cross entropy is a function of log_softmax over the class axis: shift invariant (K)."""
    if leaf.hole_args[:1] != ["self"] or leaf.x is None or not is_float(leaf.x):
        return no_rule(leaf.op)
    return erasing("shift invariance", "cross_entropy(x + c) = cross_entropy(x): it reads x through "
                   "log_softmax over the class axis", shift_witness(leaf), "x and x + 1.5", None,
                   "at least 1 per sample")


@rule("aten.nll_loss_forward", "aten.nll_loss", "aten.nll_loss2d_forward", "aten.nll_loss_nd",
      "aten.nll_loss2d")
def nll_loss(leaf: Leaf) -> Verdict:
    """nll reads one class of each sample, -x[i, target_i]: with C >= 2 classes the others are unread.
    Found by moving one element of a class other than sample 0's target."""
    if leaf.hole_args != ["self"] or leaf.x is None or not is_float(leaf.x) or not leaf.bound_known():
        return no_rule(leaf.op)
    shape = leaf.x.shape
    cdim = 0 if len(shape) == 1 else 1
    if shape[cdim] < 2:
        return no_rule(leaf.op)
    target = torch.as_tensor(leaf.arg("target"))
    first = int(target.reshape(-1)[0]) if target.numel() else 0
    cls = 1 if first == 0 else 0
    index = tuple([0] * len(shape))
    index = index[:cdim] + (cls,) + index[cdim + 1:]

    def witness(g):
        a = leaf.random(g)[0]
        b = a.clone()
        b[index] += 1
        return (a,), (b,)
    return erasing("unread class", "nll_loss reads only the target class of each sample", witness,
                   f"input element {index} (not sample 0's target class) moved", None,
                   "the classes that are not targets")


@rule("aten.binary_cross_entropy_with_logits", "aten.binary_cross_entropy", "aten.kl_div",
      "aten.soft_margin_loss", "aten.poisson_nll_loss", "aten.multilabel_margin_loss",
      "aten.hinge_embedding_loss", "aten.margin_ranking_loss", "aten.multi_margin_loss")
def scalar_loss(leaf: Leaf) -> Verdict:
    """A loss reduced to one number (reduction mean or sum) of n >= 2 inputs: a continuous map
    R^n -> R has level sets of dimension n - 1. The witness is found on one: move element j, then
    solve for element i by bisection to the original value (checked)."""
    reduction = leaf.arg("reduction", 1)
    if leaf.x is None or not is_float(leaf.x) or reduction == 0 or numel(leaf.out) != 1:
        return gray("loss", f"{leaf.packet} without reduction is judged elementwise, which depends on "
                    "its targets", "the elementwise loss is injective for these targets",
                    "a rule for the unreduced loss") if leaf.x is not None else no_rule(leaf.op)
    pair = _level_set_pair(leaf)
    if pair is None:
        return gray("loss", f"{leaf.packet} reduces {leaf.x.numel} inputs to one number, but no "
                    "collision was found on its level set", "never (by dimension), if it is continuous",
                    "a witness search that succeeds", None)
    return erasing("reduction to a scalar", f"{leaf.packet} reduces {leaf.x.numel} inputs to one number: "
                   "its level sets have dimension n - 1", lambda g, pair=pair: pair,
                   "a point of the level set through a random input (bisection, checked)",
                   dof(leaf, leaf.x.numel - 1), "n - 1: the Jacobian of a scalar has rank <= 1")


def _level_set_pair(leaf: Leaf):
    """(a,), (b,) with f(a) == f(b), a != b, for a scalar-valued continuous f of one input: b moves one
    element by h, then another by the s that brings f back (sign change, then bisection). Both signs of
    h are tried: a convex per-element loss (BCE with logits) that the move raises can only be brought
    back by an element above its minimum, one that the move lowers always can."""
    if leaf.x.numel < 2:
        return None
    g = torch.Generator().manual_seed(0)
    a = leaf.random(g, 0.5)[0]
    flat = a.reshape(-1)

    def f(t):
        return float(torch.as_tensor(out_parts(leaf.call(t.reshape(a.shape)))[0].double().sum()))
    target = f(flat)
    for (j, i), h in ((pair, h) for h in (0.25, -0.25) for pair in ((0, 1), (1, 0), (0, flat.numel() - 1))):
        moved = flat.clone()
        moved[j] += h
        if f(moved) == target:
            return (a,), (moved.reshape(a.shape),)

        def gap(s):
            t = moved.clone()
            t[i] += s
            return f(t) - target
        g0 = gap(0.0)
        bracket = None
        for s in (0.125 * 2 ** e * sign for e in range(12) for sign in (1, -1)):
            if math.isfinite(gap(s)) and (gap(s) > 0) != (g0 > 0):
                bracket = (0.0, s)
                break
        if bracket is None:
            continue
        lo, hi = bracket
        for _ in range(80):
            mid = (lo + hi) / 2
            if (gap(mid) > 0) == (g0 > 0):
                lo = mid
            else:
                hi = mid
        for s in (lo, hi):
            b = moved.clone()
            b[i] += s
            b = b.reshape(a.shape)
            if inputs_differ(a, b) and outputs_equal(leaf.call(a), leaf.call(b), 1e-6, 1e-9):
                return (a,), (b,)
    return None
