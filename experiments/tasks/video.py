"""Task ``video``: a MAGVIT-v2-style causal 3D CNN tokenizer (``experiments/video_tokenizer.py``) on
the user's videos (``data.root``: ``experiments/video_folder.py``) or on the clips made from the
shipped images (``experiments/video_clips.py``), kept on the device; docs/training.md ("Video").

    python -m experiments.train experiments/configs/video.yaml                      # shipped clips
    python -m experiments.train experiments/configs/video.yaml data.root=~/videos
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from experiments.config import Config, ConfigError
from experiments.data import loader_kwargs, train_loader
from experiments.image_folder import (
    FINGERPRINT_KEYS,
    Fingerprints,
    Note,
    data_change,
    describe_size,
    even_subset,
    fingerprint,
)
from experiments.quantizers import build_quantizer
from experiments.tasks import ModelOutput
from experiments.tokenizer import Layout
from experiments.video_clips import shipped_clips
from experiments.video_folder import Clip, TrainVideos, ValVideos, check_val_videos, collate, list_videos
from experiments.video_tokenizer import VideoDecoder, VideoEncoder, token_steps

VALUE_RANGE = (-1.0, 1.0)


def to_model_input(batch: Tensor) -> Tensor:
    """uint8 (b, 3, T, R, R) -> float in [-1, 1]; on the device, after the (4x smaller) transfer."""
    return batch.float().div_(127.5).sub_(1.0)


class ShippedVideos:
    """The clips made from the shipped images (``experiments.video_clips``), in memory, on the device after ``to``."""

    value_range = VALUE_RANGE
    is_image = True  # SSIM per frame
    item_name = "video"

    def __init__(self, config: Config):
        d = config.data
        self.train, val = shipped_clips(d.resolution, d.frames, d.frame_stride)
        self.val_uint8 = val[even_subset(len(val), d.val_size)]

    @property
    def val(self) -> Tensor:
        return to_model_input(self.val_uint8)

    def to(self, device: torch.device) -> ShippedVideos:
        self.train, self.val_uint8 = self.train.to(device), self.val_uint8.to(device)
        return self

    def describe(self) -> str:
        return (f"clips made from the shipped images: {len(self.train)} training, {len(self.val_uint8)} validation, "
                f"{self.train.shape[2]} frames at {self.train.shape[-1]} px")

    def train_batch(self, g: torch.Generator, batch_size: int) -> Tensor:
        index = torch.randint(len(self.train), (batch_size,), generator=g)
        flip = torch.rand(batch_size, generator=g) < 0.5
        clips = self.train[index.to(self.train.device)]
        clips = torch.where(flip.to(clips.device)[:, None, None, None, None], clips.flip(-1), clips)
        return to_model_input(clips)


class FolderVideos:
    """Read and decoded by DataLoader workers; the validation clips are fixed (and their videos
    checked) here, so every count printed about them is known before training."""

    value_range = VALUE_RANGE
    is_image = True
    item_name = "video"
    to_model_input = staticmethod(to_model_input)

    def __init__(self, config: Config):
        d = config.data
        self.listing = list_videos(d.root, d.val_fraction, d.split_file)
        self.fingerprint = fingerprint(self.listing)
        self.clip = Clip(d.frames, d.frame_stride, d.resolution)
        val_clips, self.notes = check_val_videos(self.listing.val, self.clip, d.val_size)
        if not val_clips:
            raise ConfigError(f"data.root={d.root!r}: none of the {len(self.listing.val)} validation videos gives a "
                              f"clip of {self.clip.length} frames ({count_notes(self.notes)}): add videos, or lower "
                              f"data.frames / data.frame_stride")
        self.train_set = TrainVideos(self.listing.train, self.clip)
        self.val_set = ValVideos(val_clips, self.clip)

    def describe(self) -> str:
        ls = self.listing
        extra = f", {len(ls.skipped)} videos of data.split_file not found" if ls.skipped else ""
        noted = f" (left out: {count_notes(self.notes, names=True)})" if self.notes else ""
        videos = len({path for path, _, _ in self.val_set.clips})
        return (f"{ls.root} ({ls.layout}, {describe_size(self.fingerprint)}){extra}: {len(ls.train)} training videos; "
                f"validation uses {len(self.val_set)} clips of {videos} of the {len(ls.val)} validation "
                f"videos{noted}; clips of {self.clip.frames} frames "
                f"{'in a row' if self.clip.stride == 1 else f'(every {self.clip.stride}th)'} at "
                f"{self.clip.resolution} px; training videos that cannot give one are skipped and counted")

    def record(self) -> dict[str, Any]:
        return {**self.fingerprint, "val_images": len(self.val_set)}

    def train_loader(self, config: Config, device: torch.device, start: int, rows: slice) -> DataLoader:
        return train_loader(self.train_set, config, device, start, rows, collate)

    def val_loader(self, config: Config, device: torch.device, rank: int, world: int,
                   batch_size: int) -> DataLoader:
        shard = list(range(len(self.val_set)))[rank::world]  # a clip is frames x an image: 1/16 of the batch
        return DataLoader(Subset(self.val_set, shard), batch_size=max(1, batch_size // 16), shuffle=False,
                          collate_fn=collate, **loader_kwargs(config, device))


def count_notes(notes: list[Note], names: bool = False) -> str:
    """``1 unreadable, 2 too short`` (with ``names``: the first of each kind)."""
    parts = []
    for kind, word in (("unreadable", "unreadable"), ("short", "too short")):
        of_kind = [n for n in notes if n.kind == kind]
        if of_kind:
            first = f": {of_kind[0].text}" + (", ..." if len(of_kind) > 1 else "") if names else ""
            parts.append(f"{len(of_kind)} {word}{first}")
    return "; ".join(parts)


def build_dataset(config: Config) -> ShippedVideos | FolderVideos:
    return FolderVideos(config) if config.data.root else ShippedVideos(config)


RECONSTRUCTS_IMAGES = True  # LPIPS and the discriminator see every frame as an image (experiments.objective)


def check(config: Config) -> None:
    """What can fail before a run folder is written: the clip length, the data root, the I3D weights.
    (Time is halved at most twice, and every layout has at least two levels: model.downsample >= 4.)"""
    d, m = config.data, config.model
    if (d.frames - 1) % m.temporal_downsample:
        raise ConfigError(f"data.frames={d.frames} is not 1 + a multiple of model.temporal_downsample="
                          f"{m.temporal_downsample}: use e.g. {1 + m.temporal_downsample * max(1, (d.frames - 1) // m.temporal_downsample)}")
    if d.resolution % m.downsample:
        raise ConfigError(f"data.resolution={d.resolution} is not a multiple of model.downsample={m.downsample}: "
                          f"pick a downsampling factor that divides it")
    if d.root:
        import importlib.util

        if importlib.util.find_spec("av") is None:
            raise ConfigError("data.root with task=video needs PyAV to decode videos: pip install 'av>=12'")
        list_videos(d.root, d.val_fraction, d.split_file)
    if config.eval.fvd_weights:
        from experiments.perceptual import WeightsError
        from experiments.video_fvd import i3d_extractor

        try:
            i3d_extractor(config.eval.fvd_weights)
        except WeightsError as e:
            raise ConfigError(str(e)) from None


def data_change_since(config: Config, recorded: Mapping[str, Any], fingerprints: Fingerprints) -> str:
    """'' unless a finished run on ``data.root`` recorded a fingerprint and the folder now differs."""
    if not config.data.root or not all(k in recorded for k in FINGERPRINT_KEYS):
        return ""
    try:
        now: dict[str, Any] | str = fingerprint(list_videos(config.data.root, config.data.val_fraction,
                                                            config.data.split_file))
    except ConfigError as e:
        now = str(e)
    return data_change(recorded, now)


class VideoTokenizer(nn.Module):
    """(b, 3, T, H, W) -> tokens (b, 1 + (T-1)/s, H/f, W/f); an image batch (b, 3, H, W) is a one-frame video."""

    def __init__(self, config: Config):
        super().__init__()
        q, m = config.quantizer, config.model
        self.quantizer = build_quantizer(q, m.latent_dim)
        self.inv_temperature = q.inv_temperature
        self.layout = Layout.of(m)
        self.encoder = VideoEncoder(self.layout, self.quantizer.dim, m.temporal_downsample)
        self.decoder = VideoDecoder(self.layout, self.quantizer.dim, m.temporal_downsample)

    def forward(self, x: Tensor) -> ModelOutput:
        image = x.dim() == 4
        if image:
            x = x[:, :, None]
        q = self.quantizer(self.encoder(x), inv_temperature=self.inv_temperature)
        recon, indices = self.decoder(q.quantized), q.indices
        if image:
            recon, indices = recon[:, :, 0], indices[:, 0]
        return ModelOutput(recon, q.entropy_aux_loss, indices)


def build_model(config: Config) -> nn.Module:
    return VideoTokenizer(config)


def tokens_per_clip(config: Config) -> int:
    d, m = config.data, config.model
    return token_steps(d.frames, m.temporal_downsample) * (d.resolution // m.downsample) ** 2


def memory(config: Config) -> tuple[dict[str, int], int]:
    """Bytes a run certainly needs for its data, and tokens per batch: a float32 batch and its reconstruction."""
    d = config.data
    sample = 3 * d.frames * d.resolution**2
    return ({"data.batch_size: one batch of clips and its reconstruction": 2 * d.batch_size * sample * 4},
            d.batch_size * tokens_per_clip(config))
