"""The sweep's state words: the run folder's vocabulary (common.run_state.RUN_STATES) plus the few
only the scheduler can say; a folder's "started" is always refined into one of STARTED_BECOMES."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import slurm.status
from common.run_state import RUN_STATES
from experiments.run_lock import try_lock_run
from slurm.state import FOLDER_STATES, SCHEDULER_STATES, STARTED_BECOMES, STATES, _classify


def test_every_state_is_a_folder_state_or_a_documented_scheduler_state() -> None:
    for state in STATES:
        assert (state in RUN_STATES) != (state in SCHEDULER_STATES), state  # exactly one of the two
        assert state in RUN_STATES or SCHEDULER_STATES[state].strip(), f"{state}: no meaning written down"
    assert set(STATES) == set(SCHEDULER_STATES) | set(RUN_STATES) - {"started"}
    assert set(FOLDER_STATES) == set(RUN_STATES) - {"started"}
    assert len(STATES) == len(set(STATES))
    assert set(STARTED_BECOMES) <= set(STATES) and all(v.strip() for v in STARTED_BECOMES.values())


def test_the_status_help_names_every_state() -> None:
    assert all(f"{state} (" in slurm.status.__doc__ or f"{state}," in slurm.status.__doc__ for state in STATES)


def _started(tmp_path: Path) -> Path:
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"task": "synthetic", "run_id": "r"}))
    return run_dir


LOCAL = {"cluster": "local", "job_id": "", "pool_lock": "/nonexistent/pool.lock", "time": 100.0}
SLURM = {"cluster": "slurm", "job_id": "12", "time": 100.0}


@pytest.mark.parametrize(("record", "sched", "exit_event", "want"), [
    ({}, "", None, "missing"),  # never submitted from this sweep folder
    (SLURM, "PENDING (Priority)", None, "pending"),
    (SLURM, "RUNNING", None, "running"),
    (SLURM, "CANCELLED", None, "cancelled"),
    (SLURM, "TIMEOUT", None, "failed"),
    ({**SLURM, "time": "now"}, "", None, "pending"),  # just submitted, no scheduler lists it yet
    (LOCAL, "", None, "cancelled"),  # the pool ended before the run started
    (LOCAL, "", {"exitcode": -15, "time": 200.0}, "cancelled"),
    (LOCAL, "", {"exitcode": 1, "time": 200.0}, "failed"),
])
def test_a_started_folder_becomes_what_its_record_says(tmp_path: Path, record: dict, sched: str,
                                                         exit_event: dict | None, want: str) -> None:
    run_dir = _started(tmp_path)
    if record.get("time") == "now":
        record = {**record, "time": time.time()}
    state, _ = _classify(run_dir, {}, record, sched, exit_event)
    assert state == want and state in STARTED_BECOMES


def test_a_started_folder_whose_run_lock_is_held_is_running(tmp_path: Path) -> None:
    run_dir = _started(tmp_path)
    with try_lock_run(run_dir) as held:
        assert held
        assert _classify(run_dir, {}, LOCAL, "", {"exitcode": 1, "time": 200.0})[0] == "running"
    assert _classify(run_dir, {}, LOCAL, "", {"exitcode": 1, "time": 200.0})[0] == "failed"
