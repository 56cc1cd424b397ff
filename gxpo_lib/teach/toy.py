"""Toy 2-D landscapes for notebook 01: where GXPO's extrapolation is exact, and what breaks it.

Every point this module returns comes from the *real* update rules (`gxpo_lib.core.rules`: PlainStep = GRPO's
step, GXPO, SFPO) driving one 2-D float64 parameter tensor, so what the notebook plots is exactly what
the library does; nothing here re-implements the algorithm.

    land = DiagonalQuadratic()                                   # a landscape: theta [..., 2] -> loss [...]
    path = gd_path(land, lr=0.3, steps=6)                        # [7, 2], plain GD (K+1 = 6 steps)
    run = run_rule("gxpo", land, lr=0.3, steps=1, k=5, alpha=1.0)  # run.points [2, 2], run.infos[0]
    extrapolation_error(land, lr=0.3, k=5)                       # ~1e-16: exact on a diagonal quadratic

The loss here is a landscape to move on, not a performance measure: the question is only *where* each
rule lands compared with K+1 true optimizer steps.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from gxpo_lib.core.extrapolation import R_CLAMP, geometric_scale, max_scale, retention
from gxpo_lib.core.gate import GATE_SETTINGS
from gxpo_lib.core.rules import GXPO, PlainStep, UpdateRule
from gxpo_lib.core.sfpo import SFPO
from gxpo_lib.validation import (
    check_choice,
    check_int,
    check_interval,
    check_open_unit,
    check_optional_positive,
    check_positive,
)

DTYPE = torch.float64
OPTIMIZERS = ("sgd", "adam")
RULES = ("grpo", "plain", "gxpo", "sfpo")  # "plain" is an alias of "grpo" (PlainStep)


# -- argument checks used only here ----------------------------------------------------------------------
def _check_pair(name: str, value: Any) -> tuple[float, float]:
    """Two finite numbers (a 2-D point or per-coordinate setting)."""
    if torch.is_tensor(value):
        value = value.detach().flatten().tolist()
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: allowed a pair (x, y) of finite numbers")
    return float(value[0]), float(value[1])


def _check_finite(name: str, value: Any, minimum: float = -math.inf, unit: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        bound = f" >= {minimum:g}" if minimum > -math.inf else ""
        raise ValueError(f"{name}={value!r} is invalid: allowed a finite number{bound}{unit}")
    return float(value)


def _check_landscape(landscape: Any) -> Landscape:
    if not isinstance(landscape, Landscape):
        raise ValueError(f"landscape={landscape!r} is invalid: allowed a gxpo_lib.teach.toy.Landscape "
                         f"(or make_landscape(name) with name in {sorted(LANDSCAPES)})")
    return landscape


# -- landscapes: a loss on a 2-D parameter, evaluated on one point or a whole grid ------------------------
class Landscape:
    """A loss L(theta) on a 2-D parameter. `loss(theta, step)`: theta [..., 2] -> [...].

    `step` is the number of the update being taken (1-based, as StepInfo.step); only `Surge` uses it.
    `theta0` is a good starting point (gradient norm about 1, which suits the gate's cold start at
    mu = sigma = 1) and `bounds` ((xmin, xmax), (ymin, ymax)) a view box for contour plots.
    """

    name = "landscape"
    theta0: tuple[float, float] = (-0.9, 2.4)
    bounds: tuple[tuple[float, float], tuple[float, float]] = ((-3.0, 2.0), (-1.5, 3.0))

    def loss(self, theta: torch.Tensor, step: int = 1) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, theta: torch.Tensor, step: int = 1) -> torch.Tensor:
        return self.loss(theta, step)

    def grad(self, theta, step: int = 1) -> torch.Tensor:
        """The exact gradient at one point, by autograd. [2] -> [2]."""
        x = torch.as_tensor(theta, dtype=DTYPE).detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self.loss(x, step), x)
        return g

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class DiagonalQuadratic(Landscape):
    """L = 1/2 sum_i h_i (theta_i - c_i)^2: separable, so plain GD multiplies gradient coordinate i by
    r_i = 1 - lr h_i every step and GXPO's surrogate is exact (docs/algorithm.md)."""

    name = "diagonal"

    def __init__(self, h=(1.0, 0.3), center=(0.0, 0.0)):
        self.h = torch.tensor(_check_pair("h", h), dtype=DTYPE)
        self.center = torch.tensor(_check_pair("center", center), dtype=DTYPE)

    @property
    def hessian(self) -> torch.Tensor:
        """[2, 2]."""
        return torch.diag(self.h)

    def loss(self, theta, step=1):
        d = theta - self.center
        return 0.5 * (self.h * d * d).sum(-1)


class RotatedQuadratic(Landscape):
    """L = 1/2 (theta - c)^T R diag(h) R^T (theta - c): the same curvatures, axes rotated by `angle_deg`.
    The Hessian is not diagonal, so the per-coordinate ratio g1/g0 is no longer constant along GD."""

    name = "rotated"

    def __init__(self, h=(1.0, 0.3), angle_deg: float = 35.0, center=(0.0, 0.0)):
        h = torch.tensor(_check_pair("h", h), dtype=DTYPE)
        a = math.radians(_check_finite("angle_deg", angle_deg, unit=" (degrees)"))
        rotation = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=DTYPE)
        self.hessian = rotation @ torch.diag(h) @ rotation.T  # [2, 2]
        self.center = torch.tensor(_check_pair("center", center), dtype=DTYPE)

    def loss(self, theta, step=1):
        d = theta - self.center
        return 0.5 * torch.einsum("...i,ij,...j->...", d, self.hessian, d)


class LogCosh(Landscape):
    """L = sum_i w_i log cosh(theta_i - c_i): separable but not quadratic. Far from c the gradient
    saturates (r ~ 1, like a linear loss), near c it is quadratic: the ratio changes along the path."""

    name = "logcosh"
    theta0 = (-2.4, 2.8)
    bounds = ((-3.0, 1.5), (-1.0, 3.5))

    def __init__(self, w=(1.0, 0.3), center=(0.0, 0.0)):
        self.w = torch.tensor(_check_pair("w", w), dtype=DTYPE)
        self.center = torch.tensor(_check_pair("center", center), dtype=DTYPE)

    def loss(self, theta, step=1):
        d = (theta - self.center).abs()
        return (self.w * (d + torch.log1p(torch.exp(-2 * d)) - math.log(2.0))).sum(-1)  # stable log cosh


class Banana(Landscape):
    """L = 1/2 h_0 u^2 + 1/2 h_1 (v - kappa u^2)^2 with (u, v) = theta - c: a curved valley (Rosenbrock-ish),
    neither separable nor quadratic; at the minimum its Hessian is diag(h)."""

    name = "banana"
    theta0 = (-1.8, 0.4)
    bounds = ((-2.5, 1.5), (-1.0, 2.5))

    def __init__(self, h=(0.3, 1.0), kappa: float = 0.4, center=(0.0, 0.0)):
        self.h = torch.tensor(_check_pair("h", h), dtype=DTYPE)
        self.kappa = _check_finite("kappa", kappa)
        self.center = torch.tensor(_check_pair("center", center), dtype=DTYPE)

    def loss(self, theta, step=1):
        u = theta[..., 0] - self.center[0]
        v = theta[..., 1] - self.center[1]
        return 0.5 * self.h[0] * u * u + 0.5 * self.h[1] * (v - self.kappa * u * u) ** 2


class Surge(Landscape):
    """`base` before update number `at_step`, `base` moved by `shift` from that update on: the gradient
    jumps there (a stand-in for a sudden change in the RL batches). Updates are numbered from 1, as
    StepInfo.step. (gate_snapshot surges the gradient noise as well; see there why.)"""

    def __init__(self, base: Landscape, at_step: int = 12, shift=(4.0, -4.0)):
        self.base = _check_landscape(base)
        self.at_step = check_int("at_step", at_step, minimum=1)
        self.shift = torch.tensor(_check_pair("shift", shift), dtype=DTYPE)
        self.name = f"{base.name}+surge@{self.at_step}"
        self.theta0, self.bounds = base.theta0, base.bounds

    def loss(self, theta, step=1):
        return self.base.loss(theta - self.shift if step >= self.at_step else theta, step)


LANDSCAPES = {"diagonal": DiagonalQuadratic, "rotated": RotatedQuadratic, "logcosh": LogCosh, "banana": Banana}


def make_landscape(name: str, **kwargs: Any) -> Landscape:
    """A landscape by name: one of LANDSCAPES ("diagonal", "rotated", "logcosh", "banana")."""
    return LANDSCAPES[check_choice("landscape", name, tuple(LANDSCAPES))](**kwargs)


def contour_grid(landscape: Landscape, bounds=None, n: int = 81, step: int = 1):
    """The loss on an n x n grid, for contour plots.

    Returns (xs [n], ys [n], zs [n, n]) with zs[i, j] = L(xs[j], ys[i]) (plotly's row = y convention).
    """
    _check_landscape(landscape)
    n = check_int("n", n, minimum=2)
    (x0, x1), (y0, y1) = landscape.bounds if bounds is None else bounds
    check_interval("bounds[0]", (x0, x1))
    check_interval("bounds[1]", (y0, y1))
    xs = torch.linspace(x0, x1, n, dtype=DTYPE)
    ys = torch.linspace(y0, y1, n, dtype=DTYPE)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [n(y), n(x), 2]
    with torch.no_grad():
        zs = landscape.loss(grid, step)
    return xs, ys, zs


# -- driving the real rules on one 2-D parameter ----------------------------------------------------------
class RuleRun(NamedTuple):
    """What `run_rule` returns. points: [steps + 1, 2], the parameter before the first and after every
    update. infos: one dict per update: StepInfo.to_dict() plus "eval_points" [passes, 2], where that
    update's backward passes were taken (GXPO active: theta0, theta1, theta~; SFPO: theta0 .. theta_{K-1},
    theta'; GRPO: theta0). rule: the rule object (its gate, counters)."""

    points: torch.Tensor
    infos: list[dict[str, Any]]
    rule: UpdateRule


def _make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Plain SGD (no momentum) or Adam with torch's defaults (betas 0.9, 0.999; no weight decay)."""
    name = check_choice("optimizer", name, OPTIMIZERS)
    return torch.optim.SGD(params, lr=lr) if name == "sgd" else torch.optim.Adam(params, lr=lr)


def _make_rule(rule_name: str, optimizer, clip: float | None, kwargs: dict[str, Any]) -> UpdateRule:
    """PlainStep / GXPO / SFPO. Without gate settings the toy rules never shut off (gate=None)."""
    rule_name = check_choice("rule_name", rule_name, RULES)
    if "max_grad_norm" in kwargs:
        raise ValueError(f"max_grad_norm={kwargs['max_grad_norm']!r} is invalid here: allowed only as "
                         "clip=... (one name for one setting)")
    if rule_name in ("grpo", "plain"):
        if kwargs:
            name = min(kwargs)
            raise ValueError(f"{name}={kwargs[name]!r} is invalid: allowed no settings for rule_name="
                             f"{rule_name!r} besides clip")
        return PlainStep(optimizer, max_grad_norm=clip)
    kwargs = dict(kwargs)
    kwargs.setdefault("gate", "default" if set(kwargs) & set(GATE_SETTINGS) else None)
    cls = GXPO if rule_name == "gxpo" else SFPO
    return cls(optimizer, max_grad_norm=clip, **kwargs)


def _closure(landscape: Landscape, theta: torch.Tensor, step: int, noise: float,
             generator: torch.Generator, record: list[torch.Tensor]):
    """One backward pass at the live theta; records where it was taken; adds fresh noise to the gradient."""

    def closure():
        record.append(theta.detach().clone())
        loss = landscape.loss(theta, step)
        loss.backward()
        if noise > 0:  # re-drawn on every pass: the two probes of one GXPO step see different noise
            theta.grad.add_(noise * torch.randn(2, generator=generator, dtype=DTYPE))
        return loss

    return closure


def run_rule(rule_name: str, landscape: Landscape, theta0=None, lr: float = 0.3, steps: int = 1,
             optimizer: str = "sgd", clip: float | None = None, noise: float | Any = 0.0, seed: int = 0,
             **rule_kwargs: Any) -> RuleRun:
    """Run a real update rule for `steps` updates on a 2-D parameter (float64) starting at `theta0`.

    Args:
        rule_name: "grpo" (= "plain", PlainStep), "gxpo" or "sfpo".
        landscape: a Landscape; every pass recomputes its loss at the live parameter.
        theta0: start point (x, y); default landscape.theta0.
        lr: learning rate (> 0) of the optimizer ("sgd": plain GD, no momentum; "adam").
        clip: max_grad_norm of the rule (None = no clipping).
        noise: std of gaussian noise added to each gradient coordinate on every pass (>= 0), drawn
            from a generator seeded with `seed` (so runs with the same seed see the same stream); or a
            function update number (1-based) -> std, for a noise level that changes over time.
        **rule_kwargs: the rule's settings (k, alpha, r_clamp, optimizer_state, ...) and gate settings
            (tau, omega, warmup, ...; giving any of them turns the default gate on, else gate=None).
    Returns:
        RuleRun(points [steps + 1, 2], infos, rule).
    """
    _check_landscape(landscape)
    theta0 = _check_pair("theta0", landscape.theta0 if theta0 is None else theta0)
    lr = check_positive("lr", lr)
    steps = check_int("steps", steps, minimum=0)
    clip = check_optional_positive("clip", clip)
    if not callable(noise):
        level = _check_finite("noise", noise, minimum=0)
        noise = lambda step: level  # a constant noise schedule
    seed = check_int("seed", seed, minimum=0)
    theta = torch.tensor(theta0, dtype=DTYPE, requires_grad=True)
    rule = _make_rule(rule_name, _make_optimizer(optimizer, [theta], lr), clip, rule_kwargs)
    generator = torch.Generator().manual_seed(seed)

    # one update per step; each records where its passes were taken
    points, infos = [theta.detach().clone()], []
    for step in range(1, steps + 1):
        record: list[torch.Tensor] = []
        std = _check_finite("noise", noise(step), minimum=0)
        info = rule.step(_closure(landscape, theta, step, std, generator, record)).to_dict()
        info["eval_points"] = torch.stack(record)
        points.append(theta.detach().clone())
        infos.append(info)
    return RuleRun(torch.stack(points), infos, rule)


def gd_path(landscape: Landscape, theta0=None, lr: float = 0.3, steps: int = 10, optimizer: str = "sgd",
            clip: float | None = None, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """The true optimizer path: `steps` plain steps (PlainStep, i.e. GRPO's rule). Returns [steps + 1, 2]."""
    return run_rule("grpo", landscape, theta0, lr, steps, optimizer, clip=clip, noise=noise, seed=seed).points


def extrapolation_error(landscape: Landscape, theta0=None, lr: float = 0.3, k: int = 5,
                        optimizer: str = "sgd", clip: float | None = None, noise: float = 0.0,
                        seed: int = 0, r_clamp: tuple[float, float] = R_CLAMP, **gxpo_kwargs: Any) -> float:
    """How far one GXPO step (alpha = 1) lands from K+1 true optimizer steps, relative to how far those go:

        || theta_GXPO - theta_(K+1) || / || theta_(K+1) - theta0 ||

    0 (to rounding) on a diagonal quadratic with plain GD; rotation, curvature that changes, Adam, binding
    clipping or clamps, and noise make it grow. The reference path uses the same optimizer, clipping and
    noise stream (same `seed`): its first two passes see exactly the noise GXPO's probes see, so with
    K = 2 (q = 1) the error is 0 in every case and what grows with K is the extrapolation's error.
    `gxpo_kwargs`: further GXPO settings (optimizer_state, retention, ...).
    """
    k = check_int("k", k, minimum=2)
    if "alpha" in gxpo_kwargs:
        raise ValueError(f"alpha={gxpo_kwargs['alpha']!r} is invalid here: allowed only alpha = 1 (the "
                         "extrapolation error compares the full jump with K+1 steps)")
    common = {"landscape": landscape, "theta0": theta0, "lr": lr, "optimizer": optimizer, "clip": clip,
              "noise": noise, "seed": seed}
    path = run_rule("grpo", steps=k + 1, **common).points       # the truth: K+1 real optimizer steps
    start, truth = path[0], path[-1]
    gxpo = run_rule("gxpo", steps=1, k=k, alpha=1.0, r_clamp=r_clamp, **common, **gxpo_kwargs).points[-1]
    return float((gxpo - truth).norm() / (truth - start).norm())


def error_vs_k(ks, **case: Any) -> list[float]:
    """extrapolation_error(**case, k=K) for each K in `ks`."""
    return [extrapolation_error(k=k, **case) for k in ks]


# -- one lookahead, all rules side by side (notebook 01 section 3 and the explorer) -----------------------
def lookahead_snapshot(landscape: Landscape, theta0=None, lr: float = 0.3, k: int = 5, alpha: float = 1.0,
                       optimizer: str = "sgd", r_clamp: tuple[float, float] = R_CLAMP,
                       clip: float | None = None, noise: float = 0.0, seed: int = 0) -> dict[str, Any]:
    """One update of each rule from the same theta0 on the same landscape, plus the true K+1-step path.

    Returns a dict of [n, 2] tensors and numbers:
        gd: [K + 2, 2] the true path theta_0 .. theta_(K+1);
        grpo: [2, 2] GRPO's single step (1 pass);
        gxpo_probes: [3, 2] theta0, theta1, theta2; gxpo_tilde: [2] the predicted point theta~;
        gxpo_final: [2] after the corrective step (3 passes);
        sfpo_fast: [K + 1, 2] SFPO's K fast steps; sfpo_jump: [2] theta'; sfpo_final: [2] (K+1 passes);
        r, q: [2] GXPO's per-coordinate retention ratio (clamped) and scale (clamped), recomputed from
        the recorded probe gradients with `extrapolation.retention`; r_raw, q_raw: before the clamps;
        r_clamped: [2] bool, the coordinates whose ratio the clamp changed;
        error: || gxpo_final - gd[-1] || / || gd[-1] - gd[0] || (meaningful at alpha = 1), info: GXPO's
        StepInfo dict (if it fell back, info["fallback"] is True and gxpo_tilde is theta0),
        passes: backward passes per rule.
    For time-independent landscapes (not Surge): the points are taken at update number 1.
    """
    k = check_int("k", k, minimum=2)
    alpha = check_positive("alpha", alpha)
    common = {"landscape": landscape, "theta0": theta0, "lr": lr, "optimizer": optimizer, "clip": clip,
              "noise": noise, "seed": seed}
    gd = run_rule("grpo", steps=k + 1, **common).points
    grpo = run_rule("grpo", steps=1, **common).points
    gxpo = run_rule("gxpo", steps=1, k=k, alpha=alpha, r_clamp=r_clamp, **common)
    sfpo = run_rule("sfpo", steps=1, k=k, alpha=alpha, **common)
    info = gxpo.infos[0]

    # GXPO's probes and SFPO's fast steps are plain optimizer steps from theta0 with the same noise
    # stream, so they are the first 2 (resp. K) points of the true path; the tests check this.
    # The probes' raw gradients, recomputed at theta0 and theta1 with the same noise draws:
    generator = torch.Generator().manual_seed(seed)
    g = []
    for point in gd[:2]:
        grad = landscape.grad(point, 1)
        if noise > 0:
            grad = grad + noise * torch.randn(2, generator=generator, dtype=DTYPE)
        g.append(grad)
    r, r_raw, r_clamped = retention(g[0], g[1], r_clamp=r_clamp)
    return {
        "k": k, "alpha": alpha, "gd": gd, "grpo": grpo,
        "gxpo_probes": gd[:3], "gxpo_tilde": info["eval_points"][-1], "gxpo_final": gxpo.points[-1],
        "sfpo_fast": gd[: k + 1], "sfpo_jump": sfpo.infos[0]["eval_points"][-1],
        "sfpo_final": sfpo.points[-1],
        "r": r, "q": geometric_scale(r, k), "r_raw": r_raw, "q_raw": geometric_scale(r_raw, k, clamp=False),
        "r_clamped": r_clamped,
        "error": float((gxpo.points[-1] - gd[-1]).norm() / (gd[-1] - gd[0]).norm()),
        "info": info, "passes": {"grpo": 1, "gxpo": info["backward_passes"],
                                 "sfpo": sfpo.infos[0]["backward_passes"], "gd": k + 1},
    }


# -- the shutoff gate on a loss whose gradient norm jumps (notebook 01 section 5 and the explorer) --------
def gate_snapshot(landscape: Landscape, theta0=None, lr: float = 0.3, k: int = 5, alpha: float = 1.0,
                  optimizer: str = "sgd", tau: float = 0.5, omega: float = 0.1, warmup: int = 2,
                  init: str = "unit", r_clamp: tuple[float, float] = R_CLAMP, steps: int = 30,
                  surge_step: int = 12, noise: float = 0.01, surge_noise: float = 1.0, shift=(0.0, 0.0),
                  seed: int = 0) -> dict[str, Any]:
    """GXPO with its ShutoffGate (EMA mode, grad-norm signal) for `steps` updates, where the gradient
    noise jumps from `noise` to `surge_noise` at update `surge_step` (and the loss moves by `shift`, see
    Surge). A noise surge is used because an exact extrapolation absorbs a mere shift of the minimum: the
    corrective gradient after a perfect jump is small again. The small base noise keeps the probe
    gradient from vanishing (which would make GXPO fall back) once the toy has converged. `init`: the
    gate's cold start, "unit" (mu = sigma = 1, V2) or "warmup" (mu, sigma from the warm-up observations).

    Returns lists indexed by update (numbered 1..steps, as StepInfo.step): "step", "z" (the gate's z, nan
    where it was not fed: plain steps and fallbacks), "grad_norm" (the kept step's pre-clip norm: the
    corrective norm while active), "passes" (backward passes), "active", "fallback"; and "shutoff_step"
    (the first plain update, None if the gate never closed), "tau", "warmup", "surge_step", "points"
    [steps + 1, 2].
    """
    surge_step = check_int("surge_step", surge_step, minimum=1)
    noise = _check_finite("noise", noise, minimum=0)
    surge_noise = _check_finite("surge_noise", surge_noise, minimum=0)
    surge = Surge(landscape, at_step=surge_step, shift=shift)
    run = run_rule("gxpo", surge, theta0, lr, steps, optimizer, seed=seed,
                   noise=lambda step: noise if step < surge_step else surge_noise,
                   k=k, alpha=alpha, r_clamp=r_clamp, tau=tau, omega=omega, warmup=warmup, init=init)
    return {
        "step": [i["step"] for i in run.infos],
        "z": [math.nan if i["gate_z"] is None else i["gate_z"] for i in run.infos],
        "grad_norm": [i["grad_norm"] for i in run.infos],
        "passes": [i["backward_passes"] for i in run.infos],
        "active": [i["active"] for i in run.infos],
        "fallback": [i["fallback"] for i in run.infos],
        "shutoff_step": run.rule.gate.shutoff_step,
        "tau": tau, "warmup": warmup, "init": init, "surge_step": surge_step, "points": run.points,
    }


# -- figures (plotly; imported lazily so the rest of this module needs only torch) ------------------------
PATH_TRACES = ("loss", "true GD path", "GRPO", "SFPO", "GXPO probes", "GXPO jump", "GXPO corrective", "theta_(K+1)")


def _xy(points: torch.Tensor) -> tuple[list[float | None], list[float | None]]:
    """x and y lists of [n, 2] points; a diverged (non-finite) value becomes None, a gap in the plot."""
    points = points.reshape(-1, 2)
    return tuple([v if math.isfinite(v) else None for v in points[:, i].tolist()] for i in (0, 1))


def _path_data(snapshot: dict[str, Any], landscape: Landscape, bounds=None) -> list[dict[str, Any]]:
    """x/y (and z for the contour) of every trace of the paths figure, in PATH_TRACES order."""
    xs, ys, zs = contour_grid(landscape, bounds, n=61)
    k = snapshot["k"]
    gxpo_tilde, gxpo_final = snapshot["gxpo_tilde"], snapshot["gxpo_final"]
    traces = [
        {"x": xs.tolist(), "y": ys.tolist(), "z": zs.sqrt().tolist()},  # sqrt spreads the contour levels
        dict(zip("xy", _xy(snapshot["gd"]))),
        dict(zip("xy", _xy(snapshot["grpo"]))),
        dict(zip("xy", _xy(torch.stack([snapshot["gd"][0], snapshot["sfpo_jump"], snapshot["sfpo_final"]])))),
        dict(zip("xy", _xy(snapshot["gxpo_probes"]))),
        dict(zip("xy", _xy(torch.stack([snapshot["gd"][0], gxpo_tilde])))),
        dict(zip("xy", _xy(torch.stack([gxpo_tilde, gxpo_final])))),
        dict(zip("xy", _xy(snapshot["gd"][-1]))),
    ]
    names = ["loss (sqrt)", f"true GD path: {k + 1} steps = {k + 1} passes", "GRPO: 1 step, 1 pass",
             f"SFPO: theta', then 1 step ({snapshot['passes']['sfpo']} passes)",
             "GXPO probes theta0 -> theta1 -> theta2", "GXPO jump theta0 -> theta~",
             f"GXPO corrective step ({snapshot['passes']['gxpo']} passes)", f"theta_{k + 1} (target)"]
    for trace, name in zip(traces, names):
        trace["name"] = name
    return traces


def paths_figure(snapshot: dict[str, Any], landscape: Landscape, bounds=None, widget: bool = False,
                 title: str | None = None):
    """Contour of the landscape with the true K+1-step path and where GRPO, SFPO and GXPO land.

    `snapshot`: from lookahead_snapshot. Returns a go.Figure (or go.FigureWidget with `widget`); its
    traces are in PATH_TRACES order.
    """
    import plotly.graph_objects as go

    data = _path_data(snapshot, landscape, bounds)
    line = {"mode": "lines+markers"}
    fig = (go.FigureWidget if widget else go.Figure)([
        go.Contour(**data[0], colorscale="Blues", reversescale=True, showscale=False, ncontours=22,
                   contours={"coloring": "lines"}, line={"width": 1}, hoverinfo="skip"),
        go.Scatter(**data[1], **line, marker={"size": 6, "color": "gray"}, line={"color": "gray"}),
        go.Scatter(**data[2], **line, marker={"size": 9, "color": "#2ca02c"}, line={"color": "#2ca02c"}),
        go.Scatter(**data[3], **line, marker={"size": 9, "symbol": "diamond", "color": "#9467bd"},
                   line={"color": "#9467bd", "dash": "dot"}),
        go.Scatter(**data[4], **line, marker={"size": 8, "color": "#ff7f0e"}, line={"color": "#ff7f0e"}),
        go.Scatter(**data[5], **line, marker={"size": 11, "symbol": "x", "color": "#d62728"},
                   line={"color": "#d62728", "dash": "dash"}),
        go.Scatter(**data[6], **line, marker={"size": 10, "color": "#d62728"}, line={"color": "#d62728"}),
        go.Scatter(**data[7], mode="markers", marker={"size": 18, "symbol": "star-open", "color": "black"}),
    ])
    fig.update_layout(title=title or f"one update from theta0, K = {snapshot['k']}, alpha = {snapshot['alpha']}",
                      xaxis_title="theta[0]", yaxis_title="theta[1]", yaxis={"scaleanchor": "x"},
                      width=720, height=520, legend={"font": {"size": 10}}, margin={"t": 50})
    return fig


def _gate_data(gate: dict[str, Any]) -> list[dict[str, Any]]:
    steps, z = gate["step"], gate["z"]
    finite = [v for v in z if math.isfinite(v)] + [gate["tau"], 0.0]
    low, high = min(finite) - 0.2, max(finite) + 0.2
    shut = gate["shutoff_step"]
    return [
        {"x": steps, "y": z, "name": "gate z (corrective grad norm)"},
        {"x": [steps[0], steps[-1]], "y": [gate["tau"]] * 2, "name": f"tau = {gate['tau']:g}"},
        {"x": [] if shut is None else [shut - 0.5, shut - 0.5], "y": [] if shut is None else [low, high],
         "name": "shut off" + ("" if shut is None else f": plain from update {shut}")},
        {"x": [gate["surge_step"] - 0.5] * 2, "y": [low, high],
         "name": f"noise surge at update {gate['surge_step']}"},
        {"x": steps, "y": gate["passes"], "name": "backward passes per update"},
    ]


def gate_figure(gate: dict[str, Any], widget: bool = False):
    """The gate's z per update, the tau line, the surge and the shutoff, and backward passes per update
    (right axis). `gate`: from gate_snapshot. Returns a go.Figure or go.FigureWidget."""
    import plotly.graph_objects as go

    data, passes = _gate_data(gate), sorted({0, *gate["passes"]})  # integers (1 or 3): ticks there only
    fig = (go.FigureWidget if widget else go.Figure)([
        go.Scatter(**data[0], mode="lines+markers", line={"color": "#1f77b4"}),
        go.Scatter(**data[1], mode="lines", line={"color": "#d62728", "dash": "dash"}),
        go.Scatter(**data[2], mode="lines", line={"color": "black", "width": 3}),
        go.Scatter(**data[3], mode="lines", line={"color": "gray", "dash": "dot"}),
        go.Bar(**data[4], yaxis="y2", opacity=0.25, marker={"color": "#ff7f0e"}),
    ])
    fig.update_layout(title="ShutoffGate when the gradient noise surges", width=720, height=440, margin={"t": 50},
                      xaxis={"title": "update", "tickformat": "d"}, yaxis_title="z",
                      yaxis2={"title": "backward passes", "overlaying": "y", "side": "right", "showgrid": False,
                              "range": [0, 2 * max(passes[-1], 3)], "tickmode": "array", "tickvals": passes},
                      legend={"font": {"size": 10}, "orientation": "h", "y": -0.2, "x": 0})
    return fig


def _scale_data(ks, r_clamp, snapshot=None) -> list[dict[str, Any]]:
    r = torch.linspace(-3.0, 4.5, 751, dtype=DTYPE)
    ceiling = 12.0
    traces = []
    for k in ks:
        raw = geometric_scale(r, k, clamp=False)
        raw = torch.where(raw.abs() <= ceiling, raw, torch.full_like(raw, math.nan))  # off-scale -> gap
        used = geometric_scale(r.clamp(*r_clamp), k)  # what the rule applies: clamp r, then q
        traces.append({"x": r.tolist(), "y": raw.tolist(), "name": f"K={k}: raw S_K/S_2"})
        traces.append({"x": r.tolist(), "y": used.tolist(), "name": f"K={k}: clamped (used)"})
    low, high = r_clamp
    traces.append({"x": [low, low, None, high, high], "y": [-3, ceiling, None, -3, ceiling],
                   "name": f"stability clamp r in [{low:g}, {high:g}]"})
    if snapshot is not None:
        traces.append({"x": snapshot["r"].tolist(), "y": snapshot["q"].tolist(), "name": "this step's (r, q)"})
    return traces


def scale_figure(ks=(2, 3, 5, 10), r_clamp: tuple[float, float] = R_CLAMP, snapshot=None, widget: bool = False):
    """q(r) = S_K(r)/S_2(r) for each K: raw (dotted) and as the rule applies it (solid: r clamped to
    r_clamp, q clamped to [1, K/2 + 1]); with `snapshot` (lookahead_snapshot) this step's (r, q) per
    coordinate. Returns a go.Figure or go.FigureWidget."""
    import plotly.graph_objects as go

    from gxpo_lib.analysis.palette import method_colors

    ks = [check_int("k", k, minimum=2) for k in ks]
    r_clamp = check_interval("r_clamp", r_clamp)
    data = _scale_data(ks, r_clamp, snapshot)
    colors, traces = method_colors(f"GXPO K={k}" for k in ks), []  # the suite's colour of GXPO at each K
    for i, k in enumerate(ks):
        color = colors[f"GXPO K={k}"]
        traces.append(go.Scatter(**data[2 * i], mode="lines", line={"color": color, "dash": "dot", "width": 1}))
        traces.append(go.Scatter(**data[2 * i + 1], mode="lines", line={"color": color, "width": 3}))
    traces.append(go.Scatter(**data[2 * len(ks)], mode="lines", line={"color": "black", "dash": "dash"}))
    if snapshot is not None:
        traces.append(go.Scatter(**data[-1], mode="markers", marker={"size": 12, "color": "#d62728"}))
    fig = (go.FigureWidget if widget else go.Figure)(traces)
    fig.update_layout(title="geometric scale q(r) = S_K(r) / S_2(r)", xaxis_title="retention ratio r",
                      yaxis_title="q", yaxis={"range": [-3, 12]}, width=720, height=420,
                      legend={"font": {"size": 10}}, margin={"t": 50})
    return fig


def _update_figure(fig, data: list[dict[str, Any]]) -> None:
    """Write new x/y/z/name into the existing traces (a FigureWidget redraws in place)."""
    with fig.batch_update():
        for trace, values in zip(fig.data, data):
            for key, value in values.items():
                setattr(trace, key, value)


# -- the interactive explorer (notebook 01 section 6) -------------------------------------------------------
class Explorer(NamedTuple):
    """What `build_explorer` returns: the widget box to display, the FigureWidgets by name ("paths",
    "gate", "scale"), the function that redraws everything from the controls' values, and the controls
    by name ("K", "alpha", "tau", "r_clamp", "omega", "lr", "noise", "landscape", "optimizer")."""

    box: Any
    figures: dict[str, Any]
    update: Any
    controls: dict[str, Any]


def build_explorer(K: int = 5, alpha: float = 1.0, tau: float = 0.5, r_min: float = -2.0, r_max: float = 3.0,
                   omega: float = 0.1, lr: float = 0.3, landscape: str = "diagonal", optimizer: str = "sgd",
                   noise: float = 0.0, seed: int = 0, gate_steps: int = 30, surge_step: int = 12) -> Explorer:
    """Sliders and dropdowns that redraw three plotly FigureWidgets through observers (no cell re-runs):
    the paths of one update (paths_figure), q(r) with this step's ratios (scale_figure) and the gate when
    the gradient noise surges (gate_figure; its base noise is the noise slider's value, at least 0.01),
    plus a line of numbers. Every default is validated."""
    import ipywidgets as widgets

    k = check_int("K", K, minimum=2)
    check_positive("alpha", alpha)
    check_positive("tau", tau)
    r_low, r_high = check_interval("(r_min, r_max)", (r_min, r_max))
    check_open_unit("omega", omega)
    check_positive("lr", lr)
    check_choice("landscape", landscape, tuple(LANDSCAPES))
    check_choice("optimizer", optimizer, OPTIMIZERS)
    _check_finite("noise", noise, minimum=0)

    style, layout = {"description_width": "110px"}, widgets.Layout(width="420px")

    def control(kind, description, value, **kw):
        return getattr(widgets, kind)(value=value, description=description, style=style, layout=layout, **kw)

    controls = {
        "K": control("IntSlider", "K (lookahead)", k, min=2, max=max(20, k)),
        "alpha": control("FloatSlider", "alpha", alpha, min=0.1, max=max(2.0, alpha), step=0.05),
        "r_clamp": control("FloatRangeSlider", "stability clamp r", (r_low, r_high), min=min(-4.0, r_low),
                           max=max(5.0, r_high), step=0.05),
        "tau": control("FloatSlider", "gate tau", tau, min=0.05, max=max(5.0, tau), step=0.05),
        "omega": control("FloatSlider", "gate omega", omega, min=0.01, max=0.99, step=0.01),
        # A linear slider: a log slider's grid (10 ** 0.05n) cannot hold 0.3, and the browser would
        # silently send the nearest grid value back, changing the figures' learning rate.
        "lr": control("FloatSlider", "learning rate", lr, min=0.01, max=max(3.0, lr), step=0.01,
                      readout_format=".3g"),
        "noise": control("FloatSlider", "gradient noise", noise, min=0.0, max=max(1.0, noise), step=0.01),
        "landscape": control("Dropdown", "landscape", landscape, options=list(LANDSCAPES)),
        "optimizer": control("Dropdown", "optimizer", optimizer, options=list(OPTIMIZERS)),
    }
    readout = widgets.HTML()

    def compute() -> tuple[dict, dict, Landscape]:
        """Everything the figures show, from the controls' current values."""
        v = {name: c.value for name, c in controls.items()}
        land = make_landscape(v["landscape"])
        common = {"lr": v["lr"], "k": v["K"], "alpha": v["alpha"], "optimizer": v["optimizer"],
                  "r_clamp": tuple(v["r_clamp"]), "seed": seed}
        snap = lookahead_snapshot(land, noise=v["noise"], **common)
        gate = gate_snapshot(land, tau=v["tau"], omega=v["omega"], steps=gate_steps, surge_step=surge_step,
                             noise=max(v["noise"], 0.01), **common)
        return snap, gate, land

    snap, gate, land = compute()
    figures = {"paths": paths_figure(snap, land, widget=True),
               "scale": scale_figure([k], (r_low, r_high), snap, widget=True),
               "gate": gate_figure(gate, widget=True)}

    def describe(snap, gate) -> str:
        info = snap["info"]
        shut = gate["shutoff_step"]
        return (f"<b>r</b> = {_fmt(snap['r'])} (raw {_fmt(snap['r_raw'])}), <b>q</b> = {_fmt(snap['q'])} "
                f"(raw {_fmt(snap['q_raw'])}, cap K/2+1 = {max_scale(snap['k']):g}); "
                f"clamped ratios: {info['ratio_clip_frac'] if info['ratio_clip_frac'] is not None else '-'}; "
                f"<b>GXPO vs theta_{snap['k'] + 1}</b>: relative error {snap['error']:.2e} "
                f"({'alpha=1: the surrogate check' if snap['alpha'] == 1 else 'alpha != 1: not a check'}); "
                f"passes GRPO/GXPO/SFPO = 1/{snap['passes']['gxpo']}/{snap['passes']['sfpo']}; "
                f"gate: {'never shut off' if shut is None else f'plain steps from update {shut}'}")

    def update(change=None) -> None:
        """Recompute and redraw every figure from the controls (the observers call this)."""
        snap, gate, land = compute()
        _update_figure(figures["paths"], _path_data(snap, land))
        figures["paths"].layout.title.text = (f"one update from theta0, K = {snap['k']}, "
                                              f"alpha = {snap['alpha']:g}, {land.name}, "
                                              f"{controls['optimizer'].value}")
        _update_figure(figures["scale"], _scale_data([snap["k"]], tuple(controls["r_clamp"].value), snap))
        _update_figure(figures["gate"], _gate_data(gate))
        readout.value = describe(snap, gate)

    for control in controls.values():
        control.observe(update, names="value")
    readout.value = describe(snap, gate)

    left = widgets.VBox([widgets.HTML("<b>GXPO explorer</b>: move a control, the figures redraw")]
                        + list(controls.values()))
    # sized to sit two abreast in a ~1100 px notebook column; legends below the plots
    below = {"orientation": "h", "y": -0.18, "x": 0, "font": {"size": 10}}
    figures["scale"].update_layout(width=560, height=400, legend=below)
    figures["paths"].update_layout(width=540, height=560, legend=below)
    figures["gate"].update_layout(width=540, height=440, legend=below)
    box = widgets.VBox([widgets.HBox([left, figures["scale"]]), readout,
                        widgets.HBox([figures["paths"], figures["gate"]])])
    return Explorer(box, figures, update, controls)


def _fmt(values: torch.Tensor) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values.tolist()) + ")"
