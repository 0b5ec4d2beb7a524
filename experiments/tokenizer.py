"""A MAGVIT-v2-style image tokenizer in Open-MAGVIT2's layout: a convolutional encoder of residual
blocks, a quantizer at a 1x1-projected bottleneck, a mirrored decoder, with the ``tiny`` and
``base`` presets; docs/training.md gives the layout, its source and the presets' table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from experiments.config import ModelConfig

PRESETS = {
    "tiny": {"base_channels": 16, "num_res_blocks": 1,
             "ch_mult": {4: (1, 2, 2), 8: (1, 1, 2, 2), 16: (1, 1, 2, 2, 4)}},
    "base": {"base_channels": 128, "num_res_blocks": 2,
             "ch_mult": {4: (1, 2, 4), 8: (1, 2, 2, 4), 16: (1, 1, 2, 2, 4)}},
}


@dataclass(frozen=True)
class Layout:
    base_channels: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int

    @classmethod
    def of(cls, m: ModelConfig) -> Layout:
        preset = PRESETS[m.preset]
        return cls(base_channels=m.base_channels or preset["base_channels"],
                   ch_mult=tuple(m.ch_mult or preset["ch_mult"][m.downsample]),
                   num_res_blocks=m.num_res_blocks or preset["num_res_blocks"])

    @property
    def channels(self) -> list[int]:
        return [self.base_channels * k for k in self.ch_mult]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.body = nn.Sequential(
            _norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
            _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, layout: Layout, out_channels: int):
        super().__init__()
        chans = layout.channels
        layers: list[nn.Module] = [nn.Conv2d(3, layout.base_channels, 3, padding=1)]
        c = layout.base_channels
        for level, c_level in enumerate(chans):
            for _ in range(layout.num_res_blocks):
                layers.append(ResBlock(c, c_level))
                c = c_level
            if level < len(chans) - 1:
                layers.append(nn.Conv2d(c, c, 4, stride=2, padding=1))  # halves the resolution
        layers += [ResBlock(c, c) for _ in range(layout.num_res_blocks)]
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, out_channels, 1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class Decoder(nn.Module):
    def __init__(self, layout: Layout, in_channels: int):
        super().__init__()
        chans = layout.channels
        c = chans[-1]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, padding=1)]
        layers += [ResBlock(c, c) for _ in range(layout.num_res_blocks)]
        for level in reversed(range(len(chans))):
            for _ in range(layout.num_res_blocks):
                layers.append(ResBlock(c, chans[level]))
                c = chans[level]
            if level > 0:
                layers.append(Upsample(c))
        layers += [_norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1)]
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(z)
