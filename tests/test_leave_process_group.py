"""Ranks leave their gloo process group before the interpreter's teardown (core.distributed.leave_process_group).

A group that an object still holds outlives ``destroy_process_group``; its worker threads then end while the
interpreter is torn down, where they abort a finished rank now and then ("terminate called without an active
exception": 1 launch in 15 of tests/test_trl.py's two-rank run, later rarer but still once in a CI run). The
abort is rare; its precondition is not: gloo threads still running after the group was destroyed, which every
such launch had. That is what these tests look at (and test_trl.py's launcher test, through trl_run's warning).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# One process, a world of 1 over gloo, and a trainer-like object holding the group in a reference cycle (as
# TRL's trainer does through its DDP wrapper, with callbacks that point back at it).
CHILD = r"""
import json, os, socket, sys
import torch, torch.distributed as dist
from gxpo_lib.core.distributed import gloo_threads, leave_process_group
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=0, world_size=1)

class Trainer:
    def __init__(self):
        self.group, self.callbacks = dist.group.WORLD, [self]

trainer = Trainer()
dist.all_reduce(torch.ones(2), group=trainer.group)
before = gloo_threads()
if sys.argv[1] == "dropped":
    del trainer   # a cycle: only the collector frees it
left = leave_process_group()
print(json.dumps({"before": before, "left": left, "initialized": dist.is_initialized()}))
"""


def _run(mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD, mode], check=False, cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from /proc (Linux)")
def test_a_dropped_wrapper_leaves_no_gloo_thread_and_a_held_one_is_reported():
    dropped = _run("dropped")
    assert dropped["before"], "gloo runs worker threads while the group lives"
    assert dropped["left"] == [] and dropped["initialized"] is False
    held = _run("held")   # what trl_run.main did before the fix: destroy with the trainer still alive
    assert held["left"] and all("gloo" in name for name in held["left"])
    assert held["initialized"] is False   # destroyed, yet its threads run on: the teardown hazard


def test_a_single_process_has_nothing_to_leave():
    from gxpo_lib.core.distributed import leave_process_group
    assert leave_process_group() == []
