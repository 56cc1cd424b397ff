"""report_to: TensorBoard and trackio get every metrics row beside metrics.jsonl; a missing package warns."""

import json
import os
import subprocess
import sys

import pytest

from gxpo_lib.rl.tracking import Trackers

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


TRACKIO_RUN = """
import json, sys
from gxpo_lib.rl.tracking import Trackers
trackers = Trackers(["trackio"], sys.argv[1], {"lr": 0.002})
assert "trackio" in trackers.active, trackers.active
for row in json.loads(sys.argv[2]):
    trackers.log(row)
trackers.close()
"""


def test_trackio_logs_locally(tmp_path):
    pytest.importorskip("trackio")
    # trackio is local-first (a database, no network) under $TRACKIO_DIR, else the user's HF cache; it reads
    # the variable once, at import. So the run goes to a child process whose TRACKIO_DIR (and HF_HOME) lie in
    # this test's temp dir: nothing is written to the global cache, and the folder starts empty.
    store = tmp_path / "trackio"
    env = {**os.environ, "TRACKIO_DIR": str(store), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", TRACKIO_RUN, str(tmp_path / "run-a"), json.dumps(ROWS)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    written = list(store.rglob("gxpo*"))
    assert written, f"trackio wrote nothing under {store}: {sorted(store.rglob('*'))}"
    assert not (tmp_path / "hf" / "trackio").exists()  # TRACKIO_DIR, not the HF cache, took the run


def test_a_missing_tracker_package_warns_and_nothing_breaks(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trackio", None)  # as if it were not installed
    with pytest.warns(RuntimeWarning, match="trackio is not installed"):
        trackers = Trackers(["trackio", "none"], tmp_path, {})
    trackers.log(ROWS[1])
    trackers.close()
    assert trackers.active == {}
