"""The adversarial and perceptual pieces of the tokenizer objective (experiments.adversarial,
experiments.perceptual), on their own: shapes, the losses' values, the adaptive weight against its
definition, LeCAM's averages, LPIPS's invariances and its weights files, good and bad."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from experiments.adversarial import (
    LeCAM,
    PatchGAN,
    StyleGANDiscriminator,
    adaptive_weight,
    build_discriminator,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_g_loss,
)
from experiments.perceptual import LPIPS, WeightsError, combine, linear_keys, trunk_keys

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("resolution", "side"), [(32, 2), (64, 6), (128, 14)])
def test_patchgan_gives_a_logit_per_patch(resolution: int, side: int) -> None:
    torch.manual_seed(0)
    d = PatchGAN()
    assert d(torch.randn(2, 3, resolution, resolution)).shape == (2, 1, side, side)
    # pix2pix's initialisation: convolution weights N(0, 0.02)
    assert abs(d.main[0].weight.std().item() - 0.02) < 0.004


def test_stylegan_gives_one_logit_per_image_and_names_a_wrong_size() -> None:
    torch.manual_seed(0)
    for resolution in (16, 32, 128):
        d = build_discriminator("stylegan", resolution=resolution, width=8)
        assert isinstance(d, StyleGANDiscriminator)
        assert d(torch.randn(3, 3, resolution, resolution)).shape == (3, 1)
    with pytest.raises(ValueError, match="built for 32 px got images of"):
        build_discriminator("stylegan", resolution=32, width=8)(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="must be a power of two"):
        StyleGANDiscriminator(resolution=48)
    with pytest.raises(ValueError, match="must be one of"):
        build_discriminator("unet")


def test_blurred_downsampling_keeps_a_constant_image_constant() -> None:
    d = StyleGANDiscriminator(resolution=16, width=4)
    flat = torch.full((1, 4, 8, 8), 0.7)
    out = d.blocks[0].down(flat)
    assert out.shape == (1, 4, 4, 4) and torch.allclose(out, torch.full_like(out, 0.7), atol=1e-6)


def test_hinge_losses() -> None:
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    # non-saturating: each image's mean logit, then softplus(-l): images with means 0.5 and -1.5
    maps = torch.tensor([[[[1.0, 0.0]]], [[[-1.0, -2.0]]]])
    expected = (torch.nn.functional.softplus(torch.tensor(-0.5)) + torch.nn.functional.softplus(torch.tensor(1.5))) / 2
    assert non_saturating_g_loss(maps).item() == pytest.approx(expected.item())


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer() -> None:
    torch.manual_seed(0)
    decoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4))
    x, target = torch.randn(5, 4), torch.randn(5, 4)
    out = decoder(x)
    rec = (out - target).pow(2).mean()
    adv = -(out.sum(dim=1) * 0.3).mean()
    last = decoder[2].weight
    got = adaptive_weight(rec, adv, last)
    g_rec = torch.autograd.grad(rec, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last, retain_graph=True)[0]
    assert got.item() == pytest.approx((g_rec.norm() / (g_adv.norm() + 1e-4)).item(), rel=1e-6)
    assert not got.requires_grad
    (rec + got * adv).backward()  # the graph is still there for the step's backward
    assert decoder[0].weight.grad is not None
    # a generator loss with no gradient at the layer: the weight is clamped, not infinite
    out = decoder(x)
    zero_adv = out.sum() * 0.0
    assert adaptive_weight((out - target).pow(2).mean(), zero_adv, last).item() == pytest.approx(
        min(1e4, g_rec.norm().item() / 1e-4), rel=1e-5)


def test_lecam_tracks_the_logit_averages_and_penalises_against_them() -> None:
    lecam = LeCAM(decay=0.5)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -3.0])
    loss = lecam(real, fake)
    # averages first: 0.5 * 0 + 0.5 * 2 = 1 and 0.5 * 0 + 0.5 * -2 = -1; then
    # mean(relu(real - (-1))^2) + mean(relu(1 - fake)^2) = mean(4, 16) + mean(4, 16)
    assert lecam.ema_real.item() == pytest.approx(1.0) and lecam.ema_fake.item() == pytest.approx(-1.0)
    assert loss.item() == pytest.approx(20.0)
    # the averages are state: a checkpoint carries them to the resumed run
    restored = LeCAM(decay=0.5)
    restored.load_state_dict(lecam.state_dict())
    assert restored.ema_real.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="decay"):
        LeCAM(decay=1.0)


def _random_weights(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in trunk_keys().items()}
    state.update({k: torch.rand(shape, generator=g) for k, shape in linear_keys().items()})
    torch.save(state, path)
    return state


def test_lpips_is_zero_on_equal_images_and_a_distance_otherwise(tmp_path: Path) -> None:
    _random_weights(tmp_path / "w.pt")
    lpips = LPIPS.from_file(tmp_path / "w.pt")
    torch.manual_seed(0)
    a = torch.rand(3, 3, 32, 32) * 2 - 1
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    assert torch.allclose(lpips(a, a), torch.zeros(3), atol=1e-6)
    d = lpips(a, b)
    assert d.shape == (3,) and (d > 0).all()
    # per image: the batch does not mix (no batch statistics anywhere)
    assert torch.allclose(lpips(a[:1], b[:1]), d[:1], rtol=1e-5)
    assert torch.allclose(lpips(b, a), d, rtol=1e-5)  # symmetric
    # the linear layers weight the depths: doubling them doubles the distance
    with torch.no_grad():
        for lin in lpips.lins:
            lin.weight.mul_(2)
    assert torch.allclose(lpips(a, b), 2 * d, rtol=1e-5)


def test_lpips_is_frozen_but_passes_gradients_to_the_images() -> None:
    lpips = LPIPS()
    lpips.train()
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    b = torch.zeros(2, 3, 32, 32, requires_grad=True)
    lpips(torch.rand(2, 3, 32, 32), b).sum().backward()
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_lpips_reads_the_trunk_under_torchvision_names(tmp_path: Path) -> None:
    state = _random_weights(tmp_path / "w.pt", seed=3)
    lpips = LPIPS.from_file(tmp_path / "w.pt")
    assert torch.equal(lpips.features[28].bias, state["features.28.bias"])
    assert torch.equal(lpips.features[0].weight, state["features.0.weight"])
    assert torch.equal(lpips.lins[4].weight, state["lin4.model.1.weight"])


def test_bad_perceptual_weights_files_are_named_in_one_line(tmp_path: Path) -> None:
    state = _random_weights(tmp_path / "good.pt")
    (tmp_path / "text.pt").write_text("not weights")
    torch.save({k: v for k, v in state.items() if k != "features.14.weight"}, tmp_path / "missing.pt")
    torch.save({**state, "lin2.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "shape.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {"nothing.pt": "does not exist", "text.pt": "not a torch weights file",
             "missing.pt": "no tensor 'features.14.weight'", "shape.pt": "lin2.model.1.weight has shape",
             "list.pt": "holds a list"}
    for name, words in cases.items():
        with pytest.raises(WeightsError, match=words) as err:
            LPIPS.from_file(tmp_path / name)
        assert "\n" not in str(err.value)


def test_combine_writes_the_one_file_from_the_two_published_ones(tmp_path: Path) -> None:
    state = _random_weights(tmp_path / "all.pt")
    torch.save({k: v for k, v in state.items() if k.startswith("features.")} | {"classifier.0.weight": torch.zeros(2)},
               tmp_path / "vgg16.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, tmp_path / "vgg.pth")
    out = combine(tmp_path / "vgg16.pth", tmp_path / "vgg.pth", tmp_path / "lpips.pt")
    assert torch.equal(LPIPS.from_file(out).lins[1].weight, state["lin1.model.1.weight"])
    run = subprocess.run([sys.executable, "-m", "experiments.perceptual", str(tmp_path / "vgg.pth"),
                          str(tmp_path / "vgg16.pth"), "--out", str(tmp_path / "x.pt")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "VGG16 file" in run.stderr
    assert not (tmp_path / "x.pt").exists()


# --- in training: the images task with the adversarial game and LPIPS ---------------------------------

IMAGES_YAML = REPO / "experiments" / "configs" / "images.yaml"
GAME = ("d_loss", "g_adv_loss", "adaptive_weight", "d_real", "d_fake", "lecam_loss")


def _gan_config(tmp_path: Path, *extra: str):
    from exp_helpers import smoke_config

    weights = tmp_path / "lpips.pt"
    if not weights.exists():
        _random_weights(weights)
    return smoke_config("loss.adversarial_weight=0.1", "loss.disc_start=5", "loss.lecam_weight=0.01",
                        "loss.perceptual_weight=0.5", f"loss.perceptual_weights={weights}", "schedule.steps=12",
                        *extra, path=IMAGES_YAML)


def test_a_run_with_the_game_logs_it_after_the_start_and_resumes_bit_identically(tmp_path: Path) -> None:
    import json

    from exp_helpers import Kill, kill_at, read_rows, run, without_wall_time

    config = _gan_config(tmp_path)
    reference = run(config, tmp_path / "ref")
    rows = [r for r in read_rows(tmp_path / "ref" / "metrics.jsonl") if r["kind"] == "train"]
    by_step = {r["step"]: r for r in rows}
    assert sorted(by_step) == [5, 10, 12]
    # step 5 is not past loss.disc_start=5: the game has not begun; LPIPS is on from the first step
    assert all(math.isnan(by_step[5][k]) for k in GAME) and by_step[5]["perceptual_loss"] > 0
    for step in (10, 12):
        row = by_step[step]
        assert all(math.isfinite(row[k]) for k in (*GAME, "perceptual_loss")), row
        assert row["d_loss"] >= 0 and row["adaptive_weight"] > 0 and row["lecam_loss"] >= 0
    # the discriminator and its optimiser travel in the checkpoint
    checkpoint = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)
    assert set(checkpoint["objective"]) == {"disc", "optimizer", "scaler", "lecam"}

    with pytest.raises(Kill):
        run(config, tmp_path / "run", on_step=kill_at(11))
    resumed = run(config, tmp_path / "run")
    assert without_wall_time(resumed) == without_wall_time(reference)
    # NaN rows compare as text: NaN is not equal to itself
    assert json.dumps(read_rows(tmp_path / "run" / "metrics.jsonl")) == json.dumps(
        read_rows(tmp_path / "ref" / "metrics.jsonl"))


def test_the_stylegan_discriminator_and_a_fixed_weight_train_too(tmp_path: Path) -> None:
    from exp_helpers import read_rows, run

    config = _gan_config(tmp_path, "loss.disc=stylegan", "loss.adaptive_weight=false", "loss.disc_width=8",
                         "loss.generator_loss=non_saturating", "schedule.steps=6")
    assert run(config, tmp_path / "run")["status"] == "done"
    last = [r for r in read_rows(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"][-1]
    assert last["step"] == 6 and last["adaptive_weight"] == pytest.approx(0.1) and math.isfinite(last["d_loss"])


def test_a_bad_perceptual_weights_file_stops_the_command_before_any_folder(tmp_path: Path) -> None:
    (tmp_path / "bad.pt").write_text("not weights")
    cases = {str(tmp_path / "none.pt"): "does not exist", str(tmp_path / "bad.pt"): "not a torch weights file"}
    for path, words in cases.items():
        out = subprocess.run([sys.executable, "-m", "experiments.train", str(IMAGES_YAML), "scale=smoke",
                              "loss.perceptual_weight=1", f"loss.perceptual_weights={path}", "--out",
                              str(tmp_path / "runs")], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and words in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert not (tmp_path / "runs").exists()
    out = subprocess.run([sys.executable, "-m", "experiments.train", str(REPO / "experiments" / "configs" / "synthetic.yaml"),
                          "scale=smoke", "loss.adversarial_weight=0.1", "--out", str(tmp_path / "runs")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "applies to tasks that reconstruct images" in out.stderr, out.stderr
