"""results/README.md quotes the committed CSVs of results/recipe: every table of the images task is there,
with one row per CSV row and every number as the CSV has it, to the digits printed.

A table lost in an edit, a row left over from an earlier run or a number not updated after a merge fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "results" / "README.md"
RECIPE = ROOT / "results" / "recipe"

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _tables(text: str) -> dict[str, list[list[str]]]:
    """Markdown tables by their header line (cells stripped of bold), rows without the separator."""
    tables: dict[str, list[list[str]]] = {}
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            rows = [[cell.strip().replace("**", "") for cell in row.strip().strip("|").split("|")] for row in block]
            tables[" | ".join(rows[0])] = rows[2:]
            block = []
    return tables


def _numbers(cell: str) -> list[tuple[float, int]]:
    """The numbers of a cell with their printed decimals: '95.8 ± 1.8' -> [(95.8, 1), (1.8, 1)]."""
    found = []
    for token in NUMBER.findall(cell):
        plain = token.replace(",", "")
        found.append((float(plain), len(plain.split(".")[1]) if "." in plain else 0))
    return found


def _agrees(printed: tuple[float, int], value: float) -> bool:
    number, decimals = printed
    return abs(number - value) <= 0.5 * 10.0 ** -decimals * (1 + 1e-9) + 1e-12


def _check(cell: str, values: list[float], where: str) -> None:
    printed = _numbers(cell)
    assert len(printed) == len(values), f"{where}: '{cell}' should print {len(values)} number(s)"
    for got, want in zip(printed, values, strict=True):
        assert _agrees(got, want), f"{where}: '{cell}' prints {got[0]}, the CSV has {want:.6g}"


def _table(header_start: str) -> list[list[str]]:
    matches = [rows for header, rows in _tables(README.read_text()).items() if header.startswith(header_start)]
    assert len(matches) == 1, f"results/README.md should hold one table headed '{header_start} ...'"
    return matches[0]


def _codes(cell: str) -> int:
    match = re.fullmatch(r"2\^(\d+)", cell)
    assert match, f"'{cell}' is not a codebook size like 2^10"
    return 2 ** int(match.group(1))


def _usage_psnr(row: pd.Series) -> list[float]:
    return [100 * row["final_val_usage_fraction_mean"], 100 * row["final_val_usage_fraction_std"],
            row["final_val_psnr_mean"], row["final_val_psnr_std"]]


def _check_seeds_and_metrics(cells: list[str], row: pd.Series, where: str, *, ssim_std: bool) -> None:
    """The (seeds, usage, PSNR, SSIM, perplexity) cells of a table row against its CSV row."""
    seeds, usage, psnr, ssim, perplexity = cells
    assert int(seeds) == row["n_seeds"], f"{where}: {seeds} seeds, the CSV {row['n_seeds']}"
    _check(usage, _usage_psnr(row)[:2], where)
    _check(psnr, _usage_psnr(row)[2:], where)
    _check(ssim, [row["final_val_ssim_mean"], *([row["final_val_ssim_std"]] if ssim_std else [])], where)
    _check(perplexity, [row["final_val_perplexity_mean"]], where)


def test_the_regime_table_is_the_committed_table_csv() -> None:
    csv = pd.read_csv(RECIPE / "table.csv")
    rows = _table("codes | inv. temp. | entropy weight | gamma | seeds")
    assert len(rows) == len(csv), f"the regime table has {len(rows)} rows, table.csv {len(csv)}"
    for cells in rows:
        codes, tau, schedule, gamma = cells[:4]
        key = (_codes(codes), _numbers(tau)[0][0], {"constant": "constant", "3 -> 1": "linear"}[schedule],
               float(gamma))
        match = csv[(csv["quantizer.codebook_size"] == key[0]) & (csv["quantizer.inv_temperature"] == key[1])
                    & (csv["anneal.entropy"] == key[2]) & (csv["quantizer.diversity_gamma"] == key[3])]
        assert len(match) == 1, f"no table.csv row for {key}"
        _check_seeds_and_metrics(cells[4:], match.iloc[0], f"regime table, {cells[:4]}", ssim_std=True)


def test_the_claim_1_table_is_the_committed_quantizers_table() -> None:
    csv = pd.read_csv(RECIPE / "quantizers_table.csv")
    rows = _table("series | 2^10: val usage (%) / PSNR (dB) (seeds)")
    assert sorted(r[0] for r in rows) == sorted(set(csv["series"])), "claim 1's series differ from the CSV's"
    for series, *cells in rows:
        for codes, cell in zip((1024, 16384), cells, strict=True):
            match = csv[(csv["series"] == series) & (csv["quantizer.codebook_size"] == codes)]
            if cell == "-":  # not run
                assert match.empty, f"claim 1 says {series} was not run at {codes} codes; the CSV has it"
                continue
            assert len(match) == 1, f"no quantizers_table.csv row for {series} at {codes} codes"
            row = match.iloc[0]
            _check(cell, [*_usage_psnr(row), row["n_seeds"]], f"claim 1, {series}, {codes} codes")


@pytest.mark.parametrize(("csv_name", "parameter"), [("entropy_weight_table.csv", "entropy_loss_weight"),
                                                      ("gamma_frac_table.csv", "diversity_gamma")])
def test_the_claim_2_and_3_tables_are_the_committed_csvs(csv_name: str, parameter: str) -> None:
    csv = pd.read_csv(RECIPE / csv_name)
    rows = _table(f"series | {parameter} | seeds")
    assert len(rows) == len(csv), f"the {parameter} table has {len(rows)} rows, {csv_name} {len(csv)}"
    for series, value, *cells in rows:
        match = csv[(csv["series"] == series) & (csv[f"quantizer.{parameter}"] == float(value))]
        assert len(match) == 1, f"no {csv_name} row for {series}, {parameter} {value}"
        _check_seeds_and_metrics(cells, match.iloc[0], f"{csv_name}, {series}, {value}", ssim_std=False)


def test_the_claim_5_table_is_the_committed_adversarial_table() -> None:
    csv = pd.read_csv(RECIPE / "adversarial_table.csv")
    rows = _table("codes | adversarial weight | seeds")
    assert len(rows) == len(csv), f"the claim 5 table has {len(rows)} rows, adversarial_table.csv {len(csv)}"
    for codes, weight, *cells in rows:
        match = csv[(csv["series"].str.endswith(f"{codes} codes")) & (csv["loss.adversarial_weight"] == float(weight))]
        assert len(match) == 1, f"no adversarial_table.csv row for {codes} codes, adversarial weight {weight}"
        _check_seeds_and_metrics(cells, match.iloc[0], f"claim 5, {codes}, {weight}", ssim_std=False)


def test_the_moonshot_table_is_the_committed_summary() -> None:
    summary = pd.read_csv(ROOT / "results" / "moonshot" / "summary.csv")
    rows = _table("2^14 codes, seeds 3-5 | steps")
    sweeps = {"the recipe (gamma 1)": "recipe_new_seeds_images", "gamma 2": "moonshot_confirm_images"}
    assert sorted(r[0] for r in rows) == sorted(sweeps)
    for name, steps, usage, psnr, ssim in rows:
        runs = summary[summary["sweep"] == sweeps[name]]
        assert sorted(runs["seed"]) == [3, 4, 5] and set(runs["schedule.steps"]) == {int(steps.replace(",", ""))}
        seeds = runs.sort_values("seed")
        u = 100 * seeds["final_val_usage_fraction"]
        _check(usage, [u.mean(), u.std(), *u.tolist()] if "(" in usage else [u.mean(), u.std()], f"moonshot, {name}")
        _check(psnr, [seeds["final_val_psnr"].mean(), seeds["final_val_psnr"].std()], f"moonshot, {name}")
        _check(ssim, [seeds["final_val_ssim"].mean()], f"moonshot, {name}")


def test_the_claim_4_images_table_is_the_committed_summary() -> None:
    summary = pd.read_csv(ROOT / "results" / "ablations" / "clamp_train_images" / "summary.csv")
    rows = _table("entropy mode | codes used per batch | batch entropy (nats) | val PSNR (dB)")
    modes = {"exact": "exact", "clamped (reference's numbers)": "clamped"}
    assert sorted(r[0] for r in rows) == sorted(modes) and set(summary["quantizer.entropy_mode"]) == set(modes.values())
    for mode, *cells in rows:
        runs = summary[summary["quantizer.entropy_mode"] == modes[mode]]
        for cell, column in zip(cells, ("final_codes_used", "final_batch_entropy", "final_val_psnr"), strict=True):
            _check(cell, [runs[column].mean(), runs[column].std()], f"claim 4 images, {mode}, {column}")


def test_the_claim_4_patches_table_is_the_committed_summary() -> None:
    summary = pd.read_csv(ROOT / "results" / "ablations" / "clamp_train" / "summary.csv").sort_values("seed")
    rows = _table("codes | exact | clamped | val PSNR (dB), exact / clamped")
    assert sorted(_codes(r[0]) for r in rows) == sorted(set(summary["quantizer.codebook_size"]))
    for codes, exact, clamped, psnr in rows:
        runs = summary[summary["quantizer.codebook_size"] == _codes(codes)]
        by_mode = {mode: runs[runs["quantizer.entropy_mode"] == mode] for mode in ("exact", "clamped")}
        _check(exact, list(by_mode["exact"]["final_codes_used"]), f"claim 4 patches, {codes}, exact")
        _check(clamped, list(by_mode["clamped"]["final_codes_used"]), f"claim 4 patches, {codes}, clamped")
        _check(psnr, [by_mode[m]["final_val_psnr"].mean() for m in ("exact", "clamped")], f"claim 4 patches, {codes}")


def test_the_video_table_is_the_committed_video_table() -> None:
    csv = pd.read_csv(ROOT / "results" / "video" / "table.csv")
    rows = _table("quantizer | codes | seeds (video / images)")
    video = csv[csv["task"] == "video"]
    assert len(rows) == len(video), f"the video table has {len(rows)} rows, results/video/table.csv {len(video)}"
    for quantizer, codes, seeds, usage, psnr, frames in rows:
        where = f"video table, {quantizer}, {codes}"
        parts = csv[(csv["quantizer"] == quantizer) & (csv["quantizer.codebook_size"] == _codes(codes))]
        row = parts[parts["task"] == "video"].iloc[0]
        images = parts[parts["task"] == "images"]
        image = images.iloc[0] if len(images) else None
        _check(seeds, [row["n_seeds"], *([image["n_seeds"]] if image is not None else [])], where)
        _check(usage, _usage_psnr(row)[:2] + (_usage_psnr(image)[:2] if image is not None else []), where)
        _check(psnr, _usage_psnr(row)[2:] + (_usage_psnr(image)[2:] if image is not None else []), where)
        _check(frames, [row["val_usage_of_max_first_frame_mean"], row["val_usage_of_max_first_frame_std"],
                        row["val_usage_of_max_later_frames_mean"], row["val_usage_of_max_later_frames_std"]], where)


def test_the_generation_table_is_the_committed_generation_table() -> None:
    csv = pd.read_csv(ROOT / "results" / "generation" / "table.csv")
    rows = _table("series | codes | seeds | tokenizer val usage (%)")
    assert len(rows) == len(csv), f"the generation table has {len(rows)} rows, results/generation/table.csv {len(csv)}"
    for label, codes, seeds, usage, psnr, bits, unigram, samples, kl in rows:
        where = f"generation table, {label}, {codes}"
        series, _, head = label.removesuffix(" head)").partition(" (")  # "LFQ recipe (full head)": the full head
        match = csv[(csv["series"] == series) & (csv["quantizer.codebook_size"] == _codes(codes))
                    & (csv["model.head"] == (head or "factorized"))]
        assert len(match) == 1, f"no results/generation/table.csv row for {series} at {codes}"
        row = match.iloc[0]
        stds = row["n_seeds"] > 1
        _check(seeds, [row["n_seeds"]], where)
        for cell, column, scale in ((usage, "final_val_usage_fraction", 100), (psnr, "final_val_psnr", 1),
                                    (bits, "final_val_bits_per_image", 1), (unigram, "unigram_bits_per_image", 1),
                                    (samples, "final_sample_usage_fraction", 100), (kl, "final_sample_kl", 1)):
            _check(cell, [scale * row[f"{column}_mean"], *([scale * row[f"{column}_std"]] if stds else [])], where)
