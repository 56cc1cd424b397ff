"""report_to: TensorBoard and trackio get every metrics row beside metrics.jsonl; a missing package warns."""

import sys

import pytest

from gxpo_lib.tracking import Trackers

ROWS = [{"kind": "eval", "step": 0, "pass@1": 0.25, "pass@1_ci": [0.1, 0.4]},
        {"kind": "train", "step": 1, "reward_mean": 0.5, "gate_open": True, "loss": None},
        {"kind": "final_eval", "step": 1, "benchmark": "arith", "pass@1": 0.5}]


def test_tensorboard_gets_every_numeric_value(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = Trackers(["tensorboard"], tmp_path, {"lr": 0.002})
    for row in ROWS:
        trackers.log(row)
    trackers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval/pass@1", "train/reward_mean", "final/arith/pass@1"} <= tags
    assert "train/gate_open" not in tags and "train/loss" not in tags  # booleans and nulls are not scalars
    assert events.Scalars("train/reward_mean")[0].value == 0.5 and events.Scalars("train/reward_mean")[0].step == 1


def test_trackio_logs_locally(tmp_path):
    pytest.importorskip("trackio")
    import time

    from trackio.utils import TRACKIO_DIR  # local-first: a database under the HF cache, no network

    start = time.time()
    trackers = Trackers(["trackio"], tmp_path / "run-a", {"lr": 0.002})
    assert "trackio" in trackers.active
    for row in ROWS:
        trackers.log(row)
    trackers.close()
    written = [p for p in TRACKIO_DIR.rglob("gxpo*") if p.stat().st_mtime >= start - 1]
    assert written, f"trackio wrote nothing under {TRACKIO_DIR}"


def test_a_missing_tracker_package_warns_and_nothing_breaks(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # as if it were not installed
    with pytest.warns(RuntimeWarning, match="trackio is not installed"):
        trackers = Trackers(["trackio", "none"], tmp_path, {})
    trackers.log(ROWS[1])
    trackers.close()
    assert trackers.active == {}
