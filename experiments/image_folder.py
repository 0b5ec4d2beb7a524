"""The user's images: find them, split them, decode them with Pillow.

``data.root`` is one of
- a folder with ``train/`` and ``val/`` subfolders that both hold images (ImageNet style);
- any other folder, searched recursively; a file goes to validation when the hash of its
  path relative to the root falls under ``data.val_fraction`` (stable as files are added);
- a text file of image paths, one a line (``#`` comments, relative paths are relative to
  the file's folder), split by the same hash.

Files ending in png, jpg, jpeg, webp or bmp (any case) count; hidden files and folders do not.
Decoding handles grayscale, palette, alpha (composited on white), 16-bit and EXIF-rotated
images. A file that cannot be decoded is replaced in its batch by the next readable file of
the list (training) or left out (validation), and reported once by the training loop; it
never stops a run.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch import Tensor

from experiments.config import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, reported, never half an image
MAX_TRIES = 16  # readable substitutes tried for an unreadable training file


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
    """The train and validation files of a root, in a fixed order."""

    root: Path
    train: tuple[Path, ...]
    val: tuple[Path, ...]
    layout: str  # "train/val folders" | "hash split" | "path list"
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


def load_crop(path: Path, resolution: int, rng: np.random.Generator | None) -> Tensor:
    """(3, R, R) uint8: shorter side resized to R, then a random crop and flip (``rng``) or the centre."""
    with Image.open(path) as image:
        w, h = image.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        image.draft("RGB", size)  # JPEG: decode at a reduced scale that is still >= size (much faster)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = to_rgb(image)
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    w, h = image.size
    if rng is None:
        left, top, flip = (w - resolution) // 2, (h - resolution) // 2, False
    else:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
        flip = bool(rng.random() < 0.5)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _read(path: Path, resolution: int, rng: np.random.Generator | None) -> Tensor | str:
    """The crop, or a one-line reason why the file cannot be read."""
    try:
        return load_crop(path, resolution, rng)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # what Pillow raises
        return f"{path}: {type(e).__name__}: {e}"


class TrainImages(torch.utils.data.Dataset):
    """Items ``(index, sample_seed)`` -> ``(crop, [reasons of unreadable files skipped])``."""

    def __init__(self, files: tuple[Path, ...], resolution: int):
        self.files, self.resolution = files, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor | None, list[str]]:
        index, seed = item
        bad: list[str] = []
        for k in range(min(MAX_TRIES, len(self.files))):
            out = _read(self.files[(index + k) % len(self.files)], self.resolution, np.random.default_rng(seed))
            if isinstance(out, Tensor):
                return out, bad
            bad.append(out)
        return None, bad


class ValImages(torch.utils.data.Dataset):
    """Index -> ``(centre crop or None, [reason])``."""

    def __init__(self, files: tuple[Path, ...], resolution: int):
        self.files, self.resolution = files, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Tensor | None, list[str]]:
        out = _read(self.files[index], self.resolution, None)
        return (out, []) if isinstance(out, Tensor) else (None, [out])


def collate(items: list[tuple[Tensor | None, list[str]]]) -> tuple[Tensor, list[str]]:
    """Stack the readable crops; carry the reasons of the unreadable files to the main process."""
    crops = [c for c, _ in items if c is not None]
    bad = [reason for _, reasons in items for reason in reasons]
    if not crops:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), bad
    return torch.stack(crops), bad


def even_subset(n: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(n)`` (all of them when ``k >= n``)."""
    if k >= n:
        return list(range(n))
    return [math.floor(i * n / k) for i in range(k)]
