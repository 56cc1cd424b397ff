"""How big is one update? `update_norm` for every rule, GXPO's (1 + alpha q r (1 + r)) relation, scalar q.

On a separable quadratic L = 1/2 sum_i h_i (theta_i - theta*_i)^2 with plain SGD (lr eta, no clipping) every
probe multiplies a gradient coordinate by r_i = 1 - eta h_i, so one active GXPO step moves coordinate i by

    theta_new - theta0 = (1 + alpha q_i r_i (1 + r_i)) * (-eta g0_i)          (exact)

i.e. by 1 + 2 alpha q_i plain steps in the limit r -> 1 (where the probes agree; q -> K/2 there: 3.5 plain steps
for K = 5, alpha = 0.5). Derivation: theta2 - theta0 =
-eta g0 (1 + r); theta~ = theta0 + alpha q (theta2 - theta0); the corrective gradient at theta~ is
g0 (1 - alpha q (1 - r^2)); the update adds -eta times it. The tests below also show where the relation breaks:
Adam's preconditioning, a binding clip, a rotated (non-diagonal) Hessian.
"""

from __future__ import annotations

import pytest
import torch

from gxpo_lib.core.extrapolation import geometric_scale
from gxpo_lib.core.rules import GXPO, PlainStep
from gxpo_lib.core.sfpo import SFPO

H = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
THETA0 = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)


def _quadratic(theta: torch.nn.Parameter, h: torch.Tensor, rotation: torch.Tensor | None = None):
    """closure() of L = 1/2 (R theta)^T diag(h) (R theta) (R = identity unless given)."""
    def closure():
        x = theta if rotation is None else rotation @ theta
        loss = 0.5 * (h * x * x).sum()
        loss.backward()
        return loss
    return closure


def _one_step(rule_name: str, lr: float, h=H, optimizer="sgd", max_grad_norm=None, rotation=None, **kwargs):
    theta = torch.nn.Parameter(THETA0.clone())
    opt = torch.optim.SGD([theta], lr=lr) if optimizer == "sgd" else torch.optim.Adam([theta], lr=lr)
    rule = PlainStep(opt, max_grad_norm=max_grad_norm) if rule_name == "plain" else \
        GXPO(opt, max_grad_norm=max_grad_norm, gate=None, **kwargs)
    info = rule.step(_quadratic(theta, h, rotation))
    return theta.detach().clone(), info


def _predicted_ratio(lr: float, k: int, alpha: float, h=H) -> torch.Tensor:
    r = 1.0 - lr * h
    q = geometric_scale(r, k)
    return 1.0 + alpha * q * r * (1.0 + r)


@pytest.mark.parametrize("lr", [1e-3, 0.05, 0.2])
@pytest.mark.parametrize("k,alpha", [(5, 0.5), (10, 0.3), (3, 1.0)])
def test_gxpo_update_is_1_plus_alpha_q_r_1_plus_r_plain_steps_per_coordinate_with_sgd(lr, k, alpha):
    plain, plain_info = _one_step("plain", lr)
    gxpo, info = _one_step("gxpo", lr, k=k, alpha=alpha)
    ratio = (gxpo - THETA0) / (plain - THETA0)
    # float64 arithmetic on O(1) numbers: a few ulps per operation, far below 1e-12
    torch.testing.assert_close(ratio, _predicted_ratio(lr, k, alpha), rtol=1e-12, atol=0)
    assert info.active and info.backward_passes == 3
    # the logged norms are the displacements themselves
    assert info.update_norm == pytest.approx(float((gxpo - THETA0).norm()), rel=1e-12)
    assert info.probe_step_norm == pytest.approx(float((plain - THETA0).norm()), rel=1e-12)
    assert plain_info.update_norm == pytest.approx(float((plain - THETA0).norm()), rel=1e-12)
    r = 1.0 - lr * H
    q = geometric_scale(r, k)
    theta_tilde = THETA0 + alpha * q * (-lr * H * THETA0 * (1 + r))
    assert info.jump_norm == pytest.approx(float((theta_tilde - THETA0).norm()), rel=1e-12)
    assert info.corrective_norm == pytest.approx(float((gxpo - theta_tilde).norm()), rel=1e-12)
    assert info.disp2_norm == pytest.approx(float((lr * H * THETA0 * (1 + r)).norm()), rel=1e-12)


def test_where_the_probes_agree_the_update_is_1_plus_2_alpha_q_plain_steps():
    """r -> 1 (a small lr): q -> K/2, so the factor tends to 1 + 2 alpha q = 1 + alpha K: 3.5 for K = 5, alpha = 0.5."""
    lr, k, alpha = 1e-5, 5, 0.5
    plain, _ = _one_step("plain", lr)
    gxpo, _ = _one_step("gxpo", lr, k=k, alpha=alpha)
    ratio = (gxpo - THETA0) / (plain - THETA0)
    q = geometric_scale(1.0 - lr * H, k)
    # the exact factor differs from 1 + 2 alpha q by alpha q (1 - r)(2 + r) <= 3 alpha q lr max(h) ~ 3e-4
    torch.testing.assert_close(ratio, 1.0 + 2 * alpha * q, rtol=5e-4, atol=0)
    assert 3.49 < float(ratio.min()) <= float(ratio.max()) <= 3.5


def _deviation(gxpo: torch.Tensor, plain: torch.Tensor, predicted: torch.Tensor, coords=slice(None)) -> float:
    """The largest relative miss of the per-coordinate prediction over `coords`."""
    ratio = (gxpo - THETA0) / (plain - THETA0) / predicted - 1
    return float(ratio[coords].abs().max())


def test_the_relation_breaks_with_adam_clipping_and_rotation():
    lr, k, alpha = 0.05, 5, 0.5
    predicted = _predicted_ratio(lr, k, alpha)
    # Adam: the probe steps are lr-sized whatever the gradient, so r is no longer the step's ratio
    plain, _ = _one_step("plain", lr, optimizer="adam")
    gxpo, _ = _one_step("gxpo", lr, optimizer="adam", k=k, alpha=alpha)
    assert _deviation(gxpo, plain, predicted) > 0.05
    # a binding clip: the plain step is clipped, the displacement is built from clipped steps of other sizes
    plain, _ = _one_step("plain", lr, max_grad_norm=0.5)
    gxpo, _ = _one_step("gxpo", lr, max_grad_norm=0.5, k=k, alpha=alpha)
    assert _deviation(gxpo, plain, predicted) > 0.05
    # a rotated Hessian: the coordinates mix, so r per coordinate is not 1 - lr h of any eigenvalue
    angle = torch.tensor(0.7, dtype=torch.float64)
    rotation = torch.eye(5, dtype=torch.float64)
    rotation[:2, :2] = torch.tensor([[torch.cos(angle), -torch.sin(angle)], [torch.sin(angle), torch.cos(angle)]])
    plain, _ = _one_step("plain", lr, rotation=rotation)
    gxpo, _ = _one_step("gxpo", lr, rotation=rotation, k=k, alpha=alpha)
    assert _deviation(gxpo, plain, predicted, slice(0, 2)) > 0.01


def test_scalar_q_equals_per_coordinate_q_when_r_is_uniform():
    h = torch.full((5,), 2.0, dtype=torch.float64)
    per_coordinate, a = _one_step("gxpo", 0.1, h=h, k=5, alpha=0.5)
    scalar, b = _one_step("gxpo", 0.1, h=h, k=5, alpha=0.5, q_mode="scalar")
    torch.testing.assert_close(scalar, per_coordinate, rtol=1e-15, atol=1e-15)
    assert a.update_norm == pytest.approx(b.update_norm, rel=1e-14)


def test_scalar_q_jumps_by_the_mean_q_over_active_coordinates_when_r_is_not_uniform():
    lr, k, alpha = 0.1, 5, 0.5
    per_coordinate, _ = _one_step("gxpo", lr, k=k, alpha=alpha)
    scalar, info = _one_step("gxpo", lr, k=k, alpha=alpha, q_mode="scalar")
    assert float((scalar - per_coordinate).abs().max()) > 1e-3
    r = 1.0 - lr * H
    q_bar = float(geometric_scale(r, k).mean())
    theta_tilde = THETA0 + alpha * q_bar * (-lr * H * THETA0 * (1 + r))
    expected = theta_tilde - lr * H * theta_tilde  # the corrective SGD step at theta~
    torch.testing.assert_close(scalar, expected, rtol=1e-12, atol=1e-15)
    assert info.scale_mean == pytest.approx(q_bar, rel=1e-12)
    assert info.effective_multiplier == pytest.approx(alpha * q_bar, rel=1e-12)


def test_scalar_q_leaves_inactive_coordinates_to_the_same_scalar():
    """A coordinate with g0 = 0 is inactive: it does not enter q-bar, and (scalar) it jumps by q-bar too."""
    theta0 = THETA0.clone()
    theta0[0] = 0.0  # g0 = h * theta = 0 there: inactive
    theta = torch.nn.Parameter(theta0.clone())
    rule = GXPO(torch.optim.SGD([theta], lr=0.1), max_grad_norm=None, gate=None, q_mode="scalar")
    info = rule.step(_quadratic(theta, H))
    r = 1.0 - 0.1 * H[1:]
    assert info.scale_mean == pytest.approx(float(geometric_scale(r, 5).mean()), rel=1e-12)
    assert info.inactive_frac == pytest.approx(0.2)


def test_q_mode_is_validated():
    theta = torch.nn.Parameter(THETA0.clone())
    with pytest.raises(ValueError, match="q_mode='vector' is invalid"):
        GXPO(torch.optim.SGD([theta], lr=0.1), q_mode="vector")


def test_every_rule_reports_its_update_norm():
    for make in (lambda opt: PlainStep(opt, max_grad_norm=1.0), lambda opt: SFPO(opt, gate=None),
                 lambda opt: GXPO(opt, gate=None, skip_corrective=True)):
        theta = torch.nn.Parameter(THETA0.clone())
        rule = make(torch.optim.AdamW([theta], lr=0.01))
        info = rule.step(_quadratic(theta, H))
        assert info.update_norm == pytest.approx(float((theta.detach() - THETA0).norm()), rel=1e-12)


def test_a_skipped_step_has_a_zero_update():
    theta = torch.nn.Parameter(THETA0.clone())

    def bad():
        loss = (theta * float("nan")).sum()
        loss.backward()
        return loss
    info = PlainStep(torch.optim.SGD([theta], lr=0.1)).step(bad)
    assert info.skipped and info.update_norm == 0.0
    assert torch.equal(theta.detach(), THETA0)
