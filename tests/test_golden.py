"""Golden-file tests for the passes (as LLVM's lit/FileCheck and MLIR's test/ directories do): IR text in,
the passes run, the expected IR text out.

Each case is ``tests/golden/<dir>/<case>.bwsk``: BWSK IR text (the form ``program.text()`` prints and
``bwskc lower FILE.bwsk`` reads) whose first line is a comment naming the passes to run, in the
grammar's own comment syntax::

    # RUN: passes=typing,fusion
    # RUN: passes=calm axes=sequence=x:1      (axes: as ``bwskc lower --axes``)
    # RUN: passes=                            (none: a parse/print round trip)

Further ``#`` lines below it describe the case for a reader (the parser ignores comments). Beside it,
``<case>.expected`` holds what the test prints after running the passes through the pass manager
(``bwskc.passes.manager.run_passes``, prerequisites added as the CLI adds them): the program's text,
then, as ``#`` comment lines (so the expected file is itself IR text that parses), what the analyses
found: for ``typing`` every site's verdict with its rule, claim and evidence text and every
definition's composite verdict; for ``calm`` every site's coordination per axis with the reason, the
barriers, free regions and FLOP shares; for ``reversible`` the chains coupled and what was not
lowered, with the reason. Nothing in it depends on timings or paths, and the few numbers a claim
measures (a constant weight's singular values) come from the case's own constants.

Programs parsed from text carry no weights, so a verdict that needs a weight's values (the rank of a
``linear``) is the one the pass gives without them; a weight the case wants read is a constant ``%N``.

To regenerate the expected files after a deliberate change to a pass or to the printer, run
``BWSKC_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py`` and review the diff (``git diff
tests/golden``) before committing it.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import pytest

import bwskc
from bwskc.passes.manager import run_passes

GOLDEN = Path(__file__).parent / "golden"
CASES = sorted(GOLDEN.glob("*/*.bwsk"))
UPDATE = os.environ.get("BWSKC_UPDATE_GOLDEN", "") not in ("", "0")


def read_header(text: str, path: Path) -> dict:
    """The ``# RUN:`` line (the file's first line): ``passes=a,b`` and optional ``axes=SPEC``."""
    first = text.split("\n", 1)[0]
    if not first.startswith("# RUN:"):
        raise AssertionError(f"{path}: the first line must be '# RUN: passes=...', not {first!r}")
    options = {"passes": None, "axes": None}
    for item in first[len("# RUN:"):].split():
        key, eq, value = item.partition("=")
        if not eq or key not in options:
            raise AssertionError(f"{path}: bad RUN item {item!r} (expected passes=A,B or axes=SPEC)")
        options[key] = value
    if options["passes"] is None:
        raise AssertionError(f"{path}: the RUN line names no passes (write 'passes=' for none)")
    options["passes"] = [n for n in options["passes"].split(",") if n]
    return options


def _one_line(s) -> str:
    return " ".join(str(s).split())


def _where(site) -> str:
    """Where a site is: ``entry``, ``def NAME`` (or ``phase NAME``), or its constant ``%N``."""
    if site.is_const or site.scope == "entry":
        return site.scope
    return f"def {site.scope}"


def _typing_lines(program, result) -> list[str]:
    out = ["# typing: site verdicts (site id, where, op: type, rule)"]
    for site in result.sites:
        v = result.verdicts[site.id]
        out.append(f"#   [{site.id}] {_where(site)}: {site.prim.op}: {v.type}, {v.rule}")
        out += _evidence_lines(v)
    out.append("# typing: definitions (composite verdicts)")
    for name, v in result.defs.items():
        out.append(f"#   {name}: {v.type}, {v.rule}")
        out += _evidence_lines(v)
    return out


def _evidence_lines(v) -> list[str]:
    pad = "#       "
    lines = [f"{pad}claim: {_one_line(v.claim)}"]
    if v.type == "S":
        if v.inverse is not None and v.extra.get("inverse_text"):
            lines.append(f"{pad}inverse: {_one_line(v.extra['inverse_text'])}")
        if v.rank is not None:
            lines.append(f"{pad}rank: {v.rank.get('rank')} of {v.rank.get('columns')} columns")
    elif v.type == "K":
        if v.extra.get("witness_text"):
            lines.append(f"{pad}witness: {_one_line(v.extra['witness_text'])}")
    else:
        if v.condition:
            lines.append(f"{pad}injective iff: {_one_line(v.condition)}")
        if v.decided_by:
            lines.append(f"{pad}decided by: {_one_line(v.decided_by)}")
    if "rejected" in v.extra:
        r = v.extra["rejected"]
        lines.append(f"{pad}refused {r.get('type')}: {_one_line(r.get('why'))}")
    if "coupling" in v.extra:
        c = v.extra["coupling"]
        lines.append(f"{pad}coupling: {c.type}, {c.rule}: {_one_line(c.claim)}")
    note = _one_line(v.dof_note)
    if v.dof_lost is None:
        dof = note if note.startswith("data-dependent") else "data-dependent" + (f" ({note})" if note else "")
    else:
        dof = str(v.dof_lost) + (f" ({note})" if note else "")
    lines.append(f"{pad}dof lost: {dof}")
    return lines


def _calm_lines(program, result) -> list[str]:
    out = ["# calm: axes " + "; ".join(f"{a} = {', '.join(f'{n}:{d}' for n, d in where)}"
                                       for a, where in result.axes.items())]
    from bwskc.sites import sites
    out.append("# calm: site coordination per axis (free, or the collective a barrier needs)")
    for site in sites(program):
        coord = result.coordination.get(site.id)
        if coord is None:
            continue
        reasons = result.reasons.get(site.id, {})
        cells = []
        for a in result.axes:
            c = coord.get(a)
            cells.append(f"{a} free" if c is None else
                         f"{a} {c}" + (f" ({_one_line(reasons[a])})" if reasons.get(a) else ""))
        out.append(f"#   [{site.id}] {_where(site)}: {site.prim.op}: {'; '.join(cells)}")
    for a in result.axes:
        barriers = ", ".join(f"{k} x{n}" for k, n in sorted(result.barriers.get(a, {}).items())) or "none"
        regions = " ".join("{" + ", ".join(str(i) for i in sorted(r)) + "}"
                           for r in result.regions.get(a, [])) or "none"
        free = 100 * result.free_flops_fraction.get(a, 0)
        split = 100 * result.partitioned_flops_fraction.get(a, 0)
        out.append(f"# calm: {a}: barriers {barriers}; free regions {regions}; "
                   f"free FLOPs {free:.1f}%, split FLOPs {split:.1f}%")
    out += [f"# calm: note: {_one_line(n)}" for n in result.notes]
    return out


def _reversible_lines(program, report) -> list[str]:
    out = ["# reversible: chains coupled"]
    out += [f"#   {c['name']}: blocks {c['blocks']}, coupling layers {c['couplings']}, "
            f"shared inputs {c['shared']}" for c in report.chains] or ["#   (none)"]
    out.append("# reversible: not lowered")
    out += [f"#   {r['where']}: {_one_line(r['reason'])}" for r in report.not_lowered] or ["#   (none)"]
    return out


ANNOTATORS = {"typing": _typing_lines, "calm": _calm_lines, "reversible": _reversible_lines}


def render(program, asked: list[str]) -> str:
    """The program's text, then what the analyses of the passes asked for found, as comment lines."""
    text = program.text()
    run = program.analyses.get("passes")
    if not asked:
        return text
    order = list(run.order) if run is not None else []
    added = [n for n in order if n not in asked]
    lines = [f"# ran: {', '.join(order)}" + (f" (prerequisites added: {', '.join(added)})" if added else "")]
    for name in asked:
        if name in ANNOTATORS and name in program.analyses:
            lines += ANNOTATORS[name](program, program.analyses[name])
    return text + "\n" + "\n".join(lines) + "\n"


def run_case(path: Path):
    """The program after the passes the case's RUN line names, and its rendering."""
    text = path.read_text(encoding="utf-8")
    header = read_header(text, path)
    program = bwskc.parse(text, str(path.relative_to(GOLDEN.parent)))
    if header["passes"]:
        program = run_passes(program, header["passes"], options={"axes": header["axes"]})
    return program, render(program, header["passes"])


def _body(text: str) -> str:
    """An input file without its leading comment lines (the header and the description)."""
    lines = text.split("\n")
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "\n".join(lines)


def test_cases_exist():
    passes = {p.parent.name for p in CASES}
    assert {"typing", "calm", "fusion", "reversible", "roundtrip"} <= passes, passes


@pytest.mark.parametrize("path", CASES, ids=[f"{p.parent.name}/{p.stem}" for p in CASES])
def test_golden(path: Path):
    program, actual = run_case(path)
    expected_path = path.with_suffix(".expected")
    if UPDATE:
        expected_path.write_text(actual, encoding="utf-8")
    if not expected_path.exists():
        pytest.fail(f"{expected_path} is missing: run BWSKC_UPDATE_GOLDEN=1 python -m pytest "
                    f"tests/test_golden.py to create it, then review it")
    expected = expected_path.read_text(encoding="utf-8")
    if actual != expected:
        diff = "".join(difflib.unified_diff(
            expected.splitlines(keepends=True), actual.splitlines(keepends=True),
            fromfile=str(expected_path.relative_to(GOLDEN.parent)), tofile="actual"))
        pytest.fail(f"output differs from {expected_path.name} (BWSKC_UPDATE_GOLDEN=1 rewrites it):\n{diff}",
                    pytrace=False)
    # the output is IR text (analyses as comments): it parses back to the program it was printed from
    assert bwskc.parse(actual, f"{expected_path.name} (actual)") == program
    if path.parent.name == "roundtrip":  # canonical text in, the same text out
        assert _body(path.read_text(encoding="utf-8")) == actual, "parse -> print is not the identity"
