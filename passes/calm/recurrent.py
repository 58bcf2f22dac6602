"""LSTM/GRU/RNN (``.input`` overloads): a recurrence along the time dim is a scan; batch is free."""
from __future__ import annotations

from bwskc.passes.calm.context import Ctx
from bwskc.passes.calm.letters import by_letters, contract_reason
from bwskc.passes.calm.plan import Plan
from bwskc.passes.calm.table import rule


@rule("lstm", "gru", "rnn_tanh", "rnn_relu", overload="input")
def rule_rnn(ctx: Ctx) -> Plan:
    """aten.lstm/gru/rnn_tanh/rnn_relu .input: a recurrence along the time dim."""
    x = ctx.si("input")
    rx = len(ctx.shape(x))
    batch_first = bool(ctx.val("batch_first", False))
    if rx == 3:
        xl = ("n", "t", "f") if batch_first else ("t", "n", "f")
        hl = (None, "n", "h")
    else:
        xl, hl = ("t", "f"), (None, "h")
    letters = {x: xl}
    for i in ctx.sis("hx") or [ctx.si("hx")]:
        if i is not None:
            letters[i] = hl
    ol = tuple("o" if L == "f" else L for L in xl)
    hy = tuple(None if L == "h" else L for L in hl)
    special = {"t": ("scan", (f"{ctx.short} carries its state along the time dim, which {ctx.axis} "
                     "partitions: each shard needs the previous one's final state"), True)}
    out = [ol] + [hy for _ in ctx.out_type.items[1:]]
    return by_letters(ctx, letters, out, special=special, contract=contract_reason(ctx))
