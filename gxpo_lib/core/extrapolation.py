"""The pure math of GXPO's extrapolation (docs/algorithm.md), on plain tensors.

For plain gradient descent on a separable quadratic every gradient coordinate shrinks by a constant
factor per step, r = g1 / g0 (the *retention ratio*). Summing that geometric series predicts where K
steps would land from where two steps landed:

    theta_K - theta_0 = (theta_2 - theta_0) * S_K(r) / S_2(r),    S_n(r) = 1 + r + ... + r^(n-1)

`retention` is r (with its clamp), `geometric_scale` is the factor q, `reposition` moves part of the
way (alpha) to the predicted point, `optimizer_direction` is the step an optimizer actually took (the
authors' V5 "update" retention divides two of them instead of two gradients). Everything here is
elementwise and works on tensors of any shape; the rules, the toy and the notebooks all call it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from gxpo_lib.choices import R_CLAMP, SCALE_FORMS

DELTA = 1e-8
"""A coordinate is *active* iff |g0| > DELTA; also the guard on |S_2|."""
RELATIVE_ACTIVITY = 1e-3
"""V5's relative activity threshold: active iff |g0| > RELATIVE_ACTIVITY * RMS(g0 of that tensor)."""
CHUNK_MIN, CHUNKS_MAX = 1 << 18, 64  # flat chunks: >= 262k elements, <= 64 per (device, dtype) group


def active_mask(g0: torch.Tensor, delta: float = DELTA) -> torch.Tensor:
    """Coordinates whose first gradient is large enough to divide by. [*] -> bool [*]."""
    return g0.abs() > delta


def retention(
    x0: torch.Tensor,
    x1: torch.Tensor,
    r_clamp: tuple[float, float] = R_CLAMP,
    delta: float = DELTA,
    active: torch.Tensor | str | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The retention ratio r = (s1 x1) / (s0 x0) per coordinate: the one implementation every caller uses.

    x0, x1 are the two probe gradients (or, for ``retention="update"``, the two optimizer directions);
    s0, s1 the clip factors for ``clip_corrected`` (1 otherwise). As in every version of the authors'
    code the raw ratio is clamped to r_clamp first and a NaN then becomes 1, so +inf lands on r_max and
    -inf on r_min.

    Args:
        x0, x1: same shape [*].
        r_clamp: (r_min, r_max).
        delta: the absolute activity threshold (|x0| > delta) when `active` is None.
        active: None (|x0| > delta), a bool mask [*] (e.g. V5's relative threshold), or "all" (V1: every
            coordinate, divided by sign(x0) max(|s0 x0|, delta), with sign(0) = +1).
        scales: (s0, s1).
    Returns:
        (r, raw, clamped): r [*] (1 on inactive coordinates), raw [*] the unclamped ratio (1 on inactive
        coordinates; may be +-inf or nan), clamped bool [*] the active coordinates the clamp or the NaN
        rule changed.
    """
    s0, s1 = scales
    if isinstance(active, str):
        if active != "all":
            raise ValueError(f"active={active!r} is invalid: allowed None, a bool mask or 'all'")
        scaled = x0 * s0 if s0 != 1.0 else x0
        sign = torch.where(scaled >= 0, 1.0, -1.0).to(scaled.dtype)
        raw = (x1 * s1 if s1 != 1.0 else x1) / (scaled.abs().clamp(min=delta) * sign)
        active = torch.ones_like(raw, dtype=torch.bool)
    else:
        active = active_mask(x0, delta) if active is None else active
        raw = torch.where(active, x1 / x0, 1.0)  # an inactive 0/0 is computed, then discarded
        if (s0, s1) != (1.0, 1.0):  # the clip factors scale the active ratios; an inactive one stays 1
            raw = torch.where(active, raw * (s1 / s0), raw)
    r = raw.clamp(r_clamp[0], r_clamp[1])
    clamped = r != raw
    clamped &= active
    return r.nan_to_num_(nan=1.0), raw, clamped


def retention_ratio(
    g0: torch.Tensor,
    g1: torch.Tensor,
    r_clamp: tuple[float, float] = R_CLAMP,
    delta: float = DELTA,
) -> torch.Tensor:
    """Per-coordinate retention ratio r = g1 / g0, clamped to r_clamp: ``retention(g0, g1, ...)[0]``.

    Inactive coordinates (|g0| <= delta) and NaN ratios get r = 1. [*] -> [*], dtype of g1.
    """
    return retention(g0, g1, r_clamp, delta)[0]


def geometric_sum(r: torch.Tensor, n: int) -> torch.Tensor:
    """S_n(r) = 1 + r + ... + r^(n-1) by Horner's rule (exact at r = 1, unlike (1-r^n)/(1-r)). [*] -> [*]."""
    if n == 1:
        return torch.ones_like(r)
    total = r + 1.0  # the first step of Horner's rule, 1 * r + 1
    for _ in range(n - 2):
        total.mul_(r).add_(1.0)
    return total


def max_scale(k: int) -> float:
    """Upper clamp of q: K/2 + 1 (q = K/2 exactly at r = +-1 for even K)."""
    return k / 2 + 1


def geometric_scale(r: torch.Tensor, k: int, delta: float = DELTA, clamp: bool = True,
                    form: str = "horner") -> torch.Tensor:
    """q = S_K(r) / S_2(r): how much further K steps go than 2 steps, per coordinate.

    ``form="horner"`` (V2 and later): where |S_2| <= delta (r = -1) or q is non-finite, q = 1. Note
    the isolated point: for even K, q(r) -> K/2 as r -> -1, but q(-1) itself is 1 (S_2 = 0 there).
    ``form="closed"`` (V1): S_K = (1 - r^K)/(1 - r + delta), S_2 = (1 - r^2)/(1 - r + delta),
    q = S_K/(S_2 + delta); it maps r = 1 to q = 0 (clamped to 1) instead of K/2.
    With `clamp` (V1, V3 and later) q is clamped to [1, K/2 + 1]; V2 does not clamp, so q can be
    30.25 at r = 3, K = 5, or -11 at r = -2 (reversing the jump).

    Args:
        r: retention ratios, shape [*].
        k: lookahead horizon K >= 2.
    Returns:
        q, shape [*].
    """
    if form == "closed":
        one_minus_r = 1.0 - r
        s_k = (1.0 - r.pow(k)) / (one_minus_r + delta)
        s_2 = (1.0 - r * r) / (one_minus_r + delta)
        q = s_k / (s_2 + delta)
    elif form == "horner":
        s_2 = r + 1.0
        q = torch.where(s_2.abs() > delta, geometric_sum(r, k).div_(s_2), 1.0)
        q.nan_to_num_(nan=1.0, posinf=1.0, neginf=1.0)
    else:
        raise ValueError(f"form={form!r} is invalid: allowed {list(SCALE_FORMS)}")
    if clamp:
        q = q.clamp_(1.0, max_scale(k))
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


def optimizer_direction(theta_t: torch.Tensor, theta_next: torch.Tensor, lr: torch.Tensor | float,
                        decay: torch.Tensor | float = 1.0) -> torch.Tensor:
    """d_t = (decay * theta_t - theta_{t+1}) / lr: the direction an optimizer step actually took.

    For AdamW, theta_{t+1} = (1 - lr wd) theta_t - lr d_t, so decay = 1 - lr * wd removes the decoupled
    weight decay and d_t is the preconditioned (and clipped) moment direction; for SGD without weight
    decay d_t is the clipped gradient (the authors' V5 ``GXPO_OPTIMIZER_AWARE_RETENTION.md``). [*] -> [*].
    """
    return (decay * theta_t - theta_next) / lr


class FlatLayout:
    """The trainable parameters laid end to end: one flat vector per (device, dtype), cut into chunks.

    A work buffer is a list of flat tensors (one per group); `views` gives one view per parameter into
    it, so copying every parameter or gradient is one ``torch._foreach_copy_``. A chunk is
    (group, start, end, segments), a segment (parameter index, start, end) inside that parameter.
    Chunks are long (>= CHUNK_MIN elements, at most CHUNKS_MAX per group), so the per-coordinate math
    costs a few dozen tensor ops however many parameter tensors there are, and its temporaries stay
    below a chunk each.
    """

    def __init__(self, params: list[torch.Tensor], numels: Sequence[int] | None = None):
        """params: the (local) tensors laid out; numels: each parameter's full element count, the divisor
        of `rms_per_param` (default: the tensors' own; FSDP2 passes the unsharded counts)."""
        for i, p in enumerate(params):
            if not p.is_contiguous():
                raise ValueError(f"parameter {i} (shape {tuple(p.shape)}) is not contiguous: allowed only "
                                 "contiguous parameters (call .contiguous() on it before building the optimizer)")
        self.key = self.key_of(params)
        self.numels = [p.numel() for p in params] if numels is None else [int(n) for n in numels]
        by_group: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_group.setdefault((p.device, p.dtype), []).append(i)
        self.groups = [(device, dtype, idx) for (device, dtype), idx in by_group.items()]
        self.offsets: dict[int, tuple[int, int]] = {}  # parameter index -> (group, offset)
        self.sizes: list[int] = []
        self.chunks: list[tuple[int, int, int, list[tuple[int, int, int]]]] = []
        for g, (_, _, idx) in enumerate(self.groups):
            offset = 0
            for i in idx:
                self.offsets[i] = (g, offset)
                offset += params[i].numel()
            self.sizes.append(offset)
            step = max(CHUNK_MIN, math.ceil(offset / CHUNKS_MAX))
            for start in range(0, offset, step):
                end = min(offset, start + step)
                segments = [(i, max(start, o) - o, min(end, o + params[i].numel()) - o)
                            for i in idx for o in (self.offsets[i][1],) if o < end and o + params[i].numel() > start]
                self.chunks.append((g, start, end, segments))
        # parameter slices of every chunk (written in place by `scatter`) and their lengths
        self.slices = [[params[i].detach().view(-1)[a:b] for i, a, b in segs] for _, _, _, segs in self.chunks]
        self.lengths = [[b - a for _, a, b in segs] for _, _, _, segs in self.chunks]

    @staticmethod
    def key_of(params: list[torch.Tensor]) -> tuple:
        """What the layout depends on: a parameter replaced or moved makes the cached layout stale."""
        return tuple((p.data_ptr(), p.dtype, p.device, p.shape) for p in params)

    def allocate(self, work: bool) -> list[torch.Tensor]:
        """Empty flat buffers, one per group: in the parameters' dtype, or float32+ with `work`."""
        return [torch.empty(n, device=device, dtype=torch.promote_types(dtype, torch.float32) if work else dtype)
                for n, (device, dtype, _) in zip(self.sizes, self.groups)]

    def views(self, flats: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """One view per parameter (its shape) into the flat buffers."""
        out = []
        for i, p in enumerate(params):
            g, offset = self.offsets[i]
            out.append(flats[g][offset:offset + p.numel()].view(p.shape))
        return out

    def gather(self, c: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The live parameter values of chunk c, flat (a view when the chunk lies in one parameter); `out`: a
        buffer at least as long to copy them into (converted to its dtype) instead of a new tensor."""
        parts = self.slices[c]
        if len(parts) == 1 or out is None:
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        out = out[:sum(self.lengths[c])]
        torch._foreach_copy_(list(out.split(self.lengths[c])), parts)
        return out

    def scatter(self, c: int, values: torch.Tensor) -> None:
        """Write chunk c's flat values into the live parameters."""
        parts = self.slices[c]
        if len(parts) == 1:
            parts[0].copy_(values)
        else:
            torch._foreach_copy_(parts, list(values.split(self.lengths[c])))

    def per_coordinate(self, c: int, per_param: Sequence[float] | torch.Tensor,
                       like: torch.Tensor) -> torch.Tensor | float:
        """A per-parameter number (a list, or a tensor [n_params]) spread over chunk c's coordinates [n];
        a float (or 0-dim tensor) when the chunk lies in one parameter or its parameters agree."""
        index = [i for i, _, _ in self.chunks[c][3]]
        if torch.is_tensor(per_param):
            values = per_param[index[0]] if len(index) == 1 else per_param[torch.tensor(index)]
        else:
            values = [per_param[i] for i in index]
            if all(v == values[0] for v in values):
                return values[0]
            values = torch.tensor(values, dtype=like.dtype, device=like.device)
        values = values.to(device=like.device, dtype=like.dtype)
        if values.dim() == 0:
            return values
        return values.repeat_interleave(torch.tensor(self.lengths[c], device=like.device))

    def rms_per_param(self, values: Callable[[int, int, int, int], torch.Tensor],
                      reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Root mean square of each parameter's share of a chunked quantity, shape [n_params] (float64).

        `values(c, group, start, end)` gives the quantity on chunk c ([end - start]); one pass, no sync.
        `reduce`: sums the per-parameter squared sums [n_params] over the shards (FSDP2: an all-reduce)."""
        n = len(self.offsets)
        device = self.slices[0][0].device if self.chunks else self.groups[0][0]
        sums = torch.zeros(n, dtype=torch.float64, device=device)
        for c, (g, start, end, segments) in enumerate(self.chunks):
            x = values(c, g, start, end)
            per_segment = torch.segment_reduce((x * x).to(torch.float64), "sum",
                                               lengths=torch.tensor(self.lengths[c], device=x.device))
            sums.index_add_(0, torch.tensor([i for i, _, _ in segments], device=device), per_segment.to(device))
        if reduce is not None:
            sums = reduce(sums)
        return (sums / torch.tensor(self.numels, dtype=torch.float64, device=device)).sqrt()
