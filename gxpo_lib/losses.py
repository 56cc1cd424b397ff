"""GRPO losses: group advantages, per-token log-probs, the clipped surrogate and its aggregations.

The formulas follow ``docs/algorithm.md`` (the GRPO loss). They match TRL's ``GRPOTrainer`` (checked against
trl 1.16.0, ``GRPOTrainer._compute_loss``) for the shared options, and verl's ``token-mean`` aggregation
used by the paper's runs. Shapes: ``B`` sequences (completions), ``T`` completion tokens, ``V`` vocabulary.
"""

from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")
LOSS_TYPES = ("token_mean", "grpo", "dr_grpo", "dapo")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-6
) -> torch.Tensor:
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
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has N={rewards.numel()} entries, not divisible by group_size={group_size}; "
            "N must be a multiple of group_size (contiguous groups)"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite (score a failed completion 0, not NaN)")

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


def per_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0, chunk_size: int = 8
) -> torch.Tensor:
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
        raise ValueError(
            f"token_ids must have shape [B, T] = {tuple(logits.shape[:2])}, got {tuple(token_ids.shape)}"
        )
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
    mask = mask.to(values.dtype)
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
    d = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> torch.Tensor:
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
    ratio = torch.exp(logprobs - old_logprobs.detach())
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(1)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high))


def aggregate_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "token_mean",
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> torch.Tensor:
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
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if per_token.dim() != 2 or mask.shape != per_token.shape:
        raise ValueError(
            f"per_token and mask must both be [B, T], got {tuple(per_token.shape)} and {tuple(mask.shape)}"
        )
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum()

    # Token mean over the micro-batch
    if loss_type == "token_mean":
        return total / mask.sum().clamp(min=1.0)
    # Sequence mean, then batch mean (an empty sequence counts as 0, as TRL)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    # Constant normaliser: B times the generation budget
    if loss_type == "dr_grpo":
        if max_completion_length is None or isinstance(max_completion_length, bool) or max_completion_length < 1:
            raise ValueError(
                f"loss_type='dr_grpo' needs max_completion_length >= 1, got {max_completion_length!r}"
            )
        return total / (per_token.shape[0] * max_completion_length)
    # Global token count of the accumulated batch
    n_items = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
    if n_items.numel() != 1 or not float(n_items) >= 0:
        raise ValueError(f"num_items_in_batch must be a scalar >= 0, got {num_items_in_batch!r}")
    return total / n_items.to(per_token.dtype).clamp(min=1.0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "token_mean",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> torch.Tensor:
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


def clip_stats(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> dict[str, float]:
    """Diagnostics of the importance ratio, as TRL logs them (token means over active tokens).

    Args: as ``policy_loss``.

    Returns:
        ``clip_frac_low`` (rho < 1 - eps_low and A < 0), ``clip_frac_high`` (rho > 1 + eps_high and
        A > 0), ``clip_frac`` (either: the tokens where the clipped branch is taken and the gradient is
        zero), ``ratio_mean``, ``ratio_min``, ``ratio_max`` (over active tokens).
    """
    eps_low, eps_high = _clip_range(clip_eps, clip_eps_high)
    _check_policy_shapes(logprobs, old_logprobs, advantages)
    _check_same_shape(logprobs=logprobs, mask=mask)
    with torch.no_grad():
        ratio = torch.exp(logprobs - old_logprobs).float()
        adv = advantages.float().unsqueeze(1)
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
        active = mask.bool()
        any_active = bool(active.any())
        return {
            "clip_frac_low": float(masked_mean(low.float(), mask)),
            "clip_frac_high": float(masked_mean(high.float(), mask)),
            "clip_frac": float(masked_mean((low | high).float(), mask)),
            "ratio_mean": float(masked_mean(ratio, mask)),
            "ratio_min": float(ratio[active].min()) if any_active else 1.0,
            "ratio_max": float(ratio[active].max()) if any_active else 1.0,
        }


def grpo_objective(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    loss_type: str = "token_mean",
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Full GRPO loss: policy term + beta * KL(k3) - entropy_coef * entropy.

    The KL is aggregated with the same ``loss_type`` as the policy term (TRL adds it per token before
    aggregating; verl aggregates it with the same mode). The entropy bonus is a token mean over the
    mask (TRL's documented objective; identical to verl's for ``token_mean``).

    Args:
        logprobs, old_logprobs, mask: ``[B, T]``; advantages: ``[B]``.
        ref_logprobs: ``[B, T]`` reference-policy log-probs, required when ``beta != 0``.
        entropy: ``[B, T]`` per-token entropies (``token_entropy``), required when ``entropy_coef != 0``.

    Returns:
        ``(loss, stats)``: scalar loss; stats holds floats ``loss``, ``policy_loss``, ``kl`` (token
        mean), ``entropy`` (token mean) and the ``clip_stats`` entries.
    """
    if beta < 0 or entropy_coef < 0:
        raise ValueError(f"beta and entropy_coef must be >= 0, got beta={beta!r}, entropy_coef={entropy_coef!r}")
    if beta != 0 and ref_logprobs is None:
        raise ValueError("beta != 0 needs ref_logprobs [B, T]")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy [B, T]")
    agg = {
        "loss_type": loss_type,
        "max_completion_length": max_completion_length,
        "num_items_in_batch": num_items_in_batch,
    }

    # Policy term
    pg = policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high, **agg)
    loss = pg
    stats = {"policy_loss": float(pg.detach())}

    # KL to the reference policy
    if ref_logprobs is not None:
        kl = kl_k3(logprobs, ref_logprobs)
        if beta != 0:
            loss = loss + beta * aggregate_loss(kl, mask, **agg)
        stats["kl"] = float(masked_mean(kl.detach(), mask))

    # Entropy bonus
    if entropy is not None:
        _check_same_shape(logprobs=logprobs, entropy=entropy)
        ent = masked_mean(entropy, mask)
        if entropy_coef != 0:
            loss = loss - entropy_coef * ent
        stats["entropy"] = float(ent.detach())

    stats["loss"] = float(loss.detach())
    stats.update(clip_stats(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high))
    return loss, stats


def _clip_range(clip_eps: float, clip_eps_high: float | None) -> tuple[float, float]:
    """Validate and return ``(eps_low, eps_high)``."""
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not 0 <= clip_eps < 1:
        raise ValueError(f"clip_eps must be in [0, 1), got {clip_eps!r}")
    if not eps_high >= 0:
        raise ValueError(f"clip_eps_high must be >= 0, got {clip_eps_high!r}")
    return float(clip_eps), float(eps_high)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    """All named tensors must be ``[B, T]`` with one common shape."""
    (first_name, first), *rest = tensors.items()
    if first.dim() != 2:
        raise ValueError(f"{first_name} must be [B, T], got shape {tuple(first.shape)}")
    for name, t in rest:
        if t.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name} {tuple(first.shape)}, got {tuple(t.shape)}")


def _check_policy_shapes(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor) -> None:
    """logprobs/old_logprobs ``[B, T]``, advantages ``[B]``."""
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs)
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"advantages must be [B] = [{logprobs.shape[0]}] (one per sequence), got {tuple(advantages.shape)}"
        )


def _check_logits(logits: torch.Tensor, temperature: float, chunk_size: int) -> None:
    """logits ``[B, T, V]``, temperature > 0, chunk_size >= 1."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
