"""Per-run tables as plain columns (numpy arrays), and their concatenation into one DataFrame.

A sweep is ~1,000 small tables. Concatenating 1,000 DataFrames costs ~1 ms each in pandas
overhead (and turns categoricals with different categories into slow object columns), so a
run's table is a dict of numpy arrays, with strings as categorical codes plus their categories,
or the Arrow table it was read as. Runs in a row whose Arrow tables have one schema of plain
types are converted together, as one table; the frame is the one that converting each run
alone and concatenating would give (:func:`concat`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

# A column: a numpy array, or (codes, categories) for a string column.
Column = np.ndarray | tuple[np.ndarray, list[str]]
Columns = dict[str, Column]

HISTOGRAM_META = ("step", "layer", "codebook", "mode", "codebook_size")


def _length(columns: Columns) -> int:
    for column in columns.values():
        return len(column[0] if isinstance(column, tuple) else column)
    return 0


def from_frame(frame: pd.DataFrame) -> Columns:
    columns: Columns = {}
    for name in frame.columns:
        series = frame[name]
        if pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
            columns[name] = series.to_numpy()
        else:  # strings (and anything else) as categorical codes
            cat = pd.Categorical(series.astype(object).where(series.notna(), None))
            columns[name] = (cat.codes.astype(np.int32), [str(c) for c in cat.categories])
    return columns


def from_arrow(table: pa.Table) -> Columns:
    """The same columns as :func:`from_frame` of the table's rows, straight from Arrow (no Python objects)."""
    columns: Columns = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        kind = column.type
        if pa.types.is_dictionary(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind):
            encoded = column.combine_chunks()
            if not pa.types.is_dictionary(encoded.type):
                encoded = encoded.dictionary_encode()
            # sorted categories, as pandas.Categorical makes them: the frame does not depend on the reader
            dictionary = [str(c) for c in encoded.dictionary.to_pylist()]
            order = np.argsort(np.array(dictionary, dtype=object), kind="stable")
            remap = np.empty(len(dictionary) + 1, dtype=np.int32)
            remap[order] = np.arange(len(dictionary), dtype=np.int32)
            remap[-1] = -1
            codes = encoded.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)
            columns[name] = (remap[codes], [dictionary[i] for i in order])
        elif pa.types.is_null(kind):
            columns[name] = np.full(len(column), np.nan)
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            if not column.null_count:
                columns[name] = column.to_numpy()
            elif pa.types.is_boolean(kind):  # as pandas does: a number column with gaps is float with NaN
                columns[name] = column.cast(pa.float64()).fill_null(np.nan).to_numpy()
            else:  # numbers with gaps come out of to_numpy as floats with NaN, without a cast first
                columns[name] = column.to_numpy().astype(np.float64, copy=False)
        else:  # lists, structs: not metrics; as strings, like from_frame does with objects
            columns.update(from_frame(pd.DataFrame({name: column.to_pandas()})))
    return columns


def to_arrow(columns: Columns) -> pa.Table:
    """Columns as an Arrow table (strings as dictionary arrays), for the cache; :func:`from_arrow` inverts it."""
    arrays, names = [], []
    for name, column in columns.items():
        if isinstance(column, tuple):
            codes, categories = column
            indices = pa.array(codes, type=pa.int32(), mask=codes < 0)
            arrays.append(pa.DictionaryArray.from_arrays(indices, pa.array(categories, type=pa.string())))
        else:
            arrays.append(pa.array(column))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def metrics_columns(rows: list[dict[str, Any]]) -> Columns:
    return from_frame(pd.DataFrame.from_records(rows))


def histogram_columns(rows: list[dict[str, Any]]) -> Columns:
    """One row per (snapshot, code) from the sparse ``codes``/``counts`` lists."""
    rows = [r for r in rows if isinstance(r.get("codes"), list) and isinstance(r.get("counts"), list)]
    lengths = np.array([min(len(r["codes"]), len(r["counts"])) for r in rows], dtype=np.int64)
    meta = pd.DataFrame.from_records([{k: r.get(k) for k in HISTOGRAM_META} for r in rows], columns=list(HISTOGRAM_META))
    frame = meta.loc[meta.index.repeat(lengths)].reset_index(drop=True)
    pairs = list(zip(rows, lengths, strict=True))
    frame["code"] = np.concatenate([np.asarray(r["codes"][:n], dtype=np.int64) for r, n in pairs] or [np.zeros(0, np.int64)])
    frame["count"] = np.concatenate([np.asarray(r["counts"][:n], dtype=np.float64) for r, n in pairs] or [np.zeros(0)])
    return from_frame(frame)


def pair_mi_columns(rows: list[dict[str, Any]]) -> Columns:
    """One row per (snapshot, bit i, bit j) from the snapshots' ``bit_pair_mi`` d x d matrices (the
    monitor's pairwise mutual information between bits, nats), ``step`` being the diagnostic step."""
    rows = [r for r in rows if isinstance(r.get("bit_pair_mi"), list) and r["bit_pair_mi"]]
    records = [{**{k: r.get(k) for k in HISTOGRAM_META}, "step": r.get("bit_pair_mi_step", r.get("step")),
                "bit_i": i, "bit_j": j, "mi": float(v)}
               for r in rows for i, row in enumerate(r["bit_pair_mi"]) for j, v in enumerate(row)]
    return from_frame(pd.DataFrame.from_records(records, columns=[*HISTOGRAM_META, "bit_i", "bit_j", "mi"]))


Part = Columns | pa.Table  # one run's rows
# Arrow types whose columns convert alike alone and in a concatenation (from_arrow's plain branches)
PLAIN_TYPES = (pa.int64(), pa.float64(), pa.bool_(), pa.null(), pa.string())


@dataclass
class Group:
    """Consecutive runs' rows as one set of columns, and each run's row count; ``tables`` are the
    runs' Arrow tables where they were converted together."""

    columns: Columns
    lengths: list[int]
    tables: list[pa.Table] | None = None


def plain(table: pa.Table) -> bool:
    """Whether every column of ``table`` is of :data:`PLAIN_TYPES` (then it can stay an Arrow table
    until :func:`concat`; any other is converted by :func:`from_arrow` as soon as it is read)."""
    return all(t in PLAIN_TYPES for t in table.schema.types)


def _groups(parts: Sequence[Part]) -> list[Group]:
    groups: list[Group] = []
    run: list[pa.Table] = []

    def flush() -> None:
        if run:
            groups.append(from_tables(run))
            run.clear()

    for part in parts:
        if isinstance(part, pa.Table) and plain(part):
            if run and not part.schema.equals(run[0].schema):
                flush()
            run.append(part)
            continue
        flush()
        columns = from_arrow(part) if isinstance(part, pa.Table) else part
        groups.append(Group(columns, [_length(columns)]))
    flush()
    return groups


def from_tables(tables: Sequence[pa.Table]) -> Group:
    """Tables of one plain schema as one :class:`Group`: :func:`from_arrow` of their concatenation,
    string categories in the order that concatenating each table's own columns would give them
    (each table's sorted categories, first-seen across the tables)."""
    lengths = [t.num_rows for t in tables]
    if len(tables) == 1:
        return Group(from_arrow(tables[0]), lengths, list(tables))
    columns = from_arrow(pa.concat_tables(tables))
    starts = np.cumsum([0, *lengths[:-1]])
    for name, column in columns.items():
        if isinstance(column, tuple):
            columns[name] = _first_seen_order(column, starts)
    return Group(columns, lengths, list(tables))


def _first_seen_order(column: tuple[np.ndarray, list[str]], starts: np.ndarray) -> tuple[np.ndarray, list[str]]:
    codes, categories = column
    firsts = pd.Series(codes, copy=False).drop_duplicates()  # index: the row each code first appears in
    firsts = firsts[firsts.to_numpy() >= 0]
    present = firsts.to_numpy()
    table_of = np.searchsorted(starts, firsts.index.to_numpy(), side="right") - 1
    order = present[np.lexsort((present, table_of))]  # by first table, then sorted (the codes are)
    remap = np.empty(len(categories) + 1, dtype=np.int32)
    remap[order] = np.arange(len(order), dtype=np.int32)
    remap[-1] = -1
    return remap[codes], [categories[i] for i in order]


def concat(parts: Sequence[Part], run_ids: Sequence[str], lead: Sequence[str]) -> pd.DataFrame:
    """One DataFrame: ``run_id`` (categorical), the ``lead`` columns, then the rest in
    first-seen order. A column missing from a part is NaN there (or a missing category)."""
    groups = _groups(parts)
    lengths = [n for g in groups for n in g.lengths]
    columns: dict[str, Any] = {
        "run_id": pd.Categorical.from_codes(
            np.repeat(np.arange(len(run_ids), dtype=np.int32), lengths), categories=list(run_ids)
        )
    }
    names = list(dict.fromkeys(n for g in groups for n in g.columns))
    for name in names:
        pieces = [g.columns.get(name) for g in groups]
        if any(isinstance(x, tuple) for x in pieces):
            columns[name] = _concat_categorical(name, pieces, groups)
        else:
            arrays = [x if x is not None else np.full(sum(g.lengths), np.nan) for x, g in zip(pieces, groups, strict=True)]
            one = len(arrays) == 1 and arrays[0].flags.writeable  # the frame owns its arrays, as a concatenation's
            columns[name] = arrays[0] if one else np.concatenate(arrays) if arrays else np.zeros(0)
    # copy=False: one block per column instead of copying every float into one 2-D block (0.8 s at 2M rows)
    frame = pd.DataFrame(columns, index=pd.RangeIndex(sum(lengths)), copy=False)
    first = [c for c in ("run_id", *lead) if c in frame]
    return frame[first + [c for c in frame if c not in first]]


def _concat_categorical(name: str, pieces: list[Column | None], groups: list[Group]) -> pd.Categorical:
    categories: dict[str, int] = {}
    for piece in pieces:
        if isinstance(piece, tuple):
            for c in piece[1]:
                categories.setdefault(c, len(categories))
    codes = []
    for piece, group in zip(pieces, groups, strict=True):
        if isinstance(piece, tuple):
            local, cats = piece
            # Map this part's codes onto the shared categories; -1 (missing) stays -1.
            lookup = np.array([categories[c] for c in cats] + [-1], dtype=np.int32)
            codes.append(lookup[local])
            continue
        if piece is None:
            codes.append(np.full(sum(group.lengths), -1, dtype=np.int32))
            continue
        # numbers in a string column: each run as its own columns have them
        runs = [piece] if group.tables is None else [from_arrow(t.select([name]))[name] for t in group.tables]
        for run, n in zip(runs, group.lengths, strict=True):
            if np.all(pd.isna(run)):
                codes.append(np.full(n, -1, dtype=np.int32))
            else:  # stringify this part
                strings = [str(v) for v in run]
                for s in strings:
                    categories.setdefault(s, len(categories))
                codes.append(np.array([categories[s] for s in strings], dtype=np.int32))
    return pd.Categorical.from_codes(np.concatenate(codes) if codes else np.zeros(0, np.int32), categories=list(categories))
