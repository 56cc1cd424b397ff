"""The run the library owns: gxpo_lib.run, python -m gxpo_lib run, run_summary.json, sweeps with arms and --direct."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

import gxpo_lib
from gxpo_lib.config import parse_settings
from gxpo_lib.rl import runlog
from gxpo_lib.sweep import load_sweep, run_sweep

TINY = {"steps": 2, "eval_every": 1, "eval_problems": 4, "eval_samples": 2, "batch_prompts": 2, "group_size": 2,
        "max_new_tokens": 12, "final_eval_problems": 6, "final_eval_samples": 2}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "gxpo"
    return folder, gxpo_lib.run("smoke", {**TINY, "algorithm": "gxpo"}, folder, progress=False)


def test_run_writes_the_summary_from_the_folder(finished):
    folder, summary = finished
    assert summary == runlog.read_summary(folder)
    rows = runlog.read_rows(folder)
    evals = [r["pass@1"] for r in rows if r["kind"] == "eval"]
    final = runlog.read_final_eval(folder)["arith"]
    assert summary["val_pass@1_initial"] == evals[0] and summary["val_pass@1_last"] == evals[-1]
    assert summary["val_pass@1_peak"] == max(evals)
    # final_pass@1 is the final evaluation (6 problems x 2 samples), not the last validation value
    assert summary["final_benchmark"] == "arith" and summary["final_pass@1"] == final["pass@1"]
    assert len(final["correct_counts"]) == 6 and all(0 <= c <= 2 for c in final["correct_counts"])
    assert final["pass@1"] == pytest.approx(sum(final["correct_counts"]) / 12)
    assert summary["steps"] == 2 and summary["cumulative_backward_passes"] == sum(
        r["backward_passes"] for r in rows if r["kind"] == "train")
    train = [r for r in rows if r["kind"] == "train"]
    assert (folder / "figures" / "training.html").is_file()
    # the diagnostics figure is drawn when GXPO extrapolated (a group of equal rewards falls back instead)
    assert (folder / "figures" / "diagnostics.html").is_file() == any(r["active"] for r in train)
    assert all(r["update_norm"] > 0 and r["probe_step_norm"] > 0 for r in train if r["active"])
    assert all(r["update_norm"] >= 0 for r in train)


def test_rerunning_a_finished_run_resumes_and_keeps_its_rows(finished):
    folder, summary = finished
    before = (folder / runlog.METRICS_FILE).read_text()
    again = gxpo_lib.run("smoke", {**TINY, "algorithm": "gxpo"}, folder, figures=False)
    assert again == summary and (folder / runlog.METRICS_FILE).read_text() == before


def test_bad_settings_are_refused_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="k=1 is invalid"):
        gxpo_lib.run("smoke", {"k": 1}, tmp_path / "bad")
    with pytest.raises(ValueError, match="backend='jax' is invalid"):
        gxpo_lib.run("smoke", {}, tmp_path / "bad", backend="jax")
    with pytest.raises(ValueError, match="q_mode='scalar' is invalid with algorithm='grpo'"):
        gxpo_lib.run("smoke", {"algorithm": "grpo", "q_mode": "scalar"}, tmp_path / "bad")
    with pytest.raises(ValueError, match="momentum=0.9 is invalid with optimizer='adamw'"):
        gxpo_lib.run("smoke", {"momentum": 0.9}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_settings_on_the_command_line_are_typed():
    assert parse_settings(["k=5", "lr=1e-4", "lora=false", "final_eval_sets=[arith]", "model=tiny"]) == {
        "k": 5, "lr": 1e-4, "lora": False, "final_eval_sets": ["arith"], "model": "tiny"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_settings(["k"])


def test_the_command_line_names_a_bad_setting(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gxpo_lib", "run", "--preset", "smoke", "-s", "alpha=-1",
                           "--out", str(tmp_path / "x")], check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "alpha=-1 is invalid" in done.stderr and "Traceback" not in done.stderr


def test_a_study_file_of_arms_names_each_run_by_its_own_settings(tmp_path):
    grid = tmp_path / "study.yaml"
    grid.write_text(yaml.safe_dump({"preset": "smoke", "out": str(tmp_path / "out"), "base": {"steps": 3},
                                    "grids": [{"base": {"algorithm": "grpo"}, "grid": {"seed": [0, 1]}},
                                              {"base": {"algorithm": "gxpo", "q_mode": "scalar"},
                                               "grid": {"lr": [1e-4], "seed": [0]}}]}))
    runs = load_sweep(grid).runs()
    assert [name for name, _ in runs] == ["algorithm=grpo_seed=0", "algorithm=grpo_seed=1",
                                          "algorithm=gxpo_q_mode=scalar_lr=0.0001_seed=0"]
    assert runs[2][1] == {"steps": 3, "algorithm": "gxpo", "q_mode": "scalar", "lr": 1e-4, "seed": 0}
    twice = {"base": {"algorithm": "grpo"}, "grid": {"seed": [0]}}
    grid.write_text(yaml.safe_dump({"preset": "smoke", "grids": [twice, twice]}))
    with pytest.raises(ValueError, match="share this name"):
        load_sweep(grid)
    grid.write_text(yaml.safe_dump({"preset": "smoke", "grids": [{"base": {"algorithm": "grpo"},
                                                                  "grid": {"k": [1]}}]}))
    with pytest.raises(ValueError, match="k=1 is invalid"):
        load_sweep(grid)


def test_progress_is_a_run_option_not_a_setting(tmp_path):
    from gxpo_lib.sweep import _direct_command

    with pytest.raises(ValueError, match="progress=False is invalid: removed: a run option"):
        gxpo_lib.run("smoke", {"progress": False}, tmp_path / "bad")
    with pytest.raises(ValueError, match="progress='no' is invalid"):
        gxpo_lib.run("smoke", {}, tmp_path / "bad", progress="no")
    grid = tmp_path / "grid.yaml"   # a grid file's progress (base or axis) is the run's option, not a setting
    grid.write_text(yaml.safe_dump({"preset": "smoke", "base": {"steps": 3, "progress": False},
                                    "grid": {"seed": [0]}}))
    (name, settings), = load_sweep(grid).runs()
    assert settings == {"steps": 3, "progress": False, "seed": 0}
    command = _direct_command({"preset": "smoke", **settings, "output_dir": "x"}, tmp_path / name)
    assert "--no-progress" in command and "progress=false" not in " ".join(command)
    grid.write_text(yaml.safe_dump({"preset": "smoke", "base": {"progress": "no"}}))
    with pytest.raises(ValueError, match="progress='no' is invalid"):
        load_sweep(grid)
    assert not (tmp_path / "bad").exists()


def test_fit_is_a_run_option_of_notebook_03_and_of_sweeps(tmp_path):
    """`fit` (lower micro_batch_size to what the memory preflight says fits) reaches a sweep point as the run's
    option: --fit for a direct point, notebook 03's `fit` parameter otherwise; a non-bool is refused by name."""
    from gxpo_lib.config import NOTEBOOK_PARAMETERS, check_notebook_parameters
    from gxpo_lib.sweep import _direct_command

    assert NOTEBOOK_PARAMETERS["fit"][1] is False
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"preset": "smoke", "base": {"steps": 3, "fit": True}, "grid": {"seed": [0]}}))
    (name, settings), = load_sweep(grid).runs()
    command = _direct_command({"preset": "smoke", **settings, "output_dir": "x"}, tmp_path / name)
    assert "--fit" in command and "fit=true" not in " ".join(command)
    assert "--fit" not in _direct_command({"preset": "smoke", "steps": 3, "fit": False, "output_dir": "x"}, tmp_path)
    with pytest.raises(ValueError, match="fit='yes' is invalid"):
        check_notebook_parameters({"fit": "yes"})
    grid.write_text(yaml.safe_dump({"preset": "smoke", "base": {"fit": 1}}))
    with pytest.raises(ValueError, match="fit=1 is invalid"):
        load_sweep(grid)


@pytest.mark.slow
def test_a_direct_sweep_runs_without_a_kernel_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "preset": "smoke", "out": "sweep", "parallel": 2, "direct": True, "base": {**TINY, "progress": False},
        "grids": [{"base": {"algorithm": "grpo"}, "grid": {"seed": [0]}},
                  {"base": {"algorithm": "gxpo", "q_mode": "scalar"}, "grid": {"seed": [0]}}]}))
    sweep = load_sweep(tmp_path / "grid.yaml")
    rows = run_sweep(sweep)
    assert [r["state"] for r in rows] == ["done", "done"], rows
    for row in rows:
        folder = tmp_path / "sweep" / row["run"]
        assert not list(folder.glob("*.ipynb"))   # no notebook report: the run was called directly
        summary = json.loads((folder / "run_summary.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        assert row["final_pass@1"] == summary["final_pass@1"] and config["seed"] == 0
    assert json.loads((tmp_path / "sweep" / rows[1]["run"] / "config.json").read_text())["q_mode"] == "scalar"
    assert [r["state"] for r in run_sweep(sweep)] == ["skipped (finished)"] * 2
