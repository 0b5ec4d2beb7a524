"""Schedules of the entropy weight, inverse temperature and commitment weight."""

from __future__ import annotations

import math

import pytest
from exp_helpers import Kill, kill_at, read_rows, run, smoke_config, without_wall_time

from experiments.config import ConfigError
from experiments.loop import ramp, values_at

# pytest.approx's default (1e-6 relative) below: schedules are float64 arithmetic of a few terms on
# literal inputs (a product, a cosine, a power), ~4e9 float64 eps from any rounding (tests/tolerances.py).


@pytest.mark.parametrize("shape", ["linear", "cosine", "exponential"])
def test_ramps_go_from_start_to_end_and_stay(shape):
    assert ramp(shape, 3.0, 1.0, 100, 0) == pytest.approx(3.0)
    assert ramp(shape, 3.0, 1.0, 100, 100) == 1.0 == ramp(shape, 3.0, 1.0, 100, 5000)
    mid = ramp(shape, 3.0, 1.0, 100, 50)
    assert mid == pytest.approx({"linear": 2.0, "cosine": 2.0, "exponential": math.sqrt(3.0)}[shape])
    values = [ramp(shape, 3.0, 1.0, 100, s) for s in range(101)]
    assert all(a >= b for a, b in zip(values[:-1], values[1:], strict=True))  # monotone
    assert ramp(shape, 3.0, 1.0, 100, 25) != ramp("linear", 3.0, 1.0, 100, 25) or shape == "linear"


def test_values_at_scale_the_configured_weights():
    config = smoke_config("anneal.entropy=linear", "anneal.entropy_start=3", "anneal.entropy_steps=10",
                          "anneal.inv_temperature=exponential", "anneal.inv_temperature_start=1",
                          "anneal.inv_temperature_steps=10", "quantizer.inv_temperature=100")
    v = values_at(5, config)
    assert v["entropy_weight"] == pytest.approx(0.1 * 2.0)
    assert v["inv_temperature"] == pytest.approx(10.0)
    assert v["commitment_weight"] == pytest.approx(0.25)
    assert values_at(30, config)["entropy_weight"] == pytest.approx(0.1)


def test_annealed_run_logs_its_values_and_resumes_exactly(tmp_path):
    overrides = ("anneal.entropy=cosine", "anneal.entropy_start=3", "anneal.entropy_steps=20",
                 "anneal.inv_temperature=linear", "anneal.inv_temperature_start=10", "anneal.inv_temperature_steps=20",
                 "anneal.commitment=linear", "anneal.commitment_start=0", "anneal.commitment_steps=10")
    config = smoke_config(*overrides)
    reference = run(config, tmp_path / "ref")
    rows = [r for r in read_rows(tmp_path / "ref" / "metrics.jsonl") if r["kind"] == "train"]
    for row in rows:
        assert row["entropy_weight"] == pytest.approx(values_at(row["step"], config)["entropy_weight"])
        assert row["inv_temperature"] == pytest.approx(values_at(row["step"], config)["inv_temperature"])
    assert rows[0]["entropy_weight"] > rows[-1]["entropy_weight"] == pytest.approx(0.1)
    assert rows[0]["commitment_weight"] < rows[-1]["commitment_weight"] == pytest.approx(0.25)
    assert reference["final_train_loss"] != run(smoke_config(), tmp_path / "plain")["final_train_loss"]

    with pytest.raises(Kill):
        run(config, tmp_path / "resumed", on_step=kill_at(12))
    assert without_wall_time(run(config, tmp_path / "resumed")) == without_wall_time(reference)
    assert read_rows(tmp_path / "resumed" / "metrics.jsonl") == read_rows(tmp_path / "ref" / "metrics.jsonl")


@pytest.mark.parametrize(("overrides", "message"), [
    (["anneal.entropy=linear"], r"anneal\.entropy_steps=0 .*>= 1"),
    (["anneal.entropy=step"], r"anneal\.entropy='step'.*constant"),
    (["anneal.inv_temperature_start=0"], r"anneal\.inv_temperature_start.*> 0"),
])
def test_bad_schedules_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        smoke_config(*overrides)
