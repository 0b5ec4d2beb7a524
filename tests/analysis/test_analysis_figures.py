"""The one figure registry (analysis.figures): a figure added with one line is drawn into a report, every
entry is declared once with its caption, and a quantizer kind analysis has never heard of is labelled."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from analysis_fixtures import write_run

from analysis import column_names as cn
from analysis import figures, quantizer_comparison
from analysis.figures import STUDIES, Plot, register
from analysis.glossary import kind_label, kind_rank
from analysis.report import main, write_report
from analysis.style import new_figure


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> list[Plot]:
    """The registry, restored after the test: what a test registers goes no further."""
    monkeypatch.setattr(figures, "FIGURES", list(figures.FIGURES))
    return figures.FIGURES


def _toy(data: figures.Data) -> object:
    fig, axes = new_figure()
    axes[0, 0].plot(data["finished"]["seed"], data["finished"]["final_usage_fraction"], marker="o")
    return fig


def test_a_figure_added_with_one_registry_line_is_drawn_into_the_sweep_report(registry, tmp_path: Path) -> None:
    for seed in (0, 1):
        write_run(tmp_path / "sweep", f"r{seed}", seed=seed, histograms=False)
    register(Plot("toy_usage_by_seed", "sweep", "Toy: usage by seed", "One point per finished run.", _toy,
                  shows="finished"))
    out = write_report(tmp_path / "sweep", tmp_path / "report", cache=False)
    assert (out / "toy_usage_by_seed.png").stat().st_size > 5_000 and (out / "toy_usage_by_seed.svg").is_file()
    text = (out / "report.md").read_text()
    section = text.split("### Toy: usage by seed\n", 1)[1].split("\n### ", 1)[0]
    assert section.startswith("\nOne point per finished run.\n") and "Held fixed (the same in all 2 runs shown)" in section
    assert "](toy_usage_by_seed.png)" in section


def test_the_registry_refuses_a_second_entry_with_the_same_stem_and_an_unknown_study(registry) -> None:
    with pytest.raises(ValueError, match="already has a figure 'usage'"):
        register(Plot("usage", "sweep", "t", "c", _toy))
    with pytest.raises(ValueError, match="none of sweep, ablations, recipe"):
        register(Plot("toy", "paper", "t", "c", _toy))


def test_every_entry_is_declared_once_with_a_title_and_a_caption() -> None:
    keys = [(p.study, p.stem) for p in figures.FIGURES]
    assert len(keys) == len(set(keys)) and {p.study for p in figures.FIGURES} == set(STUDIES)
    for study, stem, title, caption in figures.captions():
        assert title.strip() and len(caption) > 40 and caption.rstrip().endswith((".", "}")), (study, stem)


def test_an_unknown_quantizer_kind_is_labelled_and_ordered_after_the_known_ones(tmp_path: Path) -> None:
    assert [kind_label(k) for k in ("lfq", "vq", "toyq")] == ["LFQ", "VQ", "TOYQ"]
    assert sorted(["toyq", "vq", "abq", "lfq"], key=kind_rank) == ["lfq", "vq", "abq", "toyq"]
    runs = pd.DataFrame([{"run_id": f"{kind}{seed}", "sweep": "s", "status": "done", cn.KIND: kind, cn.SIZE: 1024,
                          cn.TAU: 10.0, "seed": seed, "final_val_usage_fraction": 0.5, "final_val_psnr": 20.0 + seed,
                          "final_val_tokens": 4096} for kind in ("toyq", "vq", "lfq") for seed in (0, 1)])
    summary = quantizer_comparison.quantizers_summary(runs)
    assert list(dict.fromkeys(summary["series"])) == ["LFQ inv. temp. 10", "VQ", "TOYQ"]
    fig = figures.planned("recipe", {"quantizers": summary})[0].draw()
    assert "TOYQ (n=2)" in [text.get_text() for text in fig.legends[0].get_texts()]


def test_a_sweep_report_over_an_unknown_quantizer_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for kind in ("lfq", "toyq"):
        for seed in (0, 1):
            write_run(tmp_path / "sweep", f"{kind}{seed}", seed=seed, kind=kind, final_usage=0.4 + 0.1 * seed)
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "report"), "--no-cache"]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| toyq |" in text and "quantizer=toyq" in (tmp_path / "report" / "training_curves.svg").read_text()
    assert "error" not in capsys.readouterr().err
