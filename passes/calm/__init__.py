"""CALM coordination analysis: for every leaf site and partition axis (``batch``, ``sequence``, or
``--axes``), is the leaf coordination-free on shards of its inputs, ``f(cat(a, b)) == cat(f(a), f(b))``,
or a barrier naming the collective it needs? docs/ARCHITECTURE.md (CALM) explains the analysis.

Rule families, one file each (imported here, so the rule table is complete):
    elementwise.py    pointwise-tagged ops, copies, random ops, new_*, prelu, glu
    movement.py       view/reshape, permute, expand, repeat, select, slice, split, cat, stack, flip, pad
    reductions.py     sum, mean, amax, var, norm..., softmax, cumsum, sort/topk
    normalisation.py  layer/RMS/group/batch norm
    linear.py         linear, mm, bmm, addmm, matmul, einsum
    attention.py      scaled_dot_product_attention          recurrent.py  lstm, gru, rnn
    indexing.py       embedding, one_hot, gather, index_select, index
    convolution.py    conv, pool, unfold, upsample
Machinery: engine.py (the abstract run, rule lookup), table.py (RULES, FALLBACKS, @rule, @fallback),
letters.py (the generic letter rule), context.py (AVal, Ctx), plan.py (Part, Plan, CalmResult, shard),
axes.py (--axes), flops.py (FLOP estimates), calm_pass.py (the pass).
"""
from bwskc.passes.calm import (  # noqa: F401 - each family registers its rules on import
    attention,
    convolution,
    elementwise,
    indexing,
    linear,
    movement,
    normalisation,
    recurrent,
    reductions,
)
from bwskc.passes.calm.axes import DEFAULT_AXES, default_axes, parse_axes
from bwskc.passes.calm.calm_pass import PASS, CalmPass
from bwskc.passes.calm.context import AVal, Ctx, slot_positions
from bwskc.passes.calm.engine import MAX_PLANS, Analysis, analyze, find_rule, plan_of
from bwskc.passes.calm.flops import estimate_flops, site_slot_types
from bwskc.passes.calm.movement import reshape_part
from bwskc.passes.calm.plan import (
    COLLECTIVES,
    CalmResult,
    Part,
    Plan,
    local_literals,
    local_shape,
    shard,
    unshard,
)
from bwskc.passes.calm.table import FALLBACKS, RULES, fallback, rule

__all__ = [
    "COLLECTIVES", "DEFAULT_AXES", "FALLBACKS", "MAX_PLANS", "PASS", "RULES", "AVal", "Analysis",
    "CalmPass", "CalmResult", "Ctx", "Part", "Plan", "analyze", "default_axes", "estimate_flops",
    "fallback", "find_rule", "local_literals", "local_shape", "parse_axes", "plan_of", "reshape_part",
    "rule", "shard", "site_slot_types", "slot_positions", "unshard",
]
