"""The quantizer bottlenecks: shapes, straight-through gradients, the monitor protocol."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tolerances import assert_close_rel_max, sum_tol

from experiments.baselines import FSQ, VectorQuantizer
from experiments.quantizers import build_quantizer, quantizer_config
from lfq import LFQ
from lfq.monitor import LFQMonitor
from lfq.sinks import MemorySink

KINDS = ["lfq", "bsq", "vq", "fsq"]


def make(kind: str, num_codebooks: int = 1, latent_dim: int | None = None, size: int = 64):
    torch.manual_seed(0)
    return build_quantizer(quantizer_config({"kind": kind, "codebook_size": size, "num_codebooks": num_codebooks}),
                           latent_dim)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_codebooks", [1, 2])
def test_shapes_and_index_range(kind, num_codebooks):
    q = make(kind, num_codebooks)
    tokens = torch.randn(4, 5, q.dim)
    out = q(tokens, inv_temperature=100.0)
    assert out.quantized.shape == tokens.shape
    expected = (4, 5, num_codebooks) if num_codebooks > 1 else (4, 5)
    assert out.indices.shape == expected
    assert out.indices.min() >= 0 and out.indices.max() < q.codebook_size
    image = torch.randn(2, q.dim, 3, 3)  # channel-first, as the conv tokenizer feeds it
    out = q(image, inv_temperature=100.0)
    assert out.quantized.shape == image.shape
    assert out.indices.shape == ((2, 3, 3, num_codebooks) if num_codebooks > 1 else (2, 3, 3))


@pytest.mark.parametrize("kind", KINDS)
def test_protocol_and_last_stats(kind):
    q = make(kind, num_codebooks=2)
    assert isinstance(q.codebook_size, int) and q.num_codebooks == 2 and q.keep_num_codebooks_dim is True
    q.train()
    q(torch.randn(8, 4, q.dim), inv_temperature=100.0)
    stats = q.last_stats
    assert stats is not None and stats.commitment.shape == (2,) and stats.aux_loss.shape == (2,)
    assert not stats.commitment.requires_grad
    q.eval()
    q(torch.randn(8, 4, q.dim), inv_temperature=100.0)
    assert q.last_stats is None


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_pass_straight_through(kind):
    q = make(kind, latent_dim=12)  # with projections in and out
    x = torch.randn(16, 3, 12, requires_grad=True)
    out = q(x, inv_temperature=100.0)
    (out.quantized.square().sum() + out.entropy_aux_loss).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_vq_picks_the_nearest_code_and_learns_its_codebook():
    q = VectorQuantizer(codebook_size=8, code_dim=3)
    with torch.no_grad():
        q.codebook.copy_(torch.arange(24, dtype=torch.float32).reshape(1, 8, 3))
    x = q.codebook[0][[5, 2, 7]][None] + 0.1  # (1, 3 tokens, 3)
    out = q(x)
    assert out.indices.tolist() == [[5, 2, 7]]
    # straight-through x + (q - x): two float32 roundings at the codes' magnitude
    assert_close_rel_max(out.quantized, q.codebook[0][[5, 2, 7]][None], sum_tol(torch.float32, 2))
    out.entropy_aux_loss.backward()
    assert out.entropy_aux_loss > 0 and q.codebook.grad[0, [5, 2, 7]].abs().sum() > 0
    assert q.codebook.grad[0, 0].abs().sum() == 0  # an unused code gets no gradient: it can die


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (8, 6, 5), (3, 2)])
def test_fsq_indices_are_a_bijection_onto_the_codebook(levels):
    q = FSQ(levels=levels)
    assert q.codebook_size == math.prod(levels)
    # One point per code, in the bounded space, then pulled back through tanh.
    grid = torch.tensor(list(itertools.product(*[range(n) for n in levels])), dtype=torch.float32)
    half = torch.tensor([n // 2 for n in levels])
    offset = torch.tensor([0.5 if n % 2 == 0 else 0.0 for n in levels])
    bounded = grid - half  # the integer the channel rounds to
    half_l = (torch.tensor(levels) - 1) * (1 + q.eps) / 2
    z = torch.atanh((bounded + offset) / half_l) - torch.atanh(offset / half_l)
    out = q(z[None])
    assert sorted(out.indices[0].tolist()) == list(range(q.codebook_size))
    assert_close_rel_max(q.indices_to_codes(out.indices), out.quantized, sum_tol(torch.float32, 2))  # straight-through
    assert out.quantized.abs().max() <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_the_monitor_watches_every_kind(kind):
    model = torch.nn.Sequential()
    model.add_module("quantizer", make(kind, num_codebooks=2))
    sink = MemorySink()
    monitor = LFQMonitor(model, sink=sink, log_every=1)
    for step in range(1, 4):
        monitor.set_step(step)
        model(torch.randn(32, 2, model.quantizer.dim))
    monitor.detach()
    rows = [r for r in sink.records if r["kind"] == "quantizer" and r["mode"] == "train"]
    assert {(r["step"], r["codebook"]) for r in rows} == {(s, c) for s in range(1, 4) for c in range(2)}
    assert all(1 <= r["codes_used"] <= r["codebook_size"] for r in rows)
    assert all(math.isfinite(r["commitment"]) for r in rows)
    assert isinstance(model.quantizer, LFQ) == (kind in ("lfq", "bsq"))


def test_fsq_nan_input_keeps_indices_valid_and_output_nan():
    fsq = FSQ(dim=3, levels=(8, 5, 5)).train()
    x = torch.randn(2, 4, 3)
    x[0, 1, 2] = float("nan")
    out = fsq(x)
    assert out.indices.min() >= 0 and out.indices.max() < 8 * 5 * 5
    assert torch.isnan(out.quantized[0, 1]).any()  # the trainer's NaN check still fires


@pytest.mark.parametrize("init", ["random_sample", "kmeans"])
def test_vq_initialises_from_the_first_training_batch(init):
    torch.manual_seed(0)
    centres = torch.randn(4, 3) * 5
    x = (centres[torch.randint(4, (256,))] + 0.05 * torch.randn(256, 3))[None]  # (1, 256 tokens, 3)
    q = VectorQuantizer(codebook_size=4, code_dim=3, init=init)
    q.eval()
    q(x)
    assert not q.initialised  # eval passes never initialise
    q.train()
    q(x)
    assert q.initialised
    tokens = x[0]
    nearest = torch.cdist(q.codebook[0], tokens).min(-1).values
    if init == "random_sample":
        assert torch.all(nearest == 0)  # every code is a token of the batch
    else:  # k-means refines the same random start: a lower quantization error than the start
        torch.manual_seed(0)
        start = VectorQuantizer(codebook_size=4, code_dim=3, init="random_sample")
        torch.manual_seed(1)
        start(x)
        torch.manual_seed(1)
        q2 = VectorQuantizer(codebook_size=4, code_dim=3, init="kmeans")
        torch.manual_seed(1)
        q2(x)

        def error(codes):
            return torch.cdist(tokens, codes).min(-1).values.pow(2).mean()

        assert error(q2.codebook[0]) < error(start.codebook[0])
    state = q.state_dict()
    fresh = VectorQuantizer(codebook_size=4, code_dim=3, init=init)
    fresh.load_state_dict(state)
    assert fresh.initialised and torch.equal(fresh.codebook, q.codebook)


def test_vq_replaces_dead_codes_with_batch_tokens():
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=16, code_dim=2, dead_code_threshold=1.0)
    x = torch.randn(1, 512, 2) + 10  # far from the U(-1/K, 1/K) codes: the nearest one takes every token
    used = []
    for _ in range(5):
        out = q(x)
        out.entropy_aux_loss.backward()  # replacing codes in place must not break autograd
        used.append(len(out.indices.unique()))
    assert used[0] == 1 and used[-1] >= 8
    assert q.usage_ema.min() > 0
    plain = VectorQuantizer(codebook_size=16, code_dim=2)
    assert len(plain(x).indices.unique()) <= 2  # without replacement it stays collapsed


def test_vq_options_train_and_resume(tmp_path):
    from exp_helpers import Kill, kill_at, read_rows, run, smoke_config, without_wall_time

    config = smoke_config("quantizer.kind=vq", "quantizer.vq_init=kmeans", "quantizer.vq_dead_code_threshold=0.5")
    reference = run(config, tmp_path / "ref")
    assert reference["status"] == "done"

    with pytest.raises(Kill):
        run(config, tmp_path / "resumed", on_step=kill_at(15))
    assert without_wall_time(run(config, tmp_path / "resumed")) == without_wall_time(reference)
    assert read_rows(tmp_path / "resumed" / "metrics.jsonl") == read_rows(tmp_path / "ref" / "metrics.jsonl")


def test_bsq_is_lfq_on_the_sphere_and_trains(tmp_path):
    from exp_helpers import run, smoke_config

    q = make("bsq", size=256)
    assert isinstance(q, LFQ) and q.spherical and not make("lfq").spherical
    out = q(torch.randn(3, 7, q.dim) * 5)
    # codes +-1/sqrt(d): unit norm, a float32 sum of d = 8 squares (after a straight-through rounding)
    assert_close_rel_max(out.quantized.norm(dim=-1), torch.ones(3, 7), sum_tol(torch.float32, 8))
    summary = run(smoke_config("quantizer.kind=bsq", "quantizer.entropy_mode=exact"), tmp_path)
    assert summary["status"] == "done" and summary["final_codes_used"] >= 1
