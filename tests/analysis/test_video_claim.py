"""Claim 1 on the video task (analysis.video_claim, ``--study video``), on hand-made run folders and
an images comparison written by the tests themselves."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import write_run

from analysis import video_claim
from analysis.column_names import KIND, SIZE
from analysis.report import main

SIZES = (1024, 16384)
SEEDS = (1, 2, 3)
FIRST, LATER = 15360, 61440  # video.yaml's validation tokens: 240 clips x 64 of the first step, x 256 of the rest
FAIR_VQ = "VQ random-sample init + dead-code (batch tokens / 4K)"
FSQ_CODES = {1024: 1000, 16384: 15360}  # the products of the FSQ levels the trainer picks for these sizes


def _usage(kind: str, size: int, seed: int) -> float:
    return {"lfq": 0.9, "bsq": 0.8, "fsq": 0.7, "vq": 0.6}[kind] - (0.2 if size > 1024 else 0.0) + 0.01 * seed


def write_video_sweep(root: Path, name: str, kinds: tuple[str, ...], seeds: tuple[int, ...] = SEEDS) -> Path:
    """Run folders of video runs (config task: video, video.yaml's shape) with first/later-frame parts:
    the first frame uses 0.05 less of the codebook than the later frames."""
    sweep = root / name
    for kind, size, seed in itertools.product(kinds, SIZES, seeds):
        usage = _usage(kind, size, seed)
        run_dir = write_run(sweep, f"{kind}{size}s{seed}", seed=seed, steps=4, codebook_size=size, kind=kind,
                            final_usage=usage, histograms=False)
        config = json.loads((run_dir / "config.json").read_text())
        config.update(task="video", data={"batch_size": 8, "resolution": 32, "frames": 9},
                      model={"downsample": 4, "temporal_downsample": 2, "preset": "tiny"})
        config["quantizer"].update(inv_temperature=10.0, entropy_loss_weight=0.1)
        if kind == "vq":  # the fair chance: a quarter of the 2,560 tokens a batch holds per code
            config["quantizer"].update(vq_init="random_sample", vq_dead_code_threshold=2560 / size / 4)
        (run_dir / "config.json").write_text(json.dumps(config))
        summary = json.loads((run_dir / "summary.json").read_text())
        first, later = usage - 0.05, usage
        codes = FSQ_CODES[size] if kind == "fsq" else size  # FSQ's levels: fewer codes than the size
        summary.update(
            final_val_usage_fraction=usage, final_val_psnr=20.0 + seed + 1 / 3, final_val_ssim=0.5,
            final_val_perplexity=usage * codes / 2, final_val_codes_used=round(usage * codes),
            final_val_tokens=FIRST + LATER, final_val_tokens_per_code=(FIRST + LATER) / codes,
            final_val_usage_ceiling=-math.expm1(-(FIRST + LATER) / codes),
            **{f"final_val_{m}_{p}": v for p, n, u in (("first_frame", FIRST, first), ("later_frames", LATER, later))
               for m, v in (("usage_fraction", u), ("codes_used", round(u * codes)), ("perplexity", u * codes / 2),
                            ("tokens_per_code", n / codes), ("usage_ceiling", -math.expm1(-n / codes)))})
        (run_dir / "summary.json").write_text(json.dumps(summary))
    return sweep


def write_images_summary(path: Path) -> Path:
    """A quantizers_summary.csv of the images task: the matching series, and series that match no video line."""
    rows = []
    series = [("lfq", "LFQ inv. temp. 10", "uniform", 0.0), ("lfq", "LFQ inv. temp. 100 (reference)", "uniform", 0.0),
              ("bsq", "BSQ inv. temp. 10", "uniform", 0.0), ("fsq", "FSQ", "uniform", 0.0),
              ("vq", "VQ random-sample init + dead-code 0.5", "random_sample", 0.5),  # fair at 2^10 only
              ("vq", "VQ random-sample init + dead-code 0.03125", "random_sample", 0.03125)]  # fair at 2^14 only
    for (kind, name, init, dead), size, seed in itertools.product(series, SIZES, (0, 1, 2)):
        if name.endswith("0.03125") and size == 1024:
            continue
        rows.append({"run_id": f"{name}-{size}-{seed}", "sweep": "quantizers_images", "status": "done",
                     "series": name, KIND: kind, SIZE: size, "quantizer.vq_init": init,
                     "quantizer.vq_dead_code_threshold": dead, "seed": seed,
                     "final_val_usage_fraction": 0.5 + 0.1 * seed + (0.3 if dead == 0.5 and size > 1024 else 0.0),
                     "final_val_psnr": 21.0 + seed, "final_val_ssim": 0.6, "final_val_perplexity": 100.0,
                     "final_val_tokens": 81408, "data.batch_size": 32, "data.resolution": 32, "model.downsample": 4})
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def sweeps(tmp_path: Path) -> tuple[Path, Path, Path]:
    runs = tmp_path / "runs"
    return (write_video_sweep(runs, "quantizers_video", ("lfq", "bsq", "fsq")),
            write_video_sweep(runs, "vq_fair_video", ("vq",)),
            write_images_summary(tmp_path / "recipe" / "quantizers_summary.csv"))


def video(argv: list[str]) -> int:
    return main([*argv, "--study", "video"])


def test_series_and_the_fair_vq_line_follow_the_settings(sweeps: tuple[Path, Path, Path]) -> None:
    from analysis.load import load_runs

    runs = pd.concat([load_runs(sweeps[0]), load_runs(sweeps[1])], ignore_index=True)
    summary = video_claim.video_summary(runs).set_index("run_id")
    assert summary.at["lfq1024s1", "series"] == summary.at["lfq1024s1", "quantizer"] == "LFQ inv. temp. 10"
    assert summary.at["bsq16384s2", "quantizer"] == "BSQ inv. temp. 10" and summary.at["fsq1024s3", "quantizer"] == "FSQ"
    assert summary.at["vq1024s1", "series"] == "VQ random-sample init + dead-code 0.625"
    assert summary.at["vq16384s1", "series"] == "VQ random-sample init + dead-code 0.0390625"
    assert set(summary.loc[summary[KIND] == "vq", "quantizer"]) == {FAIR_VQ}
    assert summary.at["vq1024s1", "batch_tokens"] == 2560  # 8 clips x 5 token steps x 8 x 8
    assert list(summary[KIND].drop_duplicates()) == ["lfq", "bsq", "fsq", "vq"]


def test_parts_are_measured_against_the_most_codes_their_tokens_reach(sweeps: tuple[Path, Path, Path]) -> None:
    from analysis.load import load_runs

    summary = video_claim.video_summary(load_runs(sweeps[0])).set_index("run_id")
    row = summary.loc["lfq16384s1"]
    assert row["final_val_tokens_first_frame"] == FIRST and row["final_val_tokens_later_frames"] == LATER
    # 2^14 codes: the first frame's 15,360 tokens reach at most 15,360 of them, the later frames' all 16,384
    # (usage 0.9 - 0.2 + 0.01 at seed 1 later, 0.05 less in the first frame)
    assert row["val_usage_of_max_first_frame"] == pytest.approx(round(0.66 * 16384) / FIRST)
    assert row["val_usage_of_max_later_frames"] == pytest.approx(round(0.71 * 16384) / 16384)
    assert row["val_perplexity_of_max_first_frame"] == pytest.approx(0.66 * 16384 / 2 / FIRST)
    small = summary.loc["lfq1024s1"]  # 2^10 codes: both parts can reach every code
    assert small["val_usage_of_max_first_frame"] == pytest.approx(round(0.86 * 1024) / 1024)
    fsq = summary.loc["fsq16384s1"]  # 15,360 codes: the token counts are the same, the most reachable is K
    assert fsq["codebook_codes"] == 15360 and fsq["final_val_tokens_first_frame"] == FIRST
    assert fsq["val_usage_of_max_later_frames"] == pytest.approx(round(0.51 * 15360) / 15360)


def test_table_is_the_mean_std_and_count_over_seeds_of_each_task(sweeps: tuple[Path, Path, Path]) -> None:
    from analysis.load import load_runs

    summary = video_claim.video_summary(pd.concat([load_runs(s) for s in sweeps[:2]], ignore_index=True))
    images = video_claim.images_rows(pd.read_csv(sweeps[2]), summary["quantizer"].unique())
    table = video_claim.video_table(summary, images)
    for task, frame in (("video", summary), ("images", images)):
        direct = frame.groupby(["quantizer", SIZE])["final_val_usage_fraction"].agg(["mean", "std", "size"])
        got = table[table["task"] == task].set_index(["quantizer", SIZE])
        assert set(got.index) == set(direct.index)
        for key, row in direct.iterrows():
            assert got.at[key, "final_val_usage_fraction_mean"] == pytest.approx(row["mean"])
            assert got.at[key, "final_val_usage_fraction_std"] == pytest.approx(row["std"])
            assert got.at[key, "n_seeds"] == row["size"]
    assert table["task"].tolist() == ["video"] * 8 + ["images"] * 8


def test_images_rows_are_the_same_quantizers_with_the_same_dead_code_rule(sweeps: tuple[Path, Path, Path]) -> None:
    images = video_claim.images_rows(pd.read_csv(sweeps[2]), ["LFQ inv. temp. 10", "BSQ inv. temp. 10", "FSQ", FAIR_VQ])
    vq = images[images["quantizer"] == FAIR_VQ]
    # 2,048 tokens a batch: the fair threshold is 0.5 at 2^10 and 0.03125 at 2^14, never 0.5 at 2^14
    assert sorted(zip(vq[SIZE], vq["quantizer.vq_dead_code_threshold"], strict=True)) == [(1024, 0.5)] * 3 + [
        (16384, 0.03125)] * 3
    assert "LFQ inv. temp. 100 (reference)" not in set(images["series"])
    with pytest.raises(ValueError, match="not a results/recipe/quantizers_summary.csv"):
        video_claim.images_rows(pd.DataFrame({"run_id": ["a"]}), ["FSQ"])


def test_cli_writes_the_study_and_redraw_gives_the_same_bytes(sweeps: tuple[Path, Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "video"
    assert video([str(sweeps[0]), str(sweeps[1]), "--images", str(sweeps[2]), "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"summary.csv", "table.csv", "video.png", "video.svg", "command.txt"}
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 4 * 2 * 3 and summary["run_id"].is_unique
    assert {"final_val_usage_fraction_first_frame", "val_usage_of_max_later_frames", "seed"} <= set(summary.columns)
    table = pd.read_csv(out / "table.csv")
    assert set(table["task"]) == {"video", "images"} and set(table["n_seeds"]) == {3}
    command = (out / "command.txt").read_text().splitlines()
    assert command[0] == "# the runs (quantizers_video/_sweep/jobs.jsonl):"
    assert command[-1].startswith("python -m analysis.report ") and "--study video" in command[-1]
    drawn = {name: (out / name).read_bytes() for name in ("video.png", "video.svg")}
    for name in drawn:
        (out / name).unlink()
    assert main(["--redraw", "--out", str(out)]) == 0  # the study found from the folder's table.csv
    assert {name: (out / name).read_bytes() for name in drawn} == drawn


def test_merge_keeps_committed_runs_and_a_plain_rewrite_refuses(sweeps: tuple[Path, Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    full = tmp_path / "full"
    assert video([str(sweeps[0]), str(sweeps[1]), "--images", str(sweeps[2]), "--out", str(full)]) == 0
    out = tmp_path / "video"
    assert video([str(sweeps[0]), "--images", str(sweeps[2]), "--out", str(out)]) == 0
    assert video([str(sweeps[1]), "--images", str(sweeps[2]), "--out", str(out)]) == 2
    assert "--merge" in capsys.readouterr().err
    assert video([str(sweeps[1]), "--images", str(sweeps[2]), "--out", str(out), "--merge"]) == 0
    for name in ("summary.csv", "table.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(full / name), obj=name)
    capsys.readouterr()
    # the same runs again: each matches its committed row at the CSV's precision (PSNR 21.3333...)
    assert video([str(sweeps[0]), "--images", str(sweeps[2]), "--out", str(out), "--merge"]) == 0
    err = capsys.readouterr().err
    assert "18 finished run(s) are both committed and in the run folders read; 18 match" in err, err


def test_no_video_runs_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = write_images_summary(tmp_path / "quantizers_summary.csv")
    write_run(tmp_path / "runs" / "images", "r0")  # a run of another task
    assert video([str(tmp_path / "runs" / "images"), "--images", str(images), "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "none of the 1 runs is a video run" in err
    assert not (tmp_path / "v").exists()
    assert video([str(tmp_path / "runs"), "--images", str(tmp_path / "nowhere.csv"), "--out", str(tmp_path / "v")]) == 2
    assert "no images comparison" in capsys.readouterr().err


def test_a_sweep_report_shows_the_parts_only_for_runs_that_have_them(sweeps: tuple[Path, Path, Path],
                                                                     grid_sweep: Path, tmp_path: Path) -> None:
    assert main([str(sweeps[0]), "--out", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "usage_by_frame.png").is_file() and "final_val_usage_fraction_first_frame" in report
    assert main([str(grid_sweep), "--out", str(tmp_path / "grid")]) == 0
    assert not (tmp_path / "grid" / "usage_by_frame.png").exists()
    assert "first_frame" not in (tmp_path / "grid" / "report.md").read_text()


def test_a_sweeps_parts_figure_draws_every_seed_of_both_parts_per_codebook_size(sweeps: tuple[Path, Path, Path]) -> None:
    from analysis.load import load_runs

    runs = load_runs(sweeps[0])
    fig = video_claim.frame_parts_figure(runs, [KIND, SIZE], strict=True)
    assert len(fig.axes) == 2 * len(SIZES)  # codes used and perplexity, one column per size
    ax = fig.axes[0]  # codes used at 2^10
    seeds = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(seeds) == 2 * int((runs[SIZE] == 1024).sum())  # each run's first frame and later frames
    assert [t.get_text() for t in ax.get_xticklabels()] == ["kind=bsq", "kind=fsq", "kind=lfq"]


def test_an_all_digit_run_id_keeps_its_leading_zeros_through_a_merge(sweeps: tuple[Path, Path, Path],
                                                                     tmp_path: Path) -> None:
    digits = "0012345678"  # run ids are hex: one in ~100 is all digits, which a CSV reader takes for a number
    first = tmp_path / "first" / "vq_fair_video"  # committed alone: the CSV's only id is all digits
    first.mkdir(parents=True)
    run_dir = (sweeps[1] / "vq1024s1").rename(first / digits)
    for name in ("config.json", "summary.json"):
        record = json.loads((run_dir / name).read_text())
        (run_dir / name).write_text(json.dumps({**record, "run_id": digits}))
    out = tmp_path / "video"
    assert video([str(first), "--images", str(sweeps[2]), "--out", str(out)]) == 0
    assert video([str(sweeps[0]), str(sweeps[1]), "--images", str(sweeps[2]), "--out", str(out), "--merge"]) == 0
    ids = pd.read_csv(out / "summary.csv", dtype={"run_id": str})["run_id"]
    assert digits in set(ids) and len(ids) == 24


def test_lower_panels_join_each_quantizers_first_frame_mean_to_its_later_frames_mean(
        sweeps: tuple[Path, Path, Path]) -> None:
    from analysis.load import load_runs

    summary = video_claim.video_summary(pd.concat([load_runs(s) for s in sweeps[:2]], ignore_index=True))
    fig = video_claim.video_figure(summary, video_claim.video_table(summary), strict=True)
    usage_2_10 = fig.axes[2]  # row 2 (codes used), column 1 (2^10)
    lines = list(dict.fromkeys(summary["quantizer"]))
    joined = {round(float(np.mean(line.get_xdata()))): line.get_ydata() for line in usage_2_10.get_lines()
              if len(line.get_xdata()) == 2 and np.ptp(line.get_xdata()) == pytest.approx(2 * video_claim.PART_OFFSET)}
    assert sorted(joined) == list(range(len(lines)))
    small = summary[summary[SIZE] == 1024]
    for i, name in enumerate(lines):
        part = small[small["quantizer"] == name]
        expected = [part["val_usage_of_max_first_frame"].mean(), part["val_usage_of_max_later_frames"].mean()]
        assert np.allclose(joined[i], expected)
    # the uniformly random first frame at 2^14: 15,360 tokens reach 1 - exp(-15360/16384) of the codes
    lfq = summary[(summary[KIND] == "lfq") & (summary[SIZE] == 16384)].iloc[0]
    assert video_claim.uniform_expectation(lfq, "first_frame") == pytest.approx(-math.expm1(-FIRST / 16384) * 16384 / FIRST)
