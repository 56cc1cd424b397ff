"""GXPO.from_version: each version of the authors' code against a two-step sequence computed by hand.

The reference below is written line by line from the authors' code (SwapniL-afk-now/final-gxpo:
dp_actor.py and gxpo_state.py at 1aeea653 for V1 and 51b5648d for V2; gxpo_state fid:57973538673 for
V3; gxpo_state fid:58012446353 and GXPO_OPTIMIZER_AWARE_RETENTION.md for V5), on one flat float64
vector and plain SGD, not from the library: it shares no code with gxpo_lib.
"""

import math

import pytest
import torch

from gxpo_lib import GXPO
from gxpo_lib.core.rules import VERSIONS

K, ALPHA, LR, CLIP, DELTA = 5, 0.5, 1.0, 2.0, 1e-8
# L(x) = sum 1/2 h x^2 + b x, so g = h x + b. Coordinates: r = 1 - c h (c the clip factor) per step;
# h = 0 (r = 1 exactly: V1's closed form gives q = 1, Horner K/2), h = -2 (r ~ 3: V2 q ~ 30),
# h = 3 (r ~ -2: V2 q < 0), a tiny g0 (active absolutely, inactive relatively) and g0 = 0.
H = torch.tensor([0.5, 0.0, -2.0, 3.0, 0.8, 1.0], dtype=torch.float64)
B = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
X0 = torch.tensor([4.0, 0.3, 0.5, 0.2, 1e-6, 0.0], dtype=torch.float64)


def grad(x):
    return H * x + B


def clip_factor(norm):
    return min(1.0, CLIP / (norm + 1e-6))


def horner(r, n):
    out = torch.ones_like(r)
    for _ in range(n - 1):
        out = out * r + 1.0
    return out


def reference_step(version, x0, gate, momentum_buf=None, gate_signal=None):
    """One GXPO step as the authors' `version` computes it. Returns (x_next, momentum buffer, z)."""
    g = grad(x0)
    n0 = float(g.norm())
    c0 = clip_factor(n0)
    if version == "v5":  # SGD with momentum 0.9, its buffer from the clipped gradient; d = buffer
        buf1 = c0 * g if momentum_buf is None else 0.9 * momentum_buf + c0 * g
        x1 = x0 - LR * buf1
        g1_raw = grad(x1)
        c1 = clip_factor(float(g1_raw.norm()))
        buf2 = 0.9 * buf1 + c1 * g1_raw
        x2 = x1 - LR * buf2
        d0, d1 = (x0 - x1) / LR, (x1 - x2) / LR
        active = d0.abs() > 1e-3 * d0.square().mean().sqrt()
        r = torch.where(active, d1 / torch.where(active, d0, 1.0), 1.0).clamp(-2.0, 3.0).nan_to_num(nan=1.0)
        s2 = 1.0 + r
        q = torch.where(s2.abs() > DELTA, horner(r, K) / s2, 1.0).nan_to_num(nan=1.0, posinf=1.0, neginf=1.0)
        q = torch.where(active, q.clamp(1.0, K / 2 + 1), 1.0)
    else:
        g0 = c0 * g if version == "v1" else g          # V1 captures after clipping
        x1 = x0 - LR * c0 * g
        g_1 = grad(x1)
        c1 = clip_factor(float(g_1.norm()))
        g1 = c1 * g_1 if version == "v1" else g_1
        x2 = x1 - LR * c1 * g_1
        if version == "v1":                            # every coordinate, safe denominator, closed form
            sgn = torch.where(g0 >= 0, 1.0, -1.0)
            r = (g1 / (g0.abs().clamp(min=DELTA) * sgn)).clamp(-2.0, 3.0).nan_to_num(nan=1.0)
            s_k = (1.0 - r.pow(K)) / (1.0 - r + DELTA)
            s_2 = (1.0 - r * r) / (1.0 - r + DELTA)
            q = (s_k / (s_2 + DELTA)).clamp(1.0, K / 2 + 1)
        else:                                          # V2 / V3: active set, Horner; V2 does not clamp q
            active = g0.abs() > DELTA
            r = torch.where(active, g1 / torch.where(active, g0, 1.0), 1.0).clamp(-2.0, 3.0).nan_to_num(nan=1.0)
            s2 = 1.0 + r
            q = torch.where(s2.abs() > DELTA, horner(r, K) / s2, 1.0).nan_to_num(nan=1.0, posinf=1.0, neginf=1.0)
            q = torch.where(active, q if version == "v2" else q.clamp(1.0, K / 2 + 1), 1.0)
    x_tilde = x0 + ALPHA * q * (x2 - x0)
    g_s = grad(x_tilde)
    n_s = float(g_s.norm())
    c_s = clip_factor(n_s)
    if version == "v5":                                # transactional: the buffer the step started with
        buf = c_s * g_s if momentum_buf is None else 0.9 * momentum_buf + c_s * g_s
        return x_tilde - LR * buf, buf, gate_window(gate, gate_signal)
    x_next = x_tilde - LR * c_s * g_s
    if version == "v3":
        return x_next, None, gate_window(gate, n_s)
    return x_next, None, gate_ema(gate, n_s * c_s if version == "v1" else n_s, version)


def gate_ema(gate, h, version):
    """GXPOState V1 (|z| >= tau, no warm-up) / V2 (z >= tau after 2 observations), tau = 0.5."""
    z = (h - gate["mu"]) / (gate["sigma"] + 1e-8)
    mu_old = gate["mu"]
    gate["sigma"] = max(0.01, ((1 - 0.1) * gate["sigma"] ** 2 + 0.1 * (h - mu_old) ** 2) ** 0.5)
    gate["mu"] = (1 - 0.1) * mu_old + 0.1 * h
    gate["seen"] += 1
    trips = abs(z) >= 0.5 if version == "v1" else (gate["seen"] > 2 and z >= 0.5)
    gate["open"] = gate["open"] and not trips
    return z


def gate_window(gate, h):
    """V3+ rolling window of 30: z = 0 until it is full."""
    gate.setdefault("history", []).append(h)
    return 0.0


@pytest.mark.parametrize("version", ["v1", "v2", "v3", "v5"])
def test_two_steps_match_the_authors_code_by_hand(version):
    x = X0.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([x], lr=LR, momentum=0.9 if version == "v5" else 0.0)
    rule = GXPO.from_version(version, optimizer, k=K, alpha=ALPHA, max_grad_norm=CLIP)

    def closure():
        loss = (0.5 * H * x * x + B * x).sum()
        loss.backward()
        return loss

    expected, buf = X0.clone(), None
    gate = {"mu": 1.0, "sigma": 1.0, "seen": 0, "open": True}
    for step in (1, 2):
        signal = 2.0 + step if version == "v5" else None
        if gate["open"]:
            expected, buf, z = reference_step(version, expected, gate, buf, signal)
            info = rule.step(closure, gate_signal=signal)
            assert info.active and info.backward_passes == 3
            assert info.gate_z == pytest.approx(z, abs=1e-12)
        else:  # the gate shut after step 1: a plain clipped SGD step
            info = rule.step(closure, gate_signal=signal)
            g = grad(expected)
            expected = expected - LR * clip_factor(float(g.norm())) * g
            assert not info.active and info.backward_passes == 1
        torch.testing.assert_close(x.detach(), expected, rtol=1e-12, atol=1e-12)
        assert rule.gate.is_open == gate["open"]
    assert (version == "v1") == (not gate["open"])  # only V1's cold start trips here (|z| on a small norm)


def test_versions_differ_where_the_notes_say():
    """The same first probe pair gives V2's unclamped q (30.25-like and negative), V3's clamp, V1's q(1) = 1."""
    infos = {}
    for version in ("v1", "v2", "v3"):
        x = X0.clone().requires_grad_(True)
        rule = GXPO.from_version(version, torch.optim.SGD([x], lr=LR), k=K, alpha=ALPHA, max_grad_norm=None,
                                 gate=None)

        def closure(x=x):
            loss = (0.5 * H * x * x + B * x).sum()
            loss.backward()
            return loss

        infos[version] = rule.step(closure)
    assert infos["v2"].scale_max == pytest.approx(30.25)    # r = 3 exactly without clipping
    assert infos["v3"].scale_max == K / 2 + 1
    # V1: r = 1 -> closed form 0 -> clamped to 1; Horner gives K/2 = 2.5 there
    assert infos["v1"].scale_mean < infos["v3"].scale_mean


def test_from_version_sets_every_option_and_overrides_win():
    x = torch.zeros(2, requires_grad=True)
    rule = GXPO.from_version("v5", torch.optim.AdamW([x], lr=1e-3), k=10, alpha=0.3, tau=2.0)
    preset = VERSIONS["v5"]
    for name, value in preset.items():
        if name != "gate":
            assert rule.settings()[name] == value
    assert (rule.k, rule.alpha, rule.gate.tau, rule.gate.patience, rule.gate.signal) == (10, 0.3, 2.0, 3, "entropy")
    assert rule.gate.freeze_baseline and rule.gate.mode == "window"
    assert GXPO.from_version("v2", torch.optim.SGD([x], lr=0.1), gate=None).gate is None
    with pytest.raises(ValueError, match="^version='v4' is invalid"):
        GXPO.from_version("v4", torch.optim.SGD([x], lr=0.1))
    assert math.isclose(VERSIONS["v2"]["gate"]["warmup"], 2)
