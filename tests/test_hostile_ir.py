"""Untrusted IR text runs no code and allocates nothing: each hostile file is refused with
``file:line:col`` (exit 2 and one diagnostic from ``bwskc parse``), quickly, and leaves no trace.

An op name is resolved through the operator registry (aten and prims overloads only), never by
following attributes from ``torch.ops``; the verifier runs primitives and constants only on meta
tensors; sizes, integers and nesting are bounded.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
import torch

import bwskc
import bwskc.cli
from bwskc.errors import BwskError
from bwskc.ops import lookup_overload
from bwskc.text import MAX_NESTING, parse_program

MARK = "\u27e8"  # where the refusal must be reported
HEADER = "bwsk 1 program P\n\n"
ENTRY = "entry (x: f32[2]) -> (out: f32[2]) =\n  "


def entry(body: str, decls: str = "") -> str:
    return HEADER + decls + ENTRY + body + "\n"


def const(prim: str) -> str:
    return entry("K(%0)", f"const %0 = {prim} : f32[2]\n\n")


# name -> (text with MARK at the refused position, what the message says)
HOSTILE = {
    "load_library in a constant": (
        const(f'{MARK}load_library.__call__.__call__("x.so")'), "only aten and prims"),
    "import_module in a term": (
        entry(f'B(aten.neg.default(_) : f32[2], {MARK}import_module.__call__.__call__("os") : f32[2])'),
        "only aten and prims"),
    "attribute path under aten": (entry(f"{MARK}aten.__class__.__init__(_) : f32[2]"),
                                  "no such operator overload"),
    "attribute of a packet": (entry(f"{MARK}aten.add.__call__(_, _) : f32[2]"),
                              "no such operator overload"),
    "four-part path": (entry(f"{MARK}aten.add.Tensor.__call__(_, _) : f32[2]"),
                       "expected namespace.operator.overload"),
    "other namespace": (entry(f"{MARK}c10d.barrier.default(_) : f32[2]"), "only aten and prims"),
    "file read": (entry(f'K({MARK}aten.from_file.default("/etc/passwd", None, 2) : f32[2])'),
                  "acts outside its tensors"),
    "file write": (entry(f'K({MARK}aten.save.default(1, "marker") : f32[2])'),
                   "acts outside its tensors"),
    "TorchScript string builtin": (entry(f'K({MARK}aten.ljust.default("x", 1000000000, " ") : f32[2])'),
                                   "takes and gives no tensor"),
    "huge ones": (entry(f"K({MARK}aten.ones.default([268435456]) : f32[2])"),
                  "declared f32[2] but its inputs () give f32[268435456]"),
    "huge full": (entry(f"K({MARK}aten.full.default([1099511627776, 1099511627776], 1.0) : f32[2])"),
                  "literal size of 1208925819614629174706176 elements is too large"),
    "huge empty in a constant": (const(f"{MARK}aten.empty.memory_format([1099511627776, 4096])"),
                                 "is too large"),
    "huge declared type": (entry("I", f"param w : {MARK}f32[1099511627776,1024]\n\n"), "is too large"),
    "negative dimension": (entry("I", f"param w : f32[{MARK}-3]\n\n"), "negative dimension -3"),
    "negative literal size": (entry(f"K({MARK}aten.zeros.default([-5, 2]) : f32[2])"),
                              "negative size -5"),
    "integer over 4300 digits": (entry(f"aten.mul.Tensor(_, {MARK}{'9' * 5000}) : f32[2]"),
                                 "is out of range (at most 64 bits)"),
    "integer over 64 bits": (entry(f"aten.mul.Tensor(_, {MARK}18446744073709551616) : f32[2]"),
                             "is out of range"),
    "dimension over 4300 digits": (entry("I", f"param w : f32[{MARK}{'7' * 5000}]\n\n"),
                                   "is out of range"),
    "bad JSON escape": (entry(f'aten.div.Tensor_mode(_, 2, rounding_mode={MARK}"\\q") : f32[2]'),
                        "bad string literal"),
    # the position is the first bracket past the bound (the prim's own "(" is one level)
    "deep combinator nesting": (entry("B(" * MAX_NESTING + "B" + MARK + "(I" + ")" * (MAX_NESTING + 1)),
                                f"nesting deeper than {MAX_NESTING} levels"),
    "deep list nesting": (entry("aten.mul.Tensor(_, " + "[" * (MAX_NESTING - 1) + MARK + "["
                                + "]" * MAX_NESTING + ") : f32[2]"), "nesting deeper"),
    "second entry": (entry("I") + f"\n{MARK}" + ENTRY + "I\n", "a second entry"),
    "split into a million": (
        "bwsk 1 program P\n\nentry (x: f32[1000000]) -> (out: f32[1]) =\n  "
        f"B(getitem(_, 0) : f32[1], {MARK}aten.split.Tensor(_, 1) : (f32[1], f32[1]))\n",
        "makes 1000000 results, 2 declared"),
}


def position(text: str) -> tuple[str, int, int]:
    before = text[:text.index(MARK)]
    line = before.count("\n") + 1
    return text.replace(MARK, ""), line, len(before) - (before.rfind("\n") + 1) + 1


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_ir_is_refused_at_its_position_quickly(case):
    marked, message = HOSTILE[case]
    text, line, column = position(marked)
    start = time.monotonic()
    with pytest.raises(BwskError) as info:
        parse_program(text, "hostile.bwsk")
    assert time.monotonic() - start < 15, "refused, but too slowly"
    first = str(info.value)
    assert first.startswith(f"hostile.bwsk:{line}:{column}: "), (first[:200], line, column)
    assert message in first, first[:300]
    assert "\n" not in first


def test_no_op_name_reaches_torch_ops_attributes(monkeypatch, tmp_path):
    """Resolving is a registry lookup: torch.ops' own methods are never reached, whatever the name."""
    marker = tmp_path / "marker"

    def spy(*args, **kwargs):
        marker.write_text(repr(args))

    for attr in ("load_library", "import_module"):
        monkeypatch.setattr(type(torch.ops), attr, spy)
    for name in ("load_library.__call__.__call__", "import_module.__call__.__call__",
                 "load_library.x.y", "import_module.x.y"):
        with pytest.raises(BwskError):
            lookup_overload(name)
        with pytest.raises(BwskError):
            parse_program(entry(f'K({name}("{tmp_path}/x.so") : f32[2])'), "hostile.bwsk")
    assert not marker.exists()


def test_resolver_gives_the_registered_overload():
    """The allow-list is not an empty one: real overloads resolve to themselves."""
    for op in (torch.ops.aten.add.Tensor, torch.ops.aten.__and__.Tensor, torch.ops.prims.iota.default,
               torch.ops.aten.layer_norm.default):
        assert lookup_overload(str(op)) is op


def test_import_module_from_ir_runs_nothing_in_the_cli(tmp_path):
    """The real thing, as a user would hit it: a module next to the IR file that would write a marker
    when imported (``python -m`` puts the working directory on sys.path)."""
    marker = tmp_path / "MARKER"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    hostile = tmp_path / "hostile.bwsk"
    hostile.write_text(const('import_module.__call__.__call__("evilmod")'))
    r = subprocess.run([sys.executable, "-m", "bwskc.cli", "parse", hostile.name], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines() == [
        f"bwskc: {hostile.name}:3:12: constant %0: op 'import_module.__call__.__call__' refused: "
        "only aten and prims operators are allowed"]
    assert not marker.exists()


def test_cli_refuses_every_hostile_file_with_one_diagnostic(tmp_path, capsys):
    """``bwskc parse`` (its main, in process): exit 2, the first line ``bwskc: FILE:LINE:COL: ..``,
    no traceback; a syntax error adds only its line and caret, clipped for long lines."""
    for i, (marked, message) in enumerate(HOSTILE.values()):
        text, line, column = position(marked)
        path = tmp_path / f"hostile{i}.bwsk"
        path.write_text(text)
        assert bwskc.cli.main(["parse", str(path)]) == 2
        out, err = capsys.readouterr()
        lines = err.splitlines()
        assert out == "" and "Traceback" not in err
        assert lines[0].startswith(f"bwskc: {path}:{line}:{column}: ") and message in lines[0], err
        assert len(lines) in (1, 3) and all(len(x) < 400 for x in lines), err[:500]


def test_large_literal_allocations_stay_on_meta():
    """A constant and a term that would allocate 1 GiB each parse (they are within the bounds and
    well typed) without allocating: the process's peak memory grows by far less than 1 GiB."""
    code = f"""
import resource, bwskc
from bwskc.text import parse_program
text = {HEADER!r} + "const %0 = aten.ones.default([268435456]) : f32[268435456]\\n"
text += "const %1 = aten.full.default([268435456], 2.0) : f32[268435456]\\n\\n"
text += {ENTRY!r} + "K(aten.randn.default([268435456]) : f32[268435456])\\n"
text = text.replace("(out: f32[2])", "(out: f32[268435456])")
parse_program("bwsk 1 program W\\n\\nentry (x: f32[2]) -> (y: f32[2]) =\\n  I\\n")  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
p = parse_program(text, "big.bwsk")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(p.consts), (after - before) // 1024)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    n_consts, grown_mib = map(int, r.stdout.split())
    assert n_consts == 2
    assert grown_mib < 256, f"parsing grew the peak memory by {grown_mib} MiB"


def test_constants_are_checked_on_meta_not_computed(monkeypatch):
    """The verifier checks a constant's declared type without computing it on real tensors."""
    calls = []
    real = torch.ops.aten.ones.default

    class Spy:
        _schema = real._schema

        def __call__(self, *args, **kwargs):
            calls.append(kwargs.get("device"))
            return real(*args, **kwargs)

    from bwskc.runtime.denote import resolve_op
    verify_module = sys.modules["bwskc.verify"]  # bwskc.verify is the function
    monkeypatch.setattr(verify_module, "resolve_op",
                        lambda name: Spy() if name == str(real) else resolve_op(name))
    parse_program(const("aten.ones.default([2], device=torch.device(\"cpu\"))"), "c.bwsk")
    assert calls == [torch.device("meta")]
    with pytest.raises(bwskc.VerifyError, match=re.escape("c.bwsk:3:12: constant %0: aten.ones")):
        parse_program(const("aten.ones.default([3])"), "c.bwsk")
