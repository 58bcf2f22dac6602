"""Front end: load a model (ExportedProgram file, Hugging Face directory or config.json, trusted pickle),
make example inputs, and export it with torch.export, handling the common Hugging Face pitfalls.

Pitfalls handled here rather than by the user:
* ``use_cache=False`` is passed to models that take it (a KV cache object is not a tensor output);
* encoder-decoder models get ``decoder_input_ids`` and an explicit ``attention_mask`` (Switch
  Transformers fails torch.export without one);
* Switch-style mixture-of-experts layers loop over ``nonzero()`` experts (data-dependent shapes); they
  are exported in their dense form (every expert on every token, weighted by the routing mask), which
  is the same function;
* ``module.to(dtype)`` inside ``forward`` (Switch Transformers' router) is a no-op when nothing would
  change, instead of a parameter swap that export's fake tensors refuse;
* on the meta device, models are built without materialising weights, so a 1B configuration is analysed
  in seconds and a few hundred MB.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bwskc.errors import BwskError
from bwskc.ir import DTYPE_BY_NAME

_SPEC = re.compile(r"^(?:(?P<name>[A-Za-z_]\w*)=)?(?P<dtype>[a-z0-9]+)\[(?P<dims>[0-9, ]*)\]$")
_DTYPE_ALIASES = {"int64": "i64", "long": "i64", "int32": "i32", "int": "i32", "float32": "f32",
                  "float": "f32", "float16": "f16", "half": "f16", "bfloat16": "bf16",
                  "float64": "f64", "double": "f64", "bool": "bool", "uint8": "u8", "int8": "i8"}


@dataclass
class InputSpec:
    name: str | None
    dtype: torch.dtype
    shape: tuple[int, ...]


def parse_input_spec(text: str) -> InputSpec:
    """``int64[2,128]`` or ``pixel_values=f32[1,3,224,224]``."""
    m = _SPEC.match(text.strip())
    if not m:
        raise BwskError(f"bad --input {text!r}: expected DTYPE[D0,D1,...] or NAME=DTYPE[...], "
                        "e.g. int64[2,128]")
    dtype = _DTYPE_ALIASES.get(m["dtype"], m["dtype"])
    if dtype not in DTYPE_BY_NAME:
        raise BwskError(f"bad --input {text!r}: unknown dtype {m['dtype']!r}")
    dims = [d.strip() for d in m["dims"].split(",") if d.strip()]
    if any(int(d) <= 0 for d in dims):
        raise BwskError(f"bad --input {text!r}: dimensions must be positive")
    return InputSpec(m["name"], DTYPE_BY_NAME[dtype], tuple(int(d) for d in dims))


def make_tensor(spec: InputSpec, *, device: str = "cpu", high: int = 100, seed: int = 0) -> torch.Tensor:
    """A deterministic example tensor: token ids below ``high``, ones for masks, normals for floats."""
    gen = torch.Generator().manual_seed(seed)
    if device == "meta":
        return torch.empty(spec.shape, dtype=spec.dtype, device="meta")
    if spec.name and "mask" in spec.name:
        return torch.ones(spec.shape, dtype=spec.dtype)
    if spec.dtype == torch.bool:
        return torch.ones(spec.shape, dtype=torch.bool)
    if not spec.dtype.is_floating_point:
        return torch.randint(0, max(high, 1), spec.shape, generator=gen, dtype=spec.dtype)
    return torch.randn(spec.shape, generator=gen, dtype=torch.float32).to(spec.dtype)


# ------------------------------------------------------------------------------------------ loading

@dataclass
class LoadedModel:
    """What the front end produced: an ExportedProgram ready for lowering, plus how it was made."""

    exported: torch.export.ExportedProgram
    name: str
    args: tuple
    kwargs: dict
    module: torch.nn.Module | None = None


def _is_torch_zip(path: Path) -> tuple[bool, bool]:
    """(is a zip archive, looks like a pickled torch.save archive)."""
    if not zipfile.is_zipfile(path):
        return False, False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return True, any(n.endswith("data.pkl") for n in names)


def load_model(source: str, *, inputs: list[str] = (), trust_pickle: bool = False, meta: bool = False,
               train: bool = False) -> LoadedModel:
    """Load MODEL as the CLI understands it and export it."""
    path = Path(source)
    if not path.exists():
        raise BwskError(f"{source}: no such file or directory")
    specs = [parse_input_spec(s) for s in inputs]
    if path.is_dir() or path.suffix == ".json":
        config_path = path / "config.json" if path.is_dir() else path
        if not config_path.exists():
            raise BwskError(f"{source}: directory has no config.json")
        return load_hf(config_path, specs, meta=meta, train=train)
    if path.stat().st_size == 0:
        raise BwskError(f"{source}: empty file")
    is_zip, is_pickle_zip = _is_torch_zip(path)
    if is_zip and not is_pickle_zip:
        from bwskc.archive import load_exported_program
        try:
            ep = load_exported_program(path, trust_pickle=trust_pickle)
        except BwskError:
            raise
        except Exception as exc:
            raise BwskError(f"{source}: not a readable ExportedProgram ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        args, kwargs = ep.example_inputs if ep.example_inputs is not None else ((), {})
        return LoadedModel(ep, path.stem, tuple(args), dict(kwargs))
    if is_pickle_zip or _looks_like_pickle(path):
        if not trust_pickle:
            raise BwskError(f"{source}: a pickled nn.Module; unpickling runs arbitrary code, so it is "
                            "refused: pass --trust-pickle if you trust this file, or save the model "
                            "with torch.export.save instead")
        try:
            module = torch.load(str(path), weights_only=False, map_location="cpu")
        except Exception as exc:
            raise BwskError(f"{source}: cannot unpickle ({type(exc).__name__}: {exc})") from None
        if not isinstance(module, torch.nn.Module):
            raise BwskError(f"{source}: unpickled a {type(module).__name__}, not an nn.Module")
        if not specs:
            raise BwskError(f"{source}: a pickled module has no example inputs: give --input, "
                            "e.g. --input f32[2,16]")
        args, kwargs = _inputs_from_specs(specs, device="cpu")
        return export_module(module, args, kwargs, name=type(module).__name__, train=train)
    raise BwskError(f"{source}: not a model file bwskc recognises (expected an ExportedProgram from "
                    "torch.export.save, a Hugging Face directory or config.json, or a pickled "
                    "nn.Module with --trust-pickle)")


def _looks_like_pickle(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and head[1] <= 5  # pickle protocol opcode


def _inputs_from_specs(specs: list[InputSpec], *, device: str, high: int = 100):
    args, kwargs = [], {}
    for i, s in enumerate(specs):
        t = make_tensor(s, device=device, high=high, seed=i)
        if s.name:
            kwargs[s.name] = t
        elif kwargs:
            raise BwskError("positional --input after a named one")
        else:
            args.append(t)
    return tuple(args), kwargs


def load_hf(config_path: Path, specs: list[InputSpec], *, meta: bool = False,
            train: bool = False) -> LoadedModel:
    """Build a Hugging Face model from its config (random weights, or the directory's weights)."""
    import transformers
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_path.parent), local_files_only=True) \
            if config_path.name == "config.json" else None
    except Exception:
        config = None
    if config is None:
        try:
            raw = json.loads(config_path.read_text())
            config = transformers.AutoConfig.for_model(**raw)
        except Exception as exc:
            raise BwskError(f"{config_path}: not a Hugging Face config ({exc})") from None
    model_cls = _model_class(config)
    has_weights = any((config_path.parent / f).exists()
                      for f in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"))
    ctx = torch.device("meta") if meta else contextlib.nullcontext()
    torch.manual_seed(0)
    try:
        if has_weights and not meta:
            model = model_cls.from_pretrained(str(config_path.parent), local_files_only=True,
                                              **model_kwargs(model_cls))
        else:
            with ctx:
                model = model_cls._from_config(config, **model_kwargs(model_cls))
    except Exception as exc:
        raise BwskError(f"{config_path}: cannot build {model_cls.__name__} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    device = "meta" if meta else "cpu"
    if specs:
        args, kwargs = _inputs_from_specs(specs, device=device, high=getattr(config, "vocab_size", 100))
    else:
        args, kwargs = default_inputs(model, device=device)
    return export_module(model, args, kwargs, name=type(model).__name__, train=train)


def model_kwargs(model_class) -> dict:
    """``attn_implementation="sdpa"`` where the class supports it (one fused op for the IR to type),
    nothing where it does not (Switch Transformers, ResNet: asking would fail)."""
    return {"attn_implementation": "sdpa"} if getattr(model_class, "_supports_sdpa", False) else {}


def _model_class(config):
    import transformers
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM,
                 transformers.AutoModelForMaskedLM, transformers.AutoModelForImageClassification,
                 transformers.AutoModel):
        mapping = auto._model_mapping
        if type(config) in mapping:
            return mapping[type(config)]
    raise BwskError(f"no model class for config type {type(config).__name__}")


def default_inputs(model: torch.nn.Module, *, device: str = "cpu", batch: int = 2, seq: int = 16):
    """Example inputs a model's forward needs: token ids (plus a mask and decoder ids for
    encoder-decoders) or pixel values at the configured image size."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", "input_ids")
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        spec = InputSpec("pixel_values", torch.float32, (batch, channels, size, size))
        return (make_tensor(spec, device=device),), {}
    vocab = getattr(config, "vocab_size", 100)
    ids = make_tensor(InputSpec("input_ids", torch.int64, (batch, seq)), device=device, high=vocab)
    kwargs: dict[str, Any] = {}
    if getattr(config, "is_encoder_decoder", False):
        kwargs["attention_mask"] = make_tensor(InputSpec("attention_mask", torch.int64, (batch, seq)),
                                               device=device)
        kwargs["decoder_input_ids"] = make_tensor(
            InputSpec("decoder_input_ids", torch.int64, (batch, seq // 2)), device=device, high=vocab,
            seed=1)
    return (ids,), kwargs


@contextlib.contextmanager
def _module_to_is_noop_when_unchanged():
    """``Module.to`` returns the module unchanged when no parameter or buffer would change.

    Export's fake parameters cannot be swapped, and some models (Switch Transformers' router) call
    ``self.classifier.to(self.dtype)`` in forward, which is a no-op in eager mode.
    """
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = list(self.parameters()) + list(self.buffers())
        if all((dtype is None or t.dtype == dtype or not t.is_floating_point())
               and (device is None or t.device == device) for t in tensors):
            return self
        return original(self, *args, **kwargs)

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original


def _dense_experts_forward(experts: torch.nn.ModuleDict):
    """Every expert applied to every token, weighted by its routing mask: the same function as the
    Hugging Face loop over ``nonzero()`` experts, without the data-dependent shapes export rejects."""
    def forward(hidden_states, selected_experts, routing_weights):
        mask = selected_experts.reshape(selected_experts.shape[0], -1).to(routing_weights.dtype)
        out = torch.zeros_like(hidden_states)
        for idx in range(len(experts)):
            weight = mask[:, idx:idx + 1] * routing_weights
            out = out + (experts[f"expert_{idx}"](hidden_states) * weight).to(hidden_states.dtype)
        return out
    return forward


@contextlib.contextmanager
def _exportable_experts(model: torch.nn.Module):
    """Swap Switch-style expert dicts (``expert_0``... with a routed forward) for their dense form."""
    patched = []
    for mod in model.modules():
        if (isinstance(mod, torch.nn.ModuleDict) and type(mod).__name__.endswith("Experts")
                and len(mod) and all(k.startswith("expert_") for k in mod.keys())):
            params = list(inspect.signature(type(mod).forward).parameters)
            if params[1:] == ["hidden_states", "selected_experts", "routing_weights"]:
                mod.forward = _dense_experts_forward(mod)
                patched.append(mod)
    try:
        yield
    finally:
        for mod in patched:
            del mod.forward


def export_module(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *,
                  name: str | None = None, train: bool = False) -> LoadedModel:
    """torch.export a module (non-strict), eval mode unless ``train``, with the pitfalls handled."""
    kwargs = dict(kwargs or {})
    model.train(train)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    for mod in model.modules():  # encoder/decoder stacks carry configs of their own
        config = getattr(mod, "config", None)
        if config is not None and getattr(config, "use_cache", False):
            config.use_cache = False
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    if "return_dict" in params and "return_dict" not in kwargs:
        kwargs["return_dict"] = True
    try:
        with _module_to_is_noop_when_unchanged(), _exportable_experts(model):
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
    except BwskError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise BwskError(f"torch.export failed for {name or type(model).__name__}: "
                        f"{type(exc).__name__}: {first}") from None
    return LoadedModel(ep, name or type(model).__name__, tuple(args), kwargs, model)

