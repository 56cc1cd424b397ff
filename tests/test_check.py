"""Exercise checks: each passes the right answer, fails wrong ones with a hint, never raises on the answer.

The right answers here are worked out by hand (or by a plain formula), independently of the library
functions the checks call.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from gxpo_lib.teach import check


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

    from gxpo_lib.teach.headless import NOTEBOOK_DIR

    cells = nbformat.read(NOTEBOOK_DIR / f"{path}.ipynb", as_version=4).cells
    exercises = [i for i, c in enumerate(cells) if c.cell_type == "code" and "fill=fill_solutions" in c.source]
    assert len(exercises) >= 4
    for i in exercises:
        assert "check.fill" not in cells[i].source and "..." in cells[i].source   # a blank, no solution on show
        following = next(c for c in cells[i + 1:] if c.cell_type == "markdown")
        assert following.source.startswith("<details><summary>Show the solution</summary>")


# ---------------------------------------------------------------- what a careful person types


def _S(r: float, n: int) -> float:
    """S_n(r) = 1 + r + ... + r^(n-1), by hand."""
    return sum(r**i for i in range(n))


def _q(r: float, k: int) -> float:
    """q = S_K(r) / S_2(r) clamped to [1, K/2 + 1], by hand."""
    return min(max(_S(r, k) / _S(r, 2), 1.0), k / 2 + 1)


def _gate_z_by_hand(history, value, omega=0.1):
    mu, var = 1.0, 1.0
    for h in history:
        var = max((1 - omega) * var + omega * (h - mu) ** 2, 0.01**2)
        mu = (1 - omega) * mu + omega * h
    z = (value - mu) / (math.sqrt(var) + 1e-8)
    var = max((1 - omega) * var + omega * (value - mu) ** 2, 0.01**2)   # the slip: statistics updated with H
    mu = (1 - omega) * mu + omega * value
    return z, (value - mu) / (math.sqrt(var) + 1e-8)


_Z, _Z_AFTER = _gate_z_by_hand([1.0, 1.2], 3.0)                            # 2.1946, and the slip 1.680
_A = 0.5 / (math.sqrt(1 / 3) + 1e-6)                                      # 0.8660
_R_CAP = float(next(r.real for r in np.roots([1, 1, 1, -2.5, -2.5]) if -1 < r.real < 0 and abs(r.imag) < 1e-12))
_R_SMALL, _R_LARGE = [1 - 0.3 * h for h in (1.0, 0.02)], [1 - 1.8 * h for h in (1.0, 0.02)]   # notebook 05's toy

# Every check at the settings its notebook uses: (name, settings, right value worked out by hand, a wrong answer
# from a plausible wrong method, words its hint must hold or None for the general hint).
CASES = [
    ("q_value", dict(r=0.9, k=5), _S(0.9, 5) / _S(0.9, 2), _S(0.9, 5), "S_K(r) alone"),                # 01 ex. 1
    ("geometric_sum", dict(r=-0.5, n=4), 0.625, _S(-0.5, 5), "one term too many"),                       # 01 ex. 2
    ("reposition", dict(theta0=4.0, theta2=1.0, r=0.5, k=4, alpha=0.5), 2.125, 4 + 0.5 * (1 - 4),
     "left out q"),                                                                                      # 01 ex. 3
    ("gate_z", dict(history=[1.0, 1.2], value=3.0, omega=0.1), _Z, _Z_AFTER, "from before"),            # 01 ex. 5
    ("group_advantages", dict(rewards=[1, 0, 0, 1]), [_A, -_A, -_A, _A], [1.0, -1.0, -1.0, 1.0],
     "population std"),                                                                                  # 02 ex. 1
    ("clipped_loss", dict(ratio=1.5, advantage=1.0, eps=0.2), -1.2, 1.2, "the objective"),               # 02 ex. 2
    ("backward_passes", dict(algorithm="gxpo", steps=30, k=5, active_steps=20), 70, 90, "GXPO three"),   # 02 ex. 3
    ("pass_at_k", dict(n=4, c=1, k=2), 0.5, 1 - 0.75**2, "with replacement"),                            # 02 ex. 4
    ("cap_lr", dict(k=5, curvature=1.0), 1 - _R_CAP, 1.0, "r = 0 and q = 1"),                            # 05 ex. 1a
    ("effective_multiplier", dict(r=_R_SMALL, k=5, alpha=0.5), 0.5 * np.mean([_q(r, 5) for r in _R_SMALL]),
     np.mean([_q(r, 5) for r in _R_SMALL]), "multiply by alpha"),                                        # 05 ex. 1b
    ("effective_multiplier", dict(r=_R_LARGE, k=5, alpha=0.5), 0.5 * np.mean([_q(r, 5) for r in _R_LARGE]),
     0.5 * np.mean([_S(r, 5) / _S(r, 2) for r in _R_LARGE]), "clamp each q"),                            # 05 ex. 1b
    ("prediction", dict(actual=0.5 * _q(1 - 1e-4, 5), rtol=0.15), 0.5 * _q(1 - 1e-4, 5), 2.5, None),     # 05 ex. 5
]
WORD_CASES = [  # the checks whose answers are words: (name, settings, right word, wrong word)
    ("jump_direction", dict(r=0.9, k=5, alpha=0.5), "beyond", "short"),                                  # 01 ex. 4
    ("prediction", dict(actual="gxpo", choices=["gd", "matched", "gxpo", "gxpo_noise"]), "gxpo", "gd"),  # 05 ex. 2
]


def _printed(value) -> object:
    """The value as a check prints it: 4 significant figures (a list for an array)."""
    array = np.asarray(value, dtype=np.float64)
    return float(f"{float(array):.4g}") if array.ndim == 0 else [float(f"{v:.4g}") for v in array]


def _sig3(value) -> object:
    """The value rounded to 3 significant figures, as a careful person types it."""
    array = np.asarray(value, dtype=np.float64)
    return float(f"{float(array):.3g}") if array.ndim == 0 else [float(f"{v:.3g}") for v in array]


def test_every_check_has_a_case():
    assert {c[0] for c in CASES} | {c[0] for c in WORD_CASES} == set(check.CHECKS)


@pytest.mark.parametrize("name, settings, right, wrong, hint", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_every_check_takes_its_printed_value_and_its_3_figure_rounding_and_refuses_a_real_slip(
        name, settings, right, wrong, hint, capsys):
    run = check.CHECKS[name]
    shown = run(..., **settings, fill=True).message            # what the check itself prints as the answer
    printed = _printed(right)
    assert (f"{printed:.4g}" if isinstance(printed, float) else f"{printed[0]:.4g}") in shown, shown
    for answer in (printed, _sig3(right)):
        result = run(answer, **settings)
        assert result.ok and result.message.startswith("right: "), (answer, result.message)
    slip = run(wrong, **settings)
    assert not slip.ok and slip.message.startswith("not yet: you gave "), slip.message
    if hint:
        assert hint in slip.message
    assert "Traceback" not in capsys.readouterr().out


@pytest.mark.parametrize("name, settings, right, wrong", WORD_CASES, ids=[c[0] for c in WORD_CASES])
def test_word_checks_take_the_printed_word_and_refuse_the_other(name, settings, right, wrong):
    run = check.CHECKS[name]
    assert right in run(..., **settings, fill=True).message
    assert run(right, **settings).ok and run(right.upper(), **settings).ok
    refused = run(wrong, **settings)
    assert not refused.ok and refused.message.startswith(f"not yet: you gave {wrong!r}")


def test_the_instructors_answers_are_right():
    # each of these once got "not yet" and a hint that the method was wrong
    assert check.q_value(2.155, r=0.9, k=5).ok                                       # 01 ex. 1 "= 2.155"
    for z in (2.195, 2.19):                                                           # 01 ex. 5
        assert check.gate_z(z, history=[1.0, 1.2], value=3.0, omega=0.1).ok
    for lr, value in ((0.3, 1.027), (1.8, 1.467)):                                    # 05 ex. 1b
        assert check.effective_multiplier(value, r=[1 - lr * h for h in (1.0, 0.02)], k=5, alpha=0.5).ok
    for value in (2.13, 2.12):                                                        # 01 ex. 3: 2.125 either way
        assert check.reposition(value, theta0=4.0, theta2=1.0, r=0.5, k=4, alpha=0.5).ok


def test_an_answer_right_only_to_2_figures_is_close_not_a_wrong_method():
    # 0.87 for 0.866 (02 ex. 1), 2.15 (a truncation of 2.1553): "close", never a slip's hint or the method
    close = check.group_advantages([0.87, -0.87, -0.87, 0.87], rewards=[1, 0, 0, 1])
    assert not close.ok and "close" in close.message and "population" not in close.message
    truncated = check.q_value(2.15, r=0.9, k=5)
    assert not truncated.ok and "close" in truncated.message and "S_K(r) /" not in truncated.message
    # a slip to 2 figures still gets the slip's hint (0.44 for 1 - 0.75^2 = 0.4375)
    assert "with replacement" in check.pass_at_k(0.44, n=4, c=1, k=2).message


@pytest.mark.parametrize("k", [2, 3, 5, 10])
def test_no_rounded_right_answer_ever_gets_a_slips_hint(k, capsys):
    # over many r (clamped or not): the 3-figure rounding and the 4-figure print of q are right
    for r in np.linspace(-0.95, 2.9, 157):
        right = float(check.extrapolation.geometric_scale(torch.tensor(r, dtype=torch.float64), k))
        for typed in (float(f"{right:.3g}"), float(f"{right:.4g}")):
            assert check.q_value(typed, r=float(r), k=k).ok, (r, typed)


def test_a_wrong_method_nearly_equal_to_the_right_value_never_steals_a_right_answer():
    # r = 0.9999, K = 5: the raw ratio and the clamped q are the same; S_K alone is far away
    assert check.q_value(2.5, r=0.9999, k=5).ok


def test_two_part_questions_check_both_parts(capsys):
    z = dict(history=[1.0, 1.2], value=3.0, omega=0.1, tau=0.5, warmup=2)
    both = check.gate_z(2.19, **z, shuts="yes")
    assert both.ok and both.message.startswith("right: z = ") and " | yes: " in both.message
    assert check.gate_z(2.195, **z, shuts=True).ok
    second_wrong = check.gate_z(2.19, **z, shuts="no")
    assert not second_wrong.ok and second_wrong.message.startswith("not yet: z: right | shuts: you gave 'no'")
    first_wrong = check.gate_z(_Z_AFTER, **z, shuts="yes")
    assert not first_wrong.ok and "from before" in first_wrong.message and first_wrong.message.endswith("shuts: right")
    assert "fill in the blanks" in check.gate_z(..., **z, shuts=...).message
    assert "shuts: fill in the blank" in check.gate_z(2.19, **z, shuts=...).message
    assert "answer 'yes' or 'no'" in check.gate_z(2.19, **z, shuts="maybe").message
    # a larger tau does not shut on z = 2.19; the second observation is still in the warm-up
    assert check.gate_z(2.19, **(z | {"tau": 3.0}), shuts="no").ok
    assert check.gate_z(0.2108, history=[1.0], value=1.2, omega=0.1, tau=0.1, warmup=2, shuts="no").ok

    loss = dict(ratio=1.5, advantage=1.0, eps=0.2)
    assert check.clipped_loss(-1.2, **loss, stops="yes").ok
    assert not check.clipped_loss(-1.2, **loss, stops="no").ok
    assert not check.clipped_loss(-1.5, **loss, stops="yes").ok                      # the loss part is checked
    assert check.clipped_loss(1.5, ratio=1.5, advantage=-1.0, stops="no").ok          # A < 0: the unclipped term wins
    for blank in (..., None):
        filled = check.gate_z(blank, **z, shuts=blank, fill=True)
        assert filled.ok and filled.message.count("filled with the solution") == 2
        assert check.clipped_loss(blank, **loss, stops=blank, fill=True).ok
    with pytest.raises(ValueError, match="^ratio="):
        check.clipped_loss(-1.2, ratio=[1.5, 0.5], advantage=1.0, stops="yes")


@pytest.mark.parametrize("answer", [None, ..., "abc", 3, [[1.0]], float("nan"), object()])
def test_two_part_checks_never_raise_on_a_hostile_second_answer(answer):
    assert not check.gate_z(2.19, history=[1.0, 1.2], value=3.0, shuts=answer).ok
    assert not check.clipped_loss(-1.2, ratio=1.5, advantage=1.0, stops=answer).ok


# ---------------------------------------------------------------- class mode: fill_solutions = None (auto)


def test_auto_fill_is_off_in_a_plain_process_and_the_switch_forces_it(monkeypatch):
    monkeypatch.delenv(check.HEADLESS_ENV, raising=False)
    assert check.headless() is False and check.resolve_fill(None) is False and check.resolve_fill("auto") is False
    assert check.resolve_fill(True) is True and check.resolve_fill(False) is False
    assert not check.q_value(..., r=0.9, k=5, fill=None).ok                          # a class sees no answer
    monkeypatch.setenv(check.HEADLESS_ENV, "1")                                       # gxpo_lib's headless runner
    assert check.headless() and check.q_value(..., r=0.9, k=5, fill=None).ok
    assert not check.q_value(..., r=0.9, k=5, fill=False).ok                          # False forces it off
    monkeypatch.setenv(check.HEADLESS_ENV, "0")
    assert not check.headless()
    with pytest.raises(ValueError, match="^fill="):
        check.q_value(..., r=0.9, k=5, fill="yes")


def test_auto_fill_is_off_in_a_fresh_python_process():
    env = {k: v for k, v in os.environ.items() if k != check.HEADLESS_ENV}
    code = ("from gxpo_lib.teach import check; "
            "print(check.resolve_fill(None), check.q_value(..., r=0.9, k=5, fill=None).ok)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False"


def test_the_headless_runner_sets_the_signal_for_its_kernel_only(monkeypatch, tmp_path):
    import papermill

    from gxpo_lib.teach import headless as notebooks

    seen = {}
    monkeypatch.delenv(check.HEADLESS_ENV, raising=False)
    def fake_papermill(source, output, **kwargs):   # records the environment, writes an empty executed copy
        import nbformat

        seen.setdefault("env", os.environ.get(check.HEADLESS_ENV))
        nbformat.write(nbformat.v4.new_notebook(), output)

    monkeypatch.setattr(papermill, "execute_notebook", fake_papermill)
    notebook = tmp_path / "nb.ipynb"
    notebook.write_text("{}")
    notebooks.execute_notebook(notebook, tmp_path / "out", html=False)
    assert seen["env"] == "1" and check.HEADLESS_ENV not in os.environ                # restored afterwards


@pytest.mark.slow
def test_auto_fill_in_a_kernel_follows_whether_a_person_can_type(monkeypatch):
    """A real kernel: a cell sent as JupyterLab sends it (allow_stdin) leaves the blank; sent as papermill /
    nbclient send it (no stdin) fills it."""
    from jupyter_client.manager import start_new_kernel

    monkeypatch.delenv(check.HEADLESS_ENV, raising=False)
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        code = "from gxpo_lib.teach import check\nprint('OK', check.q_value(..., r=0.9, k=5, fill=None).ok)"
        seen = {True: [], False: []}
        for allow_stdin, texts in seen.items():
            kc.execute_interactive(code, allow_stdin=allow_stdin, timeout=300,
                                   output_hook=lambda m, texts=texts: texts.append(m["content"].get("text", "")))
        seen = {allow: "".join(texts) for allow, texts in seen.items()}
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert "OK False" in seen[True] and "not yet: fill in the blank" in seen[True]
    assert "OK True" in seen[False] and "filled with the solution" in seen[False]


@pytest.mark.parametrize("path", ["01_toy_extrapolation", "02_grpo_vs_gxpo_small_llama",
                                  "05_when_does_extrapolation_pay"])
def test_notebooks_default_to_auto_and_check_every_blank_of_an_exercise(path):
    import nbformat

    from gxpo_lib.teach.headless import NOTEBOOK_DIR

    cells = nbformat.read(NOTEBOOK_DIR / f"{path}.ipynb", as_version=4).cells
    parameters = next(c for c in cells if "parameters" in c.metadata.get("tags", []))
    assert re.search(r"^fill_solutions = None\b", parameters.source, re.MULTILINE)
    exercises = [c for c in cells if c.cell_type == "code" and "fill=fill_solutions" in c.source]
    for cell in exercises:
        if "check.implementation(" in cell.source:   # implement-it: the blank is the learner's function
            functions = re.findall(r"^def (\w+)\(", cell.source, re.MULTILINE)
            assert functions and f"check.implementation({functions[-1]}," in cell.source, cell.source
            continue
        blanks = re.findall(r"^(\w+) = \.\.\.", cell.source, re.MULTILINE)
        calls = cell.source[cell.source.index("check."):]
        assert blanks and all(re.search(rf"[(,=\s]{name}[,)]", calls) for name in blanks), cell.source
