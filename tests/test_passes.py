"""The pass manager, the CLI's pass flags and what the passes add to --emit json|report|dot."""
from __future__ import annotations

import json

import pytest
import torch

import bwskc
from bwskc.cli import main
from bwskc.errors import BwskError
from bwskc.passes import manager
from bwskc.passes.manager import Pass, plan, run_passes
from conftest import Block


@pytest.fixture(scope="module")
def block_program():
    torch.manual_seed(0)
    return bwskc.lower(Block(), (torch.randn(2, 4),))


def test_plan_adds_prerequisites_once_in_order():
    run = plan(["fusion"])
    assert run.order.index("typing") < run.order.index("fusion")
    assert run.added == ["typing"]
    assert plan(["typing", "typing"]).order == ["typing"]


def test_unknown_pass_is_one_clear_error():
    with pytest.raises(BwskError, match="unknown pass 'nope'"):
        plan(["nope"])


def test_analysis_result_attached_and_ir_unchanged(block_program):
    out = run_passes(block_program, ["typing"])
    assert out == block_program  # an analysis does not change the IR
    assert "typing" not in block_program.analyses  # nor the input program's analyses
    assert set(out.analyses["typing"].verdicts) == {s.id for s in out.analyses["typing"].sites}
    assert out.analyses["passes"].order == ["typing"]
    assert out.weights.keys() == block_program.weights.keys()


class _Broken(Pass):
    """A rewrite that breaks the IR: the manager's verifier must stop it."""

    name = "broken"
    kind = "rewrite"

    def rewrite(self, program, options):
        from bwskc.ir import Ref
        entry = program.entry
        bad = type(entry)(entry.input_names, entry.inputs, entry.output_names, entry.outputs,
                          Ref("no_such_definition"))
        return program.replace(entry=bad)


class _Renaming(Pass):
    """A rewrite that keeps meaning (wraps the entry in I): analyses that ran before must be re-run."""

    name = "wrap"
    kind = "rewrite"

    def rewrite(self, program, options):
        from bwskc.ir import Comb
        entry = program.entry
        body = Comb("B", (Comb("I"), entry.body))
        return program.replace(entry=type(entry)(entry.input_names, entry.inputs, entry.output_names,
                                                 entry.outputs, body))


def _register(monkeypatch, p: Pass):
    import sys
    import types
    module = types.ModuleType(f"bwskc_test_pass_{p.name}")
    module.PASS = p
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(manager.REGISTRY, p.name, module.__name__)


def test_verifier_runs_after_a_rewrite(monkeypatch, block_program):
    _register(monkeypatch, _Broken())
    with pytest.raises(bwskc.VerifyError, match="no_such_definition"):
        run_passes(block_program, ["broken"])


def test_rewrite_reruns_earlier_analyses(monkeypatch, block_program):
    _register(monkeypatch, _Renaming())
    out = run_passes(block_program, ["typing", "wrap"])
    result = out.analyses["typing"]
    # the typing result describes the rewritten IR, not the one it was first computed on
    assert out != block_program
    assert result._program == out
    x = torch.randn(2, 4)
    torch.testing.assert_close(out(x), block_program(x))


def test_print_after_calls_printer_with_ir(block_program):
    seen = []
    run_passes(block_program, ["typing"], print_after=["typing"], printer=lambda n, p: seen.append(
        (n, p.text())))
    assert seen == [("typing", block_program.text())]
    with pytest.raises(BwskError, match="--print-after fusion"):
        run_passes(block_program, ["typing"], print_after=["fusion"])


def test_public_run_passes(block_program):
    out = bwskc.run_passes(block_program, ["typing"])
    assert out.analyses["typing"].defs["fc"].type == "S"
    assert out.analyses["typing"].defs["ln"].type == "K"


# ------------------------------------------------------------------------------------------ the CLI

@pytest.fixture(scope="module")
def block_file(tmp_path_factory):
    torch.manual_seed(0)
    ep = torch.export.export(Block().eval(), (torch.randn(2, 4),))
    path = tmp_path_factory.mktemp("m") / "block.pt2"
    torch.export.save(ep, str(path))
    return str(path)


def test_cli_json_has_type_and_evidence(block_file, capsys):
    assert main(["lower", block_file, "--passes", "typing", "--emit", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "bwskc.ir/2"
    assert all(n["type"] in ("S", "K", "GRAY") for n in doc["nodes"])
    assert all(n["evidence"]["rule"] and n["evidence"]["claim"] for n in doc["nodes"])
    ln = next(n for n in doc["nodes"] if n["op"] == "aten.layer_norm.default")
    assert ln["type"] == "K" and ln["evidence"]["witness"]
    fc = next(n for n in doc["nodes"] if n["op"] == "aten.linear.default")
    assert fc["type"] == "S" and fc["evidence"]["rank"]["rank"] == 4
    assert doc["summary"]["typing"]["K"] >= 1


def test_cli_without_passes_leaves_type_null(block_file, capsys):
    assert main(["lower", block_file, "--emit", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert all(n["type"] is None and n["evidence"] is None for n in doc["nodes"])


def test_cli_print_after_goes_to_stderr(block_file, capsys):
    assert main(["lower", block_file, "--passes", "typing", "--print-after", "typing"]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("# IR after typing\n")
    assert err.split("\n", 1)[1] == out


@pytest.mark.parametrize("argv, message", [
    (["--passes", "typo"], "unknown pass 'typo'"),
    (["--passes", "typing", "--print-after", "calm"], "--print-after calm"),
    (["--emit", "svg"], "unknown --emit"),
])
def test_cli_pass_errors_exit_2(block_file, capsys, argv, message):
    assert main(["lower", block_file, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_report_tables(block_file, capsys):
    assert main(["lower", block_file, "--passes", "typing", "--emit", "report"]) == 0
    out = capsys.readouterr().out
    assert "| Layer | Ops | S | K | GRAY |" in out
    total = next(line for line in out.splitlines() if line.startswith("| **Total**"))
    cells = [c.strip() for c in total.strip("|").split("|")]
    assert cells[1] == "5" and int(cells[2]) + int(cells[3]) + int(cells[4]) == 5
    assert "`aten.layer_norm.default` | 1 | K | shift invariance" in out


def test_cli_dot_colours_by_type(block_file, capsys, tmp_path):
    assert main(["lower", block_file, "--passes", "typing", "--emit", "dot"]) == 0
    dot = capsys.readouterr().out
    assert 'fillcolor="#f4a6a6"' in dot  # ln: K
    assert 'fillcolor="#b7e4c7"' in dot  # fc: S
    target = tmp_path / "g.dot"
    assert main(["lower", block_file, "--passes", "typing", "--emit", "dot", "-o", str(target)]) == 0
    err = capsys.readouterr().err
    assert target.read_text() == dot
    assert ("graphviz is not installed" in err) or (tmp_path / "g.svg").exists()
