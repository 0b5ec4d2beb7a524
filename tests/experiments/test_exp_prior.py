"""Task ``prior`` end to end: a tiny images tokenizer at scale=smoke, then priors on its codes through
experiments.train (CLI and run()): the token cache is encoded once, a killed prior resumes to the
summary of an uninterrupted one, a bad ``data.tokenizer_run`` is refused in one line, and the run
id carries the tokenizer's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from exp_helpers import REPO, Kill, kill_at, read_rows, run, without_wall_time

from analysis.load import load_runs
from analysis.prior_figures import prior_samples
from experiments import token_cache, train
from experiments.config import load_config
from experiments.tasks import prior
from experiments.token_cache import CACHE, load_tokenizer

PRIOR_YAML = REPO / "experiments" / "configs" / "prior.yaml"
IMAGES_YAML = REPO / "experiments" / "configs" / "images.yaml"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A results root holding one finished smoke tokenizer, ``images/<run_id>`` (about 10 s)."""
    root = tmp_path_factory.mktemp("results")
    config = load_config(IMAGES_YAML, ["scale=smoke", "data.resolution=32", "model.downsample=8"])
    summary = run(config, root / "images" / config.run_id)
    assert summary["status"] == "done"
    return root


@pytest.fixture(autouse=True)
def few_training_images(monkeypatch):
    monkeypatch.setattr(token_cache, "MAX_TRAIN_IMAGES", 256)  # the encode takes a second, not minutes


def _tokenizer(results: Path) -> Path:
    (folder,) = (results / "images").iterdir()
    return folder


def _prior_config(results: Path, *overrides: str):
    return load_config(PRIOR_YAML, ["scale=smoke", f"data.tokenizer_run=images/{_tokenizer(results).name}",
                                    *overrides])


def test_the_cli_trains_a_prior_and_reports_bits_per_image(results, capsys):
    out = results / "prior"
    rc = train.main([str(PRIOR_YAML), "scale=smoke", f"data.tokenizer_run=images/{_tokenizer(results).name}",
                     "--out", str(out)])
    assert rc == 0
    (folder,) = [p for p in out.iterdir() if not p.name.startswith("_")]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "done" and summary["task"] == "prior"
    k, length = 1024, 16  # 32 px / 8 = 4 x 4 tokens
    # bits per image = bits per token * tokens; a 30-step prior is near the uniform log2 K bits per token
    assert summary["final_val_bits_per_image"] == pytest.approx(summary["final_val_bits_per_token"] * length)
    assert 0 < summary["final_val_bits_per_token"] < 2 * 10
    assert 1 <= summary["final_sample_codes_used"] <= min(k, 16 * length)  # 16 samples at smoke
    assert summary["final_sample_usage_fraction"] == summary["final_sample_codes_used"] / k
    assert summary["final_sample_kl"] > 0
    assert (folder / prior.SAMPLES_PNG).stat().st_size > 0
    config = json.loads((folder / "config.json").read_text())
    assert config["data"]["tokenizer_run"] == str(_tokenizer(results).resolve())  # recorded, absolute
    assert "val_bits_per_image=" in capsys.readouterr().out
    # the sweep report's figure of samples: one panel with the run's samples.png
    figure = prior_samples(load_runs(out), strict=True)
    assert [ax.get_title().split(" on ")[0] for ax in figure.axes if ax.images] == [folder.name]


def test_a_killed_prior_resumes_to_the_same_summary(results, tmp_path):
    config = _prior_config(results, "model.head=factorized")
    whole = run(config, results / "whole" / config.run_id)
    with pytest.raises(Kill):
        run(config, results / "killed" / config.run_id, on_step=kill_at(13))
    resumed = run(config, results / "killed" / config.run_id)
    assert without_wall_time(resumed) == without_wall_time(whole)
    rows = read_rows(results / "killed" / config.run_id / "metrics.jsonl")
    assert rows == read_rows(results / "whole" / config.run_id / "metrics.jsonl")
    assert {r["kind"] for r in rows} == {"train", "val"}  # no quantizer rows: a prior has no quantizer


def test_priors_over_one_tokenizer_encode_it_once(results, monkeypatch):
    calls = []
    encode = token_cache.encode_split

    def counting(model, batches):
        calls.append(1)
        return encode(model, batches)

    monkeypatch.setattr(token_cache, "encode_split", counting)
    summaries = []
    for head in ("full", "bitwise", "full"):  # the last: the first again, in another folder, on the cache
        config = _prior_config(results, f"model.head={head}", "schedule.steps=2")
        summaries.append(run(config, results / "once" / f"{config.run_id}{len(summaries)}"))
        assert summaries[-1]["status"] == "done"
    assert len(calls) == 2  # the train and the validation split, by the first prior only
    # encoding (building the tokenizer draws its init) leaves the prior's RNG alone: the same run either way
    assert without_wall_time(summaries[2]) == without_wall_time(summaries[0])
    n = 2 * 32  # what two steps of prior.yaml's batch of 32 draw, under the cap of 256
    assert token_cache.train_images_for(config) == n
    cache = results / "once" / CACHE / _tokenizer(results).name / f"tokens-{n}.pt"
    data = torch.load(cache, weights_only=True)
    assert data["train"].dtype == torch.int32 and data["train"].shape == (n, 16)
    assert data["tokenizer_run_id"] == _tokenizer(results).name


def test_the_cached_codes_decode_to_the_tokenizers_reconstructions(results):
    tokenizer = load_tokenizer(_tokenizer(results))
    val = next(token_cache.image_splits(tokenizer.config)[1])[:4]
    with torch.no_grad():
        out = tokenizer.model(val)
        decoded = prior.decode(tokenizer.model, out.indices.reshape(4, -1), (4, 4))
    # the same decoder on the same codes: equal up to float32 rounding of the code vectors' projection
    assert (decoded - out.recon).abs().max().item() <= 1e-4 * max(1.0, out.recon.abs().max().item())


def test_the_run_id_carries_the_tokenizers_not_its_path(results, tmp_path):
    a = _prior_config(results)
    elsewhere = load_config(PRIOR_YAML, ["scale=smoke", f"data.tokenizer_run={tmp_path}/x/{_tokenizer(results).name}"])
    other = load_config(PRIOR_YAML, ["scale=smoke", "data.tokenizer_run=images/0123456789"])
    assert a.run_id == elsewhere.run_id != other.run_id
    assert _prior_config(results, "model.head=bitwise").run_id != a.run_id


def _refused(capsys, *args: str) -> str:
    rc = train.main([str(PRIOR_YAML), "scale=smoke", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_a_bad_tokenizer_run_is_refused_in_one_line(results, tmp_path, capsys):
    out = ["--out", str(tmp_path / "prior")]
    assert "data.tokenizer_run" in _refused(capsys, *out)  # none given
    assert "no such folder" in _refused(capsys, f"data.tokenizer_run={tmp_path}/nothing", *out)
    unfinished = tmp_path / "copy" / _tokenizer(results).name
    shutil.copytree(_tokenizer(results), unfinished)
    (unfinished / "DONE").unlink()
    assert "not a finished run" in _refused(capsys, f"data.tokenizer_run={unfinished}", *out)
    renamed = tmp_path / "renamed"
    shutil.copytree(_tokenizer(results), renamed)
    assert "is not its run id" in _refused(capsys, f"data.tokenizer_run={renamed}", *out)
    (prior_run,) = [p for p in (results / "prior").iterdir() if not p.name.startswith("_")] or [None]
    assert "not a tokenizer" in _refused(capsys, f"data.tokenizer_run={prior_run}", *out)
    assert not (tmp_path / "prior").exists() or not any((tmp_path / "prior").iterdir())  # nothing written


def test_gfid_goes_through_the_rfid_plumbing(results, monkeypatch):
    class Features(torch.nn.Module):
        num_features = 16

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2), torch.nn.ReLU(),
                                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

        def forward(self, x):
            return self.net(x.float())

    monkeypatch.setattr("experiments.loop.inception_extractor", lambda weights: Features())
    config = _prior_config(results, "schedule.steps=2", "eval.rfid_weights=/nonexistent/inception.pth")
    summary = run(config, results / "gfid" / config.run_id)
    assert summary["status"] == "done" and summary["final_val_gfid"] > 0


def test_a_sweep_of_priors_is_refused_before_submission_while_a_tokenizer_is_missing(results):
    from experiments.sweep import expand, sweep_from_dict
    from slurm.submit import SubmitError, missing_inputs, submit_runs

    sweep = sweep_from_dict({"name": "priors", "base": str(PRIOR_YAML), "overrides": ["scale=smoke"],
                             "grid": {"data.tokenizer_run": [f"images/{_tokenizer(results).name}", "images/0123456789"]}})
    runs = expand(sweep)
    missing = missing_inputs(runs, results / "priors")  # relative paths: under the results root
    assert len(missing) == 1 and missing[0].startswith(runs[1].run_id) and "no such folder" in missing[0]
    with pytest.raises(SubmitError, match="1 of 2 runs cannot start"):
        submit_runs("priors", runs, {}, cluster="debug", results=results)
    assert not (results / "priors").exists()  # nothing written


@pytest.mark.parametrize("kind", ["lfq", "vq", "fsq", "bsq"])
def test_every_quantizer_kinds_codes_decode_to_its_reconstruction(kind):
    from experiments.tasks import images

    config = load_config(IMAGES_YAML, ["scale=smoke", "data.resolution=32", f"quantizer.kind={kind}"]).resolved()
    torch.manual_seed(0)
    model = images.build_model(config).eval()
    if kind == "vq":  # codes of the latents' scale: the uniform init's are ~1/K, and the straight-through
        # z + (code - z) rounds at z's scale, which the untrained decoder's GroupNorm then amplifies
        torch.nn.init.normal_(model.quantizer.codebook)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        out = model(x)
        decoded = prior.decode(model, out.indices.reshape(3, -1), (4, 4))
    assert (decoded - out.recon).abs().max().item() <= 1e-4 * max(1.0, out.recon.abs().max().item())
