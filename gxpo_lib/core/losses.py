"""GRPO losses: group advantages, per-token log-probs, the clipped surrogate and its aggregations.

The formulas follow ``docs/algorithm.md`` (the GRPO loss). They match TRL's ``GRPOTrainer`` (checked against
trl 1.16.0, ``GRPOTrainer._compute_loss``) for the shared options, and verl's ``token-mean`` aggregation
used by the paper's runs. Shapes: ``B`` sequences (completions), ``T`` completion tokens, ``V`` vocabulary,
``H`` the model's hidden size, ``N`` selected token positions.

Devices: every loss function moves its fixed inputs (old and reference log-probs, advantages, masks,
entropies) to the device of ``logprobs`` first, so CPU-built advantages work with a policy on a GPU.

``policy_token_logprobs`` is the memory-lean way from a causal LM to per-token log-probs and entropies: the
decoder's hidden states go through the LM head a chunk of tokens at a time (only at completion positions,
as ``logits_to_keep`` would), and the backward pass recomputes each chunk's logits, so no ``[B, T, V]``
tensor is ever materialised or saved (see ``ChunkedHeadLogprobs``).
"""

from __future__ import annotations

import torch

from gxpo_lib.choices import ADV_SCALES, LOSS_TYPES
from gxpo_lib.validation import check_choice

# The LM head runs on chunks of at most this many logits (tokens x V): 2**26 fp32 logits are 256 MiB, about
# 440 tokens of a 151,936-token vocabulary; the backward pass holds a few such tensors at a time.
LOGIT_CHUNK_ELEMENTS = 1 << 26


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages, one per completion.

    Args:
        rewards: ``[N]`` rewards, ``N = prompts * group_size``; the ``group_size`` completions of one
            prompt are contiguous.
        group_size: completions per prompt (>= 1).
        scale: ``"group"`` (GRPO, verl): ``(R - mean_group) / (std_group + eps)`` with the unbiased
            (n - 1) std; ``"batch"`` (TRL's option): ``(R - mean_group) / (std_batch + eps)``, the std
            taken over all ``N`` rewards; ``"none"`` (Dr. GRPO): ``R - mean_group``.
        eps: added to the std.

    Returns:
        ``[N]`` advantages, same dtype as ``rewards`` (float32 for integer or bool input).

    A group whose rewards are all equal gets exactly 0. A group of one completion has no baseline and
    is such a group, so ``group_size=1`` gives all-zero advantages (as TRL; verl instead uses mean 0,
    std 1, i.e. A = R / (1 + eps), a baseline-free REINFORCE signal: use ``scale="none"`` on
    ``rewards - b`` yourself if that is what you want).
    """
    # Validate before any computation
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} is invalid: allowed an integer >= 1")
    check_choice("scale", scale, ADV_SCALES)
    if not eps >= 0:
        raise ValueError(f"eps={eps!r} is invalid: allowed a number >= 0")
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards with shape {tuple(rewards.shape)} is invalid: allowed 1-D [N]")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} is invalid for rewards of N={rewards.numel()} entries: allowed a "
                         "divisor of N (contiguous groups)")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards is invalid: allowed finite values only (score a failed completion 0, not NaN)")

    # Centre on the group mean
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)

    # Divide by the chosen spread
    if scale == "group" and group_size > 1:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch" and rewards.numel() > 1:
        centred = centred / (rewards.std() + eps)

    # Equal-reward groups carry no signal: make that exact, not a rounding residue
    return centred.masked_fill(constant, 0.0).reshape(-1)


def per_token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0,
                       chunk_size: int = 8) -> torch.Tensor:
    """Log-probability of each chosen token, without materialising the full log-softmax.

    Args:
        logits: ``[B, T, V]`` logits whose position ``t`` predicts ``token_ids[:, t]`` (already shifted).
        token_ids: ``[B, T]`` integer ids.
        temperature: logits are divided by it first (the sampling temperature), > 0.
        chunk_size: sequences processed at once; bounds the extra memory to ``chunk_size * T * V``.

    Returns:
        ``[B, T]`` log-probabilities, differentiable w.r.t. ``logits``.
    """
    _check_logits(logits, temperature, chunk_size)
    if token_ids.shape != logits.shape[:2]:
        raise ValueError(f"token_ids must have shape [B, T] = {tuple(logits.shape[:2])}, got {tuple(token_ids.shape)}")
    out = []
    for lg, ids in zip(logits.split(chunk_size), token_ids.split(chunk_size)):
        lg = lg / temperature if temperature != 1.0 else lg
        ids = ids.long().unsqueeze(-1)
        # float32/64: chosen logit minus logsumexp (cheap); half precision: log_softmax (stabler)
        if lg.dtype in (torch.float32, torch.float64):
            out.append(lg.gather(-1, ids).squeeze(-1) - torch.logsumexp(lg, dim=-1))
        else:
            out.append(torch.log_softmax(lg.float(), dim=-1).gather(-1, ids).squeeze(-1).to(lg.dtype))
    return torch.cat(out, dim=0)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk_size: int = 8) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at each position.

    Args:
        logits: ``[B, T, V]``.
        temperature: logits are divided by it first, > 0.
        chunk_size: sequences processed at once.

    Returns:
        ``[B, T]`` entropies, differentiable w.r.t. ``logits``.
    """
    _check_logits(logits, temperature, chunk_size)
    out = []
    for lg in logits.split(chunk_size):
        logp = torch.log_softmax(lg.float() / temperature, dim=-1)
        out.append(-(logp.exp() * logp).sum(-1).to(lg.dtype))
    return torch.cat(out, dim=0)


def policy_token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                          temperature: float = 1.0, with_entropy: bool = False,
                          token_positions: torch.Tensor | None = None, chunk_tokens: int | None = None):
    """Per-token log-probs (and entropies) of the completion tokens under a causal LM, memory-lean.

    The decoder runs once over prompt and completion (the last token is not fed: it predicts nothing); its
    hidden states at the completion positions, and only there, go through the LM head ``chunk_tokens`` at a
    time in at least float32 (``ChunkedHeadLogprobs``; the backward pass recomputes each chunk's logits).
    Saved for backward per row: the decoder's own activations, O(T * H) for the head, never O(T * V).

    The decoder and head are ``model.get_decoder()`` and ``model.get_output_embeddings()`` (HF models, PEFT
    LoRA wrappers of them); a final-logit soft-cap in the model's config is applied. A model without a
    separable head (or with a ``logit_scale``) falls back to one full forward with ``logits_to_keep=T``,
    then the same chunked arithmetic on its logits.

    Args:
        model: a causal LM. input_ids: ``[B, P + T]`` prompt (left-padded) then completion tokens.
        attention_mask: ``[B, P + T]``. prompt_length: ``P``.
        temperature: logits are divided by it, as at sampling time (> 0).
        token_positions: ``[N]`` flat indices into ``[B * T]`` of the positions to compute (e.g. the
            active completion tokens); the others are 0. None: all ``B * T``.
        chunk_tokens: tokens per LM-head chunk; None: ``LOGIT_CHUNK_ELEMENTS // V``.

    Returns:
        logprobs ``[B, T]`` (and entropy ``[B, T]`` when ``with_entropy``), in float32 (float64 for a
        float64 model), differentiable w.r.t. the model's parameters.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: allowed a number > 0")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens={chunk_tokens!r} is invalid: allowed an integer >= 1 or None")
    rows, width = input_ids.shape[0], input_ids.shape[1] - prompt_length
    if not 1 <= prompt_length < input_ids.shape[1]:
        raise ValueError(f"prompt_length={prompt_length!r} is invalid: allowed 1 <= P < {input_ids.shape[1]}")
    targets = input_ids[:, prompt_length:].reshape(-1)
    fed_ids, fed_mask = input_ids[:, :-1], attention_mask[:, :-1]
    positions = (fed_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at 0
    parts = _decoder_and_head(model)
    if parts is not None:
        decoder, head, softcap = parts
        hidden = decoder(input_ids=fed_ids, attention_mask=fed_mask, position_ids=positions,
                         use_cache=False).last_hidden_state[:, prompt_length - 1:]
    else:   # no separable head: the model's own logits, completion positions only
        head, softcap = None, None
        hidden = _completion_logits(model, fed_ids, fed_mask, positions, width)
    flat = hidden.reshape(rows * width, hidden.shape[-1])
    if token_positions is not None:
        flat, targets = flat.index_select(0, token_positions), targets.index_select(0, token_positions)
    vocab = flat.shape[-1] if head is None else getattr(getattr(model, "config", None), "vocab_size", 0)
    chunk = chunk_tokens or max(1, LOGIT_CHUNK_ELEMENTS // max(vocab or flat.shape[-1], 1))
    logprobs, entropy = chunked_head_logprobs(head, flat, targets, temperature, softcap, chunk, with_entropy)
    logprobs = _scatter_rows(logprobs, token_positions, rows, width)
    if not with_entropy:
        return logprobs
    return logprobs, _scatter_rows(entropy, token_positions, rows, width)


def chunked_head_logprobs(head, hidden: torch.Tensor, token_ids: torch.Tensor, temperature: float,
                          softcap: float | None, chunk_tokens: int, with_entropy: bool):
    """Chosen-token log-probs ``[N]`` and entropies ``[N]`` (None without ``with_entropy``) of ``head(hidden)``.

    Args:
        head: the LM head (an ``nn.Linear`` takes the fused ``ChunkedHeadLogprobs``; any other module, e.g.
            a LoRA-wrapped head, runs per chunk under ``torch.utils.checkpoint``), or None when ``hidden``
            already holds logits ``[N, V]``.
        hidden: ``[N, H]``; token_ids: ``[N]``; softcap: a final-logit soft-cap or None; chunk_tokens >= 1.
    """
    if type(head) is torch.nn.Linear:
        logprobs, entropy = ChunkedHeadLogprobs.apply(hidden, head.weight, head.bias, token_ids, temperature,
                                                      softcap, chunk_tokens, with_entropy)
        return logprobs, (entropy if with_entropy else None)
    needs_graph = torch.is_grad_enabled() and (hidden.requires_grad or any(
        p.requires_grad for p in (head.parameters() if head is not None else ())))
    outs = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        args = (head, hidden[start:start + chunk_tokens], token_ids[start:start + chunk_tokens], temperature,
                softcap, with_entropy)
        if needs_graph:
            outs.append(torch.utils.checkpoint.checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            outs.append(_chunk_logprobs(*args))
    if not outs:
        empty = hidden.new_zeros(0, dtype=_work_dtype(hidden.dtype))
        return empty, (empty if with_entropy else None)
    logprobs = torch.cat([o[0] for o in outs])
    return logprobs, (torch.cat([o[1] for o in outs]) if with_entropy else None)


class ChunkedHeadLogprobs(torch.autograd.Function):
    """Log-softmax and entropy through a linear LM head, a chunk of tokens at a time, recomputed in backward.

    ``apply(hidden [N, H], weight [V, H], bias [V] | None, token_ids [N], temperature, softcap, chunk_tokens,
    with_entropy)`` -> ``(logprobs [N], entropy [N] or [0])`` in the work dtype (float32, or float64 for a
    float64 model). The logits ``softcap * tanh((h W^T + b) / softcap) / temperature`` of one chunk
    (``[chunk_tokens, V]``) live only inside the loop. Saved for backward: ``hidden``, ``token_ids`` and
    the log-normalisers and entropies ``[N]``; backward recomputes each chunk's logits and forms
    ``d logp / dz = onehot - p`` and ``d entropy / dz = -p (log p + entropy)`` from them. The gradient
    w.r.t. the weight is accumulated over chunks in the work dtype. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_ids, temperature, softcap, chunk_tokens, with_entropy):
        work = _work_dtype(hidden.dtype)
        logprobs = torch.empty(hidden.shape[0], dtype=work, device=hidden.device)
        log_norm, entropy = torch.empty_like(logprobs), torch.empty_like(logprobs) if with_entropy else None
        ids = token_ids.long()
        for start in range(0, hidden.shape[0], chunk_tokens):
            part = slice(start, start + chunk_tokens)
            logits = _head_logits(hidden[part], weight, bias, work, temperature, softcap)[0]
            log_norm[part] = torch.logsumexp(logits, dim=-1)
            logprobs[part] = logits.gather(-1, ids[part, None]).squeeze(-1) - log_norm[part]
            if with_entropy:   # -sum p log p, not log Z - sum p z: no cancellation when the entropy is small
                log_probs = logits - log_norm[part, None]
                entropy[part] = -(log_probs.exp() * log_probs).sum(-1)
        ctx.settings = (temperature, softcap, chunk_tokens, with_entropy)
        ctx.save_for_backward(hidden, weight, bias, ids, log_norm, entropy)
        if not with_entropy:
            entropy = logprobs.new_zeros(0)
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, bias, ids, log_norm, entropy = ctx.saved_tensors
        temperature, softcap, chunk_tokens, with_entropy = ctx.settings
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        work = log_norm.dtype
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=work, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=work, device=bias.device) if want_bias else None
        use_entropy = with_entropy and grad_entropy is not None and grad_entropy.numel() > 0
        for start in range(0, hidden.shape[0], chunk_tokens):
            part = slice(start, start + chunk_tokens)
            logits, capped = _head_logits(hidden[part], weight, bias, work, temperature, softcap)
            log_probs = logits - log_norm[part, None]
            probs = log_probs.exp()
            g_lp = grad_logprobs[part, None].to(work)
            grad_logits = -probs * g_lp                        # d logp(tok) / dz = onehot(tok) - p
            grad_logits.scatter_add_(-1, ids[part, None], g_lp)
            if use_entropy:                                   # d entropy / dz = -p (log p + entropy)
                grad_logits -= grad_entropy[part, None].to(work) * probs * (log_probs + entropy[part, None])
            grad_logits = grad_logits / temperature
            if capped is not None:
                grad_logits = grad_logits * (1.0 - capped * capped)
            grad_raw = grad_logits.to(weight.dtype)
            if want_hidden:
                grad_hidden[part] = grad_raw @ weight
            if want_weight:
                grad_weight += (grad_raw.t() @ hidden[part]).to(work)
            if want_bias:
                grad_bias += grad_logits.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None, None)


def _head_logits(hidden, weight, bias, work, temperature, softcap):
    """One chunk's logits ``[n, V]`` in the work dtype, and ``tanh`` of the soft-cap (None without one)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).to(work)
    capped = None
    if softcap:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    return (logits / temperature if temperature != 1.0 else logits), capped


def _chunk_logprobs(head, hidden, token_ids, temperature, softcap, with_entropy):
    """One chunk through any head module (or none: ``hidden`` are logits), by autograd: ``([n], [n] | None)``."""
    logits = hidden if head is None else head(hidden)
    logits = logits.to(_work_dtype(logits.dtype))
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, token_ids.long()[:, None]).squeeze(-1) - log_norm
    if not with_entropy:
        return logprobs, None
    log_probs = logits - log_norm[:, None]
    return logprobs, -(log_probs.exp() * log_probs).sum(-1)


def _decoder_and_head(model):
    """``(decoder, head, softcap)`` of a causal LM whose logits are ``head(decoder(...).last_hidden_state)``
    (up to a final soft-cap), or None."""
    get_head, get_decoder = getattr(model, "get_output_embeddings", None), getattr(model, "get_decoder", None)
    if not callable(get_head) or not callable(get_decoder):
        return None
    head, decoder = get_head(), get_decoder()
    config = getattr(model, "config", None)
    if head is None or decoder is None or decoder is model or getattr(config, "logit_scale", None) is not None:
        return None
    return decoder, head, getattr(config, "final_logit_softcapping", None)


def _completion_logits(model, input_ids, attention_mask, positions, width) -> torch.Tensor:
    """The model's logits at the last ``width`` fed positions ``[B, width, V]`` (``logits_to_keep`` when
    the model takes it)."""
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions)
    try:
        logits = model(**inputs, logits_to_keep=width).logits
    except TypeError:   # a model without logits_to_keep
        logits = model(**inputs).logits
    return logits[:, -width:]


def _scatter_rows(values: torch.Tensor, token_positions: torch.Tensor | None, rows: int, width: int) -> torch.Tensor:
    """``[N]`` values at ``token_positions`` of ``[rows * width]`` (zeros elsewhere) -> ``[rows, width]``."""
    if token_positions is None:
        return values.reshape(rows, width)
    full = values.new_zeros(rows * width)
    return full.index_copy(0, token_positions, values).reshape(rows, width)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 input: the precision of the log-softmax arithmetic."""
    return torch.promote_types(dtype, torch.float32)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is nonzero.

    Args:
        values: any shape; ``mask``: same shape (bool, int or float weights).
        dim: reduce over this dimension only; ``None`` reduces over all.

    Returns:
        The mean (a scalar when ``dim`` is None). An all-zero mask gives 0, not NaN.
    """
    if values.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from values shape {tuple(values.shape)}")
    mask = mask.to(device=values.device, dtype=values.dtype)
    total = (values * mask).sum() if dim is None else (values * mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1.0)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref), as verl's ``low_var_kl``.

    With ``d = log pi_ref - log pi``: ``exp(d) - d - 1`` (>= 0). ``d`` is clamped to [-20, 20] before the
    exponential and the result to [-10, 10], as verl does, so one wild token cannot blow the loss up.

    Args:
        logprobs, ref_logprobs: ``[B, T]`` log-probs of the sampled tokens under the policy and the
            reference.

    Returns:
        ``[B, T]`` KL estimates (not masked).
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    d = (_on_device_of(logprobs, ref_logprobs) - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float = 0.2, clip_eps_high: float | None = None) -> torch.Tensor:
    """Per-token PPO/GRPO loss ``max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high))``.

    Args:
        logprobs: ``[B, T]`` current policy log-probs (carry the gradient).
        old_logprobs: ``[B, T]`` log-probs of the policy that sampled the rollouts (fixed; detached here).
        advantages: ``[B]`` one advantage per sequence.
        clip_eps: ``eps_low``; clip_eps_high: ``eps_high`` (defaults to ``clip_eps``; DAPO uses 0.28).

    Returns:
        ``[B, T]`` per-token losses (not masked).
    """
    eps_low, eps_high = _clip_range(clip_eps, clip_eps_high)
    _check_policy_shapes(logprobs, old_logprobs, advantages)
    ratio = torch.exp(logprobs - _on_device_of(logprobs, old_logprobs).detach())
    adv = advantages.detach().to(device=logprobs.device, dtype=logprobs.dtype).unsqueeze(1)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high))


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str = "token_mean",
                   max_completion_length: int | None = None,
                   num_items_in_batch: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce ``[B, T]`` per-token losses to a scalar the way each GRPO variant does.

    Args:
        per_token: ``[B, T]``; mask: ``[B, T]`` 1 on completion tokens that count.
        loss_type: ``"token_mean"`` (verl default, TRL ``bnpo``): sum(mask * l) / sum(mask);
            ``"grpo"``: mean over each sequence's tokens, then over sequences (length-biased);
            ``"dr_grpo"``: sum(mask * l) / (B * max_completion_length);
            ``"dapo"``: sum(mask * l) / num_items_in_batch, the active tokens of the whole accumulated
            batch (defaults to sum(mask), which makes it ``token_mean`` for one micro-batch).
        max_completion_length: required for ``dr_grpo``.
        num_items_in_batch: only for ``dapo``.

    Returns:
        Scalar tensor. Gradient-accumulation scaling is the caller's business.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    if per_token.dim() != 2 or mask.shape != per_token.shape:
        raise ValueError(f"per_token and mask must both be [B, T], got {tuple(per_token.shape)} and "
                         f"{tuple(mask.shape)}")
    mask = mask.to(device=per_token.device, dtype=per_token.dtype)
    total = (per_token * mask).sum()

    # Token mean over the micro-batch (also dapo without a global token count)
    if loss_type == "token_mean" or (loss_type == "dapo" and num_items_in_batch is None):
        return total / mask.sum().clamp(min=1.0)
    # Sequence mean, then batch mean (an empty sequence counts as 0, as TRL)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    # Constant normaliser: B times the generation budget
    if loss_type == "dr_grpo":
        if max_completion_length is None or isinstance(max_completion_length, bool) or max_completion_length < 1:
            raise ValueError(f"loss_type='dr_grpo' needs max_completion_length >= 1, got {max_completion_length!r}")
        return total / (per_token.shape[0] * max_completion_length)
    # Global token count of the accumulated batch
    if torch.is_tensor(num_items_in_batch):   # an accelerator tensor's value is not read (no device sync)
        on_cpu = num_items_in_batch.device.type == "cpu"
        if num_items_in_batch.numel() != 1 or (on_cpu and not float(num_items_in_batch) >= 0):
            raise ValueError(f"num_items_in_batch={num_items_in_batch!r} is invalid: allowed a scalar >= 0")
        return total / num_items_in_batch.to(device=per_token.device, dtype=per_token.dtype).clamp(min=1.0)
    if isinstance(num_items_in_batch, bool) or not float(num_items_in_batch) >= 0:
        raise ValueError(f"num_items_in_batch={num_items_in_batch!r} is invalid: allowed a scalar >= 0")
    return total / max(float(num_items_in_batch), 1.0)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                loss_type: str = "token_mean", clip_eps: float = 0.2, clip_eps_high: float | None = None,
                max_completion_length: int | None = None,
                num_items_in_batch: float | torch.Tensor | None = None) -> torch.Tensor:
    """The clipped GRPO policy loss, aggregated by ``loss_type`` (see ``aggregate_loss``).

    Args:
        logprobs: ``[B, T]`` current log-probs; old_logprobs: ``[B, T]`` rollout-time log-probs, kept
            fixed across every pass of a GXPO/SFPO step (never the detached current ones).
        advantages: ``[B]``; mask: ``[B, T]``.

    Returns:
        Scalar loss.
    """
    _check_same_shape(logprobs=logprobs, mask=mask)
    per_token = clipped_surrogate(logprobs, old_logprobs, advantages, clip_eps, clip_eps_high)
    return aggregate_loss(per_token, mask, loss_type, max_completion_length, num_items_in_batch)


def clip_stats(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
               clip_eps: float = 0.2, clip_eps_high: float | None = None) -> dict[str, float]:
    """Diagnostics of the importance ratio, as TRL logs them (token means over active tokens).

    Args: as ``policy_loss``.

    Returns:
        ``clip_frac_low`` (rho < 1 - eps_low and A < 0), ``clip_frac_high`` (rho > 1 + eps_high and
        A > 0), ``clip_frac`` (either: the tokens where the clipped branch is taken and the gradient is
        zero), ``ratio_mean``, ``ratio_min``, ``ratio_max`` (over active tokens).
    """
    return read_out(clip_stat_tensors(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high))


def clip_stat_tensors(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip_eps: float = 0.2,
                      clip_eps_high: float | None = None) -> dict[str, torch.Tensor]:
    """``clip_stats`` as 0-dim tensors on the device of ``logprobs``: nothing is read back (no device sync)."""
    eps_low, eps_high = _clip_range(clip_eps, clip_eps_high)
    _check_policy_shapes(logprobs, old_logprobs, advantages)
    _check_same_shape(logprobs=logprobs, mask=mask)
    with torch.no_grad():
        old_logprobs, mask = _on_device_of(logprobs, old_logprobs), _on_device_of(logprobs, mask)
        ratio = torch.exp(logprobs - old_logprobs).float()
        adv = advantages.to(device=logprobs.device, dtype=torch.float32).unsqueeze(1)
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        active = mask.bool()
        any_active, inactive = active.any(), active.logical_not()
        one = torch.ones((), device=ratio.device)
        return {
            "clip_frac_low": masked_mean(low.float(), mask),
            "clip_frac_high": masked_mean(high.float(), mask),
            "clip_frac": masked_mean((low | high).float(), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_min": torch.where(any_active, ratio.masked_fill(inactive, float("inf")).min(), one),
            "ratio_max": torch.where(any_active, ratio.masked_fill(inactive, float("-inf")).max(), one),
        }


def read_out(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-dim tensors -> floats with one device sync. Tensors on the "meta" device (shape-only dry runs, the
    device tests) have no values and read as NaN."""
    if not stats:
        return {}
    values = [v.detach().reshape(()).to(torch.float64) for v in stats.values()]
    if any(v.is_meta for v in values):
        return dict.fromkeys(stats, float("nan"))
    devices = {v.device for v in values}
    if len(devices) > 1:
        values = [v.cpu() for v in values]
    return dict(zip(stats, torch.stack(values).tolist()))


def grpo_objective(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                   *, ref_logprobs: torch.Tensor | None = None, beta: float = 0.0, entropy: torch.Tensor | None = None,
                   entropy_coef: float = 0.0, loss_type: str = "token_mean", clip_eps: float = 0.2,
                   clip_eps_high: float | None = None, max_completion_length: int | None = None,
                   num_items_in_batch: float | torch.Tensor | None = None,
                   stats_as_tensors: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """Full GRPO loss: policy term + beta * KL(k3) - entropy_coef * entropy.

    The KL is aggregated with the same ``loss_type`` as the policy term (TRL adds it per token before
    aggregating; verl aggregates it with the same mode). The entropy bonus is a token mean over the
    mask (TRL's documented objective; identical to verl's for ``token_mean``).

    Args:
        logprobs, old_logprobs, mask: ``[B, T]``; advantages: ``[B]``.
        ref_logprobs: ``[B, T]`` reference-policy log-probs, required when ``beta != 0``.
        entropy: ``[B, T]`` per-token entropies (``token_entropy``), required when ``entropy_coef != 0``.

        stats_as_tensors: return the stats as 0-dim tensors on the device of ``logprobs`` (no device sync;
            ``read_out`` turns them into floats); False: floats.

    The fixed inputs (old and reference log-probs, advantages, mask, entropy) may live on another device
    than ``logprobs`` (CPU-built advantages with a GPU policy): they are moved to it first.

    Returns:
        ``(loss, stats)``: scalar loss; stats holds floats ``loss``, ``policy_loss``, ``kl`` (token
        mean), ``entropy`` (token mean) and the ``clip_stats`` entries.
    """
    if beta < 0 or entropy_coef < 0:
        raise ValueError(f"beta={beta!r}, entropy_coef={entropy_coef!r} is invalid: allowed both >= 0")
    if beta != 0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs [B, T]")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy [B, T]")
    agg = dict(loss_type=loss_type, max_completion_length=max_completion_length, num_items_in_batch=num_items_in_batch)
    mask = _on_device_of(logprobs, mask)

    # Policy term
    loss = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high, **agg)
    stats = {"policy_loss": loss.detach()}

    # KL to the reference policy
    if ref_logprobs is not None:
        kl = kl_k3(logprobs, ref_logprobs)
        if beta != 0:
            loss = loss + beta * aggregate_loss(kl, mask, **agg)
        stats["kl"] = masked_mean(kl.detach(), mask)

    # Entropy bonus
    if entropy is not None:
        _check_same_shape(logprobs=logprobs, entropy=entropy)
        ent = masked_mean(_on_device_of(logprobs, entropy), mask)
        if entropy_coef != 0:
            loss = loss - entropy_coef * ent
        stats["entropy"] = ent.detach()

    stats["loss"] = loss.detach()
    stats.update(clip_stat_tensors(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high))
    return loss, (stats if stats_as_tensors else read_out(stats))


def _clip_range(clip_eps: float, clip_eps_high: float | None) -> tuple[float, float]:
    """Validate and return ``(eps_low, eps_high)``."""
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not 0 <= clip_eps < 1:
        raise ValueError(f"clip_eps={clip_eps!r} is invalid: allowed 0 <= clip_eps < 1")
    if not eps_high >= 0:
        raise ValueError(f"clip_eps_high={clip_eps_high!r} is invalid: allowed a number >= 0")
    return float(clip_eps), float(eps_high)


def _on_device_of(like: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the device of ``like`` (itself when it is there already)."""
    return tensor if tensor.device == like.device else tensor.to(like.device, non_blocking=True)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    """All named tensors must be ``[B, T]`` with one common shape."""
    (first_name, first), *rest = tensors.items()
    if first.dim() != 2:
        raise ValueError(f"{first_name} with shape {tuple(first.shape)} is invalid: allowed [B, T]")
    for name, t in rest:
        if t.shape != first.shape:
            raise ValueError(f"{name} with shape {tuple(t.shape)} is invalid: allowed the shape of {first_name} "
                             f"{tuple(first.shape)}")


def _check_policy_shapes(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor) -> None:
    """logprobs/old_logprobs ``[B, T]``, advantages ``[B]``."""
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs)
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages with shape {tuple(advantages.shape)} is invalid: allowed [B] = "
                         f"[{logprobs.shape[0]}] (one per sequence)")


def _check_logits(logits: torch.Tensor, temperature: float, chunk_size: int) -> None:
    """logits ``[B, T, V]``, temperature > 0, chunk_size >= 1."""
    if logits.dim() != 3:
        raise ValueError(f"logits with shape {tuple(logits.shape)} is invalid: allowed [B, T, V]")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: allowed a number > 0")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: allowed an integer >= 1")
