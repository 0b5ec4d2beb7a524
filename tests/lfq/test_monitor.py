"""LFQMonitor: code-usage statistics against hand-computed values, hooks, sinks, resume.

Most tests drive a real LFQ without projections (dim = bits per code) with crafted inputs:
a token whose channel j is +1 gets bit j set, so the test chooses every index.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import namedtuple

import pandas as pd
import pytest
import torch
from tolerances import softmax_tol, sum_tol
from torch import nn

from lfq import LFQ, JsonlSink, LFQMonitor, MemorySink
from lfq.monitor import ROOT_LAYER
from lfq.records import RECORD_COLUMNS


def tokens_for(codes: list[int] | list[list[int]], bits: int) -> torch.Tensor:
    """(1, n, c * bits) LFQ input whose indices are ``codes`` (n,) or (n, c); MSB first, as LFQ."""
    table = torch.tensor(codes)
    if table.ndim == 1:
        table = table[:, None]
    shifts = torch.arange(bits - 1, -1, -1)
    signs = ((table[..., None] >> shifts) & 1).float() * 2 - 1  # (n, c, bits)
    return signs.reshape(1, table.shape[0], -1)


def rows(sink: MemorySink, **where) -> list[dict]:
    return [r for r in sink.records if all(r[k] == v for k, v in where.items())]


def one(sink: MemorySink, **where) -> dict:
    found = rows(sink, **where)
    assert len(found) == 1, f"expected one record for {where}, got {len(found)}"
    return found[0]


class TwoQuantizers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"quantizer": LFQ(dim=3, codebook_size=8)})
        self.decoder = nn.Sequential(nn.Identity(), LFQ(dim=2, codebook_size=4))

    def forward(self, x3: torch.Tensor, x2: torch.Tensor):
        return self.encoder["quantizer"](x3), self.decoder[1](x2)


FakeStats = namedtuple("FakeStats", ["commitment"])
FakeReturn = namedtuple("FakeReturn", ["quantized", "indices"])


class FakeVQ(nn.Module):
    """Duck-typed quantizer: indices are the argmax of the input; reports only commitment."""

    def __init__(self, codebook_size: int = 5) -> None:
        super().__init__()
        self.codebook_size, self.num_codebooks, self.keep_num_codebooks_dim = codebook_size, 1, False
        self.last_stats = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        self.last_stats = FakeStats(torch.tensor([0.5])) if self.training else None
        return FakeReturn(x, x.argmax(-1))


def one_hot_tokens(codes: list[int], size: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor([codes]), size).float()


def test_usage_counts_perplexity_and_bit_balance_by_hand():
    lfq, sink = LFQ(dim=3), MemorySink()
    with LFQMonitor(lfq, sink, log_every=1, alarms=False) as mon:  # alarms: tests/lfq/test_alarms.py
        lfq(tokens_for([0, 1, 2, 3, 0, 1, 2, 3], 3))  # uniform over 4 codes
        lfq(tokens_for([0, 0, 0, 1], 3))
        lfq(tokens_for([0, 1, 2, 3, 4, 5, 6, 7], 3))
        assert mon.histogram(ROOT_LAYER).tolist() == [[6, 4, 3, 3, 1, 1, 1, 1]]
    first, second, third = (one(sink, step=s) for s in range(3))
    assert (first["layer"], first["mode"], first["kind"], first["codebook_size"]) == (ROOT_LAYER, "train", "quantizer", 8)
    assert first["codes_used"] == 4 and first["tokens"] == 8
    # perplexity = exp(log T - sum n log n / T), the sum in float32 over the 8 codes: its terms
    # are up to log T = log 8 in units of the entropy. bit_balance_mad: exact counts, a few float64
    # operations, so approx's default (1e-6 relative, ~4e9 float64 eps) is ample.
    hist_tol = sum_tol(torch.float32, 8, math.log(8))
    assert first["perplexity"] == pytest.approx(4.0, rel=hist_tol)
    # Bits (MSB first) of 0..3 repeated: bit 2 never set, bits 1 and 0 set half the time.
    assert first["bit_balance_mad"] == pytest.approx((0.5 + 0 + 0) / 3)
    assert second["codes_used"] == 2
    assert second["perplexity"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=hist_tol)
    # 0,0,0,1: the two high bits never set, the low bit set a quarter of the time.
    assert second["bit_balance_mad"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    assert third["perplexity"] == pytest.approx(8.0, rel=hist_tol) and third["bit_balance_mad"] == pytest.approx(0.0)
    assert all(math.isfinite(r[k]) for r in sink.records for k in ("per_sample_entropy", "batch_entropy", "commitment", "aux_loss"))


def test_usage_window_and_dead_codes_by_hand():
    lfq, sink = LFQ(dim=2), MemorySink()
    codes_per_step = {10: [0], 11: [1], 12: [0], 13: [0], 14: [0], 15: [2, 3]}
    with LFQMonitor(lfq, sink, log_every=100, usage_window=2, dead_after=3, alarms=False) as mon:
        for step, codes in codes_per_step.items():
            mon.set_step(step)
            lfq(tokens_for(codes, 2))
    got = {r["step"]: (r["usage_fraction"], r["dead_codes"]) for r in sink.records}
    # Window = steps (s-2, s]. Dead = unused in (s-3, s]; never-used codes count as last used at
    # step 9 (first monitored step 10, minus 1), so they turn dead at step 12.
    assert got == {
        10: (1 / 4, 0),  # {0}
        11: (2 / 4, 0),  # {0, 1}
        12: (2 / 4, 2),  # window {1, 0}; codes 2, 3 unused in steps 10..12
        13: (1 / 4, 2),  # window {0}; code 1 last used at 11 > 13 - 3
        14: (1 / 4, 3),  # code 1 unused in 12..14
        15: (3 / 4, 1),  # window {0 at 14, 2, 3}; code 1 still dead, 2 and 3 revived
    }


def test_two_layers_are_told_apart_by_module_path():
    model, sink = TwoQuantizers(), MemorySink()
    with LFQMonitor(model, sink) as mon:
        assert mon.layers == ["encoder.quantizer", "decoder.1"]
        model(tokens_for([5, 5, 6], 3), tokens_for([1, 2], 2))
    enc, dec = one(sink, layer="encoder.quantizer"), one(sink, layer="decoder.1")
    assert (enc["codebook_size"], enc["codes_used"], enc["tokens"]) == (8, 2, 3)
    assert (dec["codebook_size"], dec["codes_used"], dec["tokens"]) == (4, 2, 2)


def test_detach_removes_every_hook():
    model = TwoQuantizers()
    hook_dicts = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")

    def hooks() -> int:
        return sum(len(getattr(m, name, {})) for m in model.modules() for name in hook_dicts)

    sink = MemorySink()
    mon = LFQMonitor(model, sink)
    # 2 forward hooks (+ their with_kwargs flags), 2 on the layers' project_in (the latent), the model's pre-hook
    assert hooks() == 3 + 2 + 2
    model(tokens_for([1], 3), tokens_for([1], 2))
    mon.detach()
    assert hooks() == 0
    assert len(sink.records) == 2  # detach flushed
    model(tokens_for([1], 3), tokens_for([1], 2))
    mon.detach()  # idempotent
    assert len(sink.records) == 2


def test_eval_mode_records_usage_with_nan_losses():
    lfq, sink = LFQ(dim=2).eval(), MemorySink()
    with LFQMonitor(lfq, sink):
        lfq(tokens_for([0, 3, 3], 2))
    record = one(sink)
    assert record["mode"] == "eval" and record["codes_used"] == 2 and record["tokens"] == 3
    assert all(math.isnan(record[k]) for k in ("per_sample_entropy", "batch_entropy", "commitment", "aux_loss"))


def test_train_and_eval_in_one_step_are_separate_records():
    lfq, sink = LFQ(dim=2), MemorySink()
    with LFQMonitor(lfq, sink, dead_after=1, alarms=False) as mon:
        mon.set_step(0)
        lfq(tokens_for([0], 2))
        lfq.eval()
        with torch.inference_mode():  # accumulators must stay usable after inference mode
            lfq(tokens_for([1, 2], 2))
        lfq.train()
        mon.set_step(1)
        lfq(tokens_for([3], 2))
    train0, eval0 = one(sink, step=0, mode="train"), one(sink, step=0, mode="eval")
    assert (train0["codes_used"], eval0["codes_used"]) == (1, 2)
    # The eval pass does not revive codes 1 and 2 for the training stream.
    assert one(sink, step=1, mode="train")["dead_codes"] == 3


def test_loss_breakdown_or_not_gives_the_same_records():
    x = torch.randn(2, 7, 4, generator=torch.Generator().manual_seed(0))
    results = []
    for breakdown in (False, True):
        lfq, sink = LFQ(dim=4), MemorySink()
        with LFQMonitor(lfq, sink):
            lfq(x, return_loss_breakdown=breakdown)
        results.append(one(sink))
        stats = lfq.last_stats
        # the float32 value the quantizer reported, summed over one pass: a rounding or two
        assert results[-1]["commitment"] == pytest.approx(stats.commitment.item(), rel=sum_tol(torch.float32, 2))
        assert results[-1]["aux_loss"] == pytest.approx(stats.aux_loss.item(), rel=sum_tol(torch.float32, 2))
    assert results[0] == results[1]


@pytest.mark.parametrize("positional", [False, True])
def test_mask_excludes_tokens(positional: bool):
    lfq, sink = LFQ(dim=2), MemorySink()
    mask = torch.tensor([[True, False, True, False]])
    with LFQMonitor(lfq, sink) as mon:
        x = tokens_for([0, 1, 2, 3], 2)
        if positional:
            lfq(x, 100.0, False, mask)
        else:
            lfq(x, mask=mask)
        assert mon.histogram(ROOT_LAYER).tolist() == [[1, 0, 1, 0]]
    record = one(sink)
    assert (record["codes_used"], record["tokens"]) == (2, 2)
    # codes 0, 2: MSB half set, LSB never (exact counts, float64: approx's default is ample)
    assert record["bit_balance_mad"] == pytest.approx((0.0 + 0.5) / 2)


def test_several_codebooks_are_reported_separately():
    lfq, sink = LFQ(dim=4, codebook_size=4, num_codebooks=2), MemorySink()
    with LFQMonitor(lfq, sink):
        lfq(tokens_for([[0, 1], [0, 2], [0, 1]], 2))
    book0, book1 = one(sink, codebook=0), one(sink, codebook=1)
    assert (book0["codes_used"], book1["codes_used"]) == (1, 2)
    hist_tol = sum_tol(torch.float32, 4, math.log(3))  # float32 sum of n log n over 4 codes, 3 tokens
    assert book0["perplexity"] == pytest.approx(1.0, rel=hist_tol)
    assert book1["perplexity"] == pytest.approx(math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))), rel=hist_tol)
    assert [book0["commitment"], book1["commitment"]] == pytest.approx(lfq.last_stats.commitment.tolist(),
                                                                       rel=sum_tol(torch.float32, 2))


def test_image_shaped_input_with_spatial_mask():
    lfq, sink = LFQ(dim=2, num_codebooks=1), MemorySink()
    tokens = tokens_for([0, 1, 2, 3, 3, 3], 2)  # (1, 6, 2) -> image (1, 2, 2, 3)
    image = tokens.reshape(1, 2, 3, 2).permute(0, 3, 1, 2)
    mask = torch.tensor([[[True, True, True], [True, False, False]]])
    with LFQMonitor(lfq, sink) as mon:
        out = lfq(image, mask=mask)
        assert out.indices.shape == (1, 2, 3)
        assert mon.histogram(ROOT_LAYER).tolist() == [[1, 1, 1, 1]]
    assert one(sink)["tokens"] == 4


def test_gradient_accumulation_sums_counts_and_averages_losses():
    lfq, sink = LFQ(dim=3), MemorySink()
    generator = torch.Generator().manual_seed(1)
    commitments = []
    with LFQMonitor(lfq, sink) as mon:
        mon.set_step(0)
        for codes in ([0, 1], [1, 2, 3]):
            lfq(tokens_for(codes, 3) * (1 + torch.rand(1, len(codes), 3, generator=generator)))
            commitments.append(lfq.last_stats.commitment.item())
    record = one(sink)
    assert (record["forward_passes"], record["tokens"], record["codes_used"]) == (2, 5, 4)
    assert record["commitment"] == pytest.approx(sum(commitments) / 2, rel=sum_tol(torch.float32, 2))  # float32, 2 passes


def test_duck_typed_quantizer_as_the_model_itself():
    vq, sink = FakeVQ(codebook_size=5), MemorySink()
    with LFQMonitor(vq, sink) as mon:
        assert mon.layers == [ROOT_LAYER]
        vq(one_hot_tokens([4, 4, 1], 5))
    record = one(sink)
    assert (record["codebook_size"], record["codes_used"]) == (5, 2)
    assert record["commitment"] == 0.5
    assert math.isnan(record["aux_loss"]) and math.isnan(record["bit_balance_mad"])


def test_flush_cadence_with_and_without_set_step():
    lfq, sink = LFQ(dim=2), MemorySink()
    mon = LFQMonitor(lfq, sink, log_every=3)
    for step in range(3):
        mon.set_step(step)
        lfq(tokens_for([step], 2))
    assert sink.records == []  # step 2 is still open
    mon.set_step(3)
    assert [r["step"] for r in sink.records] == [0, 1, 2]
    lfq(tokens_for([3], 2))
    mon.detach()
    assert [r["step"] for r in sink.records] == [0, 1, 2, 3]

    sink = MemorySink()
    with LFQMonitor(lfq, sink, log_every=3):
        for _ in range(3):
            lfq(tokens_for([0], 2))  # each training forward of the model is a step
        assert sink.records == []
        lfq(tokens_for([0], 2))
        assert [r["step"] for r in sink.records] == [0, 1, 2]


def test_jsonl_sink_round_trips_through_pandas(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lfq, memory = LFQ(dim=2), MemorySink()

    def both(records):
        memory(records)
        JsonlSink(path)(records)

    with LFQMonitor(lfq, both, log_every=2) as mon:
        for step in range(3):
            mon.set_step(step)
            lfq.train(step != 1)
            lfq(tokens_for([0, step], 2))
    assert "NaN" in path.read_text()  # the eval step's losses
    frame = pd.read_json(path, lines=True)
    assert list(frame.columns[: len(RECORD_COLUMNS)]) == list(RECORD_COLUMNS)
    expected = memory.to_frame()
    pd.testing.assert_frame_equal(frame, expected, check_dtype=False)
    assert frame.loc[frame["mode"] == "eval", "commitment"].isna().all()
    assert frame.loc[frame["mode"] == "train", "commitment"].notna().all()


def _run(steps: range, inputs: list[torch.Tensor], state=None, checkpoint_at: int | None = None):
    """Train-mode passes over ``inputs[steps]``; returns records, snapshots, monitor state."""
    lfq, sink, hist = LFQ(dim=6, codebook_size=8, num_codebooks=2), MemorySink(), MemorySink()
    mon = LFQMonitor(lfq, sink, log_every=4, usage_window=3, dead_after=2, histogram_every=3, histogram_sink=hist)
    if state is not None:
        mon.load_state_dict(state)
    saved = None
    for step in steps:
        mon.set_step(step)
        lfq(inputs[step])
        if step == checkpoint_at:
            saved = mon.state_dict()
    mon.detach(snapshot=checkpoint_at is None)  # a run stopped to be resumed takes no final snapshot
    return sink.records, hist.records, saved


def test_resume_from_state_dict_logs_identically():
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(1, 5, 6, generator=generator) for _ in range(12)]
    straight, straight_hist, _ = _run(range(12), inputs)
    before, before_hist, state = _run(range(7), inputs, checkpoint_at=6)  # mid snapshot interval
    after, after_hist, _ = _run(range(7, 12), inputs, state=torch_roundtrip(state))
    frame = pd.DataFrame.from_records
    pd.testing.assert_frame_equal(frame(before + after), frame(straight))
    assert before_hist + after_hist == straight_hist
    assert [r["step"] for r in straight_hist if r["codebook"] == 0] == [2, 5, 8, 11]
    assert straight[-1]["dead_codes"] > 0  # the state being resumed is not trivial


def torch_roundtrip(state):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_histogram_snapshots_are_sparse_counts_since_the_previous_one():
    lfq, hist = LFQ(dim=3), MemorySink()
    with LFQMonitor(lfq, MemorySink(), histogram_every=2, histogram_sink=hist) as mon:
        for step, codes in enumerate([[1, 1], [5], [2], [2, 2]]):
            mon.set_step(step)
            lfq(tokens_for(codes, 3))
        assert mon.histogram(ROOT_LAYER).tolist() == [[0, 2, 3, 0, 0, 1, 0, 0]]
    # Step 0 is the only diagnostic step (diagnostics_every = log_every = 50): its 3 x 3 pairwise
    # mutual information rides on the first snapshot only (tests/lfq/test_bit_dependence.py checks values).
    pair_mi = [(r.pop("bit_pair_mi", None), r.pop("bit_pair_mi_step", None), r.pop("batch_entropy_groups", None))
               for r in hist.records]
    assert [step for _, step, _ in pair_mi] == [0, None] and pair_mi[0][2] is not None
    assert len(pair_mi[0][0]) == 3 and all(len(row) == 3 for row in pair_mi[0][0])
    assert hist.records == [
        # codes 001, 001, 101 (MSB first): bit 0 set in 1 of 3 tokens, bit 1 never, bit 2 always
        {"step": 1, "layer": ROOT_LAYER, "codebook": 0, "codebook_size": 8, "mode": "train", "codes": [1, 5], "counts": [2, 1],
         "bit_frequencies": [1 / 3, 0.0, 1.0]},
        {"step": 3, "layer": ROOT_LAYER, "codebook": 0, "codebook_size": 8, "mode": "train", "codes": [2], "counts": [3],
         "bit_frequencies": [0.0, 1.0, 0.0]},
    ]


def test_the_readme_snippet_ends_with_a_histogram(tmp_path):
    """README: LFQMonitor(model, sink=JsonlSink("metrics.jsonl"), log_every=50), 300 steps,
    detach(). No snapshot step comes up (histogram_every=500), yet the run ends with one, beside
    the metrics (metrics.histograms.jsonl), holding every token since the start."""
    torch.manual_seed(0)
    lfq = LFQ(dim=4)
    monitor = LFQMonitor(lfq, sink=JsonlSink(tmp_path / "metrics.jsonl"), log_every=50)
    for step in range(300):
        monitor.set_step(step)
        lfq(torch.randn(1, 8, 4))
    monitor.detach()
    rows = [json.loads(line) for line in (tmp_path / "metrics.histograms.jsonl").read_text().splitlines()]
    (row,) = rows
    assert row["step"] == 299 and row["mode"] == "train" and sum(row["counts"]) == 300 * 8
    metrics = pd.read_json(tmp_path / "metrics.jsonl", lines=True)
    metrics = metrics[metrics["kind"] == "quantizer"]  # a default alarm may add kind="alarm" rows
    assert list(metrics["step"]) == list(range(300)) and "codes" not in metrics  # the metrics stay one table


def test_detach_sends_the_counts_since_the_last_snapshot_once():
    lfq, hist = LFQ(dim=3), MemorySink()
    with LFQMonitor(lfq, MemorySink(), histogram_every=2, histogram_sink=hist) as mon:
        for step, codes in enumerate([[1, 1], [5], [2]]):
            mon.set_step(step)
            lfq(tokens_for(codes, 3))
    assert [(r["step"], r["codes"], r["counts"]) for r in hist.records] == [(1, [1, 5], [2, 1]), (2, [2], [1])]
    mon.detach()  # idempotent: nothing sent twice
    assert len(hist.records) == 2
    quiet = MemorySink()  # histogram_sink=False: no snapshots, even with a JsonlSink
    with LFQMonitor(lfq, quiet, histogram_sink=False) as mon:
        lfq(tokens_for([1], 3))
    assert mon.histogram_sink is None and all("codes" not in r for r in quiet.records)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LFQMonitor(LFQ(dim=2), MemorySink(), log_every=0), "log_every must be an int >= 1"),
        (lambda: LFQMonitor(nn.Linear(2, 2), MemorySink()), "found no quantizer"),
        (lambda: LFQMonitor(LFQ(dim=2), "metrics.jsonl"), "sink must be a callable"),
        (lambda: LFQMonitor(LFQ(dim=2), MemorySink()).histogram("encoder"), "unknown layer 'encoder'"),
    ],
)
def test_bad_arguments_say_what_was_wrong(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_lfq_imports_without_pandas():
    code = "import sys, lfq; from lfq.monitor import LFQMonitor; assert 'pandas' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_step_must_not_decrease_and_mask_must_match():
    vq = FakeVQ()
    mon = LFQMonitor(vq, MemorySink())
    mon.set_step(5)
    with pytest.raises(ValueError, match="must not decrease: got 4 after 5"):
        mon.set_step(4)
    with pytest.raises(ValueError, match="one entry per token"):
        vq(one_hot_tokens([1, 2], 5), mask=torch.tensor([[True, False, True]]))
    mon.detach()


class _HostTransfers(torch.overrides.TorchFunctionMode):
    """Records every call that would make a CUDA device wait for the host (or vice versa)."""

    SYNCING = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero",
               "unique", "masked_select", "argwhere"}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in self.SYNCING:
            self.calls.append(name)
        elif name == "__getitem__" and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:] if a is not None):
            self.calls.append("bool-index")
        # `.to(device)` is not flagged: on the CPU it cannot tell a move to the host from a no-op.
        return func(*args, **kwargs)


def test_no_host_transfer_between_flushes(monkeypatch):
    """The CPU stand-in for the CUDA test below: between flushes the hooks call nothing that syncs."""
    from lfq.code_usage import CodeUsage

    transfers = _HostTransfers()

    def watched(method):
        def checked(*args, **kwargs):
            with transfers:
                return method(*args, **kwargs)

        return checked

    monkeypatch.setattr(LFQMonitor, "_observe", watched(LFQMonitor._observe))
    monkeypatch.setattr(CodeUsage, "close", watched(CodeUsage.close))
    generator = torch.Generator().manual_seed(5)
    lfq, sink = LFQ(dim=8, codebook_size=16, num_codebooks=2), MemorySink()
    with LFQMonitor(lfq, sink, log_every=100, usage_window=2, dead_after=2) as mon:
        for step in range(6):
            mon.set_step(step)
            lfq(torch.randn(2, 16, 8, generator=generator), mask=torch.rand(2, 16, generator=generator) > 0.3)
        assert sink.records == []  # nothing flushed yet
        assert transfers.calls == [], f"host transfers inside the per-step hooks: {transfers.calls}"
    assert len(sink.records) == 6 * 2  # six steps, two codebooks: flushed on exit
    # The detector itself works: a deliberate .item() inside the mode is caught.
    with transfers:
        torch.ones(1).item()
    assert transfers.calls == ["item"]


# Needs a GPU: deselected by default (pytest -m gpu runs it on a GPU machine).
@pytest.mark.gpu
def test_no_device_sync_between_flushes_on_cuda(monkeypatch):
    from lfq.code_usage import CodeUsage

    def strict(method):
        def checked(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
            try:
                return method(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return checked

    generator = torch.Generator().manual_seed(5)
    inputs = [torch.randn(2, 16, 8, generator=generator) for _ in range(7)]
    masks = [torch.rand(2, 16, generator=generator) > 0.3 for _ in range(7)]
    results = []
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # as experiments.train runs; the monitor must cope
    for device in ("cpu", "cuda"):
        if device == "cuda":
            monkeypatch.setattr(LFQMonitor, "_observe", strict(LFQMonitor._observe))
            monkeypatch.setattr(CodeUsage, "close", strict(CodeUsage.close))
        lfq, sink, hist = LFQ(dim=8, codebook_size=16, num_codebooks=2).to(device), MemorySink(), MemorySink()
        with LFQMonitor(lfq, sink, log_every=3, usage_window=2, dead_after=2, histogram_every=2,
                        histogram_sink=hist) as mon:
            for step, (x, mask) in enumerate(zip(inputs, masks, strict=True)):
                mon.set_step(step)
                lfq(x.to(device), mask=mask.to(device))
        results.append((pd.DataFrame.from_records(sink.records), hist.records))
    torch.use_deterministic_algorithms(deterministic)
    (cpu_frame, cpu_hist), (cuda_frame, cuda_hist) = results
    # Other kernels (exp, log, sums blocked otherwise) on the GPU: float32 entropies of logits
    # spanning 4 tau |z|_1 (tau = 100, codes +-1) over 2^4 codes per codebook, summed over the tokens of
    # log_every=3 passes; counts and histograms are exact.
    max_logit = 4 * 100.0 * max(x.unflatten(-1, (2, 4)).abs().sum(-1).max().item() for x in inputs)
    tol = softmax_tol(torch.float32, max_logit, 16) + sum_tol(torch.float32, 3 * inputs[0].shape[:2].numel())
    pd.testing.assert_frame_equal(cuda_frame, cpu_frame, rtol=tol)
    assert cuda_hist == cpu_hist
