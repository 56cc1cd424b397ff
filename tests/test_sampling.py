"""HFSampler on the shipped tiny model: masks, fixed old log-probs, seeding, padding independence."""

import copy

import pytest
import torch

from gxpo_lib.rl.arith_task import load_split
from gxpo_lib.rl.models import format_prompt, load_model
from gxpo_lib.rl.sampling import HFSampler, completion_logprobs, completion_mask


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny")
    return model, tokenizer


def make_sampler(model, tokenizer, **kwargs):
    return HFSampler(model, tokenizer, lambda text: format_prompt(text, tokenizer), **kwargs)


def test_completion_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    assert completion_mask(ids, eos_token_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_rollouts_shapes_masks_and_old_logprobs(tiny):
    model, tokenizer = tiny
    prompts = [p["prompt"] for p in load_split("test", limit=3)]
    rollouts = make_sampler(model, tokenizer, max_new_tokens=20).sample(prompts, group_size=4, seed=0)
    rows, width = rollouts.completion_ids.shape
    assert rows == 12 and width <= 20
    assert rollouts.prompt_index == [0] * 4 + [1] * 4 + [2] * 4
    assert (rollouts.old_logprobs <= 0).all() and (rollouts.old_logprobs[rollouts.completion_mask == 0] == 0).all()
    # Re-scoring the same tokens with the unchanged policy gives the old log-probs: ratio 1 at theta0.
    with torch.no_grad():
        again = completion_logprobs(model, rollouts)
    mask = rollouts.completion_mask.bool()
    assert torch.allclose(again[mask], rollouts.old_logprobs[mask], atol=1e-5)
    assert len(rollouts.completions) == 12 and all(isinstance(c, str) for c in rollouts.completions)


def test_same_seed_same_rollouts_other_seed_differs(tiny):
    model, tokenizer = tiny
    prompts = [p["prompt"] for p in load_split("test", limit=4)]
    sampler = make_sampler(model, tokenizer, max_new_tokens=16)
    a, b = sampler.sample(prompts, 4, seed=7), sampler.sample(prompts, 4, seed=7)
    c = sampler.sample(prompts, 4, seed=8)
    assert a.completions == b.completions
    assert a.completions != c.completions
    # Without the policy's own forward (evaluation): the same samples, and no old log-probs or entropies.
    unscored = sampler.sample(prompts, 4, seed=7, score_policy=False)
    assert torch.equal(unscored.completion_ids, a.completion_ids)
    assert unscored.old_logprobs is None and unscored.entropy is None
    assert unscored.rows(slice(0, 4)).old_logprobs is None


def test_left_padding_does_not_change_a_rows_logprobs(tiny):
    model, tokenizer = tiny
    problems = load_split("test", limit=40)
    short = min(problems, key=lambda p: len(p["prompt"]))
    long = max(problems, key=lambda p: len(p["prompt"]))
    sampler = make_sampler(model, tokenizer, max_new_tokens=12)
    together = sampler.sample([short["prompt"], long["prompt"]], 1, seed=3)
    assert together.prompt_mask[0].sum() < together.prompt_mask[1].sum()  # row 0 is left-padded
    alone_ids = torch.cat([together.prompt_ids[0:1, together.prompt_mask[0] == 1], together.completion_ids[0:1]], 1)
    alone_mask = torch.cat([torch.ones_like(alone_ids[:, : int(together.prompt_mask[0].sum())]),
                            together.completion_mask[0:1]], 1)
    with torch.no_grad():
        alone = completion_logprobs(model, alone_ids, alone_mask, int(together.prompt_mask[0].sum()))
    mask = together.completion_mask[0].bool()
    assert torch.allclose(alone[0][mask], together.old_logprobs[0][mask], atol=1e-4)


@pytest.mark.parametrize("kwargs, name", [({"max_new_tokens": 0}, "max_new_tokens"),
                                          ({"temperature": 0.0}, "temperature"), ({"top_p": 1.5}, "top_p")])
def test_bad_sampler_settings(tiny, kwargs, name):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=f"^{name}="):
        make_sampler(model, tokenizer, **kwargs)


def test_a_tokenizer_without_pad_token_is_rejected_before_sampling(tiny):
    model, tokenizer = tiny
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="tokenizer has no pad token"):
        make_sampler(model, tokenizer)
