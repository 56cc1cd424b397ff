"""The live dashboard: a background run that picks up slider changes at its next step.

Nothing here depends on how fast the machine trains: the run is held by the dashboard's own Pause (pressed
from the row callback, so before the next step starts) while the test moves sliders or presses Stop, and
every wait has a deadline that fails the test with what it waited for.
"""

import threading
import time

import pytest

from gxpo_lib.rl.runlog import read_rows
from gxpo_lib.rl.trainer import TrainConfig
from gxpo_lib.teach.dashboard import LiveDashboard

RUN_DEADLINE_S = 300  # generous for a loaded 2-core CPU; only a hung run reaches it


def wait_until(condition, what: str, board: LiveDashboard, timeout: float = RUN_DEADLINE_S) -> None:
    """Poll `condition` until it holds; fail (with the run's error, if any) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if board.error is not None:
            pytest.fail(f"the run failed while waiting for {what}: {board.error!r}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s (status: {board.status.value})")
        time.sleep(0.05)


def pause_after_first_train_row(board: LiveDashboard) -> threading.Event:
    """Press Pause from the row callback of step 1, i.e. before step 2 can start; the event is set then."""
    paused, on_row = threading.Event(), board.on_row

    def on_row_then_pause(row):
        on_row(row)
        if row["kind"] == "train" and not paused.is_set():
            board.pause_button.value = True  # what the Pause button does: the loop waits before the next step
            paused.set()

    board.on_row = on_row_then_pause  # start() hands `self.on_row` to train() as its row callback
    return paused


def finish(board: LiveDashboard) -> None:
    board.wait(timeout=RUN_DEADLINE_S)
    assert not board.running, f"the run did not end within {RUN_DEADLINE_S} s (status: {board.status.value})"
    assert board.error is None


def test_tau_slider_reaches_the_next_steps_and_figures_grow(tmp_path):
    config = TrainConfig(steps=6, batch_prompts=4, group_size=4, max_new_tokens=16, eval_every=3,
                         eval_problems=8, eval_samples=2, checkpoint_every=3, tau=0.5, gate="auto")
    board = LiveDashboard(config, tmp_path)
    board.algorithm.value = "gxpo"
    paused = pause_after_first_train_row(board)
    board.start()
    wait_until(paused.is_set, "first training step", board)
    board.tau.value = 5.0  # queued while step 2 waits: step 1 ran with the old values, 2..6 with the new
    board.k.value = 9
    board.pause_button.value = False
    finish(board)
    rows = [r for r in read_rows(tmp_path / "live-gxpo-1" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (rows[0]["tau"], rows[0]["k"]) == (0.5, config.k)
    assert [(r["tau"], r["k"]) for r in rows[1:]] == [(5.0, 9)] * 5
    reward_trace = board.figure.data[0]
    assert len(reward_trace.x) == 6
    [shown] = board.plot.outputs          # the Output widget holds the redrawn figure, not a FigureWidget
    assert len(shown["data"]["application/vnd.plotly.v1+json"]["data"][0]["x"]) == 6


def test_stop_ends_the_run_early(tmp_path):
    config = TrainConfig(steps=50, batch_prompts=2, group_size=2, max_new_tokens=8, eval_every=100,
                         eval_problems=4, eval_samples=1, checkpoint_every=1)
    board = LiveDashboard(config, tmp_path)
    paused = pause_after_first_train_row(board)
    board.start()
    wait_until(paused.is_set, "first training step", board)
    board.stop()  # Stop while step 2 waits: the run ends after exactly one step, however fast the machine
    finish(board)
    assert [r["step"] for r in board.rows if r["kind"] == "train"] == [1]
    # A new dashboard on the same folder (a restarted kernel) starts a fresh run beside the first one.
    again = LiveDashboard(config, tmp_path)
    again.start()
    again.stop()
    finish(again)
    algorithm = board.algorithm.value
    assert (tmp_path / f"live-{algorithm}-1").is_dir() and (tmp_path / f"live-{algorithm}-2").is_dir()
