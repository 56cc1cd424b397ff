#!/usr/bin/env bash
# A 15-minute proof on one lent GPU with no network: see scripts/gpu_check.py and docs/gpu.md.
#   bash scripts/gpu_check.sh                 # CUDA: a stock PyTorch image (torch, transformers, peft, accelerate)
#                                             # + carried wheels: math-verify (leg c grades answers), trl (leg d)
#   bash scripts/gpu_check.sh --cpu-dry-run   # every leg at reduced shapes on the CPU (.venv), a few minutes
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if [[ " $* " == *" --cpu-dry-run "* ]]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" CUDA_VISIBLE_DEVICES=""; fi
exec timeout "${GPU_CHECK_TIMEOUT:-840}" "$PYTHON" scripts/gpu_check.py "$@"
