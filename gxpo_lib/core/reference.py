"""GXPO's step as plain code: what `rules.GXPO` computes, one parameter tensor at a time.

Read this first. `rules.GXPO` does the same arithmetic over flat work buffers (fewer, longer kernels) and adds
what a training run needs around it: fallbacks for non-finite gradients, the shutoff gate, the authors' other
versions, diagnostics. `tests/test_reference_step.py` checks that both give the same parameters.

    loss = gxpo_step(params, optimizer, closure, k=5, alpha=0.5)     # closure(): forward + backward
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gxpo_lib.core.extrapolation import DELTA, R_CLAMP, active_mask, geometric_scale, reposition, retention


def _pass_and_step(params: Sequence[torch.Tensor], optimizer, closure: Callable, max_grad_norm: float | None):
    """One backward pass and one optimizer step; returns (loss, the raw pre-clip gradients)."""
    optimizer.zero_grad(set_to_none=False)
    loss = closure()
    grads = [p.grad.detach().clone() for p in params]
    if max_grad_norm is not None:                              # clip to the global norm, as torch does
        norm = float(torch.nn.utils.get_total_norm(grads))
        torch._foreach_mul_([p.grad for p in params], min(1.0, max_grad_norm / (norm + 1e-6)))
    optimizer.step()
    return loss, grads


def gxpo_step(params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, closure: Callable,
              k: int = 5, alpha: float = 0.5, max_grad_norm: float | None = 1.0,
              r_clamp: tuple[float, float] = R_CLAMP, delta: float = DELTA, q_mode: str = "per_coordinate"):
    """One active GXPO step (the authors' V2 defaults, no gate, no fallback): two probes, the jump, the
    corrective step. `params`: the optimizer's trainable tensors. Returns the corrective pass's loss."""
    theta0 = [p.detach().clone() for p in params]
    _, g0 = _pass_and_step(params, optimizer, closure, max_grad_norm)    # probe 1: theta0 -> theta1
    _, g1 = _pass_and_step(params, optimizer, closure, max_grad_norm)    # probe 2: theta1 -> theta2
    with torch.no_grad():
        scales, actives = [], []
        for a, b in zip(g0, g1):
            r, _raw, _clamped = retention(a, b, r_clamp, delta)          # r = g1 / g0, clamped; 1 if |g0| <= delta
            actives.append(active_mask(a, delta))
            scales.append(torch.where(actives[-1], geometric_scale(r, k, delta), 1.0))  # q = S_K(r) / S_2(r)
        if q_mode == "scalar":                                           # one q-bar: the mean over active coords
            q_bar = sum(float(q[m].sum()) for q, m in zip(scales, actives)) / max(1, sum(int(m.sum()) for m in actives))
            scales = [torch.full_like(q, q_bar) for q in scales]
        for p, t0, q in zip(params, theta0, scales):                     # theta~ = theta0 + alpha q (theta2 - theta0)
            p.copy_(reposition(t0, p.detach(), q, alpha))
    loss, _ = _pass_and_step(params, optimizer, closure, max_grad_norm)  # the corrective step at theta~
    return loss
