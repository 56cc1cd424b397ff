"""Offline HTML copies of executed notebooks: figures drawn, maths typeset, widgets shown, with no network.

nbconvert's HTML loads plotly.js, MathJax and the widget manager from CDNs, so an export opened offline
shows blank figures, raw LaTeX and ``VBox(children=(...`` in place of each widget. `export_offline_html`
writes a page that needs nothing from outside:

- **figures**: every plotly figure is redrawn from its JSON (``application/vnd.plotly.v1+json``) with
  plotly.js inlined **once** in the page's head (about 4.6 MB), whatever the number of figures; the CDN
  loaders the ``notebook_connected`` renderer wrote are dropped;
- **maths**: the LaTeX of markdown cells and markdown outputs is converted to MathML at export time
  (`latex2mathml`, pure Python), which browsers typeset natively: no MathJax, no script;
- **widgets**: each widget output becomes a static snapshot of its state when the notebook was saved
  (`snapshot_widgets`): a FigureWidget its figure, a slider ``K (lookahead): 5``, a progress bar its
  final value (a tqdm bar reads 100%, not a frozen 0%), an Output widget its outputs. Without saved state
  the output says that it was an interactive widget instead of printing its repr;
- **progress text** written with carriage returns (tqdm in a terminal) keeps only its last update.

`gxpo_lib.teach.headless.execute_notebook` saves the widget state while it executes, turns it into snapshots
(`snapshot_widgets`) and drops the state itself (megabytes of plotly.js per FigureWidget) before writing.
"""

from __future__ import annotations

import copy
import html
import json
import re
from pathlib import Path
from typing import Any

PLOTLY = "application/vnd.plotly.v1+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_BOXES = ("VBoxModel", "HBoxModel", "BoxModel", "GridBoxModel", "AccordionModel", "TabModel", "StackModel")
_CHOICES = ("DropdownModel", "RadioButtonsModel", "SelectModel", "ToggleButtonsModel", "SelectionSliderModel")
_CSS = """<style>
.gxpo-widget { border-left: 3px solid #bbb; padding: 4px 8px; margin: 4px 0; }
.gxpo-widget .gxpo-row { display: flex; flex-direction: row; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
.gxpo-widget .gxpo-col { display: flex; flex-direction: column; gap: 4px; }
.gxpo-control { font-family: sans-serif; font-size: 13px; }
.gxpo-note { color: #666; font-style: italic; font-family: sans-serif; font-size: 13px; }
details > summary { cursor: pointer; color: #1f5fa8; }
</style>"""
_WIDGET_NOTE = ("interactive widget: this static copy shows it as it was saved; run the notebook in Jupyter to "
                "use it")


# -- Figures and maths ------------------------------------------------------------------------------
def figure_html(figure: dict[str, Any]) -> str:
    """A plotly figure (a dict with data and layout) as a div and the script that draws it; plotly.js
    itself must already be on the page."""
    import plotly.io as pio

    return pio.to_html(figure, include_plotlyjs=False, include_mathjax=False, full_html=False, validate=False,
                       config={"responsive": True})


def tex_to_mathml(tex: str, display: bool = False) -> str:
    """LaTeX as MathML (``<math>``); TeX it cannot convert stays visible as code, without its dollars."""
    from latex2mathml.converter import convert

    try:
        return convert(tex.strip(), display="block" if display else "inline")
    except Exception:  # an unknown macro must not break the export
        return f'<code class="tex">{html.escape(tex.strip())}</code>'


# -- Widgets ----------------------------------------------------------------------------------------
def widget_html(model_id: str, state: dict[str, Any], depth: int = 0) -> str:
    """A static HTML snapshot of one widget model and its children, from a notebook's widget state."""
    entry = state.get(model_id)
    if entry is None or depth > 20:
        return f'<span class="gxpo-note">[{_WIDGET_NOTE}]</span>'
    name, values = entry.get("model_name", ""), entry.get("state", {})
    label = html.escape(str(values.get("description") or ""))
    prefix = f"<b>{label}</b> " if label else ""
    if name in _BOXES:
        children = [widget_html(str(c).removeprefix("IPY_MODEL_"), state, depth + 1)
                    for c in values.get("children", [])]
        css = "gxpo-row" if name in ("HBoxModel", "GridBoxModel") else "gxpo-col"
        return f'<div class="{css}">' + "".join(children) + "</div>"
    if "_widget_data" in values:  # plotly's FigureWidget (an anywidget model)
        return figure_html({"data": values.get("_widget_data") or [], "layout": values.get("_widget_layout") or {}})
    if name in ("HTMLModel", "HTMLMathModel"):
        return f'<div class="gxpo-control">{prefix}{values.get("value", "")}</div>'
    if name == "LabelModel":
        return f'<div class="gxpo-control">{prefix}{html.escape(str(values.get("value", "")))}</div>'
    if name in ("IntProgressModel", "FloatProgressModel"):
        low, high, value = values.get("min", 0), values.get("max", 100), values.get("value", 0)
        share = 0 if high == low else (value - low) / (high - low)
        return (f'<span class="gxpo-control">{prefix}<progress value="{value - low}" max="{high - low}"></progress>'
                f" {share:.0%}</span>")
    if name in _CHOICES:
        labels, index = values.get("_options_labels") or [], values.get("index")
        chosen = labels[index] if isinstance(index, int) and 0 <= index < len(labels) else index
        return f'<span class="gxpo-control">{prefix}{html.escape(str(chosen))}</span>'
    if name == "OutputModel":
        return "".join(_output_html(o) for o in values.get("outputs", []))
    if name == "ButtonModel":
        return f'<button class="gxpo-control" disabled>{label}</button>'
    if "value" in values:  # sliders, texts, checkboxes, toggle buttons...
        value = values["value"]
        text = " – ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        if "Slider" in name and "min" in values and "max" in values:
            text += f" (range {values['min']} to {values['max']})"
        return f'<span class="gxpo-control">{prefix}{html.escape(text)}</span>'
    return ""  # layouts and styles draw nothing themselves


def _output_html(output: dict[str, Any]) -> str:
    """One output of an Output widget as HTML."""
    data = output.get("data", {})
    if PLOTLY in data:
        return figure_html(data[PLOTLY])
    if "text/html" in data:
        return _text(data["text/html"])
    if "image/png" in data:
        return f'<img alt="figure" src="data:image/png;base64,{_text(data["image/png"])}">'
    text = _text(data.get("text/plain", output.get("text", "")))
    return f"<pre>{html.escape(_last_updates(text))}</pre>" if text else ""


def snapshot_widgets(nb) -> int:
    """In place: give every widget output of `nb` a ``text/html`` static snapshot of its saved state (or,
    without one, a note that it was an interactive widget, in place of its repr), then drop the saved
    widget state. Returns the number of widget outputs. The widget mimetype stays, so the notebook's
    widgets still come alive when its cells run again."""
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    count = 0
    for cell in nb.get("cells", []):
        for output in cell.get("outputs", []) if cell.get("cell_type") == "code" else []:
            data = output.get("data", {})
            if WIDGET_VIEW not in data:
                continue
            count += 1
            model_id = data[WIDGET_VIEW].get("model_id", "")
            if model_id in state:
                snapshot = widget_html(model_id, state)
            elif "text/html" in data:
                continue  # snapshotted before
            else:
                snapshot = f'<span class="gxpo-note">[{_WIDGET_NOTE}]</span>'
            data["text/html"] = f'<div class="gxpo-widget">{snapshot}</div>'
            data["text/plain"] = "[interactive widget: a static snapshot is in text/html]"
    nb.get("metadata", {}).pop("widgets", None)
    return count


# -- The notebook and the page ----------------------------------------------------------------------
def offline_notebook(nb):
    """A copy of `nb` whose outputs need no network: figures redrawn from their JSON, widgets as static
    snapshots, plotly's CDN loaders dropped, LaTeX outputs as MathML, carriage-return progress collapsed."""
    nb = copy.deepcopy(nb)
    snapshot_widgets(nb)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                output["data"] = {"text/html": data["text/html"], "text/plain": data["text/plain"]}
            elif PLOTLY in data:
                figure = data[PLOTLY]
                output["data"] = {"text/html": figure_html(json.loads(figure) if isinstance(figure, str) else figure),
                                  "text/plain": "[figure]"}
            elif "cdn.plot.ly" in _text(data.get("text/html", "")):
                continue  # the connected renderer's loader: plotly.js is inlined once instead
            elif "text/latex" in data and "text/html" not in data:
                tex = _text(data["text/latex"]).strip()
                display = tex.startswith(("$$", "\\["))
                data["text/html"] = tex_to_mathml(tex.strip("$").removeprefix("\\[").removesuffix("\\]"), display)
            elif output.get("output_type") == "stream":
                output["text"] = _last_updates(_text(output.get("text", "")))
            kept.append(output)
        cell["outputs"] = kept
    return nb


def export_offline_html(notebook: Path | str, target: Path | str | None = None) -> Path:
    """Write an HTML copy of an executed notebook that works without a network (see the module); returns
    its path (default: beside the notebook, ``.html``)."""
    import nbformat
    from plotly.offline import get_plotlyjs

    notebook = Path(notebook)
    nb = offline_notebook(nbformat.read(notebook, as_version=4))
    body, _ = _exporter().from_notebook_node(nb)
    body = _drop_remote_scripts(body)
    head = _CSS
    if "Plotly.newPlot" in body:
        head += '\n<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: "local"};</script>\n' \
                f'<script type="text/javascript">{get_plotlyjs()}</script>\n'
    body = body.replace("</head>", head + "</head>", 1)
    target = Path(target) if target else notebook.with_suffix(".html")
    target.write_text(body, encoding="utf-8")
    return target


def remote_references(page: str) -> list[str]:
    """The URLs a page would fetch (script, link, img, iframe sources and module imports): an offline
    page has none."""
    found = re.findall(r"<(?:script|link|img|iframe)\b[^>]*?\b(?:src|href)=[\"'](https?:)?//([^\"']+)", page)
    found += re.findall(r"import\s+[\"']https?://([^\"']+)", page)
    return ["//" + (f[1] if isinstance(f, tuple) else f) for f in found]


def _drop_remote_scripts(page: str) -> str:
    """Remove the template's CDN scripts (MathJax, require.js, the widget manager) and MathJax's config."""
    page = re.sub(r"<script[^>]*\bsrc=[\"']https?://[^\"']*[\"'][^>]*>\s*</script>", "", page)
    page = re.sub(r"<script type=\"text/x-mathjax-config\">.*?</script>", "", page, flags=re.DOTALL)
    return re.sub(r"<script type=\"module\">\s*import\s+[\"']https?://[^<]*</script>", "", page)


def _exporter():
    """nbconvert's HTML exporter (lab template) with LaTeX in markdown rendered as MathML."""
    from jinja2 import pass_context
    from nbconvert import HTMLExporter
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

    class MathMLRenderer(IPythonRenderer):
        def block_math(self, body: str) -> str:
            return tex_to_mathml(body, display=True)

        def inline_math(self, body: str) -> str:
            return tex_to_mathml(body)

        def latex_environment(self, name: str, body: str) -> str:
            return tex_to_mathml(f"\\begin{{{name}}}{body}\\end{{{name}}}", display=True)

    class OfflineHTMLExporter(HTMLExporter):
        @pass_context
        def markdown2html(self, context, source):
            cell = context.get("cell", {})
            renderer = MathMLRenderer(
                escape=False, attachments=cell.get("attachments", {}), embed_images=self.embed_images,
                path=context.get("resources", {}).get("metadata", {}).get("path", ""),
                anchor_link_text=self.anchor_link_text, exclude_anchor_links=self.exclude_anchor_links,
                **self.lexer_options)
            return MarkdownWithMath(renderer=renderer).render(source)

    return OfflineHTMLExporter()


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value or "")


def _last_updates(text: str) -> str:
    """Each line as the terminal showed it last: what follows its final carriage return."""
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))
