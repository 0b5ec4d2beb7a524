"""Where a sweep stands, run by run, from its run folders first and the scheduler second:
pending (queued), running, done, failed (with the last lines of its error), cancelled (scancel, or a
stopped local pool), corrupt (DONE, but its summary.json or config.json unreadable) or
missing (never submitted); ``--resubmit`` submits exactly the failed, cancelled, corrupt and missing runs
(docs/slurm.md, "Status").

    python -m slurm.status results/demo                    # a sweep folder
    python -m slurm.status experiments/sweeps/demo.yaml    # or its sweep file (same overrides as submit)
    python -m slurm.status results/demo --resubmit --cluster slurm
    python -m slurm.status results/demo --wait             # until nothing is queued or running
"""

from __future__ import annotations

import argparse
import difflib
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.cli import OneLineParser, fail, guarded
from experiments.config import Config, ConfigError
from experiments.sweep import RunSpec, SweepError, expand, load_sweep
from slurm.profiles import ProfileError
from slurm.state import RESUBMITTABLE, STATES, RunState, SweepFolder, run_states, summarise, wait_for
from slurm.submit import SubmitError, add_submit_options, resource_args, submit_runs

Log = Callable[[str], None]


def resolve(target: Path, results: Path, overrides: Sequence[str]
            ) -> tuple[SweepFolder, list[RunSpec] | None, dict[str, Any]]:
    """The sweep folder, the sweep file's runs (None for a folder) and the sweep's resources."""
    if not target.exists():
        if target.suffix in (".yaml", ".yml"):
            raise SubmitError(f"sweep file {target} does not exist; see experiments/sweeps/ for the sweep files")
        near = difflib.get_close_matches(target.name, [p.name for p in _folders(target.parent)], n=1)
        hint = f" (did you mean {target.parent / near[0]}?)" if near else ""
        raise SubmitError(f"{target} does not exist{hint}: give a sweep folder (results/<sweep>) or a sweep file")
    if target.is_dir():
        if overrides:
            raise SubmitError("key=value overrides only make sense with a sweep file, not a sweep folder")
        folder = SweepFolder(target)
        return folder, None, folder.read_sweep().get("resources", {})
    sweep = load_sweep(target)
    return SweepFolder(results / sweep.name), expand(sweep, overrides), dict(sweep.resources)


def _folders(parent: Path) -> list[Path]:
    try:
        return [p for p in parent.iterdir() if p.is_dir()] if parent.is_dir() else []
    except OSError:
        return []


def known_runs(folder: SweepFolder, specs: list[RunSpec] | None) -> list[RunSpec]:
    """The runs to report: the sweep file's (with its overrides), else every run the folder has seen."""
    if specs is not None:
        return specs
    records = sorted(folder.read_runs().values(), key=lambda r: r.get("index", 0))  # the sweep's own order
    return [RunSpec(point=r.get("point", {}), config=Config.from_dict(r["config"])) for r in records]


def table(states: Sequence[RunState], specs: Sequence[RunSpec], lines: int = 5) -> str:
    labels = {s.run_id: s.label() for s in specs}
    rows = [("run", "state", "cluster", "job", "point", "detail")]
    errors: list[str] = []
    for s in states:
        first, *rest = (s.detail or "").splitlines() or [""]
        rows.append((s.run_id, s.state, s.cluster or "-", s.job_id or "-", labels.get(s.run_id, ""), first[:60]))
        if s.state in ("failed", "cancelled") and (rest or len(first) > 60):
            body = "\n".join([first, *rest][-lines:])
            errors.append(f"--- {s.run_id} ({s.state}):\n" + "\n".join(f"    {t}" for t in body.splitlines()))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    counts = summarise(states)
    text += "\n" + ", ".join(f"{counts[k]} {k}" for k in STATES if counts[k]) + f" (of {len(states)})"
    return text + ("\n" + "\n".join(errors) if errors else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m slurm.status", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("target", type=Path, help="a sweep folder (results/<sweep>) or a sweep file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="with a sweep file: the overrides it was submitted with, e.g. scale=smoke")
    parser.add_argument("--resubmit", action="store_true", help="submit the failed, cancelled and missing runs")
    parser.add_argument("--lines", type=int, default=5, help="error lines shown per failed run")
    add_submit_options(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_intermixed_args(argv)
    try:
        folder, specs, sweep_resources = resolve(args.target, args.results, args.overrides)
        runs = known_runs(folder, specs)
        if not runs:
            print(f"no runs known in {folder.root} (nothing submitted yet?)", file=sys.stderr)
            return 1
        states = run_states(folder, [r.run_id for r in runs])
        print(table(states, runs, args.lines))
        if args.resubmit:
            again = {s.run_id for s in states if s.state in RESUBMITTABLE}
            todo = [r for r in runs if r.run_id in again]
            if not todo:
                print("[status] nothing to resubmit")
            else:
                submit_runs(folder.root.name, todo, sweep_resources, cluster=args.cluster,
                            results=folder.root.parent, overrides=args.overrides, profile=args.profile,
                            resources=resource_args(args), command=shlex.join(["python", "-m", "slurm.status", *argv]))
        if args.wait:
            counts = wait_for(folder, [r.run_id for r in runs])
            return 0 if counts["failed"] + counts["cancelled"] + counts["missing"] == 0 else 1
    except (SweepError, ConfigError, ProfileError, SubmitError) as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
