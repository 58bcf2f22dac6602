"""Verdicts of the S/K typing and the evidence each one carries.

A verdict is a claim about a function of the activation inputs of an operation (or of a composite term):

* ``S``: injective. Evidence: a left inverse (a callable from the outputs back to the inputs) or a rank
  certificate (a linear map whose weight has full column rank, with its smallest singular value).
* ``K``: erasing. Evidence: a concrete collision witness, a callable giving two different inputs with
  the same output.
* ``GRAY``: injective exactly under a stated condition, with what would decide it.

Every verdict also states its rule, a one-line proof (``claim``), and the degrees of freedom it erases
per application (``dof_lost``: input dimension minus the generic rank of its Jacobian; ``None`` where
that is data-dependent, such as ReLU's dead inputs, or not derived).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

S, K, GRAY = "S", "K", "GRAY"
ORDER = {S: 0, GRAY: 1, K: 2}

Inputs = tuple  # a tuple of tensors, one per activation input (hole) of the operation


@dataclass(eq=False)
class Verdict:
    type: str
    rule: str
    claim: str
    dof_lost: int | None = 0
    dof_note: str = ""
    inverse: Callable[[Any], Inputs] | None = None  # S: output -> inputs
    rank: dict | None = None  # S: {"rank", "columns", "sigma_min"} of a linear map
    witness: Callable[[torch.Generator], tuple[Inputs, Inputs]] | None = None  # K
    condition: str = ""  # GRAY: injective iff ...
    decided_by: str = ""  # GRAY: what would decide it
    sample: Callable[[torch.Generator], Inputs] | None = None  # inputs from the op's domain
    surjective: bool = False  # S and onto its output type: a collision after it lifts back through it
    extra: dict = field(default_factory=dict)

    def evidence(self) -> dict:
        """The JSON form (``--emit json``: ``evidence``)."""
        out: dict[str, Any] = {"rule": self.rule, "claim": self.claim}
        if self.type == S:
            out["inverse"] = self.extra.get("inverse_text") if self.inverse is not None else None
            if self.rank is not None:
                out["rank"] = self.rank
        elif self.type == K:
            out["witness"] = self.extra.get("witness_text", "constructed on demand")
        else:
            out["condition"] = self.condition
            out["decided_by"] = self.decided_by
        out.update(self._checked_evidence())
        if "coupling" in self.extra:  # a coupling chain: its coupling is S, with its inverse
            out["coupling"] = self.extra["coupling"].evidence() | {"type": self.extra["coupling"].type}
        out["dof_lost"] = self.dof_lost
        if self.dof_note:
            out["dof_note"] = self.dof_note
        return out


    def _checked_evidence(self) -> dict:
        """What the typing pass measured when it evaluated this verdict (``evaluate``), schema /2."""
        checked = self.extra.get("checked")
        out: dict[str, Any] = {"checked": checked is not None}
        if "unchecked" in self.extra:
            out["not_checked"] = self.extra["unchecked"]
        if self.type == K:
            if checked is not None:
                out["collision"] = {k: v for k, v in checked.items()}
            else:
                out["witness_note"] = self.extra.get("unchecked") or (
                    "no concrete witness: the claim follows from the shapes alone (the weights are not "
                    "known)" if self.witness is None else "the witness was not evaluated (a composite "
                    "verdict)")
        elif self.type == S and checked is not None:
            if "rank" in checked and self.rank is not None:
                out["rank"] = {**self.rank, **checked["rank"]}
            out["round_trip"] = checked.get("round_trip")
        if "rejected" in self.extra:
            out["rejected"] = self.extra["rejected"]
        return out


def injective(rule: str, claim: str, inverse: Callable, inverse_text: str, *, surjective=False,
              rank: dict | None = None, sample=None) -> Verdict:
    return Verdict(S, rule, claim, 0, inverse=inverse, rank=rank, surjective=surjective, sample=sample,
                   extra={"inverse_text": inverse_text})


def erasing(rule: str, claim: str, witness: Callable, witness_text: str, dof_lost: int | None,
            dof_note: str = "", sample=None) -> Verdict:
    return Verdict(K, rule, claim, dof_lost, dof_note, witness=witness, sample=sample,
                   extra={"witness_text": witness_text})


def gray(rule: str, claim: str, condition: str, decided_by: str, dof_lost: int | None = None,
         dof_note: str = "", sample=None) -> Verdict:
    return Verdict(GRAY, rule, claim, dof_lost, dof_note, condition=condition, decided_by=decided_by,
                   sample=sample)


def no_rule(op: str) -> Verdict:
    return gray("no rule", f"{op} has no typing rule", "unknown", "a typing rule for this op",
                None, "no rule")


# ------------------------------------------------------------------------------------ checking claims


def outputs_equal(a, b, rtol: float = 1e-5, atol: float = 1e-6) -> bool:
    """Same output (tuples component-wise; nan equals nan: nan is one point of the output set)."""
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(outputs_equal(x, y, rtol, atol) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            return bool(torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
        return bool(torch.equal(a, b))
    return a == b


def inputs_differ(a, b) -> bool:
    """Two inputs differ somewhere (tuples, as a tuple-valued hole holds, compared item by item)."""
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        if not (isinstance(a, (tuple, list)) and isinstance(b, (tuple, list))) or len(a) != len(b):
            return True
        return any(inputs_differ(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b)
    return type(a) is not type(b) or a != b


def seeded_witness(verdict: Verdict, g: torch.Generator) -> tuple[Inputs, Inputs, int | None]:
    """The witness's two inputs and the seed of the global generator under which they collide (None
    when the op is deterministic). A random op (dropout in training) is a function once its seed is
    fixed: its verdict has ``extra["seeded_witness"]``, which returns the seed it drew with the pair."""
    make = verdict.extra.get("seeded_witness")
    if make is not None:
        return make(g)
    a, b = verdict.witness(g)
    return a, b, None


def run_seeded(fn: Callable[..., Any], inputs: Inputs, seed: int | None):
    """``fn(*inputs)``, under ``torch.manual_seed(seed)`` (global generator state restored) if a seed."""
    if seed is None:
        return fn(*inputs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*inputs)


def check_witness(fn: Callable[..., Any], verdict: Verdict, seed: int = 0) -> bool:
    """The K claim: the witness's two inputs differ and ``fn`` maps them to the same output (for a random
    op, replaying the seed the witness drew before each call)."""
    g = torch.Generator().manual_seed(seed)
    a, b, replay = seeded_witness(verdict, g)
    return inputs_differ(a, b) and outputs_equal(run_seeded(fn, a, replay), run_seeded(fn, b, replay))


def check_inverse(fn: Callable[..., Any], verdict: Verdict, inputs: Inputs, rtol=1e-4, atol=1e-5) -> bool:
    """The S claim: the left inverse recovers ``inputs`` from ``fn(*inputs)``."""
    back = verdict.inverse(fn(*inputs))
    return outputs_equal(tuple(back), tuple(inputs), rtol, atol)


# ------------------------------------------------------------------- evaluating evidence before emitting
#
# The typing pass runs every leaf verdict's evidence on the site's actual op before it is emitted
# (``evaluate``): a K witness must collide, an S inverse must round-trip its sample, a rank certificate
# must state a margin above its tolerance. Evidence that fails makes the verdict GRAY, with the reason.
# What was measured is kept in ``extra["checked"]`` (JSON-ready: ``evidence()`` writes it), including the
# witness's inputs in a form ``bwskc check-evidence`` rebuilds with torch alone (docs/typing.md,
# "Evidence schema").

WITNESS_SEED = 0
EMBED_VALUES = 64  # inputs up to this many elements are written out in full
EMBED_LIMIT = 4096  # larger inputs: a construction, or at most this many listed values
ROUND_TRIP_WEIGHT_LIMIT = 1 << 16  # a pseudo-inverse of a larger weight costs more than typing's budget


def evaluate(leaf, verdict: Verdict, seed: int = WITNESS_SEED) -> Verdict:
    """The verdict if its evidence holds on ``leaf`` (with what was measured), else GRAY saying why."""
    if verdict.type in (K, S) and verdict.rule != "nullary" and not leaf.bound_known():
        # lowered on the meta device, or parsed from text: the op cannot run, so its evidence cannot
        # be evaluated; the verdict stands on its proof and says that it is unchecked
        verdict.extra["unchecked"] = "the values of its bound tensors are not known (meta device or IR " \
            "text): its evidence was not evaluated"
        return verdict
    try:
        if verdict.type == K and verdict.witness is not None:
            return _evaluate_witness(leaf, verdict, seed)
        if verdict.type == S and verdict.rule != "nullary":
            return _evaluate_injective(leaf, verdict, seed)
    except Exception as exc:  # evidence that cannot be evaluated is no evidence
        return rejected(verdict, f"its evidence could not be evaluated: {_first_line(exc)}")
    return verdict


def rejected(verdict: Verdict, why: str) -> Verdict:
    """The GRAY verdict replacing one whose evidence failed (the rule's claim kept, marked unproven)."""
    v = gray(verdict.rule, f"{verdict.claim} [unproven: {why}]", f"the {verdict.type} claim holds, "
             f"but its evidence failed: {why}", "evidence that holds (a corrected rule)", None,
             "the claim was not proven", sample=verdict.sample)
    v.extra["rejected"] = {"type": verdict.type, "why": why}
    return v


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------- K: witnesses

def _evaluate_witness(leaf, verdict: Verdict, seed: int) -> Verdict:
    from bwskc.evidence_codec import max_abs_diff, number
    try:
        a, b, replay = seeded_witness(verdict, torch.Generator().manual_seed(seed))
        if not inputs_differ(a, b):
            return rejected(verdict, "the witness's two inputs are equal")
        ya, yb = run_seeded(leaf.call, a, replay), run_seeded(leaf.call, b, replay)
    except Exception as exc:  # a witness that cannot be built or run is no evidence
        return rejected(verdict, f"the witness could not be evaluated: {_first_line(exc)}")
    own = outputs_equal(ya, yb)
    diff = max_abs_diff(ya, yb)
    f64 = _float64_collision(leaf, a, b, replay)
    domain = verdict.extra.get("domain")
    if not own and not (domain == "reals" and f64.get("collides")):
        f64_text = f", {number(f64['max_abs_diff'])} in float64" if "max_abs_diff" in f64 else ""
        return rejected(verdict, f"witness did not collide: max |f(a)-f(b)| = {diff:.3g} "
                         f"({_dtype_name(a)}){f64_text}")
    checked = {"seed": seed, "replay_seed": replay, "dtype": _dtype_name(a), "collides": own,
               "max_abs_diff": number(diff), "tolerance": {"rtol": 1e-5, "atol": 1e-6}, "float64": f64,
               **_domain(domain, f64)}
    if not own:
        checked["collides_in"] = "float64"
    checked.update(encode_pair(leaf, a, b, seed))
    verdict.extra["checked"] = checked
    return verdict


def _domain(domain, f64: dict) -> dict:
    if domain in ("reals", "float"):
        return {"domain": domain, "domain_source": "rule"}
    exact = f64.get("max_abs_diff") == 0
    note = ("the rule does not say; the op evaluated in float64 gives exactly equal outputs" if exact else
            "the rule does not say; taken as a floating-point collision")
    return {"domain": "float", "domain_source": note}


def _float64_collision(leaf, a, b, replay) -> dict:
    """The witness with its floating inputs and bound tensors in float64 (where the op runs so)."""
    from bwskc.evidence_codec import max_abs_diff, number
    if not any(t.is_floating_point() for t in _flat_tensors(a)):
        return {"not_run": "no floating-point input"}
    call = float64_call(leaf)
    try:
        ya, yb = run_seeded(call, a, replay), run_seeded(call, b, replay)
    except Exception as exc:  # an op that has no float64 kernel, or whose arguments fix the dtype
        return {"not_run": f"the op does not run in float64: {_first_line(exc)}"}
    return {"max_abs_diff": number(max_abs_diff(ya, yb)), "collides": outputs_equal(ya, yb)}


def to64(v):
    """Floating tensors (also inside tuples and lists) in float64; anything else as it is."""
    if isinstance(v, (tuple, list)):
        return type(v)(to64(x) for x in v)
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.double()
    return v


def float64_call(leaf):
    """``leaf.call`` with floating operands and bound tensors converted to float64."""
    from bwskc.op_values import fill, resolve_op

    def bound(ref):
        return to64(leaf.values.get(ref))

    def call(*operands):
        ops = [to64(o) for o in operands]
        args = fill(leaf.prim.args, ops, bound)
        kwargs = dict(zip((k for k, _ in leaf.prim.kwargs),
                          fill(tuple(v for _, v in leaf.prim.kwargs), ops, bound)))
        with torch.no_grad():
            return resolve_op(leaf.op)(*args, **kwargs)
    return call


def _flat_tensors(v) -> list[torch.Tensor]:
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _flat_tensors(x)]
    return [v] if isinstance(v, torch.Tensor) else []


def _dtype_name(inputs) -> str:
    from bwskc.evidence_codec import DTYPE_NAMES
    names = sorted({DTYPE_NAMES.get(t.dtype, str(t.dtype)) for t in _flat_tensors(inputs)})
    return ",".join(names)


# ----------------------------------------------------------------- the witness's inputs, rebuildable

def encode_types(types) -> list:
    """Hole types as the JSON records them: ``{"dtype", "shape"}``, ``{"tuple": [...]}`` for a list."""
    from bwskc.ir import TensorType, TupleType
    out = []
    for t in types:
        if isinstance(t, TupleType):
            out.append({"tuple": encode_types(t.items)})
        elif isinstance(t, TensorType):
            out.append({"dtype": t.dtype, "shape": list(t.shape)})
        else:
            out.append({"scalar": str(t)})
    return out


def _identical(x: torch.Tensor, y: torch.Tensor) -> bool:
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if x.is_floating_point():
        return bool(((x == y) | (torch.isnan(x) & torch.isnan(y))).all())
    return torch.equal(x, y)


def encode_pair(leaf, a, b, seed: int) -> dict:
    """``{"a", "b"}`` records from which check-evidence rebuilds the witness exactly (each candidate
    encoding is rebuilt here and kept only if it gives the same tensors), or ``not_recorded`` saying
    why."""
    from bwskc.evidence_codec import EvidenceError, encode_tensor, random_inputs
    holes = encode_types(leaf.inputs)
    fa, fb = _flat_tensors(a), _flat_tensors(b)
    if any(t.is_complex() for t in fa + fb):
        return {"a": {"not_recorded": "complex inputs are not written"}, "b": []}
    total = sum(t.numel() for t in fa)
    a_rec = None
    if total <= EMBED_VALUES:
        a_rec = {"values": [encode_tensor(t) for t in fa]}
    else:
        try:
            again = random_inputs(holes, seed)
            if len(again) == len(fa) and all(_identical(x, y) for x, y in zip(again, fa)):
                a_rec = {"random": {"seed": seed, "scale": 1.0}}
        except EvidenceError:
            pass
        if a_rec is None:
            a_rec = {"values": [encode_tensor(t) for t in fa]} if total <= EMBED_LIMIT else {
                "not_recorded": f"{total} elements, not bwskc's random construction"}
    return {"a": a_rec, "b": [_encode_b(x, y, total <= EMBED_VALUES) for x, y in zip(fa, fb)]}


def _encode_b(a: torch.Tensor, b: torch.Tensor, small: bool) -> dict:
    """The most compact record that rebuilds b from a exactly: candidates are tried cheapest first and
    each is rebuilt (as check-evidence will) before it is kept."""
    from bwskc.evidence_codec import encode_tensor, rebuild_b
    if _identical(a, b):
        return {"same": True}
    if small:  # written out in full (exact: encode_tensor's numbers are the stored values)
        return {"values": encode_tensor(b)}
    makers = []
    if a.shape == b.shape and a.dtype == b.dtype:
        changed = _changed(a, b)
        n = int(changed.sum())
        few = [lambda: _sparse(b, changed)] if n <= EMBED_LIMIT else []
        makers = (few if n <= EMBED_VALUES else []) + [lambda: _scale(a, b), lambda: _shift(a, b)] + (
            few if n > EMBED_VALUES else [])
    if b.numel() <= EMBED_LIMIT:
        makers.append(lambda: [{"values": encode_tensor(b)}])
    for make in makers:
        for rec in make():
            try:
                if _identical(rebuild_b(a, rec), b):
                    return rec
            except Exception:  # a candidate that does not rebuild is not used
                continue
    return {"not_recorded": f"{b.numel()} elements, no compact construction found"}


def _changed(a, b) -> torch.Tensor:
    if a.is_floating_point():
        return (a != b) & ~(torch.isnan(a) & torch.isnan(b))
    return a != b


def _sparse(b, changed):
    from bwskc.evidence_codec import number
    index = torch.nonzero(changed.reshape(-1)).flatten()
    values = b.reshape(-1)[index]
    values = [number(float(v)) for v in values.double().tolist()] if b.is_floating_point() else \
        values.tolist()
    yield {"sparse": {"index": index.tolist(), "values": values}}


def _nice(lo: float, hi: float) -> list[float]:
    """Numbers in [lo, hi] with the fewest significant digits first, then its midpoint."""
    mid = (lo + hi) / 2
    out = [float(f"{mid:.{k}g}") for k in range(1, 18)]
    return [x for x in out if lo <= x <= hi][:2] + [mid]


def _shift(a, b):
    """b = (a.double() + D).to(dtype), D constant over the leading dimensions (x + 1.5; x + v per row):
    D lies in every element's rounding interval [b - a - ulp, b - a + ulp]."""
    from bwskc.evidence_codec import encode_tensor
    if not a.is_floating_point() or not bool(torch.isfinite(b).all() & torch.isfinite(a).all()):
        return
    d = b.double() - a.double()
    up = (torch.nextafter(b, torch.full_like(b, math.inf)).double() - b.double()).abs()
    for lead in range(a.dim(), -1, -1):  # D of shape a.shape[lead:], smallest first
        tail = tuple(a.shape[lead:])
        if math.prod(tail) > EMBED_LIMIT:
            return
        rows = d.reshape(-1, max(math.prod(tail), 1))
        u = up.reshape(rows.shape)
        lo, hi = (rows - u).amax(0), (rows + u).amin(0)
        if not bool((lo <= hi).all()):
            continue
        if not tail:
            for c in _nice(float(lo[0]), float(hi[0])):
                yield {"shift": encode_tensor(torch.tensor(c, dtype=torch.float64))}
        else:
            for cand in ((lo + hi) / 2, ((lo + hi) / 2).to(a.dtype).double(), rows[0]):
                yield {"shift": encode_tensor(cand.reshape(tail))}


def _scale(a, b) -> list[dict]:
    """b = (a.double() * m).to(dtype) for a scalar m (x and 2x)."""
    if not a.is_floating_point():
        return []
    nz = (a != 0) & torch.isfinite(a) & torch.isfinite(b)
    if not bool(nz.any()):
        return []
    r = (b.double()[nz] / a.double()[nz])
    return [{"scale": m} for m in _nice(float(r.min()), float(r.max()))]


# ----------------------------------------------------------------------- S: inverses and certificates

ROUND_TRIP_F64_TOL = 1e-6


def _evaluate_injective(leaf, verdict: Verdict, seed: int) -> Verdict:
    checked: dict = {}
    if verdict.rank is not None:
        why, checked["rank"] = _check_rank(leaf, verdict.rank)
        if why:
            return rejected(verdict, why)
    if verdict.inverse is None:
        checked["round_trip"] = {"not_run": "no inverse: the rank certificate is the evidence"}
    elif verdict.rank is not None and _bound_elements(leaf) > ROUND_TRIP_WEIGHT_LIMIT:
        checked["round_trip"] = {"not_run": f"a pseudo-inverse of {_bound_elements(leaf)} weight "
                                 "elements costs more than typing's budget: the rank certificate is the "
                                 "evidence"}
    else:
        rt = _round_trip(leaf, verdict, seed)
        if not rt["passed"]:
            return rejected(verdict, f"the inverse did not round-trip: {rt['failure']}")
        checked["round_trip"] = rt
    verdict.extra["checked"] = checked
    return verdict


def _bound_elements(leaf) -> int:
    from bwskc.ir import TensorRef, iter_args
    refs = [a for a in iter_args(tuple(leaf.prim.args) + tuple(v for _, v in leaf.prim.kwargs))
            if isinstance(a, TensorRef)]
    return sum(leaf.values.program.tensors[r.name].type.numel for r in refs
               if r.name in leaf.values.program.tensors)


def relative_error(back, x) -> tuple[float, float]:
    """(max |back - x|, that divided by max |x|), over every input tensor, in float64."""
    from bwskc.evidence_codec import max_abs_diff
    xs, bs = _flat_tensors(x), _flat_tensors(back)
    if len(xs) != len(bs) or any(p.shape != q.shape for p, q in zip(xs, bs)):
        return math.inf, math.inf
    err = max_abs_diff(bs, xs)
    scale = max([float(t.double().abs().max()) for t in xs if t.numel()] + [1e-30])
    return err, err / scale


def tolerance(x) -> tuple[str, float]:
    """The round-trip tolerance of the least precise floating input (discrete inputs: exact)."""
    from bwskc.evidence_codec import DTYPE_NAMES, ROUND_TRIP_TOL
    tols = [(ROUND_TRIP_TOL.get(DTYPE_NAMES.get(t.dtype), 0.0), DTYPE_NAMES.get(t.dtype, str(t.dtype)))
            for t in _flat_tensors(x)]
    tol, name = max(tols) if tols else (0.0, "none")
    return name, tol


def _round_trip(leaf, verdict: Verdict, seed: int) -> dict:
    """The inverse on a random sample, in the op's own dtype and, if that fails, in float64: passed if
    either recovers the sample within its tolerance (the float64 one tests the claim on the reals, free
    of float32 rounding near saturation)."""
    from bwskc.evidence_codec import number
    g = torch.Generator().manual_seed(seed)
    x = verdict.sample(g) if verdict.sample is not None else leaf.random(g)
    name, tol = tolerance(x)
    checks = {}
    for label, call, xs, limit in ((name, leaf.call, x, tol),
                                   ("f64", float64_call(leaf), to64(x), ROUND_TRIP_F64_TOL)):
        if label in checks or (label == "f64" and not any(t.is_floating_point() for t in _flat_tensors(x))):
            continue  # the op is already float64, or has no floating input
        if label != name and checks[name].get("passed"):  # already evidence: spare the second run
            checks[label] = {"not_run": f"the {name} round trip passed"}
            continue
        try:
            err, rel = relative_error(tuple(verdict.inverse(call(*xs))), xs)
        except Exception as exc:  # an inverse that fails on this evaluation is no evidence from it
            checks[label] = {"error": _first_line(exc)}
            continue
        checks[label] = {"max_abs_error": number(err), "relative_error": number(rel), "tolerance": limit,
                         "passed": rel <= limit}
    ok = [k for k, c in checks.items() if c.get("passed")]
    out = {"seed": seed, "sample": "the rule's domain sample" if verdict.sample is not None else
           "bwskc's random construction", "checks": checks, "passed": bool(ok)}
    if ok:
        best = checks[ok[0]]
        out.update(dtype=ok[0], relative_error=best["relative_error"], max_abs_error=best["max_abs_error"])
    else:
        out["failure"] = "; ".join(f"{k}: " + (c["error"] if "error" in c else
                                               f"relative error {c['relative_error']:.3g} > {c['tolerance']:g}")
                                   for k, c in checks.items())
    return out


# the bound operand whose column rank a linear map's claim is about (either side of a product)
_MATRIX_ARGS = {"aten.linear": ("weight",), "aten.addmm": ("mat2", "mat1"), "aten.mm": ("mat2", "self"),
                "aten.matmul": ("other", "self"), "aten.bmm": ("mat2", "self")}


def _matrix_arg(leaf) -> str | None:
    from bwskc.ir import ConstRef, TensorRef
    for name in _MATRIX_ARGS.get(leaf.packet, ()):
        if isinstance(leaf.names.get(name), (TensorRef, ConstRef)):
            return name
    return None


def _check_rank(leaf, cert: dict) -> tuple[str, dict]:
    """(why it fails or "", what was checked). Full column rank with the certificate's margin above its
    tolerance, and, for a small weight, its singular values recomputed in float64 from the stored values
    against the SVD's rounding bound ``max(k, d) * eps64 * sigma_max``."""
    if cert.get("rank") is None or cert.get("rank") != cert.get("columns"):
        return f"the certificate's rank {cert.get('rank')} is not its column count {cert.get('columns')}", {}
    smin, tol = cert.get("sigma_min"), cert.get("tolerance")
    if isinstance(smin, (int, float)) and isinstance(tol, (int, float)) and not smin > tol:
        return f"numerically rank-deficient: sigma_min {smin:.3g} at tolerance {tol:.3g}", {}
    out: dict = {}
    name = _matrix_arg(leaf)
    if leaf.packet not in _MATRIX_ARGS or cert.get("operator"):  # read off basis vectors (batched bmm)
        out["matrix"] = {"operator": "per example"}
        out["recomputed"] = {"not_run": "the operator is rebuilt by check-evidence from basis vectors"}
        return "", out
    if name is None:
        out["recomputed"] = {"not_run": "no bound matrix operand"}
        return "", out
    from bwskc.emit import encode_arg
    out["matrix"] = {"arg": encode_arg(leaf.names.get(name), iter(()))}
    w = leaf.arg(name)
    if w is None or w.numel() > ROUND_TRIP_WEIGHT_LIMIT:
        out["recomputed"] = {"not_run": "weights unknown" if w is None else f"{w.numel()} elements: "
                             "the rule's certificate is the evidence"}
        return "", out
    s = torch.linalg.svdvals(w.double())
    d = cert["columns"]
    floor = max(w.shape) * torch.finfo(torch.float64).eps * float(s[0]) if len(s) else 0.0
    limit = max(floor, tol if isinstance(tol, (int, float)) else 0.0)
    sd = float(s[d - 1]) if len(s) >= d else 0.0
    out["recomputed"] = {"sigma_min": sd, "sigma_max": float(s[0]) if len(s) else 0.0, "floor": floor,
                         "shape": list(w.shape)}
    if not sd > limit:
        return f"numerically rank-deficient: sigma_min {sd:.3g} at tolerance {limit:.3g}", out
    out.setdefault("tolerance", limit)
    return "", out
