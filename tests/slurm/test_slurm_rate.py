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
