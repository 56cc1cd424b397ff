"""PlainStep, GXPO and SFPO: exactness of the surrogate, its limits, fallbacks, the gate, checkpoints."""

import copy
import math

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


# -- the batched (flat, chunked) jump equals the old per-tensor loop bit for bit ---------------------------------
def frozen_per_tensor_jump(rule, c0, c1):
    """A frozen copy of the per-tensor loop GXPO used before the flat buffers (rules.py at ac218b8): per parameter
    tensor r, q and theta~ = theta0 + alpha q (theta2 - theta0). Returns the parameters it would write."""
    views = rule._views
    ratio_scale = (c1 / c0) if rule.retention == "clip_corrected" else 1.0
    out = []
    for p, theta0, g0, g1 in zip(rule.params, views["_theta0"], views["_g0"], views["_g1"]):
        active = g0.abs() > rule.delta
        safe_g0 = torch.where(active, g0, torch.ones_like(g0))
        raw = torch.where(active, g1 / safe_g0, torch.ones_like(g1)) * ratio_scale
        clipped = raw.clamp(*rule.r_clamp)
        r = torch.where(torch.isfinite(raw), clipped, torch.ones_like(raw))
        s_k = torch.ones_like(r)
        for _ in range(rule.k - 1):
            s_k = s_k * r + 1.0
        s_2 = 1.0 + r
        defined = s_2.abs() > rule.delta
        q = torch.where(defined, s_k / torch.where(defined, s_2, torch.ones_like(s_2)), torch.ones_like(r))
        q = torch.where(torch.isfinite(q), q, torch.ones_like(q)).clamp(1.0, rule.k / 2 + 1)
        q = torch.where(active, q, torch.ones_like(r))
        t0 = theta0.to(torch.promote_types(theta0.dtype, torch.float32))
        out.append((t0 + rule.alpha * q * (p.detach().to(t0.dtype) - t0)).to(theta0.dtype))
    return out


def many_tensor_setup(seed=0):
    """A model with 9 parameter tensors of odd sizes and a few exactly-zero gradient coordinates."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    model.append(torch.nn.Linear(1, 1))
    unused = torch.nn.Parameter(torch.randn(4))  # never in the loss: g0 = 0, inactive
    inputs, targets = torch.randn(16, 5), torch.randn(16, 1)

    def closure():
        loss = torch.nn.functional.mse_loss(model(inputs), targets) + 0 * unused.sum()
        loss.backward()
        return loss

    return [*model.parameters(), unused], closure


@pytest.mark.parametrize("retention", ["grad", "clip_corrected"])
@pytest.mark.parametrize("chunk", [7, 1 << 18])
def test_batched_jump_is_bit_for_bit_the_old_per_tensor_loop(retention, chunk, monkeypatch):
    from gxpo_lib.core import extrapolation, rules

    monkeypatch.setattr(extrapolation, "CHUNK_MIN", chunk)  # 7: chunks cut across parameter tensors
    params, closure = many_tensor_setup()
    rule = GXPO(torch.optim.AdamW(params, lr=0.05), k=5, alpha=0.7, max_grad_norm=0.3, r_clamp=(-1.5, 2.0),
                retention=retention, gate=None)
    expected = {}
    original_jump = rules.GXPO._jump

    def checked_jump(self, info, c0, c1, steps):
        expected["params"] = frozen_per_tensor_jump(self, c0, c1)
        original_jump(self, info, c0, c1, steps)
        expected["written"] = [p.detach().clone() for p in self.params]

    monkeypatch.setattr(rules.GXPO, "_jump", checked_jump)
    for _ in range(4):
        info = rule.step(closure)
        assert info.active and 0 < info.ratio_clip_frac < 1 and 0 < info.inactive_frac < 1
        for new, old in zip(expected["written"], expected["params"]):
            assert torch.equal(new, old)
    if chunk == 7:
        assert len(rule._flat.chunks) > 10 and any(len(s) > 1 for *_, s in rule._flat.chunks)


def test_diagnostics_agree_with_per_tensor_sums():
    """The diagnostics are sums over chunks instead of over tensors: equal to float64 rounding."""
    params, closure = many_tensor_setup(seed=3)
    rule = GXPO(torch.optim.SGD(params, lr=0.1), k=4, alpha=0.5, max_grad_norm=None, gate=None)
    grads, thetas = [], [[p.detach().clone() for p in params]]
    for _ in range(2):  # the probes, by hand
        with torch.no_grad():
            for p, t in zip(params, thetas[-1]):
                p.copy_(t)
                p.grad = None
        closure()
        grads.append([p.grad.detach().clone() for p in params])
        thetas.append([t - 0.1 * g for t, g in zip(thetas[-1], grads[-1])])
    with torch.no_grad():
        for p, t in zip(params, thetas[0]):
            p.copy_(t)
    info = rule.step(closure)
    g0, g1 = torch.cat([g.flatten() for g in grads[0]]), torch.cat([g.flatten() for g in grads[1]])
    disp2 = torch.cat([(b - a).flatten() for a, b in zip(thetas[0], thetas[2])])
    active = g0.abs() > 1e-8
    r = (g1[active] / g0[active]).clamp(-2, 3)
    assert info.r_mean == pytest.approx(float(r.mean()), rel=1e-12)
    assert info.disp2_norm == pytest.approx(float(disp2.norm()), rel=1e-12)
    assert info.cos_g0_g1 == pytest.approx(float(g0 @ g1 / (g0.norm() * g1.norm())), rel=1e-12)
    assert info.param_norm == pytest.approx(float(torch.cat([t.flatten() for t in thetas[0]]).norm()), rel=1e-12)
    assert info.inactive_frac == pytest.approx(1 - float(active.double().mean()), rel=1e-12)


# -- retention="update": the optimizer's own directions ---------------------------------------------------------
def test_update_retention_with_sgd_is_grad_retention_and_clip_corrected_when_clipping_binds():
    hessian, target, x0 = diag_problem()
    x_grad, info_grad = one_gxpo_step(hessian, target, x0, 5)
    x_update, info_update = one_gxpo_step(hessian, target, x0, 5, retention="update")
    assert relative_error(x_update, x_grad, x0) < 1e-12 and info_update.r_mean == pytest.approx(info_grad.r_mean)
    x_cc, _ = one_gxpo_step(hessian, target, x0, 5, max_grad_norm=0.5, retention="clip_corrected")
    x_up, _ = one_gxpo_step(hessian, target, x0, 5, max_grad_norm=0.5, retention="update")
    x_raw, _ = one_gxpo_step(hessian, target, x0, 5, max_grad_norm=0.5)
    assert relative_error(x_up, x_cc, x0) < 1e-12 and relative_error(x_up, x_raw, x0) > 1e-3


def linear_closure(x, grads):
    """A loss whose gradient on pass n is grads[n] (the last one repeats): L = <grads[n], x>."""
    calls = {"n": 0}

    def closure():
        g = grads[min(calls["n"], len(grads) - 1)]
        calls["n"] += 1
        loss = (g * x).sum()
        loss.backward()
        return loss

    return closure


def test_update_retention_reproduces_the_authors_adamw_worked_case():
    """GXPO_OPTIMIZER_AWARE_RETENTION.md: settled moments, g1 = 4 g0. Raw r = 3 (clamped from 4) gives
    q = 6 = K/2 + 1 at K = 10; the AdamW direction gives r = 0.87 and q = 3.05. By hand (3 warm steps on
    g0, then probe steps 4 and 5; eps negligible):
        d0 = 1,  d1 = [(0.9 (1 - 0.9^4) + 0.4) / (1 - 0.9^5)] / sqrt[(0.999 (1 - 0.999^4) + 0.016)
                                                                     / (1 - 0.999^5)]."""
    m_hat = (0.9 * (1 - 0.9**4) + 0.4) / (1 - 0.9**5)
    d1 = m_hat / math.sqrt((0.999 * (1 - 0.999**4) + 0.016) / (1 - 0.999**5))
    q = sum(d1**i for i in range(10)) / (1 + d1)
    g0 = torch.rand(16, generator=torch.Generator().manual_seed(0)) + 0.5
    for retention, r_expected, q_expected in (("grad", 3.0, 6.0), ("update", d1, q)):
        x = torch.zeros(16, requires_grad=True)
        optimizer = torch.optim.AdamW([x], lr=3e-3, weight_decay=0.04)
        for _ in range(3):
            PlainStep(optimizer, max_grad_norm=None).step(linear_closure(x, [g0]))
        rule = GXPO(optimizer, k=10, alpha=0.5, max_grad_norm=None, retention=retention, gate=None)
        info = rule.step(linear_closure(x, [g0, 4 * g0, g0]))
        assert info.r_mean == pytest.approx(r_expected, rel=1e-5) and info.r_std < 1e-4
        assert info.scale_mean == pytest.approx(q_expected, rel=1e-4)
        assert (info.cos_g0_g1 is None) == (retention == "update")
    assert 0.86 < d1 < 0.87 and q == pytest.approx(3.05, abs=0.01)


def test_update_retention_respects_per_group_lr_and_decay_and_a_zero_lr():
    a, b, c = (torch.randn(5, requires_grad=True) for _ in range(3))
    optimizer = torch.optim.AdamW([{"params": [a], "lr": 1e-2, "weight_decay": 0.1},
                                   {"params": [b], "lr": 5e-2, "weight_decay": 0.0},
                                   {"params": [c], "lr": 0.0}])
    def closure():
        loss = (a**2).sum() + (b**3).sum() + (c**2).sum()
        loss.backward()
        return loss
    rule = GXPO(optimizer, k=4, retention="update", max_grad_norm=None, gate=None)
    c0 = c.detach().clone()
    info = rule.step(closure)
    assert info.active and torch.isfinite(a).all() and torch.isfinite(b).all()
    assert torch.equal(c.detach(), c0)                      # lr 0: no direction, inactive, untouched
    assert info.inactive_frac == pytest.approx(1 / 3)


# -- the vanishing second probe --------------------------------------------------------------------------------
@pytest.mark.parametrize("vanishing_probe", ["continue", "fallback"])
def test_vanishing_second_probe_continues_like_the_authors_or_falls_back(vanishing_probe):
    """L = 1/2 |x - c|^2 with SGD lr 1: theta1 = c, so g1 = 0. The authors go on with r = 0, q = 1:
    theta~ = theta0 + alpha (theta2 - theta0) = x0 + 0.5 (c - x0); the corrective step then lands on c."""
    x0, c = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    x = x0.clone().requires_grad_(True)
    def closure():
        loss = 0.5 * ((x - c) ** 2).sum()
        loss.backward()
        return loss
    info = GXPO(torch.optim.SGD([x], lr=1.0), k=5, alpha=0.5, max_grad_norm=None, gate=None,
                vanishing_probe=vanishing_probe).step(closure)
    assert info.backward_passes == 3
    if vanishing_probe == "continue":
        assert info.active and not info.fallback and info.g1_norm == 0.0
        assert info.r_mean == 0.0 and info.scale_max == 1.0
        assert info.loss == (0.5 * ((x0 + 0.5 * (c - x0) - c) ** 2).sum()).item()   # taken at theta~ = (2, 0)
    else:
        assert info.fallback and not info.active
        assert info.loss == (0.5 * ((x0 - c) ** 2).sum()).item()                     # the plain step at theta0
    assert torch.equal(x.detach(), c)  # both land on c: theta~'s gradient (1, -1), or theta0's full step


# -- SFPO over several mini-batches ------------------------------------------------------------------------------
def test_sfpo_step_sweeps_is_the_official_structure_and_step_is_per_mini_batch():
    targets = [torch.tensor([1.0, -2.0]), torch.tensor([-3.0, 0.5])]
    lr, k, alpha = 0.3, 3, 0.8

    def closures(x):
        def make(t):
            def closure():
                loss = 0.5 * ((x - t) ** 2).sum()
                loss.backward()
                return loss
            return closure
        return [make(t) for t in targets]

    def sgd(x, t):
        return x - lr * (x - t)

    x0 = torch.tensor([0.5, 0.5])
    # official: K sweeps over both mini-batches, reposition, one more sweep
    y = x0.clone()
    for _ in range(k):
        for t in targets:
            y = sgd(y, t)
    y = x0 + alpha * (y - x0)
    for t in targets:
        y = sgd(y, t)
    # per mini-batch: K+1 steps on each, one after the other
    z = x0.clone()
    for t in targets:
        start = z.clone()
        for _ in range(k):
            z = sgd(z, t)
        z = sgd(start + alpha * (z - start), t)

    x = x0.clone().requires_grad_(True)
    info = SFPO(torch.optim.SGD([x], lr=lr), k=k, alpha=alpha, max_grad_norm=None, gate=None).step_sweeps(closures(x))
    torch.testing.assert_close(x.detach(), y, rtol=1e-12, atol=1e-12)
    assert info.backward_passes == (k + 1) * 2 and info.active
    w = x0.clone().requires_grad_(True)
    rule = SFPO(torch.optim.SGD([w], lr=lr), k=k, alpha=alpha, max_grad_norm=None, gate=None)
    assert [rule.step(c).backward_passes for c in closures(w)] == [k + 1, k + 1]
    torch.testing.assert_close(w.detach(), z, rtol=1e-12, atol=1e-12)
    assert (y - z).abs().max() > 1e-3
    with pytest.raises(ValueError, match="^closures="):
        rule.step_sweeps([])


def test_sfpo_step_sweeps_falls_back_on_a_nonfinite_pass():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    good = poisoned_closure(x, 0, 1.0)
    info = SFPO(torch.optim.SGD([x], lr=0.1), k=2, gate=None).step_sweeps([good, poisoned_closure(x, 1, float("nan"))])
    assert info.fallback and torch.isfinite(x).all()


# -- the new options are settings: live, validated, checkpointed ----------------------------------------------------
def test_new_options_are_live_validated_and_resume_identically():
    model, closure = mlp_setup()
    rule = GXPO(torch.optim.AdamW(model.parameters(), lr=1e-2), active_set="relative", retention="update",
                optimizer_state="transactional", init="warmup", warmup=2)
    for name, value in (("retention", "adam"), ("active_set", "some"), ("scale_form", "sum"), ("q_clamp", "yes"),
                        ("gate_statistic", "post"), ("vanishing_probe", "skip"), ("init", "cold")):
        with pytest.raises(ValueError, match=f"^{name}="):
            rule.update_settings(**{name: value})
    rule.update_settings(retention="clip_corrected", q_clamp=False, scale_form="closed", two_sided=True)
    assert (rule.retention, rule.q_clamp, rule.scale_form, rule.gate.two_sided) == ("clip_corrected", False,
                                                                                      "closed", True)
    rule.update_settings(retention="update", q_clamp=True, scale_form="horner", two_sided=False)
    for _ in range(3):
        rule.step(closure)
    saved = copy.deepcopy((model.state_dict(), rule.optimizer.state_dict(), rule.state_dict()))
    reference = [rule.step(closure).to_dict() for _ in range(3)]
    twin, twin_closure = mlp_setup()
    twin.load_state_dict(saved[0])
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    twin_opt.load_state_dict(saved[1])
    resumed = GXPO(twin_opt)
    resumed.load_state_dict(saved[2])
    assert [resumed.step(twin_closure).to_dict() for _ in range(3)] == reference
