"""Task ``images``: a MAGVIT-v2-style tokenizer (``experiments/tokenizer.py``) on the user's images
(``data.root``, read from files) or on the crops of the images that ship with scikit-image,
scikit-learn and the LFW faces, kept on the device; docs/training.md describes both datasets.

    python -m experiments.train experiments/configs/images.yaml                      # shipped images
    python -m experiments.train experiments/configs/images.yaml data.root=~/my_images
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from experiments.config import Config, ConfigError
from experiments.data import loader_kwargs, train_loader
from experiments.image_folder import (
    FINGERPRINT_KEYS,
    Fingerprints,
    Note,
    TrainImages,
    ValImages,
    check_val_files,
    collate,
    data_change,
    describe_size,
    even_subset,
    fingerprint,
    list_images,
)
from experiments.quantizers import build_quantizer
from experiments.tasks import ModelOutput
from experiments.tasks.patches import _load_image
from experiments.tokenizer import Decoder, Encoder, Layout

# skimage.data function names or sklearn sample image file names. Never reorder: it fixes the data.
TRAIN_IMAGES = ("astronaut", "camera", "rocket", "immunohistochemistry", "moon", "grass", "gravel", "brick",
                "clock", "coins", "text", "colorwheel", "retina", "hubble_deep_field", "china.jpg")
VAL_IMAGES = ("chelsea", "coffee", "flower.jpg", "page", "cell")
LFW_TRAIN_FACES = 160  # of the 200 faces in skimage.data.lfw_subset
MAX_SIDE = 512  # shorter side of a shipped source image before it is cut
SCALES = (1, 2, 4)  # each source is also cut at 1/2 and 1/4 of that size
VALUE_RANGE = (-1.0, 1.0)


def _scaled(image: np.ndarray, shorter: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = shorter / min(h, w)
    size = (max(shorter, round(w * scale)), max(shorter, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def _grid(image: np.ndarray, size: int, stride: int) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(image, (size, size), axis=(0, 1))[::stride, ::stride]
    return windows.reshape(-1, 3, size, size)


def _cut(name: str, resolution: int, stride: int) -> np.ndarray:
    image = _load_image(name)
    image = _scaled(image, min(MAX_SIDE, min(image.shape[:2])))
    crops = []
    for factor in SCALES:
        shorter = min(image.shape[:2]) // factor
        if shorter < resolution:
            break
        crops.append(_grid(image if factor == 1 else _scaled(image, shorter), resolution, stride))
    return np.concatenate(crops) if crops else np.zeros((0, 3, resolution, resolution), np.uint8)


def _faces(resolution: int, train: bool) -> np.ndarray:
    import skimage.data

    faces = skimage.data.lfw_subset()  # (200, 25, 25) float in [0, 1]
    faces = faces[:LFW_TRAIN_FACES] if train else faces[LFW_TRAIN_FACES:]
    out = [_scaled(np.repeat(np.round(f * 255).astype(np.uint8)[..., None], 3, -1), resolution) for f in faces]
    return np.stack([o[:resolution, :resolution].transpose(2, 0, 1) for o in out])


@functools.lru_cache(maxsize=4)
def shipped_crops(resolution: int) -> tuple[Tensor, Tensor]:
    """(train, val) uint8 crops of shape (N, 3, R, R); the same on every machine."""
    train = [_cut(n, resolution, max(1, resolution // 4)) for n in TRAIN_IMAGES] + [_faces(resolution, True)]
    val = [_cut(n, resolution, resolution) for n in VAL_IMAGES] + [_faces(resolution, False)]
    return torch.from_numpy(np.concatenate(train)), torch.from_numpy(np.concatenate(val))


def to_model_input(batch: Tensor) -> Tensor:
    """uint8 (b, 3, R, R) -> float in [-1, 1]; on the device, after the (4x smaller) transfer."""
    return batch.float().div_(127.5).sub_(1.0)


class ShippedImages:
    """In memory, on the device after ``to(device)``."""

    value_range = VALUE_RANGE
    is_image = True

    def __init__(self, config: Config):
        self.train, val = shipped_crops(config.data.resolution)
        self.val_uint8 = val[even_subset(len(val), config.data.val_size)]

    @property
    def val(self) -> Tensor:
        return to_model_input(self.val_uint8)

    def to(self, device: torch.device) -> ShippedImages:
        self.train, self.val_uint8 = self.train.to(device), self.val_uint8.to(device)
        return self

    def train_batch(self, g: torch.Generator, batch_size: int) -> Tensor:
        index = torch.randint(len(self.train), (batch_size,), generator=g)
        flip = torch.rand(batch_size, generator=g) < 0.5
        crops = self.train[index.to(self.train.device)]
        crops = torch.where(flip.to(crops.device)[:, None, None, None], crops.flip(-1), crops)
        return to_model_input(crops)


class FolderImages:
    """Read from files by DataLoaders; ``train_loader`` for one run segment, ``val_loader`` per rank.

    The validation files (``data.val_size`` of the listing's, evenly spread) are decoded once here,
    so the set validation uses, and every count printed about it, is known before training.
    ``notes``: the validation files left out (unreadable, or under ``data.min_size``)
    and those upscaled; training files are noted as the loaders meet them (``experiments.loop.Batches``).
    """

    value_range = VALUE_RANGE
    is_image = True
    to_model_input = staticmethod(to_model_input)  # the loaders' uint8 batches -> the model's input

    def __init__(self, config: Config):
        d = config.data
        listing = list_images(d.root, d.val_fraction)
        self.listing, self.min_size, self.resolution = listing, d.min_size, d.resolution
        self.fingerprint = fingerprint(listing)  # one stat per listed file (see image_folder.fingerprint)
        self.val_chosen = tuple(listing.val[i] for i in even_subset(len(listing.val), d.val_size))
        val_files, self.notes = check_val_files(self.val_chosen, d.resolution, d.min_size)
        if not val_files:
            raise ConfigError(f"data.root={d.root!r}: none of the {len(self.val_chosen)} validation files can be "
                              f"used ({_count_notes(self.notes, d.resolution)}): fix or replace them"
                              + (", or lower data.min_size" if d.min_size > 0 else ""))
        self.train_set = TrainImages(listing.train, d.resolution, d.min_size)
        self.val_set = ValImages(val_files, d.resolution, d.min_size)

    def describe(self) -> str:
        """What the run reads, every count as it is: listed files, validation images used of those chosen."""
        ls = self.listing
        extra = f", {len(ls.skipped)} listed paths are not image files" if ls.skipped else ""
        chosen = (f"the {len(self.val_chosen)} validation files" if len(self.val_chosen) == len(ls.val) else
                  f"{len(self.val_chosen)} of {len(ls.val)} validation files (data.val_size)")
        noted = f" ({_count_notes(self.notes, self.resolution, names=True)})" if self.notes else ""
        rule = (f"upscaled (data.min_size={self.min_size})" if self.min_size == 0 else
                f"skipped under data.min_size={self.min_size} px, upscaled at or above it")
        used = len(self.val_set)
        return (f"{ls.root} ({ls.layout}, {describe_size(self.fingerprint)}){extra}: {len(ls.train)} training "
                f"files; validation uses {used} image{'s' if used != 1 else ''} of {chosen}{noted}; training images under "
                f"{self.resolution} px on their shorter side are {rule}")

    def record(self) -> dict[str, Any]:
        """For config.json and summary.json: the fingerprint and the validation images used."""
        return {**self.fingerprint, "val_images": len(self.val_set)}

    def train_loader(self, config: Config, device: torch.device, start: int, rows: slice) -> DataLoader:
        return train_loader(self.train_set, config, device, start, rows, collate)

    def val_loader(self, config: Config, device: torch.device, rank: int, world: int,
                   batch_size: int) -> DataLoader:
        shard = list(range(len(self.val_set)))[rank::world]  # every rank a disjoint share
        return DataLoader(Subset(self.val_set, shard), batch_size=batch_size, shuffle=False, collate_fn=collate,
                          **loader_kwargs(config, device))


def _count_notes(notes: list[Note], resolution: int, names: bool = False) -> str:
    """``1 unreadable, 2 under 64 px skipped`` (with ``names``: the first path of each kind)."""
    words = {"unreadable": "unreadable", "small": "under data.min_size, skipped",
             "upscaled": f"under {resolution} px, upscaled"}
    parts = []
    for kind, word in words.items():
        of_kind = [n for n in notes if n.kind == kind]
        if of_kind:
            first = f": {of_kind[0].text}" + (", ..." if len(of_kind) > 1 else "") if names else ""
            parts.append(f"{len(of_kind)} {word}{first}")
    return "; ".join(parts)


def data_change_since(config: Config, recorded: Mapping[str, Any], fingerprints: Fingerprints) -> str:
    """'' unless a finished run recorded a fingerprint of its ``data.root`` (``recorded``: its
    config.json) and the folder now differs; else what changed. ``fingerprints`` computes each root
    once per command; a run without ``data.root`` (the shipped images, fixed by this code and the
    run id) or without a recorded fingerprint (from before they were recorded) walks nothing."""
    if not config.data.root or not all(k in recorded for k in FINGERPRINT_KEYS):
        return ""
    return data_change(recorded, fingerprints(config.data.root, config.data.val_fraction))


def build_dataset(config: Config) -> ShippedImages | FolderImages:
    return FolderImages(config) if config.data.root else ShippedImages(config)


RECONSTRUCTS_IMAGES = True  # the adversarial and perceptual losses apply (experiments.objective)


def check(config: Config) -> None:
    """What can fail before a run folder is written: the data root and its split."""
    if config.data.root:  # the shipped images are always there
        list_images(config.data.root, config.data.val_fraction)
    if config.data.resolution % config.model.downsample:
        raise ConfigError(f"data.resolution={config.data.resolution} is not a multiple of model.downsample="
                          f"{config.model.downsample}: pick a downsampling factor that divides it")


class ImageTokenizer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        q = config.quantizer
        self.quantizer = build_quantizer(q, config.model.latent_dim)
        self.inv_temperature = q.inv_temperature
        layout = Layout.of(config.model)
        self.layout = layout
        self.encoder = Encoder(layout, self.quantizer.dim)
        self.decoder = Decoder(layout, self.quantizer.dim)

    def forward(self, x: Tensor) -> ModelOutput:
        q = self.quantizer(self.encoder(x), inv_temperature=self.inv_temperature)  # (b, d, R/f, R/f)
        return ModelOutput(self.decoder(q.quantized), q.entropy_aux_loss, q.indices)


def build_model(config: Config) -> nn.Module:
    return ImageTokenizer(config)


def tokens_per_image(config: Config) -> int:
    return (config.data.resolution // config.model.downsample) ** 2


def memory(config: Config) -> tuple[dict[str, int], int]:
    """Bytes a run certainly needs for its data (see experiments.resources), and tokens per batch:
    a float32 batch and its reconstruction. (Not the validation crops: ``data.val_size`` is a
    cap, and how many images there are is only known once they are listed.)"""
    d = config.data
    sample = 3 * d.resolution**2
    return ({"data.batch_size: one batch and its reconstruction": 2 * d.batch_size * sample * 4},
            d.batch_size * tokens_per_image(config))
