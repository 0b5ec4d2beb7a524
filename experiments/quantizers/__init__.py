"""The registry of quantizer kinds, ``QUANTIZERS`` (name -> the module that defines the kind), and
what every kind shares: :class:`QuantizerConfig`, the section's rules across kinds and
:func:`build_quantizer`; docs/ARCHITECTURE.md ("Registries") gives the rules and docs/experiments.md
how to add a kind.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from torch import nn

from experiments.sections import (
    ConfigError,
    Section,
    check,
    check_choice,
    coerce_fields,
    default_of,
    unknown_key,
)


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
        wanted = kind(self.kind).config
        check(type(self) is wanted, "quantizer.kind", self.kind, f"is configured by {wanted.__name__}, not "
              f"{type(self).__name__}: build it with experiments.quantizers.quantizer_config")
        check(self.codebook_size >= 2, "quantizer.codebook_size", self.codebook_size, "must be >= 2")
        check(self.num_codebooks >= 1, "quantizer.num_codebooks", self.num_codebooks, "must be >= 1")
        check(self.inv_temperature > 0, "quantizer.inv_temperature", self.inv_temperature, "must be > 0")
        for name in ("entropy_loss_weight", "commitment_loss_weight"):
            check(getattr(self, name) >= 0, f"quantizer.{name}", getattr(self, name), "must be >= 0")


class Kind(NamedTuple):
    """What a kind's module provides (:func:`kind`)."""

    config: type[QuantizerConfig]  # its CONFIG: the class of its config section
    build: Callable[[Any, int | None], nn.Module]  # build(its config, latent_dim or None) -> the module
    # memory(its config, tokens per batch) -> {"field: what": bytes it certainly needs}; absent: nothing that scales
    memory: Callable[[Any, int], dict[str, int]] | None


# The one list of kinds: name -> the module that defines it (imported when first asked for).
QUANTIZERS: dict[str, str] = {
    "lfq": "experiments.quantizers.binary",  # lfq.LFQ
    "bsq": "experiments.quantizers.binary",  # LFQ on the sphere (arXiv 2406.07548)
    "vq": "experiments.quantizers.vq",  # a VQ-VAE codebook (experiments.baselines)
    "fsq": "experiments.quantizers.fsq",  # finite scalar quantization (experiments.baselines)
}


def kind(name: str) -> Kind:
    """The entry of kind ``name``: its module imported, and what it defines."""
    check_choice("quantizer.kind", name, list(QUANTIZERS))
    module = importlib.import_module(QUANTIZERS[name])
    config, build = getattr(module, "CONFIG", None), getattr(module, "build", None)
    if not (isinstance(config, type) and issubclass(config, QuantizerConfig) and callable(build)):
        raise TypeError(f"quantizer kind {name!r}: {QUANTIZERS[name]} must define CONFIG (a QuantizerConfig "
                        f"subclass) and build(config, latent_dim)")
    return Kind(config, build, getattr(module, "memory", None))


DEFAULT_KIND = QuantizerConfig.kind  # its fields are the ones other kinds may carry


def build_quantizer(cfg: QuantizerConfig, latent_dim: int | None = None) -> nn.Module:
    """The quantizer of ``cfg``; ``latent_dim`` (None = its natural size) is its input channels."""
    return kind(cfg.kind).build(cfg, latent_dim)


def _own(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("carried")}


@functools.cache
def _all_fields() -> tuple[dict[str, dataclasses.Field], dict[str, type]]:
    """Every field a quantizer section has (the union over kinds) and the class that declares it."""
    fields: dict[str, dataclasses.Field] = {}
    owner: dict[str, type] = {}
    for entry in map(kind, QUANTIZERS):
        for name, f in _own(entry.config).items():
            if name in fields and name != "kind" and (default_of(f), f.metadata) != (default_of(fields[name]), fields[name].metadata):
                raise TypeError(f"quantizer.{name} is declared by {owner[name].__name__} and {entry.config.__name__} "
                                f"with different defaults: one field, one default")
            if name not in fields:
                fields[name] = f
                owner[name] = next(c for c in reversed(entry.config.__mro__) if name in getattr(c, "__annotations__", {}))
    return fields, owner


def quantizer_fields() -> list[dataclasses.Field]:
    """The fields of the quantizer section as config.json and the run id hold it: every kind's."""
    return list(_all_fields()[0].values())


def _kinds_of(cls: type) -> str:
    return ", ".join(repr(k) for k in QUANTIZERS if issubclass(kind(k).config, cls))


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
    name = fields.get("kind", DEFAULT_KIND)
    check(isinstance(name, str), "quantizer.kind", name, f"must be one of {list(QUANTIZERS)}")
    cls = kind(name).config
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
            default_class = kind(DEFAULT_KIND).config
            if strict and not issubclass(default_class, owner[key]):
                lfq = "" if cls is default_class else \
                    f", plus kind {_kinds_of(default_class)}'s (inert, from a base written for it)"
                raise ConfigError(
                    f"quantizer.{key}={value!r} is a field of kind {_kinds_of(owner[key])}, not of kind={name!r}: it "
                    f"takes {', '.join(f'quantizer.{n}' for n in own)}{lfq}; other kinds' fields only at their defaults")
            carried[key] = value
    return cls(**kwargs, carried=tuple(carried.items()))


def quantizer_dict(config: QuantizerConfig) -> dict[str, Any]:
    """The section as config.json and the run id hold it: every kind's fields, other kinds' at their defaults."""
    out = {name: default_of(f) for name, f in _all_fields()[0].items()}
    out.update({name: getattr(config, name) for name in _own(type(config))})
    out.update(config.carried)
    return json.loads(json.dumps(out))
