"""Leaf rule for dropout (native_dropout, dropout, feature and alpha dropout): K for the mask drawn in
training, the identity in eval or with p = 0.
"""
from __future__ import annotations

import torch

from bwskc.evidence import Verdict, erasing, injective, no_rule
from bwskc.ir import TensorType
from bwskc.leaf import Leaf
from bwskc.passes.typing.movement import constant_of
from bwskc.passes.typing.table import rule


@rule("aten.native_dropout", "aten.dropout", "aten.feature_dropout", "aten.alpha_dropout")
def dropout(leaf: Leaf) -> Verdict:
    if leaf.x is None:
        return no_rule(leaf.op)
    p, train = leaf.arg("p"), leaf.arg("train")
    if not train or p == 0:
        v = injective("identity", f"dropout with p = {p} in {'training' if train else 'eval'} mode is "
                      "the identity", lambda y: ((y[0] if isinstance(y, tuple) else y),), "identity",
                      surjective=isinstance(leaf.out, TensorType))  # native_dropout: (x, all-True mask)
        return v
    if p >= 1:
        return constant_of(leaf)

    def seeded(g, tries=1000):
        """(a, b, seed): under torch.manual_seed(seed) the mask drops at least one element, and b is a
        plus 1 on the dropped elements. Dropped elements are those whose output does not move when
        the input does (dropout, feature and alpha dropout alike). The last global seed set is the
        one returned (a caller replays it)."""
        a = leaf.random(g)[0]
        with torch.random.fork_rng(devices=[]):
            for _ in range(tries):
                seed = int(torch.randint(0, 2 ** 31, (1,), generator=g))
                outs = []
                for x in (a, a + 1):
                    torch.manual_seed(seed)
                    y = leaf.call(x)
                    outs.append(y[0] if isinstance(y, tuple) else y)
                dropped = outs[0] == outs[1]
                if bool(dropped.any()):
                    torch.manual_seed(seed)
                    return (a,), (torch.where(dropped, a + 1, a),), seed
        raise ValueError(f"no element dropped in {tries} draws of the mask")

    def witness(g):
        return seeded(g)[:2]
    v = erasing("dropout", f"dropout with p = {p} in training zeroes each element with probability p: "
                "a dropped element is erased (for the mask drawn, replayed by seed)", witness,
                "x and x + 1 on the dropped elements (same seed, drawn until the mask drops one)", None,
                f"data-dependent: p n = {p * leaf.x.numel:g} expected")
    v.extra["seeded_witness"] = seeded
    v.extra["replay_seed"] = True
    return v
