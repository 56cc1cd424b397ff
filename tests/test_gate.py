"""ShutoffGate against values computed by hand (spec section 3)."""

import math

import pytest

from gxpo_lib import ShutoffGate
from gxpo_lib.core.gate import sfpo_official_gate


def hand_ema(values, omega=0.1):
    """The spec's EMA recursion written out independently: returns the z of each observation."""
    mu, sigma, zs = 1.0, 1.0, []
    for h in values:
        zs.append((h - mu) / (sigma + 1e-8))
        sigma = max(0.01, math.sqrt((1 - omega) * sigma**2 + omega * (h - mu) ** 2))
        mu = (1 - omega) * mu + omega * h
    return zs


def test_ema_first_observations_by_hand():
    gate = ShutoffGate(tau=100.0, warmup=0)
    # H = 3 from mu = 1, sigma = 1: z = 2; sigma^2 = 0.9 + 0.1*4 = 1.3; mu = 1.2.
    assert gate.observe(3.0) == pytest.approx(2.0)
    assert gate.sigma == pytest.approx(math.sqrt(1.3))
    assert gate.mu == pytest.approx(1.2)
    # H = 1.2: z = 0; sigma^2 = 0.9 * 1.3 = 1.17; mu stays 1.2.
    assert gate.observe(1.2) == pytest.approx(0.0)
    assert gate.sigma == pytest.approx(math.sqrt(1.17))


def test_ema_sigma_floor():
    gate = ShutoffGate(tau=100.0, warmup=0)
    for _ in range(200):
        gate.observe(1.0)
    assert gate.sigma == 0.01


def test_ema_sequence_matches_independent_recursion():
    values = [0.3, 0.5, 0.4, 0.45, 2.0, 0.5, 0.7, 5.0]
    gate = ShutoffGate(tau=1e9, omega=0.2, warmup=0)
    assert [gate.observe(v) for v in values] == pytest.approx(hand_ema(values, omega=0.2))


def test_warmup_observations_cannot_trip():
    gate = ShutoffGate(tau=0.5, warmup=2)
    assert gate.observe(10.0) > 0.5 and gate.is_open      # warm-up 1
    assert gate.observe(10.0) > 0.5 and gate.is_open      # warm-up 2
    z = gate.observe(30.0)
    assert z >= 0.5 and not gate.is_open
    assert gate.num_observations == 3


def test_patience_needs_consecutive_violations():
    values = [1.0, 1.0, 5.0, 1.0, 5.0, 9.0]
    zs = hand_ema(values)
    gate = ShutoffGate(tau=1.0, warmup=2, patience=2)
    states = []
    for step, v in enumerate(values):
        gate.observe(v, step=step)
        states.append(gate.is_open)
    # violations (z >= 1 after warm-up) at indices 2, 4 and 5; only 4-5 are consecutive.
    assert [z >= 1.0 for z in zs[2:]] == [True, False, True, True]
    assert states == [True, True, True, True, True, False]
    assert gate.shutoff_step == 6


def test_closed_gate_stays_closed_when_permanent_and_reopens_otherwise():
    permanent = ShutoffGate(tau=0.5, warmup=0)
    permanent.observe(50.0)
    assert [permanent.begin_step() for _ in range(5)] == [False] * 5

    temporary = ShutoffGate(tau=0.5, warmup=0, permanent=False, reopen_after=3)
    temporary.observe(50.0)
    assert [temporary.begin_step() for _ in range(5)] == [False, False, False, True, True]
    assert temporary.mu != 1.0  # statistics kept across the closed period


def test_window_mode_scores_against_preceding_window():
    gate = ShutoffGate(tau=100.0, warmup=0, mode="window", window=3)
    assert [gate.observe(v) for v in (1.0, 2.0, 3.0)] == [0.0, 0.0, 0.0]
    mean, std = 2.0, math.sqrt(2 / 3)
    assert gate.observe(5.0) == pytest.approx((5.0 - mean) / (std + 1e-9))
    # the window now holds 2, 3, 5
    mean, std = 10 / 3, math.sqrt(((2 - 10 / 3) ** 2 + (3 - 10 / 3) ** 2 + (5 - 10 / 3) ** 2) / 3)
    assert gate.observe(4.0) == pytest.approx((4.0 - mean) / (std + 1e-9))


def test_window_including_current_caps_z_like_sfpo():
    gate = sfpo_official_gate()
    zs = [gate.observe(1.0 + 0.01 * (i % 3)) for i in range(29)] + [gate.observe(1000.0)]
    assert zs[:29] == [0.0] * 29
    assert zs[-1] <= math.sqrt(29) + 1e-9  # the scored value sits inside its own window
    assert not gate.is_open


def test_nonfinite_observation_is_ignored():
    gate = ShutoffGate(warmup=0)
    assert math.isnan(gate.observe(float("nan")))
    assert gate.num_observations == 0 and gate.is_open


def test_state_dict_round_trip_continues_identically():
    values = [0.2, 0.3, 0.25, 0.4, 0.35, 3.0, 0.3]
    a = ShutoffGate(tau=2.0, warmup=1, patience=2)
    for v in values[:4]:
        a.observe(v)
    b = ShutoffGate()
    b.load_state_dict(a.state_dict())
    assert [a.observe(v) for v in values[4:]] == [b.observe(v) for v in values[4:]]
    assert a.state_dict() == b.state_dict()


@pytest.mark.parametrize("kwargs, name", [
    ({"tau": 0.0}, "tau"), ({"tau": -1}, "tau"), ({"omega": 0.0}, "omega"), ({"omega": 1.0}, "omega"),
    ({"warmup": -1}, "warmup"), ({"patience": 0}, "patience"), ({"mode": "median"}, "mode"),
    ({"signal": "loss"}, "signal"), ({"window": 1}, "window"), ({"reopen_after": 0}, "reopen_after"),
    ({"tau": float("nan")}, "tau"),
])
def test_invalid_settings_name_the_setting_and_range(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}=.* is invalid: allowed"):
        ShutoffGate(**kwargs)


def test_update_settings_validates_before_changing():
    gate = ShutoffGate(tau=0.5)
    with pytest.raises(ValueError, match="omega"):
        gate.update_settings(tau=2.0, omega=3.0)
    assert gate.tau == 0.5
    gate.update_settings(tau=2.0)
    assert gate.tau == 2.0


# -- the cold start, made visible and optional ----------------------------------------------------
def test_unit_init_is_disarmed_for_a_small_signal_and_warmup_init_is_not():
    """A clipped run's corrective norm sits near 0.05: from mu = sigma = 1 every z is negative until mu
    has decayed towards it, so a doubling of the signal goes unnoticed for many observations."""
    signal = [0.05, 0.052, 0.048, 0.05] + [0.1] * 3       # the signal doubles at observation 5
    unit = ShutoffGate(tau=0.5, warmup=2)                  # V2: mu = sigma = 1
    zs = [unit.observe(v) for v in signal]
    assert all(z < 0 for z in zs) and unit.is_open          # disarmed: the surge scores below 0
    assert zs == pytest.approx(hand_ema(signal))
    warm = ShutoffGate(tau=0.5, warmup=2, init="warmup")
    assert [warm.observe(v) for v in signal[:2]] == [0.0, 0.0]   # warm-up observations are only collected
    assert warm.mu == pytest.approx(0.051) and warm.sigma == pytest.approx(0.01)  # std 0.001, floored at 0.01
    # observation 3 by hand: z = (0.048 - 0.051) / 0.01 = -0.3; sigma^2 = 0.9e-4 + 0.1 * 9e-6 -> 0.0095,
    # floored at 0.01; mu = 0.9 * 0.051 + 0.1 * 0.048 = 0.0507
    assert warm.observe(0.048) == pytest.approx(-0.3)
    assert warm.mu == pytest.approx(0.0507) and warm.sigma == 0.01
    warm.observe(0.05)
    assert warm.observe(0.1) > 0.5 and not warm.is_open     # the doubling trips at once


def test_warmup_init_needs_warmup_observations_and_resumes():
    with pytest.raises(ValueError, match="^init='warmup' is invalid with warmup=0"):
        ShutoffGate(init="warmup", warmup=0)
    gate = ShutoffGate(init="warmup", warmup=3, tau=1e9)
    gate.observe(2.0)
    twin = ShutoffGate(init="warmup", warmup=3, tau=1e9)
    twin.load_state_dict(gate.state_dict())
    for g in (gate, twin):
        g.observe(4.0)
        g.observe(3.0)
    assert (gate.mu, gate.sigma) == (twin.mu, twin.sigma) == (3.0, pytest.approx(math.sqrt(2 / 3)))


def test_two_sided_trips_on_a_drop_like_v1():
    gate = ShutoffGate(tau=0.5, warmup=0, two_sided=True)
    assert gate.observe(0.05) == pytest.approx(-0.95) and not gate.is_open   # V1's first-step trip
    one_sided = ShutoffGate(tau=0.5, warmup=0)
    one_sided.observe(0.05)
    assert one_sided.is_open


def test_freeze_baseline_scores_a_streak_against_its_first_baseline():
    history = [1.0, 2.0] * 5                               # mean 1.5, std 0.5 over a window of 10
    frozen = ShutoffGate(mode="window", window=10, tau=2.5, patience=3, warmup=0, freeze_baseline=True)
    moving = ShutoffGate(mode="window", window=10, tau=2.5, patience=3, warmup=0)
    for gate in (frozen, moving):
        for h in history:
            gate.observe(h)
    surge = [3.0, 3.0, 3.0]
    z_frozen = [frozen.observe(v) for v in surge]
    z_moving = [moving.observe(v) for v in surge]
    assert z_frozen == pytest.approx([3.0, 3.0, 3.0], rel=1e-6) and not frozen.is_open
    assert z_moving[0] == pytest.approx(3.0, rel=1e-6) and z_moving[1] < 2.5 and moving.is_open
