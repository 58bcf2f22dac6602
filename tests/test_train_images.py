"""The image-classification data layer: loading folders and the digits default, augmentation, model stats."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bwskc.errors import BwskError
from bwskc.train import images as img
from bwskc.train.images import augment, center, image_size_of, image_stats, load_images, normalise

DIGITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "digits"
needs_digits = pytest.mark.skipif(not DIGITS.is_dir(), reason=f"{DIGITS} is absent (../shared is not on this machine)")
SIZE = 16  # stored at round(16 * 8 / 7) = 18


@pytest.fixture(scope="module")
def folder():
    if not DIGITS.is_dir():
        pytest.skip(f"{DIGITS} is absent (../shared is not on this machine)")
    return load_images(str(DIGITS), image_size=SIZE, channels=1)


@pytest.fixture(scope="module")
def sk_digits():
    return load_images("digits", image_size=SIZE, channels=1)


def _tree(root: Path, per_class: dict[str, int]) -> Path:
    """A class-folder tree built from real digit PNGs (the shared folder's train split)."""
    sources = sorted((DIGITS / "train" / "0").glob("*.png"))
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            shutil.copy(sources[i % len(sources)], root / cls / f"{i:03d}.png")
    return root


def _refused(spec, *needles, **kw):
    with pytest.raises(BwskError) as info:
        load_images(str(spec), image_size=kw.pop("image_size", SIZE), channels=kw.pop("channels", 1))
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message
    return message


# ------------------------------------------------------------------------------------------ loading

@needs_digits
def test_shared_folder_splits(folder):
    assert [len(folder.train[1]), len(folder.valid[1]), len(folder.test[1])] == [1437, 180, 180]
    assert folder.classes == [str(d) for d in range(10)]
    assert folder.stored_size == 18
    for images, labels in (folder.train, folder.valid, folder.test):
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape[1:] == (1, 18, 18) and images.shape[0] == labels.shape[0]
        assert set(labels.tolist()) == set(range(10))  # every class in every split
    assert "train/valid/test" in folder.note and str(DIGITS) in folder.source
    assert folder.train[0].float().std() > 10  # real strokes, not blank images


@needs_digits
def test_grey_repeated_to_rgb(folder):
    rgb = load_images(str(DIGITS / "valid"), image_size=SIZE, channels=3)  # one-folder layout, 3 channels
    assert rgb.train[0].shape[1] == 3
    assert torch.equal(rgb.train[0][:, 0], rgb.train[0][:, 1]) and torch.equal(rgb.train[0][:, 0], rgb.train[0][:, 2])


def test_sklearn_default(sk_digits):
    total = sum(len(split[1]) for split in (sk_digits.train, sk_digits.valid, sk_digits.test))
    assert total == 1797 and [len(sk_digits.valid[1]), len(sk_digits.test[1])] == [180, 180]
    assert sk_digits.classes == [str(d) for d in range(10)] and "load_digits" in sk_digits.source
    assert sk_digits.train[0].shape[1:] == (1, 18, 18)


@needs_digits
def test_sklearn_default_is_the_shared_folder(folder, sk_digits):
    for a, b in ((folder.train, sk_digits.train), (folder.valid, sk_digits.valid), (folder.test, sk_digits.test)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_digits
def test_one_folder_split_is_deterministic(tmp_path):
    root = _tree(tmp_path / "set", {"cat": 10, "dog": 20, "owl": 2})
    (root / "cat" / ".DS_Store").write_bytes(b"\0junk")  # hidden files are skipped
    first = load_images(str(root), image_size=8, channels=1)
    second = load_images(str(root), image_size=8, channels=1)
    assert first.classes == ["cat", "dog", "owl"]
    for a, b in ((first.train, second.train), (first.valid, second.valid), (first.test, second.test)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    counts = {s: torch.bincount(p[1], minlength=3).tolist() for s, p in
              (("train", first.train), ("valid", first.valid), ("test", first.test))}
    assert counts == {"train": [8, 16, 2], "valid": [1, 2, 0], "test": [1, 2, 0]}
    assert "80/10/10" in first.note and "seeded permutation per class" in first.note
    # a class's split depends on its own files only: removing another class leaves it as it was
    shutil.rmtree(root / "owl")
    third = load_images(str(root), image_size=8, channels=1)
    assert torch.equal(third.valid[0], first.valid[0]) and torch.equal(third.test[0], first.test[0])


@needs_digits
def test_numeric_classes_sort_as_numbers_and_missing_splits_are_carved(tmp_path):
    root = tmp_path / "set"
    _tree(root / "train", {"2": 10, "10": 10})
    _tree(root / "val", {"10": 1})
    got = load_images(str(root), image_size=8, channels=1)
    assert got.classes == ["2", "10"]
    assert got.valid[1].tolist() == [1] and len(got.test[1]) == 2 and len(got.train[1]) == 18
    assert "test carved from train" in got.note


def test_hub_refuses_when_unreachable(monkeypatch):
    monkeypatch.setattr(img._data, "hub_reachable", lambda: False)
    _refused("cifar10", "cifar10", "the hub is not reachable from here")


# ------------------------------------------------------------------------------------------ bad input

@needs_digits
def test_bad_inputs(tmp_path):
    png = sorted((DIGITS / "train" / "3").glob("*.png"))[0]

    one = _tree(tmp_path / "one", {"a": 5})
    _refused(one, one, "at least two")

    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(empty, empty)
    _refused(tmp_path / "nowhere", tmp_path / "nowhere", "no such directory")

    text = tmp_path / "notes.txt"
    text.write_text("not images\n")
    _refused(text, text, "is a file")

    corrupt = _tree(tmp_path / "corrupt", {"a": 3, "b": 3})
    (corrupt / "b" / "bad.png").write_bytes(png.read_bytes()[:40])  # truncated PNG
    _refused(corrupt, corrupt / "b" / "bad.png", "cannot decode")

    textpng = _tree(tmp_path / "textpng", {"a": 3, "b": 3})
    (textpng / "a" / "x.png").write_text("hello, I am text\n")
    _refused(textpng, textpng / "a" / "x.png", "cannot decode")

    stray = _tree(tmp_path / "stray", {"a": 3, "b": 3})
    (stray / "a" / "labels.csv").write_text("a,b\n")
    _refused(stray, stray / "a" / "labels.csv", "not an image")

    hollow = _tree(tmp_path / "hollow", {"a": 3, "b": 3})
    (hollow / "c").mkdir()
    _refused(hollow, hollow / "c", "without images")

    nosplit = tmp_path / "nosplit"
    _tree(nosplit / "train", {"a": 3, "b": 3})
    (nosplit / "valid").mkdir()
    _refused(nosplit, nosplit / "valid", "no class folders")

    stranger = tmp_path / "stranger"
    _tree(stranger / "train", {"a": 3, "b": 3})
    _tree(stranger / "test", {"a": 1, "z": 1})
    _refused(stranger, stranger / "test" / "z", "not in")

    tiny = _tree(tmp_path / "tiny", {"a": 2, "b": 1})
    _refused(tiny, tiny, "too few")


@needs_digits
def test_memory_bound_refuses_before_decoding(monkeypatch, tmp_path):
    root = _tree(tmp_path / "set", {"a": 3, "b": 3})
    (root / "a" / "broken.png").write_bytes(b"garbage")  # would fail if anything were decoded
    monkeypatch.setattr(img, "MAX_STORED_BYTES", 1000)
    message = _refused(root, root, "7 images", str(7 * 18 * 18), "1000 bytes")
    assert "cannot decode" not in message
    _refused("digits", "1797 images", str(1797 * 18 * 18))


# ------------------------------------------------------------------------------------------ augmentation

def _batch(b=64, c=3, s=20, seed=0):
    return torch.randint(0, 256, (b, c, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_augment_deterministic_and_differs_across_steps():
    x = _batch()
    a = augment(x, image_size=16, seed=7, step=3)
    assert a.dtype == torch.float32 and a.shape == (64, 3, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, augment(x, image_size=16, seed=7, step=3))
    assert not torch.equal(a, augment(x, image_size=16, seed=7, step=4))
    assert not torch.equal(a, augment(x, image_size=16, seed=8, step=3))
    plain = augment(x, image_size=16, seed=7, step=3, crop=False, flip=False)
    assert torch.equal(plain, center(x, 16))


def test_augment_draws_every_offset_and_both_flips():
    """One-pixel-wide rows whose value is the column index reveal each row's x offset and flip."""
    s, size = 12, 8
    ramp = torch.arange(s, dtype=torch.uint8).view(1, 1, 1, s).expand(512, 1, 1, s)
    ramp = ramp.expand(512, 1, s, s).contiguous()
    out = (augment(ramp, image_size=size, seed=1, step=0) * 255).round().long()[:, 0, 0]
    first, last = out[:, 0], out[:, -1]
    flipped = first > last
    starts = torch.where(flipped, last, first)
    assert 100 < int(flipped.sum()) < 412
    assert set(starts.tolist()) == set(range(s - size + 1))


@settings(max_examples=60, deadline=None)
@given(b=st.integers(1, 6), c=st.sampled_from([1, 3]), size=st.integers(1, 6), room=st.integers(0, 4),
       seed=st.integers(-2**40, 2**40), step=st.integers(0, 10**6), offset=st.integers(0, 10**4),
       cut=st.data())
def test_augment_row_slices_match(b, c, size, room, seed, step, offset, cut):
    """A rank taking rows lo..hi of the global batch (row_offset = offset + lo) draws what one process does."""
    x = _batch(b, c, size + room, seed=b * 31 + size)
    lo = cut.draw(st.integers(0, b - 1))
    hi = cut.draw(st.integers(lo + 1, b))
    whole = augment(x, image_size=size, seed=seed, step=step, row_offset=offset)
    part = augment(x[lo:hi], image_size=size, seed=seed, step=step, row_offset=offset + lo)
    assert torch.equal(whole[lo:hi], part)


def test_center_and_normalise():
    x = _batch(2, 3, 18)
    c = center(x, 16)
    assert torch.equal(c, x[:, :, 1:17, 1:17].float() / 255)
    mean, std = [0.5, 0.25, 0.0], [0.5, 0.25, 1.0]
    n = normalise(c, mean, std)
    assert torch.allclose(n[:, 0], (c[:, 0] - 0.5) / 0.5) and torch.allclose(n[:, 2], c[:, 2])
    assert torch.allclose(normalise(x, mean, std), normalise(x.float() / 255, mean, std))
    with pytest.raises(BwskError):
        augment(x, image_size=19, seed=0, step=0)


# ------------------------------------------------------------------------------------------ model side

def test_image_stats(tmp_path):
    from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    rgb, grey = SimpleNamespace(num_channels=3), SimpleNamespace(num_channels=1)
    assert image_stats(None, rgb) == (list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))
    mean, std = image_stats(None, grey)
    assert mean == pytest.approx([sum(IMAGENET_DEFAULT_MEAN) / 3]) and std == pytest.approx([sum(IMAGENET_DEFAULT_STD) / 3])
    assert image_stats(tmp_path, rgb)[0] == list(IMAGENET_DEFAULT_MEAN)  # a folder without preprocessor config
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5],
                                                                   "image_std": [0.2, 0.3, 0.4]}))
    assert image_stats(tmp_path, rgb) == ([0.5, 0.5, 0.5], [0.2, 0.3, 0.4])
    assert image_stats(tmp_path, grey) == ([0.5], [pytest.approx(0.3)])
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(BwskError, match="preprocessor_config.json"):
        image_stats(tmp_path, rgb)


def test_image_size_of():
    assert image_size_of(SimpleNamespace(image_size=32)) == 32
    assert image_size_of(SimpleNamespace(image_size=[28, 28])) == 28
    assert image_size_of(SimpleNamespace()) == 224  # ResNet configs have no image_size
    with pytest.raises(BwskError, match="square") as info:
        image_size_of(SimpleNamespace(image_size=[32, 48]))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family", ["ViT", "DeiT"])
def test_finetune_at_another_image_size_resamples_the_position_embeddings(tmp_path, family):
    """A pretrained ViT (class token) or DeiT (class and distillation tokens) at 16 px fine-tuned at
    --image-size 8 and 24: its table is resampled once by the model's own bicubic interpolation, so the
    rebuilt model at the new size computes what the original computes with interpolate_pos_encoding."""
    import transformers

    from bwskc.train.models import build_model, resolve_model
    config = getattr(transformers, f"{family}Config")(image_size=16, patch_size=4, hidden_size=32,
                                                      num_hidden_layers=1, num_attention_heads=2,
                                                      intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    original = getattr(transformers, f"{family}ForImageClassification")(config).eval()
    with torch.no_grad():  # DeiT initialises its table to zeros, which any resampling keeps
        for name, p in original.named_parameters():
            if name.endswith("position_embeddings"):
                p.normal_()
    original.save_pretrained(tmp_path / "model")
    for size in (8, 24):
        model = build_model(resolve_model(str(tmp_path / "model")), pretrained=True, seed=0, task="image",
                            classes=["a", "b", "c"], image_size=size).eval()
        assert model.config.image_size == size
        pixels = torch.randn(2, 3, size, size)
        with torch.no_grad():
            want = original(pixel_values=pixels, interpolate_pos_encoding=True).logits
            got = model(pixel_values=pixels).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        extra = 1 if family == "ViT" else 2
        table = [p for n, p in model.named_parameters() if n.endswith("position_embeddings")]
        assert [tuple(t.shape) for t in table] == [(1, extra + (size // 4) ** 2, 32)]
    same = build_model(resolve_model(str(tmp_path / "model")), pretrained=True, seed=0, task="image",
                       classes=["a", "b", "c"], image_size=16)
    assert torch.equal(same.state_dict()[next(n for n in same.state_dict() if n.endswith("position_embeddings"))],
                       original.state_dict()[next(n for n in original.state_dict()
                                                  if n.endswith("position_embeddings"))])


def test_a_position_table_that_cannot_be_resampled_is_refused_in_one_line():
    from bwskc.train.models import resample_position_embeddings

    class Fixed(torch.nn.Module):  # sized by image_size, with no interpolate_pos_encoding
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(image_size=16)
            self.position_embeddings = torch.nn.Parameter(torch.zeros(1, 17, 8))
    model = Fixed()
    assert resample_position_embeddings(model, 16, "m") == 0
    model.config.image_size = [16, 16]  # as a JSON config stores it (Hiera): its own size, nothing to do
    assert resample_position_embeddings(model, 16, "m") == 0
    model.config.image_size = 16
    with pytest.raises(BwskError, match=r"^m: Fixed cannot be fine-tuned at --image-size 8: its position "
                                        r"embeddings are sized for 16") as err:
        resample_position_embeddings(model, 8, "m")
    assert "\n" not in str(err.value) and model.config.image_size == 16
