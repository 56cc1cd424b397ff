"""The flat jump's fused chunk arithmetic (gxpo_lib.core.flat_jump) is extrapolation's retention -> geometric_scale,
bit for bit, on inputs chosen to hit every special case: inactive coordinates, clamped and infinite ratios,
r = -1 (S_2 = 0), thresholds per coordinate, blocks that cut the chunk."""

from __future__ import annotations

import pytest
import torch

from gxpo_lib import GXPO
from gxpo_lib.core import flat_jump
from gxpo_lib.core.extrapolation import geometric_scale, retention


def probes(dtype, n=997, seed=0):
    """x0, x1 [n] with zeros, tiny x0 (infinite ratios), exact r = -1 and r = 1, and r outside the clamp."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, generator=generator, dtype=dtype)
    x1 = x0 * (torch.rand(n, generator=generator, dtype=dtype) * 8 - 4)
    x0[::11] = 0.0
    x0[5::13] = 1e-30 if dtype == torch.float64 else 1e-38
    x1[7::17] = -x0[7::17]                                    # r = -1 exactly
    x1[3::19] = x0[3::19]                                     # r = 1 exactly
    return x0, x1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [7, 1 << 16])
@pytest.mark.parametrize("k,clamp,scales,relative", [(5, True, (1.0, 1.0), False), (4, False, (0.3, 0.7), False),
                                                     (10, True, (1.0, 1.0), True), (2, False, (1.0, 1.0), True)])
def test_masked_scale_is_retention_then_geometric_scale_bit_for_bit(dtype, block, k, clamp, scales, relative,
                                                                    monkeypatch):
    monkeypatch.setattr(flat_jump, "BLOCK", block)
    x0, x1 = probes(dtype)
    r_clamp, delta = (-1.5, 2.5), 1e-8
    threshold = (1e-3 * x0.abs().mean() * torch.rand(x0.shape, dtype=dtype)) if relative else delta
    active = x0.abs() > threshold
    r, _raw, clamped = retention(x0, x1, r_clamp, delta, active=active, scales=scales)
    q = torch.where(active, geometric_scale(r, k, delta, clamp=clamp), 1.0)
    out = [torch.empty_like(x0) for _ in range(5)]
    mask, r_new, q_new, n_active, n_clamped = flat_jump.masked_scale(x0, x1, threshold, r_clamp, k, delta, scales,
                                                                     clamp, out)
    assert torch.equal(r_new, r) and torch.equal(q_new, q)
    assert torch.equal(mask, active.to(dtype))
    assert (n_active.item(), n_clamped.item()) == (active.sum().item(), clamped.sum().item())
    assert 0 < n_clamped.item() < n_active.item() < x0.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [7, 1 << 16])
@pytest.mark.parametrize("k,clamp,scales", [(5, True, (1.0, 1.0)), (4, False, (0.3, 0.7)), (2, True, (1.0, 1.0))])
def test_masked_scale_without_keeping_the_mask_changes_no_bit(dtype, block, k, clamp, scales, monkeypatch):
    """keep_mask=False (the jump's use: mask, complement and raw ratio reuse their first block) gives the same r,
    q and counts, bit for bit, and no mask."""
    monkeypatch.setattr(flat_jump, "BLOCK", block)
    x0, x1 = probes(dtype)
    args = (x0, x1, 1e-8, (-1.5, 2.5), k, 1e-8, scales, clamp)
    kept = flat_jump.masked_scale(*args, [torch.empty_like(x0) for _ in range(5)])
    lean = flat_jump.masked_scale(*args, [torch.full_like(x0, float("nan")) for _ in range(5)], keep_mask=False)
    bits = torch.int32 if dtype == torch.float32 else torch.int64
    assert lean[0] is None
    assert all(torch.equal(a.view(bits), b.view(bits)) for a, b in zip(kept[1:3], lean[1:3]))
    assert [t.item() for t in kept[3:]] == [t.item() for t in lean[3:]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clip_corrected_leaves_inactive_coordinates_at_r_1_and_out_of_r_mean(dtype):
    """retention="clip_corrected" scales the active ratios by c1/c0; an inactive coordinate keeps r = 1 (the
    authors' rule), so r_mean and r_std are over the active coordinates only, whatever the clip does."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000, dtype=dtype))
    target, weight = torch.randn(1000, dtype=dtype), torch.ones(1000, dtype=dtype)
    weight[:300] = 0                                    # 300 coordinates with no gradient: inactive
    grads = []

    def closure():
        loss = 3 * (weight * (p - target) ** 2).sum()
        loss.backward()
        grads.append(p.grad.detach().clone())
        return loss

    rule = GXPO(torch.optim.SGD([p], lr=0.1), k=5, alpha=0.5, gate=None, max_grad_norm=0.5,
                retention="clip_corrected")
    info = rule.step(closure)
    g0, g1 = (g.double() for g in grads[:2])
    c0, c1 = (min(1.0, 0.5 / (float(g.norm()) + 1e-6)) for g in (g0, g1))   # clip_grad_norm_'s factors
    assert c1 / c0 != pytest.approx(1.0, abs=1e-4)      # the clip binds differently on the two probes
    r, _raw, _ = retention(g0, g1, scales=(c0, c1))
    active = g0.abs() > 1e-8
    assert active.sum() == 700 and torch.equal(r[~active], torch.ones(300, dtype=torch.float64))
    eps = torch.finfo(dtype).eps    # r from float32 probes carries a few float32 roundings per coordinate
    assert info.r_mean == pytest.approx(float(r[active].mean()), rel=50 * eps, abs=50 * eps)
    assert info.r_std == pytest.approx(float(r[active].std(unbiased=False)), rel=1e-3, abs=50 * eps)
    assert info.inactive_frac == pytest.approx(0.3)
