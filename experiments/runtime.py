"""Where and how fast a run computes: :func:`resolve_device` turns ``config.runtime`` (device, mixed
precision, TF32, torch.compile) into this process's device, refusing what cannot be had with a
:class:`RuntimeConfigError` before a run folder is written, and the throughput columns;
docs/training.md ("GPUs, mixed precision, compiled steps") is the reference.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from experiments.config import ConfigError, RuntimeConfig

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class RuntimeConfigError(ConfigError):
    """The runtime section asks for a device or precision this machine cannot give."""


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(runtime: RuntimeConfig, *, cuda_available: bool | None = None,
                   device_count: int | None = None) -> torch.device:
    """The device this process computes on; the two keyword arguments fake CUDA in tests."""
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    count = (torch.cuda.device_count() if available else 0) if device_count is None else device_count
    spec = runtime.device
    if spec == "cpu":
        device = torch.device("cpu")
    elif spec == "auto":
        device = torch.device("cuda", local_rank() % count) if available and count else torch.device("cpu")
    else:
        if not available or count == 0:
            raise RuntimeConfigError(f"runtime.device={spec!r} but no CUDA device is visible here "
                                     f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                                     f"use runtime.device=auto or cpu, or run on a GPU node")
        index = local_rank() % count if spec == "cuda" else int(spec.split(":")[1])
        if index >= count:
            raise RuntimeConfigError(f"runtime.device={spec!r} but only {count} CUDA device(s) are visible "
                                     f"(cuda:0..cuda:{count - 1}): pick one of those, or runtime.device=cuda "
                                     f"(this rank's LOCAL_RANK)")
        device = torch.device("cuda", index)
    if runtime.precision == "fp16" and device.type != "cuda":
        raise RuntimeConfigError(f"runtime.precision='fp16' needs a CUDA device, but this run computes on "
                                 f"{device}: use runtime.precision=bf16 (or fp32) on a CPU")
    return device


@dataclass
class Runtime:
    """The resolved runtime of one run: apply it, wrap forward passes, scale the loss."""

    config: RuntimeConfig
    device: torch.device

    @classmethod
    def resolve(cls, config: RuntimeConfig) -> Runtime:
        return cls(config, resolve_device(config))

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def apply(self) -> None:
        """Process-wide settings: the current CUDA device and TF32 (both explicit, never torch's defaults)."""
        if self.is_cuda:
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = self.config.tf32
            torch.backends.cudnn.allow_tf32 = self.config.tf32
            torch.cuda.reset_peak_memory_stats(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES.get(self.config.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Enabled for fp16 only; a disabled scaler passes losses and steps through unchanged."""
        return torch.amp.GradScaler(self.device.type, enabled=self.config.precision == "fp16")

    def compile(self, model: nn.Module) -> nn.Module:
        return torch.compile(model) if self.config.compile else model

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def max_memory_mb(self) -> float:
        """CUDA: the peak allocated by tensors on this device; CPU: the process's peak resident set."""
        if self.is_cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class Throughput:
    """Step time, data wait and rates over the steps since the last log row.

    Timing reads the clock only: on CUDA the caller synchronises at log steps (reading the
    logged losses back does), so the interval covers the work queued in it, and no step
    in between waits for the device.
    """

    def __init__(self, samples_per_step: int, tokens_per_sample: int | None = None):
        self.samples_per_step = samples_per_step
        self.tokens_per_sample = tokens_per_sample
        self._start = time.perf_counter()
        self._steps = 0
        self._data_wait = 0.0

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._data_wait += time.perf_counter() - t0

    def step_done(self) -> None:
        self._steps += 1

    def row(self, max_memory_mb: float) -> dict[str, float]:
        """The columns of a ``kind="train"`` row; restarts the interval."""
        now = time.perf_counter()
        steps = max(self._steps, 1)
        step_time = (now - self._start) / steps
        out = {
            "step_time_s": step_time,
            "data_wait_s": self._data_wait / steps,
            "samples_per_s": self.samples_per_step / step_time if step_time > 0 else float("nan"),
            "tokens_per_s": (self.samples_per_step * self.tokens_per_sample / step_time
                             if self.tokens_per_sample and step_time > 0 else float("nan")),
            "max_memory_mb": max_memory_mb,
        }
        self._start, self._steps, self._data_wait = now, 0, 0.0
        return out
