"""A MAGVIT-v2-style causal 3D CNN video tokenizer: every convolution pads time with copies of the
first frame on the past side only and normalises each frame on its own, so the tokens of time step
``j`` depend on frames ``0 .. j * s`` alone (``s`` = ``model.temporal_downsample``); the first frame
is a token step of its own and a one-frame video is tokenized as the image it is. ``T`` frames give
``1 + (T - 1) / s`` token steps; the decoder mirrors the encoder (time upsampled by depth-to-time,
dropping the ``s - 1`` frames before the first). The channel layout is the image tokenizer's
(``experiments.tokenizer.Layout``, presets ``tiny`` and ``base``); docs/training.md ("Video") cites it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from experiments.tokenizer import Layout


def frames_as_images(x: Tensor) -> Tensor:
    """(b, c, t, h, w) -> (b * t, c, h, w), frame-major within each video."""
    return x.transpose(1, 2).flatten(0, 1)


def images_as_frames(x: Tensor, frames: int) -> Tensor:
    """The inverse of :func:`frames_as_images`."""
    return x.unflatten(0, (-1, frames)).transpose(1, 2)


class FrameNorm(nn.Module):
    """GroupNorm over each frame on its own (a norm over time would let later frames move earlier tokens)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        return images_as_frames(self.norm(frames_as_images(x)), x.shape[2])


class CausalConv3d(nn.Module):
    """A 3D convolution whose time axis sees only the present and the past: ``kt - 1`` copies of
    the first frame are put before it; space is padded on both sides as a 2D convolution's."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int] = (3, 3, 3),
                 stride: tuple[int, int, int] = (1, 1, 1), padding: int | None = None):
        super().__init__()
        kt, kh, kw = kernel
        self.time_pad = kt - 1
        pad = kh // 2 if padding is None else padding
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride, padding=(0, pad, pad))

    def forward(self, x: Tensor) -> Tensor:
        if self.time_pad:
            x = torch.cat([x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1), x], dim=2)
        return self.conv(x)


class ResBlock3d(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(FrameNorm(c_in), nn.SiLU(), CausalConv3d(c_in, c_out),
                                  FrameNorm(c_out), nn.SiLU(), CausalConv3d(c_out, c_out))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv3d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class Downsample3d(nn.Module):
    """Space halved; time by ``time_stride`` (1 or 2): ``T`` frames -> ``1 + (T - 1) / 2``, the
    first output from the first frame alone."""

    def __init__(self, channels: int, time_stride: int):
        super().__init__()
        self.conv = CausalConv3d(channels, channels, (3, 4, 4), stride=(time_stride, 2, 2), padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample3d(nn.Module):
    """Space doubled (nearest, then a causal convolution); time by ``time_factor`` (1 or 2): a
    causal convolution to ``time_factor`` times the channels, depth-to-time, the first
    ``time_factor - 1`` frames dropped, so ``t`` steps -> ``1 + (t - 1) * time_factor`` frames."""

    def __init__(self, channels: int, time_factor: int):
        super().__init__()
        self.time_factor = time_factor
        self.time = CausalConv3d(channels, channels * time_factor) if time_factor > 1 else None
        self.conv = CausalConv3d(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        if self.time is not None:
            s = self.time_factor
            y = self.time(x)  # (b, s*c, t, h, w)
            b, _, t, h, w = y.shape
            y = y.view(b, s, -1, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, t * s, h, w)
            x = y[:, :, s - 1:]
        x = nn.functional.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
        return self.conv(x)


def time_strides(layout: Layout, temporal_downsample: int) -> list[int]:
    """The time stride of each downsampling level: 2 at the last log2(temporal_downsample) levels."""
    levels = len(layout.ch_mult) - 1
    halvings = round(math.log2(temporal_downsample))
    if halvings > levels:
        raise ValueError(f"model.temporal_downsample={temporal_downsample} needs {halvings} downsampling levels; "
                         f"the layout has {levels}")
    return [2 if level >= levels - halvings else 1 for level in range(levels)]


class VideoEncoder(nn.Module):
    def __init__(self, layout: Layout, out_channels: int, temporal_downsample: int):
        super().__init__()
        chans, strides = layout.channels, time_strides(layout, temporal_downsample)
        layers: list[nn.Module] = [CausalConv3d(3, layout.base_channels)]
        c = layout.base_channels
        for level, c_level in enumerate(chans):
            for _ in range(layout.num_res_blocks):
                layers.append(ResBlock3d(c, c_level))
                c = c_level
            if level < len(chans) - 1:
                layers.append(Downsample3d(c, strides[level]))
        layers += [ResBlock3d(c, c) for _ in range(layout.num_res_blocks)]
        layers += [FrameNorm(c), nn.SiLU(), nn.Conv3d(c, out_channels, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class VideoDecoder(nn.Module):
    def __init__(self, layout: Layout, in_channels: int, temporal_downsample: int):
        super().__init__()
        chans, strides = layout.channels, time_strides(layout, temporal_downsample)
        c = chans[-1]
        layers: list[nn.Module] = [CausalConv3d(in_channels, c)]
        layers += [ResBlock3d(c, c) for _ in range(layout.num_res_blocks)]
        for level in reversed(range(len(chans))):
            for _ in range(layout.num_res_blocks):
                layers.append(ResBlock3d(c, chans[level]))
                c = chans[level]
            if level > 0:
                layers.append(Upsample3d(c, strides[level - 1]))
        layers += [FrameNorm(c), nn.SiLU(), CausalConv3d(c, 3)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z)


def token_steps(frames: int, temporal_downsample: int) -> int:
    """Token steps in time of a clip of ``frames`` frames: ``1 + (frames - 1) / temporal_downsample``."""
    return 1 + (frames - 1) // temporal_downsample
