"""Collapse alarms of ``LFQMonitor`` (its ``alarms=``): rules read each flushed training row of a
(layer, codebook) on the host, keep a little state per (layer, codebook), and fire once each
time their condition starts to hold, as a ``kind="alarm"`` row (``rule``, ``layer``,
``codebook``, ``mode``, ``step``, ``message``) and one printed line; the defaults
(:func:`default_alarms`) are a dead bit, usage falling to half its best within the usage window
and saturation above 0.95 for 3 diagnostic steps in a row; docs/monitor.md ("Collapse alarms").
"""

from __future__ import annotations

import math
import numbers
import sys
from collections import deque
from collections.abc import Iterable
from typing import Any

Row = dict[str, Any]
Key = tuple[str, int, str]  # (layer, codebook, mode)


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


class AlarmRule:
    """One rule. Subclasses set ``name`` and implement :meth:`condition` (a message while the
    condition holds, else None); the base class fires on the rows where it starts to hold."""

    name = "alarm"

    def __init__(self) -> None:
        self._holding: set[Key] = set()

    def condition(self, key: Key, row: Row) -> str | None:
        raise NotImplementedError

    def check(self, row: Row) -> str | None:
        """The message if this row makes the rule fire (its condition holds, and did not on the
        previous row of this (layer, codebook, mode)), else None."""
        key = (row["layer"], row["codebook"], row["mode"])
        message = self.condition(key, row)
        if message is None:
            self._holding.discard(key)
            return None
        if key in self._holding:
            return None
        self._holding.add(key)
        return message

    def state(self) -> dict[str, Any]:
        """What the rule remembers, in plain lists (for ``LFQMonitor.state_dict``)."""
        return {"holding": sorted(self._holding)}

    def load(self, state: dict[str, Any]) -> None:
        self._holding = {tuple(k) for k in state.get("holding", [])}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class DeadBit(AlarmRule):
    """A bit that kept one value in every kept token for ``dead_after`` steps (``dead_bits`` >= 1)."""

    name = "dead_bit"

    def condition(self, key: Key, row: Row) -> str | None:
        dead = row.get("dead_bits")
        return f"{int(dead)} dead bit(s)" if _finite(dead) and dead >= 1 else None


class UsageDrop(AlarmRule):
    """``usage_fraction`` below ``fraction`` of its best over the last ``window`` steps (None: the
    monitor's ``usage_window``)."""

    name = "usage_drop"

    def __init__(self, fraction: float = 0.5, window: int | None = None) -> None:
        super().__init__()
        if not (isinstance(fraction, numbers.Real) and 0 < fraction < 1):
            raise ValueError(f"UsageDrop: fraction must be a number in (0, 1), got {fraction!r}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"UsageDrop: window must be None (the usage window) or an int >= 1, got {window!r}")
        self.fraction, self.window = float(fraction), window
        self._history: dict[Key, deque[tuple[int, float]]] = {}

    def condition(self, key: Key, row: Row) -> str | None:
        usage = row.get("usage_fraction")
        if not _finite(usage):
            return None
        history = self._history.setdefault(key, deque())
        history.append((row["step"], float(usage)))
        while history and history[0][0] <= row["step"] - (self.window or 1):
            history.popleft()
        best = max(u for _, u in history)
        if self.window is None:
            raise RuntimeError("UsageDrop.window is None outside a monitor; pass window=")
        if best > 0 and usage < self.fraction * best:
            return f"usage_fraction {usage:.4g} < {self.fraction:g} x its best {best:.4g} within {self.window} steps"
        return None


    def state(self) -> dict[str, Any]:
        return {**super().state(), "history": [[list(k), [list(h) for h in v]] for k, v in self._history.items()]}

    def load(self, state: dict[str, Any]) -> None:
        super().load(state)
        self._history = {tuple(k): deque((int(s), float(u)) for s, u in v) for k, v in state.get("history", [])}


class Saturation(AlarmRule):
    """``saturated_fraction`` above ``threshold`` on ``steps`` diagnostic steps in a row: the entropy
    loss no longer moves the latent (docs/monitor.md, "Diagnostics of binary codes")."""

    name = "saturation"

    def __init__(self, threshold: float = 0.95, steps: int = 3) -> None:
        super().__init__()
        if not (isinstance(threshold, numbers.Real) and 0 <= threshold < 1):
            raise ValueError(f"Saturation: threshold must be a number in [0, 1), got {threshold!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"Saturation: steps must be an int >= 1, got {steps!r}")
        self.threshold, self.steps = float(threshold), steps
        self._run: dict[Key, int] = {}

    def check(self, row: Row) -> str | None:
        if not _finite(row.get("saturated_fraction")):  # not a diagnostic step: neither counts nor breaks a run
            return None
        return super().check(row)

    def condition(self, key: Key, row: Row) -> str | None:
        saturated = row["saturated_fraction"]
        self._run[key] = self._run.get(key, 0) + 1 if saturated > self.threshold else 0
        if self._run[key] >= self.steps:
            return f"saturated_fraction {saturated:.4g} > {self.threshold:g} on {self._run[key]} diagnostic steps in a row"
        return None


    def state(self) -> dict[str, Any]:
        return {**super().state(), "run": [[list(k), n] for k, n in self._run.items()]}

    def load(self, state: dict[str, Any]) -> None:
        super().load(state)
        self._run = {tuple(k): int(n) for k, n in state.get("run", [])}


def default_alarms() -> list[AlarmRule]:
    """A fresh set of the default rules (rules keep state: one set per monitor)."""
    return [DeadBit(), UsageDrop(), Saturation()]


class Alarms:
    """The rules of one monitor, applied to its flushed rows: alarm rows for the sink, one line each on stderr."""

    def __init__(self, rules: Iterable[AlarmRule], usage_window: int) -> None:
        self.rules = list(rules)
        bad = [r for r in self.rules if not isinstance(r, AlarmRule)]
        if bad:
            raise ValueError(f"alarms must be lfq.alarms.AlarmRule instances (e.g. DeadBit(), UsageDrop(0.5), "
                             f"Saturation(0.95, 3)), got {bad!r}")
        for rule in self.rules:
            if isinstance(rule, UsageDrop) and rule.window is None:
                rule.window = usage_window
        self.fired: list[Row] = []  # every alarm row so far, in order

    def state(self) -> list[dict[str, Any]]:
        return [{"rule": rule.name, **rule.state()} for rule in self.rules]

    def load(self, state: list[dict[str, Any]] | None) -> None:
        """Restore :meth:`state`; rules are matched by position and name (None: states saved without alarms)."""
        for rule, saved in zip(self.rules, state or [], strict=False):
            if saved.get("rule") == rule.name:
                rule.load(saved)

    def check(self, rows: list[Row]) -> list[Row]:
        """``rows`` (flushed step rows) with the alarm rows they raise, each right after the row
        that raised it (so the order does not depend on where flushes fall); alarms are printed
        and kept in ``fired``."""
        out: list[Row] = []
        for row in rows:
            out.append(row)
            if row.get("kind") != "quantizer" or row.get("mode") != "train":
                continue
            for rule in self.rules:
                message = rule.check(row)
                if message is not None:
                    alarm = {"step": row["step"], "layer": row["layer"], "codebook": row["codebook"],
                             "kind": "alarm", "mode": row["mode"], "rule": rule.name, "message": message}
                    print(f"[lfq] alarm {describe(alarm)}", file=sys.stderr, flush=True)
                    self.fired.append(alarm)
                    out.append(alarm)
        return out


def describe(alarm: Row) -> str:
    """One line: ``rule at step s, layer L codebook c: message``."""
    return f"{alarm['rule']} at step {alarm['step']}, layer {alarm['layer']} codebook {alarm['codebook']}: {alarm['message']}"


__all__ = ["AlarmRule", "DeadBit", "UsageDrop", "Saturation", "default_alarms", "Alarms", "describe"]
