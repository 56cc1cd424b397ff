"""The arithmetic of GXPO's flat-buffer jump on one chunk: few passes over preallocated buffers.

`rules.GXPO._jump` walks the chunks of an `extrapolation.FlatLayout` and calls `masked_scale` on each. It
computes exactly what `extrapolation.retention` then `geometric_scale` compute, bit for bit
(tests/test_rules.py checks it against the per-tensor loop, tests/test_reference_step.py against
`reference.gxpo_step`), but:

  * activity is a 0/1 float mask, and ``where(active, x, 1)`` is ``x * active + inactive``: exact for a finite
    x (x * 1 + 0 = x, x * 0 + 1 = 1) and several times cheaper on a CPU than the boolean kernels (where,
    masked_fill, a bool sum);
  * every intermediate lives in five chunk-sized `Scratch` buffers allocated once per jump (a fresh temporary
    per operation costs a CPU a page fault every 4 KiB);
  * S_2's guard (|1 + r| <= delta gives q = 1) is skipped where it cannot change anything: below half the
    dtype's epsilon only r = -1 is that close, and there S_K / 0 is +-inf or nan, which become 1 anyway.

The per-chunk sums behind the diagnostics stay on the device; `JumpSums` names them after the one read.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

EXACT_FLOAT32_COUNT = 1 << 24  # a float32 sum of 0/1 values is an exact count below this many elements
BLOCK = 1 << 16  # elements per block of elementwise work on a CPU (`blocks`)


class JumpSums(NamedTuple):
    """The jump's diagnostics: sums over every coordinate (every chunk, and every rank when sharded), q's max.

    r is the retention ratio, q the per-coordinate scale (1 on inactive coordinates); g0, g1 the probe slots.
    """

    n: float  # coordinates
    n_active: float  # coordinates that extrapolate
    clamped: float  # active coordinates whose r the clamp (or the NaN rule) changed
    r_sum: float  # sum of r over the active coordinates
    r_sq: float  # sum of r^2 over the active coordinates
    q_sum: float  # sum of q over every coordinate
    disp2_sq: float  # ||theta2 - theta0||^2
    dispk_sq: float  # ||q (theta2 - theta0)||^2 = ||jump||^2 / alpha^2
    theta_sq: float  # ||theta0||^2
    g0_sq: float  # ||g0||^2
    g0g1: float  # g0 . g1 (retention="update": g0 . g0, unused)
    g1_sq: float  # ||g1||^2 (retention="update": ||g0||^2, unused)
    q_max: float  # max of q


SUMMED = len(JumpSums._fields) - 1  # every field but q_max is summed over chunks and ranks


class Scratch:
    """Five work buffers as long as the longest chunk of each (device, work dtype) group of a layout.

    `take(group, n)` gives views [n] of them: (active, inactive, raw, r, q) in `masked_scale`'s use.
    """

    def __init__(self, layout, work_dtype) -> None:
        longest: dict[int, int] = {}
        for g, start, end, _ in layout.chunks:
            longest[g] = max(longest.get(g, 0), end - start)
        self.buffers = {g: [torch.empty(n, device=layout.groups[g][0], dtype=work_dtype(layout.groups[g][1]))
                            for _ in range(5)] for g, n in longest.items()}

    def take(self, group: int, n: int) -> list[torch.Tensor]:
        return [b[:n] for b in self.buffers[group]]


def count(mask: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """How many coordinates are 1 in a 0/1 float mask [n] (in both masks with `other` [n]), a 0-dim tensor
    without a device sync; float32 is exact below 2^24 elements, longer chunks count in float64."""
    if mask.numel() < EXACT_FLOAT32_COUNT:
        return mask.sum() if other is None else torch.dot(mask, other)
    return (mask if other is None else mask * other).sum(dtype=torch.float64)


def masked_scale(x0: torch.Tensor, x1: torch.Tensor, threshold: float | torch.Tensor,
                 r_clamp: tuple[float, float], k: int, delta: float, scales: tuple[float, float], clamp: bool,
                 out: list[torch.Tensor], keep_mask: bool = True):
    """r and q of one chunk: `retention` (with an activity threshold), then `geometric_scale` (Horner form),
    then q = 1 on the inactive coordinates; on a CPU block by block (`blocks`).

    Args:
        x0, x1: the probes on the chunk, [n] in the work dtype (g0, g1; or d0, d1 for retention="update").
        threshold: active iff |x0| > threshold: a float, or a tensor [n] or 0-dim (V5's relative set).
        scales: (s0, s1), the clip factors of retention="clip_corrected" ((1, 1) otherwise).
        out: five [n] work buffers (`Scratch.take`); the results live in them.
        keep_mask: keep the whole mask in out[0]; without it the three per-block buffers (mask, its complement,
            the raw ratio) reuse their first block, which then stays in the cache, and active is None.
    Returns:
        (active, r, q, n_active, clamped): active [n] 0/1 (or None); r [n] as `retention` gives it (inactive coordinates
        included); q [n] (1 where inactive); n_active and clamped: 0-dim float64 counts (no device sync).
    """
    counts = []
    for a, b in blocks(x0):
        part = threshold[a:b] if torch.is_tensor(threshold) and threshold.dim() else threshold
        views = [out[0][a:b] if keep_mask else out[0][:b - a], out[1][:b - a], out[2][:b - a], out[3][a:b], out[4][a:b]]
        counts += _scale_block(x0[a:b], x1[a:b], part, r_clamp, k, delta, scales, clamp, views)
    n_active, clamped = torch.stack(counts).view(-1, 2).to(torch.float64).sum(0)
    return out[0] if keep_mask else None, out[3], out[4], n_active, clamped


def blocks(x: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of the blocks elementwise work on x [n] runs in: BLOCK elements on a CPU, where a
    block's operands and temporaries then stay in the L2 cache; elsewhere all of x (fewer kernel launches)."""
    step = BLOCK if x.device.type == "cpu" else max(1, x.numel())
    return [(a, min(a + step, x.numel())) for a in range(0, x.numel(), step)]


def reposition_into(t0: torch.Tensor, theta2: torch.Tensor, q: torch.Tensor, alpha: float,
                    disp2: torch.Tensor, jump: torch.Tensor, target: torch.Tensor) -> None:
    """target = t0 + (alpha q) (theta2 - t0), as `extrapolation.reposition` computes it, block by block; all
    [n], t0 in the work dtype. disp2 and jump keep theta2 - t0 and (alpha q) (theta2 - t0) for the sums."""
    for a, b in blocks(t0):
        torch.sub(theta2[a:b].to(t0.dtype), t0[a:b], out=disp2[a:b])
        torch.mul(q[a:b], alpha, out=jump[a:b]).mul_(disp2[a:b])
        torch.add(t0[a:b], jump[a:b], out=target[a:b])


def _scale_block(x0: torch.Tensor, x1: torch.Tensor, threshold: float | torch.Tensor,
                 r_clamp: tuple[float, float], k: int, delta: float, scales: tuple[float, float], clamp: bool,
                 out: list[torch.Tensor]) -> list[torch.Tensor]:
    """`masked_scale` on one block (all [m]); returns its two counts [n_active, clamped] (0-dim each)."""
    active, inactive, raw, r, q = out
    # activity as 0/1 floats, and a divisor that is x0 where active and 1 elsewhere
    torch.gt(torch.abs(x0, out=active), threshold, out=active)
    torch.eq(active, 0.0, out=inactive)
    torch.addcmul(inactive, x0, active, out=raw)
    # raw = where(active, (x1 / x0) (s1 / s0), 1); r = its clamp; count what the clamp changed; NaN -> 1
    torch.addcmul(inactive, torch.div(x1, raw, out=raw), active, out=raw)
    if scales != (1.0, 1.0):  # the clip factors scale the active ratios; an inactive one stays 1
        torch.addcmul(inactive, raw, active, value=scales[1] / scales[0], out=raw)
    torch.clamp(raw, r_clamp[0], r_clamp[1], out=r)
    clamped = count(torch.ne(r, raw, out=raw), active)
    r.nan_to_num_(nan=1.0)
    # q = S_K(r) / S_2(r) by Horner's rule; 1 where |S_2| <= delta or q is not finite; clamped to [1, K/2 + 1]
    s_2 = torch.add(r, 1.0, out=raw)
    if k == 2:
        q.copy_(s_2)
    else:  # the first Horner step out of place, q = s_2 r + 1: the bits of q = s_2 then q = q r + 1
        torch.mul(s_2, r, out=q).add_(1.0)
    for _ in range(k - 3):
        q.mul_(r).add_(1.0)
    q.div_(s_2)
    if delta >= torch.finfo(q.dtype).eps / 2:  # |S_2| <= delta holds off r = -1 too: q = 1 there
        defined = torch.gt(s_2.abs_(), delta, out=s_2)
        q.mul_(defined).add_(defined.neg_().add_(1.0))
    q.nan_to_num_(nan=1.0, posinf=1.0, neginf=1.0)
    if clamp:
        q.clamp_(1.0, k / 2 + 1)
    torch.addcmul(inactive, q, active, out=q)
    return [count(active), clamped]


def chunk_totals(rows: list[torch.Tensor], counts: list[torch.Tensor], lengths: list[int],
                 r_inactive: float) -> torch.Tensor:
    """The first `SUMMED` fields of `JumpSums` [12] (float64, on the device), summed over the chunks.

    Args:
        rows: per chunk [9] float64: r.sum(), r.r, q.sum(), disp2.disp2, jump.jump / alpha^2, t0.t0, g0.g0,
            g0.x1, x1.x1 ([7] without the last two for retention="update": g0.g0 stands in for them).
        counts: per chunk [2] float64: (n_active, clamped).
        lengths: each chunk's coordinates.
        r_inactive: the r that `retention` gives an inactive coordinate, taken out of r's two sums.
    """
    stats, count = torch.stack(rows), torch.stack(counts)  # [chunks, 9 or 7], [chunks, 2]
    if stats.shape[1] == 7:
        stats = torch.cat([stats, stats[:, 6:], stats[:, 6:]], 1)
    n = torch.tensor([float(length) for length in lengths], dtype=torch.float64, device=stats.device)
    idle = n - count[:, 0]
    table = torch.stack([n, count[:, 0], count[:, 1], stats[:, 0] - idle * r_inactive,
                         stats[:, 1] - idle * r_inactive**2, *stats[:, 2:].unbind(1)], 1)
    return table.sum(0)
