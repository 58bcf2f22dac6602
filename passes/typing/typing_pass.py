"""The ``typing`` pass: every leaf site gets S, K or GRAY with evidence (the rule table, then the evidence
evaluated on the op), and every definition and the entry a composite verdict (``composite``).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from bwskc._deep import run_deep
from bwskc.evidence import GRAY, K, S, Verdict, evaluate, gray
from bwskc.ir import Prim, Program, Term
from bwskc.leaf import Leaf, Values
from bwskc.passes.manager import Pass
from bwskc.passes.typing.composite import composite
from bwskc.passes.typing.table import type_leaf
from bwskc.sites import Site, sites


@dataclass
class TypingResult:
    """The typing analysis of a program: verdicts per leaf site, and composite verdicts of definitions."""
    program_name: str
    verdicts: dict[int, Verdict]  # site id -> verdict
    sites: list[Site]
    defs: dict[str, Verdict] = field(default_factory=dict)  # definition name (and "entry") -> composite
    _by_id: dict[int, Verdict] = field(default_factory=dict, repr=False)
    _by_value: dict[Prim, Verdict] = field(default_factory=dict, repr=False)
    _program: Program | None = field(default=None, repr=False)
    _site_types: Any = field(default=None, repr=False)  # (id(prim) -> input types, prim -> input types)
    _decided: dict = field(default_factory=dict, repr=False)  # id(term) -> (term, decided verdict)

    # --- queries used by other passes and the report
    def leaf_verdict(self, prim: Prim) -> Verdict:
        v = self._by_id.get(id(prim)) or self._by_value.get(prim)
        return v if v is not None else gray("unknown", "a leaf the typing pass did not see",
                                            "unknown", "running the typing pass on this program")

    def term_verdict(self, term: Term) -> Verdict:
        return run_deep(composite, term, self)

    def term_type(self, term: Term) -> str:
        return self.term_verdict(term).type

    def counts(self, site_ids=None) -> Counter:
        ids = self.verdicts if site_ids is None else site_ids
        return Counter(self.verdicts[i].type for i in ids if not self.sites[i].is_const
                       and self.verdicts[i].rule != "nullary")

    def summary(self) -> dict:
        c = self.counts()
        total = sum(c.values()) or 1
        dof = [v.dof_lost for i, v in self.verdicts.items() if not self.sites[i].is_const]
        return {"S": c[S], "K": c[K], "GRAY": c[GRAY], "S_ratio": round(c[S] / total, 4),
                "K_ratio": round(c[K] / total, 4), "GRAY_ratio": round(c[GRAY] / total, 4),
                "dof_lost": sum(d for d in dof if d is not None),
                "dof_data_dependent": sum(1 for d in dof if d is None),
                "constants": sum(1 for s in self.sites if s.is_const or not s.inputs),
                "defs": {n: v.type for n, v in self.defs.items()}}


class TypingPass(Pass):
    """The analysis pass ``typing``: a ``TypingResult`` for the program."""
    name = "typing"
    kind = "analysis"
    requires = ()

    def analyze(self, program: Program, options: dict) -> TypingResult:
        values = Values(program)
        all_sites = sites(program)
        cache: dict = {}
        verdicts: dict[int, Verdict] = {}
        result = TypingResult(program.name, verdicts, all_sites, _program=program)
        for site in all_sites:
            key = (site.prim, site.inputs)
            v = cache.get(key)
            if v is None:
                v = _type_site(site, values)
                cache[key] = v
            verdicts[site.id] = v
            result._by_id[id(site.prim)] = v
            old = result._by_value.get(site.prim)
            if old is None or _worse(v, old):
                result._by_value[site.prim] = v
        for d in program.defs.values():  # callees first
            result.defs[d.name] = result.term_verdict(d.body)
        result.defs["entry"] = result.term_verdict(program.entry.body)
        return result


def _worse(a: Verdict, b: Verdict) -> bool:
    order = {S: 0, K: 1, GRAY: 2}
    return order[a.type] > order[b.type]


def _type_site(site: Site, values: Values) -> Verdict:
    if site.is_const or not site.inputs:
        return type_leaf(Leaf(site.prim, (), values))
    if any(t is None for t in site.inputs):
        return gray("untyped", "an operand's type could not be inferred", "unknown", "type inference")
    leaf = Leaf(site.prim, site.inputs, values)
    try:
        with torch.no_grad():
            verdict = type_leaf(leaf)
    except Exception as exc:  # a rule that cannot judge this instance says so instead of guessing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return gray("rule failed", f"the rule for {site.prim.op} could not judge this instance: {first}",
                    "unknown", "a rule that handles this instance")
    # a witness or inverse is evidence only once evaluated on this op: failing evidence makes it GRAY
    with torch.no_grad():
        return evaluate(leaf, verdict)


PASS = TypingPass()
