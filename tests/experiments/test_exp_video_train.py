"""The video task end to end through ``experiments.train``: video.yaml at smoke scale on the shipped
clips (and a resume that ends as the uninterrupted run), a folder of mp4 files with a corrupt and a
one-frame file, and the cluster recipe ucf101_128.yaml on a generated UCF-101-like folder."""

from __future__ import annotations

import pytest
from exp_helpers import REPO, Kill, kill_at, read_rows, run, without_wall_time
from test_exp_video import VIDEO_YAML, video_folder, write_mp4

from experiments.config import load_config
from experiments.train import main

UCF_YAML = REPO / "experiments" / "configs" / "ucf101_128.yaml"
SMALL = ["data.val_size=24", "schedule.steps=12", "schedule.val_every=6", "schedule.checkpoint_every=4"]


def test_video_yaml_trains_validates_and_resumes_identically(tmp_path):
    config = load_config(VIDEO_YAML, ["scale=smoke"], explicit=SMALL)
    reference = run(config, tmp_path / "ref")
    assert reference["status"] == "done"
    rows = read_rows(tmp_path / "ref" / "metrics.jsonl")
    val = [r for r in rows if r["kind"] == "val"][-1]
    steps = 1 + (config.resolved().data.frames - 1) // config.model.temporal_downsample
    assert val["val_tokens"] == 24 * steps * 8 * 8
    assert val["val_tokens_first_frame"] + val["val_tokens_later_frames"] == val["val_tokens"]
    assert 0 < val["val_usage_fraction_first_frame"] <= 1 and 0 < val["val_usage_fraction_later_frames"] <= 1
    assert reference["final_val_usage_fraction"] == val["val_usage_fraction"]
    for part in ("first_frame", "later_frames"):  # the claim's columns reach summary.json (and the reports)
        assert reference[f"final_val_usage_fraction_{part}"] == val[f"val_usage_fraction_{part}"]
    with pytest.raises(Kill):
        run(config, tmp_path / "resumed", on_step=kill_at(7))
    resumed = run(config, tmp_path / "resumed")
    assert without_wall_time(resumed) == without_wall_time(reference)
    assert read_rows(tmp_path / "resumed" / "metrics.jsonl") == rows


def test_a_folder_of_mp4_files_with_a_corrupt_and_a_one_frame_file_trains(tmp_path, capsys):
    root = video_folder(tmp_path / "videos", n=10, frames=12)
    config = load_config(VIDEO_YAML, ["scale=smoke"], explicit=[
        f"data.root={root}", "data.val_fraction=0.3", "data.batch_size=4", "data.frames=5", "schedule.steps=6",
        "schedule.val_every=6", "runtime.num_workers=1"])
    summary = run(config, tmp_path / "out")
    out = capsys.readouterr().out
    assert summary["status"] == "done"
    data_line = next(line for line in out.splitlines() if "] data: " in line)
    assert "training videos" in data_line and "clips of 5 frames" in data_line
    unreadable = [line for line in out.splitlines() if "skipping an unreadable video" in line]
    assert len(unreadable) == len(set(unreadable)) and all("corrupt.mp4" in line for line in unreadable)
    # each bad file is counted once, wherever it fell (validation: at the start; training: when met)
    assert summary["unreadable_files"] == 1 and summary["small_images"] == 1
    assert summary["final_val_tokens"] > 0


def test_the_ucf101_recipe_dry_runs_and_trains_on_generated_mp4_files(tmp_path, capsys):
    root = tmp_path / "UCF-101"
    for c in ("ApplyEyeMakeup", "Archery"):
        for g in range(3):
            write_mp4(root / c / f"v_{c}_g0{g}_c01.avi".replace(".avi", ".mp4"), 20, side=40, seed=g)
    split = tmp_path / "testlist01.txt"
    split.write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g00_c01.mp4\nArchery/v_Archery_g00_c01.mp4\n")
    full = load_config(UCF_YAML, [f"data.root={root}"])
    assert (full.data.resolution, full.data.frames, full.model.temporal_downsample) == (128, 17, 4)
    assert full.quantizer.codebook_size == 2**18 and full.model.preset == "base"
    args = [str(UCF_YAML), f"data.root={root}", f"data.split_file={split}", "--out", str(tmp_path / "out")]
    assert main([*args, "--dry-run"]) == 0
    assert '"task": "video"' in capsys.readouterr().out
    config = load_config(UCF_YAML, ["scale=smoke"], explicit=[f"data.root={root}", f"data.split_file={split}",
                                                              "schedule.steps=2", "runtime.num_workers=0",
                                                              "data.batch_size=2", "runtime.precision=fp32"])
    summary = run(config, tmp_path / "run")
    assert summary["status"] == "done"
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"][-1]
    assert train["d_loss"] == train["d_loss"]  # the discriminator saw the frames (not NaN)
    val = [r for r in rows if r["kind"] == "val"][-1]
    # the 2 listed videos: at smoke (data.val_size 256) as many clips of 9 frames as fit apart, 2 in 20 frames
    assert val["val_tokens_first_frame"] == 4 * (32 // 8) ** 2
