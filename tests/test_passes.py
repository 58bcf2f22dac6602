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


# ------------------------------------------------------------------- definition roles (Def.role)

_CHAIN_TEXT = """bwsk 1 program m

param w : f32[3,3]

entry (x: f32[2,3]) -> (y: f32[2,3]) =
  B(
    aten.neg.default(_) : f32[2,3],
    aten.tanh.default(_) : f32[2,3],
    S(aten.add.Tensor(_, _) : f32[2,3], aten.linear.default(_, w) : f32[2,3]),
    S(aten.add.Tensor(_, _) : f32[2,3], aten.linear.default(_, w) : f32[2,3])
  )
"""


class _AllS:
    """A typing stand-in: every term S (so fusion outlines every run of unary components)."""

    def term_type(self, term):
        return "S"


def test_fusion_and_reversible_mark_their_definitions_with_a_role():
    p = bwskc.parse(_CHAIN_TEXT)
    fused = run_passes(p, ["fusion"], options={"fusion": {"typing": _AllS()}})
    roles = {n: (d.kind, d.role) for n, d in fused.defs.items()}
    assert roles == {"entry.phase0": ("phase", "s_phase"), "entry.residual0": ("phase", "residual")}
    text = fused.text()
    assert "\nphase entry.residual0 {role=residual} : (f32[2,3]) -> f32[2,3] =\n" in text
    assert "\nphase entry.phase0 {role=s_phase} : (f32[2,3]) -> f32[2,3] =\n" in text
    assert bwskc.parse(text) == fused and bwskc.parse(text).text() == text
    coupled = run_passes(p, ["reversible"], options={"fusion": {"s_regions": False}})
    assert coupled.analyses["passes"].order == ["fusion", "reversible"]  # no typing: not needed
    d = coupled.defs["entry.residual0"]
    assert d.role == "coupling" and d.body.kind == "R"
    assert "{role=coupling}" in coupled.text() and bwskc.parse(coupled.text()) == coupled


def test_the_reversible_pass_reads_the_role_not_the_name():
    fused = run_passes(bwskc.parse(_CHAIN_TEXT), ["fusion"], options={"fusion.s_regions": False})
    renamed_text = fused.text().replace("entry.residual0", "stack_of_blocks")
    coupled = run_passes(bwskc.parse(renamed_text), ["reversible"], options={"fusion": {"s_regions": False}})
    assert coupled.defs["stack_of_blocks"].role == "coupling"
    assert [c["name"] for c in coupled.analyses["reversible"].chains] == ["stack_of_blocks"]
    # text from before roles: fusion (reversible's prerequisite) marks a role-less chain by what it is
    no_role = fused.text().replace(" {role=residual}", "")
    again = run_passes(bwskc.parse(no_role), ["reversible"], options={"fusion": {"s_regions": False}})
    assert again.defs["entry.residual0"].role == "coupling"
    # a phase named like a chain that is not one gets no role and is left alone
    lone = bwskc.parse("bwsk 1 program m\n\nphase entry.residual0 : (f32[2]) -> f32[2] =\n"
                       "  aten.neg.default(_) : f32[2]\n\nentry (x: f32[2]) -> (y: f32[2]) =\n"
                       "  entry.residual0\n")
    left = run_passes(lone, ["reversible"], options={"fusion": {"s_regions": False}})
    assert not left.analyses["reversible"].chains and left.defs["entry.residual0"].role is None


def test_role_text_form_is_optional_and_checked():
    from bwskc.errors import IRSyntaxError
    from bwskc.text import parse_syntax
    base = ("bwsk 1 program m\n\n{kw} f{attrs} : (f32[2]) -> f32[2] =\n  aten.neg.default(_) : f32[2]\n\n"
            "entry (x: f32[2]) -> (y: f32[2]) =\n  f\n")
    for kw in ("def", "phase"):
        old = parse_syntax(base.format(kw=kw, attrs=""))  # text without roles still parses
        assert old.defs["f"].role is None and old.text() == base.format(kw=kw, attrs="")
        new = parse_syntax(base.format(kw=kw, attrs=" {role=residual}"))
        assert new.defs["f"].role == "residual" and new != old
        assert new.text() == base.format(kw=kw, attrs=" {role=residual}")
    for attrs, message in [(" {role=nope}", "unknown role 'nope'"),
                           (" {colour=residual}", "unknown definition attribute 'colour'"),
                           (" {role=residual, role=residual}", "given twice"),
                           (" {}", "unexpected '}'")]:
        with pytest.raises(IRSyntaxError, match=message):
            parse_syntax(base.format(kw="phase", attrs=attrs))
    with pytest.raises(ValueError, match="unknown role"):
        from bwskc.ir import Def, TensorType
        Def("f", (), TensorType("f32", ()), None, role="nope")


# ------------------------------------------------------------------------------ reachable walks

def test_reachable_defs_and_walk_terms():
    from bwskc.ir import Ref, reachable_defs, walk_terms
    text = ("bwsk 1 program m\n\ndef a : (f32[2]) -> f32[2] =\n  aten.neg.default(_) : f32[2]\n\n"
            "def b : (f32[2]) -> f32[2] =\n  B(a, a)\n\ndef unused : (f32[2]) -> f32[2] =\n  a\n\n"
            "entry (x: f32[2]) -> (y: f32[2]) =\n  B(b, aten.tanh.default(_) : f32[2])\n")
    p = bwskc.parse(text)
    assert reachable_defs(p) == ["b", "a"]
    assert reachable_defs(p, [Ref("unused")]) == ["unused", "a"]
    scopes = [s for s, _ in walk_terms(p)]
    assert scopes[0] is None and scopes.count("a") == 1  # a body is walked once however often it is used
    assert [t.op for _, t in walk_terms(p) if hasattr(t, "op")] == ["aten.tanh.default", "aten.neg.default"]


# --------------------------------------------------------------------------------- layering

def _imports(path):
    import ast
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_no_pass_imports_another_modules_private_names():
    import pathlib
    root = pathlib.Path(bwskc.passes.__file__).parent
    for path in root.rglob("*.py"):
        for module, names in _imports(path):
            if module.startswith("bwskc.passes."):
                assert not [n for n in names if n.startswith("_")], (path, module, names)


def test_ir_imports_no_runtime_and_runs_through_the_registered_executor(monkeypatch):
    from bwskc import ir
    assert not [m for m, _ in _imports(ir.__file__) if m.startswith("bwskc.runtime")]
    p = bwskc.parse("bwsk 1 program m\n\nentry (x: f32[2]) -> (y: f32[2]) =\n  aten.neg.default(_) : f32[2]\n")
    torch.testing.assert_close(p(torch.ones(2)), -torch.ones(2))
    assert p.to_fx() is not None
    monkeypatch.setattr(ir, "_EXECUTORS", {})
    monkeypatch.setattr(bwskc, "DEFAULT_EXECUTOR", None)
    with pytest.raises(RuntimeError, match="no executor registered .* import bwskc.runtime"):
        bwskc.parse(p.text())(torch.ones(2))
    calls = []
    ir.register_executor(interpret=lambda prog: (lambda *a: calls.append(a) or "ran"), to_fx=lambda prog: "fx")
    assert bwskc.parse(p.text())(1) == "ran" and p.to_fx() == "fx" and calls == [(1,)]


# ------------------------------------------------------------------------- pass manager options

def test_unknown_or_mistyped_options_name_the_pass_and_the_option(block_program):
    with pytest.raises(BwskError, match="pass 'fusion' has no option 'colour'"):
        run_passes(block_program, ["fusion"], options={"fusion": {"colour": 1}})
    with pytest.raises(BwskError, match="pass 'fusion' has no option 'colour'"):
        run_passes(block_program, ["fusion"], options={"fusion.colour": 1})
    with pytest.raises(BwskError, match="pass 'reversible' has no option 'depth'"):
        run_passes(block_program, ["reversible"], options={"reversible": {"depth": 2}})
    with pytest.raises(BwskError, match="pass 'fusion': option 's_regions' must be bool, not str"):
        run_passes(block_program, ["fusion"], options={"fusion": {"s_regions": "no"}})
    with pytest.raises(BwskError, match="options for pass 'fusion', which does not run"):
        run_passes(block_program, ["typing"], options={"fusion": {"s_regions": False}})
    # shared (unqualified) keys go to the passes that declare them, and are otherwise ignored
    assert run_passes(block_program, ["typing"], options={"axes": None, "s_regions": False})


def test_options_are_dataclasses_and_passes_without_one_get_a_dict(monkeypatch, block_program):
    from bwskc.passes.fusion import PASS as FUSION
    from bwskc.passes.fusion import FusionOptions
    assert FUSION.options_from({"s_regions": False}) == FusionOptions(s_regions=False)
    assert FUSION.options_from(None) == FusionOptions()
    assert FUSION.required(FusionOptions(s_regions=False)) == () and FUSION.required(None) == ("typing",)
    assert plan(["fusion"], options={"fusion": FusionOptions(s_regions=False)}).order == ["fusion"]
    seen = []

    class _Looks(Pass):
        name = "looks"

        def analyze(self, program, options):
            seen.append(options)
            return None

    _register(monkeypatch, _Looks())
    run_passes(block_program, ["looks"], options={"axes": "batch=x:0", "looks": {"k": 1}})
    assert seen == [{"axes": "batch=x:0", "k": 1}]


class _Fails(Pass):
    name = "fails"
    kind = "rewrite"

    def __init__(self, exc):
        self.exc = exc

    def rewrite(self, program, options):
        raise self.exc


@pytest.mark.parametrize("exc", [BwskError("the stream is not a tensor"),
                                 bwskc.VerifyError("x: unbound"),
                                 KeyError("transformer.h.0")])
def test_an_error_inside_a_pass_names_the_pass(monkeypatch, block_program, exc):
    _register(monkeypatch, _Fails(exc))
    with pytest.raises(BwskError) as info:
        run_passes(block_program, ["fails"])
    err = info.value
    assert str(err).startswith("pass 'fails' failed: ")
    if isinstance(exc, BwskError):  # the same error, its type (and exit code) kept
        assert err is exc and str(err).endswith(exc.args[0].removeprefix("pass 'fails' failed: "))
        assert getattr(err, "exit_code", 2) == 2
    else:  # an internal error: its type and message kept, exit code 1, chained
        assert "internal error: KeyError: 'transformer.h.0'" in str(err)
        assert err.exit_code == 1 and err.__cause__ is exc


def test_cli_reports_the_failing_pass(monkeypatch, block_file, capsys):
    _register(monkeypatch, _Fails(BwskError("no chain here")))
    monkeypatch.setattr("bwskc.cli.pass_names", lambda: list(manager.REGISTRY))
    assert main(["lower", block_file, "--passes", "fails"]) == 2
    assert "pass 'fails' failed: no chain here" in capsys.readouterr().err


def test_random_programs_with_roles_round_trip():
    import dataclasses

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from test_text_roundtrip import _Builder, _check_round_trip

    from bwskc.ir import ROLES, Program
    from bwskc.verify import verify_program

    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.data())
    def check(data):
        p = _Builder(data).program()
        marks = data.draw(st.lists(st.tuples(st.sampled_from(["def", "phase"]),
                                             st.sampled_from([None, *ROLES])),
                                   min_size=len(p.defs), max_size=len(p.defs)))
        defs = {n: dataclasses.replace(d, kind=k, role=r) for (n, d), (k, r) in zip(p.defs.items(), marks)}
        q = Program(p.name, p.tensors, p.consts, defs, p.entry)
        verify_program(q)
        back = _check_round_trip(q)
        assert [(d.kind, d.role) for d in back.defs.values()] == marks
    check()
