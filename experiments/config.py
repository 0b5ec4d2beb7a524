"""The run config: frozen, typed dataclasses, validated when they are built.

A config is loaded from YAML plus dotted ``key=value`` overrides::

    config = load_config("experiments/configs/synthetic.yaml", ["quantizer.codebook_size=512", "scale=smoke"])

``scale: smoke`` is big_vision's ``runlocal`` switch: :meth:`Config.resolved` shrinks any config
to a run of seconds (fewer steps, smaller batches and validation set, denser logging). The
trainer always runs ``config.resolved()`` and saves that, so ``config.json`` says exactly what
ran. The run id hashes the resolved config without ``name`` and ``logging``, which do not change
results; two smoke configs that shrink to the same run share one id.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from experiments.run_dir import name_problem
from lfq.entropy import ENTROPY_KERNELS

TASKS = ("images", "synthetic", "patches")
SCALES = ("full", "smoke")
QUANTIZER_KINDS = ("lfq", "bsq", "vq", "fsq")  # bsq: LFQ on the sphere (spherical=True)
RUN_ID_LENGTH = 10
# Sections that do not change what a run computes, hence not part of its id.
NOT_IN_RUN_ID = ("name", "logging")
# Fields added after run ids were first published enter the id only when set away from their
# default, so every earlier run folder keeps its id (see ``new_field``). Fields marked
# ``in_run_id=False`` never enter it: they change where and how fast a run computes, not what.
IMAGE_RESOLUTIONS = (16, 32, 64, 128, 256, 512)
MODEL_PRESETS = ("tiny", "base")
PRECISIONS = ("fp32", "bf16", "fp16")


def new_field(default: Any, *, in_run_id: bool = True) -> Any:
    """A field added after the first run ids: omitted from the id while it holds ``default``."""
    kwargs = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return field(metadata={"new": True, "in_run_id": in_run_id}, **kwargs)

# FSQ paper (arXiv 2309.15505), Table 1: the levels it recommends for each target size.
FSQ_PAPER_LEVELS: dict[int, tuple[int, ...]] = {
    2**8: (8, 6, 5), 2**10: (8, 5, 5, 5), 2**12: (7, 5, 5, 5, 5), 2**14: (8, 8, 8, 6, 5), 2**16: (8, 8, 8, 5, 5, 5),
}


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the dotted field and what is allowed."""


def _is_power_of_two(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    _check(value in choices, name, value, f"must be one of {list(choices)}{hint}")


def default_fsq_levels(codebook_size: int) -> tuple[int, ...]:
    """The paper's levels for its sizes; otherwise levels of 8, 4, 2 whose product is the size."""
    if codebook_size in FSQ_PAPER_LEVELS:
        return FSQ_PAPER_LEVELS[codebook_size]
    bits = round(math.log2(codebook_size))
    if 2**bits != codebook_size:
        raise ConfigError(
            f"quantizer.codebook_size={codebook_size!r} is invalid for kind='fsq' without "
            f"quantizer.fsq_levels: give a power of two or explicit quantizer.fsq_levels"
        )
    levels = [8] * (bits // 3) + {0: [], 1: [2], 2: [4]}[bits % 3]
    return tuple(sorted(levels, reverse=True))


class _Section:
    """A config section: fields are type-checked (int widened to float, list to tuple), then validated."""

    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _coerce_fields(self, self._prefix)
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class DataConfig(_Section):
    _prefix: ClassVar[str] = "data."
    batch_size: int = 256
    val_size: int = 2048  # validation examples (patches: at most this many, evenly spread)
    # synthetic: a Gaussian mixture in [0, 1]^input_dim, fixed by mixture_seed.
    input_dim: int = 32
    num_clusters: int = 64
    cluster_std: float = 0.05
    mixture_seed: int = 0
    # patches: square RGB patches in [0, 1] cut from the images shipped with skimage/sklearn.
    patch_size: int = 16
    # images: a folder (searched recursively; train/ + val/ if it has both), or a text file of
    # paths; None = crops of the images that ship with scikit-image/scikit-learn (no download).
    root: str | None = new_field(None)
    resolution: int = new_field(64)  # images: square side in pixels, values in [-1, 1]
    val_fraction: float = new_field(0.05)  # images without val/: share of files (by path hash) held out

    def validate(self) -> None:
        _check(self.resolution in IMAGE_RESOLUTIONS, "data.resolution", self.resolution,
               f"must be one of {list(IMAGE_RESOLUTIONS)}")
        _check(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction, "must be in (0, 1)")
        _check(self.root is None or bool(self.root.strip()), "data.root", self.root,
               "must be a folder or a text file of image paths, or null for the shipped images")
        for name in ("batch_size", "val_size", "input_dim", "num_clusters"):
            _check(getattr(self, name) >= 1, f"data.{name}", getattr(self, name), "must be >= 1")
        _check(self.cluster_std > 0, "data.cluster_std", self.cluster_std, "must be > 0")
        _check(self.patch_size in (16, 32), "data.patch_size", self.patch_size, "must be 16 or 32")


@dataclass(frozen=True)
class ModelConfig(_Section):
    _prefix: ClassVar[str] = "model."
    hidden_dim: int = 256  # synthetic: width of the MLP
    depth: int = 2  # synthetic: hidden layers in the encoder and in the decoder
    channels: int = 32  # patches: channels of the first conv; doubled after the first downsampling
    latent_dim: int | None = None  # channels fed to the quantizer; None = its natural size (no projection)
    # images: a MAGVIT-v2-style encoder/decoder (experiments/tokenizer.py). The preset sets the
    # rest; any of the None fields overrides it.
    preset: str = new_field("tiny")  # tiny (CPU minutes at 32-64 px) | base (Open-MAGVIT2's 128-px layout)
    downsample: int = new_field(8)  # pixels per token side: 4, 8 or 16
    base_channels: int | None = new_field(None)  # channels of the first level
    ch_mult: tuple[int, ...] | None = new_field(None)  # channel multiplier per level (len = log2(downsample) + 1)
    num_res_blocks: int | None = new_field(None)  # residual blocks per level

    def validate(self) -> None:
        for name in ("hidden_dim", "depth", "channels"):
            _check(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "must be >= 1")
        _check_choice("model.preset", self.preset, MODEL_PRESETS)
        _check(self.downsample in (4, 8, 16), "model.downsample", self.downsample, "must be 4, 8 or 16")
        for name in ("base_channels", "num_res_blocks"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"model.{name}", value, "must be >= 1 or null")
        if self.ch_mult is not None:
            levels = round(math.log2(self.downsample)) + 1
            _check(len(self.ch_mult) == levels and all(m >= 1 for m in self.ch_mult), "model.ch_mult",
                   self.ch_mult, f"must be {levels} ints >= 1 for model.downsample={self.downsample} "
                   f"(one per level; a level halves the resolution), or null")
        _check(self.latent_dim is None or self.latent_dim >= 1, "model.latent_dim", self.latent_dim,
               "must be >= 1 or null")


@dataclass(frozen=True)
class QuantizerConfig(_Section):
    _prefix: ClassVar[str] = "quantizer."
    kind: str = "lfq"  # lfq | bsq (binary spherical, arXiv 2406.07548) | vq | fsq
    codebook_size: int = 256  # codes per codebook (lfq: a power of two)
    num_codebooks: int = 1
    # lfq and bsq; the names and defaults are lfq.LFQ's.
    entropy_mode: str = "reference"
    entropy_loss_weight: float = 0.1
    diversity_gamma: float = 1.0
    frac_per_sample_entropy: float = 1.0
    inv_temperature: float = 100.0
    codebook_scale: float = 1.0
    commitment_loss_weight: float = 0.25  # lfq and vq
    codebook_loss_weight: float = 1.0  # vq: weight of ||sg(z) - e||^2 that moves the codes
    vq_code_dim: int | None = None  # vq: channels per code; None = ceil(log2(codebook_size)), as LFQ
    fsq_levels: tuple[int, ...] | None = None  # fsq: None = derived from codebook_size
    vq_init: str = new_field("uniform")  # vq: uniform | random_sample | kmeans (on the first training batch)
    vq_dead_code_threshold: float = new_field(0.0)  # vq: replace codes whose EMA count per batch falls below

    def validate(self) -> None:
        _check_choice("quantizer.kind", self.kind, QUANTIZER_KINDS)
        if self.kind in ("lfq", "bsq"):
            _check(_is_power_of_two(self.codebook_size), "quantizer.codebook_size", self.codebook_size,
                   f"must be a power of two >= 2 for kind={self.kind!r} (nearest: "
                   f"{2 ** max(1, round(math.log2(max(self.codebook_size, 1))))})")
        else:
            _check(self.codebook_size >= 2, "quantizer.codebook_size", self.codebook_size, "must be >= 2")
        _check(self.num_codebooks >= 1, "quantizer.num_codebooks", self.num_codebooks, "must be >= 1")
        _check_choice("quantizer.entropy_mode", self.entropy_mode, sorted(ENTROPY_KERNELS))
        _check(0.0 < self.frac_per_sample_entropy <= 1.0, "quantizer.frac_per_sample_entropy",
               self.frac_per_sample_entropy, "must be in (0, 1]")
        for name in ("inv_temperature", "codebook_scale"):
            _check(getattr(self, name) > 0, f"quantizer.{name}", getattr(self, name), "must be > 0")
        for name in ("entropy_loss_weight", "commitment_loss_weight", "codebook_loss_weight"):
            _check(getattr(self, name) >= 0, f"quantizer.{name}", getattr(self, name), "must be >= 0")
        _check(self.vq_code_dim is None or self.vq_code_dim >= 1, "quantizer.vq_code_dim", self.vq_code_dim,
               "must be >= 1 or null")
        _check_choice("quantizer.vq_init", self.vq_init, ("uniform", "random_sample", "kmeans"))
        _check(self.vq_dead_code_threshold >= 0, "quantizer.vq_dead_code_threshold", self.vq_dead_code_threshold,
               "must be >= 0 (0 disables dead-code replacement)")
        if self.fsq_levels is not None:
            _check(len(self.fsq_levels) >= 1 and all(level >= 2 for level in self.fsq_levels),
                   "quantizer.fsq_levels", self.fsq_levels, "must be a non-empty list of ints >= 2")
        elif self.kind == "fsq":
            default_fsq_levels(self.codebook_size)

    def resolved_fsq_levels(self) -> tuple[int, ...]:
        return self.fsq_levels if self.fsq_levels is not None else default_fsq_levels(self.codebook_size)


@dataclass(frozen=True)
class OptimConfig(_Section):
    _prefix: ClassVar[str] = "optim."
    lr: float = 1e-3  # peak learning rate of AdamW
    min_lr: float = 1e-4  # reached at the last step by the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def validate(self) -> None:
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, f"must be in [0, optim.lr={self.lr}]")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, f"optim.{name}", getattr(self, name), "must be in [0, 1)")
        _check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")


@dataclass(frozen=True)
class ScheduleConfig(_Section):
    _prefix: ClassVar[str] = "schedule."
    steps: int = 1000  # optimiser updates; step k in the logs is the state after k updates
    val_every: int = 250  # also validated at the last step
    checkpoint_every: int = 250  # also checkpointed at the last step

    def validate(self) -> None:
        for name in ("steps", "val_every", "checkpoint_every"):
            _check(getattr(self, name) >= 1, f"schedule.{name}", getattr(self, name), "must be >= 1")


@dataclass(frozen=True)
class MonitorConfig(_Section):
    """How code usage is measured. Part of the run id: it changes the reported utilization."""

    _prefix: ClassVar[str] = "monitor."

    usage_window: int = 100  # steps over which codes_used / perplexity / usage_fraction are counted
    dead_after: int = 100  # a code unused for this many steps is dead

    def validate(self) -> None:
        for name in ("usage_window", "dead_after"):
            _check(getattr(self, name) >= 1, f"monitor.{name}", getattr(self, name), "must be >= 1")


@dataclass(frozen=True)
class LoggingConfig(_Section):
    """Cadence of logs only; not part of the run id."""

    _prefix: ClassVar[str] = "logging."

    log_every: int = 50  # steps between metrics rows (monitor and training loss)
    print_every: int = 100  # steps between progress lines when stderr is not a terminal
    histogram_every: int = 500  # steps between code histogram snapshots
    diagnostics_every: int | None = None  # steps between saturation / mean |z| rows; null = log_every

    def validate(self) -> None:
        for name in ("log_every", "print_every", "histogram_every"):
            _check(getattr(self, name) >= 1, f"logging.{name}", getattr(self, name), "must be >= 1")
        _check(self.diagnostics_every is None or self.diagnostics_every >= 1, "logging.diagnostics_every",
               self.diagnostics_every, "must be >= 1 or null (= logging.log_every)")


@dataclass(frozen=True)
class LossConfig(_Section):
    """Reconstruction loss terms; the quantizer's own loss is always added.

    Perceptual (LPIPS) and adversarial terms plug in beside these in ``experiments/losses.py``;
    they need pretrained weights this suite cannot fetch, so none ships yet.
    """

    _prefix: ClassVar[str] = "loss."
    l2_weight: float = new_field(1.0)  # mean squared error
    l1_weight: float = new_field(0.0)  # mean absolute error

    def validate(self) -> None:
        for name in ("l1_weight", "l2_weight"):
            _check(getattr(self, name) >= 0, f"loss.{name}", getattr(self, name), "must be >= 0")
        _check(self.l1_weight + self.l2_weight > 0, "loss.l2_weight", self.l2_weight,
               "must be > 0 when loss.l1_weight is 0: a run needs a reconstruction loss")


@dataclass(frozen=True)
class RuntimeConfig(_Section):
    """Where and how fast a run computes (``experiments/runtime.py``).

    Only ``precision`` and ``tf32`` enter the run id: they change the arithmetic on purpose.
    ``device`` does not (a run resolved from ``auto`` keeps its id on whatever node it lands,
    and a run started on a GPU may resume on a CPU), nor ``compile`` (the same losses within
    float tolerance) nor the data-loader settings (the batch order is a function of seed and
    step only).
    """

    _prefix: ClassVar[str] = "runtime."
    device: str = new_field("auto", in_run_id=False)  # auto | cpu | cuda | cuda:N
    precision: str = new_field("fp32")  # fp32 | bf16 | fp16 (fp16 with a gradient scaler; CUDA only)
    compile: bool = new_field(False, in_run_id=False)  # torch.compile the model
    tf32: bool = new_field(False)  # allow TF32 matmuls and convolutions on CUDA (no effect on a CPU)
    num_workers: int = new_field(2, in_run_id=False)  # data-loader workers for datasets read from files
    pin_memory: bool = new_field(True, in_run_id=False)  # pinned host batches (CUDA only)
    prefetch_factor: int = new_field(2, in_run_id=False)  # batches each worker keeps ready

    def validate(self) -> None:
        ok = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit())
        _check(ok, "runtime.device", self.device, "must be auto, cpu, cuda or cuda:N")
        _check_choice("runtime.precision", self.precision, PRECISIONS)
        _check(self.num_workers >= 0, "runtime.num_workers", self.num_workers, "must be >= 0 (0 loads in the "
               "training process)")
        _check(self.prefetch_factor >= 1, "runtime.prefetch_factor", self.prefetch_factor, "must be >= 1")


ANNEAL_SHAPES = {"entropy": ("constant", "linear", "cosine"),
                 "inv_temperature": ("constant", "linear", "exponential"),
                 "commitment": ("constant", "linear", "cosine")}


@dataclass(frozen=True)
class AnnealConfig(_Section):
    """Schedules of the quantizer's loss weights and inverse temperature (``experiments/schedules.py``).

    ``entropy``: a multiplier of ``quantizer.entropy_loss_weight`` going from ``entropy_start``
    at step 0 to 1 at step ``entropy_steps`` (Open-MAGVIT2's ``codebook_enlarge_ratio`` 3 over
    2,000 steps, BSQ-ViT's 3 -> 1 ramp), then 1. ``commitment`` likewise for
    ``quantizer.commitment_loss_weight``. ``inv_temperature`` goes from ``inv_temperature_start``
    to ``quantizer.inv_temperature`` over ``inv_temperature_steps`` (exponential: geometric).
    The values are a function of the step alone, so a resumed run follows them exactly.
    """

    _prefix: ClassVar[str] = "anneal."
    entropy: str = new_field("constant")
    entropy_start: float = new_field(1.0)
    entropy_steps: int = new_field(0)
    inv_temperature: str = new_field("constant")
    inv_temperature_start: float = new_field(100.0)
    inv_temperature_steps: int = new_field(0)
    commitment: str = new_field("constant")
    commitment_start: float = new_field(1.0)
    commitment_steps: int = new_field(0)

    def validate(self) -> None:
        for name, shapes in ANNEAL_SHAPES.items():
            shape = getattr(self, name)
            _check_choice(f"anneal.{name}", shape, shapes)
            start, steps = getattr(self, f"{name}_start"), getattr(self, f"{name}_steps")
            _check(steps >= 0, f"anneal.{name}_steps", steps, "must be >= 0")
            if shape != "constant":
                _check(steps >= 1, f"anneal.{name}_steps", steps, f"must be >= 1 for anneal.{name}={shape!r}")
            floor = 0.0 if name != "inv_temperature" else 1e-12
            _check(start > floor if name == "inv_temperature" else start >= floor, f"anneal.{name}_start", start,
                   "must be > 0" if name == "inv_temperature" else "must be >= 0")


@dataclass(frozen=True)
class EvalConfig(_Section):
    """Extra validation metrics; where their files live does not change a run's id."""

    _prefix: ClassVar[str] = "eval."
    # rFID: a local InceptionV3 weights file for torch-fidelity (pt_inception-2015-12-05); null: no rFID.
    rfid_weights: str | None = new_field(None, in_run_id=False)

    def validate(self) -> None:
        _check(self.rfid_weights is None or bool(self.rfid_weights.strip()), "eval.rfid_weights",
               self.rfid_weights, "must be a path to the Inception weights file, or null")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "quantizer": QuantizerConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "monitor": MonitorConfig,
    "logging": LoggingConfig,
    "loss": LossConfig,
    "runtime": RuntimeConfig,
    "eval": EvalConfig,
    "anneal": AnnealConfig,
}


@dataclass(frozen=True)
class Config:
    name: str = "default"  # the experiment's name; the default results folder is results/<name>
    task: str = "images"  # images | synthetic | patches
    seed: int = 0  # model init, batch sampling and LFQ's token subsets
    scale: str = "full"  # full | smoke (shrinks the run to seconds; see resolved())
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    anneal: AnnealConfig = field(default_factory=AnnealConfig)

    def __post_init__(self) -> None:
        _coerce_fields(self, "")
        _check_choice("task", self.task, TASKS)
        _check_choice("scale", self.scale, SCALES)
        _check(not name_problem(self.name), "name", self.name, name_problem(self.name))  # a folder of results/

    def resolved(self) -> Config:
        """The config that actually runs: at scale 'smoke', every size shrunk to a run of seconds."""
        if self.scale != "smoke":
            return self
        s, lg, m = self.schedule, self.logging, self.monitor
        steps = min(s.steps, 30)
        images_data: dict[str, Any] = {}
        images_model: dict[str, Any] = {}
        if self.task == "images":  # a tokenizer of any preset shrinks to a few seconds on a CPU
            images_data = {"resolution": min(self.data.resolution, 32)}
            images_model = {"base_channels": min(self.model.base_channels or 16, 16), "num_res_blocks": 1,
                            "ch_mult": None if self.model.ch_mult is None else tuple(min(k, 2) for k in self.model.ch_mult)}
        return dataclasses.replace(
            self,
            data=dataclasses.replace(self.data, batch_size=min(self.data.batch_size, 64),
                                     val_size=min(self.data.val_size, 256), **images_data),
            model=dataclasses.replace(self.model, hidden_dim=min(self.model.hidden_dim, 64),
                                      channels=min(self.model.channels, 16), **images_model),
            optim=dataclasses.replace(self.optim, warmup_steps=min(self.optim.warmup_steps, 5)),
            schedule=ScheduleConfig(steps=steps, val_every=min(s.val_every, 10),
                                    checkpoint_every=min(s.checkpoint_every, 10)),
            monitor=MonitorConfig(usage_window=min(m.usage_window, 10), dead_after=min(m.dead_after, 10)),
            logging=LoggingConfig(log_every=min(lg.log_every, 5), print_every=min(lg.print_every, 10),
                                  histogram_every=min(lg.histogram_every, 10)),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types (tuples become lists); ``from_dict`` inverts it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        if not isinstance(d, Mapping):
            raise ConfigError(f"a config must be a mapping of keys to values, got {type(d).__name__}")
        top = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key == "run_id":  # config.json carries it; it is derived, never an input
                continue
            if key not in top:
                raise ConfigError(_unknown_key(key, sorted(top)))
            if key in SECTIONS:
                kwargs[key] = _section_from_dict(key, value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @property
    def run_id(self) -> str:
        d = self.resolved().to_dict()
        for key in NOT_IN_RUN_ID:
            d.pop(key)
        for section, cls in SECTIONS.items():
            if section in NOT_IN_RUN_ID:
                continue
            for f in dataclasses.fields(cls):
                if f.metadata.get("new") and (not f.metadata["in_run_id"] or d[section][f.name] == _default(f)):
                    del d[section][f.name]
            if not d[section]:
                del d[section]
        canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:RUN_ID_LENGTH]


def _default(f: dataclasses.Field) -> Any:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return json.loads(json.dumps(value))


def _section_from_dict(section: str, value: Any) -> Any:
    cls = SECTIONS[section]
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{section}={value!r} is invalid: must be a mapping of {section} fields")
    names = sorted(f.name for f in dataclasses.fields(cls))
    for key in value:
        if key not in names:
            raise ConfigError(_unknown_key(f"{section}.{key}", [f"{section}.{n}" for n in names]))
    return cls(**value)


def _unknown_key(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"known keys: {', '.join(allowed)}"
    return f"unknown config key {key!r}; {hint}"


def _coerce_fields(instance: Any, prefix: str) -> None:
    """Check each field against its annotation; widen int to float and list to tuple in place."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        if f.name in SECTIONS and prefix == "":
            value = getattr(instance, f.name)
            if not isinstance(value, SECTIONS[f.name]):
                raise ConfigError(f"{f.name}={value!r} is invalid: must be a {SECTIONS[f.name].__name__}")
            continue
        value = _coerce(getattr(instance, f.name), hints[f.name], prefix + f.name)
        object.__setattr__(instance, f.name, value)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # YAML reads 1e-3 (no dot) as a string; accept it as the float it means
            value = float(value)
        except ValueError:
            pass
        else:
            _check(math.isfinite(value), name, value, "must be a finite number")
            return value
    if hint is str and isinstance(value, str):
        return value
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    wanted = getattr(hint, "__name__", str(hint)).replace("tuple", "list of int")
    raise ConfigError(f"{name}={value!r} has the wrong type {type(value).__name__}: expected {wanted}")


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) > 2 or not all(parts):
        raise ConfigError(f"override key {dotted!r} must be 'field' or 'section.field'")
    if len(parts) == 2:
        section, key = parts
        if section not in SECTIONS:
            raise ConfigError(_unknown_key(dotted, [f"{s}.{f.name}" for s, c in SECTIONS.items()
                                                    for f in dataclasses.fields(c)]))
        current = d.get(section)
        d[section] = {**(current if isinstance(current, Mapping) else {}), key: value}
    elif parts[0] in SECTIONS:
        raise ConfigError(f"override {dotted!r} names a whole section; set its fields, e.g. '{dotted}.<field>=...'")
    else:
        d[parts[0]] = value


def _merge_overrides(d: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in d.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value, e.g. quantizer.codebook_size=512")
        try:  # values are YAML scalars: 512 -> int, 0.5 -> float, null -> None, [8, 5] -> list
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse the value as YAML ({e})") from None
        _set_dotted(merged, key.strip(), value)
    return merged


def load_config(path_or_dict: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> Config:
    """A config from a YAML file (or a dict), with dotted ``key=value`` overrides applied last."""
    if isinstance(path_or_dict, Mapping):
        d: Any = path_or_dict
    else:
        path = Path(path_or_dict)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} " + ("is a folder, not a YAML file" if path.is_dir()
                                                             else "does not exist"))
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{path}: not valid YAML (or not UTF-8): {' '.join(str(e).split())}") from None
        if d is None:  # an empty file would silently train every default
            raise ConfigError(f"{path} is empty; give at least the keys that differ from the defaults, e.g. task: synthetic")
    if not isinstance(d, Mapping):
        raise ConfigError(f"{path_or_dict}: a config must be a YAML mapping, got {type(d).__name__}")
    return Config.from_dict(_merge_overrides(d, overrides))


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """A new config: ``config`` with dotted ``key=value`` overrides applied and validated."""
    return Config.from_dict(_merge_overrides(config.to_dict(), overrides))
