"""The live dashboard: a background run that picks up slider changes at its next step."""

import time

from gxpo_lib.dashboard import LiveDashboard
from gxpo_lib.trainer import TrainConfig, read_metrics


def test_tau_slider_reaches_the_next_steps_and_figures_grow(tmp_path):
    config = TrainConfig(steps=6, batch_prompts=4, group_size=4, max_new_tokens=16, eval_every=3,
                         eval_problems=8, eval_samples=2, checkpoint_every=3, gate_tau=0.5, gate="auto")
    board = LiveDashboard(config, tmp_path)
    board.algorithm.value = "gxpo"
    board.start()
    deadline = time.time() + 120
    while not any(r["kind"] == "train" for r in board.rows) and time.time() < deadline:
        time.sleep(0.05)
    board.tau.value = 5.0
    board.k.value = 9
    board.wait(timeout=300)
    assert board.error is None
    rows = [r for r in read_metrics(tmp_path / "live-gxpo-1" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 6 and rows[0]["tau"] == 0.5
    changed = [i for i, r in enumerate(rows) if r["tau"] == 5.0]
    assert changed and all(rows[i]["tau"] == 5.0 and rows[i]["k"] == 9 for i in range(changed[0], 6))
    reward_trace = board.figure.data[0]
    assert len(reward_trace.x) == 6
    [shown] = board.plot.outputs          # the Output widget holds the redrawn figure, not a FigureWidget
    assert len(shown["data"]["application/vnd.plotly.v1+json"]["data"][0]["x"]) == 6


def test_stop_ends_the_run_early(tmp_path):
    config = TrainConfig(steps=50, batch_prompts=2, group_size=2, max_new_tokens=8, eval_every=100,
                         eval_problems=4, eval_samples=1, checkpoint_every=1)
    board = LiveDashboard(config, tmp_path)
    board.start()
    while not any(r["kind"] == "train" for r in board.rows):
        time.sleep(0.05)
    board.stop()
    board.wait(timeout=120)
    assert not board.running and len([r for r in board.rows if r["kind"] == "train"]) < 50
    # A new dashboard on the same folder (a restarted kernel) starts a fresh run beside the first one.
    again = LiveDashboard(config, tmp_path)
    again.start()
    again.stop()
    again.wait(timeout=120)
    algorithm = board.algorithm.value
    assert (tmp_path / f"live-{algorithm}-1").is_dir() and (tmp_path / f"live-{algorithm}-2").is_dir()
