"""``bwskc train``: the seeds' six variants (``{finetune,scratch}-{conventional,bwsk-analyzed,bwsk-reversible}``).

Order of work: every input is checked before anything is written (model, data, output directory,
options), so bad input is one line, exit 2, and nothing touched. Then the text is tokenized once into
``DIR/data/`` (the tokenizer, trained offline when the model has none, and the token blocks), and the
variants run, scratch before finetune: a model without weights is fine-tuned from the scratch
conventional run's best checkpoint. Each variant runs in its own process when there are several (peak
memory is then the variant's own). Finally ``DIR/results.json``, ``DIR/README.md`` and the plots.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import torch

from bwskc.errors import BwskError
from bwskc.train import checkpoint as ckpt
from bwskc.train.loop import MODE_DIRS, RunConfig
from bwskc.train.models import max_positions, resolve_model, vocab_size

MODES = tuple(MODE_DIRS)
EXPERIMENTS = ("scratch", "finetune")
DEFAULT_MODEL = "default"
PRECISIONS = ("fp32", "bf16", "fp16")


def add_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hugging Face directory or config.json, a hub id where reachable, or a directory "
                   "bwskc train wrote; default: a small Pythia-style GPT-NeoX shipped with bwskc")
    p.add_argument("--mode", default="all", choices=MODES + ("all",))
    p.add_argument("--experiment", default="all", choices=EXPERIMENTS + ("all",))
    p.add_argument("--data", default="stdlib",
                   help="a text file, a directory with train/valid/test files (../shared/data/wikitext-2 "
                   "follows its README's convention), a hub dataset id where reachable, or 'stdlib' "
                   "(default: the Python standard library's own sources, on every machine)")
    p.add_argument("--out", default="runs/train", help="output directory (default runs/train)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="global batch, in blocks of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 6e-4 scratch, "
                   "1e-4 finetune)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32; bf16 (autocast); fp16 (autocast with loss scaling, CUDA only)")
    p.add_argument("--patience", type=int, default=3, help="evaluations without improvement before stopping")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (default: each epoch)")
    p.add_argument("--save-every", type=int, default=0,
                   help="steps between resume checkpoints besides those at evaluations (default: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--resume", action="store_true", help="continue the runs in --out from their checkpoints")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes (DDP; gloo on CPU)")


def default_model_path() -> str:
    return str(resources.files("bwskc.train") / "default-model.json")


# ----------------------------------------------------------------------------------- checks
def _check_options(args) -> None:
    for name in ("epochs", "batch_size", "seq_len", "patience", "nproc"):
        if getattr(args, name) < 1:
            raise BwskError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise BwskError(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.batch_size % args.nproc:
        raise BwskError(f"--batch-size {args.batch_size} is not a multiple of --nproc {args.nproc}")
    if args.seq_len < 2:
        raise BwskError("--seq-len must be at least 2 (a block predicts its next tokens)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise BwskError(f"--device {args.device}: CUDA is not available on this machine")
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        raise BwskError("--precision fp16 needs CUDA (loss scaling); use bf16 or fp32 on CPU")
    if args.lr is not None and not args.lr > 0:
        raise BwskError(f"--lr must be positive, got {args.lr}")
    for name in ("eval_every", "save_every", "warmup", "weight_decay", "grad_clip"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            raise BwskError(f"--{name.replace('_', '-')} must be zero or more, got {value}")
    if not 0 <= args.seed < 2**31:
        raise BwskError(f"--seed must be in [0, 2**31), got {args.seed}")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise BwskError(f"--device {args.device}: not a device (cpu, cuda, cuda:N)") from None


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BwskError(f"{out}: exists and is not a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise BwskError(f"{out}: cannot write here ({parent} is not writable)")


def _variants(args) -> list[tuple[str, str]]:
    experiments = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    modes = MODES if args.mode == "all" else (args.mode,)
    return [(e, m) for e in experiments for m in modes]


# ----------------------------------------------------------------------------------- data
def existing_data(args, out: Path, splits) -> Path | None:
    """``DIR/data`` when an earlier command prepared it from the same text at the same --seq-len (reused,
    so every variant in DIR sees the same tokens); a mismatch is refused rather than overwritten."""
    where = out / "data"
    if not (where / ckpt.DATA_JSON).exists():
        if args.resume and out.is_dir() and any(out.iterdir()):
            raise BwskError(f"{where}: missing; cannot resume the runs in {out}")
        return None
    try:
        info = json.loads((where / ckpt.DATA_JSON).read_text())
    except (OSError, ValueError) as exc:
        raise BwskError(f"{where / ckpt.DATA_JSON}: unreadable ({type(exc).__name__})") from None
    if info.get("seq_len") != args.seq_len:
        raise BwskError(f"{where}: prepared with --seq-len {info.get('seq_len')}, not {args.seq_len}; "
                        f"use another --out")
    if splits is not None and info.get("source") != splits.source:
        raise BwskError(f"{where}: prepared from other text ({info.get('source')}); use another --out")
    return where


def tokenize(args, src, splits, batch_size: int):
    """Tokenizer and token blocks, in memory, with every check that can fail done before anything is
    written."""
    from bwskc.train.data import build_tokenizer, token_blocks
    vocab = vocab_size(src.program or src.config)
    tokenizer = build_tokenizer(splits, model_dir=src.tokenizer_dir, vocab_size=vocab, save_to=None)
    blocks = {name: token_blocks(tokenizer, getattr(splits, name), args.seq_len, what=f"the {name} split")
              for name in ("train", "valid", "test")}
    top = max(int(b.max()) for b in blocks.values())
    if top >= vocab:
        raise BwskError(f"{args.model}: the tokenizer gives id {top}, beyond the model's vocabulary {vocab}")
    if blocks["train"].shape[0] < batch_size:
        raise BwskError(f"{args.data}: {blocks['train'].shape[0]} training blocks of {args.seq_len} tokens, "
                        f"fewer than one batch of {batch_size}: lower --batch-size or --seq-len")
    info = {"source": splits.source, "note": splits.note, "seq_len": args.seq_len,
            "tokenizer": "the model's" if src.tokenizer_dir else "trained offline (byte-level BPE)",
            "blocks": {k: int(v.shape[0]) for k, v in blocks.items()},
            "tokens": {k: int(v.numel()) for k, v in blocks.items()}}
    return tokenizer, blocks, info


def save_data(out: Path, tokenizer, blocks, info) -> Path:
    where = out / "data"
    tokenizer.save_pretrained(str(where / "tokenizer"))
    ckpt.save_blocks(where, blocks, info)
    return where


# ----------------------------------------------------------------------------------- the command
def run_training(args) -> dict:
    from bwskc.train.data import load_text
    from bwskc.train.output import write_summary
    _check_options(args)
    _quiet_libraries()
    if args.model == DEFAULT_MODEL:
        args.model = default_model_path()
    out = Path(args.out)
    _check_writable(out)
    variants = _variants(args)
    if not args.resume:
        taken = [out / f"{e}-{MODE_DIRS[m]}" for e, m in variants if (out / f"{e}-{MODE_DIRS[m]}").exists()]
        if taken:
            raise BwskError(f"{taken[0]}: already exists; --resume continues it, or choose another --out")
    elif not out.is_dir():
        raise BwskError(f"{out}: nothing to resume (no such directory)")
    src = resolve_model(args.model)
    if src.program is not None:  # an IR program has fixed shapes: the run must use them
        batch, seq = src.program.entry.inputs[0].shape
        if (args.batch_size // args.nproc, args.seq_len) != (batch, seq):
            raise BwskError(f"{args.model}: the program takes i64[{batch},{seq}]: use --seq-len {seq} and "
                            f"--batch-size {batch * args.nproc} (per process {batch})")
    limit = max_positions(src.program or src.config)
    if limit is not None and args.seq_len > limit:
        raise BwskError(f"--seq-len {args.seq_len} exceeds the model's {limit} positions")
    finetune_from = _finetune_source(args, src, out, variants)
    splits = None if args.resume and (out / "data" / ckpt.DATA_JSON).exists() else load_text(args.data)
    data = existing_data(args, out, splits)
    prepared = None if data is not None else tokenize(args, src, splits, args.batch_size)

    out.mkdir(parents=True, exist_ok=True)  # every check has passed: now write
    if prepared is not None:
        data = save_data(out, *prepared)
    separate = len(variants) > 1 or args.nproc > 1
    results = {}
    for experiment, mode in variants:
        cfg = _config(args, experiment, mode, out, data, finetune_from if experiment == "finetune" else None)
        results[cfg.name] = _run_one(cfg, data, separate)
    return write_summary(out, results, args)


def _quiet_libraries() -> None:
    """Our progress bar is the one that matters: no loading/saving bars from the libraries."""
    import transformers
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers.utils.logging.disable_progress_bar()


def _finetune_source(args, src, out: Path, variants) -> str | None:
    """Where finetune starts: the model's own weights, else the scratch conventional run's best."""
    if not any(e == "finetune" for e, _ in variants) or src.weights_dir is not None or src.ir_weights:
        return None
    if not Path(args.model).exists():
        return None  # a hub id: from_pretrained fetches its weights
    scratch = out / f"scratch-{MODE_DIRS['conventional']}"
    if ("scratch", "conventional") in variants or (scratch / "model.safetensors").exists():
        return str(scratch)
    raise BwskError(f"{args.model}: has no weights to fine-tune (a config alone); use --experiment all "
                    f"(fine-tunes from the scratch conventional run) or give a model directory with weights")


def _config(args, experiment, mode, out, data, init_from) -> RunConfig:
    return RunConfig(model=args.model, mode=mode, experiment=experiment,
                     out=str(out / f"{experiment}-{MODE_DIRS[mode]}"), data=str(data), init_from=init_from,
                     epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                     seq_len=args.seq_len, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                     grad_clip=args.grad_clip, precision=args.precision, patience=args.patience,
                     seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
                     device=args.device, resume=args.resume,
                     nproc=args.nproc)


def _run_one(cfg: RunConfig, data: Path, separate: bool) -> dict:
    from bwskc.train import distributed
    from bwskc.train.worker import RESULTS, run_variant, write_config
    out = Path(cfg.out)
    done = out / RESULTS
    if cfg.resume and done.exists():
        print(f"{cfg.name}: already finished, kept")
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    for f in (data / "tokenizer").glob("*"):  # the tokenizer beside the model
        shutil.copy2(f, out / f.name)
    if not separate:
        return run_variant(cfg)
    config_path = out / "run_config.json"
    write_config(cfg, config_path)
    if cfg.nproc > 1:
        code = distributed.launch(str(config_path), cfg.nproc)
    else:
        code = subprocess.call([sys.executable, "-m", "bwskc.train.worker", str(config_path)])
    if code:
        raise _Quiet(code)
    return json.loads(done.read_text())


class _Quiet(BwskError):
    """A variant's process failed and printed its own one-line error: exit with its status, silently."""

    def __init__(self, code: int):
        super().__init__("")
        self.exit_code = code
