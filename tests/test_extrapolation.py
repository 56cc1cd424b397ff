"""The pure extrapolation math: retention ratio, geometric scale (Horner), clamps, reposition."""

import math

import pytest
import torch

from gxpo_lib.core.extrapolation import (
    geometric_scale,
    geometric_sum,
    max_scale,
    optimizer_direction,
    reposition,
    retention,
    retention_ratio,
)


def closed_form_sum(r: float, n: int) -> float:
    return (1 - r**n) / (1 - r)


@pytest.mark.parametrize("r", [-1.7, -0.5, 0.0, 0.3, 0.999, 2.5])
@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_horner_matches_closed_form_away_from_one(r, n):
    value = geometric_sum(torch.tensor([r], dtype=torch.float64), n).item()
    assert value == pytest.approx(closed_form_sum(r, n), rel=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_horner_is_exact_at_r_equal_one_where_the_closed_form_breaks(k):
    one = torch.tensor([1.0], dtype=torch.float64)
    assert geometric_sum(one, k).item() == k
    # The closed form with the authors' safe denominator maps r = 1 to 0 (official_code_notes pitfall 6).
    assert (1 - 1.0**k) / (1 - 1.0 + 1e-8) == 0.0
    assert geometric_scale(one, k).item() == pytest.approx(k / 2)


def test_retention_ratio_clamps_and_handles_inactive_and_nonfinite():
    g0 = torch.tensor([2.0, 1.0, 1.0, 0.0, 1e-9, 1.0, 0.0], dtype=torch.float64)
    g1 = torch.tensor([1.0, 5.0, -7.0, 3.0, 1.0, float("nan"), float("inf")], dtype=torch.float64)
    r = retention_ratio(g0, g1, r_clamp=(-2.0, 3.0))
    assert r.tolist() == [0.5, 3.0, -2.0, 1.0, 1.0, 1.0, 1.0]
    r_wide = retention_ratio(g0, g1, r_clamp=(-10.0, 10.0))
    assert r_wide[:3].tolist() == [0.5, 5.0, -7.0]


def test_geometric_scale_clamps_as_the_notes_illustrate():
    # official_code_notes section 4 clamp illustrations.
    r3 = torch.tensor([3.0], dtype=torch.float64)
    assert geometric_scale(r3, 5, clamp=False).item() == pytest.approx(30.25)
    assert geometric_scale(r3, 5).item() == 3.5
    rm2 = torch.tensor([-2.0], dtype=torch.float64)
    assert geometric_scale(rm2, 10, clamp=False).item() == pytest.approx(341.0)
    assert geometric_scale(rm2, 10).item() == 6.0
    assert geometric_scale(rm2, 5, clamp=False).item() == pytest.approx(-11.0)
    assert geometric_scale(rm2, 5).item() == 1.0
    assert max_scale(10) == 6.0


def test_geometric_scale_guards_s2_zero_and_k2_is_identity():
    minus_one = torch.tensor([-1.0], dtype=torch.float64)
    assert geometric_scale(minus_one, 5).item() == 1.0  # S_2 = 0 -> q = 1
    r = torch.linspace(-2, 3, 51, dtype=torch.float64)
    assert torch.equal(geometric_scale(r, 2), torch.ones_like(r))


def test_scale_in_unit_interval_never_hits_clamp():
    r = torch.linspace(0, 0.999, 200, dtype=torch.float64)
    for k in (3, 5, 10):
        raw = geometric_scale(r, k, clamp=False)
        assert torch.equal(raw, geometric_scale(r, k))
        assert raw.min() >= 1 - 1e-12 and raw.max() <= k / 2 + 1e-12


def test_reposition_formula_and_dtype():
    theta0 = torch.tensor([4.0, 2.0], dtype=torch.bfloat16)
    theta2 = torch.tensor([1.0, 0.5], dtype=torch.bfloat16)
    out = reposition(theta0, theta2, torch.tensor([1.25, 1.25]), alpha=1.0)
    assert out.dtype == torch.bfloat16
    assert out.float().tolist() == [0.25, 0.125]
    assert math.isclose(reposition(torch.tensor(4.0), torch.tensor(1.0), 1.0, 0.5).item(), 2.5)


# -- the one retention function -------------------------------------------------------------------------
def test_retention_returns_r_raw_and_the_clamped_mask_and_sends_inf_to_the_bounds():
    # The authors clamp first and then map NaN to 1, so +-inf land on the clamp bounds (notes' errata).
    g0 = torch.tensor([2.0, 1.0, 1.0, 0.0, 1.0, 1e-7, -1e-7], dtype=torch.float64)
    g1 = torch.tensor([1.0, 5.0, float("nan"), 3.0, -7.0, 1e302, 1e302], dtype=torch.float64)
    r, raw, clamped = retention(g0, g1)
    assert r.tolist() == [0.5, 3.0, 1.0, 1.0, -2.0, 3.0, -2.0]
    assert raw[:2].tolist() == [0.5, 5.0] and math.isnan(raw[2]) and raw[5] == math.inf and raw[6] == -math.inf
    assert clamped.tolist() == [False, True, True, False, True, True, True]
    # V1: every coordinate, sign(g0) max(|g0|, delta) as the denominator
    r_all, _, clamped_all = retention(g0, g1, active="all")
    assert r_all[3] == 3.0 and clamped_all[3]          # 3 / 1e-8, clamped
    mask = torch.tensor([True, False, True, True, True, True, True])
    assert retention(g0, g1, active=mask)[0][1] == 1.0  # a caller's mask (V5's relative threshold)
    with pytest.raises(ValueError, match="^active="):
        retention(g0, g1, active="some")


def test_clip_corrected_scales_the_ratio():
    g0, g1 = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.5, 1.0], dtype=torch.float64)
    assert retention(g0, g1, scales=(0.5, 1.0))[0].tolist() == [1.0, 1.0]


def test_closed_form_scale_of_v1_and_the_point_r_minus_one():
    r = torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64)
    closed = geometric_scale(r, 4, form="closed", clamp=False)
    assert closed[0] == 0.0                                      # (1 - 1^K) / (1 - 1 + delta) = 0
    assert closed[1].item() == pytest.approx(1.25)               # agrees away from r = 1 and r = -1
    assert geometric_scale(r, 4, form="closed")[0] == 1.0        # clamped up to 1
    # Horner: q(1) = K/2. At exactly r = -1 with even K, q is 1 while its neighbours are K/2.
    assert geometric_scale(r, 4)[0] == 2.0
    near = torch.tensor([-1.0 - 1e-6, -1.0, -1.0 + 1e-6], dtype=torch.float64)
    assert geometric_scale(near, 4).tolist() == pytest.approx([2.0, 1.0, 2.0], abs=1e-5)
    with pytest.raises(ValueError, match="^form="):
        geometric_scale(r, 4, form="sum")


def test_optimizer_direction_recovers_adamw_direction_and_sgd_gradient():
    x = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    optimizer = torch.optim.AdamW([x], lr=3e-3, weight_decay=0.04)
    for scale in (1.0, 0.3, 4.0):
        before = x.detach().clone()
        x.grad = scale * torch.randn(8, dtype=torch.float64)
        optimizer.step()
    state = optimizer.state[x]
    step = float(state["step"])
    textbook = (state["exp_avg"] / (1 - 0.9**step)) / ((state["exp_avg_sq"] / (1 - 0.999**step)).sqrt() + 1e-8)
    d = optimizer_direction(before, x.detach(), 3e-3, 1 - 3e-3 * 0.04)
    torch.testing.assert_close(d, textbook, rtol=1e-10, atol=0)

    y = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    y.grad = torch.randn(4, dtype=torch.float64)
    before = y.detach().clone()
    torch.optim.SGD([y], lr=0.1).step()
    torch.testing.assert_close(optimizer_direction(before, y.detach(), 0.1), y.grad, rtol=1e-12, atol=1e-12)
