"""Running the notebooks headless (papermill) and keeping them stored without outputs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from gxpo_lib.paths import shipped

NOTEBOOK_DIR = shipped("notebooks")  # package data; notebooks/ in a checkout
HEADLESS_ENV = "GXPO_HEADLESS"
"""Set to 1 for the kernels `execute_notebook` starts: `gxpo_lib.teach.check.headless` reads it (0 forces False)."""


def find_notebooks(directory: Path | str = NOTEBOOK_DIR) -> list[Path]:
    """The suite's notebooks in teaching order (their names start with a number)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"directory={str(directory)!r} is invalid: allowed an existing folder of notebooks")
    return sorted(p for p in directory.glob("*.ipynb") if not p.name.startswith("."))


def execute_notebook(notebook: Path | str, out_dir: Path | str, parameters: dict[str, Any] | None = None,
                     timeout: int = 1800, html: bool = True) -> Path:
    """Execute one notebook with papermill into `out_dir` (its working directory too); returns the output.

    The executed copy keeps the notebook's name; with `html` an HTML copy that works offline is written
    beside it (`export_html`). The kernel starts with ``GXPO_HEADLESS=1`` (`check.headless`): exercises
    whose ``fill_solutions`` is None (auto) are filled with their solutions, so the run goes top to bottom.
    Widget state is recorded while the notebook runs, turned into a static snapshot on each widget output
    (`gxpo_lib.teach.html_export.snapshot_widgets`: a FigureWidget's figure, a progress bar's final value) and
    then dropped, so the executed notebook stays small.
    """
    import papermill

    notebook, out_dir = Path(notebook), Path(out_dir)
    if not notebook.is_file():
        raise ValueError(f"notebook={str(notebook)!r} is invalid: allowed an existing .ipynb file")
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / notebook.name
    before = os.environ.get(HEADLESS_ENV)
    os.environ[HEADLESS_ENV] = "1"  # the kernel papermill starts inherits it; restored below
    try:
        papermill.execute_notebook(
            str(notebook), str(output), parameters=parameters or {}, kernel_name="python3",
            cwd=str(out_dir), execution_timeout=timeout, progress_bar=False,
            store_widget_state=True,  # read into static snapshots below, then dropped (MBs of plotly.js)
        )
    finally:
        if before is None:
            os.environ.pop(HEADLESS_ENV, None)
        else:
            os.environ[HEADLESS_ENV] = before
    _snapshot_widgets(output)
    if html:
        export_html(output)
    return output


def _snapshot_widgets(notebook: Path) -> None:
    """Replace the saved widget state of an executed notebook by static snapshots on its widget outputs."""
    import nbformat

    from gxpo_lib.teach.html_export import snapshot_widgets

    nb = nbformat.read(notebook, as_version=4)
    if snapshot_widgets(nb) or "widgets" in nb.metadata:
        nbformat.write(nb, notebook)


def export_html(notebook: Path | str, offline: bool = True) -> Path:
    """Write an HTML copy of an executed notebook beside it.

    With `offline` (the default) the page needs no network (`gxpo_lib.teach.html_export`): plotly.js inlined
    once per file, maths as MathML, widgets as static snapshots. ``offline=False`` is nbconvert's plain
    export (small, but its figures, maths and widgets load from CDNs).
    """
    notebook = Path(notebook)
    if offline:
        from gxpo_lib.teach.html_export import export_offline_html

        return export_offline_html(notebook)
    import nbconvert
    import nbformat

    body, _ = nbconvert.HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    target = notebook.with_suffix(".html")
    target.write_text(body, encoding="utf-8")
    return target


def run_all(out_dir: Path | str = "runs", directory: Path | str = NOTEBOOK_DIR,
            only: list[str] | None = None) -> list[dict[str, Any]]:
    """Execute every notebook (or those named in `only`) with its defaults; one summary row per notebook."""
    found = find_notebooks(directory)
    if only:
        unknown = sorted(set(only) - {p.name for p in found})
        if unknown:
            raise ValueError(f"only={unknown!r} is invalid: allowed {[p.name for p in found]}")
        found = [p for p in found if p.name in only]
    rows = []
    for notebook in found:
        print(f"[gxpo] executing {notebook.name} ...", flush=True)
        start = time.perf_counter()
        try:
            output = execute_notebook(notebook, out_dir)
            rows.append({"notebook": notebook.name, "ok": True, "seconds": time.perf_counter() - start,
                         "output": str(output)})
        except Exception as error:  # keep going: one broken notebook must not hide the others
            rows.append({"notebook": notebook.name, "ok": False, "seconds": time.perf_counter() - start,
                         "error": f"{type(error).__name__}: {str(error)[-500:]}"})
        row = rows[-1]
        print(f"[gxpo] {notebook.name}: {'ok' if row['ok'] else 'FAILED'} in {row['seconds']:.1f} s", flush=True)
    return rows


def has_outputs(notebook: Path | str) -> bool:
    """True if any code cell of the stored notebook has outputs or an execution count."""
    cells = json.loads(Path(notebook).read_text(encoding="utf-8")).get("cells", [])
    return any(c.get("outputs") or c.get("execution_count") for c in cells if c.get("cell_type") == "code")


def strip_outputs(notebook: Path | str) -> bool:
    """Remove outputs, execution counts and widget state in place; True if the file changed."""
    path = Path(notebook)
    original = path.read_text(encoding="utf-8")
    data = json.loads(original)
    for cell in data.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cell.get("metadata", {}).pop("execution", None)
    data.get("metadata", {}).pop("widgets", None)
    stripped = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    if stripped != original:
        path.write_text(stripped, encoding="utf-8")
    return stripped != original
