"""Notebook 05 headless on the shipped verdict study: its numbers are the study's, recomputed here."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from gxpo_lib.analysis import verdict
from gxpo_lib.teach.headless import execute_notebook
from gxpo_lib.teach.toy_race import toy_race

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_when_does_extrapolation_pay.ipynb"
SHIPPED = ROOT / "data" / "results" / "verdict"
PARAMETERS = ("live_rerun", "study_dir", "live_algorithm", "live_k", "live_q_mode", "live_step_scale",
              "live_optimizer", "live_lr", "live_seed", "live_steps", "live_dir",
              "fill_solutions", "toy_lr_small", "toy_lr_mid", "toy_lr_large", "toy_h_stiff", "toy_h_flat",
              "toy_steps", "toy_noise", "K", "alpha", "resamples", "results_path")


@pytest.fixture(scope="module")
def records():
    return verdict.load_records(SHIPPED)


def test_stored_notebook_has_no_outputs_and_one_parameters_cell():
    from papermill.translators import PythonTranslator

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert set(PARAMETERS) <= {p.name for p in PythonTranslator.inspect(tagged[0])}  # papermill parses all
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert "What this notebook teaches" in first.source and "Runtime" in first.source
    assert "live_rerun = True" in tagged[0].source  # the default reruns one study run live (it fits the budget)
    assert "replay" not in {p.name for p in PythonTranslator.inspect(tagged[0])}
    text = "\n".join(c.source for c in nb.cells)
    assert "regime" not in text.replace("docs/regime.md", "")   # the superseded study is gone from the lesson


def _live_point_cell(records, **parameters):
    """The notebook's live-point cell, run on the shipped study with its default parameters (and `parameters`)."""
    from papermill.translators import PythonTranslator

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    namespace = {p.name: eval(p.default) for p in PythonTranslator.inspect(
        next(c for c in code if "parameters" in c.metadata.get("tags", [])))}
    namespace |= parameters | {"verdict": verdict, "records": records}
    exec(next(c for c in code if "live_runs = verdict.cell" in c.source).source, namespace)  # noqa: S102
    return namespace["shipped_record"]


def test_live_rerun_picks_exactly_the_run_it_names(records):
    record = _live_point_cell(records)
    c = record["config"]
    assert (verdict.arm(c), c["lr"], c["seed"], c["steps"]) == ("GXPO K=5", 0.001, 0, 60)
    grpo = _live_point_cell(records, live_algorithm="grpo", live_seed=1)["config"]
    assert (grpo["algorithm"], grpo.get("step_scale", 1.0), grpo["seed"]) == ("grpo", 1.0, 1)
    matched = _live_point_cell(records, live_algorithm="grpo", live_step_scale=2.55)["config"]
    assert matched["step_scale"] == 2.55                                # the matched arm, not plain GRPO
    scalar = _live_point_cell(records, live_q_mode="scalar", live_lr=1e-4)["config"]
    assert scalar["q_mode"] == "scalar"
    sgd = _live_point_cell(records, live_optimizer="sgd", live_lr=0.1)["config"]
    assert (sgd["optimizer"], sgd["lr"], sgd["q_mode"]) == ("sgd", 0.1, "per_coordinate")
    assert _live_point_cell(records, live_k=7) is None     # no such run: the training cell says so


def test_long_outputs_are_folded_and_no_machine_provenance_is_printed():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert 'study.get("note"' not in code and "UTC" not in code
    assert code.count("fold_lines(") == 2


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook with its defaults (the live rerun included), blanks filled with the solutions.

    Executed in a kernel: every test that uses it is marked slow. Its run time is the machine's, not
    asserted (the notebook records it as runtime_s)."""
    out = tmp_path_factory.mktemp("nb05")
    execute_notebook(NOTEBOOK, out, parameters={"fill_solutions": True, "resamples": 200}, html=False)
    return json.loads((out / "05_results.json").read_text()), out / NOTEBOOK.name


@pytest.mark.slow
def test_headless_run_is_error_free(executed):
    results, path = executed
    assert results["runtime_s"] > 0           # recorded (its size is the machine's)
    assert path.stat().st_size < 5_000_000    # an executed copy stays small to share
    nb = nbformat.read(path, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    # 3 toy races, the step-size overlay, family 1's differences, the envelopes, the SmolLM2 probe, and one
    # figure per 200-step lr (and the SGD overlay where the study has SGD runs)
    assert len(figures) >= 3 + 3 + 1
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for exercise in ("right: lr = ", "right: alpha * q-bar", "right: the run gave"):
        assert exercise in text  # filled solutions pass their own checks


@pytest.mark.slow
def test_toy_part_matches_the_library(executed):
    results = executed[0]
    q01 = results["nb01_q"]
    assert q01[1] > q01[0]  # notebook 01's exactness cell: the flat coordinate gets the larger q
    race = toy_race(results["toy_lrs"][2], steps=40, k=5, alpha=0.5, noise=0.02, h=results["h"])
    stored = results["toy_race"][str(results["toy_lrs"][2])]
    assert stored["multiplier"] == pytest.approx(race["multiplier"])
    assert stored["gxpo"] == pytest.approx(race["curves"]["GXPO"]["loss"][-1])


@pytest.mark.slow
def test_rl_numbers_and_verdicts_are_the_studys(executed, records):
    results = executed[0]
    assert results["study"]["runs"] == len(records)
    assert results["update_size_small_lr"]["measured"] == verdict.matched_scale(records, 1e-4)["step_scale"]
    for key, family in (("family1", verdict.adamw_family), ("family2", verdict.k10_family),
                        ("family3", verdict.best_family), ("family4", verdict.sgd_family),
                        ("family5", verdict.horizon_family)):
        again = family(records)
        assert [r["verdict"] for r in results[key]] == [r["verdict"] for r in again], key
        for stored, row in zip(results[key], again):
            if not row.get("pending"):
                assert stored["mean"] == pytest.approx(row["mean"]) and stored["ci"] == pytest.approx(list(row["ci"]))
    assert results["lesson"] == verdict.lesson(records)
    points = {(p["arm"], p["lr"]): p for p in verdict.step_size_points(records)}
    for p in results["step_size"]:
        assert p["effective_lr"] == pytest.approx(points[(p["arm"], p["lr"])]["effective_lr"])


@pytest.mark.slow
def test_live_rerun_reproduces_the_shipped_step0_evaluation(executed):
    live = executed[0]["live"]
    assert live["steps"] == 10 and len(live["reward_live"]) == 10 and live["eval_live"] is not None
    assert live["run"] == "algorithm=gxpo_k=5_lr=0.001_seed=0"
    # The shipped model, the same seed and sampler: the step-0 evaluation is the same draw.
    assert live["eval0_live"] == pytest.approx(live["eval0_shipped"], abs=1e-4)
    # The first step samples from the same model with the same seed: the same rewards.
    assert live["reward_live"][0] == pytest.approx(live["reward_shipped"][0], abs=1e-4)


@pytest.mark.slow
def test_without_the_live_rerun_nothing_trains(tmp_path):
    execute_notebook(NOTEBOOK, tmp_path, parameters={"live_rerun": False, "resamples": 50, "toy_steps": 10},
                     html=False)
    results = json.loads((tmp_path / "05_results.json").read_text())
    assert results["live"] is None and not (tmp_path / "nb05-live").exists()
