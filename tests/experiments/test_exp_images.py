"""The images task: reading any folder of images, the shipped default, the tokenizer, evaluation."""

from __future__ import annotations

import io
import json
import math
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from exp_helpers import REPO, Kill, kill_at, read_rows, run, without_wall_time
from PIL import Image
from rank_process import rank_process
from tolerances import sum_tol

from experiments import distributed as ddp
from experiments.config import ConfigError, load_config
from experiments.data import StepBatchSampler, step_items, train_loader
from experiments.evaluation import FrechetDistance, code_histogram, evaluate, usage_figures
from experiments.image_folder import TrainImages, collate, list_images, load_crop, to_rgb
from experiments.tasks import images
from experiments.tokenizer import Layout

IMAGES_YAML = REPO / "experiments" / "configs" / "images.yaml"
IMAGENET_YAML = REPO / "experiments" / "configs" / "imagenet128.yaml"


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_tree(root: Path) -> dict[str, Path]:
    """Nested folders, every format, the odd modes, and files that must be skipped or reported."""
    files = {}

    def save(rel: str, image: Image.Image, **kwargs) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **kwargs)
        files[rel] = path

    for i in range(24):
        fmt = ["png", "jpg", "webp", "bmp", "JPEG"][i % 5]
        save(f"set{i % 3}/sub{i % 2}/img{i:02d}.{fmt}", Image.fromarray(_rgb(40 + i, 50 + 2 * i, i)))
    save("odd/gray.png", Image.fromarray(_rgb(48, 48, 100)[..., 0], "L"))
    rgba = np.concatenate([_rgb(48, 48, 101), np.zeros((48, 48, 1), np.uint8)], -1)  # fully transparent
    save("odd/rgba.png", Image.fromarray(rgba, "RGBA"))
    save("odd/palette.png", Image.fromarray(_rgb(48, 48, 102)).convert("P"))
    deep = (np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 28).astype(np.uint16)
    save("odd/deep16.png", Image.fromarray(deep))  # mode I;16
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    save("odd/rotated.jpg", Image.fromarray(_rgb(40, 80, 103)), exif=exif.tobytes())
    (root / "odd" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    good = io.BytesIO()
    Image.fromarray(_rgb(64, 64, 104)).save(good, format="JPEG")
    (root / "odd" / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (root / "odd" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.fromarray(_rgb(40, 40, 105)).save(root / ".hidden" / "skip.png")
    return files


def test_reader_finds_splits_and_decodes_every_kind(tmp_path):
    make_tree(tmp_path)
    listing = list_images(tmp_path, val_fraction=0.25)
    names = {p.name for p in listing.train + listing.val}
    assert "notes.txt" not in names and "skip.png" not in names  # not images / hidden
    assert {"img00.png", "img04.JPEG", "gray.png", "corrupt.png", "truncated.jpg"} <= names
    assert len(names) == 24 + 7 and listing.layout == "hash split"
    assert listing.train and listing.val and not set(listing.train) & set(listing.val)
    assert list_images(tmp_path, 0.25) == listing  # the split is a function of the paths
    # Adding files never moves an existing file across the split.
    Image.fromarray(_rgb(40, 40, 7)).save(tmp_path / "set0" / "new.png")
    grown = list_images(tmp_path, 0.25)
    assert set(listing.val) <= set(grown.val) and set(listing.train) <= set(grown.train)

    with Image.open(tmp_path / "odd" / "rgba.png") as im:
        assert np.all(np.asarray(to_rgb(im)) == 255)  # transparent pixels are composited on white
    with Image.open(tmp_path / "odd" / "deep16.png") as im:
        assert im.mode.startswith("I")
        deep = np.asarray(to_rgb(im))
    assert deep.shape == (48, 48, 3) and deep.max() > 200  # scaled from 16 bits, not clipped at 255
    with Image.open(tmp_path / "odd" / "rotated.jpg") as im:
        assert to_rgb(im).size == (40, 80)  # EXIF orientation applied: stored 80 x 40
    for name in ("gray.png", "palette.png", "img03.bmp", "img02.webp"):
        path = next(p for p in listing.train + listing.val if p.name == name)
        crop = load_crop(path, 32, None)
        assert crop.shape == (3, 32, 32) and crop.dtype == torch.uint8


def test_imagenet_layout_and_path_lists(tmp_path):
    for split, n in (("train", 6), ("val", 3)):
        for c in ("n01", "n02"):
            for i in range(n):
                path = tmp_path / "inet" / split / c / f"{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_rgb(40, 40, i)).save(path)
    listing = list_images(tmp_path / "inet", 0.5)
    assert listing.layout == "train/val folders" and (len(listing.train), len(listing.val)) == (12, 6)
    lines = ["# my list", "", *[str(p.relative_to(tmp_path)) for p in listing.train], "inet/readme.md"]
    (tmp_path / "list.txt").write_text("\n".join(lines))
    from_list = list_images(tmp_path / "list.txt", 0.3)
    assert from_list.layout == "path list" and set(from_list.train + from_list.val) == set(listing.train)
    assert from_list.skipped == ("inet/readme.md",)


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: p, "holds no png/jpg/jpeg/webp/bmp images"),
])
def test_bad_roots_fail_before_any_folder_is_written(tmp_path, make, message):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "readme.txt").write_text("no images here")
    root = make(tmp_path / "data")
    config = load_config(IMAGES_YAML, ["scale=smoke", f"data.root={root}"])
    with pytest.raises(ConfigError, match=message):
        run(config, tmp_path / "out" / config.run_id)
    assert not (tmp_path / "out").exists()


def test_order_is_a_function_of_seed_and_step():
    a = list(StepBatchSampler(50, 8, seed=3, start=0, steps=20, rows=slice(None)))
    resumed = list(StepBatchSampler(50, 8, seed=3, start=12, steps=20, rows=slice(None)))
    assert resumed == a[12:]
    epoch0 = [i for batch in a[:7] for i, _ in batch][:50]
    assert sorted(epoch0) == list(range(50))  # each epoch is a permutation
    assert a != list(StepBatchSampler(50, 8, seed=4, start=0, steps=20, rows=slice(None)))
    shards = [list(StepBatchSampler(50, 8, 3, 0, 20, slice(r * 4, r * 4 + 4))) for r in (0, 1)]
    assert [s0 + s1 for s0, s1 in zip(*shards, strict=True)] == a  # two ranks' rows make the batch
    assert step_items(50, 7, 8, 3) == a[6]


def test_loader_batches_do_not_depend_on_workers(tmp_path):
    make_tree(tmp_path)
    listing = list_images(tmp_path, 0.25)
    dataset = TrainImages(listing.train, 32)
    config = load_config(IMAGES_YAML, ["data.batch_size=6", "schedule.steps=4", f"data.root={tmp_path}"])
    got = {}
    for workers in (0, 2):
        cfg = load_config(IMAGES_YAML, ["data.batch_size=6", "schedule.steps=4", f"data.root={tmp_path}",
                                        f"runtime.num_workers={workers}"])
        got[workers] = list(train_loader(dataset, cfg, torch.device("cpu"), 0, slice(None), collate))
    assert config.runtime.num_workers == 2
    for (x0, bad0), (x2, bad2) in zip(got[0], got[2], strict=True):
        assert torch.equal(x0, x2) and bad0 == bad2
        assert x0.shape == (6, 3, 32, 32)  # an unreadable file is replaced, the batch stays whole


def test_shipped_crops_split_by_source_and_counted():
    train, val = images.shipped_crops(32)
    assert train.dtype == torch.uint8 and train.shape[1:] == (3, 32, 32)
    again_train, again_val = images.shipped_crops.__wrapped__(32)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert not set(images.TRAIN_IMAGES) & set(images.VAL_IMAGES)
    # Counts quoted in the README; a change of the crop rules must update it.
    assert (len(train), len(val)) == (60430, 1272)
    assert len(images.shipped_crops(64)[1]) == 323


def test_histogram_and_usage_by_hand():
    idx = torch.tensor([[3, 3, 0], [7, 3, 1]])  # (b, n), one codebook of 8
    counts = code_histogram(idx, 1, 8)
    assert counts.tolist() == [[1, 1, 0, 3, 0, 0, 0, 1]]
    figures = usage_figures(counts)
    p = np.array([1, 1, 3, 1]) / 6
    assert figures["val_codes_used"] == 4 and figures["val_usage_fraction"] == 0.5 and figures["val_tokens"] == 6
    assert figures["val_perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))  # float64, 4 terms: approx default
    two = code_histogram(torch.tensor([[[0, 1], [0, 2]]]), 2, 4)  # (b, n, c): the last axis is the codebook
    assert two.tolist() == [[2, 0, 0, 0], [0, 1, 1, 0]]
    figures = usage_figures(two)
    assert figures["val_codes_used_c0"] == 1 and figures["val_codes_used_c1"] == 2
    assert figures["val_codes_used"] == 1.5


def test_run_on_a_folder_reports_unreadable_files_once_and_resumes_identically(tmp_path, capsys):
    make_tree(tmp_path / "data")
    overrides = ["scale=smoke", f"data.root={tmp_path / 'data'}", "data.val_fraction=0.3", "data.batch_size=8",
                 "schedule.steps=12", "runtime.num_workers=1"]
    config = load_config(IMAGES_YAML, overrides)
    reference = run(config, tmp_path / "ref")
    out = capsys.readouterr().out
    assert reference["status"] == "done"
    reported = [line for line in out.splitlines() if "skipping an unreadable image" in line]
    assert len(reported) == len(set(reported)) >= 1
    assert all(("corrupt.png" in line) or ("truncated.jpg" in line) for line in reported)
    assert reference["unreadable_files"] == len(reported)
    rows = read_rows(tmp_path / "ref" / "metrics.jsonl")
    val = [r for r in rows if r["kind"] == "val"][-1]
    assert val["val_tokens"] > 0 and 0 < val["val_usage_fraction"] <= 1 and -1 <= val["val_ssim"] <= 1
    assert reference["final_val_codes_used"] == val["val_codes_used"]

    with pytest.raises(Kill):
        run(config, tmp_path / "resumed", on_step=kill_at(7))
    resumed = run(config, tmp_path / "resumed")
    assert without_wall_time(resumed) == without_wall_time(reference)
    assert read_rows(tmp_path / "resumed" / "metrics.jsonl") == rows


def test_validation_utilization_counts_every_token(tmp_path):
    config = load_config(IMAGES_YAML, ["scale=smoke", "quantizer.codebook_size=64", "data.val_size=40"]).resolved()
    torch.manual_seed(0)
    model = images.build_model(config)
    data = images.build_dataset(config)
    got = evaluate(model, [data.val[:25], data.val[25:]], device=torch.device("cpu"), value_range=(-1.0, 1.0),
                   is_image=True)
    model.eval()
    with torch.no_grad():
        indices = model(data.val).indices
    tokens = Counter(indices.flatten().tolist())
    assert got["val_tokens"] == indices.numel() == 40 * (32 // config.model.downsample) ** 2
    assert got["val_codes_used"] == len(tokens)
    recon = model(data.val).recon
    # float32 sums of the squared errors (terms >= 0: relative to the sum) in batches of 25 and 15 against one
    assert got["val_mse"] == pytest.approx(torch.mean((recon - data.val) ** 2).item(),
                                           rel=sum_tol(torch.float32, recon.numel()))


@rank_process
def _eval_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with ddp.process_group():
        config = load_config(IMAGES_YAML, ["scale=smoke", "quantizer.codebook_size=64", "data.val_size=30"]).resolved()
        torch.manual_seed(0)
        model = images.build_model(config)
        val = images.build_dataset(config).val
        shard = val.tensor_split(2)[rank]  # 15 images each: odd shares of tokens
        got = evaluate(model, [shard[:7], shard[7:]], device=torch.device("cpu"), value_range=(-1.0, 1.0),
                       is_image=True)
        if rank == 0:
            Path(out).write_text(json.dumps(got))


def test_validation_under_two_ranks_equals_one_process(tmp_path):
    out = tmp_path / "ddp.json"
    mp.start_processes(_eval_worker, args=(ddp.free_port(), str(out)), nprocs=2, start_method="spawn")
    two = json.loads(out.read_text())
    config = load_config(IMAGES_YAML, ["scale=smoke", "quantizer.codebook_size=64", "data.val_size=30"]).resolved()
    torch.manual_seed(0)
    model = images.build_model(config)
    val = images.build_dataset(config).val
    one = evaluate(model, [val], device=torch.device("cpu"), value_range=(-1.0, 1.0), is_image=True)
    # integer histograms summed over the ranks: the same counts, then the same float64 arithmetic
    for key in ("val_tokens", "val_codes_used", "val_usage_fraction", "val_perplexity"):
        assert two[key] == one[key], key
    # float32 sums of squared errors (terms >= 0) grouped by rank and batch: relative to the sum of them all
    assert two["val_mse"] == pytest.approx(one["val_mse"], rel=sum_tol(torch.float32, val.numel()))
    # each image's SSIM: a float32 mean over its pixels of terms of magnitude <= 1
    assert two["val_ssim"] == pytest.approx(one["val_ssim"], abs=sum_tol(torch.float32, val[0].numel()))


def test_rfid_plumbing_with_a_random_feature_extractor():
    torch.manual_seed(0)

    class Features(torch.nn.Module):
        num_features = 32

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, 2), torch.nn.ReLU(),
                                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

        def forward(self, x):
            return self.net(x.float())

    x = torch.rand(128, 3, 32, 32) * 2 - 1
    distances = []
    for noise in (0.0, 0.2, 0.6):
        fid = FrechetDistance(Features(), torch.device("cpu"))
        fid.update(x, (x + noise * torch.randn_like(x)).clamp(-1, 1), (-1.0, 1.0))
        distances.append(fid.compute())
    assert abs(distances[0]) < 1e-6 and distances[0] < distances[1] < distances[2]


@pytest.mark.parametrize(("preset", "downsample"), [("tiny", 8), ("tiny", 16), ("base", 8)])
def test_tokenizer_presets(preset, downsample):
    config = load_config(IMAGES_YAML, [f"model.preset={preset}", f"model.downsample={downsample}",
                                       "data.resolution=128", "quantizer.codebook_size=262144"])
    layout = Layout.of(config.model)
    model = images.build_model(config)
    assert len(layout.ch_mult) == round(math.log2(downsample)) + 1
    z = model.encoder(torch.zeros(1, 3, 128, 128))
    assert z.shape == (1, 18, 128 // downsample, 128 // downsample)  # LFQ's width: 18 bits
    if preset == "base":
        assert layout == Layout(128, (1, 2, 2, 4), 2)  # Open-MAGVIT2's 128-px layout


def test_shipped_configs_validate_and_the_cluster_recipe_runs_on_a_generated_imagenet(tmp_path):
    for split, n in (("train", 4), ("val", 2)):
        for c in ("n01440764", "n01443537"):
            for i in range(n):
                path = tmp_path / "imagenet" / split / c / f"{c}_{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(_rgb(150, 180, i)).save(path)
    full = load_config(IMAGENET_YAML, [f"data.root={tmp_path / 'imagenet'}"])
    assert full.quantizer.codebook_size == 2**18 and full.model.preset == "base" and full.data.resolution == 128
    config = load_config(IMAGENET_YAML, [f"data.root={tmp_path / 'imagenet'}", "scale=smoke", "schedule.steps=3",
                                         "runtime.num_workers=0"])
    summary = run(config, tmp_path / "out")
    assert summary["status"] == "done" and summary["final_val_tokens"] == 4 * (32 // config.model.downsample) ** 2
