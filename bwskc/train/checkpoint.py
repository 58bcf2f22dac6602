"""What a run writes and reads back: the published model, the resume checkpoint, the prepared data.

No pickle anywhere: tensors go through safetensors, everything else through JSON, so reading a
checkpoint never runs code. Writes are atomic (a temporary directory renamed into place), so a run
killed while saving leaves the previous checkpoint whole. Every checkpoint and the prepared data carry
the sha256 of each of their files, checked before they are read: a flipped byte is a one-line refusal,
not a silently different run. Nothing stores an absolute path, so a run directory can be moved.

``DIR/<variant>/``: ``model.safetensors`` and ``config.json`` (``save_pretrained`` of the model class
with the best weights: a conventional variant loads with ``AutoModelForCausalLM.from_pretrained``),
``bwskc.json`` (how it was compiled, its task, for ``bwskc.load_trained``), ``checkpoint/`` (the last state, for
``--resume``), ``metrics.jsonl``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from bwskc.errors import BwskError
from bwskc.files import honour_umask, write_text_atomic  # noqa: F401  (ckpt.write_text_atomic)

CHECKPOINT = "checkpoint"
BWSKC_JSON = "bwskc.json"
BLOCKS = "blocks.safetensors"
DATA_JSON = "data.json"
DATA = "data"
TOKENIZER = "tokenizer"
CHECKSUMS = "checksums.json"
CHECKPOINT_FILES = ("module.safetensors", "optimizer.safetensors", "state.json")
FAULT_KILL_IN_DATA = "BWSKC_FAULT_KILL_IN_DATA"  # tests: SIGKILL this process while data/ is written


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------- prepared data
def blocks_bytes(blocks: dict[str, torch.Tensor]) -> bytes:
    """The token blocks as the bytes of ``blocks.safetensors`` (their sha256 names the data)."""
    return safetensors_bytes({k: v.contiguous() for k, v in blocks.items()})


def save_data(out: Path, tokenizer, blocks: dict[str, torch.Tensor], info: dict) -> Path:
    """Write ``out/data`` whole or not at all: built as ``data.tmp`` (``data.json``, with every file's
    sha256, written last), then renamed into place. A kill leaves no ``data/`` or a complete one."""
    final, tmp = out / DATA, out / (DATA + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if tokenizer is not None:  # images have none
        tokenizer.save_pretrained(str(tmp / TOKENIZER))
    (tmp / BLOCKS).write_bytes(blocks_bytes(blocks))
    if os.environ.get(FAULT_KILL_IN_DATA):
        os.kill(os.getpid(), signal.SIGKILL)
    files = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / DATA_JSON).write_text(json.dumps({**info, "sha256": files[BLOCKS], "files": files}, indent=1) + "\n")
    if final.exists():  # an incomplete one (data_problem said so): replaced, not mixed with the new
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def data_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a complete prepared data directory, or None when it is."""
    try:
        info = json.loads((directory / DATA_JSON).read_text())
    except FileNotFoundError:
        return f"incomplete (no {DATA_JSON}: stopped while it was written)"
    except (OSError, ValueError) as exc:
        return f"{DATA_JSON} unreadable ({type(exc).__name__})"
    if not isinstance(info, dict):
        return f"{DATA_JSON} is not a JSON object"
    files = info.get("files", {BLOCKS: None})  # written before checksums: data.json came last anyway
    if not isinstance(files, dict) or BLOCKS not in files:
        return f"{DATA_JSON} lists no {BLOCKS}"
    for name, digest in files.items():
        path = directory / str(name)
        if not path.is_file():
            return f"{name} is missing"
        if digest is not None and file_sha256(path) != digest:
            return f"{name} is damaged (its sha256 differs from the one in {DATA_JSON})"
    return None


def load_data_info(directory: Path) -> dict:
    """``data.json`` of a complete data directory; a damaged one is one line naming the problem."""
    problem = data_problem(directory)
    if problem is not None:
        raise BwskError(f"{directory}: prepared data {problem}")
    return json.loads((directory / DATA_JSON).read_text())


def load_blocks(directory) -> tuple[dict[str, torch.Tensor], dict]:
    directory = Path(directory)
    info = load_data_info(directory)
    try:
        return load_file(str(directory / BLOCKS)), info
    except (OSError, SafetensorError, ValueError) as exc:
        raise BwskError(f"{directory / BLOCKS}: prepared data unreadable ({type(exc).__name__})") from None


# ------------------------------------------------------------------------------- published model
def _module_state(module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers under their state-dict names, as independent CPU tensors."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _bwskc_json(cfg, **extra) -> str:
    return json.dumps({"mode": cfg.mode, "experiment": cfg.experiment, "task": cfg.task,
                       "batch_size": cfg.batch_size // (1 if getattr(cfg, "shard_axis", None) else max(1, cfg.nproc)), "seq_len": cfg.seq_len,
                       "seed": cfg.seed, "model": cfg.model, **extra}, indent=1) + "\n"


def save_model(out: Path, module, hf_model, cfg, source_program=None, module_state=None) -> None:
    """The module's weights in the model class's own layout (``save_pretrained``), plus ``bwskc.json``.
    An IR model (no class) is saved as ``model.safetensors`` beside its program ``model.bwsk``.
    ``module_state``: the state dict to write, when the module's own is sharded (``--shard``: gathered
    by ``distributed.gathered_module_state``), so the files are those of a single process."""
    if hf_model is None:
        _save_ir_model(out, module, cfg, source_program, module_state)
        return
    state = _module_state(module) if module_state is None else module_state
    own = hf_model.state_dict()
    # buffers the class does not save (non-persistent: rotary tables, BERT's position ids) are
    # constants of the program, not trained state
    unsaved = {name for name, _ in hf_model.named_buffers()} - set(own)
    missing = [k for k in state if k not in own and k not in unsaved]
    if missing and any(not k.endswith("inv_freq") for k in missing):
        raise BwskError(f"{cfg.name}: parameters the model class does not have: {missing[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                own[k].copy_(v)
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_model.save_pretrained(str(tmp), safe_serialization=True)
    honour_umask(*(f for f in tmp.iterdir() if f.is_file()))
    (tmp / BWSKC_JSON).write_text(_bwskc_json(cfg))
    if cfg.mode == "reversible":  # loadable with the task's Auto class and trust_remote_code=True
        from bwskc.train.pretrained import write_remote_code
        write_remote_code(tmp, cfg.task)
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()
    if cfg.mode == "reversible" and not (out / "program.bwsk").exists():
        (out / "program.bwsk").write_text(module.program.text())


def _save_ir_model(out: Path, module, cfg, program, module_state=None) -> None:
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trained = _module_state(module) if module_state is None else module_state  # parameters and persistent buffers; constants stay as bound
    state = {k: (trained[k] if k in trained else module.program.weights[k].detach().cpu()).contiguous()
             for k in program.tensors}
    save_file(state, str(tmp / "model.safetensors"))
    honour_umask(tmp / "model.safetensors")
    (tmp / "model.bwsk").write_text(program.text())
    (tmp / "config.json").write_text(json.dumps({"bwskc_program": "model.bwsk", "name": program.name,
                                                 "vocab_size": program.entry.outputs[0].shape[-1]}) + "\n")
    (tmp / BWSKC_JSON).write_text(_bwskc_json(cfg, ir="model.bwsk"))
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()


def load_best(out: Path, module, task: str = "causal") -> None:
    """Load the published (best) weights back into the module, through the task's ``from_pretrained``
    (or, for an IR model, from ``model.safetensors``)."""
    from bwskc.train.tasks import auto_class
    if (out / "model.bwsk").is_file():
        load_into(module, load_file(str(out / "model.safetensors")), str(out / "model.safetensors"))
        return
    hf = auto_class(task).from_pretrained(str(out), local_files_only=True)
    load_into(module, hf.state_dict(), str(out / "model.safetensors"))


def load_into(module, state: dict, where: str) -> None:
    """Parameters and buffers from ``state``; a buffer it lacks (a constant the model class does not
    save, e.g. position ids) keeps the program's value, a parameter it lacks is refused. A sharded
    parameter (``--shard``: a DTensor) takes its own slice of the whole tensor ``state`` holds."""
    own = module.state_dict()
    params = {name for name, _ in module.named_parameters()}
    absent = [k for k, v in own.items() if k not in state and k in params]
    if absent:
        raise BwskError(f"{where}: missing weights {absent[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                if state[k].shape != v.shape:
                    raise BwskError(f"{where}: {k} has shape {list(state[k].shape)}, expected {list(v.shape)}")
                v.copy_(_like_param(state[k], v))


# ------------------------------------------------------------------------------- resume checkpoint
def _current(out: Path) -> Path:
    """The checkpoint directory: ``checkpoint/``, or ``checkpoint.old/`` when a kill fell between the
    two renames of ``save`` (the old one moved aside, the new one not yet in place)."""
    final = out / CHECKPOINT
    old = out / (CHECKPOINT + ".old")
    return old if not final.exists() and old.exists() else final


def checkpoint_step(out: Path) -> int | None:
    try:
        return json.loads((_current(out) / "state.json").read_text())["state"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def has_checkpoint(out: Path) -> bool:
    """A checkpoint directory exists (readable or not: a damaged one must stop a resume, not restart
    it; with none at all, starting from step 0 is the resume, since nothing was kept)."""
    return (out / CHECKPOINT).exists() or (out / (CHECKPOINT + ".old")).exists()


def save(out: Path, module, opt, sched, scaler, state, hyperparameters: dict, module_state=None,
         opt_state=None) -> None:
    """The resume checkpoint. ``module_state``, ``opt_state``: the states to write when the run's own
    are sharded (``--shard``: gathered whole by ``bwskc.train.distributed``), in a single process's
    layout, so a checkpoint does not depend on how the run was sharded."""
    tmp = out / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_module_state(module) if module_state is None else module_state, str(tmp / "module.safetensors"))
    opt_state = opt.state_dict() if opt_state is None else opt_state
    tensors = {f"{i}.{name}": value.detach().cpu().contiguous()
               for i, entry in opt_state["state"].items() for name, value in entry.items()}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    honour_umask(tmp / "module.safetensors", tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({
        "state": asdict(state), "param_groups": opt_state["param_groups"], "hyperparameters": hyperparameters,
        "scheduler": sched.state_dict(), "scaler": scaler.state_dict()}) + "\n")
    sums = {name: file_sha256(tmp / name) for name in CHECKPOINT_FILES}
    (tmp / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=1) + "\n")
    final = out / CHECKPOINT
    old = out / (CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _verify_checksums(where: Path) -> None:
    """Every file of the checkpoint as it was saved (``checksums.json``), or one line naming the file."""
    listing = where / CHECKSUMS
    try:
        sums = json.loads(listing.read_text())["sha256"]
        if not isinstance(sums, dict):
            raise TypeError("sha256 is not an object")
    except FileNotFoundError:
        raise BwskError(f"{listing}: missing: corrupt checkpoint (cannot check its files)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BwskError(f"{listing}: corrupt checkpoint ({_first_line(exc)})") from None
    for name in CHECKPOINT_FILES:
        path = where / name
        if not path.is_file():
            raise BwskError(f"{path}: missing: corrupt checkpoint")
        if sums.get(name) != file_sha256(path):
            raise BwskError(f"{path}: corrupt checkpoint (its sha256 differs from the one recorded in "
                            f"{CHECKSUMS} when it was saved)")


_REQUIRED = ("state.json", "state.json.state")
NEWER_STATE_FIELDS = ("parts", "last_parts", "best_metrics")  # State fields an older checkpoint lacks


def _like(value, example, field: str, path: Path) -> None:
    """``value`` (read from JSON) has the shape of ``example`` (what this run would save): numbers stay
    numbers, lists lists, objects objects with the example's keys; else one line naming the field."""
    def refuse(want: str):
        raise BwskError(f"{path}: corrupt checkpoint ({field} must be {want}, got {json.dumps(value)[:40]})")
    if isinstance(example, bool):
        if not isinstance(value, bool):
            refuse("true or false")
    elif isinstance(example, int):
        if isinstance(value, bool) or not isinstance(value, int):
            refuse("an integer")
    elif isinstance(example, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            refuse("a number")
    elif isinstance(example, str):
        if not isinstance(value, str):
            refuse("a string")
    elif isinstance(example, (list, tuple)):
        if not isinstance(value, list):
            refuse("a list")
        for i, item in enumerate(value):
            if example:
                _like(item, example[0], f"{field}[{i}]", path)
    elif isinstance(example, dict):
        if not isinstance(value, dict):
            refuse("an object")
        for key, sub in example.items():
            if key in value:
                _like(value[key], sub, f"{field}.{key}", path)
            elif field in _REQUIRED:  # the optimizer's and scheduler's own fields may vary by version
                raise BwskError(f"{path}: corrupt checkpoint ({field}.{key} is missing)")


def _check_state_fields(state: dict, path: Path) -> None:
    """The loop's counters: what ``_like`` cannot tell from a default value (ranges, optional numbers)."""
    def refuse(name: str, want: str):
        raise BwskError(f"{path}: corrupt checkpoint (state.{name} must be {want}, got "
                        f"{json.dumps(state[name])[:40]})")
    for name, low in (("step", 0), ("best_step", -1), ("bad_evals", 0)):
        if state[name] < low:
            refuse(name, f"at least {low}")
    if not math.isfinite(state["elapsed_s"]) or state["elapsed_s"] < 0:
        refuse("elapsed_s", "a finite number of seconds")
    last = state["last_train"]
    if last is not None and (isinstance(last, bool) or not isinstance(last, (int, float))):
        refuse("last_train", "a number or null")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in state["losses"]):
        refuse("losses", "a list of numbers")


def _read_state(where: Path, example: dict) -> dict:
    path = where / "state.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BwskError(f"{path}: corrupt checkpoint ({_first_line(exc)})") from None
    if isinstance(saved, dict) and isinstance(saved.get("state"), dict):
        for name in NEWER_STATE_FIELDS:  # written by a bwskc before the task families: their defaults
            saved["state"].setdefault(name, {})
    _like(saved, example, "state.json", path)
    _check_state_fields(saved["state"], path)
    return saved


def state_example(opt, sched, scaler, state) -> dict:
    """What ``save`` would write for these objects: the schema ``state.json`` is checked against."""
    return {"state": asdict(state), "param_groups": opt.state_dict()["param_groups"], "hyperparameters": {},
            "scheduler": sched.state_dict(), "scaler": scaler.state_dict()}


def check(out: Path) -> None:
    """Before a resume touches anything: the checkpoint's files are whole and ``state.json`` parses
    as a checkpoint (the optimizer's and scheduler's own fields are checked again by ``restore``)."""
    where = _current(out)
    _verify_checksums(where)
    from bwskc.train.loop import State
    _read_state(where, {"state": asdict(State()), "param_groups": [], "hyperparameters": {},
                        "scheduler": {}, "scaler": {}})


def restore(out: Path, module, opt, sched, scaler, state, hyperparameters: dict) -> None:
    """Load the checkpoint into the run's objects; a damaged one, or one from a run with other
    hyperparameters (its data order and schedule would not continue), is one clear line."""
    where = _current(out)
    _verify_checksums(where)
    saved = _read_state(where, state_example(opt, sched, scaler, state))
    reading = where / "module.safetensors"
    try:
        weights = load_file(str(reading))
        reading = where / "optimizer.safetensors"
        tensors = load_file(str(reading))
        per_param: dict[int, dict] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
    except (OSError, SafetensorError, ValueError) as exc:
        raise BwskError(f"{reading}: corrupt checkpoint ({_first_line(exc)})") from None
    opt_state = {"state": per_param, "param_groups": saved["param_groups"]}
    names = {f.name for f in fields(state)}
    values = {k: v for k, v in saved["state"].items() if k in names}
    before = saved["hyperparameters"]
    # shard_axis is recorded only when set (older runs lack it): unset on either side means none
    optional = {"shard_axis"}
    changed = [_setting_change(k, before.get(k), v, where) for k, v in hyperparameters.items()
               if (k in before or k in optional) and before.get(k) != v]
    changed += [_setting_change(k, before[k], None, where) for k in optional
                if k in before and k not in hyperparameters]
    if changed:
        raise BwskError(f"{where}: --resume with other settings than the run's ({', '.join(changed)})")
    load_into(module, weights, str(where / "module.safetensors"))
    _shard_like_params(opt, opt_state)
    try:
        opt.load_state_dict(opt_state)
        sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise BwskError(f"{where}: checkpoint does not fit this run ({_first_line(exc)})") from None
    for k, v in values.items():
        setattr(state, k, v)


def _like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``param``: a sharded parameter's (a DTensor's) slice of it,
    cut locally on each rank (every rank holds the whole value: no communication)."""
    if not torch.distributed.is_available():
        return value
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(param, DTensor):
        return value
    return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                             src_data_rank=None)


def _shard_like_params(opt, opt_state: dict) -> None:
    """The optimizer's per-parameter states (read whole) sharded as their parameters are (``--shard``);
    a state of another shape (Adam's scalar step) stays as it is."""
    params = [p for group in opt.param_groups for p in group["params"]]
    for index, entry in opt_state["state"].items():
        if not 0 <= index < len(params):
            continue  # load_state_dict names what does not fit
        p = params[index]
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                entry[name] = _like_param(value, p)


def _setting_change(key: str, before, now, where: Path) -> str:
    if key == "data_sha256":  # the data itself, not an option: say so rather than name a digest
        return f"the prepared data {where.parent.parent / DATA} differs from the data it trained on"
    return f"--{key.replace('_', '-')} {before} -> {now}"


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of steps after the checkpoint: the resumed run writes them again. A last line
    cut short by a kill is one of them; a damaged line before it is refused, naming it."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            row_step = row.get("step", 0) if isinstance(row, dict) else None
            if isinstance(row_step, bool) or not isinstance(row_step, (int, float)):
                raise ValueError("no step")
        except ValueError:
            if number == len(lines):
                break
            raise BwskError(f"{path}:{number}: not a metrics record") from None
        if row_step <= step:
            keep.append(line)
    write_text_atomic(path, "".join(line + "\n" for line in keep))
