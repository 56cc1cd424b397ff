"""scripts/gpu_check.sh --cpu-dry-run: every leg of the 15-minute GPU proof at reduced shapes on the CPU."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_dry_run_passes_every_leg():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-dry-run"], cwd=ROOT, env=env, check=False,
                          capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    table = done.stdout[done.stdout.index("\nleg "):]
    for name in ("a. peak memory", "b. GXPO vs GRPO", "c. native run", "d. TRL", "e. bf16 retention", "f. CUDA-only"):
        assert name in table, table
    assert "FAIL" not in table
