"""Plotly figures of runs: curves with seed bands, GXPO's mechanism and diagnostics, one run's training.

Every figure has axis titles and a legend, and a reference line wherever a value has a meaning
(r = 1: the gradient persists; α·q = 1: the landing point is θ2; cos = 0: orthogonal gradients; τ: the
gate's threshold). Conventions shared by every figure of the suite:

- **one colour per method** (`palette.method_color`: GRPO green, GXPO K=5 red, ... in every notebook);
- **bands are lines**: the mean over seeds as a line without markers, its interval shaded (markers are
  kept for measured points, never for a mean);
- **intervals clipped** to what the quantity can be (pass@1 in [0, 1], `stats.metric_range`);
- **CPU seconds** wherever time is compared (the runs' own CPU time, not the wall clock of a shared machine);
- **seed means, not spaghetti**: diagnostics are one band per group, not one line per run;
- **integer ticks** where a quantity is an integer (steps, passes: `integer_ticks`).

`setup_plotly` picks a renderer that shows figures in JupyterLab offline and keeps them in HTML exports
without embedding plotly.js in every notebook (`gxpo_lib.teach.html_export` inlines it once per HTML file).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gxpo_lib.analysis.palette import method_colors, rgba
from gxpo_lib.analysis.records import Run, is_number
from gxpo_lib.analysis.runs import DEFAULT_BY, Group, group_runs
from gxpo_lib.analysis.stats import X_CHOICES, band, check_x, clip_interval, metric_range, x_value

RENDERER = "plotly_mimetype+notebook_connected"
_X_TITLES = {"step": "step", "seconds": "training seconds (wall clock)", "cpu_seconds": "training CPU seconds",
             "hours": "training hours (wall clock)", "cpu_hours": "training CPU hours",
             "cumulative_backward_passes": "backward passes (cumulative)"}
_INTEGER_X = ("step", "cumulative_backward_passes")
_LEGEND = {"orientation": "h", "y": -0.25, "yanchor": "top"}
_LEGEND_CHARS = 32


def setup_plotly(renderer: str = RENDERER) -> str:
    """Set plotly's default renderer for `fig.show()`; returns it.

    The default, ``plotly_mimetype+notebook_connected``, writes each figure twice and small: as plotly's
    JSON mimetype, which JupyterLab's bundled plotly extension draws offline, and as HTML that loads
    plotly.js from its CDN. The suite's HTML export (`gxpo_lib.teach.html_export`) redraws every figure from the
    JSON with plotly.js inlined once per file, so the exported pages work offline. The ``notebook``
    renderer instead embeds plotly.js (about 4.6 MB) in the notebook, which made executed notebooks 10-22 MB.
    """
    import plotly.io as pio

    pio.renderers.default = renderer
    return renderer


def group_colors(groups: Sequence[Group]) -> dict[str, str]:
    """One colour per group label: the suite's colour of its method (`palette.method_colors`), distinct
    inside the figure."""
    return method_colors(g.label for g in groups)


def short_label(label: str, chars: int = _LEGEND_CHARS) -> str:
    """A legend entry: the label, cut to `chars` characters with an ellipsis (hover shows it whole)."""
    return label if len(label) <= chars else label[:chars - 1] + "…"


def integer_ticks(values: Sequence[float]) -> dict:
    """Axis settings for an integer quantity (steps, passes, K): a tick at every integer over a short
    span, else plotly's ticks printed as integers; never 0.3, 1.75, 3.21."""
    finite = [float(v) for v in values if is_number(v)]
    span = max(finite) - min(finite) if finite else 0.0
    return {"tick0": 0, "dtick": 1} if span <= 10 else {"tickformat": "d"}


def band_traces(df, x: str, color: str, name: str, group: str, showlegend: bool = True, dash: str = "solid",
                hover: str = ""):
    """A band as plotly traces: the interval shaded between ``lo`` and ``hi`` (where defined), then the
    mean as a line without markers. `df`: a `stats.band` frame."""
    import plotly.graph_objects as go

    traces = []
    shaded = df.dropna(subset=["lo", "hi"])
    if len(shaded):  # the interval as a filled polygon: upper edge forward, lower edge back
        traces.append(go.Scatter(
            x=list(shaded[x]) + list(shaded[x])[::-1], y=list(shaded["hi"]) + list(shaded["lo"])[::-1],
            fill="toself", fillcolor=rgba(color, 0.18), line={"width": 0}, hoverinfo="skip", mode="lines",
            showlegend=False, legendgroup=group, name=f"{name} interval"))
    traces.append(go.Scatter(
        x=df[x], y=df["mean"], mode="lines", line={"color": color, "dash": dash, "width": 2}, legendgroup=group,
        name=name, showlegend=showlegend, customdata=df["n"],
        hovertemplate=f"{hover or name}<br>%{{y:.3f}} (runs: %{{customdata}})<extra></extra>"))
    return traces


# ---------------------------------------------------------------------------------------------------
# Curves over seeds
# ---------------------------------------------------------------------------------------------------
def plot_curves(runs: Sequence[Run], metric: str = "pass@1",
                xs: Sequence[str] = ("step", "cpu_seconds", "cumulative_backward_passes"),
                by: Sequence[str] = DEFAULT_BY,
                interval: str = "t", rows: str = "auto", single_run_interval: bool = False):
    """`metric` against each x in `xs`, one line per group (the mean over seeds) with its interval shaded,
    clipped to the metric's range (`stats.metric_range`: pass@1 in [0, 1]).

    A group of one run has no interval over seeds; with `single_run_interval` its band is the run's own
    95% bootstrap interval over the evaluation problems (``<metric>_ci`` in its eval rows). Each x is one
    of `stats.X_CHOICES` (against backward passes: ``"cumulative_backward_passes"``).
    """
    from plotly.subplots import make_subplots

    for x in xs:
        check_x(x, X_CHOICES, "xs")
    groups = group_runs(runs, by)
    colors = group_colors(groups)
    fig = make_subplots(rows=1, cols=len(xs), shared_yaxes=True,
                        subplot_titles=[f"vs {_X_TITLES[x]}" for x in xs])
    seen: dict[str, list[float]] = {x: [] for x in xs}
    for group in groups:
        for col, x in enumerate(xs, start=1):
            df = band(group.runs, metric, x, interval=interval, rows=rows)
            if df.empty:
                continue
            if single_run_interval and len(group.runs) == 1:
                df = _own_interval(group.runs[0], metric, x, df)
            seen[x] += list(df[x])
            for trace in band_traces(df, x, colors[group.label], f"{short_label(group.label)} (n={len(group.runs)})",
                                     group.label, showlegend=col == 1, hover=group.label):
                fig.add_trace(trace, row=1, col=col)
    for col, x in enumerate(xs, start=1):
        fig.update_xaxes(title_text=_X_TITLES[x], row=1, col=col,
                         **(integer_ticks(seen[x]) if x in _INTEGER_X else {}))
    low, high = metric_range(metric)
    if math.isfinite(low) and math.isfinite(high):
        fig.update_yaxes(range=[low - 0.02 * (high - low), high + 0.02 * (high - low)])
    fig.update_yaxes(title_text=metric, row=1, col=1)
    single = " (one seed: bootstrap over problems)" if single_run_interval else ""
    fig.update_layout(height=430, width=380 * len(xs) + 150, legend=_LEGEND, legend_title_text="group",
                      title=f"{metric}: mean over seeds; shaded: 95% {interval} interval over seeds{single}")
    return fig


def _own_interval(run: Run, metric: str, x: str, df):
    """A one-run band with the run's stored interval over problems (eval rows' ``<metric>_ci``)."""
    bounds = {}
    for row in run.eval:
        where, ci = x_value(row, x), row.get(f"{metric}_ci")
        if is_number(where) and isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(is_number, ci)):
            bounds[float(where)] = clip_interval(float(ci[0]), float(ci[1]), *metric_range(metric))
    df = df.copy()
    df["lo"] = [bounds.get(float(v), (None, None))[0] for v in df[x]]
    df["hi"] = [bounds.get(float(v), (None, None))[1] for v in df[x]]
    return df.astype({"lo": float, "hi": float})


# ---------------------------------------------------------------------------------------------------
# GXPO's mechanism and diagnostics, per run over steps
# ---------------------------------------------------------------------------------------------------
# (panel title, row keys, y of a reference line and what it means, y-axis title)
_DIAG_PANELS = (
    ("gate z (shut-off signal)", ("gate_z",), None, "z-score"),
    ("retention r (mean over coordinates)", ("r_mean",), (1.0, "r = 1"), "r"),
    ("scale q: mean, max", ("scale_mean", "scale_max"), None, "q"),
    ("effective multiplier α·q", ("effective_multiplier",), (1.0, "α·q = 1: θ̃ = θ2"), "α·q"),
    ("cos(g0, g1)", ("cos_g0_g1",), (0.0, "cos = 0"), "cosine"),
    ("cos(g0, g_slow)", ("cos_g0_gslow",), (0.0, "cos = 0"), "cosine"),
    ("jump / ||θ||", ("jump_over_param_norm",), None, "ratio"),
    ("inactive and clamped fractions", ("inactive_frac", "ratio_clip_frac"), None, "fraction"),
)
_MECHANISM_PANELS = (
    ("mean retention r = g1/g0", ("r_mean",), (1.0, "r = 1: the gradient persists"), "r (mean)"),
    ("cos(g0, g1)", ("cos_g0_g1",), (0.0, "cos = 0"), "cosine"),
    ("α·q: where θ̃ lands on θ0 → θ2", ("effective_multiplier",), (1.0, "α·q = 1: θ̃ = θ2"), "α·q (mean)"),
)


def has_diagnostics(run: Run) -> bool:
    """True if any train row carries a GXPO/SFPO diagnostic (GRPO runs have none)."""
    keys = ("r_mean", "scale_mean", "jump_norm", "gate_z")
    return any(is_number(r.get(k)) for r in run.train for k in keys)


def plot_diagnostics(runs: Sequence[Run], by: Sequence[str] = DEFAULT_BY, interval: str = "t"):
    """GXPO's diagnostics over steps, one band per group (the mean over its seeds, a 95% interval shaded):
    gate z with τ and the shut-off step, retention r, scale q, α·q, the two cosines, jump / ||θ||, the
    inactive and clamped fractions. Returns None when no run has diagnostics."""
    fig = _panels_figure(runs, by, _DIAG_PANELS, cols=4, interval=interval)
    if fig is not None:
        fig.update_layout(height=680, width=1400, title="GXPO diagnostics: mean over seeds per group, 95% "
                          f"{interval} interval shaded (dashed: mean shut-off step; dotted: τ; grey: reference values)")
    return fig


def plot_mechanism(runs: Sequence[Run], by: Sequence[str] = DEFAULT_BY, interval: str = "t"):
    """What the jump did, per extrapolating step, mean over seeds per group: r (against r = 1), cos(g0, g1)
    (against 0) and α·q (against 1: below it θ̃ stops short of θ2, the jump "retreated", though with the
    corrective step the update is still about 1 + 2α·q̄ plain steps, never a shorter step). None when no run
    extrapolated."""
    fig = _panels_figure(runs, by, _MECHANISM_PANELS, cols=3, interval=interval)
    if fig is not None:
        fig.update_layout(height=400, width=1200, title="The mechanism per extrapolating step, mean over seeds "
                          "(θ̃ = θ0 + α·q ⊙ (θ2 − θ0); grey: reference values)")
    return fig


def _panels_figure(runs: Sequence[Run], by: Sequence[str], panels: tuple, cols: int, interval: str = "t"):
    """One subplot per panel, one band per group and key (`stats.band` over the group's seeds, on train
    rows); the gate marked on a gate panel. A trace's ``meta`` is its key."""
    from plotly.subplots import make_subplots

    runs = [r for r in runs if r.algorithm != "grpo" and has_diagnostics(r)]
    if not runs:
        return None
    groups = group_runs(runs, by)
    colors = group_colors(groups)
    n_rows = -(-len(panels) // cols)
    fig = make_subplots(rows=n_rows, cols=cols, subplot_titles=[p[0] for p in panels],
                        horizontal_spacing=0.06, vertical_spacing=0.2 if n_rows > 1 else 0.1)
    steps: list[float] = []
    for group in groups:
        shown = False
        for panel, (_, keys, _, _) in enumerate(panels):
            for j, key in enumerate(keys):
                df = band(group.runs, key, "step", interval=interval, rows="train")
                if df.empty:
                    continue
                steps += list(df["step"])
                name = f"{short_label(group.label)} (n={len(group.runs)})"
                for trace in band_traces(df, "step", colors[group.label], name, group.label, showlegend=not shown,
                                         dash=("solid", "dot")[j % 2], hover=f"{group.label}: {key}"):
                    trace.meta = key
                    fig.add_trace(trace, row=panel // cols + 1, col=panel % cols + 1)
                shown = True
        if panels[0][1] == ("gate_z",):
            _mark_group_gate(fig, group, colors[group.label])
    for panel, (_, _, reference, y_title) in enumerate(panels):  # after the traces: empty panels get none
        row, col = panel // cols + 1, panel % cols + 1
        if reference is not None:
            fig.add_hline(y=reference[0], line_color="grey", line_width=1, row=row, col=col,
                          annotation_text=reference[1], annotation_position="bottom right")
        fig.update_yaxes(title_text=y_title, row=row, col=col)
        fig.update_xaxes(title_text="step", row=row, col=col, **integer_ticks(steps))
    fig.update_layout(legend=_LEGEND, legend_title_text="group (dotted: the second key of a panel)")
    return fig


def _mark_group_gate(fig, group: Group, color: str) -> None:
    """τ (dotted) and the group's mean shut-off step over the runs whose gate shut (dashed, annotated with
    how many shut) on the gate-z panel."""
    taus = {r.get("tau") for run in group.runs for r in run.train[-1:] if is_number(r.get("tau"))} or \
        {run.config["tau"] for run in group.runs if is_number(run.config.get("tau"))}
    for tau in sorted(taus):
        fig.add_hline(y=tau, line_dash="dot", line_color=color, opacity=0.6, row=1, col=1,
                      annotation_text="τ", annotation_position="top left")
    shut = [r.shutoff_step for r in group.runs if r.shutoff_step is not None]
    if shut:
        fig.add_vline(x=sum(shut) / len(shut), line_dash="dash", line_color=color, opacity=0.8, row=1, col=1,
                      annotation_text=f"shut: {len(shut)} of {len(group.runs)}", annotation_position="top right")


def _mark_gate(fig, run: Run, color: str, col: int = 1) -> None:
    """tau as a dotted line and the shut-off step as a dashed line on the gate-z panel (row 1, `col`)."""
    taus = [r.get("tau") for r in run.train if is_number(r.get("tau"))] or \
        ([run.config["tau"]] if is_number(run.config.get("tau")) else [])
    if taus:
        fig.add_hline(y=taus[-1], line_dash="dot", line_color=color, opacity=0.6, row=1, col=col,
                      annotation_text="τ", annotation_position="top left")
    if run.shutoff_step is not None:
        fig.add_vline(x=run.shutoff_step, line_dash="dash", line_color=color, opacity=0.8, row=1, col=col)


# ---------------------------------------------------------------------------------------------------
# One run as it trained
# ---------------------------------------------------------------------------------------------------
def plot_training(run: Run):
    """One run: training reward per step, validation pass@1 (with its 95% bootstrap interval over problems)
    against backward passes, and the gate's z against τ with the shut-off step."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        "training reward (batch mean)", "validation pass@1 vs backward passes", "gate z vs τ"))
    train = [r for r in run.train if is_number(r.get("reward_mean"))]
    fig.add_trace(go.Scatter(x=[r["step"] for r in train], y=[r["reward_mean"] for r in train],
                             mode="lines", name="reward (batch mean)"), row=1, col=1)
    evals = [r for r in run.eval if is_number(r.get("pass@1"))]
    cis = [clip_interval(*(r.get("pass@1_ci") or [r["pass@1"], r["pass@1"]]), 0.0, 1.0) for r in evals]
    fig.add_trace(go.Scatter(
        x=[r.get("cumulative_backward_passes") for r in evals], y=[r["pass@1"] for r in evals], mode="lines+markers",
        name="validation pass@1", error_y={"type": "data", "symmetric": False,
                                           "array": [hi - r["pass@1"] for r, (_, hi) in zip(evals, cis)],
                                           "arrayminus": [r["pass@1"] - lo for r, (lo, _) in zip(evals, cis)]}),
        row=1, col=2)
    gated = [r for r in run.train if is_number(r.get("gate_z"))]
    fig.add_trace(go.Scatter(x=[r["step"] for r in gated], y=[r["gate_z"] for r in gated], mode="lines+markers",
                             name="gate z"), row=1, col=3)
    if gated:
        _mark_gate(fig, run, "red", col=3)
    steps, passes = [r.get("step") for r in run.train], [r.get("cumulative_backward_passes") for r in evals]
    for col, (x_title, y_title, ticks) in enumerate((("step", "reward", steps),
                                                     ("backward passes (cumulative)", "pass@1", passes),
                                                     ("step", "z-score", steps)), start=1):
        fig.update_xaxes(title_text=x_title, row=1, col=col, **integer_ticks(ticks))
        fig.update_yaxes(title_text=y_title, row=1, col=col)
    fig.update_layout(height=400, width=1150, legend=_LEGEND,
                      title=f"{run.algorithm} on {run.config.get('model', '?')} (seed {run.seed}); "
                            "dotted: τ, dashed: shut-off step")
    return fig
