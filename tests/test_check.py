"""Exercise checks: each passes the right answer, fails wrong ones with a hint, never raises on the answer.

The right answers here are worked out by hand (or by a plain formula), independently of the library
functions the checks call.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gxpo_lib import check


def _ok(result: check.CheckResult) -> bool:
    assert isinstance(result, check.CheckResult) and result.message.startswith(("right", "not yet"))
    return result.ok


# ---------------------------------------------------------------- notebook 01


def test_q_value_right_wrong_and_the_clamp(capsys):
    # S_5(0.9) = 4.0951, S_2(0.9) = 1.9.
    assert _ok(check.q_value(4.0951 / 1.9, r=0.9, k=5))
    assert "right: q = 2.155" in capsys.readouterr().out
    assert _ok(check.q_value([1.0, 4.0951 / 1.9], r=[0.0, 0.9], k=5))
    wrong = check.q_value(2.0, r=0.9, k=5)
    assert not wrong.ok and "S_K(r) / S_2(r)" in wrong.message
    assert "S_K(r) alone" in check.q_value(4.0951, r=0.9, k=5).message
    # r = 2.5, K = 3: raw q = 9.75 / 3.5 = 2.786, clamped to K/2 + 1 = 2.5.
    assert _ok(check.q_value(2.5, r=2.5, k=3))
    assert "raw ratio" in check.q_value(9.75 / 3.5, r=2.5, k=3).message
    assert _ok(check.q_value(9.75 / 3.5, r=2.5, k=3, clamp=False))


def test_geometric_sum_and_off_by_one():
    assert _ok(check.geometric_sum(1 + 0.5 + 0.25 + 0.125, r=0.5, n=4))
    assert _ok(check.geometric_sum(4, r=1.0, n=4))
    assert "one term too many" in check.geometric_sum(1.9375, r=0.5, n=4).message
    assert "one term short" in check.geometric_sum(1.75, r=0.5, n=4).message


def test_reposition_on_the_hand_example():
    # eta = 1, K = 4, h = 0.5, theta0 = 4: theta2 = 1, r = 0.5, q = 1.25, alpha = 1 -> theta~ = 0.25.
    assert _ok(check.reposition(0.25, theta0=4.0, theta2=1.0, r=0.5, k=4, alpha=1.0))
    assert _ok(check.reposition(4 + 0.5 * 1.25 * (1 - 4), theta0=4.0, theta2=1.0, r=0.5, k=4, alpha=0.5))
    assert "left out q" in check.reposition(2.5, theta0=4.0, theta2=1.0, r=0.5, k=4, alpha=0.5).message
    assert "only alpha" in check.reposition(0.25, theta0=4.0, theta2=1.0, r=0.5, k=4, alpha=0.5).message


def test_jump_direction_compares_alpha_q_with_one():
    # r = 0.5, K = 4: q = 1.25. alpha = 0.5 -> 0.625 < 1 (short); alpha = 1 -> 1.25 (beyond); 0.8 -> 1 (at).
    assert _ok(check.jump_direction("short", r=0.5, k=4, alpha=0.5))
    assert _ok(check.jump_direction("Back", r=0.5, k=4, alpha=0.5))
    assert _ok(check.jump_direction("beyond", r=0.5, k=4, alpha=1.0))
    assert _ok(check.jump_direction("at", r=0.5, k=4, alpha=0.8))
    wrong = check.jump_direction("beyond", r=0.5, k=4, alpha=0.5)
    assert not wrong.ok and "alpha * q with 1" in wrong.message
    assert "not one of the answers" in check.jump_direction("sideways", r=0.5, k=4, alpha=0.5).message
    assert not check.jump_direction(0.625, r=0.5, k=4, alpha=0.5).ok


def test_gate_z_uses_the_statistics_before_the_observation():
    # mu = sigma = 1 at the start; first H = 3: z = 2, then sigma^2 = 0.9 + 0.4 = 1.3, mu = 1.2.
    assert _ok(check.gate_z(2.0, history=[], value=3.0))
    z2 = (2.0 - 1.2) / (math.sqrt(1.3) + 1e-8)
    assert _ok(check.gate_z(z2, history=[3.0], value=2.0))
    # Scored against the statistics already updated with H = 3: sigma^2 = 1.3, mu = 1.2 -> (3 - 1.2)/1.14.
    slip = (3.0 - 1.2) / math.sqrt(1.3)
    assert "from before" in check.gate_z(slip, history=[], value=3.0).message


# ---------------------------------------------------------------- notebook 02


def test_group_advantages_unbiased_std_and_groups():
    # [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3) = 0.57735 -> +-0.866.
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert _ok(check.group_advantages([a, -a, -a, a], rewards=[1, 0, 0, 1]))
    # Groups of 2: [1, 0] has unbiased std sqrt(0.5) -> +-0.707; [1, 1] is constant -> 0.
    b = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert _ok(check.group_advantages(torch.tensor([b, -b, 0.0, 0.0]), rewards=[1, 0, 1, 1], group_size=2))
    assert "population std" in check.group_advantages([1, -1, -1, 1], rewards=[1, 0, 0, 1]).message
    centred = check.group_advantages([0.5, -0.5, -0.5, 0.5], rewards=[1, 0, 0, 1])
    assert "divide by the group" in centred.message
    assert "shape (4,)" in check.group_advantages([a, -a], rewards=[1, 0, 0, 1]).message


def test_clipped_loss_sign_and_clip():
    # A = 1: rho = 1.5 is clipped to 1.2 -> max(-1.5, -1.2) = -1.2; rho = 0.5 -> max(-0.5, -0.8) = -0.5.
    assert _ok(check.clipped_loss([-1.2, -0.5], ratio=[1.5, 0.5], advantage=1.0))
    # A = -1: rho = 1.5 -> max(1.5, 1.2) = 1.5; rho = 0.5 -> max(0.5, 0.8) = 0.8.
    assert _ok(check.clipped_loss([1.5, 0.8], ratio=[1.5, 0.5], advantage=-1.0))
    assert "negative" in check.clipped_loss([1.2, 0.5], ratio=[1.5, 0.5], advantage=1.0).message
    assert "ignores the clip" in check.clipped_loss([-1.5, -0.5], ratio=[1.5, 0.5], advantage=1.0).message


@pytest.mark.parametrize("algorithm, steps, k, active, passes", [
    ("grpo", 10, 5, None, 10), ("gxpo", 10, 5, None, 30), ("gxpo", 10, 5, 4, 4 * 3 + 6),
    ("sfpo", 3, 3, None, 12), ("sfpo", 5, 2, 0, 5)])
def test_backward_passes_counted_by_the_real_rules(algorithm, steps, k, active, passes):
    assert _ok(check.backward_passes(passes, algorithm=algorithm, steps=steps, k=k, active_steps=active))
    wrong = check.backward_passes(passes + 1, algorithm=algorithm, steps=steps, k=k, active_steps=active)
    assert not wrong.ok and "GXPO three" in wrong.message


def test_pass_at_k_unbiased_and_its_near_misses():
    # n = 4, c = 1, k = 2: 1 - C(3, 2) / C(4, 2) = 1 - 3/6 = 0.5.
    assert _ok(check.pass_at_k(0.5, n=4, c=1, k=2))
    assert _ok(check.pass_at_k(1.0, n=4, c=3, k=2))
    assert "with replacement" in check.pass_at_k(1 - 0.75**2, n=4, c=1, k=2).message
    assert "that is pass@1" in check.pass_at_k(0.25, n=4, c=1, k=2).message


# ---------------------------------------------------------------- notebook 05


def test_cap_lr_finds_where_q_leaves_its_range():
    # K = 3: q = (1 + r + r^2) / (1 + r) reaches K/2 + 1 = 2.5 at r^2 - 1.5 r - 1.5 = 0, r = -0.6861;
    # with h = 2, r = 1 - 2 lr gives lr = 0.8431. K = 4: q = 1 + r^2 = 3 at r = -sqrt(2), lr = (1 + sqrt 2)/h.
    r3 = (1.5 - math.sqrt(2.25 + 6)) / 2
    assert _ok(check.cap_lr((1 - r3) / 2, k=3, curvature=2.0))
    assert _ok(check.cap_lr(1 + math.sqrt(2), k=4, curvature=1.0))
    assert "r = 0 and q = 1" in check.cap_lr(0.5, k=3, curvature=2.0).message
    assert not check.cap_lr(2.0, k=3, curvature=2.0).ok
    with pytest.raises(ValueError, match="^k=2"):
        check.cap_lr(1.0, k=2, curvature=1.0)


def test_effective_multiplier_alpha_times_mean_clamped_q():
    # K = 3: r = 0 -> q = 1; r = 1 -> q = 1.5; r = 3 -> 13/4 = 3.25 clamped to 2.5. Mean 5/3, alpha 0.5.
    assert _ok(check.effective_multiplier(0.5 * 5 / 3, r=[0.0, 1.0, 3.0], k=3, alpha=0.5))
    assert "clamp each q" in check.effective_multiplier(0.5 * (1 + 1.5 + 3.25) / 3, r=[0.0, 1.0, 3.0], k=3,
                                                        alpha=0.5).message
    assert "multiply by alpha" in check.effective_multiplier(5 / 3, r=[0.0, 1.0, 3.0], k=3, alpha=0.5).message


def test_prediction_words_and_numbers():
    assert _ok(check.prediction("GRPO", actual="grpo", choices=["grpo", "gxpo"], explanation="one seed."))
    result = check.prediction("gxpo", actual="grpo", choices=["grpo", "gxpo"])
    assert not result.ok and "'grpo'" in result.message
    assert "not one of" in check.prediction("sfpo", actual="grpo", choices=["grpo", "gxpo"]).message
    assert _ok(check.prediction(0.48, actual=0.5))
    assert not check.prediction(0.3, actual=0.5).ok


# ---------------------------------------------------------------- every check, hostile answers


_RIGHT_CALLS = {
    "q_value": dict(r=0.9, k=5), "geometric_sum": dict(r=0.5, n=4),
    "reposition": dict(theta0=4.0, theta2=1.0, r=0.5, k=4, alpha=1.0),
    "jump_direction": dict(r=0.5, k=4, alpha=0.5), "gate_z": dict(history=[], value=3.0),
    "group_advantages": dict(rewards=[1, 0, 0, 1]), "clipped_loss": dict(ratio=[1.5, 0.5], advantage=1.0),
    "backward_passes": dict(algorithm="gxpo", steps=2), "pass_at_k": dict(n=4, c=1, k=2),
    "cap_lr": dict(k=4, curvature=1.0), "effective_multiplier": dict(r=[0.0, 1.0, 3.0], k=3, alpha=0.5),
    "prediction": dict(actual=0.5),
}


def test_twelve_checks_cover_the_notebooks():
    assert set(check.CHECKS) == set(_RIGHT_CALLS) and len(check.CHECKS) == 12


@pytest.mark.parametrize("name", sorted(_RIGHT_CALLS))
@pytest.mark.parametrize("answer", [None, ..., "abc", True, [[1.0, 2.0], [3.0, 4.0]], float("nan"), {"a": 1},
                                    object(), torch.tensor([float("inf")]), np.array([])])
def test_hostile_answers_say_not_yet_and_never_raise(name, answer, capsys):
    result = check.CHECKS[name](answer, **_RIGHT_CALLS[name])
    assert not result.ok and result.message.startswith("not yet: ")
    assert capsys.readouterr().out.strip() == result.message
    if answer is None or answer is ...:
        assert "fill in the blank" in result.message or "first" in result.message


@pytest.mark.parametrize("name", sorted(_RIGHT_CALLS))
def test_fill_answers_a_blank_with_the_checks_own_right_value_and_keeps_a_real_answer(name, capsys):
    run = check.CHECKS[name]
    for blank in (..., None):
        filled = run(blank, **_RIGHT_CALLS[name], fill=True)
        assert filled.ok and filled.message.startswith("right: ") and "filled with the solution" in filled.message
        assert not run(blank, **_RIGHT_CALLS[name]).ok                  # fill is off by default
    wrong = run("abc", **_RIGHT_CALLS[name], fill=True)                 # a learner's answer is never replaced
    assert not wrong.ok and "filled" not in wrong.message
    assert "Traceback" not in capsys.readouterr().out


def test_nan_and_shape_messages_are_specific():
    assert "NaN or inf" in check.q_value(float("nan"), r=0.9, k=5).message
    assert "one number" in check.q_value([1.0, 2.0], r=0.9, k=5).message
    assert "not str" in check.q_value("2.15", r=0.9, k=5).message or "number" in check.q_value(
        "2.15", r=0.9, k=5).message
    # A tensor that carries a gradient is read without complaint.
    assert _ok(check.q_value(torch.tensor(4.0951 / 1.9, requires_grad=True), r=0.9, k=5))


def test_bad_settings_are_the_authors_errors():
    with pytest.raises(ValueError, match="^k=1"):
        check.q_value(1.0, r=0.5, k=1)
    with pytest.raises(ValueError, match="^algorithm="):
        check.backward_passes(3, algorithm="ppo")
    with pytest.raises(ValueError, match="^ratio="):
        check.clipped_loss(1.0, ratio=[-1.0], advantage=1.0)
    with pytest.raises(ValueError, match="^alpha="):
        check.reposition(1.0, theta0=0.0, theta2=1.0, r=0.5, k=3, alpha=0)


# ---------------------------------------------------------------- blanks, solutions


def test_blanks_are_ellipsis_or_none():
    assert check.is_blank(...) and check.is_blank(None) and not check.is_blank(0) and not check.is_blank(check.SOLVE)


@pytest.mark.parametrize("path", ["01_toy_extrapolation", "02_grpo_vs_gxpo_small_llama",
                                  "05_when_does_extrapolation_pay"])
def test_every_notebook_exercise_is_followed_by_its_folded_solution(path):
    import nbformat

    from gxpo_lib.notebooks import NOTEBOOK_DIR

    cells = nbformat.read(NOTEBOOK_DIR / f"{path}.ipynb", as_version=4).cells
    exercises = [i for i, c in enumerate(cells) if c.cell_type == "code" and "fill=fill_solutions" in c.source]
    assert len(exercises) >= 4
    for i in exercises:
        assert "check.fill" not in cells[i].source and "..." in cells[i].source   # a blank, no solution on show
        following = next(c for c in cells[i + 1:] if c.cell_type == "markdown")
        assert following.source.startswith("<details><summary>Show the solution</summary>")
