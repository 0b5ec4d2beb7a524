"""Up-front memory estimates of a config (:func:`check_resources`, a ``ResourceError`` naming the
estimate): a lower bound from the tensors whose size follows from the config alone, so that a run
that cannot fit is refused before anything is written (docs/experiments.md).
"""

from __future__ import annotations

import os

from experiments.config import Config, ConfigError

FLOAT = 4  # bytes: every tensor of the model is float32
COUNT = 8  # bytes: the monitor's code counters are int64
MONITOR_TENSORS = 4 * 2  # last_used, histogram, since_snapshot, step counts; train and eval mode
HEADROOM = 0.9  # share of the memory a run may plan to take


class ResourceError(ConfigError):
    """The config needs more memory than there is; the message gives the estimate and what to lower."""


def machine_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def estimate(config: Config) -> dict[str, int]:
    """Bytes that the named parts of the run certainly need (a lower bound; see the module docstring).

    The task's module says what its data takes (``memory(config) -> (parts, tokens per batch)``),
    the quantizer kind's registry entry what its module takes; the monitor's counters are the
    same for every kind."""
    from experiments.quantizers import kind
    from experiments.tasks import get_task

    config = config.resolved()
    q = config.quantizer
    task = get_task(config.task)
    parts, tokens = task.memory(config) if hasattr(task, "memory") else ({}, config.data.batch_size)
    entry = kind(q.kind)
    parts = {**(entry.memory(q, tokens) if entry.memory else {}), **parts}
    parts["quantizer.codebook_size: the monitor's per-code counters"] = MONITOR_TENSORS * q.num_codebooks * \
        q.codebook_size * COUNT
    return parts


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if n < 1000 or unit == "EB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EB"


def check_resources(config: Config, available: int | None = None, where: str = "this machine") -> dict[str, int]:
    """The estimate, or ResourceError if it exceeds ``available`` bytes (default: this machine's memory)."""
    parts = estimate(config)
    available = machine_memory_bytes() if available is None else available
    total = sum(parts.values())
    if total > HEADROOM * available:
        biggest = max(parts, key=parts.__getitem__)
        fields, what = biggest.split(": ", 1)
        raise ResourceError(
            f"this run needs at least {_size(total)} of memory but {where} has {_size(available)}: "
            f"{what} alone takes {_size(parts[biggest])}; lower {fields.replace(' x ', ' or ')}")
    return parts
