"""The pure math of GXPO's extrapolation (spec section 2, steps 4-6), on plain tensors.

For plain gradient descent on a separable quadratic every gradient coordinate shrinks by a constant
factor per step, r = g1 / g0 (the *retention ratio*). Summing that geometric series predicts where K
steps would land from where two steps landed:

    theta_K - theta_0 = (theta_2 - theta_0) * S_K(r) / S_2(r),    S_n(r) = 1 + r + ... + r^(n-1)

`geometric_scale` is that factor q; `reposition` moves part of the way (alpha) to the predicted point.
Everything here is elementwise and works on tensors of any shape; notebooks call it directly to plot.
"""

from __future__ import annotations

import torch

R_CLAMP = (-2.0, 3.0)
"""Default stability clamp (r_min, r_max) of the retention ratio."""
DELTA = 1e-8
"""A coordinate is *active* iff |g0| > DELTA; also the guard on |S_2|."""


def active_mask(g0: torch.Tensor, delta: float = DELTA) -> torch.Tensor:
    """Coordinates whose first gradient is large enough to divide by. [*] -> bool [*]."""
    return g0.abs() > delta


def raw_retention_ratio(g0: torch.Tensor, g1: torch.Tensor, delta: float = DELTA) -> torch.Tensor:
    """g1 / g0 on active coordinates, 1 elsewhere; not clamped (may be +-inf or nan). [*] -> [*]."""
    active = active_mask(g0, delta)
    safe_g0 = torch.where(active, g0, torch.ones_like(g0))
    return torch.where(active, g1 / safe_g0, torch.ones_like(g1))


def retention_ratio(
    g0: torch.Tensor,
    g1: torch.Tensor,
    r_clamp: tuple[float, float] = R_CLAMP,
    delta: float = DELTA,
) -> torch.Tensor:
    """Per-coordinate retention ratio r = g1 / g0, clamped to r_clamp.

    Inactive coordinates (|g0| <= delta) and non-finite ratios get r = 1.

    Args:
        g0, g1: gradients at theta_0 and theta_1, same shape [*].
        r_clamp: (r_min, r_max), the stability clamp.
    Returns:
        r, shape [*], dtype of g1.
    """
    raw = raw_retention_ratio(g0, g1, delta)
    clamped = raw.clamp(r_clamp[0], r_clamp[1])
    return torch.where(torch.isfinite(raw), clamped, torch.ones_like(raw))


def geometric_sum(r: torch.Tensor, n: int) -> torch.Tensor:
    """S_n(r) = 1 + r + ... + r^(n-1) by Horner's rule (exact at r = 1, unlike (1-r^n)/(1-r)). [*] -> [*]."""
    total = torch.ones_like(r)
    for _ in range(n - 1):
        total = total * r + 1.0
    return total


def max_scale(k: int) -> float:
    """Upper clamp of q: K/2 + 1 (q = K/2 exactly at r = +-1 for even K)."""
    return k / 2 + 1


def geometric_scale(r: torch.Tensor, k: int, delta: float = DELTA, clamp: bool = True) -> torch.Tensor:
    """q = S_K(r) / S_2(r): how much further K steps go than 2 steps, per coordinate.

    Where |S_2| <= delta (r = -1) or q is non-finite, q = 1. With `clamp` (the rule's behaviour) q is
    clamped to [1, K/2 + 1]; `clamp=False` shows the raw curve for plotting.

    Args:
        r: retention ratios, shape [*].
        k: lookahead horizon K >= 2.
    Returns:
        q, shape [*].
    """
    s_k = geometric_sum(r, k)
    s_2 = 1.0 + r
    defined = s_2.abs() > delta
    q = torch.where(defined, s_k / torch.where(defined, s_2, torch.ones_like(s_2)), torch.ones_like(r))
    q = torch.where(torch.isfinite(q), q, torch.ones_like(q))
    if clamp:
        q = q.clamp(1.0, max_scale(k))
    return q


def reposition(
    theta0: torch.Tensor, theta2: torch.Tensor, q: torch.Tensor | float, alpha: float
) -> torch.Tensor:
    """theta~ = theta0 + alpha * q * (theta2 - theta0): jump alpha of the way to the predicted K-step point.

    Computed in float32 (or float64 if the inputs are) and returned in theta0's dtype. [*] -> [*].
    """
    work = torch.promote_types(theta0.dtype, torch.float32)
    t0 = theta0.to(work)
    return (t0 + alpha * q * (theta2.to(work) - t0)).to(theta0.dtype)
