"""The video task's default data: clips made from the images the images task ships (no download),
camera pans and zooms over each source image and coloured shapes moving over a still crop of it,
occluding one another, so that time carries real structure; split by source image with the images
task's TRAIN_IMAGES / VAL_IMAGES. Fixed by the code and (resolution, frames): the same clips on
every machine; each motion spans the whole clip, so a frame stride only thins a denser path.
docs/training.md ("Video") gives the counts.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

PANS_PER_IMAGE = 36  # camera clips (a pan with a zoom) per source image
SHAPES_PER_IMAGE = 12  # moving-shapes clips per source image
SOURCE_SIDE = 4  # a source image's shorter side is scaled to this many clip resolutions
SHAPES_PER_CLIP = 3


def _source(name: str, resolution: int) -> Tensor:
    """(3, H, W) float in [0, 1], shorter side SOURCE_SIDE * resolution."""
    from experiments.tasks.patches import _load_image

    image = torch.from_numpy(np.array(_load_image(name))).permute(2, 0, 1).float().div(255)[None]
    h, w = image.shape[-2:]
    scale = SOURCE_SIDE * resolution / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def _camera(source: Tensor, resolution: int, length: int, rng: np.random.Generator) -> Tensor:
    """(3, length, R, R): a window moving and zooming linearly across ``source``."""
    h, w = source.shape[-2:]
    side = min(h, w)
    sizes = rng.uniform(0.3, 0.9, 2) * side  # window side in pixels, start and end (a zoom when they differ)
    centres = [(rng.uniform(s / 2, w - s / 2), rng.uniform(s / 2, h - s / 2)) for s in sizes]
    t = torch.linspace(0, 1, length, dtype=torch.float64)
    size = sizes[0] + (sizes[1] - sizes[0]) * t
    cx = centres[0][0] + (centres[1][0] - centres[0][0]) * t
    cy = centres[0][1] + (centres[1][1] - centres[0][1]) * t
    theta = torch.zeros(length, 2, 3, dtype=torch.float64)  # output [-1, 1] -> source's normalised coordinates
    theta[:, 0, 0], theta[:, 0, 2] = size / w, cx / w * 2 - 1
    theta[:, 1, 1], theta[:, 1, 2] = size / h, cy / h * 2 - 1
    grid = F.affine_grid(theta.float(), [length, 3, resolution, resolution], align_corners=False)
    frames = F.grid_sample(source[None].expand(length, -1, -1, -1), grid, mode="bilinear", align_corners=False)
    return frames.transpose(0, 1)


def _shapes(source: Tensor, resolution: int, length: int, rng: np.random.Generator) -> Tensor:
    """(3, length, R, R): discs and rectangles in fixed depth order moving over a still crop."""
    h, w = source.shape[-2:]
    top, left = int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))
    frames = source[:, top:top + resolution, left:left + resolution][:, None].repeat(1, length, 1, 1).clone()
    yy, xx = torch.meshgrid(torch.arange(resolution, dtype=torch.float32) + 0.5,
                            torch.arange(resolution, dtype=torch.float32) + 0.5, indexing="ij")
    t = torch.arange(length, dtype=torch.float32)[:, None, None] / max(1, length - 1)
    for _ in range(SHAPES_PER_CLIP):  # later shapes pass in front of earlier ones
        radius = rng.uniform(0.1, 0.25) * resolution
        start, end = rng.uniform(0, resolution, 2), rng.uniform(0, resolution, 2)
        x = start[0] + (end[0] - start[0]) * t
        y = start[1] + (end[1] - start[1]) * t
        if rng.random() < 0.5:
            mask = (xx - x) ** 2 + (yy - y) ** 2 <= radius**2
        else:
            mask = ((xx - x).abs() <= radius) & ((yy - y).abs() <= radius * rng.uniform(0.5, 1.0))
        colour = torch.from_numpy(rng.uniform(0, 1, 3)).float()[:, None, None, None]
        frames = torch.where(mask[None], colour, frames)
    return frames


def _clips(name: str, seed: int, resolution: int, frames: int, frame_stride: int) -> Tensor:
    source = _source(name, resolution)
    length = (frames - 1) * frame_stride + 1
    rng = np.random.default_rng([seed, resolution])
    made = [_camera(source, resolution, length, rng) for _ in range(PANS_PER_IMAGE)]
    made += [_shapes(source, resolution, length, rng) for _ in range(SHAPES_PER_IMAGE)]
    clips = torch.stack(made)[:, :, ::frame_stride]
    return clips.mul(255).round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=2)
def shipped_clips(resolution: int, frames: int, frame_stride: int = 1) -> tuple[Tensor, Tensor]:
    """(train, val) uint8 clips of shape (N, 3, frames, R, R); the same on every machine."""
    from experiments.tasks.images import TRAIN_IMAGES, VAL_IMAGES

    train = [_clips(n, i, resolution, frames, frame_stride) for i, n in enumerate(TRAIN_IMAGES)]
    val = [_clips(n, 1000 + i, resolution, frames, frame_stride) for i, n in enumerate(VAL_IMAGES)]
    return torch.cat(train), torch.cat(val)


def shipped_counts() -> tuple[int, int]:
    """(training clips, validation clips) that ship, whatever the resolution and length."""
    from experiments.tasks.images import TRAIN_IMAGES, VAL_IMAGES

    per_image = PANS_PER_IMAGE + SHAPES_PER_IMAGE
    return len(TRAIN_IMAGES) * per_image, len(VAL_IMAGES) * per_image
