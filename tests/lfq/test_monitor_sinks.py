"""TensorBoard and wandb sinks: the newest upstream LFQ inside a model, monitored; the same
columns read back from JSON lines, TensorBoard event files and an offline wandb run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sink_readers import expected_scalars, same, tensorboard_events, tensorboard_scalars, wandb_history
from torch import nn
from upstream_vqp import load_latest

from lfq import JsonlSink, LFQMonitor, Tee, TensorBoardSink, WandbSink
from lfq.sinks import STEP_TAG, histogram_buckets

STEPS, LOG_EVERY, HIST_EVERY = 6, 4, 3


def _train(sink, histogram_sink) -> None:
    latest = load_latest()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), latest.LFQ(dim=8, codebook_size=2**6, num_codebooks=2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with LFQMonitor(model, sink, log_every=LOG_EVERY, diagnostics_every=2, histogram_every=HIST_EVERY,
                    histogram_sink=histogram_sink) as monitor:
        for step in range(STEPS):
            monitor.set_step(step)
            out = model(torch.randn(4, 16, 5))
            (out.quantized.square().mean() + out.entropy_aux_loss).backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        monitor.evaluate([torch.randn(4, 16, 5)], log=True)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tensorboard_holds_the_jsonl_columns_histograms_and_bit_images(tmp_path: Path):
    tb = TensorBoardSink(tmp_path / "tb")
    _train(Tee(JsonlSink(tmp_path / "metrics.jsonl"), tb), Tee(JsonlSink(tmp_path / "hist.jsonl"), tb))
    tb.close()
    records, snapshots = _jsonl(tmp_path / "metrics.jsonl"), _jsonl(tmp_path / "hist.jsonl")
    assert {r["kind"] for r in records} == {"quantizer", "evaluation"}
    scalars = tensorboard_scalars(tmp_path / "tb")
    expected = expected_scalars(records)
    assert len(expected) > 100
    for (tag, step), value in expected.items():
        assert same(scalars[tag][step], value), (tag, step)
    assert {(tag, step) for tag, by_step in scalars.items() for step in by_step} == set(expected)  # nothing else
    _only_what_was_computed(scalars)
    events = tensorboard_events(tmp_path / "tb")
    tags = events.Tags()
    # the evaluation pass ran in step 5, a snapshot step: its eval-mode counts have their own snapshot
    assert set(tags["histograms"]) == {f"{p}.1.codebook{c}/codes" for p in ("lfq", "lfq_eval") for c in (0, 1)}
    first = next(s for s in snapshots if s["codebook"] == 0)
    histogram = events.Histograms("lfq.1.codebook0/codes")[0]
    assert histogram.step == first["step"] == HIST_EVERY - 1
    assert list(histogram.histogram_value.bucket) == histogram_buckets(first)[1]  # integer counts, as doubles: exact
    image = events.Images("lfq.1/bit_frequencies")[0]
    assert (image.width, image.height) == (6 * 8, 2 * 8)  # bits x codebooks, 8 px each


def _only_what_was_computed(scalars: dict[str, dict[int, float]]) -> None:
    """No NaN point; columns computed on diagnostic steps only (diagnostics_every=2: the latent
    diagnostics, and the upstream LFQ's entropies, which the monitor computes from the latent)
    at those steps; one evaluation family, lfq_eval, holding the evaluation pass (at step 5)."""
    assert not [(tag, step) for tag, by_step in scalars.items() for step, v in by_step.items() if math.isnan(v)]
    for column in ("saturated_fraction", "mean_abs_z", "per_sample_entropy", "batch_entropy", "commitment"):
        assert set(scalars[f"lfq.1.codebook1/{column}"]) == {0, 2, 4}, column
    assert set(scalars["lfq.1.codebook1/codes_used"]) == set(range(STEPS))
    assert {tag.split(".")[0] for tag in scalars} == {"lfq", "lfq_eval"}
    evaluation = {tag.split("/")[1] for tag in scalars if tag.startswith("lfq_eval.1.codebook0/")}
    assert evaluation == {"tokens", "codes_used", "usage_fraction", "perplexity", "tokens_per_code", "usage_ceiling"}
    assert set(scalars["lfq_eval.1.codebook0/usage_fraction"]) == {STEPS - 1}
    assert scalars["lfq_eval.1.codebook0/tokens_per_code"][STEPS - 1] == 4 * 16 / 2**6


def test_wandb_offline_run_holds_the_jsonl_columns(tmp_path: Path):
    """In a subprocess: wandb.init reads the environment (WANDB_MODE=offline) and starts a service."""
    script = f"""
import sys, wandb
sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[1])]!r}
from test_monitor_sinks import _train
from lfq import JsonlSink, Tee, WandbSink
run = wandb.init(project="lfq-test", dir={str(tmp_path)!r})
sink = WandbSink()  # the current run
_train(Tee(JsonlSink({str(tmp_path / "metrics.jsonl")!r}), sink), Tee(JsonlSink({str(tmp_path / "hist.jsonl")!r}), sink))
run.finish()
"""
    env = {**__import__("os").environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    logged: dict[tuple[str, int], float] = {}
    images = histograms = 0
    for row in wandb_history(run_dir):
        for key, value in row.items():
            if isinstance(value, (int, float)) and key.startswith("lfq"):
                logged[(key, int(row[STEP_TAG]))] = float(value)
            images += key.endswith("bit_frequencies/_type") and value == "image-file"
            histograms += key.endswith("/codes/_type") and value == "histogram"
    expected = expected_scalars(_jsonl(tmp_path / "metrics.jsonl"))
    assert len(expected) > 100
    for key, value in expected.items():
        assert same(logged[key], value), key
    # the scalars (not the step axis, nor the fields of images and histograms: "<tag>/<field>")
    scalars = {(tag, step): v for (tag, step), v in logged.items() if tag != STEP_TAG and tag.count("/") == 1}
    assert set(scalars) == set(expected)  # nothing else: no NaN, no eval-mode step rows
    by_tag: dict[str, dict[int, float]] = {}
    for (tag, step), value in scalars.items():
        by_tag.setdefault(tag, {})[step] = value
    _only_what_was_computed(by_tag)
    # snapshots of steps 2 and 5 in training, of step 5 in eval mode; two codebooks each
    assert histograms == 3 * 2 and images == 3


def test_a_tensorboard_sink_alone_ends_with_a_histogram(tmp_path: Path):
    """README's TensorBoard snippet, shorter than histogram_every (500): the sink draws the
    snapshots itself (histogram_sink defaults to it) and detach() sends the final one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), load_latest().LFQ(dim=6, codebook_size=2**6))
    tb = TensorBoardSink(tmp_path / "tb")
    monitor = LFQMonitor(model, sink=tb, log_every=50)
    for step in range(60):
        monitor.set_step(step)
        model(torch.randn(2, 8, 5))
    monitor.detach()
    tb.close()
    events = tensorboard_events(tmp_path / "tb")
    (histogram,) = events.Histograms("lfq.1.codebook0/codes")
    assert histogram.step == 59 and histogram.histogram_value.num == 60 * 16
    assert [image.step for image in events.Images("lfq.1/bit_frequencies")] == [59]


def test_sinks_explain_missing_runs_and_arguments(tmp_path: Path):
    with pytest.raises(ValueError, match="exactly one of log_dir"):
        TensorBoardSink()
    import wandb

    assert wandb.run is None
    with pytest.raises(RuntimeError, match="call wandb.init"):
        WandbSink()([{"step": 0, "layer": "q", "codebook": 0, "tokens": 1}])
    with pytest.raises(ValueError, match="Tee needs one or more sinks"):
        Tee("metrics.jsonl")


def test_lfq_imports_without_tensorboard_wandb_or_lightning():
    code = ("import sys, lfq; from lfq import LFQMonitor, TensorBoardSink, WandbSink; "
            "assert not {'tensorboard', 'wandb', 'lightning', 'torch.utils.tensorboard'} & set(sys.modules), sys.modules.keys()")
    subprocess.run([sys.executable, "-c", code], check=True)
