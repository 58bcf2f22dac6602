"""The one place an IR op name becomes a callable: real ATen/prims operator overloads only.

IR text is untrusted input. An op name is never turned into an object by following attributes from
``torch.ops`` (``load_library.__call__.__call__`` would load a shared library, ``import_module...``
import a module); it is split into namespace, operator and overload, the namespace must be on the
allow-list, the operator registry must know the schema, and the object found must be a
``torch._ops.OpOverload`` of exactly that name. Operators that act outside their tensors (files, the
global RNG, printing) and the TorchScript builtins on Python values (string and list methods, integer
arithmetic: no tensor in or out) are refused as well.
"""
from __future__ import annotations

import re
from functools import cache

import torch

from bwskc.errors import BwskError

# aten: what torch.export's decomposed graphs hold; prims: what some decompositions leave.
ALLOWED_NAMESPACES = ("aten", "prims")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# operators of the allowed namespaces whose effect is outside their tensor results
_REFUSED = frozenset({
    "aten::save", "aten::from_file", "aten::_print", "aten::warn", "aten::manual_seed", "aten::seed",
    "aten::initial_seed", "aten::set_grad_enabled", "aten::record_stream", "aten::cuda",
    "aten::_cufft_set_plan_cache_max_size", "aten::_cufft_clear_plan_cache", "aten::_set_item",
    "aten::_test_warn_in_autograd", "aten::set_", "aten::set_data", "aten::_use_cudnn_ctc_loss",
})


class UnknownOp(BwskError):
    """An op name that is not an allowed ATen/prims overload."""


def _mentions_tensor(schema) -> bool:
    return any("Tensor" in str(a.type) for a in (*schema.arguments, *schema.returns))


@cache
def lookup_overload(name: str) -> torch._ops.OpOverload:
    """``aten.add.Tensor`` -> ``torch.ops.aten.add.Tensor``, found through the operator registry."""
    parts = name.split(".")
    if len(parts) != 3 or not all(_IDENT.match(p) for p in parts):
        raise UnknownOp(f"unknown op {name!r}: expected namespace.operator.overload")
    namespace, op, overload = parts
    if namespace not in ALLOWED_NAMESPACES:
        raise UnknownOp(f"op {name!r} refused: only {' and '.join(ALLOWED_NAMESPACES)} operators "
                        "are allowed")
    qualified = f"{namespace}::{op}"
    try:
        schema = torch._C._get_schema(qualified, "" if overload == "default" else overload)
    except RuntimeError:
        raise UnknownOp(f"unknown op {name!r}: no such operator overload") from None
    if qualified in _REFUSED:
        raise UnknownOp(f"op {name!r} refused: it acts outside its tensors")
    if not _mentions_tensor(schema):
        raise UnknownOp(f"op {name!r} refused: it takes and gives no tensor")
    try:
        found = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError):
        raise UnknownOp(f"unknown op {name!r}: no such operator overload") from None
    if not (isinstance(found, torch._ops.OpOverload) and str(found) == name):
        raise UnknownOp(f"unknown op {name!r}: not an operator overload")
    return found
