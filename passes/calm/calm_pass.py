"""The ``calm`` analysis pass (``--passes calm``, option ``axes``): its result is a ``CalmResult``."""
from __future__ import annotations

from bwskc.passes.calm.engine import analyze
from bwskc.passes.calm.plan import CalmResult
from bwskc.passes.manager import Pass

from bwskc.ir import Program


class CalmPass(Pass):
    name = "calm"
    kind = "analysis"
    requires = ()

    def analyze(self, program: Program, options: dict) -> CalmResult:
        return analyze(program, options.get("axes"))


PASS = CalmPass()
