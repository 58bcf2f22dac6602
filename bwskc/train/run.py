"""``bwskc train``: the seeds' six variants (``{finetune,scratch}-{conventional,bwsk-analyzed,bwsk-reversible}``).

Order of work: every input is checked before anything is written (model, task, data, output
directory, options), so bad input is one line, exit 2, and nothing touched. The task follows from the
model (``bwskc.train.tasks``; ``--task`` overrides it). Then the data is prepared once into ``DIR/data/``
(text: the tokenizer, trained offline when the model has none, and the token blocks; images: the
decoded, resized pixels and their labels), and the variants run, scratch before finetune: a model without weights is fine-tuned from the scratch
conventional run's best checkpoint. Each variant runs in its own process when there are several (peak
memory is then the variant's own). Finally ``DIR/results.json``, ``DIR/README.md`` and the plots.

``--out`` is new, empty, or a directory ``bwskc train`` made (``bwskc-run.json``, written first): a
non-empty directory of anything else is refused, so a user's files are never written over. In a run
directory, variants it lacks may be added (its data reused); those it has are continued with ``--resume``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

from bwskc.errors import BwskError

# torch, transformers and the trainer's modules are imported when the command runs, not when its
# options are built (``bwskc --help`` starts in a fraction of a second): the constants below are the
# trainer's own (``tests/test_newcomer.py`` checks they match ``loop.MODE_DIRS`` and ``tasks.TASKS``)
MODE_DIRS = {"conventional": "conventional", "analyzed": "bwsk-analyzed", "reversible": "bwsk-reversible"}
TASKS = ("causal", "seq2seq", "masked", "image")
MODES = tuple(MODE_DIRS)
EXPERIMENTS = ("scratch", "finetune")
DEFAULT_MODEL = "default"
DEFAULT_MODEL_LABEL = "default (embedded Pythia-style GPT-NeoX)"
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_BACKENDS = ("off", "inductor", "aot_eager")  # --compile: torch.compile backends, or eager
RUN_MARKER = "bwskc-run.json"  # what makes a directory one bwskc train wrote (and may write into again)
MIN_DDP_TIMEOUT_S = 10.0  # a worker's start (importing torch) must fit in it


def add_arguments(p) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hugging Face directory or config.json, a hub id where reachable, or a directory "
                   "bwskc train wrote (default: %(default)s, a small Pythia-style GPT-NeoX shipped with bwskc)")
    p.add_argument("--task", default=None, choices=TASKS,
                   help="the objective (default: the model's own head: causal for GPT-style models, seq2seq "
                   "for T5/BART/Switch, masked for BERT-style encoders, image for image classifiers)")
    p.add_argument("--mode", default="all", choices=MODES + ("all",),
                   help="conventional (the program as lowered), analyzed (with the typing and CALM analyses), "
                   "reversible (residual chains as coupling layers) or all three (default: %(default)s)")
    p.add_argument("--experiment", default="all", choices=EXPERIMENTS + ("all",),
                   help="scratch (re-initialised weights), finetune (the model's weights, or for a config "
                   "alone the scratch conventional run's best) or all, scratch first (default: %(default)s)")
    p.add_argument("--data", default=None,
                   help="text tasks: a text file, a directory with train/valid/test files "
                   "(../shared/data/wikitext-2 follows its README's convention), a hub dataset id where "
                   "reachable, or 'stdlib' (default: the Python standard library's own sources, on every "
                   "machine); image tasks: an image folder DIR/{train,valid,test}/CLASS/*.png (or "
                   "DIR/CLASS/*.png, split 80/10/10), a hub dataset id where reachable, or 'digits' "
                   "(default: scikit-learn's handwritten digits, shipped with it)")
    p.add_argument("--check-gradients", default="auto", choices=("auto", "on", "off"),
                   help="reversible mode: before training, compare its gradients with plain autograd through "
                   "the same architecture (float64, dropout on, the first batch) and stop, naming the chain, "
                   "above 1e-8 relative; auto: for models up to 50M parameters (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None,
                   help="image tasks: the side images are cropped to (default: the config's image_size, "
                   "else 224)")
    p.add_argument("--augment", default="crop,flip",
                   help="image tasks: training augmentations, a comma list of crop and flip, or none "
                   "(default: %(default)s; seeded per step and image)")
    p.add_argument("--out", default="runs/train",
                   help="output directory (default: %(default)s): new, empty, or one bwskc train wrote "
                   f"(it holds {RUN_MARKER}), which may gain the variants it lacks; any other non-empty "
                   "directory is refused")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training split (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps, if fewer than --epochs take (default: no limit)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="global batch, in blocks of --seq-len tokens (images for image tasks; default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=128,
                   help="tokens per block (seq2seq: per encoder block and per decoder block; default: %(default)s)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 6e-4 scratch, "
                   "1e-4 finetune)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 5%% of the steps)")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay, on matrices only (default: %(default)s)")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="max gradient norm, 0: no clipping (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32; bf16 (autocast); fp16 (autocast with loss scaling, CUDA only) (default: %(default)s)")
    p.add_argument("--patience", type=int, default=3,
                   help="evaluations without improvement before stopping early (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of initialisation, data order, dropout, masks and augmentation (default: %(default)s)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="steps between evaluations, 0: once per epoch (default: %(default)s)")
    p.add_argument("--eval-rows", type=int, default=0, metavar="N",
                   help="score validation and test on their first N rows only (blocks or images; the "
                   "outputs say so), 0: every row (default: %(default)s)")
    p.add_argument("--save-every", type=int, default=0,
                   help="steps between resume checkpoints besides those at evaluations, 0: none (default: %(default)s)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda where available, else cpu)")
    p.add_argument("--compile", default="off", choices=COMPILE_BACKENDS,
                   help="run the training steps through torch.compile(module, fullgraph=True) with this "
                   "backend: inductor (generated kernels; a C++ compiler on CPU, minutes to compile), "
                   "aot_eager (traced, no codegen), off: eager; the same masks and gradients as eager; "
                   "evaluation runs eager (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue the variants in --out (a directory bwskc train wrote, possibly moved) from "
                   "their checkpoints, with the same options; finished variants are kept, a damaged "
                   "checkpoint is refused, an incomplete data/ is prepared again (default: off)")
    p.add_argument("--nproc", type=int, default=1, help="data-parallel processes (DDP; gloo on CPU, nccl on CUDA; default: %(default)s)")
    p.add_argument("--shard", action="store_true",
                   help="with --nproc N (at least 2): FSDP2 in place of DDP, each rank keeping 1/N of the "
                   "parameters, gradients and optimizer states (fully_shard; gloo on CPU, nccl on CUDA); the "
                   "same steps, and checkpoints gathered whole, as one process writes them (default: off)")
    p.add_argument("--shard-axis", default=None, choices=("sequence", "batch"),
                   help="with --nproc N (at least 2): run each step's program split along this CALM axis "
                   "(sequence, batch) over the N processes, as bwskc.compile(shard={AXIS: N}) does: every "
                   "rank reads the whole batch, its free regions run on its shard, each barrier runs the "
                   "collective the analysis names (bwskc lower --shard AXIS=N prints the plan); the "
                   "same gradients as one process, dropout masks drawn per shard; conventional and "
                   "analyzed modes (default: off, data parallel)")
    p.add_argument("--ddp-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="with --nproc: the longest a rank waits for the others in a collective (default: "
                   "%(default)s); a rank that stops running (its heartbeat stalls for a quarter of this, at most "
                   f"30 s) or dies ends the run at once, named, the others stopped (at least "
                   f"{MIN_DDP_TIMEOUT_S:g})")


def default_model_path() -> str:
    return str(resources.files("bwskc.train") / "default-model.json")


# ----------------------------------------------------------------------------------- checks
# (option, smallest value, what the value is): every numeric option, finite and in range
_INT_OPTIONS = (("epochs", 1), ("max_steps", 1), ("batch_size", 1), ("seq_len", 2), ("patience", 1),
                ("nproc", 1), ("warmup", 0), ("eval_every", 0), ("eval_rows", 0), ("save_every", 0),
                ("image_size", 8))
_FLOAT_OPTIONS = (("lr", 0.0, False), ("weight_decay", 0.0, True), ("grad_clip", 0.0, True),
                  ("ddp_timeout", MIN_DDP_TIMEOUT_S, True))  # (name, bound, bound allowed)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_numbers(args) -> None:
    for name, low in _INT_OPTIONS:
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise BwskError(f"{_flag(name)} must be at least {low}, got {value}")
    for name, bound, inclusive in _FLOAT_OPTIONS:
        value = getattr(args, name, None)
        if value is None:
            continue
        if not math.isfinite(value):
            raise BwskError(f"{_flag(name)} must be a finite number, got {value}")
        if value < bound or (value == bound and not inclusive):
            relation = "at least" if inclusive else "more than"
            raise BwskError(f"{_flag(name)} must be {relation} {bound:g}, got {value:g}")


def _check_options(args) -> None:
    import torch
    _check_numbers(args)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.batch_size % args.nproc and getattr(args, "shard_axis", None) is None:
        raise BwskError(f"--batch-size {args.batch_size} is not a multiple of --nproc {args.nproc}")
    if args.compile != "off" and getattr(args, "shard", False):
        raise BwskError("--compile with --shard is not supported (FSDP2's hooks under fullgraph compile "
                        "are untested here); use --compile off, or DDP without --shard")
    axis = getattr(args, "shard_axis", None)
    if axis is not None:
        if args.nproc < 2:
            raise BwskError(f"--shard-axis needs --nproc 2 or more (it splits the {axis} over the ranks), "
                            f"got --nproc {args.nproc}")
        if getattr(args, "shard", False):
            raise BwskError("--shard-axis and --shard are two ways to use the ranks: choose one")
        if args.compile != "off":
            raise BwskError("--compile with --shard-axis is not supported (the sharded runtime runs "
                            "eagerly); use --compile off")
        if args.mode == "reversible":
            raise BwskError("--shard-axis runs conventional and analyzed programs: reversible coupling "
                            "chains are not sharded yet (use --mode conventional or analyzed)")
        if args.precision != "fp32":
            raise BwskError(f"--shard-axis with --precision {args.precision}: the sharded runtime runs "
                            "fp32 only; use --precision fp32")
        if axis == "sequence" and args.seq_len % args.nproc:
            raise BwskError(f"--shard-axis sequence: --seq-len {args.seq_len} does not split evenly over "
                            f"--nproc {args.nproc} processes")
        if axis == "batch" and args.batch_size % args.nproc:
            raise BwskError(f"--shard-axis batch: --batch-size {args.batch_size} does not split evenly "
                            f"over --nproc {args.nproc} processes")
    if getattr(args, "shard", False) and args.nproc < 2:
        raise BwskError(f"--shard needs --nproc 2 or more (it shards over the ranks), got --nproc {args.nproc}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise BwskError(f"--device {args.device}: CUDA is not available on this machine")
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        raise BwskError("--precision fp16 needs CUDA (loss scaling); use bf16 or fp32 on CPU")
    augment = set(filter(None, args.augment.split(","))) - {"none"}
    if augment - {"crop", "flip"}:
        raise BwskError(f"--augment {args.augment}: choose from crop, flip (comma-separated) or none")
    if not 0 <= args.seed < 2**31:
        raise BwskError(f"--seed must be in [0, 2**31), got {args.seed}")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise BwskError(f"--device {args.device}: not a device (cpu, cuda, cuda:N)") from None


def _check_writable(out: Path) -> None:
    """Create (and remove) a directory where ``out`` will be made: ``os.access`` says yes to root on a
    read-only or permission-less filesystem, where the first real write would then fail mid-run."""
    if out.exists() and not out.is_dir():
        raise BwskError(f"{out}: exists and is not a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BwskError(f"{out}: cannot be made ({parent} is not a directory)")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".bwskc-probe-", dir=parent))
    except OSError as exc:
        raise BwskError(f"{out}: cannot write here ({parent}: {exc.strerror or type(exc).__name__})") from None


def is_run_directory(out: Path) -> bool:
    """A directory bwskc train wrote: its marker, or (written before the marker) its prepared data."""
    from bwskc.train import checkpoint as ckpt
    return (out / RUN_MARKER).is_file() or (out / ckpt.DATA / ckpt.DATA_JSON).is_file()


def _check_out(args, out: Path, variants) -> None:
    """The rule of --out (see the module docstring); nothing is written here."""
    empty = not out.exists() or not any(out.iterdir())
    if not empty and not is_run_directory(out):
        raise BwskError(f"{out}: not empty and not a directory bwskc train wrote (no {RUN_MARKER}): "
                        f"choose a new or empty --out")
    if args.resume:
        if not out.is_dir():
            raise BwskError(f"{out}: nothing to resume (no such directory)")
        return
    taken = [out / f"{e}-{MODE_DIRS[m]}" for e, m in variants if (out / f"{e}-{MODE_DIRS[m]}").exists()]
    if taken:
        raise BwskError(f"{taken[0]}: already exists; --resume continues it, or choose another --out")


def _check_checkpoints(out: Path, variants) -> None:
    """--resume: every unfinished variant's checkpoint is whole before anything is written."""
    from bwskc.train import checkpoint as ckpt
    from bwskc.train.worker import RESULTS
    for e, m in variants:
        variant = out / f"{e}-{MODE_DIRS[m]}"
        if not (variant / RESULTS).exists() and ckpt.has_checkpoint(variant):
            ckpt.check(variant)


def _variants(args) -> list[tuple[str, str]]:
    experiments = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    modes = MODES if args.mode == "all" else (args.mode,)
    if getattr(args, "shard_axis", None) is not None:  # coupling chains are not sharded (yet)
        modes = tuple(m for m in modes if m != "reversible")
    return [(e, m) for e in experiments for m in modes]


# ----------------------------------------------------------------------------------- data
ABSENT = "absent"


def data_state(out: Path) -> str | None:
    """None when ``DIR/data`` is whole; else why not (``ABSENT``, or what is incomplete or damaged).
    Computed once: it reads every file's digest."""
    from bwskc.train import checkpoint as ckpt
    where = out / ckpt.DATA
    return ckpt.data_problem(where) if where.exists() else ABSENT


def existing_data(args, out: Path, splits, state: str | None) -> Path | None:
    """``DIR/data`` when an earlier command prepared it, whole, for the same task from the same data at
    the same --seq-len (--image-size) (reused, so every variant in DIR sees the same rows); a mismatch
    is refused rather than overwritten; an incomplete one (a kill while it was written) is None:
    prepared again."""
    from bwskc.train import checkpoint as ckpt
    where = out / ckpt.DATA
    if state is not None:
        if state != ABSENT:
            print(f"{where}: {state}; preparing it again")
        return None
    info = json.loads((where / ckpt.DATA_JSON).read_text())
    if info.get("task", "causal") != args.task:
        raise BwskError(f"{where}: prepared for --task {info.get('task', 'causal')}, not {args.task}; use "
                        f"another --out")
    if args.task == "image":
        if info.get("image_size") != args.image_size:
            raise BwskError(f"{where}: prepared with --image-size {info.get('image_size')}, not "
                            f"{args.image_size}; use another --out")
        if not args.resume and info.get("spec") != (args.data or "digits"):
            raise BwskError(f"{where}: prepared from other images ({info.get('spec')}); use another --out")
        augment = set(filter(None, args.augment.split(","))) - {"none"}
        if (info.get("crop"), info.get("flip")) != ("crop" in augment, "flip" in augment):
            before = ",".join(k for k in ("crop", "flip") if info.get(k)) or "none"
            raise BwskError(f"{where}: prepared with --augment {before}, not {args.augment}; use another --out")
    eval_rows = getattr(args, "eval_rows", 0)
    if info.get("eval_rows", 0) != eval_rows:
        raise BwskError(f"{where}: prepared with --eval-rows {info.get('eval_rows', 0)}, not {eval_rows}; "
                        f"use another --out")
    if args.task != "image" and info.get("seq_len") != args.seq_len:
        raise BwskError(f"{where}: prepared with --seq-len {info.get('seq_len')}, not {args.seq_len}; "
                        f"use another --out")
    if splits is not None and info.get("source") != splits.source:
        raise BwskError(f"{where}: prepared from other text ({info.get('source')}); use another --out")
    return where


def tokenize(args, src, splits, batch_size: int):
    """Tokenizer and token blocks, in memory, with every check that can fail done before anything is
    written. A seq2seq block is two ``--seq-len`` halves: what the encoder reads, what the decoder
    predicts."""
    from bwskc.train.models import vocab_size
    from bwskc.train.data import build_tokenizer, token_blocks
    vocab = vocab_size(src.program or src.config)
    tokenizer = build_tokenizer(splits, model_dir=src.tokenizer_dir, vocab_size=vocab, save_to=None,
                                mask=args.task == "masked")
    length = args.seq_len * (2 if args.task == "seq2seq" else 1)
    blocks = {name: token_blocks(tokenizer, getattr(splits, name), length, what=f"the {name} split")
              for name in ("train", "valid", "test")}
    note = _cap_evaluation(args, blocks, splits.note)
    top = max(int(b.max()) for b in blocks.values())
    if top >= vocab:
        raise BwskError(f"{args.model}: the tokenizer gives id {top}, beyond the model's vocabulary {vocab}")
    if blocks["train"].shape[0] < batch_size:
        raise BwskError(f"{args.data}: {blocks['train'].shape[0]} training blocks of {args.seq_len} tokens, "
                        f"fewer than one batch of {batch_size}: lower --batch-size or --seq-len")
    info = {"task": args.task, "source": splits.source, "note": note, "seq_len": args.seq_len,
            "eval_rows": getattr(args, "eval_rows", 0), "rows_before_cap": getattr(args, "rows_before_cap", None),
            "tokenizer": "the model's" if src.tokenizer_dir else "trained offline (byte-level BPE)",
            "blocks": {k: int(v.shape[0]) for k, v in blocks.items()},
            "tokens": {k: int(v.numel()) for k, v in blocks.items()}}
    if args.task == "masked":
        info["mask_token_id"] = int(tokenizer.mask_token_id)
    return tokenizer, blocks, info


def prepare_images(args, src, batch_size: int):
    """Pixels and labels of the three splits, in memory, checked before anything is written."""
    from bwskc.train import images
    config = src.config
    found = images.load_images(args.data or "digits", image_size=args.image_size,
                               channels=int(getattr(config, "num_channels", 3)))
    mean, std = images.image_stats(src.weights_dir, config)
    blocks = {}
    for name in ("train", "valid", "test"):
        pixels, labels = getattr(found, name)
        blocks[name], blocks[f"{name}_labels"] = pixels, labels
    for name in ("valid", "test"):
        if blocks[name].shape[0] == 0:
            raise BwskError(f"{args.data or 'digits'}: the {name} split has no images (too few per class to "
                            f"carve one out of train): give it its own folder or more images")
    if blocks["train"].shape[0] < batch_size:
        raise BwskError(f"{args.data or 'digits'}: {blocks['train'].shape[0]} training images, fewer than "
                        f"one batch of {batch_size}: lower --batch-size")
    augment = sorted(set(filter(None, args.augment.split(","))) - {"none"})
    note = _cap_evaluation(args, blocks, found.note)
    info = {"task": "image", "spec": args.data or "digits", "source": found.source, "note": note,
            "eval_rows": getattr(args, "eval_rows", 0), "rows_before_cap": getattr(args, "rows_before_cap", None),
            "image_size": args.image_size,
            "stored_size": found.stored_size, "classes": list(found.classes), "mean": list(mean),
            "std": list(std), "crop": "crop" in augment, "flip": "flip" in augment,
            "tokenizer": None, "blocks": {k: int(blocks[k].shape[0]) for k in ("train", "valid", "test")}}
    return None, blocks, info


def _cap_evaluation(args, blocks: dict, note: str) -> str:
    """--eval-rows N: validation and test keep their first N rows (the leading documents' blocks, or
    images), in place; the split note says so, with the counts, for every output that shows it."""
    if not getattr(args, "eval_rows", 0):
        return note
    args.rows_before_cap = {k: int(blocks[k].shape[0]) for k in ("train", "valid", "test")}
    said = []
    for name in ("valid", "test"):
        n = int(blocks[name].shape[0])
        if n > args.eval_rows:
            blocks[name] = blocks[name][:args.eval_rows]
            if f"{name}_labels" in blocks:
                blocks[f"{name}_labels"] = blocks[f"{name}_labels"][:args.eval_rows]
        said.append(f"{'validation' if name == 'valid' else 'test'} {min(n, args.eval_rows)} of {n} rows")
    cap = (f"Evaluation capped by --eval-rows {args.eval_rows}: {', '.join(said)} (each split's first rows) "
           "are scored.")
    return f"{note.rstrip('.')}. {cap}" if note else cap


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def looks_like_images(path: Path, depth: int = 3) -> bool:
    """A directory with image files within ``depth`` levels (CLASS/x.png, split/CLASS/x.png)."""
    if not path.is_dir():
        return False
    level = [path]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                children = sorted(d.iterdir())[:1000]  # a look, not a walk of a user's whole disk
            except OSError:
                continue
            if any(c.is_file() and c.suffix.lower() in IMAGE_SUFFIXES for c in children):
                return True
            nxt += [c for c in children if c.is_dir() and not c.name.startswith(".")]
        level = nxt[:200]
    return False


def _check_data_kind(args, src) -> None:
    """Text for a text task, images for an image task: a mix-up is one line, before anything is read
    at length."""
    if args.data is None:
        return
    path = Path(args.data)
    kind = type(src.config).__name__ if src.config is not None else "an IR program"
    if args.task == "image" and path.exists() and not looks_like_images(path):
        raise BwskError(f"{args.data}: not an image folder (no CLASS/*.png|jpg images), and a {kind} is an "
                        "image classifier: give --data DIR/{train,valid,test}/CLASS/*.png or 'digits'")
    if args.task != "image" and path.is_dir() and looks_like_images(path):
        raise BwskError(f"{args.data}: an image folder, and a {kind} trains on text (--task {args.task}): "
                        "give a text file or directory, or an image classifier")


# ----------------------------------------------------------------------------------- the command
def run_training(args) -> dict:
    from bwskc.train.data import load_text
    from bwskc.train.models import max_positions, resolve_model
    from bwskc.train.tasks import choose_task
    _check_options(args)
    _quiet_libraries()
    args.model_label = args.model  # as the user gave it: the run README's title
    if args.model == DEFAULT_MODEL:
        args.model_label = DEFAULT_MODEL_LABEL
        args.model = default_model_path()
    out = Path(args.out)
    _check_writable(out)
    variants = _variants(args)
    _check_out(args, out, variants)
    if args.resume:
        _check_checkpoints(out, variants)
    src = resolve_model(args.model)
    if src.program is not None:
        if args.task not in (None, "causal"):
            raise BwskError(f"{args.model}: an IR program trains as a causal LM (its one i64 input), not "
                            f"--task {args.task}")
        args.task = "causal"
    else:
        args.task = choose_task(args.model, src.config, args.task)
    if args.task == "image":
        from bwskc.train.images import image_size_of
        args.image_size = args.image_size or image_size_of(src.config)
    _check_data_kind(args, src)
    if src.program is not None:  # an IR program has fixed shapes: the run must use them
        batch, seq = src.program.entry.inputs[0].shape
        ranks = 1 if getattr(args, "shard_axis", None) else args.nproc  # sharded: every rank the whole batch
        if (args.batch_size // ranks, args.seq_len) != (batch, seq):
            raise BwskError(f"{args.model}: the program takes i64[{batch},{seq}]: use --seq-len {seq} and "
                            f"--batch-size {batch * ranks} (per process {batch})")
    limit = max_positions(src.program or src.config)
    if args.task != "image" and limit is not None and args.seq_len > limit:
        raise BwskError(f"--seq-len {args.seq_len} exceeds the model's {limit} positions")
    finetune_from = _finetune_source(args, src, out, variants)
    state = data_state(out)
    started = time.perf_counter()
    if args.task == "image":
        data = existing_data(args, out, None, state) if state is None else None
        prepared = None if data is not None else prepare_images(args, src, args.batch_size)
    else:
        splits = None if args.resume and state is None else load_text(args.data or "stdlib")
        data = existing_data(args, out, splits, state)
        prepared = None if data is not None else tokenize(args, src, splits, args.batch_size)
    prepare_s = time.perf_counter() - started
    try:  # every check has passed: now write, and a failing write is one line naming the path
        return _write_runs(args, out, variants, data, prepared, finetune_from, prepare_s)
    except OSError as exc:
        raise BwskError(write_error(exc, out)) from None


def write_error(exc: OSError, where: Path) -> str:
    return f"{exc.filename or where}: cannot write the run's outputs ({exc.strerror or type(exc).__name__})"


def _write_runs(args, out: Path, variants, data, prepared, finetune_from, prepare_s: float = 0.0) -> dict:
    from bwskc.train import checkpoint as ckpt
    from bwskc import __version__
    from bwskc.files import write_text_atomic
    from bwskc.train.output import write_summary
    out.mkdir(parents=True, exist_ok=True)
    if not (out / RUN_MARKER).exists():
        write_text_atomic(out / RUN_MARKER, json.dumps({"schema": "bwskc.train/1",
                                                        "bwskc": __version__}) + "\n")
    if prepared is not None:
        data = ckpt.save_data(out, *prepared)
        info = prepared[2]
        print(f"data: {info['source'].split(' (')[0]}; {info.get('tokenizer') or 'images'}; rows "
              f"train/valid/test {'/'.join(str(info['blocks'][k]) for k in ('train', 'valid', 'test'))}; "
              f"prepared in {prepare_s:.1f} s", flush=True)
    separate = len(variants) > 1 or args.nproc > 1
    results = {}
    for i, (experiment, mode) in enumerate(variants, 1):
        cfg = _config(args, experiment, mode, out, data, finetune_from if experiment == "finetune" else None)
        print(f"[{i}/{len(variants)}] {cfg.name}", flush=True)
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
    from bwskc.train.loop import RunConfig
    return RunConfig(model=args.model, mode=mode, experiment=experiment,
                     out=str(out / f"{experiment}-{MODE_DIRS[mode]}"), data=str(data), init_from=init_from,
                     epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                     seq_len=args.seq_len, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                     grad_clip=args.grad_clip, precision=args.precision, patience=args.patience,
                     seed=args.seed, eval_every=args.eval_every, save_every=args.save_every,
                     device=args.device, resume=args.resume,
                     nproc=args.nproc, ddp_timeout=args.ddp_timeout, shard=getattr(args, "shard", False),
                     shard_axis=getattr(args, "shard_axis", None), task=args.task,
                     check_gradients=args.check_gradients, compile=args.compile)


def _run_one(cfg: RunConfig, data: Path, separate: bool) -> dict:
    from bwskc.train import distributed, output
    from bwskc.train.worker import RESULTS, run_variant, write_config
    out = Path(cfg.out)
    done = out / RESULTS
    if cfg.resume and done.exists():
        print(f"{cfg.name}: already finished, kept")
        return output.read_results(done)
    out.mkdir(parents=True, exist_ok=True)
    for f in (data / "tokenizer").glob("*"):  # the tokenizer beside the model
        shutil.copy2(f, out / f.name)
    if not separate:
        return run_variant(cfg)
    config_path = out / "run_config.json"
    write_config(cfg, config_path)
    distributed.launch(str(config_path), cfg.nproc, cfg.name, cfg.ddp_timeout)
    return output.read_results(done)

