"""monitor.stop_on_alarm (issue 34, item 5): a run made to collapse (inv_temperature so large that
every bit saturates) raises the monitor's saturation alarm; with stop_on_alarm it ends early as
failed with the alarm as its reason, without it the run finishes and its summary and
``slurm.status`` name the alarm."""

from __future__ import annotations

from exp_helpers import read_rows, run, smoke_config

from experiments.run_dir import RunDir, run_status
from slurm.state import _classify

COLLAPSE = ("quantizer.inv_temperature=100000.0", "logging.diagnostics_every=1", "logging.log_every=2")


def test_stop_on_alarm_ends_a_collapsing_run_as_failed_with_the_alarm(tmp_path):
    config = smoke_config(*COLLAPSE, "monitor.stop_on_alarm=true")
    summary = run(config, tmp_path)
    assert summary["status"] == "failed" and summary["step"] < summary["steps"]
    assert summary["reason"].startswith("collapse alarm: saturation at step ")
    assert "layer quantizer codebook 0" in summary["reason"]
    assert run_status(tmp_path) == "failed" and not RunDir(tmp_path).is_done()
    alarms = [r for r in read_rows(tmp_path / "metrics.jsonl") if r.get("kind") == "alarm"]
    assert alarms and alarms[0]["rule"] == "saturation"


def test_without_stop_on_alarm_the_run_finishes_and_reports_its_alarms(tmp_path):
    config = smoke_config(*COLLAPSE)
    assert "stop_on_alarm" not in config.to_dict()["monitor"]  # off by default, not listed: run ids stay
    summary = run(config, tmp_path)
    assert summary["status"] == "done" and summary["step"] == summary["steps"]
    assert summary["alarm_count"] >= 1 and summary["alarms"][0].startswith("saturation at step ")
    state, detail = _classify(tmp_path, summary, {}, "", None)
    assert state == "done" and "alarm(s), first: saturation at step" in detail
