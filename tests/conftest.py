"""Shared by every test folder. pytest puts this folder on sys.path (a conftest in a folder
without __init__.py), so test modules anywhere import the helpers here, e.g. ``upstream_vqp``."""

import getpass
import os
import tempfile

import pytest

# torch.compile's C++ cache is keyed without ATEN_CPU_CAPABILITY: code compiled for AVX-512 and read
# back under ATEN_CPU_CAPABILITY=default fails to build ("'at::vec' has not been declared", torch
# 2.13). One cache per kernel set, so the suite passes run after run under either (issue 28).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ.get('ATEN_CPU_CAPABILITY') or 'native'}"))


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
