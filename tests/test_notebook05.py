"""Notebook 05 headless on the shipped regime study: its numbers are the study's, recomputed here."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import nbformat
import pytest

from gxpo_lib import regime
from gxpo_lib.notebooks import execute_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_when_does_extrapolation_pay.ipynb"
SHIPPED = ROOT / "data" / "results" / "regime"
PARAMETERS = ("replay", "study_dir", "live_algorithm", "live_k", "live_retention", "live_lr", "live_seed",
              "live_steps", "live_dir", "fill_solutions", "toy_lr_small",
              "toy_lr_mid", "toy_lr_large", "toy_h_stiff", "toy_h_flat", "toy_steps", "toy_noise", "K",
              "alpha", "resamples", "results_path")


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
    assert "replay = False" in tagged[0].source  # the default reruns one grid point live (it fits the budget)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook with its defaults (the live rerun included), blanks filled with the solutions."""
    out = tmp_path_factory.mktemp("nb05")
    start = time.perf_counter()
    execute_notebook(NOTEBOOK, out, parameters={"fill_solutions": True}, html=False)
    seconds = time.perf_counter() - start
    return json.loads((out / "05_results.json").read_text()), out / NOTEBOOK.name, seconds


def test_headless_run_is_fast_and_error_free(executed):
    results, path, seconds = executed
    assert seconds < 180 and results["runtime_s"] < 180
    assert path.stat().st_size < 5_000_000    # an executed copy stays small to share
    nb = nbformat.read(path, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) >= 3 + 2 + 4 + 1  # 3 toy races, pass@1 vs lr twice, 4 speed-up maps, diagnostics
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for exercise in ("right: lr = ", "right: alpha * q-bar", "right: the run gave"):
        assert exercise in text  # filled solutions pass their own checks


def test_toy_part_matches_the_library(executed):
    results = executed[0]
    q01 = results["nb01_q"]
    assert q01[1] > q01[0]  # notebook 01's exactness cell: the flat coordinate gets the larger q
    race = regime.toy_race(results["toy_lrs"][2], steps=40, k=5, alpha=0.5, noise=0.02, h=results["h"])
    stored = results["toy_race"][str(results["toy_lrs"][2])]
    assert stored["multiplier"] == pytest.approx(race["multiplier"])
    assert stored["gxpo"] == pytest.approx(race["curves"]["GXPO"]["loss"][-1])


def test_rl_numbers_and_verdicts_are_the_studys(executed):
    results = executed[0]
    records = regime.load_study(SHIPPED)
    table = regime.cell_table(records, resamples=20)
    assert results["study"]["runs"] == len(records) and results["study"]["cells"] == len(table)
    stored = {(r["method"], r["lr"]): r for r in results["table"]}
    for _, row in table.iterrows():
        cell = stored[(row["method"], row["lr"])]
        for key in ("final", "final_lo", "peak", "alpha_q", "cos_g0_g1"):
            assert (cell[key] is None and math.isnan(row[key])) or cell[key] == pytest.approx(row[key]), key
    for verdict in results["verdicts"]:
        again = regime.compare(records, verdict["method"], verdict["lr"])
        assert verdict["verdict"] == again["verdict"]
        expected = again["difference"]
        assert verdict["difference"] == (None if expected is None else pytest.approx(expected))
    for lr, value in results["matched_multiplier"].items():
        assert value == pytest.approx(regime.matched_step_multiplier(records, float(lr)))
    # Replaying the logged corrective norms through a fresh unit gate gives each run's logged shut-off.
    assert results["gate_replay_matches_log"] is True
    assert len(results["gate_replay"]) == sum(r["config"]["algorithm"] == "gxpo" for r in records)


def test_live_rerun_reproduces_the_shipped_step0_evaluation(executed):
    live = executed[0]["live"]
    assert live["steps"] == 10 and len(live["reward_live"]) == 10 and live["eval_live"] is not None
    # The shipped model, the same seed and sampler: the step-0 evaluation is the same draw.
    assert live["eval0_live"] == pytest.approx(live["eval0_shipped"], abs=1e-4)
    # The first step samples from the same model with the same seed: the same rewards.
    assert live["reward_live"][0] == pytest.approx(live["reward_shipped"][0], abs=1e-4)


def test_replay_only_trains_nothing(tmp_path):
    execute_notebook(NOTEBOOK, tmp_path, parameters={"replay": True, "resamples": 50, "toy_steps": 10},
                     html=False)
    results = json.loads((tmp_path / "05_results.json").read_text())
    assert results["live"] is None and not (tmp_path / "nb05-live").exists()
    assert results["runtime_s"] < 60
