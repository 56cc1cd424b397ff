"""The HTML copies of executed notebooks work offline: headless Chromium with the network off draws every figure,
typesets every formula and shows each widget as a static snapshot.

`gxpo_lib.teach.headless.execute_notebook` writes the HTML copy (`gxpo_lib.teach.html_export`). drive.mjs's "offline"
scenario opens it from disk in an offline browser context that also aborts (and records) any request that is
not a file:// URL, then reads the page: plotly graph divs with an SVG and data, MathML elements with a size,
no raw ``$...$`` left in rendered markdown, no ``VBox(children=...`` text, no progress bar frozen at 0%.
Screenshots go to tests/browser/output/offline*/ (git-ignored).

1. A tiny notebook with each kind of content: a plotly figure, markdown maths (inline, display), maths in a
   markdown output, a FigureWidget with a slider in a VBox, and a tqdm progress bar (a widget in a kernel).
2. Notebook 01 (slow: it executes the whole notebook): its figures, formulas and the explorer widget.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import nbformat
import pytest
from conftest import DRIVER, HERE, missing_tools

from gxpo_lib.teach.headless import NOTEBOOK_DIR, execute_notebook

pytestmark = [pytest.mark.browser]
OUTPUT = HERE / "output"
PLOTLY_BANNER = "* plotly.js v"


@pytest.fixture(autouse=True)
def _tools():
    reason = missing_tools()
    if reason:
        pytest.skip(reason)


def open_offline(html, out, timeout: float = 240.0) -> dict:
    """drive.mjs's offline scenario on `html`; its RESULT."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    options = {"scenario": "offline", "html": str(html), "out": str(out)}
    process = subprocess.Popen(["node", str(DRIVER), json.dumps(options)], cwd=HERE, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"drive.mjs offline ran past {timeout:.0f} s\n{stderr[-4000:]}", pytrace=False)
    results = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not results:
        pytest.fail(f"drive.mjs offline failed (rc {process.returncode}):\n{stderr[-6000:]}", pytrace=False)
    print(f"\n[offline] {html.name}: {html.stat().st_size / 1e6:.1f} MB; screenshots in {out}")
    return json.loads(results[-1].removeprefix("RESULT "))


def assert_offline(result: dict, figures: int, maths: int) -> None:
    assert result["blocked"] == [], f"the page asked the network for {result['blocked'][:5]}"
    assert result["errors"] == [], result["errors"]
    assert result["figures"] >= figures and result["drawn"] == result["figures"], result
    assert result["maths"] >= maths and result["typeset"] == result["maths"], result
    assert result["raw_tex"] == [], result["raw_tex"]
    assert not result["widget_repr"] and result["frozen_bars"] == 0, result
    assert result["screenshots"] and all(os.path.getsize(shot) > 1000 for shot in result["screenshots"])


TINY = [
    ("markdown", ("# Offline\n\nGXPO lands at $\\tilde\\theta = \\theta_0 + \\alpha q \\odot (\\theta_2 - \\theta_0)$, "
                 "where\n\n$$q = \\frac{S_K(r)}{S_2(r)}, \\qquad S_K(r) = \\sum_{i=0}^{K-1} r^i$$\n\n"
                 "Code such as `echo $HOME` is left alone.")),
    ("code", ("import plotly.graph_objects as go\nimport ipywidgets as widgets\n"
             "from IPython.display import Markdown, display\n"
             "from gxpo_lib import analysis\nanalysis.setup_plotly()\n"
             "go.Figure(go.Scatter(x=[1, 2, 3], y=[0.2, 0.5, 0.4], name='pass@1')).show()")),
    ("code", "display(Markdown('computed: $\\\\alpha \\\\cdot q = 1.25$'))"),
    ("code", ("figure = go.FigureWidget(go.Bar(x=['GRPO', 'GXPO'], y=[1, 3]))\n"
             "widgets.VBox([widgets.IntSlider(value=5, min=2, max=20, description='K'), figure])")),
    ("code", "from tqdm.auto import tqdm\nfor _ in tqdm(range(20), desc='steps'):\n    pass"),
]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """The tiny notebook executed by execute_notebook (which writes the offline HTML copy)."""
    folder = tmp_path_factory.mktemp("offline")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(text) if kind == "markdown" else nbformat.v4.new_code_cell(text)
                for kind, text in TINY]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "tiny.ipynb")
    output = execute_notebook(folder / "tiny.ipynb", folder / "out", timeout=300)
    return output, output.with_suffix(".html")


@pytest.mark.slow  # its fixture executes a notebook in a kernel
def test_the_executed_notebook_keeps_widget_snapshots_not_megabytes_of_state(tiny_export):
    notebook, _ = tiny_export
    nb = nbformat.read(notebook, as_version=4)
    assert "widgets" not in nb.metadata                                   # the state (plotly.js) is dropped
    widget_outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                      if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(widget_outputs) == 2                                       # the explorer-like box, tqdm's bar
    assert all("gxpo-widget" in o.data["text/html"] for o in widget_outputs)
    assert notebook.stat().st_size < 1_000_000


@pytest.mark.slow  # its fixture executes a notebook in a kernel
def test_tiny_export_draws_figures_maths_and_widgets_with_the_network_off(tiny_export):
    _, html = tiny_export
    page = html.read_text(encoding="utf-8")
    assert page.count(PLOTLY_BANNER) == 1                                 # plotly.js inlined once
    assert page.count("Plotly.newPlot") == 2                              # the figure and the FigureWidget
    result = open_offline(html, OUTPUT / "offline")
    assert_offline(result, figures=2, maths=3)
    assert result["widget_snapshots"] == 2
    assert result["progress"] == [[20, 20]]                               # tqdm's bar at its end, not 0%
    assert html.stat().st_size < 6_000_000                                # plotly.js once, not per figure


@pytest.mark.slow
def test_notebook01_export_works_offline(tmp_path):
    output = execute_notebook(NOTEBOOK_DIR / "01_toy_extrapolation.ipynb", tmp_path, timeout=600)
    html = output.with_suffix(".html")
    result = open_offline(html, OUTPUT / "offline-nb01")
    assert_offline(result, figures=6, maths=10)
    assert result["widget_snapshots"] == 1                                # the explorer, as it was drawn
    assert html.stat().st_size < 12_000_000
