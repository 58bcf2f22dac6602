"""Loading ``.pt2`` archives (``torch.export.save``) as untrusted input.

``torch.export.load`` trusts its file: it unpickles sample inputs, tensor-subclass weights, constants and
opaque objects (falling back to ``weights_only=False`` when the safe unpickler refuses), hands symbolic
shape expressions from the JSON to ``sympy.sympify`` (which ``eval``\\ s them), loads AOTInductor shared
libraries, and inflates members to the sizes the zip declares. Here the archive is inspected before
anything in it is deserialized:

* the zip's central directory is checked against bounds (member count, per-member and total inflated
  size, compression ratio, overlapping members) before a byte is inflated;
* members only an unpickler or a dynamic loader can read are refused, and the one pickle torch always
  writes (the sample inputs) is read with ``weights_only=True``;
* every symbolic expression is parsed as a Python expression and must be a tree of sympy constructors
  from a fixed list, with literal arguments only, so ``sympify`` evaluates nothing else;
* zero-byte weight records, which torch fills with ``torch.zeros(declared size)``, are bounded;
* pytree classes the archive names (a Hugging Face ``ModelOutput``) are registered by importing their
  module, from an allow-list of module names only.

Then torch's own deserializer runs with ``torch.load`` forced to ``weights_only=True`` and the other
unpicklers refused, as a second line should a member slip past the inspection. ``trust_pickle=True`` skips
the pickle and expression checks (the user vouches for the file); the size bounds and the import
allow-list always apply.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import io
import json
import math
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator
from unittest import mock

import torch

from bwskc.errors import BwskError

# Bounds on what an archive may make us inflate or allocate. torch writes members stored (uncompressed),
# so a legitimate archive's inflated size is its size on disk; only a re-zipped one has compressed members.
MAX_MEMBERS = 65_536
MAX_INFLATED_BYTES = 4 << 30       # total of the compressed members' declared sizes
MAX_COMPRESSION_RATIO = 200        # for compressed members above RATIO_FLOOR_BYTES
RATIO_FLOOR_BYTES = 1 << 20
MAX_JSON_BYTES = 256 << 20         # one JSON member (the graph of a large model is tens of MB)
MAX_ZERO_FILLED_BYTES = 16 << 30   # weights saved without data (fake or meta tensors) become zeros
MAX_EXPRESSION_CHARS = 10_000
MAX_LITERAL = 1 << 64              # integer literals in a symbolic expression (shapes are int64)
MAX_POWER = 4096                   # product of literal exponents along a path of Pow nodes

_ZIP_LOCAL_HEADER_BYTES = 30
_SUPPORTED_COMPRESSION = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}

# Modules an archive may name for its pytree classes: importing any other module it names would run
# code the archive chose. These are installed library modules that define Hugging Face output and cache
# classes and register them with torch's pytree when imported.
ALLOWED_PYTREE_MODULES = ("transformers.modeling_outputs", "transformers.cache_utils")
_ALLOWED_PYTREE_MODULE_PATTERN = re.compile(r"transformers\.models\.[a-z0-9_]+\.modeling_[a-z0-9_]+")
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

# The constructors ``sympy.srepr`` writes for the expressions torch.export serializes, plus torch's own
# sympy functions. Everything else an expression could name (builtins, ``__import__``) is refused.
_SYMPY_CONSTRUCTORS = frozenset("""
    Symbol Integer Rational Float Add Mul Pow Mod Max Min Abs floor ceiling sign
    Equality Unequality StrictLessThan LessThan StrictGreaterThan GreaterThan Eq Ne Lt Le Gt Ge
    And Or Not Xor Piecewise ExprCondPair ITE
    FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift RShift
    PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator TruncToFloat
    TruncToInt RoundToInt RoundDecimal ToFloat Identity
""".split())
_POWER_CONSTRUCTORS = frozenset({"Pow", "PowByNatural", "FloatPow"})
_SYMPY_CONSTANTS = frozenset({"true", "false", "oo", "zoo", "nan", "pi", "E"})
_SYMPY_KEYWORDS = frozenset({"positive", "negative", "nonnegative", "nonpositive", "integer", "real",
                             "finite", "infinite", "zero", "nonzero", "even", "odd", "prime",
                             "commutative", "precision", "evaluate"})
_LITERAL_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[-+]?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?")


def load_exported_program(path: Path, *, trust_pickle: bool = False) -> torch.export.ExportedProgram:
    """Inspect ``path`` and load its ExportedProgram, refusing (one line, naming the file) what would
    run code or inflate without bound."""
    with open(path, "rb") as f:
        members = check_zip_bounds(f, label=str(path))
        with zipfile.ZipFile(f) as archive:
            contents = _ArchiveView(archive, members, label=str(path))
            if not trust_pickle:
                contents.refuse_code_members()
                contents.check_sample_inputs()
                for model in contents.model_jsons():
                    check_symbolic_expressions(model, label=str(path))
            contents.check_zero_filled_tensors()
            for model in contents.model_jsons():
                register_pytree_types(model, label=str(path))
            new_format = contents.has("archive_format")
    guard = contextlib.nullcontext() if trust_pickle else _unpicklers_refused()
    try:
        with guard:
            return _torch_load(path, new_format)
    except PickleRefused as exc:
        raise BwskError(f"{path}: a pickled member needs code to load ({exc}); refused: pass "
                        "--trust-pickle if you trust this file") from None


def _torch_load(path: Path, new_format: bool) -> torch.export.ExportedProgram:
    # ``torch.export.load`` turns every error of the current format into "check the warnings above";
    # calling its loader directly keeps the reason.
    if not new_format:
        return torch.export.load(str(path))
    from torch.export.pt2_archive._package import load_pt2
    with open(path, "rb") as f:  # a file object: a path not ending in .pt2 makes torch log a warning
        programs = load_pt2(f).exported_programs
    if "model" not in programs:
        raise BwskError(f"{path}: the archive holds no program named 'model' "
                        f"(it has: {', '.join(sorted(programs)) or 'none'})")
    return programs["model"]


# ------------------------------------------------------------------------------------------- the zip

def check_zip_bounds(f: BinaryIO, *, label: str) -> dict[str, zipfile.ZipInfo]:
    """The members of the zip in ``f``, after checking the sizes its central directory declares: no
    member is inflated here. Refuses bombs (huge declared sizes, extreme ratios, members sharing bytes)."""
    f.seek(0, io.SEEK_END)
    file_size = f.tell()
    f.seek(0)
    try:
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as exc:
        raise BwskError(f"{label}: not a readable zip archive ({exc})") from None
    if len(infos) > MAX_MEMBERS:
        raise BwskError(f"{label}: {len(infos)} members, more than the {MAX_MEMBERS} bwskc reads")
    members: dict[str, zipfile.ZipInfo] = {}
    inflated = 0
    for info in infos:
        _check_member(info, file_size, label)
        if info.filename in members:
            raise BwskError(f"{label}: member {info.filename!r} appears twice")
        members[info.filename] = info
        if info.compress_type != zipfile.ZIP_STORED:
            inflated += info.file_size
    if inflated > MAX_INFLATED_BYTES:
        raise BwskError(f"{label}: compressed members declare {inflated} bytes inflated, more than the "
                        f"{MAX_INFLATED_BYTES} bwskc inflates (a zip bomb?)")
    _check_no_overlap(infos, label)
    return members


def _check_member(info: zipfile.ZipInfo, file_size: int, label: str) -> None:
    where = f"{label}: member {info.filename!r}"
    if info.compress_type not in _SUPPORTED_COMPRESSION:
        raise BwskError(f"{where} uses compression method {info.compress_type}; only stored and "
                        "deflated members are read")
    if info.header_offset + info.compress_size > file_size:
        raise BwskError(f"{where} declares {info.compress_size} bytes past the end of the file")
    if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
        raise BwskError(f"{where} is stored but declares {info.file_size} bytes for "
                        f"{info.compress_size} on disk")
    if info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > RATIO_FLOOR_BYTES:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > MAX_COMPRESSION_RATIO:
            raise BwskError(f"{where} inflates {info.compress_size} bytes to {info.file_size} "
                            f"(ratio {ratio:.0f}, over {MAX_COMPRESSION_RATIO}: a zip bomb?)")


def _check_no_overlap(infos: list[zipfile.ZipInfo], label: str) -> None:
    """Members must not share bytes: overlapping entries are how a small zip declares an unbounded
    total (every entry pointing at the same compressed data)."""
    ordered = sorted(infos, key=lambda i: i.header_offset)
    for before, after in zip(ordered, ordered[1:]):
        end = (before.header_offset + _ZIP_LOCAL_HEADER_BYTES + len(before.orig_filename.encode())
               + before.compress_size)
        if after.header_offset < end:
            raise BwskError(f"{label}: members {before.filename!r} and {after.filename!r} overlap "
                            "(a zip bomb?)")


# ------------------------------------------------------------------------------------- the members

class _ArchiveView:
    """The archive's members under its single root folder, as torch's reader sees them."""

    def __init__(self, archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], *, label: str):
        self.archive, self.label = archive, label
        roots = {name.split("/", 1)[0] for name in members if "/" in name}
        if len(roots) != 1 or any("/" not in name for name in members):
            raise BwskError(f"{label}: not an ExportedProgram archive from torch.export.save "
                            "(its members are not under one folder)")
        self.root = roots.pop() + "/"
        self.members = {name[len(self.root):]: info for name, info in members.items()}
        self._parsed: dict[str, Any] = {}

    def has(self, name: str) -> bool:
        return name in self.members

    def read(self, name: str, *, limit: int | None = None) -> bytes:
        info = self.members[name]
        if limit is not None and info.file_size > limit:
            raise BwskError(f"{self.label}: member {name!r} is {info.file_size} bytes, more than "
                            f"the {limit} bwskc reads")
        try:
            return self.archive.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise BwskError(f"{self.label}: member {name!r} is corrupt ({exc})") from None

    def read_json(self, name: str) -> Any:
        """The parsed member, once per member: the graph of a large model is tens of MB of JSON."""
        if name not in self._parsed:
            try:
                self._parsed[name] = json.loads(self.read(name, limit=MAX_JSON_BYTES))
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise BwskError(f"{self.label}: member {name!r} is not valid JSON ({exc})") from None
        return self._parsed[name]

    def model_jsons(self) -> Iterator[Any]:
        for name in self.members:
            if name.startswith("models/") and name.endswith(".json"):
                yield self.read_json(name)

    def payload_configs(self) -> Iterator[tuple[str, str, dict]]:
        """(folder, config member, entry) for every weight and constant the archive lists."""
        for name in sorted(self.members):
            for folder, suffix in (("data/weights/", "_weights_config.json"),
                                   ("data/constants/", "_constants_config.json")):
                if name.startswith(folder) and name.endswith(suffix):
                    config = self.read_json(name)
                    entries = config.get("config") if isinstance(config, dict) else None
                    if not isinstance(entries, dict):
                        raise BwskError(f"{self.label}: member {name!r} has no 'config' mapping")
                    for fqn, entry in entries.items():
                        if not isinstance(entry, dict) or not isinstance(entry.get("path_name"), str):
                            raise BwskError(f"{self.label}: member {name!r}: entry {fqn!r} is malformed")
                        yield folder, fqn, entry

    def refuse_code_members(self) -> None:
        """Refuse members that only an unpickler or a dynamic loader reads."""
        for name in self.members:
            if name.startswith(("data/aotinductor/", "data/executorch/", "data/mtia")):
                raise BwskError(f"{self.label}: member {name!r} is compiled code, which loading would "
                                "run; refused: pass --trust-pickle if you trust this file")
        for folder, fqn, entry in self.payload_configs():
            member = folder + entry["path_name"]
            if entry.get("use_pickle") or entry["path_name"].startswith(("custom_obj_", "opaque_obj_")):
                raise BwskError(f"{self.label}: member {member!r} ({fqn}) is pickled, and unpickling "
                                "runs arbitrary code; refused: pass --trust-pickle if you trust this file")

    def check_sample_inputs(self) -> None:
        """The sample inputs are a ``torch.save`` pickle: read them with the safe unpickler now, so a
        refusal names the member (torch reads them again, under the same rule, when it loads)."""
        for name in self.members:
            if name.startswith("data/sample_inputs/") and self.members[name].file_size:
                load_weights_only(self.read(name), label=f"{self.label}: member {name!r}")

    def check_zero_filled_tensors(self) -> None:
        """torch allocates ``zeros(declared size)`` for a weight saved without data: bound the total."""
        from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE
        total = 0
        for folder, fqn, entry in self.payload_configs():
            info = self.members.get(folder + entry["path_name"])
            if entry.get("use_pickle") or info is None or info.file_size:
                continue
            meta = entry.get("tensor_meta") or {}
            sizes = [s.get("as_int") if isinstance(s, dict) else None for s in meta.get("sizes") or ()]
            dtype = _SERIALIZE_TO_TORCH_DTYPE.get(meta.get("dtype"))
            if dtype is None or not all(isinstance(s, int) and s >= 0 for s in sizes):
                raise BwskError(f"{self.label}: {fqn}: declared tensor metadata is malformed")
            total += math.prod(sizes) * dtype.itemsize
            if total > MAX_ZERO_FILLED_BYTES:
                raise BwskError(f"{self.label}: weights saved without data declare {total} bytes to "
                                f"fill with zeros, more than the {MAX_ZERO_FILLED_BYTES} bwskc allocates")


def load_weights_only(data: bytes, *, label: str) -> Any:
    """``torch.load`` of a nested ``torch.save`` archive with the safe unpickler, after the same size
    checks as the outer archive (its members are inflated by torch's reader)."""
    buffer = io.BytesIO(data)
    if zipfile.is_zipfile(buffer):
        check_zip_bounds(buffer, label=label)
    buffer.seek(0)
    try:
        return _ORIGINAL_TORCH_LOAD(buffer, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise BwskError(f"{label} is a pickle the safe unpickler refuses "
                        f"({_refusal_reason(exc)}); refused: pass --trust-pickle if you trust this "
                        "file") from None


def _refusal_reason(exc: Exception) -> str:
    """What a weights_only refusal refused (``it names io.open``), else its first line, shortened."""
    text = str(exc)
    if found := re.search(r"Unsupported global: GLOBAL ([\w.]+)", text):
        return f"it names {found[1]}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return first if len(first) <= 160 else first[:160] + "..."


# ------------------------------------------------------------------------- symbolic shape expressions

def check_symbolic_expressions(model_json: Any, *, label: str) -> None:
    """Every ``expr_str`` in the program's JSON must be an expression ``sympify`` can build without
    evaluating anything but sympy constructors on bounded literals."""
    for expr in _values_of_key(model_json, "expr_str"):
        if not isinstance(expr, str):
            raise BwskError(f"{label}: a symbolic expression is not a string")
        if len(expr) > MAX_EXPRESSION_CHARS:
            raise BwskError(f"{label}: a symbolic expression of {len(expr)} characters, more than "
                            f"{MAX_EXPRESSION_CHARS}")
        try:
            tree = ast.parse(expr, mode="eval")
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            raise BwskError(f"{label}: symbolic expression {_excerpt(expr)} is not an expression") from None
        problem = _expression_problem(tree.body, power=1)
        if problem:
            raise BwskError(f"{label}: symbolic expression {_excerpt(expr)} refused: {problem}")


def _expression_problem(node: ast.AST, *, power: int) -> str | None:
    """Why ``node`` is not a safe sympy constructor tree, or None. ``power`` is the product of the
    literal exponents above it, bounded so that no Pow nest builds an enormous number."""
    if isinstance(node, ast.Constant):
        return _literal_problem(node.value)
    if isinstance(node, ast.Name):
        return None if node.id in _SYMPY_CONSTANTS else f"name {node.id!r} is not a sympy constant"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return _expression_problem(node.operand, power=power)
    if not isinstance(node, ast.Call):
        return f"{type(node).__name__} is not a sympy constructor call"
    if not isinstance(node.func, ast.Name) or node.func.id not in _SYMPY_CONSTRUCTORS:
        return f"{ast.unparse(node.func)!r} is not a sympy constructor bwskc allows"
    for keyword in node.keywords:
        if keyword.arg not in _SYMPY_KEYWORDS or not isinstance(keyword.value, ast.Constant):
            return f"keyword {keyword.arg!r} is not an assumption or precision"
        if problem := _literal_problem(keyword.value.value):
            return problem
    if node.func.id in _POWER_CONSTRUCTORS and len(node.args) == 2:
        exponent = _literal_exponent(node.args[1])
        if exponent is None:
            return "a power whose exponent is a constant expression rather than a literal"
        power *= exponent
        if power > MAX_POWER:
            return f"powers nest to an exponent over {MAX_POWER}"
    for arg in node.args:
        if problem := _expression_problem(arg, power=power):
            return problem
    return None


def _literal_exponent(node: ast.AST) -> int | None:
    """How much a power with this exponent can grow a literal base: |p| for ``Integer(p)`` or
    ``Rational(p, q)``, 1 for a float or a symbolic exponent (a symbol is never evaluated on a literal
    here), None for a constant expression, whose value is unbounded (``Pow(2, Pow(2, 100))``)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id in ("Integer", "Rational"):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, int):
                return max(abs(first.value), 1)
            return None
        if node.func.id == "Float":
            return 1
    return 1 if _mentions_symbol(node) else None


def _mentions_symbol(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Symbol"
               for n in ast.walk(node))


def _literal_problem(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return None if abs(value) <= MAX_LITERAL else "an integer literal out of range"
    if isinstance(value, float):
        return None
    if isinstance(value, str):
        return None if len(value) <= 64 and _LITERAL_STRING.fullmatch(value) else \
            f"string literal {_excerpt(value)} is not a name or a number"
    return f"literal of type {type(value).__name__}"


def _excerpt(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


# ------------------------------------------------------------------------------------ pytree classes

def register_pytree_types(model_json: Any, *, label: str) -> None:
    """Import the allow-listed modules that define the pytree classes the program's input and output
    specs name (a Hugging Face ``ModelOutput`` registers itself when its module is imported)."""
    import torch.utils._pytree as pytree
    for type_name in sorted(_treespec_type_names(model_json, label)):
        if type_name in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        module = type_name.rpartition(".")[0]
        if not (_DOTTED_NAME.fullmatch(type_name) and _pytree_module_allowed(module)):
            raise BwskError(f"{label}: the program's inputs or outputs are of type {_excerpt(type_name)}, "
                            "whose module bwskc does not import (importing a module an archive names "
                            f"runs its code; allowed: {', '.join(ALLOWED_PYTREE_MODULES)}, "
                            "transformers.models.*.modeling_*)")
        try:
            importlib.import_module(module)
        except Exception as exc:
            raise BwskError(f"{label}: cannot import {module} for the program's type {type_name} "
                            f"({type(exc).__name__}: {exc})") from None
        if type_name not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            raise BwskError(f"{label}: the program's type {type_name} is not a pytree class "
                            f"{module} registers")


def _pytree_module_allowed(module: str) -> bool:
    return module in ALLOWED_PYTREE_MODULES or bool(_ALLOWED_PYTREE_MODULE_PATTERN.fullmatch(module))


def _treespec_type_names(model_json: Any, label: str) -> set[str]:
    names: set[str] = set()
    for key in ("in_spec", "out_spec"):
        for spec in _values_of_key(model_json, key):
            if not isinstance(spec, str) or not spec:
                continue
            try:
                parsed = json.loads(spec)
            except (json.JSONDecodeError, RecursionError):
                raise BwskError(f"{label}: a pytree spec ({key}) is not valid JSON") from None
            names |= {t for t in _values_of_key(parsed, "type") if isinstance(t, str)}
    return names


def _values_of_key(tree: Any, key: str) -> Iterator[Any]:
    """Every value stored under ``key`` in nested dicts and lists (iteratively: JSON can nest deeply)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                if k == key:
                    yield v
                stack.append(v)
        elif isinstance(node, list):
            stack.extend(node)


# ------------------------------------------------------------------- the second line: torch's loader

_ORIGINAL_TORCH_LOAD = torch.load


class PickleRefused(Exception):
    """An unpickling torch's loader attempted beyond what ``weights_only=True`` reads.

    Not a RuntimeError: ``torch.export.load`` catches those and retries with an older format."""


class _RefusingPickle:
    """Stands in for the ``pickle`` module in torch's archive loader: saving works, loading raises."""

    def __init__(self, refuse):
        self.loads = self.load = self.Unpickler = refuse

    def __getattr__(self, name):
        import pickle
        return getattr(pickle, name)


@contextlib.contextmanager
def _unpicklers_refused():
    """While torch's deserializer runs: ``torch.load`` reads with ``weights_only=True`` only (torch
    retries a refused pickle with ``weights_only=False``; that retry raises instead), and the plain and
    TorchScript unpicklers its loader calls for opaque and custom objects raise."""
    from torch.export.pt2_archive import _package
    refusals: list[str] = []

    def safe_load(f, *args, weights_only: bool | None = None, **kwargs):
        if weights_only is False:
            raise PickleRefused(refusals[-1] if refusals else "torch.load with weights_only=False")
        try:
            return _ORIGINAL_TORCH_LOAD(f, *args, weights_only=True, **kwargs)
        except Exception as exc:
            refusals.append(_refusal_reason(exc))
            raise

    def refuse(*_args, **_kwargs):
        raise PickleRefused("an opaque or custom object")

    pickle_module = _RefusingPickle(refuse)
    with mock.patch.object(torch, "load", safe_load), \
            mock.patch.object(_package, "pickle", pickle_module), \
            mock.patch.object(torch._C, "_pickle_load_obj", refuse):
        yield
