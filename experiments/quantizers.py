"""The quantizer kinds: for each, a config class, a builder and one entry in ``QUANTIZERS``.

``QUANTIZERS`` is the one list: ``quantizer.kind`` is validated against it, a config's
``quantizer`` section is built by its kind's class, and :func:`build_quantizer` calls its kind's
builder. A new kind is added here alone: its config class (a subclass of
:class:`QuantizerConfig`, its own fields given with ``new_field`` so that no older run id
changes), its builder and its line in ``QUANTIZERS``.

``lfq``: :class:`lfq.LFQ`; ``bsq``: the same on the sphere (``spherical=True``, BSQ, arXiv
2406.07548, with exact entropies). ``vq`` and ``fsq`` are the baselines the ablations compare it
with (``experiments/baselines.py``). A kind's module follows the protocol :mod:`lfq.monitor`
watches (see ``experiments.baselines``), so code usage is measured the same way for every kind.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from experiments.baselines import FSQ, VectorQuantizer
from experiments.sections import (
    ConfigError,
    Section,
    check,
    check_choice,
    coerce_fields,
    default_of,
    is_power_of_two,
    new_field,
    unknown_key,
)
from lfq import LFQ
from lfq.entropy import ENTROPY_KERNELS

# FSQ paper (arXiv 2309.15505), Table 1: the levels it recommends for each target size.
FSQ_PAPER_LEVELS: dict[int, tuple[int, ...]] = {
    2**8: (8, 6, 5), 2**10: (8, 5, 5, 5), 2**12: (7, 5, 5, 5, 5), 2**14: (8, 8, 8, 6, 5), 2**16: (8, 8, 8, 5, 5, 5),
}


@dataclass(frozen=True)
class QuantizerConfig(Section):
    """The fields of every kind: the training loop reads them whatever the kind (the tasks pass
    ``inv_temperature`` to every quantizer, ``experiments.loop.values_at`` scales both loss weights
    and logs them). A kind's class adds its own fields; :func:`quantizer_config` picks the class.

    ``carried``: fields of another kind that this config holds inert, kept in its run id. New
    input may carry only the default kind's (LFQ's) fields, which every shipped config writes and
    which a sweep over ``quantizer.kind`` passes to every kind; a config written before the split
    (config.json, a job record) may carry any, as the flat config of then accepted them.
    """

    _prefix: ClassVar[str] = "quantizer."
    kind: str = "lfq"  # a key of QUANTIZERS: lfq | bsq (binary spherical, arXiv 2406.07548) | vq | fsq
    codebook_size: int = 256  # codes per codebook (lfq, bsq: a power of two)
    num_codebooks: int = 1
    entropy_loss_weight: float = 0.1  # lfq, bsq
    inv_temperature: float = 100.0  # lfq, bsq; the end point of anneal.inv_temperature
    commitment_loss_weight: float = 0.25  # lfq, bsq and vq
    carried: tuple[tuple[str, Any], ...] = field(default=(), metadata={"carried": True})

    def __post_init__(self) -> None:
        coerce_fields(self, self._prefix, skip=("carried",))
        object.__setattr__(self, "carried", _checked_carried(self))
        self.validate()

    def validate(self) -> None:
        check_choice("quantizer.kind", self.kind, list(QUANTIZERS))
        wanted = QUANTIZERS[self.kind].config
        check(type(self) is wanted, "quantizer.kind", self.kind, f"is configured by {wanted.__name__}, not "
              f"{type(self).__name__}: build it with experiments.quantizers.quantizer_config")
        check(self.codebook_size >= 2, "quantizer.codebook_size", self.codebook_size, "must be >= 2")
        check(self.num_codebooks >= 1, "quantizer.num_codebooks", self.num_codebooks, "must be >= 1")
        check(self.inv_temperature > 0, "quantizer.inv_temperature", self.inv_temperature, "must be > 0")
        for name in ("entropy_loss_weight", "commitment_loss_weight"):
            check(getattr(self, name) >= 0, f"quantizer.{name}", getattr(self, name), "must be >= 0")


@dataclass(frozen=True)
class LFQConfig(QuantizerConfig):
    """lfq and bsq: lfq.LFQ's fields under its names and defaults, except ``entropy_mode``, which is
    ``"reference"`` here where ``lfq.LFQ`` defaults to ``"exact"``: the suite measures the reference
    implementation's behaviour (its dense, clamped entropy), and the default enters every run id, so
    changing it would rename every published run; a config asks for ``exact`` by name."""

    entropy_mode: str = "reference"
    diversity_gamma: float = 1.0
    frac_per_sample_entropy: float = 1.0
    codebook_scale: float = 1.0

    def validate(self) -> None:
        super().validate()
        check(is_power_of_two(self.codebook_size), "quantizer.codebook_size", self.codebook_size,
              f"must be a power of two >= 2 for kind={self.kind!r} (nearest: "
              f"{2 ** max(1, round(math.log2(max(self.codebook_size, 1))))})")
        check_choice("quantizer.entropy_mode", self.entropy_mode, sorted(ENTROPY_KERNELS))
        check(0.0 < self.frac_per_sample_entropy <= 1.0, "quantizer.frac_per_sample_entropy",
              self.frac_per_sample_entropy, "must be in (0, 1]")
        check(self.codebook_scale > 0, "quantizer.codebook_scale", self.codebook_scale, "must be > 0")
        check(self.diversity_gamma >= 0, "quantizer.diversity_gamma", self.diversity_gamma,
              "must be >= 0 (the weight of the batch entropy the entropy loss rewards; 0 leaves it out)")


@dataclass(frozen=True)
class VQConfig(QuantizerConfig):
    kind: str = "vq"
    codebook_loss_weight: float = 1.0  # weight of ||sg(z) - e||^2 that moves the codes
    vq_code_dim: int | None = None  # channels per code; None = ceil(log2(codebook_size)), as LFQ
    vq_init: str = new_field("uniform")  # uniform | random_sample | kmeans (on the first training batch)
    vq_dead_code_threshold: float = new_field(0.0)  # replace codes whose EMA count per batch falls below

    def validate(self) -> None:
        super().validate()
        check(self.codebook_loss_weight >= 0, "quantizer.codebook_loss_weight", self.codebook_loss_weight,
              "must be >= 0")
        check(self.vq_code_dim is None or self.vq_code_dim >= 1, "quantizer.vq_code_dim", self.vq_code_dim,
              "must be >= 1 or null")
        check_choice("quantizer.vq_init", self.vq_init, VectorQuantizer.INITS)
        check(self.vq_dead_code_threshold >= 0, "quantizer.vq_dead_code_threshold", self.vq_dead_code_threshold,
              "must be >= 0 (0 disables dead-code replacement)")


@dataclass(frozen=True)
class FSQConfig(QuantizerConfig):
    kind: str = "fsq"
    fsq_levels: tuple[int, ...] | None = None  # None = derived from codebook_size (default_fsq_levels)

    def validate(self) -> None:
        super().validate()
        if self.fsq_levels is not None:
            check(len(self.fsq_levels) >= 1 and all(level >= 2 for level in self.fsq_levels),
                  "quantizer.fsq_levels", self.fsq_levels, "must be a non-empty list of ints >= 2")
        else:
            default_fsq_levels(self.codebook_size)

    def resolved_fsq_levels(self) -> tuple[int, ...]:
        return self.fsq_levels if self.fsq_levels is not None else default_fsq_levels(self.codebook_size)


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


def build_lfq(cfg: LFQConfig, latent_dim: int | None) -> nn.Module:
    return LFQ(
        spherical=cfg.kind == "bsq",
        dim=latent_dim,
        codebook_size=cfg.codebook_size,
        num_codebooks=cfg.num_codebooks,
        keep_num_codebooks_dim=cfg.num_codebooks > 1,
        entropy_loss_weight=cfg.entropy_loss_weight,
        commitment_loss_weight=cfg.commitment_loss_weight,
        diversity_gamma=cfg.diversity_gamma,
        frac_per_sample_entropy=cfg.frac_per_sample_entropy,
        codebook_scale=cfg.codebook_scale,
        entropy_mode=cfg.entropy_mode,
    )


def build_vq(cfg: VQConfig, latent_dim: int | None) -> nn.Module:
    return VectorQuantizer(
        dim=latent_dim,
        codebook_size=cfg.codebook_size,
        code_dim=cfg.vq_code_dim or math.ceil(math.log2(cfg.codebook_size)),
        num_codebooks=cfg.num_codebooks,
        commitment_loss_weight=cfg.commitment_loss_weight,
        codebook_loss_weight=cfg.codebook_loss_weight,
        init=cfg.vq_init,
        dead_code_threshold=cfg.vq_dead_code_threshold,
    )


def build_fsq(cfg: FSQConfig, latent_dim: int | None) -> nn.Module:
    return FSQ(dim=latent_dim, levels=cfg.resolved_fsq_levels(), num_codebooks=cfg.num_codebooks)


def lfq_memory(cfg: LFQConfig, tokens: int) -> dict[str, int]:
    """Bytes LFQ/BSQ certainly need (experiments.resources): the codebook buffer, and the dense
    tokens x codes softmax of the reference entropy."""
    bits = max(1, math.ceil(math.log2(cfg.codebook_size)))
    parts = {"quantizer.codebook_size: the LFQ codebook buffer": cfg.codebook_size * bits * 4}
    if cfg.entropy_mode == "reference":
        parts["quantizer.codebook_size x data.batch_size: the reference entropy's dense softmax"] = (
            tokens * cfg.codebook_size * cfg.num_codebooks * 4)
    return parts


def vq_memory(cfg: VQConfig, tokens: int) -> dict[str, int]:
    """The VQ codebook, its gradient and AdamW's two moments, float32."""
    dim = cfg.vq_code_dim or max(1, math.ceil(math.log2(cfg.codebook_size)))
    return {"quantizer.codebook_size: the VQ codebook, its gradient and AdamW state":
            4 * cfg.num_codebooks * cfg.codebook_size * dim * 4}


@dataclass(frozen=True)
class Kind:
    config: type[QuantizerConfig]  # the class of its config section
    build: Callable[[Any, int | None], nn.Module]  # (its config, latent_dim or None) -> the module
    # (its config, tokens per batch) -> {"field: what": bytes it certainly needs}; None: nothing that scales
    memory: Callable[[Any, int], dict[str, int]] | None = None


QUANTIZERS: dict[str, Kind] = {
    "lfq": Kind(LFQConfig, build_lfq, lfq_memory),
    "bsq": Kind(LFQConfig, build_lfq, lfq_memory),  # LFQ on the sphere
    "vq": Kind(VQConfig, build_vq, vq_memory),
    "fsq": Kind(FSQConfig, build_fsq),
}
DEFAULT_KIND = QuantizerConfig.kind  # its fields are the ones other kinds may carry


def build_quantizer(cfg: QuantizerConfig, latent_dim: int | None = None) -> nn.Module:
    """The quantizer of ``cfg``; ``latent_dim`` (None = its natural size) is its input channels."""
    return QUANTIZERS[cfg.kind].build(cfg, latent_dim)


def _own(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("carried")}


@functools.cache
def _all_fields() -> tuple[dict[str, dataclasses.Field], dict[str, type]]:
    """Every field a quantizer section has (the union over kinds) and the class that declares it."""
    fields: dict[str, dataclasses.Field] = {}
    owner: dict[str, type] = {}
    for kind in QUANTIZERS.values():
        for name, f in _own(kind.config).items():
            if name in fields and name != "kind" and (default_of(f), f.metadata) != (default_of(fields[name]), fields[name].metadata):
                raise TypeError(f"quantizer.{name} is declared by {owner[name].__name__} and {kind.config.__name__} "
                                f"with different defaults: one field, one default")
            if name not in fields:
                fields[name] = f
                owner[name] = next(c for c in reversed(kind.config.__mro__) if name in getattr(c, "__annotations__", {}))
    return fields, owner


def quantizer_fields() -> list[dataclasses.Field]:
    """The fields of the quantizer section as config.json and the run id hold it: every kind's."""
    return list(_all_fields()[0].values())


def _kinds_of(cls: type) -> str:
    return ", ".join(repr(k) for k, q in QUANTIZERS.items() if issubclass(q.config, cls))


def _checked_carried(config: QuantizerConfig) -> tuple[tuple[str, Any], ...]:
    """``config.carried`` validated by the classes that own its fields, sorted by name."""
    fields, owner = _all_fields()
    own = _own(type(config))
    out = []
    for name, value in config.carried:
        check(name in fields and name not in own, "quantizer.carried", name,
              f"holds the fields of other kinds than {config.kind!r} only")
        out.append((name, getattr(owner[name](**{name: value}), name)))  # the owner's checks and types
    return tuple(sorted(out))


def quantizer_config(fields: Mapping[str, Any], strict: bool = True) -> QuantizerConfig:
    """The config of ``fields['kind']`` (default lfq) from a quantizer section.

    A field of another kind at its default is dropped (config.json lists every kind's fields).
    Away from it, the default kind's fields are carried (a base written for LFQ under a sweep
    over kinds); ``strict`` (new input) refuses any other kind's, ``strict=False`` (a config this
    code wrote before, e.g. config.json) carries them too, so the run keeps its id.
    """
    kind = fields.get("kind", DEFAULT_KIND)
    check(isinstance(kind, str), "quantizer.kind", kind, f"must be one of {list(QUANTIZERS)}")
    check_choice("quantizer.kind", kind, list(QUANTIZERS))
    cls = QUANTIZERS[kind].config
    own = _own(cls)
    every, owner = _all_fields()
    kwargs: dict[str, Any] = {}
    carried: dict[str, Any] = {}
    for key, value in fields.items():
        if key in own:
            kwargs[key] = value
        elif key not in every:
            raise ConfigError(unknown_key(f"quantizer.{key}", [f"quantizer.{n}" for n in every]))
        elif json.loads(json.dumps(value, default=repr)) != default_of(every[key]):
            if strict and not issubclass(QUANTIZERS[DEFAULT_KIND].config, owner[key]):
                lfq = "" if cls is QUANTIZERS[DEFAULT_KIND].config else \
                    f", plus kind {_kinds_of(QUANTIZERS[DEFAULT_KIND].config)}'s (inert, from a base written for it)"
                raise ConfigError(
                    f"quantizer.{key}={value!r} is a field of kind {_kinds_of(owner[key])}, not of kind={kind!r}: it "
                    f"takes {', '.join(f'quantizer.{n}' for n in own)}{lfq}; other kinds' fields only at their defaults")
            carried[key] = value
    return cls(**kwargs, carried=tuple(carried.items()))


def quantizer_dict(config: QuantizerConfig) -> dict[str, Any]:
    """The section as config.json and the run id hold it: every kind's fields, other kinds' at their defaults."""
    out = {name: default_of(f) for name, f in _all_fields()[0].items()}
    out.update({name: getattr(config, name) for name in _own(type(config))})
    out.update(config.carried)
    return json.loads(json.dumps(out))
