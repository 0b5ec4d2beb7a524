"""Fixtures of the analysis tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from analysis_fixtures import make_grid_sweep


@pytest.fixture
def grid_sweep(tmp_path: Path) -> Path:
    return make_grid_sweep(tmp_path)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep tests off the user's cache folder.
    monkeypatch.setenv("LFQ_ANALYSIS_CACHE", str(tmp_path / "cache"))
