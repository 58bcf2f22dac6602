"""The zoo from tiny configs (random weights): lowers, round-trips through text, evaluates equal to eager
(float32, relative error <= 1e-5) through the interpreter and the fx codegen."""
import pytest
import torch
import torch.utils._pytree as pytree
import transformers as T

import bwskc
from bwskc.frontend import default_inputs, export_module
from bwskc.lowering import lower_exported

ZOO = {
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100,
                                                   n_positions=64, bos_token_id=0, eos_token_id=0)),
    "pythia": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=64, bos_token_id=0, eos_token_id=0)),
    "bert": lambda: T.BertForMaskedLM(T.BertConfig(num_hidden_layers=2, hidden_size=32,
                                                   num_attention_heads=2, intermediate_size=64,
                                                   vocab_size=100, max_position_embeddings=64)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                                ffn_dim=64, vocab_size=100, max_position_embeddings=64,
                                                word_embed_proj_dim=32)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=2, hidden_size=32,
                                                      num_attention_heads=2, num_key_value_heads=1,
                                                      intermediate_size=64, vocab_size=100,
                                                      max_position_embeddings=64)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(num_layers=2, num_decoder_layers=2, d_model=32,
                                                          d_kv=16, num_heads=2, d_ff=64, vocab_size=100)),
    "switch": lambda: T.SwitchTransformersForConditionalGeneration(T.SwitchTransformersConfig(
        num_layers=2, num_decoder_layers=2, d_model=32, d_kv=16, num_heads=2, d_ff=64, vocab_size=100,
        num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1)),
    "vit": lambda: T.ViTForImageClassification(T.ViTConfig(num_hidden_layers=2, hidden_size=32,
                                                           num_attention_heads=2, intermediate_size=64,
                                                           image_size=16, patch_size=4, num_labels=3)),
    "mamba": lambda: T.MambaForCausalLM(T.MambaConfig(num_hidden_layers=2, hidden_size=32, state_size=4,
                                                      vocab_size=100, expand=2, conv_kernel=4)),
    "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                                    depths=[1, 1], num_labels=3)),
}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_lowers_round_trips_and_matches_eager(name):
    torch.manual_seed(0)
    model = ZOO[name]().eval()
    args, kwargs = default_inputs(model)
    loaded = export_module(model, args, kwargs)
    program = lower_exported(loaded.exported, loaded.name)
    text = program.text()
    assert bwskc.parse(text) == program and bwskc.parse(text).text() == text
    with torch.no_grad():
        want = [t for t in pytree.tree_leaves(model(*args, **loaded.kwargs)) if isinstance(t, torch.Tensor)]
        got = program(*args, **kwargs)
        got = got if isinstance(got, tuple) else (got,)
        fx = program.to_fx()(*args, *kwargs.values())
        fx = fx if isinstance(fx, tuple) else (fx,)
    assert len(got) == len(want) == len(fx)
    for g, f, w in zip(got, fx, want):
        assert g.shape == w.shape and _rel(g, w) <= 1e-5 and _rel(f, w) <= 1e-5
    # parameters by state-dict key, definitions by module path
    keys = set(model.state_dict()) | {n for n, _ in model.named_buffers()}
    assert set(program.tensors) <= keys
    modules = dict(model.named_modules())
    assert all(d.module in modules for d in program.defs.values())


def test_meta_lowering_of_a_1b_config_materialises_no_weights(tmp_path):
    import json
    cfg = T.GPTNeoXConfig(hidden_size=2048, intermediate_size=8192, num_attention_heads=8,
                          num_hidden_layers=16, vocab_size=50304, rotary_pct=0.25)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    from bwskc.frontend import load_model
    loaded = load_model(str(tmp_path / "config.json"), meta=True)
    program = lower_exported(loaded.exported, loaded.name)
    assert all(w.device.type == "meta" for w in program.weights.values())
    n = sum(d.type.numel for d in program.tensors.values() if d.kind == "param")
    assert n > 900_000_000
    assert len([d for d in program.defs if d.startswith("gpt_neox.layers.") and d.count(".") == 2]) == 16


def test_exported_program_file_lowers(tmp_path):
    from bwskc.frontend import load_model
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    loaded = load_model(str(tmp_path / "m.pt2"))
    program = lower_exported(loaded.exported, loaded.name)
    assert "`0`" in program.text() or "`0.weight`" in program.text()
    torch.testing.assert_close(program.with_weights(model.state_dict())(x), model(x))
