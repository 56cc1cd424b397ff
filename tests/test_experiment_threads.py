"""The CPU thread default of a run (`gxpo_lib.experiment.CPU_THREADS`, set by `experiment.cpu_threads`): a CPU
run through `gxpo_lib.run` trains with that many torch threads, unless OMP_NUM_THREADS is set or the caller
chose a count after importing gxpo_lib; a CUDA machine keeps torch's count. Each case runs in a fresh
interpreter, so this process's thread count (conftest's) is never touched, and OMP_NUM_THREADS (which conftest
exports) is removed from the child's environment unless the case sets it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# argv: threads set before gxpo_lib is imported ("-": none), threads set after it ("-": none), "run" (gxpo_lib.run
# up to the trainer, which records the count and stops) or "cuda" (cpu_threads() with CUDA reported available),
# the run folder. Prints {"threads": ..., "cpu_threads": CPU_THREADS, "initial": torch's count at start}.
CHILD = r"""
import json, sys
import torch
initial = torch.get_num_threads()
before, after, mode, workdir = sys.argv[1:5]
if before != "-":
    torch.set_num_threads(int(before))      # before the import: torch's own count, not a caller's choice
import gxpo_lib
from gxpo_lib import experiment
from gxpo_lib.rl import trainer
if after != "-":
    torch.set_num_threads(int(after))       # after the import: the caller's choice

class Stop(Exception):
    pass

def train(config, run_dir, progress=True):  # the trainer, reached once the run is set up: record and stop
    raise Stop(torch.get_num_threads())

if mode == "cuda":
    torch.cuda.is_available = lambda: True
    threads = experiment.cpu_threads()
else:
    trainer.train = train
    try:
        gxpo_lib.run("smoke", {"steps": 1}, workdir, figures=False, progress=False)
        raise SystemExit("the run did not reach the trainer")
    except Stop as stop:
        threads = stop.args[0]
print(json.dumps({"threads": threads, "cpu_threads": experiment.CPU_THREADS, "initial": initial}))
"""


def _child(tmp_path, before="-", after="-", mode="run", omp=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if omp is not None:
        env["OMP_NUM_THREADS"] = str(omp)
    done = subprocess.run([sys.executable, "-c", CHILD, before, after, mode, str(tmp_path / "run")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_documented_count_is_the_constant():
    """bench/README.md "Threads for CPU runs" states the count CPU_THREADS holds."""
    from gxpo_lib import experiment

    text = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    documented = re.search(r"sets (\d+) torch threads? for a CPU run", text)
    assert documented, "bench/README.md no longer says how many threads a CPU run gets"
    assert int(documented.group(1)) == experiment.CPU_THREADS


def test_a_cpu_run_trains_with_cpu_threads_whatever_torch_started_with(tmp_path):
    # torch started with 3 threads (set before gxpo_lib was imported: not a caller's choice): CPU_THREADS wins
    result = _child(tmp_path, before="3")
    assert result["cpu_threads"] != 3, "pick another starting count: this one equals CPU_THREADS"
    assert result["threads"] == result["cpu_threads"]


def test_a_cpu_run_with_torchs_default_count_gets_cpu_threads(tmp_path):
    result = _child(tmp_path)
    assert result["threads"] == result["cpu_threads"]


def test_omp_num_threads_in_the_environment_wins(tmp_path):
    result = _child(tmp_path, omp=2)             # torch starts with it (capped at the cores: 1 on a 1-core machine)
    assert result["threads"] == result["initial"]
    if result["initial"] == result["cpu_threads"]:
        pytest.skip("torch started with CPU_THREADS threads here (one core): nothing to tell apart")


def test_a_count_the_caller_set_after_importing_gxpo_lib_wins(tmp_path):
    assert _child(tmp_path, before="3", after="2")["threads"] == 2


def test_a_cuda_machine_keeps_torchs_count(tmp_path):
    assert _child(tmp_path, before="3", mode="cuda")["threads"] == 3
