"""The project's own files: install recipes agree, notebooks are stored clean, CI runs the README's tests."""

import json
import re
import tomllib
from pathlib import Path

import yaml

from gxpo_lib.teach.headless import find_notebooks, has_outputs

ROOT = Path(__file__).resolve().parents[1]


def pyproject_extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def conda_extras(name: str) -> set[str]:
    env = yaml.safe_load((ROOT / name).read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    editable = next(line for line in pip_section if line.startswith("-e ."))
    return set(re.search(r"\[(.*)\]", editable).group(1).split(","))


def test_conda_environments_parse_and_name_the_pyproject_extras():
    cpu, gpu = conda_extras("environment.yml"), conda_extras("environment-gpu.yml")
    assert cpu == pyproject_extras() - {"gpu"}     # vLLM lives only in the GPU environment
    assert "gpu" in gpu and cpu | gpu == pyproject_extras()


def test_torch_is_installed_alone_first():
    makefile = (ROOT / "Makefile").read_text()
    first = makefile.index("pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))\n")
    assert first < makefile.index("-e '.[$(EXTRAS)]'")     # alone, and before everything that depends on it


def test_notebooks_are_stored_without_outputs():
    notebooks = find_notebooks()
    assert notebooks, "no notebooks found"
    assert [p.name for p in notebooks if has_outputs(p)] == []


def test_each_notebook_opens_with_what_it_teaches_and_has_a_parameters_cell():
    for path in find_notebooks():
        cells = json.loads(path.read_text())["cells"]
        assert cells[0]["cell_type"] == "markdown", path.name
        opening = "".join(cells[0]["source"]).lower()
        assert "cpu" in opening and re.search(r"\d+\s*(s|sec|seconds?|min|minutes?)\b", opening), path.name
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: needs exactly one parameters cell"
        colab = "".join(cells[1]["source"])      # installs the package on Colab only, does nothing elsewhere
        assert cells[1]["cell_type"] == "code" and 'if "google.colab" in sys.modules:' in colab, path.name
        assert f"notebooks/{path.name})" in (ROOT / "README.md").read_text(), f"{path.name}: no Colab badge"
        last = cells[-1]
        assert last["cell_type"] == "markdown" and "Takeaways" in "".join(last["source"]), \
            f"{path.name}: should end with its takeaways"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make run" in readme
    assert re.search(r"^(GXPO_REQUIRE_BROWSER=1 )?make test$", ci, re.MULTILINE)
    assert "GXPO_REQUIRE_BROWSER" in readme  # CI adds nothing the README does not show
