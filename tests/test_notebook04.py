"""Notebook 04 headless on two tiny real runs (GRPO and GXPO): the tables it stores follow the run folders."""

from __future__ import annotations

import json
import shutil

import pytest

from gxpo_lib import analysis
from gxpo_lib.analysis.shipped import read_index, shipped_results
from gxpo_lib.rl.runlog import read_rows
from gxpo_lib.rl.trainer import TrainConfig, train
from gxpo_lib.teach.headless import NOTEBOOK_DIR, execute_notebook
from gxpo_lib.teach.html_export import remote_references

pytestmark = pytest.mark.slow  # every test here executes the notebook in a kernel (make test-fast skips them)

NOTEBOOK = NOTEBOOK_DIR / "04_compare_runs.ipynb"
FINAL_SAMPLES = 4


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A GRPO and a GXPO run of 4 steps on the tiny model, evaluated every 2 steps and at the end."""
    root = tmp_path_factory.mktemp("nb04-runs")
    for algorithm in ("grpo", "gxpo"):
        train(TrainConfig(algorithm=algorithm, steps=4, eval_every=2, batch_prompts=4, group_size=4,
                          eval_problems=16, eval_samples=2, final_eval_sets=("arith",), final_eval_problems=16,
                          final_eval_samples=FINAL_SAMPLES, checkpoint_every=4),
              root / algorithm, progress=False)
    return root


def _evals(folder):
    """(step, pass@1, cumulative backward passes) of every evaluation after step 0."""
    return [(r["step"], r["pass@1"], r["cumulative_backward_passes"])
            for r in read_rows(folder / "metrics.jsonl") if r["kind"] == "eval" and r["step"] > 0]


def test_notebook04_stores_speedups_and_final_table_that_follow_the_runs(two_runs, tmp_path):
    out = tmp_path / "out"
    # replay stays at its default (True): named run_dirs win over the shipped study
    execute_notebook(NOTEBOOK, out, parameters={"run_dirs": [str(two_runs / "grpo"), str(two_runs / "gxpo")],
                                                "output_dir": "compare"})
    results = json.loads((out / "compare" / "04_results.json").read_text())
    assert sorted(r["name"] for r in results["runs"]) == ["grpo", "gxpo"] and results["replay"] is False
    assert [g["algorithm"] for g in results["groups"]] == ["grpo", "gxpo"]

    # The speed-up, recomputed by hand from the metrics files.
    grpo, gxpo = _evals(two_runs / "grpo"), _evals(two_runs / "gxpo")
    target = max(p for _, p, _ in grpo)
    ref_step, _, ref_bp = next(e for e in grpo if e[1] >= target)
    hit = next((e for e in gxpo if e[1] >= target), None)
    rows = {r["algorithm"]: r for r in results["speedup"]}
    assert rows["grpo"]["status"] == "reference" and rows["grpo"]["target"] == pytest.approx(target)
    assert rows["grpo"]["speedup_steps"] == 1.0
    row = rows["gxpo"]
    assert row["target"] == pytest.approx(target) and row["ref_step"] == ref_step
    # One seed each: every resample is the same pair of runs, so the interval collapses onto the estimate.
    assert row["reached_share"] == (0.0 if hit is None else 1.0)
    if hit is None:
        assert row["status"] == "not reached" and row["speedup_steps"] is None
        assert any("gxpo" in m and "did NOT reach" in m for m in results["messages"])
    else:
        assert row["status"] == "reached" and row["step"] == hit[0]
        assert row["speedup_steps"] == pytest.approx(ref_step / hit[0])
        assert row["speedup_backward_passes"] == pytest.approx(ref_bp / hit[2])
        assert not any("did NOT reach" in m for m in results["messages"])

    # The activity table counts the extrapolating steps and the passes spent, from the train rows.
    activity = {r["algorithm"]: r for r in results["activity"]}
    train_rows = [r for r in read_rows(two_runs / "gxpo" / "metrics.jsonl") if r["kind"] == "train"]
    assert activity["gxpo"]["active_steps"] == sum(r["active"] for r in train_rows) > 0
    assert activity["gxpo"]["cumulative_backward_passes"] == train_rows[-1]["cumulative_backward_passes"]
    assert activity["grpo"]["active_steps"] == 0 and activity["grpo"]["cumulative_backward_passes"] == 4
    assert activity["gxpo"]["cpu_seconds"] > 0 and "seconds" not in activity["gxpo"]       # CPU, not wall clock
    assert "speedup_cpu_seconds" in rows["gxpo"] and "speedup_hours" not in rows["gxpo"]

    # The final table repeats each run's final_eval.json, with pass@k at the largest k.
    finals = {r["run"]: r for r in results["final"]}
    for name in ("grpo", "gxpo"):
        stored = json.loads((two_runs / name / "final_eval.json").read_text())["arith"]
        row = finals[name]
        assert row["k"] == FINAL_SAMPLES and row["benchmark"] == "arith"
        assert (row["pass@1"], row["pass@1_lo"], row["pass@1_hi"]) == \
            pytest.approx((stored["pass@1"], *stored["pass@1_ci"]))
        assert (row["pass@k"], row["pass@k_lo"], row["pass@k_hi"]) == \
            pytest.approx((stored[f"pass@{FINAL_SAMPLES}"], *stored[f"pass@{FINAL_SAMPLES}_ci"]))
    assert (out / "compare" / "curves.html").is_file() and (out / "compare" / "diagnostics.html").is_file()
    page = (out / "04_compare_runs.html").read_text()
    assert "Plotly.newPlot" in page and remote_references(page) == []      # figures survive, offline


@pytest.mark.parametrize("copied", [[], ["gxpo"]])
def test_notebook04_auto_with_no_run_or_one_run_says_so(two_runs, tmp_path, copied):
    for name in copied:  # "auto" searches the working directory, which execute_notebook makes `tmp_path`
        shutil.copytree(two_runs / name, tmp_path / "runs" / name)
    execute_notebook(NOTEBOOK, tmp_path, html=False, parameters={"replay": False})
    results = json.loads((tmp_path / "04-compare" / "04_results.json").read_text())
    assert [r["name"] for r in results["runs"]] == copied
    expected = "No run folder found" if not copied else "Only one run found"
    assert any(m.startswith(expected) for m in results["messages"])
    if copied:  # one GXPO run: a final row, but no GRPO target to chase
        assert results["final"][0]["pass@1"] is not None
        assert [r["status"] for r in results["speedup"]] == ["no reference"]
        assert any(m.startswith("No grpo run found") for m in results["messages"])
    else:
        assert results["final"] == [] and results["speedup"] == [] and results["groups"] == []


def test_notebook04_opens_the_shipped_seed_study_by_default(tmp_path):
    """Defaults (replay=True): the shipped study's runs, and tables equal to those drawn from its folders."""
    execute_notebook(NOTEBOOK, tmp_path, html=False)
    results = json.loads((tmp_path / "04-compare" / "04_results.json").read_text())
    shipped = shipped_results("seed-study")
    assert results["replay"] is True
    assert sorted(r["name"] for r in results["runs"]) == sorted(read_index(shipped)["runs"])
    runs = analysis.load_runs(shipped)
    groups = analysis.group_runs(runs, results["group_by"])
    assert [g["label"] for g in results["groups"]] == [g.label for g in groups]
    assert {g.algorithm for g in groups} >= {"grpo", "gxpo"}
    finals = {r["run"]: r for r in results["final"]}
    for run in runs:
        benchmark, stored = next(iter(run.final_eval.items()))
        assert finals[run.name]["benchmark"] == benchmark
        assert finals[run.name]["pass@1"] == pytest.approx(stored["pass@1"])
    # the activity table's intervals stay inside what a count can be (no 41.10 active steps out of 40)
    for row in results["activity"]:
        assert 0 <= (row["active_steps_lo"] or 0) <= (row["active_steps_hi"] or 0) <= row["steps"]
        assert (row["cpu_seconds_lo"] or 0) >= 0
    # the learner sees no run provenance (machine loads, UTC windows: data/README.md has them)
    import nbformat

    executed = nbformat.read(tmp_path / NOTEBOOK.name, as_version=4)
    shown = " ".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "UTC" not in shown and "load of" not in shown and "machine:" not in shown
    speedup = {r["algorithm"]: r for r in results["speedup"]}
    assert speedup["grpo"]["status"] == "reference"
    seed_mean = analysis.band([r for r in runs if r.algorithm == "grpo"], "pass@1")   # step 0 is the start
    grpo_peak = seed_mean.loc[seed_mean["step"] > 0, "mean"].max()
    assert speedup["grpo"]["target"] == pytest.approx(grpo_peak)
