"""The pure extrapolation math: retention ratio, geometric scale (Horner), clamps, reposition."""

import math

import pytest
import torch

from gxpo_lib.extrapolation import geometric_scale, geometric_sum, max_scale, reposition, retention_ratio


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
