"""Task ``patches``: a small conv tokenizer (two stride-2 convolutions, the quantizer, two
transposed convolutions) on patches of the natural images that ship with scikit-image and
scikit-learn, split by source image, no downloads; docs/training.md gives the split and the strides.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor, nn

from experiments.config import Config
from experiments.quantizers import build_quantizer
from experiments.tasks import ModelOutput

# skimage.data function names, or sklearn sample image file names. Never reorder: it fixes the data.
TRAIN_IMAGES = ("astronaut", "camera", "coffee", "rocket", "immunohistochemistry", "coins", "moon",
                "grass", "gravel", "brick", "clock", "china.jpg")
VAL_IMAGES = ("chelsea", "flower.jpg", "page")
LFW_TRAIN_FACES = 160  # of the 200 faces in skimage.data.lfw_subset


def _load_image(name: str) -> np.ndarray:
    """(H, W, 3) uint8."""
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(name)
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def _cut(image: np.ndarray, size: int, stride: int) -> np.ndarray:
    """(N, 3, size, size) patches on a regular grid."""
    windows = np.lib.stride_tricks.sliding_window_view(image, (size, size), axis=(0, 1))[::stride, ::stride]
    return windows.reshape(-1, 3, size, size)


def _faces(size: int, train: bool) -> np.ndarray:
    import skimage.data

    faces = skimage.data.lfw_subset()  # (200, 25, 25) float in [0, 1]
    if size > faces.shape[1]:
        return np.zeros((0, 3, size, size), dtype=np.uint8)
    faces = faces[:LFW_TRAIN_FACES] if train else faces[LFW_TRAIN_FACES:]
    top = (faces.shape[1] - size) // 2
    crops = np.round(faces[:, top:top + size, top:top + size] * 255).astype(np.uint8)
    return np.repeat(crops[:, None], 3, axis=1)


@functools.lru_cache(maxsize=4)
def load_patches(patch_size: int) -> tuple[Tensor, Tensor]:
    """(train, val) uint8 tensors of shape (N, 3, P, P); the same on every machine."""
    train = [_cut(_load_image(n), patch_size, patch_size // 2) for n in TRAIN_IMAGES]
    val = [_cut(_load_image(n), patch_size, patch_size) for n in VAL_IMAGES]
    train.append(_faces(patch_size, train=True))
    val.append(_faces(patch_size, train=False))
    return torch.from_numpy(np.concatenate(train)), torch.from_numpy(np.concatenate(val))


class ImagePatches:
    def __init__(self, config: Config):
        self.train, val = load_patches(config.data.patch_size)
        keep = torch.linspace(0, len(val) - 1, min(config.data.val_size, len(val))).round().long()
        self.val = val[keep].float() / 255

    is_image = True

    def to(self, device: torch.device) -> ImagePatches:
        """Move the patches to the device once; batches are then indexed there."""
        self.train, self.val = self.train.to(device), self.val.to(device)
        return self

    def train_batch(self, g: torch.Generator, batch_size: int) -> Tensor:
        index = torch.randint(len(self.train), (batch_size,), generator=g)
        return self.train[index.to(self.train.device)].float() / 255


def build_dataset(config: Config) -> ImagePatches:
    return ImagePatches(config)


class ConvAutoencoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        c, q = config.model.channels, config.quantizer
        self.quantizer = build_quantizer(q, config.model.latent_dim)
        self.inv_temperature = q.inv_temperature
        d = self.quantizer.dim
        # Stride-2 convs with 2x2 kernels (patchify-like) keep a run at minutes on one CPU thread;
        # the 3x3 convs at the token grid give each token context from its neighbours.
        self.encoder = nn.Sequential(
            nn.Conv2d(3, c, 2, stride=2), nn.GELU(),  # P/2
            nn.Conv2d(c, 2 * c, 2, stride=2), nn.GELU(),  # P/4: the token grid
            nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * c, d, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(d, 2 * c, 3, padding=1), nn.GELU(),
            nn.ConvTranspose2d(2 * c, c, 2, stride=2), nn.GELU(),  # P/2
            nn.Conv2d(c, c, 3, padding=1), nn.GELU(),
            nn.ConvTranspose2d(c, 3, 2, stride=2),  # P
        )

    def forward(self, x: Tensor) -> ModelOutput:
        q = self.quantizer(self.encoder(x), inv_temperature=self.inv_temperature)  # (b, d, P/4, P/4)
        return ModelOutput(self.decoder(q.quantized), q.entropy_aux_loss, q.indices)


def build_model(config: Config) -> nn.Module:
    return ConvAutoencoder(config)


def memory(config: Config) -> tuple[dict[str, int], int]:
    """Bytes a run certainly needs for its data (see experiments.resources), and tokens per batch."""
    d, m = config.data, config.model
    sample = 3 * d.patch_size**2
    activations = d.batch_size * (sample + m.channels * sample // 4) * 4
    return {"data.batch_size: one batch and its activations": activations,
            "data.val_size: the validation set": d.val_size * sample * 4}, d.batch_size * max(1, (d.patch_size // 4) ** 2)
