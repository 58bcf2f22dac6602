"""What a run writes and reads back: the published model, the resume checkpoint, the prepared data.

No pickle anywhere: tensors go through safetensors, everything else through JSON, so reading a
checkpoint never runs code. Writes are atomic (a temporary directory renamed into place), so a run
killed while saving leaves the previous checkpoint whole.

``DIR/<variant>/``: ``model.safetensors`` and ``config.json`` (``save_pretrained`` of the model class
with the best weights: a conventional variant loads with ``AutoModelForCausalLM.from_pretrained``),
``bwskc.json`` (how it was compiled, for ``bwskc.load_trained``), ``checkpoint/`` (the last state, for
``--resume``), ``metrics.jsonl``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bwskc.errors import BwskError

CHECKPOINT = "checkpoint"
BWSKC_JSON = "bwskc.json"
BLOCKS = "blocks.safetensors"
DATA_JSON = "data.json"


# ------------------------------------------------------------------------------- prepared data
def save_blocks(directory: Path, blocks: dict[str, torch.Tensor], info: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in blocks.items()}, str(directory / BLOCKS))
    (directory / DATA_JSON).write_text(json.dumps(info, indent=1) + "\n")


def load_blocks(directory) -> tuple[dict[str, torch.Tensor], dict]:
    directory = Path(directory)
    try:
        return load_file(str(directory / BLOCKS)), json.loads((directory / DATA_JSON).read_text())
    except (OSError, SafetensorError, ValueError) as exc:
        raise BwskError(f"{directory / BLOCKS}: prepared data unreadable ({type(exc).__name__})") from None


# ------------------------------------------------------------------------------- published model
def _module_state(module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers under their state-dict names, as independent CPU tensors."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _bwskc_json(cfg, **extra) -> str:
    return json.dumps({"mode": cfg.mode, "experiment": cfg.experiment,
                       "batch_size": cfg.batch_size // max(1, cfg.nproc), "seq_len": cfg.seq_len,
                       "seed": cfg.seed, "model": cfg.model, **extra}, indent=1) + "\n"


def save_model(out: Path, module, hf_model, cfg, source_program=None) -> None:
    """The module's weights in the model class's own layout (``save_pretrained``), plus ``bwskc.json``.
    An IR model (no class) is saved as ``model.safetensors`` beside its program ``model.bwsk``."""
    if hf_model is None:
        _save_ir_model(out, module, cfg, source_program)
        return
    state = _module_state(module)
    own = hf_model.state_dict()
    missing = [k for k in state if k not in own]
    if missing and any(not k.endswith("inv_freq") for k in missing):
        raise BwskError(f"{cfg.name}: parameters the model class does not have: {missing[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            if k in own:
                own[k].copy_(v)
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / BWSKC_JSON).write_text(_bwskc_json(cfg))
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()
    if cfg.mode == "reversible" and not (out / "program.bwsk").exists():
        (out / "program.bwsk").write_text(module.program.text())


def _save_ir_model(out: Path, module, cfg, program) -> None:
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    trained = _module_state(module)  # parameters and persistent buffers; constants stay as bound
    state = {k: (trained[k] if k in trained else module.program.weights[k].detach().cpu()).contiguous()
             for k in program.tensors}
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "model.bwsk").write_text(program.text())
    (tmp / "config.json").write_text(json.dumps({"bwskc_program": "model.bwsk", "name": program.name,
                                                 "vocab_size": program.entry.outputs[0].shape[-1]}) + "\n")
    (tmp / BWSKC_JSON).write_text(_bwskc_json(cfg, ir="model.bwsk"))
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()


def load_best(out: Path, module) -> None:
    """Load the published (best) weights back into the module, through ``from_pretrained`` (or, for
    an IR model, from ``model.safetensors``)."""
    import transformers
    if (out / "model.bwsk").is_file():
        load_into(module, load_file(str(out / "model.safetensors")), str(out / "model.safetensors"))
        return
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    load_into(module, hf.state_dict(), str(out / "model.safetensors"))


def load_into(module, state: dict, where: str) -> None:
    own = module.state_dict()
    absent = [k for k, v in own.items() if k not in state and not k.endswith("inv_freq")]
    if absent:
        raise BwskError(f"{where}: missing weights {absent[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                if state[k].shape != v.shape:
                    raise BwskError(f"{where}: {k} has shape {list(state[k].shape)}, expected {list(v.shape)}")
                v.copy_(state[k])


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


def save(out: Path, module, opt, sched, scaler, state, hyperparameters: dict) -> None:
    tmp = out / (CHECKPOINT + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_module_state(module), str(tmp / "module.safetensors"))
    opt_state = opt.state_dict()
    tensors = {f"{i}.{name}": value.detach().cpu().contiguous()
               for i, entry in opt_state["state"].items() for name, value in entry.items()}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({
        "state": asdict(state), "param_groups": opt_state["param_groups"], "hyperparameters": hyperparameters,
        "scheduler": sched.state_dict(), "scaler": scaler.state_dict()}) + "\n")
    final = out / CHECKPOINT
    old = out / (CHECKPOINT + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def restore(out: Path, module, opt, sched, scaler, state, hyperparameters: dict) -> None:
    """Load the checkpoint into the run's objects; a damaged one, or one from a run with other
    hyperparameters (its data order and schedule would not continue), is one clear line."""
    where = _current(out)
    reading = where
    try:
        reading = where / "module.safetensors"
        weights = load_file(str(reading))
        reading = where / "optimizer.safetensors"
        tensors = load_file(str(reading))
        reading = where / "state.json"
        saved = json.loads(reading.read_text())
        per_param: dict[int, dict] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        opt_state = {"state": per_param, "param_groups": saved["param_groups"]}
        names = {f.name for f in fields(state)}
        values = {k: v for k, v in saved["state"].items() if k in names}
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise BwskError(f"{reading}: corrupt checkpoint ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    before = saved.get("hyperparameters", {})
    changed = [f"--{k.replace('_', '-')} {before.get(k)} -> {v}" for k, v in hyperparameters.items()
               if k in before and before[k] != v]
    if changed:
        raise BwskError(f"{where}: --resume with other settings than the run's ({', '.join(changed)})")
    load_into(module, weights, str(where / "module.safetensors"))
    try:
        opt.load_state_dict(opt_state)
        sched.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise BwskError(f"{where}: checkpoint does not fit this run ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    for k, v in values.items():
        setattr(state, k, v)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the records of steps after the checkpoint: the resumed run writes them again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip()
            and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))
