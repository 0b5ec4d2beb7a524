"""Task ``prior``: a token prior (``experiments/prior_model.py``) trained on the codes of a finished
tokenizer run (``data.tokenizer_run``), which ``experiments.token_cache`` encodes once; validation
reports the bits per token and per image of the validation tokens, and the last validation draws
``eval.prior_samples`` samples for their code usage, their KL to the validation histogram, a grid of
decoded samples (``samples.png``) and gFID; docs/training.md ("Token prior") defines every column.

    python -m experiments.train experiments/configs/prior.yaml data.tokenizer_run=images/<run_id>
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from experiments import distributed as ddp
from experiments.config import Config, ConfigError
from experiments.files import atomic_write
from experiments.prior_model import PRESETS, PriorShape, TokenPrior
from experiments.token_cache import (
    cache_root_of,
    cached_tokens,
    find_tokenizer,
    image_splits,
    load_tokenizer,
    train_images_for,
)

HAS_QUANTIZER = False  # the training loop runs no quantizer monitor and no quantizer schedules
LOSS_KEYS = ("loss",)  # the training row's loss: nats per token
DATASET_IN_RUN_FOLDER = True  # build_dataset(config, run_dir): the token cache lives beside the run folder
SAMPLES_PNG = "samples.png"
GRID_SAMPLES = 16  # decoded samples in samples.png (4 x 4)
SAMPLE_BATCH = 256
KL_SMOOTHING = 0.5  # pseudo-count added to every code of both histograms before the KL


def resolve_inputs(config: Config, run_dir: Path | None) -> Config:
    """The config with ``data.tokenizer_run`` as the absolute folder it names (ConfigError if that is
    not a finished tokenizer run); the run id is unchanged (it takes the folder's name)."""
    results_root = Path(run_dir).parent.parent if run_dir is not None else None
    folder = find_tokenizer(config.data.tokenizer_run, results_root)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, tokenizer_run=str(folder)))


def tokenizer_config(config: Config) -> Config:
    from common.run_state import read_object

    raw, err = read_object(Path(config.data.tokenizer_run) / "config.json")
    if raw is None:
        raise ConfigError(f"data.tokenizer_run={config.data.tokenizer_run!r}: {err}")
    return Config.from_dict(raw).resolved()


def codebook_size_of(tokenizer: Config) -> int:
    """Codes the tokenizer's quantizer can emit (FSQ's: the product of its levels)."""
    q = tokenizer.quantizer
    if q.kind == "fsq":
        return math.prod(q.resolved_fsq_levels())
    return q.codebook_size


def shape_of(config: Config) -> PriorShape:
    from experiments.tasks.images import tokens_per_image

    tokenizer, m = tokenizer_config(config), config.model
    preset = PRESETS[m.preset]
    return PriorShape(codebook_size=codebook_size_of(tokenizer), length=tokens_per_image(tokenizer), head=m.head,
                      factors=m.factors, width=m.width or preset["width"], layers=m.layers or preset["layers"],
                      attention_heads=m.attention_heads or preset["attention_heads"])


def check(config: Config) -> None:
    """The model fits the tokenizer's codes (after :func:`resolve_inputs`)."""
    problem = shape_of(config).problem()
    if problem:
        raise ConfigError(problem)


class TokenData:
    """The tokenizer's codes, in memory (on the device after ``to``): ``train`` and ``val`` (N, L) int64."""

    def __init__(self, config: Config, run_dir: Path | None):
        folder = Path(config.data.tokenizer_run)
        root = cache_root_of(run_dir) or folder.parent
        data = cached_tokens(folder, root, train_images_for(config), log=lambda s: print(f"[{config.run_id}] {s}", flush=True)
                             if ddp.is_main() else None)
        self.folder, self.grid = folder, tuple(int(v) for v in data["grid"])
        self.codebook_size, self.train = data["codebook_size"], data["train"]
        val = data["val"]
        keep = torch.linspace(0, len(val) - 1, min(config.data.val_size, len(val))).round().long()
        self.val = val[keep.unique()]

    def describe(self) -> str:
        n, length = self.train.shape
        return (f"the codes of tokenizer {self.folder.name} ({self.folder}): {n} training and {len(self.val)} "
                f"validation images of {length} tokens ({self.grid[0]} x {self.grid[1]}), {self.codebook_size} codes")

    def to(self, device: torch.device) -> TokenData:
        self.train, self.val = self.train.to(device), self.val.to(device)
        return self

    def train_batch(self, g: torch.Generator, batch_size: int) -> Tensor:
        index = torch.randint(len(self.train), (batch_size,), generator=g)
        return self.train[index.to(self.train.device)]


def build_dataset(config: Config, run_dir: Path | None = None) -> TokenData:
    return TokenData(config, run_dir)


def build_model(config: Config) -> nn.Module:
    return TokenPrior(shape_of(config))


def train_loss(net: nn.Module, codes: Tensor) -> Tensor:
    """[the mean negative log-likelihood in nats per token] (the value minimised)."""
    return (-net(codes).mean())[None]


def memory(config: Config) -> tuple[dict[str, int], int]:
    """Bytes a run certainly needs: the logits of a batch (K per token, or the bits') and their gradient.
    Nothing while ``data.tokenizer_run`` is a path relative to a results root not known here (a
    sweep's, before its jobs resolve it)."""
    b = config.data.batch_size
    try:
        s = shape_of(config)
    except ConfigError:
        return {}, b
    per_token = {"full": s.codebook_size, "bitwise": s.bits}.get(s.head, sum(2**f for f in s.resolved_factors()))
    return {"data.batch_size: the logits of a batch and their gradient": 2 * b * s.length * per_token * 4}, b * s.length


def decode(tokenizer: nn.Module, codes: Tensor, grid: tuple[int, int]) -> Tensor:
    """(b, L) codes -> (b, 3, R, R) images through the tokenizer's decoder (its quantizer's codes of the indices)."""
    from lfq import LFQ

    q = tokenizer.quantizer
    indices = codes.reshape(codes.shape[0], *grid)
    if isinstance(q, LFQ):
        z = q.indices_to_codes(indices)  # channel-first, projected out
    else:
        z = q.project_out(q.indices_to_codes(indices)).permute(0, 3, 1, 2)
    return tokenizer.decoder(z)


def histogram(codes: Tensor, k: int) -> Tensor:
    return torch.bincount(codes.reshape(-1).long(), minlength=k).double()


def kl_bits(p_counts: Tensor, q_counts: Tensor, smoothing: float = KL_SMOOTHING) -> float:
    """KL(P || Q) in bits, P and Q the histograms with ``smoothing`` added to every code."""
    p = (p_counts + smoothing) / (p_counts.sum() + smoothing * len(p_counts))
    q = (q_counts + smoothing) / (q_counts.sum() + smoothing * len(q_counts))
    return float((p * (p / q).log2()).sum())


def save_grid(images: Tensor, path: Path, value_range: tuple[float, float] = (-1.0, 1.0)) -> None:
    """A square grid of (n, 3, R, R) images, PNG, written atomically."""
    from PIL import Image

    lo, hi = value_range
    n = images.shape[0]
    side = math.ceil(math.sqrt(n))
    r = images.shape[-1]
    pixels = ((images.float().clamp(lo, hi) - lo) / (hi - lo) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    canvas = np.full((side * r, side * r, 3), 255, np.uint8)
    for i in range(n):
        canvas[(i // side) * r:(i // side + 1) * r, (i % side) * r:(i % side + 1) * r] = pixels[i]
    atomic_write(path, lambda f: Image.fromarray(canvas).save(f, format="PNG"), mode="wb")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Tensor], *, device: torch.device, config: Config,
             dataset: TokenData, run_dir: Path, final: bool, main: bool,
             autocast: Callable[[], Any] | None = None, fid: Any = None) -> dict[str, float]:
    """Bits per token and per image of the validation tokens (this rank's share, summed over ranks);
    at the ``final`` validation also the samples' metrics, ``samples.png`` and gFID (rank 0 draws)."""
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    images = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    try:
        for codes in batches:
            if codes.shape[0] == 0:
                continue
            with autocast() if autocast is not None else contextlib.nullcontext():
                log_p = model(codes)
            nats -= log_p.double().sum()
            images += codes.shape[0]
            tokens = codes.shape[1]
        if ddp.is_distributed():
            nats, images = ddp.all_sum(nats), ddp.all_sum(images)
        per_image = (nats / images).item() / math.log(2)
        out = {"val_loss": (nats / images).item() / tokens, "val_bits_per_token": per_image / tokens,
               "val_bits_per_image": per_image}
        if final and main:
            out.update(sample_metrics(model, config, dataset, run_dir, device, fid))
    finally:
        model.train(was_training)
    return out


def sample_metrics(model: TokenPrior, config: Config, dataset: TokenData, run_dir: Path, device: torch.device,
                   fid: Any) -> dict[str, float]:
    """``eval.prior_samples`` samples at temperature 1, drawn with a generator of the run's seed (the
    same samples on a resumed run): their code usage, KL(validation || samples), a decoded grid, gFID."""
    k, count = dataset.codebook_size, config.eval.prior_samples
    g = torch.Generator(device=device).manual_seed(config.seed)
    samples = torch.cat([model.sample(min(SAMPLE_BATCH, count - i), g) for i in range(0, count, SAMPLE_BATCH)])
    counts = histogram(samples, k)
    used = int((counts > 0).sum())
    out = {"sample_codes_used": used, "sample_usage_fraction": used / k,
           "sample_kl": kl_bits(histogram(dataset.val, k).to(counts.device), counts),
           "sample_tokens": samples.numel()}
    with torch.random.fork_rng(devices=[]):  # its init draws from the CPU generator: from a copy
        loaded = load_tokenizer(dataset.folder)
    tokenizer = loaded.model.to(device)
    save_grid(decode(tokenizer, samples[:GRID_SAMPLES], dataset.grid), Path(run_dir) / SAMPLES_PNG)
    if fid is not None:
        for real in image_splits(loaded.config, 0)[1]:
            fid.add(real.to(device), (-1.0, 1.0), real=True)
        for i in range(0, count, SAMPLE_BATCH):
            fid.add(decode(tokenizer, samples[i:i + SAMPLE_BATCH], dataset.grid), (-1.0, 1.0), real=False)
        out["val_gfid"] = fid.compute()
        fid.metric.reset()
    return out
