"""The closure every rule pass calls: forward + backward of the GRPO loss on one mini-batch, in micro-batches.

`PolicyObjective` is what the trainer hands to ``rule.step``. Each call zero-based accumulates gradients
over micro-batches of ``micro_batch_size`` rows, weighted so that the accumulated gradient equals the
whole mini-batch's for every ``loss_type`` (``aggregation="exact"``):

- ``token_mean``: each micro-batch's token sum over the mini-batch's tokens;
- ``grpo``: per-sequence means, summed over the mini-batch's sequences;
- ``dr_grpo``: token sums over (mini-batch rows x ``max_completion_length``);
- ``dapo``: token sums over the optimizer step's tokens (one mini-batch = one optimizer step, as TRL's
  ``num_items_in_batch``).

``aggregation="verl"`` reproduces the authors' verl runs instead: each micro-batch's own aggregate divided by
the number of micro-batches, so the mini-batch gradient is a mean of per-micro-batch means and depends on
the micro-batch size. Peak memory is bounded by one micro-batch's activations and logits.

The objective keeps its own statistics (`stats`, the last pass's) and, with ``old_logprobs="first_pass"``,
its own fixed old log-probs taken from its first call: nothing is written into the rollouts.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import LOSS_AGGREGATIONS as AGGREGATIONS
from .losses import grpo_objective
from .sampling import Rollouts, completion_logprobs, micro_batches


class PolicyObjective:
    """``objective()``: forward + ``backward`` of the clipped GRPO loss on one mini-batch; returns the loss.

    Args:
        model: the policy (train mode).
        batch: the mini-batch's rollouts, B rows x T completion tokens.
        advantages: [B]; ref_logprobs: [B, T] or None (no KL term).
        old_logprobs: [B, T] the sampling policy's log-probs, or None: the first call's own (detached)
            log-probs become the fixed old log-probs of every later call (TRL's single-iteration shortcut).
        loss settings: loss_type, clip_eps, clip_eps_high, kl_beta, entropy_coef, temperature,
            max_completion_length; micro_batch_size (None: all B rows at once); aggregation "exact" | "verl".
    """

    def __init__(self, model, batch: Rollouts, advantages: torch.Tensor, ref_logprobs: torch.Tensor | None,
                 old_logprobs: torch.Tensor | None, *, loss_type: str, clip_eps: float,
                 clip_eps_high: float | None, kl_beta: float, entropy_coef: float, temperature: float,
                 max_completion_length: int, micro_batch_size: int | None = None, aggregation: str = "exact"):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={aggregation!r} is invalid: allowed one of {AGGREGATIONS}")
        self.model, self.batch, self.advantages, self.ref_logprobs = model, batch, advantages, ref_logprobs
        self.old_logprobs = old_logprobs
        self.sampling_entropy: torch.Tensor | None = None   # [B, T], set by a first_pass call
        self.loss_settings = dict(loss_type=loss_type, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                  beta=kl_beta, entropy_coef=entropy_coef, max_completion_length=max_completion_length)
        self.temperature, self.aggregation = temperature, aggregation
        self.parts = micro_batches(len(batch.completions), micro_batch_size)
        self.mask = batch.completion_mask
        self.tokens = self.mask.sum().clamp(min=1)   # the mini-batch's (= optimizer step's) active tokens
        self.stats: dict[str, float] = {}
        self.passes = 0

    def _weights(self, rows: slice) -> tuple[float, dict[str, Any]]:
        """(loss weight, aggregation keywords) of one micro-batch, so the weighted sum is the mini-batch loss."""
        n_rows = len(self.batch.completions)
        part_rows = rows.stop - rows.start
        if self.aggregation == "verl":
            return 1.0 / len(self.parts), {}
        loss_type = self.loss_settings["loss_type"]
        if loss_type in ("token_mean", "dapo"):   # token sums over the mini-batch's tokens
            return 1.0, {"loss_type": "dapo", "num_items_in_batch": self.tokens}
        return part_rows / n_rows, {}             # grpo, dr_grpo: per-row terms averaged over all rows

    def __call__(self) -> torch.Tensor:
        first_pass = self.old_logprobs is None
        want_entropy = self.loss_settings["entropy_coef"] > 0 or first_pass
        olds, entropies, total = [], [], torch.zeros(())
        weighted: dict[str, float] = {}
        for rows in self.parts:
            part = self.batch.rows(rows)
            out = completion_logprobs(self.model, part, temperature=self.temperature, with_entropy=want_entropy)
            logprobs, entropy = out if want_entropy else (out, None)
            mask = part.completion_mask
            if first_pass:
                olds.append(logprobs.detach() * mask)
                entropies.append(entropy.detach() * mask)
            old = olds[-1] if first_pass else self.old_logprobs[rows]
            weight, agg = self._weights(rows)
            settings = self.loss_settings | agg
            share = float(mask.sum()) / float(self.tokens)
            if self.aggregation == "exact" and settings["entropy_coef"] > 0:
                settings["entropy_coef"] *= share / weight   # the bonus is a token mean over the mini-batch
            loss, stats = grpo_objective(
                logprobs, old, self.advantages[rows], mask,
                ref_logprobs=None if self.ref_logprobs is None else self.ref_logprobs[rows],
                entropy=entropy if settings["entropy_coef"] > 0 else None, **settings)
            (loss * weight).backward()
            total = total + loss.detach() * weight
            _merge_stats(weighted, stats, share)
        weighted["loss"] = float(total)
        if first_pass:
            self.old_logprobs, self.sampling_entropy = torch.cat(olds), torch.cat(entropies)
        self.stats = weighted
        self.passes += 1
        return total


def _merge_stats(into: dict[str, float], stats: dict[str, float], share: float) -> None:
    """Token-weighted means of one micro-batch's statistics (extremes for the ratio's min and max)."""
    for key, value in stats.items():
        if key in ("ratio_min", "ratio_max"):
            pick = min if key == "ratio_min" else max
            into[key] = pick(into.get(key, value), value)
        else:
            into[key] = into.get(key, 0.0) + value * share
