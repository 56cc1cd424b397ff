"""Update rules: PlainStep (GRPO's one pass), GXPO (two probes, extrapolate, correct) and SFPO.

Each rule wraps any ``torch.optim.Optimizer`` and is driven like ``optimizer.step(closure)``:

    rule = GXPO(torch.optim.AdamW(params, lr=1e-6), k=5, alpha=0.5, tau=0.5, max_grad_norm=1.0)
    info = rule.step(closure)        # closure(): forward + loss.backward(); returns the loss

The rule zeroes gradients itself before every ``closure()`` call and returns a `StepInfo` record
(spec section 5). A pass whose gradient is not finite never reaches the parameters (fallback).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .extrapolation import DELTA, R_CLAMP, active_mask, geometric_scale, raw_retention_ratio, reposition
from .gate import ShutoffGate, sfpo_official_gate
from .validation import (
    check_choice,
    check_int,
    check_interval,
    check_optional_positive,
    check_positive,
)

Closure = Callable[[], torch.Tensor]
OPTIMIZER_STATE_MODES = ("carry", "transactional")
RETENTION_MODES = ("grad", "clip_corrected")
MIN_GRAD_NORM = 1e-8  # a first probe gradient at or below this norm gives nothing to extrapolate


@dataclass
class StepInfo:
    """What one ``rule.step`` did. Norms are pre-clip global L2 norms; None = not measured this step."""

    step: int = 0
    loss: float | None = None
    backward_passes: int = 0
    active: bool = False
    fallback: bool = False
    skipped: bool = False  # even the plain step had a non-finite gradient: parameters untouched
    gate_open: bool = True
    gate_z: float | None = None
    grad_norm: float | None = None
    g0_norm: float | None = None
    g1_norm: float | None = None
    gslow_norm: float | None = None
    r_mean: float | None = None
    r_std: float | None = None
    scale_mean: float | None = None
    scale_max: float | None = None
    inactive_frac: float | None = None
    ratio_clip_frac: float | None = None
    disp2_norm: float | None = None
    dispK_norm: float | None = None
    jump_norm: float | None = None
    param_norm: float | None = None
    cos_g0_g1: float | None = None
    cos_g0_gslow: float | None = None
    effective_multiplier: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Fallback(Exception):
    """Raised inside an extrapolating step when a pass gives a non-finite (or vanishing) gradient."""


class UpdateRule:
    """Shared plumbing: the trainable parameters, one backward pass, clipping, the plain step.

    Args:
        optimizer: any torch optimizer; its parameters with ``requires_grad`` are the ones updated.
        max_grad_norm: global-norm clip C, or None for no clipping.
    """

    backward_passes_per_step = 1

    def __init__(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = 1.0):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer={type(optimizer).__name__} is invalid: allowed a torch.optim.Optimizer")
        self.optimizer = optimizer
        self.max_grad_norm = check_optional_positive("max_grad_norm", max_grad_norm)
        self.params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if not self.params:
            raise ValueError("optimizer has no parameters with requires_grad=True: nothing to update")
        self.num_steps = 0
        self.total_backward_passes = 0

    # -- one pass ----------------------------------------------------------------------------------
    def _backward(self, closure: Closure) -> tuple[float, float]:
        """Zero grads, run the closure (forward + backward); returns (loss, pre-clip gradient norm)."""
        self.optimizer.zero_grad(set_to_none=False)
        with torch.enable_grad():
            loss = closure()
        self.total_backward_passes += 1
        for p in self.params:  # parameters the loss did not touch contribute a zero gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params])
        return _to_float(loss), float(norm)

    def _clip_scale(self, norm: float) -> float:
        """The factor clipping multiplies the gradient by (torch's clip_grad_norm_ formula)."""
        if self.max_grad_norm is None:
            return 1.0
        return min(1.0, self.max_grad_norm / (norm + 1e-6))

    def _clip_and_step(self, norm: float) -> None:
        """Clip the live gradient to max_grad_norm (given its pre-clip norm) and take an optimizer step."""
        scale = self._clip_scale(norm)
        if scale < 1.0:
            torch._foreach_mul_([p.grad for p in self.params], scale)
        self.optimizer.step()

    def _plain_step(self, closure: Closure, info: StepInfo) -> StepInfo:
        """GRPO's update: one pass, clip, optimizer step; a non-finite gradient skips the step."""
        loss, norm = self._backward(closure)
        info.backward_passes += 1
        info.loss, info.grad_norm = loss, norm
        if _finite(norm):
            self._clip_and_step(norm)
        else:
            self.optimizer.zero_grad(set_to_none=False)
            info.skipped = True
        return info

    def _new_info(self) -> StepInfo:
        self.num_steps += 1
        return StepInfo(step=self.num_steps)

    # -- parameter and optimizer snapshots ---------------------------------------------------------
    def _save_params(self, buffers: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Copy the live parameters into (lazily allocated, reused) buffers."""
        if buffers is None:
            return [p.detach().clone() for p in self.params]
        torch._foreach_copy_(buffers, [p.detach() for p in self.params])
        return buffers

    def _load_params(self, buffers: list[torch.Tensor]) -> None:
        with torch.no_grad():
            torch._foreach_copy_([p for p in self.params], buffers)

    def _snapshot_optimizer(self) -> dict[torch.Tensor, dict[str, Any]]:
        """A copy of the optimizer's per-parameter state (moments, step counters)."""
        return {p: {k: (v.clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in st.items()}
                for p, st in self.optimizer.state.items()}

    def _restore_optimizer(self, snapshot: dict[torch.Tensor, dict[str, Any]]) -> None:
        """Put the optimizer state back exactly as snapshotted (state created since is dropped)."""
        for p in list(self.optimizer.state.keys()):
            if p not in snapshot:
                del self.optimizer.state[p]
        for p, st in snapshot.items():
            live = self.optimizer.state[p]
            for k, v in st.items():
                if torch.is_tensor(v) and torch.is_tensor(live.get(k)) and live[k].shape == v.shape:
                    live[k].copy_(v)
                else:
                    live[k] = v

    # -- checkpointing -----------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm}

    def state_dict(self) -> dict[str, Any]:
        """Settings and counters (the optimizer is checkpointed by its owner)."""
        return {"settings": self.settings(), "num_steps": self.num_steps,
                "total_backward_passes": self.total_backward_passes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.update_settings(**state["settings"])
        self.num_steps = int(state["num_steps"])
        self.total_backward_passes = int(state["total_backward_passes"])

    def update_settings(self, **settings: Any) -> None:
        """Change settings between steps (the live widgets use this); each value is validated."""
        for name, value in settings.items():
            if name != "max_grad_norm":
                raise ValueError(f"{name}={value!r} is invalid: allowed settings are {sorted(self.settings())}")
            self.max_grad_norm = check_optional_positive("max_grad_norm", value)


class PlainStep(UpdateRule):
    """GRPO's update rule: one backward pass, global-norm clip, one optimizer step."""

    def step(self, closure: Closure, gate_signal: float | None = None) -> StepInfo:
        return self._plain_step(closure, self._new_info())


class _GatedRule(UpdateRule):
    """A rule that extrapolates while its ShutoffGate is open and is a PlainStep afterwards."""

    def __init__(self, optimizer, max_grad_norm, gate: ShutoffGate | None):
        super().__init__(optimizer, max_grad_norm)
        if gate is not None and not isinstance(gate, ShutoffGate):
            raise ValueError(f"gate={gate!r} is invalid: allowed a ShutoffGate or None")
        self.gate = gate

    _BUFFERS: tuple[str, ...] = ()  # the names of the extrapolation's parameter-sized work buffers

    def _gate_allows(self) -> bool:
        """Does this step extrapolate? While it does not, the work buffers are freed (a gate that re-opens
        gets them allocated again), so a shut-off rule holds no more memory than a PlainStep."""
        allowed = True if self.gate is None else self.gate.begin_step()
        if not allowed:
            for name in self._BUFFERS:
                setattr(self, name, None)
        return allowed

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the work buffers (GXPO: theta0, g0, g1; SFPO: theta0); 0 after a shut-off."""
        return sum(t.numel() * t.element_size() for name in self._BUFFERS for t in (getattr(self, name) or ()))

    def _feed_gate(self, info: StepInfo, grad_norm_signal: float, gate_signal: float | None) -> None:
        """Give the gate this step's statistic (the caller's entropy when its signal is "entropy")."""
        if self.gate is None:
            return
        value = gate_signal if self.gate.signal == "entropy" else grad_norm_signal
        info.gate_z = _none_if_nan(self.gate.observe(value, step=self.num_steps))

    def _check_signal(self, gate_signal: float | None) -> None:
        if self.gate is not None and self.gate.signal == "entropy" and gate_signal is None:
            raise ValueError("gate_signal=None is invalid: this gate's signal is 'entropy', so pass the "
                             "policy entropy as rule.step(closure, gate_signal=...) (or use gate=None)")

    def _fallback(self, closure: Closure, info: StepInfo, snapshot) -> StepInfo:
        """Undo the step's partial work (parameters, and the optimizer state if snapshotted); one plain step."""
        self._load_params(self._theta0)
        if snapshot is not None:
            self._restore_optimizer(snapshot)
        info.fallback, info.active = True, False
        return self._plain_step(closure, info)

    def update_settings(self, **settings: Any) -> None:
        """Change K, alpha, r_clamp, tau, ... between steps (the live widgets use this).

        The rule's own settings and the gate's (tau, omega, warmup, patience, ...) are both accepted;
        everything is validated before anything changes.
        """
        own = {k: v for k, v in settings.items() if k in self.settings()}
        gate_part = {k: v for k, v in settings.items() if k not in own}
        if gate_part and self.gate is None:
            name = min(gate_part)
            raise ValueError(f"{name}={gate_part[name]!r} is invalid: allowed settings are "
                             f"{sorted(self.settings())} (this rule has no gate)")
        trial = type(self)(self.optimizer, gate=None, **(self.settings() | own))  # validates every value
        if gate_part:
            self.gate.update_settings(**gate_part)
        for name in own:
            setattr(self, name, getattr(trial, name))

    def _finish(self, info: StepInfo) -> StepInfo:
        info.gate_open = True if self.gate is None else self.gate.is_open
        return info

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["gate"] = None if self.gate is None else self.gate.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if (state.get("gate") is None) != (self.gate is None):
            raise ValueError("gate: the checkpoint and this rule disagree on whether there is a gate")
        if self.gate is not None:
            self.gate.load_state_dict(state["gate"])


def _make_gate(gate: ShutoffGate | None | str, gate_kwargs: dict[str, Any]) -> ShutoffGate | None:
    """`gate="default"` builds a ShutoffGate from the keyword settings; a ShutoffGate or None is used as is."""
    if isinstance(gate, str):
        if gate != "default":
            raise ValueError(f"gate={gate!r} is invalid: allowed a ShutoffGate, None or 'default'")
        return ShutoffGate(**gate_kwargs)
    if gate_kwargs:
        raise ValueError(f"gate settings {sorted(gate_kwargs)} given together with gate={gate!r}: "
                         "pass either a ready gate or its settings")
    return gate


class GXPO(_GatedRule):
    """Gradient-extrapolation policy optimization (spec section 2): 3 backward passes per active step.

    Args:
        optimizer: any torch optimizer.
        k: lookahead horizon K (>= 2).
        alpha: fraction of the way to the predicted K-step point (> 0).
        max_grad_norm: global-norm clip C (None = no clipping).
        r_clamp: the stability clamp (r_min, r_max) on the retention ratio.
        delta: activity threshold on |g0| and guard on |S_2|.
        optimizer_state: "carry" (paper era: the probe steps' moment updates stay) or "transactional"
            (the optimizer state is restored before the corrective step; the authors' newest code).
        retention: "grad" (r = g1/g0) or "clip_corrected" (r = c1 g1 / c0 g0, the gradients the
            optimizer actually used; the authors' newest code).
        skip_corrective: ablation: stop at theta~ (2 backward passes); the gate then watches g1's norm.
        gate: "default" (a ShutoffGate from the keywords below), a ready ShutoffGate, or None (never
            shut off).
        **gate_settings: tau, omega, warmup, patience, mode, window, signal, permanent, reopen_after.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        k: int = 5,
        alpha: float = 0.5,
        max_grad_norm: float | None = 1.0,
        r_clamp: tuple[float, float] = R_CLAMP,
        delta: float = DELTA,
        optimizer_state: str = "carry",
        retention: str = "grad",
        skip_corrective: bool = False,
        gate: ShutoffGate | None | str = "default",
        **gate_settings: Any,
    ):
        self.k = check_int("k", k, minimum=2)
        self.alpha = check_positive("alpha", alpha)
        self.r_clamp = check_interval("r_clamp", r_clamp)
        self.delta = check_positive("delta", delta)
        self.optimizer_state = check_choice("optimizer_state", optimizer_state, OPTIMIZER_STATE_MODES)
        self.retention = check_choice("retention", retention, RETENTION_MODES)
        self.skip_corrective = bool(skip_corrective)
        super().__init__(optimizer, max_grad_norm, _make_gate(gate, gate_settings))
        self._theta0: list[torch.Tensor] | None = None   # theta0 and the two probe gradients: 3 P-sized buffers
        self._g0: list[torch.Tensor] | None = None
        self._g1: list[torch.Tensor] | None = None

    _BUFFERS = ("_theta0", "_g0", "_g1")

    @property
    def backward_passes_per_step(self) -> int:  # while active
        return 2 if self.skip_corrective else 3

    # -- settings ----------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm, "k": self.k, "alpha": self.alpha,
                "r_clamp": list(self.r_clamp), "delta": self.delta,
                "optimizer_state": self.optimizer_state, "retention": self.retention,
                "skip_corrective": self.skip_corrective}

    # -- the step ----------------------------------------------------------------------------------
    def step(self, closure: Closure, gate_signal: float | None = None) -> StepInfo:
        """One mini-batch update. `gate_signal`: the caller's statistic for an entropy-signal gate."""
        self._check_signal(gate_signal)
        info = self._new_info()
        if not self._gate_allows():
            return self._finish(self._plain_step(closure, info))
        self._theta0 = self._save_params(self._theta0)
        snapshot = self._snapshot_optimizer() if self.optimizer_state == "transactional" else None
        try:
            gate_value = self._extrapolate(closure, info, snapshot)
        except _Fallback:
            return self._finish(self._fallback(closure, info, snapshot))
        info.active = True
        self._feed_gate(info, gate_value, gate_signal)
        return self._finish(info)

    def _probe(self, closure: Closure, info: StepInfo, buffers: list[torch.Tensor] | None):
        """One probe pass: backward, keep the raw gradient, check it, clip, optimizer step."""
        loss, norm = self._backward(closure)
        info.backward_passes += 1
        if not _finite(norm) or norm <= MIN_GRAD_NORM:
            raise _Fallback
        buffers = self._save_grads(buffers)
        self._clip_and_step(norm)
        return loss, norm, buffers

    def _save_grads(self, buffers: list[torch.Tensor] | None) -> list[torch.Tensor]:
        grads = [p.grad.detach() for p in self.params]
        if buffers is None:
            return [g.to(_work_dtype(g.dtype), copy=True) for g in grads]  # fp32 at least
        torch._foreach_copy_(buffers, grads)
        return buffers

    def _extrapolate(self, closure: Closure, info: StepInfo, snapshot) -> float:
        """Passes 1-3 and the reposition; returns the statistic the gate should see."""
        loss0, n0, self._g0 = self._probe(closure, info, self._g0)   # theta0 -> theta1
        _loss1, n1, self._g1 = self._probe(closure, info, self._g1)   # theta1 -> theta2
        c0, c1 = self._clip_scale(n0), self._clip_scale(n1)
        self._jump_to_extrapolated_point(info, c0, c1)                # theta2 -> theta~
        info.g0_norm, info.g1_norm = n0, n1
        if snapshot is not None:
            self._restore_optimizer(snapshot)
        if self.skip_corrective:
            info.loss, info.grad_norm = loss0, n1
            return n1
        loss_s, n_s = self._backward(closure)                          # corrective pass at theta~
        info.backward_passes += 1
        if not _finite(n_s):
            raise _Fallback
        info.cos_g0_gslow = _cosine(self._g0, [p.grad for p in self.params])
        self._clip_and_step(n_s)
        info.loss, info.grad_norm, info.gslow_norm = loss_s, n_s, n_s
        return n_s

    @torch.no_grad()
    def _jump_to_extrapolated_point(self, info: StepInfo, c0: float, c1: float) -> None:
        """Per coordinate: r, q; write theta~ = theta0 + alpha q (theta2 - theta0); fill the diagnostics."""
        ratio_scale = (c1 / c0) if self.retention == "clip_corrected" else 1.0
        sums = _Sums()
        for p, theta0, g0, g1 in zip(self.params, self._theta0, self._g0, self._g1):
            active = active_mask(g0, self.delta)
            raw = raw_retention_ratio(g0, g1, self.delta) * ratio_scale
            clipped = raw.clamp(*self.r_clamp)
            finite = torch.isfinite(raw)
            r = torch.where(finite, clipped, torch.ones_like(raw))
            q = torch.where(active, geometric_scale(r, self.k, self.delta), torch.ones_like(r))
            work = _work_dtype(p.dtype)
            disp2 = p.detach().to(work) - theta0.to(work)
            p.copy_(reposition(theta0, p.detach(), q, self.alpha))
            sums.add(active=active, r=r, q=q, disp2=disp2, theta0=theta0, g0=g0, g1=g1,
                     bound=active & (~finite | (clipped != raw)))
        sums.fill(info, self.alpha)


class _Sums:
    """Accumulates GXPO's per-tensor diagnostics as 0-dim tensors, read out with one device sync."""

    KEYS = ("numel", "active", "bound", "r_sum", "r_sq", "q_sum", "q_max", "disp2_sq", "dispK_sq",
            "theta_sq", "g0g1", "g0_sq", "g1_sq")

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.KEYS}

    def add(self, active, r, q, disp2, theta0, g0, g1, bound) -> None:
        ra = torch.where(active, r, torch.zeros_like(r))
        for key, value in (
            ("numel", torch.tensor(float(r.numel()), device=r.device)),
            ("active", active.sum().float()), ("bound", bound.sum().float()),
            ("r_sum", ra.sum()), ("r_sq", (ra * ra).sum()), ("q_sum", q.sum()), ("q_max", q.max()),
            ("disp2_sq", (disp2 * disp2).sum()), ("dispK_sq", ((q * disp2) ** 2).sum()),
            ("theta_sq", theta0.float().pow(2).sum()), ("g0g1", (g0 * g1).sum()),
            ("g0_sq", (g0 * g0).sum()), ("g1_sq", (g1 * g1).sum()),
        ):
            self.parts[key].append(value.to(torch.float64))

    def fill(self, info: StepInfo, alpha: float) -> None:
        total = {k: (torch.stack(v).max() if k == "q_max" else torch.stack(v).sum()).item()
                 for k, v in self.parts.items()}
        n, n_active = total["numel"], total["active"]
        info.inactive_frac = 1.0 - n_active / n
        if n_active > 0:
            info.r_mean = total["r_sum"] / n_active
            info.r_std = max(0.0, total["r_sq"] / n_active - info.r_mean**2) ** 0.5
            info.ratio_clip_frac = total["bound"] / n_active
        info.scale_mean = total["q_sum"] / n
        info.scale_max = total["q_max"]
        info.effective_multiplier = alpha * info.scale_mean
        info.disp2_norm = total["disp2_sq"] ** 0.5
        info.dispK_norm = total["dispK_sq"] ** 0.5
        info.jump_norm = alpha * info.dispK_norm
        info.param_norm = total["theta_sq"] ** 0.5
        denominator = (total["g0_sq"] * total["g1_sq"]) ** 0.5
        info.cos_g0_g1 = total["g0g1"] / denominator if denominator > 0 else None


class SFPO(_GatedRule):
    """Slow-fast policy optimization (the strongest peer; spec section 4): K+1 backward passes.

    Save theta0; K plain steps on the same mini-batch; theta' = theta0 + alpha (theta_K - theta0);
    one more plain step at theta'. The optimizer state is never touched.

    Args:
        optimizer: any torch optimizer.
        k: number of fast steps K (>= 2).
        alpha: scalar reposition factor (> 0).
        max_grad_norm: global-norm clip (None = no clipping).
        gate: "official" (SFPO's entropy z-score over a window of 30, threshold 1.0, permanent;
            the caller passes the entropy as ``gate_signal=``), "default" (a ShutoffGate built from the
            keywords), a ready ShutoffGate, or None (never shut off).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        k: int = 3,
        alpha: float = 0.8,
        max_grad_norm: float | None = 1.0,
        gate: ShutoffGate | None | str = "official",
        **gate_settings: Any,
    ):
        self.k = check_int("k", k, minimum=2)
        self.alpha = check_positive("alpha", alpha)
        if gate == "official" and not gate_settings:
            gate = sfpo_official_gate()
        super().__init__(optimizer, max_grad_norm, _make_gate(gate, gate_settings))
        self._theta0: list[torch.Tensor] | None = None

    _BUFFERS = ("_theta0",)

    @property
    def backward_passes_per_step(self) -> int:  # while active
        return self.k + 1

    def settings(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm, "k": self.k, "alpha": self.alpha}

    def step(self, closure: Closure, gate_signal: float | None = None) -> StepInfo:
        self._check_signal(gate_signal)
        info = self._new_info()
        if not self._gate_allows():
            return self._finish(self._plain_step(closure, info))
        self._theta0 = self._save_params(self._theta0)
        for _ in range(self.k):                                        # the fast trajectory
            _loss, norm = self._backward(closure)
            info.backward_passes += 1
            if not _finite(norm):
                return self._finish(self._fallback(closure, info, None))
            self._clip_and_step(norm)
            info.g0_norm = norm if info.g0_norm is None else info.g0_norm
        with torch.no_grad():                                          # theta' = theta0 + alpha (theta_K - theta0)
            disp_sq = 0.0
            for p, theta0 in zip(self.params, self._theta0):
                disp_sq += float((p.detach().float() - theta0.float()).pow(2).sum())
                p.copy_(reposition(theta0, p.detach(), 1.0, self.alpha))
        info.disp2_norm = info.dispK_norm = disp_sq**0.5
        info.jump_norm = self.alpha * info.dispK_norm
        info.effective_multiplier = self.alpha
        self._plain_step(closure, info)                                # the slow correction
        if info.skipped:
            return self._finish(info)
        info.active, info.gslow_norm = True, info.grad_norm
        self._feed_gate(info, info.grad_norm, gate_signal)
        return self._finish(info)




def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float | None:
    """Cosine between two lists of tensors seen as one flat vector."""
    dot = sum((x.float() * y.float()).sum() for x, y in zip(a, b))
    na = sum(x.float().pow(2).sum() for x in a) ** 0.5
    nb = sum(y.float().pow(2).sum() for y in b) ** 0.5
    denominator = float(na * nb)
    return float(dot) / denominator if denominator > 0 else None


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision parameters, their own dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def _finite(x: float) -> bool:
    return x == x and x not in (float("inf"), float("-inf"))


def _none_if_nan(x: float) -> float | None:
    return None if x != x else x


def _to_float(loss: Any) -> float | None:
    if loss is None:
        return None
    return float(loss.detach()) if torch.is_tensor(loss) else float(loss)
