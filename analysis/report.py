"""The one command line of the analysis: a sweep's report (every figure its runs support, as PNG and
SVG, and ``report.md``), or a committed study's CSVs and figures (``--study ablations|recipe|video|generation``),
written from run folders, merged into committed CSVs (``--merge``) or redrawn from them
(``--redraw``); the figures are the entries of analysis/figures.py, and docs/experiments.md is
the reference (options, merging, the old commands).

    python -m analysis.report results/gamma_frac                          # -> results/gamma_frac/report/
    python -m analysis.report results/gamma_frac --out /tmp/r --where quantizer.codebook_size=1024
    python -m analysis.report RUNS --study ablations --out results/ablations [--merge]
    python -m analysis.report RUNS/recipe_regime RUNS/quantizers_images ... --study recipe --out results/recipe [--merge]
    python -m analysis.report RUNS/quantizers_video RUNS/vq_fair_video --study video --out results/video
    python -m analysis.report RUNS/generation_lfq_images ... RUNS/prior_generation_images ... --study generation --out results/generation
    python -m analysis.report --redraw --out results/ablations            # figures from the committed CSVs
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from analysis.aggregate import WhereError, parameters, select
from analysis.aggregate import where as pick
from analysis.column_names import STEPS
from analysis.figures import ABLATIONS, GENERATION, RECIPE, STUDIES, SWEEP, VIDEO, planned, sweep_data
from analysis.glossary import definitions_section, held_fixed_line, held_fixed_table
from analysis.jsonl_reader import LoadProblem, temp_dir_beside, write_atomic
from analysis.load import (
    STATUS_MEANINGS,
    STATUSES,
    load_bit_pair_mi,
    load_histograms,
    load_metrics,
    load_runs,
)
from analysis.merge import WouldLoseRuns
from analysis.studies import (
    redraw_ablations,
    redraw_generation,
    redraw_recipe,
    redraw_video,
    study_of,
    write_ablations,
    write_generation,
    write_recipe,
    write_video,
)
from analysis.style import NoData, save_figure
from analysis.tables import grid_table as tidy_grid_table
from analysis.tables import readable_table
from common.cli import OneLineParser, fail, guarded

RUN_METRICS = (
    "final_val_usage_fraction", "final_val_usage_ceiling", "final_val_codes_used", "final_val_perplexity",
    "final_val_tokens", "final_val_tokens_per_code",
    "final_val_usage_fraction_first_frame", "final_val_usage_fraction_later_frames",  # video runs only
    "final_usage_fraction", "final_perplexity", "final_codes_used", "final_dead_codes",
    "final_val_mse", "final_val_psnr", "final_val_ssim", "best_val_psnr", "final_train_loss", "wall_time_s",
)
GRID_METRICS = ("final_val_usage_fraction", "final_val_usage_ceiling", "final_usage_fraction", "final_perplexity", "final_val_mse",
                "final_val_psnr", "final_val_ssim")
THROUGHPUT = ("step_time_s", "samples_per_s", "tokens_per_s", "data_wait_s", "max_memory_mb")


def throughput_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per run: the median over its logged intervals of the throughput columns of train rows."""
    if "kind" not in metrics or "step_time_s" not in metrics:
        return pd.DataFrame()
    train = metrics[metrics["kind"] == "train"]
    cols = [c for c in THROUGHPUT if c in train]
    return train.groupby("run_id")[cols].median().reset_index() if len(train) else pd.DataFrame()


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
    columns += ["alarm_count", "reason"]  # the monitor's collapse alarms (summary.json), when a run had any
    table = runs[[c for c in columns if c in runs]].copy()
    if STEPS in runs and "step" in table:
        table["step"] = [f"{_fmt(s)}/{_fmt(t)}" for s, t in zip(runs["step"], runs[STEPS], strict=True)]
    return table.sort_values([c for c in ("sweep", *parameters(runs), "seed") if c in table])


def alarm_lines(runs: pd.DataFrame) -> list[str]:
    """One markdown line per run whose summary lists collapse alarms: its id and the first three."""
    if "alarms" not in runs:
        return []
    lines = []
    for run_id, alarms, count in zip(runs["run_id"], runs["alarms"], runs.get("alarm_count", runs["alarms"]),
                                     strict=True):
        if isinstance(alarms, list) and alarms:
            more = int(count) - 3 if isinstance(count, (int, float)) and count == count and count > 3 else 0
            lines.append(f"- `{run_id}`: {'; '.join(alarms[:3])}" + (f" (and {more} more)" if more else ""))
    return lines


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
    data = sweep_data(drawn, metrics, hist)
    if len(drawn) == 1:  # the heatmap of one run's bits (figures.py, "bit_pair_mi")
        data["pair_mi"] = load_bit_pair_mi(drawn, cache=cache, warn=False)
    for item in planned(SWEEP, data):
        try:
            fig = item.draw() if len(drawn) else None
            if fig is None:
                raise NoData("no runs")
        except NoData as err:
            skipped.append((item.stem, str(err)))
            continue
        save_figure(fig, folder, item.stem)
        written.append(item.stem)
        shows = item.shows if item.shows is not None else drawn
        sections.append(f"### {item.title}\n\n{item.caption}\n\n{held_fixed_line(shows)}\n\n"
                        f"![{item.title}]({item.stem}.png)\n\n[SVG]({item.stem}.svg)\n")
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
        alarms = alarm_lines(runs)
        if alarms:
            parts += ["## Collapse alarms\n", "The monitor's alarms per run (`lfq.alarms`; the first three, from "
                      "`summary.json`; every one is a `kind=\"alarm\"` row of its `metrics.jsonl`).\n", *alarms, ""]
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


def _parser() -> OneLineParser:
    parser = OneLineParser(prog="python -m analysis.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="*", metavar="RUNS",
                        help="a sweep folder (or any folder of run folders); --study ablations: the folder of the "
                             "ablation sweep folders (or one of them); --study recipe: the regime sweep's folder, "
                             "then any sweep folders to compare with (quantizers_images, vq_fair_images, "
                             "entropy_weight_images, gamma_frac_images, ...); --study video: the video sweeps' folders "
                             "(quantizers_video, vq_fair_video); --study generation: the token prior "
                             "sweep folders and the sweep folders of their tokenizers")
    parser.add_argument("--study", choices=STUDIES, default=None,
                        help="which report: a sweep's (default), the ablation claims, the recipe study, the video "
                             "claim or issue 33's priors against their tokenizers; with "
                             "--redraw read from what --out holds")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: RUNS/report for a sweep, results/ablations, results/recipe, results/video, "
                             "results/generation")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="only the runs whose column KEY equals VALUE, e.g. quantizer.codebook_size=1024 "
                             "or name=demo (repeatable: all must hold)")
    parser.add_argument("--redraw", action="store_true",
                        help="draw a study's figures again from the CSVs committed under --out (no run folders; "
                             "the CSVs are left as they are)")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--merge", action="store_const", const="merge", dest="mode",
                          help="keep the runs committed to a study's --out that are not under RUNS (their run "
                               "folders may be gone) and update the others by run id")
    existing.add_argument("--replace", action="store_const", const="replace", dest="mode",
                          help="rewrite a study's --out from RUNS alone, dropping committed runs not found there")
    parser.add_argument("--images", type=Path, default=None, metavar="CSV",
                        help="--study video: the images task's quantizer comparison to set beside the video runs "
                             "(default: results/recipe/quantizers_summary.csv)")
    parser.add_argument("--regime-sweep", default=None, metavar="NAME",
                        help="--study recipe: the regime sweep's name (default: recipe_regime)")
    parser.add_argument("--no-cache", action="store_true", help="a sweep's report: parse every metrics file again")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.redraw:
        return _redraw(parser, args)
    study = args.study or SWEEP
    if not args.runs:
        parser.error("give RUNS (a sweep folder), or --redraw --out DIR")
    if study == SWEEP:
        for flag, given in (("--merge/--replace", args.mode), ("--regime-sweep", args.regime_sweep),
                            ("--images", args.images)):
            if given:
                parser.error(f"{flag} is for --study ablations or recipe (committed CSVs); a sweep's report is "
                             "always written whole from its runs")
        if len(args.runs) > 1:
            parser.error(f"a sweep's report reads one folder, not {len(args.runs)}; pass --study recipe to compare sweeps")
        return _sweep(args)
    if args.no_cache:
        parser.error("--no-cache is for a sweep's report")
    if study == ABLATIONS and (len(args.runs) > 1 or args.regime_sweep):
        parser.error("--study ablations reads one folder of ablation sweep folders (no --regime-sweep)")
    if args.images is not None and study != VIDEO:
        parser.error("--images is for --study video")
    if args.regime_sweep and study in (VIDEO, GENERATION):
        parser.error("--regime-sweep is for --study recipe")
    for root in args.runs:
        if not root.is_dir():
            what = "is a file" if root.exists() else "does not exist"
            return fail(f"RUNS {root} {what}: give a folder of sweep folders (or sweep folders)")
    out = args.out or Path("results") / study
    if out.exists() and not out.is_dir():
        return fail(f"--out {out} is a file; give the folder of the {study} study (default results/{study})")
    command = shlex.join(["python", "-m", "analysis.report", *argv])
    mode = args.mode or "refuse"
    try:
        if study == ABLATIONS:
            written = write_ablations(args.runs[0], out, command=command, mode=mode, where=args.where)
            for sweep, files in written.items():
                print(f"{out / sweep}: {', '.join(files)}")
        elif study == GENERATION:
            files = write_generation(args.runs, out, command=command, mode=mode, where=args.where)
        elif study == VIDEO:
            extra = {"images": args.images} if args.images is not None else {}
            files = write_video(args.runs, out, command=command, mode=mode, where=args.where, **extra)
            print(f"{out}: {', '.join(files)}")
        else:
            files = write_recipe(args.runs, out, command=command, regime_sweep=args.regime_sweep or "recipe_regime",
                                 mode=mode, where=args.where)
            print(f"{out}: {', '.join(files)}")
    except (FileNotFoundError, NoData, WouldLoseRuns, ValueError) as err:  # ValueError: WhereError, pandas
        return fail(err)
    except OSError as err:  # e.g. --out not writable
        return fail(f"cannot write under {out}: {err.strerror or err}; choose another --out")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    try:
        out = write_report(args.runs[0], args.out, cache=not args.no_cache, where=args.where,
                           log=lambda line: print(line, file=sys.stderr))
    except (FileNotFoundError, FileExistsError, PermissionError, WhereError) as err:
        return fail(err)
    figures = sorted(p.stem for p in out.glob("*.png"))
    print(f"wrote {out / 'report.md'} and {len(figures)} figure(s) as PNG and SVG: {', '.join(figures) or 'none'}")
    return 0


def _redraw(parser: OneLineParser, args: argparse.Namespace) -> int:
    if args.runs or args.where or args.mode or args.no_cache or args.regime_sweep or args.images:
        parser.error("--redraw draws the CSVs under --out whole: give --out DIR alone (and --study)")
    if args.out is None:
        parser.error("--redraw needs --out: the folder of a committed study (results/ablations, results/recipe, results/generation)")
    if args.study == SWEEP:
        parser.error("--redraw is for a study's committed CSVs; a sweep's report is drawn from its runs")
    if not args.out.is_dir():
        return fail(f"--out {args.out} is not a folder of a study's committed CSVs to redraw from")
    study = args.study or study_of(args.out)
    try:
        if study == RECIPE:
            print(f"{args.out}: {', '.join(redraw_recipe(args.out))}")
            return 0
        if study == GENERATION:
            print(f"{args.out}: {', '.join(redraw_generation(args.out))}")
            return 0
        if study == VIDEO:
            print(f"{args.out}: {', '.join(redraw_video(args.out))}")
            return 0
        drawn = redraw_ablations(args.out)
    except (FileNotFoundError, ValueError) as err:  # NoData, and pandas' errors for a CSV it cannot read
        return fail(err)
    except OSError as err:
        return fail(f"cannot write under {args.out}: {err.strerror or err}")
    for folder, files in drawn.items():
        print(f"{folder}: {', '.join(files)}")
    return 0 if drawn else fail(f"no figure could be drawn from the CSVs under {args.out}")


if __name__ == "__main__":
    sys.exit(guarded(main))
