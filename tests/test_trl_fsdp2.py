"""GXPOTrainer (TRL) under accelerate's FSDP2: 2 CPU ranks (gloo) against one plain process.

tests/trl_fsdp2_script.py is launched with the shipped ``fsdp2.yaml`` accelerate config (``accelerate
launch --config_file .../fsdp2.yaml --num_processes 2 --mixed_precision no``) while the same script trains
the reference in one plain process here. accelerate 1.16 enables FSDP on accelerators only; the script's
``allow_fsdp_on_cpu`` (test-only, documented there) lifts that device-type gate and nothing else, so
accelerate's real FSDP2 preparation (``fully_shard``, DTensor optimizer parameters), gloo collectives,
sharded checkpoints, TRL's trainer and gxpo_lib's rule code all run.

Tolerance (the parameters after the last step, 2 ranks vs 1 process). The runs differ only in the order of
their sums: FSDP2 averages the two ranks' half-batch gradients (each rank's loss weighted by its share of
the window's tokens) where one process sums the whole batch; the rule adds the ranks' partial sums of its
norms; the forwards run on 4 rows instead of 8. test_trl.rounding_tolerance bounds what such reordering
explains: SUM_ROUNDING (~100) unit roundoffs of the largest update through the batch's and the layers' sums,
times what the rule does to a relative error (2 for a clipped SGD step, GXPO_AMPLIFICATION = 1e3 for
GXPO / SFPO, whose retention ratio r = g1 / g0 divides by g0), plus 2 roundoffs of the largest parameter.
- float64 (gxpo, sfpo, grpo; every operation of the step in float64, see trl_ddp_script): about 4e-14 for
  GXPO here; measured 2e-16 to 4e-16 (one or two ulps of |theta| < 2). One float32 operation left in the
  step would show as 1e-9 or more, a missing all-reduce as O(update) = 1e-3.
- LoRA (gxpo_lora, float64): the adapters are the trainable shards; the frozen base weights are sharded too.
- float32 (grpo_float32: HF's float32 RoPE, whose rounding depends on each micro-batch's padding): about
  2e-7 (u = 6e-8). GXPO and SFPO are compared in float64 only: their retention ratio's step function
  (active where |g0| > delta) turns 1e-7 float32 gradient differences into parameter differences no
  eps-based bound covers (tests/test_trl.py saw 2e-6 for DDP).
Between the ranks the StepInfo records and the gate's state are equal bit for bit; a run resumed from the
sharded checkpoint-2 ends bit for bit where the uninterrupted run does.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from gxpo_lib.integrations import accelerate_launch_args, cpu_environment
from gxpo_lib.integrations.trl_distributed import FSDP2_CONFIG_HINT, fsdp_checkpoint_problem, update_backend

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_trl import GXPO_AMPLIFICATION, SHIPPED_TINY, largest, rounding_tolerance

CASES = ("gxpo", "sfpo", "grpo", "grpo_float32", "gxpo_lora")
AMPLIFICATION = {"gxpo": GXPO_AMPLIFICATION, "sfpo": GXPO_AMPLIFICATION, "grpo": 2.0, "grpo_float32": 2.0,
                 "gxpo_lora": GXPO_AMPLIFICATION}
DTYPE = {case: torch.float32 if case.endswith("float32") else torch.float64 for case in CASES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(2-rank FSDP2 folder, 1-process folder): the script under accelerate launch and in a plain process,
    at once."""
    if not (SHIPPED_TINY / "model.safetensors").is_file():
        pytest.skip("the shipped tiny model is missing")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    folders = {n: tmp_path_factory.mktemp(f"trl-fsdp2-{n}") for n in (1, 2)}
    script = [str(REPO / "tests" / "trl_fsdp2_script.py"), "--model", str(SHIPPED_TINY)]
    env = dict(os.environ, PYTHONPATH=str(REPO), **cpu_environment(2))
    launch = accelerate_launch_args(num_processes=2, accelerate_config="fsdp2", cpu=True)
    commands = {1: [sys.executable, *script, "--out", str(folders[1]), "--mode", "reference"],
                2: [*launch, "--mixed_precision", "no", *script, "--out", str(folders[2]), "--mode", "sharded"]}
    procs = {n: subprocess.Popen(c, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, c in commands.items()}
    for n, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{n} process(es):\n" + output[-5000:]
    return folders[2], folders[1]


def report(folder: Path, case: str, rank: int = 0) -> dict:
    return json.loads((folder / f"{case}-rank{rank}.json").read_text())


def parameters(folder: Path, case: str) -> dict[str, torch.Tensor]:
    return torch.load(folder / f"{case}.pt")


def max_difference(a, b) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[name] - b[name]).abs().max()) for name in a)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_fsdp2_ranks_end_with_the_one_process_parameters(runs, case):
    sharded, reference = runs
    ranks = [report(sharded, case, r) for r in (0, 1)]
    assert ranks[0]["distributed_type"] == "DistributedType.FSDP" and ranks[0]["fsdp_version"] == 2
    assert ranks[0]["world_size"] == 2 and ranks[0]["sharded"] and ranks[0]["rule_reducer"]
    # every parameter is a shard: the tiny model's 38, or those plus 16 LoRA matrices (the trainable ones)
    assert ranks[0]["dtensor_parameters"] == ranks[0]["parameters"] == (54 if case == "gxpo_lora" else 38)
    assert ranks[0]["trainable"] == (16 if case == "gxpo_lora" else 38)
    assert not report(reference, case)["rule_reducer"]  # the reference: plain tensors, one process
    ours, theirs = parameters(sharded, case), parameters(reference, case)
    moved = max_difference(theirs, parameters(reference, f"{case}-initial"))
    assert moved > 1e-4  # a real update happened
    tolerance = rounding_tolerance(DTYPE[case], moved, largest(theirs.values()), AMPLIFICATION[case])
    difference = max_difference(ours, theirs)
    print(f"{case}: 2 FSDP2 ranks vs 1 process: max |diff| = {difference:.3g} (tolerance {tolerance:.3g})")
    assert difference <= tolerance
    assert all(p.dtype == DTYPE[case] for p in ours.values())


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_ranks_decide_identically_and_as_one_process(runs, case):
    sharded, reference = runs
    ranks = [report(sharded, case, r) for r in (0, 1)]
    one = report(reference, case)
    assert ranks[0]["steps"] == ranks[1]["steps"]  # every StepInfo field, bit for bit
    assert ranks[0]["gate"] == ranks[1]["gate"]
    keys = ("active", "fallback", "skipped", "gate_open", "backward_passes")
    assert [[s[k] for k in keys] for s in ranks[0]["steps"]] == [[s[k] for k in keys] for s in one["steps"]]
    for ours, theirs in zip(ranks[0]["steps"], one["steps"], strict=True):
        for key in ("loss", "grad_norm", "gate_z", "update_norm"):
            if theirs[key] is None:
                assert ours[key] is None
            else:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-12 if DTYPE[case] == torch.float64 else 1e-5)


@pytest.mark.slow
def test_gxpo_gate_trips_and_sfpo_runs_its_passes(runs):
    sharded, _ = runs
    gxpo = report(sharded, "gxpo")["steps"]
    assert [(s["active"], s["backward_passes"]) for s in gxpo] == [(True, 3), (False, 1), (False, 1)]
    assert [s["gate_open"] for s in gxpo] == [False, False, False]  # tripped at step 1: closed from step 2 on
    assert report(sharded, "gxpo")["gate"]["shutoff_step"] is not None
    assert [s["backward_passes"] for s in report(sharded, "sfpo")["steps"]] == [6, 6]  # K = 5 probes + 1
    lora = report(sharded, "gxpo_lora")["steps"]
    assert [(s["active"], s["backward_passes"]) for s in lora] == [(True, 3), (False, 1)]


@pytest.mark.slow
def test_sharded_checkpoint_saves_and_resume_continues_exactly(runs):
    sharded, _ = runs
    checkpoint = sharded / "gxpo" / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0" / ".metadata").is_file()  # accelerate's DCP shards
    assert (checkpoint / "optimizer_0" / ".metadata").is_file()
    assert not list(checkpoint.glob("*.safetensors"))  # no whole-model copy
    state = json.loads((checkpoint / "gxpo_state.json").read_text())
    assert state["step"] == 2 and state["rule"]["gate"]["shutoff_step"] is not None
    resumed = [report(sharded, "gxpo_resumed", r) for r in (0, 1)]
    assert resumed[0]["global_step"] == 3 and len(resumed[0]["steps"]) == 1  # only step 3 ran
    assert resumed[0]["steps"] == resumed[1]["steps"] == [report(sharded, "gxpo")["steps"][-1]]
    assert resumed[0]["gate"] == report(sharded, "gxpo")["gate"]
    assert max_difference(parameters(sharded, "gxpo_resumed"), parameters(sharded, "gxpo")) == 0.0


@pytest.mark.slow
def test_checkpoint_check_reads_sharded_checkpoints(runs, tmp_path):
    from gxpo_lib.integrations.trl_run import checkpoint_problem

    checkpoint = runs[0] / "gxpo" / "checkpoint-2"
    assert checkpoint_problem(checkpoint) is None
    damaged = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, damaged)
    (damaged / "optimizer_0" / ".metadata").unlink()
    assert "optimizer_0/.metadata" in checkpoint_problem(damaged)
    assert "optimizer_0/.metadata" in fsdp_checkpoint_problem(damaged)


@pytest.mark.slow
def test_generation_and_evaluation_on_shards_stay_in_lockstep(runs):
    # Real HF generate on the shards (each rank decodes its own completions) and an evaluation of 3
    # problems over 2 ranks (rank 1's share padded with a problem whose results are dropped): both finish
    # (the ranks' all-gathers stayed in step) and every rank ends with the same row.
    sharded, _ = runs
    ranks = [report(sharded, "generate", r) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] and len(ranks[0]["steps"]) == 2
    rows = [json.loads((sharded / f"eval-rank{r}.json").read_text()) for r in (0, 1)]
    assert rows[0] == rows[1] and len(rows[0]["correct_counts"]) == 3


def test_deepspeed_and_fsdp1_refuse_gxpo_and_sfpo_pointing_to_fsdp2():
    for algorithm in ("gxpo", "sfpo"):
        with pytest.raises(ValueError, match="algorithm=.*DeepSpeed.*fsdp_version: 2") as caught:
            update_backend(algorithm, deepspeed=True, fsdp_version=None)
        assert FSDP2_CONFIG_HINT in str(caught.value)
        with pytest.raises(ValueError, match=r"algorithm=.*FSDP1.*accelerate_config=\"fsdp2\""):
            update_backend(algorithm, deepspeed=False, fsdp_version=1)
    assert update_backend("grpo", deepspeed=True, fsdp_version=None) is True  # TRL's own step
    assert update_backend("grpo", deepspeed=False, fsdp_version=1) is True
    assert update_backend("gxpo", deepspeed=False, fsdp_version=2) is False  # the rule, on shards
    assert update_backend("gxpo", deepspeed=False, fsdp_version=None) is False


def test_fsdp_asked_on_a_cpu_without_the_patch_warns_that_it_trains_as_ddp():
    # accelerate drops the FSDP plugin on CPU ranks (the device-type gate the script lifts): say so.
    code = ("import os, warnings; os.environ['ACCELERATE_USE_FSDP'] = 'true'; os.environ['FSDP_VERSION'] = '2'\n"
            "from accelerate import Accelerator\n"
            "from gxpo_lib.integrations.trl_distributed import fsdp_dropped, fsdp_version\n"
            "accelerator = Accelerator(cpu=True)\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    print(fsdp_version(accelerator), fsdp_dropped(accelerator), str(caught[0].message))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("None True the launch asks for FSDP but accelerate runs"), done.stdout
    assert "train as DDP" in done.stdout
