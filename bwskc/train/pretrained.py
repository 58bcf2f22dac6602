"""A trained variant loaded back as a Hugging Face model of its task's class, at any input shape.

``load_trained(DIR)`` returns an instance of a subclass of the variant's own model class (e.g.
``GPT2LMHeadModel``), built by ``from_pretrained`` from ``DIR``, whose ``forward`` runs the program
``bwskc train`` trained: ``bwskc.compile(model, ..., mode=bwskc.json's mode)`` of the same weights (for a
reversible variant: the coupling architecture, a different function of those parameters than the
class's own forward). It returns the class's own output type (``CausalLMOutputWithCrossAttentions``,
``Seq2SeqLMOutput``, ``MaskedLMOutput``, ``ImageClassifierOutput``...), computes ``.loss`` from
``labels=`` as the class does, and ``generate()`` works (greedy or sampling, no KV cache: every step
recomputes the prefix).

Shapes. A compiled program has fixed shapes, so inputs are padded up to a bucket (batch and each
sequence length rounded up to a power of two, lengths at least ``MIN_LEN``, capped at the config's
maximum positions), one program per bucket, compiled on first use and cached; outputs are sliced back
to the caller's shape. Padding leaves the caller's positions exactly as an un-padded run computes them:

* causal LM: the ids are right-padded; causal attention keeps positions ``< L`` from seeing the rest;
* seq2seq: the encoder input is right-padded with ``attention_mask`` 0 (its keys are masked out of
  encoder self-attention and of the decoder's cross-attention), the decoder input right-padded (causal);
  a Switch router's expert capacity is counted along each row's sequence, so tokens after the caller's
  never take a place before them; router losses are recomputed from the sliced router logits;
* masked LM: right-padded with ``attention_mask`` 0;
* batch rows are padded with copies of the first row (rows never interact), sliced off afterwards.

Up to floating-point reassociation (a matmul of another shape may sum in another order: differences of
order 1e-7 relative), these are the un-padded outputs; the tests check them against the model class
itself (conventional) and against ``bwskc.compile`` at the exact shape (reversible).

Compiled programs share the model's parameters (no copy per bucket). What a program cannot take
(``past_key_values``, ``output_hidden_states``, ``inputs_embeds``, a causal attention mask with zeros...)
is refused in one line for a reversible variant; a conventional or analyzed one, whose class computes
the same function, runs the class's own forward for such a call instead.

``write_remote_code(DIR, task)`` makes ``AutoModelFor*.from_pretrained(DIR, trust_remote_code=True)``
load the same model: a ``modeling_bwskc.py`` beside the weights defines ``BwskcReversible<Base>`` as
this module's mixin over the base class, and ``config.json`` gains ``auto_map``.
"""
from __future__ import annotations

import inspect
import json
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from bwskc.errors import BwskError

MIN_LEN = 8          # the shortest sequence bucket
REMOTE_FILE = "modeling_bwskc.py"
_OFF = (None, False)  # values of an argument that ask for nothing


def _bucket(n: int, low: int = 1, cap: int | None = None) -> int:
    size = max(low, 1 << max(0, n - 1).bit_length())
    return min(size, cap) if cap else size


# ------------------------------------------------------------------------------------- the model
class _Unsupported(Exception):
    """A call the compiled program cannot run (its one-line reason)."""


def _encoder_inputs_class():
    from transformers.utils import ModelOutput

    @dataclass
    class BwskcEncoderInputs(ModelOutput):
        """What ``generate()`` keeps as ``encoder_outputs`` for a bwskc seq2seq model: the encoder's
        inputs (the compiled program runs encoder and decoder together, so there is nothing to cache)."""
        input_ids: torch.LongTensor | None = None

    return BwskcEncoderInputs


_ENCODER_INPUTS = None


def encoder_inputs(input_ids):
    global _ENCODER_INPUTS
    if _ENCODER_INPUTS is None:
        _ENCODER_INPUTS = _encoder_inputs_class()
    return _ENCODER_INPUTS(input_ids=input_ids)


class BwskcCompiledMixin:
    """Put before a Hugging Face model class: ``forward`` runs ``bwskc.compile`` of the model (its mode
    ``bwskc_mode``), one compiled program per shape bucket. See the module's docstring."""

    bwskc_task = "causal"
    bwskc_mode = "conventional"
    bwskc_seed = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        base = next(b for b in cls.__mro__[1:] if "forward" in b.__dict__ and not issubclass(b, BwskcCompiledMixin))
        cls._bwskc_base = base
        signature = inspect.signature(base.forward)

        def forward(self, *args, **kw):
            return BwskcCompiledMixin._bwskc_forward(self, *args, **kw)
        forward.__signature__ = signature  # generate() inspects which arguments forward takes
        forward.__doc__ = base.forward.__doc__
        cls.forward = forward

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._bwskc_programs = {}
        self._bwskc_tracing = False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """The library class's own ``from_pretrained`` (its checkpoint conversions are keyed by its class
        name, and skipped for classes outside transformers: GPT-NeoX's ``embed_out`` -> ``lm_head``),
        then the instance becomes this class."""
        from transformers import PreTrainedModel
        library = next(b for b in cls.__mro__
                       if issubclass(b, PreTrainedModel) and not issubclass(b, BwskcCompiledMixin))
        model = library.from_pretrained(*args, **kwargs)
        model.__class__ = cls
        model._bwskc_programs, model._bwskc_tracing = {}, False
        model.config.use_cache = False
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.use_cache = False  # a program has no KV cache: every step recomputes
        return model.eval()

    def _apply(self, fn, *args, **kwargs):
        """``.to(device)``, ``.half()``...: the compiled buckets hold constants of their own, so they are
        dropped and compiled again on the next call."""
        self.__dict__.get("_bwskc_programs", {}).clear()
        return super()._apply(fn, *args, **kwargs)

    # -------------------------------------------------------------------------------- generate()
    def _prepare_text_encoder_decoder_kwargs_for_generation(self, inputs_tensor, model_kwargs, model_input_name,
                                                           generation_config):
        """The encoder's inputs instead of its outputs: the program runs encoder and decoder together."""
        if self.bwskc_mode != "reversible" and any(
                model_kwargs.get(k) not in _OFF for k in ("inputs_embeds", "output_hidden_states")):
            return super()._prepare_text_encoder_decoder_kwargs_for_generation(
                inputs_tensor, model_kwargs, model_input_name, generation_config)
        if inputs_tensor is None or inputs_tensor.dtype != torch.long:
            raise BwskError("a bwskc seq2seq model generates from input_ids")
        model_kwargs["encoder_outputs"] = encoder_inputs(inputs_tensor)
        return model_kwargs

    # --------------------------------------------------------------------------------- forward
    def _bwskc_forward(self, *args, **kwargs):
        base = type(self)._bwskc_base
        if self._bwskc_tracing:  # bwskc.compile exporting the model: the class's own forward
            return base.forward(self, *args, **kwargs)
        bound = inspect.signature(base.forward).bind(self, *args, **kwargs)
        call = dict(bound.arguments)
        call.pop(next(iter(call)))  # self
        for name, p in inspect.signature(base.forward).parameters.items():
            if p.kind is p.VAR_KEYWORD and name in call:
                call.update(call.pop(name))
        try:
            return _run(self, call)
        except _Unsupported as exc:
            if self.bwskc_mode == "reversible":
                raise BwskError(f"{type(self).__name__} ({self.bwskc_task}, reversible): {exc}; its "
                                f"program takes {', '.join(_input_names(self))} (and labels)") from None
            return base.forward(self, *args, **kwargs)  # conventional: the class computes the same function

    def bwskc_program(self, shape: tuple):
        """The compiled module for one bucket (``shape``: batch, then each stream's length), compiled on
        first use from this model's own parameters, then sharing them."""
        module = self._bwskc_programs.get(shape)
        if module is None:
            module = _compile_bucket(self, shape)
            self._bwskc_programs[shape] = module
        module.train(self.training)
        return module


def _input_names(model) -> tuple:
    from bwskc.train import tasks
    return tasks.input_names(model.bwskc_task, model.config)


def _max_len(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0 and not getattr(config, "relative_attention_num_buckets", None):
            return value
    return None


def _example_batch(model, shape: tuple) -> dict:
    """Inputs of the bucket's shape for torch.export. The attention mask has a zero (the last
    position of the last row), so the trace takes the masking path a padded batch needs."""
    config, device = model.config, model.device
    task = model.bwskc_task
    if task == "image":
        size = _image_size(config)
        return {"pixel_values": torch.zeros(shape[0], getattr(config, "num_channels", 3), *size, device=device,
                                            dtype=model.dtype)}
    batch, length = shape[0], shape[1]
    ids = torch.zeros(batch, length, dtype=torch.long, device=device)
    out = {"input_ids": ids}
    if task in ("seq2seq", "masked"):
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if length > 1:
            mask[-1, -1] = 0
        out["attention_mask"] = mask
    if task == "seq2seq":
        out["decoder_input_ids"] = torch.zeros(batch, shape[2], dtype=torch.long, device=device)
    return out


def _compile_bucket(model, shape: tuple):
    import bwskc
    from bwskc.ir import Program
    from bwskc.train import tasks
    batch = _example_batch(model, shape)
    args, kwargs = tasks.example_inputs(model.bwskc_task, model.config, batch)
    training = model.training
    model._bwskc_tracing = True
    try:
        module = bwskc.compile(model, args, kwargs, mode=model.bwskc_mode, seed=model.bwskc_seed)
    finally:
        model._bwskc_tracing = False
        model.train(training)
    # share the model's parameters and buffers instead of the copies compile made
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers(remove_duplicate=False)))
    for name, tensor in list(module.named_parameters(remove_duplicate=False)) + list(
            module.named_buffers(remove_duplicate=False)):
        mine = own.get(name)
        if mine is None or mine.shape != tensor.shape or mine.dtype != tensor.dtype:
            continue
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        if leaf in sub._parameters:
            sub._parameters[leaf] = mine
        elif leaf in sub._buffers:
            sub._buffers[leaf] = mine
    p = module.program  # its weights are compile's copies: keep the IR, drop them
    module.program = Program(p.name, p.tensors, p.consts, p.defs, p.entry, None, p.analyses)
    return module


def _image_size(config) -> tuple[int, int]:
    size = getattr(config, "image_size", 224)
    return tuple(size) if isinstance(size, (list, tuple)) else (size, size)


def _long(name, value, ndim=2):
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.long, torch.int32) or value.ndim != ndim:
        got = f"{value.dtype}{list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise BwskError(f"{name} must be an integer tensor of {ndim} dimensions, not {got}")
    return value.long()


def _pad(t: torch.Tensor, shape: tuple, value) -> torch.Tensor:
    """``t`` right-padded to ``shape`` along dims 1.. with ``value``, rows added as copies of row 0."""
    if t.shape[0] < shape[0]:
        t = torch.cat([t, t[:1].expand(shape[0] - t.shape[0], *t.shape[1:])], 0)
    if len(shape) > 1 and t.shape[1] < shape[1]:
        pad = t.new_full((t.shape[0], shape[1] - t.shape[1], *t.shape[2:]), value)
        t = torch.cat([t, pad], 1)
    return t


def _check_len(model, name, length):
    cap = _max_len(model.config)
    if length < 1:
        raise BwskError(f"{name} is empty: give at least one token")
    if cap is not None and length > cap:
        raise BwskError(f"{name} has {length} positions; {type(model).__name__} has {cap} "
                        "(config max_position_embeddings)")
    return _bucket(length, MIN_LEN, cap)


_ACCEPTED = {
    "causal": {"input_ids", "attention_mask", "position_ids", "labels", "logits_to_keep", "use_cache",
               "return_dict", "cache_position", "past_key_values", "output_attentions", "output_hidden_states"},
    "seq2seq": {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "encoder_outputs",
                "labels", "use_cache", "return_dict", "cache_position", "past_key_values", "output_attentions",
                "output_hidden_states", "output_router_logits"},
    "masked": {"input_ids", "attention_mask", "labels", "return_dict", "output_attentions",
               "output_hidden_states", "token_type_ids", "position_ids"},
    "image": {"pixel_values", "labels", "return_dict", "output_attentions", "output_hidden_states",
              "interpolate_pos_encoding"},
}


def _refuse_extras(task, call):
    for name in ("past_key_values", "output_hidden_states", "output_attentions"):
        if call.get(name) not in _OFF:
            raise _Unsupported(f"{name} is not supported (a compiled program returns only its outputs; "
                               "no KV cache)" if name == "past_key_values" else
                               f"{name}=True is not supported (a compiled program returns only its outputs)")
    for name, value in call.items():
        if name not in _ACCEPTED[task] and value is not None and value is not False:
            raise _Unsupported(f"{name}= is not supported")


def _run(model, call: dict):
    task = model.bwskc_task
    _refuse_extras(task, call)
    return_dict = call.get("return_dict")
    out = {"causal": _causal, "seq2seq": _seq2seq, "masked": _masked, "image": _image}[task](model, call)
    if return_dict is False:
        return out.to_tuple()
    return out


def _ones_or_refuse(name, mask, like):
    if mask is None:
        return
    if mask.shape != like.shape or not bool((mask == 1).all()):
        raise _Unsupported(f"{name} with zeros is not supported (the program takes none: give unpadded rows "
                           "of one length)")


def _named_outputs(model, module, inputs: list, rows: int, lengths: dict) -> dict:
    """Run the program; its outputs by name, sliced to ``rows`` and to each stream's length
    (``lengths``: output-name prefix -> length, ``""`` the default)."""
    outs = module(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    named = {}
    for name, value in zip(module.program.entry.output_names, outs):
        if value.ndim >= 1:
            value = value[:rows]
        if value.ndim >= 2 and lengths:
            prefix = next((p for p in lengths if p and name.startswith(p)), "")
            value = value[:, :lengths[prefix]]
        named[name] = value.contiguous()
    return named


def _group(named: dict) -> dict:
    """``{"a.0": x, "a.1": y, "b": z}`` -> ``{"a": (x, y), "b": z}``."""
    out, groups = {}, {}
    for name, value in named.items():
        head, dot, index = name.partition(".")
        if dot and index.isdigit():
            groups.setdefault(head, {})[int(index)] = value
        else:
            out[name] = value
    for head, items in groups.items():
        out[head] = tuple(items[i] for i in sorted(items))
    return out


def _output_class(model, default: str):
    import transformers.modeling_outputs as mo
    from transformers.utils import ModelOutput
    annotation = inspect.signature(type(model)._bwskc_base.forward).return_annotation
    if isinstance(annotation, str):
        try:
            annotation = eval(annotation, vars(sys.modules[type(model)._bwskc_base.__module__]))
        except Exception:
            annotation = None
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, ModelOutput):
            return candidate
    return getattr(mo, default)


def _build(model, default: str, values: dict):
    cls = _output_class(model, default)
    fields = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in values.items() if k in fields and v is not None})


def _causal(model, call):
    ids = call.get("input_ids")
    if ids is None:
        raise _Unsupported("input_ids are required (inputs_embeds is not supported)")
    ids = _long("input_ids", ids)
    rows, length = ids.shape
    _ones_or_refuse("attention_mask", call.get("attention_mask"), ids)
    position_ids = call.get("position_ids")
    if position_ids is not None and not torch.equal(
            position_ids.to(ids.device), torch.arange(length, device=ids.device).expand_as(position_ids)):
        raise _Unsupported("position_ids other than 0, 1, ... are not supported")
    shape = (_bucket(rows), _check_len(model, "input_ids", length))
    module = model.bwskc_program(shape)
    pad = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    named = _group(_named_outputs(model, module, [_pad(ids, shape, pad)], rows, {"": length}))
    logits = named.pop("logits")
    loss = None
    if call.get("labels") is not None:
        loss = model.loss_function(logits=logits, labels=call["labels"], vocab_size=model.config.vocab_size)
    keep = call.get("logits_to_keep") or 0
    if isinstance(keep, int) and keep > 0:
        logits = logits[:, -keep:]
    elif isinstance(keep, torch.Tensor):
        logits = logits[:, keep]
    return _build(model, "CausalLMOutputWithPast", {"loss": loss, "logits": logits})


def _seq2seq(model, call):
    encoder_outputs = call.get("encoder_outputs")
    ids = call.get("input_ids")
    if encoder_outputs is not None:
        ids = getattr(encoder_outputs, "input_ids", None) if type(encoder_outputs).__name__ == "BwskcEncoderInputs" \
            else None
        if ids is None:
            raise _Unsupported("encoder_outputs= is not supported (give input_ids: the program runs the encoder)")
    if ids is None:
        raise _Unsupported("input_ids are required (inputs_embeds is not supported)")
    ids = _long("input_ids", ids)
    labels = call.get("labels")
    dec = call.get("decoder_input_ids")
    if dec is None and labels is not None:
        dec = model.prepare_decoder_input_ids_from_labels(labels=labels) if hasattr(
            model, "prepare_decoder_input_ids_from_labels") else model._shift_right(labels)
    if dec is None:
        raise _Unsupported("decoder_input_ids (or labels) are required")
    dec = _long("decoder_input_ids", dec)
    _ones_or_refuse("decoder_attention_mask", call.get("decoder_attention_mask"), dec)
    mask = call.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else _long("attention_mask", mask)
    if mask.shape != ids.shape or dec.shape[0] != ids.shape[0]:
        raise BwskError(f"input_ids {list(ids.shape)}, attention_mask {list(mask.shape)} and decoder_input_ids "
                        f"{list(dec.shape)} must agree")
    rows, enc_len, dec_len = ids.shape[0], ids.shape[1], dec.shape[1]
    shape = (_bucket(rows), _check_len(model, "input_ids", enc_len), _check_len(model, "decoder_input_ids", dec_len))
    module = model.bwskc_program(shape)
    pad = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    inputs = {"input_ids": _pad(ids, shape[:2], pad), "attention_mask": _pad(mask, shape[:2], 0),
              "decoder_input_ids": _pad(dec, (shape[0], shape[2]), pad)}
    named = _named_outputs(model, module, [inputs[n] for n in module.program.entry.input_names], rows,
                           {"encoder_": enc_len, "": dec_len})
    values = _group(named)
    logits = values["logits"]
    router = call.get("output_router_logits") and "encoder_router_logits" in values
    for key in ("encoder_z_loss", "encoder_aux_loss", "decoder_z_loss", "decoder_aux_loss"):
        values.pop(key, None)  # computed over the padded bucket: recomputed below from the sliced logits
    if not call.get("output_router_logits"):
        values.pop("encoder_router_logits", None)
        values.pop("decoder_router_logits", None)
    if router:
        values.update(_router_losses(model, values))
    loss = None
    if labels is not None:
        labels = labels.to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                 ignore_index=-100)
        if router:
            loss = loss + model.router_z_loss_coef * (values["encoder_z_loss"] + values["decoder_z_loss"]) \
                + model.router_aux_loss_coef * (values["encoder_aux_loss"] + values["decoder_aux_loss"])
    values["loss"] = loss
    return _build(model, "Seq2SeqLMOutput", values)


def _router_losses(model, values: dict) -> dict:
    """z-loss and load-balancing loss per stack, as the MoE class computes them (Switch Transformers),
    from the router logits of the caller's tokens only."""
    functions = vars(sys.modules[type(model)._bwskc_base.__module__])
    out = {}
    for stack in ("encoder", "decoder"):
        step = getattr(getattr(model, stack).config, f"{stack}_sparse_step", 0)
        logits = values.get(f"{stack}_router_logits") or ()
        if step > 1 and logits:
            router_logits, indexes = model._unpack_router_logits(logits)
            out[f"{stack}_z_loss"] = functions["router_z_loss_func"](router_logits)
            out[f"{stack}_aux_loss"] = functions["load_balancing_loss_func"](
                torch.softmax(router_logits, dim=-1), indexes)
        else:
            out[f"{stack}_z_loss"] = out[f"{stack}_aux_loss"] = 0
    return out


def _masked(model, call):
    ids = call.get("input_ids")
    if ids is None:
        raise _Unsupported("input_ids are required (inputs_embeds is not supported)")
    ids = _long("input_ids", ids)
    token_types = call.get("token_type_ids")
    if token_types is not None and bool((token_types != 0).any()):
        raise _Unsupported("token_type_ids other than 0 are not supported")
    position_ids = call.get("position_ids")
    if position_ids is not None and not torch.equal(
            position_ids.to(ids.device), torch.arange(ids.shape[1], device=ids.device).expand_as(position_ids)):
        raise _Unsupported("position_ids other than 0, 1, ... are not supported")
    mask = call.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else _long("attention_mask", mask)
    if mask.shape != ids.shape:
        raise BwskError(f"attention_mask {list(mask.shape)} must match input_ids {list(ids.shape)}")
    rows, length = ids.shape
    shape = (_bucket(rows), _check_len(model, "input_ids", length))
    module = model.bwskc_program(shape)
    pad = model.config.pad_token_id if isinstance(model.config.pad_token_id, int) else 0
    inputs = {"input_ids": _pad(ids, shape, pad), "attention_mask": _pad(mask, shape, 0)}
    values = _group(_named_outputs(model, module, [inputs[n] for n in module.program.entry.input_names], rows,
                                   {"": length}))
    logits = values["logits"]
    if call.get("labels") is not None:
        values["loss"] = torch.nn.functional.cross_entropy(
            logits.reshape(-1, model.config.vocab_size), call["labels"].to(logits.device).reshape(-1))
    return _build(model, "MaskedLMOutput", values)


def _image(model, call):
    pixels = call.get("pixel_values")
    if call.get("interpolate_pos_encoding"):
        raise _Unsupported("interpolate_pos_encoding is not supported")
    size = _image_size(model.config)
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or tuple(pixels.shape[2:]) != size:
        raise BwskError(f"pixel_values must be [batch, channels, {size[0]}, {size[1]}], not "
                        + (str(list(pixels.shape)) if isinstance(pixels, torch.Tensor) else type(pixels).__name__))
    rows = pixels.shape[0]
    shape = (_bucket(rows),)
    module = model.bwskc_program(shape)
    values = _group(_named_outputs(model, module, [_pad(pixels.to(model.dtype), shape, 0)], rows, {}))
    if call.get("labels") is not None:
        values["loss"] = model.loss_function(call["labels"], values["logits"], model.config)
    return _build(model, "ImageClassifierOutput", values)


# ------------------------------------------------------------------------------------- loading
_CLASSES: dict = {}


def bwskc_class(base, task: str, mode: str, seed: int = 0):
    """The subclass of ``base`` (a Hugging Face model class) whose forward runs bwskc's program."""
    key = (base, task, mode, seed)
    if key not in _CLASSES:
        name = f"Bwskc{mode.capitalize()}{base.__name__}"
        _CLASSES[key] = type(name, (BwskcCompiledMixin, base), {
            "__module__": __name__, "__qualname__": name, "bwskc_task": task, "bwskc_mode": mode,
            "bwskc_seed": seed})
    return _CLASSES[key]


def read_meta(path) -> dict:
    """``bwskc.json`` of a variant directory, or one line saying why it is not one."""
    from bwskc.train.checkpoint import BWSKC_JSON
    from bwskc.train.tasks import TASKS
    path = Path(path)
    try:
        meta = json.loads((path / BWSKC_JSON).read_text())
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as exc:
        raise BwskError(f"{path / BWSKC_JSON}: not a bwskc train output ({type(exc).__name__})") from None
    meta.setdefault("task", "causal")  # written before task families existed
    import bwskc
    if meta.get("mode") not in bwskc.MODES or meta["task"] not in TASKS:
        raise BwskError(f"{path / BWSKC_JSON}: mode {meta.get('mode')!r} / task {meta['task']!r} is not one of "
                        f"{', '.join(bwskc.MODES)} / {', '.join(TASKS)}")
    return meta


def _base_class(path: Path, task: str):
    import transformers
    from bwskc.train import tasks
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BwskError(f"{path}: no readable config.json ({type(exc).__name__}: {first})") from None
    mapping = tasks.auto_class(task)._model_mapping
    if type(config) not in mapping:
        raise BwskError(f"{path}: a {type(config).__name__} has no {tasks.AUTO_CLASS[task]} class "
                        f"(bwskc.json says task {task})")
    return mapping[type(config)], config


def load_trained(path, *, device: str = "cpu", batch_size: int | None = None, seq_len: int | None = None):
    """A variant ``bwskc train`` wrote, in evaluation mode, as a model of its task's Hugging Face class
    that runs the program it was trained as, at any batch size and length (see the module docstring).

    ``batch_size`` and ``seq_len`` are accepted for compatibility and ignored: programs are compiled per
    shape bucket on demand. An IR-program variant (``"ir"`` in ``bwskc.json``) has no class and one fixed
    shape: it comes back as the compiled module of its program, as before.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta.get("ir"):  # an IR model: its program and weights
        import bwskc
        from safetensors.torch import load_file
        try:
            program = bwskc.parse((path / meta["ir"]).read_text(), str(path / meta["ir"]))
            weights = load_file(str(path / "model.safetensors"))
        except OSError as exc:
            raise BwskError(f"{path}: unreadable IR variant ({type(exc).__name__}: {exc})") from None
        program = program.with_weights(weights)
        return bwskc.compile(program, mode=meta["mode"], seed=meta.get("seed", 0)).to(device).eval()
    from bwskc.train import tasks
    base, _config = _base_class(path, meta["task"])
    cls = bwskc_class(base, meta["task"], meta["mode"], int(meta.get("seed", 0) or 0))
    try:
        model = cls.from_pretrained(str(path), local_files_only=True, **tasks.model_kwargs(base))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BwskError(f"{path}: cannot load the weights ({type(exc).__name__}: {first})") from None
    return model.to(device).eval()


# ---------------------------------------------------------------------------------- remote code
_REMOTE_TEMPLATE = '''"""Written by bwskc (``bwskc.train.pretrained.write_remote_code``).

This directory's weights were trained {what}.
``{auto}.from_pretrained(DIR, trust_remote_code=True)`` loads them as that program (it needs the
``bwskc`` package): the same model as ``bwskc.load_trained(DIR)``. Without ``trust_remote_code`` the
library's own class loads them, wired as its original blocks.
"""
from {module} import {base}

from bwskc.train.pretrained import BwskcCompiledMixin


class {name}(BwskcCompiledMixin, {base}):
    bwskc_task = {task!r}
    bwskc_mode = {mode!r}
    bwskc_seed = {seed!r}
'''


def write_remote_code(variant_dir, task: str | None = None) -> str:
    """Make ``AutoModelFor<Task>.from_pretrained(variant_dir, trust_remote_code=True)`` load the variant as
    ``bwskc.load_trained`` does: writes ``modeling_bwskc.py`` (class ``Bwskc<Mode><Base>``, this module's
    mixin over the base class) and adds ``auto_map`` to ``config.json``. The config class stays the
    library's own (transformers resolves it from ``model_type``; ``auto_map`` only names the model class).
    Returns the class name."""
    from bwskc.train import tasks
    path = Path(variant_dir)
    meta = read_meta(path)
    task = task or meta["task"]
    if meta.get("ir"):
        raise BwskError(f"{path}: an IR-program variant has no Hugging Face class to extend")
    base, _config = _base_class(path, task)
    name = f"Bwskc{meta['mode'].capitalize()}{base.__name__}"
    what = ("inside bwskc's reversible coupling chains,\na different function of the same parameters than "
            f"{base.__name__}'s own forward" if meta["mode"] == "reversible" else
            f"as bwskc's {meta['mode']} program of {base.__name__}")
    text = _REMOTE_TEMPLATE.format(what=what, auto=tasks.AUTO_CLASS[task], module=base.__module__,
                                   base=base.__name__, name=name, task=task, mode=meta["mode"],
                                   seed=int(meta.get("seed", 0) or 0))
    from bwskc.files import write_text_atomic
    write_text_atomic(path / REMOTE_FILE, text)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("auto_map", {})[tasks.AUTO_CLASS[task]] = f"{REMOTE_FILE.removesuffix('.py')}.{name}"
    write_text_atomic(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return name
