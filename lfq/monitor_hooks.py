"""The machinery behind ``lfq.monitor.LFQMonitor``, which inherits ``MonitorHooks``: the forward
hook of each watched layer reads a pass through its adapter into the current step's
``StepCounts`` (``_observe``), and a new step closes the current one into ``ClosedStep``s
(``_close_step``, all-reducing the counts under torch.distributed) for ``LFQMonitor.flush``; see
docs/monitor.md ("Steps", "Inside the monitor").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lfq.adapters import ProtocolAdapter, check_indices
from lfq.code_usage import CodeUsage
from lfq.latent_stats import gram_entropy
from lfq.records import Evaluation
from lfq.sinks import Sink
from lfq.sparse_usage import SPARSE_ABOVE, DeferredSnapshot, SparseCodeUsage
from lfq.step_counts import (
    LOSS_FIELDS,
    MODES,
    ClosedStep,
    LayerSpec,
    Snapshot,
    StepCounts,
    all_reduce_counts,
    scatter_counts,
)


class MonitorHooks:
    """What ``LFQMonitor`` does inside forward passes and at step boundaries. The annotations
    are the state ``LFQMonitor.__init__`` sets up; ``flush`` is ``LFQMonitor.flush``."""

    _layers: dict[str, LayerSpec]
    _usage: dict[str, dict[str, CodeUsage]]  # per layer, per mode
    _captured: dict[str, Tensor | None]  # the latent source's output of the pass in progress, per layer
    _ones: dict[torch.device, Tensor]
    _evaluation: Evaluation | None  # while an evaluating() block is open
    _last_stats_seen: dict[str, Any]
    _step: int
    _explicit_steps: bool
    _auto_next: int
    _closed_unflushed: int
    _pending_steps: list[ClosedStep]
    _pending_snapshots: list[Snapshot]
    log_every: int
    usage_window: int
    dead_after: int
    histogram_every: int
    histogram_sink: Sink | None
    diagnostics_every: int
    distributed: bool | None

    def flush(self) -> None:
        """Close the current step and send the pending records: ``LFQMonitor.flush``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ ranks

    def _world(self) -> int:
        """Ranks whose counts make up a step: the process group's size, or 1 (opted out / none)."""
        if self.distributed is False or not (dist.is_available() and dist.is_initialized()):
            if self.distributed is True:
                raise RuntimeError(
                    "LFQMonitor(distributed=True) needs an initialised torch.distributed process group; "
                    "pass distributed=None to use one only when it exists"
                )
            return 1
        return dist.get_world_size()

    def _is_main(self) -> bool:
        return self._world() == 1 or dist.get_rank() == 0

    # ------------------------------------------------------------------ hooks

    def _on_model_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training and not self._explicit_steps:
            step, self._auto_next = self._auto_next, self._auto_next + 1
            self._begin_step(step)

    def _make_hook(self, spec: LayerSpec) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            # inference_mode(False): tensors created here must stay writable after an
            # inference-mode validation pass; no_grad: nothing here is differentiated.
            try:
                with torch.inference_mode(False), torch.no_grad():
                    self._observe(spec, args, kwargs, output)
            finally:
                self._captured.pop(spec.name, None)

        return hook

    def _make_capture(self, name: str) -> Callable[..., None]:
        def capture(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, Tensor):
                self._captured[name] = output

        return capture

    def _one(self, device: torch.device) -> Tensor:
        """A cached int64 scalar 1 on ``device``: the weight of every token when there is no mask."""
        one = self._ones.get(device)
        if one is None:
            with torch.inference_mode(False):
                one = self._ones[device] = torch.ones((), dtype=torch.long, device=device)
        return one

    def _diagnostic_step(self) -> bool:
        return self._step % self.diagnostics_every == 0

    def _observe(self, spec: LayerSpec, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        adapter = spec.adapter
        indices = adapter.indices(spec.module, args, kwargs, output)
        if not isinstance(indices, Tensor):
            raise ValueError(f"{spec.name}: the adapter's indices must be a tensor, got {type(indices).__name__}")
        idx = check_indices(spec.name, adapter, indices)  # (tokens, c); image/video axes flattened
        mask = adapter.mask(spec.module, args, kwargs)
        per_index = idx.shape[0] // max(1, getattr(adapter, "tokens_per_index", 1))
        if mask is None:
            weight = self._one(idx.device).expand_as(idx)
        elif isinstance(mask, Tensor) and mask.dtype == torch.bool and mask.numel() in (
                idx.shape[0], per_index, samples := (indices.shape[0] if indices.ndim else 0)):
            # One entry per token; per position (VectorQuantize's shared heads); or per sample,
            # (b,), keeping or dropping all of a sample's tokens.
            keep = mask.reshape(-1).to(device=idx.device)
            if keep.numel() != idx.shape[0] and samples and idx.shape[0] % keep.numel() == 0:
                keep = keep.repeat_interleave(idx.shape[0] // keep.numel())
            weight = keep.to(torch.long).reshape(-1, 1).expand_as(idx)
        else:
            raise ValueError(
                f"{spec.name}: mask must be a bool tensor with one entry per token ({idx.shape[0]} for "
                f"indices of shape {tuple(indices.shape)}) or per sample, got {getattr(mask, 'dtype', type(mask).__name__)} "
                f"of shape {tuple(getattr(mask, 'shape', ()))}"
            )
        if not isinstance(adapter, ProtocolAdapter):  # foreign quantizers mark dropped tokens with -1
            valid = idx >= 0
            weight, idx = weight * valid, idx.clamp(min=0)

        mode = "train" if spec.module.training else "eval"
        usage = self._usage_of(spec, mode, idx.device)
        usage.add_tokens(spec, idx, weight)
        if self._evaluation is not None:
            if spec.name in self._evaluation.codes:
                self._evaluation.codes[spec.name].append((idx, weight))
            else:
                scatter_counts(self._evaluation.counts[spec.name], spec, idx, weight)
        if mode != "train":  # eval-mode losses are NaN by contract, whatever last_stats holds
            return
        self._add_losses(spec, usage.step, adapter.losses(spec.module, output))
        if spec.bits is not None and self._diagnostic_step():
            latent = adapter.latent(spec.module, args, kwargs, self._captured.get(spec.name))
            if latent is not None:
                if latent.z.shape[0] != idx.shape[0] or latent.z.shape[1:] != (spec.num_codebooks, spec.bits):
                    raise ValueError(
                        f"{spec.name}: the latent has shape {tuple(latent.z.shape)}, expected ({idx.shape[0]}, "
                        f"{spec.num_codebooks}, {spec.bits}): one row per index token, codebooks, bits"
                    )
                usage.step.add_latent(latent, weight[:, 0], entropies=not adapter.reports_losses)

    def _add_losses(self, spec: LayerSpec, acc: StepCounts, stats: Any) -> None:
        # An object already counted is stale: a quantizer that did not refresh last_stats.
        if stats is None or stats is self._last_stats_seen.get(spec.name):
            return
        self._last_stats_seen[spec.name] = stats
        values = [getattr(stats, name, None) for name in LOSS_FIELDS]
        books, device = spec.num_codebooks, acc.loss_sum.device
        if all(isinstance(v, Tensor) and v.shape == (books,) and v.device == device for v in values):
            acc.loss_sum.add_(torch.stack(values))  # the usual case, as LFQ reports them: one op
            acc.loss_passes = [n + 1 for n in acc.loss_passes]
            return
        for i, (name, value) in enumerate(zip(LOSS_FIELDS, values, strict=True)):
            if value is None:
                continue
            value = torch.as_tensor(value).detach().to(device=device, dtype=torch.float32)
            if value.numel() not in (1, books):
                raise ValueError(
                    f"{spec.name}: last_stats.{name} must hold one value per codebook ({books}), "
                    f"got shape {tuple(value.shape)}"
                )
            acc.loss_sum[i].add_(value.reshape(-1).expand(books))
            acc.loss_passes[i] += 1

    # ------------------------------------------------------------------ steps

    def _usage_of(self, spec: LayerSpec, mode: str, device: torch.device) -> CodeUsage:
        usage = self._usage[spec.name].get(mode)
        if usage is None:
            snapshots = self.histogram_sink is not None
            if spec.codebook_size > SPARSE_ABOVE:
                usage = SparseCodeUsage.new(spec, device, self._step, snapshots)
                usage.distributed = self._world() > 1
            else:
                usage = CodeUsage.new(spec, device, self._step, snapshots)
            self._usage[spec.name][mode] = usage
        elif usage.device != device:
            usage.to(device)
        return usage

    def _begin_step(self, step: int) -> None:
        if step != self._step:
            self._close_step()
            self._step = step
        if self._closed_unflushed >= self.log_every:
            self.flush()

    def _settle(self) -> None:
        """Fold every stashed step (``lfq.code_usage.BATCH_MAX_CODES``) into the state."""
        summarize = self._is_main()
        for name, spec in self._layers.items():
            for mode, usage in self._usage[name].items():
                self._pending_steps += usage.settle(spec, mode, self.usage_window, self.dead_after, summarize)

    def _close_step(self) -> None:
        """Turn the current step's counts into one pending ClosedStep per active (layer, mode)."""
        step = self._step
        active = [(spec, mode, usage) for name, spec in self._layers.items() for mode in MODES
                  if (usage := self._usage[name].get(mode)) is not None and usage.step.forward_passes > 0]
        if not active:
            return
        world = self._world()
        if world > 1:
            all_reduce_counts([usage.step.counts for _, _, usage in active])
            for _, _, usage in active:  # this rank's exact batch entropy, before the sums go global
                acc = usage.step
                if acc.gram is not None and acc.latent is not None:
                    acc.local_batch = gram_entropy(acc.gram, acc.latent[0]).nan_to_num(0.0) / world
            latents = [t for _, _, usage in active
                       for t in (usage.step.latent, usage.step.gram, usage.step.dependence, usage.step.local_batch)
                       if t is not None]
            if latents:  # diagnostic steps: the latent sums of the global batch (float, apart from the counts)
                all_reduce_counts(latents)
        summarize = self._is_main()  # only rank 0's records reach a sink
        for spec, mode, usage in active:
            # Batches pay off only when flushes are a few steps apart.
            self._pending_steps += usage.close(spec, mode, step, self.usage_window, self.dead_after,
                                               summarize=summarize, batched=self.log_every >= 4)
        self._closed_unflushed += 1
        if self.histogram_sink is not None and (step + 1) % self.histogram_every == 0:
            self._take_snapshots(step)

    def _take_snapshots(self, step: int) -> None:
        """Queue, under ``step``, the counts of every (layer, mode) touched since its last snapshot.
        Sparse codebooks' waiting steps are counted at the next flush (a DeferredSnapshot), as the
        flush would sync the host."""
        summarize = self._is_main()
        for name, spec in self._layers.items():
            for mode, usage in self._usage[name].items():
                if isinstance(usage, SparseCodeUsage):
                    counts = usage.take_snapshot(defer=True)
                else:
                    self._pending_steps += usage.settle(spec, mode, self.usage_window, self.dead_after, summarize)
                    counts = usage.take_snapshot()
                pair_mi, usage.pair_mi = usage.pair_mi, None
                if isinstance(counts, DeferredSnapshot):  # a later diagnostic step replaces it when settled
                    counts.pair_mi = pair_mi
                if counts is not None:
                    self._pending_snapshots.append((step, name, mode, spec.codebook_size, spec.bits, counts, pair_mi))
