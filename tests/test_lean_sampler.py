"""LeanSampler on the shipped tiny model: HFSampler's conventions, teacher-forced old log-probs, the sampling law."""

import copy
import math

import pytest
import torch

from gxpo_lib.rl.arith_task import load_split
from gxpo_lib.rl.lean_sampler import LeanSampler, UnsupportedModelError, supports, top_p_filter
from gxpo_lib.rl.models import apply_lora, format_prompt, load_model
from gxpo_lib.rl.sampling import HFSampler, completion_logprobs, completion_mask


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def make(cls, model, tokenizer, **kwargs):
    return cls(model, tokenizer, lambda text: format_prompt(text, tokenizer), **kwargs)


def mixed_prompts(count: int) -> list[str]:
    """Problem texts of different token lengths (so rows are left-padded differently)."""
    problems = sorted(load_split("test", limit=60), key=lambda p: len(p["prompt"]))
    step = max(1, len(problems) // count)
    return [p["prompt"] for p in problems[::step][:count]]


def perturbed_lora(model):
    """A LoRA-wrapped copy whose adapters are nonzero (peft starts B at 0, which would test nothing)."""
    lora = apply_lora(copy.deepcopy(model), rank=4, alpha=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return lora


def test_supports_llama_and_lora_and_rejects_other_architectures(tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    model, tokenizer = tiny
    assert supports(model) and supports(apply_lora(copy.deepcopy(model)))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2))
    assert not supports(gpt2)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*use HFSampler"):
        make(LeanSampler, gpt2, tokenizer)
    dora = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert not supports(dora)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_rollouts_follow_hf_sampler_conventions(tiny, temperature, top_p):
    model, tokenizer = tiny
    prompts = mixed_prompts(5)
    settings = {"max_new_tokens": 20, "temperature": temperature, "top_p": top_p}
    hf = make(HFSampler, model, tokenizer, **settings).sample(prompts, 4, seed=0)
    lean = make(LeanSampler, model, tokenizer, **settings).sample(prompts, 4, seed=0)
    # Same prompts, padding, grouping and field types.
    assert torch.equal(lean.prompt_ids, hf.prompt_ids) and torch.equal(lean.prompt_mask, hf.prompt_mask)
    assert lean.prompt_index == hf.prompt_index and lean.group_size == hf.group_size == 4
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_logprobs", "entropy"):
        assert getattr(lean, field).dtype == getattr(hf, field).dtype, field
    # Completions: EOS stop, pad after it, the mask HF's helper computes, text decoded the same way.
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows, width = lean.completion_ids.shape
    assert rows == 20 and width <= 20
    assert torch.equal(lean.completion_mask, completion_mask(lean.completion_ids, eos))
    assert (lean.completion_ids[lean.completion_mask == 0] == pad).all()
    assert int(lean.completion_mask.sum(1).max()) == width  # decoding stops when the longest row stops
    lengths = lean.completion_mask.sum(1)
    no_eos = ~((lean.completion_ids == eos) & lean.completion_mask.bool()).any(1)
    assert (lengths[no_eos] == 20).all()  # a row without EOS runs to max_new_tokens
    assert lean.completions == tokenizer.batch_decode(lean.completion_ids, skip_special_tokens=True)
    assert (lean.old_logprobs[lean.completion_mask == 0] == 0).all() and (lean.old_logprobs <= 0).all()


@pytest.mark.parametrize("variant", ["lora", "full"])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_old_logprobs_and_entropy_equal_a_teacher_forced_hf_forward(tiny, variant, temperature, top_p):
    """The log-probs and entropies recorded while sampling are those of a teacher-forced HF forward.

    Reference: the HF model's own forward (``completion_logprobs``) in float64, i.e. the exact values that
    any fp32 forward approximates: equal to ``allclose(atol=1e-5, rtol=1e-5)`` (worst case seen over 32
    random perturbations: 0.74 of that tolerance). Against the fp32 HF forward the gap is fp32 noise on
    both sides (HF's fp32 forward is itself up to ~1.4e-5 from float64, and its own KV-cache decode ~1.6e-5
    from its teacher forcing), bounded here by 5e-5.
    """
    base, tokenizer = tiny
    model = perturbed_lora(base) if variant == "lora" else copy.deepcopy(base)
    # Built before the weights change: each sample call must read the current weights.
    sampler = make(LeanSampler, model, tokenizer, max_new_tokens=24, temperature=temperature, top_p=top_p,
                   batch_size=13)  # 13: batches cut through groups
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rollouts = sampler.sample(mixed_prompts(6), 5, seed=1)
    mask = rollouts.completion_mask.bool()
    with torch.no_grad():
        exact = completion_logprobs(copy.deepcopy(model).double(), rollouts, temperature=temperature,
                                    with_entropy=True)
        fp32 = completion_logprobs(model, rollouts, temperature=temperature, with_entropy=True)
    for ours, reference, reference32 in zip((rollouts.old_logprobs, rollouts.entropy), exact, fp32):
        assert torch.allclose(ours[mask].double(), reference[mask], atol=1e-5, rtol=1e-5)
        assert (ours[mask] - reference32[mask]).abs().max() < 5e-5
        assert (ours[~mask] == 0).all()
    # The model was only read: weights unchanged, LoRA not left merged.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if variant == "lora":
        assert not any(getattr(m, "merged", False) for m in model.modules())


def test_same_seed_same_rollouts_other_seed_differs_unscored_same_tokens(tiny):
    model, tokenizer = tiny
    sampler = make(LeanSampler, model, tokenizer, max_new_tokens=16)
    prompts = mixed_prompts(4)
    a, b, c = (sampler.sample(prompts, 4, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.old_logprobs, b.old_logprobs)
    assert a.completions != c.completions
    unscored = sampler.sample(prompts, 4, seed=7, score_policy=False)
    assert torch.equal(unscored.completion_ids, a.completion_ids)
    assert unscored.old_logprobs is None and unscored.entropy is None
    assert torch.get_rng_state().equal(torch.get_rng_state())  # sanity: the global RNG is untouched below
    state = torch.get_rng_state()
    sampler.sample(prompts, 2, seed=3)
    assert torch.equal(state, torch.get_rng_state())


def test_rollouts_feed_a_policy_gradient_step(tiny):
    """The returned tensors are ordinary tensors (not inference-mode ones): a GRPO-style loss backpropagates."""
    base, tokenizer = tiny
    model = perturbed_lora(base)
    rollouts = make(LeanSampler, model, tokenizer, max_new_tokens=12).sample(mixed_prompts(2), 3, seed=0)
    fields = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_logprobs", "entropy")
    assert not any(getattr(rollouts, f).is_inference() for f in fields)
    logprobs = completion_logprobs(model, rollouts)
    ratio = (logprobs - rollouts.old_logprobs).exp() * rollouts.completion_mask
    (ratio.sum() - 0.01 * (rollouts.entropy * rollouts.completion_mask).sum()).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def chi_square_critical(dof: int, z: float = 3.719) -> float:
    """The chi-square 1 - 1e-4 quantile by Wilson-Hilferty (z: the normal 1 - 1e-4 quantile).

    Within 2% of the exact quantile for dof >= 2 (dof 2: 18.8 vs 18.4; dof 10: 33.8 vs 33.7).
    """
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; categories expected < 5 times are pooled into one bin."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return statistic, int(keep.sum()) - 1


def nucleus_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    return top_p_filter(logits.double()[None] / temperature, top_p).softmax(-1)[0]


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (1.5, 0.95)])
def test_tokens_are_drawn_from_the_models_tempered_nucleus_distribution(tiny, temperature, top_p):
    """Chi-square goodness of fit, first token (prefill path) and second token given the first (decode path).

    20,000 draws; rejection at p < 1e-4 (deterministic for the seed). The test has power: the same counts
    against the untempered, uncut distribution are rejected by a wide margin.
    """
    model, tokenizer = tiny
    prompt = "Tom has"  # a prompt the model is unsure about (first-token entropy 1.1 nats; task prompts: < 0.1)
    draws = 20000
    sampler = make(LeanSampler, model, tokenizer, max_new_tokens=2, temperature=temperature, top_p=top_p,
                   batch_size=4096)
    tokens = sampler.sample([prompt], draws, seed=0, score_policy=False).completion_ids
    ids = tokenizer(format_prompt(prompt, tokenizer), add_special_tokens=False, return_tensors="pt")["input_ids"]
    first_mode = torch.bincount(tokens[:, 0], minlength=len(tokenizer)).argmax()
    with torch.no_grad():
        first_logits = model(input_ids=ids).logits[0, -1]
        second_logits = model(input_ids=torch.cat([ids, first_mode.view(1, 1)], 1)).logits[0, -1]
    cases = [(tokens[:, 0], first_logits), (tokens[tokens[:, 0] == first_mode, 1], second_logits)]
    for drawn, logits in cases:
        assert len(drawn) > 1000
        counts = torch.bincount(drawn, minlength=len(tokenizer)).double()
        probs = nucleus_probs(logits, temperature, top_p)
        assert counts[probs == 0].sum() == 0  # nothing outside the nucleus
        statistic, dof = chi_square(counts, probs)
        assert dof >= 2, dof
        assert statistic < chi_square_critical(dof), (statistic, dof)
        wrong, wrong_dof = chi_square(counts, nucleus_probs(logits, 1.0 if temperature != 1.0 else 0.8, 1.0))
        assert wrong > 3 * chi_square_critical(wrong_dof), (wrong, wrong_dof)


@pytest.mark.parametrize("kwargs, name", [({"max_new_tokens": 0}, "max_new_tokens"), ({"batch_size": 0}, "batch_size"),
                                          ({"temperature": 0.0}, "temperature"), ({"top_p": 1.5}, "top_p")])
def test_bad_settings_are_rejected(tiny, kwargs, name):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=f"^{name}="):
        make(LeanSampler, model, tokenizer, **kwargs)


def test_bad_sample_arguments_are_rejected(tiny):
    model, tokenizer = tiny
    sampler = make(LeanSampler, model, tokenizer)
    with pytest.raises(ValueError, match="^prompts="):
        sampler.sample([], 2, seed=0)
    with pytest.raises(ValueError, match="^group_size="):
        sampler.sample(["1 + 1"], 0, seed=0)
