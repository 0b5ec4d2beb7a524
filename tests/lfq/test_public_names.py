"""Every name an ``lfq`` module lists in ``__all__`` exists there (a missing comma joins two names
into one string that nothing defines, and ``from lfq.x import *`` fails on it)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

LFQ_DIR = Path(__file__).resolve().parents[2] / "lfq"
MODULES = sorted(".".join(p.relative_to(LFQ_DIR.parent).with_suffix("").parts).removesuffix(".__init__")
                 for p in LFQ_DIR.rglob("*.py"))


def _declared_all(module: str) -> list[str] | None:
    """The literal ``__all__`` of a module's source, or None when it has none."""
    path = LFQ_DIR.parent / (module.replace(".", "/") + ".py")
    if not path.exists():
        path = LFQ_DIR.parent / module.replace(".", "/") / "__init__.py"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return None


WITH_ALL = [m for m in MODULES if _declared_all(m) is not None]


@pytest.mark.parametrize("module", WITH_ALL)
def test_every_name_in_all_exists(module: str) -> None:
    names = _declared_all(module)
    if module.startswith("lfq.integrations."):
        pytest.importorskip(module.split(".")[2])  # the optional extra the integration wraps
    imported = importlib.import_module(module)
    missing = [n for n in names if not hasattr(imported, n)]
    assert not missing, f"{module}.__all__ lists names it does not define: {missing}"
    assert len(set(names)) == len(names), f"{module}.__all__ lists a name twice"


def test_the_modules_are_found() -> None:
    assert {"lfq", "lfq.monitor", "lfq.quantizer", "lfq.code_usage"} <= set(MODULES)
    assert {"lfq", "lfq.monitor", "lfq.adapters"} <= set(WITH_ALL)
