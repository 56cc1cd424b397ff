"""The verdict study's figures (notebook 05): step size, the families' differences, envelopes, the long horizon.

Numbers come from `analysis.verdict`; colours are the suite's (`palette.method_color`); every axis has a title.

    points = verdict.step_size_points(records)
    plot_step_size(points).show()                  # final pass@1 against each arm's *effective* lr
    plot_family(verdict.adamw_family(records)).show()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gxpo_lib.analysis import verdict
from gxpo_lib.analysis.palette import method_colors, rgba

_LEGEND = {"orientation": "h", "y": -0.25, "yanchor": "top"}


def plot_step_size(points: Sequence[dict[str, Any]], reference: str = "GRPO"):
    """Final pass@1 against the effective lr (lr x the arm's measured update-norm ratio to GRPO), log axis.

    GRPO is a line with its 95% t band (its effective lr is its lr); every other arm is a marker with its
    interval at its effective lr. A marker on GRPO's band: the arm behaves like GRPO with a bigger step."""
    import plotly.graph_objects as go

    arms = list(dict.fromkeys(p["arm"] for p in points))
    colors, fig = method_colors(arms), go.Figure()
    base = sorted((p for p in points if p["arm"] == reference), key=lambda p: p["lr"])
    if base:
        x = [p["effective_lr"] for p in base]
        fig.add_trace(go.Scatter(x=x + x[::-1], y=[min(1.0, p["ci"][1]) for p in base]
                                 + [max(0.0, p["ci"][0]) for p in base][::-1], fill="toself",
                                 fillcolor=rgba(colors[reference], 0.18), line={"width": 0}, hoverinfo="skip",
                                 showlegend=False))
        fig.add_trace(go.Scatter(x=x, y=[p["pass@1"] for p in base], mode="lines", name=f"{reference} (95% band)",
                                 line={"color": colors[reference]}))
    for name in arms:
        if name == reference:
            continue
        part = sorted((p for p in points if p["arm"] == name), key=lambda p: p["lr"])
        fig.add_trace(go.Scatter(
            x=[p["effective_lr"] for p in part], y=[p["pass@1"] for p in part], mode="markers", name=name,
            marker={"color": colors[name], "size": 9},
            error_y={"type": "data", "symmetric": False, "array": [p["ci"][1] - p["pass@1"] for p in part],
                     "arrayminus": [p["pass@1"] - p["ci"][0] for p in part]},
            customdata=[[p["lr"], p["ratio"]] for p in part],
            hovertemplate="lr %{customdata[0]:.3g} x %{customdata[1]:.2f} = %{x:.3g}<br>pass@1 %{y:.3f}"))
    fig.update_layout(title="final pass@1 (500 x 8) against the effective learning rate (lr x measured update size)",
                      xaxis={"title": "effective learning rate: lr x mean update_norm / GRPO's at that lr",
                             "type": "log", "exponentformat": "power"},
                      yaxis={"title": "final pass@1 (mean over seeds, 95% t)"}, legend=_LEGEND, height=440)
    return fig


def plot_family(rows: Sequence[dict[str, Any]], title: str = "paired differences in final pass@1",
                margin: float = verdict.MARGIN):
    """One family's paired differences (method - control) with their 95% paired-t intervals, the bootstrap
    interval as a thin bar, the equivalence margin shaded and each row's Holm verdict in the hover."""
    import plotly.graph_objects as go

    done = [r for r in rows if not r.get("pending")]
    labels = [f"{r['comparison']} @ {r['lr']:g}" for r in done]
    fig = go.Figure()
    fig.add_vrect(x0=-margin, x1=margin, fillcolor="rgba(120,120,120,0.15)", line_width=0,
                  annotation_text=f"±{margin} (equivalence margin)", annotation_position="top left")
    fig.add_vline(x=0, line={"color": "grey", "dash": "dot"})
    fig.add_trace(go.Scatter(x=[r["mean"] for r in done], y=labels, mode="markers", name="mean, 95% paired t",
                             marker={"color": "#d62728", "size": 9},
                             error_x={"type": "data", "symmetric": False,
                                      "array": [r["ci"][1] - r["mean"] for r in done],
                                      "arrayminus": [r["mean"] - r["ci"][0] for r in done]},
                             customdata=[r["verdict"] for r in done], hovertemplate="%{x:+.3f}: %{customdata}"))
    fig.add_trace(go.Scatter(x=[(r["boot_ci"][0] + r["boot_ci"][1]) / 2 for r in done], y=labels, mode="markers",
                             name="two-level bootstrap 95%", marker={"color": "#1f77b4", "size": 1},
                             error_x={"type": "data", "symmetric": True,
                                      "array": [(r["boot_ci"][1] - r["boot_ci"][0]) / 2 for r in done],
                                      "thickness": 1, "width": 2}))
    fig.update_layout(title=title, xaxis={"title": "difference in final pass@1 (method - control, paired by seed)"},
                      yaxis={"autorange": "reversed"}, legend=_LEGEND, height=max(300, 60 + 34 * len(done)))
    return fig


def plot_envelopes(records: Sequence[dict[str, Any]]):
    """Best-over-lr validation pass@1 of GRPO (its 8 lrs) and GXPO K=5 (its 5 lrs) against steps and against
    cumulative backward passes: what a user who tunes the lr gets for a budget of each."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    arms = {"GRPO": verdict.GRPO_LEARNING_RATES, "GXPO K=5": verdict.LEARNING_RATES}
    colors = method_colors(arms)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=["against steps", "against backward passes"])
    for col, x in enumerate(verdict.ENVELOPE_X, start=1):
        for name, lrs in arms.items():
            env = verdict.envelope(records, name, lrs, x=x)
            fig.add_trace(go.Scatter(x=[e[x] for e in env], y=[e["pass@1"] for e in env], mode="lines",
                                     line={"color": colors[name], "shape": "hv"}, name=name, legendgroup=name,
                                     showlegend=col == 1, customdata=[e["lr"] for e in env],
                                     hovertemplate="%{y:.3f} (lr %{customdata:.3g})"), row=1, col=col)
        fig.update_xaxes(title_text="step" if x == "step" else "backward passes (cumulative)", row=1, col=col)
    fig.update_yaxes(title_text="validation pass@1, best lr at each x (seed mean)", row=1, col=1)
    fig.update_layout(title="best-tuned envelopes: the best lr's seed-mean validation pass@1 at each budget",
                      legend=_LEGEND, height=420)
    return fig


def plot_horizon(records: Sequence[dict[str, Any]], lr: float):
    """Family 5 at one lr: seed-mean validation pass@1 of GRPO, GXPO K=5 and the matched GRPO over 200 steps,
    against steps and against backward passes; a marker where each GXPO seed's gate shut."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = ["GRPO", "GXPO K=5", verdict.matched_arm(records, lr) or "(matched: pending)"]
    colors = method_colors(names)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=["against steps", "against backward passes"])
    for col, x in enumerate(verdict.ENVELOPE_X, start=1):
        for name in names:
            runs = verdict.cell(records, name, lr, verdict.HORIZON_STEPS)
            if not runs:
                continue
            curve = verdict.seed_mean_curve(runs)
            fig.add_trace(go.Scatter(x=[c[x] for c in curve], y=[c["pass@1"] for c in curve], mode="lines",
                                     name=f"{name} ({len(runs)} seeds)", line={"color": colors[name]},
                                     legendgroup=name, showlegend=col == 1), row=1, col=col)
        if x == "step":
            shut = [s for r in verdict.cell(records, "GXPO K=5", lr, verdict.HORIZON_STEPS).values()
                    if (s := verdict.gate_shut_step(r)) is not None]
            for step in shut:
                fig.add_vline(x=step, line={"color": colors["GXPO K=5"], "dash": "dot", "width": 1}, row=1, col=1)
        fig.update_xaxes(title_text="step" if x == "step" else "backward passes (cumulative)", row=1, col=col)
    fig.update_yaxes(title_text="validation pass@1 (seed mean)", row=1, col=1)
    fig.update_layout(title=f"200 steps at lr {lr:g} (dotted: where a GXPO seed's gate shut)", legend=_LEGEND,
                      height=420)
    return fig
