"""Images for ``bwskc train`` on an image classifier: the splits, the stored tensors, augmentation.

``load_images(spec, image_size=, channels=)`` reads a labelled image set into train / valid / test pairs
``(images uint8 [N, C, S, S], labels int64 [N])``, where the stored size ``S = round(image_size * 8 / 7)``
leaves room for a random crop of ``image_size`` (224 is stored at 256, as is usual for ImageNet):

- ``"digits"``: the offline default, scikit-learn's ``load_digits`` (the 1,797 8x8 UCI handwritten digits
  shipped inside the scikit-learn wheel). Pixels 0..16 become ``floor(v * 255 / 16)`` and the split is the
  one of ``../shared/data/digits`` (``numpy.random.default_rng(20261201).permutation(1797)``: 1,437 train,
  180 valid, 180 test), so ``"digits"`` and that folder give the same tensors. A local directory named
  ``digits`` is ``./digits``.
- a directory ``DIR/{train,valid,test}/CLASS/IMAGE``, the valid split also named ``val`` or ``validation``.
  A missing valid or test split is carved out of train as below (10% of each class).
- a directory of ``CLASS/`` folders alone: split per class by a fixed seeded permutation of the sorted file
  names (``default_rng([20261201, crc32(class name)])``), 80/10/10 with at least one image of the class in
  valid and test when it has 3 or more; a class with fewer stays in train. A class's split depends only on
  its own files, not on the other classes or the machine's directory order.
- a Hugging Face dataset id (``cifar10``, ``owner/name[:config]``): ``datasets.load_dataset``, the image and
  label columns found by feature type, a missing split carved from train by a seeded permutation. Where the
  hub is not reachable this refuses at once in one line.

Classes are the train split's folder names, sorted (numerically when all are integers), label = index.
Images are ``.png .jpg .jpeg .bmp .gif .webp`` decoded with Pillow (a GIF's first frame), converted to
``L`` (1 channel) or ``RGB`` (3; a greyscale image is repeated), the shorter side resized to S (bilinear)
and center-cropped square. Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are skipped;
any other file in a class folder that is not an image by its extension is refused rather than silently
dropped, so that a stray file or a wrong folder is noticed. Before anything is decoded, a set whose stored
tensors would exceed ``MAX_STORED_BYTES`` is refused. Every problem is a ``BwskError`` of one line that
names the file or folder. Nothing from the data is executed or unpickled.

``augment`` crops and flips at random for training, ``center`` center-crops for evaluation; both return
float32 in [0, 1], and ``normalise`` (applied after either) maps them with the model's mean and std. The
randomness is counter-based: a row's crop and flip depend only on ``(seed, step, row_offset + row)``, so a
data-parallel rank given rows ``r*b .. (r+1)*b`` of the global batch (``row_offset=r*b``) draws what one
process would for those rows, and a resumed run repeats the same augmentations.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bwskc.errors import BwskError
from bwskc.train import data as _data

__all__ = ["ImageSplits", "load_images", "augment", "center", "normalise", "image_stats", "image_size_of",
           "stored_size_of", "MAX_STORED_BYTES", "IMAGE_SUFFIXES"]

MAX_STORED_BYTES = 8 << 30
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
SPLIT_SEED = 20261201
DIGITS_SPLIT = (1437, 180, 180)
DEFAULT_IMAGE_SIZE = 224
_VALID_NAMES = ("valid", "val", "validation")
_LAYOUT = "DIR/CLASS/IMAGE or DIR/{train,valid,test}/CLASS/IMAGE"

Split = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ImageSplits:
    train: Split
    valid: Split
    test: Split
    classes: list[str]
    source: str
    note: str
    stored_size: int


def stored_size_of(image_size: int) -> int:
    """The stored side: a little larger than the model's input, for the random crop."""
    return max(image_size, round(image_size * 8 / 7))


def load_images(spec: str, *, image_size: int, channels: int) -> ImageSplits:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise BwskError(f"image size must be a positive integer, not {image_size!r}")
    if channels not in (1, 3):
        raise BwskError(f"images have 1 or 3 channels, not {channels!r}")
    size = stored_size_of(image_size)
    if spec == "digits":
        return _load_digits(size, channels)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, size, channels)
    if path.exists():
        raise BwskError(f"{spec}: is a file, not an image folder ({_LAYOUT})")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1 or not spec.strip():
        raise BwskError(f"{spec}: no such directory (an image folder is {_LAYOUT})")
    return _load_hub(spec, size, channels)


# --------------------------------------------------------------------------------------------- sources

def _load_digits(size: int, channels: int) -> ImageSplits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.floor(digits.images * (255 / 16)).astype(np.uint8)  # the shared folder's PNGs exactly
    target = digits.target.astype(np.int64)
    _check_memory("scikit-learn digits", len(pixels), channels, size)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(pixels))
    n_train, n_valid, _ = DIGITS_SPLIT
    from PIL import Image

    splits = []
    for rows in (order[:n_train], order[n_train:n_train + n_valid], order[n_train + n_valid:]):
        rows = sorted(rows, key=lambda r: (target[r], r))  # the folder's order: by class, then file name
        images = [_fit(Image.fromarray(pixels[r], "L"), channels, size) for r in rows]
        splits.append((_stack(images, channels, size), torch.tensor(target[rows], dtype=torch.int64)))
    note = ("scikit-learn load_digits, pixels floor(v*255/16), split as ../shared/data/digits: "
            f"numpy default_rng({SPLIT_SEED}).permutation(1797), 1437 train / 180 valid / 180 test")
    return ImageSplits(*splits, [str(d) for d in range(10)], "scikit-learn load_digits (UCI handwritten digits)",
                       note, size)


def _load_folder(root: Path, size: int, channels: int) -> ImageSplits:
    dirs = _subdirs(root)
    valid_dirs = [d for d in dirs if d.name in _VALID_NAMES]
    if len(valid_dirs) > 1:
        raise BwskError(f"{root}: more than one validation folder ({', '.join(d.name for d in valid_dirs)})")
    named = {"train": root / "train", "valid": valid_dirs[0] if valid_dirs else None, "test": root / "test"}
    named = {k: d if d is not None and d.is_dir() else None for k, d in named.items()}
    if named["train"] is None and (named["valid"] or named["test"]):
        raise BwskError(f"{root}: has {'valid' if named['valid'] else 'test'} but no train/ folder")
    if named["train"] is None:  # one folder of classes, split here
        files = _class_files(root, require_images=True)
        classes = _class_order(files)
        _check_classes(root, classes)
        parts = {"train": [], "valid": [], "test": []}
        for cls in classes:
            for split, got in _split_class(files[cls], cls, ("valid", "test")).items():
                parts[split] += [(f, classes.index(cls)) for f in got]
        for split in ("valid", "test"):
            if not parts[split]:
                raise BwskError(f"{root}: too few images to split (no class has the 3 images needed for {split})")
        note = (f"one folder split deterministically 80/10/10 by a seeded permutation per class "
                f"(numpy default_rng([{SPLIT_SEED}, crc32(class)]) over the sorted file names; "
                "a class with fewer than 3 images is train only)")
    else:
        found = {k: _class_files(d, require_images=True) for k, d in named.items() if d is not None}
        classes = _class_order(found["train"])
        _check_classes(named["train"], classes)
        for split in ("valid", "test"):
            for cls in found.get(split, {}):
                if cls not in classes:
                    raise BwskError(f"{named[split] / cls}: class '{cls}' is not in {named['train']}")
        missing = tuple(s for s in ("valid", "test") if s not in found)
        parts = {s: [(f, classes.index(c)) for c in classes for f in found[s].get(c, [])] for s in found}
        if missing:
            parts["train"] = []
            for split in missing:
                parts[split] = []
            for cls in classes:
                for split, got in _split_class(found["train"][cls], cls, missing).items():
                    parts[split] += [(f, classes.index(cls)) for f in got]
        note = "the folder's own train/valid/test splits"
        if missing:
            note += (f"; {' and '.join(missing)} carved from train, 10% of each class by a seeded permutation "
                     f"(numpy default_rng([{SPLIT_SEED}, crc32(class)]) over the sorted file names)")
    _check_memory(str(root), sum(len(p) for p in parts.values()), channels, size)
    splits = []
    for split in ("train", "valid", "test"):
        images = [_decode(f, channels, size) for f, _ in parts[split]]
        labels = torch.tensor([label for _, label in parts[split]], dtype=torch.int64)
        splits.append((_stack(images, channels, size), labels))
    return ImageSplits(*splits, classes, f"image folder {root}", note, size)


def _load_hub(spec: str, size: int, channels: int) -> ImageSplits:
    if not _data.hub_reachable():
        raise BwskError(f"{spec}: not a local image folder, and the hub is not reachable from here "
                        f"(give a directory {_LAYOUT}, or 'digits')")
    import datasets

    name, _, config = spec.partition(":")
    try:
        loaded = datasets.load_dataset(name, config or None)
    except Exception as e:  # the hub's errors are many; the user needs the first line
        raise BwskError(f"dataset '{spec}' could not be loaded from the hub: {_first_line(e)}") from None
    keys = {"train": ("train",), "valid": ("validation", "valid", "val"), "test": ("test",)}
    tables = {s: next((loaded[k] for k in ks if k in loaded), None) for s, ks in keys.items()}
    if tables["train"] is None:
        raise BwskError(f"dataset '{spec}' has no train split (it has {', '.join(loaded)})")
    features = tables["train"].features
    image_col = next((c for c, f in features.items() if isinstance(f, datasets.Image)), None)
    label_col = next((c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image_col is None or label_col is None:
        raise BwskError(f"dataset '{spec}' needs an Image and a ClassLabel column (it has {', '.join(features)})")
    missing = [s for s in ("valid", "test") if tables[s] is None]
    note = "the dataset's own train/validation/test splits"
    if missing:  # carve 10% per missing split off train, by a fixed permutation of its rows
        order = np.random.default_rng(SPLIT_SEED).permutation(len(tables["train"]))
        cut = max(1, len(order) // 10)
        for i, split in enumerate(missing):
            tables[split] = tables["train"].select(sorted(order[i * cut:(i + 1) * cut]))
        tables["train"] = tables["train"].select(sorted(order[len(missing) * cut:]))
        note += (f"; {' and '.join(missing)} carved from train, 10% each by "
                 f"numpy default_rng({SPLIT_SEED}).permutation of its rows")
    _check_memory(f"dataset '{spec}'", sum(len(t) for t in tables.values()), channels, size)
    splits = []
    for split in ("train", "valid", "test"):
        table = tables[split]
        images = [_fit(row[image_col], channels, size) for row in table]
        splits.append((_stack(images, channels, size), torch.tensor(list(table[label_col]), dtype=torch.int64)))
    return ImageSplits(*splits, list(features[label_col].names), f"{spec} from the Hugging Face hub", note, size)


# ------------------------------------------------------------------------------------------ folder walk

def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(split_dir: Path, *, require_images: bool) -> dict[str, list[Path]]:
    """CLASS -> its image files, sorted by name. A loose image beside the class folders has no class and
    is refused; other loose files (a README) are left alone."""
    files: dict[str, list[Path]] = {}
    for entry in sorted(split_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            if entry.suffix.lower() in IMAGE_SUFFIXES:
                raise BwskError(f"{entry}: an image outside a class folder ({_LAYOUT})")
            continue
        images = []
        for f in sorted(entry.iterdir()):
            if f.name.startswith("."):
                continue
            if f.is_dir():
                raise BwskError(f"{f}: a folder inside class folder {entry.name} (classes are not nested)")
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                raise BwskError(f"{f}: not an image file (expected {' '.join(sorted(IMAGE_SUFFIXES))}); "
                                "remove it or hide it with a leading '.'")
            images.append(f)
        if require_images and not images:
            raise BwskError(f"{entry}: class folder without images")
        files[entry.name] = images
    if not files:
        raise BwskError(f"{split_dir}: no class folders with images ({_LAYOUT})")
    return files


def _class_order(files: dict[str, list[Path]]) -> list[str]:
    names = list(files)
    if all(n.isdigit() for n in names):  # "2" before "10": label index matches the number
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def _check_classes(folder: Path, classes: list[str]) -> None:
    if len(classes) < 2:
        raise BwskError(f"{folder}: {len(classes)} class folder ({', '.join(classes)}); "
                        "classification needs at least two")


def _split_class(files: list[Path], cls: str, carve: tuple[str, ...]) -> dict[str, list[Path]]:
    """Carve 10% (at least one image when the class has 3 or more) into each split of ``carve``, the rest
    train, by a permutation seeded from the class name alone."""
    n = len(files)
    take = max(1, round(n / 10)) if n >= 3 else 0
    order = np.random.default_rng([SPLIT_SEED, zlib.crc32(cls.encode())]).permutation(n)
    out, at = {}, 0
    for split in carve:
        out[split] = [files[i] for i in sorted(order[at:at + take])]
        at += take
    out["train"] = [files[i] for i in sorted(order[at:])]
    return out


# ------------------------------------------------------------------------------------------ decoding

def _check_memory(source: str, count: int, channels: int, size: int) -> None:
    need = count * channels * size * size
    if need > MAX_STORED_BYTES:
        raise BwskError(f"{source}: {count} images stored as uint8 [{channels},{size},{size}] would take "
                        f"{need} bytes ({need / 2**30:.1f} GiB), over the limit of {MAX_STORED_BYTES} bytes; "
                        "use a smaller --image-size or a subset")


def _decode(path: Path, channels: int, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here with its name
            return _fit(image, channels, size)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise BwskError(f"{path}: cannot decode the image ({_first_line(e)})") from None


def _fit(image, channels: int, size: int) -> np.ndarray:
    """Convert the mode, resize the shorter side to ``size`` and center-crop a square: [C, size, size]."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        image = image.resize(new, Image.Resampling.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    if new != (size, size):
        image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _stack(images: list[np.ndarray], channels: int, size: int) -> torch.Tensor:
    if not images:
        return torch.empty((0, channels, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.ascontiguousarray(np.stack(images)))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ------------------------------------------------------------------------------------------ augmentation

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (numpy's uint64 arithmetic wraps; shifts are logical)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _row_bits(seed: int, step: int, rows: np.ndarray) -> np.ndarray:
    """64 random bits per global row index, a function of (seed, step, row) only."""
    key = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    key = _mix(key ^ np.uint64(step & 0xFFFFFFFFFFFFFFFF))
    return _mix(key ^ rows.astype(np.uint64))


def augment(images: torch.Tensor, *, image_size: int, seed: int, step: int, row_offset: int = 0,
            flip: bool = True, crop: bool = True) -> torch.Tensor:
    """A random ``image_size`` crop (a centered one with ``crop=False``) and a random horizontal flip of
    each row of uint8 ``[B, C, S, S]``: float32 ``[B, C, image_size, image_size]`` in [0, 1], not normalised
    (``normalise`` follows, as it does for ``center``). Row i's choice depends only on
    ``(seed, step, row_offset + i)``."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise BwskError(f"augment takes uint8 [B, C, S, S] images, not {images.dtype} {list(images.shape)}")
    b, _, s, s2 = images.shape
    if s != s2 or image_size > s:
        raise BwskError(f"cannot crop {image_size}x{image_size} from images of {s}x{s2}")
    rows = np.arange(row_offset, row_offset + b, dtype=np.int64)
    bits = _row_bits(seed, step, rows)
    room = s - image_size + 1
    if crop:  # 21-bit fields for y and x; the modulo bias is below 1e-4 for any realistic room
        y0 = ((bits & np.uint64(0x1FFFFF)) % np.uint64(room)).astype(np.int64)
        x0 = (((bits >> np.uint64(21)) & np.uint64(0x1FFFFF)) % np.uint64(room)).astype(np.int64)
    else:
        y0 = x0 = np.full(b, (s - image_size) // 2, dtype=np.int64)
    flipped = ((bits >> np.uint64(63)) == 1) if flip else np.zeros(b, dtype=bool)
    span = torch.arange(image_size)
    ys = torch.from_numpy(y0)[:, None] + span                                       # [B, s]
    xs = torch.from_numpy(x0)[:, None] + torch.where(torch.from_numpy(flipped)[:, None],
                                                      image_size - 1 - span, span)  # [B, s]
    picked = images.permute(0, 2, 3, 1)[torch.arange(b)[:, None, None], ys[:, :, None], xs[:, None, :]]
    return picked.permute(0, 3, 1, 2).float().div_(255.0)


def center(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """The centered ``image_size`` crop for evaluation: float32 in [0, 1], not normalised."""
    s = images.shape[-1]
    if image_size > s or images.shape[-2] != s:
        raise BwskError(f"cannot crop {image_size}x{image_size} from images of {images.shape[-2]}x{s}")
    top = (s - image_size) // 2
    return images[..., top:top + image_size, top:top + image_size].float().div_(255.0)


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``(x - mean) / std`` per channel; uint8 input is first scaled to [0, 1]."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    shape = (-1, 1, 1)
    return (x - torch.tensor(mean, dtype=torch.float32).view(shape)) / torch.tensor(std, dtype=torch.float32).view(shape)


# ------------------------------------------------------------------------------------------ model side

def image_stats(model_dir, config) -> tuple[list[float], list[float]]:
    """The model's ``preprocessor_config.json`` ``image_mean`` / ``image_std`` when its directory has one,
    else ImageNet's; averaged to one value for a 1-channel model (or repeated for a 3-channel one)."""
    mean = std = None
    folder = None if model_dir is None else Path(model_dir)
    if folder is not None and folder.is_file():  # a config.json given for the model: its folder
        folder = folder.parent
    file = folder / "preprocessor_config.json" if folder is not None else None
    if file is not None and file.is_file():
        try:
            pre = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise BwskError(f"{file}: cannot read ({_first_line(e)})") from None
        if isinstance(pre, dict) and "image_mean" in pre and "image_std" in pre:
            mean, std = pre["image_mean"], pre["image_std"]
    if mean is None:
        from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    channels = int(getattr(config, "num_channels", 3) or 3)
    return _per_channel(mean, channels, file), _per_channel(std, channels, file)


def _per_channel(values, channels: int, file) -> list[float]:
    values = [values] if isinstance(values, (int, float)) else list(values)
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise BwskError(f"{file}: image_mean / image_std must be numbers, not {values!r}") from None
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return [sum(values) / len(values)]
    raise BwskError(f"{file}: {len(values)} image_mean / image_std values for a {channels}-channel model")


def image_size_of(config) -> int:
    """The config's ``image_size`` (an int, or a square [h, w]), else 224: ResNet configs have none.
    (The trainer may take an ``--image-size`` that overrides this later.)"""
    size = getattr(config, "image_size", None)
    if size is None:
        return DEFAULT_IMAGE_SIZE
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise BwskError(f"image_size {list(size)}: only square images are supported")
        size = size[0]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise BwskError(f"image_size {size!r}: must be a positive integer")
    return size
