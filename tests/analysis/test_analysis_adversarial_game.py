"""The adversarial game's figure: drawn in a sweep's report when a run logged the game, left out when none did."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from analysis_fixtures import write_run

import analysis
from analysis.adversarial_game import adversarial_game, played
from analysis.report import write_report

GAME = ("d_loss", "g_adv_loss", "adaptive_weight", "d_real", "d_fake", "lecam_loss")


def _add_game(run_dir: Path, start: int) -> None:
    """Give the run's train rows the game's columns: NaN up to ``start``, then values."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if row["kind"] == "train":
            on = row["step"] > start
            row.update({k: (0.1 * (row["step"] + 1) if on else math.nan) for k in GAME})
            if on:
                row["d_fake"] = -row["d_real"]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_sweep_with_the_game_gets_its_figure_and_one_without_does_not(tmp_path: Path) -> None:
    sweep = tmp_path / "gan"
    for i, gamma in enumerate((1.0, 2.0)):
        _add_game(write_run(sweep, f"run{i}", gamma=gamma, steps=8), start=2)
    write_run(sweep, "plain", gamma=3.0, steps=8)  # no discriminator: not in the figure
    metrics = analysis.load_metrics(sweep)
    assert played(metrics)
    fig = adversarial_game(metrics, analysis.load_runs(sweep), strict=True)
    # the discriminator's loss and LeCAM's term (dotted): two lines per run that played
    lines = fig.axes[1].get_lines()
    assert len(lines) == 4 and sum(line.get_linestyle() == ":" for line in lines) == 2
    for line in lines:  # NaN up to the start: each line begins at the step after it
        x, y = pd.Series(line.get_xdata(), dtype=float), pd.Series(line.get_ydata(), dtype=float)
        assert x[y.notna()].min() == 3
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("run0" in t and "diversity_gamma=1.0" in t for t in legend) and not any("plain" in t for t in legend)

    report = write_report(sweep, tmp_path / "report")
    assert (report / "adversarial_game.png").exists() and "adversarial game" in (report / "report.md").read_text()

    plain = tmp_path / "plain"
    write_run(plain, "only", steps=8)
    assert not played(analysis.load_metrics(plain))
    assert not (write_report(plain, tmp_path / "report_plain") / "adversarial_game.png").exists()
