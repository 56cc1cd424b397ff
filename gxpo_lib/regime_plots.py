"""The regime study's figures for notebook 05: pass@1 against lr, the speed-up map (lr x K), the diagnostics
against lr, and the toy race. Numbers come from ``gxpo_lib.regime`` (``cell_table``, ``speedup_map``,
``toy_race``); every axis has a title, log axes write powers of ten. Colours are the suite's
(`analysis.palette.method_color`: GRPO green, GXPO K=5 red, ... as in every notebook); a band is its mean
line (no markers) with the interval shaded, clipped to what the quantity can be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .analysis.palette import method_colors
from .analysis.palette import rgba as _rgba
from .regime import speedup_map
from .validation import check_choice

_LEGEND = {"orientation": "h", "y": -0.25, "yanchor": "top"}


def _band_traces(x: list[float], mean: list[float], lo: list[float], hi: list[float], name: str, color: str,
                 bounds: tuple[float, float] = (-math.inf, math.inf)):
    """A mean line (no markers: it is a mean, not a measurement) and its interval as a shaded polygon,
    clipped to `bounds` (points without bounds: line only)."""
    import plotly.graph_objects as go

    traces = [go.Scatter(x=x, y=mean, mode="lines", name=name, line={"color": color, "width": 2},
                         legendgroup=name)]
    pairs = [(a, max(b, bounds[0]), min(c, bounds[1])) for a, b, c in zip(x, lo, hi)
             if b is not None and math.isfinite(b) and c is not None and math.isfinite(c)]
    if pairs:
        xs, los, his = zip(*pairs)
        traces.append(go.Scatter(x=list(xs) + list(xs)[::-1], y=list(his) + list(los)[::-1], fill="toself",
                                 fillcolor=_rgba(color, 0.15), line={"width": 0}, hoverinfo="skip",
                                 showlegend=False, legendgroup=name))
    return traces


def plot_pass_vs_lr(table, metric: str = "final", methods: Sequence[str] | None = None):
    """`metric` ("final" or "peak") pass@1 against lr (log axis), a line per method, 95% t band over seeds."""
    import plotly.graph_objects as go

    check_choice("metric", metric, ("final", "peak"))
    methods = list(methods or dict.fromkeys(table["method"]))
    colors, fig = method_colors(methods), go.Figure()
    for method in methods:
        part = table[table["method"] == method].sort_values("lr")
        for trace in _band_traces(part["lr"].tolist(), part[metric].tolist(), part[f"{metric}_lo"].tolist(),
                                  part[f"{metric}_hi"].tolist(), method, colors[method], bounds=(0.0, 1.0)):
            fig.add_trace(trace)
    fig.update_layout(title=f"{metric} pass@1 against the learning rate (mean over seeds, 95% t band)",
                      xaxis={"title": "learning rate", "type": "log", "exponentformat": "power"},
                      yaxis={"title": f"{metric} pass@1"},
                      legend=_LEGEND, height=420)
    return fig


def plot_speedup_map(table, reference: str = "same_lr", x: str = "step", retention: str = "grad"):
    """Heatmap of `speedup_map`: 1 = as fast as GRPO, 0 = never reached its peak, blank = not run."""
    import plotly.graph_objects as go

    ks, lrs, values, texts = speedup_map(table, reference, x, retention)
    fig = go.Figure(go.Heatmap(z=values, x=[f"{lr:g}" for lr in lrs], y=[f"K={k}" for k in ks], text=texts,
                               texttemplate="%{text}", colorscale="RdBu", zmid=1.0, zmin=0.0, zmax=2.0,
                               colorbar={"title": "speed-up"}))
    where = "the same lr's" if reference == "same_lr" else "the best lr's"
    fig.update_layout(title=f"GXPO ({retention}) speed-up in {x} to {where} GRPO peak (seed bootstrap)",
                      xaxis={"title": "learning rate", "type": "category"}, yaxis={"title": "K"}, height=360)
    return fig


def plot_diagnostics_vs_lr(table):
    """Mean cos(g0, g1) and alpha*q over extrapolating steps against lr, per extrapolating method."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("cos(g0, g1)", "alpha * q-bar"))
    methods = [m for m in dict.fromkeys(table["method"]) if not m.startswith("GRPO")]
    colors = method_colors(methods)
    for method in methods:
        part = table[table["method"] == method].sort_values("lr")
        for col, (key, short, bounds) in enumerate((("cos_g0_g1", "cos", (-1.0, 1.0)),
                                                    ("alpha_q", "alpha_q", (0.0, math.inf))), 1):
            for trace in _band_traces(part["lr"].tolist(), part[key].tolist(), part[f"{short}_lo"].tolist(),
                                      part[f"{short}_hi"].tolist(), method, colors[method], bounds):
                trace.showlegend = trace.showlegend is not False and col == 1
                fig.add_trace(trace, row=1, col=col)
    fig.add_hline(y=0.0, line_dash="dot", line_color="gray", row=1, col=1)
    fig.add_hline(y=1.0, line_dash="dot", line_color="gray", row=1, col=2)
    fig.update_xaxes(type="log", title_text="learning rate", exponentformat="power")
    fig.update_yaxes(title_text="mean cos(g0, g1)", row=1, col=1)
    fig.update_yaxes(title_text="mean alpha * q-bar", row=1, col=2)
    fig.update_layout(title="what the jump saw: gradient agreement and step multiplier against lr",
                      legend=_LEGEND, height=420)
    return fig


def plot_toy_race(race: dict[str, Any]):
    """Loss (log axis) against backward passes for the curves of `toy_race`."""
    import plotly.graph_objects as go

    colors = method_colors(race["curves"])
    fig = go.Figure([go.Scatter(x=c["passes"], y=c["loss"], mode="lines", name=name, line={"color": colors[name]})
                     for name, c in race["curves"].items()])
    fig.update_layout(title=f"ill-conditioned quadratic, lr {race['lr']:g}: loss against backward passes",
                      xaxis={"title": "backward passes"}, yaxis={"title": "loss", "type": "log", "exponentformat": "power"},
                      legend=_LEGEND, height=380)
    return fig
