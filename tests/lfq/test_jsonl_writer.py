"""The one JSON-lines appender (lfq.jsonl_writer): one record per line, non-finite floats as JSON extensions,
whole lines under concurrent appenders, and a torn last line never swallowing the next record."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest

from lfq import JsonlSink
from lfq.jsonl_writer import append_jsonl


def test_records_become_lines_in_their_key_order_or_sorted(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "log.jsonl"  # the folder is created
    append_jsonl(path, [{"b": 1, "a": "x"}, {"step": 2}])
    append_jsonl(path, [{"b": 1, "a": "x"}], sort_keys=True)
    append_jsonl(path, [])  # nothing, not even an empty line
    assert path.read_text() == '{"b": 1, "a": "x"}\n{"step": 2}\n{"a": "x", "b": 1}\n'


def test_non_finite_floats_round_trip_as_json_extensions(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    append_jsonl(path, [{"nan": math.nan, "inf": math.inf, "ninf": -math.inf}])
    assert path.read_text() == '{"nan": NaN, "inf": Infinity, "ninf": -Infinity}\n'
    row = json.loads(path.read_text())
    assert math.isnan(row["nan"]) and row["inf"] == math.inf and row["ninf"] == -math.inf


def test_a_single_record_is_refused_rather_than_iterated(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="sequence of records"):
        append_jsonl(tmp_path / "log.jsonl", {"step": 1})  # type: ignore[arg-type]
    assert not (tmp_path / "log.jsonl").exists()


def test_a_torn_last_line_is_closed_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # a writer killed mid-line
    append_jsonl(path, [{"step": 3}])
    lines = path.read_text().splitlines()
    assert lines == ['{"step": 1}', '{"step": 2, "lo', '{"step": 3}']  # step 3 whole, on its own line


def test_concurrent_appenders_keep_every_line_whole(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writers, per_writer = 8, 50
    pad = "x" * 300  # several records per page: writes that cross page boundaries too

    def write(w: int) -> None:
        for i in range(per_writer):
            append_jsonl(path, [{"writer": w, "i": i, "pad": pad}, {"writer": w, "i": -i - 1}], fsync=False)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]  # each non-blank line parses
    assert len(rows) == writers * per_writer * 2
    for w in range(writers):  # every writer's batches arrive whole and in its order
        mine = [r["i"] for r in rows if r["writer"] == w]
        assert mine == [v for i in range(per_writer) for v in (i, -i - 1)]


def test_the_monitor_sink_appends_through_it(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "los')
    JsonlSink(path)([{"step": 2, "loss": math.nan}])
    assert path.read_text().splitlines()[1] == '{"step": 2, "loss": NaN}'
