"""The training objective of each task family: its batches, its loss and its evaluation metric.

Every batch is a function of ``(seed, step)`` and of the rows' global positions, never of the process
that draws it: a data-parallel rank taking rows ``r*b .. (r+1)*b`` of the global batch gets exactly the
single-process batch's rows (masks, augmentations included), and a resumed run repeats the steps of one
that never stopped.

* ``causal``: next-token cross entropy over the block (perplexity).
* ``seq2seq``: a prepared block is ``2 * seq_len`` tokens; the encoder reads the first half, the decoder,
  teacher-forced (its input the target shifted right by the decoder start token), predicts the second
  half (perplexity over decoder tokens). A mixture-of-experts router's auxiliary losses (Switch: z-loss
  and load balancing) are added with the config's coefficients and reported apart.
* ``masked``: 15% of the tokens are chosen (at least one per block), of which 80% become the mask token,
  10% a random token and 10% stay; the loss is cross entropy over the chosen tokens (pseudo-perplexity).
  Training masks are drawn from ``(seed, step)``; evaluation masks are fixed per split and block.
* ``image``: cross entropy and top-1 accuracy; training images are randomly cropped (and flipped) from
  ``(seed, step, row)``, evaluation images centre-cropped.

The text tasks (``fused_head``) also take outputs whose logits were split off
(``bwskc.runtime.head``): ``hidden`` and ``head`` (the head's weight and bias) in place of ``logits``,
the cross entropy then computed chunk by chunk (``bwskc.kernels.cross_entropy``), never the full
``[batch, seq, vocab]`` logits; the same numbers within float rounding.
"""
from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F

from bwskc.errors import BwskError

MASK_RATE, MASK_SHARE, RANDOM_SHARE = 0.15, 0.8, 0.1
EVAL_MASK_SEED = 20261202  # the same evaluation masks for every variant and every --seed
EVAL_CHUNK = 256
IGNORE = -100


def _generator(*key: int) -> torch.Generator:
    value = 0
    for k in key:  # a fixed mixing of the key (no Python hash: it is salted per process)
        value = (value * 1_000_003 + int(k) + 0x9E3779B9) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def outputs_by_name(module, out) -> dict:
    """The compiled program's outputs keyed by their names (``logits``, ``encoder_z_loss``...); a
    program whose first output has another name (an IR file's ``out0``) has it as ``logits`` too."""
    names = module.program.entry.output_names
    values = out if isinstance(out, (tuple, list)) else (out,)
    named = dict(zip(names, values))
    named.setdefault("logits", values[0])
    return named


class Objective(abc.ABC):
    """What one task trains: ``batch`` builds the inputs (and ``labels``) of given rows of a split,
    ``loss`` the training loss and its reported parts, ``sums`` what evaluation adds up."""
    task = ""
    metric = "perplexity"
    fused_head = False  # the loss also takes ``hidden`` and ``head`` in place of ``logits``

    def __init__(self, config, data: dict, info: dict, *, seed: int, global_batch: int):
        self.config, self.data, self.info, self.seed = config, data, info, seed
        self.global_batch = global_batch  # rows of one step over all ranks (random draws are per global row)

    def rows(self, split: str) -> int:
        return int(self.data[split].shape[0])

    # per task: every family defines these two ------------------------------
    @abc.abstractmethod
    def batch(self, split: str, rows: torch.Tensor, *, step: int | None, offset: int = 0) -> dict:
        """The inputs and labels of ``rows`` of ``split`` at ``step`` (None: evaluation)."""

    @abc.abstractmethod
    def token_losses(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-target cross entropy and the weight (1 or 0) of each, shaped ``[rows, targets]``."""

    def targets(self, batch: dict) -> torch.Tensor:
        """How many targets the batch's loss averages over (float64; a masked LM's vary per batch)."""
        labels = batch["labels"] if "labels" in batch else batch["input_ids"][:, 1:]
        return torch.tensor(float(labels.numel()), dtype=torch.float64, device=labels.device)

    def head_inputs(self, outputs: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(the head's input rows ``[rows, targets, d]``, their targets ``[rows, targets]``, ``IGNORE``
        where a target does not count): the fused loss's operands, for a task with ``fused_head``."""
        raise NotImplementedError(f"the {self.task} task does not take a split head")

    def loss(self, outputs: dict, batch: dict, count=None) -> tuple[torch.Tensor, dict]:
        """Mean loss over the targets; ``count``: the number to divide by (data parallel: the global
        batch's targets over the ranks, so the averaged gradient is one process's)."""
        if "head" in outputs:  # the split head: a summed chunked loss, no [rows, targets, vocab] logits
            hidden, targets = self.head_inputs(outputs, batch)
            total_loss, n = _head_sum(outputs["head"], hidden, targets)
            total = n.clamp(min=1) if count is None else count.to(total_loss.device, total_loss.dtype)
            return total_loss / total, {}
        losses, weight = self.token_losses(outputs, batch)
        total = weight.sum().clamp(min=1) if count is None else count.to(losses.device, losses.dtype)
        return (losses * weight).sum() / total, {}

    def sums(self, outputs: dict, batch: dict, row_weight: torch.Tensor) -> torch.Tensor:
        """(loss sum, target count, correct count) over the rows whose ``row_weight`` is 1."""
        losses, weight = self.token_losses(outputs, batch)
        weight = weight * row_weight[:, None]
        return torch.stack([(losses.double() * weight).sum(), weight.double().sum(),
                            torch.zeros((), dtype=torch.float64, device=losses.device)])

    def metrics(self, sums: torch.Tensor) -> dict:
        loss = float(sums[0] / sums[1])
        return {"loss": loss, self.metric: _ppl(loss)}

    def headline(self, metrics: dict) -> str:
        return f"{self.metric} {metrics[self.metric]:.2f}"


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).clamp(min=0),
                           reduction="none")
    return flat.view(targets.shape)


def _head_ce(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-target cross entropy (0 where ``IGNORE``) of a split head, shaped like ``targets``."""
    from bwskc.kernels.cross_entropy import linear_cross_entropy
    weight, bias = head
    flat = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1),
                                ignore_index=IGNORE, reduction="none")
    return flat.view(targets.shape)


def _head_sum(head, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross entropy of a split head over the targets not ``IGNORE``, their number)."""
    from bwskc.kernels.cross_entropy import linear_cross_entropy
    weight, bias = head
    flat = targets.reshape(-1)
    total = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat,
                                 ignore_index=IGNORE, reduction="sum")
    return total, (flat != IGNORE).sum().to(total.dtype)


class CausalLM(Objective):
    task = "causal"
    fused_head = True

    def batch(self, split, rows, *, step, offset=0):
        return {"input_ids": self.data[split][rows]}

    def head_inputs(self, outputs, batch):
        return outputs["hidden"][:, :-1], batch["input_ids"][:, 1:]

    def token_losses(self, outputs, batch):
        ids = batch["input_ids"]
        if "head" in outputs:
            losses = _head_ce(outputs["head"], *self.head_inputs(outputs, batch))
        else:
            losses = _ce(outputs["logits"][:, :-1], ids[:, 1:])
        return losses, torch.ones_like(losses)


class Seq2SeqLM(Objective):
    task = "seq2seq"
    fused_head = True

    def __init__(self, config, data, info, *, seed, global_batch):
        super().__init__(config, data, info, seed=seed, global_batch=global_batch)
        start = getattr(config, "decoder_start_token_id", None)
        self.start = int(start if start is not None else (getattr(config, "pad_token_id", None) or 0))

    def batch(self, split, rows, *, step, offset=0):
        block = self.data[split][rows]
        half = block.shape[1] // 2
        source, target = block[:, :half].contiguous(), block[:, half:].contiguous()
        decoder = torch.cat([torch.full_like(target[:, :1], self.start), target[:, :-1]], dim=1)
        return {"input_ids": source, "attention_mask": torch.ones_like(source),
                "decoder_input_ids": decoder, "labels": target}

    def head_inputs(self, outputs, batch):
        return outputs["hidden"], batch["labels"]

    def token_losses(self, outputs, batch):
        if "head" in outputs:
            losses = _head_ce(outputs["head"], *self.head_inputs(outputs, batch))
        else:
            losses = _ce(outputs["logits"], batch["labels"])
        return losses, torch.ones_like(losses)

    def router_losses(self, outputs: dict) -> dict:
        """The router's auxiliary losses weighted as the config says (Switch Transformers: z-loss and
        load balancing, encoder plus decoder), by name; empty for a dense model."""
        parts = {}
        for kind, coef in (("z", "router_z_loss_coef"), ("aux", "router_aux_loss_coef")):
            values = [outputs[f"{side}_{kind}_loss"] for side in ("encoder", "decoder")
                      if f"{side}_{kind}_loss" in outputs]
            if values and getattr(self.config, coef, None) is not None:
                parts[f"router_{kind}_loss"] = getattr(self.config, coef) * sum(v.float() for v in values)
        return parts

    def loss(self, outputs, batch, count=None):
        ce, _ = super().loss(outputs, batch, count)
        parts = self.router_losses(outputs)
        return ce + sum(parts.values(), torch.zeros((), device=ce.device)), {
            "lm_loss": float(ce.detach()), **{k: float(v.detach()) for k, v in parts.items()}}


class MaskedLM(Objective):
    task = "masked"
    metric = "pseudo-perplexity"
    fused_head = True

    def __init__(self, config, data, info, *, seed, global_batch):
        super().__init__(config, data, info, seed=seed, global_batch=global_batch)
        if info.get("mask_token_id") is None:
            raise BwskError("the prepared data has no mask token (prepared for another task): use another --out")
        self.mask_id, self.vocab = int(info["mask_token_id"]), int(config.vocab_size)
        self.fixed = {}  # evaluation masks, per split: drawn once for every block

    def plan(self, shape, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Which positions are targets and what each becomes; it depends on the shape and the
        generator only, never on the tokens, so rows can be drawn for the global batch and sliced."""
        choice = torch.rand(shape, generator=gen)
        chosen = choice < MASK_RATE
        chosen[torch.arange(shape[0]), choice.argmin(dim=1)] = True  # at least one target per block
        fate = torch.rand(shape, generator=gen)
        random_ids = torch.randint(0, self.vocab, shape, generator=gen)
        return chosen, chosen & (fate < MASK_SHARE), chosen & (fate >= 1 - RANDOM_SHARE), random_ids

    def apply(self, ids: torch.Tensor, plan) -> dict:
        chosen, to_mask, to_random, random_ids = plan
        inputs = torch.where(to_mask, self.mask_id, torch.where(to_random, random_ids, ids))
        return {"input_ids": inputs, "attention_mask": torch.ones_like(ids),
                "labels": torch.where(chosen, ids, IGNORE)}

    def batch(self, split, rows, *, step, offset=0):
        data = self.data[split]
        if step is None:  # evaluation: the split's fixed masks, drawn once for all its blocks
            if split not in self.fixed:
                # in chunks of EVAL_CHUNK blocks keyed on the chunk: a block's mask depends on its
                # split and index only, not on how many blocks the split has (--eval-rows)
                n, length = data.shape
                chunks = [self.plan((EVAL_CHUNK, length), _generator(EVAL_MASK_SEED, *split.encode(), start))
                          for start in range(0, n, EVAL_CHUNK)]
                self.fixed[split] = [torch.cat(parts)[:n] for parts in zip(*chunks)]
            return self.apply(data[rows], [p[rows] for p in self.fixed[split]])
        # the global batch's plan drawn whole (cheap) and this rank's rows taken: the same on any world
        plan = self.plan((self.global_batch, data.shape[1]), _generator(self.seed, step))
        return self.apply(data[rows], [p[offset:offset + rows.shape[0]] for p in plan])

    def head_inputs(self, outputs, batch):
        return outputs["hidden"], batch["labels"]

    def token_losses(self, outputs, batch):
        labels = batch["labels"]
        if "head" in outputs:
            return _head_ce(outputs["head"], outputs["hidden"], labels), (labels != IGNORE).float()
        return _ce(outputs["logits"], labels), (labels != IGNORE).float()

    def targets(self, batch):
        return (batch["labels"] != IGNORE).sum().to(torch.float64)


class ImageClassification(Objective):
    task = "image"
    metric = "accuracy"

    def __init__(self, config, data, info, *, seed, global_batch):
        super().__init__(config, data, info, seed=seed, global_batch=global_batch)
        self.size = int(info["image_size"])
        self.mean, self.std = info["mean"], info["std"]
        self.crop, self.flip = bool(info.get("crop", True)), bool(info.get("flip", True))

    def batch(self, split, rows, *, step, offset=0):
        from bwskc.train import images
        raw = self.data[split][rows]
        if step is None:
            pixels = images.center(raw, self.size)
        else:
            pixels = images.augment(raw, image_size=self.size, seed=self.seed, step=step, row_offset=offset,
                                    crop=self.crop, flip=self.flip)
        return {"pixel_values": images.normalise(pixels, self.mean, self.std),
                "labels": self.data[f"{split}_labels"][rows]}

    def token_losses(self, outputs, batch):
        losses = F.cross_entropy(outputs["logits"].float(), batch["labels"], reduction="none")[:, None]
        return losses, torch.ones_like(losses)

    def sums(self, outputs, batch, row_weight):
        base = super().sums(outputs, batch, row_weight)
        correct = ((outputs["logits"].argmax(-1) == batch["labels"]).double() * row_weight.double()).sum()
        return torch.stack([base[0], base[1], correct])

    def metrics(self, sums):
        return {"loss": float(sums[0] / sums[1]), "accuracy": float(sums[2] / sums[1])}

    def headline(self, metrics):
        return f"accuracy {100 * metrics['accuracy']:.2f}%"


OBJECTIVES = {o.task: o for o in (CausalLM, Seq2SeqLM, MaskedLM, ImageClassification)}


def objective(task: str, config, data: dict, info: dict, *, seed: int, global_batch: int) -> Objective:
    return OBJECTIVES[task](config, data, info, seed=seed, global_batch=global_batch)


def _ppl(loss: float) -> float:
    """Perplexity, inf rather than an OverflowError for a loss past exp's range."""
    return math.exp(loss) if loss < 700 else math.inf
