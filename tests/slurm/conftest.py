"""Fixtures of the slurm tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_helpers import START_HINT, cluster_problem, scancel


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """The real one-node cluster of slurm/local-cluster.sh. Missing means FAIL: CI must not skip these."""
    problem = cluster_problem()
    if problem:
        pytest.fail(f"{problem}: {START_HINT}", pytrace=False)


@pytest.fixture
def cancel_leftovers() -> Iterator[list[str]]:
    """Tests append the job ids they submit; whatever is still queued at the end is cancelled."""
    job_ids: list[str] = []
    yield job_ids
    scancel(sorted({j.split("_")[0] for j in job_ids}))


@pytest.fixture(autouse=True)
def _private_cpu_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the local pool's machine-wide CPU slots: per test, so a user's own local sweep cannot slow a test
    monkeypatch.setenv("LFQ_LOCAL_SLOTS", str(tmp_path / "cpu-slots"))
