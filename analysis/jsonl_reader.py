"""JSON-lines files -> columns, tolerant of what a killed writer leaves behind: Arrow's columnar
JSON reader with the standard-library parser as the fallback that repairs and notes, a finished
run's ``metrics.parquet`` read instead while it is in step, and a cache of parsed files as Arrow IPC
(no pickle) outside the run folders; docs/experiments.md gives the cache key and the timings.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pyarrow.json as arrow_json
import pyarrow.parquet as pq

from analysis import columnar as cols

# Bump when the parsed columns' layout changes, so stale cache files are never read back.
CACHE_FORMAT = 4  # 4: a log Arrow's reader took is cached as the table it read
CACHE_SUFFIX = ".arrow"
COMPACT_SOURCE_KEY = b"lfq.source_bytes"  # metrics.parquet's size of the metrics.jsonl it holds


@dataclass(frozen=True)
class LoadProblem:
    """Something wrong in a run folder. ``skipped``: the run (or this file of it) was left out;
    otherwise it was loaded after a repair, e.g. a truncated line was dropped."""

    run_dir: str
    file: str
    reason: str
    skipped: bool


def default_cache_dir() -> Path:
    env = os.environ.get("LFQ_ANALYSIS_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lfq-suite" / "analysis"


def resolve_cache(cache: bool | str | os.PathLike[str] | None) -> Path | None:
    """``True``: the default cache folder; ``False``/``None``: no cache; a path: that folder."""
    if cache is True:
        return default_cache_dir()
    if not cache:
        return None
    return Path(cache)


def parse_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a JSON-lines file and notes on the lines that had to be dropped.

    A last line without a newline that does not parse is the half-written row of a killed (or
    still writing) process: dropped. A bad line in the middle is dropped too, because a resume
    appends after such a fragment, leaving it mid-file; every drop is noted.
    """
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    if lines and lines[-1].strip() == "":
        lines.pop()
    lines = [line for line in lines if line.strip()]
    if not lines:
        return [], []
    try:
        # One call over the whole file is ~1.5x faster than one call per line.
        rows = json.loads("[" + ",".join(lines) + "]")
        if all(isinstance(r, dict) for r in rows):
            return rows, []
    except json.JSONDecodeError:
        pass
    rows, bad = [], []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad.append(number)
    notes = []
    truncated_tail = bool(bad) and bad[-1] == len(lines) and not text.endswith("\n")
    if truncated_tail:
        bad.pop()
        notes.append(f"dropped a truncated last line (line {len(lines)}, {len(lines[-1])} bytes)")
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        notes.append(f"dropped {len(bad)} unparseable line(s): {shown}")
    return rows, notes


def read_last_row(path: Path, tail_bytes: int = 16384) -> dict[str, Any] | None:
    """The last complete row of a JSON-lines file, reading only its tail (for a running run's step)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.split("\n")):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            return row
    return None


def read_compacted(path: Path) -> pa.Table | None:
    """``metrics.parquet`` beside ``path`` (a ``metrics.jsonl``) if it holds exactly that file's rows
    (its recorded source size is the JSON file's size), else None."""
    compact = path.with_suffix(".parquet")
    if not compact.exists():  # a run still going has none: a stat, not pyarrow's FileNotFoundError
        return None
    try:
        handle = pq.ParquetFile(compact)  # not pq.read_table: the dataset layer costs more than the read
        meta = handle.schema_arrow.metadata or {}
        if int(meta.get(COMPACT_SOURCE_KEY, b"-1")) != path.stat().st_size:
            return None
        return handle.read(use_threads=False)
    except (OSError, ValueError, pa.ArrowException):
        return None


def read_jsonl_arrow(path: Path) -> pa.Table | None:
    """The file by Arrow's JSON reader, or None where it cannot read it as written (then parse_jsonl).

    json.dumps writes NaN for a NaN metric, which is not JSON. Arrow's reader takes it as a float
    NaN, which the columns turn into what a null gives (NaN, a float column); only where that could
    differ (a string or a name holding ": NaN", a nested value) or where the reader refuses it (a
    NaN in a string column) is the file read again with ``": NaN"`` replaced by ``": null"``, an
    Arrow compute call that lets go of the GIL (threads read many files side by side)."""
    data = path.read_bytes()
    if not data.endswith(b"\n"):  # a torn last line (or an empty file)
        return None
    # inf, which JSON lacks (a one-byte find is a memchr, ~10x the speed of the word's search)
    if data.find(b"I") >= 0 and b"Infinity" in data:
        return None
    table = _read_json(pa.py_buffer(data))
    if table is not None and cols.plain(table) and not _mentions(table, ": NaN"):
        return table
    if data.find(b": NaN") < 0:
        return table
    offsets = pa.py_buffer(struct.pack("=2q", 0, len(data)))  # one value: the whole file, not copied
    text = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data)])
    return _read_json(pc.replace_substring(text, ": NaN", ": null")[0].as_buffer())


def _read_json(data: pa.Buffer) -> pa.Table | None:
    try:
        return arrow_json.read_json(pa.BufferReader(data), read_options=arrow_json.ReadOptions(use_threads=False))
    except (pa.ArrowException, ValueError):
        return None


def _mentions(table: pa.Table, text: str) -> bool:
    """Whether a column name or a string value of ``table`` holds ``text``."""
    if any(text in name for name in table.column_names):
        return True
    strings = [chunk for column in table.columns if column.type == pa.string() for chunk in column.chunks]
    # one compute call for all of them: a file's few string columns are small, the call's overhead is not
    hits = pc.match_substring(pa.chunked_array(strings, pa.string()), text)
    return any(chunk.true_count for chunk in hits.chunks)


@dataclass
class Source:
    """A file to load, with its ``stat`` taken before any read (a file still growing must not be
    cached as complete) and, when a cache key needs it, its resolved path."""

    path: Path
    stat: os.stat_result = field(init=False)

    def __post_init__(self) -> None:
        self.stat = self.path.stat()  # raises FileNotFoundError for a run without this file

    @cached_property
    def real(self) -> str:
        return str(self.path.resolve())


def _cache_file(cache_dir: Path, source: Source, kind: str) -> tuple[Path, str]:
    key = hashlib.sha1(f"{CACHE_FORMAT}|{pa.__version__}|{kind}|{source.real}".encode()).hexdigest()
    return cache_dir / f"{key}-{source.stat.st_size}-{source.stat.st_mtime_ns}{CACHE_SUFFIX}", key


def cache_listing(cache_dir: Path | None) -> dict[str, list[str]]:
    """The per-file entries in ``cache_dir`` by key (one listing per load, not a glob per file)."""
    try:
        names = os.listdir(cache_dir) if cache_dir is not None else []
    except OSError:
        return {}
    entries: dict[str, list[str]] = {}
    for name in names:
        if name.endswith(CACHE_SUFFIX) and not name.startswith(("set-", ".")):
            entries.setdefault(name.split("-", 1)[0], []).append(name)
    return entries


def write_atomic(target: Path, write: Callable[[Path], object]) -> None:
    """``write(temp_path)`` beside ``target``, then rename: a reader never sees half a file.

    The temp file is made with mode 0o666 less the umask (0644 under 022), as a plain ``open``
    would, not ``mkstemp``'s 0600: a report on shared storage is meant to be read by others."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(target)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def temp_beside(target: Path) -> tuple[int, str]:
    """A new empty file ``.<name>.<random>.tmp`` beside ``target``: (open descriptor, path)."""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), str(tmp)
        except FileExistsError:  # another writer's temp file of the same name: draw again
            continue
    raise FileExistsError(f"no free temp file name beside {target} after 100 tries")


def temp_dir_beside(target: Path) -> Path:
    """A new empty folder ``.<name>.tmp-<random>`` beside ``target``, mode 0o777 less the umask
    (``mkdtemp`` would make it 0700 whatever the umask)."""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temp folder name beside {target} after 100 tries")


Parsed = tuple[cols.Part, list[str]]
Build = Callable[[list[dict[str, Any]]], cols.Columns]


def set_cache_file(cache_dir: Path, kind: str, files: list[tuple[str, Path, Source | None]], scope: str) -> Path:
    """The cache file of one whole load: keyed on every file's run id, path, size and mtime (None
    for a file that is not there), so that any change to any of them (or another set of runs) misses
    it. ``scope`` (the folder loaded) names it: each scope keeps only its newest set entry."""
    parts = [CACHE_FORMAT, pa.__version__, pd.__version__, kind]
    for run_id, path, source in files:
        if source is None:
            parts.append((run_id, str(path), None, None))
        else:
            parts.append((run_id, source.real, source.stat.st_size, source.stat.st_mtime_ns))
    key = hashlib.sha1(json.dumps(parts).encode()).hexdigest()
    where = hashlib.sha1(f"{kind}|{scope}".encode()).hexdigest()[:16]
    return cache_dir / f"set-{where}-{key}{CACHE_SUFFIX}"


def read_set_cache(target: Path) -> tuple[pd.DataFrame, list[LoadProblem]] | None:
    try:
        table = feather.read_table(str(target), memory_map=True)
        problems = [LoadProblem(**p) for p in json.loads((table.schema.metadata or {})[b"lfq.problems"])]
        return table.to_pandas(split_blocks=True), problems  # no 2-D block copy of every column
    except FileNotFoundError:
        return None
    except Exception:  # damaged: rebuilt, never trusted
        target.unlink(missing_ok=True)
        return None


def write_set_cache(target: Path, frame: pd.DataFrame, problems: list[LoadProblem]) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = {**(table.schema.metadata or {}), b"lfq.problems": json.dumps([vars(p) for p in problems]).encode()}
    # one set entry per scope is kept: the newest load's (older ones are of files that changed since)
    for old in target.parent.glob(target.name.rsplit("-", 1)[0] + "-*" + CACHE_SUFFIX):
        old.unlink(missing_ok=True)
    try:
        write_atomic(target, lambda tmp: feather.write_feather(table.replace_schema_metadata(meta), str(tmp),
                                                               compression="uncompressed"))
    except OSError:
        pass  # an unwritable cache only costs speed


def _write_cache(target: Path, parsed: Parsed) -> None:
    part, notes = parsed
    table = part if isinstance(part, pa.Table) else cols.to_arrow(part)
    table = table.replace_schema_metadata({b"lfq.notes": json.dumps(notes).encode()})
    write_atomic(target, lambda tmp: feather.write_feather(table, str(tmp), compression="uncompressed"))


def stale_entries(listing: dict[str, list[str]], source: Source, kind: str, cache_dir: Path | None) -> list[str]:
    """The names of ``source``'s entries in ``listing`` (on a miss: all of older versions of the file)."""
    return listing.get(_cache_file(cache_dir, source, kind)[1], []) if cache_dir is not None else []


def cache_lookup(source: Source, kind: str, cache_dir: Path | None,
                 listing: dict[str, list[str]] | None = None) -> Parsed | None:
    """The cached ``(part, notes)`` of ``source`` if the file is unchanged since it was cached, else
    None. ``listing`` (:func:`cache_listing`): the entries there are, so that a miss opens nothing."""
    if cache_dir is None:
        return None
    target, key = _cache_file(cache_dir, source, kind)
    if listing is not None and target.name not in listing.get(key, ()):
        return None
    try:
        table = feather.read_table(str(target), memory_map=True)  # zero-copy: no read of the columns it maps
        notes = json.loads((table.schema.metadata or {})[b"lfq.notes"])
        return as_part(table), [str(n) for n in notes]
    except FileNotFoundError:
        return None
    except Exception:  # a damaged cache entry is rebuilt, never trusted (and it is data: it cannot run code)
        target.unlink(missing_ok=True)
        return None


def as_part(table: pa.Table) -> cols.Part:
    """A table read, kept as it is where :func:`analysis.columnar.concat` can take it (plain types),
    else its columns: a conversion that fails, fails here, on this file alone."""
    return table if cols.plain(table) else cols.from_arrow(table)


def parse(path: Path, kind: str, build: Build) -> tuple[Parsed, bool]:
    """``(part, notes)`` of one file, and whether it came from a Parquet compaction (no need to cache
    it then): metrics from ``metrics.parquet`` or Arrow's reader when they can (:func:`as_part` of
    the table they read), else ``build(rows)`` of :func:`parse_jsonl` (which repairs and notes)."""
    if kind == "metrics":
        table = read_compacted(path)
        if table is not None:
            return (as_part(table), []), True
        table = read_jsonl_arrow(path)
        if table is not None:
            return (as_part(table), []), False
    rows, notes = parse_jsonl(path)
    return (build(rows), notes), False


def parse_and_cache(source: Source, kind: str, build: Build, cache_dir: Path | None,
                    stale: Sequence[str] | None = None) -> Parsed:
    """:func:`parse`, stored in the cache in place of the file's older entries (``stale``: their
    names, from :func:`cache_listing`; None: looked up)."""
    parsed, compacted = parse(source.path, kind, build)
    if cache_dir is not None and not compacted:
        target, key = _cache_file(cache_dir, source, kind)
        # Entries for older versions of this file are dead weight: drop them.
        if stale is None:
            stale = [p.name for p in cache_dir.glob(f"{key}-*")]
        for name in stale:
            (cache_dir / name).unlink(missing_ok=True)
        try:
            _write_cache(target, parsed)
        except OSError:
            pass  # an unwritable cache only costs speed
    return parsed


def parse_and_cache_safely(source: Source, kind: str, build: Build, cache_dir: Path | None,
                           stale: Sequence[str] | None = None) -> Parsed | str:
    """:func:`parse_and_cache`, or the error as text (for pool workers)."""
    try:
        return parse_and_cache(source, kind, build, cache_dir, stale)
    except (OSError, ValueError, TypeError, KeyError, pa.ArrowException) as err:
        return f"unreadable: {err}"
