"""gxpo_lib.teach.toy: landscapes, the real rules on a 2-D parameter, extrapolation errors, gate demo, explorer."""

import math

import pytest
import torch

from gxpo_lib.teach import toy


# -- exactness and what breaks it ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_one_gxpo_step_is_k_plus_one_gd_steps_on_a_diagonal_quadratic(k):
    assert toy.extrapolation_error(toy.DiagonalQuadratic(), lr=0.3, k=k) < 1e-12
    assert toy.extrapolation_error(toy.DiagonalQuadratic(h=(0.2, 1.4)), theta0=(3.0, -1.0), lr=1.0, k=k) < 1e-12


def test_rotation_adam_clipping_noise_give_a_measurable_error(capsys):
    diag = toy.DiagonalQuadratic()
    errors = {
        "rotated": toy.extrapolation_error(toy.RotatedQuadratic(), lr=0.3, k=5),
        "adam": toy.extrapolation_error(diag, lr=0.1, k=5, optimizer="adam"),
        "clip": toy.extrapolation_error(diag, lr=0.3, k=5, clip=0.5),
        "noise": toy.extrapolation_error(diag, lr=0.3, k=5, noise=0.1),
        "logcosh": toy.extrapolation_error(toy.LogCosh(), lr=0.3, k=5),
        "banana": toy.extrapolation_error(toy.Banana(), lr=0.3, k=5),
    }
    with capsys.disabled():
        print("\nK=5 extrapolation errors:", {k: f"{v:.3g}" for k, v in errors.items()})
    for name, error in errors.items():
        assert error > 1e-3, name


def test_every_case_is_exact_at_k2_because_q_is_1():
    # q = 1 at K = 2: GXPO is three plain steps, whatever the landscape, optimizer, clip or noise.
    for kwargs in ({"landscape": toy.RotatedQuadratic()}, {"landscape": toy.Banana()},
                   {"landscape": toy.DiagonalQuadratic(), "optimizer": "adam", "lr": 0.1},
                   {"landscape": toy.DiagonalQuadratic(), "clip": 0.5},
                   {"landscape": toy.DiagonalQuadratic(), "noise": 0.3, "seed": 4}):
        kwargs.setdefault("lr", 0.3)
        assert toy.extrapolation_error(k=2, **kwargs) < 1e-12, kwargs


def test_binding_q_cap_breaks_odd_k_only():
    stiff = toy.DiagonalQuadratic(h=(1.9 / 0.3, 0.3))        # lr h = 1.9: r = -0.9
    errors = toy.error_vs_k([3, 4, 5, 6], landscape=stiff, lr=0.3)
    assert errors[0] > 0.1 and errors[2] > 0.1             # S_K/S_2 > K/2 + 1: capped
    assert errors[1] < 1e-12 and errors[3] < 1e-12         # even K: under the cap, exact


def test_tight_stability_clamp_breaks_exactness():
    diag = toy.DiagonalQuadratic()                         # lr 0.3: r = 0.7, 0.91
    assert toy.extrapolation_error(diag, lr=0.3, k=5, r_clamp=(-2.0, 0.8)) > 1e-3


def test_hand_check_of_the_spec_through_run_rule():
    run = toy.run_rule("gxpo", toy.DiagonalQuadratic(h=(0.5, 1.5)), theta0=(4.0, 2.0), lr=1.0, steps=1,
                       k=4, alpha=1.0)
    info = run.infos[0]
    assert info["eval_points"].tolist() == [[4.0, 2.0], [2.0, -1.0], [0.25, 0.125]]
    assert run.points.tolist() == [[4.0, 2.0], [0.125, -0.0625]]
    assert info["backward_passes"] == 3 and info["active"]


def test_snapshot_probes_are_the_first_gd_steps_and_gxpo_matches_at_alpha_1():
    land = toy.DiagonalQuadratic()
    for noise in (0.0, 0.2):
        snap = toy.lookahead_snapshot(land, lr=0.3, k=6, alpha=1.0, noise=noise, seed=3)
        gxpo = toy.run_rule("gxpo", land, lr=0.3, steps=1, k=6, alpha=1.0, noise=noise, seed=3)
        sfpo = toy.run_rule("sfpo", land, lr=0.3, steps=1, k=6, alpha=1.0, noise=noise, seed=3)
        assert torch.equal(gxpo.infos[0]["eval_points"][:2], snap["gd"][:2])
        assert torch.equal(sfpo.infos[0]["eval_points"][:6], snap["gd"][:6])
        assert snap["passes"] == {"grpo": 1, "gxpo": 3, "sfpo": 7, "gd": 7}
    clean = toy.lookahead_snapshot(land, lr=0.3, k=6, alpha=1.0)
    assert torch.allclose(clean["r"], 1 - 0.3 * land.h)
    assert torch.allclose(clean["gxpo_tilde"], clean["gd"][6], atol=1e-14)
    assert torch.allclose(clean["sfpo_final"], clean["gd"][7], atol=1e-14)
    assert clean["error"] < 1e-12


def test_noise_is_seeded_and_redrawn_on_every_pass():
    land = toy.DiagonalQuadratic()
    a = toy.gd_path(land, lr=0.3, steps=4, noise=0.1, seed=1)
    b = toy.gd_path(land, lr=0.3, steps=4, noise=0.1, seed=1)
    c = toy.gd_path(land, lr=0.3, steps=4, noise=0.1, seed=2)
    clean = toy.gd_path(land, lr=0.3, steps=4)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, clean)
    # with SGD each step's noise part is -lr * (that pass's draw): a fixed offset would repeat
    drift = (a[1:] - a[:-1]) - (clean[1:] - clean[:-1])
    assert not torch.allclose(drift[0], drift[1])


def test_gd_path_is_plain_gd_written_out():
    land = toy.RotatedQuadratic()
    path = toy.gd_path(land, lr=0.4, steps=5)
    x = torch.tensor(land.theta0, dtype=torch.float64)
    for n in range(1, 6):
        x = x - 0.4 * land.hessian @ (x - land.center)
        assert torch.allclose(path[n], x, atol=1e-14)
    assert path.shape == (6, 2) and path.dtype == torch.float64


def test_adam_and_clip_paths_use_the_real_optimizer():
    land = toy.DiagonalQuadratic()
    x = torch.tensor(land.theta0, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([x], lr=0.1)
    for _ in range(3):
        adam.zero_grad()
        land.loss(x).backward()
        torch.nn.utils.clip_grad_norm_([x], 0.5)
        adam.step()
    path = toy.gd_path(land, lr=0.1, steps=3, optimizer="adam", clip=0.5)
    assert torch.allclose(path[-1], x.detach(), atol=1e-15)


# -- landscapes and grids -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(toy.LANDSCAPES))
def test_landscapes_batch_and_have_their_minimum_at_the_center(name):
    land = toy.make_landscape(name)
    points = torch.randn(4, 3, 2, dtype=torch.float64)
    values = land(points)
    assert values.shape == (4, 3)
    assert torch.allclose(values[1, 2], land(points[1, 2]))
    assert float(land(torch.zeros(2, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-15)
    assert float(land.grad((0.0, 0.0)).norm()) < 1e-12
    assert 0.3 < float(land.grad(land.theta0).norm()) < 2.5     # suits the gate's cold start


def test_contour_grid_orientation():
    land = toy.DiagonalQuadratic(h=(1.0, 5.0))
    xs, ys, zs = toy.contour_grid(land, bounds=((-1.0, 2.0), (-3.0, 1.0)), n=7)
    assert xs.shape == (7,) and ys.shape == (7,) and zs.shape == (7, 7)
    i, j = 1, 5
    assert zs[i, j] == pytest.approx(float(land(torch.stack([xs[j], ys[i]]))))


def test_surge_moves_the_loss_from_its_step_on():
    base = toy.DiagonalQuadratic()
    surge = toy.Surge(base, at_step=3, shift=(1.0, -1.0))
    x = torch.tensor([0.5, 0.5], dtype=torch.float64)
    assert float(surge(x, step=2)) == float(base(x))
    assert float(surge(x, step=3)) == float(base(x - torch.tensor([1.0, -1.0], dtype=torch.float64)))


# -- the gate when the gradient noise surges ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(toy.LANDSCAPES))
@pytest.mark.parametrize(("k", "alpha"), [(2, 0.5), (5, 1.0), (10, 1.0), (20, 0.5)])
def test_gate_shuts_off_after_the_surge_and_passes_drop_to_one(name, k, alpha):
    gate = toy.gate_snapshot(toy.make_landscape(name), lr=0.3, k=k, alpha=alpha, steps=30, surge_step=12)
    shut = gate["shutoff_step"]
    assert shut is not None and shut > gate["warmup"] and shut == 13
    assert all(p == 3 for s, p in zip(gate["step"], gate["passes"]) if s < shut)
    assert all(p == 1 for s, p in zip(gate["step"], gate["passes"]) if s >= shut)
    assert all(math.isnan(z) for s, z in zip(gate["step"], gate["z"]) if s >= shut)
    assert gate["z"][shut - 2] >= gate["tau"]
    assert not any(gate["fallback"])                          # the base noise keeps the probes alive


def test_large_tau_keeps_the_gate_open():
    gate = toy.gate_snapshot(toy.DiagonalQuadratic(), lr=0.3, tau=50.0, steps=20)
    assert gate["shutoff_step"] is None and set(gate["passes"]) == {3}


# -- bad inputs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("call", "name"), [
    (lambda: toy.run_rule("ppo", toy.DiagonalQuadratic()), "rule_name"),
    (lambda: toy.run_rule("gxpo", "diagonal"), "landscape"),
    (lambda: toy.run_rule("gxpo", toy.DiagonalQuadratic(), theta0=(1.0, 2.0, 3.0)), "theta0"),
    (lambda: toy.run_rule("gxpo", toy.DiagonalQuadratic(), lr=0.0), "lr"),
    (lambda: toy.run_rule("gxpo", toy.DiagonalQuadratic(), steps=-1), "steps"),
    (lambda: toy.run_rule("gxpo", toy.DiagonalQuadratic(), optimizer="rmsprop"), "optimizer"),
    (lambda: toy.run_rule("gxpo", toy.DiagonalQuadratic(), clip=-1.0), "clip"),
    (lambda: toy.run_rule("gxpo", toy.DiagonalQuadratic(), noise=-0.1), "noise"),
    (lambda: toy.run_rule("gxpo", toy.DiagonalQuadratic(), k=1), "k"),
    (lambda: toy.run_rule("gxpo", toy.DiagonalQuadratic(), max_grad_norm=1.0), "max_grad_norm"),
    (lambda: toy.run_rule("grpo", toy.DiagonalQuadratic(), k=5), "k"),
    (lambda: toy.extrapolation_error(toy.DiagonalQuadratic(), k=1), "k"),
    (lambda: toy.extrapolation_error(toy.DiagonalQuadratic(), alpha=0.5), "alpha"),
    (lambda: toy.make_landscape("saddle"), "landscape"),
    (lambda: toy.DiagonalQuadratic(h=(1.0, math.inf)), "h"),
    (lambda: toy.Surge(toy.DiagonalQuadratic(), at_step=0), "at_step"),
    (lambda: toy.contour_grid(toy.DiagonalQuadratic(), n=1), "n"),
    (lambda: toy.contour_grid(toy.DiagonalQuadratic(), bounds=((1.0, 0.0), (0.0, 1.0))), "bounds[0]"),
    (lambda: toy.build_explorer(K=1), "K"),
    (lambda: toy.build_explorer(r_min=3.0, r_max=-2.0), "(r_min, r_max)"),
    (lambda: toy.build_explorer(omega=1.5), "omega"),
    (lambda: toy.build_explorer(landscape="saddle"), "landscape"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=r"^" + _escape(name) + r"="):
        call()


def _escape(text):
    import re

    return re.escape(text)


# -- the explorer ---------------------------------------------------------------------------------------------
def _trace(fig, prefix):
    matches = [t for t in fig.data if t.name.startswith(prefix)]
    assert len(matches) == 1, [t.name for t in fig.data]
    return matches[0]


def test_explorer_builds_and_redraws_when_a_control_moves():
    import plotly.graph_objects as go

    explorer = toy.build_explorer(K=5, alpha=1.0, lr=0.3)
    box, figures, update, controls = explorer
    assert set(figures) == {"paths", "scale", "gate"}
    assert all(isinstance(f, go.FigureWidget) for f in figures.values())
    paths = figures["paths"]
    corrective, star = _trace(paths, "GXPO corrective"), _trace(paths, "theta_")
    before = (corrective.x, corrective.y)
    assert star.name == "theta_6 (target)"
    assert corrective.x[-1] == pytest.approx(star.x[0], abs=1e-12)    # alpha = 1: GXPO lands on the star

    controls["K"].value = 9                                           # the observer redraws
    corrective, star = _trace(paths, "GXPO corrective"), _trace(paths, "theta_")
    assert (corrective.x, corrective.y) != before
    assert star.name == "theta_10 (target)"
    assert corrective.x[-1] == pytest.approx(star.x[0], abs=1e-12)
    assert corrective.y[-1] == pytest.approx(star.y[0], abs=1e-12)
    assert "theta_10" in box.children[1].value                        # the readout follows

    # a stability clamp that binds (r = 0.7, 0.91 at lr 0.3): GXPO leaves the star
    controls["r_clamp"].value = (-2.0, 0.8)
    corrective, star = _trace(paths, "GXPO corrective"), _trace(paths, "theta_")
    miss = math.hypot(corrective.x[-1] - star.x[0], corrective.y[-1] - star.y[0])
    assert miss > 1e-3
    dots = _trace(figures["scale"], "this step's")
    assert max(dots.x) == pytest.approx(0.8)                          # the clamped ratio is drawn
    clamp = _trace(figures["scale"], "stability clamp")
    assert clamp.x[3] == pytest.approx(0.8)

    # gate controls redraw the gate figure; landscape and optimizer redraw the paths
    controls["tau"].value = 3.0
    assert _trace(figures["gate"], "tau").y == (3.0, 3.0)
    z_before = _trace(figures["gate"], "gate z").y
    controls["omega"].value = 0.5
    assert _trace(figures["gate"], "gate z").y != z_before
    contour_before = paths.data[0].z
    controls["landscape"].value = "banana"
    assert paths.data[0].z != contour_before
    gd_before = _trace(paths, "true GD").x
    controls["optimizer"].value = "adam"
    assert _trace(paths, "true GD").x != gd_before
    update()                                                          # callable directly too


def test_static_figures_have_named_traces():
    land = toy.DiagonalQuadratic()
    snap = toy.lookahead_snapshot(land, lr=0.3, k=5)
    assert len(toy.paths_figure(snap, land).data) == len(toy.PATH_TRACES)
    gate = toy.gate_snapshot(land, lr=0.3)
    fig = toy.gate_figure(gate)
    assert _trace(fig, "shut off").x == (12.5, 12.5)
    scale = toy.scale_figure(ks=(2, 5), snapshot=snap)
    assert len(scale.data) == 2 * 2 + 2
    used = _trace(scale, "K=5: clamped").y
    assert max(used) == pytest.approx(3.5) and min(used) == pytest.approx(1.0)
