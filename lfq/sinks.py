"""Where the monitor's records go.

A sink is any callable that takes a list of flat dict records. ``MemorySink`` keeps them in
memory (tests, notebooks); ``JsonlSink`` appends them to a JSON-lines file, the only file I/O
in ``lfq``. Non-finite floats are written as the JSON extensions ``NaN``/``Infinity``, which
``pandas.read_json(path, lines=True)`` and Python's ``json`` read back as floats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

Record = dict[str, Any]
Sink = Callable[[list[Record]], None]


class MemorySink:
    """Keeps every record in ``self.records``, in the order received."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def __call__(self, records: list[Record]) -> None:
        self.records.extend(records)

    def to_frame(self):
        """The records as a ``pandas.DataFrame`` (pandas is imported here, not by ``lfq``)."""
        try:
            import pandas as pd
        except ImportError as err:  # lfq must import with torch and einops alone
            raise ImportError("MemorySink.to_frame needs pandas; install it or read .records") from err
        return pd.DataFrame.from_records(self.records)


class JsonlSink:
    """Appends one JSON object per record to ``path``.

    Every batch is written with a single ``write``, flushed and fsynced before returning, so
    a killed process loses at most the records the monitor had not yet flushed (and at worst
    leaves one partial last line if it dies mid-write). The file is opened per batch: the
    monitor flushes every ``log_every`` steps, so this costs nothing that matters, and a
    training loop may truncate the file (on resume) between batches without reopening us.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if path.exists() and path.is_dir():
            raise ValueError(f"JsonlSink needs a file path, got the directory {str(path)!r}")
        self.path = path

    def __call__(self, records: list[Record]) -> None:
        if not records:
            return
        # allow_nan: NaN marks "not reported" (eval-mode losses); pandas reads it as NaN.
        text = "".join(json.dumps(record, allow_nan=True) + "\n" for record in records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"
