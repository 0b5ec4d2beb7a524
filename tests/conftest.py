"""Shared by every test folder. pytest puts this folder on sys.path (a conftest in a folder
without __init__.py), so test modules anywhere import the helpers here, e.g. ``upstream_vqp``."""

import os

import pytest


@pytest.fixture(autouse=True)
def _restored_environ():
    """Every test sees the environment the session started with. Some libraries write
    os.environ in the test's own process (Lightning's ddp_spawn sets MASTER_PORT, submitit's
    export sets RANK and WORLD_SIZE); jobs submitted later inherit it and refuse to start."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)
