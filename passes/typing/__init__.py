"""S/K typing (the ``typing`` pass), one rule family a file.

Leaf rules (each registers itself in ``table.RULES`` with ``@rule``; importing this package loads them all):

======================  ==================================================================================
``table``               ``RULES``, the ``rule`` decorator, ``type_leaf``, shared helpers
``movement``            view/reshape, permute/transpose, expand, clone/identity, slice/index/gather/cat/pad
                        (selection), zeros_like/full_like, sort, topk
``elementwise``         tanh/exp/... (monotone), elu/selu/celu, log_sigmoid, leaky_relu, softplus, relu/clamp,
                        gelu/silu/mish (folds), abs/cos/floor (even, step), sqrt/log (domain)
``arithmetic``          add/sub/rsub, mul/div, pow
``comparison``          le/lt/eq/..., isnan, and/or, where, masked_fill
``conversion``          _to_copy/to/type_as (dtype conversions)
``rank``                rank certificates of linear maps (null vectors, SVD, exact elimination)
``linear``              linear, addmm, mm/matmul/bmm, einsum, embedding, one_hot, cumsum
``convolution``         convolution, conv1d/2d/3d
``normalisation``       layer/group/rms/batch/instance norm, softmax, attention
``reduction``           mean/sum/prod/var/std/amax/max/argmax/logsumexp/norms
``pooling``             max pool, average pool
``dropout``             dropout, native_dropout
``losses``              mse/l1/huber, cross_entropy, nll_loss, bce/kl_div
======================  ==================================================================================

The pass and composite verdicts: ``typing_pass`` (``TypingPass``, ``TypingResult``), ``composite``
(combinator rules), ``symbolic`` (a GRAY unary composite decided from its expression DAG, with its
evidence checked on the term), ``dag`` (the DAG), and its families ``dag_movement``, ``dag_symmetry``,
``dag_monotone``, ``dag_linear``. Proofs and evidence: docs/typing.md.
"""
from __future__ import annotations

from bwskc.passes.typing import (  # noqa: F401  (every leaf rule family registers itself on import)
    arithmetic,
    comparison,
    conversion,
    convolution,
    dropout,
    elementwise,
    linear,
    losses,
    movement,
    normalisation,
    pooling,
    rank,
    reduction,
)
from bwskc.passes.typing.composite import composite
from bwskc.passes.typing.table import RULES, rule, type_leaf
from bwskc.passes.typing.typing_pass import PASS, TypingPass, TypingResult

__all__ = ["PASS", "RULES", "TypingPass", "TypingResult", "composite", "rule", "type_leaf"]
