"""Cluster profiles: named resource sets in ``slurm/profiles/<name>.yaml`` whose short keys (also
those of a sweep's ``resources:`` and of the command line) are mapped to submitit's parameters and
checked before a job is submitted; docs/slurm.md ("Profiles") lists the keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import submitit
import yaml
from submitit.core import plugins

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
DEFAULT_PROFILE = "default"

SHORT_NAMES: dict[str, str] = {
    "partition": "slurm_partition",
    "account": "slurm_account",
    "qos": "slurm_qos",
    "constraint": "slurm_constraint",
    "gpus": "gpus_per_node",
    "tasks": "tasks_per_node",  # DDP ranks per run on its node
    "cpus": "cpus_per_task",
    "memory": "mem_gb",
    "time": "timeout_min",
    "setup": "slurm_setup",
    "array_parallelism": "slurm_array_parallelism",
    "max_requeues": "slurm_max_num_timeout",  # timeouts/preemptions a run may requeue after (default 3)
}


class ProfileError(ValueError):
    """A profile or resource override is unknown or has a bad value."""


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _parse_minutes(value: Any, where: str) -> int:
    """Minutes, as a number or in SLURM's own forms: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM[:SS]."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return max(1, round(value))
    text = value.strip() if isinstance(value, str) else ""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if m:
        days, a, b, c = (int(x) if x else 0 for x in m.groups())
        if m.group(1):  # D-HH[:MM[:SS]]
            seconds = days * 86400 + a * 3600 + b * 60 + c
        elif m.group(4):  # HH:MM:SS
            seconds = a * 3600 + b * 60 + c
        else:  # MM or MM:SS
            seconds = a * 60 + b
        if seconds > 0:
            return max(1, round(seconds / 60))
    raise ProfileError(f"{where}={value!r}: expected minutes (e.g. 30) or [D-]HH:MM:SS (e.g. 4:00:00)")


def _parse_gb(value: Any, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([MGT]?)B?\s*", value, flags=re.IGNORECASE)
        if m and float(m.group(1)) > 0:
            scale = {"": 1.0, "M": 1 / 1024, "G": 1.0, "T": 1024.0}[m.group(2).upper()]
            return float(m.group(1)) * scale
    raise ProfileError(f"{where}={value!r}: expected GB as a number (e.g. 16) or a size like 512M / 16G")


def _positive_int(value: Any, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProfileError(f"{where}={value!r}: expected a whole number >= 0")
    return value


def _submitit_key_ok(key: str) -> bool:
    """The same rule AutoExecutor.update_parameters applies, checked without a cluster present."""
    generics = submitit.AutoExecutor._typed_parameters()
    if key in generics or key in SHORT_NAMES.values():
        return True
    prefix, _, arg = key.partition("_")
    executors = plugins.get_executors()
    return prefix in executors and (arg in executors[prefix]._valid_parameters() or arg in generics)


def to_submitit(resources: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Short or submitit keys -> submitit parameters, each value checked."""
    out: dict[str, Any] = {}
    for key, value in resources.items():
        name = SHORT_NAMES.get(key, key)
        if key not in SHORT_NAMES and not _submitit_key_ok(key):
            raise ProfileError(
                f"{where}: unknown resource key {key!r}; use one of {sorted(SHORT_NAMES)} or a submitit "
                f"parameter (e.g. slurm_exclude, slurm_additional_parameters, tasks_per_node)")
        if value is None:
            continue
        if name == "timeout_min":
            value = _parse_minutes(value, f"{where}: {key}")
        elif name == "mem_gb":
            value = _parse_gb(value, f"{where}: {key}")
        elif name in ("gpus_per_node", "cpus_per_task", "slurm_array_parallelism", "nodes", "tasks_per_node",
                      "slurm_max_num_timeout"):
            value = _positive_int(value, f"{where}: {key}")
            if name in ("cpus_per_task", "slurm_array_parallelism", "nodes", "tasks_per_node") and value < 1:
                raise ProfileError(f"{where}: {key}={value!r}: must be >= 1")
        elif name == "slurm_setup":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ProfileError(f"{where}: {key}={value!r}: expected a list of shell lines")
        out[name] = value
    return out


def load_profile(name: str) -> dict[str, Any]:
    """The profile's resources, as written in its file (short or submitit keys)."""
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ProfileError(f"unknown cluster profile {name!r}; available: {available_profiles()} (in {PROFILES_DIR})")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, Mapping):
        raise ProfileError(f"{path}: a profile must be a YAML mapping of resource keys")
    data = {k: v for k, v in data.items() if k != "description"}
    to_submitit(data, str(path))  # fail on the file's own mistakes, naming the file
    return dict(data)


def resolve_resources(sweep_resources: Mapping[str, Any], profile: str | None = None,
                      overrides: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(profile name, submitit parameters): the profile, then the sweep's resources, then the command line."""
    sweep_resources = dict(sweep_resources)
    name = profile or sweep_resources.pop("profile", None) or DEFAULT_PROFILE
    sweep_resources.pop("profile", None)
    params = to_submitit(load_profile(name), f"profile {name!r}")
    params.update(to_submitit(sweep_resources, "sweep resources"))
    params.update(to_submitit(dict(overrides or {}), "command line"))
    return name, _one_rank_per_gpu(params)


def _one_rank_per_gpu(params: dict[str, Any]) -> dict[str, Any]:
    """With GPUs, tasks_per_node defaults to gpus_per_node and must equal it (one DDP rank per GPU)."""
    gpus, tasks = int(params.get("gpus_per_node") or 0), params.get("tasks_per_node")
    if gpus and tasks is None and gpus > 1:
        params["tasks_per_node"] = gpus
    elif gpus and tasks is not None and tasks != gpus:
        # one process would leave GPUs idle; more processes than GPUs would share a device under NCCL
        raise ProfileError(f"tasks={tasks} with gpus={gpus}: a data-parallel run has one rank per GPU, so tasks "
                           f"must equal gpus (or be left out); for {tasks} ranks ask for gpus={tasks}")
    return params
