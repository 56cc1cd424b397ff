"""gxpo_lib.teach.exercises: implement-it checks against the library, and the find-the-bug rules."""

import pytest
import torch

from gxpo_lib.teach import check, exercises
from gxpo_lib.teach.exercises import IMPLEMENTATIONS, LIBRARY, SLIPS


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_the_library_own_function_is_right(name, capsys):
    result = check.implementation(LIBRARY[name][0], name)          # check.implementation is exercises.implementation
    assert result.ok and result.message.startswith(f"right: your {name} matches") and result.function is not None
    assert capsys.readouterr().out.strip() == result.message


@pytest.mark.parametrize("name,slip", [(n, i) for n in IMPLEMENTATIONS for i in range(len(SLIPS[n]))])
def test_each_known_slip_is_not_yet_with_its_own_hint(name, slip):
    wrong, hint = SLIPS[name][slip]
    result = exercises.implementation(wrong, name)
    assert not result.ok and result.message.startswith("not yet: ") and result.function is None
    if name == "gxpo_step" and slip == 1:   # no corrective step: told by the closure count
        assert "ran the closure 2 times" in result.message
    else:
        assert result.message.endswith(hint)


def test_the_realistic_wrong_implementations_named_in_the_issue():
    population = exercises.implementation(
        lambda r, n: (r.view(-1, n) - r.view(-1, n).mean(1, keepdim=True)).div(
            r.view(-1, n).std(1, unbiased=False, keepdim=True) + 1e-6).reshape(-1), "group_advantages")
    assert "population std" in population.message and "max |diff|" in population.message
    all_positions = exercises.implementation(
        lambda lp, old, a, m, eps=0.2: torch.maximum(-a[:, None] * (lp - old).exp(),
                                                     -a[:, None] * (lp - old).exp().clamp(1 - eps, 1 + eps)).mean(),
        "clipped_token_loss")
    assert "padding included" in all_positions.message
    closed = exercises.implementation(lambda r, k: (((1 - r**k) / (1 - r)) / (1 + r)).clamp(1, k / 2 + 1),
                                      "geometric_scale")
    assert "closed form" in closed.message and "nan at index" in closed.message

    def from_theta2(params, optimizer, closure, k=5, alpha=0.5):
        theta0 = [p.detach().clone() for p in params]
        grads = []
        for _ in range(2):
            optimizer.zero_grad()
            closure()
            grads.append([p.grad.clone() for p in params])
            optimizer.step()
        with torch.no_grad():
            for p, t0, g0, g1 in zip(params, theta0, *grads):
                active = g0.abs() > 1e-8
                r = torch.where(active, g1 / g0, 1.0).clamp(-2, 3)
                q = torch.where(active, exercises.extrapolation.geometric_scale(r, k), 1.0)
                p.copy_(p + alpha * q * (p - t0))        # the slip: from theta2
        optimizer.zero_grad()
        closure()
        optimizer.step()
    jump = exercises.implementation(from_theta2, "gxpo_step")
    assert not jump.ok and "the jump starts from theta2" in jump.message


def test_shape_and_errors_are_reported_never_raised():
    shape = exercises.implementation(lambda r, n: r.view(-1, n), "group_advantages")
    assert shape.message.startswith("not yet: shape [3, 4] vs [12]")
    scalar = exercises.implementation(lambda lp, old, a, m, eps=0.2: lp.sum(1), "clipped_token_loss")
    assert "return one number" in scalar.message
    boom = exercises.implementation(lambda g0, g1, *a: 1 / 0, "retention")
    assert "raised ZeroDivisionError" in boom.message
    detached = exercises.implementation(lambda *a, **kw: LIBRARY["clipped_token_loss"][0](*a, **kw).detach(),
                                        "clipped_token_loss")
    assert "no gradient reaches logprobs" in detached.message


def blank_body(rewards, group_size):
    ...


def raises(*args, **kwargs):
    raise NotImplementedError


def nothing(params, optimizer, closure, k=5, alpha=0.5):
    ...


@pytest.mark.parametrize("fn,name", [(..., "retention"), (None, "geometric_scale"), (blank_body, "group_advantages"),
                                     (raises, "clipped_token_loss"), (nothing, "gxpo_step")])
def test_a_blank_is_filled_with_the_library_function_only_with_fill(fn, name):
    blank = exercises.implementation(fn, name)
    assert not blank.ok and "fill in the blank first" in blank.message
    filled = exercises.implementation(fn, name, fill=True)
    assert filled.ok and "stands in" in filled.message and filled.function is LIBRARY[name][0]


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="name='advantages' is invalid"):
        exercises.implementation(blank_body, "advantages")


# -- find the bug --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hunt():
    return exercises.bug_hunt(tau=2.5, steps=10)


def test_each_bug_shows_in_its_diagnostics(hunt):
    real, jump, corrective, gate = (hunt[n] for n in ("real", "rule 1", "rule 2", "rule 3"))
    assert exercises.MYSTERY == ("c", "a", "b")
    # rule 1 (the jump from theta2): the third pass lands further from theta0 than the jump it reports
    assert real["landing"][0] == pytest.approx(real["jump_norm"][0])
    assert jump["landing"][0] > 1.5 * jump["jump_norm"][0]
    # rule 2 (no corrective step): two passes, and its update is its jump
    assert set(corrective["passes"][:7]) == {2}
    assert corrective["update_norm"][0] == pytest.approx(corrective["jump_norm"][0])
    # rule 3 (the gate after its update): the real rule's path and H, a smaller z that never reaches tau = 2.5
    assert torch.equal(gate["points"][:9], real["points"][:9]) and gate["H"][:9] == real["H"][:9]
    assert all(abs(b) < abs(a) for a, b in zip(real["z"][:8], gate["z"][:8]))
    assert not real["gate_open"][-1] and gate["gate_open"][-1]
    assert "jump_norm" in exercises.bug_table(hunt, steps=[1]).splitlines()[0]


def test_each_bug_is_identified_and_a_wrong_name_gets_a_clue(capsys):
    assert exercises.bug(["c", "a", "b"]).ok and exercises.bug("cab").ok
    assert exercises.bug(["theta2", "corrective", "gate"]).ok
    wrong = check.bug(["a", "a", "b"])
    assert not wrong.ok and wrong.message.startswith("not yet: rule 1: not (a) no corrective step; compare")
    assert "rule 2: right | rule 3: right" in wrong.message
    assert "not one of the letters" in exercises.bug(["x", "a", "b"]).message
    assert "expected three answers" in exercises.bug("ab").message
    assert "fill in the blank first" in exercises.bug(...).message
    filled = exercises.bug(..., fill=True)
    assert filled.ok and "filled" in filled.message
    assert "Traceback" not in capsys.readouterr().out


def test_the_bugged_gate_scores_against_a_baseline_that_holds_the_value():
    real, bugged = exercises.ShutoffGate(tau=9.0, warmup=0), exercises.GateScoredAfterUpdate(tau=9.0, warmup=0)
    for h in (1.0, 1.2):
        real.observe(h), bugged.observe(h)
    z_real, z_bug = real.observe(100.0), bugged.observe(100.0)
    assert z_real > 50 and z_bug < 0.9 / 0.1**0.5             # the bugged z saturates at 0.9 / sqrt(omega)
