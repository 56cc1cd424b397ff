"""SFPO (slow-fast policy optimization, the strongest peer of GXPO): K fast steps, a scalar reposition, one slow step.

    rule = SFPO(torch.optim.AdamW(params, lr=1e-6), k=3, alpha=0.8)   # the official entropy gate
    info = rule.step(closure, gate_signal=entropy)

It shares `rules._GatedRule`'s plumbing (flat work buffers, the gate, fallbacks, the update measurement),
FSDP2 shards included (`distributed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from gxpo_lib.core.extrapolation import reposition
from gxpo_lib.core.gate import ShutoffGate, sfpo_official_gate
from gxpo_lib.core.rules import Closure, StepInfo, _finite, _GatedRule, _make_gate, _work_dtype
from gxpo_lib.validation import check_int, check_positive


class SFPO(_GatedRule):
    """Slow-fast policy optimization (the strongest peer; docs/algorithm.md): K+1 backward passes.

    Save theta0; K plain steps; theta' = theta0 + alpha (theta_K - theta0); one more plain step at
    theta'. The optimizer state is never touched. Two structures when a batch has m mini-batches:
    `step` (one closure: K+1 steps on that mini-batch, repeated per mini-batch by the caller) and
    `step_sweeps` (the official one: K full sweeps over all mini-batches, reposition, one more sweep).

    Args:
        optimizer: any torch optimizer.
        k: number of fast steps (or sweeps) K (>= 2).
        alpha: scalar reposition factor (> 0).
        max_grad_norm: global-norm clip (None = no clipping).
        gate: "official" (SFPO's entropy z-score over a window of 30, threshold 1.0, permanent;
            the caller passes the entropy as ``gate_signal=``), "default" (a ShutoffGate built from the
            keywords), a ready ShutoffGate, or None (never shut off).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 3, alpha: float = 0.8,
                 max_grad_norm: float | None = 1.0, gate: ShutoffGate | None | str = "official", **gate_settings: Any):
        self.k = check_int("k", k, minimum=2)
        self.alpha = check_positive("alpha", alpha)
        if gate == "official" and not gate_settings:
            gate = sfpo_official_gate()
        super().__init__(optimizer, max_grad_norm, _make_gate(gate, gate_settings))
        self._theta0: list[torch.Tensor] | None = None

    _BUFFERS = ("_theta0",)

    @property
    def backward_passes_per_step(self) -> int:  # while active, per mini-batch
        return self.k + 1

    def settings(self) -> dict[str, Any]:
        return {"max_grad_norm": self.max_grad_norm, "k": self.k, "alpha": self.alpha}

    def step(self, closure: Closure, gate_signal: float | None = None) -> StepInfo:
        """K fast steps, reposition and one slow step, all on this one mini-batch (closure)."""
        return self.step_sweeps([closure], gate_signal)

    def step_sweeps(self, closures: Sequence[Closure], gate_signal: float | None = None) -> StepInfo:
        """The official SFPO update of one batch of m mini-batches (one closure each): K sweeps of m
        plain steps, theta' = theta0 + alpha (theta_K - theta0), one more sweep: (K+1) m passes. The
        record's loss and grad_norm are the slow sweep's means; the gate gets one observation.
        With one closure this is `step`."""
        closures = list(closures)
        if not closures or not all(callable(c) for c in closures):
            raise ValueError(f"closures={closures!r} is invalid: allowed a non-empty list of closures")
        self._check_signal(gate_signal)
        info = self._new_info()
        if not self._gate_allows():
            return self._finish(self._sweep(closures, info))
        self._save_params("_theta0")
        for _ in range(self.k):                                        # the fast trajectory
            for closure in closures:
                _loss, norm = self._backward(closure)
                info.backward_passes += 1
                if not _finite(norm):
                    self._load_params("_theta0")
                    info.fallback = True
                    self._sweep(closures, info)
                    info.update_norm = self.distance_from(self._views["_theta0"])
                    return self._finish(info)
                self._clip_and_step(norm)
                info.g0_norm = norm if info.g0_norm is None else info.g0_norm
        self._reposition(info)                                         # theta' = theta0 + alpha (theta_K - theta0)
        self._sweep(closures, info)                                    # the slow correction
        info.update_norm = self.distance_from(self._views["_theta0"])
        if info.skipped:
            return self._finish(info)
        info.active, info.gslow_norm = True, info.grad_norm
        self._feed_gate(info, info.grad_norm, gate_signal)
        return self._finish(info)

    def _sweep(self, closures: list[Closure], info: StepInfo) -> StepInfo:
        """One plain step per mini-batch; loss and grad_norm: their means (skipped: any was skipped);
        update_norm: the whole sweep's."""
        losses, norms = [], []
        before = self.snapshot_params() if len(closures) > 1 else None
        for closure in closures:
            self._plain_step(closure, info)
            losses.append(info.loss)
            norms.append(info.grad_norm)
        if before is not None:
            info.update_norm = self.distance_from(before)
        info.grad_norm = sum(norms) / len(norms)
        info.loss = None if None in losses else sum(losses) / len(losses)
        return info

    @torch.no_grad()
    def _reposition(self, info: StepInfo) -> None:
        """theta' = theta0 + alpha (theta_K - theta0) chunk by chunk; the displacement norm in one sync."""
        flat, parts = self._flat, []
        for c, (g, start, end, _) in enumerate(flat.chunks):
            theta0, theta_k = self._theta0[g][start:end], flat.gather(c)
            work = _work_dtype(theta0.dtype)
            disp = theta_k.to(work) - theta0.to(work)
            parts.append((disp * disp).sum(dtype=torch.float64))
            flat.scatter(c, reposition(theta0, theta_k, 1.0, self.alpha))
        if self.reducer is None:
            total = float(torch.stack(parts).sum())
        else:  # sharded: the local sum (0 when this rank holds no coordinates) summed over the shards
            total = self._reduced_rows([p.view(1) for p in parts], None, 1)[0]
        info.disp2_norm = info.dispK_norm = total ** 0.5
        info.jump_norm = self.alpha * info.dispK_norm
        info.effective_multiplier = self.alpha
