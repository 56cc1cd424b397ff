"""GXPO, SFPO and GRPO inside TRL: ``GXPOConfig(GRPOConfig)`` and ``GXPOTrainer(GRPOTrainer)``.

TRL keeps everything it is good at (data loading, generation with HF ``generate`` or vLLM, rewards, group
advantages, the loss, logging, checkpoints, accelerate / DDP); the *update* is one of gxpo_lib's rules
(`GXPO`, `SFPO`, `PlainStep`) wrapping the trainer's optimizer::

    from gxpo_lib.integrations.trl import GXPOConfig, GXPOTrainer
    args = GXPOConfig(output_dir="runs/x", algorithm="gxpo", k=5, alpha=0.5, tau=0.5,
                      per_device_train_batch_size=16, num_generations=8, loss_type="bnpo")
    trainer = GXPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    trainer.train()

How it plugs into TRL 1.16 / transformers 5.x (see ``TRL_HOOKS`` for every private method relied on):

- ``training_step`` is replaced. The Trainer calls it once per micro-batch of an accumulation window
  (``gradient_accumulation_steps`` of them); each call generates and scores when TRL's schedule says so
  (``_prepare_inputs``) and stashes its micro-batch, returning a zero loss. The window's last call (the
  Trainer's ``sync_gradients``) runs ONE ``rule.step(closure)`` whose closure is TRL's ``compute_loss`` +
  ``accelerator.backward`` over every stashed micro-batch (DDP's ``no_sync`` on all but the last), so each
  of the rule's 1 (GRPO), 3 (GXPO) or K+1 (SFPO) passes spans the whole window. The rule takes its optimizer
  steps itself.
- Loss scaling over a window (``current_gradient_accumulation_steps`` = the stashed micro-batches): TRL
  divides each micro-batch's ``grpo`` / ``dr_grpo`` loss by it (exact: micro-batches have equal rows) and
  normalises ``dapo`` by the generation batch's token count (exact when ``steps_per_generation`` equals
  the accumulation, TRL's default). ``bnpo`` (token mean) is TRL's mean of per-micro-batch means; with
  ``loss_aggregation="exact"`` (default) each micro-batch is re-weighted by its tokens over the window's
  tokens on all ranks, so the accumulated gradient is the whole batch's token mean on any number of
  processes and micro-batches (``"verl"`` keeps TRL's mean of means). The entropy bonus follows the same
  weights (exact for ``bnpo``).
- The Trainer's own ``optimizer.step()`` after ``training_step`` would be one step too many: the
  accelerate-wrapped optimizer's inner optimizer is swapped for `RuleOwnedOptimizer`, whose ``step`` does
  nothing (state, param groups and checkpoints pass through to the real optimizer, which the rule drives).
- Clipping: the rule clips every pass to ``max_grad_norm``. ``_clip_grad_norm`` is overridden to clip
  nothing and return the rule's pre-clip norm of the kept step, so the logged ``grad_norm`` is the rule's.
- The LR scheduler is stepped by the Trainer once per outer step (the rule never touches it), so GXPO's
  probe and corrective steps all use the step's learning rate.
- Old log-probs: with one iteration, aligned generation and no vLLM, TRL skips ``old_per_token_logps``
  and uses the detached current ones, which makes the ratio 1 at every pass. ``_generate_and_score_
  completions`` is extended to compute them at sampling time whenever TRL did not, so PPO clipping can
  bind at theta1 and at the extrapolated point (docs/algorithm.md).
- ``gxpo/*`` metrics (every ``StepInfo`` field, plus ``gxpo/cumulative_backward_passes`` and the clip
  fraction of each pass) go into TRL's logs; TRL's per-pass metrics (entropy, clip_ratio/*, kl) keep the
  kept pass's values only (one per micro-batch). Rank 0 also writes ``metrics.jsonl`` rows in gxpo_lib's
  format, with the native trainer's keys: rewards, lengths and the kept pass's token statistics over the
  whole window and all ranks; the loss is the whole batch's (the mean over ranks).
- The rule's state (gate included) and the counters are saved as ``gxpo_state.json`` in each checkpoint
  and restored on resume.
- DDP: gradients are all-reduced by DDP once per pass (after its last micro-batch); the gate's statistic
  is averaged across ranks and a non-finite gradient on any rank is made non-finite on all, so fallbacks
  and gate decisions cannot differ; after every step the ranks' decisions are compared and a mismatch
  raises.
- FSDP2 (accelerate's ``fsdp_version: 2``, ``accelerate_config="fsdp2"``): the rule runs on each rank's
  shards and all-reduces its global norms and sums itself (``trl_distributed``, ``gxpo_lib.core.distributed``);
  checkpoints are accelerate's sharded ones.

Run headless with ``python -m gxpo_lib.integrations.trl_run --config run.json --workdir DIR`` (usually via
``gxpo_lib.integrations.launch_trl``). DeepSpeed and FSDP1 run only ``algorithm="grpo"`` (TRL's own step and
accumulation; one metrics row per window; gxpo / sfpo there are a ValueError pointing to FSDP2); the
native trainer's ``ppo_epochs`` and ``step_scale`` are refused; fp16 is refused (the rule steps the
optimizer outside accelerate's GradScaler), bf16 is fine. Tested with ``TESTED_TRL``; ``check_trl_hooks()``
reports any hook whose signature moved.
"""

from __future__ import annotations

import inspect
import json
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, make_dataclass
from functools import partial
from importlib.metadata import version as _installed_version
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import GradientState
from packaging.specifiers import SpecifierSet
from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from gxpo_lib.choices import LOSS_AGGREGATIONS
from gxpo_lib.config import RULE_SETTINGS, TrainConfig, field_help, uses_entropy_gate
from gxpo_lib.core.rules import StepInfo
from gxpo_lib.integrations import trl_distributed as distributed
from gxpo_lib.integrations.trl_distributed import ReducedGate
from gxpo_lib.rl import runlog
from gxpo_lib.rl.trainer import build_rule

TESTED_TRL = ">=1.16,<1.17"  # the TRL versions this module was run against (pyproject: trl>=1.16,<1.17)
STATE_FILE = "gxpo_state.json"
LOSS_TYPES = {"token_mean": "bnpo", "grpo": "grpo", "dr_grpo": "dr_grpo", "dapo": "dapo"}
# TRL 1.16's values of vllm_importance_sampling_mode (GRPOConfig's help; GRPOTrainer raises on any other, late).
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# Multimodal inputs TRL's loss forwards to the model; the forced old-log-prob pass forwards them too.
_MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                     "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
# Private TRL / transformers / accelerate methods this module overrides or calls, with the parameters it relies on
# (names in order). tests/test_trl.py fails when a TRL upgrade changes one of them.
TRL_HOOKS: dict[str, tuple[type, tuple[str, ...]]] = {
    "training_step": (GRPOTrainer, ("self", "model", "inputs", "num_items_in_batch")),
    "_prepare_inputs": (GRPOTrainer, ("self", "generation_batch")),
    "_generate_and_score_completions": (GRPOTrainer, ("self", "inputs")),
    "_get_per_token_logps_and_entropies": (GRPOTrainer, ("self", "model", "input_ids", "attention_mask",
                                                          "logits_to_keep", "batch_size", "compute_entropy",
                                                          "compute_aux_loss", *_MODEL_INPUT_KEYS[:2])),
    "compute_loss": (GRPOTrainer, ("self", "model", "inputs", "return_outputs", "num_items_in_batch")),
    "_calculate_rewards": (GRPOTrainer, ("self", "inputs", "prompts", "completions", "completion_ids_list")),
    "_save_checkpoint": (GRPOTrainer, ("self", "model", "trial")),
    "_load_optimizer_and_scheduler": (GRPOTrainer, ("self", "checkpoint")),
    "_clip_grad_norm": (Trainer, ("self", "model")),
    "compute_loss_context_manager": (Trainer, ("self",)),
    "_get_output_dir": (Trainer, ("self", "trial")),
    "_set_sync_gradients": (GradientState, ("self", "sync_gradients")),
    "no_sync": (Accelerator, ("self", "model")),
}
# Attributes of GRPOTrainer this module reads or writes.
TRL_ATTRIBUTES = ("_metrics", "_step", "num_iterations", "use_vllm", "reward_weights", "accelerator",
                  "is_deepspeed_enabled", "is_fsdp_enabled", "use_adaptive_entropy", "entropy_coef",
                  "_last_world_entropy", "max_completion_length", "loss_type")


def check_trl_hooks() -> list[str]:
    """Differences between the TRL hooks this module relies on and the installed TRL (empty: all good)."""
    problems = []
    for name, (owner, expected) in TRL_HOOKS.items():
        method = getattr(owner, name, None)
        if method is None:
            problems.append(f"{owner.__name__}.{name} is gone")
            continue
        actual = tuple(inspect.signature(method).parameters)
        if actual[:len(expected)] != expected:
            problems.append(f"{owner.__name__}.{name}{actual} no longer starts with {expected}")
    if "_get_per_token_logps_and_entropies" in TRL_HOOKS:
        accepted = set(inspect.signature(GRPOTrainer._get_per_token_logps_and_entropies).parameters)
        missing = [k for k in _MODEL_INPUT_KEYS if k not in accepted]
        if missing:
            problems.append(f"GRPOTrainer._get_per_token_logps_and_entropies no longer accepts {missing}")
    return problems


def trl_version_is_tested() -> bool:
    return _installed_version("trl") in SpecifierSet(TESTED_TRL)


# -- Config -----------------------------------------------------------------------------------------
def _rule_fields() -> list[tuple[str, Any, Any]]:
    """GXPOConfig's extra fields: every rule and gate setting of TrainConfig, same name, default and help."""
    defaults, helps = TrainConfig(), field_help()
    fields = []
    for name in RULE_SETTINGS:
        value = getattr(defaults, name)
        meta = {"help": helps[name]}
        if isinstance(value, tuple):  # HfArgumentParser reads lists, not tuples
            fields.append((name, list[type(value[0])], field(default_factory=lambda v=value: list(v), metadata=meta)))
        else:
            fields.append((name, type(value), field(default=value, metadata=meta)))
    fields.append(("loss_aggregation", str, field(default=defaults.loss_aggregation, metadata={
        "help": "bnpo over accumulated micro-batches: exact (the window's token mean) or verl (TRL's mean of "
                "per-micro-batch means)"})))
    fields.append(("gxpo_metrics_file", str | None, field(default=None, metadata={
        "help": "where rank 0 writes gxpo_lib metrics.jsonl rows (default output_dir/metrics.jsonl; '' none)"})))
    return fields


def _check_vllm_settings(self) -> None:
    """TRL's vLLM switches and importance-sampling settings, which TRL itself checks late or not at all (a mode
    outside `VLLM_IS_MODES` fails only inside the first training step; a truthy string switches a flag on)."""
    for name in ("vllm_importance_sampling_correction", "vllm_enable_sleep_mode"):
        if not isinstance(getattr(self, name), bool):
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed True or False")
    if self.vllm_importance_sampling_mode not in VLLM_IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r} is invalid: "
                         f"allowed one of {VLLM_IS_MODES}")
    for name in ("vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max"):
        value = getattr(self, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise ValueError(f"{name}={value!r} is invalid: allowed None or a number >= 0")


def _post_init(self) -> None:
    steps = self.gradient_accumulation_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"gradient_accumulation_steps={steps!r} is invalid: allowed an integer >= 1 (the "
                         "micro-batches one rule step spans)")
    _check_vllm_settings(self)
    GRPOConfig.__post_init__(self)
    if self.loss_aggregation not in LOSS_AGGREGATIONS:
        raise ValueError(f"loss_aggregation={self.loss_aggregation!r} is invalid: allowed one of {LOSS_AGGREGATIONS}")
    # The native trainer's GRPO controls have no counterpart in this update loop: refuse, never ignore.
    for name, plain, instead in (("ppo_epochs", 1, "TRL's num_iterations"), ("step_scale", 1.0, "learning_rate")):
        if getattr(self, name, plain) != plain:
            raise ValueError(f"{name}={getattr(self, name)!r} is invalid on the TRL path: allowed {plain} "
                             f"(use {instead} instead)")
    rule_config(self)  # validates every rule setting now, before a model is loaded


GXPOConfig = make_dataclass("GXPOConfig", _rule_fields(), bases=(GRPOConfig,), namespace={
    "__post_init__": _post_init, "__module__": __name__,
    "__doc__": """TRL's ``GRPOConfig`` plus the update rule's settings: the fields of ``gxpo_lib.config.RULE_SETTINGS``
    with TrainConfig's names, defaults and help.

    ``max_grad_norm`` (TRL's) is the rule's clip C (0 = no clipping). ``gradient_accumulation_steps``: the
    micro-batches one rule step spans. ``loss_aggregation``: how ``bnpo`` combines them (see the module
    docstring). ``gxpo_metrics_file``: where rank 0 writes gxpo_lib-format rows.
    """})


def rule_config(args) -> TrainConfig:
    """The rule's settings as a validated TrainConfig, for ``gxpo_lib.rl.trainer.build_rule``."""
    values = {name: getattr(args, name) for name in RULE_SETTINGS}
    max_grad_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
    return TrainConfig(**values, max_grad_norm=max_grad_norm).validate()


# -- Small helpers the trainer installs -------------------------------------------------------------
class RuleOwnedOptimizer:
    """Stands in for the real optimizer inside accelerate's wrapper once a rule drives the updates.

    The Trainer calls ``optimizer.step()`` after every ``training_step``; the rule has already stepped the
    real optimizer, so that call does nothing (``ignored_steps`` counts them). Everything else (param
    groups for the LR scheduler, state, state_dict for checkpoints, zero_grad) is the real optimizer's.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.ignored_steps = 0

    def step(self, closure=None):
        self.ignored_steps += 1

    def __getattr__(self, name: str):
        if name == "optimizer":  # not set yet (an instance being copied or unpickled)
            raise AttributeError(name)
        return getattr(self.optimizer, name)


def _float(value: Any) -> float:
    """StepInfo value -> float for TRL's logs (None -> nan, which TRL's log() drops)."""
    return float("nan") if value is None else float(value)


def _loss_mask(inputs: dict[str, Any]) -> torch.Tensor:
    """The tokens TRL's loss counts in prepared inputs: completion_mask x tool_mask, [B, T]."""
    mask = inputs["completion_mask"]
    tool_mask = inputs.get("tool_mask")
    return (mask if tool_mask is None else mask * tool_mask).float()


@dataclass
class AccumulationWindow:
    """What one optimizer step gathers over its ``gradient_accumulation_steps`` training_step calls.

    ``batches``: the prepared TRL inputs of each micro-batch (rule path); ``rewards``: each generation's
    weighted rewards [rows of all ranks]; ``entropy_totals``: [entropy sum, token count] of the window's
    generations (all ranks); ``loss``: the summed micro-batch losses (TRL's own step under DeepSpeed/FSDP).
    """

    calls: int = 0
    batches: list[dict[str, Any]] = field(default_factory=list)
    rollout_seconds: float = 0.0
    reward_seconds: float = 0.0
    update_seconds: float = 0.0
    loss: float = 0.0
    rewards: list[torch.Tensor] = field(default_factory=list)
    entropy_totals: torch.Tensor | None = None
    cpu_start: float = field(default_factory=time.process_time)


# -- The trainer ------------------------------------------------------------------------------------
class GXPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose update is a gxpo_lib rule (see the module docstring for the mechanics).

    Extra attributes: ``rule`` (the rule, built at the first step), ``last_info`` (the last StepInfo),
    ``last_row`` (the last metrics.jsonl row), ``counters`` (cumulative backward passes and seconds).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, GXPOConfig):
            raise ValueError(f"args={type(self.args).__name__} is invalid: allowed a GXPOConfig")
        if not trl_version_is_tested():
            warnings.warn(f"trl {_installed_version('trl')} is outside the tested range {TESTED_TRL}; "
                          f"hook check: {check_trl_hooks() or 'ok'}", stacklevel=2)
        # DeepSpeed and FSDP1 own the gradients and the optimizer step: only TRL's own GRPO step runs there.
        # Under FSDP2 the rule runs on each rank's shards (trl_distributed).
        self.fsdp_version = distributed.fsdp_version(self.accelerator)
        distributed.fsdp_dropped(self.accelerator)
        self.native_update = distributed.update_backend(self.args.algorithm, bool(self.is_deepspeed_enabled),
                                                        self.fsdp_version)
        self.sharded = self.fsdp_version == 2  # the rule sees DTensor shards, reduces its global sums itself
        if not self.native_update and self.args.fp16:
            raise ValueError("fp16=True is invalid: allowed bf16 or fp32 (the rule steps the optimizer itself, "
                             "outside accelerate's GradScaler)")
        self.rule = None
        self._pending_rule_state: dict[str, Any] | None = None
        self.counters = runlog.new_counters()
        self.last_info: StepInfo | None = None
        self.last_row: dict[str, Any] | None = None
        self.pass_metrics: list[dict[str, list[float]]] = []
        self.window = AccumulationWindow()
        self.pass_token_shares: list[float] | None = None
        self._sampling_entropy: float | None = None
        path = self.args.gxpo_metrics_file
        path = os.path.join(self.args.output_dir, runlog.METRICS_FILE) if path is None else path
        self.metrics_path = path if path and self.accelerator.is_main_process else None
        self.metrics_log: runlog.MetricsLog | None = None   # opened at the first row (after a resume's cut)
        self._resume_step: int | None = None

    # -- the rule ----------------------------------------------------------------------------------
    def ensure_rule(self):
        """Build the rule around the trainer's optimizer (once) and neutralise the Trainer's own step."""
        if self.rule is not None:
            return self.rule
        if self.optimizer is None:
            raise RuntimeError("the trainer has no optimizer yet: call train(), or create_optimizer() first")
        wrapper = self.optimizer if isinstance(self.optimizer, AcceleratedOptimizer) else None
        real = wrapper.optimizer if wrapper is not None else self.optimizer
        if isinstance(real, RuleOwnedOptimizer):
            real = real.optimizer
        rule = build_rule(rule_config(self.args), real)
        if wrapper is not None:
            wrapper.optimizer = RuleOwnedOptimizer(real)
        if self.sharded:  # the rule reduces the gate's signal over the shards itself
            distributed.check_sharded(rule)
            distributed.mark_synced_generation(self.model)
        elif self.accelerator.num_processes > 1 and getattr(rule, "gate", None) is not None:
            rule.gate = ReducedGate.wrapping(rule.gate, partial(distributed.mean_over_ranks, self.accelerator))
        if self._pending_rule_state is not None:
            rule.load_state_dict(self._pending_rule_state)
            self._pending_rule_state = None
        self.rule = rule
        return rule

    # -- TRL hooks ---------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch):
        """One micro-batch of the accumulation window: generate + score when due, stash; at the window's
        last micro-batch one rule step (1, 3 or K+1 passes) over all of them. Returns the step's loss at the
        window's end, 0 before it (the Trainer sums the calls' losses)."""
        if self.window.calls == 0:
            self.window = AccumulationWindow()
        window, start = self.window, time.perf_counter()
        window.calls += 1
        boundary = self.accelerator.sync_gradients  # the Trainer's: this call ends the window
        if self.native_update:
            loss = super().training_step(model, inputs, num_items_in_batch)
            window.loss += float(loss)
            window.rollout_seconds += time.perf_counter() - start
            if boundary:
                info = StepInfo(step=self.state.global_step + 1, loss=window.loss, backward_passes=1)
                self._end_window(info, None)
            return loss
        rule = self.ensure_rule()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        # Rollouts, rewards and advantages (TRL; generated once per generation batch), stashed.
        window.batches.append(self._prepare_inputs(inputs))
        self._step += 1
        window.rollout_seconds += time.perf_counter() - start
        if not boundary:
            return torch.tensor(0.0, device=self.args.device)
        # The update rule over the whole window.
        update_start = time.perf_counter()
        info = self.update(model, window.batches, rule)
        window.update_seconds += time.perf_counter() - update_start
        self._end_window(info, window.batches)
        return torch.tensor(float("nan") if info.loss is None else info.loss, device=self.args.device)

    def update(self, model, batches: dict[str, Any] | list[dict[str, Any]], rule=None) -> StepInfo:
        """One ``rule.step`` on prepared TRL inputs (one micro-batch, or a window's list of them); pushes the
        ``gxpo/*`` metrics and returns the StepInfo.

        Each pass runs TRL's ``compute_loss`` + ``accelerator.backward`` on every micro-batch in turn,
        weighted as `_micro_batch_weights` says; every pass sees the same inputs, so the old log-probs stay
        those of the sampling policy.
        """
        rule = rule or self.ensure_rule()
        batches = [batches] if isinstance(batches, dict) else list(batches)
        weights, shares = self._micro_batch_weights(batches)
        self.current_gradient_accumulation_steps = len(batches)  # TRL's loss divides by it
        metrics = self._metrics["train"]
        base = {key: len(values) for key, values in metrics.items()}
        passes: list[dict[str, list[float]]] = []
        gradient_state = self.accelerator.gradient_state

        def closure():
            before = {key: len(values) for key, values in metrics.items()}
            total = 0.0
            for index, (inputs, weight) in enumerate(zip(batches, weights, strict=True)):
                last = index == len(batches) - 1
                # DDP reduces once, after the last micro-batch; TRL's window statistics close there too.
                gradient_state._set_sync_gradients(last)
                with nullcontext() if last else self.accelerator.no_sync(model):
                    with self.compute_loss_context_manager():
                        loss = self.compute_loss(model, inputs, num_items_in_batch=inputs.get("num_items_in_batch"))
                    self.accelerator.backward(loss * weight)
                total = total + loss.detach() * weight
            if rule.reducer is not None:  # FSDP2: the rule all-reduces the norm and averages the loss itself
                return total
            distributed.agree_on_finite_grads(self.accelerator, rule.params)  # same fallback on every rank
            if self.accelerator.num_processes > 1:  # the whole batch's loss, the same on every rank
                total = self.accelerator.reduce(total.reshape(1), reduction="mean")[0]
            passes.append({k: list(v[before.get(k, 0):]) for k, v in metrics.items() if len(v) > before.get(k, 0)})
            return total

        try:
            info = rule.step(closure, gate_signal=self._gate_signal(rule))
        finally:
            gradient_state._set_sync_gradients(True)
        distributed.check_ranks_agree(self.accelerator, info)  # every rank took the same decisions, or raise
        # TRL's per-pass metrics: keep the kept (last) pass's values, as one GRPO step would log them.
        for key in {k for p in passes for k in p}:
            metrics[key] = metrics[key][:base.get(key, 0)] + passes[-1].get(key, [])
        self.pass_metrics = passes
        self.pass_token_shares = shares
        self.last_info = info
        for name, value in info.to_dict().items():
            if name != "step":
                metrics[f"gxpo/{name}"].append(_float(value))
        for index, values in enumerate(passes, start=1):
            metrics[f"gxpo/clip_frac_pass{index}"].append(_float(self._window_mean(values, "clip_ratio/region_mean")))
        return info

    def _micro_batch_weights(self, batches: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
        """(loss weight, share of the window's tokens on all ranks) of each micro-batch.

        The weights are 1 except for ``bnpo`` with ``loss_aggregation="exact"``: TRL divides a micro-batch's
        token sum by its own tokens and by the micro-batch count n, so n * tokens * processes / (the window's
        tokens on all ranks) turns the sum over micro-batches, averaged by DDP, into the window's token mean.
        """
        local = torch.stack([_loss_mask(b).sum() for b in batches]).double().to(self.accelerator.device)
        every = self.accelerator.reduce(local.clone(), reduction="sum") if self.accelerator.num_processes > 1 else local
        window_tokens = float(every.sum().clamp(min=1.0))
        shares = (every / window_tokens).tolist()
        if self.loss_type != "bnpo" or self.args.loss_aggregation != "exact":
            return [1.0] * len(batches), shares
        scale = len(batches) * self.accelerator.num_processes / window_tokens
        return [scale * max(float(t), 1.0) for t in local], shares

    def _window_mean(self, pass_values: dict[str, list[float]], key: str) -> float | None:
        """A metric TRL logs once per micro-batch (a mean over all ranks' tokens), averaged over the window
        weighted by each micro-batch's tokens; None when the pass did not log it."""
        values = pass_values.get(key)
        if not values:
            return None
        shares = self.pass_token_shares
        if shares is None or len(shares) != len(values):
            return float(sum(values) / len(values))
        return float(sum(v * s for v, s in zip(values, shares, strict=True)))

    def _generate_and_score_completions(self, inputs):
        """TRL's rollouts, plus the sampling policy's log-probs whenever TRL skipped them.

        Also measures the sampling-time entropy (token mean over all ranks) when the gate watches it.
        """
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return output
        need_old = "old_per_token_logps" not in output
        need_entropy = uses_entropy_gate(rule_config(self.args))
        if need_old or need_entropy:
            logps, entropies = self._sampling_policy_view(output, need_entropy)
            if need_old:
                output["old_per_token_logps"] = logps
            if need_entropy:  # a token mean over every generation of the window, on all ranks
                totals = torch.stack([(entropies * _loss_mask(output)).sum(), _loss_mask(output).sum()]).double()
                totals = self.accelerator.reduce(totals, reduction="sum").cpu()
                window = self.window
                window.entropy_totals = totals if window.entropy_totals is None else window.entropy_totals + totals
                self._sampling_entropy = float(window.entropy_totals[0] / window.entropy_totals[1].clamp(min=1.0))
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (already gathered over ranks), timed and kept for the window's metrics row."""
        start = time.perf_counter()
        per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.window.reward_seconds += time.perf_counter() - start
        if self.model.training:
            weighted = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
            weighted[torch.isnan(per_func).all(dim=1)] = float("nan")
            self.window.rewards.append(weighted.detach().float().cpu())
        return per_func

    def _clip_grad_norm(self, model):
        """No clipping here (the rule clipped every pass); report the rule's pre-clip norm of the kept step."""
        if self.native_update:
            return super()._clip_grad_norm(model)
        norm = None if self.last_info is None else self.last_info.grad_norm
        return float("nan") if norm is None else float(norm)

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint, plus the rule (gate included) and the counters in gxpo_state.json."""
        wrapper = self.optimizer if isinstance(self.optimizer, AcceleratedOptimizer) else None
        stand_in = wrapper.optimizer if wrapper is not None else None
        if self.sharded and isinstance(stand_in, RuleOwnedOptimizer):  # FSDP2's saver reads a torch Optimizer
            wrapper.optimizer = stand_in.optimizer
        try:
            super()._save_checkpoint(model, trial)
        finally:
            if stand_in is not None:
                wrapper.optimizer = stand_in
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        rule_state = self.rule.state_dict() if self.rule is not None else self._pending_rule_state
        state = {"step": self.state.global_step, "rule": rule_state, "counters": self.counters}
        with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """TRL's restore, plus the rule, the counters and metrics.jsonl cut back to the checkpoint."""
        if checkpoint is not None and self.args.world_size > 1 and self.args.device.type == "cpu" \
                and self.fsdp_version is None:
            self._load_optimizer_and_scheduler_on_cpu(checkpoint)
        else:
            super()._load_optimizer_and_scheduler(checkpoint)
        path = None if checkpoint is None else os.path.join(checkpoint, STATE_FILE)
        if path is None or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        self.counters.update(runlog.saved_counters(state["counters"]))
        if state["rule"] is not None:
            if self.rule is not None:
                self.rule.load_state_dict(state["rule"])
            else:
                self._pending_rule_state = state["rule"]
        self._resume_step = int(state["step"])

    def _load_optimizer_and_scheduler_on_cpu(self, checkpoint: str) -> None:
        """What transformers does, for several CPU processes: its loader maps the optimizer state to
        ``args.device`` ("cpu:N" there), which torch.load rejects."""
        self.optimizer.load_state_dict(torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), map_location="cpu",
                                                  weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
        entropy_state = os.path.join(checkpoint, "entropy_ctrl_state.json")
        if self.use_adaptive_entropy and os.path.exists(entropy_state):  # as GRPOTrainer does
            with open(entropy_state) as handle:
                state = json.load(handle)
            self.entropy_coef, self._last_world_entropy = state["entropy_coef"], state["last_world_entropy"]

    # -- internals -----------------------------------------------------------------------------------
    def _gate_signal(self, rule) -> float | None:
        gate = getattr(rule, "gate", None)
        if gate is None or gate.signal != "entropy":
            return None
        if self._sampling_entropy is None:
            raise RuntimeError("the gate watches the entropy but none was measured at sampling time")
        return self._sampling_entropy

    @torch.no_grad()
    def _sampling_policy_view(self, output: dict[str, Any], with_entropy: bool):
        """Per-token log-probs (and entropies) of the completions under the current = sampling policy."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        extra = {key: output[key] for key in _MODEL_INPUT_KEYS if key in output}
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, output["completion_ids"].size(1),
                batch_size=self.args.per_device_train_batch_size, compute_entropy=with_entropy, **extra)
        return logps, entropies

    def _end_window(self, info: StepInfo, batches: list[dict[str, Any]] | None) -> None:
        """Close the accumulation window: counters, TRL's step_time and cumulative count, the metrics.jsonl
        row (rewards, lengths and per-token statistics over the whole window, all ranks)."""
        window, self.window = self.window, AccumulationWindow()
        scoring = min(window.reward_seconds, window.rollout_seconds)
        self.counters["cumulative_backward_passes"] += info.backward_passes
        self.counters["seconds_sampling"] += window.rollout_seconds - scoring
        self.counters["seconds_scoring"] += scoring
        self.counters["seconds_update"] += window.update_seconds
        self.counters["cpu_seconds"] += time.process_time() - window.cpu_start
        metrics = self._metrics["train"]
        if not self.native_update:  # TRL's training_step logs it under DeepSpeed / FSDP
            metrics["step_time"].append(window.rollout_seconds + window.update_seconds)
        metrics["gxpo/cumulative_backward_passes"].append(float(self.counters["cumulative_backward_passes"]))
        length = None
        if batches:  # mean completion length over every rank and micro-batch
            local = torch.cat([b["completion_mask"].sum(1).float() for b in batches])
            length = float(self.accelerator.gather(local).mean())
        rewards = torch.cat(window.rewards).tolist() if window.rewards else []
        last = self.pass_metrics[-1] if self.pass_metrics and batches else {}
        learning_rate = self._get_learning_rate() if self.lr_scheduler is not None else self.args.learning_rate
        self.last_row = runlog.train_row(
            self.state.global_step + 1, info.to_dict(), self.rule, rewards, self.counters,
            response_length=length, entropy=self._window_mean(last, "entropy"), kl=self._window_mean(last, "kl"),
            clip_frac=self._window_mean(last, "clip_ratio/region_mean"), learning_rate=learning_rate)
        self.write_row(self.last_row)

    def x_values(self) -> dict[str, float]:
        """Cumulative backward passes and training seconds (as gxpo_lib.rl.trainer writes them)."""
        return runlog.x_values(self.counters)

    def write_row(self, row: dict[str, Any]) -> None:
        """Append a row (e.g. an evaluation) to metrics.jsonl on rank 0 (opened at the first row, cut back
        to the checkpoint when resuming)."""
        if self.metrics_path is None:
            return
        if self.metrics_log is None:
            self.metrics_log = runlog.MetricsLog(self.metrics_path, resume_step=self._resume_step)
        self.metrics_log.write(row)
