"""One writer per kind of file in the lfq -> experiments -> slurm chain (docs/ARCHITECTURE.md, "Who
owns which file format"): JSON lines are appended by ``lfq.jsonl_writer.append_jsonl`` alone, files are
written atomically by ``experiments.files.atomic_write`` alone. analysis has its own code for the
formats it reads and writes (it imports none of these packages); the formats are the contract."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHAIN = ("lfq", "experiments", "slurm")
APPENDER = "lfq/jsonl_writer.py"
ATOMIC_WRITER = "experiments/files.py"
# modules that append to a file that is not JSON lines, and encode JSON for something else
NOT_JSON_APPENDS = {"slurm/local.py": "a run's text log, opened 'ab' for the child; JSON goes to its stdin"}


def _sources() -> dict[str, ast.AST]:
    return {str(p.relative_to(REPO)): ast.parse(p.read_text(encoding="utf-8"))
            for pkg in CHAIN for p in sorted((REPO / pkg).rglob("*.py"))}


def _appends(tree: ast.AST) -> bool:
    """Whether the module opens a file for appending: ``os.O_APPEND``, or ``open(..., "a"/"ab")``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "O_APPEND":
            return True
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "open":
            modes = [a for a in node.args[1:2]] + [k.value for k in node.keywords if k.arg == "mode"]
            if any(isinstance(m, ast.Constant) and isinstance(m.value, str) and m.value.startswith("a")
                   and "+" not in m.value for m in modes):  # "a+" opens lock files, which are never written
                return True
    return False


def _encodes_json(tree: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr in ("dumps", "dump") and getattr(n.value, "id", "") == "json"
               for n in ast.walk(tree))


def _makes_temp_files(tree: ast.AST) -> bool:
    """A temp file made by ``os.open(..., O_EXCL)`` (the writer's way) or by ``tempfile``."""
    return any(isinstance(n, ast.Attribute) and n.attr in ("O_EXCL", "mkstemp", "NamedTemporaryFile")
               for n in ast.walk(tree))


OWNER_ONLY = ("mkstemp", "NamedTemporaryFile", "mkdtemp")  # 0600/0700 whatever the umask


SOURCES = _sources()


def test_the_checks_see_what_they_look_for() -> None:
    assert _appends(SOURCES[APPENDER]) and _encodes_json(SOURCES[APPENDER])
    assert _makes_temp_files(SOURCES[ATOMIC_WRITER])
    assert _appends(ast.parse('open(p, "a").write(json.dumps(r))')) and _encodes_json(ast.parse("json.dumps(r)"))
    assert _appends(ast.parse('f = path.open(mode="ab")')) and not _appends(ast.parse('open(p, "a+")'))
    assert all(_appends(SOURCES[name]) for name in NOT_JSON_APPENDS)  # exceptions that are still needed


def test_json_lines_are_appended_by_the_one_appender_only() -> None:
    # JSON appended another way: a module that both encodes JSON and opens files for appending
    others = [name for name, tree in SOURCES.items()
              if name != APPENDER and name not in NOT_JSON_APPENDS and _appends(tree) and _encodes_json(tree)]
    assert not others, f"append JSON lines with lfq.jsonl_writer.append_jsonl (experiments.files re-exports it): {others}"


def test_files_are_written_atomically_by_the_one_writer_only() -> None:
    others = [name for name, tree in SOURCES.items() if name != ATOMIC_WRITER and _makes_temp_files(tree)]
    assert not others, f"write files with experiments.files.atomic_write: {others}"


def test_no_file_or_folder_that_is_kept_is_made_owner_only() -> None:
    # mkstemp/mkdtemp ignore the umask (0600/0700): a result renamed from one hides it from the group.
    # A mkdtemp removed at once (the write probes) is allowed; it is called inside os.rmdir.
    trees = {**SOURCES, **{str(p.relative_to(REPO)): ast.parse(p.read_text(encoding="utf-8"))
                           for p in sorted((REPO / "analysis").rglob("*.py"))}}
    probes = {id(arg) for tree in trees.values() for n in ast.walk(tree)
              if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "rmdir" for arg in n.args}
    found = sorted(name for name, tree in trees.items() for n in ast.walk(tree)
                   if isinstance(n, ast.Call) and getattr(n.func, "attr", "") in OWNER_ONLY and id(n) not in probes)
    assert not found, f"make temp files with experiments.files.temp_beside (the umask's mode): {found}"
