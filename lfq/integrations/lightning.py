"""A PyTorch Lightning callback, ``LFQMonitorCallback``, that watches every quantizer of the
LightningModule with an :class:`lfq.LFQMonitor` at ``trainer.global_step``, logs through the
trainer's loggers, measures each validation epoch as an evaluation pass (``val_usage_fraction``)
and keeps the monitor's state in the trainer's checkpoints; docs/monitor.md ("Where the rows go")
is the manual.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as err:  # lfq itself needs torch and einops only
    raise ImportError("lfq.integrations.lightning needs lightning: pip install lfq-suite[lightning]") from err

from lfq.adapters import Adapter
from lfq.monitor import LFQMonitor
from lfq.records import Evaluation
from lfq.sinks import Record, Sink, TensorBoardSink, WandbSink, default_histogram_sink, scalar_tags

__all__ = ["LFQMonitorCallback"]


class LFQMonitorCallback(pl.Callback):
    def __init__(
        self,
        *,
        log_every: int = 50,  # steps per flush: every step is logged, in batches of this many steps
        usage_window: int = 100,
        dead_after: int = 100,
        histogram_every: int = 500,  # steps between code-histogram snapshots; None: no snapshots
        diagnostics_every: int | None = None,  # None: log_every
        adapters: Mapping[str | type, Adapter] | None = None,
        validation: bool = True,  # measure every validation epoch's usage
        sink: Sink | None = None,  # also send every record here (e.g. lfq.JsonlSink("metrics.jsonl"); its histograms:
        # lfq.sinks.default_histogram_sink, metrics.histograms.jsonl beside it)
    ) -> None:
        super().__init__()
        self._options = dict(log_every=log_every, usage_window=usage_window, dead_after=dead_after,
                             diagnostics_every=diagnostics_every, adapters=adapters)
        self._histogram_every = histogram_every
        self.validation = validation
        self.extra_sink = sink
        self.monitor: LFQMonitor | None = None
        self.last_evaluation: Evaluation | None = None
        self._trainer: Any = None
        self._pending_state: dict[str, Any] | None = None  # from a checkpoint, loaded at setup
        self._final_state: dict[str, Any] | None = None  # after fit, for a checkpoint saved then
        self._evaluating: Any = None
        self._sinks: dict[int, Sink] = {}
        self._extra_histograms: Sink | None = None  # where sink's histogram snapshots go, built once

    # ---------------------------------------------------------------- records -> loggers

    def _logger_sink(self, logger: Any) -> Sink | None:
        """The sink writing to one Lightning logger, built once per logger."""
        key = id(logger)
        if key not in self._sinks:
            from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

            if isinstance(logger, TensorBoardLogger):
                self._sinks[key] = TensorBoardSink(writer=logger.experiment)
            elif isinstance(logger, WandbLogger):
                self._sinks[key] = WandbSink(run=logger.experiment)
            else:
                self._sinks[key] = _MetricsSink(logger)
        return self._sinks[key]

    def _log(self, records: list[Record], extra: Sink | None = None) -> None:
        extra = self.extra_sink if extra is None else extra
        if extra is not None:
            extra(records)
        trainer = self._trainer
        if trainer is None:
            return
        for logger in trainer.loggers:
            self._logger_sink(logger)(records)

    def _log_histograms(self, records: list[Record]) -> None:
        """Snapshots: to the loggers, and to where ``sink`` keeps histograms (``metrics.histograms.jsonl``
        beside a ``JsonlSink("metrics.jsonl")``; none for a sink without a place for them)."""
        if self.extra_sink is not None and self._extra_histograms is None:
            self._extra_histograms = default_histogram_sink(self.extra_sink) or (lambda records: None)
        self._log(records, extra=self._extra_histograms)

    # ---------------------------------------------------------------- hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer
        if self.monitor is not None:
            return
        self.monitor = LFQMonitor(pl_module, sink=self._log, histogram_sink=self._log_histograms if self._histogram_every else False,
                                  histogram_every=self._histogram_every or 1, **self._options)
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.monitor.set_step(trainer.global_step)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if self.validation and not trainer.sanity_checking:
            self._evaluating = self.monitor.evaluating()
            self.last_evaluation = self._evaluating.__enter__()

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._evaluating is None:
            return
        context, self._evaluating = self._evaluating, None
        context.__exit__(None, None, None)  # the all_reduce over ranks, on every rank
        evaluation = self.last_evaluation
        if evaluation.records:
            pl_module.log("val_usage_fraction", evaluation.usage_fraction(), rank_zero_only=True)
            if trainer.is_global_zero:
                self._log([{"step": trainer.global_step, **r} for r in evaluation.records])

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.monitor.snapshot()  # the run's final histogram, while the loggers are open
        self.monitor.flush()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.monitor is not None and stage == "fit":
            self.monitor.snapshot()  # none after on_train_end; a fit that raised gets its final one here
            self._final_state = self.monitor.state_dict()  # flushes; knows the snapshot was sent
            self.monitor.detach(snapshot=False)  # taken above
            self.monitor = None

    def state_dict(self) -> dict[str, Any]:
        if self.monitor is None:
            return {} if self._final_state is None else {"monitor": self._final_state}
        return {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("monitor")
        if state is None:
            return
        if self.monitor is not None:
            self.monitor.load_state_dict(state)
        else:
            self._pending_state = state


class _MetricsSink:
    """Scalars of the records through any Lightning logger's ``log_metrics``, one call per step."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def __call__(self, records: list[Record]) -> None:
        by_step: dict[int, dict[str, float]] = {}
        for record in records:
            tags = scalar_tags(record)
            if tags:
                by_step.setdefault(int(record.get("step", 0)), {}).update(tags)
        for step in sorted(by_step):
            self.logger.log_metrics(by_step[step], step=step)
