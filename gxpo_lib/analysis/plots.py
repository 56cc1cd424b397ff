"""Plotly figures of runs: curves with seed bands, GXPO's mechanism and diagnostics, one run's training.

Every figure has axis titles and a legend, and a reference line wherever a value has a meaning
(r = 1: the gradient persists; α·q = 1: the landing point is θ2; cos = 0: orthogonal gradients; τ: the
gate's threshold). `setup_plotly` picks a renderer that shows figures in JupyterLab offline and keeps
them in HTML exports without embedding plotly.js in every notebook.
"""

from __future__ import annotations

from collections.abc import Sequence

from .records import Run, is_number
from .runs import DEFAULT_BY, Group, group_runs
from .stats import band, x_value

RENDERER = "plotly_mimetype+notebook_connected"
_COLORS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692", "#b6e880")
_X_TITLES = {"step": "step", "seconds": "training seconds (wall clock)", "cpu_seconds": "training CPU seconds",
             "hours": "training hours", "backward_passes": "backward passes (cumulative)"}
_LEGEND = {"orientation": "h", "y": -0.25, "yanchor": "top"}
_LEGEND_CHARS = 32


def setup_plotly(renderer: str = RENDERER) -> str:
    """Set plotly's default renderer for `fig.show()`; returns it.

    The default, ``plotly_mimetype+notebook_connected``, writes each figure twice and small: as plotly's
    JSON mimetype, which JupyterLab's bundled plotly extension draws offline, and as HTML that loads
    plotly.js from its CDN, which nbconvert's HTML export keeps (``Plotly.newPlot``). The ``notebook``
    renderer instead embeds plotly.js (about 4.6 MB) in the notebook, which made executed notebooks 10-22 MB.
    """
    import plotly.io as pio

    pio.renderers.default = renderer
    return renderer


def group_colors(groups: Sequence[Group]) -> dict[str, str]:
    """One color per group label (GRPO groups first, as `group_runs` sorts them)."""
    return {g.label: _COLORS[i % len(_COLORS)] for i, g in enumerate(groups)}


def short_label(label: str, chars: int = _LEGEND_CHARS) -> str:
    """A legend entry: the label, cut to `chars` characters with an ellipsis (hover shows it whole)."""
    return label if len(label) <= chars else label[:chars - 1] + "…"


# ---------------------------------------------------------------------------------------------------
# Curves over seeds
# ---------------------------------------------------------------------------------------------------
def plot_curves(runs: Sequence[Run], metric: str = "pass@1",
                xs: Sequence[str] = ("step", "hours", "backward_passes"), by: Sequence[str] = DEFAULT_BY,
                interval: str = "t", rows: str = "auto", single_run_interval: bool = False):
    """`metric` against each x in `xs`, one line per group (the mean over seeds) with its interval shaded.

    A group of one run has no interval over seeds; with `single_run_interval` its band is the run's own
    95% bootstrap interval over the evaluation problems (``<metric>_ci`` in its eval rows).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    groups = group_runs(runs, by)
    colors = group_colors(groups)
    fig = make_subplots(rows=1, cols=len(xs), shared_yaxes=True,
                        subplot_titles=[f"vs {_X_TITLES[x]}" for x in xs])
    for group in groups:
        color = colors[group.label]
        for col, x in enumerate(xs, start=1):
            df = band(group.runs, metric, x, interval=interval, rows=rows)
            if df.empty:
                continue
            if single_run_interval and len(group.runs) == 1:
                df = _own_interval(group.runs[0], metric, x, df)
            shaded = df.dropna(subset=["lo", "hi"])
            if len(shaded):  # the interval as a filled polygon: upper edge forward, lower edge back
                fig.add_trace(go.Scatter(
                    x=list(shaded[x]) + list(shaded[x])[::-1], y=list(shaded["hi"]) + list(shaded["lo"])[::-1],
                    fill="toself", fillcolor=_rgba(color, 0.18), line={"width": 0}, hoverinfo="skip",
                    showlegend=False, legendgroup=group.label), row=1, col=col)
            fig.add_trace(go.Scatter(
                x=df[x], y=df["mean"], mode="lines+markers", line_color=color, legendgroup=group.label,
                name=f"{short_label(group.label)} (n={len(group.runs)})", showlegend=col == 1,
                customdata=df["n"], hovertemplate=f"{group.label}<br>%{{y:.3f}} (runs: %{{customdata}})"
                                                  "<extra></extra>"), row=1, col=col)
            fig.update_xaxes(title_text=_X_TITLES[x], row=1, col=col)
    fig.update_yaxes(title_text=metric, row=1, col=1)
    single = " (one seed: bootstrap over problems)" if single_run_interval else ""
    fig.update_layout(height=430, width=380 * len(xs) + 150, legend=_LEGEND, legend_title_text="group",
                      title=f"{metric}: mean over seeds; shaded: 95% {interval} interval over seeds{single}")
    return fig


def _own_interval(run: Run, metric: str, x: str, df):
    """A one-run band with the run's stored interval over problems (eval rows' ``<metric>_ci``)."""
    bounds = {}
    for row in run.eval:
        where, ci = x_value(row, x, "eval"), row.get(f"{metric}_ci")
        if is_number(where) and isinstance(ci, (list, tuple)) and len(ci) == 2 and all(map(is_number, ci)):
            bounds[float(where)] = ci
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
    ("retention r: mean ± std", ("r_mean",), (1.0, "r = 1"), "r"),
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


def plot_diagnostics(runs: Sequence[Run], by: Sequence[str] = DEFAULT_BY):
    """GXPO's diagnostics over steps, one line per run (colored by group): gate z with tau and the
    shut-off step, retention mean ± std, scale, α·q, the two cosines, jump / ||θ||, inactive and clamped
    fractions. Returns None when no run has diagnostics."""
    fig = _panels_figure(runs, by, _DIAG_PANELS, cols=4)
    if fig is not None:
        fig.update_layout(height=680, width=1400, title="GXPO diagnostics per run (dashed line: shut-off step; "
                          "dotted: τ; grey: reference values)")
    return fig


def plot_mechanism(runs: Sequence[Run], by: Sequence[str] = DEFAULT_BY):
    """What the jump did, per extrapolating step: mean r (against r = 1), cos(g0, g1) (against 0) and α·q
    (against 1: below it θ̃ lies between θ0 and θ2, the jump retreated). None when no run extrapolated."""
    fig = _panels_figure(runs, by, _MECHANISM_PANELS, cols=3)
    if fig is not None:
        fig.update_layout(height=400, width=1200, title="The mechanism per extrapolating step "
                          "(θ̃ = θ0 + α·q ⊙ (θ2 − θ0); grey: reference values)")
    return fig


def _panels_figure(runs: Sequence[Run], by: Sequence[str], panels: tuple, cols: int):
    """One subplot per panel, one line per run and key, colored by group; the gate marked on a gate panel."""
    from plotly.subplots import make_subplots

    runs = [r for r in runs if r.algorithm != "grpo" and has_diagnostics(r)]
    if not runs:
        return None
    groups = group_runs(runs, by)
    colors = group_colors(groups)
    n_rows = -(-len(panels) // cols)
    fig = make_subplots(rows=n_rows, cols=cols, subplot_titles=[p[0] for p in panels],
                        horizontal_spacing=0.06, vertical_spacing=0.2 if n_rows > 1 else 0.1)
    for group in groups:
        for i, run in enumerate(group.runs):
            for panel, (_, keys, _, _) in enumerate(panels):
                for j, key in enumerate(keys):
                    trace = _diag_trace(run, key, colors[group.label], dash=("solid", "dot")[j % 2])
                    if trace is None:
                        continue
                    trace.update(legendgroup=group.label, name=f"{short_label(group.label)}: {key}",
                                 showlegend=i == 0 and not any(t.legendgroup == group.label for t in fig.data))
                    fig.add_trace(trace, row=panel // cols + 1, col=panel % cols + 1)
            if panels[0][1] == ("gate_z",):
                _mark_gate(fig, run, colors[group.label])
    for panel, (_, _, reference, y_title) in enumerate(panels):  # after the traces: empty panels get none
        row, col = panel // cols + 1, panel % cols + 1
        if reference is not None:
            fig.add_hline(y=reference[0], line_color="grey", line_width=1, row=row, col=col,
                          annotation_text=reference[1], annotation_position="bottom right")
        fig.update_yaxes(title_text=y_title, row=row, col=col)
        fig.update_xaxes(title_text="step", row=row, col=col)
    fig.update_layout(legend=_LEGEND, legend_title_text="group (dotted: the second key of a panel)")
    return fig


def _diag_trace(run: Run, key: str, color: str, dash: str):
    """One diagnostic of one run as a line over steps (None if the run never logs it); r with its std."""
    import plotly.graph_objects as go

    points = [(r["step"], r[key], r.get("r_std")) for r in run.train if is_number(r.get(key))]
    if not points:
        return None
    steps, values, stds = zip(*points)
    trace = go.Scatter(x=steps, y=values, mode="lines+markers", marker_size=4, line={"color": color, "dash": dash},
                       hovertemplate=f"{run.name} {key}: %{{y:.4g}} at step %{{x}}<extra></extra>")
    if key == "r_mean":
        trace.update(error_y={"type": "data", "array": [s if is_number(s) else 0 for s in stds]})
    return trace


def _mark_gate(fig, run: Run, color: str, col: int = 1) -> None:
    """tau as a dotted line and the shut-off step as a dashed line on the gate-z panel (row 1, `col`)."""
    taus = [r.get("tau") for r in run.train if is_number(r.get("tau"))] or \
        ([run.config["gate_tau"]] if is_number(run.config.get("gate_tau")) else [])
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
    cis = [r.get("pass@1_ci") or [r["pass@1"], r["pass@1"]] for r in evals]
    fig.add_trace(go.Scatter(
        x=[r.get("backward_passes") for r in evals], y=[r["pass@1"] for r in evals], mode="lines+markers",
        name="validation pass@1", error_y={"type": "data", "symmetric": False,
                                           "array": [hi - r["pass@1"] for r, (_, hi) in zip(evals, cis)],
                                           "arrayminus": [r["pass@1"] - lo for r, (lo, _) in zip(evals, cis)]}),
        row=1, col=2)
    gated = [r for r in run.train if is_number(r.get("gate_z"))]
    fig.add_trace(go.Scatter(x=[r["step"] for r in gated], y=[r["gate_z"] for r in gated], mode="lines+markers",
                             name="gate z"), row=1, col=3)
    if gated:
        _mark_gate(fig, run, "red", col=3)
    for col, (x_title, y_title) in enumerate((("step", "reward"), ("backward passes (cumulative)", "pass@1"),
                                              ("step", "z-score")), start=1):
        fig.update_xaxes(title_text=x_title, row=1, col=col)
        fig.update_yaxes(title_text=y_title, row=1, col=col)
    fig.update_layout(height=400, width=1150, legend=_LEGEND,
                      title=f"{run.algorithm} on {run.config.get('model', '?')} (seed {run.seed}); "
                            "dotted: τ, dashed: shut-off step")
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)}, {int(h[2:4], 16)}, {int(h[4:6], 16)}, {alpha})"
