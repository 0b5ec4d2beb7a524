"""LPIPS, the perceptual distance of Zhang et al. (2018) that VQGAN, MAGVIT-v2 and Open-MAGVIT2 add to
the reconstruction loss, written here in torch: a frozen VGG16 trunk, unit-normalised features at
five depths, squared differences weighted per channel by LPIPS's linear layers, averaged over space
and summed over depths. The weights are the user's (docs/training.md, "Perceptual loss"): one file
holding the trunk in torchvision's names and the five linear layers in LPIPS's, which
``python -m experiments.perceptual VGG16.pth LPIPS_VGG.pth --out lpips_vgg16.pt`` writes from the
two published files. Files are read with ``torch.load(weights_only=True)``: nothing in them runs.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from common.cli import OneLineParser, fail, guarded

# VGG16's convolutions (torchvision's ``features`` indices) and the ReLU after which LPIPS reads each
# depth: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16 = ((0, 3, 64), (2, 64, 64), "pool", (5, 64, 128), (7, 128, 128), "pool",
         (10, 128, 256), (12, 256, 256), (14, 256, 256), "pool",
         (17, 256, 512), (19, 512, 512), (21, 512, 512), "pool",
         (24, 512, 512), (26, 512, 512), (28, 512, 512))
TAPS = (2, 64), (7, 128), (14, 256), (21, 512), (28, 512)  # (last conv index of a depth, its channels)
# LPIPS's input scaling: images in [-1, 1] are shifted and scaled to the statistics VGG16 was trained on
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


def trunk_keys() -> dict[str, tuple[int, ...]]:
    """torchvision's VGG16 ``features`` keys the trunk needs, with their shapes."""
    keys: dict[str, tuple[int, ...]] = {}
    for layer in VGG16:
        if layer != "pool":
            index, cin, cout = layer
            keys[f"features.{index}.weight"] = (cout, cin, 3, 3)
            keys[f"features.{index}.bias"] = (cout,)
    return keys


def linear_keys() -> dict[str, tuple[int, ...]]:
    """LPIPS's linear-layer keys (``lin<i>.model.1.weight``, as its published ``vgg.pth`` names them)."""
    return {f"lin{i}.model.1.weight": (1, chans, 1, 1) for i, (_, chans) in enumerate(TAPS)}


class WeightsError(ValueError):
    """A perceptual weights file cannot be used; the message names the file and what is wrong."""


def read_state(path: str | Path, needs: Mapping[str, tuple[int, ...]], what: str) -> dict[str, torch.Tensor]:
    """The tensors ``needs`` names from the torch file at ``path``, checked for presence and shape."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"{what} file {path} does not exist or is not a file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for a file that is not its own
        raise WeightsError(f"{what} file {path} is not a torch weights file that loads safely "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{what} file {path} holds a {type(state).__name__}, not a dict of tensors")
    found: dict[str, torch.Tensor] = {}
    for key, shape in needs.items():
        value = state.get(key)
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{what} file {path} has no tensor {key!r} (a {what} file holds "
                               f"{len(needs)} tensors named like {next(iter(needs))!r})")
        if tuple(value.shape) != shape:
            raise WeightsError(f"{what} file {path}: {key} has shape {tuple(value.shape)}, expected {shape}")
        if not torch.isfinite(value).all():
            raise WeightsError(f"{what} file {path}: {key} holds NaN or infinite values")
        found[key] = value.float()
    return found


class LPIPS(nn.Module):
    """The LPIPS distance between two batches of images in [-1, 1]: ``forward(a, b)`` -> ``(batch,)``.

    Built with random weights (tests, plumbing) unless :meth:`from_file` loads the real ones. Frozen:
    no parameter takes gradients and the module stays in eval mode, but gradients flow to the inputs.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        self.taps: list[int] = []  # indices into self.features after which a depth is read
        for layer in VGG16:
            if layer == "pool":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            index, cin, cout = layer
            assert len(layers) == index, "VGG16's layer list keeps torchvision's features indices"
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
            if index in {i for i, _ in TAPS}:
                self.taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(chans, 1, 1, bias=False) for _, chans in TAPS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        for lin in self.lins:  # LPIPS's linear weights are non-negative; random ones too
            nn.init.uniform_(lin.weight, 0.0, 2.0 / lin.weight.shape[1])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # frozen: no dropout, no batch statistics, whatever the caller's mode

    @classmethod
    def from_file(cls, path: str | Path) -> LPIPS:
        """LPIPS with the trunk and linear layers of the file at ``path`` (:class:`WeightsError` if unusable)."""
        state = read_state(path, {**trunk_keys(), **linear_keys()}, "perceptual weights")
        model = cls()
        model.load_state(state)
        return model

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, value in state.items():
                if key.startswith("features."):
                    _, index, name = key.split(".")
                    getattr(self.features[int(index)], name).copy_(value)
                else:
                    self.lins[int(key[3])].weight.copy_(value)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.shape != b.shape or a.dim() != 4 or a.shape[1] != 3:
            raise ValueError(f"LPIPS compares two (batch, 3, height, width) batches of one shape, got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        x = torch.cat([a, b]).float()
        x = (x - self.shift) / self.scale
        total = x.new_zeros(a.shape[0])
        depth = 0
        for i, layer in enumerate(self.features):
            x = layer(x)
            if depth < len(self.taps) and i == self.taps[depth]:
                feats = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + NORM_EPS)
                fa, fb = feats.chunk(2)
                total = total + self.lins[depth]((fa - fb).pow(2)).mean(dim=(1, 2, 3))
                depth += 1
                if depth == len(self.taps):
                    break
        return total


def combine(vgg_path: str | Path, lpips_path: str | Path, out: str | Path) -> Path:
    """Write the one weights file ``loss.perceptual_weights`` reads from torchvision's VGG16 file and
    LPIPS's linear layers; both are checked first, the output is written atomically."""
    state = {**read_state(vgg_path, trunk_keys(), "VGG16"), **read_state(lpips_path, linear_keys(), "LPIPS linear")}
    out = Path(out).expanduser()
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m experiments.perceptual",
                           description="Combine torchvision's VGG16 weights and LPIPS's linear layers into the "
                                       "file loss.perceptual_weights reads.")
    parser.add_argument("vgg16", help="torchvision's vgg16-397923af.pth (or any file with its features.* keys)")
    parser.add_argument("lpips", help="LPIPS's linear layers, weights/v0.1/vgg.pth of the lpips package")
    parser.add_argument("--out", required=True, help="where to write the combined file")
    args = parser.parse_args(argv)
    try:
        path = combine(args.vgg16, args.lpips, args.out)
    except (WeightsError, OSError) as err:
        return fail(err)
    print(f"wrote {path}: loss.perceptual_weights={path}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
