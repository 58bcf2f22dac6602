"""Tensors, inputs and comparisons as the evidence schema writes them (``--emit json``, docs/typing.md
"Evidence schema"): the codec ``bwskc.check_evidence`` reads claims with and ``bwskc.evidence`` writes
them with. torch and the standard library only; no tensor above ``MAX_ELEMENTS`` is allocated from a file.
"""
from __future__ import annotations

import math

import torch

# the same tolerances as the typing pass (bwskc.evidence), fixed here: a file cannot loosen them
RTOL, ATOL = 1e-5, 1e-6
ROUND_TRIP_TOL = {"f64": 1e-6, "f32": 1e-3, "f16": 3e-2, "bf16": 3e-2}
MAX_ELEMENTS = 1 << 24  # per rebuilt tensor: a hostile file cannot make this allocate without bound

DTYPES = {"f32": torch.float32, "f64": torch.float64, "f16": torch.float16, "bf16": torch.bfloat16,
          "i64": torch.int64, "i32": torch.int32, "i16": torch.int16, "i8": torch.int8, "u8": torch.uint8,
          "bool": torch.bool, "c64": torch.complex64, "c128": torch.complex128}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class EvidenceError(ValueError):
    """A claim that cannot be rebuilt from the file (malformed or out of bounds)."""


# ------------------------------------------------------------------------------------ tensors as JSON

def number(x: float):
    """A JSON-safe number: non-finite floats as the strings "nan", "inf", "-inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def from_number(x):
    if isinstance(x, str):
        if x not in ("nan", "inf", "-inf"):
            raise EvidenceError(f"not a number: {x!r}")
        return float(x)
    if not isinstance(x, (int, float, bool)):
        raise EvidenceError(f"not a number: {x!r}")
    return x


def encode_tensor(t: torch.Tensor) -> dict:
    """``{"dtype", "shape", "values"}``: values flat in row-major order (exact: float32 and bfloat16 values
    are exactly float64 numbers, which JSON's repr round-trips)."""
    flat = t.detach().reshape(-1)
    if flat.is_floating_point():
        values = [number(float(v)) for v in flat.double().tolist()]
    else:
        values = flat.tolist()
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "values": values}


def dtype_of(name) -> torch.dtype:
    if name not in DTYPES:
        raise EvidenceError(f"unknown dtype {name!r}")
    return DTYPES[name]


def shape_of(shape) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise EvidenceError(f"bad shape {shape!r}")
    if math.prod(shape) > MAX_ELEMENTS:
        raise EvidenceError(f"shape {shape} has more than {MAX_ELEMENTS} elements")
    return tuple(shape)


def decode_tensor(spec: dict) -> torch.Tensor:
    dt, shape = dtype_of(spec.get("dtype")), shape_of(spec.get("shape"))
    values = spec.get("values")
    if not isinstance(values, list) or len(values) != math.prod(shape):
        raise EvidenceError(f"{len(values) if isinstance(values, list) else 'no'} values for shape {shape}")
    values = [from_number(v) for v in values]
    if dt.is_floating_point:
        return torch.tensor(values, dtype=torch.float64).to(dt).reshape(shape)
    return torch.tensor(values, dtype=dt).reshape(shape)


# ------------------------------------------------------------------------------------- input structure

def leaves(types) -> list[dict]:
    """The tensor types of a hole list (nested ``{"tuple": [...]}`` flattened in order)."""
    out = []
    for t in types:
        if isinstance(t, dict) and "tuple" in t:
            out.extend(leaves(t["tuple"]))
        elif isinstance(t, dict) and "dtype" in t:
            out.append(t)
        else:
            raise EvidenceError(f"bad input type {t!r}")
    return out


def nest(types, flat: list):
    """The flat tensors put back into the holes' structure (a tuple per hole)."""
    it = iter(flat)

    def build(ts):
        return tuple(tuple(build(t["tuple"])) if "tuple" in t else next(it) for t in ts)
    return build(types)


def bounded_leaves(types) -> list[dict]:
    out = leaves(types)
    total = sum(math.prod(shape_of(t.get("shape"))) for t in out)
    if total > MAX_ELEMENTS:
        raise EvidenceError(f"the inputs have {total} elements, more than {MAX_ELEMENTS}")
    return out


def random_inputs(types, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    """bwskc's documented random construction: one ``torch.Generator().manual_seed(seed)`` draws each
    input in order; floating: ``(randn(shape, float64) * scale).to(dtype)``; integer:
    ``randint(0, 8, shape)``; bool: ``rand(shape) < 0.5``."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        raise EvidenceError(f"bad seed {seed!r}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in bounded_leaves(types):
        dt, shape = dtype_of(t["dtype"]), shape_of(t["shape"])
        if dt == torch.bool:
            out.append(torch.rand(shape, generator=g) < 0.5)
        elif not dt.is_floating_point and not dt.is_complex:
            out.append(torch.randint(0, 8, shape, generator=g, dtype=dt))
        else:
            out.append((torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dt))
    return out


def rebuild_pair(types, collision: dict) -> tuple[list, list]:
    """The witness's two inputs (flat lists of tensors) from the ``a`` and ``b`` records."""
    a_rec, b_rec = collision.get("a"), collision.get("b")
    if not isinstance(a_rec, dict) or not isinstance(b_rec, list):
        raise EvidenceError("no a/b record")
    if "random" in a_rec:
        r = a_rec["random"]
        a = random_inputs(types, r.get("seed"), float(from_number(r.get("scale", 1.0))))
    elif "values" in a_rec:
        a = [decode_tensor(s) for s in a_rec["values"]]
    else:
        raise EvidenceError(a_rec.get("not_recorded", "the first input is not recorded"))
    if len(b_rec) != len(a):
        raise EvidenceError(f"{len(b_rec)} records of b for {len(a)} inputs")
    return a, [rebuild_b(x, rec) for x, rec in zip(a, b_rec)]


def rebuild_b(a: torch.Tensor, rec: dict) -> torch.Tensor:
    """One input of b from a: ``same``; ``values``; ``sparse`` (b.flat[index] = values); ``shift``
    (``(a.double() + D).to(dtype)``, D broadcast over the leading dimensions); ``scale`` (``(a.double() *
    m).to(dtype)``)."""
    if rec.get("same"):
        return a.clone()
    if "values" in rec:
        return decode_tensor(rec["values"])
    if "sparse" in rec:
        index, values = rec["sparse"].get("index"), rec["sparse"].get("values")
        if not isinstance(index, list) or not isinstance(values, list) or len(index) != len(values):
            raise EvidenceError("bad sparse record")
        if not all(isinstance(i, int) and 0 <= i < a.numel() for i in index):
            raise EvidenceError("sparse index out of range")
        b = a.clone().reshape(-1)
        vals = [from_number(v) for v in values]
        src = torch.tensor(vals, dtype=torch.float64 if a.is_floating_point() else None)
        b[torch.tensor(index, dtype=torch.long)] = src.to(a.dtype) if len(vals) else b[:0]
        return b.reshape(a.shape)
    if "shift" in rec:
        d = decode_tensor(rec["shift"]).double()
        return (a.double() + d).to(a.dtype)
    if "scale" in rec:
        return (a.double() * float(from_number(rec["scale"]))).to(a.dtype)
    raise EvidenceError(rec.get("not_recorded", "the second input is not recorded"))


# ---------------------------------------------------------------------------------------- comparisons

def tensors_of(v) -> list[torch.Tensor]:
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in tensors_of(x)]
    return [v] if isinstance(v, torch.Tensor) else []


def same_output(a, b) -> bool:
    """The typing pass's notion of one output (nan equals nan; tuples item by item)."""
    ta, tb = tensors_of(a), tensors_of(b)
    if len(ta) != len(tb):
        return False
    for x, y in zip(ta, tb):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.is_floating_point() or x.is_complex():
            if not torch.allclose(x, y, rtol=RTOL, atol=ATOL, equal_nan=True):
                return False
        elif not torch.equal(x, y):
            return False
    return True


def max_abs_diff(a, b) -> float:
    """max |a - b| over every output tensor, taken in float64 (equal non-finite values count 0)."""
    worst = 0.0
    for x, y in zip(tensors_of(a), tensors_of(b)):
        if x.shape != y.shape:
            return math.inf
        if x.is_complex():
            x, y = torch.view_as_real(x), torch.view_as_real(y)
        x, y = x.double(), y.double()
        if not x.numel():
            continue
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        d = torch.where(same, torch.zeros_like(x), (x - y).abs())
        d = torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)
        worst = max(worst, float(d.max()))
    return worst


def differ(a: list, b: list) -> bool:
    return any(x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y) for x, y in zip(a, b))
