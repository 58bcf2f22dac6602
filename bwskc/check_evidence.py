"""``bwskc check-evidence FILE.json``: re-verify the S/K claims of a ``--emit json`` file with torch alone.

Nothing of the run that wrote the file is used: each claim is rebuilt from its node's ``op`` (an
``aten``/``prims`` overload, resolved through torch's operator registry only), its recorded arguments
(``call``), the bound tensors it reads (embedded in the file's ``weights`` when small, or given with
``--weights FILE.safetensors``), and the evidence's recorded inputs. This module and its codec
(``bwskc.evidence_codec``) import torch and the standard library only, so a third party can read them as
the reference of the schema (docs/typing.md, "Evidence schema"). The claims:

* K, ``collision``: the two inputs are rebuilt (values, or bwskc's documented random construction plus
  a perturbation), differ, and the op maps them to the same output (``torch.allclose`` at this module's
  own tolerances, never the file's), in the recorded dtype; with the recorded seed replayed for a random
  op.
* S, ``round_trip``: the inverse is bwskc code, so the round trip cannot be rerun here; a recorded error
  above the tolerance is a failure (the file contradicts itself), otherwise not re-checkable. Data
  movement (rules selection, reshape, permutation, broadcast, identity) is verified anyway: the op is run
  on coded inputs (element k holds 2**40 + k, in float64) and every code must appear in the output.
* S, ``rank``: full column rank with ``sigma_min > tolerance >= floor``, where floor is the float64 SVD
  rounding bound ``max(k, d) * eps64 * sigma_max``; recomputed from the weight when it is at hand, else
  checked for consistency and reported not re-checkable.

The input is untrusted: no code is run from it (op names are looked up in the registry, torch attributes
in a fixed table), and no tensor above ``MAX_ELEMENTS`` is allocated.
"""
from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import dataclass

import torch

from bwskc.evidence_codec import (
    DTYPES,
    MAX_ELEMENTS,
    ROUND_TRIP_TOL,
    EvidenceError,
    decode_tensor,
    bounded_leaves,
    differ,
    from_number,
    leaves,
    max_abs_diff,
    nest,
    rebuild_pair,
    same_output,
    shape_of,
    tensors_of,
)

CODE_BASE = float(2 ** 40)
OPERATOR_LIMIT = 1024  # columns of a linear operator rebuilt from basis vectors (its SVD stays cheap)
SVD_LIMIT = 1 << 22  # elements of a matrix whose singular values are recomputed (a second or so)

_TORCH_ATTRS = {str(v): v for v in [*DTYPES.values(), torch.strided, torch.contiguous_format,
                                    torch.channels_last, torch.channels_last_3d, torch.preserve_format]}
_OP_NAME = re.compile(r"^(aten|prims)\.([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
_AS_RESHAPE = ("aten.view.default", "aten._unsafe_view.default")
# operators whose effect is outside their tensors (files, the global RNG, printing): never run from a file
_REFUSED = frozenset({
    "aten::save", "aten::from_file", "aten::_print", "aten::warn", "aten::manual_seed", "aten::seed",
    "aten::initial_seed", "aten::set_grad_enabled", "aten::record_stream", "aten::cuda", "aten::set_",
    "aten::set_data", "aten::_set_item", "aten::_cufft_set_plan_cache_max_size",
    "aten::_cufft_clear_plan_cache", "aten::_test_warn_in_autograd", "aten::_use_cudnn_ctc_loss"})
_DATA_MOVEMENT = ("selection", "reshape", "permutation", "broadcast", "identity")


# --------------------------------------------------------------------------------------- ops and args

def resolve(op: str):
    """The callable of an op name, from torch's operator registry only (``aten``/``prims``
    OpOverloads, plus bwskc's ``getitem`` and ``tuple``): no attribute of anything else is reached."""
    if op == "getitem":
        return operator.getitem
    if op == "tuple":
        return lambda *xs: tuple(xs)
    if op in _AS_RESHAPE:  # the IR is functional: a view's meaning is its values (as bwskc runs it)
        op = "aten.reshape.default"
    m = _OP_NAME.match(op) if isinstance(op, str) else None
    if m is None:
        raise EvidenceError(f"op {op!r} is not an aten/prims overload name")
    namespace, name, overload = m.groups()
    if f"{namespace}::{name}" in _REFUSED:
        raise EvidenceError(f"op {op!r} refused: it acts outside its tensors")
    try:
        packet = getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        raise EvidenceError(f"unknown op {op!r}") from None
    if not isinstance(packet, torch._ops.OpOverloadPacket) or overload not in packet.overloads():
        raise EvidenceError(f"unknown op {op!r}")
    fn = getattr(packet, overload)
    if not isinstance(fn, torch._ops.OpOverload):
        raise EvidenceError(f"unknown op {op!r}")
    return fn


class Env:
    """What a call's bound arguments refer to: weights (embedded or loaded) and constants (rebuilt from
    the file's constant nodes on demand)."""

    def __init__(self, doc: dict, weights: dict[str, torch.Tensor] | None = None):
        self.weights = dict(weights or {})
        for name, spec in (doc.get("weights") or {}).items():
            self.weights.setdefault(name, decode_tensor(spec))
        self.const_nodes = {n.get("def"): n for n in doc.get("nodes", [])
                            if isinstance(n, dict) and str(n.get("def", "")).startswith("%")}
        self.consts: dict[int, torch.Tensor] = {}
        self._busy: set[int] = set()
        self.missing: set[str] = set()

    def tensor(self, name: str):
        if name not in self.weights:
            self.missing.add(name)
            raise Missing(name)
        return self.weights[name]

    def const(self, index: int):
        if index in self.consts:
            return self.consts[index]
        node = self.const_nodes.get(f"%{index}")
        if node is None or index in self._busy or "call" not in node:
            raise EvidenceError(f"constant %{index} is not in the file")
        self._busy.add(index)
        try:
            value = call_op(node["op"], node["call"], [], self)
        finally:
            self._busy.discard(index)
        self.consts[index] = value
        return value


class Missing(Exception):
    """A bound tensor whose values are not at hand."""


def decode_arg(a, operands: list, env: Env, cast=None):
    if isinstance(a, list):
        return [decode_arg(x, operands, env, cast) for x in a]
    if isinstance(a, dict):
        if "hole" in a:
            if not operands:
                raise EvidenceError("more holes than inputs")
            return operands.pop(0)
        if "tensor" in a:
            t = env.tensor(str(a["tensor"]))
            return cast(t) if cast else t
        if "const" in a:
            t = env.const(int(a["const"]))
            return cast(t) if cast and isinstance(t, torch.Tensor) else t
        if "float" in a:
            return float(from_number(a["float"]))
        if "str" in a:
            return str(a["str"])
        if "torch" in a:
            if a["torch"] not in _TORCH_ATTRS:
                raise EvidenceError(f"unknown torch attribute {a['torch']!r}")
            return _TORCH_ATTRS[a["torch"]]
        if "device" in a:
            return torch.device("cpu")  # rebuilt on the CPU whatever the original device
        raise EvidenceError(f"bad argument {a!r}")
    if a is None or isinstance(a, (bool, int, float)):
        return a
    raise EvidenceError(f"bad argument {a!r}")


def call_op(op: str, call: dict, operands: list, env: Env, cast=None):
    """Run ``op`` with the recorded arguments, ``operands`` filling its holes in order."""
    fn = resolve(op)
    ops = list(operands)
    args = [decode_arg(a, ops, env, cast) for a in call.get("args", [])]
    kwargs = {str(k): decode_arg(v, ops, env, cast) for k, v in (call.get("kwargs") or {}).items()}
    with torch.no_grad():
        if isinstance(fn, torch._ops.OpOverload):
            _bound_output(fn, args, kwargs)
        return fn(*args, **kwargs)


def _meta(v):
    if isinstance(v, torch.Tensor):
        return v.to("meta")
    if isinstance(v, torch.device):
        return torch.device("meta")
    if isinstance(v, (list, tuple)):
        return type(v)(_meta(x) for x in v)
    return v


def _bound_output(fn, args, kwargs) -> None:
    """Run the op on the meta device first: an output above ``MAX_ELEMENTS`` (``repeat`` by 10**12 in a
    hostile file) is refused before anything is allocated, and so is an op whose output size cannot be
    known beforehand."""
    meta_kwargs = {k: _meta(v) for k, v in kwargs.items()}
    if any(a.name == "device" for a in fn._schema.arguments) and "device" not in meta_kwargs:
        meta_kwargs["device"] = torch.device("meta")  # a factory op: build on meta, not on the CPU
    try:
        out = fn(*_meta(args), **meta_kwargs)
    except Exception as exc:  # no meta kernel, or a data-dependent size: the size is unknown
        raise EvidenceError(f"{fn}: its output size cannot be bounded beforehand ({_first(exc)})") from None
    total = sum(t.numel() for t in tensors_of(out))
    if total > MAX_ELEMENTS:
        raise EvidenceError(f"{fn}: its output would have {total} elements, more than {MAX_ELEMENTS}")


def run_seeded(fn, seed):
    if seed is None:
        return fn()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return fn()


# --------------------------------------------------------------------------------------------- claims

@dataclass
class Outcome:
    node: int
    claim: str
    status: str  # "verified", "failed" or "not re-checkable"
    why: str = ""


def check_collision(node: dict, env: Env) -> Outcome:
    ev, call = node["evidence"], node.get("call")
    col = ev.get("collision")
    nid = node.get("id")
    if not isinstance(col, dict):
        return Outcome(nid, "collision", "not re-checkable", ev.get("witness_note") or "no witness recorded")
    if not isinstance(call, dict):
        return Outcome(nid, "collision", "not re-checkable", "the call is not recorded")
    seed = col.get("replay_seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63):
        return Outcome(nid, "collision", "failed", f"bad replay seed {seed!r}")
    try:
        a, b = rebuild_pair(call.get("holes", []), col)
    except EvidenceError as exc:
        return Outcome(nid, "collision", "not re-checkable", str(exc))
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:  # a malformed record
        return Outcome(nid, "collision", "failed", f"malformed witness record: {_first(exc)}")
    if not differ(a, b):
        return Outcome(nid, "collision", "failed", "the two inputs are equal")
    try:
        holes = call.get("holes", [])
        ya = run_seeded(lambda: call_op(node["op"], call, list(nest(holes, a)), env), seed)
        yb = run_seeded(lambda: call_op(node["op"], call, list(nest(holes, b)), env), seed)
    except Missing as m:
        return Outcome(nid, "collision", "not re-checkable", f"not re-checkable without weights: {m}")
    except EvidenceError as exc:
        return Outcome(nid, "collision", "not re-checkable", str(exc))
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        return Outcome(nid, "collision", "failed", f"the op raised: {_first(exc)}")
    if same_output(ya, yb):
        return Outcome(nid, "collision", "verified")
    return Outcome(nid, "collision", "failed",
                   f"witness did not collide: max |f(a)-f(b)| = {max_abs_diff(ya, yb):.3g}")


def check_round_trip(node: dict, env: Env) -> Outcome:
    ev = node["evidence"]
    rt, nid = ev.get("round_trip"), node.get("id")
    if ev.get("rule") in _DATA_MOVEMENT and isinstance(node.get("call"), dict):
        coded = _coded_check(node, env)
        if coded is not None:
            return coded
    if not isinstance(rt, dict) or "relative_error" not in rt:
        why = rt.get("not_run", "no round trip recorded") if isinstance(rt, dict) else "no round trip recorded"
        return Outcome(nid, "round trip", "not re-checkable", why)
    tol = ROUND_TRIP_TOL.get(rt.get("dtype"), 0.0)
    err = from_number(rt["relative_error"])
    if not err <= tol:
        return Outcome(nid, "round trip", "failed",
                       f"recorded round-trip error {err:.3g} exceeds the tolerance {tol:g} ({rt.get('dtype')})")
    return Outcome(nid, "round trip", "not re-checkable",
                   f"the inverse is bwskc code; recorded error {err:.3g} within {tol:g}")


def _coded_check(node: dict, env: Env) -> Outcome | None:
    """Data movement: every input element, coded 2**40 + k in float64, appears in the output."""
    call, nid = node["call"], node.get("id")
    types = bounded_leaves(call.get("holes", []))
    n = sum(math.prod(shape_of(t["shape"])) for t in types)
    if not types or n > MAX_ELEMENTS:
        return None
    coded, start = [], 0
    for t in types:
        k = math.prod(t["shape"])
        coded.append((torch.arange(k, dtype=torch.float64) + CODE_BASE + start).reshape(tuple(t["shape"])))
        start += k
    try:
        out = call_op(node["op"], call, list(nest(call["holes"], coded)), env)
    except Missing as m:
        return Outcome(nid, "round trip", "not re-checkable", f"not re-checkable without weights: {m}")
    except Exception:  # an op that does not take coded float64 inputs: fall back to the record
        return None
    parts = [t.reshape(-1).double() for t in tensors_of(out)]
    codes = torch.cat(parts) - CODE_BASE if parts else torch.zeros(0, dtype=torch.float64)
    codes = codes[(codes >= 0) & (codes < n) & (codes == codes.round())].long()
    seen = torch.zeros(n, dtype=torch.bool)
    seen[codes] = True
    if bool(seen.all()):
        return Outcome(nid, "round trip", "verified")
    return Outcome(nid, "round trip", "failed",
                   f"{int((~seen).sum())} of {n} input elements are not copied to the output")


def check_rank(node: dict, env: Env) -> Outcome:
    """Full column rank d with sigma_min > tolerance >= floor; recomputed from the matrix when known."""
    ev, nid = node["evidence"], node.get("id")
    rank = ev["rank"]
    cols, tol = rank.get("columns"), rank.get("tolerance")
    if rank.get("rank") != cols or cols is None:
        return Outcome(nid, "rank", "failed", f"rank {rank.get('rank')} is not the column count {cols}")
    matrix = rank.get("matrix")
    m = None
    if isinstance(matrix, dict) and isinstance(node.get("call"), dict):
        try:
            m = _matrix(node, matrix, env)
        except Missing as exc:
            why = f"not re-checkable without weights: {exc}"
        except EvidenceError as exc:
            why = str(exc)
    else:
        why = "the matrix is not named"
    if m is not None and m.numel() > SVD_LIMIT:
        m, why = None, f"the matrix has {m.numel()} elements, more than the {SVD_LIMIT} decomposed here"
    if m is not None:
        s = torch.linalg.svdvals(m.double())
        if len(s) < cols:
            return Outcome(nid, "rank", "failed", f"the matrix has {len(s)} singular values, fewer than {cols}")
        floor = max(m.shape) * torch.finfo(torch.float64).eps * float(s[0])
        smin = float(s[cols - 1])
        use = max(floor, float(tol) if isinstance(tol, (int, float)) else 0.0)
        if not smin > use:
            return Outcome(nid, "rank", "failed", f"numerically rank-deficient: sigma_min {smin:.3g} at "
                           f"tolerance {use:.3g}")
        if isinstance(tol, (int, float)) and tol < floor * (1 - 1e-6):  # slack: SVDs differ in the last bits
            return Outcome(nid, "rank", "failed", f"tolerance {tol:.3g} is below the float64 SVD rounding "
                           f"bound {floor:.3g}")
        return Outcome(nid, "rank", "verified")
    return _rank_consistency(nid, rank, why)


def _rank_consistency(nid, rank: dict, why: str) -> Outcome:
    smin, smax, tol = rank.get("sigma_min"), rank.get("sigma_max"), rank.get("tolerance")
    if isinstance(smin, (int, float)) and isinstance(tol, (int, float)):
        if isinstance(smax, (int, float)):
            floor = max(rank.get("shape") or [rank["columns"]]) * torch.finfo(torch.float64).eps * smax
            if tol < floor * (1 - 1e-6):
                return Outcome(nid, "rank", "failed", f"tolerance {tol:.3g} is below the float64 SVD "
                               f"rounding bound {floor:.3g}")
        if not smin > tol:
            return Outcome(nid, "rank", "failed", f"sigma_min {smin:.3g} is not above the tolerance {tol:.3g}")
    return Outcome(nid, "rank", "not re-checkable", why)


def _matrix(node: dict, matrix: dict, env: Env) -> torch.Tensor:
    """The matrix whose column rank the claim is about: a bound argument (transposed if said), or the
    operator of a linear op on one example, built by applying the op to basis vectors."""
    if "arg" in matrix:
        arg = matrix["arg"]
        call = node["call"]
        value = decode_arg(arg, [], env)
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            raise EvidenceError("the named matrix is not a 2-d tensor")
        return value.T if matrix.get("transpose") else value
    if matrix.get("operator") == "per example":
        call = node["call"]
        (t,) = leaves(call["holes"])
        shape = shape_of(t["shape"])
        per = math.prod(shape[1:])
        if per > OPERATOR_LIMIT:
            raise EvidenceError(f"the operator has {per} columns: more than the {OPERATOR_LIMIT} rebuilt "
                                "here (its SVD would take seconds)")
        out_per = math.prod(shape_of(node.get("shape") or [])[1:]) if node.get("shape") else 0
        if per * out_per > SVD_LIMIT // 4:
            raise EvidenceError(f"the operator is {out_per}x{per}: too large to rebuild here")
        basis = torch.eye(per, dtype=torch.float64).reshape((per,) + shape[1:])
        f = lambda x: call_op(node["op"], call, [x], env, cast=lambda w: w.double())
        y = f(basis) - f(torch.zeros_like(basis))
        return y.reshape(per, -1).T
    raise EvidenceError(f"bad matrix record {matrix!r}")


def _first(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def claims_of(node: dict, env: Env) -> list[Outcome]:
    ev = node.get("evidence")
    if not isinstance(ev, dict) or node.get("type") not in ("S", "K"):
        return []
    if node["type"] == "K":
        return [check_collision(node, env)]
    if ev.get("rule") == "nullary":
        return []
    out = []
    if ev.get("round_trip") is not None or ev.get("rule") in _DATA_MOVEMENT:
        out.append(check_round_trip(node, env))
    if isinstance(ev.get("rank"), dict):
        out.append(check_rank(node, env))
    if not out:
        out.append(Outcome(node.get("id"), "S", "not re-checkable",
                           ev.get("not_checked") or "no inverse or certificate recorded"))
    return out


def check_document(doc: dict, weights: dict | None = None) -> list[Outcome]:
    if not isinstance(doc, dict) or not str(doc.get("schema", "")).startswith("bwskc.ir/"):
        raise EvidenceError("not a bwskc --emit json file (no bwskc.ir schema)")
    if doc["schema"] == "bwskc.ir/1":
        raise EvidenceError("schema bwskc.ir/1 records no checkable evidence: re-run bwskc lower "
                            "--passes typing --emit json (bwskc.ir/2)")
    env = Env(doc, weights)
    out = []
    for node in doc.get("nodes", []):
        if isinstance(node, dict):
            out.extend(claims_of(node, env))
    return out


def summary(outcomes: list[Outcome]) -> list[str]:
    count = {s: sum(1 for o in outcomes if o.status == s) for s in ("verified", "failed", "not re-checkable")}
    lines = [f"{len(outcomes)} claims: {count['verified']} verified, {count['failed']} failed, "
             f"{count['not re-checkable']} not re-checkable"]
    lines += [f"node {o.node}: {o.claim} failed: {o.why}" for o in outcomes if o.status == "failed"]
    return lines


# ------------------------------------------------------------------------------------------ the command

class CheckFailed(Exception):
    """Some claim failed: the command exits 1 (the summary is already printed)."""


def read_document(path: str) -> dict:
    """The JSON file, or a one-line ``EvidenceError`` saying why it cannot be read."""
    from pathlib import Path
    p = Path(path)
    if not p.is_file():
        raise EvidenceError(f"{path}: {'is a directory' if p.is_dir() else 'no such file'}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise EvidenceError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise EvidenceError(f"{path}:{exc.lineno}:{exc.colno}: not JSON: {exc.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise EvidenceError(f"{path}: not a bwskc --emit json file (no nodes)")
    return doc


def read_weights(path: str | None) -> dict:
    """Weights from a safetensors file (data only: reading it runs no code)."""
    if path is None:
        return {}
    try:
        from safetensors.torch import load_file
        return load_file(path)
    except Exception as exc:  # unreadable: bad input
        raise EvidenceError(f"{path}: cannot read safetensors weights ({_first(exc)})") from None


def run(path: str, weights: str | None = None, verbose: bool = False, out=None) -> int:
    """Print the summary (and a line per failure; per unchecked claim with ``verbose``); 0 if no claim
    failed, 1 otherwise. An unreadable file raises ``EvidenceError``."""
    import sys
    out = out or sys.stdout
    doc = read_document(path)
    outcomes = check_document(doc, read_weights(weights))
    for line in summary(outcomes):
        print(line, file=out)
    if verbose:
        for o in outcomes:
            if o.status == "not re-checkable":
                print(f"node {o.node}: {o.claim} not re-checkable: {o.why}", file=out)
    return 1 if any(o.status == "failed" for o in outcomes) else 0
