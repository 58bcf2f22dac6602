"""What ``bwskc train --model M`` names, built with the head of its task (``bwskc.train.tasks``).

``M`` is a Hugging Face model directory (config.json, maybe weights and a tokenizer), a ``config.json``
alone (random weights), a hub id where the hub is reachable, a directory ``bwskc train`` wrote, or a
bwskc IR file (``bwskc lower MODEL --train -o m.bwsk --weights-out m.safetensors``: the program and,
beside it with the same stem, its weights by state-dict key). ``scratch`` re-initialises the weights (the model class's
own initialisation, seeded); ``finetune`` starts from the weights the model has.
"""
from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bwskc.errors import BwskError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class ModelSource:
    name: str                       # as the user gave it
    config: object                  # transformers.PretrainedConfig
    weights_dir: Path | None        # a directory whose weights from_pretrained loads, or None
    tokenizer_dir: Path | None      # a directory holding the model's tokenizer, or None
    program: object = None          # an IR file's Program (weights unbound), else None
    ir_weights: Path | None = None  # the IR file's weights (``STEM.safetensors``), if present


def resolve_model(spec: str) -> ModelSource:
    """Find the model's config, weights and tokenizer without building it (one line on failure)."""
    import transformers
    path = Path(spec)
    if path.is_file() and path.suffix == ".bwsk":
        return _from_ir(spec, path)
    if path.is_file() and path.name != "config.json" and path.suffix == ".json":
        return _from_config_file(spec, path)
    if path.is_file() and path.name == "config.json":
        return _from_dir(spec, path.parent)
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "model.bwsk").is_file():
            raise BwskError(f"{spec}: directory has no config.json (not a Hugging Face model directory)")
        return _from_dir(spec, path)
    if path.exists() or not HUB_ID.fullmatch(spec) or spec.endswith(".json"):
        raise BwskError(f"{spec}: no such model file or directory (nor a hub id)")
    from bwskc.train.data import hub_reachable
    if not hub_reachable():  # a quick probe: the hub client would retry for half a minute
        raise BwskError(f"{spec}: unknown model (not a local path, and the hub is not reachable from here)")
    try:  # a hub id
        config = transformers.AutoConfig.from_pretrained(spec)
    except Exception as exc:
        raise BwskError(f"{spec}: unknown model (not a local path, and not reachable on the hub: "
                        f"{type(exc).__name__})") from None
    return ModelSource(spec, config, None, None)  # hub weights: from_pretrained(spec) in build_model


def _from_ir(spec: str, path: Path) -> ModelSource:
    from bwskc.passes.calm.shard_plan import parse_checked as parse_program  # plans checked too
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise BwskError(f"{spec}: unreadable ({type(exc).__name__})") from None
    program = parse_program(text, str(path))
    inputs = program.entry.inputs
    if len(inputs) != 1 or getattr(inputs[0], "dtype", None) != "i64" or len(inputs[0].shape) != 2:
        raise BwskError(f"{spec}: a language model's program takes one i64[batch,seq] input; this one "
                        f"takes ({', '.join(map(str, inputs))})")
    weights = path.with_suffix(".safetensors")
    return ModelSource(spec, None, None, None, program, weights if weights.is_file() else None)


def ir_program(src: ModelSource, *, pretrained: bool, seed: int):
    """The IR file's program bound to weights: its own (``finetune``), or (``scratch``) parameters
    re-initialised as GPT-2/Pythia do (matrices N(0, 0.02), biases 0, other vectors 1: norm gains)
    and buffers and constants from the weights file (they are not learned: rotary tables, masks)."""
    from safetensors.torch import load_file
    program = src.program
    saved = {}
    if src.ir_weights is not None:
        try:
            saved = load_file(str(src.ir_weights))
        except Exception as exc:
            raise BwskError(f"{src.ir_weights}: unreadable weights ({type(exc).__name__})") from None
    if pretrained and src.ir_weights is None:
        raise BwskError(f"{src.name}: no weights to fine-tune ({Path(src.name).with_suffix('.safetensors')} "
                        f"is missing)")
    gen = torch.Generator().manual_seed(seed)
    weights = dict(saved)
    for name, decl in program.tensors.items():
        if decl.kind != "param" or pretrained:
            if name not in weights:
                raise BwskError(f"{src.ir_weights or Path(src.name).with_suffix('.safetensors')}: no value "
                                f"for {decl.kind} {name}")
            continue
        shape, dtype = tuple(decl.type.shape), decl.type.torch_dtype
        if len(shape) >= 2:
            weights[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
        elif name.endswith("bias"):
            weights[name] = torch.zeros(shape, dtype=dtype)
        else:
            weights[name] = torch.ones(shape, dtype=dtype)
    for name, decl in program.tensors.items():
        if tuple(weights[name].shape) != tuple(decl.type.shape):
            raise BwskError(f"{src.ir_weights}: {name} has shape {list(weights[name].shape)}, the program "
                            f"declares {decl.type}")
    return program.with_weights({k: weights[k] for k in program.tensors})


def _from_config_file(spec: str, path: Path) -> ModelSource:
    import transformers
    try:
        raw = json.loads(path.read_text())
        config = transformers.AutoConfig.for_model(**raw)
    except Exception as exc:
        raise BwskError(f"{spec}: not a Hugging Face config ({type(exc).__name__}: {exc})") from None
    return ModelSource(spec, config, None, None)


def _from_dir(spec: str, directory: Path) -> ModelSource:
    import transformers
    if (directory / "model.bwsk").is_file():  # a bwskc train output of an IR model
        return _from_ir(spec, directory / "model.bwsk")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except Exception:
        return _from_config_file(spec, directory / "config.json")
    has_weights = any((directory / f).exists() for f in WEIGHT_FILES)
    has_tokenizer = any((directory / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return ModelSource(spec, config, directory if has_weights else None,
                       directory if has_tokenizer else None)


def build_model(src: ModelSource, *, pretrained: bool, seed: int, task: str = "causal",
                classes: list | None = None, image_size: int | None = None) -> torch.nn.Module:
    """The model with its task's head, in training mode with ``use_cache`` off: its own weights when
    ``pretrained`` (``finetune``), the class's initialisation seeded with ``seed`` otherwise
    (``scratch``). An image classifier's head gets one output per class of the data (``classes``),
    re-initialised when the pretrained head has another number of them; ``image_size`` (``--image-size``)
    replaces the config's where it has one (position embeddings are sized by it)."""
    from bwskc.train.tasks import auto_class, model_kwargs
    torch.manual_seed(seed)
    auto = auto_class(task)
    try:
        model_class = auto._model_mapping[type(src.config)]
    except KeyError:
        raise BwskError(f"{src.name}: a {type(src.config).__name__} has no {auto.__name__} class") from None
    kwargs = model_kwargs(model_class)
    if classes is not None:
        kwargs.update(num_labels=len(classes), id2label=dict(enumerate(classes)),
                      label2id={c: i for i, c in enumerate(classes)})
        if pretrained:
            kwargs["ignore_mismatched_sizes"] = True
    try:
        if pretrained and src.weights_dir is not None:
            model = auto.from_pretrained(str(src.weights_dir), local_files_only=True, **kwargs)
        elif pretrained and src.weights_dir is None and not Path(src.name).exists():
            model = auto.from_pretrained(src.name, **kwargs)
        elif pretrained:
            raise BwskError(f"{src.name}: has no weights to fine-tune (a config alone); give a model "
                            f"directory with weights, or --experiment all to fine-tune from the scratch run")
        else:
            config = copy.deepcopy(src.config)
            if image_size is not None and hasattr(config, "image_size"):
                config.image_size = image_size
            for key in ("num_labels", "id2label", "label2id"):
                if key in kwargs:
                    setattr(config, key, kwargs.pop(key))
            model = auto.from_config(config, **kwargs)
    except BwskError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise BwskError(f"{src.name}: cannot build the model ({type(exc).__name__}: {first})") from None
    if pretrained and image_size is not None:
        resample_position_embeddings(model, image_size, src.name)
    model.config.use_cache = False
    return model.train()


def resample_position_embeddings(model: torch.nn.Module, image_size: int, name: str) -> int:
    """Fine-tuning at another image size (``--image-size``, 224 -> 384 as ViTs are): every patch
    embedding table sized by the config's ``image_size`` is resampled once to the new grid, with the
    model's own ``interpolate_pos_encoding`` (bicubic, the class and distillation tokens kept), and the
    patch embedding and the config take the new size. Returns how many tables were resampled. A model
    with a ``position_embeddings`` table it cannot resample this way is refused in one line (it would
    fail at export with a less helpful message); one without such a table (convolutional nets,
    relative position tables) is left to export, which takes it or names the problem."""
    from bwskc.train.images import image_size_of
    if getattr(model.config, "image_size", None) is None:
        return 0
    old = image_size_of(model.config)  # an int, or a JSON config's square [h, w]
    if old == image_size:
        return 0
    done = 0
    for module in model.modules():
        pos, patches = getattr(module, "position_embeddings", None), getattr(module, "patch_embeddings", None)
        if not (isinstance(pos, torch.nn.Parameter) and hasattr(module, "interpolate_pos_encoding")
                and hasattr(patches, "num_patches") and hasattr(patches, "patch_size")):
            continue
        patch = patches.patch_size if isinstance(patches.patch_size, (tuple, list)) else (patches.patch_size,) * 2
        grid = (image_size // patch[0], image_size // patch[1])
        extra = pos.shape[1] - patches.num_patches  # the class (and distillation) tokens' rows
        dummy = pos.new_zeros(1, extra + grid[0] * grid[1], pos.shape[-1])
        with torch.no_grad():
            table = module.interpolate_pos_encoding(dummy, image_size, image_size)
        if tuple(table.shape) != tuple(dummy.shape):
            raise BwskError(f"{name}: cannot resample {type(module).__name__}'s position embeddings to "
                            f"--image-size {image_size} (got {tuple(table.shape)}); use its own size {old}")
        module.position_embeddings = torch.nn.Parameter(table.detach().clone(), requires_grad=pos.requires_grad)
        patches.num_patches = grid[0] * grid[1]
        for holder in (module, patches):  # where the forward checks the input's size (versions differ)
            if hasattr(holder, "image_size"):
                holder.image_size = (image_size, image_size)
        done += 1
    if not done and any(isinstance(getattr(m, "position_embeddings", None), torch.nn.Parameter)
                        for m in model.modules()):
        raise BwskError(f"{name}: {type(model).__name__} cannot be fine-tuned at --image-size {image_size}: "
                        f"its position embeddings are sized for {old} and it cannot resample them; drop "
                        f"--image-size or pass {old}")
    model.config.image_size = image_size
    return done


def vocab_size(config) -> int:
    if hasattr(config, "entry"):  # an IR program: the logits' last dimension
        return int(config.entry.outputs[0].shape[-1])
    size = getattr(config, "vocab_size", None)
    if not size:
        raise BwskError(f"{type(config).__name__} has no vocab_size")
    return int(size)


def max_positions(config) -> int | None:
    if hasattr(config, "entry"):  # an IR program: its fixed sequence length
        return int(config.entry.inputs[0].shape[1])
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    return None
