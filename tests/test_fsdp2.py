"""PlainStep, GXPO and SFPO on FSDP2 shards (2 CPU ranks, gloo) against one unsharded process.

tests/fsdp2_script.py runs every case twice in each rank: on an unsharded float64 MLP over the whole batch
and on a ``fully_shard`` copy whose rank r sees half r of the batch. Tolerances: in float64 the only
differences are summation orders: FSDP2 averages the two half-batch mean gradients where the single process
takes one mean over the whole batch, and the global norms and diagnostic sums add per-shard partial sums.
Each is a relative rounding of ~1e-16 that AdamW / SGD, the clip factor and the (clamped) q carry through
a few steps without amplification; measured: <= 8e-16 absolute on parameters of size <= 0.6, StepInfo
<= 5e-15 relative. The asserts (1e-12 on parameters, 1e-10 on StepInfo) leave three orders of margin and
would still catch any missing all-reduce (a shard's share is O(1) of a norm). Every rank's StepInfo must be
identical bit for bit (every global quantity is all-reduced, so all ranks compute it from the same
numbers), and a torch.distributed.checkpoint save / resume must reproduce the uninterrupted run exactly.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from gxpo_lib import GXPO, PlainStep
from gxpo_lib.core.distributed import reducer_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("plain_sgd", "plain_adamw", "gxpo_adamw", "gxpo_sgd", "gxpo_v1_sgd", "gxpo_v5_adamw",
         "gxpo_fallback_adamw", "sfpo_adamw", "sfpo_sgd")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("fsdp2")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run([sys.executable, os.path.join(REPO, "tests", "fsdp2_script.py"), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    with open(out / "result.json", encoding="utf-8") as handle:
        return json.load(handle)


@pytest.mark.parametrize("case", CASES)
def test_sharded_matches_one_process(result, case):
    row = result[case]
    assert row["reducer"], "the rule did not see DTensor parameters"
    assert row["param_max_abs_diff"] <= 1e-12, row
    assert row["info_max_rel_diff"] <= 1e-10, row
    assert row["info_mismatches"] == []  # active, fallback, skipped, gate_open, passes: as the reference
    assert row["ranks_identical"], "the ranks' StepInfo records differ"


def test_the_cases_cover_gate_closing_and_fallback(result):
    assert not all(result["gxpo_v5_adamw"]["gate_open"]) and any(result["gxpo_v5_adamw"]["gate_open"])
    assert not all(result["sfpo_adamw"]["gate_open"])
    assert result["gxpo_fallback_adamw"]["fallback"] == [False, True, False, False]


def test_checkpoint_resume_is_exact(result):
    row = result["checkpoint"]
    assert row["param_max_abs_diff"] == 0.0 and row["info_max_rel_diff"] == 0.0 and row["info_mismatches"] == []
    assert not all(row["gate_open"])  # the resumed gate state (window history) decided the shutoff


def test_mixed_sharded_and_plain_parameters_refused(result):
    assert "optimizer mixes DTensor" in result["mixed_error"]


def test_plain_parameters_have_no_reducer():
    x = torch.nn.Parameter(torch.zeros(3))
    assert reducer_for([x]) is None
    assert PlainStep(torch.optim.SGD([x], lr=0.1)).reducer is None
    assert GXPO(torch.optim.SGD([x], lr=0.1), gate=None).reducer is None
