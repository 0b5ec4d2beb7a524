"""Every figure the results support, as PNG and SVG, plus ``report.md`` with the summary tables.

    python -m analysis.report results/gamma_frac              # -> results/gamma_frac/report/
    python -m analysis.report results/gamma_frac --out /tmp/r

Works on a sweep that is still running: it reports what exists so far (grid figures use the
finished runs; training curves include the running ones). The report folder is built beside
its target and swapped in, so a reader never sees half a report.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis.aggregate import FRAC, GAMMA, WhereError, parameters, select
from analysis.aggregate import where as pick
from analysis.diagnostics import bit_usage_heatmap, saturation_and_usage
from analysis.glossary import definitions_section, figure_title, held_fixed_line, held_fixed_table
from analysis.jsonl_reader import LoadProblem, temp_dir_beside, write_atomic
from analysis.load import STATUS_MEANINGS, STATUSES, load_histograms, load_metrics, load_runs
from analysis.plots import (
    layers,
    rank_frequency,
    reconstruction_vs_usage,
    training_curves,
    usage_heatmap,
    usage_vs_gamma,
    with_window_ceiling,
)
from analysis.style import NoData, save_figure
from analysis.tables import grid_table as tidy_grid_table
from analysis.tables import readable_table
from common.cli import OneLineParser, fail, guarded

RUN_METRICS = (
    "final_val_usage_fraction", "final_val_usage_ceiling", "final_val_codes_used", "final_val_perplexity",
    "final_val_tokens", "final_val_tokens_per_code",
    "final_usage_fraction", "final_perplexity", "final_codes_used", "final_dead_codes",
    "final_val_mse", "final_val_psnr", "final_val_ssim", "best_val_psnr", "final_train_loss", "wall_time_s",
)
GRID_METRICS = ("final_val_usage_fraction", "final_val_usage_ceiling", "final_usage_fraction", "final_perplexity", "final_val_mse",
                "final_val_psnr", "final_val_ssim")
THROUGHPUT = ("step_time_s", "samples_per_s", "tokens_per_s", "data_wait_s", "max_memory_mb")


def usage_metric(runs: pd.DataFrame) -> str:
    """The utilization figures show: over every validation token where runs report it (what papers
    compare), else the training window's."""
    val = "final_val_usage_fraction"
    return val if val in runs and runs[val].notna().any() else "final_usage_fraction"


def throughput_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per run: the median over its logged intervals of the throughput columns of train rows."""
    if "kind" not in metrics or "step_time_s" not in metrics:
        return pd.DataFrame()
    train = metrics[metrics["kind"] == "train"]
    cols = [c for c in THROUGHPUT if c in train]
    return train.groupby("run_id")[cols].median().reset_index() if len(train) else pd.DataFrame()


@dataclass(frozen=True)
class Plot:
    name: str  # file stem
    title: str
    caption: str  # what a reader sees
    draw: Callable[[], Figure | None]
    shows: pd.DataFrame  # the runs it draws: its caption says what was held fixed in them


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        # Whole numbers (steps, code counts) in full: 4 significant digits would turn 12000 into 1.2e+04.
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table (pandas' ``to_markdown`` needs ``tabulate``)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def status_table(runs: pd.DataFrame) -> pd.DataFrame:
    counts = runs["status"].value_counts() if len(runs) else pd.Series(dtype=int)
    rows = [(s, int(counts.get(s, 0)), STATUS_MEANINGS[s]) for s in STATUSES] + [("total", len(runs), "")]
    return pd.DataFrame(rows, columns=["status", "runs", "meaning"])


ENVIRONMENT = ("env_cpu", "env_cpu_capability", "env_device", "env_gpu", "env_torch", "env_commit")


def environment_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs per environment they computed on (``env_*`` columns of ``environment.jsonl``); runs
    written before it existed count as ``not recorded``. Empty when no run recorded one."""
    if "env_attempts" not in runs or runs["env_attempts"].isna().all():
        return pd.DataFrame()
    frame = runs.reindex(columns=[*ENVIRONMENT, "env_dirty"]).astype(object)
    commit = frame["env_commit"].map(lambda c: c[:10] if isinstance(c, str) else c)
    frame["env_commit"] = commit.where(frame["env_dirty"].map(lambda d: not (d is True or (isinstance(d, str) and "True" in d))),
                                       commit.astype(str) + " + dirty")
    frame = frame[list(ENVIRONMENT)].where(frame[list(ENVIRONMENT)].notna(), "")
    frame.loc[runs["env_attempts"].isna().to_numpy(), "env_cpu"] = "not recorded"
    shown = [c for c in ENVIRONMENT if frame[c].astype(str).ne("").any()]
    return (frame.groupby(shown, sort=True).size().rename("runs").reset_index())


def grid_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per grid point: its parameters, runs done of all, and mean ± std over seeds."""
    return readable_table(tidy_grid_table(runs, GRID_METRICS, by=parameters(runs)), GRID_METRICS, mark_single=True)


CAPPED_BELOW = 4.0  # N/K under which a usage figure is said to be capped: the ceiling is then under 0.98


def capped_note(runs: pd.DataFrame) -> str:
    """``Usage capped at ...`` for the finished runs with fewer than 4 validation tokens per code
    (1 - exp(-4) = 0.98): their validation usage cannot be told from the ceiling's limit. Empty when none."""
    done = select(runs)
    if "final_val_tokens_per_code" not in done:
        return ""
    low = done[done["final_val_tokens_per_code"] < CAPPED_BELOW]
    if not len(low):
        return ""
    ratios, caps = low["final_val_tokens_per_code"], low["final_val_usage_ceiling"]
    at = f"{caps.min():.3g}" if caps.max() - caps.min() < 5e-4 else f"{caps.min():.3g}-{caps.max():.3g}"
    per = f"{ratios.min():.3g}" if ratios.max() - ratios.min() < 5e-4 else f"{ratios.min():.3g}-{ratios.max():.3g}"
    return (f"**Usage capped at {at}** in {len(low)} of {len(done)} finished runs: they counted {per} validation "
            f"tokens per code (N/K < {CAPPED_BELOW:g}), and N tokens assigned uniformly at random reach only "
            f"1 - exp(-N/K) of K codes. Their validation usage says how close they came to that ceiling, not how "
            "much of the codebook the tokenizer uses: validate on more images (`data.val_size`) to measure it.\n")


def run_table(runs: pd.DataFrame) -> pd.DataFrame:
    columns = ["run_id", "sweep", "status", "step", *parameters(runs), "seed"]
    columns += [m for m in RUN_METRICS if m in runs]
    if (runs["status"] == "started").any():  # how long each has been quiet: the files cannot say if it runs
        columns.append("last_write_age_s")
    columns.append("reason")
    table = runs[[c for c in columns if c in runs]].copy()
    if "schedule.steps" in runs and "step" in table:
        table["step"] = [f"{_fmt(s)}/{_fmt(t)}" for s, t in zip(runs["step"], runs["schedule.steps"], strict=True)]
    return table.sort_values([c for c in ("sweep", *parameters(runs), "seed") if c in table])


def plan(runs: pd.DataFrame, metrics: pd.DataFrame, hist: pd.DataFrame) -> list[Plot]:
    """The figures of a report, in reading order."""
    usage = usage_metric(runs)
    over = ("over every validation token (the histogram of all validation tokens' codes)"
            if usage == "final_val_usage_fraction" else "in the last training usage window")
    others = (("final_usage_fraction", "final_val_perplexity") if usage == "final_val_usage_fraction"
              else ("final_perplexity",))
    runs = with_window_ceiling(runs, metrics)  # the training window's ceiling, from the logged token counts
    finished = select(runs)
    # What splits the grid beyond gamma (x) and frac (lines): a third swept parameter, drawn one panel each.
    third = [p for p in parameters(finished) if p not in (GAMMA, FRAC)]
    panel = third[0] if len(third) == 1 else None
    lines = ("One line per frac_per_sample_entropy: the mean over seeds, with min-max whiskers over seeds"
             + (f"; one panel per {panel}" if panel else "") + ". Each line has its own colour, line style and "
             "marker, is drawn thinner than the one before and a few % of the axis to the side, so that lines with "
             "equal values stay visible as two. A point with one seed is marked n=1. ")
    plots = [
        Plot("usage", figure_title([usage], GAMMA, FRAC, panel),
             f"The final usage fraction (share of the codebook used {over}) of every grid point. " + lines
             + ("The dashed line is the ceiling 1 - exp(-N/K): the share of the K codes that the N validation "
                "tokens counted reach when assigned uniformly at random; usage near it is capped by the validation "
                "set's size, not by the tokenizer." if usage == "final_val_usage_fraction" else ""),
             lambda: usage_vs_gamma(runs, metrics=(usage,), strict=True), finished),
        Plot("usage_heatmap", figure_title([usage], GAMMA, FRAC, panel),
             f"Each cell is one grid point: the mean over seeds of the final usage fraction (share of the "
             f"codebook used {over}), annotated mean ± sample std and the number of seeds (n)"
             + ("; where the ceiling 1 - exp(-N/K) is under 0.98, the cell says it" if usage == "final_val_usage_fraction"
                else "") + (f"; one heatmap per {panel}, on one colour scale" if panel else "")
             + ". Brighter cells use more of the codebook.",
             lambda: usage_heatmap(runs, metric=usage, strict=True), finished),
        Plot("usage_vs_gamma", figure_title(others, GAMMA, FRAC, panel),
             ("The training window's usage (the last `monitor.usage_window` steps) as a second view, and "
              if usage == "final_val_usage_fraction" else "")
             + "the perplexity of the codes. " + lines
             + ("The dashed line in the training usage panels is the ceiling 1 - exp(-N/K) of the window's N tokens. "
                if usage == "final_val_usage_fraction" else "")
             + "The dashed line in the perplexity panels is the codebook size (every code used equally often).",
             lambda: usage_vs_gamma(runs, metrics=others, strict=True), finished),
    ]
    for layer in layers(metrics) or [None]:
        stem = "training_curves" if len(layers(metrics)) <= 1 else f"training_curves_{re.sub(r'[^A-Za-z0-9_.-]+', '_', layer or '')}"
        plots.append(Plot(
            stem, f"Training dynamics{f' of layer `{layer}`' if layer else ''}",
            "Per-sample entropy (low = confident assignments), batch entropy (high = codes spread over the "
            "codebook; its ceiling ln K is in the panel title), commitment loss and usage fraction per training "
            "step; one line per grid point (mean over seeds, min-max band), each with its own line style and "
            "markers. A panel whose values sit near 0 most of the time is drawn on a log axis, or symlog "
            "(linear below the threshold its title gives) when it reaches 0 or spans more than 4 decades. The "
            "usage panel's dashed line is the ceiling 1 - exp(-N/K) of the usage window's N tokens. Started runs (not finished) are included "
            "up to their last step.",
            lambda layer=layer: training_curves(metrics, runs, layer=layer, strict=True), runs))
    plots += [
        Plot("rank_frequency", "Code rank-frequency",
             "Per run and codebook, a thin line in its grid point's colour and its seed's line style and marker (the "
             "lower legend): its codes sorted from most to least used in the last "
             "histogram snapshot, with their share of the assignments, log-log; where a thin line ends, that "
             "run's remaining codes were unused. The bold line of each grid point is the median over its runs at "
             "each rank (a run counts 0 past its last code); the legend gives each run's number of codes used. "
             "A flat line at 1/K (dashed) is a uniformly used codebook; a steep drop means a few codes take most "
             "tokens.",
             lambda: rank_frequency(hist, runs, strict=True), runs),
        Plot("reconstruction_vs_usage", "Reconstruction against utilization",
             f"One point per finished run: final validation MSE and PSNR against final usage fraction {over}. "
             "Colour and marker are the grid point. Points that would lie on one another are spread sideways, "
             "about 2 % of the axis (a marker's width) apart, so every run shows (their x is exact at the centre of "
             "the group).",
             lambda: reconstruction_vs_usage(runs, x=usage, strict=True), finished),
    ]
    if "bit_frequency_0" in metrics and "run_id" in metrics and metrics["run_id"].nunique() == 1:
        plots += [
            Plot("bit_usage", "Per-bit usage over training",
                 "Share of tokens with each bit set, per logged step (0.5 = balanced; 0 or 1 = a dead bit).",
                 lambda: bit_usage_heatmap(metrics, strict=True), runs),
            Plot("saturation_and_usage", "Saturation and usage over training",
                 "Share of token-bits whose entropy gradient is below 1e-4 of its maximum (there the entropy "
                 "loss does nothing), with the usage fraction on the same steps.",
                 lambda: saturation_and_usage(metrics, strict=True), runs),
        ]
    return plots


def _problems_table(problems: Sequence[LoadProblem], root: Path) -> pd.DataFrame:
    rows = [(os.path.relpath(p.run_dir, root), p.file, "skipped" if p.skipped else "repaired", p.reason)
            for p in problems]
    return pd.DataFrame(rows, columns=["folder", "file", "action", "problem"])


def render(results: Path, folder: Path, *, cache: bool | str = True,
           where: Sequence[str] | Mapping[str, object] = ()) -> tuple[list[str], list[tuple[str, str]]]:
    """Write the figures and ``report.md`` of ``results`` into ``folder``; returns the figure
    names written and the (name, reason) of those skipped. ``where``: keep only the runs that
    match (:func:`analysis.aggregate.where`)."""
    runs = load_runs(results, warn=False)
    if where:
        runs = pick(runs, where)
    # corrupt runs (DONE but not whole) are listed in the tables, never drawn: their files cannot be trusted
    drawn = runs[runs["status"] != "corrupt"]
    drawn.attrs.update(runs.attrs)
    metrics = load_metrics(drawn, cache=cache, warn=False)
    hist = load_histograms(drawn, cache=cache, warn=False)
    problems = [*runs.attrs.get("problems", ()), *metrics.attrs.get("problems", ()), *hist.attrs.get("problems", ())]
    written, skipped, sections = [], [], []
    for item in plan(drawn, metrics, hist):
        try:
            fig = item.draw() if len(drawn) else None
            if fig is None:
                raise NoData("no runs")
        except NoData as err:
            skipped.append((item.name, str(err)))
            continue
        save_figure(fig, folder, item.name)
        written.append(item.name)
        sections.append(f"### {item.title}\n\n{item.caption}\n\n{held_fixed_line(item.shows)}\n\n"
                        f"![{item.title}]({item.name}.png)\n\n[SVG]({item.name}.svg)\n")
    printed: list[str] = []  # every column a table prints, for the definitions section

    def table(frame: pd.DataFrame) -> str:
        printed.extend(map(str, frame.columns))
        return markdown_table(frame) + "\n"

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"# Utilization report: {results.name}\n",
        f"Results folder `{results}`, read {stamp}"
        + (f", runs picked with {', '.join(f'`{c}`' for c in _conditions(where))}" if where else "")
        + ". Grid statistics use finished (`done`) runs; std is the sample standard deviation over seeds; "
        "whiskers and bands are min-max over seeds. Every column is defined under *Columns* at the end.\n",
        "## Runs by status\n", table(status_table(runs)),
    ]
    if len(runs):
        note = capped_note(runs)
        parts += ["## Grid points\n", *([note] if note else []), table(grid_table(runs))]
    parts += ["## Figures\n", *(sections or ["No figure could be drawn yet.\n"])]
    if skipped:
        parts += ["## Figures skipped\n", *(f"- `{name}`: {reason}" for name, reason in skipped), ""]
    if len(runs):
        parts += ["## Runs\n", table(run_table(runs))]
        speed = throughput_table(metrics)
        if len(speed):  # each run named by what it varies, as in the runs table
            keys = [c for c in ("run_id", *parameters(runs), "seed") if c in runs]
            speed = runs[keys].astype({"run_id": str}).merge(speed.astype({"run_id": str}), on="run_id")
            speed = speed.sort_values(keys[1:] or keys)
            parts += ["## Throughput\n", "Per run, the median over its logged intervals of the training rows' "
                      "step time, samples and tokens per second, time waiting for data, and peak memory.\n",
                      table(speed)]
        where = environment_table(runs)
        if len(where):
            parts += ["## Computed on\n", "Runs per machine, torch and commit they trained on (each run's "
                      "`environment.jsonl`; runs on different CPU vector ISAs or torch builds do not agree bit for "
                      "bit).\n", table(where)]
        fixed = held_fixed_table(drawn if len(drawn) else runs)
        if len(fixed):
            parts += ["## Settings held fixed\n", f"Config fields with one value in all {len(drawn) or len(runs)} "
                      "runs drawn (run id, name, seed and logging cadence left out).\n", table(fixed)]
    if problems:
        parts += ["## Run folders with problems\n", table(_problems_table(problems, results))]
    parts.append(definitions_section(printed, runs))
    text = "\n".join(parts)
    write_atomic(folder / "report.md", lambda p: p.write_text(text, encoding="utf-8"))
    if len(runs):
        write_atomic(folder / "runs.csv", lambda p: run_table(runs).to_csv(p, index=False))
    return written, skipped


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with two renames, so ``out`` is always a whole report."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _conditions(where: Sequence[str] | Mapping[str, object]) -> list[str]:
    return [f"{k}={v}" for k, v in where.items()] if isinstance(where, Mapping) else [str(c) for c in where]


def write_report(results: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                 cache: bool | str = True, where: Sequence[str] | Mapping[str, object] = (),
                 log: Callable[[str], None] | None = None) -> Path:
    """Write the report of ``results`` into ``out`` (default ``results/report``); returns ``out``.

    ``where``: only the runs matching every ``key=value`` (e.g. ``["quantizer.codebook_size=1024"]``).
    ``log``: told which figures were skipped and why (the CLI prints them). Errors (a missing or
    non-folder ``results``, an ``out`` that cannot be written, a ``where`` that matches nothing)
    are raised before anything is written."""
    results_in = Path(results)
    results = results_in.resolve()
    if not results.is_dir():
        what = "is a file, not a folder of run folders" if results.exists() else "does not exist"
        raise FileNotFoundError(f"results folder {results_in} {what}")
    out = Path(out).resolve() if out is not None else results / "report"
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder for the report")
    if out.exists() and any(out.iterdir()) and not (out / "report.md").exists():
        raise FileExistsError(f"{out} exists and is not a report folder (no report.md); refusing to replace it")
    _check_writable(out.parent)
    found = load_runs(results, warn=False)
    if not len(found):  # a report of nothing is no report: refused before any folder is made
        skipped = found.attrs.get("problems", ())
        why = f"; {len(skipped)} folder(s) with run files could not be read" if skipped else ""
        raise NoRuns(f"results folder {results_in} holds no run folders (none has a config.json){why}; give a sweep "
                     "folder such as results/demo, or train into this one first")
    if where:  # a filter that matches nothing is refused before any folder is made
        pick(found, where)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, so that a load of the results folder never mistakes it for anything.
    tmp = temp_dir_beside(out)
    try:
        _, skipped = render(results, tmp, cache=cache, where=where)
        for name, reason in skipped if log is not None else ():
            log(f"skipped {name}: {reason}")
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class NoRuns(FileNotFoundError):
    """The results folder holds no run folder: there is nothing to report."""


def _check_writable(folder: Path) -> None:
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise FileExistsError(f"cannot write the report under {folder}: {probe} is a file")
    try:  # a real try: root passes os.access() on read-only mounts
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".write-probe-"))
    except OSError as err:
        raise PermissionError(f"cannot write the report under {folder} ({err.strerror}); choose another --out") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a sweep folder (or any folder of run folders)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: RESULTS/report)")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="only the runs whose column KEY equals VALUE, e.g. quantizer.codebook_size=1024 "
                             "or name=demo (repeatable: all must hold)")
    parser.add_argument("--no-cache", action="store_true", help="parse every metrics file again")
    args = parser.parse_args(argv)
    try:
        out = write_report(args.results, args.out, cache=not args.no_cache, where=args.where,
                           log=lambda line: print(line, file=sys.stderr))
    except (FileNotFoundError, FileExistsError, PermissionError, WhereError) as err:
        return fail(err)
    figures = sorted(p.stem for p in out.glob("*.png"))
    print(f"wrote {out / 'report.md'} and {len(figures)} figure(s) as PNG and SVG: {', '.join(figures) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
