"""python -m analysis.report: every supported figure, report.md tables, running sweeps, atomic swap."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from analysis_fixtures import make_grid_sweep, write_run

from analysis.figures import SWEEP, entries
from analysis.report import main, write_report

# The registry's sweep figures that a grid of one layer draws (the bit figures are for one run alone).
FIGURES = tuple(p.stem.format_map({"layer_stem": ""}) for p in entries(SWEEP) if p.when is None)


def _header(markdown: str, heading: str) -> list[str]:
    """The header cells of the markdown table under ``## heading``."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    line = next(line for line in section.splitlines() if line.startswith("|"))
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def _table(markdown: str, heading: str) -> list[list[str]]:
    """The body rows of the markdown table under ``## heading``."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


@pytest.fixture(scope="module")
def grid_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One report of the 2 x 2 x 2 seeds grid, shared: drawing it takes seconds."""
    sweep = make_grid_sweep(tmp_path_factory.mktemp("grid"))
    return sweep, write_report(sweep, cache=False)


@pytest.fixture
def tiny_sweep(tmp_path: Path) -> Path:
    write_run(tmp_path / "tiny", "only", histograms=False)
    return tmp_path / "tiny"


def test_report_writes_every_figure_and_the_tables(grid_report: tuple[Path, Path]) -> None:
    grid_sweep, out = grid_report
    assert out == grid_sweep.resolve() / "report"
    for stem in FIGURES:
        assert (out / f"{stem}.png").stat().st_size > 10_000
        assert (out / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    text = (out / "report.md").read_text()
    status = {row[0]: row[1] for row in _table(text, "Runs by status")}
    assert status == {"done": "8", "failed": "0", "started": "0", "corrupt": "0", "total": "8"}
    grid = _table(text, "Grid points")
    assert len(grid) == 4  # 2 gammas x 2 fracs
    assert all("±" in row[4] for row in grid)  # mean ± std of final usage over 2 seeds
    assert len(_table(text, "Runs")) == 8
    for stem in FIGURES:
        assert f"]({stem}.png)" in text
    assert "Figures skipped" not in text and (out / "runs.csv").exists()


def test_every_figure_caption_says_what_was_held_fixed(grid_report: tuple[Path, Path]) -> None:
    _, out = grid_report
    text = (out / "report.md").read_text()
    figures = text.split("## Figures\n", 1)[1].split("\n## ", 1)[0].split("### ")[1:]
    assert len(figures) == len(FIGURES)
    for section in figures:
        line = next(li for li in section.splitlines() if li.startswith("Held fixed"))
        # the grid's own axes vary, so they are not held fixed; what every run shares is
        assert "`task=synthetic`" in line and "`quantizer.codebook_size=16`" in line, section[:40]
        assert "diversity_gamma" not in line and "frac_per_sample_entropy" not in line
        assert "8 runs shown" in line
    fixed = dict(_table(text, "Settings held fixed"))
    assert fixed["quantizer.kind"] == "lfq" and fixed["model.hidden"] == "[32, 32]"
    assert "seed" not in fixed and "quantizer.diversity_gamma" not in fixed


def test_report_defines_every_column_it_prints_once(grid_report: tuple[Path, Path], tmp_path: Path) -> None:
    _, out = grid_report
    sweep = make_grid_sweep(tmp_path)  # with a started and a failed run: more columns and tables
    write_run(sweep, "started", gamma=2.0, status=None, histograms=False)
    write_run(sweep, "failed", gamma=2.0, seed=1, status="failed", histograms=False)
    for text in ((out / "report.md").read_text(), (write_report(sweep, tmp_path / "r") / "report.md").read_text()):
        definitions = text.split("## Columns\n", 1)[1]
        defined = re.findall(r"^- `([^`]+)`: \S", definitions, flags=re.M)
        assert len(defined) == len(set(defined))  # once each
        headings = re.findall(r"^## (.+)$", text.split("## Columns\n", 1)[0], flags=re.M)
        printed = {cell for h in headings if h not in ("Figures", "Figures skipped") for cell in _header(text, h)}
        assert printed and printed <= set(defined), printed - set(defined)
    assert "last logged training step alone" in definitions  # final_codes_used is not the window's usage
    assert re.search(r"`final_usage_fraction`: share of the codebook used at least once in the training usage "
                     r"window", definitions)


def test_report_on_a_running_sweep_with_a_damaged_folder(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    write_run(sweep, "done1", gamma=0.5, histograms=False)
    write_run(sweep, "done2", gamma=1.0, histograms=False)
    write_run(sweep, "running", gamma=2.0, status=None, steps=3, histograms=False)
    with (sweep / "running" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "kind": "quan')  # mid-append
    broken = write_run(sweep, "broken")
    (broken / "config.json").write_text("{")

    out = write_report(sweep, tmp_path / "out")
    text = (out / "report.md").read_text()
    status = {row[0]: row[1] for row in _table(text, "Runs by status")}
    assert status["started"] == "1"
    runs = {row[0]: row for row in _table(text, "Runs")}
    assert runs["running"][2] == "started" and runs["running"][3] == "2/3"
    # a started run's quiet time is a column, not a status word
    header = _header(text, "Runs")
    assert float(runs["running"][header.index("last_write_age_s")]) < 600
    assert runs["broken"][2] == "corrupt"  # DONE but an unreadable config: listed, with its reason
    assert "DONE but config.json is unreadable" in runs["broken"][-1]
    assert status["corrupt"] == "1"
    problems = _table(text, "Run folders with problems")
    assert any(row[:3] == ["running", "metrics.jsonl", "repaired"] for row in problems)
    skipped = text.split("## Figures skipped\n", 1)[1]
    assert re.search(r"`rank_frequency`: no histogram snapshots", skipped)
    assert (out / "training_curves.png").exists() and (out / "usage_vs_gamma.png").exists()
    assert not (out / "rank_frequency.png").exists()


def test_report_replaces_the_previous_one_whole(tiny_sweep: Path) -> None:
    out = write_report(tiny_sweep)
    (out / "stale.png").write_text("from an older report")
    write_report(tiny_sweep)
    assert not (out / "stale.png").exists() and (out / "report.md").exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".report")]  # no temp folders left


def test_report_refuses_to_replace_a_folder_that_is_not_a_report(tiny_sweep: Path, tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("...")
    with pytest.raises(FileExistsError, match="not a report folder"):
        write_report(tiny_sweep, precious)
    assert (precious / "thesis.tex").exists()


def test_cli_prints_where_it_wrote(tiny_sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tiny_sweep), "--out", str(tiny_sweep / "r")]) == 0
    printed = capsys.readouterr().out
    # One run without histograms: everything but the rank-frequency plot.
    assert str(tiny_sweep.resolve() / "r" / "report.md") in printed and "5 figure(s)" in printed
    assert main([str(tiny_sweep / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_of_an_empty_folder_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    # a report of nothing is no report (issue 28): the CLI side is in test_analysis_ceiling.py
    with pytest.raises(FileNotFoundError, match="holds no run folders"):
        write_report(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_where_picks_runs_and_the_terminal_names_the_skipped_figures(tmp_path: Path, capsys) -> None:
    # the README's old trap: smoke runs of another example mixed into the demo's folder
    sweep = make_grid_sweep(tmp_path / "mixed")
    for seed in (0, 1):
        write_run(sweep, f"smoke{seed}", seed=seed, codebook_size=64)
    assert main([str(sweep), "--out", str(tmp_path / "all"), "--no-cache"]) == 0
    err = capsys.readouterr().err
    for stem in ("usage_heatmap", "usage_vs_gamma"):
        assert re.search(rf"^skipped {stem}: other parameters vary too \(quantizer.codebook_size\); "
                         r"pick one value of each with --where KEY=VALUE", err, re.MULTILINE), err
    assert not (tmp_path / "all" / "usage_heatmap.png").exists()

    assert main([str(sweep), "--out", str(tmp_path / "picked"), "--no-cache",
                 "--where", "quantizer.codebook_size=16", "--where", "name=synthetic"]) == 0
    assert "skipped usage" not in capsys.readouterr().err
    text = (tmp_path / "picked" / "report.md").read_text()
    assert "runs picked with `quantizer.codebook_size=16`, `name=synthetic`" in text
    assert {row[0]: row[1] for row in _table(text, "Runs by status")}["total"] == "8"
    for stem in ("usage_heatmap", "usage_vs_gamma"):
        assert (tmp_path / "picked" / f"{stem}.png").exists()

    # the Python API: the same filter on a runs frame, and in write_report
    import analysis

    runs = analysis.load_runs(sweep)
    assert len(analysis.where(runs, {"quantizer.codebook_size": 16})) == 8
    assert len(analysis.where(runs, ["quantizer.codebook_size=64.0"])) == 2  # numbers compare as numbers
    with pytest.raises(analysis.WhereError, match="quantizer.codebook_size has: 16, 64"):
        analysis.where(runs, ["quantizer.codebook_size=1024"])
    out = write_report(sweep, tmp_path / "api", cache=False, where={"quantizer.codebook_size": 64})
    assert {r[0]: r[1] for r in _table((out / "report.md").read_text(), "Runs by status")}["total"] == "2"


def test_report_counts_runs_per_environment_they_computed_on(tmp_path: Path) -> None:
    import json

    base = {"cpu": "Xeon", "cpu_capability": "AVX512", "threads": 1, "device": "cpu", "gpu": None,
            "torch": "2.13.0+cpu", "commit": "0123456789abcdef", "dirty": False}
    for run_id, fields in (("a", {}), ("b", {}), ("c", {"cpu_capability": "AVX2", "dirty": True})):
        run = write_run(tmp_path / "env", run_id, histograms=False)
        (run / "environment.jsonl").write_text(json.dumps({"step": 0, **base, **fields}) + "\n")
    write_run(tmp_path / "env", "old", histograms=False)  # before environment.jsonl existed
    markdown = (write_report(tmp_path / "env", cache=False) / "report.md").read_text()
    assert _header(markdown, "Computed on") == ["env_cpu", "env_cpu_capability", "env_device", "env_torch",
                                                "env_commit", "runs"]  # no GPU column: no run had one
    assert sorted(_table(markdown, "Computed on")) == [
        ["Xeon", "AVX2", "cpu", "2.13.0+cpu", "0123456789 + dirty", "1"],
        ["Xeon", "AVX512", "cpu", "2.13.0+cpu", "0123456789", "2"],
        ["not recorded", "", "", "", "", "1"]]
    assert "- `env_cpu_capability`: vector ISA" in markdown  # defined once under Columns


def test_throughput_rows_say_which_grid_point_and_seed_they_are(tmp_path: Path) -> None:
    import json

    for run_id, gamma, seed, seconds in (("slow", 2.0, 1, 3.0), ("fast", 0.5, 0, 1.0)):
        run = write_run(tmp_path / "t", run_id, gamma=gamma, seed=seed, histograms=False)
        timing = [{"step": s, "kind": "train", "step_time_s": seconds, "samples_per_s": 8 / seconds,
                   "tokens_per_s": 64 / seconds, "data_wait_s": 0.01, "max_memory_mb": 100.0} for s in (5, 6)]
        with (run / "metrics.jsonl").open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in timing)
    markdown = (write_report(tmp_path / "t", cache=False) / "report.md").read_text()
    assert _header(markdown, "Throughput")[:4] == ["run_id", "quantizer.diversity_gamma", "seed", "step_time_s"]
    assert [row[:4] for row in _table(markdown, "Throughput")] == [["fast", "0.5", "0", "1"], ["slow", "2", "1", "3"]]
