"""bwskc.train.data: text splits, the WikiText-2 CPU-scale convention, tokenizers and token blocks."""
from __future__ import annotations

import functools
import sysconfig
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bwskc.errors import BwskError
from bwskc.train.data import (EOT, STDLIB_MAX_CHARS, TextSplits, hub_reachable, build_tokenizer, load_text,
                              token_blocks)

WIKITEXT2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"
needs_wikitext2 = pytest.mark.skipif(not (WIKITEXT2 / "valid.txt").is_file(),
                                     reason=f"../shared/data is absent ({WIKITEXT2}): a user's machine")

SMALL_CORPUS = [
    "The quick brown fox jumps over the lazy dog.\n",
    "def f(x):\n    return x * 2  # doubled\n",
    "Ünïcödé text, emoji 🎉 and tabs\tand\r\nwindows line ends.\n",
    " = Heading = \n\n Some article text with numbers 1 , 234 and <unk> tokens .\n",
] * 8


def _splits(docs: list[str]) -> TextSplits:
    return TextSplits(train=docs, valid=docs[:1], test=docs[:1], source="test corpus", note="")


@functools.lru_cache(maxsize=None)
def _byte_tokenizer():
    return build_tokenizer(_splits(SMALL_CORPUS), model_dir=None, vocab_size=300)


@functools.lru_cache(maxsize=None)
def _char_tokenizer():
    return build_tokenizer(_splits(SMALL_CORPUS), model_dir=None, vocab_size=40)


def _is_article_heading(line: str) -> bool:
    return line.startswith(" = ") and not line.startswith(" = = ")


# ------------------------------------------------------------------------------ WikiText-2 convention

@needs_wikitext2
def test_wikitext2_convention_trains_on_valid_and_halves_test_by_article():
    splits = load_text(str(WIKITEXT2))
    valid_text = (WIKITEXT2 / "valid.txt").read_text(encoding="utf-8")
    test_text = (WIKITEXT2 / "test.txt").read_text(encoding="utf-8")
    assert "".join(splits.train) == valid_text  # train is exactly valid.txt
    assert "".join(splits.valid) + "".join(splits.test) == test_text  # test.txt, cut once, nothing lost
    headings = [line for line in test_text.splitlines(keepends=True) if _is_article_heading(line)]
    assert len(splits.valid) == len(headings) // 2 and len(splits.test) == len(headings) - len(headings) // 2
    for doc in splits.valid + splits.test:  # one article per document: none is split across valid/test
        assert sum(_is_article_heading(line) for line in doc.splitlines(keepends=True)) == 1
    for i, doc in enumerate(splits.valid[1:] + splits.test, start=1):  # each begins at its heading
        assert doc.startswith(headings[i])
    assert splits.test[0].startswith(headings[len(headings) // 2])  # the first test article follows the last valid one
    assert "valid.txt" in splits.note and "not the standard" in splits.note and "article" in splits.note
    assert "\n" not in splits.note and "\n" not in splits.source and str(WIKITEXT2) in splits.source


@needs_wikitext2
def test_wikitext2_cap_and_blocks():
    splits = load_text(str(WIKITEXT2), max_chars=200_000)
    assert sum(len(d) for docs in (splits.train, splits.valid, splits.test) for d in docs) <= 200_000
    assert splits.note and "capped" in splits.source
    tok = build_tokenizer(splits, model_dir=None, vocab_size=512)
    blocks = token_blocks(tok, splits.train, 64)
    assert blocks.dtype == torch.long and blocks.shape[1] == 64 and int(blocks.max()) < 512


# -------------------------------------------------------------------------------------- stdlib

def test_stdlib_default_is_deterministic_capped_and_disjoint():
    first, second = load_text(), load_text("stdlib")
    assert first == second
    assert first.train and first.valid and first.test
    assert all(d.strip() for d in first.train + first.valid + first.test)
    assert sum(map(len, first.train + first.valid + first.test)) <= STDLIB_MAX_CHARS
    assert len(first.train) > 5 * len(first.valid)
    assert "standard library" in first.source and "capped" in first.source and first.note
    # A file's text sits in one split only (texts shared by several stdlib files, e.g. a one-line
    # __init__.py, are the exception, so they are left out of the check).
    root = Path(sysconfig.get_paths()["stdlib"])
    counts = Counter()
    for path in root.rglob("*.py"):
        try:
            counts[path.read_text(encoding="utf-8")] += 1
        except (OSError, UnicodeDecodeError):
            pass
    sets = [{d for d in split if counts[d] == 1} for split in (first.train, first.valid, first.test)]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def test_stdlib_max_chars():
    small = load_text(max_chars=300_000)
    assert sum(map(len, small.train + small.valid + small.test)) <= 300_000
    assert small.train and small.valid


# ----------------------------------------------------------------------------- files and directories

def test_directory_with_train_valid_test(tmp_path):
    (tmp_path / "train.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n\nthird\n")
    (tmp_path / "validation.txt").write_text("valid one\n\nvalid two\n")
    (tmp_path / "test.txt").write_text("test only\n")
    splits = load_text(str(tmp_path))
    assert splits.train == ["first paragraph\nstill first\n\n", "second paragraph\n\n", "third\n"]
    assert splits.valid == ["valid one\n\n", "valid two\n"]
    assert splits.test == ["test only\n"]
    assert splits.note == "" and str(tmp_path) in splits.source


def test_directory_with_wiki_tokens_names_and_no_test(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text(" = A = \n text a \n = B = \n text b \n")
    (tmp_path / "wiki.valid.tokens").write_text(" = C = \n text c \n")
    splits = load_text(str(tmp_path))
    assert splits.train == [" = A = \n text a \n", " = B = \n text b \n"]  # articles
    assert splits.valid == [" = C = \n text c \n"] and splits.test == []


def test_directory_without_train_applies_the_convention(tmp_path):
    (tmp_path / "valid.txt").write_text("train para\n\nmore\n")
    (tmp_path / "test.txt").write_text("p1\n\np2\n\np3\n\np4\n\np5\n")
    splits = load_text(str(tmp_path))
    assert "".join(splits.train) == "train para\n\nmore\n"
    assert splits.valid == ["p1\n\n", "p2\n\n"] and splits.test == ["p3\n\n", "p4\n\n", "p5\n"]
    assert "not the standard" in splits.note and "valid.txt" in splits.note


def test_single_file_split_90_5_5_in_order(tmp_path):
    paragraphs = [f"paragraph {i} " + "word " * (i % 7 + 1) + "\n\n" for i in range(100)]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(paragraphs))
    splits = load_text(str(path))
    assert splits.train + splits.valid + splits.test == paragraphs
    total = sum(map(len, paragraphs))
    assert 0.85 * total <= sum(map(len, splits.train)) <= 0.92 * total
    assert splits.valid and splits.test and "90/5/5" in splits.note


def test_single_file_of_lines(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("".join(f"line {i}\n" for i in range(40)))
    splits = load_text(str(path))
    assert len(splits.train) + len(splits.valid) + len(splits.test) == 40 and splits.valid and splits.test


# ---------------------------------------------------------------------------------------- errors

def _raises_naming(spec, fragment, **kwargs) -> str:
    with pytest.raises(BwskError) as info:
        load_text(spec, **kwargs)
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    return message


def test_missing_path(tmp_path):
    _raises_naming(str(tmp_path / "nope"), str(tmp_path / "nope"))
    _raises_naming("missing.txt", "missing.txt")


def test_empty_corpus(tmp_path):
    (tmp_path / "train.txt").write_text("  \n\n\t\n")
    (tmp_path / "valid.txt").write_text("some text\n")
    assert "train" in _raises_naming(str(tmp_path), str(tmp_path))
    (tmp_path / "train.txt").write_text("some text\n")
    (tmp_path / "valid.txt").write_text("")
    assert "valid" in _raises_naming(str(tmp_path), str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    _raises_naming(str(empty), str(empty))


def test_directory_without_split_files(tmp_path):
    (tmp_path / "README").write_text("nothing here\n")
    _raises_naming(str(tmp_path), str(tmp_path))


def test_binary_and_non_utf8_files(tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    _raises_naming(str(binary), str(binary))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    _raises_naming(str(latin1), str(latin1))
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("ok\n")
    (data / "valid.txt").write_bytes(b"\x00\x01binary")
    _raises_naming(str(data), str(data / "valid.txt"))


def test_bad_max_chars():
    with pytest.raises(BwskError):
        load_text(max_chars=0)


def test_hub_id_offline_fails_fast(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for spec in ("wikitext", "wikitext-2-raw-v1", "someone/some-dataset"):
        start = time.monotonic()
        message = _raises_naming(spec, f"'{spec}'")
        assert time.monotonic() - start < 10
        assert "not reachable" in message and "../shared/data/wikitext-2" in message


def test_hub_id_without_network_fails_fast():
    if hub_reachable():
        pytest.skip("the hub is reachable here: the offline failure cannot be observed")
    start = time.monotonic()
    _raises_naming("wikitext", "not reachable (no network/hub)")
    assert time.monotonic() - start < 10


# -------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_is_deterministic_byte_for_byte(tmp_path):
    corpus = load_text(max_chars=200_000)
    build_tokenizer(corpus, model_dir=None, vocab_size=600, save_to=tmp_path / "a")
    build_tokenizer(corpus, model_dir=None, vocab_size=600, save_to=tmp_path / "b")
    a, b = (tmp_path / "a" / "tokenizer.json").read_bytes(), (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert a == b


def test_vocab_sizes_and_special_token():
    for vocab in (300, 257):
        tok = build_tokenizer(_splits(SMALL_CORPUS), model_dir=None, vocab_size=vocab)
        assert max(tok.get_vocab().values()) < vocab and tok.eos_token == EOT
    tok = build_tokenizer(_splits(SMALL_CORPUS), model_dir=None, vocab_size=256)  # character level
    assert max(tok.get_vocab().values()) < 256 and tok.eos_token == EOT and tok.unk_token is not None
    with pytest.raises(BwskError):
        build_tokenizer(_splits(SMALL_CORPUS), model_dir=None, vocab_size=2)


def test_model_dir_tokenizer_is_used(tmp_path):
    trained = build_tokenizer(_splits(SMALL_CORPUS), model_dir=None, vocab_size=300, save_to=tmp_path)
    loaded = build_tokenizer(_splits(["unrelated text"] * 3), model_dir=tmp_path, vocab_size=300)
    assert loaded.get_vocab() == trained.get_vocab()
    with pytest.raises(BwskError, match=str(tmp_path)):
        build_tokenizer(_splits(SMALL_CORPUS), model_dir=tmp_path, vocab_size=100)
    # a model directory without tokenizer files: train one
    (tmp_path / "empty_model").mkdir()
    fresh = build_tokenizer(_splits(SMALL_CORPUS), model_dir=tmp_path / "empty_model", vocab_size=280)
    assert max(fresh.get_vocab().values()) < 280


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_byte_level_round_trip(text):
    tok = _byte_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert all(0 <= i < 300 for i in ids)
    assert tok.decode(ids) == text


def test_char_level_round_trip_of_known_characters():
    tok = _char_tokenizer()
    text = "the fox\n"  # frequent characters of SMALL_CORPUS
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert all(i < 40 for i in tok.encode("🎉 unseen ☃", add_special_tokens=False))


# ---------------------------------------------------------------------------------------- blocks

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=st.lists(st.text(max_size=80), max_size=6), seq_len=st.integers(1, 24), char_level=st.booleans())
def test_token_blocks(docs, seq_len, char_level):
    tok = _char_tokenizer() if char_level else _byte_tokenizer()
    vocab = 40 if char_level else 300
    stream: list[int] = []
    for doc in docs:
        ids = tok.encode(doc, add_special_tokens=False) if doc else []
        if ids:
            stream += ([tok.eos_token_id] if stream else []) + ids
    if len(stream) < seq_len:
        with pytest.raises(BwskError, match=f"seq_len={seq_len}"):
            token_blocks(tok, docs, seq_len)
        return
    blocks = token_blocks(tok, docs, seq_len)
    n = len(stream) // seq_len
    assert blocks.dtype == torch.long and tuple(blocks.shape) == (n, seq_len)
    assert int(blocks.min()) >= 0 and int(blocks.max()) < vocab
    assert blocks.flatten().tolist() == stream[: n * seq_len]


def test_token_blocks_bad_seq_len():
    with pytest.raises(BwskError):
        token_blocks(_byte_tokenizer(), ["some text"], 0)
