"""The video task's model, data and validation: causality, one frame = an image, token shapes per
downsampling, folders of mp4 files and frame folders (a corrupt file and a one-frame file counted,
never fatal), the split, the shipped clips, the validation columns and rFVD's plumbing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from exp_helpers import REPO
from PIL import Image
from rank_process import rank_process

from experiments import distributed as ddp
from experiments.config import ConfigError, load_config
from experiments.evaluation import FrechetDistance, evaluate
from experiments.perceptual import WeightsError
from experiments.tasks import video
from experiments.video_clips import shipped_clips, shipped_counts
from experiments.video_folder import Clip, TrainVideos, check_val_videos, list_videos, read_clip
from experiments.video_fvd import I3D, i3d_extractor

VIDEO_YAML = REPO / "experiments" / "configs" / "video.yaml"


def write_mp4(path: Path, frames: int, side: int = 48, seed: int = 0) -> Path:
    """A small mp4 (MPEG-4 part 2, yuv420p) of a square moving over noise."""
    import av

    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            image = background.copy()
            image[10:20, 2 * t % side:(2 * t % side) + 10] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_folder(root: Path, n: int = 8, frames: int = 12) -> Path:
    for i in range(n):
        write_mp4(root / f"class{i % 2}" / f"v{i}.mp4", frames, seed=i)
    (root / "class0" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50)
    write_mp4(root / "class1" / "one_frame.mp4", 1, seed=99)
    return root


def config(*overrides: str):
    return load_config(VIDEO_YAML, ["scale=smoke"], explicit=overrides).resolved()


def test_tokens_of_earlier_frames_do_not_see_later_frames():
    torch.manual_seed(0)
    model = video.build_model(config("model.temporal_downsample=2", "data.frames=9")).eval()
    x = torch.rand(2, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        before = model(x).indices  # (2, 5, 8, 8): token step j sees frames 0 .. 2j
        changed = x.clone()
        changed[:, :, 5] = torch.rand_like(changed[:, :, 5])
        after = model(changed).indices
        recon_before, recon_after = model(x).recon, model(changed).recon
    assert before.shape == (2, 5, 8, 8)
    assert torch.equal(before[:, :3], after[:, :3])  # steps 0-2 cover frames 0-4
    assert not torch.equal(before[:, 3:], after[:, 3:])
    # the decoder is causal too: frames 0-4 come from token steps 0-2 alone
    assert torch.equal(recon_before[:, :, :5], recon_after[:, :, :5])


def test_a_one_frame_video_is_an_image_and_the_first_frame_of_any_video():
    torch.manual_seed(0)
    model = video.build_model(config("model.temporal_downsample=4", "data.frames=9")).eval()
    clip = torch.rand(3, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        as_image = model(clip[:, :, 0])
        one_frame = model(clip[:, :, :1])
        whole = model(clip)
    assert as_image.indices.shape == (3, 8, 8) and as_image.recon.shape == (3, 3, 32, 32)
    assert torch.equal(as_image.indices, one_frame.indices[:, 0])
    assert torch.equal(as_image.indices, whole.indices[:, 0])
    assert torch.allclose(as_image.recon, whole.recon[:, :, 0], atol=1e-5)


@pytest.mark.parametrize(("downsample", "temporal", "frames"), [(4, 1, 3), (8, 2, 5), (16, 4, 9), (4, 4, 17)])
def test_token_shapes_per_downsampling(downsample, temporal, frames):
    c = load_config(VIDEO_YAML, [f"model.downsample={downsample}", f"model.temporal_downsample={temporal}",
                                 f"data.frames={frames}", "model.base_channels=8"])
    model = video.build_model(c)
    out = model(torch.zeros(1, 3, frames, 32, 32))
    steps = 1 + (frames - 1) // temporal
    assert out.indices.shape == (1, steps, 32 // downsample, 32 // downsample)
    assert out.recon.shape == (1, 3, frames, 32, 32)
    assert video.tokens_per_clip(c) == out.indices.numel()


def test_check_refuses_a_clip_length_the_time_downsampling_cannot_take():
    with pytest.raises(ConfigError, match="data.frames=8 is not 1 \\+ a multiple of model.temporal_downsample=2"):
        video.check(load_config(VIDEO_YAML, ["data.frames=8", "model.temporal_downsample=2"]))


def test_shipped_clips_are_fixed_split_by_source_and_move():
    train, val = shipped_clips(32, 9)
    assert (len(train), len(val)) == shipped_counts() == (720, 240)
    assert train.shape[1:] == (3, 9, 32, 32) and train.dtype == torch.uint8
    again_train, again_val = shipped_clips.__wrapped__(32, 9)
    assert torch.equal(again_train, train) and torch.equal(again_val, val)
    # time carries structure: consecutive frames differ, and less than frames of other clips do
    step = (train[:, :, 1:].float() - train[:, :, :-1].float()).abs().mean()
    other = (train[1:, :, 0].float() - train[:-1, :, 0].float()).abs().mean()
    assert 0 < step < other
    # no validation clip is a training clip (different source images)
    assert not (val[:, None, :, 0].flatten(2) == train[None, :, :, 0].flatten(2)).all(-1).any()


def test_a_folder_with_a_corrupt_and_a_one_frame_file_is_counted_not_fatal(tmp_path):
    root = video_folder(tmp_path / "videos")
    listing = list_videos(root, 0.3)
    names = {p.name for p in listing.train + listing.val}
    assert {"corrupt.mp4", "one_frame.mp4"} <= names and len(names) == 10
    clip = Clip(frames=5, stride=2, resolution=32)
    everything = tuple(sorted(listing.train + listing.val))
    chosen, notes = check_val_videos(everything, clip, clips=100)
    kinds = {Path(n.path).name: n.kind for n in notes}
    assert kinds == {"corrupt.mp4": "unreadable", "one_frame.mp4": "short"}
    assert {Path(p).name for p, _, _ in chosen} == {f"v{i}.mp4" for i in range(8)}
    train = TrainVideos(everything, clip)
    index = everything.index(root / "class0" / "corrupt.mp4")
    got, skipped = train[(index, 0)]
    assert got is not None and got.shape == (3, 5, 32, 32) and [n.kind for n in skipped] == ["unreadable"]
    # a clip takes every data.frame_stride-th frame: the square moves 2 px a frame, 4 px a clip step
    full = read_clip(root / "class0" / "v0.mp4", Clip(9, 1, 48), None, start=0)
    strided = read_clip(root / "class0" / "v0.mp4", Clip(5, 2, 48), None, start=0)
    assert torch.equal(strided, full[:, ::2])
    # a clip from the middle (found by seeking to a keyframe) is the same frames decoded from the start
    assert torch.equal(read_clip(root / "class0" / "v0.mp4", Clip(5, 1, 48), None, start=4), full[:, 4:])


def test_frame_folders_and_the_split_are_stable(tmp_path):
    for v in range(6):
        for t in range(7):
            path = tmp_path / "frames" / f"clip{v}" / f"{t:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((40, 40, 3), 30 * t, np.uint8)).save(path)
    listing = list_videos(tmp_path / "frames", 0.4)
    assert listing.train and listing.val and len(listing.train + listing.val) == 6
    assert list_videos(tmp_path / "frames", 0.4) == listing
    clip = read_clip(listing.train[0], Clip(3, 2, 32), None, start=1)
    assert clip[:, :, 0, 0].tolist() == [[30, 90, 150]] * 3  # frames 1, 3, 5
    (tmp_path / "frames" / "clip9").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "frames" / "clip9" / "0000.png")
    grown = list_videos(tmp_path / "frames", 0.4)
    assert set(listing.train) <= set(grown.train) and set(listing.val) <= set(grown.val)


def test_an_official_split_list_sets_the_validation_videos(tmp_path):
    root = video_folder(tmp_path / "UCF-101", n=4)
    split = tmp_path / "testlist01.txt"
    split.write_text("class0/v0.mp4\nclass1/v3.mp4\nclass1/missing.avi\n")
    listing = list_videos(root, 0.05, str(split))
    assert {p.relative_to(root).as_posix() for p in listing.val} == {"class0/v0.mp4", "class1/v3.mp4"}
    assert listing.layout == "split list" and listing.skipped == ("class1/missing.avi",)
    with pytest.raises(ConfigError, match="data.split_file"):
        list_videos(root, 0.05, str(tmp_path / "nope.txt"))


def test_validation_columns_count_every_token_and_the_first_frame_apart():
    c = config("quantizer.codebook_size=64", "data.val_size=20", "data.frames=9", "model.temporal_downsample=2")
    torch.manual_seed(0)
    model = video.build_model(c)
    data = video.build_dataset(c)
    val = data.val
    got = evaluate(model, [val[:7], val[7:]], device=torch.device("cpu"), value_range=(-1.0, 1.0), is_image=True)
    per_clip = 5 * 8 * 8
    assert got["val_tokens"] == 20 * per_clip
    assert got["val_tokens_first_frame"] == 20 * 64 and got["val_tokens_later_frames"] == 20 * 4 * 64
    with torch.no_grad():
        model.eval()
        indices = model(val).indices
    assert got["val_codes_used_first_frame"] == indices[:, 0].unique().numel()
    assert got["val_codes_used_later_frames"] == indices[:, 1:].unique().numel()
    assert got["val_codes_used"] == indices.unique().numel()
    assert got["val_usage_fraction_first_frame"] == indices[:, 0].unique().numel() / 64
    frames = [got[f"val_psnr_frame{t}"] for t in range(9)]
    mse = np.mean([10 ** (-p / 10) * 4 for p in frames])  # equal frame sizes: overall MSE = mean of frames'
    assert got["val_mse"] == pytest.approx(mse, rel=1e-6)
    assert got["val_ssim"] == pytest.approx(np.mean([got[f"val_ssim_frame{t}"] for t in range(9)]), rel=1e-6)


def test_rfvd_plumbing_with_a_random_extractor_and_a_weights_file(tmp_path):
    torch.manual_seed(0)
    small = I3D(classes=16, width=0.125).eval()
    x = torch.rand(12, 3, 9, 16, 16) * 2 - 1
    distances = []
    for noise in (0.0, 0.3, 0.9):
        fvd = FrechetDistance(small, torch.device("cpu"))
        fvd.update(x, (x + noise * torch.randn_like(x)).clamp(-1, 1), (-1.0, 1.0))
        distances.append(fvd.compute())
    assert abs(distances[0]) < 1e-6 and distances[0] < distances[1] < distances[2]
    # eval.fvd_weights: a state_dict of this I3D loads with weights_only; anything else is refused
    weights = tmp_path / "i3d.pt"
    reference = I3D()
    torch.save(reference.state_dict(), weights)
    loaded = i3d_extractor(weights)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), reference.state_dict().values(), strict=True))
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(WeightsError, match="has no tensor"):
        i3d_extractor(tmp_path / "other.pt")


@rank_process
def _eval_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with ddp.process_group():
        c = config("quantizer.codebook_size=64", "data.val_size=14")
        torch.manual_seed(0)
        model = video.build_model(c)
        shard = video.build_dataset(c).val.tensor_split(2)[rank]
        got = evaluate(model, [shard[:3], shard[3:]], device=torch.device("cpu"), value_range=(-1.0, 1.0),
                       is_image=True)
        if rank == 0:
            Path(out).write_text(json.dumps(got))


def test_video_validation_under_two_ranks_equals_one_process(tmp_path):
    out = tmp_path / "ddp.json"
    mp.start_processes(_eval_worker, args=(ddp.free_port(), str(out)), nprocs=2, start_method="spawn")
    two = json.loads(out.read_text())
    c = config("quantizer.codebook_size=64", "data.val_size=14")
    torch.manual_seed(0)
    model = video.build_model(c)
    val = video.build_dataset(c).val
    one = evaluate(model, [val], device=torch.device("cpu"), value_range=(-1.0, 1.0), is_image=True)
    for part in ("", "_first_frame", "_later_frames"):  # integer histograms summed over the ranks
        for key in ("val_codes_used", "val_usage_fraction", "val_perplexity"):
            assert two[key + part] == one[key + part], key + part
    frames = c.data.frames
    for t in range(frames):  # float32 sums per frame, grouped by rank and batch
        assert two[f"val_psnr_frame{t}"] == pytest.approx(one[f"val_psnr_frame{t}"], rel=1e-4)
        assert two[f"val_ssim_frame{t}"] == pytest.approx(one[f"val_ssim_frame{t}"], abs=1e-5)
