"""Core checks written with the foundation: lowering, text round-trip, evaluation and CLI errors."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import bwskc
from conftest import Block
from bwskc.ir import Prim, prims


def test_residual_is_S_add_and_output_equals_eager():
    torch.manual_seed(0)
    m, x = Block(), torch.randn(2, 4)
    p = bwskc.lower(m, (x,))
    body = p.entry.body
    assert body.kind == "B" and [a.kind for a in body.args] == ["S", "S"]
    assert body.args[1].args[0].op == "aten.add.Tensor"
    torch.testing.assert_close(p(x), m(x), rtol=0, atol=0)
    torch.testing.assert_close(p.to_fx()(x), m(x), rtol=0, atol=0)
    assert bwskc.parse(p.text()) == p


_UNARY = [torch.tanh, torch.sigmoid, torch.relu, torch.neg, lambda t: t * 2.0, lambda t: t + 3]
_BINARY = [torch.add, torch.mul, torch.sub]


class RandomGraph(nn.Module):
    """A dataflow graph from a list of steps; each step reads one or two earlier values."""

    def __init__(self, steps, outputs):
        super().__init__()
        self.steps, self.outputs = steps, outputs
        self.lin = nn.Linear(3, 3)

    def forward(self, x, y):
        vals = [x, y]
        for kind, i, j, k in self.steps:
            a, b = vals[i % len(vals)], vals[j % len(vals)]
            if kind == 0:
                vals.append(_UNARY[k % len(_UNARY)](a))
            elif kind == 1:
                vals.append(_BINARY[k % len(_BINARY)](a, b))
            else:
                vals.append(self.lin(a))
        return tuple(vals[2 + o % (len(vals) - 2)] for o in self.outputs)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 20), st.integers(0, 20), st.integers(0, 9)),
                min_size=1, max_size=10),
       st.lists(st.integers(0, 20), min_size=1, max_size=3, unique=True))
def test_random_graphs_lower_evaluate_and_round_trip(steps, outputs):
    torch.manual_seed(0)
    m = RandomGraph(steps, outputs)
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    want = m(x, y)
    p = bwskc.lower(m, (x, y))
    got = p(x, y)
    got = got if isinstance(got, tuple) else (got,)
    fx = p.to_fx()(x, y)
    fx = fx if isinstance(fx, tuple) else (fx,)
    assert len(got) == len(want)
    for g, f, w in zip(got, fx, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(f, w, rtol=1e-6, atol=1e-6)
    # no computation duplicated: one fx node per primitive application at most
    n_fx = sum(1 for n in p.to_fx().graph.nodes if n.op == "call_function")
    n_leaves = sum(1 for d in [*p.defs.values(), p.entry] for q in prims(d.body) if q.op != "tuple")
    assert n_fx <= n_leaves + len(p.consts)
    text = p.text()
    assert bwskc.parse(text) == p and bwskc.parse(text).text() == text


def test_literal_types_are_distinguished():
    a = Prim("aten.mul.Tensor", (bwskc.ir.HOLE, 1), (), bwskc.ir.TensorType("f32", (2,)))
    b = Prim("aten.mul.Tensor", (bwskc.ir.HOLE, 1.0), (), bwskc.ir.TensorType("f32", (2,)))
    c = Prim("aten.mul.Tensor", (bwskc.ir.HOLE, True), (), bwskc.ir.TensorType("f32", (2,)))
    texts = {bwskc.text.prim_text(t) for t in (a, b, c)}
    assert len(texts) == 3


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bwskc.cli", *args], capture_output=True, text=True)


def test_cli_errors_are_one_line_exit_2(tmp_path):
    m, x = Block(), torch.randn(2, 4)
    good = tmp_path / "block.bwsk"
    good.write_text(bwskc.lower(m, (x,)).text())
    r = _cli("parse", str(good))
    assert r.returncode == 0 and r.stdout == good.read_text()
    lines = good.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if "B(fc, ln)" in line)
    lines[row] = lines[row].replace("B(fc, ln)", "B(fc,, ln)")
    bad = tmp_path / "bad.bwsk"
    bad.write_text("\n".join(lines) + "\n")
    r = _cli("parse", str(bad))
    col = lines[row].index(",,") + 2
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr.splitlines()
    assert err[0].startswith(f"bwskc: {bad}:{row + 1}:{col}: unexpected ','")
    assert err[1] == lines[row] and err[2] == " " * (col - 1) + "^"
    junk = tmp_path / "junk.bin"
    junk.write_bytes(bytes(range(256)) * 3)
    out = tmp_path / "out.txt"
    out.write_text("keep")
    for args in (["parse", str(tmp_path / "missing.bwsk")], ["lower", str(junk), "-o", str(out)],
                 ["lower", str(good), "--emit", "xyz"], ["parse", str(tmp_path / "empty.bwsk")]):
        (tmp_path / "empty.bwsk").write_text("")
        r = _cli(*args)
        assert r.returncode == 2, args
        assert len(r.stderr.strip().splitlines()) in (1, 3) and "Traceback" not in r.stderr, r.stderr
    assert out.read_text() == "keep"


def test_untrusted_pickle_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(nn.Linear(4, 2), path)
    r = _cli("lower", str(path))
    assert r.returncode == 2 and "--trust-pickle" in r.stderr
    r = _cli("lower", str(path), "--trust-pickle", "--input", "f32[3,4]")
    assert r.returncode == 0 and "aten.linear.default" in r.stdout


@pytest.mark.parametrize("emit", ["json", "dot"])
def test_emit_json_and_dot(tmp_path, emit):
    import json
    good = tmp_path / "block.bwsk"
    good.write_text(bwskc.lower(Block(), (torch.randn(2, 4),)).text())
    r = _cli("lower", str(good), "--emit", emit)
    assert r.returncode == 0
    if emit == "json":
        doc = json.loads(r.stdout)
        assert doc["schema"] == "bwskc.ir/2"
        ops = [n["op"] for n in doc["nodes"]]
        assert ops.count("aten.layer_norm.default") == 1 and "aten.linear.default" in ops
        ln = next(n for n in doc["nodes"] if n["op"] == "aten.layer_norm.default")
        assert ln["module"] == "ln" and ln["shape"] == [2, 4] and ln["dtype"] == "f32"
    else:
        assert r.stdout.startswith('digraph "Block" {') and '"entry" -> "fc";' in r.stdout


def test_none_and_list_literals_round_trip():
    text = ("bwsk 1 program Conv\n\nparam weight : f32[4,3,3,3]\n\n"
            "entry (input: f32[1,3,8,8]) -> (out: f32[1,4,6,6]) =\n"
            "  aten.conv2d.default(_, weight, None, [1, 1], [0, 0]) : f32[1,4,6,6]\n")
    p = bwskc.parse(text)
    assert p.entry.body.args[2] is None and p.entry.body.args[3] == (1, 1)
    assert p.text() == text and bwskc.parse(p.text()) == p
