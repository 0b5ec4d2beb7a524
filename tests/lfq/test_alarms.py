"""Collapse alarms (issue 34, item 5): each default rule fires once when its condition starts to
hold, as a kind="alarm" row right after the row that raised it, with one printed line."""

from __future__ import annotations

import pytest
import torch

from lfq import LFQ, LFQMonitor, MemorySink
from lfq.alarms import DeadBit, Saturation, UsageDrop


def _tokens(codes: list[int], bits: int) -> torch.Tensor:
    table = torch.tensor(codes)
    signs = ((table[:, None] >> torch.arange(bits - 1, -1, -1)) & 1).float() * 2 - 1
    return signs.reshape(1, len(codes), bits)


def alarms_of(sink: MemorySink) -> list[tuple[str, int]]:
    return [(r["rule"], r["step"]) for r in sink.records if r["kind"] == "alarm"]


def test_a_dead_bit_fires_once_and_names_layer_codebook_and_step(capsys):
    lfq, sink = LFQ(dim=3), MemorySink()
    # Bit 0 (MSB) stays 0 throughout: dead once dead_after=2 steps have passed; bits 1, 2 vary.
    with LFQMonitor(lfq, sink, dead_after=2, alarms=[DeadBit()]) as mon:
        for step in range(6):
            mon.set_step(step)
            lfq(_tokens([step % 4, (step + 1) % 4], 3))
    assert alarms_of(sink) == [("dead_bit", 1)]
    (alarm,) = [r for r in sink.records if r["kind"] == "alarm"]
    assert alarm["layer"] == "<root>" and alarm["codebook"] == 0 and alarm["mode"] == "train"
    position = sink.records.index(alarm)
    assert sink.records[position - 1]["step"] == 1 and sink.records[position - 1]["kind"] == "quantizer"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["[lfq] alarm dead_bit at step 1, layer <root> codebook 0: 1 dead bit(s)"]
    assert mon.alarms == [alarm]


def test_usage_falling_to_half_its_best_fires_and_rearms():
    lfq, sink = LFQ(dim=3), MemorySink()
    # Steps 0-3 use 4 codes each, then one code: usage_fraction over a window of 2 steps falls.
    plan = [[0, 1, 2, 3]] * 4 + [[0]] * 4 + [[0, 1, 2, 3, 4, 5, 6, 7]] * 2 + [[0]] * 4
    with LFQMonitor(lfq, sink, usage_window=2, alarms=[UsageDrop(0.5)]) as mon:
        for step, codes in enumerate(plan):
            mon.set_step(step)
            lfq(_tokens(codes, 3))
    usage = [r["usage_fraction"] for r in sink.records if r["kind"] == "quantizer"]
    assert usage[3] == 0.5 and usage[5] == 0.125  # 4 of 8 codes, then 1
    # Step 5: 0.125 < 0.5 x 0.5 (the best over (3, 5]). It holds while the best stays in the
    # window and clears at step 7 (best 0.125); usage recovers, then falls again at step 11.
    assert alarms_of(sink) == [("usage_drop", 5), ("usage_drop", 11)]


def test_saturation_needs_k_diagnostic_steps_in_a_row_and_other_steps_do_not_break_the_run():
    torch.manual_seed(0)
    lfq, sink = LFQ(dim=4), MemorySink()
    with LFQMonitor(lfq, sink, diagnostics_every=2, alarms=[Saturation(0.95, steps=3)]) as mon:
        for step in range(10):
            mon.set_step(step)
            # inv_temperature 1e4: |4 tau z| > 10.6 for almost every token-bit
            lfq(torch.randn(2, 16, 4), inv_temperature=1e4 if step >= 2 else 1.0)
    saturated = {r["step"]: r["saturated_fraction"] for r in sink.records if r["kind"] == "quantizer"}
    assert saturated[0] < 0.5 and all(saturated[s] > 0.95 for s in (2, 4, 6, 8))
    assert alarms_of(sink) == [("saturation", 6)]  # diagnostic steps 2, 4, 6 in a row


def test_alarms_false_means_none_and_bad_rules_are_refused():
    lfq, sink = LFQ(dim=3), MemorySink()
    with LFQMonitor(lfq, sink, dead_after=1, alarms=False) as mon:
        for step in range(4):
            mon.set_step(step)
            lfq(_tokens([0], 3))
    assert alarms_of(sink) == [] and mon.alarms == []
    with pytest.raises(ValueError, match="alarms must be lfq.alarms.AlarmRule instances"):
        LFQMonitor(lfq, sink, alarms=["dead_bit"])
    with pytest.raises(ValueError, match="fraction must be a number in"):
        UsageDrop(1.5)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        Saturation(steps=0)


def test_default_rules_fire_on_a_collapsed_quantizer_and_resume_from_state():
    lfq = LFQ(dim=3)
    sink = MemorySink()
    with LFQMonitor(lfq, sink, dead_after=2) as mon:  # the defaults
        for step in range(5):
            mon.set_step(step)
            lfq(_tokens([1], 3))  # one code: every bit constant
        state = mon.state_dict()
    assert ("dead_bit", 1) in alarms_of(sink)
    # Resumed from the state, the condition still holds: no second alarm for the same episode.
    resumed = MemorySink()
    with LFQMonitor(lfq, resumed, dead_after=2) as mon:
        mon.load_state_dict(state)
        for step in range(5, 8):
            mon.set_step(step)
            lfq(_tokens([1], 3))
    assert alarms_of(resumed) == []
