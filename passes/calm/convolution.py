"""Windows: conv, pool, unfold and interpolation along the partitioned dim are halo-exchange (1x1
windows and integer nearest upsampling are free, adaptive pooling to 1 is all-reduce)."""
from __future__ import annotations

import re

from bwskc.passes.calm.context import Ctx, norm_dim
from bwskc.passes.calm.letters import by_letters, contract_reason, tuple_out
from bwskc.passes.calm.plan import Part, Plan
from bwskc.passes.calm.table import fallback, rule, single

from bwskc.ir import TupleType

CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
        "conv_transpose2d", "conv_transpose3d"}
POOL = {"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
        "max_pool2d_with_indices", "max_pool3d_with_indices", "adaptive_avg_pool1d",
        "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"}


def conv_geometry(ctx: Ctx):
    name = ctx.op.split(".")[1]
    w = ctx.si("weight")
    nsp = len(ctx.shape(w)) - 2

    def tup(v, default):
        if v is None:
            v = default
        if isinstance(v, int):
            return [v] * nsp
        v = list(v)
        return v * nsp if len(v) == 1 else v
    transposed = name.startswith("conv_transpose") or bool(ctx.val("transposed", False))
    stride = tup(ctx.val("stride"), 1)
    dilation = tup(ctx.val("dilation"), 1)
    ksize = list(ctx.shape(w)[2:])
    pad = ctx.val("padding", 0)
    if isinstance(pad, str):
        pad = [0] * nsp if pad == "valid" else [d * (k - 1) // 2 for d, k in zip(dilation, ksize)]
        pad = [p if k == 1 else max(p, 1) for p, k in zip(pad, ksize)]
    else:
        pad = tup(pad, 0)
    outpad = tup(ctx.val("output_padding"), 0)
    return nsp, transposed, stride, pad, ksize, outpad, int(ctx.val("groups", 1) or 1)


@rule(*CONV)
def rule_conv(ctx: Ctx) -> Plan:
    x, w, b = ctx.si("input"), ctx.si("weight"), ctx.si("bias")
    nsp, transposed, stride, pad, ksize, outpad, groups = conv_geometry(ctx)
    rx = len(ctx.shape(x))
    batched = rx == nsp + 2
    sl = tuple(("s", k) for k in range(nsp))
    cin = ctx.shape(x)[1 if batched else 0]
    cout = ctx.out_type.shape[1 if batched else 0]
    depthwise = not transposed and groups > 1 and groups == cin == cout
    ci, co = ("c", "c") if depthwise else ("ci", "co")
    xl = (("n",) if batched else ()) + (ci,) + sl
    ol = (("n",) if batched else ()) + (co,) + sl
    if transposed:
        wl = (ci, co if groups == 1 else None) + (None,) * nsp
    else:
        wl = (co, ci if groups == 1 else None) + (None,) * nsp
    letters = {x: xl, w: wl}
    if b is not None:
        letters[b] = (co,)
    special = {}
    for k in range(nsp):
        if not (ksize[k] == 1 and stride[k] == 1 and pad[k] == 0 and outpad[k] == 0):
            special[sl[k]] = ("halo-exchange", (f"{ctx.short} kernel {ksize[k]} stride {stride[k]} "
                              f"padding {pad[k]} along dim {k + rx - nsp}, which {ctx.axis} "
                              "partitions, reads neighbouring shards"), True)
    if groups > 1 and not depthwise:
        special[ci] = ("all-gather", (f"grouped {ctx.short} over the channel dim {ctx.axis} "
                       "partitions"), False)
    return by_letters(ctx, letters, ol, special=special, contract=contract_reason(ctx))


@rule(*POOL)
@single
def rule_pool(ctx: Ctx) -> Plan:
    name = ctx.op.split(".")[1]
    nsp = int(re.search(r"(\d)d", name).group(1))
    x = 0
    xs = ctx.shape(x)
    rx = len(xs)
    lead = rx - nsp
    sl = tuple(("s", k) for k in range(nsp))
    xl = tuple(range(lead)) + sl
    out_shape = ctx.out_type.items[0].shape if isinstance(ctx.out_type, TupleType) else \
        ctx.out_type.shape
    special = {}
    adaptive = "adaptive" in name

    def tup(v, default):
        if v is None or (isinstance(v, (list, tuple)) and not v):
            v = default
        if isinstance(v, int):
            return [v] * nsp
        v = list(v)
        return v * nsp if len(v) == 1 else v
    if not adaptive:
        ks = tup(ctx.val("kernel_size"), 1)
        st = tup(ctx.val("stride"), ks)
        pd = tup(ctx.val("padding"), 0)
    for k in range(nsp):
        d = lead + k
        if adaptive:
            if out_shape[d] == xs[d]:
                continue
            if out_shape[d] == 1:
                special[sl[k]] = ("all-reduce", (f"{name} pools over all of dim {d}, which "
                                  f"{ctx.axis} partitions"), False)
                continue
        elif ks[k] == 1 and st[k] == 1 and pd[k] == 0:
            continue
        special[sl[k]] = ("halo-exchange", (f"{name} window along dim {d}, which {ctx.axis} "
                          "partitions, reads neighbouring shards"), True)
    return by_letters(ctx, {x: xl}, tuple_out(ctx, xl), special=special)


@rule("unfold")
@single
def rule_unfold(ctx: Ctx) -> Plan:
    p = ctx.part(0)
    r = len(ctx.shape(0))
    dim = norm_dim(ctx.val("dimension"), r)
    if dim == p.dim:
        return ctx.barrier("halo-exchange", f"unfold windows along dim {dim}, which {ctx.axis} "
                           "partitions, straddle shards")
    return ctx.free(p)


def named_upsample(ctx: Ctx) -> bool:
    """``upsample_*`` and ``_upsample_*``: one rule for every interpolation mode and rank."""
    return ctx.short.startswith(("upsample_", "_upsample_"))


@fallback(named_upsample)
@single
def rule_upsample(ctx: Ctx) -> Plan:
    name = ctx.op.split(".")[1]
    nsp = int(re.search(r"(\d)d", name).group(1))
    p = ctx.part(0)
    xs, os_ = ctx.shape(0), ctx.out_type.shape
    d = p.dim
    if d < len(xs) - nsp:
        return ctx.free(p)
    if "nearest" in name and os_[d] % xs[d] == 0:
        # nearest with an integer ratio repeats every element: the factor stays, each element wider
        return ctx.free(Part(d, p.outer, p.inner * (os_[d] // xs[d])))
    return ctx.barrier("halo-exchange", f"{name} interpolates along dim {d}, which {ctx.axis} "
                       "partitions, from neighbouring shards", out=p if os_[d] == xs[d] else None)
