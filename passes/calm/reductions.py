"""Reductions over the partitioned dim are all-reduce (sum, mean, amax, var, norm...); ops along one dim
are free unless it is the partitioned one: softmax all-reduce, cumsum scan, sort/topk all-gather."""
from __future__ import annotations

from bwskc.passes.calm.context import Ctx, norm_dim, norm_dims
from bwskc.passes.calm.letters import by_letters, tuple_out
from bwskc.passes.calm.plan import Plan
from bwskc.passes.calm.table import rule, single

REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "prod", "any", "all",
          "var", "std", "var_mean", "std_mean", "logsumexp", "linalg_vector_norm", "norm",
          "count_nonzero", "nansum", "nanmean", "aminmax"}
ALONG = {
    "softmax": ("all-reduce", "normalizes over"), "_softmax": ("all-reduce", "normalizes over"),
    "log_softmax": ("all-reduce", "normalizes over"), "_log_softmax": ("all-reduce", "normalizes over"),
    "cumsum": ("scan", "accumulates along"), "cumprod": ("scan", "accumulates along"),
    "cummax": ("scan", "accumulates along"), "cummin": ("scan", "accumulates along"),
    "logcumsumexp": ("scan", "accumulates along"),
}
SORTS = {"sort", "argsort", "topk", "kthvalue", "median", "nanmedian", "mode", "msort"}


@rule(*REDUCE)
@single
def rule_reduce(ctx: Ctx, collective="all-reduce", verb="reduces over") -> Plan:
    x = 0
    r = len(ctx.shape(x))
    name = ctx.op.split(".")[1]
    dims = ctx.val("dim", None)
    if ctx.op.endswith(".default") and name in ("sum", "mean", "max", "min", "prod", "any", "all",
                                                  "amax", "amin", "nansum", "count_nonzero") \
            and "dim" not in ctx.names:
        dims = None
    if name in ("amax", "amin") and dims in ([], ()):
        dims = None
    red = norm_dims(dims, r)
    keep = bool(ctx.val("keepdim", False))
    xl = tuple(k if k not in red else ("r", k) for k in range(r))
    ol = tuple(None if k in red else k for k in range(r)) if keep else \
        tuple(k for k in range(r) if k not in red)
    p = ctx.part(x)
    special = {}
    if p is not None and p.dim in red:
        special[("r", p.dim)] = (collective, (f"{name} {verb} dim {p.dim}, which {ctx.axis} "
                                 "partitions"), False)
    return by_letters(ctx, {x: xl}, tuple_out(ctx, ol), special=special)


def rule_along(ctx: Ctx, collective, verb, stays=True) -> Plan:
    """An op along one dim (softmax, cumsum, sort): free unless that dim is the partitioned one."""
    x = 0
    r = len(ctx.shape(x))
    dim = norm_dim(ctx.val("dim", -1), r)
    p = ctx.part(x)
    letters = tuple(range(r))
    special = {}
    if p is not None and p.dim == dim:
        special[dim] = (collective, f"{ctx.short} {verb} dim {dim}, which {ctx.axis} partitions",
                        stays)
    out = tuple_out(ctx, letters)
    if isinstance(out, list):
        out = [o if o is not None and len(o) == r else None for o in out]
    return by_letters(ctx, {x: letters}, out, special=special)


@rule(*ALONG)
@single
def rule_along_table(ctx: Ctx) -> Plan:
    """softmax and log_softmax normalize, cumsum and friends accumulate along their dim."""
    collective, verb = ALONG[ctx.short]
    return rule_along(ctx, collective, verb)


@rule(*SORTS)
@single
def rule_sort(ctx: Ctx) -> Plan:
    return rule_along(ctx, "all-gather", "orders along", stays=False)
