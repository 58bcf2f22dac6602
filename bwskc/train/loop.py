"""One training run: a model compiled in one mode, trained on token blocks, evaluated, checkpointed.

Everything a run does is a function of ``(seed, step)``: the data order of an epoch is a permutation
seeded with ``(seed, epoch)``, the dropout masks are counter-based and keyed on ``(seed, step)`` (the
compiled module is re-seeded before each step), so a run resumed from a checkpoint at step k takes the
same steps k+1.. as a run that never stopped, and its metrics match record for record.

The loss is next-token cross entropy over the block (mean over tokens). Evaluation runs the compiled
module in eval mode (dropout off) over every block of a split; the last batch is padded with copies
whose tokens carry weight zero, so every block counts exactly once.
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

from bwskc.errors import BwskError
from bwskc.train import checkpoint as ckpt
from bwskc.train.models import ModelSource, build_model, ir_program, resolve_model

MODE_DIRS = {"conventional": "conventional", "analyzed": "bwsk-analyzed", "reversible": "bwsk-reversible"}
DEFAULT_LR = {"scratch": 6e-4, "finetune": 1e-4}
FAULT_KILL = "BWSKC_FAULT_KILL_AT_STEP"  # tests: SIGKILL this process right after that step


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

    @property
    def name(self) -> str:
        return f"{self.experiment}-{MODE_DIRS[self.mode]}"

    def hyperparameters(self) -> dict:
        # no paths: a moved run directory resumes (the data is named by its digest, see Trainer)
        keep = ("epochs", "max_steps", "batch_size", "seq_len", "lr", "warmup", "weight_decay",
                "grad_clip", "precision", "patience", "seed", "eval_every", "nproc")
        return {k: getattr(self, k) for k in keep} | {"optimizer": "AdamW", "schedule": "cosine-warmup"}


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
        if cfg.batch_size % world.size:
            raise BwskError(f"--batch-size {cfg.batch_size} is not a multiple of --nproc {world.size}")
        self.local = cfg.batch_size // world.size
        n_train = self.blocks["train"].shape[0]
        self.per_epoch = n_train // cfg.batch_size
        if self.per_epoch == 0:
            raise BwskError(f"{cfg.data}: {n_train} training blocks of {cfg.seq_len} tokens, fewer than one "
                            f"batch of {cfg.batch_size}: lower --batch-size or --seq-len")
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
        if self.src.program is not None:  # an IR file: the program itself, no model class
            self.hf = None
            program = ir_program(self.src, pretrained=pretrained, seed=cfg.seed)
            self.module = bwskc.compile(program, mode=cfg.mode, seed=cfg.seed).to(self.device)
        else:
            self.hf = build_model(self.src, pretrained=pretrained, seed=cfg.seed).to(self.device)
            example = self.blocks["train"][:self.local].to(self.device)
            self.module = bwskc.compile(self.hf, (example,), mode=cfg.mode, seed=cfg.seed)
            self.hf.to("cpu")  # kept only as the layout save_pretrained writes; the module has its own copy
        self.model = self.module
        if world.size > 1:
            from torch.nn.parallel import DistributedDataParallel
            # broadcast_buffers=False: the RNG state buffer is per rank (each rank its own mask slice);
            # the programs' other buffers are constants (rotary tables), equal on every rank anyway
            self.model = DistributedDataParallel(self.module, broadcast_buffers=False)
        self.opt = torch.optim.AdamW(_param_groups(self.module, cfg.weight_decay), lr=lr, betas=(0.9, 0.95))
        self.sched = get_cosine_schedule_with_warmup(self.opt, warmup, self.total)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16")
        self.state = State()
        self.metrics_path = self.out / "metrics.jsonl"

    def hyperparameters(self) -> dict:
        """What a resumed run must share with the run it continues, the data's digest included."""
        return self.cfg.hyperparameters() | {"data_sha256": self.data_info.get("sha256")}

    # ------------------------------------------------------------------ data order
    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.per_epoch)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        order = torch.randperm(self.blocks["train"].shape[0], generator=gen)
        rows = order[i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]
        rows = rows[self.world.rank * self.local:(self.world.rank + 1) * self.local]
        return self.blocks["train"][rows].to(self.device)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str) -> float:
        """Mean token loss over every block of ``split`` (the group's shards all-reduced)."""
        data = self.blocks[split]
        n = data.shape[0]
        span = self.local * self.world.size
        padded = -(-n // span) * span
        self.module.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # nccl reduces device tensors
        for start in range(self.world.rank * self.local, padded, span):
            rows = torch.arange(start, start + self.local)
            weight = (rows < n).to(torch.float32)
            ids = data[rows.clamp(max=n - 1)].to(self.device)
            with _autocast(self.cfg):
                logits = self.module(ids)
            loss_sum, count = lm_loss(logits, ids, weight.to(self.device))
            total += torch.stack([loss_sum.double(), count.double()])
        self.module.train()
        if self.world.size > 1:
            import torch.distributed as dist
            dist.all_reduce(total)
        return float(total[0] / total[1])

    # ------------------------------------------------------------------ one step
    def step(self, step: int) -> tuple[float, float]:
        ids = self.batch(step)
        # the same seed on every rank, each drawing its rows' slice of the global batch's masks
        self.module.reseed(self.cfg.seed, step, shard=self.world.rank)
        with _autocast(self.cfg):
            logits = self.model(ids)
        loss = lm_loss(logits, ids)
        seen = loss.detach()
        if self.world.size > 1:  # the global batch's loss, so every rank logs and judges the same value
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
        with _autocast(cfg):  # activation bytes of one training forward (deterministic; rng re-seeded)
            act_bytes, _ = saved_bytes(self.module, self.batch(0), loss=lambda out: lm_loss(out, self.batch(0)))
        bar = _progress(self.total, state.step, cfg.name, disable=not self.world.main)
        tokens = self.local * cfg.seq_len * self.world.size
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
                             "tokens_per_s": tokens / dt})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{math.exp(min(loss, 50)):.1f}",
                                tok_s=f"{tokens / dt:.0f}", mem=_mem_text(self.device))
                if kill_at and state.step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if state.step % self.eval_every == 0 or state.step == self.total:
                    self.evaluate_and_save()
                elif self.save_every and state.step % self.save_every == 0 and self.world.main:
                    ckpt.save(self.out, self.module, self.opt, self.sched, self.scaler, state, self.hyperparameters())
        finally:
            bar.close()
        test_loss = self.final_test()
        return self.results(act_bytes, test_loss)

    def evaluate_and_save(self):
        state = self.state
        val = self.evaluate("valid")
        if not math.isfinite(val):
            raise self.diverged("validation loss", val, state.step - 1)
        train_loss = sum(state.losses) / max(1, len(state.losses))
        improved = val < state.best_val
        if improved:
            state.best_val, state.best_step, state.bad_evals = val, state.step, 0
            if self.world.main:
                ckpt.save_model(self.out, self.module, self.hf, self.cfg, self.src.program)
        else:
            state.bad_evals += 1
            if state.bad_evals >= self.cfg.patience:
                state.stopped = "early_stopping"
        state.last_train = train_loss
        state.losses = []
        self.record({"step": state.step, "epoch": state.step / self.per_epoch, "train_loss": train_loss,
                     "val_loss": val, "val_perplexity": _ppl(val), "best": improved})
        if self.world.main:
            ckpt.save(self.out, self.module, self.opt, self.sched, self.scaler, state, self.hyperparameters())
        self.barrier()  # the other ranks read the best weights only once they are written
        self.log(f"{self.cfg.name}: step {state.step}/{self.total} train loss {train_loss:.4f} "
                 f"val ppl {_ppl(val):.2f}{' (best)' if improved else ''}")

    def barrier(self):
        if self.world.size > 1:
            import torch.distributed as dist
            dist.barrier()

    def final_test(self) -> float:
        """Test loss of the best checkpoint (the weights saved at the best validation)."""
        ckpt.load_best(self.out, self.module)
        return self.evaluate("test")

    def record(self, row: dict):
        if self.world.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def results(self, act_bytes: int, test_loss: float) -> dict:
        cfg, state = self.cfg, self.state
        peak_rss = _peak_rss()
        cuda = self.device.type == "cuda"
        out = {
            "mode": cfg.mode, "experiment": cfg.experiment, "model": cfg.model, "variant": cfg.name,
            "init_from": cfg.init_from,
            "final_loss": state.last_train,
            "val_loss": state.best_val, "val_perplexity": _ppl(state.best_val),
            "test_loss": test_loss, "test_perplexity": _ppl(test_loss),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(self.device) if cuda else peak_rss,
            "peak_memory_kind": "cuda.max_memory_allocated" if cuda else
            "peak resident memory of the process during training (VmHWM, reset after compiling)",
            "peak_rss_bytes": peak_rss, "activation_bytes": act_bytes,
            "time_s": state.elapsed_s, "epochs": state.step / self.per_epoch, "steps": state.step,
            "best_step": state.best_step, "stopped": state.stopped or (
                "max_steps" if cfg.max_steps is not None and state.step >= cfg.max_steps else "epochs"),
            "parameters": sum(p.numel() for p in self.module.parameters()),
            "hyperparameters": self.hyperparameters(),
            "data": {k: v for k, v in self.data_info.items() if k != "files"},
            "device": _device_name(self.device), "torch": torch.__version__,
        }
        if cfg.mode == "reversible":
            rev = self.module.analyses.get("reversible")
            out["reversible"] = rev.summary() if hasattr(rev, "summary") else None
        if cfg.mode == "analyzed":
            out["typing"] = {k: v for k, v in self.module.analyses["typing"].summary().items() if k != "defs"}
        return out


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
