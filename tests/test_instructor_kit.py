"""The instructor's kit (docs/instructor/) stays in step with the repository: regenerated, it equals the
committed files; the answer key's right answers pass their checks and its wrong answers get their hints; the
guide's catch-up cells and the versions block in docs/versions.md run."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import nbformat
import pytest

from gxpo_lib.teach import check, exercises, instructor_kit

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "docs" / "instructor"
GUIDE = ROOT / "docs" / "instructor.md"
NOTEBOOKS = ROOT / "notebooks"
KEY_NOTEBOOKS = {"01": "01_toy_extrapolation", "02": "02_grpo_vs_gxpo_small_llama",
                 "05": "05_when_does_extrapolation_pay"}


def _quiet(function, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_generator_is_small_and_the_kit_is_complete():
    assert len((ROOT / "gxpo_lib" / "teach" / "instructor_kit.py").read_text().splitlines()) < 400
    for name in ("slides.md", "agenda.md", "answer_key.md", "answer_key.json", "cheatsheet.md", "discussion.md",
                 "timings.json", "live_seeds.json"):
        assert (KIT / name).is_file(), name
    guide = GUIDE.read_text()
    for name in ("slides.md", "agenda.md", "answer_key.md", "cheatsheet.md", "discussion.md"):
        assert f"instructor/{name}" in guide, name


def test_slides_and_agenda_equal_a_fresh_build():
    # every number on the slides comes from the shipped results; the agenda from the measured timings
    assert instructor_kit.slides() == (KIT / "slides.md").read_text()
    assert instructor_kit.agenda() == (KIT / "agenda.md").read_text()
    assert sum(minutes for minutes, _, _ in instructor_kit.AGENDA) == 180
    assert sum(minutes for minutes, _, notebook in instructor_kit.AGENDA if notebook == "05") == 45


@pytest.mark.slow
def test_answer_key_equals_a_fresh_build():
    """Runs the three notebooks' cells up to their last exercise (a minute or two on a 2-core CPU)."""
    text, entries = instructor_kit.answer_key()
    assert text + "\n" == (KIT / "answer_key.md").read_text()
    assert json.loads(json.dumps(entries)) == json.loads((KIT / "answer_key.json").read_text())


def _entries():
    return json.loads((KIT / "answer_key.json").read_text())


def test_answer_key_covers_every_exercise_cell():
    entries = _entries()
    for short, name in KEY_NOTEBOOKS.items():
        cells = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4).cells
        calls = sum(len(re.findall(r"check\.\w+\(", c.source)) for c in cells
                    if c.cell_type == "code" and "fill=fill_solutions" in c.source)
        assert sum(e["notebook"] == short for e in entries) == calls, name
    assert all(e["message"].startswith("right: ") for e in entries)


@pytest.mark.parametrize("index", range(len(json.loads((KIT / "answer_key.json").read_text()))))
def test_answer_key_right_answers_pass_and_wrong_ones_get_their_hints(index):
    entry = _entries()[index]
    name, args, kwargs = entry["check"], entry["args"], entry["kwargs"]
    if name == "implementation":
        assert _quiet(check.implementation, exercises.LIBRARY[args[0]][0], args[0]).ok
        return
    if name == "bug":
        assert _quiet(check.bug, list(exercises.MYSTERY)).ok
        return
    function = check.CHECKS[name]
    second = {"gate_z": "shuts", "clipped_loss": "stops"}.get(name)
    if second:
        kwargs = {**kwargs, second: entry["judged"][1]["right"]}
    if name == "jump_direction":
        right = next(w for w, phrase in (("short", "short of"), ("beyond", "beyond"), ("at", "exactly at"))
                     if phrase in entry["message"])
    elif name == "backward_passes":
        right = int(entry["message"].split()[1])
    elif name == "prediction":
        right = args[0]
    else:
        right = entry["judged"][0]["right"]
    assert _quiet(function, right, *args, **kwargs).ok, entry["message"]
    for wrong, hint in (entry["judged"][0]["wrong"] if entry["judged"] else []):
        result = _quiet(function, wrong, *args, **kwargs)
        assert not result.ok and hint in result.message


def test_live_ranges_the_guide_states_are_the_measured_ones():
    data = json.loads((KIT / "live_seeds.json").read_text())
    assert len({r["seed"] for r in data["runs"].values()}) >= 3
    assert _flat(instructor_kit.live_ranges_text(data)) in _flat(GUIDE.read_text())


def _guide_cells() -> dict[str, str]:
    """The catch-up cells of docs/instructor.md, by notebook: each `### Notebook NN` section's python block."""
    section = GUIDE.read_text().split("## Catch-up cells", 1)[1].split("\n## ", 1)[0]
    chunks = [chunk for chunk in section.split("### Notebook ")[1:] if "```python" in chunk]
    return {chunk[:2]: chunk.split("```python\n", 1)[1].split("```", 1)[0] for chunk in chunks}


def _parameters(name: str) -> dict:
    from papermill.translators import PythonTranslator

    cells = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4).cells
    cell = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    return {p.name: eval(p.default) for p in PythonTranslator.inspect(cell)}


def test_catch_up_cells_rebuild_each_notebooks_state():
    from gxpo_lib import analysis
    from gxpo_lib.analysis import verdict
    from gxpo_lib.rl import runlog

    cells = _guide_cells()
    assert set(cells) == {"02", "04", "05"}
    space = _parameters("02_grpo_vs_gxpo_small_llama")
    exec(cells["02"], space)  # noqa: S102 (the guide's own cell)
    assert list(space["runs"]) == ["grpo", "gxpo", "sfpo"] and space["replay"] is True
    assert all(run.eval[-1]["step"] == 30 for run in space["runs"].values())
    space = _parameters("02_grpo_vs_gxpo_small_llama") | {"lr": 3e-4}
    exec(cells["02"], space)  # noqa: S102
    assert {run.config["lr"] for run in space["runs"].values()} == {3e-4}
    space = _parameters("04_compare_runs")
    exec(cells["04"], space)  # noqa: S102
    assert len(space["runs"]) == len(analysis.load_runs(ROOT / "data" / "results" / "seed-study"))
    space = _parameters("05_when_does_extrapolation_pay")
    exec(cells["05"], space)  # noqa: S102
    finished = [f for f in (ROOT / "data" / "results" / "verdict").iterdir() if runlog.read_final_eval(f)]
    assert len(space["records"]) == len(verdict.load_records(ROOT / "data" / "results" / "verdict")) == len(finished)
    assert {verdict.arm(r["config"]) for r in space["records"]} >= {"GRPO", "GXPO K=5"}


def test_versions_doc_block_prints_what_it_shows():
    text = (ROOT / "docs" / "versions.md").read_text()
    section = text.split("### The same first update in each version", 1)[1]
    code, shown = re.findall(r"```(?:python|text)\n(.*?)```", section, re.DOTALL)[:2]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})  # noqa: S102 (the doc's own block)
    assert out.getvalue() == shown
