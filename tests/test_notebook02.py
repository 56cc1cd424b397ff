"""Notebook 02 headless (short budget): the three rules train, and the stored verdict follows the numbers."""

import json
from pathlib import Path

import nbformat
import pytest
from test_notebook01 import run_exercises, run_implementations

from gxpo_lib import analysis
from gxpo_lib.analysis.shipped import read_index, shipped_results
from gxpo_lib.teach.headless import NOTEBOOK_DIR, execute_notebook

NOTEBOOK = NOTEBOOK_DIR / "02_grpo_vs_gxpo_small_llama.ipynb"
SHORT = {"eval_every": 2, "eval_problems": 16, "eval_samples": 2, "batch_prompts": 4, "group_size": 4, "demo_steps": 2}
IMPLEMENT_02 = ("implement_group_advantages", "implement_clipped_token_loss")


@pytest.mark.slow  # executes the notebook in a kernel (training 3 short runs)
def test_notebook02_runs_headless_and_stores_consistent_results(tmp_path):
    steps = 4
    execute_notebook(NOTEBOOK, tmp_path, html=False, parameters={"steps": steps, "replay": False, **SHORT})
    results = json.loads((tmp_path / "02_results.json").read_text())
    algos = results["algorithms"]
    assert set(algos) == {"grpo", "gxpo", "sfpo"}
    assert algos["grpo"]["cumulative_backward_passes"] == steps                 # one pass per step
    assert algos["sfpo"]["cumulative_backward_passes"] == steps * (3 + 1)       # K+1 with the official K = 3
    assert steps < algos["gxpo"]["cumulative_backward_passes"] <= 3 * steps + steps  # 3 active (+1 per fallback)
    for algo in algos.values():
        assert 0 <= algo["initial_pass@1"] <= 1 and 0 <= algo["final_pass@1"] <= 1
    grpo = algos["grpo"]
    improved = grpo["final_pass@1"] > grpo["initial_pass@1"]
    assert ("it improved" in results["verdict"][0]) == improved
    for name in ("gxpo", "sfpo"):
        reached = algos[name]["speedup_to_grpo_peak"]["step_speedup"] is not None
        assert any(line.startswith(name.upper()) and (("did not reach" in line) != reached)
                   for line in results["verdict"])
    # The mechanism verdicts follow the logged alpha*q; the time axis is the process's CPU time.
    for name in ("gxpo", "sfpo"):
        mechanism = algos[name]["mechanism"]
        assert mechanism["verdict"] in results["verdict"]
        if mechanism["alpha_q"] is not None:
            assert ("retreated" in mechanism["verdict"]) == (mechanism["alpha_q"] < 1)
    if algos["gxpo"]["mechanism"]["alpha_q"] is not None:   # live rows log update_norm: measured, not estimated
        assert results["update_size"]["gxpo"]["measured"] is True
    assert results["time_axis"] == "cpu_seconds" and algos["grpo"]["cpu_seconds"] > 0
    folders = {Path(a["folder"]).name for a in algos.values()}
    assert len(folders) == 3 and all(Path(a["folder"]).name.startswith(n) for n, a in algos.items())


@pytest.mark.slow
def test_another_learning_rate_trains_beside_the_first_runs(tmp_path):
    """Trying another lr gets a folder of its own (no "lr differs" error); the same settings resume."""
    for lr in (2e-3, 1e-3, 2e-3):
        execute_notebook(NOTEBOOK, tmp_path, html=False, parameters={"steps": 2, "algorithms": ["grpo"],
                                                                      "lr": lr, "replay": False, **SHORT})
    folders = sorted(p.name for p in (tmp_path / "nb02-runs").iterdir() if p.name != "live")
    assert len(folders) == 2


# A wrong answer for each exercise: the centred rewards, the objective's sign, every step at 3 passes, pass@1.
WRONG_02 = {"group_advantages": "[0.5, -0.5, -0.5, 0.5]", "clipped_loss": "1.2", "backward_passes": "90",
            "pass_at_k": "0.25"}


def test_exercises_pass_with_the_solutions_and_fail_with_wrong_answers():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cells = [c for c in nb.cells if "exercise" in c.metadata.get("tags", [])]
    assert 3 <= len(cells) <= 5
    assert all("fill=fill_solutions)" in c.source and "check.fill" not in c.source for c in cells)
    filled = run_exercises(NOTEBOOK)
    assert set(filled) == set(WRONG_02) and all(r.ok for r in filled.values())
    wrong = run_exercises(NOTEBOOK, WRONG_02)
    assert not any(r.ok for r in wrong.values()) and all(r.message.startswith("not yet") for r in wrong.values())
    assert all(not r.ok for r in run_exercises(NOTEBOOK, fill=False).values())


def test_implement_it_cells_pass_with_the_folded_solutions_and_blanks_are_filled():
    solved = run_implementations(NOTEBOOK, use_solutions=True)
    assert set(solved) == set(IMPLEMENT_02) and all(r.ok and "matches" in r.message for r in solved.values())
    assert all(not r.ok and "fill in the blank" in r.message
               for r in run_implementations(NOTEBOOK, use_solutions=False).values())
    assert all(r.ok for r in run_implementations(NOTEBOOK, use_solutions=False, fill=True).values())


def test_the_stored_notebook_teaches_the_update_size_and_prints_no_machine_load():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    assert "getloadavg" not in text and '["loads"]' not in text and "Warning: " not in text
    assert "1 + 2α·q̄" in text and "update_norm" in text and "does not mean a shorter" in text


@pytest.mark.slow
def test_notebook02_replays_the_shipped_runs_by_default(tmp_path):
    """Defaults (replay=True): nothing trains, and every number comes from the shipped run folders."""
    execute_notebook(NOTEBOOK, tmp_path, html=False)  # how long it takes is the machine's: not asserted
    results = json.loads((tmp_path / "02_results.json").read_text())
    assert results["replay"] is True and not (tmp_path / "nb02-runs" / "grpo_eval_problems=48").exists()
    assert results["exercises"] == dict.fromkeys([*WRONG_02, *IMPLEMENT_02], True)
    # the shipped rows predate update_norm / probe_step_norm: the update size is an estimate, and says so
    size = results["update_size"]["gxpo"]
    mechanism = results["algorithms"]["gxpo"]["mechanism"]
    assert size["measured"] is False and size["plain_steps"] == pytest.approx(1 + 2 * mechanism["alpha_q"])
    assert any("an estimate, 1 + 2·α·q̄" in line and "more than GRPO's one" in line for line in results["verdict"])
    nb = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    printed = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "machine load" not in printed and "Warning" not in printed
    assert "step 0" in printed and f"step {10} (end)" in printed and "entropy" in printed   # completions, 5b
    shipped = shipped_results("nb02")
    default_runs = sorted(name for name in read_index(shipped)["runs"] if "_lr=" not in name)
    assert len(default_runs) == 3 and sorted(Path(a["folder"]).name for a in results["algorithms"].values()) == \
        default_runs
    for name, algo in results["algorithms"].items():
        run = analysis.load_run(shipped / Path(algo["folder"]).name)
        assert run.algorithm == name and run.config["steps"] == results["steps"] == len(run.train)
        assert (algo["initial_pass@1"], algo["final_pass@1"]) == (run.eval[0]["pass@1"], run.eval[-1]["pass@1"])
        assert algo["cumulative_backward_passes"] == run.eval[-1]["cumulative_backward_passes"]
    assert any(line.startswith("GRPO: sampled pass@1") for line in results["verdict"])
    assert any("jump retreated" in line and "Notebook 05" in line for line in results["verdict"])  # alpha*q < 1
    assert (tmp_path / NOTEBOOK.name).stat().st_size < 5_000_000    # an executed copy stays small to share


@pytest.mark.slow
def test_notebook02_small_lr_switch_replays_and_shows_the_jump_extrapolating(tmp_path):
    """`lr = 3e-4` (the parameters cell's one-line switch) replays its shipped runs; their verdict says what the
    mechanism did there, computed from them (alpha*q above 1 in the shipped runs)."""
    execute_notebook(NOTEBOOK, tmp_path, parameters={"lr": 3e-4}, html=False)
    results = json.loads((tmp_path / "02_results.json").read_text())
    assert results["replay"] is True and results["lr"] == 3e-4
    assert all(Path(a["folder"]).name.endswith("_lr=0.0003") for a in results["algorithms"].values())
    mechanism = results["algorithms"]["gxpo"]["mechanism"]
    assert mechanism["alpha_q"] > 1 and mechanism["r_mean"] > 0.5
    assert any("the jump went beyond" in line for line in results["verdict"])
    assert any("jump extrapolated" in line and "Notebook 05" in line and "1e-7" in line for line in results["verdict"])
    with pytest.raises(Exception, match="replay=False to train them"):
        execute_notebook(NOTEBOOK, tmp_path / "other", parameters={"lr": 1e-3}, html=False)
