"""PlainStep, GXPO and SFPO on FSDP2 shards (2 CPU ranks, gloo) against one unsharded process.

tests/fsdp2_script.py runs every case twice in each rank: on an unsharded float64 MLP over the whole batch
and on a ``fully_shard`` copy whose rank r sees half r of the batch. In float64 the only differences are
summation orders: FSDP2 averages the two half-batch mean gradients where the single process takes one mean
over the whole batch (8 rows), and the global norms and diagnostic sums add per-shard partial sums.

Tolerance, from the arithmetic. Two orders of one sum of n terms differ by at most n x eps relative to the
sum of |terms| (eps = 2.2e-16, float64). The largest reordered sum is the global gradient norm over all
n = 440 coordinates of the MLP, and it reaches the weights through the clip factor (the clip bites in most
cases: one-process gradient norms 0.38-2.3 against max_grad_norm 0.5 or 1.0). Each backward pass feeds one
update, whose rounding is relative to the weights' scale |w|, and GXPO's jump multiplies an update by q <=
K/2 + 1 (SFPO's reposition by alpha = 0.8 <= 1). After P passes the weights may differ by
eps x n x P x (K/2 + 1) x |w|. The largest case, gxpo_v5_adamw (20 passes, K = 5, |w| <= 0.583), gives
2.2e-16 x 440 x 20 x 3.5 x 0.583 = 4.0e-12. sfpo_adamw (50 passes, |w| <= 0.585) gives 2.8e-12 and
gxpo_adamw (18 passes) 3.5e-12; the passes and |w| were counted from one-process runs of the cases.
PARAM_TOL = 1e-11 is at or above that bound. StepInfo fields are reductions over <= 440 coordinates
(440 eps = 9.7e-14 relative) of quantities taken at weights within 4.0e-12 of each other, 1.1e-11
relative to the smallest case's |w| (0.373); INFO_TOL = 1e-10 (relative) is above their sum. Measured: at
most 7.5e-16 on the weights (gxpo_adamw), StepInfo 4.6e-15 relative (gxpo_v5_adamw); the worst case above
assumes every rounding adds up the same way, which they do not. A missing all-reduce is still caught: it
changes a norm by one shard's share, O(1) of itself, so the clip factor and every update by O(1). The
bound is first-order: it leaves out AdamW's division by sqrt(v) + eps at a coordinate whose gradient is
near 0 (the measurement covers it here).

Every rank's StepInfo must be identical bit for bit (every global quantity is all-reduced, so all ranks
compute it from the same numbers), and a torch.distributed.checkpoint save / resume must reproduce the
uninterrupted run exactly.
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
PARAM_TOL, INFO_TOL = 1e-11, 1e-10   # the module docstring derives both
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
    assert row["param_max_abs_diff"] <= PARAM_TOL, row
    assert row["info_max_rel_diff"] <= INFO_TOL, row
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
