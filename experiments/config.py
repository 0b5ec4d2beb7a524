"""The run config: frozen, typed dataclasses validated when they are built, loaded from YAML plus
dotted ``key=value`` overrides (:func:`load_config`), shrunk by ``scale=smoke``
(:meth:`Config.resolved`) and hashed into the run id; the sections are in
``experiments/sections.py``, the quantizer's in ``experiments/quantizers/``, and the rules (presets,
explicit values, the run id) in docs/experiments.md and docs/run_folder.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import yaml

from experiments.quantizers import (
    DEFAULT_KIND,
    QuantizerConfig,
    kind,
    quantizer_config,
    quantizer_dict,
    quantizer_fields,
)
from experiments.run_dir import name_problem
from experiments.sections import (
    AnnealConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    RuntimeConfig,
    ScheduleConfig,
    check,
    check_choice,
    coerce_fields,
    default_of,
    unknown_key,
)
from experiments.tasks import TASKS

SCALES = ("full", "smoke")
RUN_ID_LENGTH = 10
# Fields that do not change what a run computes, hence not part of its id (``explicit`` only says
# which resolved values were given by hand; the values themselves are in the id).
NOT_IN_RUN_ID = ("name", "logging", "explicit")
# scale=smoke: (section, field) -> the most it keeps (a value above is shrunk to it, unless explicit).
SMOKE_CAPS: dict[tuple[str, str], int] = {
    ("data", "batch_size"): 64, ("data", "val_size"): 256,
    ("model", "hidden_dim"): 64, ("model", "channels"): 16,
    ("optim", "warmup_steps"): 5,
    ("schedule", "steps"): 30, ("schedule", "val_every"): 10, ("schedule", "checkpoint_every"): 10,
    ("monitor", "usage_window"): 10, ("monitor", "dead_after"): 10,
    ("logging", "log_every"): 5, ("logging", "print_every"): 10, ("logging", "histogram_every"): 10,
}
# What config.json holds beside the config (experiments.train): the run id, and for a run on
# data.root what it read (experiments.image_folder.fingerprint, and the validation images used).
RECORDED_KEYS = ("run_id", "data_files", "data_bytes", "data_sha256", "val_images")
# Fields added after run ids were first published enter the id only when set away from their
# default, so every earlier run folder keeps its id (see ``experiments.sections.new_field``). Fields marked
# ``in_run_id=False`` never enter it: they change where and how fast a run computes, not what.
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
    task: str = "images"  # a key of experiments.tasks.TASKS: images | synthetic | patches | video
    seed: int = 0  # model init, batch sampling and LFQ's token subsets
    scale: str = "full"  # full | smoke (shrinks the run to seconds; see resolved())
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quantizer: QuantizerConfig = field(default_factory=lambda: kind(DEFAULT_KIND).config())  # by its kind
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    anneal: AnnealConfig = field(default_factory=AnnealConfig)
    # Dotted keys (section.field) given explicitly beside scale=smoke whose values the preset leaves
    # as given (see the module docstring); set by load_config, written to config.json when not empty.
    explicit: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            check(isinstance(value, cls), name, value, f"must be a {cls.__name__}")
        coerce_fields(self, "", skip=SECTIONS)
        check_choice("task", self.task, list(TASKS))
        check_choice("scale", self.scale, SCALES)
        check(not name_problem(self.name), "name", self.name, name_problem(self.name))  # a folder of results/
        check(self.task != "prior" or self.data.tokenizer_run is not None, "data.tokenizer_run", None,
              "task=prior needs the folder of a finished tokenizer run, e.g. data.tokenizer_run=images/<run_id>")
        known = {f"{s}.{f.name}" for s in SECTIONS for f in section_fields(s)}
        for key in self.explicit:
            check(key in known, "explicit", list(self.explicit), f"must list dotted config keys; {unknown_key(key, sorted(known))}")
        object.__setattr__(self, "explicit", tuple(sorted(set(self.explicit))))

    def smoke_preset(self) -> dict[str, dict[str, Any]]:
        """What scale=smoke sets, explicit keys included: {section: {field: value}} (SMOKE_CAPS and the task's)."""
        preset: dict[str, dict[str, Any]] = {}
        for (section, name), cap in SMOKE_CAPS.items():
            preset.setdefault(section, {})[name] = min(getattr(getattr(self, section), name), cap)
        smoke = TASKS[self.task].smoke
        for section, values in (smoke(self) if smoke is not None else {}).items():  # e.g. the images tokenizer's
            preset.setdefault(section, {}).update(values)
        return preset

    def resolved(self) -> Config:
        """The config that actually runs: at scale 'smoke', every size shrunk to a run of seconds,
        except the values listed in ``explicit``."""
        if self.scale != "smoke":
            return self
        sections = {}
        for section, values in self.smoke_preset().items():
            kept = {k: v for k, v in values.items() if f"{section}.{k}" not in self.explicit}
            sections[section] = dataclasses.replace(getattr(self, section), **kept)
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types (tuples become lists); ``from_dict`` inverts it. The quantizer section
        lists every kind's fields, those of other kinds at their defaults (``quantizer_dict``)."""
        d = json.loads(json.dumps(dataclasses.asdict(self)))
        d["quantizer"] = quantizer_dict(self.quantizer)
        for section in SECTIONS:  # fields added after config.json was pinned: listed only away from their default
            for f in section_fields(section):
                if not f.metadata.get("listed_at_default", True) and d[section].get(f.name) == default_of(f):
                    del d[section][f.name]
        if not self.explicit:  # configs without it (every one before it existed) write what they wrote
            del d["explicit"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], strict: bool = False) -> Config:
        """``strict``: new input, which may not set another quantizer kind's fields (``load_config``).
        Not strict: a config this code wrote (config.json, a job record), which may carry them from
        before the quantizer config was split by kind, and keeps its run id."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"a config must be a mapping of keys to values, got {type(d).__name__}")
        top = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in RECORDED_KEYS:  # config.json carries them beside the config; never inputs
                continue
            if key not in top:
                raise ConfigError(unknown_key(key, sorted(top)))
            if key in SECTIONS:
                kwargs[key] = _section_from_dict(key, value, strict)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    @property
    def run_id(self) -> str:
        d = self.resolved().to_dict()
        for key in NOT_IN_RUN_ID:
            d.pop(key, None)
        for section in SECTIONS:
            if section in NOT_IN_RUN_ID:
                continue
            for f in section_fields(section):
                if f.metadata.get("new") and (not f.metadata["in_run_id"]
                                              or d[section].get(f.name, default_of(f)) == default_of(f)):
                    d[section].pop(f.name, None)
            if not d[section]:
                del d[section]
        if self.data.tokenizer_run is not None:  # a prior: its tokenizer's run id (its folder's name), not its path
            d["tokenizer_run_id"] = PurePath(self.data.tokenizer_run.rstrip("/\\")).name
        canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode()).hexdigest()[:RUN_ID_LENGTH]


def section_fields(section: str) -> list[dataclasses.Field]:
    """The fields of a section as config.json holds them (the quantizer's: every kind's)."""
    return quantizer_fields() if section == "quantizer" else list(dataclasses.fields(SECTIONS[section]))


def _section_from_dict(section: str, value: Any, strict: bool) -> Any:
    cls = SECTIONS[section]
    if value is not None and not isinstance(value, Mapping):
        raise ConfigError(f"{section}={value!r} is invalid: must be a mapping of {section} fields")
    if section == "quantizer":
        return quantizer_config(value or {}, strict)
    if value is None:
        return cls()
    names = sorted(f.name for f in dataclasses.fields(cls))
    for key in value:
        if key not in names:
            raise ConfigError(unknown_key(f"{section}.{key}", [f"{section}.{n}" for n in names]))
    return cls(**value)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) > 2 or not all(parts):
        raise ConfigError(f"override key {dotted!r} must be 'field' or 'section.field'")
    if len(parts) == 2:
        section, key = parts
        if section not in SECTIONS:
            raise ConfigError(unknown_key(dotted, [f"{s}.{f.name}" for s in SECTIONS for f in section_fields(s)]))
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


def load_config(path_or_dict: str | Path | Mapping[str, Any], overrides: Sequence[str] = (),
                explicit: Sequence[str] = ()) -> Config:
    """A config from a YAML file (or a dict), with dotted ``key=value`` overrides applied, then ``explicit``.

    ``overrides`` are part of the config, as the file is: ``scale=smoke`` shrinks them (a sweep's
    grid and overrides come this way). ``explicit`` (a user's command line) wins over the preset:
    the keys whose values it would change are kept in ``Config.explicit``."""
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
    config = Config.from_dict(_merge_overrides(d, [*overrides, *explicit]), strict=True)
    given = {key.partition("=")[0].strip() for key in explicit}
    if config.scale != "smoke" or not given:
        return config
    preset = config.smoke_preset()
    kept = [f"{section}.{k}" for section, values in preset.items() for k, v in values.items()
            if f"{section}.{k}" in given and getattr(getattr(config, section), k) != v]
    return dataclasses.replace(config, explicit=(*config.explicit, *kept)) if kept else config


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """A new config: ``config`` with dotted ``key=value`` overrides applied and validated."""
    return Config.from_dict(_merge_overrides(config.to_dict(), overrides), strict=True)
