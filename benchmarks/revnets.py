"""revlib and memcnn on the same GPT-2 blocks, for ``benchmarks/memory.py``'s comparison.

Both libraries build RevNet couplings from two modules per block, ``y1 = x1 + F(x2)``,
``y2 = x2 + G(y1)``, the architecture bwskc's reversible rewrite produces. Here F is the block's
``attn(ln_1(.))`` and G its ``mlp(ln_2(.))``, with the Hugging Face model's own modules and weights: the
same blocks, the same coupling, only the runtime differs. The input is duplicated into both streams
(as bwskc does) by concatenating it with itself along the features (neither library takes one stream
twice: revlib's ``split_dim=None`` does not concatenate its output back), and the two output streams are
averaged before the final norm and head (bwskc merges as ``a + b - x``; the merge is a few elementwise
operations and does not change memory or time measurably).

Dropout replays through each library's own mechanism (saving and restoring the global generator's
state), so training mode is kept. Neither library is a dependency: ``pip install -c constraints.txt
-e '.[bench]'`` adds revlib, and ``pip install --no-deps -c constraints.txt memcnn`` memcnn (its declared
dependencies, torchvision and SimpleITK among them, are not needed for its couplings, and an unpinned
torchvision would pull another torch).
"""
from __future__ import annotations

import torch
from torch import nn


def available() -> list[str]:
    out = []
    for name in ("revlib", "memcnn"):
        try:
            __import__(name)
            out.append(name)
        except ImportError:
            pass
    return out


class _Half(nn.Module):
    """One coupling branch: a block's sublayer after its norm (the tuple an attention returns is cut)."""

    def __init__(self, norm: nn.Module, body: nn.Module):
        super().__init__()
        self.norm, self.body = norm, body

    def forward(self, x):
        out = self.body(self.norm(x))
        return out[0] if isinstance(out, tuple) else out




class RevGPT2(nn.Module):
    """A GPT-2 LM head model's embeddings, blocks (as couplings run by ``library``) and head."""

    takes_ids_only = True  # called with the token ids alone

    def __init__(self, hf_model: nn.Module, library: str):
        super().__init__()
        t = hf_model.transformer
        self.wte, self.wpe, self.drop, self.ln_f = t.wte, t.wpe, t.drop, t.ln_f
        self.lm_head = hf_model.lm_head
        halves = []
        for block in t.h:
            halves += [_Half(block.ln_1, block.attn), _Half(block.ln_2, block.mlp)]
        if library == "revlib":
            import revlib
            self.body = revlib.ReversibleSequential(*halves, split_dim=-1)
        elif library == "memcnn":
            import memcnn
            self.body = nn.Sequential(*[
                memcnn.InvertibleModuleWrapper(
                    memcnn.AdditiveCoupling(halves[i], halves[i + 1], split_dim=-1),
                    keep_input=False, keep_input_inverse=False, preserve_rng_state=True)
                for i in range(0, len(halves), 2)])
        else:
            raise ValueError(f"unknown library {library!r}")

    def forward(self, input_ids):
        pos = torch.arange(input_ids.shape[-1], device=input_ids.device)
        h = self.drop(self.wte(input_ids) + self.wpe(pos))
        y = self.body(torch.cat([h, h], dim=-1))
        a, b = y.chunk(2, dim=-1)
        return self.lm_head(self.ln_f((a + b) * 0.5))
