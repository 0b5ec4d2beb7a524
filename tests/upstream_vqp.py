"""The newest vector-quantize-pytorch, for differential tests next to the pinned 1.14.12 oracle.

Both versions are the package ``vector_quantize_pytorch``, so they cannot sit in one
site-packages. ``make upstream`` installs the newest one (pinned in ``UPSTREAM_VERSION`` of the
Makefile) with ``--no-deps --target .upstream/vqp-latest``; its pure-Python dependencies
(einx, loguru, torch-einops-utils) come with the ``test`` extra. :func:`load_latest` imports
it under its own name with the oracle's modules moved aside, then puts the oracle's back, so a
test can hold both at once. Its classes keep working afterwards: their globals were bound at
import time.

Importing is not skipping: a missing install fails the test that asks for it, with the fix.
"""

from __future__ import annotations

import functools
import importlib
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_DIR = REPO / ".upstream" / "vqp-latest"
PACKAGE = "vector_quantize_pytorch"


@functools.cache
def load_latest() -> ModuleType:
    """The newest upstream's top-level module (``.LFQ``, ``.FSQ``, ``.VectorQuantize``, ...)."""
    if not (UPSTREAM_DIR / PACKAGE / "__init__.py").is_file():
        raise RuntimeError(f"the newest vector-quantize-pytorch is not installed in {UPSTREAM_DIR}: "
                           f"run `make upstream` (make test does it)")
    saved = {name: mod for name, mod in sys.modules.items() if name == PACKAGE or name.startswith(PACKAGE + ".")}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(UPSTREAM_DIR))
    try:
        latest = importlib.import_module(PACKAGE)
        # Bring in every submodule now, while the path points at the newest version.
        for path in sorted((UPSTREAM_DIR / PACKAGE).glob("*.py")):
            if path.stem != "__init__":
                importlib.import_module(f"{PACKAGE}.{path.stem}")
        loaded = {name: mod for name, mod in sys.modules.items()
                  if name == PACKAGE or name.startswith(PACKAGE + ".")}
    finally:
        sys.path.remove(str(UPSTREAM_DIR))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]
        sys.modules.update(saved)
    if not str(Path(latest.__file__)).startswith(str(UPSTREAM_DIR)):
        raise RuntimeError(f"imported {latest.__file__}, not the copy in {UPSTREAM_DIR}")
    latest.submodules = {name.removeprefix(PACKAGE + "."): mod for name, mod in loaded.items()}
    return latest


def latest_version() -> str:
    dist = next(UPSTREAM_DIR.glob(f"{PACKAGE}-*.dist-info"), None)
    return dist.name.removeprefix(f"{PACKAGE}-").removesuffix(".dist-info") if dist else "unknown"
