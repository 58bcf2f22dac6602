"""``.pt2`` archives are untrusted input: loading one runs no code without ``--trust-pickle``, inflates
nothing without bound, and a legitimate archive (a plain module's, a Hugging Face model's) still loads.

Hostile archives are made from real ones (``torch.export.save`` of a small model) by rewriting one member,
so everything but the payload is what torch would read.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import bwskc
from bwskc import archive
from bwskc.errors import BwskError
from bwskc.frontend import load_hf, load_model

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bwskc.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def assert_one_line_error(r, *contains):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bwskc: "), r.stderr
    for text in contains:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def refusal(path, **kwargs) -> str:
    """The one-line message ``load_model`` refuses ``path`` with."""
    with pytest.raises(BwskError) as info:
        load_model(str(path), **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


class _Evil:
    """Unpickling this creates ``path``: the marker that code from the archive ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _Small(nn.Module):
    """A parameter, a buffer and a tensor constant: one member of each kind torch writes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("shift", torch.arange(3.0))
        self.scale = torch.tensor([1.0, 2.0, 3.0])

    def forward(self, x):
        return torch.tanh(self.fc(x)) * self.scale + self.shift


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    model = _Small().eval()
    x = torch.randn(2, 4)
    path = tmp_path_factory.mktemp("pt2") / "small.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    return path, model, x


def rewrite(src: Path, dst: Path, replace: dict[str, bytes | None]) -> Path:
    """A copy of ``src`` with the members whose names end in a key of ``replace`` replaced (None drops
    one); keys not found are added under the archive's root folder."""
    pending = dict(replace)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            key = next((k for k in replace if info.filename.endswith("/" + k)), None)
            if key is None:
                zout.writestr(info.filename, zin.read(info))
                continue
            data = pending.pop(key)
            if data is not None:
                zout.writestr(info.filename, data)
        for key, data in pending.items():
            zout.writestr(f"{root}/{key}", data)
    return dst


def member(path: Path, suffix: str) -> bytes:
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith(suffix)))


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------------------ legitimate archives

def test_small_model_archive_loads_and_lowers_to_the_same_function(small):
    path, model, x = small
    loaded = load_model(str(path))
    torch.testing.assert_close(loaded.args[0], x, rtol=0, atol=0)
    program = bwskc.lower(loaded.exported)
    with torch.no_grad():
        torch.testing.assert_close(program(x), model(x), rtol=0, atol=0)


def test_small_model_archive_lowers_through_the_cli(small):
    path, model, x = small
    r = run_cli("lower", path)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    program = bwskc.parse(r.stdout)
    weights = {**model.state_dict(), **{k: v for k, v in load_model(str(path)).exported.constants.items()}}
    with torch.no_grad():
        torch.testing.assert_close(program.with_weights(weights)(x), model(x), rtol=0, atol=0)


def test_dynamic_shape_archive_loads(tmp_path):
    """Symbolic shapes are serialized as sympy expressions: the expression check lets real ones through."""
    class Twice(nn.Module):
        def forward(self, x):
            return x.reshape(-1) * 2

    path = tmp_path / "dyn.pt2"
    ep = torch.export.export(Twice(), (torch.randn(3, 4),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(ep, str(path))
    assert "Symbol(" in member(path, "models/model.json").decode()
    loaded = load_model(str(path))
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded.exported.module()(x), x.reshape(-1) * 2)


@pytest.fixture(scope="module")
def gpt2_archive(tmp_path_factory):
    """A tiny GPT-2 exported as the front end exports Hugging Face models, its eager logits, and the
    archive's JSON (whose output spec names ``transformers.modeling_outputs``)."""
    loaded = load_hf(REPO / "examples/gpt2-tiny/config.json", [])
    path = tmp_path_factory.mktemp("gpt2") / "gpt2.pt2"
    torch.export.save(loaded.exported, str(path))
    with torch.no_grad():
        logits = loaded.module(*loaded.args, **loaded.kwargs).logits
    return path, loaded.args, logits


def test_hugging_face_archive_loads_in_a_fresh_process(gpt2_archive, tmp_path):
    """In a process that has not imported transformers, the output class must be registered from the
    archive's own spec (before the fix, this failed with 'not a readable ExportedProgram'). The loaded
    program computes the eager logits, and so does its lowering."""
    path, args, logits = gpt2_archive
    loaded_out, lowered_out = tmp_path / "loaded.pt", tmp_path / "lowered.pt"
    script = textwrap.dedent(f"""
        import sys, torch, bwskc
        from bwskc.frontend import load_model
        assert "transformers.modeling_outputs" not in sys.modules
        loaded = load_model({str(path)!r})
        with torch.no_grad():
            out = loaded.exported.module()(*loaded.args, **loaded.kwargs)
        torch.save((loaded.args, type(out).__module__, out.logits), {str(loaded_out)!r})
        program = bwskc.lower(loaded.exported)
        tensors = {{k: v for k, v in loaded.kwargs.items() if isinstance(v, torch.Tensor)}}
        with torch.no_grad():
            result = program(*loaded.args, **tensors)
        torch.save(result[0] if isinstance(result, (tuple, list)) else result, {str(lowered_out)!r})
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert loaded_out.exists(), r.stderr
    got_args, out_module, got = torch.load(loaded_out, weights_only=True)
    assert out_module == "transformers.modeling_outputs"
    torch.testing.assert_close(got_args[0], args[0], rtol=0, atol=0)
    torch.testing.assert_close(got, logits, rtol=0, atol=0)
    assert r.returncode == 0, r.stderr  # lowering and running the lowered program
    torch.testing.assert_close(torch.load(lowered_out, weights_only=True), logits, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- pickled members

def test_hostile_sample_inputs_run_no_code_without_trust_pickle(small, tmp_path):
    path, _, _ = small
    marker = tmp_path / "pwned"
    evil = rewrite(path, tmp_path / "evil.pt2",
                   {"data/sample_inputs/model.pt": torch_saved(((_Evil(marker),), {}))})
    line = assert_one_line_error(run_cli("lower", evil), "evil.pt2", "sample_inputs", "--trust-pickle")
    assert "io.open" in line  # the refusal says what the pickle would have called
    assert not marker.exists()
    run_cli("lower", evil, "--trust-pickle")  # the payload is live: trusting the file runs it
    assert marker.exists()


def _pickled_weight(path: Path, marker: Path) -> dict[str, bytes]:
    """The weights config's first entry turned into a pickled (tensor-subclass) payload."""
    config = json.loads(member(path, "data/weights/model_weights_config.json"))
    first = next(iter(config["config"].values()))
    first["use_pickle"], first["path_name"] = True, "weight_99"
    return {"data/weights/model_weights_config.json": json.dumps(config).encode(),
            "data/weights/weight_99": torch_saved(_Evil(marker))}


def _opaque_constant(path: Path, marker: Path) -> dict[str, bytes]:
    """The tensor constant turned into an opaque object, which torch reads with ``pickle.loads``."""
    config = json.loads(member(path, "data/constants/model_constants_config.json"))
    next(iter(config["config"].values()))["path_name"] = "opaque_obj_0"
    return {"data/constants/model_constants_config.json": json.dumps(config).encode(),
            "data/constants/opaque_obj_0": pickle.dumps(_Evil(marker))}


def _compiled_code(path: Path, marker: Path) -> dict[str, bytes]:
    """An AOTInductor member: torch would dlopen the shared library it names."""
    return {"data/aotinductor/model/model.so": b"\x7fELF"}


@pytest.mark.parametrize("make, named", [(_pickled_weight, "weight_99"),
                                          (_opaque_constant, "opaque_obj_0"),
                                          (_compiled_code, "aotinductor")])
def test_pickled_and_compiled_members_are_refused(small, tmp_path, make, named):
    path, _, _ = small
    marker = tmp_path / "pwned"
    evil = rewrite(path, tmp_path / "evil.pt2", make(path, marker))
    message = refusal(evil)
    assert named in message and "--trust-pickle" in message, message
    assert not marker.exists()


def test_torch_loader_is_guarded_even_past_the_inspection(small, tmp_path):
    """The second line: should a pickle reach torch's deserializer, its weights_only=False retry raises."""
    path, _, _ = small
    marker = tmp_path / "pwned"
    evil = rewrite(path, tmp_path / "evil.pt2",
                   {"data/sample_inputs/model.pt": torch_saved(((_Evil(marker),), {}))})
    with pytest.raises(archive.PickleRefused, match="io.open"), archive._unpicklers_refused():
        torch.export.load(str(evil))
    assert not marker.exists()
    assert torch.load is archive._ORIGINAL_TORCH_LOAD  # and the guard is lifted afterwards


# ---------------------------------------------------------------------- code in the program's JSON

@pytest.mark.parametrize("expr", [
    "__import__('os').system('touch {marker}')",
    "Symbol('s0').__class__",
    "Integer(open('{marker}', 'w'))",
    "Pow(Integer(2), Pow(Integer(2), Integer(100)))",
])
def test_symbolic_expressions_are_not_evaluated(tmp_path, expr):
    """torch passes each ``expr_str`` to ``sympy.sympify``, which evals it."""
    class Twice(nn.Module):
        def forward(self, x):
            return x * 2

    marker = tmp_path / "pwned"
    path = tmp_path / "dyn.pt2"
    ep = torch.export.export(Twice(), (torch.randn(3, 4),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(ep, str(path))
    text = member(path, "models/model.json").decode()
    model = json.loads(text)
    replaced = 0
    for node in archive._values_of_key(model, "as_expr"):
        node["expr_str"] = expr.format(marker=marker)
        replaced += 1
    assert replaced
    evil = rewrite(path, tmp_path / "evil.pt2", {"models/model.json": json.dumps(model).encode()})
    assert "symbolic expression" in refusal(evil)
    assert not marker.exists()


def test_pytree_classes_come_only_from_allowed_modules(gpt2_archive, tmp_path, monkeypatch):
    """Registering an output class means importing its module: a module outside the allow-list (here
    one that would write a marker on import) is refused, and never imported."""
    path, _, _ = gpt2_archive
    marker = tmp_path / "pwned"
    (tmp_path / "bwskc_hostile_outputs.py").write_text(f"open({str(marker)!r}, 'w')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    text = member(path, "models/model.json").decode()
    name = "transformers.modeling_outputs.CausalLMOutputWithCrossAttentions"
    assert name in text
    hostile = text.replace(name, "bwskc_hostile_outputs.CausalLMOutputWithCrossAttentions")
    evil = rewrite(path, tmp_path / "evil.pt2", {"models/model.json": hostile.encode()})
    message = refusal(evil)
    assert "bwskc_hostile_outputs" in message and "does not import" in message, message
    assert not marker.exists() and "bwskc_hostile_outputs" not in sys.modules


# -------------------------------------------------------------------------------------- zip bombs

def _central_entries(data: bytes):
    """(offset, name) of each central-directory header in a zip's bytes."""
    end = data.rfind(b"PK\x05\x06")
    size, start = struct.unpack_from("<II", data, end + 12)
    pos = start
    while pos < start + size:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        yield pos, data[pos + 46:pos + 46 + name_len].decode()
        pos += 46 + name_len + extra_len + comment_len


def _declare_size(data: bytes, suffix: str, size: int) -> bytes:
    """The zip with one member's declared uncompressed size in the central directory set to ``size``."""
    out = bytearray(data)
    offset = next(pos for pos, name in _central_entries(data) if name.endswith(suffix))
    struct.pack_into("<I", out, offset + 24, size)
    return bytes(out)


def _with_overlapping_copy(data: bytes, suffix: str) -> bytes:
    """The zip with a second central-directory entry pointing at one member's bytes (the overlapping
    construction of non-recursive zip bombs)."""
    pos, name = next((p, n) for p, n in _central_entries(data) if n.endswith(suffix))
    name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
    entry = bytearray(data[pos:pos + 46 + name_len + extra_len + comment_len])
    entry[46:46 + name_len] = (name[:-1] + ("X" if name[-1] != "X" else "Y")).encode()
    end = data.rfind(b"PK\x05\x06")
    eocd = bytearray(data[end:])
    count = struct.unpack_from("<H", eocd, 10)[0] + 1
    struct.pack_into("<HHI", eocd, 8, count, count, struct.unpack_from("<I", eocd, 12)[0] + len(entry))
    return data[:end] + bytes(entry) + bytes(eocd)


def _deflated(path: Path, dst: Path, name: str, data: bytes) -> bytes:
    """``path`` plus one deflated member, as bytes."""
    rewrite(path, dst, {})
    with zipfile.ZipFile(dst, "a", zipfile.ZIP_DEFLATED) as z:
        z.writestr(z.namelist()[0].split("/", 1)[0] + "/" + name, data)
    return dst.read_bytes()


def _ratio_bomb(path, tmp_path):
    return _deflated(path, tmp_path / "bomb.pt2", "extra/zeros", bytes(8 << 20))


def _declared_huge(path, tmp_path):
    data = _deflated(path, tmp_path / "bomb.pt2", "extra/small", b"x" * 1000)
    return _declare_size(data, "extra/small", 0xFFFF_FFF0)


def _overlapping(path, tmp_path):
    # rewritten by Python's zipfile first: torch's own writer adds zip64 records the splice would break
    data = rewrite(path, tmp_path / "plain.pt2", {}).read_bytes()
    return _with_overlapping_copy(data, "data/weights/weight_0")


def _stored_size_lie(path, tmp_path):
    return _declare_size(path.read_bytes(), "models/model.json", 1 << 31)


@pytest.mark.parametrize("make, reason", [(_ratio_bomb, "ratio"), (_declared_huge, "bytes"),
                                           (_overlapping, "overlap"), (_stored_size_lie, "stored")])
def test_zip_bombs_are_refused_before_inflating(small, tmp_path, make, reason):
    path, _, _ = small
    bomb = tmp_path / "bomb.pt2"
    bomb.write_bytes(make(path, tmp_path))
    start = time.perf_counter()
    message = refusal(bomb)
    assert time.perf_counter() - start < 2.0
    assert reason in message, message


def test_zip_bomb_is_refused_through_the_cli(small, tmp_path):
    path, _, _ = small
    bomb = tmp_path / "bomb.pt2"
    bomb.write_bytes(_ratio_bomb(path, tmp_path))
    assert_one_line_error(run_cli("lower", bomb), "bomb.pt2", "zip bomb")


def test_weights_saved_without_data_are_bounded(small, tmp_path):
    """torch fills a zero-byte weight record with zeros of the declared size: a few bytes of JSON must
    not allocate terabytes."""
    path, _, _ = small
    config = json.loads(member(path, "data/weights/model_weights_config.json"))
    entry = next(iter(config["config"].values()))
    entry["path_name"] = "weight_98"
    entry["tensor_meta"]["sizes"] = [{"as_int": 1 << 20}, {"as_int": 1 << 20}]
    evil = rewrite(path, tmp_path / "evil.pt2",
                   {"data/weights/model_weights_config.json": json.dumps(config).encode(),
                    "data/weights/weight_98": b""})
    assert "zeros" in refusal(evil)
