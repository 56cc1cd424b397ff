"""What scripts/gpu_check.py needs on a stock CUDA PyTorch image (torch, transformers, peft, accelerate).

A subprocess hides the packages such an image lacks (their modules and their distribution metadata, so that
``importlib.util.find_spec`` answers None as for a package never installed), then imports what legs c (native
run) and f (GXPO v5) import, builds the tiny model's training state for the arith task, grades plain-number
answers, and checks that grading a math answer raises the clear ImportError naming math-verify.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING_ON_STOCK_IMAGE = ("math_verify", "datasets", "plotly", "pandas", "papermill", "ipywidgets", "trl",
                          "latex2mathml", "anywidget", "nbformat", "nbclient", "vllm", "tensorboard", "trackio")

BLOCKER = textwrap.dedent("""
    import importlib.machinery, re, sys
    BLOCK = set(sys.argv[1].split(","))

    def blocked(name):
        return name.split(".")[0] in BLOCK

    class Hidden(importlib.machinery.PathFinder):
        # PathFinder that never finds a hidden package: `import x` raises ModuleNotFoundError and
        # importlib.util.find_spec("x") is None, exactly as for a package that is not installed
        @classmethod
        def find_spec(cls, fullname, path=None, target=None):
            return None if blocked(fullname) else super().find_spec(fullname, path, target)

        @classmethod
        def find_distributions(cls, *args, **kwargs):
            return (d for d in super().find_distributions(*args, **kwargs)
                    if re.sub(r"[-_.]+", "_", d.metadata["Name"] or "").lower() not in BLOCK)

    sys.meta_path[:] = [Hidden if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    for name in [m for m in sys.modules if blocked(m)]:
        del sys.modules[name]
""")

CHECKS = textwrap.dedent("""
    import importlib.util, json, runpy, sys, tempfile
    from pathlib import Path

    assert all(importlib.util.find_spec(name) is None for name in BLOCK), "the blocker lets a package through"
    out = {}

    # What gpu_check.py imports at its top, and what legs c and f import
    gpu_check = runpy.run_path("scripts/gpu_check.py", run_name="gpu_check")
    from gxpo_lib import run                      # leg c
    from gxpo_lib.core.rules import GXPO          # leg f
    from gxpo_lib.config import resolve_config
    from gxpo_lib.experiment import memory_preflight
    from gxpo_lib.rl.problems import run_problems
    from gxpo_lib.rl.rewards import MathVerifyMissing, RewardScorer, score_pair
    from gxpo_lib.rl.trainer import build_state, check_runtime

    # Leg c's run, up to its training state: preflight, runtime check, problems, model + LoRA, rule, sampler, scorer
    config = resolve_config("smoke", gpu_check["_small_run"]({"rollout_backend": "hf"})).validate()
    config = memory_preflight(config, "smoke", "gxpo", False, {})
    check_runtime(config)
    train, held_out, final = run_problems(config)
    with tempfile.TemporaryDirectory() as folder:
        state = build_state(config, Path(folder), train)
    out["state"] = [type(state.rule).__name__, type(state.scorer).__name__, len(train) > 0]

    # The arith task's plain-number answers are graded without math-verify
    scored = state.scorer.score(["7 + 5 = 12. 12 - 3 = 9. \\\\boxed{9}", "\\\\boxed{10}", "The answer is 9."],
                                ["9", "9", "9"])
    out["arith"] = [scored.rewards, scored.statuses]

    # A math answer needs math-verify: a clear ImportError, raised (not scored 0 as "error")
    for name, grade in (("score_pair", lambda: score_pair("\\\\boxed{\\\\frac{1}{2}}", "\\\\frac{1}{2}")),
                        ("scorer", lambda: RewardScorer(workers=0).score(["\\\\boxed{x^2}"], ["x^2"]))):
        try:
            grade()
            out[name] = None
        except ImportError as error:
            out[name] = [isinstance(error, MathVerifyMissing), str(error)]
    out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCK)
    print("RESULT " + json.dumps(out))
""")


def _run_hidden(code: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", BLOCKER + code, ",".join(MISSING_ON_STOCK_IMAGE)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_gpu_check_legs_c_and_f_build_without_the_packages_a_stock_image_lacks():
    out = _run_hidden(CHECKS)
    assert out["state"] == ["GXPO", "RewardScorer", True]
    assert out["arith"] == [[1.0, 0.0, 1.0], ["correct", "wrong", "correct"]]
    for name in ("score_pair", "scorer"):
        assert out[name] is not None, f"{name}: grading a math answer without math-verify did not raise"
        is_missing, message = out[name]
        assert is_missing and "math-verify" in message and "pip install 'math-verify[antlr4_13_2]'" in message
    assert out["imported"] == [], f"hidden packages were imported anyway: {out['imported']}"
