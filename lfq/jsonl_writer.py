"""The one JSON-lines appender of the lfq -> experiments -> slurm chain (:func:`append_jsonl`:
``metrics.jsonl``, ``histograms.jsonl``, a sweep's ``_sweep/*.jsonl``), one JSON object per line
with NaN and infinities as the JSON extensions; the format is docs/records.md ("The JSON-lines
files") and how appends stay whole is docs/ARCHITECTURE.md ("Who owns which file format").
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def encode_line(record: Mapping[str, Any], *, sort_keys: bool = False) -> str:
    """``record`` as one line of JSON, newline included (NaN and infinities as their JSON extensions)."""
    return json.dumps(record, allow_nan=True, sort_keys=sort_keys) + "\n"


def append_jsonl(path: str | os.PathLike[str], records: Sequence[Mapping[str, Any]], *, sort_keys: bool = False,
                 fsync: bool = True) -> None:
    """Append ``records`` to ``path``, one line each, in one ``write``; the folder is created if need be.
    The file is opened with ``O_APPEND`` for this call only, so concurrent appenders never overwrite
    each other, and a file truncated between calls (a resume) is appended to at its new end.
    ``fsync``: the lines are on disk when this returns (a killed process loses none of them). If the
    file ends inside a line (its writer was killed mid-write), that line is ended first, so the torn
    record never swallows the first of these (a concurrent appender caught mid-write can make that a
    blank line, which readers skip). ``sort_keys``: keys in sorted order (records whose key
    order carries no meaning); otherwise in the order given. Nothing is written for no records.
    """
    if isinstance(records, Mapping):
        raise TypeError("append_jsonl takes a sequence of records; wrap a single record in a list")
    if not records:
        return
    data = "".join(encode_line(record, sort_keys=sort_keys) for record in records).encode("utf-8")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)  # less the umask, as open() does; read: the last byte
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        view = memoryview(data)
        while view:  # one write in practice; a short write (a signal, a full quota) continues where it stopped
            view = view[os.write(fd, view):]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)

