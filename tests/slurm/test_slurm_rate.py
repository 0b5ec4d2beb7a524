"""slurm.status shows a running run's latest step rate, read from the tail of its metrics log."""

import json

from slurm.state import latest_rate


def test_latest_rate_from_the_last_train_row(tmp_path):
    assert latest_rate(tmp_path) == ""  # no log yet
    rows = [{"kind": "train", "step": 50, "step_time_s": 0.5}, {"kind": "quantizer", "step": 50},
            {"kind": "train", "step": 100, "step_time_s": 0.25}, {"kind": "val", "step": 100}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tra')
    assert latest_rate(tmp_path) == "step 100, 4 steps/s; "
    # a log written before the throughput columns existed: no rate, no error
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 7, "loss": 1.0}) + "\n")
    assert latest_rate(tmp_path) == ""


def test_latest_rate_reads_past_a_window_of_monitor_rows(tmp_path):
    """The monitor logs every step; 50 steps of its rows can fill more than the first window
    read from the end (seen: ~70 KB at 17 bits), and the rate must still be found."""
    monitor_row = json.dumps({"kind": "quantizer", "step": 0, "pad": "x" * 1400}) + "\n"
    text = json.dumps({"kind": "train", "step": 250, "step_time_s": 2.0}) + "\n" + monitor_row * 60
    (tmp_path / "metrics.jsonl").write_text(text)
    assert latest_rate(tmp_path, tail_bytes=4096) == "step 250, 0.5 steps/s; "
    assert latest_rate(tmp_path, tail_bytes=4096, max_bytes=8192) == ""  # bounded: gives up, no error
