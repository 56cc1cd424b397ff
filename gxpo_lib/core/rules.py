"""Update rules: PlainStep (GRPO's one pass) and GXPO (two probes, extrapolate, correct); SFPO is in `sfpo`.

Each rule wraps any ``torch.optim.Optimizer`` and is driven like ``optimizer.step(closure)``:

    rule = GXPO(torch.optim.AdamW(params, lr=1e-6), k=5, alpha=0.5, tau=0.5, max_grad_norm=1.0)
    info = rule.step(closure)        # closure(): forward + loss.backward(); returns the loss
    rule = GXPO.from_version("v5", optimizer, k=10, alpha=0.3)   # every option as the authors' V5 code

The rule zeroes gradients itself before every ``closure()`` call and returns a `StepInfo` record
(docs/algorithm.md). A pass whose gradient is not finite never reaches the parameters (fallback).
The extrapolation's work buffers are flat (`extrapolation.FlatLayout`): one vector per (device, dtype)
of the trainable parameters, so its arithmetic runs over a few long chunks, not one tensor at a time
(`flat_jump`: the chunk arithmetic and the `JumpSums` diagnostics). Read `reference.gxpo_step` first: the
same step per tensor in ~25 lines, tested equal to this one. FSDP2-sharded (DTensor) parameters work too:
the math runs on each rank's local shard and the global sums are all-reduced (`distributed`), so every rank
gets the same StepInfo and gate decisions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gxpo_lib.choices import (
    ACTIVE_SETS,
    GATE_STATISTICS,
    OPTIMIZER_STATE_MODES,
    Q_MODES,
    R_CLAMP,
    RETENTION_MODES,
    SCALE_FORMS,
    VANISHING_PROBE,
    VERSIONS,
)
from gxpo_lib.core.distributed import local, reducer_for, restore_optimizer, snapshot_optimizer, square_sum
from gxpo_lib.core.extrapolation import (
    DELTA,
    RELATIVE_ACTIVITY,
    FlatLayout,
    geometric_scale,
    optimizer_direction,
    retention,
)
from gxpo_lib.core.flat_jump import SUMMED, JumpSums, Scratch, chunk_totals, masked_scale, reposition_into
from gxpo_lib.core.gate import GATE_SETTINGS, ShutoffGate
from gxpo_lib.validation import check_choice, check_int, check_interval, check_optional_positive, check_positive

Closure = Callable[[], torch.Tensor]
MIN_GRAD_NORM = 1e-8  # a probe gradient at or below this norm is "vanishing"


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
    # What the step did to the parameters (every rule): ||theta_{t+1} - theta_t||; GXPO also reports one
    # plain step from theta0 (||theta1 - theta0||, the first probe) and its corrective step (||theta_{t+1} - theta~||).
    update_norm: float | None = None
    probe_step_norm: float | None = None
    corrective_norm: float | None = None

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
        self.reducer = reducer_for(self.params)  # None: plain tensors; else FSDP2 shards (`distributed`)
        self.num_steps = 0
        self.total_backward_passes = 0

    def _local_params(self) -> list[torch.Tensor]:
        """The trainable parameters, or each rank's local shard of them (detached views) when sharded."""
        return self.params if self.reducer is None else [local(p) for p in self.params]

    def _grads(self) -> list[torch.Tensor]:
        """The live gradients (local shards when sharded), one per trainable parameter."""
        return [p.grad if self.reducer is None else local(p.grad) for p in self.params]

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
        if self.reducer is not None:  # sharded: the squared local sums, all-reduced with the loss
            grads = self._grads()
            return self.reducer.pass_totals(_to_float(loss), square_sum(grads, grads[0].device))
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
            torch._foreach_mul_(self._grads(), scale)
        self.optimizer.step()

    def _plain_step(self, closure: Closure, info: StepInfo) -> StepInfo:
        """GRPO's update: one pass, clip, optimizer step; a non-finite gradient skips the step.

        `info.update_norm` is measured against a transient copy of the parameters taken before the step.
        """
        loss, norm = self._backward(closure)
        info.backward_passes += 1
        info.loss, info.grad_norm = loss, norm
        if _finite(norm):
            before = self.snapshot_params()
            self._clip_and_step(norm)
            info.update_norm = self.distance_from(before)
        else:
            self.optimizer.zero_grad(set_to_none=False)
            info.skipped, info.update_norm = True, 0.0
        return info

    def snapshot_params(self) -> list[torch.Tensor]:
        """A detached copy of the trainable parameters, in their own dtypes (one batched call)."""
        return torch._foreach_mul([p.detach() for p in self._local_params()], 1.0)

    @torch.no_grad()
    def distance_from(self, reference: Sequence[torch.Tensor]) -> float:
        """||theta - reference|| over the trainable parameters, each difference taken in at least float32
        and summed in float64 (one device sync). `reference`: one tensor per parameter, same shapes."""
        total = None
        for p, ref in zip(self._local_params(), reference):
            work = _work_dtype(p.dtype)
            square = (p.detach().to(work) - ref.to(work)).pow(2).sum(dtype=torch.float64)
            total = square if total is None else total + square.to(total.device)
        return float(total if self.reducer is None else self.reducer.sum_float(total, total.device)) ** 0.5

    def _new_info(self) -> StepInfo:
        self.num_steps += 1
        return StepInfo(step=self.num_steps)

    # -- optimizer snapshots -----------------------------------------------------------------------
    def _snapshot_optimizer(self) -> dict[torch.Tensor, dict[str, Any]]:
        """A bit-exact copy of the optimizer's per-parameter state (`distributed.snapshot_optimizer`)."""
        return snapshot_optimizer(self.optimizer)

    def _restore_optimizer(self, snapshot: dict[torch.Tensor, dict[str, Any]]) -> None:
        """Put the optimizer state back exactly as snapshotted (state created since is dropped)."""
        restore_optimizer(self.optimizer, snapshot)

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
        self._flat: FlatLayout | None = None
        self._views: dict[str, list[torch.Tensor]] = {}

    _BUFFERS: tuple[str, ...] = ()  # the names of the extrapolation's parameter-sized work buffers

    def _gate_allows(self) -> bool:
        """Does this step extrapolate? While it does not, the work buffers are freed (a gate that re-opens
        gets them allocated again), so a shut-off rule holds no more memory than a PlainStep."""
        allowed = True if self.gate is None else self.gate.begin_step()
        if not allowed:
            for name in self._BUFFERS:
                setattr(self, name, None)
            self._views = {}
        return allowed

    @property
    def buffer_bytes(self) -> int:
        """Bytes held by the work buffers (GXPO: theta0, g0, g1; SFPO: theta0); 0 after a shut-off."""
        return sum(t.numel() * t.element_size() for name in self._BUFFERS for t in (getattr(self, name) or ()))

    def _buffer(self, name: str, work: bool) -> list[torch.Tensor]:
        """The flat work buffer `name` (allocated on first use, rebuilt if the parameters were replaced)."""
        params = self._local_params()
        if self._flat is None or self._flat.key != FlatLayout.key_of(params):
            self._flat = FlatLayout(params, numels=[p.numel() for p in self.params])
            for other in self._BUFFERS:
                setattr(self, other, None)
            self._views = {}
        if getattr(self, name) is None:
            setattr(self, name, self._flat.allocate(work))
            self._views[name] = self._flat.views(getattr(self, name), params)
        return self._views[name]

    def _save_params(self, name: str) -> None:
        """Copy the live parameters into the flat buffer `name` (their own dtype)."""
        torch._foreach_copy_(self._buffer(name, work=False), [p.detach() for p in self._local_params()])

    def _load_params(self, name: str) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self._local_params(), self._views[name])

    def _reduced_rows(self, rows: list[torch.Tensor], q_max: list[torch.Tensor] | None, width: int) -> list[float]:
        """The chunk rows ([width] float64 each) summed over every chunk of every rank, then (unless q_max
        is None) the max of q_max over them all: [width (+ 1)] floats."""
        device = self._grads()[0].device
        total = torch.stack(rows).sum(0).to(device) if rows else torch.zeros(width, dtype=torch.float64, device=device)
        if q_max is None:
            return self.reducer.sum(total).tolist()
        peak = torch.stack(q_max).max().view(1).to(device) if q_max else \
            torch.full((1,), -math.inf, dtype=torch.float64, device=device)
        return self.reducer.sum(total).tolist() + self.reducer.max(peak).tolist()

    def _feed_gate(self, info: StepInfo, grad_norm_signal: float, gate_signal: float | None) -> None:
        """Give the gate this step's statistic (the caller's entropy when its signal is "entropy")."""
        if self.gate is None:
            return
        value = gate_signal if self.gate.signal == "entropy" else grad_norm_signal
        if self.reducer is not None and self.gate.signal == "entropy":  # the caller's value may differ per rank
            value = self.reducer.mean_float(value, self._grads()[0].device)
        info.gate_z = _none_if_nan(self.gate.observe(value, step=self.num_steps))

    def _check_signal(self, gate_signal: float | None) -> None:
        if self.gate is not None and self.gate.signal == "entropy" and gate_signal is None:
            raise ValueError("gate_signal=None is invalid: this gate's signal is 'entropy', so pass the "
                             "policy entropy as rule.step(closure, gate_signal=...) (or use gate=None)")

    def _fallback(self, closure: Closure, info: StepInfo, snapshot) -> StepInfo:
        """Undo the step's partial work (parameters, and the optimizer state if snapshotted); one plain step."""
        self._load_params("_theta0")
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
    """Gradient-extrapolation policy optimization (docs/algorithm.md): 3 backward passes per active step.

    Args:
        optimizer: any torch optimizer.
        k: lookahead horizon K (>= 2).
        alpha: fraction of the way to the predicted K-step point (> 0).
        max_grad_norm: global-norm clip C (None = no clipping).
        r_clamp: the stability clamp (r_min, r_max) on the retention ratio.
        delta: activity threshold on |g0| (``active_set="absolute"``) and guard on |S_2|.
        optimizer_state: "carry" (V1-V4: the probe steps' moment updates stay) or "transactional"
            (V5: the optimizer state is restored before the corrective step).
        retention: "grad" (r = g1/g0), "clip_corrected" (r = c1 g1 / c0 g0, the gradients the optimizer
            actually used; V1 and V5's gradient path) or "update" (V5: r = d1/d0, the directions the
            optimizer actually stepped along, d_t = ((1 - lr wd) theta_t - theta_{t+1}) / lr with the
            decoupled weight decay of AdamW removed; for SGD without weight decay it is clip_corrected).
        active_set: which coordinates extrapolate: "absolute" (|x0| > delta, V2-V4), "relative"
            (|x0| > 1e-3 RMS(x0) of each tensor, V5) or "all" (V1: every coordinate, divided by
            sign(x0) max(|x0|, delta)); x0 is g0, or d0 for ``retention="update"``.
        scale_form: "horner" (V2 and later; q(1) = K/2) or "closed" (V1's closed form; q(1) = 1).
        q_clamp: clamp q to [1, K/2 + 1] (V1, V3 and later); V2 does not, so q can reverse the jump.
        gate_statistic: what the grad-norm gate sees: "pre_clip" (V2 and later) or "post_clip" (V1: the
            clipped corrective norm, which saturates at max_grad_norm).
        vanishing_probe: the second probe gradient's norm is <= 1e-8 (e.g. every token PPO-clipped at
            theta1): "continue" (the authors: r = 0, q = 1, theta~ = theta0 + alpha (theta2 - theta0)) or
            "fallback" (restore theta0, one plain step). A vanishing first probe always falls back.
        skip_corrective: ablation: stop at theta~ (2 backward passes); the gate then watches g1's norm.
        q_mode: "per_coordinate" (the authors: each coordinate jumps by its own q) or "scalar" (a control
            of ours, not in the authors' code: every coordinate jumps by one q-bar, the mean of q over the
            active coordinates, theta~ = theta0 + alpha q-bar (theta2 - theta0); same three passes, so it
            separates the per-coordinate geometry from a bigger step).
        gate: "default" (a ShutoffGate from the keywords below), a ready ShutoffGate, or None (never
            shut off).
        **gate_settings: tau, omega, warmup, patience, mode, window, signal, permanent, reopen_after,
            init, two_sided, freeze_baseline, window_includes_current.
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
        active_set: str = "absolute",
        scale_form: str = "horner",
        q_clamp: bool = True,
        gate_statistic: str = "pre_clip",
        vanishing_probe: str = "continue",
        skip_corrective: bool = False,
        q_mode: str = "per_coordinate",
        gate: ShutoffGate | None | str = "default",
        **gate_settings: Any,
    ):
        self.k = check_int("k", k, minimum=2)
        self.alpha = check_positive("alpha", alpha)
        self.r_clamp = check_interval("r_clamp", r_clamp)
        self.delta = check_positive("delta", delta)
        self.optimizer_state = check_choice("optimizer_state", optimizer_state, OPTIMIZER_STATE_MODES)
        self.retention = check_choice("retention", retention, RETENTION_MODES)
        self.active_set = check_choice("active_set", active_set, ACTIVE_SETS)
        self.scale_form = check_choice("scale_form", scale_form, SCALE_FORMS)
        self.q_clamp = _check_bool("q_clamp", q_clamp)
        self.gate_statistic = check_choice("gate_statistic", gate_statistic, GATE_STATISTICS)
        self.vanishing_probe = check_choice("vanishing_probe", vanishing_probe, VANISHING_PROBE)
        self.skip_corrective = _check_bool("skip_corrective", skip_corrective)
        self.q_mode = check_choice("q_mode", q_mode, Q_MODES)
        super().__init__(optimizer, max_grad_norm, _make_gate(gate, gate_settings))
        # theta0 and two probe slots: 3 P-sized flat buffers (g1 holds theta1 for retention="update")
        self._theta0: list[torch.Tensor] | None = None
        self._g0: list[torch.Tensor] | None = None
        self._g1: list[torch.Tensor] | None = None

    _BUFFERS = ("_theta0", "_g0", "_g1")

    @classmethod
    def from_version(cls, version: str, optimizer: torch.optim.Optimizer, **overrides: Any) -> GXPO:
        """A GXPO whose every option behaves as version `version` ("v1", "v2", "v3", "v5") of the
        authors' code (`VERSIONS`; docs/versions.md); `overrides` (k, alpha, tau, ...) win."""
        preset = copy.deepcopy(VERSIONS[check_choice("version", version, tuple(VERSIONS))])
        gate_preset = preset.pop("gate")
        gate_over = {k: v for k, v in overrides.items() if k in GATE_SETTINGS}
        rule_over = {k: v for k, v in overrides.items() if k not in GATE_SETTINGS}
        if rule_over.get("gate", "default") != "default":
            return cls(optimizer, **(preset | rule_over), **gate_over)
        return cls(optimizer, **(preset | rule_over), **(gate_preset | gate_over))

    @property
    def backward_passes_per_step(self) -> int:  # while active
        return 2 if self.skip_corrective else 3

    # -- settings ----------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm, "k": self.k, "alpha": self.alpha,
                "r_clamp": list(self.r_clamp), "delta": self.delta,
                "optimizer_state": self.optimizer_state, "retention": self.retention,
                "active_set": self.active_set, "scale_form": self.scale_form, "q_clamp": self.q_clamp,
                "gate_statistic": self.gate_statistic, "vanishing_probe": self.vanishing_probe,
                "skip_corrective": self.skip_corrective, "q_mode": self.q_mode}

    # -- the step ----------------------------------------------------------------------------------
    def step(self, closure: Closure, gate_signal: float | None = None) -> StepInfo:
        """One mini-batch update. `gate_signal`: the caller's statistic for an entropy-signal gate."""
        self._check_signal(gate_signal)
        info = self._new_info()
        if not self._gate_allows():
            return self._finish(self._plain_step(closure, info))
        self._save_params("_theta0")
        snapshot = self._snapshot_optimizer() if self.optimizer_state == "transactional" else None
        try:
            gate_value = self._extrapolate(closure, info, snapshot)
        except _Fallback:
            return self._finish(self._fallback(closure, info, snapshot))
        info.active = True
        self._feed_gate(info, gate_value, gate_signal)
        return self._finish(info)

    def _probe(self, closure: Closure, info: StepInfo, slot: str | None, first: bool) -> tuple[float, float]:
        """One probe pass: backward, keep the raw gradient in `slot`, check it, clip, optimizer step."""
        loss, norm = self._backward(closure)
        info.backward_passes += 1
        vanishing = norm <= MIN_GRAD_NORM and (first or self.vanishing_probe == "fallback")
        if not _finite(norm) or vanishing:
            raise _Fallback
        if slot is not None:
            torch._foreach_copy_(self._buffer(slot, work=True), [g.detach() for g in self._grads()])
        self._clip_and_step(norm)
        return loss, norm

    def _extrapolate(self, closure: Closure, info: StepInfo, snapshot) -> float:
        """Passes 1-3 and the reposition; returns the statistic the gate should see."""
        update = self.retention == "update"
        loss0, n0 = self._probe(closure, info, "_g0", first=True)     # theta0 -> theta1
        info.probe_step_norm = self.distance_from(self._views["_theta0"])  # one plain step from theta0
        steps = [self._step_constants()]
        if update:                                                     # keep theta1 in the g1 slot
            torch._foreach_copy_(self._buffer("_g1", work=True), [p.detach() for p in self._local_params()])
        _loss1, n1 = self._probe(closure, info, None if update else "_g1", first=False)   # theta1 -> theta2
        steps.append(self._step_constants())
        c0, c1 = self._clip_scale(n0), self._clip_scale(n1)
        self._jump(info, c0, c1, steps)                                # theta2 -> theta~
        info.g0_norm, info.g1_norm = n0, n1
        if snapshot is not None:
            self._restore_optimizer(snapshot)
        if self.skip_corrective:
            info.loss, info.grad_norm = loss0, n1
            info.update_norm = self.distance_from(self._views["_theta0"])
            return n1 * (c1 if self.gate_statistic == "post_clip" else 1.0)
        loss_s, n_s = self._backward(closure)                          # corrective pass at theta~
        info.backward_passes += 1
        if not _finite(n_s):
            raise _Fallback
        info.cos_g0_gslow = self._cos_g0_gslow(n_s)
        torch._foreach_copy_(self._views["_g1"], [p.detach() for p in self._local_params()])  # keep theta~ (g1 free)
        self._clip_and_step(n_s)
        info.corrective_norm = self.distance_from(self._views["_g1"])
        info.update_norm = self.distance_from(self._views["_theta0"])
        info.loss, info.grad_norm, info.gslow_norm = loss_s, n_s, n_s
        return n_s * (self._clip_scale(n_s) if self.gate_statistic == "post_clip" else 1.0)

    def _step_constants(self) -> tuple[list[float], list[float]]:
        """Per parameter: the step's lr and weight-decay factor 1 - lr wd (decoupled decay only: AdamW)."""
        lrs, decays, adamw = [], [], isinstance(self.optimizer, torch.optim.AdamW)
        for group in self.optimizer.param_groups:
            lr, n = float(group.get("lr", 0.0)), sum(1 for p in group["params"] if p.requires_grad)
            decoupled = adamw or group.get("decoupled_weight_decay", False)
            lrs += [lr] * n
            decays += [1.0 - lr * float(group.get("weight_decay", 0.0)) if decoupled else 1.0] * n
        return lrs, decays

    def _cos_g0_gslow(self, n_s: float) -> float | None:
        """cos(g0, g_slow): the corrective gradient is copied into the (now free) g1 slot, one dot per group."""
        torch._foreach_copy_(self._buffer("_g1", work=True), [g.detach() for g in self._grads()])
        dot = sum(float(torch.dot(a, b)) for a, b in zip(self._g0, self._g1))
        if self.reducer is not None:
            dot = self.reducer.sum_float(dot, self._g0[0].device)
        denominator = self._g0_norm * n_s
        return dot / denominator if denominator > 0 else None

    @torch.no_grad()
    def _jump(self, info: StepInfo, c0: float, c1: float, steps) -> None:
        """Per coordinate, chunk by chunk: r, q (`flat_jump`); theta~ = theta0 + alpha q (theta2 - theta0) is
        written into the parameters. The chunks' sums stay on the device until one read at the end
        (`JumpSums`). With ``q_mode="scalar"`` a first pass finds q-bar (the mean q over active coordinates)
        and every coordinate jumps by it."""
        flat, update, alpha = self._flat, self.retention == "update", self.alpha
        context, scratch = self._retention_context(c0, c1, steps), Scratch(flat, _work_dtype)
        q_bar = self._mean_active_q(context, scratch) if self.q_mode == "scalar" else None
        rows, counts, q_max = [], [], []
        for c, (g, start, end, segments) in enumerate(flat.chunks):
            x1, _active, r, q, n_active, clamped = self._chunk_scale(c, context, scratch)
            if q_bar is not None:
                q.fill_(q_bar)
            # theta~ = t0 + (alpha q) disp2 into the parameters (in place where theta2 is a view of one);
            # disp2 and jump stay in two free scratch buffers for the sums; `free` (the mask's buffer, no longer
            # needed) holds theta2 and then theta~ where the chunk spans several parameters
            free, jump, disp2, _, _ = scratch.take(g, end - start)
            theta0, theta2 = self._theta0[g][start:end], flat.gather(c, out=free)
            t0 = theta0.to(_work_dtype(theta0.dtype))
            in_place = len(segments) == 1 and t0.dtype == theta0.dtype
            reposition_into(t0, theta2, q, alpha, disp2, jump, theta2 if in_place else free)
            if not in_place:
                flat.scatter(c, free.to(theta0.dtype))
            # the chunk's sums ([9], or [7] for retention="update": device scalars) and its two counts
            g0 = self._g0[g][start:end]
            probes = () if update else (torch.dot(g0, x1), torch.dot(x1, x1))
            rows.append(torch.stack([r.sum(), torch.dot(r, r), q.sum(), torch.dot(disp2, disp2),
                                     torch.dot(jump, jump) / alpha**2, torch.dot(t0, t0), torch.dot(g0, g0),
                                     *probes]).to(torch.float64))
            counts.append(torch.stack([n_active.to(torch.float64), clamped.to(torch.float64)]))
            q_max.append(q.max().to(torch.float64))
        r_inactive = min(max(1.0, self.r_clamp[0]), self.r_clamp[1])  # what retention gives an inactive one
        lengths = [end - start for _, start, end, _ in flat.chunks]
        totals = chunk_totals(rows, counts, lengths, r_inactive) if rows else None
        if self.reducer is not None:  # sharded: sum the totals, max q_max over ranks (a rank may hold nothing)
            self._fill(info, JumpSums(*self._reduced_rows([totals] if rows else [], q_max, SUMMED)), update)
            return
        self._fill(info, JumpSums(*torch.cat([totals, torch.stack(q_max).max().view(1)]).tolist()), update)

    def _retention_context(self, c0: float, c1: float, steps) -> dict[str, Any]:
        """What every chunk's r and q need: the clip scales, the step constants, V5's relative thresholds."""
        return {"scales": (c0, c1) if self.retention == "clip_corrected" else (1.0, 1.0), "steps": steps,
                "thresholds": self._relative_thresholds(steps) if self.active_set == "relative" else None}

    def _chunk_scale(self, c: int, context: dict[str, Any], scratch: Scratch, keep_mask: bool = False):
        """Chunk c's (x1, active, r, q, n_active, clamped) from the probes: active a 0/1 mask [n] (None: every
        coordinate, or not kept: `keep_mask`), q = 1 where inactive, the counts 0-dim. `flat_jump.masked_scale`
        in scratch buffers, or `retention` and `geometric_scale` themselves for active_set="all" and
        scale_form="closed" (V1)."""
        g, start, end, _ = self._flat.chunks[c]
        x0, x1 = self._probe_values(c, g, start, end, context["steps"]) if self.retention == "update" else \
            (self._g0[g][start:end], self._g1[g][start:end])
        thresholds = context["thresholds"]
        threshold = self.delta if thresholds is None else self._flat.per_coordinate(c, thresholds, x0)
        if self.active_set != "all" and self.scale_form == "horner":
            return x1, *masked_scale(x0, x1, threshold, self.r_clamp, self.k, self.delta, context["scales"],
                                     self.q_clamp, scratch.take(g, end - start), keep_mask)
        active = "all" if self.active_set == "all" else x0.abs() > threshold
        r, _raw, bound = retention(x0, x1, self.r_clamp, self.delta, active=active, scales=context["scales"])
        q = geometric_scale(r, self.k, self.delta, clamp=self.q_clamp, form=self.scale_form)
        if isinstance(active, str):
            n = torch.tensor(float(end - start), dtype=torch.float64, device=q.device)
            return x1, None, r, q, n, bound.sum()
        return x1, active.to(q.dtype), r, torch.where(active, q, 1.0), active.sum(), bound.sum()

    def _mean_active_q(self, context: dict[str, Any], scratch: Scratch) -> float:
        """q-bar for ``q_mode="scalar"``: the mean of q over the active coordinates (1 when none is)."""
        total, count = [], []
        for c in range(len(self._flat.chunks)):
            _x1, active, _r, q, n_active, _clamped = self._chunk_scale(c, context, scratch, keep_mask=True)
            total.append((q if active is None else q.mul_(active)).sum(dtype=torch.float64))
            count.append(n_active.to(torch.float64))
        if self.reducer is not None:  # sharded: [sum q, count] over every rank (a rank may hold nothing)
            total_q, n_active = self._reduced_rows([torch.stack([t, c]) for t, c in zip(total, count)], None, 2)
            return total_q / n_active if n_active > 0 else 1.0
        total_q, n_active = (float(torch.stack([t.to(total[0].device) for t in ts]).sum()) for ts in (total, count))
        return total_q / n_active if n_active > 0 else 1.0

    def _probe_values(self, c: int, g: int, start: int, end: int, steps) -> tuple[torch.Tensor, torch.Tensor]:
        """retention="update": the two optimizer directions d0, d1 on chunk c (theta1 is in the g1 slot;
        a parameter whose lr is 0 has no direction: d0 = 0 makes it inactive)."""
        flat, theta1 = self._flat, self._g1[g][start:end]
        theta0, theta2 = self._theta0[g][start:end].to(theta1.dtype), flat.gather(c).to(theta1.dtype)
        directions = []
        for (lrs, decays), before, after in zip(steps, (theta0, theta1), (theta1, theta2)):
            lr, decay = flat.per_coordinate(c, lrs, theta1), flat.per_coordinate(c, decays, theta1)
            if torch.is_tensor(lr):  # parameters with different learning rates share this chunk
                d = optimizer_direction(before, after, torch.where(lr == 0, 1.0, lr), decay)
                directions.append(torch.where(lr == 0, 0.0, d))
            else:
                directions.append(optimizer_direction(before, after, lr, decay) if lr != 0
                                  else torch.zeros_like(before))
        return directions[0], directions[1]

    def _relative_thresholds(self, steps) -> torch.Tensor:
        """V5's activity threshold per parameter tensor: 1e-3 * RMS(x0) (x0 = g0, or d0), shape [n_params]."""
        update = self.retention == "update"
        return RELATIVE_ACTIVITY * self._flat.rms_per_param(
            lambda c, g, start, end: self._probe_values(c, g, start, end, steps)[0] if update
            else self._g0[g][start:end], reduce=None if self.reducer is None else self.reducer.sum)

    def _fill(self, info: StepInfo, sums: JumpSums, update: bool) -> None:
        """The step record's diagnostics from the jump's sums (`_jump`)."""
        info.inactive_frac = 1.0 - sums.n_active / sums.n
        if sums.n_active > 0:
            info.r_mean = sums.r_sum / sums.n_active
            info.r_std = max(0.0, sums.r_sq / sums.n_active - info.r_mean**2) ** 0.5
            info.ratio_clip_frac = sums.clamped / sums.n_active
        info.scale_mean = sums.q_sum / sums.n
        info.scale_max = sums.q_max
        info.effective_multiplier = self.alpha * info.scale_mean
        info.disp2_norm, info.dispK_norm = sums.disp2_sq**0.5, sums.dispk_sq**0.5
        info.param_norm = sums.theta_sq**0.5
        info.jump_norm = self.alpha * info.dispK_norm
        self._g0_norm = sums.g0_sq**0.5
        denominator = (sums.g0_sq * sums.g1_sq) ** 0.5
        info.cos_g0_g1 = sums.g0g1 / denominator if denominator > 0 and not update else None


def _check_bool(name: str, value: Any) -> bool:
    if value not in (True, False):
        raise ValueError(f"{name}={value!r} is invalid: allowed True or False")
    return bool(value)


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
