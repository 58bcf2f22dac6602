"""scaled_dot_product_attention: free along batch and head dims and along the queries alone, all-gather
over the key/value positions, all-reduce over the head dim, position-offset for ``is_causal``."""
from __future__ import annotations

from bwskc.passes.calm.context import Ctx
from bwskc.passes.calm.letters import by_letters, right_aligned
from bwskc.passes.calm.plan import Plan
from bwskc.passes.calm.table import rule

from bwskc.ir import TensorType, TupleType


@rule("scaled_dot_product_attention")
def rule_sdpa(ctx: Ctx) -> Plan:
    q, k, v, m = ctx.si("query"), ctx.si("key"), ctx.si("value"), ctx.si("attn_mask")
    out_shape = ctx.out_type.shape if isinstance(ctx.out_type, TensorType) else \
        ctx.out_type.items[0].shape
    nb = len(out_shape) - 2
    bl = tuple(("b", j) for j in range(nb))
    letters = {q: bl + ("L", "E")}
    for i, last in ((k, ("S", "E")), (v, ("S", "Ev"))):
        letters[i] = right_aligned(ctx.shape(i)[:-2], bl, out_shape[:nb]) + last
    if m is not None:
        target = out_shape[:-1] + (ctx.shape(k)[-2],)
        letters[m] = right_aligned(ctx.shape(m), bl + ("L", "S"), target)
    special = {"S": ("all-gather", (f"attention over the key/value positions, which {ctx.axis} "
                     "partitions: every query needs every key and value"), False),
               "E": ("all-reduce", (f"attention scores contract over the head dim, which {ctx.axis} "
                     "partitions"), False)}
    if ctx.val("is_causal", False):
        special["L"] = ("position-offset", (f"is_causal masks by the global query position, which "
                        f"{ctx.axis} partitions"), True)
    out = bl + ("L", "Ev")
    if isinstance(ctx.out_type, TupleType):
        out = [out] + [None for _ in ctx.out_type.items[1:]]
    return by_letters(ctx, letters, out, special=special,
                      random=bool(ctx.val("dropout_p", 0.0)))
