"""Tests for gxpo_lib.core.losses: independent loop/numpy references, TRL's own code, gradients, errors."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gxpo_lib.core.losses import (
    aggregate_loss,
    clip_stats,
    clipped_surrogate,
    group_advantages,
    grpo_objective,
    kl_k3,
    masked_mean,
    per_token_logprobs,
    policy_loss,
    token_entropy,
)

LOSS_TYPES = ["token_mean", "grpo", "dr_grpo", "dapo"]


def _batch(seed: int = 0, b: int = 6, t: int = 7, spread: float = 0.4):
    """Random [B, T] log-probs, old log-probs, [B] advantages and a ragged mask (one row empty)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logprobs = (old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[-1] = 0
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).to(torch.float64)
    return logprobs, old, adv, mask


def _loop_reference(logprobs, old, adv, mask, loss_type, eps_low=0.2, eps_high=0.2, max_len=None, n_items=None):
    """The spec's formulas, written as plain Python loops over floats."""
    lp, ol, m = logprobs.detach().tolist(), old.tolist(), mask.tolist()
    a = adv.tolist()
    per_seq_sum, per_seq_n = [], []
    for i in range(len(lp)):
        s, n = 0.0, 0.0
        for j in range(len(lp[i])):
            rho = math.exp(lp[i][j] - ol[i][j])
            clipped = min(max(rho, 1 - eps_low), 1 + eps_high)
            s += m[i][j] * max(-a[i] * rho, -a[i] * clipped)
            n += m[i][j]
        per_seq_sum.append(s)
        per_seq_n.append(n)
    total, count = sum(per_seq_sum), sum(per_seq_n)
    if loss_type == "token_mean":
        return total / count
    if loss_type == "grpo":
        return sum(s / max(n, 1.0) for s, n in zip(per_seq_sum, per_seq_n)) / len(lp)
    if loss_type == "dr_grpo":
        return total / (len(lp) * max_len)
    return total / (count if n_items is None else n_items)


# ---------------------------------------------------------------- advantages


def test_group_advantages_match_numpy_unbiased_std():
    rng = np.random.default_rng(0)
    r = rng.random(24)
    got = group_advantages(torch.tensor(r), 6).numpy()
    grp = r.reshape(4, 6)
    want = ((grp - grp.mean(1, keepdims=True)) / (grp.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_group_advantages_none_and_batch_scales():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    centred = r - r.view(2, 4).mean(1).repeat_interleave(4)
    assert torch.allclose(group_advantages(r, 4, scale="none"), centred)
    assert torch.allclose(group_advantages(r, 4, scale="batch", eps=0.0), centred / r.std())


def test_equal_reward_groups_are_exactly_zero():
    r = torch.tensor([0.7, 0.7, 0.7, 1.0, 0.0, 1.0, 0.1, 0.1, 0.1], dtype=torch.float32)
    for scale in ("group", "batch", "none"):
        adv = group_advantages(r, 3, scale=scale)
        assert torch.equal(adv[:3], torch.zeros(3)) and torch.equal(adv[6:], torch.zeros(3))
        assert adv[3:6].abs().sum() > 0


def test_group_size_one_gives_zero_and_ints_are_accepted():
    assert torch.equal(group_advantages(torch.tensor([1.0, 0.0, 3.0]), 1), torch.zeros(3))
    adv = group_advantages(torch.tensor([1, 0, 0, 1]), 2)
    assert adv.dtype == torch.float32 and torch.allclose(adv, torch.tensor([1, -1, -1, 1.0]) / (2**0.5 + 1e-6))


def test_group_advantages_match_trl_lines():
    """TRL 1.16.0 grpo_trainer.py L2765-2787 (sum_then_normalize), re-run with TRL's own nanstd."""
    utils = pytest.importorskip("trl.trainer.utils")
    rewards = torch.rand(32, generator=torch.Generator().manual_seed(1))
    g = 8
    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
    std_group = utils.nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g)
    std_batch = utils.nanstd(rewards).expand_as(rewards)
    assert torch.allclose(group_advantages(rewards, g, "group", 1e-4), (rewards - mean) / (std_group + 1e-4))
    assert torch.allclose(group_advantages(rewards, g, "batch", 1e-4), (rewards - mean) / (std_batch + 1e-4))
    assert torch.allclose(group_advantages(rewards, g, "none"), rewards - mean)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"rewards": torch.zeros(5), "group_size": 2}, "group_size=2"),
        ({"rewards": torch.zeros(4), "group_size": 0}, "group_size"),
        ({"rewards": torch.zeros(4), "group_size": 2, "scale": "std"}, "scale"),
        ({"rewards": torch.zeros(2, 2), "group_size": 2}, "1-D"),
        ({"rewards": torch.tensor([0.0, float("nan")]), "group_size": 2}, "finite"),
    ],
)
def test_group_advantages_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        group_advantages(**kwargs)


# ---------------------------------------------------------------- log-probs and entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_per_token_logprobs_and_entropy_match_full_softmax(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (5, 4), generator=g)
    full = torch.log_softmax(logits / temperature, dim=-1)
    got = per_token_logprobs(logits, ids, temperature, chunk_size=2)
    assert torch.allclose(got, full.gather(-1, ids.unsqueeze(-1)).squeeze(-1))
    assert torch.allclose(token_entropy(logits, temperature, chunk_size=3), -(full.exp() * full).sum(-1))
    got.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_logprobs_and_entropy_match_trl_helpers():
    utils = pytest.importorskip("trl.trainer.utils")
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 17, generator=g)
    ids = torch.randint(0, 17, (3, 6), generator=g)
    assert torch.allclose(per_token_logprobs(logits, ids, 0.9), utils.selective_log_softmax(logits, ids, 0.9),
                          atol=1e-6)
    assert torch.allclose(token_entropy(logits), utils.entropy_from_logits(logits), atol=1e-6)


def test_logprobs_bfloat16_path_close_to_float32():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 3, 50, generator=g)
    ids = torch.randint(0, 50, (2, 3), generator=g)
    low = per_token_logprobs(logits.bfloat16(), ids)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), per_token_logprobs(logits, ids), atol=5e-2)


def test_logprob_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        per_token_logprobs(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="token_ids"):
        per_token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        token_entropy(torch.zeros(2, 3, 4), temperature=0.0)


# ---------------------------------------------------------------- policy loss


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_policy_loss_matches_loop_reference(loss_type, eps_high):
    logprobs, old, adv, mask = _batch(seed=2)
    kw = {"max_completion_length": 10 if loss_type == "dr_grpo" else None}
    got = policy_loss(logprobs, old, adv, mask, loss_type, 0.2, eps_high, **kw)
    want = _loop_reference(logprobs, old, adv, mask, loss_type, 0.2, eps_high or 0.2, max_len=10)
    assert got.dim() == 0 and math.isclose(got.item(), want, rel_tol=1e-12)


def test_dapo_uses_global_token_count():
    logprobs, old, adv, mask = _batch(seed=5)
    got = policy_loss(logprobs, old, adv, mask, "dapo", num_items_in_batch=123)
    assert math.isclose(got.item(), _loop_reference(logprobs, old, adv, mask, "dapo", n_items=123), rel_tol=1e-12)
    local = policy_loss(logprobs, old, adv, mask, "dapo")
    assert torch.allclose(local, policy_loss(logprobs, old, adv, mask, "token_mean"))


def test_loss_gradient_flows_and_vanishes_where_clipped():
    old = torch.zeros(1, 3, dtype=torch.float64)
    # rho = 1.5 (A > 0: clipped, no gradient), 0.9 (inside), 0.5 (A > 0: below the range, not clipped)
    logprobs = torch.log(torch.tensor([[1.5, 0.9, 0.5]], dtype=torch.float64)).requires_grad_()
    loss = policy_loss(logprobs, old, torch.ones(1, dtype=torch.float64), torch.ones(1, 3), "token_mean")
    loss.backward()
    assert logprobs.grad[0, 0] == 0
    assert torch.allclose(logprobs.grad[0, 1:], -torch.tensor([0.9, 0.5], dtype=torch.float64) / 3)


def test_zero_advantage_gives_zero_loss_and_gradient():
    logprobs, old, _, mask = _batch(seed=6)
    adv = group_advantages(torch.ones(6), 3)
    loss = policy_loss(logprobs, old, adv, mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logprobs.grad) == 0


def test_old_logprobs_are_not_differentiated():
    logprobs, old, adv, mask = _batch(seed=7)
    old = old.clone().requires_grad_()
    policy_loss(logprobs, old, adv, mask).backward()
    assert old.grad is None and logprobs.grad is not None


def test_clip_stats_counts_tokens_on_the_clipped_branch():
    old = torch.zeros(2, 3)
    logprobs = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]]))
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    s = clip_stats(logprobs, old, adv, mask)
    # row 0 (A>0): 1.5 clipped high; row 1 (A<0): 0.5 would be clipped low but is masked out
    assert s["clip_frac_high"] == pytest.approx(1 / 5) and s["clip_frac_low"] == 0.0
    assert s["clip_frac"] == pytest.approx(1 / 5)
    assert s["ratio_mean"] == pytest.approx((1.5 + 1 + 0.5 + 1.5 + 1) / 5)
    assert (s["ratio_min"], s["ratio_max"]) == pytest.approx((0.5, 1.5))
    # the clipped-branch tokens are exactly those with zero gradient
    lp = logprobs.clone().requires_grad_()
    per_tok = clipped_surrogate(lp, old, adv)
    (per_tok * mask).sum().backward()
    assert int(((lp.grad == 0) & mask.bool()).sum()) == 1


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda lp, o, a, m: policy_loss(lp, o, a, m, "dr_grpo"), "max_completion_length"),
        (lambda lp, o, a, m: policy_loss(lp, o, a, m, "bnpo"), "loss_type"),
        (lambda lp, o, a, m: policy_loss(lp, o, a[:-1], m), "advantages"),
        (lambda lp, o, a, m: policy_loss(lp, o[:, :-1], a, m), "old_logprobs"),
        (lambda lp, o, a, m: policy_loss(lp, o, a, m[:, :-1]), "mask"),
        (lambda lp, o, a, m: policy_loss(lp[0], o[0], a, m[0]), r"\[B, T\]"),
        (lambda lp, o, a, m: policy_loss(lp, o, a, m, clip_eps=1.5), "clip_eps"),
        (lambda lp, o, a, m: policy_loss(lp, o, a, m, "dapo", num_items_in_batch=-1), "num_items_in_batch"),
    ],
)
def test_policy_loss_errors(call, needle):
    with pytest.raises(ValueError, match=needle):
        call(*_batch())


# ---------------------------------------------------------------- KL, masked mean, objective


def test_kl_k3_matches_formula_and_verl_clamps():
    lp = torch.tensor([[-1.0, -2.0, -0.1, -30.0]])
    ref = torch.tensor([[-1.0, -1.5, -2.0, -1.0]])
    d = (ref - lp).clamp(-20, 20)
    assert torch.allclose(kl_k3(lp, ref), (d.exp() - d - 1).clamp(-10, 10))
    assert kl_k3(lp, ref)[0, 0] == 0 and kl_k3(lp, ref)[0, 3] == 10.0
    assert (kl_k3(lp, ref) >= 0).all()


def test_masked_mean():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert float(masked_mean(v, m)) == 1.5
    assert torch.equal(masked_mean(v, m, dim=1), torch.tensor([1.5, 0.0]))


def test_grpo_objective_combines_terms():
    logprobs, old, adv, mask = _batch(seed=8)
    ref = old + 0.1
    ent = torch.rand_like(old)
    loss, stats = grpo_objective(logprobs, old, adv, mask, ref_logprobs=ref, beta=0.04, entropy=ent,
                                 entropy_coef=0.01, loss_type="grpo")
    want = (policy_loss(logprobs, old, adv, mask, "grpo") + 0.04 * aggregate_loss(kl_k3(logprobs, ref), mask, "grpo")
            - 0.01 * masked_mean(ent, mask))
    assert torch.allclose(loss, want)
    assert set(stats) >= {"loss", "policy_loss", "kl", "entropy", "clip_frac", "ratio_mean"}
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_objective(logprobs, old, adv, mask, beta=0.1)


# ---------------------------------------------------------------- TRL's own _compute_loss


def _trl_loss(loss_type, logprobs, old, adv, mask, *, eps_high, max_len, n_items, beta=0.0, ref=None,
              entropies=None, entropy_coef=0.0):
    """Run trl's GRPOTrainer._compute_loss (trl 1.16.0, grpo_trainer.py L3020-3270) on a stub trainer.

    The stub supplies only what the method reads: the log-prob hook returns our tensors, one process,
    no gradient accumulation (GA = steps_per_generation = 1), token-level importance sampling.
    """
    trainer_mod = pytest.importorskip("trl.trainer.grpo_trainer")
    b, t = logprobs.shape
    identity = lambda x, **_: x
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (
            logprobs, torch.zeros_like(logprobs) if entropies is None else entropies, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len,
        _entropy_bonus_enabled=entropy_coef != 0.0, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        accelerator=SimpleNamespace(num_processes=1, gather=identity, reduce=identity,
                                    gather_for_metrics=identity, sync_gradients=True),
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long), "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
        "advantages": adv, "old_per_token_logps": old,
        "num_items_in_batch": torch.tensor(float(n_items)),
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    return trainer_mod.GRPOTrainer._compute_loss(stub, None, inputs)


@pytest.mark.parametrize("ours, theirs", [("token_mean", "bnpo"), ("grpo", "grpo"), ("dr_grpo", "dr_grpo"),
                                          ("dapo", "dapo")])
@pytest.mark.parametrize("eps_high", [0.2, 0.28])
def test_policy_loss_matches_trl_compute_loss(ours, theirs, eps_high):
    logprobs, old, adv, mask = _batch(seed=11, b=8, t=9, spread=0.5)
    n_items = 97.0
    want = _trl_loss(theirs, logprobs, old, adv, mask, eps_high=eps_high, max_len=12, n_items=n_items)
    got = policy_loss(logprobs, old, adv, mask, ours, 0.2, eps_high, max_completion_length=12,
                      num_items_in_batch=n_items)
    assert torch.allclose(got, want, rtol=1e-12)
    g_want, = torch.autograd.grad(want, logprobs)
    g_got, = torch.autograd.grad(got, logprobs)
    assert torch.allclose(g_got, g_want, rtol=1e-12)


@pytest.mark.parametrize("ours, theirs", [("token_mean", "bnpo"), ("grpo", "grpo"), ("dr_grpo", "dr_grpo")])
def test_objective_with_kl_and_entropy_matches_trl(ours, theirs):
    logprobs, old, adv, mask = _batch(seed=12, b=5, t=6)
    ref = old - 0.3 * torch.rand_like(old)
    ent = torch.rand_like(old)
    want = _trl_loss(theirs, logprobs, old, adv, mask, eps_high=0.2, max_len=8, n_items=1, beta=0.04, ref=ref,
                     entropies=ent, entropy_coef=0.01)
    got, _ = grpo_objective(logprobs, old, adv, mask, ref_logprobs=ref, beta=0.04, entropy=ent, entropy_coef=0.01,
                            loss_type=ours, max_completion_length=8)
    assert torch.allclose(got, want, rtol=1e-12)
