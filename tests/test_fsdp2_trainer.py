"""`train` under torchrun: 2 FSDP2 ranks (gloo, CPU) against one process.

tests/fsdp2_trainer_script.py runs the cases of its `CASES` on 2 ranks: the shipped tiny model in float64,
GXPO with full fine-tuning (token_mean, evaluations, a final benchmark), GRPO with full fine-tuning (loss_type
grpo, a KL term against the sharded frozen reference) and SFPO with LoRA (dapo), 2-3 steps each. It also
runs one GXPO run stopped after step 2 and resumed to step 3 from its DCP checkpoint, and one resumed from a
copy whose newest checkpoint has garbage shards. While the script runs, this module runs each case's
reference in one process with ``prompt_shares=2``. That process samples the same two prompt shares in
turn, with the same per-share seeds. So both runs see the same rollouts: the same tokens, since the
sampling logits differ by float64 rounding only. The comparison therefore covers the whole step, sampling
included.

Tolerance, from the arithmetic. In float64 the two runs differ only in summation order:
- FSDP2 averages two half-batch gradients, each rank's loss divided by half the global token or row count,
  where one process sums the whole batch.
- The sharded forwards run on 8 rows where one process runs 16.
- The sharded LM head takes the autograd path where one process uses the fused chunked head.
- The rules add per-shard partial sums.
Two orders of one sum of n terms differ by at most n x eps relative to the sum of |terms| (float64:
eps = 2.2e-16). Two kinds of reordered sums reach the weights:
- Every gradient coordinate sums over the batch's tokens: n <= 16 rows x 62 = 992 (the 3,000 arith training
  prompts are 22-46 tokens in the tiny model's chat format, T <= 16). As in tests/test_fsdp2.py, a pass's
  rounding is taken relative to the weights' scale |w|, and GXPO's jump multiplies an update by q <= K/2 + 1.
  After P passes that gives eps x n x P x (K/2 + 1) x |w|.
- The global gradient norm sums 758,400 squares (full fine-tuning). It reaches the weights only through the
  clip factor, and only where the clip bites: grpo_full_kl's step 2 (one-process pass norms 1.66 there,
  0.07-0.56 everywhere else, against max_grad_norm 1.0). The clip scales one step's whole gradient; the
  square root halves the sum's relative rounding (rho <= n eps / 2). AdamW's m^ / sqrt(v^) has |.| <= 1.0014
  in the first two steps and moves by at most 2 rho under that scaling, so a clipped pass moves a weight by
  at most eps x 758,400 x lr = 3.3e-13 (lr 2e-3).
Per case, with P and |w| counted from one-process runs:
- gxpo_full (P = 8, K = 3, |w| <= 1.536): 2.2e-16 x 992 x 8 x 2.5 x 1.536 = 6.7e-12;
- grpo_full_kl (P = 2, |w| <= 1.534): 6.7e-13 + 3.3e-13 = 1.0e-12;
- sfpo_lora_dapo (P = 6, the LoRA adapters |w| <= 0.136, SFPO's reposition alpha <= 1): 1.8e-13.
PARAM_TOL = 1e-11 is above the largest. The bound is first-order. It leaves out AdamW's division by sqrt(v)
+ eps at a coordinate whose gradient terms cancel: a rounding difference there can grow by up to lr / eps.
Measured on 2026-12-06 (printed by the test): gxpo_full 2.14e-14, grpo_full_kl 1.19e-14, sfpo_lora_dapo 4.35e-14.
An earlier version of this docstring recorded up to 1.3e-13, which is still under each case's bound.
The other tolerances:
- Train and eval rows: reductions over at most 758,400 terms (1.7e-10 relative), at weights within the
  bound. ROW_TOL = 1e-9 relative; measured at most 1.21e-15. The rows hold the loss and the gradient norms,
  so they catch a missing all-reduce or a wrong normaliser, an O(1) change, even where AdamW's invariance to
  a gradient's scale would hide it in the weights.
- The float32 statistics (`FLOAT32_KEYS`): the entropy is a float32 mean over at most 16 x 16 = 256 tokens,
  so 256 x 1.19e-7 = 3.1e-5 relative; clip_frac is a ratio of counts. FLOAT32_TOL = 5e-5.
Between the ranks, and between a resumed run and an uninterrupted one, results are identical bit for bit.

Not compared: GXPO or SFPO with a KL term. At the extrapolated point, the k3 KL's exponential amplifies
any change in summation order. One process with ``micro_batch_size=8`` instead of None gives the same
8.6e-10 weight difference after one GXPO step as the 2 ranks do. That comes from the arithmetic, not the
sharding.
"""

import json
import math
import os
import subprocess
import sys
import threading

import pytest
import torch

from gxpo_lib.config import TrainConfig
from gxpo_lib.rl import runlog
from gxpo_lib.rl.trainer import check_runtime, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import fsdp2_trainer_script as script

PARAM_TOL, ROW_TOL, FLOAT32_TOL = 1e-11, 1e-9, 5e-5   # the module docstring derives each
FLOAT32_KEYS = {"entropy", "clip_frac"}
slow = pytest.mark.slow   # every test on the shared runs: ~2-3 minutes for the module on a 2-core CPU


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(2-rank results, 2-rank output folder, one-process reference folders): the script in a subprocess
    while the references train here."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("fsdp2-trainer")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "fsdp2_trainer_script.py"), "--out",
                                str(out / "sharded")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()
    references = {}
    try:
        for case in script.CASES:
            references[case] = out / "reference" / case
            summary = train(script.config(case), references[case], model_and_tokenizer=script.float64_tiny(),
                            prompt_shares=2)
            torch.save(script.whole_params(summary["model"]), references[case] / "params.pt")
        process.wait(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    assert process.returncode == 0, "".join(output)[-8000:]
    with open(out / "sharded" / "result.json", encoding="utf-8") as handle:
        return json.load(handle), out / "sharded", references


def params_difference(a_path, b_path) -> float:
    a, b = torch.load(a_path), torch.load(b_path)
    assert a.keys() == b.keys() and a
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def rows_difference(rows, reference) -> tuple[float, list[str]]:
    """Largest |x - y| / max(1, |y|) over float fields (`FLOAT32_KEYS` aside: over FLOAT32_TOL is a mismatch);
    the fields whose other values differ."""
    worst, mismatched = 0.0, []
    assert len(rows) == len(reference)
    for row, ref in zip(rows, reference):
        assert row.keys() == ref.keys()
        for key, x in row.items():
            y = ref[key]
            if isinstance(x, float) and isinstance(y, float) and key in FLOAT32_KEYS:
                if abs(x - y) > FLOAT32_TOL * max(1.0, abs(y)):
                    mismatched.append(f"{row.get('kind')} {row.get('step')} {key}: {x!r} vs {y!r}")
            elif isinstance(x, float) and isinstance(y, float):
                if math.isfinite(x) or math.isfinite(y):
                    worst = max(worst, abs(x - y) / max(1.0, abs(y)))
            elif isinstance(x, list) and isinstance(y, list) and x and isinstance(x[0], float):
                worst = max([worst] + [abs(p - q) / max(1.0, abs(q)) for p, q in zip(x, y)])
            elif x != y:
                mismatched.append(f"{row.get('kind')} {row.get('step')} {key}: {x!r} vs {y!r}")
    return worst, mismatched


def logged(folder):
    return [script.stripped(r) for r in runlog.read_rows(folder / runlog.METRICS_FILE)]


@slow
@pytest.mark.parametrize("case", list(script.CASES))
def test_two_ranks_end_with_the_parameters_of_one_process(runs, case):
    _, sharded, references = runs
    difference = params_difference(sharded / case / "params.pt", references[case] / "params.pt")
    print(f"{case}: max |2 ranks - 1 process| over the weights = {difference:.3g}")
    assert difference <= PARAM_TOL


@slow
@pytest.mark.parametrize("case", list(script.CASES))
def test_every_rank_logs_the_same_steps_as_one_process(runs, case):
    result, sharded, references = runs
    assert result[case]["ranks_identical"], "the ranks' train rows (StepInfo, gate decisions) differ"
    assert result[case]["last_eval_same"]
    rows = logged(sharded / "runs" / case)
    worst, mismatched = rows_difference(rows, logged(references[case]))
    print(f"{case}: max relative row difference = {worst:.3g}")
    assert mismatched == [] and worst <= ROW_TOL
    assert [r for r in rows if r["kind"] == "train"] == result[case]["rows"]   # rank 0's rows, written once
    keys = [(r["kind"], r["step"], r.get("benchmark")) for r in rows]
    assert len(keys) == len(set(keys))
    steps = script.CASES[case]["steps"]
    assert [k for k in keys if k[0] == "train"] == [("train", s, None) for s in range(1, steps + 1)]


@slow
def test_the_runs_cover_gxpo_extrapolating_and_a_final_benchmark(runs):
    result, sharded, _ = runs
    assert any(r["active"] for r in result["gxpo_full"]["rows"])
    assert any(r["backward_passes"] > 1 for r in result["sfpo_lora_dapo"]["rows"])   # SFPO took its fast steps
    final = json.loads((sharded / "runs" / "gxpo_full" / runlog.FINAL_EVAL_FILE).read_text())
    assert final["arith"]["problems"] == 3 and len(final["arith"]["correct_counts"]) == 3


@slow
def test_only_rank_0_writes_the_run_folder(runs):
    _, sharded, _ = runs
    folder = sharded / "runs" / "grpo_full_kl"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl"]
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    files = sorted(p.name for p in (folder / "checkpoints" / "step_000002").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt", "rng_0.pt", "rng_1.pt"]


@slow
def test_a_killed_and_resumed_run_equals_the_uninterrupted_one(runs):
    result, sharded, _ = runs
    assert result["checkpoint_dirs"] == ["step_000001", "step_000002"]
    assert params_difference(sharded / "resume" / "params.pt", sharded / script.RESUMED / "params.pt") == 0.0
    assert result["resume"]["rows"] == result[script.RESUMED]["rows"][2:]   # step 3 re-run the same
    assert logged(sharded / "runs" / "resume") == logged(sharded / "runs" / script.RESUMED)


@slow
def test_a_damaged_newest_checkpoint_resumes_from_the_older_one(runs):
    result, sharded, _ = runs
    assert params_difference(sharded / "resume_damaged" / "params.pt", sharded / script.RESUMED / "params.pt") == 0.0
    assert result["resume_damaged"]["rows"] == result[script.RESUMED]["rows"][1:]   # steps 2 and 3 re-run
    assert any("step_000002" in w and "step_000001" in w for w in result["resume_damaged"]["warnings"])
    assert "step_000002.damaged" in result["damaged_dirs"]
    assert logged(sharded / "runs" / "resume_damaged") == logged(sharded / "runs" / script.RESUMED)


def test_torchrun_refuses_the_lean_sampler_and_uneven_prompt_shares(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="rollout_backend"):
        check_runtime(TrainConfig(batch_prompts=4, rollout_backend="lean").validate())
    with pytest.raises(ValueError, match="batch_prompts=3"):
        check_runtime(TrainConfig(batch_prompts=3, rollout_backend="auto").validate())
    check_runtime(TrainConfig(batch_prompts=4, rollout_backend="auto").validate())   # auto: hf there


@slow
def test_one_process_refuses_a_sharded_checkpoint_folder(runs, tmp_path):
    _, sharded, _ = runs
    import shutil

    folder = shutil.copytree(sharded / "runs" / "grpo_full_kl", tmp_path / "run")
    with pytest.raises(ValueError, match="sharded step_N/ folders"):
        train(script.config("grpo_full_kl", steps=3), folder, model_and_tokenizer=script.float64_tiny())
