"""Which objective a model trains with, and what its compiled program takes.

A task family is one of ``causal`` (next-token LM), ``seq2seq`` (an encoder reads a block, the decoder,
teacher-forced, predicts the block that follows), ``masked`` (BERT-style masking, pseudo-perplexity over
masked tokens) and ``image`` (classification, top-1 accuracy). ``bwskc train`` picks it from the model:
the config's ``architectures`` when it names a head, else the Auto class the config maps to; ``--task``
overrides it where the model has that head. The losses and batches live in ``bwskc.train.objectives``.
"""
from __future__ import annotations

from bwskc.errors import BwskError
from bwskc.frontend import model_kwargs  # noqa: F401  (re-exported: the trainer builds models with it)

TASKS = ("causal", "seq2seq", "masked", "image")
AUTO_CLASS = {"causal": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
              "masked": "AutoModelForMaskedLM", "image": "AutoModelForImageClassification"}
METRIC = {"causal": "perplexity", "seq2seq": "perplexity", "masked": "pseudo-perplexity",
          "image": "accuracy"}
_HEAD_SUFFIX = (("ForCausalLM", "causal"), ("LMHeadModel", "causal"), ("ForConditionalGeneration", "seq2seq"),
                ("ForMaskedLM", "masked"), ("ForImageClassification", "image"))


def auto_class(task: str):
    import transformers
    return getattr(transformers, AUTO_CLASS[task])


def has_head(config, task: str) -> bool:
    return type(config) in auto_class(task)._model_mapping


def is_encoder_only(config) -> bool:
    """A bidirectional encoder (BERT, RoBERTa...): it has a masked-LM head and is not configured as a
    decoder, so its causal-LM class would let every token attend to the tokens it predicts."""
    return has_head(config, "masked") and not getattr(config, "is_decoder", False) and not getattr(
        config, "is_encoder_decoder", False)


def detect_task(config) -> str | None:
    """The task the model's own head names, or None when it has none of the four."""
    for arch in getattr(config, "architectures", None) or ():
        for suffix, task in _HEAD_SUFFIX:
            if task == "causal" and is_encoder_only(config):
                continue  # BertLMHeadModel without is_decoder: bidirectional, not a causal LM
            if arch.endswith(suffix) and has_head(config, task):
                return "seq2seq" if task == "causal" and config.is_encoder_decoder else task
    if getattr(config, "is_encoder_decoder", False) and has_head(config, "seq2seq"):
        return "seq2seq"
    if has_head(config, "image"):
        return "image"
    if is_encoder_only(config):
        return "masked"
    if has_head(config, "causal"):
        return "causal"
    if has_head(config, "masked"):
        return "masked"
    return None


def choose_task(spec: str, config, requested: str | None) -> str:
    """``requested`` (``--task``) when the model has that head, else the detected task; one line when
    neither works."""
    kind = type(config).__name__
    if requested is None:
        task = detect_task(config)
        if task is None:
            raise BwskError(f"{spec}: a {kind} has no causal-LM, seq2seq-LM, masked-LM or image-classification "
                            "head, so bwskc train has no objective for it")
        return task
    if requested not in TASKS:
        raise BwskError(f"--task {requested}: choose from {', '.join(TASKS)}")
    if requested == "causal" and is_encoder_only(config):
        raise BwskError(f"{spec}: a {kind} is an encoder (bidirectional attention, is_decoder false): "
                        "--task causal would let each token see the token it predicts; use --task masked")
    if not has_head(config, requested):
        raise BwskError(f"{spec}: a {kind} has no {AUTO_CLASS[requested].removeprefix('AutoModelFor')} "
                        f"class, so it cannot train --task {requested}"
                        + (f" (its task: {detect_task(config)})" if detect_task(config) else ""))
    return requested


def input_names(task: str, config) -> tuple[str, ...]:
    """The compiled program's inputs, in order (``bwskc.compile`` takes them positionally)."""
    if task == "causal":
        return ("input_ids",)
    if task == "seq2seq":
        return ("input_ids", "attention_mask", "decoder_input_ids")
    if task == "masked":
        return ("input_ids", "attention_mask")
    return ("pixel_values",)


def export_options(task: str, config) -> dict:
    """Non-tensor keyword arguments the model is exported with: MoE routers return their auxiliary
    losses (``output_router_logits``) so the objective can add them as the config says."""
    if task == "seq2seq" and hasattr(config, "router_aux_loss_coef"):
        return {"output_router_logits": True}
    return {}


def example_inputs(task: str, config, batch: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` for ``bwskc.compile(model, args, kwargs)`` from one batch (a dict of tensors
    keyed by input name): the first input positional, the rest by name."""
    names = input_names(task, config)
    missing = [n for n in names if n not in batch]
    if missing:
        raise BwskError(f"a {task} batch lacks {missing}")
    return (batch[names[0]],), {**{n: batch[n] for n in names[1:]}, **export_options(task, config)}
