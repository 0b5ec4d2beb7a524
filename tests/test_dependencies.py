"""The contracts between the packages (docs/ARCHITECTURE.md), checked.

1. Imports: ``common`` uses the standard library alone and every package may import it; ``lfq``
   uses torch, einops and the standard library only; ``experiments`` imports ``lfq``; ``slurm``
   imports ``experiments``; ``analysis`` imports none of them (it reads files); no module imports,
   even lazily inside a function, a module that imports it back.
2. The one definition of a finished run and one vocabulary for what a folder holds:
   ``common.run_state.finished`` decides it (experiments and slurm call it), and ``analysis.load`` says
   the same word of each folder.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import analysis
from analysis.load import STATUSES
from common.run_state import RUN_STATES, finished

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "lfq", "experiments", "slurm", "analysis")
# which of the project's packages each may import (besides itself)
MAY_IMPORT = {"common": set(), "lfq": {"common"}, "experiments": {"common", "lfq"}, "slurm": {"common", "experiments"},
              "analysis": {"common"}}
LFQ_THIRD_PARTY = {"torch", "einops"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _optional(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``try: ... except ImportError`` (an optional extra, e.g. pandas for
    ``MemorySink.to_frame``): the module imports without them."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return guarded


def _imports(path: Path, optional: bool = True) -> set[str]:
    """Every module ``path`` imports, anywhere in it (functions included), as absolute dotted names;
    ``optional=False`` leaves out those guarded by ``except ImportError``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skip = set() if optional else _optional(tree)
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}
IMPORTS = {name: _imports(path) for name, path in MODULES.items()}
REQUIRED = {name: _imports(path, optional=False) for name, path in MODULES.items()}


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_the_architecture_allows(package: str) -> None:
    wrong = []
    for module, imported in IMPORTS.items():
        if module.split(".")[0] != package:
            continue
        for name in imported:
            top = name.split(".")[0]
            if top in PACKAGES and top != package and top not in MAY_IMPORT[package]:
                wrong.append(f"{module} imports {name}")
            # lfq.integrations.<x> is the optional extra x itself (imported only by those who use x)
            integration = module.startswith("lfq.integrations.") and top == module.split(".")[2]
            if package == "common" and top not in PACKAGES and top not in sys.stdlib_module_names \
                    and top != "__future__":
                wrong.append(f"{module} imports {name} (common: the standard library only)")
            if package == "lfq" and name in REQUIRED[module] and top not in PACKAGES and top not in LFQ_THIRD_PARTY \
                    and top not in sys.stdlib_module_names and top != "__future__" and not integration:
                wrong.append(f"{module} imports {name} (lfq: torch, einops and the standard library only)")
    assert not wrong, "\n".join(sorted(wrong))


def test_lfq_imports_with_torch_and_einops_alone() -> None:
    blocked = ["numpy", "pandas", "yaml", "pyarrow", "matplotlib", "submitit", "experiments", "slurm", "analysis"]
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
            + "import lfq, lfq.quantizer, lfq.entropy, lfq.monitor, lfq.code_usage, lfq.sinks\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_no_import_cycles() -> None:
    graph = {m: sorted({i for i in IMPORTS[m] if i in MODULES and i != m}) for m in MODULES}
    # a package's __init__ re-exporting its own modules is not a cycle of design; leave those edges out
    graph = {m: [i for i in deps if not (MODULES[i].name == "__init__.py" and m.startswith(i + "."))]
             for m, deps in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for dep in graph[module]:
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_import_scan_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    # the checker itself: an import inside a function counts (slurm.submit once imported slurm.status so)
    assert "slurm.state" in IMPORTS["slurm.submit"] and "slurm.submit" in IMPORTS["slurm.status"]
    assert "slurm.status" not in IMPORTS["slurm.submit"]
    assert "lfq.entropy" in IMPORTS["experiments.clamp_probe"]
    assert not any(i.startswith("analysis") for i in IMPORTS["experiments.clamp_probe"])


# --- the one definition of a finished run ----------------------------------------------------------------

CONFIG = {"name": "demo", "task": "synthetic", "seed": 0, "run_id": "r"}
DONE_SUMMARY = {"run_id": "r", "status": "done", "step": 3}
# (folder, files: name -> content or None for absent, run_dir.finished state, analysis status)
FOLDERS = [
    ("whole", {"config.json": CONFIG, "summary.json": DONE_SUMMARY, "DONE": ""}, "done", "done"),
    ("no-summary", {"config.json": CONFIG, "DONE": ""}, "corrupt", "corrupt"),
    ("torn-summary", {"config.json": CONFIG, "summary.json": '{"status": "do', "DONE": ""}, "corrupt", "corrupt"),
    ("summary-a-list", {"config.json": CONFIG, "summary.json": [1, 2], "DONE": ""}, "corrupt", "corrupt"),
    ("summary-not-utf8", {"config.json": CONFIG, "summary.json": b"\xff\xfe", "DONE": ""}, "corrupt", "corrupt"),
    ("summary-says-running", {"config.json": CONFIG, "summary.json": {"status": "running"}, "DONE": ""},
     "corrupt", "corrupt"),
    ("no-config", {"summary.json": DONE_SUMMARY, "DONE": ""}, "corrupt", "corrupt"),
    ("torn-config", {"config.json": '{"task"', "summary.json": DONE_SUMMARY, "DONE": ""}, "corrupt", "corrupt"),
    ("config-without-run-id", {"config.json": {"task": "synthetic"}, "summary.json": DONE_SUMMARY, "DONE": ""},
     "corrupt", "corrupt"),
    ("failed", {"config.json": CONFIG, "summary.json": {"status": "failed", "reason": "nan"}}, "failed", "failed"),
    ("failed-with-done", {"config.json": CONFIG, "summary.json": {"status": "failed", "reason": "nan"}, "DONE": ""},
     "failed", "failed"),
    ("started", {"config.json": CONFIG}, "started", "started"),
    ("done-summary-no-marker", {"config.json": CONFIG, "summary.json": DONE_SUMMARY}, "started", "started"),
    ("torn-summary-no-marker", {"config.json": CONFIG, "summary.json": '{"status": "fa'}, "started", "started"),
]


def _write(folder: Path, files: dict[str, object]) -> None:
    folder.mkdir(parents=True)
    for name, content in files.items():
        data = content if isinstance(content, (bytes, str)) else json.dumps(content)
        (folder / name).write_bytes(data if isinstance(data, bytes) else data.encode())


def test_run_dir_and_analysis_agree_on_what_a_finished_run_is(tmp_path: Path) -> None:
    for name, files, _, _ in FOLDERS:  # one sweep each: the same run id in two sweeps is two runs
        _write(tmp_path / "sweeps" / name / "r", files)
    runs = analysis.load_runs(tmp_path / "sweeps", warn=False).set_index("run_dir")
    assert len(runs) == len(FOLDERS) and not runs.attrs["problems"]
    for name, _, state, status in FOLDERS:
        folder = tmp_path / "sweeps" / name / "r"
        got_state, why = finished(folder)
        assert got_state == state, name
        assert runs.loc[str(folder), "status"] == status, name
        if state == "corrupt":  # both name the same reason
            assert why and runs.loc[str(folder), "reason"].split(" (")[0] == why.split(" (")[0], name
        # one vocabulary: analysis says of every folder the word run_dir says
        assert runs.loc[str(folder), "status"] == got_state, name


def test_analysis_status_words_are_run_folder_states() -> None:
    # analysis names what a folder holds with common.run_state's words; a folder it finds is never missing
    assert set(STATUSES) <= set(RUN_STATES)
    assert set(STATUSES) == set(RUN_STATES) - {"missing"}  # and every other word can come out of a folder
