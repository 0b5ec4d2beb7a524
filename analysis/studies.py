"""The committed studies, ``results/ablations`` (the paper's claims), ``results/recipe`` (the images
task's regime study), ``results/video`` (the quantizers on the video task) and ``results/generation``
(issue 33's token priors joined to their tokenizers):
their CSVs, ``command.txt`` and the figures of their entries in
:mod:`analysis.figures`, written from run folders (``--merge`` folds a few runs into the committed
CSVs by run id, :mod:`analysis.merge`) or the figures redrawn from the committed CSVs alone.
``python -m analysis.report --study ablations|recipe|video|generation`` is their command line.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis.aggregate import where as pick
from analysis.claims import (
    BY_NAME,
    PathLike,
    claim_of,
    claim_summaries,
    load_clamp_probe,
    read_summaries,
    summaries_from_runs,
)
from analysis.column_names import TAU
from analysis.figures import ABLATIONS, GENERATION, RECIPE, VIDEO, planned
from analysis.generation_claim import claim_order, generation_summary, generation_table, utilization_table
from analysis.jsonl_reader import write_atomic
from analysis.merge import command_text, merge_summaries, merged_or_refused, refuse_dropping, reruns
from analysis.regime import (
    ADVERSARIAL_CURVES,
    adversarial_curves,
    committed_runs,
    comparison_table,
    comparisons,
    read_comparisons,
    read_regime,
    regime_curves,
    regime_summary,
    regime_table,
    sorted_curves,
)
from analysis.style import NoData, require, save_figure
from analysis.tables import grid_table
from analysis.video_claim import IMAGES_SUMMARY, images_rows, sort_summary, video_summary, video_table

Log = Callable[[str], None]
MODES = ("refuse", "merge", "replace")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def submit_commands(sweep_folder: Path, run_ids: Sequence[str] | None = None) -> list[str]:
    """How the runs were made: the ``slurm.submit`` command lines recorded with each run in
    ``<sweep>/_sweep/jobs.jsonl`` (the file slurm writes; read as data), first use first, limited
    to ``run_ids`` when given. Runs submitted before commands were recorded are said so."""
    path = sweep_folder / "_sweep" / "jobs.jsonl"
    wanted = None if run_ids is None else set(run_ids)
    commands: dict[str, None] = {}
    unrecorded = 0
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line: the appender's readers skip it too
        if not isinstance(record, dict) or (wanted is not None and record.get("run_id") not in wanted):
            continue
        if isinstance(record.get("command"), str):
            commands[record["command"]] = None
        else:
            unrecorded += 1
    lines = [f"# the runs ({sweep_folder.name}/_sweep/jobs.jsonl):", *commands]
    if unrecorded or not commands:
        lines.append(f"# {unrecorded or 'all'} submission(s) recorded no command (made before slurm.submit recorded "
                     f"it, or not through it): see experiments/sweeps/{sweep_folder.name}.yaml")
    return lines


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, not {mode!r}")


# ---- the ablation claims -----------------------------------------------------------------------

def write_ablations(root: PathLike, out: PathLike, *, command: str, mode: str = "refuse",
                    where: Sequence[str] | Mapping[str, object] = (), log: Log | None = None) -> dict[str, list[str]]:
    """Write every sweep's CSVs and ``command.txt`` and every claim's figures into ``out/<sweep>/``.

    ``mode`` says what to do with an existing ``out/<sweep>/summary.csv`` (committed results whose
    run folders may be long gone): ``"refuse"`` (default) raises :class:`~analysis.merge.WouldLoseRuns`,
    before anything is written, if it holds runs that are not under ``root``; ``"merge"`` keeps those
    rows and updates the others by run id; ``"replace"`` rewrites it from ``root``. ``where`` keeps
    the runs matching every ``key=value``. A claim's figures are drawn from every sweep of that claim
    now in ``out`` (the vocab claim joins two sweeps). Returns ``{sweep: files written}``."""
    _check_mode(mode)
    log = log or _stderr
    out = Path(out)
    summaries = summaries_from_runs(root, log, where=where)
    # Decide every sweep before writing any: a refusal leaves out/ exactly as it was.
    plan = {sweep: merged_or_refused(summary, out / sweep / "summary.csv", mode) for sweep, summary in summaries.items()}
    written: dict[str, list[str]] = {}
    for sweep, (summary, notes) in plan.items():
        for note in notes:
            log(f"{sweep}: {note}")
        folder = out / sweep
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "summary.csv", lambda p, s=summary: s.to_csv(p, index=False))
        write_atomic(folder / "grid.csv", lambda p, s=summary: grid_table(s).to_csv(p, index=False))
        sweep_folder = Path(root) / sweep if (Path(root) / sweep).is_dir() else Path(root)
        made = submit_commands(sweep_folder, summaries[sweep]["run_id"].astype(str).tolist())
        text = command_text(folder / "command.txt", made, command, mode == "merge", marker="# tables and plots:")
        write_atomic(folder / "command.txt", lambda p, t=text: p.write_text(t, encoding="utf-8"))
        written[sweep] = ["summary.csv", "grid.csv", "command.txt"]
    present = {**read_summaries(out), **{s: m for s, (m, _) in plan.items()}}
    for sweep, (m, _) in plan.items():
        if claim_of(sweep, m) is None:
            log(f"{sweep}: tests no claim (its name is no ablation sweep's and no claim's parameter "
                f"varies): summary.csv and grid.csv only, no claim figure")
    touched = {c.name for s, (m, _) in plan.items() if (c := claim_of(s, m)) is not None}
    for home, files in draw_ablations(out, present, touched, log=log).items():
        written.setdefault(home, []).extend(files)
    return written


def draw_ablations(out: Path, present: Mapping[str, pd.DataFrame], claims: set[str] | None = None,
                   probe: pd.DataFrame | None = None, probe_folder: Path | None = None,
                   log: Log | None = None) -> dict[str, list[str]]:
    """Draw the ablation entries of :mod:`analysis.figures` for ``claims`` (default: every claim with
    data) from ``present`` (``{sweep: summary}``) into ``out/<home sweep>/``, and the clamp probe's
    figure into ``probe_folder`` when ``probe`` is given; returns ``{folder name: files written}``.
    A figure that cannot be drawn is reported through ``log`` and its old files removed."""
    log = log or _stderr
    data: dict[str, pd.DataFrame] = {n: s for n, s in claim_summaries(present).items() if claims is None or n in claims}
    if probe is not None:
        data["probe"] = probe
    written: dict[str, list[str]] = {}
    for item in planned(ABLATIONS, data):
        source = item.plot.needs[0]
        if source == "probe":
            assert probe_folder is not None
            folder, name = probe_folder, probe_folder.name
        else:  # a claim's figures go with its first sweep present (the vocab claim joins two sweeps)
            name = next(s for s in BY_NAME[source].sweeps + tuple(present)
                        if s in present and claim_of(s, present[s]) is BY_NAME[source])
            folder = out / name
        try:
            fig = item.draw()
        except NoData as err:
            for suffix in (".png", ".svg"):
                (folder / f"{item.stem}{suffix}").unlink(missing_ok=True)
            log(f"{name}/{item.stem}: not drawn: {err}")
            continue
        assert fig is not None  # strict=True raises instead of returning None
        written.setdefault(name, []).extend(save_figure(fig, folder, item.stem))
    return written


def redraw_ablations(out: Path, log: Log | None = None) -> dict[str, list[str]]:
    """Every claim's figures from ``out/<sweep>/summary.csv`` and the probe's from its ``probe.csv``
    (``out/clamp_probe/`` or ``out`` itself); the CSVs are left as they are."""
    try:
        present = read_summaries(out)
    except FileNotFoundError:
        present = {}
    probe = load_clamp_probe(out)
    if not present and probe is None:
        raise FileNotFoundError(f"no <sweep>/summary.csv and no probe.csv under {out}: write them with "
                                "python -m analysis.report RUNS --study ablations --out DIR (or experiments.clamp_probe)")
    folder = out / "clamp_probe" if (out / "clamp_probe" / "probe.csv").is_file() else out
    return draw_ablations(out, present, probe=probe, probe_folder=folder, log=log)


# ---- the recipe study --------------------------------------------------------------------------

CSV_FLOATS = "%.6g"  # the committed CSVs' precision


def _as_written(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` as reading back its CSV gives it (floats to 6 significant digits, dtypes as read)."""
    return pd.read_csv(io.StringIO(frame.to_csv(index=False, float_format=CSV_FLOATS))) if len(frame.columns) else frame

def _runs_under(runs_roots: Sequence[Path], *, warn: bool = True) -> pd.DataFrame:
    """The runs of every folder of ``runs_roots``, one frame; a one-line error when there are none."""
    from analysis.load import load_runs  # the CSV-only paths need no run loading

    parts = [load_runs(root, warn=warn) for root in runs_roots]
    runs = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else pd.DataFrame()
    require(len(runs), f"no run folders under {', '.join(map(str, runs_roots))}")
    return runs


def _write_study(out: Path, tables: Sequence[tuple[str, pd.DataFrame]], figures: Sequence[tuple[str, Figure]],
                 runs_roots: Sequence[Path], command: str, *, merge: bool) -> list[str]:
    """A committed study's files, each written atomically into ``out``: its ``tables`` (CSV at
    :data:`CSV_FLOATS`), its drawn ``figures`` and ``command.txt`` (how the runs were made, then
    ``command``, after the lines already there when ``merge``). Returns the names written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in tables:
        write_atomic(out / name, lambda p, f=frame: f.to_csv(p, index=False, float_format=CSV_FLOATS))
        written.append(name)
    for stem, fig in figures:
        written += save_figure(fig, out, stem)
    made = [line for root in runs_roots for line in submit_commands(root)]
    text = command_text(out / "command.txt", made, command, merge, marker="# these tables and figures:")
    write_atomic(out / "command.txt", lambda p: p.write_text(text, encoding="utf-8"))
    return [*written, "command.txt"]



def draw_recipe(out: Path, data: Mapping[str, pd.DataFrame]) -> list[str]:
    """The recipe entries of :mod:`analysis.figures` that ``data`` holds, drawn into ``out``; a
    figure that cannot be drawn raises ``NoData`` (nothing is written past it)."""
    figures = [(item.stem, item.draw()) for item in planned(RECIPE, data)]
    return [name for stem, fig in figures for name in save_figure(fig, out, stem)]


def redraw_recipe(out: Path) -> list[str]:
    """The recipe study's figures from the CSVs committed to ``out`` (left as they are)."""
    require((out / "summary.csv").is_file(), f"no summary.csv under {out}")
    summary, curves = read_regime(out)
    extra = {"adversarial_curves": pd.read_csv(out / ADVERSARIAL_CURVES)} if (out / ADVERSARIAL_CURVES).is_file() else {}
    return draw_recipe(out, {"summary": summary, "curves": curves, **read_comparisons(out), **extra})


def write_recipe(runs_roots: Sequence[Path], out: Path, *, command: str, regime_sweep: str = "recipe_regime",
                 mode: str = "refuse", where: Sequence[str] | Mapping[str, object] = (),
                 log: Log | None = None) -> list[str]:
    """From the run folders under ``runs_roots``, into ``out``, each file written atomically: the
    regime sweep's (``regime_sweep``; all the runs when none is in it) ``summary.csv``, ``table.csv``,
    ``curves.csv``; ``<name>_summary.csv`` and ``<name>_table.csv`` for each comparison the runs hold
    (:func:`analysis.regime.comparisons`); the recipe figures of :mod:`analysis.figures`; and
    ``command.txt``. ``mode`` and ``where`` as in :func:`write_ablations`: ``"merge"`` keeps the runs
    committed to ``out`` (their rows and curves) and updates the others by run id, a finished
    committed row never replaced by an unfinished one. Returns the names written."""
    from analysis.load import load_metrics  # the CSV-only path needs no run loading

    _check_mode(mode)
    log = log or _stderr
    runs = _runs_under(runs_roots)
    if where:
        runs = pick(runs, where)
    runs = runs.astype({"run_id": str})
    old_runs, old_curves = committed_runs(out) if mode != "replace" else (pd.DataFrame(), pd.DataFrame())
    fresh_ids = set(runs["run_id"])
    if len(old_runs) and mode == "refuse":
        refuse_dropping(old_runs["run_id"], runs["run_id"], f"{out} holds", "RUNS", str(out))
    if len(old_runs) and mode == "merge":
        for note in reruns(old_runs, runs, ("final_val_usage_fraction", "final_val_psnr")):
            log(note)
        unfinished = set(runs.loc[runs["status"] != "done", "run_id"])
        runs, notes = merge_summaries(old_runs, runs)
        for note in notes:
            log(note)
        fresh_ids -= unfinished & set(old_runs.loc[old_runs["status"] == "done", "run_id"])  # old rows kept
        log(f"merged with {out}: {len(set(old_runs['run_id']) - fresh_ids)} committed run(s) kept, "
            f"{len(fresh_ids)} from RUNS")
    regime_runs = runs[runs["sweep"] == regime_sweep] if (runs["sweep"] == regime_sweep).any() else runs
    require(TAU in regime_runs, f"the runs have no {TAU} column: not a regime sweep")
    summary = regime_summary(regime_runs)
    done = regime_runs[(regime_runs["status"] == "done") & regime_runs["run_id"].isin(fresh_ids)]
    curves = regime_curves(load_metrics(done, kinds=["quantizer"]), done) if len(done) else pd.DataFrame()
    if len(old_curves) and mode == "merge":
        kept = old_curves[~old_curves["run_id"].astype(str).isin(fresh_ids)]
        curves = sorted_curves(pd.concat([kept, curves], ignore_index=True) if len(curves) else kept)
    compared = comparisons(runs)
    tables = [("summary.csv", summary), ("table.csv", regime_table(summary)), ("curves.csv", curves)]
    for name, frame in compared.items():
        tables += [(f"{name}_summary.csv", frame), (f"{name}_table.csv", comparison_table(name, frame))]
    extra: dict[str, pd.DataFrame] = {}
    if "adversarial" in compared:  # claim 5 over training: its runs' curves, fresh ones from their folders
        ids = set(compared["adversarial"]["run_id"].astype(str)) & fresh_ids
        fresh = runs[(runs["status"] == "done") & runs["run_id"].isin(ids)]
        new = regime_curves(load_metrics(fresh, kinds=["quantizer"]), fresh) if len(fresh) else pd.DataFrame()
        committed = out / ADVERSARIAL_CURVES
        old = pd.read_csv(committed) if committed.is_file() and mode != "replace" else pd.DataFrame()
        extra["adversarial_curves"] = adversarial_curves(compared["adversarial"], new, curves, old)
        tables.append((ADVERSARIAL_CURVES, extra["adversarial_curves"]))
    # Drawn before anything is written (a figure without data stops the command with out/ as it was),
    # from the tables as the CSVs will hold them: a --redraw from the committed CSVs draws the same bytes.
    data = {"summary": summary, "curves": curves, **compared, **extra}
    figures = [(item.stem, item.draw()) for item in planned(RECIPE, {k: _as_written(v) for k, v in data.items()})]
    return _write_study(out, tables, figures, runs_roots, command, merge=mode == "merge")


# ---- issue 33's claim: token priors joined to their tokenizers -------------------------------

def write_generation(runs_roots: Sequence[Path], out: Path, *, command: str, mode: str = "refuse",
                     where: Sequence[str] | Mapping[str, object] = (), log: Log | None = None) -> list[str]:
    """From the prior and tokenizer run folders under ``runs_roots``, into ``out``, each file written
    atomically: ``summary.csv`` (one row per prior joined to its tokenizer,
    :func:`analysis.generation_claim.generation_summary`; a prior whose tokenizer is not there is
    said through ``log``), ``table.csv`` (mean, std, n per series and codebook size),
    ``utilization.csv`` (rank correlations at 2^14 codes), the generation figures of
    :mod:`analysis.figures` and ``command.txt``. ``mode`` as in :func:`write_ablations` (by prior run
    id); ``where`` keeps the summary's rows matching every ``key=value`` (``series=VQ fair``)."""

    _check_mode(mode)
    log = log or _stderr
    runs = _runs_under(runs_roots, warn=False)
    summary = generation_summary(runs, log=log)
    if where:
        summary = pick(summary, where)
    summary, notes = merged_or_refused(summary, out / "summary.csv", mode)
    for note in notes:
        log(note)
    if mode == "merge":  # merge_summaries sorts by the ablations' keys: back to the claim's order
        summary = claim_order(summary)
    tables = [("summary.csv", summary), ("table.csv", generation_table(summary)),
              ("utilization.csv", utilization_table(summary))]
    # drawn from the summary as its CSV will hold it, before anything is written: --redraw draws the same bytes
    figures = [(item.stem, item.draw()) for item in planned(GENERATION, {"summary": _as_written(summary)})]
    return _write_study(out, tables, figures, runs_roots, command, merge=mode == "merge")


def redraw_generation(out: Path) -> list[str]:
    """The generation study's figures from the ``summary.csv`` committed to ``out`` (left as it is)."""
    require((out / "summary.csv").is_file(), f"no summary.csv under {out}: write it with python -m analysis.report "
                                             "PRIOR_AND_TOKENIZER_SWEEPS --study generation --out DIR")
    figures = [(item.stem, item.draw()) for item in planned(GENERATION, {"summary": pd.read_csv(out / "summary.csv")})]
    return [name for stem, fig in figures for name in save_figure(fig, out, stem)]


# ---- the video claim ---------------------------------------------------------------------------

def _video_figures(summary: pd.DataFrame, table: pd.DataFrame) -> list[tuple[str, Figure]]:
    """The video entries of :mod:`analysis.figures`, drawn (``NoData`` stops them, nothing written)."""
    figures = []
    for item in planned(VIDEO, {"summary": summary, "table": table}):
        fig = item.draw()
        assert fig is not None  # strict=True raises instead of returning None
        figures.append((item.stem, fig))
    return figures


def redraw_video(out: Path) -> list[str]:
    """The video study's figures from the ``summary.csv`` and ``table.csv`` committed to ``out``."""
    require((out / "summary.csv").is_file() and (out / "table.csv").is_file(),
            f"no summary.csv and table.csv under {out}: write them with python -m analysis.report RUNS... "
            "--study video --out DIR")
    figures = _video_figures(pd.read_csv(out / "summary.csv"), pd.read_csv(out / "table.csv"))
    return [name for stem, fig in figures for name in save_figure(fig, out, stem)]


def write_video(runs_roots: Sequence[Path], out: Path, *, command: str, images: Path = IMAGES_SUMMARY,
                mode: str = "refuse", where: Sequence[str] | Mapping[str, object] = (),
                log: Log | None = None) -> list[str]:
    """From the video run folders under ``runs_roots`` (the ``quantizers_video`` and ``vq_fair_video``
    sweeps) and the images task's committed comparison ``images`` (a ``quantizers_summary.csv``), into
    ``out``, each file written atomically: ``summary.csv`` (one row per video run), ``table.csv`` (mean,
    std and n over seeds per task, quantizer and codebook size), the video figures of
    :mod:`analysis.figures` and ``command.txt``. ``mode`` and ``where`` as in :func:`write_ablations`.
    Returns the names written."""

    _check_mode(mode)
    log = log or _stderr
    if not Path(images).is_file():
        raise FileNotFoundError(f"no images comparison {images}: give --images PATH, the images task's "
                                "quantizers_summary.csv (results/recipe/quantizers_summary.csv)")
    runs = _runs_under(runs_roots)
    if where:
        runs = pick(runs, where)
    # As its CSV holds it (6 significant digits): a re-run is compared with its committed row at that
    # precision, and the table is a function of the committed summary.csv, merged rows or not.
    fresh = video_summary(runs)
    fresh = _as_written(fresh).assign(run_id=fresh["run_id"].astype(str).to_numpy())
    summary, notes = merged_or_refused(fresh, out / "summary.csv", mode)
    summary = sort_summary(summary)
    for note in notes:
        log(note)
    table = video_table(summary, images_rows(pd.read_csv(images), summary["quantizer"].unique()))
    # Drawn before anything is written, from the tables as the CSVs will hold them: --redraw draws the same bytes.
    figures = _video_figures(_as_written(summary), _as_written(table))
    tables = (("summary.csv", summary), ("table.csv", table))
    return _write_study(out, tables, figures, runs_roots, command, merge=mode == "merge")


def study_of(out: Path) -> str:
    """Which committed study a folder holds: ``generation`` (a ``utilization.csv`` beside its
    ``summary.csv``), ``video`` (a ``table.csv`` with a ``task`` column), ``recipe`` (another
    ``table.csv`` or a ``curves.csv``), else ``ablations`` (``<sweep>/summary.csv`` files or a ``probe.csv``)."""
    if (out / "utilization.csv").is_file():
        return GENERATION
    if (out / "table.csv").is_file() and "task" in pd.read_csv(out / "table.csv", nrows=0).columns:
        return VIDEO
    return RECIPE if (out / "table.csv").is_file() or (out / "curves.csv").is_file() else ABLATIONS
