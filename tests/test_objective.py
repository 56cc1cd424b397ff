"""Micro-batching: the accumulated gradient equals the whole mini-batch's for every loss type (exact), the
authors' verl aggregation is a mean of per-micro-batch means, and dapo divides by the optimizer step's tokens."""

import copy

import pytest
import torch

from gxpo_lib.config import LOSS_TYPES
from gxpo_lib.core.losses import clipped_surrogate, group_advantages, kl_k3
from gxpo_lib.core.objective import PolicyObjective
from gxpo_lib.core.rules import GXPO, PlainStep
from gxpo_lib.rl.models import apply_lora, format_prompt, load_model, reference_policy
from gxpo_lib.rl.sampling import HFSampler, batched_logprobs

MAX_NEW = 12


@pytest.fixture(scope="module")
def setup():
    """A LoRA tiny model, 8 real rollouts (2 prompts x 4) with mixed rewards, and reference log-probs."""
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny", dtype=torch.float32)
    model = apply_lora(model, rank=4, alpha=8)
    sampler = HFSampler(model, tokenizer, lambda t: format_prompt(t, tokenizer), max_new_tokens=MAX_NEW)
    rollouts = sampler.sample(["2 + 3 = ?", "7 - 4 = ?"], 4, seed=1)
    rewards = torch.tensor([1, 0, 0, 1, 0, 1, 1, 1], dtype=torch.float32)
    with reference_policy(model, None) as ref:
        ref_logprobs = batched_logprobs(ref, rollouts, 1.0, None)
    assert rollouts.completion_mask.sum(1).unique().numel() > 1, "rows of different lengths make the test bite"
    return model, rollouts, group_advantages(rewards, 4), ref_logprobs


def one_update(setup, algorithm, loss_type, mini_batches, micro, aggregation="exact", dtype=torch.float32):
    """One rule step per mini-batch (as train_step does); returns the trainable parameters after it."""
    base, rollouts, advantages, ref_logprobs = setup
    model = copy.deepcopy(base).to(dtype)
    if dtype != torch.float32:
        rollouts = copy.deepcopy(rollouts)
        rollouts.old_logprobs = rollouts.old_logprobs.to(dtype)
        advantages, ref_logprobs = advantages.to(dtype), ref_logprobs.to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    # SGD: the parameters then compare the gradients themselves (Adam's first step, ~lr*sign(g), turns
    # float32 rounding of a near-zero gradient coordinate into a whole lr).
    optimizer = torch.optim.SGD(params, lr=0.5)
    rule = PlainStep(optimizer) if algorithm == "grpo" else GXPO(optimizer, k=3, alpha=0.5, gate=None)
    rows = len(rollouts.completions)
    size = rows // mini_batches
    for start in range(0, rows, size):
        part = slice(start, start + size)
        batch = rollouts.rows(part)
        objective = PolicyObjective(model, batch, advantages[part], ref_logprobs[part], batch.old_logprobs,
                                    loss_type=loss_type, clip_eps=0.2, clip_eps_high=None, kl_beta=0.05,
                                    entropy_coef=0.01, temperature=1.0, max_completion_length=MAX_NEW,
                                    micro_batch_size=micro, aggregation=aggregation)
        info = rule.step(objective)
        assert not info.fallback
    return [p.detach().clone() for p in params]


# GXPO in float64: its retention ratio g1/g0 amplifies float32 summation-order rounding of near-cancelling
# gradient coordinates (one active float32 step differed by up to 8e-6 here); the sums themselves agree.
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("algorithm, dtype", [("grpo", torch.float32), ("gxpo", torch.float64)])
def test_micro_batches_give_the_whole_batch_gradient(setup, algorithm, dtype, loss_type):
    for mini_batches in (1, 2):
        whole = one_update(setup, algorithm, loss_type, mini_batches, None, dtype=dtype)
        for micro in (1, 3):  # 3: micro-batches of unequal size
            parts = one_update(setup, algorithm, loss_type, mini_batches, micro, dtype=dtype)
            worst = max(float((a - b).abs().max()) for a, b in zip(whole, parts))
            assert worst <= 1e-6, (mini_batches, micro, worst)


def test_verl_aggregation_is_the_mean_of_micro_batch_token_means(setup):
    model, rollouts, advantages, _ = setup
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(run):
        for p in params:
            p.grad = None
        run()
        return torch.cat([p.grad.flatten() for p in params])

    def objective(micro, aggregation):
        return PolicyObjective(model, rollouts, advantages, None, rollouts.old_logprobs, loss_type="token_mean",
                               clip_eps=0.2, clip_eps_high=None, kl_beta=0.0, entropy_coef=0.0, temperature=1.0,
                               max_completion_length=MAX_NEW, micro_batch_size=micro, aggregation=aggregation)

    def by_hand():  # verl: each micro-batch's token mean, divided by the number of micro-batches
        from gxpo_lib.rl.sampling import completion_logprobs

        for start in range(0, 8, 2):
            part = rollouts.rows(slice(start, start + 2))
            logprobs = completion_logprobs(model, part)
            per_token = clipped_surrogate(logprobs, part.old_logprobs, advantages[start:start + 2], 0.2)
            mask = part.completion_mask.float()
            ((per_token * mask).sum() / mask.sum() / 4).backward()

    verl, hand, exact = gradient(objective(2, "verl")), gradient(by_hand), gradient(objective(2, "exact"))
    assert torch.allclose(verl, hand, atol=1e-7, rtol=1e-5)
    assert (verl - exact).abs().max() > 1e-4  # micro-batches of unequal token counts: the two differ
    assert torch.allclose(gradient(objective(None, "verl")), gradient(objective(None, "exact")), atol=1e-7)


@pytest.mark.parametrize("mini_batches", [1, 2, 4])
def test_dapo_divides_by_the_optimizer_steps_tokens(setup, mini_batches):
    # TRL's dapo divides by num_items_in_batch: the completion tokens of the batch one optimizer step uses.
    model, rollouts, advantages, ref_logprobs = setup
    size = 8 // mini_batches
    for start in range(0, 8, size):
        part = rollouts.rows(slice(start, start + size))
        objective = PolicyObjective(model, part, advantages[start:start + size], ref_logprobs[start:start + size],
                                    part.old_logprobs, loss_type="dapo", clip_eps=0.2, clip_eps_high=None,
                                    kl_beta=0.05, entropy_coef=0.0, temperature=1.0, max_completion_length=MAX_NEW,
                                    micro_batch_size=3)
        loss = objective()
        with torch.no_grad():
            from gxpo_lib.rl.sampling import completion_logprobs

            logprobs = completion_logprobs(model, part)
            per_token = clipped_surrogate(logprobs, part.old_logprobs, advantages[start:start + size], 0.2)
            per_token = per_token + 0.05 * kl_k3(logprobs, ref_logprobs[start:start + size])
            mask = part.completion_mask.float()
            num_items_in_batch = mask.sum()  # the step's tokens, not the whole batch's
            expected = (per_token * mask).sum() / num_items_in_batch
        assert float(loss) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
