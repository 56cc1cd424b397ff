"""The notebooks' widgets in a real browser: JupyterLab + Debian's headless Chromium, driven by playwright-core.

conftest.py starts a throwaway JupyterLab (127.0.0.1, token, all state in a temp dir, no news toast);
drive.mjs opens a notebook, runs it from the Run menu, moves widgets with the keyboard / mouse and reads the
plotly figures' data back from the DOM (`.js-plotly-plot` graph divs). Screenshots of every state go to
pytest's temp dir and are copied to runs/browser/<scenario>/ (paths printed; see them with `pytest -s`).

1. Notebook 01, as stored (a copy in the server's folder, all cells): the explorer's K slider (ArrowRight x3)
   and the stability-clamp range slider (upper handle, PageDown / ArrowDown) must redraw the figures with the
   closed-form values of the diagonal quadratic (theta~ = theta_K, q = S_K(r)/S_2(r) with r clamped, ...).
2. Notebook 02's live dashboard. Running notebook 02 whole takes ~6 min on CPU, so the test runs a notebook
   built from notebook 02's own cells: its parameters cell, then batch_prompts = 2 and group_size = 4
   (papermill-style overrides), its setup cell (imports, loads the tiny model) and its dashboard cell, all
   verbatim; the walkthrough and the three-run comparison in between are left out. One cell more, after the
   dashboard cell, lengthens the run to RUN_STEPS (on a quiet 2-core Xeon the notebook's 200 steps all ran
   before the driver got to Stop); the driver waits for that cell's line before Start. In the browser: Start,
   wait for the first step, type tau = 1 into the tau slider's readout while it trains, wait for 2 more steps,
   Stop: every step of that is driven by the steps logged (file and figure), never by time, and every wait has
   a deadline. metrics.jsonl must log the starting tau and then 1 from the next step on, and the figure must
   grow with one point per logged step (and show the same steps, rewards and tau as the file).

3. An exercise of notebook 01 (a notebook of its parameters cell with fill_solutions = False, its setup cell
   and its first exercise cell, verbatim): type a wrong answer over the blank and run the cell, then the
   right one: the check's printed feedback turns from "not yet" to "right".

Needs /usr/bin/chromium and tests/browser/node_modules/playwright-core (tests/browser/setup.sh installs both);
skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import nbformat
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[2]
NB01 = REPO / "notebooks" / "01_toy_extrapolation.ipynb"
NB02 = REPO / "notebooks" / "02_grpo_vs_gxpo_small_llama.ipynb"
DASHBOARD_NOTEBOOK = "02_dashboard_browser_test.ipynb"
EXERCISE_NOTEBOOK = "01_exercise_browser_test.ipynb"
NB02_OVERRIDES = {"batch_prompts": 2, "group_size": 4}  # the rest as stored (tau = 0.5, k = 5, ...)
# The live run's length: no machine trains this many steps within the driver's deadlines (300 s in all), so
# the run is still going when the driver presses Stop, however fast or slow the machine is.
RUN_STEPS = 1_000_000
RUN_STEPS_LINE = "test override: the live run has steps ="  # what the extra cell prints; the driver waits for it


@pytest.fixture(scope="module")
def explorer_run(lab, drive, tmp_path_factory):
    shutil.copy(NB01, lab.root / NB01.name)
    try:
        result = drive(lab, "explorer", NB01.name, tmp_path_factory.mktemp("explorer"), timeout=170)
    finally:
        lab.shutdown_kernels()
    result["results_file"] = json.loads((lab.root / "01_results.json").read_text(encoding="utf-8"))
    return result


def build_dashboard_notebook(path) -> None:
    """Notebook 02's parameters, setup and dashboard cells verbatim, with NB02_OVERRIDES in between."""
    nb = nbformat.read(NB02, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    parameters = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    setup = [c for c in code if "load_model(model)" in c.source and "import" in c.source]
    board = [c for c in code if "LiveDashboard(" in c.source]
    assert len(parameters) == len(setup) == len(board) == 1, "notebook 02's parameters/setup/dashboard cells"
    overrides = "\n".join(f"{name} = {value!r}" for name, value in NB02_OVERRIDES.items())
    note = (f"Built by tests/browser/test_browser.py from `{NB02.relative_to(REPO)}`: its parameters cell, "
            "small overrides, its setup cell and its live-dashboard cell, verbatim.")
    lengthen = ("# test override: a run that cannot end before the driver presses Stop\n"
                "import dataclasses\n"
                f"board.config = dataclasses.replace(board.config, steps={RUN_STEPS})\n"
                f"print('{RUN_STEPS_LINE}', board.config.steps)")
    out = nbformat.v4.new_notebook(metadata=nb.metadata)
    out.cells = [nbformat.v4.new_markdown_cell(note),
                 nbformat.v4.new_code_cell(parameters[0].source),
                 nbformat.v4.new_code_cell("# overrides (as papermill -p would inject them)\n" + overrides),
                 nbformat.v4.new_code_cell(setup[0].source),
                 nbformat.v4.new_code_cell(board[0].source),
                 nbformat.v4.new_code_cell(lengthen)]
    nbformat.write(out, path)


@pytest.fixture(scope="module")
def dashboard_run(lab, drive, tmp_path_factory):
    build_dashboard_notebook(lab.root / DASHBOARD_NOTEBOOK)
    try:
        return drive(lab, "dashboard", DASHBOARD_NOTEBOOK, tmp_path_factory.mktemp("dashboard"),
                     timeout=300, steps=RUN_STEPS, steps_line=RUN_STEPS_LINE)
    finally:
        lab.shutdown_kernels()


# -- notebook 01 --------------------------------------------------------------------------------------------
def _gd_point(lr: float, n: int) -> list[float]:
    """theta_n of plain GD on notebook 01's diagonal quadratic (h = (1, 0.3), theta0 = (-0.9, 2.4))."""
    return [t * (1 - lr * h) ** n for t, h in zip((-0.9, 2.4), (1.0, 0.3))]


def test_explorer_k_and_clamp_sliders_redraw_the_figures(explorer_run):
    states, lr = explorer_run["states"], explorer_run["used_lr"]  # the lr the slider shows (to 3 digits)
    assert explorer_run["results_file"]["K"] == 5  # every cell ran (the last one wrote the results)
    assert [states[s]["k"] for s in ("initial", "k8", "clamp")] == [5, 8, 8]
    assert [states[s]["gd_points"] for s in ("initial", "k8", "clamp")] == [7, 10, 10]
    # no clamp binds: GXPO's extrapolated point is theta_K and its corrective step lands on theta_(K+1)
    assert states["initial"]["tilde"] == pytest.approx(_gd_point(lr, 5), abs=1e-12)
    assert states["k8"]["tilde"] == pytest.approx(_gd_point(lr, 8), abs=1e-12)
    assert states["k8"]["final"] == pytest.approx(_gd_point(lr, 9), abs=1e-12)
    # clamp (-2, 0.8): binds on y only (r_y = 1 - 0.3 lr > 0.8): x stays on theta_8, y stops short of it
    assert states["clamp"]["clamp"] == [-2, 0.8]
    assert states["clamp"]["tilde"][0] == pytest.approx(states["k8"]["tilde"][0], abs=1e-15)
    q_y = sum(0.8 ** i for i in range(8)) / 1.8
    assert states["clamp"]["q"][1] == pytest.approx(q_y, abs=1e-12)
    theta2_y = _gd_point(lr, 2)[1]
    assert states["clamp"]["tilde"][1] == pytest.approx(2.4 + q_y * (theta2_y - 2.4), abs=1e-12)
    assert states["clamp"]["tilde"][1] - _gd_point(lr, 8)[1] > 0.2
    assert "clamped ratios: 0.5" in explorer_run["readout"]
    assert len(explorer_run["screenshots"]) == 3


def test_explorer_shows_and_uses_the_notebooks_learning_rate(explorer_run):
    assert float(explorer_run["shown_settings"]["lr"]) == 0.3
    assert math.isclose(explorer_run["used_lr"], 0.3, rel_tol=1e-12)


# -- notebook 02 --------------------------------------------------------------------------------------------
NEW_TAU = 1.0  # what drive.mjs types into the tau slider's readout (10 ** 0: on the log slider's grid)


def test_dashboard_tau_slider_reaches_the_next_steps_and_the_figure_grows(dashboard_run):
    from gxpo_lib.rl.runlog import read_rows

    rows = [r for r in read_rows(dashboard_run["metrics"]) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    taus = [r["tau"] for r in rows]
    first_new = next(i for i, t in enumerate(taus) if t == pytest.approx(NEW_TAU, rel=1e-9))
    seen, logged = dashboard_run["steps_before_change"], dashboard_run["steps_logged_at_change"]
    assert seen >= 1 and first_new >= seen                 # the steps seen before typing keep the old tau
    assert abs(taus[0] - 0.5) < 0.01 and taus[:first_new] == [taus[0]] * first_new
    assert first_new <= logged + 1                         # the new tau from the next step that started
    assert taus[first_new:] == pytest.approx([NEW_TAU] * (len(taus) - first_new), rel=1e-9)
    assert len(taus) - first_new >= 2
    assert len(rows) < RUN_STEPS                           # Stop ended the run (it could not have finished)
    points = dashboard_run["figure_points"]                # reward points in the figure, state by state
    assert points[0] == seen and points[-1] == len(rows) and points == sorted(set(points))
    assert dashboard_run["status"].startswith("finished")
    assert len(dashboard_run["screenshots"]) == 4


def test_dashboard_shows_and_uses_the_notebooks_tau(dashboard_run):
    assert float(dashboard_run["tau_shown_at_start"]) == 0.5
    assert dashboard_run["taus"][0] == pytest.approx(0.5, rel=1e-12)


# -- notebook 01's exercises --------------------------------------------------------------------------------
def build_exercise_notebook(path) -> str:
    """Notebook 01's parameters cell (fill_solutions = False), setup cell and first exercise cell, verbatim.

    Returns the exercise's name (the key it stores its check result under)."""
    nb = nbformat.read(NB01, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    parameters = next(c for c in code if "parameters" in c.metadata.get("tags", []))
    setup = next(c for c in code if "exercises = {}" in c.source)
    first = next(c for c in code if "exercise" in c.metadata.get("tags", []))
    # whatever the stored default (True, or None = auto), the blank must stay blank here: False
    blank, found = re.subn(r"^fill_solutions = \S+", "fill_solutions = False", parameters.source,
                           flags=re.MULTILINE)
    assert found == 1 and first.source.splitlines()[1] == "answer = ..."
    out = nbformat.v4.new_notebook(metadata=nb.metadata)
    out.cells = [nbformat.v4.new_markdown_cell(f"Built by tests/browser/test_browser.py from `{NB01.name}`."),
                 nbformat.v4.new_code_cell(blank),
                 nbformat.v4.new_code_cell(setup.source), nbformat.v4.new_code_cell(first.source)]
    nbformat.write(out, path)
    return first.source.split("exercises['")[1].split("'")[0]


@pytest.fixture(scope="module")
def exercise_run(lab, drive, tmp_path_factory):
    name = build_exercise_notebook(lab.root / EXERCISE_NOTEBOOK)
    assert name == "q_value"
    try:  # q = S_5(0.9) / S_2(0.9) = 2.1553; the wrong answer is S_5(0.9) alone (a hinted slip)
        return drive(lab, "exercise", EXERCISE_NOTEBOOK, tmp_path_factory.mktemp("exercise"), timeout=240,
                     exercise=name, wrong="4.0951", right="2.1553")
    finally:
        lab.shutdown_kernels()


def test_exercise_feedback_turns_from_not_yet_to_right(exercise_run):
    feedback = exercise_run["feedback"]
    assert feedback["blank"].startswith("not yet: fill in the blank")
    assert feedback["wrong"].startswith("not yet: you gave 4.095; that is S_K(r) alone")
    assert feedback["right"].startswith("right: q = 2.155 for r = 0.9, K = 5")
    assert "answer = 2.1553" in exercise_run["source"]     # typed over the blank
    assert "Traceback" not in " ".join(feedback.values()) and len(exercise_run["screenshots"]) == 3
