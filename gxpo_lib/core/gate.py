"""ShutoffGate: decides when GXPO (or SFPO) stops extrapolating and falls back to plain GRPO (docs/algorithm.md).

It watches one scalar per active step (by default the pre-clip norm of GXPO's corrective gradient) and
computes a z-score of each new observation against what came before. A surge (z >= tau on `patience`
consecutive observations, after `warmup` observations) closes the gate from the next step on.

Two ways to score an observation H:
- ``mode="ema"`` (paper-era code): z = (H - mu) / (sigma + 1e-8) with the *old* EMA mean and std, then
  sigma^2 <- (1-omega) sigma^2 + omega (H - mu)^2, sigma <- max(0.01, sigma), mu <- (1-omega) mu + omega H.
  mu and sigma start at 1 (``init="unit"``, V1/V2). When the signal is far below 1 (a clipped run's
  gradient norm of 0.05, say) every z stays negative until mu has decayed towards it: from mu = 1 at
  omega = 0.1 that takes some 20-30 observations, so the gate is in effect disarmed for that long.
  ``init="warmup"`` instead starts mu and sigma at the mean and population std (floored at 0.01) of the
  `warmup` warm-up observations, which it only collects.
- ``mode="window"`` (the authors' later code): z against the mean and population std of the preceding
  `window` observations (0 until the window is full). ``window_includes_current=True`` scores H inside
  its own window instead, as SFPO's official switch-off does. ``freeze_baseline=True`` (V5) scores every
  observation of an open streak against the mean and std that scored its first violation.

``two_sided=True`` (V1) trips on |z| >= tau, so a *drop* of the signal trips too.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from gxpo_lib.choices import GATE_INITS, GATE_KINDS, GATE_MODES, GATE_SIGNALS
from gxpo_lib.validation import check_choice, check_int, check_open_unit, check_positive

GATE_SETTINGS = ("tau", "omega", "warmup", "patience", "mode", "window", "window_includes_current",
                 "signal", "permanent", "reopen_after", "init", "two_sided", "freeze_baseline")


class ShutoffGate:
    """Z-score shutoff gate.

    Args:
        tau: trip threshold on z (> 0). The paper's runs use 0.5.
        omega: EMA rate in (0, 1) (``mode="ema"``).
        warmup: observations that only update the statistics and cannot trip (>= 0).
        patience: consecutive observations with z >= tau needed to trip (>= 1).
        mode: "ema" or "window".
        window: length of the rolling window (``mode="window"``, >= 2).
        window_includes_current: score H inside its own window (SFPO's official rule).
        signal: what the rule feeds: "grad_norm" (the corrective pre-clip norm; the rule feeds it) or
            "entropy" (the caller passes the policy entropy as ``gate_signal=`` to ``rule.step``).
        permanent: once closed, stay closed. Otherwise re-open after `reopen_after` closed steps,
            keeping the statistics.
        reopen_after: closed steps before re-opening (``permanent=False``, >= 1).
        init: the EMA's cold start: "unit" (mu = sigma = 1, V1/V2) or "warmup" (mu, sigma from the
            `warmup` warm-up observations; needs warmup >= 1; ``mode="ema"`` only has a cold start).
        two_sided: trip on |z| >= tau (V1) instead of z >= tau.
        freeze_baseline: ``mode="window"``: while a streak is open, score against the window statistics
            that scored its first violation (V5), so `patience` counts violations of one baseline.
    """

    def __init__(self, tau: float = 0.5, omega: float = 0.1, warmup: int = 2, patience: int = 1, mode: str = "ema",
                 window: int = 30, window_includes_current: bool = False, signal: str = "grad_norm",
                 permanent: bool = True, reopen_after: int = 10, init: str = "unit", two_sided: bool = False,
                 freeze_baseline: bool = False):
        self.tau = check_positive("tau", tau)
        self.omega = check_open_unit("omega", omega)
        self.warmup = check_int("warmup", warmup, minimum=0)
        self.patience = check_int("patience", patience, minimum=1)
        self.mode = check_choice("mode", mode, GATE_MODES)
        self.window = check_int("window", window, minimum=2)
        self.window_includes_current = bool(window_includes_current)
        self.signal = check_choice("signal", signal, GATE_SIGNALS)
        self.permanent = bool(permanent)
        self.reopen_after = check_int("reopen_after", reopen_after, minimum=1)
        self.init = check_choice("init", init, GATE_INITS)
        if self.init == "warmup" and self.warmup < 1:
            raise ValueError(f"init={init!r} is invalid with warmup={warmup}: allowed init='unit', or "
                             "init='warmup' with warmup >= 1 (the observations mu and sigma start from)")
        self.two_sided = bool(two_sided)
        self.freeze_baseline = bool(freeze_baseline)
        self.reset()

    def reset(self) -> None:
        """Forget every observation and open the gate."""
        self.mu, self.sigma = 1.0, 1.0
        self.history: deque[float] = deque(maxlen=self.window)
        self.frozen: tuple[float, float] | None = None  # the baseline of an open streak (freeze_baseline)
        self.scored_with: tuple[float, float] | None = None  # the window statistics of the last observation
        self.warm_values: list[float] = []  # init="warmup": the observations mu and sigma start from
        self.num_observations, self.streak, self.is_open, self.closed_steps_left = 0, 0, True, 0
        self.last_z: float | None = None
        self.shutoff_step: int | None = None

    # -- scoring -----------------------------------------------------------------------------------
    def _score_ema(self, value: float) -> float:
        """z against the old EMA, then the EMA update of docs/algorithm.md (init="warmup": collect first)."""
        if self.init == "warmup" and self.num_observations < self.warmup:
            self.warm_values.append(value)
            if len(self.warm_values) == self.warmup:  # the last warm-up observation sets mu and sigma
                seen = self.warm_values
                self.mu = sum(seen) / len(seen)
                self.sigma = max(0.01, math.sqrt(sum((h - self.mu) ** 2 for h in seen) / len(seen)))
            return 0.0
        z = (value - self.mu) / (self.sigma + 1e-8)
        variance = (1 - self.omega) * self.sigma**2 + self.omega * (value - self.mu) ** 2
        self.sigma = max(0.01, math.sqrt(variance))
        self.mu = (1 - self.omega) * self.mu + self.omega * value
        return z

    def _score_window(self, value: float) -> float:
        """z against the rolling window's mean and population std (0 until it is full)."""
        if self.window_includes_current:
            self.history.append(value)
        full = len(self.history) == self.window
        z, self.scored_with = 0.0, None
        if full:
            if self.freeze_baseline and self.frozen is not None:
                mean, std = self.frozen
            else:
                mean = sum(self.history) / self.window
                std = math.sqrt(sum((h - mean) ** 2 for h in self.history) / self.window)
            z = (value - mean) / (std + 1e-9)
            self.scored_with = (mean, std)
        if not self.window_includes_current:
            self.history.append(value)
        return z

    def observe(self, value: float, step: int | None = None) -> float:
        """Feed one observation; returns its z. May close the gate (from the next step on).

        A non-finite value is ignored (returns nan): a broken statistic must not steer the gate.
        `step` (the caller's step index) is recorded as ``shutoff_step = step + 1`` on a trip.
        """
        value = float(value)
        if not math.isfinite(value):
            return float("nan")
        z = self._score_ema(value) if self.mode == "ema" else self._score_window(value)
        self.num_observations += 1
        self.last_z = z
        can_trip = self.num_observations > self.warmup
        violation = can_trip and (abs(z) if self.two_sided else z) >= self.tau
        self.streak = self.streak + 1 if violation else 0
        if self.mode == "window" and self.freeze_baseline:  # hold the first violation's baseline
            self.frozen = (self.frozen or self.scored_with) if self.streak else None
        if self.streak >= self.patience:
            self._close(step)
        return z

    def _close(self, step: int | None) -> None:
        """Trip: extrapolation is off from the next step."""
        self.is_open, self.streak, self.frozen, self.closed_steps_left = False, 0, None, self.reopen_after
        self.shutoff_step = None if step is None else step + 1

    def begin_step(self) -> bool:
        """Called once at the start of every update; True if extrapolation may run in it.

        Counts the closed steps of a non-permanent gate and re-opens it after `reopen_after` of them.
        """
        if self.is_open:
            return True
        if self.permanent:
            return False
        if self.closed_steps_left > 0:
            self.closed_steps_left -= 1
            return False
        self.is_open = True
        return True

    # -- settings and checkpointing ---------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """The constructor arguments, as they are now."""
        return {name: getattr(self, name) for name in GATE_SETTINGS}

    def update_settings(self, **settings: Any) -> None:
        """Change settings between steps (e.g. tau from a slider), keeping the statistics.

        Everything is validated before anything changes.
        """
        unknown = sorted(set(settings) - set(GATE_SETTINGS))
        if unknown:
            raise ValueError(f"{unknown[0]}={settings[unknown[0]]!r} is invalid: allowed gate settings are "
                             f"{list(GATE_SETTINGS)}")
        trial = ShutoffGate(**(self.settings() | settings))
        for name in settings:
            setattr(self, name, getattr(trial, name))
        self.history = deque(self.history, maxlen=self.window)

    def state_dict(self) -> dict[str, Any]:
        """Settings and statistics, JSON-friendly."""
        return self.settings() | {
            "mu": self.mu, "sigma": self.sigma, "history": list(self.history),
            "frozen": None if self.frozen is None else list(self.frozen), "warm_values": list(self.warm_values),
            "num_observations": self.num_observations, "streak": self.streak, "is_open": self.is_open,
            "closed_steps_left": self.closed_steps_left, "last_z": self.last_z,
            "shutoff_step": self.shutoff_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (settings are validated again)."""
        self.update_settings(**{name: state[name] for name in GATE_SETTINGS if name in state})  # older: fewer
        self.mu, self.sigma = float(state["mu"]), float(state["sigma"])
        self.history = deque((float(h) for h in state["history"]), maxlen=self.window)
        frozen = state.get("frozen")
        self.frozen = None if frozen is None else (float(frozen[0]), float(frozen[1]))
        self.warm_values = [float(v) for v in state.get("warm_values", [])]
        self.num_observations, self.streak = int(state["num_observations"]), int(state["streak"])
        self.is_open, self.closed_steps_left = bool(state["is_open"]), int(state["closed_steps_left"])
        self.last_z, self.shutoff_step = state["last_z"], state["shutoff_step"]

    def __repr__(self) -> str:
        return (f"ShutoffGate(tau={self.tau}, mode={self.mode!r}, signal={self.signal!r}, "
                f"warmup={self.warmup}, patience={self.patience}, open={self.is_open})")


def sfpo_official_gate() -> ShutoffGate:
    """SFPO's official switch-off: entropy z over a window of 30 that includes the scored value, tau 1.0,
    no warm-up, permanent (the official SFPO code; docs/versions.md)."""
    return ShutoffGate(**GATE_KINDS["entropy"])
