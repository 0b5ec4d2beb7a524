"""The user's images (``data.root``): find them, split them by a hash of their paths, decode them
with Pillow, count the unreadable and small ones (:class:`Note`) and :func:`fingerprint` the listing
so a finished run can tell that its folder changed; docs/training.md gives the rules.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch import Tensor

from experiments.config import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, reported, never half an image
MAX_TRIES = 16  # readable substitutes tried for an unreadable training file


class Note(NamedTuple):
    """A file that was not used as it is: ``kind`` is "unreadable", "small" (shorter side under
    ``data.min_size``: left out) or "upscaled" (smaller than the resolution, used upscaled)."""

    kind: str
    path: str
    text: str  # one line: the path and what was wrong


class TooSmall(ValueError):
    """The image's shorter side is under ``data.min_size``."""


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _in_val(relative: str, val_fraction: float) -> bool:
    digest = hashlib.sha1(relative.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _walk(folder: Path) -> list[Path]:
    found = []
    for path in folder.rglob("*"):
        parts = path.relative_to(folder).parts
        if any(p.startswith(".") for p in parts[:-1]):
            continue
        if path.is_file() and _is_image(path):
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


@dataclass(frozen=True)
class ImageList:
    """The train and validation files of a root, in a fixed order (images, or videos and frame folders)."""

    root: Path
    train: tuple[Path, ...]
    val: tuple[Path, ...]
    # images: "train/val folders" | "hash split" | "path list"; videos (experiments.video_folder):
    # "hash split" | "split list"
    layout: str
    skipped: tuple[str, ...] = field(default=())  # lines of a path list that are not image files


def list_images(root: str | Path, val_fraction: float) -> ImageList:
    """Find and split the images of ``root``; a ConfigError naming the problem if there are none."""
    root = Path(root).expanduser()
    if not root.exists():
        raise ConfigError(f"data.root={str(root)!r} does not exist: give a folder of images, an ImageNet-style "
                          f"folder with train/ and val/, or a text file of image paths")
    if root.is_file():
        try:
            lines = root.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ConfigError(f"data.root={str(root)!r} is a file but not UTF-8 text: give a folder of images "
                              f"or a text file with one image path a line") from None
        paths, skipped = [], []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            path = Path(line).expanduser()
            path = path if path.is_absolute() else root.parent / path
            (paths if _is_image(path) else skipped).append(path if _is_image(path) else line)
        base = root.parent
        train = [p for p in paths if not _in_val(_relative(p, base), val_fraction)]
        val = [p for p in paths if _in_val(_relative(p, base), val_fraction)]
        listing = ImageList(root, tuple(train), tuple(val), "path list", tuple(skipped))
    elif (root / "train").is_dir() and (root / "val").is_dir() and _walk(root / "val"):
        listing = ImageList(root, tuple(_walk(root / "train")), tuple(_walk(root / "val")), "train/val folders")
    else:
        files = _walk(root)
        train = [p for p in files if not _in_val(p.relative_to(root).as_posix(), val_fraction)]
        val = [p for p in files if _in_val(p.relative_to(root).as_posix(), val_fraction)]
        listing = ImageList(root, tuple(train), tuple(val), "hash split")
    kinds = "/".join(s[1:] for s in IMAGE_SUFFIXES)
    if not listing.train and not listing.val:
        raise ConfigError(f"data.root={str(root)!r} holds no {kinds} images ({listing.layout}): point it at a "
                          f"folder that has some (searched recursively) or a list of their paths")
    if not listing.train:
        raise ConfigError(f"data.root={str(root)!r}: no training images ({listing.layout}, {len(listing.val)} "
                          f"validation): add images or lower data.val_fraction={val_fraction}")
    if not listing.val:
        raise ConfigError(f"data.root={str(root)!r}: no validation images ({listing.layout}, "
                          f"{len(listing.train)} training): add a val/ folder or raise data.val_fraction="
                          f"{val_fraction}")
    return listing


def _relative(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return path.as_posix()


FINGERPRINT_KEYS = ("data_files", "data_bytes", "data_sha256")  # in config.json and summary.json


def fingerprint(listing: ImageList) -> dict[str, Any]:
    """What a run reads from ``data.root``: its image files (training and validation), their total
    bytes, and a SHA-256 (16 hex digits) of the sorted ``relative path<TAB>size`` lines.

    Cost: one ``stat`` per listed file, on top of the walk that listed them (``list_images``):
    0.34 s for 20,000 files on a warm local disk (the walk itself 1.5 s), more on network storage;
    no file is opened. A file rewritten in place with the same size is not seen (reading every byte of a
    large folder at every submit would cost far more than the check is worth)."""
    base = listing.root.parent if listing.layout == "path list" else listing.root
    lines, total = [], 0
    for path in listing.train + listing.val:
        try:
            size = os.stat(path).st_size
        except OSError:  # vanished or unreadable: counted, with a size no file has
            size = -1
        total += max(size, 0)
        lines.append(f"{_relative(path, base)}\t{size}\n")
    digest = hashlib.sha256("".join(sorted(lines)).encode()).hexdigest()[:16]
    return {"data_files": len(lines), "data_bytes": total, "data_sha256": digest}


class Fingerprints:
    """The fingerprint of each root, computed once per command (a sweep of many runs on one
    folder walks and stats it once); keyed by the resolved root and ``data.val_fraction``."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, float], dict[str, Any] | str] = {}

    def __call__(self, root: str | Path, val_fraction: float) -> dict[str, Any] | str:
        """The fingerprint, or one line saying why the root cannot be listed now."""
        key = (str(Path(root).expanduser().resolve()), val_fraction)
        if key not in self._seen:
            try:
                self._seen[key] = fingerprint(list_images(root, val_fraction))
            except ConfigError as e:
                self._seen[key] = str(e)
        return self._seen[key]


def describe_size(record: Mapping[str, Any]) -> str:
    """``12 files, 1.3 MB`` of a fingerprint."""
    size = record["data_bytes"]
    return f"{record['data_files']} files, " + (f"{size / 1e6:.3g} MB" if size >= 1e5 else f"{size / 1e3:.3g} kB")


def data_change(recorded: Mapping[str, Any], now: dict[str, Any] | str) -> str:
    """'' if a run's recorded fingerprint matches the folder's fingerprint ``now``; else what changed
    (``now`` may be the reason the folder cannot be listed any more). A record without a fingerprint
    (a run from before they were recorded) reads as unknown, not as changed: ''."""
    if not all(k in recorded for k in FINGERPRINT_KEYS):
        return ""
    if isinstance(now, str):
        return f"it can no longer be read ({now})"
    if all(recorded[k] == now[k] for k in FINGERPRINT_KEYS):
        return ""
    return (f"the run read {describe_size(recorded)} (hash {recorded['data_sha256']}), the folder now holds "
            f"{describe_size(now)} (hash {now['data_sha256']})")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB: EXIF orientation applied, 16-bit scaled, alpha on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(np.round(array / peak * 255), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_crop(path: Path, resolution: int, rng: np.random.Generator | None, min_size: int = 0) -> Tensor:
    """(3, R, R) uint8: shorter side resized to R, then a random crop and flip (``rng``) or the centre.
    TooSmall if the shorter side is under ``min_size`` pixels."""
    return _load(path, resolution, rng, min_size)[0]


def _load(path: Path, resolution: int, rng: np.random.Generator | None,
          min_size: int) -> tuple[Tensor, tuple[int, int]]:
    """``load_crop``'s crop and the file's own (width, height)."""
    with Image.open(path) as image:
        w, h = image.size
        if min(w, h) < min_size:
            raise TooSmall(f"{w}x{h}")
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        image.draft("RGB", size)  # JPEG: decode at a reduced scale that is still >= size (much faster)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = to_rgb(image)
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    w0, h0 = w, h
    w, h = image.size
    if rng is None:
        left, top, flip = (w - resolution) // 2, (h - resolution) // 2, False
    else:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
        flip = bool(rng.random() < 0.5)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous(), (w0, h0)


def _read(path: Path, resolution: int, rng: np.random.Generator | None,
          min_size: int = 0) -> tuple[Tensor | None, Note | None]:
    """The crop (None if unusable), and a Note if the file was unreadable, too small or upscaled."""
    try:
        crop, (w, h) = _load(path, resolution, rng, min_size)
    except TooSmall as e:
        return None, Note("small", str(path), f"{path}: {e}, under data.min_size={min_size} px")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # what Pillow raises
        return None, Note("unreadable", str(path), f"{path}: {type(e).__name__}: {e}")
    if min(w, h) < resolution:  # at or above data.min_size: used, and named too
        return crop, Note("upscaled", str(path), f"{path}: {w}x{h}, upscaled to data.resolution={resolution} px")
    return crop, None


class TrainImages(torch.utils.data.Dataset):
    """Items ``(index, sample_seed)`` -> ``(crop, [notes of the files skipped or upscaled])``."""

    def __init__(self, files: tuple[Path, ...], resolution: int, min_size: int = 0):
        self.files, self.resolution, self.min_size = files, resolution, min_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor | None, list[Note]]:
        index, seed = item
        notes: list[Note] = []
        for k in range(min(MAX_TRIES, len(self.files))):
            crop, note = _read(self.files[(index + k) % len(self.files)], self.resolution,
                               np.random.default_rng(seed), self.min_size)
            if note is not None:
                notes.append(note)
            if crop is not None:
                return crop, notes
        return None, notes


class ValImages(torch.utils.data.Dataset):
    """Index -> ``(centre crop or None, [note])``. ``check_val_files`` leaves out the files that
    cannot be used before the first validation, so that every count is known when it is printed."""

    def __init__(self, files: tuple[Path, ...], resolution: int, min_size: int = 0):
        self.files, self.resolution, self.min_size = files, resolution, min_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor | None, list[Note]]:
        crop, note = _read(self.files[index], self.resolution, None, self.min_size)
        return crop, [] if note is None else [note]


def check_val_files(files: tuple[Path, ...], resolution: int, min_size: int) -> tuple[tuple[Path, ...], list[Note]]:
    """(the files validation will use, the notes of the others and of the upscaled ones).

    Each file is decoded once (a truncated file passes a header check), in this process: one
    validation's worth of decoding, once per attempt (``data.val_size`` files at most)."""
    used, notes = [], []
    for path in files:
        crop, note = _read(path, resolution, None, min_size)
        if crop is not None:
            used.append(path)
        if note is not None:
            notes.append(note)
    return tuple(used), notes


def collate(items: list[tuple[Tensor | None, list[Note]]]) -> tuple[Tensor, list[Note]]:
    """Stack the usable crops; carry the notes of the files skipped or upscaled to the main process."""
    crops = [c for c, _ in items if c is not None]
    notes = [note for _, item_notes in items for note in item_notes]
    if not crops:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), notes
    return torch.stack(crops), notes


def even_subset(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return [math.floor(i * n / k) for i in range(k)]
