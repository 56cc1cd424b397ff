"""gxpo_lib.rl.runlog owns the run folder: rows fsync'ed, NaN never written, torn lines skipped with a warning,
old folders readable, and both trainers' train rows built by one function."""

import json
import math

import pytest

from gxpo_lib.rl import runlog


def test_rows_round_trip_and_non_finite_values_become_null(tmp_path):
    log = runlog.MetricsLog(tmp_path)
    written = log.write({"kind": "train", "step": 1, "loss": float("nan"), "ci": [0.1, float("inf")],
                         "nested": {"x": -math.inf}})
    log.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert runlog.read_rows(tmp_path) == [written] == [{"kind": "train", "step": 1, "loss": None,
                                                        "ci": [0.1, None], "nested": {"x": None}}]


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"kind": "train", "step": 1}) + "\n" + '{"kind": "train", "st')
    with pytest.warns(RuntimeWarning, match="torn last line"):
        rows = runlog.read_rows(path)
    assert rows == [{"kind": "train", "step": 1}]
    assert runlog.read_rows(tmp_path / "missing") == []


def test_resuming_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    log = runlog.MetricsLog(tmp_path)
    for step in range(5):
        log.write({"kind": "train", "step": step})
    log.close()
    runlog.MetricsLog(tmp_path, resume_step=2).close()
    assert [r["step"] for r in runlog.read_rows(tmp_path)] == [0, 1, 2]
    runlog.MetricsLog(tmp_path).close()  # a fresh run starts a fresh log
    assert runlog.read_rows(tmp_path) == []


def test_json_files_are_written_whole(tmp_path):
    runlog.write_final_eval(tmp_path, {"math500": {"pass@1": float("nan"), "pass@1_ci": [0.1, 0.2]}})
    assert runlog.read_final_eval(tmp_path) == {"math500": {"pass@1": None, "pass@1_ci": [0.1, 0.2]}}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_folder_written_by_older_code_reads_as_written(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"algorithm": "sfpo", "gate_tau": 2.0, "gate": "default"}))
    assert runlog.read_config(tmp_path) == {"algorithm": "sfpo", "gate_tau": 2.0, "gate": "default"}


def test_train_rows_have_one_key_set_and_shared_x_values():
    class Rule:  # what rule_settings_row reads of a rule
        k, alpha, r_clamp = 5, 0.5, (-2.0, 3.0)

        class gate:
            tau = 0.5

    counters = runlog.new_counters() | {"cumulative_backward_passes": 3, "seconds_sampling": 1.0, "seconds_update": 2.0}
    row = runlog.train_row(4, {"backward_passes": 3, "active": True}, Rule, [1.0, 0.0, float("nan"), 1.0],
                           counters, entropy=0.5)
    assert set(runlog.TRAIN_ROW_KEYS) <= set(row)
    assert row["reward_mean"] == pytest.approx(2 / 3) and row["accuracy"] == pytest.approx(2 / 3)
    assert row["kl"] is None and row["tau"] == 0.5 and row["step"] == 4
    assert row["seconds"] == 3.0 and row["cumulative_backward_passes"] == 3
    with pytest.raises(ValueError, match="not train-row keys"):
        runlog.train_row(1, {}, Rule, [], counters, klx=1.0)


def test_timed_adds_wall_and_cpu_seconds_of_training_phases():
    counters = runlog.new_counters()
    with runlog.timed(counters, "seconds_update"):
        sum(i * i for i in range(200_000))
    with runlog.timed(counters, "seconds_eval"):
        sum(i * i for i in range(200_000))
    assert counters["seconds_update"] > 0 and counters["seconds_eval"] > 0
    assert 0 < counters["cpu_seconds"] <= counters["seconds_update"] * 1.5 + 0.05
    assert runlog.x_values(counters)["cpu_seconds"] == counters["cpu_seconds"]


def test_seeds_are_distinct_per_purpose_and_reproducible():
    assert runlog.step_seed(3, 1) == runlog.step_seed(3, 1)
    assert len({runlog.step_seed(3, 1, salt) for salt in range(4)}) == 4
    assert runlog.eval_seed(3) != runlog.eval_seed(3, final=True)


def test_a_checkpoint_from_before_the_rename_resumes_its_running_total():
    old = {"backward_passes": 7, "seconds_sampling": 1.5}   # the running total's name before it said "cumulative"
    assert runlog.saved_counters(old) == {"cumulative_backward_passes": 7, "seconds_sampling": 1.5}
    today = runlog.new_counters() | {"cumulative_backward_passes": 9}
    assert runlog.saved_counters(today) == today
