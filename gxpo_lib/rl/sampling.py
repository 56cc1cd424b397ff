"""Rollouts: sample a group of completions per prompt and record what the sampling policy thought of them.

A sampler turns problem texts into `Rollouts`: token ids, masks, decoded completions and the sampling
policy's per-token log-probs (the fixed "old" log-probs of the GRPO ratio; docs/algorithm.md). `HFSampler`
uses ``model.generate``; a vLLM sampler (GPU extra) implements the same `Sampler` protocol.
"""

from __future__ import annotations

from typing import Protocol

import torch

from gxpo_lib.core.losses import policy_token_logprobs
from gxpo_lib.core.objective import Rollouts, micro_batches
from gxpo_lib.validation import check_int, check_positive


class Sampler(Protocol):
    """What the trainer needs from a rollout engine.

    ``score_policy=False`` skips the sampling policy's own forward over the completions: ``old_logprobs``
    and ``entropy`` are then None (evaluation needs neither; a trainer may take them from its first pass).
    """

    def sample(self, prompts: list[str], group_size: int, seed: int, score_policy: bool = True) -> Rollouts: ...


def completion_logprobs(model, rollouts_or_ids, attention_mask=None, prompt_length=None,
                        temperature: float = 1.0, with_entropy: bool = False):
    """Per-token log-probs (and optionally entropies) of the completion tokens under `model`.

    Args:
        model: a causal LM.
        rollouts_or_ids: a `Rollouts`, or input_ids [B, P + T] (then give attention_mask and prompt_length).
        temperature: logits are divided by it, as at sampling time.
    Returns:
        logprobs [B, T] (and entropy [B, T] when `with_entropy`).
    """
    if isinstance(rollouts_or_ids, Rollouts):
        input_ids, attention_mask = rollouts_or_ids.input_ids, rollouts_or_ids.attention_mask
        prompt_length = rollouts_or_ids.prompt_ids.shape[1]
    else:
        input_ids = rollouts_or_ids
    # The memory-lean path of the objective: the LM head only at completion positions, a chunk at a time,
    # never [B, T, V] logits; returned in the model's dtype, as the samplers' own log-probs are.
    dtype = model.get_input_embeddings().weight.dtype
    result = policy_token_logprobs(model, input_ids, attention_mask, prompt_length, temperature=temperature,
                                   with_entropy=with_entropy)
    if with_entropy:
        return result[0].to(dtype), result[1].to(dtype)
    return result.to(dtype)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> tuple[int, float, float]:
    """A sampler's (max_new_tokens, temperature, top_p), checked; ValueError names the bad one."""
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: allowed a number in (0, 1]")
    return (check_int("max_new_tokens", max_new_tokens, minimum=1), check_positive("temperature", temperature),
            float(top_p))


@torch.no_grad()
def batched_logprobs(model, rollouts: Rollouts, temperature: float, micro_batch_size: int | None,
                     with_entropy: bool = False):
    """`completion_logprobs` of every row without gradients, one micro-batch at a time (bounded memory).

    Returns logprobs [B, T] (and entropy [B, T] when `with_entropy`).
    """
    parts = [completion_logprobs(model, rollouts.rows(rows), temperature=temperature, with_entropy=with_entropy)
             for rows in micro_batches(len(rollouts.completions), micro_batch_size)]
    if with_entropy:
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return torch.cat(parts)


def completion_mask(completion_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after. [B, T] -> [B, T] (long)."""
    is_eos = completion_ids == eos_token_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after_eos).long()


class HFSampler:
    """Batched sampling with ``model.generate`` (left padding, temperature / top-p, stop at EOS).

    Args:
        model, tokenizer: a causal LM and its tokenizer (pad token set).
        format_prompt: maps a problem text to the prompt string (the chat template).
        max_new_tokens: completion length cap.
        temperature, top_p: sampling settings (top_k is off).
        batch_size: rows per ``generate`` call.
        score_batch_size: rows per no-grad forward of the old log-probs (None: every row at once).
    """

    def __init__(self, model, tokenizer, format_prompt, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_p: float = 1.0, batch_size: int = 256, score_batch_size: int | None = None):
        self.model, self.tokenizer, self.format_prompt = model, tokenizer, format_prompt
        self.max_new_tokens, self.temperature, self.top_p = check_sampling(max_new_tokens, temperature, top_p)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.score_batch_size = None if score_batch_size is None else check_int("score_batch_size",
                                                                                score_batch_size, minimum=1)
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token: set tokenizer.pad_token (e.g. to the EOS token)")

    @torch.no_grad()
    def sample(self, prompts: list[str], group_size: int, seed: int, score_policy: bool = True) -> Rollouts:
        """`group_size` completions for each prompt; the same seed gives the same rollouts.

        `score_policy`: also run the no-grad forward that gives the sampling policy's log-probs and entropies
        (``old_logprobs`` / ``entropy``); False leaves them None.
        """
        check_int("group_size", group_size, minimum=1)
        if not prompts:
            raise ValueError("prompts=[] is invalid: allowed a non-empty list of problem texts")
        texts = [self.format_prompt(p) for p in prompts for _ in range(group_size)]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        self.tokenizer.padding_side = "left"
        encoded = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
        chunks = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(texts), self.batch_size):
                # One generate call: [b, P] prompts -> [b, P + t] tokens.
                part = {k: v[start:start + self.batch_size] for k, v in encoded.items()}
                out = self.model.generate(
                    **part, do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0,
                    max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id)
                chunks.append(out[:, encoded["input_ids"].shape[1]:])
        completion_ids = pad_right(chunks, self.tokenizer.pad_token_id)
        mask = completion_mask(completion_ids, self.tokenizer.eos_token_id)
        completion_ids = torch.where(mask.bool(), completion_ids, self.tokenizer.pad_token_id)
        rollouts = Rollouts(
            encoded["input_ids"], encoded["attention_mask"], completion_ids, mask, None, None,
            self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
            [i for i in range(len(prompts)) for _ in range(group_size)], group_size)
        if score_policy:  # the sampling policy's own view of its tokens: the fixed old log-probs of the ratio
            logprobs, entropy = batched_logprobs(self.model, rollouts, self.temperature, self.score_batch_size,
                                                 with_entropy=True)
            rollouts.old_logprobs, rollouts.entropy = logprobs * mask, entropy * mask
        self.model.train(was_training)
        return rollouts


def pad_right(chunks: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Stack [b_i, t_i] chunks into [sum b_i, max t_i], padding on the right."""
    width = max(c.shape[1] for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad_id) for c in chunks])
