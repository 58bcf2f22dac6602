"""Error paths of the command line, run as a subprocess (``python -m bwskc.cli``).

Contract: exit 0 on success, 2 on bad input or usage, 1 on an internal error. An error is ONE line on
stderr starting with ``bwskc: `` and never a traceback; an IR syntax error adds the offending line and a
caret under the column (``FILE:LINE:COL: message``, the line, the caret). A failing command writes
nothing: an existing ``-o`` file is left as it was.
"""
from __future__ import annotations

import pickle
import random
import subprocess
import sys
import zipfile

import pytest
import torch
import torch.nn as nn

import bwskc
from conftest import Block

MARK = "\u27e8"  # in a corruption's replacement text: where the error must be reported


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bwskc.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def assert_one_line_error(r, code=2, *, contains=()):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("bwskc: "), r.stderr
    assert r.stdout == ""
    for text in contains:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def good_ir() -> str:
    torch.manual_seed(0)
    return bwskc.lower(Block(), (torch.randn(2, 4),)).text()


@pytest.fixture
def good_file(tmp_path, good_ir):
    path = tmp_path / "block.bwsk"
    path.write_text(good_ir)
    return path


@pytest.fixture(scope="module")
def pickled_linear(tmp_path_factory):
    torch.manual_seed(0)
    lin = nn.Linear(4, 2)
    path = tmp_path_factory.mktemp("pickle") / "linear.pt"
    torch.save(lin, path)
    return path, lin


def corrupt(text: str, old: str, new: str) -> tuple[str, int, int, str]:
    """Replace the first ``old`` by ``new`` (which marks the error position with MARK): the corrupted
    text and the 1-based line and column of the mark, and the corrupted line."""
    assert old in text, f"{old!r} not in the IR text (did the printed form change?)"
    marked = text.replace(old, new, 1)
    before = marked[:marked.index(MARK)]
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    corrupted = marked.replace(MARK, "")
    return corrupted, line, column, corrupted.splitlines()[line - 1]


# ------------------------------------------------------------------------------------ bwskc parse

def test_parse_of_good_ir_prints_it_back(good_file, good_ir):
    r = run_cli("parse", good_file)
    assert r.returncode == 0 and r.stderr == "" and r.stdout == good_ir


SYNTAX_ERRORS = {
    "double comma": ("B(fc, ln)", f"B(fc,{MARK}, ln)", "unexpected ','"),
    "stray character": ("B(fc, ln)", f"B(fc, ln{MARK}$)", "unexpected character '$'"),
    "missing colon": ("fc.bias) : f32[2,4]", f"fc.bias) {MARK}f32[2,4]", "unexpected 'f32', expected ':'"),
    "unknown dtype": ("param fc.weight : f32[4,4]", f"param fc.weight : {MARK}f33[4,4]",
                      "unknown dtype 'f33'"),
    "format version": ("bwsk 1 program", f"bwsk {MARK}7 program", "unsupported format version 7"),
    "saturated K": ("B(fc, ln)", f"{MARK}K(fc, ln)", "K applied to 2 arguments is saturated"),
    "declared twice": ("param ln.bias : f32[4]\n", f"param ln.bias : f32[4]\nparam {MARK}ln.bias : f32[4]\n",
                       "tensor 'ln.bias' declared twice"),
}


@pytest.mark.parametrize("case", list(SYNTAX_ERRORS))
def test_parse_error_shows_position_line_and_caret(tmp_path, good_ir, case):
    old, new, message = SYNTAX_ERRORS[case]
    text, line, column, source = corrupt(good_ir, old, new)
    bad = tmp_path / "bad.bwsk"
    bad.write_text(text)
    r = run_cli("parse", bad)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    err = r.stderr.splitlines()
    assert len(err) == 3, r.stderr
    assert err[0].startswith(f"bwskc: {bad}:{line}:{column}: {message}"), (err[0], line, column)
    assert err[1] == source
    assert err[2] == " " * (column - 1) + "^"


def test_parse_error_at_end_of_truncated_file(tmp_path, good_ir):
    lines = good_ir.splitlines()
    assert lines[-1] == "  )"  # the entry's closing parenthesis
    bad = tmp_path / "truncated.bwsk"
    bad.write_text("\n".join(lines[:-1]) + "\n")
    r = run_cli("parse", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    err = r.stderr.splitlines()
    assert len(err) == 3, r.stderr
    n = len(lines) - 1  # the last line left: the error is at its last token or just past its end
    last = lines[n - 1]
    ok = [f"bwskc: {bad}:{n}:{c}: unexpected end of file" for c in (len(last), len(last) + 1)]
    assert err[0].startswith(tuple(ok)), err[0]
    column = int(err[0][len(f"bwskc: {bad}:{n}:"):].split(":")[0])
    assert err[1] == last and err[2] == " " * (column - 1) + "^"


def test_unbound_name_is_reported_at_its_position(tmp_path, good_ir):
    text, line, column, _ = corrupt(good_ir, "B(fc, ln)", f"B(fc, {MARK}lnx)")
    bad = tmp_path / "unbound.bwsk"
    bad.write_text(text)
    r = run_cli("parse", bad)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[0] == f"bwskc: {bad}:{line}:{column}: unbound name 'lnx'"


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank"])
def test_parse_of_empty_file(tmp_path, content):
    path = tmp_path / "empty.bwsk"
    path.write_text(content)
    r = run_cli("parse", path)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith(f"bwskc: {path}:1:1: empty file")


def test_parse_of_missing_file(tmp_path):
    assert_one_line_error(run_cli("parse", tmp_path / "missing.bwsk"), contains=["missing.bwsk"])


def test_parse_of_a_directory(tmp_path):
    assert_one_line_error(run_cli("parse", tmp_path), contains=["directory"])


def test_parse_of_binary_file(tmp_path):
    path = tmp_path / "binary.bwsk"
    path.write_bytes(b"\xff\xfe\x00bwsk" + random.Random(0).randbytes(256))
    assert_one_line_error(run_cli("parse", path), contains=["UTF-8"])


# ------------------------------------------------------------------------------------ bwskc lower

def test_lower_of_missing_file(tmp_path):
    assert_one_line_error(run_cli("lower", tmp_path / "missing.pt2"), contains=["missing.pt2"])


def test_lower_of_empty_file(tmp_path):
    path = tmp_path / "empty.pt2"
    path.write_bytes(b"")
    assert_one_line_error(run_cli("lower", path), contains=["empty"])


def test_lower_of_random_bytes(tmp_path):
    path = tmp_path / "junk.bin"
    data = random.Random(0).randbytes(4096)
    assert data[0] != 0x80  # not mistaken for a pickle: see the next test for that
    path.write_bytes(data)
    assert_one_line_error(run_cli("lower", path), contains=["junk.bin", "not a model file"])


def test_lower_of_random_bytes_with_a_pickle_header(tmp_path):
    path = tmp_path / "junk.pkl"
    path.write_bytes(b"\x80\x04" + random.Random(1).randbytes(4096))
    assert_one_line_error(run_cli("lower", path), contains=["--trust-pickle"])
    assert_one_line_error(run_cli("lower", path, "--trust-pickle", "--input", "f32[2,4]"),
                          contains=["junk.pkl", "unpickle"])


@pytest.mark.parametrize("content", ["{not json", '{"foo": 1}'], ids=["invalid-json", "no-model-type"])
def test_lower_of_bad_config(tmp_path, content):
    path = tmp_path / "config.json"
    path.write_text(content)
    assert_one_line_error(run_cli("lower", path), contains=["config.json"])


def test_lower_of_directory_without_config(tmp_path):
    assert_one_line_error(run_cli("lower", tmp_path), contains=["config.json"])


def test_lower_of_a_zip_that_is_not_an_exported_program(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hello")
    assert_one_line_error(run_cli("lower", path), contains=["other.zip", "ExportedProgram"])


def test_untrusted_pickle_is_refused_and_trusted_one_lowers(pickled_linear):
    path, lin = pickled_linear
    line = assert_one_line_error(run_cli("lower", path))
    assert "--trust-pickle" in line and "linear.pt" in line

    r = run_cli("lower", path, "--trust-pickle", "--input", "f32[2,4]")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    program = bwskc.parse(r.stdout)
    assert program.entry.inputs[0].shape == (2, 4)
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(program.with_weights(lin.state_dict())(x), lin(x), rtol=0, atol=0)


class _Evil:
    """Unpickling this creates a file: the refusal must happen before any unpickling."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_untrusted_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(_Evil(marker), path)
    with open(path, "rb") as f:  # torch.save's archive really does carry the payload
        assert zipfile.is_zipfile(f)
    assert_one_line_error(run_cli("lower", path), contains=["--trust-pickle"])
    assert not marker.exists()
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    assert_one_line_error(run_cli("lower", plain), contains=["--trust-pickle"])
    assert not marker.exists()


def test_trusted_pickle_of_something_else_than_a_module(tmp_path):
    path = tmp_path / "dict.pt"
    torch.save({"weight": torch.ones(2)}, path)
    assert_one_line_error(run_cli("lower", path, "--trust-pickle", "--input", "f32[2]"),
                          contains=["nn.Module"])


def test_trusted_pickle_without_inputs(pickled_linear):
    path, _ = pickled_linear
    assert_one_line_error(run_cli("lower", path, "--trust-pickle"), contains=["--input"])


def test_unknown_emit(good_file, pickled_linear):
    assert_one_line_error(run_cli("lower", good_file, "--emit", "xyz"), contains=["xyz"])
    path, _ = pickled_linear
    assert_one_line_error(run_cli("lower", path, "--trust-pickle", "--input", "f32[2,4]", "--emit", "xyz"),
                          contains=["xyz"])


@pytest.mark.parametrize("specs,message", [
    (["f32[2,x]"], "bad --input 'f32[2,x]'"),
    (["f32(2,4)"], "bad --input 'f32(2,4)'"),
    (["f99[2,4]"], "unknown dtype 'f99'"),
    (["f32[0,4]"], "positive"),
    (["f32[2,-4]"], "bad --input"),
    (["=f32[2,4]"], "bad --input"),
    (["x=f32[2,4]", "f32[2,4]"], "positional --input after a named one"),
])
def test_bad_input_spec(pickled_linear, specs, message):
    path, _ = pickled_linear
    args = [a for s in specs for a in ("--input", s)]
    assert_one_line_error(run_cli("lower", path, "--trust-pickle", *args), contains=[message])


def test_input_of_the_wrong_shape(pickled_linear):
    path, _ = pickled_linear
    assert_one_line_error(run_cli("lower", path, "--trust-pickle", "--input", "f32[2,5]"),
                          contains=["torch.export failed"])


@pytest.mark.parametrize("argv", [[], ["frob"], ["lower"], ["lower", "x.pt2", "--bogus"], ["parse"]],
                         ids=["nothing", "unknown-command", "no-model", "unknown-flag", "no-file"])
def test_usage_errors(argv):
    assert_one_line_error(run_cli(*argv))


# ------------------------------------------------------------------------------------------ -o FILE

def test_output_file_is_written(tmp_path, good_file, good_ir):
    out = tmp_path / "out.bwsk"
    out.write_text("keep")
    r = run_cli("parse", good_file, "-o", out)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert out.read_text() == good_ir


FAILING = {
    "random bytes": lambda d, good: ["lower", d / "junk.bin"],
    "untrusted pickle": lambda d, good: ["lower", d / "m.pt"],
    "bad emit": lambda d, good: ["lower", good, "--emit", "xyz"],
    "bad input": lambda d, good: ["lower", d / "m.pt", "--trust-pickle", "--input", "f32[2,x]"],
    "bad IR": lambda d, good: ["parse", d / "bad.bwsk"],
    "missing IR": lambda d, good: ["parse", d / "missing.bwsk"],
}


@pytest.mark.parametrize("case", list(FAILING))
def test_failed_command_leaves_existing_output_untouched(tmp_path, good_file, case):
    (tmp_path / "junk.bin").write_bytes(random.Random(0).randbytes(4096))
    torch.save(nn.Linear(4, 2), tmp_path / "m.pt")
    (tmp_path / "bad.bwsk").write_text(good_file.read_text().replace("B(fc, ln)", "B(fc,, ln)"))
    out = tmp_path / "out.txt"
    out.write_text("keep")
    r = run_cli(*FAILING[case](tmp_path, good_file), "-o", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("bwskc: ")
    assert out.read_text() == "keep"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.txt"))
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_output_into_missing_directory(tmp_path, good_file):
    assert_one_line_error(run_cli("parse", good_file, "-o", tmp_path / "no" / "such" / "out.bwsk"))
