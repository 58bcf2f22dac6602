"""Text for ``bwskc train``: the splits, the tokenizer and the token blocks.

``load_text(spec)`` reads a corpus into train / valid / test lists of documents:

- ``None`` or ``"stdlib"`` (a local directory of that name is ``./stdlib``): the offline default, the Python standard library's own ``.py`` sources (every
  machine with Python has them). Tests, ``idlelib``, ``lib2to3``, ``turtledemo``, ``ensurepip``, the codec
  tables of ``encodings``, ``pydoc_data`` and the machine-specific ``_sysconfigdata*`` are left out. Each file
  is one document; a stable hash of its path relative to the stdlib decides its split (90/5/5 of the hash
  range, not 90/5/5 of the text: files differ in size; ``note`` gives the measured shares) and its
  place in the order, so neither depends on the machine's directory order. By default the text is capped at
  ``STDLIB_MAX_CHARS`` characters so that a CPU run stays fast.
- a text file: documents are its articles (WikiText headings, below), else its blank-line separated
  paragraphs, else (a file without blank lines) its lines; split 90/5/5 by characters in file order
  (contiguous, so neighbouring paragraphs do not leak between splits).
- a directory with ``train`` / ``valid`` (``validation``, ``val``, ``dev``) / ``test`` files (``NAME.txt``,
  ``NAME.raw``, ``NAME.tokens``, ``wiki.NAME.tokens``, ``wiki.NAME.raw``). Documents as for a single file.
  With valid and test but no train file (``../shared/data/wikitext-2``) the project's CPU-scale convention
  applies: train on the valid file; split the test file by article (a line starting `` = `` and not
  `` = = `` begins one), first half of the articles validation, second half test; ``note`` says so.
- a hub id (``wikitext``, ``wikitext-2-raw-v1``, ``owner/name[:config]``): ``datasets.load_dataset``; when
  the hub is unreachable this fails within seconds with one line asking for a local path.

Documents are exact substrings of the files (line breaks kept), so a split's documents concatenated give
back the file's text. ``max_chars`` caps the total size: each split keeps its leading documents (the last
one cut) up to its share of ``max_chars``, in proportion to its size.

``build_tokenizer`` returns the model's own tokenizer when its directory holds one, else trains one on the
train split: a byte-level BPE (``<|endoftext|>`` + 256 bytes + merges) when ``vocab_size >= 257``, else a
character-level tokenizer over the train split's ``vocab_size - 2`` most frequent characters plus
``<|endoftext|>`` and ``<unk>`` (byte-level needs 257 ids; a smaller model still trains on real text, with
rare characters mapped to ``<unk>``). ``token_blocks`` tokenizes the documents, joins them with the
end-of-text token and cuts the stream into ``[n_blocks, seq_len]``.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import sys
import sysconfig
import tempfile
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from bwskc.errors import BwskError

__all__ = ["TextSplits", "load_text", "build_tokenizer", "token_blocks", "STDLIB_MAX_CHARS", "EOT"]

STDLIB_MAX_CHARS = 4_000_000
EOT = "<|endoftext|>"
UNK = "<unk>"
MASK = "[MASK]"
LOCAL_EXAMPLE = "../shared/data/wikitext-2"
HUB_PROBE_TIMEOUT_S = 3.0

_STDLIB_SKIP_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip",
    "encodings", "pydoc_data", "__pycache__", "lib-dynload", "__phello__",
})
_SPLIT_STEMS = {
    "train": ("train",),
    "valid": ("valid", "validation", "val", "dev"),
    "test": ("test",),
}
_FILE_PATTERNS = ("{}.txt", "{}.raw", "{}.tokens", "wiki.{}.tokens", "wiki.{}.raw")
_WIKITEXT_CONFIGS = {
    "wikitext": "wikitext-2-raw-v1", "wikitext-2": "wikitext-2-raw-v1", "wikitext2": "wikitext-2-raw-v1",
    "wikitext-2-raw-v1": "wikitext-2-raw-v1", "wikitext-2-v1": "wikitext-2-v1",
    "wikitext-103": "wikitext-103-raw-v1", "wikitext-103-raw-v1": "wikitext-103-raw-v1",
    "wikitext-103-v1": "wikitext-103-v1",
}
_PATH_SUFFIXES = (".txt", ".raw", ".tokens", ".text", ".md", ".py", ".csv", ".json", ".jsonl")


@dataclass(frozen=True)
class TextSplits:
    """Documents (exact substrings of the source, line breaks kept) of the three splits."""

    train: list[str]
    valid: list[str]
    test: list[str]
    source: str  # one line: where the text came from
    note: str    # the split convention when it is not the dataset's standard one, "" otherwise


# --------------------------------------------------------------------------------------------- loading

def load_text(spec: str | os.PathLike | None = None, *, max_chars: int | None = None) -> TextSplits:
    """The train / valid / test documents named by ``spec`` (see the module docstring)."""
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars <= 0):
        raise BwskError(f"max_chars must be a positive number of characters, got {max_chars!r}")
    if spec is None or str(spec) == "stdlib":
        return _load_stdlib(STDLIB_MAX_CHARS if max_chars is None else max_chars)
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        splits = _load_directory(path, text)
    elif path.exists():
        splits = _load_file(path, text)
    elif _looks_like_path(text):
        raise BwskError(f"no such file or directory: {text}")
    else:
        splits = _load_hub(text)
    return _finish(splits, max_chars, text)


def _looks_like_path(text: str) -> bool:
    return (text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1
            or text.lower().endswith(_PATH_SUFFIXES)
            or not re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?", text))


def _finish(splits: TextSplits, max_chars: int | None, where: str) -> TextSplits:
    """Apply the cap, then refuse a split without text."""
    if max_chars is not None:
        splits = _cap(splits, max_chars)
    for name in ("train", "valid"):
        if not any(doc.strip() for doc in getattr(splits, name)):
            raise BwskError(f"empty corpus: the {name} split of {where} has no text (only whitespace)")
    return splits


def _cap(splits: TextSplits, max_chars: int) -> TextSplits:
    sizes = {name: sum(map(len, getattr(splits, name))) for name in ("train", "valid", "test")}
    total = sum(sizes.values())
    if total <= max_chars:
        return splits
    kept = {}
    for name, size in sizes.items():
        budget = max_chars * size // total
        docs = []
        for doc in getattr(splits, name):
            if budget <= 0:
                break
            docs.append(doc[:budget])
            budget -= len(docs[-1])
        kept[name] = docs
    source = f"{splits.source}; capped at {max_chars:,} of {total:,} characters (each split in proportion)"
    return TextSplits(kept["train"], kept["valid"], kept["test"], source, splits.note)


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _load_stdlib(max_chars: int) -> TextSplits:
    # Read directly rather than through ``datasets``: about a thousand small files, each one document whose
    # split comes from its path, which a ``text`` dataset would not keep; plain reads take a fraction of a second.
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise BwskError(f"the Python standard library's sources are not at {root}: give a text file or directory")
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _STDLIB_SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith("_sysconfigdata"):
            continue
        key = rel.as_posix()
        files.append((_stable_hash("order:" + key), key, path))
    files.sort()
    splits: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    n_files = 0
    for _, key, path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # the same files fail on every machine with this Python; nothing to report
        if not text.strip():
            continue
        bucket = _stable_hash("split:" + key) % 100
        splits["train" if bucket < 90 else "valid" if bucket < 95 else "test"].append(text)
        n_files += 1
    version = ".".join(map(str, sys.version_info[:3]))
    source = (f"Python {version} standard library source ({n_files} .py files under {root}, without tests, "
              f"idlelib, lib2to3, encodings, pydoc_data)")
    counts = {k: len(v) for k, v in splits.items()}
    chars = {k: sum(map(len, v)) for k, v in splits.items()}
    total = max(1, sum(chars.values()))
    note = ("Python standard library corpus: each file one document, its split drawn from a hash of its "
            "path (90/5/5 of the hash range; there is no standard split): train/validation/test "
            f"{counts['train']}/{counts['valid']}/{counts['test']} files, "
            + "/".join(f"{100 * chars[k] / total:.1f}%" for k in ("train", "valid", "test"))
            + " of the characters")
    return _finish(TextSplits(splits["train"], splits["valid"], splits["test"], source, note), max_chars, "stdlib")


# ----------------------------------------------------------------------------------- local files

def _check_text_file(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as e:
        raise BwskError(f"cannot read {path}: {e.strerror or e}") from None
    if b"\x00" in head:
        raise BwskError(f"{path} is not a text file (binary data)")


def _read_lines(files: dict[str, Path]) -> dict[str, list[str]]:
    """Each file's lines, line breaks kept (so they join back to the text), through ``datasets``' ``text`` builder.

    The cache goes to a temporary directory (never next to the user's data), the tables stay in memory; for
    WikiText-2's two files this takes about 0.15 s.
    """
    for path in files.values():
        _check_text_file(path)
    import datasets

    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="bwskc-text-") as cache:
            try:
                loaded = datasets.load_dataset(
                    "text", data_files={name: str(p) for name, p in files.items()}, sample_by="line",
                    keep_linebreaks=True, keep_in_memory=True, cache_dir=cache)
            except Exception as e:  # find which file, and say why in one line
                for path in files.values():
                    try:
                        path.read_bytes().decode("utf-8")
                    except UnicodeDecodeError:
                        raise BwskError(f"{path} is not UTF-8 text") from None
                    except OSError as oe:
                        raise BwskError(f"cannot read {path}: {oe.strerror or oe}") from None
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BwskError(f"cannot read {', '.join(map(str, files.values()))}: {first}") from None
            return {name: list(loaded[name]["text"]) if len(loaded[name]) else [] for name in files}
    finally:
        if not bars_were_off:
            datasets.utils.enable_progress_bars()


def _is_article_heading(line: str) -> bool:
    return line.startswith(" = ") and not line.startswith(" = = ")


def _group(lines: list[str], starts: list[int]) -> list[str]:
    starts = [0] + starts[1:]  # text before the first start belongs to the first document
    bounds = starts + [len(lines)]
    return ["".join(lines[a:b]) for a, b in zip(bounds, bounds[1:])]


def _articles(lines: list[str]) -> list[str] | None:
    starts = [i for i, line in enumerate(lines) if _is_article_heading(line)]
    return _group(lines, starts) if starts else None


def _documents(lines: list[str]) -> tuple[list[str], str]:
    """Articles if the text has WikiText headings, else paragraphs, else lines; and the unit's name."""
    articles = _articles(lines)
    if articles is not None:
        return articles, "article"
    if not any(line.strip() for line in lines):
        return ["".join(lines)] if lines else [], "paragraph"
    starts = [i for i, line in enumerate(lines) if line.strip() and (i == 0 or not lines[i - 1].strip())]
    if len(starts) >= 2:
        return _group(lines, starts), "paragraph"
    return _group(lines, [i for i, line in enumerate(lines) if line.strip()]), "line"


def _load_file(path: Path, where: str) -> TextSplits:
    lines = _read_lines({"text": path})["text"]
    docs, unit = _documents(lines)
    if len(docs) < 3 and unit == "paragraph":  # too few paragraphs to split: fall back to lines
        docs, unit = _group(lines, [i for i, line in enumerate(lines) if line.strip()]), "line"
    docs_with_text = sum(1 for d in docs if d.strip())
    if docs_with_text == 0:
        raise BwskError(f"empty corpus: {where} has no text (only whitespace)")
    if len(docs) < 3:
        raise BwskError(f"{where} has {len(docs)} {unit}(s): a single file needs at least 3 to split 90/5/5 "
                        f"(or give a directory with train.txt, valid.txt and test.txt)")
    total = sum(map(len, docs))
    cum, acc = [], 0
    for d in docs:
        acc += len(d)
        cum.append(acc)  # cum[k] = characters in docs[:k+1]
    n = len(docs)
    a = next(k + 1 for k in range(n) if cum[k] >= 0.90 * total)
    a = min(max(a, 1), n - 2)
    b = next((k + 1 for k in range(a, n) if cum[k] >= 0.95 * total), n - 1)
    b = min(max(b, a + 1), n - 1)
    source = f"{where} ({n} {unit}s)"
    note = f"single file split by {unit} in file order: first {a} train, next {b - a} validation, last {n - b} test (90/5/5 by characters)"
    return TextSplits(docs[:a], docs[a:b], docs[b:], source, note)


def _find_split_files(directory: Path) -> dict[str, Path]:
    found = {}
    for split, stems in _SPLIT_STEMS.items():
        for stem in stems:
            for pattern in _FILE_PATTERNS:
                p = directory / pattern.format(stem)
                if p.is_file():
                    found[split] = p
                    break
            if split in found:
                break
    return found


def _load_directory(directory: Path, where: str) -> TextSplits:
    found = _find_split_files(directory)
    if not found:
        raise BwskError(f"no train/valid/test text files in {where} (looked for train.txt, valid.txt, "
                        f"validation.txt, test.txt, the same with .raw and .tokens, and wiki.train.tokens names)")
    if "valid" not in found:
        raise BwskError(f"no validation file in {where} (found {', '.join(p.name for p in found.values())}; "
                        f"looked for valid.txt, validation.txt, val.txt, dev.txt and .raw/.tokens names)")
    if "train" not in found and "test" not in found:
        raise BwskError(f"{where} has {found['valid'].name} but neither a train nor a test file")
    lines = _read_lines(found)
    files = ", ".join(p.name for p in found.values())
    label = "wikitext-2" if "wikitext-2" in directory.resolve().name.lower() else directory.name or where
    if "train" in found:
        docs = {name: _documents(lines[name])[0] if name in lines else [] for name in ("train", "valid", "test")}
        return TextSplits(docs["train"], docs["valid"], docs["test"], f"{label} from {where} ({files})", "")
    # valid and test, no train: the CPU-scale convention of ../shared/data/README.md
    valid_name, test_name = found["valid"].name, found["test"].name
    train_docs, _ = _documents(lines["valid"])
    test_docs, unit = _documents(lines["test"])
    if len(test_docs) < 2:
        raise BwskError(f"{found['test']} has {len(test_docs)} {unit}(s): cannot split it into validation and test halves")
    half = len(test_docs) // 2
    rule = " (a line starting ' = ' and not ' = = ' begins one)" if unit == "article" else ""
    dataset = "WikiText-2" if label == "wikitext-2" else label
    note = (f"{dataset} CPU-scale convention, not the standard protocol: trained on {valid_name}; {test_name} split "
            f"by {unit}{rule}, first {half} of {len(test_docs)} {unit}s validation, last {len(test_docs) - half} test")
    source = f"{label} from {where} ({files}; no train file)"
    return TextSplits(train_docs, test_docs[:half], test_docs[half:], source, note)


# ------------------------------------------------------------------------------------------------ hub

def hub_reachable() -> bool:
    """A TCP connection to the hub's endpoint within HUB_PROBE_TIMEOUT_S (name lookup included)."""
    import datasets.config
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return False
    url = urlparse(constants.ENDPOINT)
    if not url.hostname:
        return False
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=HUB_PROBE_TIMEOUT_S).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 0.5)
    return bool(ok)


@contextmanager
def _hub_offline():
    """Offline mode for ``datasets`` and ``huggingface_hub`` (a cached dataset still loads, nothing retries)."""
    import datasets.config
    from huggingface_hub import constants

    saved = [(mod, name, getattr(mod, name)) for mod, name in
             ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
              (constants, "HF_HUB_OFFLINE")) if hasattr(mod, name)]
    for mod, name, _ in saved:
        setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


def _load_hub(spec: str) -> TextSplits:
    name, _, config = spec.partition(":")
    if name.lower() in _WIKITEXT_CONFIGS:
        name, config = "Salesforce/wikitext", config or _WIKITEXT_CONFIGS[name.lower()]
    import datasets

    unreachable = (f"dataset '{spec}' is not reachable (no network/hub) and is not a local path: "
                   f"give a local path, e.g. {LOCAL_EXAMPLE}")
    online = hub_reachable()
    try:
        if online:
            loaded = datasets.load_dataset(name, config or None)
        else:
            with _hub_offline():
                loaded = datasets.load_dataset(name, config or None)
    except Exception as e:
        if not online:
            raise BwskError(unreachable) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BwskError(f"dataset '{spec}' could not be loaded from the hub: {first}") from None
    splits = {}
    for split, keys in (("train", ("train",)), ("valid", ("validation", "valid", "dev")), ("test", ("test",))):
        key = next((k for k in keys if k in loaded), None)
        if key is None:
            if split == "test":
                splits[split] = []
                continue
            raise BwskError(f"dataset '{spec}' has no {split} split (it has {', '.join(loaded)})")
        table = loaded[key]
        column = "text" if "text" in table.column_names else next(
            (c for c, f in table.features.items() if getattr(f, "dtype", None) in ("string", "large_string")), None)
        if column is None:
            raise BwskError(f"dataset '{spec}' has no text column (columns: {', '.join(table.column_names)})")
        rows = [r if r.endswith("\n") else r + "\n" for r in table[column]] if "wikitext" in name.lower() else None
        if rows is not None:
            splits[split] = _articles(rows) or ["".join(rows)]
        else:
            splits[split] = [r for r in table[column] if r and r.strip()]
    source = f"{name}" + (f" ({config})" if config else "") + " from the Hugging Face hub"
    return TextSplits(splits["train"], splits["valid"], splits["test"], source, "")


# ------------------------------------------------------------------------------------------ tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model",
                    "tokenizer.model", "sentencepiece.bpe.model")


def build_tokenizer(splits: TextSplits, *, model_dir: str | Path | None, vocab_size: int,
                    save_to: str | Path | None = None, mask: bool = False):
    """The model's tokenizer if ``model_dir`` holds one, else one trained on ``splits.train`` (every id < vocab_size).
    ``mask``: the tokenizer must have a mask token (a masked LM): a trained one gets ``[MASK]`` (id 1)."""
    import transformers

    if not isinstance(vocab_size, int) or vocab_size < 4:
        raise BwskError(f"vocab_size must be at least 4 to train a tokenizer, got {vocab_size!r}")
    model_dir = Path(model_dir) if model_dir is not None else None
    if model_dir is not None and model_dir.is_dir() and any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BwskError(f"the tokenizer in {model_dir} could not be loaded: {first}") from None
        top = max(tokenizer.get_vocab().values(), default=-1)
        if mask and tokenizer.mask_token_id is None:
            raise BwskError(f"the tokenizer in {model_dir} has no mask token, which a masked LM needs")
        if top >= vocab_size:
            raise BwskError(f"the tokenizer in {model_dir} has ids up to {top} but the model's vocabulary has "
                            f"{vocab_size} entries")
    else:
        special = [MASK] if mask else []
        backend = (_train_byte_bpe(splits.train, vocab_size, special) if vocab_size >= 257 + len(special)
                   else _train_chars(splits.train, vocab_size, special))
        kwargs = dict(eos_token=EOT, bos_token=EOT) if vocab_size >= 257 + len(special) else dict(
            eos_token=EOT, bos_token=EOT, unk_token=UNK)
        if mask:
            kwargs["mask_token"] = MASK
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, clean_up_tokenization_spaces=False, **kwargs)
        top = max(tokenizer.get_vocab().values())
        assert top < vocab_size, (top, vocab_size)
    if save_to is not None:
        tokenizer.save_pretrained(str(save_to))
    return tokenizer


def _train_byte_bpe(texts: list[str], vocab_size: int, special: list[str] = ()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT, *special],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    assert backend.get_vocab_size() <= vocab_size, (backend.get_vocab_size(), vocab_size)
    return backend


def _train_chars(texts: list[str], vocab_size: int, special: list[str] = ()):
    """Characters by frequency in the train split (ties by code point); ids 0 and 1 are EOT and UNK,
    the ``special`` tokens (``[MASK]``) follow."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    counts.pop(EOT, None)
    for token in special:
        counts.pop(token, None)
    fixed = [EOT, UNK, *special]
    chars = sorted(counts, key=lambda c: (-counts[c], c))[: vocab_size - len(fixed)]
    vocab = {**{t: i for i, t in enumerate(fixed)}, **{c: i + len(fixed) for i, c in enumerate(sorted(chars))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(fixed)
    return backend


# ------------------------------------------------------------------------------------------- blocks

def token_blocks(tokenizer, texts: list[str], seq_len: int, *, what: str = "the text") -> torch.LongTensor:
    """The documents tokenized, joined by the end-of-text token, cut into ``[n_blocks, seq_len]`` (tail dropped).

    The separator is the tokenizer's eos token, else its sep token, else none. ``what`` names the split in
    the error raised when the text makes no full block.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise BwskError(f"seq_len must be a positive integer, got {seq_len!r}")
    texts = [t for t in texts if t]
    encoded = tokenizer(texts, add_special_tokens=False, truncation=False, padding=False,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"] if texts else []
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    stream: list[int] = []
    for ids in encoded:
        if not ids:
            continue
        if stream and sep is not None:
            stream.append(sep)
        stream.extend(ids)
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise BwskError(f"{what} is too small for seq_len={seq_len}: it makes {len(stream)} tokens, "
                        f"not one full block (use more text or a smaller seq_len)")
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
