"""Leaf rules for normalisations: layer, group, RMS, batch and instance norm (with or without their
statistics), softmax and log_softmax, and attention (shift invariance of the keys).
"""
from __future__ import annotations

import math

import torch

from bwskc.evidence import Verdict, erasing, gray, injective, no_rule
from bwskc.ir import TensorType, TupleType
from bwskc.leaf import Leaf, random_value
from bwskc.passes.typing.table import rule


def _rows(leaf: Leaf, per_row: int) -> int:
    return leaf.x.numel // max(per_row, 1)


def shift_witness(leaf: Leaf, index: int = 0, scale: float = 1.0):
    """The witness: a random input, and the same with operand ``index`` shifted by 1.5 scale."""
    def witness(g):
        a = leaf.random(g)
        b = list(a)
        b[index] = a[index] + 1.5 * scale
        return a, tuple(b)
    return witness


@rule("aten.layer_norm", "aten.native_layer_norm")
def layer_norm(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["input"] or leaf.x is None:
        return no_rule(leaf.op)
    shape = list(leaf.arg("normalized_shape"))
    d = math.prod(shape)
    eps = leaf.arg("eps", 1e-5)
    rows = _rows(leaf, d)
    per = 1 if eps > 0 else 2
    plain = erasing("shift invariance", "LN(x + c) = LN(x) for any c added to a whole row"
                    + ("" if eps > 0 else "; with eps = 0 also LN(a x) = LN(x)"),
                    shift_witness(leaf), "x and x + 1.5 (every element)", per * rows,
                    "per row: 1 (the mean) with eps > 0; scale is kept, since mean(z^2) = var/(var + eps) "
                    "determines var; 2 with eps = 0")
    if leaf.packet == "aten.native_layer_norm":
        return _with_statistics(leaf, plain, lambda t: t, lambda t: t, "each row's mean and 1/std",
                                per_channel=False)  # weight and bias of the normalised shape
    return plain


def _with_statistics(leaf: Leaf, plain: Verdict, grouped, ungrouped, what: str, stats=lambda t: t,
                     per_channel: bool = True) -> Verdict:
    """A normalisation that also returns the mean and 1/std it used: ``out = (x - mean) rstd w + b``
    per group, so ``x = ((out - b) / w) / rstd + mean``, injective when w has no zero (rstd > 0; with
    eps = 0 a constant group has rstd = 1/0, returned as inf or, on CPU, 0: there x is the mean). ``grouped`` reshapes a tensor of x's
    shape so that the mean and 1/std (reshaped by ``stats``) broadcast against it, ``ungrouped`` reshapes
    it back. The verdict of the
    normalised output alone (``B(getitem(_, 0), op)``, shift invariant) is ``extra["output_only"]``."""
    w, b = leaf.arg("weight"), leaf.arg("bias")
    if w is None and leaf.names.get("weight") is not None:
        v = gray("normalisation with statistics", f"{leaf.packet} also returns {what}, from which the "
                 "input is recovered when the weight has no zero", "the weight has no zero element",
                 "the weight's value", 0)
    elif w is not None and not bool((w != 0).all()):
        v = gray("normalisation with statistics", f"{leaf.packet} also returns {what}, but a zero weight "
                 "hides its features' deviations", "at most one feature per group has a zero weight "
                 "(then the mean recovers it)", "a finer rule for zero weights", None)
    else:
        shape = (1, -1) + (1,) * (len(leaf.x.shape) - 2) if per_channel else None  # w, b: channels

        def inverse(y):
            out, mean, rstd = y[0], y[1], y[2]
            z = out.double()
            if b is not None:
                z = z - (b.double().reshape(shape) if shape else b.double())
            if w is not None:
                z = z / (w.double().reshape(shape) if shape else w.double())
            z, m, r = grouped(z), stats(mean.double()), stats(rstd.double())
            x = torch.where(torch.isinf(r) | (r == 0), m, z / r + m)  # 1/0: inf, or 0 on CPU
            return (ungrouped(x).reshape(leaf.x.shape).to(out.dtype),)
        v = injective("normalisation with statistics", f"{leaf.packet} also returns {what}: out = (x - "
                      "mean) rstd w + b with rstd > 0 and w without zeros, so x = (out - b) / (w rstd) + "
                      "mean", inverse, "x = (out - b) / (w rstd) + mean")
    v.extra["output_only"] = plain
    return v


@rule("aten.group_norm", "aten.native_group_norm")
def group_norm(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["input"] or leaf.x is None:
        return no_rule(leaf.op)
    groups = leaf.arg("num_groups", leaf.arg("group", 1))
    plain = erasing("shift invariance", "GN(x + c) = GN(x) for c constant over a group",
                    shift_witness(leaf), "x and x + 1.5", groups * leaf.x.shape[0],
                    "1 per (example, group)")
    if leaf.packet == "aten.native_group_norm":
        n = leaf.x.shape[0]
        return _with_statistics(leaf, plain, lambda t: t.reshape(n, groups, -1), lambda t: t,
                                "each (example, group)'s mean and 1/std", lambda t: t.reshape(n, groups, 1))
    return plain


@rule("aten.rms_norm")
def rms_norm(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["input"] or leaf.x is None:
        return no_rule(leaf.op)
    d = math.prod(leaf.arg("normalized_shape"))
    eps = leaf.arg("eps")
    eps = float(torch.finfo(leaf.x.torch_dtype).eps) if eps is None else eps
    w = leaf.arg("weight")
    return rms_verdict(leaf.x, d, eps, w, leaf)


def rms_verdict(x_type: TensorType, d: int, eps: float, weight, leaf=None) -> Verdict:
    """x -> x / sqrt(mean(x^2) + eps) (* w): injective iff eps > 0 (and w has no zero)."""
    rows = x_type.numel // max(d, 1)
    if eps <= 0:
        def witness(g):
            a = random_value(x_type, g)
            return (a,), (a * 2,)
        return erasing("scale invariance", "with eps = 0, RMSNorm(a x) = RMSNorm(x) for a > 0", witness,
                       "x and 2x", rows, "1 per row (the scale)")
    if weight is not None and not bool((weight != 0).all()):
        return gray("RMSNorm", "a zero weight erases its feature", "the weight has no zero",
                    "its value", None)

    def inverse(y):
        yd = y.double()
        if weight is not None:
            yd = yd / weight.double()
        s = (yd * yd).sum(-1, keepdim=True)
        u = eps / (1 - s / d)
        return ((yd * torch.sqrt(u)).to(y.dtype),)
    # the inverse divides by 1 - |y|^2/d = eps / (mean(x^2) + eps): well conditioned for |x| ~ sqrt(eps),
    # where its round trip is sampled (at |x| >> sqrt(eps) the map is injective but flat in |x|)
    return injective("RMSNorm, eps > 0", "y = x / sqrt(|x|^2/d + eps) keeps x's direction, and |y| is "
                     "strictly increasing in |x| when eps > 0: |x|^2/d + eps = eps / (1 - |y|^2/d)",
                     inverse, "x = y sqrt(eps / (1 - |y|^2/d))",
                     sample=lambda g: (random_value(x_type, g, math.sqrt(eps)),))


@rule("aten._softmax", "aten.softmax", "aten._log_softmax", "aten.log_softmax")
def softmax(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return no_rule(leaf.op)
    dim = leaf.arg("dim") % len(leaf.x.shape)
    return erasing("shift invariance", f"{leaf.packet}(x + c) = {leaf.packet}(x) for c constant along "
                   "the normalised axis", shift_witness(leaf), "x and x + 1.5",
                   _rows(leaf, leaf.x.shape[dim]), "1 per row")


@rule("aten.scaled_dot_product_attention", "aten._scaled_dot_product_flash_attention_for_cpu",
      "aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_flash_attention")
def attention(leaf: Leaf) -> Verdict:
    names = leaf.hole_args
    if "key" in names:
        index = names.index("key")

        def witness(g):
            a = leaf.random(g)
            b = list(a)
            b[index] = a[index] + 0.75  # the same vector added to every key: q.(k + c) shifts a row
            return a, tuple(b)
        return erasing("shift invariance", "adding one vector c to every key adds q.c to a whole row of "
                       "scores, which softmax ignores", witness, "keys k and k + 0.75", None,
                       "not derived (at least the head size per batch and head: the key shift)")
    return no_rule(leaf.op)


@rule("aten._native_batch_norm_legit_no_training", "aten._native_batch_norm_legit_functional",
      "aten._native_batch_norm_legit", "aten.native_batch_norm", "aten.batch_norm",
      "aten._batch_norm_with_update", "aten._batch_norm_no_update")
def batch_norm(leaf: Leaf) -> Verdict:
    if leaf.hole_args != ["input"] or leaf.x is None:
        return no_rule(leaf.op)
    train = leaf.arg("training", leaf.packet in ("aten._native_batch_norm_legit_functional",
                                                 "aten._batch_norm_with_update"))
    if leaf.op == "aten._native_batch_norm_legit_no_training.default" or \
            leaf.packet == "aten._batch_norm_no_update":
        train = False
    if train:
        c = leaf.x.shape[1]
        plain = erasing("shift invariance", "in training, batch norm uses the batch's statistics: adding "
                        "a constant to one channel across the whole batch changes nothing",
                        shift_witness(leaf), "x and x + 1.5", c, "1 per channel, over the batch")
        if isinstance(leaf.out, TupleType) and len(leaf.out.items) >= 3:  # (out, mean, 1/std, ...)
            return _with_statistics(leaf, plain, lambda t: t.movedim(1, -1), lambda t: t.movedim(-1, 1),
                                    "each channel's batch mean and 1/std")
        return plain
    return _affine_per_channel(leaf, "in eval, batch norm")


@rule("aten.instance_norm")
def instance_norm(leaf: Leaf) -> Verdict:
    """With the input's statistics, each (example, channel) is normalised on its own: adding a constant
    to one instance's map changes nothing (K). With running statistics it is a per-channel affine map,
    injective iff the weight has no zero."""
    if leaf.hole_args != ["input"] or leaf.x is None:
        return no_rule(leaf.op)
    if leaf.arg("use_input_stats", True):
        n, c = leaf.x.shape[0], leaf.x.shape[1]
        return erasing("shift invariance", "instance norm subtracts each (example, channel)'s own mean: "
                       "IN(x + c) = IN(x)", shift_witness(leaf), "x and x + 1.5", n * c,
                       "1 per (example, channel)")
    return _affine_per_channel(leaf, "instance norm with running statistics")


def _affine_per_channel(leaf: Leaf, what: str) -> Verdict:
    """(x - running_mean) / sqrt(running_var + eps) * w + b per channel (dim 1): injective iff no w is
    zero; a zero weight makes its channel's output the bias (K: move that channel)."""
    w, var, eps = leaf.arg("weight"), leaf.arg("running_var"), leaf.arg("eps", 1e-5)
    if (w is None and leaf.names.get("weight") is not None) or var is None:
        return gray("affine", f"{what} is a per-channel affine map: injective iff its weight has no zero",
                    "the weight has no zero", "the weight's value", 0)
    shape = (1, -1) + (1,) * (len(leaf.x.shape) - 2)
    if w is not None and not bool((w != 0).all()):
        zero = (w == 0).reshape(shape)
        count = int((w == 0).sum()) * (leaf.x.numel // leaf.x.shape[1])

        def witness(g):
            a = leaf.random(g)[0]
            return (a,), (torch.where(zero, a + 1, a),)
        return erasing("zero weight", f"{what}: a zero weight makes its channel's output the bias, "
                       "whatever the input", witness, "x and x + 1 on the zero-weight channels", count,
                       "the elements of the zero-weight channels")

    def inverse(y):
        out = y[0] if isinstance(y, tuple) else y
        mean, b = leaf.arg("running_mean"), leaf.arg("bias")
        scale = torch.rsqrt(var.double() + eps) * (w.double() if w is not None else 1)
        x = (out.double() - (b.double().reshape(shape) if b is not None else 0)) / scale.reshape(shape)
        return ((x + (mean.double().reshape(shape) if mean is not None else 0)).to(out.dtype),)
    return injective("affine", f"{what} is (x - mean) / sqrt(var + eps) * w + b per channel, injective "
                     "with w nonzero", inverse, "undo the per-channel affine map")
