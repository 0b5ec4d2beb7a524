"""analysis.diagnostics on a run folder whose metrics.jsonl the real monitor wrote."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import analysis
from analysis.diagnostics import bit_columns, bit_usage_heatmap, saturation_and_usage
from lfq import LFQ, JsonlSink, LFQMonitor

# pytest.approx's / np.allclose's default tolerances (1e-6 / 1e-5 relative) below: float64 means, ratios and
# standard deviations of a few literal values, ~4e9 float64 eps from any rounding (tests/tolerances.py).

STEPS, BITS = 12, 4


def _run_folder(root: Path, run_id: str) -> Path:
    """A run whose bit 0 never flips and whose latents grow, so saturation rises over steps."""
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"name": "t", "task": "synthetic", "seed": 0, "run_id": run_id}))
    lfq = LFQ(dim=BITS)
    generator = torch.Generator().manual_seed(0)
    with LFQMonitor(lfq, JsonlSink(run_dir / "metrics.jsonl"), log_every=4, diagnostics_every=2, dead_after=3) as mon:
        for step in range(STEPS):
            mon.set_step(step)
            z = torch.randn(1, 32, BITS, generator=generator) * 0.01 * (step + 1)
            z[..., 0] = -z[..., 0].abs()  # bit 0 always 0
            lfq(z)
    return run_dir


@pytest.fixture
def metrics(tmp_path: Path):
    _run_folder(tmp_path, "run_a")
    return analysis.load_metrics(tmp_path)


def _check(fig: Figure | None) -> Figure:
    assert isinstance(fig, Figure) and round(fig.get_size_inches()[0] * fig.dpi) == 1280
    fig.savefig(io.BytesIO(), format="png")
    return fig


def test_bit_usage_heatmap_cells_are_the_logged_frequencies(metrics):
    fig = _check(bit_usage_heatmap(metrics))
    ax = fig.axes[0]
    cells = np.asarray(ax.collections[0].get_array()).reshape(BITS, STEPS)
    columns = bit_columns(metrics)
    assert columns == [f"bit_frequency_{i}" for i in range(BITS)]
    rows = metrics[metrics["kind"] == "quantizer"].sort_values("step")
    assert cells == pytest.approx(rows[columns].to_numpy().T)
    assert (cells[0] == 0).all()  # the dead bit is a row at 0
    assert "bit" in ax.get_ylabel() and ax.get_xlabel() == "step"


def test_saturation_and_usage_share_one_axis(metrics):
    fig = _check(saturation_and_usage(metrics))
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"usage (fraction of codebook)", "saturated token-bits (fraction)",
                          "dead bits (fraction of bits)", "mean bit entropy / log 2"}
    saturated = lines["saturated token-bits (fraction)"]
    assert list(saturated.get_xdata()) == list(range(0, STEPS, 2))  # diagnostic steps only
    values = np.asarray(saturated.get_ydata())
    assert values[-1] > values[0]  # growing latents saturate
    dead = lines["dead bits (fraction of bits)"].get_ydata()
    assert dead[-1] == pytest.approx(1 / BITS)  # bit 0, once dead_after steps have passed
    assert all(0 <= v <= 1 for line in ax.lines for v in line.get_ydata() if not math.isnan(v))


def test_missing_data_and_ambiguous_runs_skip_with_a_reason(tmp_path: Path, metrics):
    _run_folder(tmp_path / "more", "run_b")
    both = analysis.load_metrics(tmp_path)
    with pytest.warns(analysis.NoDataWarning, match="pass run_id"):
        assert bit_usage_heatmap(both) is None
    _check(bit_usage_heatmap(both, run_id="run_b"))
    with pytest.raises(analysis.NoData, match="no bit_frequency"):
        bit_usage_heatmap(metrics.drop(columns=bit_columns(metrics)), strict=True)
    with pytest.raises(analysis.NoData, match="layer 'nope'"):
        saturation_and_usage(metrics, layer="nope", strict=True)


def test_bit_pair_mi_heatmap_draws_the_last_snapshots_matrix(tmp_path):
    """Bits 1 and 2 copy each other: the heatmap's cells are the snapshot's matrix, (1, 2) near ln 2."""
    from analysis.diagnostics import bit_pair_mi_heatmap

    run_dir = tmp_path / "run_mi"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"name": "t", "task": "synthetic", "seed": 0, "run_id": "run_mi"}))
    lfq, generator = LFQ(dim=BITS), torch.Generator().manual_seed(1)
    with LFQMonitor(lfq, JsonlSink(run_dir / "metrics.jsonl"), histogram_sink=JsonlSink(run_dir / "histograms.jsonl"),
                    log_every=4, diagnostics_every=2, histogram_every=6, alarms=False) as mon:
        for step in range(STEPS):
            mon.set_step(step)
            z = torch.randn(1, 256, BITS, generator=generator)
            z[..., 2] = z[..., 1]
            lfq(z)
    pair_mi = analysis.load.load_bit_pair_mi(tmp_path)
    snapshots = [json.loads(line) for line in (run_dir / "histograms.jsonl").read_text().splitlines()]
    last = [s for s in snapshots if "bit_pair_mi" in s][-1]
    fig = _check(bit_pair_mi_heatmap(pair_mi))
    cells = np.asarray(fig.axes[0].images[0].get_array())
    assert cells == pytest.approx(np.array(last["bit_pair_mi"]))
    assert cells[1, 2] > 0.5 and cells[0, 3] < 0.05 and cells[1, 1] == 0
    assert f"step {last['bit_pair_mi_step']}" in fig.axes[0].get_title()
    with pytest.raises(analysis.style.NoData, match="no bit_pair_mi"):
        bit_pair_mi_heatmap(pair_mi.iloc[:0], strict=True)
