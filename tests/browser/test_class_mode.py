"""Class mode in a real browser: Run All in JupyterLab shows no solution, and a typed answer is checked.

A notebook built from notebook 01's own cells, verbatim: its parameters cell as stored (``fill_solutions =
None``: auto, nothing overridden), its setup cell, every exercise cell, and one last cell that saves what each
check printed. conftest.py starts a throwaway JupyterLab; drive.mjs's "exercise" scenario opens the notebook,
runs Run > Run All Cells, waits for exercise 3's feedback, then types over its blank (`answer = ...`, line 2 of
the cell) and runs the cell (Ctrl+Enter), once with a slip and once with a 3-significant-figure answer.

Expected: the kernel JupyterLab drives is not headless, so every blank stays a blank ("not yet: fill in the
blank"); the slip (theta~ without q: 2.5) gets its hint; 2.13 (2.125 to 3 significant figures) is right.
Every wait in the driver has a deadline and waits for a state (an output's text), never for a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

from gxpo_lib.teach.check import HEADLESS_ENV

pytestmark = [pytest.mark.slow, pytest.mark.browser]

REPO = Path(__file__).resolve().parents[2]
NB01 = REPO / "notebooks" / "01_toy_extrapolation.ipynb"
CLASS_NOTEBOOK = "01_class_mode_browser_test.ipynb"
SAVED = "class_mode_exercises.json"


def build_class_notebook(path: Path) -> list[str]:
    """Notebook 01's parameters, setup and exercise cells verbatim, then a cell that saves each check's line.

    Returns the exercises' names, in order."""
    nb = nbformat.read(NB01, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    parameters = next(c for c in code if "parameters" in c.metadata.get("tags", []))
    setup = next(c for c in code if "exercises = {}" in c.source)
    exercises = [c for c in code if "exercise" in c.metadata.get("tags", [])]
    assert "\nfill_solutions = None " in "\n" + parameters.source      # class mode is the stored default
    save = ("import json\n"
            f"with open({SAVED!r}, 'w', encoding='utf-8') as f:\n"
            "    json.dump({name: result.message for name, result in exercises.items()}, f)\n"
            "print('saved', len(exercises), 'exercises')")
    out = nbformat.v4.new_notebook(metadata=nb.metadata)
    out.cells = [nbformat.v4.new_markdown_cell(f"Built by tests/browser/test_class_mode.py from `{NB01.name}`."),
                 nbformat.v4.new_code_cell(parameters.source), nbformat.v4.new_code_cell(setup.source),
                 *(nbformat.v4.new_code_cell(c.source) for c in exercises), nbformat.v4.new_code_cell(save)]
    nbformat.write(out, path)
    return [c.source.split("exercises['")[1].split("'")[0] for c in exercises]


@pytest.fixture(scope="module")
def class_run(lab, drive, tmp_path_factory):
    if os.environ.get(HEADLESS_ENV):
        pytest.fail(f"{HEADLESS_ENV} is set in this environment: JupyterLab's kernels would count as headless")
    names = build_class_notebook(lab.root / CLASS_NOTEBOOK)
    numeric = ["q_value", "geometric_sum", "reposition", "jump_direction", "gate_z"]
    assert [n for n in names if n in numeric] == numeric      # in order; other exercise kinds may sit between
    try:  # exercise 3: theta~ = 4 + 0.5 * 1.25 * (1 - 4) = 2.125; the slip leaves out q: 4 - 1.5 = 2.5
        result = drive(lab, "exercise", CLASS_NOTEBOOK, tmp_path_factory.mktemp("class-mode"), timeout=240,
                       exercise="reposition", wrong="2.5", right="2.13")
    finally:
        lab.shutdown_kernels()
    # The save cell ran during Run All, before the typed answers (the kernel runs requests in order).
    result["saved"] = json.loads((lab.root / SAVED).read_text(encoding="utf-8"))
    return result


def test_run_all_in_class_mode_leaves_every_blank_blank(class_run):
    saved = class_run["saved"]
    assert set(saved) >= {"q_value", "geometric_sum", "reposition", "jump_direction", "gate_z"}
    for name, message in saved.items():
        assert message.startswith("not yet: fill in the blank"), (name, message)   # blanks, both of gate_z's
        assert "filled with the solution" not in message and "right" not in message


def test_a_blank_then_a_slip_then_a_3_figure_answer(class_run):
    feedback = class_run["feedback"]
    assert feedback["blank"].startswith("not yet: fill in the blank first")
    assert feedback["wrong"].startswith("not yet: you gave 2.5; you left out q")
    assert feedback["right"] == "right: theta~ = 2.125"
    assert "answer = 2.13" in class_run["source"]                            # typed over the blank
    assert "Traceback" not in " ".join(feedback.values()) and len(class_run["screenshots"]) == 3


IMPLEMENT_NOTEBOOK = "01_implement_browser_test.ipynb"
WRONG_RETENTION = '''def my_retention(g0, g1, r_clamp=(-2.0, 3.0), delta=1e-8):
    return g1 / g0


exercises['implement_retention'] = check.implementation(my_retention, "retention", fill=fill_solutions)'''
RIGHT_RETENTION = '''import torch


def my_retention(g0, g1, r_clamp=(-2.0, 3.0), delta=1e-8):
    active = g0.abs() > delta
    r = torch.where(active, g1 / torch.where(active, g0, torch.ones_like(g0)), torch.ones_like(g1))
    return r.clamp(*r_clamp)


exercises['implement_retention'] = check.implementation(my_retention, "retention", fill=fill_solutions)'''


def test_an_implement_it_exercise_blank_then_wrong_then_right(lab, drive, tmp_path_factory):
    """Notebook 01's retention implement-it cell in class mode: the blank, a naive g1 / g0 (no activity mask,
    no clamp) and a right implementation, each written over the cell and run as a learner would."""
    nb = nbformat.read(NB01, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    parameters = next(c for c in code if "parameters" in c.metadata.get("tags", []))
    setup = next(c for c in code if "exercises = {}" in c.source)
    cell = next(c for c in code if "exercises['implement_retention']" in c.source)
    out = nbformat.v4.new_notebook(metadata=nb.metadata)
    out.cells = [nbformat.v4.new_code_cell(s) for s in (parameters.source, setup.source, cell.source)]
    nbformat.write(out, lab.root / IMPLEMENT_NOTEBOOK)
    try:
        result = drive(lab, "implement", IMPLEMENT_NOTEBOOK, tmp_path_factory.mktemp("implement"), timeout=240,
                       exercise="implement_retention", wrong_code=WRONG_RETENTION, right_code=RIGHT_RETENTION)
    finally:
        lab.shutdown_kernels()
    feedback = result["feedback"]
    assert feedback["blank"].startswith("not yet: fill in the blank")
    assert feedback["wrong"].startswith("not yet:") and "inactive coordinates" in feedback["wrong"]   # g0 = 0
    assert feedback["right"].startswith("right:")
    assert "torch.where(active" in result["source"]
