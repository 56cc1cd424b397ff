"""Installs as users install: a built wheel, in a fresh venv, outside the checkout, finds its presets, the tiny
model, the task data and the notebooks, runs notebook 01 and a 2-step training."""

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A new venv holding only the gxpo wheel; its dependencies come from this environment's site-packages
    (a path entry, so this environment's editable gxpo is not seen)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist")], check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("gxpo-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", purelib, str(wheel)],
                   check=True)
    subprocess.run([str(python), "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"], check=True,
                   capture_output=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["JUPYTER_PATH"] = str(Path(sys.prefix) / "share" / "jupyter")  # the dependencies' data files (nbconvert)
    return python, tmp, env


def run(fresh_venv, code: str) -> str:
    python, tmp, env = fresh_venv
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp, env=env, timeout=600,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_the_wheel_finds_its_files_outside_the_checkout(fresh_venv):
    found = json.loads(run(fresh_venv, (
        "import json, gxpo_lib\n"
        "from gxpo_lib.config import list_presets, resolve_config\n"
        "from gxpo_lib.rl.models import load_model\n"
        "from gxpo_lib.rl import arith_task\nfrom gxpo_lib.teach import headless\n"
        "resolve_config('smoke')\n"
        "model, tok = load_model('tiny')\n"
        "print(json.dumps({'package': gxpo_lib.__file__, 'presets': list_presets(),\n"
        "  'params': sum(p.numel() for p in model.parameters()), 'train': len(arith_task.load_split('train')),\n"
        "  'notebooks': [p.name for p in headless.find_notebooks()]}))")).splitlines()[-1])
    assert not found["package"].startswith(str(ROOT))
    assert {"smoke", "paper-gxpo"} <= set(found["presets"]) and found["params"] > 700_000
    assert found["train"] == 3000 and "01_toy_extrapolation.ipynb" in found["notebooks"]


@pytest.mark.slow
def test_the_wheel_runs_notebook_01_and_a_two_step_training(fresh_venv):
    python, tmp, env = fresh_venv
    out = subprocess.run([str(python), "-m", "gxpo_lib", "run-notebooks", "--out", str(tmp / "runs"), "--only",
                          "01_toy_extrapolation.ipynb"], capture_output=True, text=True, cwd=tmp, env=env, timeout=900,
                         check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert (tmp / "runs" / "01_toy_extrapolation.ipynb").is_file()
    summary = json.loads(run(fresh_venv, (
        "import json\n"
        "from gxpo_lib.config import resolve_config\n"
        "from gxpo_lib.rl.trainer import train\n"
        "config = resolve_config('smoke', {'steps': 2, 'eval_every': 2, 'eval_problems': 4, 'eval_samples': 2,\n"
        "    'batch_prompts': 2, 'group_size': 2, 'final_eval_problems': 4, 'final_eval_samples': 2})\n"
        "s = train(config, 'wheel-run', progress=False)\n"
        "print(json.dumps({'steps': s['steps_done'], 'final': sorted(s['final_eval'])}))")).splitlines()[-1])
    assert summary == {"steps": 2, "final": ["arith"]}
