"""The toy race for notebook 05: loss against backward passes on an ill-conditioned quadratic.

On L = 1/2 sum h_i theta_i^2 plain gradient descent keeps r_i = 1 - lr h_i of coordinate i's gradient every
step, so GXPO's q differs between coordinates (`coordinate_q`). `toy_race` gives every method the same budget
of backward passes and races GD, GD with GXPO's measured update size (the displacement-matched step), GXPO,
GXPO with gradient noise and scalar-q GXPO; `plot_toy_race` draws it.

    race = toy_race(1.8, steps=40)          # {"lr", "multiplier", "curves": {name: {"passes", "loss"}}}
    plot_toy_race(race).show()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gxpo_lib.validation import check_int, check_positive

_LEGEND = {"orientation": "h", "y": -0.25, "yanchor": "top"}


def coordinate_q(h: Sequence[float], lr: float, k: int = 5, alpha: float = 0.5) -> dict[str, list[float]]:
    """Per-coordinate r = 1 - lr h (plain GD on a diagonal quadratic), q and alpha*q. [n] -> [n] each."""
    import torch

    from gxpo_lib.core.extrapolation import R_CLAMP, geometric_scale

    check_positive("lr", lr)
    r = (1.0 - lr * torch.as_tensor(h, dtype=torch.float64)).clamp(*R_CLAMP)
    q = geometric_scale(r, check_int("k", k, minimum=2))
    return {"r": r.tolist(), "q": q.tolist(), "alpha_q": (alpha * q).tolist()}


def toy_race(lr: float, steps: int = 40, k: int = 5, alpha: float = 0.5, noise: float = 0.02,
             h: Sequence[float] = (1.0, 0.02), seed: int = 0) -> dict[str, Any]:
    """GD, GD with a displacement-matched step, GXPO, GXPO with gradient noise and scalar-q GXPO on
    L = 1/2 sum h_i theta_i^2.

    Every method gets the same budget of backward passes, 3 * `steps` (GXPO: `steps` updates of 3 passes;
    GD: 3 * `steps` updates). The displacement-matched GD is GD at lr * s, where s is GXPO's measured update
    size per update in plain steps: the mean over its extrapolating updates of ||theta_{t+1} - theta_t|| over
    ||theta_1 - theta_0|| (its first probe: one plain GD step from the same point), about 1 + 2 alpha q-bar
    where the probes agree. One scalar for every coordinate, where GXPO's q is per coordinate. The rules are
    gxpo_lib's own (toy.run_rule, no gate). Returns ``{"lr", "multiplier", "curves": {name: {"passes": [...],
    "loss": [...]}}}`` with losses at every pass count an update ends on (non-finite losses, from a diverging
    run, as None).
    """
    from gxpo_lib.teach import toy

    check_positive("lr", lr)
    check_int("steps", steps, minimum=1)
    land = toy.DiagonalQuadratic(h=tuple(h))
    gxpo = toy.run_rule("gxpo", land, lr=lr, steps=steps, k=k, alpha=alpha)
    multiplier = float(np.mean([i["update_norm"] / i["probe_step_norm"] for i in gxpo.infos
                                if i["active"] and i["probe_step_norm"]]))
    runs = {
        "GD": toy.run_rule("grpo", land, lr=lr, steps=3 * steps),
        f"GD, displacement-matched (x{multiplier:.2f})": toy.run_rule("grpo", land, lr=lr * multiplier,
                                                                      steps=3 * steps),
        "GXPO": gxpo,
        f"GXPO, noise {noise:g}": toy.run_rule("gxpo", land, lr=lr, steps=steps, k=k, alpha=alpha,
                                               noise=noise, seed=seed),
        "GXPO, scalar q": toy.run_rule("gxpo", land, lr=lr, steps=steps, k=k, alpha=alpha, q_mode="scalar"),
    }
    curves = {name: {"passes": np.cumsum([0] + [i["backward_passes"] for i in run.infos]).tolist(),
                     "loss": [float(v) if math.isfinite(float(v)) else None for v in land(run.points)]}
              for name, run in runs.items()}
    return {"lr": lr, "multiplier": multiplier, "curves": curves}


def plot_toy_race(race: dict[str, Any]):
    """Loss (log axis) against backward passes for the curves of `toy_race`."""
    import plotly.graph_objects as go

    from gxpo_lib.analysis.palette import method_colors

    colors = method_colors(race["curves"])
    fig = go.Figure([go.Scatter(x=c["passes"], y=c["loss"], mode="lines", name=name, line={"color": colors[name]})
                     for name, c in race["curves"].items()])
    fig.update_layout(title=f"ill-conditioned quadratic, lr {race['lr']:g}: loss against backward passes",
                      xaxis={"title": "backward passes"},
                      yaxis={"title": "loss", "type": "log", "exponentformat": "power"}, legend=_LEGEND, height=380)
    return fig
