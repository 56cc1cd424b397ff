"""Notebook 01 runs headless under papermill and measures what it claims (not just that it ran)."""

import json
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_toy_extrapolation.ipynb"
PARAMETERS = ("K", "alpha", "tau", "omega", "r_min", "r_max", "lr", "landscape", "optimizer", "seed",
              "results_path")


def test_stored_notebook_has_no_outputs_and_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert "widgets" not in nb.metadata
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in PARAMETERS:
        assert f"\n{name} = " in "\n" + tagged[0].source, name
    assert nb.cells[0].cell_type == "markdown" and "Runtime" in nb.cells[0].source


def test_papermill_sees_every_parameter():
    # papermill parses `name = value  # help` lines; a line it cannot parse makes -p NAME warn "unknown"
    from papermill.translators import PythonTranslator

    nb = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    names = [p.name for p in PythonTranslator.inspect(cell)]
    assert set(PARAMETERS) <= set(names)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """The notebook executed under papermill (a kernel): every test that uses it is marked slow. How long
    it takes is not asserted (that depends on the machine); `make doctor` and bench/ measure speed."""
    import papermill

    out = tmp_path_factory.mktemp("nb01")
    papermill.execute_notebook(str(NOTEBOOK), str(out / NOTEBOOK.name), parameters={"K": 10},
                               kernel_name="python3", cwd=str(out), progress_bar=False,
                               execution_timeout=300)
    results = json.loads((out / "01_results.json").read_text(encoding="utf-8"))
    return results, out


@pytest.mark.slow
def test_notebook_runs_headless_with_k10_and_stores_its_measurements(executed):
    results, _ = executed
    assert results["K"] == 10                                  # the -p K 10 override reached the notebook
    assert results["hand_check"] == {"theta_tilde": [0.25, 0.125], "theta_new": [0.125, -0.0625]}
    assert set(results["exactness_errors"]) == {"2", "3", "5", "10"}
    assert results["exactness_error"] < 1e-12
    assert results["tilde_vs_theta_K"] < 1e-12
    for key in ("rotated", "adam", "clip", "noise", "logcosh", "banana", "q_clamp", "r_clamp"):
        assert results["errors_K5"][key] > 1e-3, key
        assert results["errors_at_K"][key] > 1e-3 or key == "q_clamp", key   # K=10 is even: under q's cap
    assert results["errors_K5"]["rotated"] > 0.01 and results["errors_K5"]["adam"] > 0.01
    assert results["errors_at_K"]["diagonal"] < 1e-12 and results["errors_at_K"]["q_clamp"] < 1e-12
    assert results["errors_vs_K"]["ks"][0] == 2 and all(v < 1e-12 for v in
                                                       (results["errors_vs_K"][k][0] for k in results["errors_K5"]))


@pytest.mark.slow
def test_notebook_gate_shuts_off_after_warmup_and_then_takes_plain_steps(executed):
    gate = executed[0]["gate"]
    assert gate["shutoff_step"] is not None and gate["shutoff_step"] > gate["warmup"]
    assert gate["shutoff_step"] == gate["surge_step"] + 1      # trips on the surge, plain from the next update
    assert gate["z_at_trip"] >= executed[0]["tau"]
    assert gate["passes_before"] == [3] and gate["passes_after"] == [1]
    assert gate["active_after"] is False
    assert gate["total_passes"] == 3 * (gate["shutoff_step"] - 1) + (gate["updates"] - gate["shutoff_step"] + 1)


@pytest.mark.slow
def test_executed_notebook_has_no_errors_and_shows_the_figures(executed):
    _, out = executed
    nb = nbformat.read(out / NOTEBOOK.name, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    plots = [o for o in outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(plots) >= 6 and len(widgets) == 1


@pytest.mark.slow
def test_notebook_shows_the_cold_start(executed):
    results = executed[0]
    # a small signal that doubles at observation 11: the unit cold start never notices, the warm-up start at once
    assert results["gate_init"]["small_signal_trip"] == {"unit": None, "warmup": 11}
    assert results["gate_init"]["toy_shutoff"]["warmup"] is not None
    # section 5c is one sentence and a link: the versions' table and their first updates live in docs/versions.md
    assert "versions" not in results


# -- exercises ------------------------------------------------------------------------------------------------
# A wrong answer for each exercise (the kind a learner gives: S_K alone, the full jump, the other side, ...).
WRONG_01 = {"q_value": "4.0951", "geometric_sum": "0.9375", "reposition": "1.75", "jump_direction": '"short"',
            "gate_z": "2.0", "find_the_bug": '["a", "a", "a"]'}
IMPLEMENT_01 = ("implement_retention", "implement_geometric_scale", "implement_gxpo_step")


def run_exercises(notebook: Path, answers: dict[str, str] | None = None, fill: bool = True) -> dict:
    """Execute a notebook's parameters cell, its setup cell (the one that makes `exercises = {}`) and every
    cell tagged "exercise", with `fill_solutions = fill` and the blanks replaced by `answers` (source text);
    returns the check results by exercise name."""
    nb = nbformat.read(notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    parameters = next(c for c in code if "parameters" in c.metadata.get("tags", []))
    setup = next(c for c in code if "exercises = {}" in c.source)
    namespace: dict = {}      # the notebook's own cells, run in one namespace as its kernel would
    exec(parameters.source, namespace)  # noqa: S102
    namespace["fill_solutions"] = fill
    exec(setup.source, namespace)  # noqa: S102
    cells = [c for c in code if "exercise" in c.metadata.get("tags", [])]
    for cell in cells:
        name = re.search(r"exercises\['(\w+)'\]", cell.source).group(1)
        source = cell.source
        if answers is not None:
            assert "answer = ...\n" in source, name
            source = source.replace("answer = ...\n", f"answer = {answers[name]}\n", 1)
        exec(source, namespace)  # noqa: S102
    assert len(namespace["exercises"]) == len(cells)
    return namespace["exercises"]


def test_exercises_pass_with_the_solutions_and_fail_with_wrong_answers(capsys):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    exercise_cells = [c for c in nb.cells if "exercise" in c.metadata.get("tags", [])]
    assert 3 <= len(exercise_cells) <= 6
    for i, cell in enumerate(nb.cells):     # each exercise: a blank, a check, then a folded solution
        if cell in exercise_cells:
            assert "answer = ...\n" in cell.source and "fill=fill_solutions)" in cell.source
            assert "check.fill" not in cell.source     # the check answers a blank itself: no solution on show
            assert nb.cells[i + 1].cell_type == "markdown" and nb.cells[i + 1].source.startswith("<details>")
    filled = run_exercises(NOTEBOOK)
    assert set(filled) == set(WRONG_01) and all(r.ok and r.message.startswith("right") for r in filled.values())
    wrong = run_exercises(NOTEBOOK, WRONG_01)
    assert not any(r.ok for r in wrong.values()) and all(r.message.startswith("not yet") for r in wrong.values())
    blank = run_exercises(NOTEBOOK, fill=False)
    assert all(not r.ok and "fill in the blank" in r.message for r in blank.values())
    printed = capsys.readouterr().out
    assert "Traceback" not in printed and printed.count("right:") == len(WRONG_01)


def run_implementations(notebook: Path, use_solutions: bool, fill: bool = False) -> dict:
    """Execute a notebook's setup cell and every cell tagged "implement" (each defines a function the learner
    writes and checks it), with each function's body left blank or replaced by the folded solution that follows
    the cell; returns the check results by name."""
    nb = nbformat.read(notebook, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    namespace: dict = {}
    exec(next(c for c in code if "parameters" in c.metadata.get("tags", [])).source, namespace)  # noqa: S102
    namespace["fill_solutions"] = fill
    exec(next(c for c in code if "exercises = {}" in c.source).source, namespace)  # noqa: S102
    for i, cell in enumerate(nb.cells):
        if "implement" not in cell.metadata.get("tags", []):
            continue
        source = cell.source
        if use_solutions:
            folded = nb.cells[i + 1].source
            assert folded.startswith("<details>") and "def my_" in folded
            solution = folded.split("```python\n", 1)[1].split("```", 1)[0]
            name = re.search(r"def (my_\w+)\(", source).group(1)
            assert f"def {name}(" in solution                       # the solution defines the same function
            source = source.replace(source[source.index(f"def {name}("):source.index("\n\n\nexercises[")],
                                    solution.strip("\n"))
        assert "..." in cell.source and "def my_" in cell.source   # the exercise cell shows no solution
        exec(source, namespace)  # noqa: S102
    return {k: v for k, v in namespace["exercises"].items() if k.startswith("implement_")}


def test_implement_it_cells_pass_with_the_folded_solutions_and_blanks_are_filled(capsys):
    solved = run_implementations(NOTEBOOK, use_solutions=True)
    assert set(solved) == set(IMPLEMENT_01) and all(r.ok and "matches" in r.message for r in solved.values())
    blank = run_implementations(NOTEBOOK, use_solutions=False)
    assert all(not r.ok and "fill in the blank" in r.message for r in blank.values())
    filled = run_implementations(NOTEBOOK, use_solutions=False, fill=True)
    assert all(r.ok and "stands in" in r.message and r.function is not None for r in filled.values())
    assert "Traceback" not in capsys.readouterr().out


@pytest.mark.slow
def test_notebook_shows_the_reference_step_and_the_bug_hunt(executed):
    results = executed[0]
    assert results["reference_vs_rule"] < 1e-12                 # reference.gxpo_step == rules.GXPO
    hunt = results["bug_hunt"]
    assert hunt["real"]["passes"] == 3 and hunt["rule 2"]["passes"] == 2      # rule 2: no corrective step
    assert hunt["real"]["shut"] and not hunt["rule 3"]["shut"]                  # rule 3: its gate never trips
    assert hunt["rule 3"]["z"] != hunt["real"]["z"]


@pytest.mark.slow
def test_executed_notebook_records_its_exercises_and_the_fixes(executed):
    results, out = executed
    assert results["exercises"] == dict.fromkeys([*WRONG_01, *IMPLEMENT_01], True)   # headless: blanks filled
    nb = nbformat.read(out / NOTEBOOK.name, as_version=4)
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert text.count("right:") == len(WRONG_01) + len(IMPLEMENT_01) and "not yet" not in text
    header = next(line for line in text.splitlines() if line.startswith("case"))
    assert header.split() == ["case", "K=5", "K=10"]       # K = 5 and the chosen K, each once
    figure = next(o.data["application/vnd.plotly.v1+json"] for c in nb.cells if "error_vs_k" in c.source
                  for o in c.outputs if "application/vnd.plotly.v1+json" in o.get("data", {}))
    assert figure["layout"]["yaxis"]["exponentformat"] == "power"
    assert nb.cells[-1].cell_type == "markdown" and nb.cells[-1].source.startswith("## Takeaways")
    colab = next(c for c in nb.cells if c.cell_type == "code")
    assert '"google.colab" in sys.modules' in colab.source and colab.outputs == []   # does nothing here
