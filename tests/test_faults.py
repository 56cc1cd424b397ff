"""A run killed with SIGKILL at random points resumes with no logged step lost or duplicated, and ends
where an uninterrupted run ends; non-finite losses never reach the parameters."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gxpo_lib.rl.runlog import read_rows
from gxpo_lib.rl.trainer import TrainConfig, train

SCRIPT = Path(__file__).parent / "scripts" / "train_run.py"
TIME_KEYS = {"seconds", "seconds_sampling", "seconds_scoring", "seconds_update", "seconds_eval", "cpu_seconds"}
CONFIG = dict(algorithm="gxpo", steps=6, batch_prompts=4, group_size=4, max_new_tokens=12, eval_every=3,
              eval_problems=8, eval_samples=2, checkpoint_every=1, seed=11, tau=5.0)


def without_times(rows):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path):
    reference = train(TrainConfig(**CONFIG), tmp_path / "reference")
    killed_dir = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    rng = random.Random(0)
    kills = 0
    # Several kills at random moments, tied to the run's progress rather than to the clock (a fast machine
    # would otherwise finish before a timed kill): once the log holds `target` train rows, wait a random
    # fraction of a step (sampling, the update or the checkpoint write is in flight) and SIGKILL. A step's
    # length is this machine's: the reference run's training seconds per step (a step's wall time, with its
    # checkpoint write, is longer), so the kill lands within the next step on a fast or a slow machine.
    last = [r for r in read_rows(tmp_path / "reference" / "metrics.jsonl") if r["kind"] == "train"][-1]
    step_seconds = last["seconds"] / CONFIG["steps"]  # cumulative sampling + scoring + update seconds
    for target in sorted(rng.sample(range(1, CONFIG["steps"] - 1), 3)):
        proc = subprocess.Popen([sys.executable, str(SCRIPT), json.dumps(CONFIG), str(killed_dir)], env=env)
        deadline = time.monotonic() + 300
        while proc.poll() is None and _train_rows(killed_dir) < target:
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the run logged {_train_rows(killed_dir)} < {target} train rows within 300 s")
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0) * step_seconds)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        metrics = killed_dir / "metrics.jsonl"
        for line in (metrics.read_text().splitlines()[:-1] if metrics.exists() else []):
            json.loads(line)  # every complete line parses; only the last may be torn
    subprocess.run([sys.executable, str(SCRIPT), json.dumps(CONFIG), str(killed_dir)], env=env, check=True)
    assert kills >= 2
    rows = read_rows(killed_dir / "metrics.jsonl")
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == list(range(1, CONFIG["steps"] + 1))           # none lost, none duplicated
    assert without_times(rows) == without_times(read_rows(tmp_path / "reference" / "metrics.jsonl"))
    state = torch.load(max((killed_dir / "checkpoints").glob("step_*.pt")), weights_only=False)
    for name, p in reference["model"].named_parameters():
        if p.requires_grad:
            assert torch.equal(state["trainable"][name], p.detach()), name


def _train_rows(folder: Path) -> int:
    """Complete train rows logged so far (a torn last line is not counted)."""
    return sum(1 for r in read_rows(folder / "metrics.jsonl") if r.get("kind") == "train")


class PoisonedLoss:
    """Wraps grpo_objective so that chosen calls return a NaN or inf loss (one call per pass: no micro-batches)."""

    def __init__(self, original, bad_calls, value):
        self.original, self.bad_calls, self.value, self.calls = original, set(bad_calls), value, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        loss, stats = self.original(*args, **kwargs)
        return (loss * self.value if self.calls in self.bad_calls else loss), stats


@pytest.mark.parametrize("algorithm, bad_call", [("gxpo", 1), ("gxpo", 2), ("gxpo", 3), ("sfpo", 2), ("grpo", 1)])
def test_nonfinite_loss_in_any_pass_is_logged_and_never_reaches_parameters(tmp_path, monkeypatch, algorithm, bad_call):
    import gxpo_lib.core.objective as objective_module  # PolicyObjective, the closure of every pass, calls it

    poisoned = PoisonedLoss(objective_module.grpo_objective, {bad_call}, float("nan"))
    monkeypatch.setattr(objective_module, "grpo_objective", poisoned)
    # The smallest evaluation: this test reads only the train rows.
    config = TrainConfig(**(CONFIG | {"algorithm": algorithm, "steps": 2, "eval_every": 10, "gate": "none",
                                      "eval_problems": 1, "eval_samples": 1}))
    summary = train(config, tmp_path)
    rows = [r for r in read_rows(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 2
    assert poisoned.calls >= bad_call  # the poisoned pass ran
    assert rows[0]["fallback"] or rows[0]["skipped"]
    assert all(torch.isfinite(p).all() for p in summary["model"].parameters())
