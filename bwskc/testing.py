"""Test and benchmark fixtures: the model zoo (tiny Hugging Face configurations with random weights) and
the smallest model with a shared value (``Block``).

Random-weight configurations only: building a zoo model reads no checkpoint and downloads nothing
(``transformers`` builds it from its config class, offline). Every model is built right after
``torch.manual_seed(0)``, so its weights do not depend on what ran before it. The test suite wraps these
in pytest fixtures (``tests/conftest.py``: a session-wide ``zoo``); the benchmarks (``benchmarks/``)
import this module directly, without touching ``sys.path``.

* ``ZOO_SPECS``, ``ZOO_NAMES``: name -> (model class, config class, config kwargs), in zoo order;
* ``build_zoo_model(name)``: a fresh model in eval mode; ``lower_zoo_model(name)``: it, exported and
  lowered, as a ``ZooEntry``; ``Zoo``: lazily built, cached entries;
* ``Block``: ``x + fc(ln(x))``, then ``h * sigmoid(h)`` (S, definitions and parameters in one model).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.utils._pytree as pytree

__all__ = ["ZOO_SPECS", "ZOO_NAMES", "build_zoo_model", "ZooEntry", "lower_zoo_model", "Zoo", "Block"]

# name -> (model class, config class, config kwargs); two layers, hidden size 32 (or the model's
# smallest sensible equivalent), so the ten lower and run in seconds.
ZOO_SPECS: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Config",
             dict(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                  bos_token_id=0, eos_token_id=0)),
    "pythia": ("GPTNeoXForCausalLM", "GPTNeoXConfig",
               dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                    vocab_size=100, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)),
    "bert": ("BertForMaskedLM", "BertConfig",
             dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                  vocab_size=100, max_position_embeddings=64)),
    "opt": ("OPTForCausalLM", "OPTConfig",
            dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, ffn_dim=64, vocab_size=100,
                 max_position_embeddings=64, word_embed_proj_dim=32)),
    "llama": ("LlamaForCausalLM", "LlamaConfig",
              dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                   intermediate_size=64, vocab_size=100, max_position_embeddings=64)),
    "t5": ("T5ForConditionalGeneration", "T5Config",
           dict(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=16, num_heads=2, d_ff=64,
                vocab_size=100)),
    "switch": ("SwitchTransformersForConditionalGeneration", "SwitchTransformersConfig",
               dict(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=16, num_heads=2, d_ff=64,
                    vocab_size=100, num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1)),
    "vit": ("ViTForImageClassification", "ViTConfig",
            dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                 image_size=16, patch_size=4, num_labels=3)),
    "mamba": ("MambaForCausalLM", "MambaConfig",
              dict(num_hidden_layers=2, hidden_size=32, state_size=4, vocab_size=100, expand=2,
                   conv_kernel=4)),
    "resnet": ("ResNetForImageClassification", "ResNetConfig",
               dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)),
}
ZOO_NAMES = list(ZOO_SPECS)


def build_zoo_model(name: str) -> torch.nn.Module:
    """A fresh tiny model with random weights drawn after ``torch.manual_seed(0)``, in eval mode."""
    import transformers
    model_cls, config_cls, kwargs = ZOO_SPECS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(config).eval()


@dataclass
class ZooEntry:
    """One zoo model with its example inputs, its export and its lowering."""

    name: str
    model: torch.nn.Module
    args: tuple  # example positional inputs (from default_inputs)
    kwargs: dict  # example tensor keyword inputs (from default_inputs)
    loaded: object  # bwskc.frontend.LoadedModel; loaded.kwargs adds use_cache=False etc.
    program: object  # bwskc.Program
    _eager: list | None = field(default=None, repr=False)

    def eager_outputs(self) -> list[torch.Tensor]:
        """The model's eager outputs (with the kwargs it was exported with), tensors flattened in order."""
        if self._eager is None:
            with torch.no_grad():
                out = self.model(*self.args, **self.loaded.kwargs)
            self._eager = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return self._eager

    def positional_inputs(self) -> list[torch.Tensor]:
        """All example inputs, in the program's entry order (what ``program.to_fx()`` takes)."""
        names = self.program.entry.input_names
        values = dict(zip(names, self.args))
        values.update(self.kwargs)
        assert set(values) == set(names), (sorted(values), names)
        return [values[n] for n in names]


def lower_zoo_model(name: str) -> ZooEntry:
    """A fresh zoo model with its default example inputs, exported (non-strict) and lowered."""
    from bwskc.frontend import default_inputs, export_module
    from bwskc.lowering import lower_exported
    model = build_zoo_model(name)
    args, kwargs = default_inputs(model)
    loaded = export_module(model, args, kwargs)
    program = lower_exported(loaded.exported, loaded.name)
    return ZooEntry(name, model, args, kwargs, loaded, program)


class Zoo:
    """Lazily built, cached zoo entries; ``zoo[name]`` re-raises a model's lowering error every time."""

    def __init__(self):
        self._entries: dict[str, ZooEntry | BaseException] = {}

    def __getitem__(self, name: str) -> ZooEntry:
        if name not in self._entries:
            try:
                self._entries[name] = lower_zoo_model(name)
            except Exception as exc:  # cache the failure: every test of this model reports it
                self._entries[name] = exc
        entry = self._entries[name]
        if isinstance(entry, BaseException):
            raise entry
        return entry


class Block(nn.Module):
    """A residual block with a shared value: x + fc(ln(x)), then h * sigmoid(h). Used by the core and
    error-path tests as the smallest model that exercises S, definitions and parameters."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = x + self.fc(self.ln(x))
        return h * torch.sigmoid(h)
