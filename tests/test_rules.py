"""PlainStep, GXPO and SFPO: exactness of the surrogate, its limits, fallbacks, the gate, checkpoints."""

import copy

import pytest
import torch

from gxpo_lib import GXPO, SFPO, PlainStep, ShutoffGate


@pytest.fixture(autouse=True)
def float64_default():
    """These tests compare against hand-written float64 iterates; restore the default afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# -- helpers -----------------------------------------------------------------------------------------
def quadratic(hessian: torch.Tensor, target: torch.Tensor):
    """L = 1/2 (x - x*)^T H (x - x*), and a closure factory for a parameter x."""

    def make_closure(x):
        def closure():
            d = x - target
            loss = 0.5 * d @ hessian @ d
            loss.backward()
            return loss
        return closure

    return make_closure


def gd_iterates(hessian, target, x0, lr, steps):
    """Plain gradient descent written out by hand: [x_0, ..., x_steps]."""
    xs = [x0.clone()]
    for _ in range(steps):
        xs.append(xs[-1] - lr * hessian @ (xs[-1] - target))
    return xs


def diag_problem(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(n, generator=g) * 0.8 + 0.1            # eta h in (0.1, 0.9): r in (0.1, 0.9)
    return torch.diag(h), torch.randn(n, generator=g), torch.randn(n, generator=g) * 3


def rotated(hessian, seed=1):
    q, _ = torch.linalg.qr(torch.randn(hessian.shape, generator=torch.Generator().manual_seed(seed)))
    return q @ hessian @ q.T


def one_gxpo_step(hessian, target, x0, k, optimizer="sgd", lr=1.0, **kwargs):
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=lr) if optimizer == "sgd" else torch.optim.Adam([x], lr=lr)
    rule = GXPO(opt, k=k, alpha=kwargs.pop("alpha", 1.0), max_grad_norm=kwargs.pop("max_grad_norm", None),
                gate=None, **kwargs)
    info = rule.step(quadratic(hessian, target)(x))
    return x.detach(), info


def relative_error(a, b, origin):
    return float((a - b).norm() / (b - origin).norm())


# -- the plain-GD surrogate ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_gxpo_step_equals_k_plus_one_gd_steps_on_separable_quadratic(k):
    hessian, target, x0 = diag_problem()
    x, info = one_gxpo_step(hessian, target, x0, k)
    truth = gd_iterates(hessian, target, x0, 1.0, k + 1)[-1]
    assert relative_error(x, truth, x0) < 1e-12
    assert info.active and info.backward_passes == 3 and info.ratio_clip_frac == 0.0


def test_hand_example_of_spec_section_2_number_by_number():
    x = torch.tensor([4.0, 2.0], requires_grad=True)
    h = torch.tensor([0.5, 1.5])
    seen = []

    def closure():
        loss = 0.5 * (h * x * x).sum()
        loss.backward()
        seen.append((x.detach().clone(), x.grad.clone()))
        return loss

    info = GXPO(torch.optim.SGD([x], lr=1.0), k=4, alpha=1.0, max_grad_norm=None, gate=None).step(closure)
    (theta0, g0), (theta1, g1), (theta_tilde, _) = seen
    assert theta0.tolist() == [4.0, 2.0] and g0.tolist() == [2.0, 3.0]
    assert theta1.tolist() == [2.0, -1.0] and g1.tolist() == [1.0, -1.5]        # r = 0.5, -0.5
    assert theta_tilde.tolist() == [0.25, 0.125]                                   # = theta_4
    assert x.detach().tolist() == [0.125, -0.0625]                                 # = theta_5
    assert info.scale_mean == 1.25 and info.r_mean == 0.0
    assert info.disp2_norm == pytest.approx(((1 - 4) ** 2 + (0.5 - 2) ** 2) ** 0.5)


def test_alpha_half_lands_on_sfpo_point_with_two_passes():
    hessian, target, x0 = diag_problem(seed=3)
    k, alpha = 5, 0.5
    xs = gd_iterates(hessian, target, x0, 1.0, k)
    x_tilde = x0 + alpha * (xs[k] - x0)
    expected = x_tilde - hessian @ (x_tilde - target)
    x, _ = one_gxpo_step(hessian, target, x0, k, alpha=alpha)
    assert relative_error(x, expected, x0) < 1e-12


# -- where it stops being exact -------------------------------------------------------------------------
def test_rotation_and_adam_break_exactness_measurably(capsys):
    hessian, target, x0 = diag_problem(seed=4)
    k = 5
    truth = gd_iterates(hessian, target, x0, 1.0, k + 1)[-1]
    err_diag = relative_error(one_gxpo_step(hessian, target, x0, k)[0], truth, x0)

    rot = rotated(hessian)
    truth_rot = gd_iterates(rot, target, x0, 1.0, k + 1)[-1]
    err_rot = relative_error(one_gxpo_step(rot, target, x0, k)[0], truth_rot, x0)

    # Adam: compare with K+1 real Adam steps on the same loss.
    x = x0.clone().requires_grad_(True)
    adam = torch.optim.Adam([x], lr=0.05)
    closure = quadratic(hessian, target)(x)
    for _ in range(k + 1):
        adam.zero_grad()
        closure()
        adam.step()
    err_adam = relative_error(one_gxpo_step(hessian, target, x0, k, optimizer="adam", lr=0.05)[0],
                              x.detach(), x0)
    with capsys.disabled():
        print(f"\nK={k} extrapolation error: diagonal+SGD {err_diag:.1e}, rotated+SGD {err_rot:.3f}, "
              f"diagonal+Adam {err_adam:.3f}")
    assert err_diag < 1e-12
    assert err_rot > 1e-3
    assert err_adam > 1e-3


def test_clipping_that_binds_breaks_exactness_and_clip_corrected_differs():
    hessian, target, x0 = diag_problem(seed=5)
    truth = gd_iterates(hessian, target, x0, 1.0, 6)[-1]
    x_clip, info = one_gxpo_step(hessian, target, x0, 5, max_grad_norm=0.5)
    assert info.g0_norm > 0.5 and relative_error(x_clip, truth, x0) > 1e-3
    x_corr, _ = one_gxpo_step(hessian, target, x0, 5, max_grad_norm=0.5, retention="clip_corrected")
    assert not torch.allclose(x_clip, x_corr)


def test_binding_clamp_is_reported_and_changes_the_point():
    # eta h = 0.2, 0.5 give r = 0.8, 0.5: the default clamp (-2, 3) never binds, (-0.5, 0.5) binds on r = 0.8.
    hessian = torch.diag(torch.tensor([0.2, 0.5]))
    target, x0 = torch.zeros(2), torch.tensor([1.0, 1.0])
    truth = gd_iterates(hessian, target, x0, 1.0, 6)[-1]
    x_default, info = one_gxpo_step(hessian, target, x0, 5)
    assert info.ratio_clip_frac == 0.0 and relative_error(x_default, truth, x0) < 1e-12
    x_tight, info_tight = one_gxpo_step(hessian, target, x0, 5, r_clamp=(-0.5, 0.5))
    assert info_tight.ratio_clip_frac == 0.5
    assert relative_error(x_tight, truth, x0) > 1e-3


# -- fallback ---------------------------------------------------------------------------------------------
def poisoned_closure(x, bad_pass, value):
    """A quadratic whose gradient turns `value` (nan or inf) on pass number `bad_pass` (1-based)."""
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        loss = 0.5 * (x * x).sum()
        if calls["n"] == bad_pass:
            loss = loss * value
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("bad_pass", [1, 2, 3])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["carry", "transactional"])
def test_nonfinite_gradient_at_any_pass_falls_back_without_nan(bad_pass, value, mode):
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.1)
    rule = GXPO(opt, k=5, alpha=0.5, optimizer_state=mode, gate=None)
    info = rule.step(poisoned_closure(x, bad_pass, value))
    assert info.fallback and not info.active
    assert torch.isfinite(x).all()
    assert info.backward_passes == bad_pass + 1

    # the fallback's plain step is exactly a plain step from theta0 (params), and in transactional
    # mode the optimizer state equals a plain step's too.
    y = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    plain_opt = torch.optim.Adam([y], lr=0.1)
    PlainStep(plain_opt).step(poisoned_closure(y, 0, 1.0))
    assert torch.equal(x.detach(), y.detach()) == (mode == "transactional" or bad_pass == 1)
    if mode == "transactional":
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[x][key], plain_opt.state[y][key])


def test_plain_step_with_nonfinite_gradient_leaves_parameters_untouched():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    info = PlainStep(torch.optim.SGD([x], lr=0.1)).step(poisoned_closure(x, 1, float("nan")))
    assert info.skipped and x.detach().tolist() == [1.0, 2.0]


def test_vanishing_first_gradient_falls_back():
    x = torch.zeros(3, requires_grad=True)
    info = GXPO(torch.optim.SGD([x], lr=0.1), gate=None).step(poisoned_closure(x, 0, 1.0))
    assert info.fallback and info.backward_passes == 2


# -- the gate -----------------------------------------------------------------------------------------------
def mlp_setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    inputs, targets = torch.randn(32, 4), torch.randn(32, 1)

    def closure():
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        loss.backward()
        return loss

    return model, closure


def test_after_shutoff_gxpo_is_bit_for_bit_plain_step():
    model, closure = mlp_setup()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rule = GXPO(opt, k=5, alpha=0.5, tau=0.5, warmup=0)
    steps = 0
    while rule.gate.is_open:
        rule.step(closure)
        steps += 1
        assert steps < 50
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert rule.buffer_bytes == 3 * param_bytes          # theta0, g0, g1 kept from the last active step
    twin, twin_closure = mlp_setup()
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    plain = PlainStep(twin_opt)
    for _ in range(5):
        info = rule.step(closure)
        assert not info.active and info.backward_passes == 1 and not info.gate_open
        plain.step(twin_closure)
        assert rule.buffer_bytes == 0                    # freed once the gate holds the rule at plain steps
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_gate_receives_corrective_norm_and_entropy_signal_is_required():
    model, closure = mlp_setup()
    rule = GXPO(torch.optim.SGD(model.parameters(), lr=0.1), gate=ShutoffGate(tau=100.0, warmup=0))
    info = rule.step(closure)
    assert rule.gate.num_observations == 1
    assert info.gate_z == pytest.approx((info.gslow_norm - 1.0) / (1.0 + 1e-8))

    entropy_rule = GXPO(torch.optim.SGD(model.parameters(), lr=0.1), signal="entropy")
    with pytest.raises(ValueError, match="gate_signal"):
        entropy_rule.step(closure)
    entropy_rule.step(closure, gate_signal=2.0)
    assert entropy_rule.gate.mu == pytest.approx(0.9 * 1 + 0.1 * 2.0)


# -- SFPO -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 5])
def test_sfpo_equals_manual_fast_steps_reposition_and_slow_step(k):
    model, closure = mlp_setup(seed=1)
    twin, twin_closure = mlp_setup(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    info = SFPO(opt, k=k, alpha=0.8, max_grad_norm=0.5, gate=None).step(closure)

    theta0 = [p.detach().clone() for p in twin.parameters()]
    def manual_step():
        twin_opt.zero_grad()
        twin_closure()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        twin_opt.step()
    for _ in range(k):
        manual_step()
    with torch.no_grad():
        for p, p0 in zip(twin.parameters(), theta0):
            p.copy_(p0 + 0.8 * (p - p0))
    manual_step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert info.backward_passes == k + 1 and info.active


def test_sfpo_official_gate_needs_entropy():
    model, closure = mlp_setup()
    rule = SFPO(torch.optim.SGD(model.parameters(), lr=0.1))
    assert rule.gate.signal == "entropy" and rule.gate.window == 30 and rule.gate.tau == 1.0
    with pytest.raises(ValueError, match="gate_signal"):
        rule.step(closure)


# -- accounting and validation ------------------------------------------------------------------------------
def test_backward_passes_per_rule():
    model, closure = mlp_setup()
    def passes(rule):
        return rule.step(closure).backward_passes
    assert passes(PlainStep(torch.optim.SGD(model.parameters(), lr=0.01))) == 1
    assert passes(GXPO(torch.optim.SGD(model.parameters(), lr=0.01), gate=None)) == 3
    assert passes(GXPO(torch.optim.SGD(model.parameters(), lr=0.01), gate=None, skip_corrective=True)) == 2
    for k in (2, 3, 7):
        assert passes(SFPO(torch.optim.SGD(model.parameters(), lr=0.01), k=k, gate=None)) == k + 1


@pytest.mark.parametrize("kwargs, name", [
    ({"k": 1}, "k"), ({"k": 2.5}, "k"), ({"alpha": 0}, "alpha"), ({"alpha": -0.5}, "alpha"),
    ({"tau": 0}, "tau"), ({"omega": 1.5}, "omega"), ({"r_clamp": (3.0, -2.0)}, "r_clamp"),
    ({"r_clamp": (1.0, 1.0)}, "r_clamp"), ({"max_grad_norm": 0}, "max_grad_norm"),
    ({"mode": "rolling"}, "mode"), ({"optimizer_state": "keep"}, "optimizer_state"),
    ({"retention": "adam"}, "retention"), ({"signal": "kl"}, "signal"), ({"patience": 0}, "patience"),
])
def test_gxpo_invalid_settings_raise_before_any_computation(kwargs, name):
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match=rf"^{name}=.* is invalid: allowed"):
        GXPO(torch.optim.SGD([x], lr=0.1), **kwargs)


@pytest.mark.parametrize("kwargs, name", [({"k": 1}, "k"), ({"alpha": 0.0}, "alpha"),
                                          ({"max_grad_norm": -1.0}, "max_grad_norm")])
def test_sfpo_invalid_settings(kwargs, name):
    x = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match=rf"^{name}="):
        SFPO(torch.optim.SGD([x], lr=0.1), **kwargs)


def test_update_settings_is_live_and_validated():
    model, closure = mlp_setup()
    rule = GXPO(torch.optim.SGD(model.parameters(), lr=0.01), k=3, tau=0.5)
    rule.update_settings(k=10, alpha=0.3, r_clamp=(-1.0, 2.0), tau=2.0)
    assert (rule.k, rule.alpha, rule.r_clamp, rule.gate.tau) == (10, 0.3, (-1.0, 2.0), 2.0)
    with pytest.raises(ValueError, match="^k="):
        rule.update_settings(k=1, alpha=0.9)
    assert rule.alpha == 0.3  # nothing changed on failure
    with pytest.raises(ValueError, match="^bogus="):
        rule.update_settings(bogus=1)
    assert rule.step(closure).scale_max <= 6.0


# -- checkpointing ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_rule", [
    lambda opt: PlainStep(opt),
    lambda opt: GXPO(opt, k=5, alpha=0.5, tau=1.0, warmup=1, optimizer_state="transactional"),
    lambda opt: GXPO(opt, k=3, gate=ShutoffGate(mode="window", window=3, tau=0.8)),
    lambda opt: SFPO(opt, k=3, gate="default", tau=1.5, warmup=1),
])
def test_state_dict_resume_matches_uninterrupted_run(make_rule):
    model, closure = mlp_setup()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    rule = make_rule(opt)
    for _ in range(4):
        rule.step(closure)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    saved_rule = copy.deepcopy(rule.state_dict())
    reference = [rule.step(closure).to_dict() for _ in range(4)]

    resumed_model, resumed_closure = mlp_setup()
    resumed_model.load_state_dict(saved_model)
    resumed_opt = torch.optim.AdamW(resumed_model.parameters(), lr=5e-3)
    resumed_opt.load_state_dict(saved_opt)
    resumed_rule = make_rule(resumed_opt)
    resumed_rule.load_state_dict(saved_rule)
    resumed = [resumed_rule.step(resumed_closure).to_dict() for _ in range(4)]
    assert resumed == reference
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_rules_work_in_float32_and_bfloat16_parameters():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.tensor([1.0, -2.0, 0.5], dtype=dtype, requires_grad=True)
        def closure(x=x):
            loss = (x.float() ** 2).sum()
            loss.backward()
            return loss
        info = GXPO(torch.optim.SGD([x], lr=0.1), gate=None).step(closure)
        assert info.active and x.dtype == dtype and torch.isfinite(x).all()
