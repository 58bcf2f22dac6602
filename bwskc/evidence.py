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
        if "coupling" in self.extra:  # a coupling chain: its coupling is S, with its inverse
            out["coupling"] = self.extra["coupling"].evidence() | {"type": self.extra["coupling"].type}
        out["dof_lost"] = self.dof_lost
        if self.dof_note:
            out["dof_note"] = self.dof_note
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
