"""One training run: a model compiled in one mode, trained on its task's data, evaluated, checkpointed.

Everything a run does is a function of ``(seed, step)``: the data order of an epoch is a permutation
seeded with ``(seed, epoch)``, the dropout masks are counter-based and keyed on ``(seed, step)`` (the
compiled module is re-seeded before each step), as are the masked LM's masks and the images'
augmentations (``bwskc.train.objectives``), so a run resumed from a checkpoint at step k takes the
same steps k+1.. as a run that never stopped, and its metrics match record for record.

The loss is the task's (``objectives``: next-token, decoder-token or masked-token cross entropy, image
cross entropy). Evaluation runs the compiled module in eval mode (its evaluation capture) over every
row of a split; the last batch is padded with copies whose rows carry weight zero, so every row counts
exactly once.
"""
from __future__ import annotations

import json
import math
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from bwskc._deep import run_deep
from bwskc.errors import BwskError
from bwskc.runtime.head import scope as head_scope, try_split_head
from bwskc.train import checkpoint as ckpt
from bwskc.train import tasks
from bwskc.train.models import ModelSource, build_model, ir_program, resolve_model
from bwskc.train.objectives import objective, outputs_by_name

MODE_DIRS = {"conventional": "conventional", "analyzed": "bwsk-analyzed", "reversible": "bwsk-reversible"}
DEFAULT_LR = {"scratch": 6e-4, "finetune": 1e-4}
FAULT_KILL = "BWSKC_FAULT_KILL_AT_STEP"  # tests: SIGKILL this process right after that step
CHECK_AUTO_PARAMETERS = 50_000_000  # --check-gradients auto: the float64 check below this size


class TrainingDiverged(BwskError):
    """The loss or gradient norm became NaN or inf (exit status 1: the input was fine, training failed)."""
    exit_code = 1


@dataclass
class RunConfig:
    model: str
    mode: str                       # conventional | analyzed | reversible
    experiment: str                 # scratch | finetune
    out: str                        # this variant's directory
    data: str                       # the prepared data directory (bwskc.train.data_cache)
    init_from: str | None = None    # finetune: weights to start from (default: the model's own)
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 8
    seq_len: int = 128
    lr: float | None = None
    warmup: int | None = None
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    precision: str = "fp32"
    patience: int = 3
    seed: int = 0
    eval_every: int = 0             # steps between evaluations; 0: once per epoch
    save_every: int = 0             # steps between checkpoints besides evaluations; 0: at evaluations only
    device: str = "cpu"
    resume: bool = False
    nproc: int = 1
    ddp_timeout: float = 300.0      # seconds a rank waits for the others in a collective
    shard: bool = False             # --nproc N --shard: FSDP2 (sharded state) in place of DDP
    shard_axis: str | None = None   # --nproc N --shard-axis AXIS: the program split along AXIS (CALM plan)
    task: str = "causal"            # causal | seq2seq | masked | image (bwskc.train.tasks)
    check_gradients: str = "auto"   # reversible: compare with plain autograd first (auto: small models)
    compile: str = "off"            # training steps under torch.compile(fullgraph=True): off | inductor | aot_eager

    @property
    def name(self) -> str:
        return f"{self.experiment}-{MODE_DIRS[self.mode]}"

    def hyperparameters(self) -> dict:
        # no paths: a moved run directory resumes (the data is named by its digest, see Trainer)
        keep = ("epochs", "max_steps", "batch_size", "seq_len", "lr", "warmup", "weight_decay",
                "grad_clip", "precision", "patience", "seed", "eval_every", "nproc", "task")
        extra = {"shard_axis": self.shard_axis} if self.shard_axis else {}  # older runs resume as before
        return {k: getattr(self, k) for k in keep} | extra | {"optimizer": "AdamW", "schedule": "cosine-warmup"}


@dataclass
class World:
    """This process's place in a data-parallel group (size 1: no torch.distributed)."""
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass
class State:
    step: int = 0                   # optimizer steps taken
    best_val: float = math.inf
    best_step: int = -1
    bad_evals: int = 0              # evaluations since the best one (early stopping)
    stopped: str = ""
    elapsed_s: float = 0.0
    last_train: float | None = None  # mean training loss over the last evaluation interval
    losses: list = field(default_factory=list)  # training losses since the last evaluation
    parts: dict = field(default_factory=dict)  # the loss's reported parts (router losses), summed since then
    last_parts: dict = field(default_factory=dict)  # their means over the last evaluation interval
    best_metrics: dict = field(default_factory=dict)  # the validation metrics of the best evaluation


def lm_loss(logits, ids, weight=None):
    """Mean next-token cross entropy; ``weight`` (per block) zeroes padded blocks."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    flat = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="none").view(ids.shape[0], -1)
    if weight is None:
        return flat.mean()
    return (flat * weight[:, None]).sum(), weight.sum() * flat.shape[1]


def _autocast(cfg: RunConfig):
    if cfg.precision == "fp32":
        return torch.autocast(cfg.device.split(":")[0], enabled=False)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(cfg.device.split(":")[0], dtype=dtype)


def _param_groups(module, weight_decay: float):
    """Weight decay on matrices only: biases, norms' gains and other vectors are left alone."""
    decay, rest = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, cfg: RunConfig, world: World = World(), log=print):
        import bwskc
        from transformers import get_cosine_schedule_with_warmup
        self.cfg, self.world, self.log = cfg, world, log
        self.out = Path(cfg.out)
        self.blocks, self.data_info = ckpt.load_blocks(cfg.data)
        # the data-parallel group: every rank under --shard-axis (the ranks split each example along the
        # axis, not the batch: each reads the whole batch, and the loss is one process's)
        self.split_along = cfg.shard_axis if world.size > 1 else None
        self.dp = World(0, 1) if self.split_along else world
        if cfg.batch_size % self.dp.size:
            raise BwskError(f"--batch-size {cfg.batch_size} is not a multiple of --nproc {world.size}")
        if self.data_info.get("task", "causal") != cfg.task:
            raise BwskError(f"{cfg.data}: prepared for --task {self.data_info.get('task', 'causal')}, not "
                            f"{cfg.task}; use another --out")
        self.local = cfg.batch_size // self.dp.size
        n_train = self.blocks["train"].shape[0]
        self.per_epoch = n_train // cfg.batch_size
        if self.per_epoch == 0:
            raise BwskError(f"{cfg.data}: {n_train} training rows, fewer than one batch of {cfg.batch_size}: "
                            f"lower --batch-size" + (" or --seq-len" if cfg.task != "image" else ""))
        self.total = self.per_epoch * cfg.epochs if cfg.max_steps is None else min(
            cfg.max_steps, self.per_epoch * cfg.epochs)
        self.eval_every = cfg.eval_every or self.per_epoch
        self.save_every = cfg.save_every
        warmup = cfg.warmup if cfg.warmup is not None else max(1, self.total // 20)
        lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.experiment]
        cfg.lr, cfg.warmup = lr, warmup

        self.src: ModelSource = resolve_model(cfg.init_from or cfg.model)
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda" and world.size > 1:  # one GPU per rank
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", world.rank)))
        pretrained = cfg.experiment == "finetune"
        config = self.src.program if self.src.program is not None else self.src.config
        self.objective = objective(cfg.task, config, self.blocks, self.data_info, seed=cfg.seed,
                                   global_batch=cfg.batch_size)
        started = time.perf_counter()
        if self.src.program is not None:  # an IR file: the program itself, no model class
            self.hf = None
            program = ir_program(self.src, pretrained=pretrained, seed=cfg.seed)
            check = self.will_check(sum(w.numel() for w in program.weights.values()))
            self.module = bwskc.compile(program, mode=cfg.mode, seed=cfg.seed, check=check,
                                        **self._shard_options()).to(self.device)
        else:
            self.hf = build_model(self.src, pretrained=pretrained, seed=cfg.seed, task=cfg.task,
                                  classes=self.data_info.get("classes"),
                                  image_size=self.data_info.get("image_size")).to(self.device)
            args, kwargs = tasks.example_inputs(cfg.task, self.hf.config, self.batch(0))
            check = self.will_check(sum(p.numel() for p in self.hf.parameters()))
            self.module = bwskc.compile(self.hf, args, kwargs, mode=cfg.mode, seed=cfg.seed, check=check,
                                        **self._shard_options())
            self.hf.to("cpu")  # kept only as the layout save_pretrained writes; the module has its own copy
        self.log(f"{cfg.name}: lowered and compiled ({cfg.mode}{', gradients checked' if check else ''}) "
                 f"in {time.perf_counter() - started:.1f} s; {self.total} steps, evaluating every "
                 f"{self.eval_every}")
        # the order the compiled program takes its inputs in (the export's, not necessarily the task's)
        self.input_names = tuple(self.module.program.entry.input_names)
        self.head = None  # the LM head split off: training computes the loss without the full logits
        # FSDP reshards the head after forward; a sharded program returns its logits whole
        if self.objective.fused_head and not getattr(cfg, "shard", False) and not self.split_along:
            self.head, why = try_split_head(self.module)
            if why:
                self.log(f"{cfg.name}: training computes the full logits ({why})")
        self.model = self.module
        self.sharded = cfg.shard and world.size > 1
        if self.sharded:  # in place: the module's parameters become their DTensor shards
            from bwskc.train import distributed
            distributed.shard(self.module, self.device, world.size)
        elif self.dp.size > 1:
            from torch.nn.parallel import DistributedDataParallel
            # broadcast_buffers=False: the RNG state buffer is per rank (each rank its own mask slice);
            # the other buffers are constants (rotary tables), equal on every rank, or batch-norm
            # running statistics, which each rank updates from its rows and sync_statistics averages
            # over the ranks before every evaluation and checkpoint
            self.model = DistributedDataParallel(self.module, broadcast_buffers=False)
        if cfg.compile != "off":
            # one graph for every step: the step's dropout seed is a tensor inside it, read from the
            # buffer reseed() writes (bwskc.runtime.rng.step_seed), so the masks are eager's; the
            # evaluation and the memory measurement run the module itself, eagerly
            self.model = torch.compile(self.model, fullgraph=True, backend=cfg.compile)
        self.opt = torch.optim.AdamW(_param_groups(self.module, cfg.weight_decay), lr=lr, betas=(0.9, 0.95))
        self.sched = get_cosine_schedule_with_warmup(self.opt, warmup, self.total)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.state = State()
        self.metrics_path = self.out / "metrics.jsonl"

    def _shard_options(self) -> dict:
        """``bwskc.compile``'s ``shard=`` under ``--shard-axis``: the CALM plan along the axis over the
        ranks (a dim the ranks do not divide, or an axis the model lacks, is refused here, named)."""
        if not self.split_along:
            return {}
        if self.cfg.mode == "reversible":
            raise BwskError(f"{self.cfg.name}: --shard-axis runs conventional and analyzed programs")
        return {"shard": {self.split_along: self.world.size}}

    def _sharded_along(self) -> dict:
        """``--shard-axis``: the plan's axis, the forward collectives the measured step ran (bytes as
        produced), and whether they are exactly the plan's."""
        sch = self.module.schedule
        return {"axis": sch.axis, "nproc": sch.nproc, "barrier_sites": len(sch.barrier_sites()),
                "forward_collectives": len(self.comm_ran),
                "forward_payload_bytes": sum(b for _, _, b in self.comm_ran),  # as they ran
                "comm_as_planned": self.comm_as_planned}

    def will_check(self, parameters: int) -> bool:
        """Whether the reversible gradients are compared with plain autograd before training
        (``bwskc.compile(check=True)``: float64, dropout on, the first batch; a chain above the
        tolerance stops the run, named). ``auto``: below ``CHECK_AUTO_PARAMETERS`` parameters, where
        the float64 copies cost little."""
        cfg = self.cfg
        self.check_note = None
        if cfg.mode != "reversible" or cfg.check_gradients == "off":
            return False
        if cfg.check_gradients == "auto" and parameters > CHECK_AUTO_PARAMETERS:
            self.check_note = (f"skipped: {parameters:,} parameters, above --check-gradients auto's "
                               f"{CHECK_AUTO_PARAMETERS:,} (--check-gradients on runs it)")
            return False
        return True

    def hyperparameters(self) -> dict:
        """What a resumed run must share with the run it continues, the data's digest included."""
        return self.cfg.hyperparameters() | {"data_sha256": self.data_info.get("sha256")}

    # ------------------------------------------------------------------ data order
    def batch(self, step: int) -> dict:
        """This rank's rows of step ``step``'s global batch, as the task's inputs and labels."""
        epoch, i = divmod(step, self.per_epoch)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(self.blocks["train"].shape[0], generator=gen)
        rows = order[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]
        offset = self.dp.rank * self.local
        batch = self.objective.batch("train", rows[offset:offset + self.local], step=step, offset=offset)
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, model, batch: dict) -> dict:
        with _autocast(self.cfg), head_scope(self.head if self.module.training else None) as split:
            out = model(*[batch[n] for n in self.input_names])
        return self.named(out, split)

    def named(self, out, split=None) -> dict:
        """The outputs by name; with the split head, ``hidden`` and ``head`` in place of ``logits``."""
        named = outputs_by_name(self.module, out)
        return named if split is None else split.named(named)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str) -> dict:
        """The task's metrics over every row of ``split`` (``loss``, and perplexity or accuracy), the
        group's shards all-reduced."""
        n = self.objective.rows(split)
        span = self.local * self.dp.size
        padded = -(-n // span) * span
        self.module.eval()
        total = torch.zeros(3, dtype=torch.float64, device=self.device)  # nccl reduces device tensors
        bar = _progress(padded // span, 0, f"{self.cfg.name} {split}", disable=not self.world.main)
        for start in range(self.dp.rank * self.local, padded, span):
            rows = torch.arange(start, start + self.local)
            weight = (rows < n).to(torch.float32).to(self.device)
            batch = {k: v.to(self.device) for k, v in
                     self.objective.batch(split, rows.clamp(max=n - 1), step=None).items()}
            total += self.objective.sums(self.forward(self.module, batch), batch, weight)
            bar.update(1)
        bar.close()
        self.module.train()
        if self.sharded:  # the gathered parameters freed again (FSDP2 keeps the root's after forward)
            self.module.reshard()
        if self.dp.size > 1:
            import torch.distributed as dist
            dist.all_reduce(total)
        return self.objective.metrics(total)

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> tuple[float, float]:
        batch = self.batch(step)
        if self.split_along:
            # a run split along an axis draws as one process does: the same (seed, step) on every rank,
            # each shard drawing the single-process numbers at its global coordinates
            # (bwskc.runtime.rng.Window); the few random ops without a counter-based rule draw from
            # torch's generator, seeded alike on every rank, so a replicated value stays replicated
            self.module.reseed(self.cfg.seed, step)
            torch.manual_seed(self.cfg.seed * 1_000_003 + step)
        else:
            # the same seed on every rank, each drawing its rows' slice of the global batch's masks
            self.module.reseed(self.cfg.seed, step, shard=self.world.rank)
        count = self.objective.targets(batch)
        if self.dp.size > 1:  # the global batch's mean: ranks may hold different numbers of targets
            import torch.distributed as dist
            count = count.clone()
            dist.all_reduce(count)
            count = count / self.world.size
        loss, parts = self.objective.loss(self.forward(self.model, batch), batch, count)
        if self.dp.size > 1 and parts:  # logged as the loss is: the mean over the ranks, not rank 0's
            import torch.distributed as dist
            names = sorted(parts)
            mean = torch.tensor([parts[n] for n in names], dtype=torch.float64, device=self.device)
            dist.all_reduce(mean)
            parts = dict(zip(names, (mean / self.world.size).tolist()))
        for name, value in parts.items():  # logged, not judged
            self.state.parts[name] = self.state.parts.get(name, 0.0) + value
        seen = loss.detach()
        if self.dp.size > 1:  # the global batch's loss, so every rank logs and judges the same value
            import torch.distributed as dist
            seen = seen.clone()
            dist.all_reduce(seen)
            seen /= self.world.size
        if not torch.isfinite(seen):
            raise self.diverged("loss", float(seen), step)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.grad_clip or math.inf)
        if self.sharded:  # the norm over every rank's shards (a replicated DTensor)
            norm = norm.full_tensor()
        if not torch.isfinite(norm) and not self.scaler.is_enabled():
            raise self.diverged("gradient norm", float(norm), step)
        self.scaler.step(self.opt)  # with fp16 loss scaling, an inf step is skipped and the scale lowered
        self.scaler.update()
        self.sched.step()
        return float(seen), float(norm)

    def diverged(self, what: str, value: float, step: int) -> TrainingDiverged:
        last = ckpt.checkpoint_step(self.out)
        kept = (f"the last good checkpoint (step {last}) is kept in {self.out / ckpt.CHECKPOINT}"
                if last is not None else "no checkpoint was written yet")
        return TrainingDiverged(f"{self.cfg.name}: {what} is {value} at step {step + 1}: training stopped; "
                                f"{kept}")

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        from bwskc.runtime.memory import saved_bytes
        cfg, state = self.cfg, self.state
        if cfg.resume and ckpt.has_checkpoint(self.out):
            ckpt.restore(self.out, self.module, self.opt, self.sched, self.scaler, state, self.hyperparameters())
            if self.world.main:
                ckpt.truncate_metrics(self.metrics_path, state.step)
            self.log(f"{cfg.name}: resumed at step {state.step}")
        elif self.world.main:
            self.metrics_path.unlink(missing_ok=True)
        self.barrier()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
        first = self.batch(0)
        # the measuring forward is a training forward: it would move batch-norm running statistics,
        # so they are put back (a resumed run must continue from the checkpoint's, bit for bit)
        kept = {name: b.detach().clone() for name, b in self.module.named_buffers()}
        if self.sharded:  # measured whole: the gathered parameters are parameters, not activations
            self.module.unshard()
        # activation bytes of one training forward (deterministic; rng re-seeded)
        def measure():
            with _autocast(cfg), head_scope(self.head) as split:
                return saved_bytes(self.module, *[first[n] for n in self.input_names],
                                   loss=lambda out: self.objective.loss(self.named(out, split), first)[0])
        # a sharded module runs its program on bwskc's big-stack thread, where the saved-tensor hooks
        # must be installed too: this rank's activation bytes (its shards and what it gathered)
        act_bytes, _ = run_deep(measure) if self.split_along else measure()
        if self.split_along:  # the collectives that ran are the ones the plan predicted, entry by entry
            self.comm_ran = list(self.module.comm.log)
            self.comm_as_planned = self.comm_ran == self.module.schedule.comm
        with torch.no_grad():
            for name, b in self.module.named_buffers():
                b.copy_(kept[name])
        if self.sharded:
            self.module.reshard()
        bar = _progress(self.total, state.step, cfg.name, disable=not self.world.main)
        # throughput in the task's unit: tokens the model reads (images for an image task)
        tokens = self.local * self.dp.size * (1 if cfg.task == "image" else
                                                 cfg.seq_len * (2 if cfg.task == "seq2seq" else 1))
        kill_at = int(os.environ.get(FAULT_KILL, "0"))
        try:
            while state.step < self.total and not state.stopped:
                t0 = time.perf_counter()
                loss, norm = self.step(state.step)
                dt = time.perf_counter() - t0
                state.step += 1
                state.elapsed_s += dt
                state.losses.append(loss)
                self.record({"step": state.step, "epoch": state.step / self.per_epoch, "loss": loss,
                             "lr": self.sched.get_last_lr()[0], "grad_norm": norm,
                             ("images_per_s" if cfg.task == "image" else "tokens_per_s"): tokens / dt})
                bar.update(1)
                rate = {"tok_s" if cfg.task != "image" else "img_s": f"{tokens / dt:.0f}"}
                bar.set_postfix(loss=f"{loss:.3f}", **rate, mem=_mem_text(self.device))
                if kill_at and state.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if state.step % self.eval_every == 0 or state.step == self.total:
                    self.evaluate_and_save()
                elif self.save_every and state.step % self.save_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        return self.results(act_bytes, self.final_test())

    def sync_statistics(self):
        """Batch-norm running statistics averaged over the ranks (each updated them from its own rows;
        batch statistics in training are per rank, as DDP without SyncBatchNorm has them), so that
        every rank evaluates and rank 0 saves one model."""
        if self.dp.size == 1:  # --shard-axis: every rank's statistics are the whole batch's already
            return
        import torch.distributed as dist
        for name, b in self.module.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                dist.all_reduce(b)
                b /= self.world.size

    def evaluate_and_save(self):
        state = self.state
        self.sync_statistics()
        started = time.perf_counter()
        metrics = self.evaluate("valid")
        took = time.perf_counter() - started
        val = metrics["loss"]
        if not math.isfinite(val):
            raise self.diverged("validation loss", val, state.step - 1)
        train_loss = sum(state.losses) / max(1, len(state.losses))
        improved = val < state.best_val
        if improved:
            state.best_val, state.best_step, state.bad_evals = val, state.step, 0
            state.best_metrics = metrics
            gathered = self.gathered()  # sharded: every rank takes part in the gather
            if self.world.main:
                ckpt.save_model(self.out, self.module, self.hf, self.cfg, self.src.program, *gathered[:1])
        else:
            state.bad_evals += 1
            if state.bad_evals >= self.cfg.patience:
                state.stopped = "early_stopping"
        state.last_train = train_loss
        state.last_parts = {k: v / max(1, len(state.losses)) for k, v in state.parts.items()}
        state.losses, state.parts = [], {}
        self.record({"step": state.step, "epoch": state.step / self.per_epoch, "train_loss": train_loss,
                     **{f"train_{k}": v for k, v in state.last_parts.items()},
                     **{f"val_{k.replace('-', '_')}": v for k, v in metrics.items()}, "best": improved})
        self.save_checkpoint()
        self.barrier()  # the other ranks read the best weights only once they are written
        self.log(f"{self.cfg.name}: step {state.step}/{self.total} train loss {train_loss:.4f} "
                 f"val {self.objective.headline(metrics)}{' (best)' if improved else ''} "
                 f"[{self.objective.rows('valid')} rows in {took:.1f} s]")

    def gathered(self, optimizer: bool = False) -> tuple:
        """Sharded (``--shard``): the module's (and the optimizer's) state gathered whole, a collective
        every rank calls, kept on the main rank; unsharded: nothing, the objects' own states serve."""
        if not self.sharded:
            return ()
        from bwskc.train import distributed
        keep = self.world.main
        module = distributed.gathered_module_state(self.module, keep)
        return (module, distributed.gathered_optimizer_state(self.opt, keep)) if optimizer else (module,)

    def save_checkpoint(self):
        gathered = self.gathered(optimizer=True)
        if self.world.main:
            ckpt.save(self.out, self.module, self.opt, self.sched, self.scaler, self.state,
                      self.hyperparameters(), *gathered)

    def state_bytes(self) -> list[dict]:
        """Each rank's bytes of parameters, gradients and optimizer states (its local shards under
        ``--shard``), gathered from every rank (a collective)."""
        from bwskc.train import distributed
        if self.sharded:
            self.module.reshard()
        mine = distributed.state_bytes(self.module, self.opt)
        if self.world.size == 1:
            return [mine]
        import torch.distributed as dist
        ranks = [None] * self.world.size
        dist.all_gather_object(ranks, mine)
        return ranks

    def barrier(self):
        if self.world.size > 1:
            import torch.distributed as dist
            dist.barrier()

    def final_test(self) -> dict:
        """Test metrics of the best checkpoint (the weights saved at the best validation)."""
        ckpt.load_best(self.out, self.module, self.cfg.task)
        n = self.objective.rows("test")
        self.log(f"{self.cfg.name}: scoring the test split ({n} rows) with the best weights (step "
                 f"{self.state.best_step})")
        started = time.perf_counter()
        metrics = self.evaluate("test")
        self.log(f"{self.cfg.name}: test {self.objective.headline(metrics)} [{n} rows in "
                 f"{time.perf_counter() - started:.1f} s]")
        return metrics

    def record(self, row: dict):
        if self.world.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def results(self, act_bytes: int, test: dict) -> dict:
        cfg, state = self.cfg, self.state
        peak_rss = _peak_rss()
        cuda = self.device.type == "cuda"
        out = {
            "mode": cfg.mode, "experiment": cfg.experiment, "model": cfg.model, "variant": cfg.name,
            "init_from": cfg.init_from,
            "task": cfg.task, "metric": self.objective.metric,
            "final_loss": state.last_train,
            **_split_metrics("val", state.best_metrics or {"loss": state.best_val}, cfg.task),
            **_split_metrics("test", test, cfg.task),
            **({"final_" + k: v for k, v in state.last_parts.items()}),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(self.device) if cuda else peak_rss,
            "peak_memory_kind": "cuda.max_memory_allocated" if cuda else
            "peak resident memory of the process during training (VmHWM, reset after compiling)",
            "peak_rss_bytes": peak_rss, "activation_bytes": act_bytes,
            "time_s": state.elapsed_s, "epochs": state.step / self.per_epoch, "steps": state.step,
            "best_step": state.best_step, "stopped": state.stopped or (
                "max_steps" if cfg.max_steps is not None and state.step >= cfg.max_steps else "epochs"),
            "parameters": sum(p.numel() for p in self.module.parameters()),
            "data_parallel": "fsdp2" if self.sharded else "ddp" if self.dp.size > 1 else None,
            **({"sharded_along": self._sharded_along()} if self.split_along else {}),
            "state_bytes_per_rank": self.state_bytes(),
            "hyperparameters": self.hyperparameters(),
            "data": {k: v for k, v in self.data_info.items() if k != "files"},
            "device": _device_name(self.device), "torch": torch.__version__,
            "compile": cfg.compile,  # torch.compile backend of the training steps, or off
        }
        if cfg.mode == "reversible":
            rev = self.module.analyses.get("reversible")
            out["reversible"] = rev.summary() if hasattr(rev, "summary") else None
            report = getattr(self.module, "check_report", None)
            if report is not None:
                out["gradient_check"] = {"max_rel_error": report["max_rel_error"], "tolerance": report["tolerance"],
                                         "dtype": report["dtype"], "chains": len(report["chains"])}
            else:
                out["gradient_check"] = self.check_note or "off (--check-gradients off)"
        if cfg.mode == "analyzed":
            out["typing"] = {k: v for k, v in self.module.analyses["typing"].summary().items() if k != "defs"}
        return out


def _split_metrics(split: str, metrics: dict, task: str) -> dict:
    """``val_loss``/``val_perplexity`` (text: the seeds' keys; a masked LM's pseudo-perplexity under the
    same key, ``metric`` names it) or ``val_loss``/``val_accuracy`` (images)."""
    if task == "image":
        return {f"{split}_loss": metrics["loss"], f"{split}_accuracy": metrics.get("accuracy", math.nan)}
    return {f"{split}_loss": metrics["loss"], f"{split}_perplexity": _ppl(metrics["loss"])}


def _ppl(loss: float) -> float:
    """Perplexity, inf rather than an OverflowError for a loss past exp's range."""
    return math.exp(loss) if loss < 700 else math.inf


def _peak_rss() -> int:
    """This process's resident high-water mark since ``_reset_peak_rss`` (VmHWM; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    """Start the high-water mark at the current resident size, so the peak is the training loop's and
    not the lowering's or the tokenizer's (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _progress(total: int, initial: int, name: str, disable: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=name, unit="step", disable=disable or None,
                dynamic_ncols=True, leave=False)


def _mem_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.memory_allocated(device) / 2**20:.0f}MiB"
    return f"{_peak_rss() / 2**20:.0f}MiB"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
