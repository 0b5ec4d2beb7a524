"""The sections of a run config: typed fields checked at construction, with one-line errors.

Every section but ``quantizer`` is here; the quantizer's has a class per kind, in the kind's
module (``experiments/quantizers/``) beside its builder. ``experiments.config`` puts the sections
together (``Config``), hashes the run id and loads YAML and overrides. Both build on this module, so
neither imports the other back.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the dotted field and what is allowed."""


def new_field(default: Any, *, in_run_id: bool = True, listed_at_default: bool = True) -> Any:
    """A field added after the first run ids: omitted from the id while it holds ``default``.

    ``listed_at_default=False``: omitted from ``Config.to_dict`` (config.json, job records) too while it
    holds ``default``, for a field added after ``tests/experiments/data/run_ids.json`` pinned the
    config.json of every shipped run byte for byte: those files stay what the earlier code wrote."""
    kwargs = {"default_factory": lambda: default} if isinstance(default, (list, dict)) else {"default": default}
    return field(metadata={"new": True, "in_run_id": in_run_id, "listed_at_default": listed_at_default}, **kwargs)


def is_power_of_two(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    close = difflib.get_close_matches(value, choices, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    check(value in choices, name, value, f"must be one of {list(choices)}{hint}")


def unknown_key(key: str, allowed: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"known keys: {', '.join(allowed)}"
    return f"unknown config key {key!r}; {hint}"


def default_of(f: dataclasses.Field) -> Any:
    """A field's default as JSON writes it (tuples as lists)."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return json.loads(json.dumps(value))


class Section:
    """A config section: fields are type-checked (int widened to float, list to tuple), then validated."""

    _prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        coerce_fields(self, self._prefix)
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError


def coerce_fields(instance: Any, prefix: str, skip: typing.Container[str] = ()) -> None:
    """Check each field against its annotation; widen int to float and list to tuple in place."""
    hints = typing.get_type_hints(type(instance))
    for f in dataclasses.fields(instance):
        if f.name in skip:
            continue
        value = coerce(getattr(instance, f.name), hints[f.name], prefix + f.name)
        object.__setattr__(instance, f.name, value)


def coerce(value: Any, hint: Any, name: str) -> Any:
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
    if hint is int and isinstance(value, (float, str)):
        try:  # 1500.0, and 1.5e3 (YAML 1.1 reads an exponent without a dot as a string): the int they mean
            number = float(value)
        except ValueError:
            pass
        else:
            check(math.isfinite(number) and number.is_integer(), name, value,
                  "must be a whole number (an int, or a float with nothing after the point, e.g. 1.5e3 = 1500)")
            return int(number)
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # YAML reads 1e-3 (no dot) as a string; accept it as the float it means
            value = float(value)
        except ValueError:
            pass
        else:
            check(math.isfinite(value), name, value, "must be a finite number")
            return value
    if hint is str and isinstance(value, str):
        return value
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        return tuple(coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    wanted = getattr(hint, "__name__", str(hint)).replace("tuple", "list of int")
    raise ConfigError(f"{name}={value!r} has the wrong type {type(value).__name__}: expected {wanted}")


IMAGE_RESOLUTIONS = (16, 32, 64, 128, 256, 512)
MODEL_PRESETS = ("tiny", "base")
PRIOR_HEADS = ("full", "factorized", "bitwise")
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class DataConfig(Section):
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
    # images from data.root: a file whose shorter side is under min_size pixels is left out; one at
    # or above it but under data.resolution is upscaled (0, the default: every file is used, as every
    # run before this field did); counted and named either way.
    min_size: int = new_field(0, listed_at_default=False)
    # prior: the folder of a finished tokenizer run whose tokens the prior models (absolute, or
    # relative to the results root that holds the prior's own <name>/ folder, then to the working
    # directory). Not in the run id as a path: the id carries the tokenizer's run id, the folder's name.
    tokenizer_run: str | None = new_field(None, in_run_id=False, listed_at_default=False)
    # video: frames per clip (1 + a multiple of model.temporal_downsample; 1 = images as one-frame
    # videos), the step between the frames taken from a file, and UCF-101's official split list
    # (e.g. ucfTrainTestlist/testlist01.txt: its videos are the validation set; null: hash split).
    frames: int = new_field(17, listed_at_default=False)
    frame_stride: int = new_field(1, listed_at_default=False)
    split_file: str | None = new_field(None, listed_at_default=False)

    def validate(self) -> None:
        check(self.frames >= 1, "data.frames", self.frames, "must be >= 1 (frames per clip)")
        check(self.frame_stride >= 1, "data.frame_stride", self.frame_stride, "must be >= 1 (1 takes every frame)")
        check(self.split_file is None or bool(self.split_file.strip()), "data.split_file", self.split_file,
              "must be the path of a list of validation videos (UCF-101's testlist0N.txt), or null")
        check(self.resolution in IMAGE_RESOLUTIONS, "data.resolution", self.resolution,
               f"must be one of {list(IMAGE_RESOLUTIONS)}")
        check(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction, "must be in (0, 1)")
        check(self.root is None or bool(self.root.strip()), "data.root", self.root,
               "must be a folder or a text file of image paths, or null for the shipped images")
        for name in ("batch_size", "val_size", "input_dim", "num_clusters"):
            check(getattr(self, name) >= 1, f"data.{name}", getattr(self, name), "must be >= 1")
        check(self.cluster_std > 0, "data.cluster_std", self.cluster_std, "must be > 0")
        check(self.patch_size in (16, 32), "data.patch_size", self.patch_size, "must be 16 or 32")
        check(self.min_size >= 0, "data.min_size", self.min_size,
              "must be >= 0 pixels (0 upscales every image under data.resolution; data.resolution skips them)")
        check(self.tokenizer_run is None or bool(self.tokenizer_run.strip()), "data.tokenizer_run", self.tokenizer_run,
              "must be the folder of a finished tokenizer run (e.g. images/<run_id>), or null")


@dataclass(frozen=True)
class ModelConfig(Section):
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
    # prior (experiments/prior_model.py): a decoder-only transformer over the tokens; the preset sets
    # the width, layers and heads, any of the None fields overrides it.
    head: str = new_field("full", listed_at_default=False)  # full | factorized | bitwise
    factors: tuple[int, ...] | None = new_field(None, listed_at_default=False)  # factorized: bits per sub-token
    width: int | None = new_field(None, listed_at_default=False)
    layers: int | None = new_field(None, listed_at_default=False)
    attention_heads: int | None = new_field(None, listed_at_default=False)
    # video: frames per token in time after the first (the first frame is a token step of its own)
    temporal_downsample: int = new_field(4, listed_at_default=False)  # 1, 2 or 4

    def validate(self) -> None:
        for name in ("hidden_dim", "depth", "channels"):
            check(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "must be >= 1")
        check_choice("model.preset", self.preset, MODEL_PRESETS)
        check(self.downsample in (4, 8, 16), "model.downsample", self.downsample, "must be 4, 8 or 16")
        check(self.temporal_downsample in (1, 2, 4), "model.temporal_downsample", self.temporal_downsample,
              "must be 1, 2 or 4")
        for name in ("base_channels", "num_res_blocks"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"model.{name}", value, "must be >= 1 or null")
        if self.ch_mult is not None:
            levels = round(math.log2(self.downsample)) + 1
            check(len(self.ch_mult) == levels and all(m >= 1 for m in self.ch_mult), "model.ch_mult",
                   self.ch_mult, f"must be {levels} ints >= 1 for model.downsample={self.downsample} "
                   f"(one per level; a level halves the resolution), or null")
        check(self.latent_dim is None or self.latent_dim >= 1, "model.latent_dim", self.latent_dim,
               "must be >= 1 or null")
        check_choice("model.head", self.head, PRIOR_HEADS)
        check(self.factors is None or (len(self.factors) >= 1 and all(f >= 1 for f in self.factors)),
              "model.factors", self.factors, "must be a list of bits per sub-token, each >= 1 (e.g. [6, 4]), or null")
        for name in ("width", "layers", "attention_heads"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"model.{name}", value, "must be >= 1 or null (the preset's)")


@dataclass(frozen=True)
class OptimConfig(Section):
    _prefix: ClassVar[str] = "optim."
    lr: float = 1e-3  # peak learning rate of AdamW
    min_lr: float = 1e-4  # reached at the last step by the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def validate(self) -> None:
        check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        check(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, f"must be in [0, optim.lr={self.lr}]")
        check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            check(0 <= getattr(self, name) < 1, f"optim.{name}", getattr(self, name), "must be in [0, 1)")
        check(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0 (0 disables)")


@dataclass(frozen=True)
class ScheduleConfig(Section):
    _prefix: ClassVar[str] = "schedule."
    steps: int = 1000  # optimiser updates; step k in the logs is the state after k updates
    val_every: int = 250  # also validated at the last step
    checkpoint_every: int = 250  # also checkpointed at the last step

    def validate(self) -> None:
        for name in ("steps", "val_every", "checkpoint_every"):
            check(getattr(self, name) >= 1, f"schedule.{name}", getattr(self, name), "must be >= 1")


@dataclass(frozen=True)
class MonitorConfig(Section):
    """How code usage is measured. Part of the run id: it changes the reported utilization."""

    _prefix: ClassVar[str] = "monitor."

    usage_window: int = 100  # steps over which codes_used / perplexity / usage_fraction are counted
    dead_after: int = 100  # a code unused for this many steps is dead
    # End the run as failed at the first collapse alarm (lfq.alarms' defaults), its reason the alarm.
    stop_on_alarm: bool = new_field(False, listed_at_default=False)

    def validate(self) -> None:
        for name in ("usage_window", "dead_after"):
            check(getattr(self, name) >= 1, f"monitor.{name}", getattr(self, name), "must be >= 1")
        check(isinstance(self.stop_on_alarm, bool), "monitor.stop_on_alarm", self.stop_on_alarm, "must be true or false")


@dataclass(frozen=True)
class LoggingConfig(Section):
    """Cadence of logs only; not part of the run id."""

    _prefix: ClassVar[str] = "logging."

    log_every: int = 50  # steps between metrics rows (monitor and training loss)
    print_every: int = 100  # steps between progress lines when stderr is not a terminal
    histogram_every: int = 500  # steps between code histogram snapshots
    diagnostics_every: int | None = None  # steps between saturation / mean |z| rows; null = log_every

    def validate(self) -> None:
        for name in ("log_every", "print_every", "histogram_every"):
            check(getattr(self, name) >= 1, f"logging.{name}", getattr(self, name), "must be >= 1")
        check(self.diagnostics_every is None or self.diagnostics_every >= 1, "logging.diagnostics_every",
               self.diagnostics_every, "must be >= 1 or null (= logging.log_every)")


@dataclass(frozen=True)
class LossConfig(Section):
    """The tokenizer's loss terms beside the quantizer's own: L2 and L1, LPIPS, and the adversarial game
    (``experiments.objective``; docs/training.md, "Objective"). Every term past L2 is off by default."""

    _prefix: ClassVar[str] = "loss."
    l2_weight: float = new_field(1.0)  # mean squared error
    l1_weight: float = new_field(0.0)  # mean absolute error
    # LPIPS over the user's VGG16 + linear-layer weights (python -m experiments.perceptual writes the file)
    perceptual_weight: float = new_field(0.0, listed_at_default=False)
    perceptual_weights: str | None = new_field(None, in_run_id=False, listed_at_default=False)
    # the adversarial game: a discriminator trained from scratch with the hinge loss
    adversarial_weight: float = new_field(0.0, listed_at_default=False)  # 0 = off
    disc: str = new_field("patchgan", listed_at_default=False)  # patchgan (VQGAN's) | stylegan (MAGVIT-v2's)
    disc_start: int = new_field(0, listed_at_default=False)  # the game starts after this step
    generator_loss: str = new_field("hinge", listed_at_default=False)  # hinge | non_saturating (Open-MAGVIT2's)
    adaptive_weight: bool = new_field(True, listed_at_default=False)  # VQGAN's balance at the decoder's last layer
    disc_lr: float | None = new_field(None, listed_at_default=False)  # null: optim.lr; same warmup and decay
    disc_width: int = new_field(64, listed_at_default=False)  # the discriminator's first-layer channels
    lecam_weight: float = new_field(0.0, listed_at_default=False)  # MAGVIT-v2's LeCAM regulariser, 0 = off
    lecam_decay: float = new_field(0.999, listed_at_default=False)  # its logit averages' decay per step

    def validate(self) -> None:
        for name in ("l1_weight", "l2_weight", "perceptual_weight", "adversarial_weight", "lecam_weight"):
            check(getattr(self, name) >= 0, f"loss.{name}", getattr(self, name), "must be >= 0")
        check(self.l1_weight + self.l2_weight > 0, "loss.l2_weight", self.l2_weight,
               "must be > 0 when loss.l1_weight is 0: a run needs a reconstruction loss")
        check(self.perceptual_weight == 0 or bool(self.perceptual_weights and self.perceptual_weights.strip()),
              "loss.perceptual_weights", self.perceptual_weights,
              "must be the path of the LPIPS weights file when loss.perceptual_weight > 0 "
              "(python -m experiments.perceptual VGG16.pth LPIPS_VGG.pth --out FILE writes it)")
        check_choice("loss.disc", self.disc, ("patchgan", "stylegan"))
        check_choice("loss.generator_loss", self.generator_loss, ("hinge", "non_saturating"))
        check(self.disc_start >= 0, "loss.disc_start", self.disc_start, "must be a step >= 0")
        check(self.disc_lr is None or self.disc_lr > 0, "loss.disc_lr", self.disc_lr, "must be > 0, or null for optim.lr")
        check(self.disc_width >= 1, "loss.disc_width", self.disc_width, "must be >= 1")
        check(0 <= self.lecam_decay < 1, "loss.lecam_decay", self.lecam_decay, "must be in [0, 1)")
        check(self.lecam_weight == 0 or self.adversarial_weight > 0, "loss.lecam_weight", self.lecam_weight,
              "regularises the discriminator: it needs loss.adversarial_weight > 0")


@dataclass(frozen=True)
class RuntimeConfig(Section):
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
        check(ok, "runtime.device", self.device, "must be auto, cpu, cuda or cuda:N")
        check_choice("runtime.precision", self.precision, PRECISIONS)
        check(self.num_workers >= 0, "runtime.num_workers", self.num_workers, "must be >= 0 (0 loads in the "
               "training process)")
        check(self.prefetch_factor >= 1, "runtime.prefetch_factor", self.prefetch_factor, "must be >= 1")


ANNEAL_SHAPES = {"entropy": ("constant", "linear", "cosine"),
                 "inv_temperature": ("constant", "linear", "exponential"),
                 "commitment": ("constant", "linear", "cosine")}


@dataclass(frozen=True)
class AnnealConfig(Section):
    """Schedules of the quantizer's loss weights and inverse temperature (``experiments.loop.values_at``).

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
            check_choice(f"anneal.{name}", shape, shapes)
            start, steps = getattr(self, f"{name}_start"), getattr(self, f"{name}_steps")
            check(steps >= 0, f"anneal.{name}_steps", steps, "must be >= 0")
            if shape != "constant":
                check(steps >= 1, f"anneal.{name}_steps", steps, f"must be >= 1 for anneal.{name}={shape!r}")
            floor = 0.0 if name != "inv_temperature" else 1e-12
            check(start > floor if name == "inv_temperature" else start >= floor, f"anneal.{name}_start", start,
                   "must be > 0" if name == "inv_temperature" else "must be >= 0")


@dataclass(frozen=True)
class EvalConfig(Section):
    """Extra validation metrics; where their files live does not change a run's id."""

    _prefix: ClassVar[str] = "eval."
    # rFID: a local InceptionV3 weights file for torch-fidelity (pt_inception-2015-12-05); null: no rFID.
    rfid_weights: str | None = new_field(None, in_run_id=False)
    # prior: tokens sequences drawn at the end (temperature 1) for the sample metrics and gFID
    prior_samples: int = new_field(256, listed_at_default=False)
    # rFVD (video): a local I3D state_dict for experiments.video_fvd (its docstring says how to make one); null: no rFVD.
    fvd_weights: str | None = new_field(None, in_run_id=False, listed_at_default=False)

    def validate(self) -> None:
        check(self.fvd_weights is None or bool(self.fvd_weights.strip()), "eval.fvd_weights", self.fvd_weights,
              "must be a path to an I3D state_dict (python -m experiments.video_fvd --help), or null")
        check(self.rfid_weights is None or bool(self.rfid_weights.strip()), "eval.rfid_weights",
               self.rfid_weights, "must be a path to the Inception weights file, or null")
        check(self.prior_samples >= 1, "eval.prior_samples", self.prior_samples, "must be >= 1")
