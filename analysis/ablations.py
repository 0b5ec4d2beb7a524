"""Issue 8's ablations on the command line: run folders -> per-sweep ``summary.csv``, ``grid.csv``,
``command.txt`` and the claim plots; or the claim plots redrawn from the committed CSVs alone.

    python -m analysis.ablations /root/lfq-ablations --out results/ablations
    python -m analysis.ablations /tmp/rerun --out results/ablations --merge   # fold in a few re-run runs
    python -m analysis.ablations --redraw --out results/ablations             # figures from the summary.csv files
    python -m analysis.ablations --probe results/ablations/clamp_probe        # claim 4's mechanism

The claims and their summaries are :mod:`analysis.claims`, the merge :mod:`analysis.merge`, the
tables :mod:`analysis.tables`, the figures :mod:`analysis.claim_figures`.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd

from analysis.claim_figures import claim_figures, clamp_probe_figure
from analysis.claims import (
    BY_NAME,
    PathLike,
    claim_of,
    claim_summaries,
    load_clamp_probe,
    read_summaries,
    summaries_from_runs,
)
from analysis.jsonl_reader import write_atomic
from analysis.merge import WouldLoseRuns, command_text, merged_or_refused
from analysis.style import NoData, save_figure
from analysis.tables import grid_table
from common.cli import OneLineParser, fail, guarded

__all__ = ["WouldLoseRuns", "draw_claims", "main", "submit_commands", "write_ablations"]


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


def write_ablations(root: PathLike, out: PathLike, *, command: str, mode: str = "refuse", log: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """Write every sweep's CSVs and ``command.txt`` and every claim's figures into ``out/<sweep>/``.

    ``mode`` says what to do with an existing ``out/<sweep>/summary.csv`` (committed results whose
    run folders may be long gone): ``"refuse"`` (default) raises :class:`WouldLoseRuns`, before
    anything is written, if it holds runs that are not under ``root``; ``"merge"`` keeps those
    rows and updates the others by run id (:func:`merge_summaries`), so that a few re-run or
    finished runs can be folded into committed results; ``"replace"`` rewrites it from ``root``.
    A claim's figures are drawn from every sweep of that claim now in ``out`` (the vocab claim
    joins two sweeps; re-running one of them keeps the other in the plot).
    Returns ``{sweep: files written}``; a figure that cannot be drawn is reported on stderr."""
    if mode not in ("refuse", "merge", "replace"):
        raise ValueError(f"mode must be 'refuse', 'merge' or 'replace', not {mode!r}")
    log = log or (lambda message: print(message, file=sys.stderr))
    out = Path(out)
    summaries = summaries_from_runs(root, log)
    # Decide every sweep before writing any: a refusal leaves out/ exactly as it was.
    planned = {sweep: merged_or_refused(summary, out / sweep / "summary.csv", mode)
               for sweep, summary in summaries.items()}
    written: dict[str, list[str]] = {}
    for sweep, (summary, notes) in planned.items():
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
    present = {**read_summaries(out), **{s: m for s, (m, _) in planned.items()}}
    for sweep, (m, _) in planned.items():
        if claim_of(sweep, m) is None:
            log(f"{sweep}: tests no claim (its name is no ablation sweep's and no claim's parameter "
                f"varies): summary.csv and grid.csv only, no claim figure")
    touched = {c.name for s, (m, _) in planned.items() if (c := claim_of(s, m)) is not None}
    for home, files in draw_claims(out, present, touched, log).items():
        written.setdefault(home, []).extend(files)
    return written


def draw_claims(out: Path, present: Mapping[str, pd.DataFrame], claims: set[str] | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """Draw the figures of ``claims`` (default: every claim with data) from ``present`` (``{sweep:
    summary}``) into ``out/<home sweep>/``; returns ``{sweep: files written}``. A figure that cannot
    be drawn is reported through ``log`` and its old files removed (they would show other data)."""
    log = log or (lambda message: print(message, file=sys.stderr))
    written: dict[str, list[str]] = {}
    for name, summary in claim_summaries(present).items():
        if claims is not None and name not in claims:
            continue
        # A claim's figures go with its first sweep present (the vocab claim joins two sweeps).
        home = next(s for s in BY_NAME[name].sweeps + tuple(present) if s in present
                    and claim_of(s, present[s]) is BY_NAME[name])
        for stem, draw in claim_figures(name, summary).items():
            try:
                fig = draw()
            except NoData as err:
                for suffix in (".png", ".svg"):
                    (out / home / f"{stem}{suffix}").unlink(missing_ok=True)
                log(f"{home}/{stem}: not drawn: {err}")
                continue
            assert fig is not None  # strict=True raises instead of returning None
            written.setdefault(home, []).extend(save_figure(fig, out / home, stem))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(prog="python -m analysis.ablations", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_root", type=Path, nargs="?", help="folder of ablation sweep folders (or one sweep folder)")
    parser.add_argument("--redraw", action="store_true",
                        help="instead: redraw every claim's figures from the summary.csv files under --out "
                             "(no run folders needed; the CSVs are left as they are)")
    parser.add_argument("--probe", type=Path, metavar="DIR",
                        help="instead: draw claim4_probe.png/.svg from DIR/probe.csv (python -m experiments.clamp_probe)")
    parser.add_argument("--out", type=Path, default=Path("results/ablations"), help="default: results/ablations")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--merge", action="store_const", const="merge", dest="mode",
                          help="keep the rows of an existing summary.csv whose runs are not under RUNS_ROOT "
                               "and update the others by run id (fold re-run or finished runs into results)")
    existing.add_argument("--replace", action="store_const", const="replace", dest="mode",
                          help="rewrite each summary.csv from RUNS_ROOT alone, dropping runs not found there")
    parser.set_defaults(mode="refuse")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "analysis.ablations", *argv])
    if (args.runs_root is not None) + (args.probe is not None) + args.redraw != 1:
        parser.error("give RUNS_ROOT, --probe DIR or --redraw (one of them)")
    if args.redraw:
        if not args.out.is_dir():
            return fail(f"--out {args.out} is not a folder of <sweep>/summary.csv files to redraw from")
        try:
            drawn = draw_claims(args.out, read_summaries(args.out))
        except (FileNotFoundError, ValueError) as err:  # ValueError: pandas cannot read a summary.csv
            return fail(err)
        except OSError as err:
            return fail(f"cannot write under {args.out}: {err.strerror or err}")
        for sweep, files in drawn.items():
            print(f"{args.out / sweep}: {', '.join(files)}")
        return 0 if drawn else fail(f"no claim could be drawn from the summaries under {args.out}")
    if args.probe is not None:
        try:
            probe = load_clamp_probe(args.probe) if args.probe.is_dir() else None
            if probe is None:
                return fail(f"--probe {args.probe}: no probe.csv there; write it with python -m "
                            f"experiments.clamp_probe --out {args.probe}")
            save_figure(clamp_probe_figure(probe, strict=True), args.probe, "claim4_probe")
        except ValueError as err:  # NoData, and pandas' errors for a CSV it cannot read
            return fail(f"--probe {args.probe}: {err}")
        print(f"{args.probe}: claim4_probe.png, claim4_probe.svg")
        return 0
    if not args.runs_root.is_dir():
        what = "is a file" if args.runs_root.exists() else "does not exist"
        return fail(f"RUNS_ROOT {args.runs_root} {what}: give a folder of sweep folders (or one sweep folder)")
    if args.out.exists() and not args.out.is_dir():
        return fail(f"--out {args.out} is a file; give the folder of the ablation tables (default results/ablations)")
    try:
        written = write_ablations(args.runs_root, args.out, command=command, mode=args.mode)
    except (FileNotFoundError, NoData, ValueError) as err:
        return fail(err)
    except OSError as err:  # e.g. --out not writable
        return fail(f"cannot write under {args.out}: {err.strerror or err}; choose another --out")
    for sweep, files in written.items():
        print(f"{args.out / sweep}: {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
