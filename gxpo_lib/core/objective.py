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
the micro-batch size.

Memory: each micro-batch is trimmed to its own longest completion (and to its own longest prompt), and the
log-probs come from `losses.policy_token_logprobs`: the LM head runs only at the active completion tokens, a
chunk of tokens at a time, recomputed in backward, so no ``[rows, T, V]`` logits are materialised or saved.
With ``aggregation="exact"`` the rows are sorted by completion length before they are cut into
micro-batches (longest first), which leaves the accumulated gradient unchanged; ``"verl"`` keeps the
rollouts' order, since its result depends on which rows share a micro-batch.

Devices: the rollouts, advantages, old and reference log-probs may live anywhere (the trainer builds the
advantages on the CPU); each is moved once to the device of the model's input embeddings.

Across ranks (FSDP2 under torchrun): FSDP2 averages the ranks' gradients, so each rank's loss is scaled by
``global_normalizer = (T / W, B / W)`` -- the whole mini-batch's active tokens T and rows B over all W ranks,
divided by W -- in place of its own counts: token sums over T / W (``token_mean``, ``dapo``, the entropy
bonus) and per-row terms over B / W (``grpo``, ``dr_grpo``), so the averaged gradient is the whole
mini-batch's. None (one process) keeps the local counts, bit for bit.

The objective keeps its own statistics (`stats`, the last pass's) and, with ``old_logprobs="first_pass"``,
its own fixed old log-probs taken from its first call: nothing is written into the rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gxpo_lib.config import LOSS_AGGREGATIONS as AGGREGATIONS
from gxpo_lib.core.losses import grpo_objective, policy_token_logprobs, read_out


@dataclass
class Rollouts:
    """One batch of sampled completions, `group_size` consecutive rows per prompt.

    Shapes: B = prompts * group_size rows, P = padded prompt length (left padding), T = completion length.
    """

    prompt_ids: torch.Tensor        # [B, P] left-padded prompt tokens
    prompt_mask: torch.Tensor       # [B, P] 1 on real prompt tokens
    completion_ids: torch.Tensor    # [B, T] sampled tokens (pad after EOS)
    completion_mask: torch.Tensor   # [B, T] 1 up to and including the first EOS
    old_logprobs: torch.Tensor | None  # [B, T] log pi_old(token) at the sampling temperature (None: not scored)
    entropy: torch.Tensor | None       # [B, T] entropy of pi_old at each completion position (None: not scored)
    completions: list[str]          # B decoded completions (special tokens removed)
    prompt_index: list[int]         # B indices into the prompt list
    group_size: int

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and completion together, [B, P + T]."""
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """[B, P + T]"""
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    def rows(self, index: torch.Tensor | slice) -> Rollouts:
        """A subset of rows (a mini-batch)."""
        picked = range(len(self.completions))[index] if isinstance(index, slice) else index.tolist()
        scored = [None if t is None else t[index] for t in (self.old_logprobs, self.entropy)]
        return Rollouts(self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
                        self.completion_mask[index], *scored, [self.completions[i] for i in picked],
                        [self.prompt_index[i] for i in picked], self.group_size)


def micro_batches(rows: int, micro_batch_size: int | None) -> list[slice]:
    """Row slices of at most `micro_batch_size` rows (None: one slice of everything)."""
    size = rows if micro_batch_size is None else max(1, min(micro_batch_size, rows))
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


@dataclass
class MicroBatch:
    """Which rows one micro-batch holds and how far it is trimmed (computed once, on the CPU).

    rows: ``[b]`` row indices into the mini-batch; prompt_start: the first prompt column any of its rows
    uses (columns before it are left padding for all of them); width: its longest completion (>= 1);
    tokens: its active completion tokens; active: ``[N]`` flat indices of those tokens in ``[b * width]``.
    """

    rows: torch.Tensor
    prompt_start: int
    width: int
    tokens: int
    active: torch.Tensor
    device: torch.device | None = None                                   # where `on_device` lives
    on_device: dict[str, torch.Tensor] = field(default_factory=dict)     # `PolicyObjective._inputs`' cache


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
        logit_chunk_tokens: tokens per LM-head chunk (None: `losses.LOGIT_CHUNK_ELEMENTS` // vocabulary).
        global_normalizer: ``(tokens, rows)`` of the mini-batch over every rank, each divided by the world
            size (FSDP2; see the module docstring), or None in a single process.
    """

    def __init__(self, model, batch: Rollouts, advantages: torch.Tensor, ref_logprobs: torch.Tensor | None,
                 old_logprobs: torch.Tensor | None, *, loss_type: str, clip_eps: float,
                 clip_eps_high: float | None, kl_beta: float, entropy_coef: float, temperature: float,
                 max_completion_length: int, micro_batch_size: int | None = None, aggregation: str = "exact",
                 logit_chunk_tokens: int | None = None, global_normalizer: tuple[float, float] | None = None):
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation={aggregation!r} is invalid: allowed one of {AGGREGATIONS}")
        rows = len(batch.completions)
        if advantages.shape != (rows,):
            raise ValueError(f"advantages has shape {tuple(advantages.shape)}: allowed [{rows}], one per row")
        self.model, self.batch, self.advantages, self.ref_logprobs = model, batch, advantages, ref_logprobs
        self.old_logprobs = old_logprobs
        self.sampling_entropy: torch.Tensor | None = None   # [B, T], set by a first_pass call
        self.loss_settings = dict(loss_type=loss_type, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
                                  beta=kl_beta, entropy_coef=entropy_coef, max_completion_length=max_completion_length)
        self.temperature, self.aggregation, self.logit_chunk_tokens = temperature, aggregation, logit_chunk_tokens
        self.mask = batch.completion_mask
        self.parts = self._plan(micro_batch_size)
        self.tokens = max(1, sum(part.tokens for part in self.parts))   # the mini-batch's (= optimizer step's)
        # What token sums and per-row terms are divided by: this mini-batch's counts, or across ranks the
        # global ones over the world size (FSDP2 then averages the ranks' gradients into the whole batch's).
        self.norm_tokens, self.norm_rows = (self.tokens, rows) if global_normalizer is None else global_normalizer
        self.stats: dict[str, float] = {}
        self.passes = 0

    def _plan(self, micro_batch_size: int | None) -> list[MicroBatch]:
        """The micro-batches: rows (sorted longest first under "exact"), trimmed widths, active tokens."""
        mask = self.batch.completion_mask.detach().cpu().bool()
        prompt_mask = self.batch.prompt_mask.detach().cpu().bool()
        columns = torch.arange(1, mask.shape[1] + 1)
        ends = (mask * columns).amax(1) if mask.numel() else torch.zeros(mask.shape[0], dtype=torch.long)
        order = torch.arange(mask.shape[0])
        if self.aggregation == "exact":   # grouping rows of similar length wastes less padding
            order = torch.sort(ends, descending=True, stable=True).indices
        parts = []
        for cut in micro_batches(mask.shape[0], micro_batch_size):
            rows = order[cut]
            width = max(1, int(ends[rows].max()))
            used = prompt_mask[rows].any(0).nonzero()
            prompt_start = min(int(used[0]) if len(used) else 0, prompt_mask.shape[1] - 1)
            active = mask[rows, :width].reshape(-1).nonzero().squeeze(1)
            parts.append(MicroBatch(rows, prompt_start, width, int(mask[rows].sum()), active))
        return parts

    def _weights(self, part: MicroBatch) -> tuple[float, dict]:
        """(loss weight, aggregation keywords) of one micro-batch, so the weighted sum is the mini-batch loss."""
        if self.aggregation == "verl":
            return 1.0 / len(self.parts), {}
        if self.loss_settings["loss_type"] in ("token_mean", "dapo"):   # token sums over the mini-batch's tokens
            return 1.0, {"loss_type": "dapo", "num_items_in_batch": self.norm_tokens}
        return len(part.rows) / self.norm_rows, {}   # grpo, dr_grpo: per-row terms over all rows

    def _inputs(self, part: MicroBatch, device: torch.device, first_pass: bool) -> dict[str, torch.Tensor]:
        """The micro-batch's trimmed tensors on `device`: ids [b, P' + width], masks, advantages [b], the fixed
        old / reference log-probs [b, width] and the active-token index [N]; copied there once."""
        if part.device == device and (first_pass or "old" in part.on_device):
            return part.on_device
        columns = slice(0, part.width)

        def pick(tensor: torch.Tensor) -> torch.Tensor:   # the micro-batch's rows, where the tensor lives
            return tensor.detach()[part.rows.to(tensor.device)]

        prompt_ids = pick(self.batch.prompt_ids)[:, part.prompt_start:]
        prompt_mask = pick(self.batch.prompt_mask)[:, part.prompt_start:]
        mask = pick(self.batch.completion_mask)[:, columns]
        inputs = {
            "rows": part.rows,
            "input_ids": torch.cat([prompt_ids, pick(self.batch.completion_ids)[:, columns].to(prompt_ids.device)], 1),
            "attention_mask": torch.cat([prompt_mask, mask.to(prompt_mask.device)], 1),
            "mask": mask, "advantages": pick(self.advantages), "active": part.active,
        }
        if self.ref_logprobs is not None:
            inputs["ref"] = pick(self.ref_logprobs)[:, columns]
        if not first_pass:
            inputs["old"] = pick(self.old_logprobs)[:, columns]
        part.device, part.on_device = device, {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
        return part.on_device

    def __call__(self) -> torch.Tensor:
        device = _input_device(self.model)
        first_pass = self.old_logprobs is None
        want_entropy = self.loss_settings["entropy_coef"] > 0 or first_pass
        olds, entropies, losses, merged = None, None, [], {}
        for part in self.parts:
            inputs = self._inputs(part, device, first_pass)
            prompt_length = inputs["input_ids"].shape[1] - part.width
            out = policy_token_logprobs(self.model, inputs["input_ids"], inputs["attention_mask"], prompt_length,
                                        temperature=self.temperature, with_entropy=want_entropy,
                                        token_positions=inputs["active"], chunk_tokens=self.logit_chunk_tokens)
            logprobs, entropy = out if want_entropy else (out, None)
            mask = inputs["mask"]
            if first_pass:   # [B, T] in the mini-batch's row order, zeros past each micro-batch's width
                if olds is None:
                    olds, entropies = logprobs.new_zeros(self.mask.shape), logprobs.new_zeros(self.mask.shape)
                olds[inputs["rows"], :part.width] = logprobs.detach() * mask
                entropies[inputs["rows"], :part.width] = entropy.detach() * mask
            old = logprobs.detach() * mask if first_pass else inputs["old"]
            weight, agg = self._weights(part)
            settings = self.loss_settings | agg
            share = part.tokens / self.tokens
            if self.aggregation == "exact" and settings["entropy_coef"] > 0:   # a token mean over the mini-batch
                settings["entropy_coef"] *= (share if self.norm_tokens is self.tokens
                                             else part.tokens / self.norm_tokens) / weight
            loss, stats = grpo_objective(
                logprobs, old, inputs["advantages"], mask, ref_logprobs=inputs.get("ref"),
                entropy=entropy if settings["entropy_coef"] > 0 else None, stats_as_tensors=True, **settings)
            (loss * weight).backward()
            losses.append(loss.detach() * weight)
            _merge_stats(merged, stats, share)
        total = torch.stack(losses).sum()
        merged["loss"] = total
        self.stats = read_out(merged)   # one device sync per pass
        if first_pass:
            self.old_logprobs, self.sampling_entropy = olds, entropies
        self.passes += 1
        return total


def _input_device(model) -> torch.device:
    """Where the model wants its input ids: its input embeddings' device (else its first parameter's)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    weight = getattr(embeddings, "weight", None)
    return weight.device if torch.is_tensor(weight) else next(model.parameters()).device


def _merge_stats(into: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], share: float) -> None:
    """Token-weighted means of one micro-batch's statistics (extremes for the ratio's min and max), as
    0-dim tensors (read out once per pass)."""
    for key, value in stats.items():
        value = torch.as_tensor(value, dtype=torch.float64)
        if key not in into:
            into[key] = value if key in ("ratio_min", "ratio_max") else value * share
        elif key in ("ratio_min", "ratio_max"):
            into[key] = (torch.minimum if key == "ratio_min" else torch.maximum)(into[key], value.to(into[key].device))
        else:
            into[key] = into[key] + value.to(into[key].device) * share
