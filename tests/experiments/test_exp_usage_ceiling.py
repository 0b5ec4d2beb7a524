"""The ceiling of usage: how many validation tokens per code a usage figure rests on, and the
share of codes that many tokens can be expected to reach (1 - exp(-N/K)); the end-of-run line."""

from __future__ import annotations

import math

import pytest
import torch
from exp_helpers import PATCHES_YAML, REPO, SYNTHETIC_YAML, read_rows, run
from tolerances import sum_tol

from experiments.config import load_config
from experiments.evaluation import CAPPED_BELOW, code_histogram, usage_figures
from experiments.loop import end_line
from lfq.records import usage_ceiling

IMAGES_YAML = REPO / "experiments" / "configs" / "images.yaml"


@pytest.mark.parametrize(("tokens", "codes", "ceiling"), [(368, 1024, 0.3019), (1472, 1024, 0.7625),
                                                           (4096, 1024, 0.9817), (0, 256, 0.0)])
def test_the_ceiling_of_a_histogram(tokens, codes, ceiling):
    # The figures: 368 tokens for 1,024 codes, 1,472 for 1,024 (4 decimals: how they are quoted).
    counts = torch.zeros(1, codes, dtype=torch.int64)
    counts[0, 0] = tokens
    figures = usage_figures(counts)
    assert figures["val_tokens_per_code"] == tokens / codes
    assert figures["val_usage_ceiling"] == pytest.approx(ceiling, abs=5e-5)
    assert figures["val_usage_ceiling"] == usage_ceiling(tokens, codes) == -math.expm1(-tokens / codes)


def test_several_codebooks_have_the_ceiling_of_one():
    # (b, n, c) = (3, 4, 2): 12 tokens in each codebook of 8 codes.
    figures = usage_figures(code_histogram(torch.arange(24).reshape(3, 4, 2) % 8, 2, 8))
    assert figures["val_tokens"] == 12 and figures["val_tokens_per_code"] == 1.5
    # 1 - exp(-x) against torch's -expm1(-x): two float64 roundings (exp, the subtraction) of terms <= 1
    assert figures["val_usage_ceiling"] == pytest.approx(1 - math.exp(-1.5), abs=sum_tol(torch.float64, 2))


def test_the_ceiling_is_what_uniform_assignment_reaches():
    # 400 draws of N uniform codes out of K: the mean share used is 1 - (1 - 1/K)^N, which
    # 1 - exp(-N/K) matches to N/(2K^2) e^(-N/K) = 2e-4 here. One draw's share has a standard
    # deviation below 0.015 (a sum of K weakly dependent indicators over K), so the mean of 400 is
    # within 0.004 (5 standard errors) with room to spare.
    g = torch.Generator().manual_seed(0)
    k, n = 1024, 1472
    shares = [usage_figures(code_histogram(torch.randint(k, (n,), generator=g), 1, k))["val_usage_fraction"]
              for _ in range(400)]
    assert sum(shares) / len(shares) == pytest.approx(usage_ceiling(n, k), abs=4e-3)


@pytest.mark.parametrize(("path", "overrides"), [
    (SYNTHETIC_YAML, []),
    (PATCHES_YAML, []),
    (IMAGES_YAML, ["quantizer.num_codebooks=2", "data.val_size=6"]),
])
def test_every_task_reports_tokens_per_code_and_the_ceiling(tmp_path, path, overrides):
    config = load_config(path, ["scale=smoke", "schedule.steps=10", *overrides])
    summary = run(config, tmp_path)
    assert summary["status"] == "done"
    val = [r for r in read_rows(tmp_path / "metrics.jsonl") if r["kind"] == "val"]
    codes = config.quantizer.codebook_size
    for row in val:
        assert row["val_tokens_per_code"] == row["val_tokens"] / codes > 0
        # two float64 roundings of terms <= 1, as above
        assert row["val_usage_ceiling"] == pytest.approx(1 - math.exp(-row["val_tokens"] / codes),
                                                         abs=sum_tol(torch.float64, 2))
    assert summary["final_val_tokens_per_code"] == val[-1]["val_tokens_per_code"]
    assert summary["final_val_usage_ceiling"] == val[-1]["val_usage_ceiling"]


def test_the_end_line_leads_with_validation_usage_and_says_when_it_is_capped():
    summary = {"status": "done", "reason": "", "step": 300, "wall_time_s": 12.5, "final_usage_fraction": 1.0,
               "final_val_usage_fraction": 0.669, "final_val_psnr": 24.123, "final_val_tokens_per_code": 1.4375,
               "final_val_usage_ceiling": usage_ceiling(1472, 1024)}
    line = end_line(summary)
    assert line.startswith("val_usage=0.669 val_psnr=24.12dB tokens_per_code=1.44 ")
    assert "usage capped at 0.762 (N/K = 1.44 < 4)" in line and "status=done step=300" in line
    assert "=1.0" not in line  # the training window's usage is not the headline
    enough = end_line({**summary, "final_val_tokens_per_code": CAPPED_BELOW, "final_val_usage_ceiling": 0.98})
    assert "capped" not in enough and "tokens_per_code=4.00" in enough
    failed = end_line({"status": "failed", "reason": "NaN loss at step 3", "step": 3})
    assert failed == "status=failed reason=NaN loss at step 3 step=3"


def test_a_slurm_jobs_log_ends_with_the_same_line(tmp_path, capsys):
    from slurm.job import RunJob

    config = load_config(SYNTHETIC_YAML, ["scale=smoke", "schedule.steps=10"])
    summary = RunJob(config.to_dict(), str(tmp_path / config.run_id), threads=1)()
    lines = capsys.readouterr().out.splitlines()
    assert summary["status"] == "done"
    assert f"[job] {config.run_id}: {end_line(summary)}" in lines
    assert "usage capped at 0.632 (N/K = 1.00 < 4)" in end_line(summary)
