"""experiments.clamp_probe: the reference's clamped batch entropy, measured at sizes the dense
kernel cannot reach, is the dense kernel's own term; and the probe finds the clamp where the
arithmetic says it must be."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from tolerances import assert_close_rel_max, softmax_tol, sum_tol

from analysis.report import main as report
from experiments import clamp_probe
from lfq import LFQ
from lfq.entropy import EntropyInputs, exact_entropy, reference_entropy


@pytest.mark.parametrize("inv_temperature", [1.0, 100.0])
def test_reference_term_and_gradient_equal_the_dense_kernel_where_the_clamp_binds(inv_temperature):
    # 2^17 codes: the uniform share 7.6e-6 is under 1e-5, so at inv_temperature 1 the clamp
    # holds part of the mass (0.11 with these 48 tokens, whose dense 48 x 2^17 softmax is small).
    bits, tokens = 17, 48
    z = torch.randn(tokens, 1, bits, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    codebook = LFQ(codebook_size=2**bits, dim=bits).codebook.to(torch.float64)

    probe_z = z.clone().requires_grad_(True)
    exact, reference, avg = clamp_probe.batch_entropies(probe_z, inv_temperature)
    (probe_grad,) = torch.autograd.grad(reference, probe_z)

    dense_z = z.clone().requires_grad_(True)
    dense = reference_entropy(EntropyInputs(dense_z, inv_temperature, 1.0, codebook)).batch_entropy
    (dense_grad,) = torch.autograd.grad(dense, dense_z)
    # float64 softmaxes of logits up to 2 tau |z|_1 over 2^17 codes, averaged over the tokens:
    # entropies in units of 1 nat, the gradient relative to its largest element
    tol = (softmax_tol(torch.float64, 2 * inv_temperature * z.abs().sum(-1).max().item(), 2**bits)
           + sum_tol(torch.float64, tokens))
    assert_close_rel_max(reference, dense, tol, floor=1.0, what="reference batch entropy")
    # d/dz_n of the batch entropy: (1/N) sum_k (log a_k + 1) p_nk 2 tau (c_k - E_p c), terms up to
    # 2 tau (ln K + 1) / N each, which cancel to ~0.02 at tau = 1: relative to the terms
    terms = 2 * inv_temperature * (bits * math.log(2) + 1) / tokens
    assert_close_rel_max(probe_grad, dense_grad, tol, floor=terms, what="gradient")

    exact_kernel = exact_entropy(EntropyInputs(z, inv_temperature, 1.0, codebook)).batch_entropy
    assert_close_rel_max(exact, exact_kernel, tol, floor=1.0, what="exact batch entropy")
    if inv_temperature == 1.0:  # the case is one where the clamp matters, or it tests nothing
        assert avg[avg < 1e-5].sum() > 0.1
        assert exact.item() - reference.item() > 0.1


def test_hard_assignments_clamp_the_codes_holding_few_tokens():
    # Near-hard assignments of N tokens to 2^10 codes: counts are Poisson(N / 2^10 = 2). With a
    # clamp at 2.5 / N the codes holding <= 2 tokens are clamped: mass e^-2 (1 + 2) = 0.406.
    tokens = 2048
    eps = 2.5 / tokens
    rows = [clamp_probe.probe_case(10, 100.0, tokens, seed=s, eps=eps) for s in range(3)]
    mass = sum(r["clamped_mass"] for r in rows) / len(rows)
    # sampling, not rounding: per seed the mass has s.d. sqrt(1024 x 0.69) / 2048 = 0.013, the
    # mean of 3 seeds 0.0075; 0.04 is about 5 s.d.
    assert mass == pytest.approx(3 * math.exp(-2), abs=0.04)
    assert all(r["grad_cosine"] < 0.9 and r["entropy_gap"] > 0.1 for r in rows)
    # The reference's own 1e-5 is far below one token's share 1/2048: nothing in use is clamped.
    plain = clamp_probe.probe_case(10, 100.0, tokens, seed=0)
    assert plain["clamped_mass"] < 1e-4
    assert plain["grad_cosine"] > 0.9999
    assert plain["entropy_gap"] == pytest.approx(0.0, abs=1e-4)  # the clamp's effect, bounded by the mass above


def test_bad_grid_is_refused_before_any_case_runs():
    logged: list[str] = []
    with pytest.raises(ValueError, match=r"bits must be ints in 1\.\.24, got 30"):
        clamp_probe.run_grid([8, 30], [100.0], [256], log=logged.append)
    assert logged == []
    with pytest.raises(ValueError, match="tokens must be an int >= 1, got 0"):
        clamp_probe.probe_case(8, 100.0, 0)
    with pytest.raises(ValueError, match="eps must be in"):
        clamp_probe.probe_case(8, 100.0, 16, eps=0.0)


def test_cli_writes_the_table_command_and_figure(tmp_path, capsys):
    out = tmp_path / "probe"
    assert clamp_probe.main(["--quick", "--out", str(out)]) == 0
    table = pd.read_csv(out / "probe.csv")
    grid = clamp_probe.QUICK_GRID
    assert list(table.columns) == list(clamp_probe.COLUMNS)
    assert len(table) == len(grid["bits"]) * len(grid["inv_temperature"]) * len(grid["tokens"]) * 3
    assert sorted(table["seed"].unique()) == [0, 1, 2]  # the default seeds, each its own inputs
    assert table.groupby(["bits", "inv_temperature", "tokens"])["batch_entropy_exact"].nunique().eq(3).all()
    assert set(table["codebook_size"]) == {2**b for b in grid["bits"]}
    assert table["entropy_gap"].min() >= -1e-5  # the clamp can only lower the entropy
    assert (table["codes_in_use"] <= table[["codebook_size", "tokens"]].min(axis=1)).all()
    assert "python -m experiments.clamp_probe --quick --out" in (out / "command.txt").read_text()
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temp files
    printed = capsys.readouterr().out
    assert printed.count("[clamp_probe]") == len(table)
    assert f"python -m analysis.report --redraw --out {out}" in printed
    # the figure is drawn by analysis from the CSV alone (experiments never imports analysis)
    assert report(["--redraw", "--out", str(out)]) == 0
    assert (out / "claim4_probe.png").stat().st_size > 10_000
