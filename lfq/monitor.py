"""Per-layer, per-step codebook statistics of every quantizer in a model, from forward hooks:
``LFQMonitor`` (its constructor and public API; the hooks and step bookkeeping are in
``lfq.monitor_hooks``). The manual (which modules are watched, steps, diagnostics, evaluation
passes, cost, data parallelism, resuming) is docs/monitor.md; the columns of its records are
docs/records.md.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lfq.adapters import Adapter
from lfq.alarms import AlarmRule, Alarms, default_alarms
from lfq.code_usage import CodeUsage
from lfq.monitor_hooks import MonitorHooks
from lfq.records import Evaluation, evaluation_records, snapshot_records, step_records
from lfq.sinks import Sink, default_histogram_sink
from lfq.sparse_usage import SPARSE_ABOVE, DeferredSnapshot, SparseCodeUsage, kept_codes
from lfq.step_counts import (
    MODES,
    ClosedStep,
    LayerSpec,
    Snapshot,
    all_reduce_counts,
    is_quantizer,
)

__all__ = ["LFQMonitor", "ROOT_LAYER"]

ROOT_LAYER = "<root>"  # the name of the model itself when it is a quantizer (its path is "")
STATE_VERSION = 1


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


class LFQMonitor(MonitorHooks):
    def __init__(
        self,
        model: nn.Module,
        sink: Sink,
        *,
        log_every: int = 50,  # steps per flush: every step gets its rows; they reach the sink in batches of this many
        usage_window: int = 100,  # steps over which usage_fraction counts a code as used
        dead_after: int = 100,  # steps without use after which a code is dead
        histogram_every: int = 500,  # steps between histogram snapshots; detach() sends a final one
        histogram_sink: Sink | None | Literal[False] = None,  # the snapshots; None: default_histogram_sink(sink)
        distributed: bool | None = None,  # global-batch counts, rank-0 sinks; None = when a group exists
        diagnostics_every: int | None = None,  # steps between latent diagnostics; None = log_every
        adapters: Mapping[str | type, Adapter] | None = None,  # how to read quantizers (by path or class)
        alarms: Iterable[AlarmRule] | None | Literal[False] = None,  # collapse rules; None: lfq.alarms.default_alarms()
    ):
        """Watch every quantizer in ``model`` (docs/monitor.md is the manual): every closed step
        makes its rows whatever ``log_every`` is, which only sets how many closed steps are held on
        the device before one flush sends them to ``sink`` (and the default ``diagnostics_every``);
        ``histogram_sink`` None sends the snapshots where ``sink`` keeps them
        (``lfq.sinks.default_histogram_sink``), False takes none."""
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(sink):
            raise ValueError(
                f"sink must be a callable taking a list of dict records (e.g. MemorySink() or "
                f"JsonlSink(path)), got {sink!r}"
            )
        if histogram_sink is not None and histogram_sink is not False and not callable(histogram_sink):
            raise ValueError(f"histogram_sink must be None (where sink keeps them), False (none) or a callable "
                             f"like sink, got {histogram_sink!r}")
        self.sink = sink
        self.histogram_sink: Sink | None = (default_histogram_sink(sink) if histogram_sink is None
                                            else histogram_sink or None)
        self.log_every = _positive_int("log_every", log_every)
        self.usage_window = _positive_int("usage_window", usage_window)
        self.dead_after = _positive_int("dead_after", dead_after)
        self.histogram_every = _positive_int("histogram_every", histogram_every)
        if distributed not in (None, True, False):
            raise ValueError(f"distributed must be None (automatic), True or False, got {distributed!r}")
        self.distributed = distributed
        self._world()  # distributed=True without a process group: fail here, not at the first step
        self.diagnostics_every = self.log_every if diagnostics_every is None else _positive_int(
            "diagnostics_every", diagnostics_every)
        adapters = dict(adapters or {})
        for key, adapter in adapters.items():
            if not (isinstance(key, (str, type)) and isinstance(adapter, Adapter)):
                raise ValueError(
                    f"adapters maps a module path (str) or a module class to an lfq.adapters.Adapter (e.g. "
                    f"BinaryAdapter(codebook_size=...)), got {key!r}: {type(adapter).__name__}"
                )
        paths = {path or ROOT_LAYER for path, _ in model.named_modules()}
        unknown = sorted(k for k in adapters if isinstance(k, str) and k not in paths)
        if unknown:
            raise ValueError(f"adapters name modules {unknown} that {type(model).__name__} does not have; "
                             f"module paths are those of model.named_modules() ({ROOT_LAYER!r} for the model)")

        if alarms is not None and alarms is not False and not isinstance(alarms, Iterable):
            raise ValueError(f"alarms must be None (the defaults), False (none) or a list of lfq.alarms.AlarmRule, "
                             f"got {alarms!r}")
        self._alarms = Alarms(default_alarms() if alarms is None else alarms or (), self.usage_window)
        self._model = model
        self._layers: dict[str, LayerSpec] = {}
        for path, module in model.named_modules():
            name = path or ROOT_LAYER
            adapter = adapters.get(name) or next(
                (a for k, a in adapters.items() if isinstance(k, type) and isinstance(module, k)), None)
            if adapter is not None or is_quantizer(module):
                self._layers[name] = LayerSpec.describe(name, module, adapter)
        if not self._layers:
            raise ValueError(
                f"found no quantizer in {type(model).__name__}: expected an lfq.LFQ or vector-quantize-pytorch "
                f"LFQ/FSQ/VectorQuantize submodule, one with int codebook_size, int num_codebooks, bool "
                f"keep_num_codebooks_dim and last_stats, or pass adapters={{path: lfq.BinaryAdapter(...)}}"
            )
        self._captured: dict[str, Tensor | None] = {}
        self._ones: dict[torch.device, Tensor] = {}
        self._evaluation: Evaluation | None = None

        self._usage: dict[str, dict[str, CodeUsage]] = {name: {} for name in self._layers}
        self._last_stats_seen: dict[str, Any] = {}
        self._step = 0
        self._explicit_steps = False  # set_step was called: stop counting forward passes
        self._auto_next = 0  # the step the next training-mode forward of the model starts
        self._closed_unflushed = 0
        self._pending_steps: list[ClosedStep] = []
        self._pending_snapshots: list[Snapshot] = []

        self._handles = [model.register_forward_pre_hook(self._on_model_forward)]
        for spec in self._layers.values():
            self._handles.append(spec.module.register_forward_hook(self._make_hook(spec), with_kwargs=True))
            source = spec.adapter.latent_module(spec.module)
            if source is not None:
                self._handles.append(source.register_forward_hook(self._make_capture(spec.name)))

    # ------------------------------------------------------------------ public API

    @property
    def layers(self) -> list[str]:
        """The watched layers' names, in ``named_modules()`` order."""
        return list(self._layers)

    @property
    def alarms(self) -> list[dict[str, Any]]:
        """Every ``kind="alarm"`` row sent so far (rank 0; empty on other ranks), oldest first."""
        return list(self._alarms.fired)

    @property
    def step(self) -> int:
        return self._step

    def set_step(self, step: int) -> None:
        """The following forward passes belong to ``step``; a new step closes the current one."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0 (pass int(step) for tensors), got {step!r}")
        step = int(step)
        if step < self._step:
            raise ValueError(
                f"step must not decrease: got {step} after {self._step}; windows and dead codes are "
                f"measured in steps (to roll back, load_state_dict from a checkpoint)"
            )
        self._explicit_steps = True
        self._begin_step(step)

    def flush(self) -> None:
        """Close the current step and send every pending record and snapshot to the sinks."""
        self._close_step()
        self._settle()
        layer_order = {name: i for i, name in enumerate(self._layers)}
        # Step-major, as they closed (batched layers settle later than the others).
        self._pending_steps.sort(key=lambda c: (c.step, layer_order[c.spec.name], MODES.index(c.mode)))
        closed, self._pending_steps = self._pending_steps, []
        snapshots, self._pending_snapshots = self._pending_snapshots, []
        self._closed_unflushed = 0
        if not self._is_main():  # rank > 0: same state, no output (and no device-to-host transfer)
            return
        if closed:
            self.sink(self._alarms.check(step_records(closed)))
        if snapshots and self.histogram_sink is not None:  # sparse codebooks' deferred ones were counted by _settle
            snapshots = [(*s[:5], s[5].value, s[5].pair_mi) if isinstance(s[5], DeferredSnapshot) else s
                         for s in snapshots]
            self.histogram_sink(snapshot_records(snapshots))

    def snapshot(self) -> None:
        """Close the current step and queue a histogram snapshot of every (layer, mode): the counts
        since the previous snapshot, under the current step (layers untouched since then are left
        out); it goes to ``histogram_sink`` at the next flush. ``detach()`` calls it; a training
        loop that checkpoints calls it before its last checkpoint, so that the checkpoint's state
        knows the snapshot was sent (docs/monitor.md, "Checkpoints and resuming"). Without a histogram_sink, only closes the step."""
        self._close_step()
        if self.histogram_sink is not None:
            self._take_snapshots(self._step)

    @contextlib.contextmanager
    def evaluating(self, log: bool = False) -> Iterator[Evaluation]:
        """Count every token the watched layers see inside the block (any mode), over all ranks;
        on exit the returned :class:`Evaluation` holds the usage of the whole pass. Passes still
        make their usual per-step records. ``log``: also send the records, with ``step`` = the
        monitor's current step, to the sink (rank 0). Under torch.distributed every rank enters
        and leaves the block together (one all_reduce on exit)."""
        if self._evaluation is not None:
            raise RuntimeError("LFQMonitor.evaluating() blocks do not nest; leave the open one first")
        evaluation = self._evaluation = Evaluation()
        for name, spec in self._layers.items():
            device = next(iter(list(spec.module.buffers()) + list(spec.module.parameters())), torch.zeros(())).device
            if spec.codebook_size > SPARSE_ABOVE:  # the passes' codes, counted on exit
                evaluation.codes[name] = []
                continue
            with torch.inference_mode(False):
                evaluation.counts[name] = torch.zeros(spec.num_codebooks, spec.codebook_size, dtype=torch.long,
                                                      device=device)
        try:
            yield evaluation
        finally:
            self._evaluation = None
        if self._world() > 1 and evaluation.counts:
            all_reduce_counts(list(evaluation.counts.values()))
        counts: dict[str, Tensor | list[Tensor]] = {}
        for name in self._layers:  # in the layers' order, sparse codebooks by sorting their codes
            if name in evaluation.codes:
                books = self._layers[name].num_codebooks
                codes = kept_codes(evaluation.codes[name], books, self._world() > 1)
                counts[name] = [torch.unique(c, return_counts=True)[1] for c in codes]
            else:
                counts[name] = evaluation.counts[name]
        evaluation.records = evaluation_records(self._layers, counts)
        if log and self._is_main():
            self.sink([{"step": self._step, **r} for r in evaluation.records])

    def evaluate(self, loader: Iterable[Any], forward: Callable[[Any], Any] | None = None,
                 log: bool = False) -> Evaluation:
        """Run the model in eval mode without gradients over ``loader`` and return the usage of the
        whole pass (see :meth:`evaluating`). ``forward(batch)`` runs one batch; the default calls
        the model on the batch, or on its first element when the batch is a tuple or list."""
        model = self._model
        run = forward if forward is not None else (
            lambda batch: model(batch[0] if isinstance(batch, (tuple, list)) else batch))
        training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.evaluating(log=log) as evaluation:
                for batch in loader:
                    run(batch)
        finally:
            model.train(training)
        return evaluation

    def histogram(self, layer: str, mode: str | None = None) -> Tensor:
        """Cumulative code counts (num_codebooks, codebook_size) of ``layer``, on the CPU, the
        current step included; ``mode`` None sums train and eval passes."""
        if layer not in self._layers:
            raise ValueError(f"unknown layer {layer!r}; watched layers: {self.layers}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be None, 'train' or 'eval', got {mode!r}")
        spec = self._layers[layer]
        if spec.codebook_size > SPARSE_ABOVE:
            raise ValueError(f"{layer} has {spec.codebook_size} codes per codebook, past the dense limit of "
                             f"{SPARSE_ABOVE}: it keeps no (codebooks, codes) histogram; read its snapshots "
                             f"(histogram_sink), which list the used codes")
        total = torch.zeros(spec.num_codebooks, spec.codebook_size, dtype=torch.long)
        for m, usage in self._usage[layer].items():
            if mode is None or m == mode:
                total += (usage.histogram + usage.step.counts + sum(acc.counts for _, acc in usage.pending)).cpu()
        return total

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume; flushes first (docs/monitor.md, "Checkpoints and resuming")."""
        self.flush()
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "explicit_steps": self._explicit_steps,
            "auto_next": self._auto_next,
            "usage": {name: {mode: u.state() for mode, u in by_mode.items()} for name, by_mode in self._usage.items()},
            "alarms": self._alarms.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``; drops whatever this monitor accumulated and did not flush."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"expected an LFQMonitor state_dict of version {STATE_VERSION}, got {got!r}")
        unknown = sorted(set(state["usage"]) - set(self._layers))
        if unknown:
            raise ValueError(f"state has layers {unknown} that this model lacks; watched layers: {self.layers}")
        snapshots = self.histogram_sink is not None
        self._usage = {name: {} for name in self._layers}
        for name, by_mode in state["usage"].items():
            for mode, saved in by_mode.items():
                spec = self._layers[name]
                kind = SparseCodeUsage if spec.codebook_size > SPARSE_ABOVE else CodeUsage
                self._usage[name][mode] = usage = kind.from_state(spec, mode, saved, snapshots)
                if isinstance(usage, SparseCodeUsage):
                    usage.distributed = self._world() > 1
        self._step = int(state["step"])
        self._explicit_steps = bool(state["explicit_steps"])
        self._auto_next = int(state["auto_next"])
        self._alarms.load(state.get("alarms"))
        self._pending_steps, self._pending_snapshots, self._closed_unflushed = [], [], 0
        self._last_stats_seen.clear()

    def detach(self, flush: bool = True, snapshot: bool = True) -> None:
        """Close the last step, take a final histogram snapshot (``snapshot()``), flush, then
        remove every hook this monitor registered; idempotent. ``snapshot=False``: no final snapshot, for a run that is interrupted and will resume
        from a checkpoint (the resumed run sends those counts in its next snapshot).
        ``flush=False`` drops the unflushed steps instead (and takes no snapshot): a rank
        unwinding from an error must not enter a collective that the other ranks may never join.
        """
        if not self._handles:
            return
        try:
            if flush:
                if snapshot:
                    self.snapshot()
                self.flush()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def __enter__(self) -> LFQMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()
