"""A sweep: a base config, a grid of values and seeds, expanded into validated run configs before
anything is submitted; the sweep file's format and the expansion's rules are in docs/experiments.md
("Sweep files").
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments.config import Config, ConfigError, load_config

SWEEP_KEYS = ("name", "base", "overrides", "grid", "zip", "seeds", "resources", "description")
REPO_ROOT = Path(__file__).resolve().parent.parent


class SweepError(ValueError):
    """The sweep file is malformed, or one of its runs has an invalid config."""


@dataclass(frozen=True)
class Sweep:
    name: str
    base: Mapping[str, Any]  # the base config as a mapping (a path is read when the sweep is loaded)
    overrides: tuple[str, ...] = ()
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    zip: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    seeds: tuple[int, ...] = (0,)
    resources: Mapping[str, Any] = field(default_factory=dict)
    source: str = "<inline>"  # where it was read from, for messages


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: the grid point that made it and its validated config."""

    point: Mapping[str, Any]  # dotted key -> value, including "seed"
    config: Config

    @property
    def run_id(self) -> str:
        return self.config.run_id

    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.point.items())


def _as_tuple(value: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(value, list) or not value:
        raise SweepError(f"{where} must be a non-empty list, got {value!r}")
    return tuple(value)


def _read_base(base: Any, sweep_dir: Path, where: str) -> Mapping[str, Any]:
    if isinstance(base, Mapping):
        return dict(base)
    if not isinstance(base, str):
        raise SweepError(f"{where}: 'base' must be a config path or a mapping, got {base!r}")
    # relative to the sweep file first, then to the repository root
    for candidate in (sweep_dir / base, REPO_ROOT / base, Path(base)):
        if candidate.is_file():
            data = yaml.safe_load(candidate.read_text()) or {}
            if not isinstance(data, Mapping):
                raise SweepError(f"{where}: base config {candidate} is not a YAML mapping")
            return data
    raise SweepError(f"{where}: base config {base!r} not found (looked next to the sweep file and in {REPO_ROOT})")


def sweep_from_dict(d: Mapping[str, Any], source: str = "<inline>", sweep_dir: Path | None = None) -> Sweep:
    if not isinstance(d, Mapping):
        raise SweepError(f"{source}: a sweep must be a YAML mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{source}: unknown sweep key(s) {unknown}; allowed: {list(SWEEP_KEYS)}")
    name = d.get("name")
    if not isinstance(name, str) or not name or "/" in name or name.startswith(("_", ".")):
        raise SweepError(f"{source}: 'name' must be a non-empty folder name (no '/', not starting with _ or .), got {name!r}")
    if "base" not in d:
        raise SweepError(f"{source}: 'base' is required (a config path or an inline mapping)")
    base = _read_base(d["base"], sweep_dir or REPO_ROOT, source)
    overrides = d.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise SweepError(f"{source}: 'overrides' must be a list of 'key=value' strings, got {overrides!r}")
    grid_raw = d.get("grid") or {}
    zip_raw = d.get("zip") or {}
    for key, raw in (("grid", grid_raw), ("zip", zip_raw)):
        if not isinstance(raw, Mapping):
            raise SweepError(f"{source}: '{key}' must map dotted config keys to lists, got {raw!r}")
    grid = {str(k): _as_tuple(v, f"{source}: grid.{k}") for k, v in grid_raw.items()}
    zipped = {str(k): _as_tuple(v, f"{source}: zip.{k}") for k, v in zip_raw.items()}
    lengths = {k: len(v) for k, v in zipped.items()}
    if len(set(lengths.values())) > 1:
        raise SweepError(f"{source}: every 'zip' list must have the same length, got {lengths}")
    both = sorted((set(grid) & set(zipped)) | ({"seed"} & (set(grid) | set(zipped))))
    if both:
        raise SweepError(f"{source}: key(s) {both} appear twice (grid/zip/seeds); give each key once")
    seeds = d.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"{source}: 'seeds' must be a non-empty list of ints, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{source}: 'seeds' has duplicates: {seeds}")
    resources = d.get("resources") or {}
    if not isinstance(resources, Mapping):
        raise SweepError(f"{source}: 'resources' must be a mapping (profile: NAME, time: ..., ...), got {resources!r}")
    return Sweep(name=name, base=base, overrides=tuple(overrides), grid=grid, zip=zipped,
                 seeds=tuple(seeds), resources=dict(resources), source=source)


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SweepError(f"{path}: not valid YAML (or not UTF-8): {' '.join(str(e).split())}") from None
    return sweep_from_dict(data, source=str(path), sweep_dir=path.resolve().parent)


def grid_points(sweep: Sweep) -> list[dict[str, Any]]:
    """Grid (cartesian) x zip (paired) x seeds, in a stable order: seeds vary fastest."""
    grid_keys = list(sweep.grid)
    zip_keys = list(sweep.zip)
    zip_rows = list(zip(*sweep.zip.values(), strict=True)) if zip_keys else [()]
    points = []
    for values in itertools.product(*sweep.grid.values()):
        for zrow in zip_rows:
            for seed in sweep.seeds:
                points.append({**dict(zip(grid_keys, values, strict=True)), **dict(zip(zip_keys, zrow, strict=True)), "seed": seed})
    return points


def _override(key: str, value: Any) -> str:
    # load_config parses override values as YAML; JSON is YAML, so this round-trips exactly
    return f"{key}={json.dumps(value)}"


def expand(sweep: Sweep, overrides: Sequence[str] = ()) -> list[RunSpec]:
    """Validated runs of the sweep; ``overrides`` (e.g. ``scale=smoke``) apply to every run, last,
    and win over the scale preset (``load_config``'s ``explicit``).

    All points are checked before returning; the error lists each bad point with its field.
    """
    points = grid_points(sweep)
    runs: list[RunSpec] = []
    errors: list[str] = []
    seen: set[str] = set()
    for i, point in enumerate(points):
        items = [*sweep.overrides, *(_override(k, v) for k, v in point.items()), _override("name", sweep.name)]
        try:  # the command line's overrides win over scale=smoke; the sweep's own values it shrinks
            config = load_config(sweep.base, items, explicit=overrides)
        except ConfigError as e:
            label = " ".join(f"{k}={v}" for k, v in point.items())
            errors.append(f"run {i + 1}/{len(points)} ({label}): {e}")
            continue
        if config.run_id not in seen:  # identical configs are one run, whatever point made them
            seen.add(config.run_id)
            runs.append(RunSpec(point=point, config=config))
    if errors:
        shown = "\n  ".join(errors[:10]) + (f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else "")
        raise SweepError(f"{sweep.source}: {len(errors)} of {len(points)} runs have invalid configs; "
                         f"nothing was submitted:\n  {shown}")
    return runs
