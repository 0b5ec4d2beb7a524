"""Per-layer, per-step codebook statistics of every quantizer in a model, from forward hooks.

    mon = LFQMonitor(model, sink=JsonlSink("metrics.jsonl"), log_every=50)
    for step in range(steps):
        mon.set_step(step)          # optional, see "Steps" below
        loss = train_step(model)
    mon.detach()                    # flushes, then removes every hook

Which modules are watched: every submodule of ``model`` (the model itself included) that
``lfq.adapters.adapter_for`` recognises: an ``lfq.LFQ``; the newest vector-quantize-pytorch
``LFQ`` (plain or ``spherical``; a ``ResidualLFQ`` is watched per inner layer), ``FSQ`` or
``VectorQuantize``; or a module that duck-types the quantizer protocol: int ``codebook_size``,
int ``num_codebooks``, bool ``keep_num_codebooks_dim`` and a ``last_stats`` attribute (``None``
or a namedtuple of per-codebook tensors ``per_sample_entropy``, ``batch_entropy``,
``commitment``, ``aux_loss``; missing or ``None`` fields are logged as NaN). Anything else is
watched through ``adapters={path or class: adapter}``, usually an ``lfq.BinaryAdapter`` (a
binary quantizer in a few arguments: codebook size, inverse temperature, codebook scale, where
the latent is, how to read the indices). A layer is named by its path in
``model.named_modules()``; the model itself, which has the empty path, is named ``"<root>"``.
Indices are read from the forward output (``out.indices``, ``out[0].indices`` with a loss
breakdown, or ``out[1]`` of a tuple); negative indices (masked or dropped tokens of foreign
quantizers) are not counted. The optional bool ``mask`` (True = keep) comes from the forward
call's ``mask`` keyword (or lfq.LFQ's 4th positional argument).

Diagnostics. For binary quantizers the monitor reads the latent z (the values whose signs are
the bits; for ``lfq.LFQ`` and the upstream LFQ from a forward hook on ``project_in``, then the
module's own soft clamp, rotation and spherical normalisation) and the inverse temperature tau
(the forward's ``inv_temperature``, default 100) on diagnostic steps, ``step %
diagnostics_every == 0`` (default ``log_every``), in training mode, with ``P(bit i = +) =
sigmoid(4 tau m z_i)`` for codes ``{-m, +m}^d`` (``lfq.adapters``). It computes
``saturated_fraction`` and ``mean_abs_z`` from it, and, for quantizers that do not report them
(all but ``lfq.LFQ`` and the protocol), the exact ``per_sample_entropy``, ``batch_entropy`` (of
the step's batch distribution over all 2**d codes, every pass and rank of the step together,
through the factorisation of ``lfq.entropy``; NaN above 2**24 codes) and ``commitment``. On
other steps those columns are NaN for such quantizers. Code counts and bit statistics come
from the indices on every step.

Evaluation. ``with monitor.evaluating() as ev: ...`` counts every token the watched layers see
in the block, over all ranks, and on exit ``ev.records`` holds one record per (layer,
codebook): ``kind="evaluation"``, ``tokens``, ``codes_used``, ``usage_fraction`` (codes used
at least once in the whole pass / codebook size), ``perplexity``, ``tokens_per_code`` and
``usage_ceiling`` (1 - exp(-tokens / codebook_size): what a uniform assignment of that many
tokens reaches, ``lfq.records``); ``ev.usage_fraction()`` is the mean usage. ``monitor.evaluate(loader)`` runs the model in eval mode without gradients over
``loader`` inside such a block; ``log=True`` also sends the records to the sink with the
current ``step`` (TensorBoard and wandb: the ``lfq_eval.*`` scalars, ``lfq.sinks.scalar_tags``).

Steps. ``set_step(s)`` says which step the following forward passes belong to (steps never
decrease). If it is never called, every training-mode forward pass of ``model`` itself
starts a new step (0, 1, ...; calling only its submodules does not), and eval-mode passes
belong to the step of the last training pass. Everything a layer sees during one step is
accumulated: code counts are summed over its forward passes (gradient accumulation, a layer
applied twice) and the losses are the mean over those passes. A step is closed when the next
one begins or on ``flush()`` (passes of the same step after a flush make a second record for
it); once ``log_every`` steps are closed, their records go to the sink.

Cost. Per forward pass one ``scatter_add_`` into a (num_codebooks, codebook_size) count
tensor. Per closed step, codebooks of up to ``lfq.code_usage.BATCH_MAX_CODES`` codes (c * K)
only stash the step's counts; their statistics are computed for up to 64 steps at once at the
next flush or snapshot, the same numbers with ~25 device ops per batch instead of per step.
Larger codebooks take about 25 O(codebook_size) device ops per step (2 ms at 2^18 on one CPU
core; microseconds on a GPU). None reads back. On diagnostic steps, a few O(tokens * bits) ops
on the latent, and for foreign binary quantizers the batch distribution (2 * tokens * 2**d
flops). Per flush one device-to-host transfer per device, plus one per histogram snapshot it
carries. Under torch.distributed, one all_reduce of the counts per closed step (below), and one
of the latent sums on diagnostic steps.

Train and eval passes are kept apart: each (layer, mode) has its own window and dead-code
state and its own records (``mode`` column), so validation does not revive dead codes.

Records. Each closed step makes one record per (layer, codebook, mode) for the ``sink``
(``log_every`` only batches them: see the constructor); with a ``histogram_sink`` (by default
where the sink keeps histograms, see the constructor), every ``histogram_every`` steps and at
``detach()`` the counts since the previous snapshot go there as sparse rows. Their columns, the format ``analysis`` reads, are defined in the
``lfq.records`` docstring. ``histogram(layer)`` is the cumulative (num_codebooks,
codebook_size) count tensor.

Data parallelism. Under an initialised ``torch.distributed`` process group of more than one
rank (opt out with ``distributed=False``), the records describe the global batch: when a step
closes, the code counts of every (layer, mode) it touched are summed over the ranks, in one
``all_reduce`` per device for all layers at once (no host sync: NCCL enqueues it on the
stream), before ``codes_used``, ``tokens``, ``perplexity``, ``usage_fraction``, ``dead_codes``,
``bit_balance_mad`` and the histograms are derived from them, so every rank folds the same
global counts into the same state and any rank's ``state_dict()`` resumes the run. The losses
are not reduced: ``lfq.LFQ`` already reports those of the global batch, identical on every
rank (a quantizer that reports per-rank losses gets rank 0's). ``forward_passes`` is rank 0's.
Only rank 0 calls the sinks; the other ranks drop their records at each flush. The
collective is why every rank must close the same (step, layer, mode)s in the same order: all
ranks run the same layers in the same modes in each step (validation included, e.g. each on
its shard) and call ``set_step``/``flush``/``state_dict``/``detach`` at the same points.
``histogram()`` includes the current step's counts of this rank only (not reduced yet).

Resuming: ``state_dict()`` first flushes, so the sink holds every record up to the
checkpoint and the state holds no pending records; truncating the log to the checkpoint's
step and calling ``load_state_dict`` then yields the same records as an uninterrupted run.
The final snapshot of ``detach()`` is the end of a run: a run that stops to be resumed
detaches with ``snapshot=False``, and a loop that checkpoints its last step calls
``snapshot()`` before that checkpoint (``experiments.loop`` does both).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lfq.adapters import Adapter
from lfq.code_usage import CodeUsage
from lfq.monitor_hooks import MonitorHooks
from lfq.records import Evaluation, evaluation_records, snapshot_records, step_records
from lfq.sinks import Sink, default_histogram_sink
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
    ):
        """Watch every quantizer in ``model`` (the module docstring is the manual).

        ``log_every`` does not thin the records: every closed step makes its rows (one per
        layer, codebook and mode) whatever ``log_every`` is. It is how many closed steps the
        monitor holds on the device before a flush sends their rows to ``sink`` in one batch
        (one device-to-host transfer), so a sink sees a step up to ``log_every`` steps late,
        and it is the default period of the latent diagnostics (``diagnostics_every``): the
        columns computed only on diagnostic steps are NaN in the other rows.

        ``histogram_sink``: where the sparse histogram snapshots go, every ``histogram_every``
        steps and once more at ``detach()`` (so every run ends with one). None (default): where
        ``sink`` keeps them (``lfq.sinks.default_histogram_sink``: a TensorBoardSink or WandbSink
        itself, ``metrics.histograms.jsonl`` beside a ``JsonlSink("metrics.jsonl")``, nowhere for
        other sinks); False: no snapshots.
        """
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
            self.sink(step_records(closed))
        if snapshots and self.histogram_sink is not None:
            self.histogram_sink(snapshot_records(snapshots))

    def snapshot(self) -> None:
        """Close the current step and queue a histogram snapshot of every (layer, mode): the counts
        since the previous snapshot, under the current step (layers untouched since then are left
        out); it goes to ``histogram_sink`` at the next flush. ``detach()`` calls it; a training
        loop that checkpoints calls it before its last checkpoint, so that the checkpoint's state
        knows the snapshot was sent (see "Resuming"). Without a histogram_sink, only closes the step."""
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
            with torch.inference_mode(False):
                evaluation.counts[name] = torch.zeros(spec.num_codebooks, spec.codebook_size, dtype=torch.long,
                                                      device=device)
        try:
            yield evaluation
        finally:
            self._evaluation = None
        if self._world() > 1:
            all_reduce_counts(list(evaluation.counts.values()))
        evaluation.records = evaluation_records(self._layers, evaluation.counts)
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
        total = torch.zeros(spec.num_codebooks, spec.codebook_size, dtype=torch.long)
        for m, usage in self._usage[layer].items():
            if mode is None or m == mode:
                total += (usage.histogram + usage.step.counts + sum(acc.counts for _, acc in usage.pending)).cpu()
        return total

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume; flushes first (see the module docstring)."""
        self.flush()
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "explicit_steps": self._explicit_steps,
            "auto_next": self._auto_next,
            "usage": {name: {mode: u.state() for mode, u in by_mode.items()} for name, by_mode in self._usage.items()},
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
                self._usage[name][mode] = CodeUsage.from_state(self._layers[name], mode, saved, snapshots)
        self._step = int(state["step"])
        self._explicit_steps = bool(state["explicit_steps"])
        self._auto_next = int(state["auto_next"])
        self._pending_steps, self._pending_snapshots, self._closed_unflushed = [], [], 0
        self._last_stats_seen.clear()

    def detach(self, flush: bool = True, snapshot: bool = True) -> None:
        """Close the last step, take a final histogram snapshot (``snapshot()``), flush, then
        remove every hook this monitor registered. Idempotent.

        ``snapshot=False``: no final snapshot, for a run that is interrupted and will resume
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
