"""Mutation fuzzing of the text form: the parser and verifier never fail internally.

The seed is the IR of a small lowered model holding every kind of declaration (parameters, buffers,
constants computed from literals, definitions, a multi-result op and its getitem, a tuple, a mask
constant) and the mutants are token edits of it: replacing a token by another of the text or by a
hostile one (huge integers, negative dimensions, bad escapes, op paths outside ATen, deep nesting),
deleting, duplicating or swapping tokens and lines. Every mutant must either parse to a program that
verifies and round-trips (``parse(p.text()) == p``, printed bytes stable), or raise the project's own
error (IRSyntaxError, VerifyError, BwskError) naming ``file:line:col``; never another exception, and
never slower than a time bound.
"""
from __future__ import annotations

import re
import time

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bwskc
from bwskc.errors import BwskError
from bwskc.ir import COMBINATORS, DTYPE_BY_NAME
from bwskc.text import KEYWORDS, MAX_NESTING, parse_program

FILE = "fuzz.bwsk"
POSITION = re.compile(rf"^{re.escape(FILE)}:\d+:\d+: \S")
SECONDS_PER_MUTANT = 20.0  # generous on a shared 2-core machine; a quadratic case took minutes
# tokens of the text form; anything else (stray characters) is one token per character
TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|`[^`\n]*`|%[0-9]+|-?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?'
                   r"|[A-Za-z_][A-Za-z0-9_.@]*|\s+|.", re.S)
HOSTILE = [
    "-1", "-3", "0", "18446744073709551616", "9" * 5000, "1e999", "-0.0", "%99", "%0", "_",
    '"\\q"', '"\\ud800"', '"\t"', '"', "`", "`x`", "nan", "-inf", "True", "None",
    "load_library.__call__.__call__", "import_module.__call__.__call__", "aten.__class__.__init__",
    "aten.from_file.default", "aten.save.default", "aten.ones.default", "aten.mul.int",
    "torch.device", 'torch.device("meta")', 'torch.device("nonsense")', "torch.float32",
    "entry", "const", "def", "phase", "param", "B", "S", "K", "W", "C", "I", "R", "R1", "tuple",
    "getitem", "(", ")", "[", "]", ",", ":", "=", "->", "f32[4611686018427387904]", "f32[-1]",
    "(f32[2,3,4],)", "i64[]", "int", "#", "\\", "\u2028", "\r", "\x0c",
]


class Tiny(nn.Module):
    """Parameters, buffers, constants (a mask from a factory), a multi-result op and a tuple."""

    def __init__(self):
        super().__init__()
        self.ln, self.fc, self.bn = nn.LayerNorm(4), nn.Linear(4, 4), nn.BatchNorm1d(3)

    def forward(self, x):
        mask = torch.ones(3, 3, dtype=torch.bool).tril()
        h = x + self.fc(self.ln(x))
        a = torch.softmax((h @ h.transpose(1, 2)).masked_fill(~mask, float("-inf")), -1) @ h
        top, _ = a.max(-1)
        return self.bn(a) * torch.sigmoid(h), top


@pytest.fixture(scope="module")
def seed_text() -> str:
    torch.manual_seed(0)
    return bwskc.lower(Tiny().eval(), (torch.randn(2, 3, 4),)).text()


NUMBERS = ["-1", "0", "1", "2", "3", "4", "5", "-2", "1.5", "1099511627776", "4294967296"]
OPS = ["aten.add.Tensor", "aten.mul.Tensor", "aten.sigmoid.default", "aten.matmul.default",
       "aten.max.dim", "aten.split.Tensor", "aten.unbind.int", "aten.zeros.default", "aten.full.default",
       "aten.arange.default", "aten.empty_strided.default", "aten.rand.default", "prims.iota.default",
       "aten._to_copy.default", "aten.view.default", "aten.expand.default", "aten.cat.default"]


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


def token_class(tok: str) -> str:
    """Tokens of one class can replace each other and keep the text parseable more often than not,
    so such mutants reach the verifier's checks rather than the parser's."""
    if re.fullmatch(r"-?[0-9][0-9.eE+-]*", tok):
        return "number"
    if tok in DTYPE_BY_NAME:
        return "dtype"
    if tok in COMBINATORS:
        return "combinator"
    if tok in KEYWORDS or tok.startswith("torch."):
        return "keyword"
    if re.fullmatch(r"[a-z_]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+", tok):
        return "op"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.@]*", tok):
        return "name"
    return "string" if tok.startswith('"') else "other"


# hostile tokens by the class they replace, so that the mutant still parses up to them
HOSTILE_BY_CLASS = {
    "number": ["9" * 5000, "18446744073709551616", "-9223372036854775809", "1e999", "-0.0",
               "4611686018427387904", "268435456"],
    "string": ['"\\q"', '"\\ud800"', '"\t"', '"\\u12"', '"cuda:99999999999999999999"'],
    "op": ["load_library.__call__.__call__", "import_module.__call__.__call__",
           "aten.__class__.__init__", "aten.add.__call__", "aten.from_file.default",
           "aten.save.default", "aten.mul.int", "aten.ljust.default", "prims.__dict__.x",
           "c10d.barrier.default", "aten.add.Tensor.default"],
    "name": ["`torch.float32`", "torch.float32", "torch.device", "None", "True"],
}


def _term_positions(toks: list[str]) -> list[int]:
    """Indices of definition references in term position (``B(fc, ln)``: fc and ln)."""
    out = []
    for i in range(1, len(toks) - 1):
        prev = next((t for t in reversed(toks[:i]) if not t.isspace()), "")
        nxt = next((t for t in toks[i + 1:] if not t.isspace()), "")
        if token_class(toks[i]) == "name" and prev in ("(", ",") and nxt in (")", ","):
            out.append(i)
    return out


@st.composite
def mutants(draw, seed: str) -> str:
    toks = tokens(seed)
    words = sorted({t for t in toks if not t.isspace()})
    for _ in range(draw(st.sampled_from([1, 1, 2, 3]))):
        kind = draw(st.sampled_from(["same"] * 4 + ["hostile"] * 3 + ["nest"] * 2 + [
            "block", "line", "replace", "delete", "duplicate", "swap"]))
        # a token of a class that has replacements, or (for the plain edits) any but blanks
        classes = (("number", "op", "name", "string", "dtype", "combinator")
                   if kind in ("same", "hostile") else None)
        places = [j for j, t in enumerate(toks) if not t.isspace()
                  and (classes is None or token_class(t) in classes)] or [0]
        i = draw(st.sampled_from(places[1:] or places))  # the header's `bwsk` is tested elsewhere
        cls = token_class(toks[i])
        if kind == "same":  # a number, an op or a name replaced by one of its kind
            pool = {"number": NUMBERS, "op": OPS, "dtype": ["f64", "i64", "bool", "f16"]}.get(cls, [])
            toks[i] = draw(st.sampled_from(pool + [w for w in words if token_class(w) == cls]))
        elif kind == "hostile":
            toks[i] = draw(st.sampled_from(HOSTILE_BY_CLASS.get(cls, HOSTILE)))
        elif kind == "nest":  # a reference wrapped k deep: B(I, ..) keeps its type, B(..) does not
            places = _term_positions(toks)
            if places:
                j = draw(st.sampled_from(places))
                k = draw(st.sampled_from([3, 300, 3000, MAX_NESTING + 1]))
                wrap = draw(st.sampled_from(["B(I, ", "B(", "W(K(", "S(K, "]))
                toks[j] = wrap * k + toks[j] + ")" * (k * wrap.count("("))
        elif kind == "block":  # a paragraph (a definition, the entry) repeated or dropped
            blocks = "".join(toks).split("\n\n")
            k = draw(st.integers(0, len(blocks) - 1))
            blocks[k:k + 1] = [] if draw(st.booleans()) else [blocks[k], blocks[k]]
            toks = tokens("\n\n".join(blocks))
        elif kind == "line":  # a line deleted or repeated (a declaration twice)
            lines = "".join(toks).split("\n")
            k = draw(st.integers(0, len(lines) - 1))
            lines[k:k + 1] = [] if draw(st.booleans()) else [lines[k], lines[k]]
            toks = tokens("\n".join(lines))
        elif kind == "replace":
            toks[i] = draw(st.sampled_from(words + HOSTILE))
        elif kind == "delete":
            del toks[i]
        elif kind == "duplicate":
            toks.insert(i, toks[i])
        else:
            j = draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
        if not toks:
            toks = [""]
    return "".join(toks)


def check_mutant(text: str):
    start = time.monotonic()
    try:
        p = parse_program(text, FILE)
    except BwskError as exc:  # IRSyntaxError and VerifyError are BwskErrors
        assert POSITION.match(str(exc)), f"error without a position: {exc}"
        assert "\n" not in str(exc), f"error of several lines: {exc!r}"
    else:
        printed = p.text()
        q = parse_program(printed, FILE)
        assert q == p, "the accepted mutant does not round-trip"
        assert q.text() == printed, "printing is not stable"
    elapsed = time.monotonic() - start
    assert elapsed < SECONDS_PER_MUTANT, f"took {elapsed:.1f} s"


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_mutant_parses_and_round_trips_or_is_refused_with_a_position(seed_text, data):
    check_mutant(data.draw(mutants(seed_text)))


def test_the_seed_itself_parses_and_round_trips(seed_text):
    """The fuzz test would be vacuous if the seed were refused: it parses, and has what mutants
    need to reach every check (constants, a multi-result op, a tuple, getitem)."""
    p = parse_program(seed_text, FILE)
    assert p.consts and "getitem(" in seed_text and "tuple(" in seed_text
    assert "_native_batch_norm_legit_no_training" in seed_text and "aten.max.dim" in seed_text
    check_mutant(seed_text)


@pytest.mark.parametrize("old,new,message", [
    ("aten.max.dim(_, -1) : (f32[2,3], i64[2,3])", "aten.max.dim(_, -1) : (f32[2,3], f32[2,3])",
     "aten.max.dim: declared (f32[2,3], f32[2,3])"),
    ("aten.max.dim(_, -1) : (f32[2,3], i64[2,3])", "aten.max.dim(_, -1) : (f32[2,3], i64[2,3], i64[2])",
     "aten.max.dim: declared"),
    ("aten.tril.default(%0) : bool[3,3]", "aten.tril.default(%0) : bool[3,4]",
     "constant %1: aten.tril.default: declared bool[3,4]"),
    ("aten.ones.default([3, 3], ", "aten.ones.default([3, 3, 2], ", "constant %0: aten.ones.default"),
    ("aten.tril.default(%0)", "aten.tril.default(%0, 1, 2, 3)", "constant %1: aten.tril.default"),
])
def test_mutants_the_old_verifier_accepted_are_refused(seed_text, old, new, message):
    """Constants' types and arguments, and multi-result ops, are checked (they used to be skipped)."""
    assert old in seed_text
    with pytest.raises(bwskc.VerifyError, match=re.escape(message)) as info:
        parse_program(seed_text.replace(old, new, 1), FILE)
    assert POSITION.match(str(info.value))
