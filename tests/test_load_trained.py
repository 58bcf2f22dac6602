"""``bwskc.train.pretrained``: a trained variant directory loaded back at any shape, as its HF class.

Variant directories are built here the way ``bwskc train`` writes them (``save_pretrained`` plus
``bwskc.json``) from tiny random models. Every padded, bucketed output is checked against an un-padded
run at the caller's exact shape: the model class itself for a conventional variant, ``bwskc.compile``
at that shape for a reversible one. Models are loaded once per module (each bucket compiles once).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bwskc
from bwskc.errors import BwskError
from bwskc.train import pretrained, tasks

warnings.filterwarnings("ignore", category=FutureWarning)
TOL = dict(rtol=1e-4, atol=1e-5)
MAX_POS = 32


def _configs():
    import transformers
    return {
        "gpt2": transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=MAX_POS,
                                        bos_token_id=1, eos_token_id=2),
        "neox": transformers.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                                           intermediate_size=64, vocab_size=64, max_position_embeddings=MAX_POS,
                                           bos_token_id=0, eos_token_id=0),
        "t5": transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
        "switch": transformers.SwitchTransformersConfig(
            vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_sparse_encoder_layers=1,
            num_decoder_layers=2, num_sparse_decoder_layers=1, num_heads=4, num_experts=4, expert_capacity=4,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
        "bert": transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=MAX_POS),
        "vit": transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64, num_labels=3),
    }


class Zoo:
    """Per model name: the HF model (the weights' source), its task, and variant dirs by mode."""

    def __init__(self, root):
        self.root, self.configs = root, _configs()
        self.models, self.dirs, self.loaded = {}, {}, {}

    def model(self, name):
        if name not in self.models:
            config = self.configs[name]
            task = tasks.detect_task(config)
            cls = tasks.auto_class(task)._model_mapping[type(config)]
            torch.manual_seed(0)
            model = cls._from_config(config, **tasks.model_kwargs(cls)).eval()
            model.config.use_cache = False
            self.models[name] = (model, task)
        return self.models[name]

    def dir(self, name, mode):
        if (name, mode) not in self.dirs:
            model, task = self.model(name)
            path = self.root / f"scratch-{name}-{mode}"
            model.save_pretrained(str(path))
            (path / "bwskc.json").write_text(json.dumps(
                {"mode": mode, "experiment": "scratch", "batch_size": 2, "seq_len": 16, "seed": 0,
                 "model": name, "task": task}))
            if mode == "reversible":
                pretrained.write_remote_code(path, task)
            self.dirs[name, mode] = path
        return self.dirs[name, mode]

    def load(self, name, mode):
        if (name, mode) not in self.loaded:
            self.loaded[name, mode] = pretrained.load_trained(self.dir(name, mode))
        return self.loaded[name, mode]

    def reference(self, name, mode, batch: dict, **extra):
        """Outputs (a dict by name) of an un-padded run at the batch's exact shape."""
        model, task = self.model(name)
        names = tasks.input_names(task, model.config)
        if mode == "conventional":
            with torch.no_grad():
                out = model(**{n: batch[n] for n in names}, **extra)
            return {k: v for k, v in out.items()}
        args, kwargs = tasks.example_inputs(task, model.config, batch)
        module = bwskc.compile(model, args, kwargs, mode=mode, seed=0).eval()
        with torch.no_grad():
            outs = module(*[batch[n] for n in module.program.entry.input_names])
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return dict(zip(module.program.entry.output_names, outs))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("variants"))


def _ids(rows, length, seed=0, low=3):
    return torch.randint(low, 64, (rows, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- causal
@pytest.mark.parametrize("mode", ["conventional", "reversible"])
@pytest.mark.parametrize("shape", [(1, 3), (3, 17)])
def test_causal_any_shape_equals_exact_run(zoo, mode, shape):
    lm = zoo.load("gpt2", mode)
    ids = _ids(*shape)
    with torch.no_grad():
        out = lm(ids, labels=ids)
    ref = zoo.reference("gpt2", mode, {"input_ids": ids})
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions"
    assert out.logits.shape == (*shape, 64)
    torch.testing.assert_close(out.logits, ref["logits"], **TOL)
    model, _ = zoo.model("gpt2")  # the class's own loss, on the reference logits
    expected = model.loss_function(logits=ref["logits"], labels=ids, vocab_size=64)
    torch.testing.assert_close(out.loss, expected, **TOL)


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(rows=st.integers(3, 4), length=st.integers(9, 16), seed=st.integers(0, 2**16))
def test_causal_padding_is_exact_within_a_bucket(zoo, rows, length, seed):
    """Every shape of one bucket ([4, 16]): one compiled program, any padding of it."""
    lm = zoo.load("gpt2", "conventional")
    ids = _ids(rows, length, seed)
    with torch.no_grad():
        out = lm(ids).logits
    torch.testing.assert_close(out, zoo.reference("gpt2", "conventional", {"input_ids": ids})["logits"], **TOL)
    assert (4, 16) in lm._bwskc_programs


def test_neox_checkpoint_conversions_apply(zoo):
    """GPT-NeoX saves ``embed_out``; the library renames it to ``lm_head`` only for its own class name,
    so the bwskc subclass must load through the library class (a random lm_head otherwise)."""
    ids = _ids(3, 17)
    with torch.no_grad():
        out = zoo.load("neox", "conventional")(ids).logits
    torch.testing.assert_close(out, zoo.reference("neox", "conventional", {"input_ids": ids})["logits"], **TOL)


def test_causal_reversible_is_not_the_class_function(zoo):
    """The check above would be vacuous if the rewired program were the class's own forward."""
    ids = _ids(1, 3)
    with torch.no_grad():
        rev = zoo.load("gpt2", "reversible")(ids).logits
        conv = zoo.model("gpt2")[0](ids).logits
    assert not torch.allclose(rev, conv, atol=1e-4)


@pytest.mark.parametrize("mode", ["conventional", "reversible"])
def test_causal_generate_is_the_greedy_argmax_loop(zoo, mode):
    lm = zoo.load("gpt2", mode)
    prompt = _ids(1, 3, seed=5)
    with torch.no_grad():
        generated = lm.generate(prompt, max_new_tokens=5, do_sample=False)
        seq = prompt
        for _ in range(5):
            seq = torch.cat([seq, lm(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert generated.tolist() == seq.tolist()
    if mode == "conventional":  # and the class's own generate (cache off), the same function
        model, _ = zoo.model("gpt2")
        with torch.no_grad():
            assert model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False).tolist() == seq.tolist()


def test_remote_code_loads_the_same_model(zoo):
    import transformers
    path = zoo.dir("gpt2", "reversible")
    auto_map = json.loads((path / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoModelForCausalLM": "modeling_bwskc.BwskcReversibleGPT2LMHeadModel"}
    remote = transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True)
    assert type(remote).__name__ == "BwskcReversibleGPT2LMHeadModel" and not remote.training
    ids = _ids(1, 3)
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, zoo.load("gpt2", "reversible")(ids).logits, rtol=0, atol=0)
        assert remote.generate(ids, max_new_tokens=5, do_sample=False).tolist() == \
            zoo.load("gpt2", "reversible").generate(ids, max_new_tokens=5, do_sample=False).tolist()


def test_refusals_are_one_line(zoo, tmp_path):
    lm = zoo.load("gpt2", "reversible")
    with pytest.raises(BwskError, match=f"33 positions; .* has {MAX_POS}"):
        lm(_ids(1, MAX_POS + 1))
    for kwargs in ({"output_hidden_states": True}, {"past_key_values": object()},
                   {"attention_mask": torch.tensor([[0, 1, 1]])}):
        with pytest.raises(BwskError, match="reversible.*not supported") as info:
            lm(_ids(1, 3), **kwargs)
        assert "\n" not in str(info.value)
    # a conventional variant runs the class's own forward for what the program cannot take
    conv = zoo.load("gpt2", "conventional")
    with torch.no_grad():
        out = conv(_ids(1, 3), output_hidden_states=True)
    assert out.hidden_states is not None
    with pytest.raises(BwskError, match="not a bwskc train output") as info:
        pretrained.load_trained(tmp_path)
    assert "\n" not in str(info.value)
    (tmp_path / "bwskc.json").write_text('{"mode": "reversible", "task": "causal"}')
    with pytest.raises(BwskError, match="no readable config.json") as info:
        pretrained.load_trained(tmp_path)
    assert "\n" not in str(info.value)


def test_old_keywords_are_accepted(zoo):
    lm = pretrained.load_trained(zoo.dir("gpt2", "conventional"), batch_size=8, seq_len=128)
    assert type(lm).__name__ == "BwskcConventionalGPT2LMHeadModel"


# ---------------------------------------------------------------------------------------- seq2seq
def _seq2seq_batch():
    ids = _ids(2, 5, seed=1)
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # a padded row of the caller's own
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": _ids(2, 3, seed=2)}


@pytest.mark.parametrize("name,mode", [("t5", "conventional"), ("t5", "reversible"), ("switch", "conventional"),
                                       ("switch", "reversible")])
def test_seq2seq_padding_is_exact(zoo, name, mode):
    lm = zoo.load(name, mode)
    batch = _seq2seq_batch()
    labels = _ids(2, 3, seed=3)
    extra = {"output_router_logits": True} if name == "switch" else {}
    with torch.no_grad():
        out = lm(**batch, labels=labels, **extra)
    ref = zoo.reference(name, mode, batch, labels=labels, **extra)
    assert type(out).__name__ == ("Seq2SeqMoEOutput" if name == "switch" else "Seq2SeqLMOutput")
    torch.testing.assert_close(out.logits, ref["logits"], **TOL)
    torch.testing.assert_close(out.encoder_last_hidden_state, ref["encoder_last_hidden_state"], **TOL)
    if mode == "conventional":  # the class's loss, router z- and load-balancing losses included
        torch.testing.assert_close(out.loss, ref["loss"], **TOL)
        if name == "switch":
            for key in ("encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"):
                torch.testing.assert_close(out[key], ref[key], **TOL)
    else:
        expected = torch.nn.functional.cross_entropy(ref["logits"].reshape(-1, 64), labels.reshape(-1))
        if name == "t5":
            torch.testing.assert_close(out.loss, expected, **TOL)
        else:
            assert out.loss > expected  # plus the router losses


@pytest.mark.parametrize("name,mode", [("t5", "reversible"), ("switch", "conventional")])
def test_seq2seq_generate_is_the_greedy_argmax_loop(zoo, name, mode):
    lm = zoo.load(name, mode)
    batch = _seq2seq_batch()
    with torch.no_grad():
        generated = lm.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                max_new_tokens=5, do_sample=False)
        seq = torch.zeros(2, 1, dtype=torch.long)  # decoder_start_token_id
        for _ in range(5):
            logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        decoder_input_ids=seq).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert generated.tolist() == seq.tolist()
    if mode == "conventional":
        model, _ = zoo.model(name)
        with torch.no_grad():
            own = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 max_new_tokens=5, do_sample=False, use_cache=False)
        assert own.tolist() == seq.tolist()


# ----------------------------------------------------------------------------------- masked, image
@pytest.mark.parametrize("mode", ["conventional", "reversible"])
def test_masked_padding_is_exact(zoo, mode):
    lm = zoo.load("bert", mode)
    ids = _ids(3, 11, seed=4)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    with torch.no_grad():
        out = lm(input_ids=ids, attention_mask=mask, labels=labels)
    ref = zoo.reference("bert", mode, {"input_ids": ids, "attention_mask": mask})
    assert type(out).__name__ == "MaskedLMOutput"
    torch.testing.assert_close(out.logits, ref["logits"], **TOL)
    expected = torch.nn.functional.cross_entropy(ref["logits"].reshape(-1, 64), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected, **TOL)


@pytest.mark.parametrize("mode", ["conventional", "reversible"])
def test_image_batch_padding_is_exact(zoo, mode):
    lm = zoo.load("vit", mode)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = lm(pixel_values=pixels, labels=labels)
    ref = zoo.reference("vit", mode, {"pixel_values": pixels})
    assert type(out).__name__ == "ImageClassifierOutput"
    torch.testing.assert_close(out.logits, ref["logits"], **TOL)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(ref["logits"], labels), **TOL)
    with pytest.raises(BwskError, match="pixel_values must be"):
        lm(pixel_values=torch.randn(1, 3, 8, 8))
