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

- ``training_step`` is replaced: generate and score (TRL's ``_prepare_inputs``), then ``rule.step(closure)``
  where the closure is TRL's ``compute_loss`` + ``accelerator.backward`` on the *same* batch. The rule
  takes its 1 (GRPO), 3 (GXPO) or K+1 (SFPO) optimizer steps itself. Gradient accumulation must be 1.
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
  bind at theta1 and at the extrapolated point (spec section 4).
- ``gxpo/*`` metrics (every ``StepInfo`` field, plus ``gxpo/cumulative_backward_passes`` and the clip
  fraction of each pass) go into TRL's logs; TRL's per-pass metrics (entropy, clip_ratio/*, kl) keep the
  kept pass's values only. Rank 0 also writes ``metrics.jsonl`` rows in gxpo_lib's format.
- The rule's state (gate included) and the counters are saved as ``gxpo_state.json`` in each checkpoint
  and restored on resume.
- DDP: gradients are all-reduced by DDP on every pass; the gate's statistic is averaged across ranks and
  a non-finite gradient on any rank is made non-finite on all, so fallbacks and gate decisions cannot
  differ; after every step the ranks' decisions are compared and a mismatch raises.

Run headless with ``python -m gxpo_lib.integrations.trl --config run.json --workdir DIR`` (usually via
``gxpo_lib.integrations.launch_trl``). DeepSpeed and FSDP run only ``algorithm="grpo"`` (TRL's own step);
fp16 is refused (the rule steps the optimizer outside accelerate's GradScaler), bf16 is fine. Tested with
``TESTED_TRL``; ``check_trl_hooks()`` reports any hook whose signature moved.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from importlib.metadata import version as _installed_version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.optimizer import AcceleratedOptimizer
from packaging.specifiers import SpecifierSet
from transformers import Trainer, TrainerCallback
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from gxpo_lib.gate import ShutoffGate
from gxpo_lib.integrations import PROGRESS_PREFIX, launch_trl, stream
from gxpo_lib.rules import StepInfo
from gxpo_lib.trainer import TrainConfig, build_rule, read_metrics

TESTED_TRL = ">=1.16,<1.17"  # the TRL versions this module was run against (pyproject: trl>=1.16,<1.17)
STATE_FILE = "gxpo_state.json"
LOSS_TYPES = {"token_mean": "bnpo", "grpo": "grpo", "dr_grpo": "dr_grpo", "dapo": "dapo"}
# Settings of the update rule, named as in gxpo_lib.trainer.TrainConfig.
RULE_FIELDS = ("algorithm", "k", "alpha", "r_clamp", "optimizer_state", "retention", "skip_corrective", "gate",
               "tau", "omega", "gate_warmup", "gate_patience", "gate_mode", "gate_window",
               "gate_window_includes_current", "gate_signal", "gate_permanent", "sfpo_official_gate")
# Multimodal inputs TRL's loss forwards to the model; the forced old-log-prob pass forwards them too.
_MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
                     "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")
# Private TRL / transformers methods this module overrides or calls, with the parameters it relies on
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
}
# Attributes of GRPOTrainer this module reads or writes.
TRL_ATTRIBUTES = ("_metrics", "_step", "num_iterations", "use_vllm", "reward_weights", "accelerator",
                  "is_deepspeed_enabled", "is_fsdp_enabled", "use_adaptive_entropy", "entropy_coef",
                  "_last_world_entropy", "max_completion_length")


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


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------
@dataclass
class GXPOConfig(GRPOConfig):
    """TRL's ``GRPOConfig`` plus the update rule's settings (names as in ``gxpo_lib.trainer.TrainConfig``).

    ``algorithm``: "grpo" (`PlainStep`), "gxpo" or "sfpo". ``max_grad_norm`` (TRL's) is the rule's clip C
    (0 = no clipping). ``gradient_accumulation_steps`` must stay 1. ``gxpo_metrics_file``: where rank 0
    writes gxpo_lib-format rows (default ``output_dir/metrics.jsonl``; "" for none).
    """

    algorithm: str = field(default="gxpo", metadata={"help": "Update rule: grpo, gxpo or sfpo."})
    k: int = field(default=5, metadata={"help": "GXPO's lookahead K or SFPO's number of fast steps (>= 2)."})
    alpha: float = field(default=0.5, metadata={"help": "Reposition factor alpha (> 0)."})
    r_clamp: list[float] = field(default_factory=lambda: [-2.0, 3.0],
                                 metadata={"help": "Stability clamp (r_min, r_max) on the retention ratio."})
    optimizer_state: str = field(default="carry", metadata={"help": "carry or transactional."})
    retention: str = field(default="grad", metadata={"help": "grad or clip_corrected."})
    skip_corrective: bool = field(default=False, metadata={"help": "Ablation: no corrective pass."})
    gate: bool = field(default=True, metadata={"help": "False: never shut extrapolation off."})
    tau: float = field(default=0.5, metadata={"help": "Gate threshold on the z-score."})
    omega: float = field(default=0.1, metadata={"help": "Gate EMA rate."})
    gate_warmup: int = field(default=2, metadata={"help": "Observations before the gate may trip."})
    gate_patience: int = field(default=1, metadata={"help": "Consecutive z >= tau needed to trip."})
    gate_mode: str = field(default="ema", metadata={"help": "ema or window."})
    gate_window: int = field(default=30, metadata={"help": "Window length (gate_mode=window)."})
    gate_window_includes_current: bool = field(default=False, metadata={"help": "Score inside own window."})
    gate_signal: str = field(default="grad_norm", metadata={"help": "grad_norm or entropy."})
    gate_permanent: bool = field(default=True, metadata={"help": "Once closed, stay closed."})
    sfpo_official_gate: bool = field(default=True, metadata={"help": "SFPO: official entropy-window gate."})
    gxpo_metrics_file: str | None = field(default=None, metadata={"help": "gxpo_lib metrics.jsonl path."})

    def __post_init__(self):
        super().__post_init__()
        self.r_clamp = [float(x) for x in self.r_clamp]
        if self.gradient_accumulation_steps != 1:
            raise ValueError(
                f"gradient_accumulation_steps={self.gradient_accumulation_steps} is invalid: allowed 1 (the "
                "update rule takes its optimizer steps inside one training_step, each on the whole batch; "
                "raise per_device_train_batch_size instead)")
        rule_config(self)  # validates every rule setting now, before a model is loaded


def rule_config(args: GXPOConfig) -> TrainConfig:
    """The rule's settings as a validated TrainConfig, for ``gxpo_lib.trainer.build_rule``."""
    values = {name: getattr(args, name) for name in RULE_FIELDS}
    max_grad_norm = args.max_grad_norm if args.max_grad_norm and args.max_grad_norm > 0 else None
    return TrainConfig(**values, max_grad_norm=max_grad_norm).validate()


def uses_entropy_gate(args: GXPOConfig) -> bool:
    """Whether the rule's gate watches the policy entropy (then it is computed at sampling time)."""
    if args.algorithm == "grpo" or not args.gate:
        return False
    if args.algorithm == "sfpo" and args.sfpo_official_gate:
        return True
    return args.gate_signal == "entropy"


# ---------------------------------------------------------------------------------------------------
# Small helpers the trainer installs
# ---------------------------------------------------------------------------------------------------
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

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group):
        self.optimizer.add_param_group(param_group)


class ReducedGate(ShutoffGate):
    """A ShutoffGate that scores the mean of its observation over all ranks (same decision everywhere)."""

    def __init__(self, reduce, **settings):
        super().__init__(**settings)
        self.reduce = reduce

    @classmethod
    def wrapping(cls, gate: ShutoffGate, reduce) -> ReducedGate:
        reduced = cls(reduce, **gate.settings())
        reduced.load_state_dict(gate.state_dict())
        return reduced

    def observe(self, value: float, step: int | None = None) -> float:
        return super().observe(self.reduce(float(value)), step=step)


class _MetricsLog:
    """Appends gxpo_lib-format rows to a metrics.jsonl, one flushed JSON line each."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = None

    def write(self, row: dict[str, Any]) -> None:
        if self.handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = self.path.open("a", encoding="utf-8")
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.handle.write(json.dumps(clean) + "\n")
        self.handle.flush()

    def truncate(self, step: int) -> None:
        """Keep only rows up to `step` (the checkpoint resumed from)."""
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)


def _float(value: Any) -> float:
    """StepInfo value -> float for TRL's logs (None -> nan, which TRL's log() drops)."""
    return float("nan") if value is None else float(value)


# ---------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------
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
        # DeepSpeed / FSDP own the gradients and the optimizer step: only TRL's own GRPO step runs there.
        self.native_update = bool(self.is_deepspeed_enabled or self.is_fsdp_enabled)
        if self.native_update and self.args.algorithm != "grpo":
            raise ValueError(f"algorithm={self.args.algorithm!r} is invalid under DeepSpeed/FSDP: allowed 'grpo' "
                             "(the rule needs full gradients in param.grad and its own optimizer steps; use "
                             "DDP, e.g. accelerate_configs/multi_gpu.yaml, for gxpo and sfpo)")
        if not self.native_update and self.args.fp16:
            raise ValueError("fp16=True is invalid: allowed bf16 or fp32 (the rule steps the optimizer itself, "
                             "outside accelerate's GradScaler)")
        self.rule = None
        self._pending_rule_state: dict[str, Any] | None = None
        self.counters = {"backward_passes": 0, "seconds_sampling": 0.0, "seconds_scoring": 0.0,
                         "seconds_update": 0.0, "seconds_eval": 0.0}
        self.last_info: StepInfo | None = None
        self.last_row: dict[str, Any] | None = None
        self.pass_metrics: list[dict[str, list[float]]] = []
        self._sampling_entropy: float | None = None
        self._last_rewards: torch.Tensor | None = None
        self._reward_seconds = 0.0
        path = self.args.gxpo_metrics_file
        path = os.path.join(self.args.output_dir, "metrics.jsonl") if path is None else path
        self.metrics_log = _MetricsLog(Path(path)) if path and self.accelerator.is_main_process else None

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
        if self.accelerator.num_processes > 1 and getattr(rule, "gate", None) is not None:
            rule.gate = ReducedGate.wrapping(rule.gate, self._mean_over_ranks)
        if self._pending_rule_state is not None:
            rule.load_state_dict(self._pending_rule_state)
            self._pending_rule_state = None
        self.rule = rule
        return rule

    # -- TRL hooks ---------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch):
        """Generate + score, then one rule step (1, 3 or K+1 passes) on the same batch."""
        if self.native_update:
            start = time.perf_counter()
            self._reward_seconds = 0.0
            loss = super().training_step(model, inputs, num_items_in_batch)
            info = StepInfo(step=self.state.global_step + 1, loss=float(loss), backward_passes=1)
            self._record_step(info, time.perf_counter() - start, 0.0, None)
            return loss
        start = time.perf_counter()
        rule = self.ensure_rule()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        # Rollouts, rewards and advantages (TRL), with old log-probs forced at sampling time.
        self._reward_seconds = 0.0
        inputs = self._prepare_inputs(inputs)
        rollout_seconds = time.perf_counter() - start
        # The update rule on that batch.
        update_start = time.perf_counter()
        info = self.update(model, inputs, rule)
        update_seconds = time.perf_counter() - update_start
        self._step += 1
        self._metrics["train"]["step_time"].append(time.perf_counter() - start)
        self._record_step(info, rollout_seconds, update_seconds, inputs)
        loss = float("nan") if info.loss is None else info.loss
        return torch.tensor(loss, device=self.args.device)

    def update(self, model, inputs: dict[str, Any], rule=None) -> StepInfo:
        """One ``rule.step`` on prepared TRL inputs; pushes the ``gxpo/*`` metrics and returns the StepInfo.

        The closure is TRL's ``compute_loss`` + ``accelerator.backward``; every pass sees the same inputs,
        so the old log-probs stay those of the sampling policy.
        """
        rule = rule or self.ensure_rule()
        self.current_gradient_accumulation_steps = 1  # TRL's loss divides by it; GXPOConfig enforces 1
        metrics = self._metrics["train"]
        base = {key: len(values) for key, values in metrics.items()}
        passes: list[dict[str, list[float]]] = []

        def closure():
            before = {key: len(values) for key, values in metrics.items()}
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=inputs.get("num_items_in_batch"))
            self.accelerator.backward(loss)
            self._agree_on_finite_grads(rule.params)
            passes.append({k: list(v[before.get(k, 0):]) for k, v in metrics.items() if len(v) > before.get(k, 0)})
            return loss.detach()

        info = rule.step(closure, gate_signal=self._gate_signal(rule))
        self._check_ranks_agree(info)
        # TRL's per-pass metrics: keep the kept (last) pass's values, as one GRPO step would log them.
        for key in {k for p in passes for k in p}:
            metrics[key] = metrics[key][:base.get(key, 0)] + passes[-1].get(key, [])
        self.pass_metrics = passes
        self.last_info = info
        for name, value in info.to_dict().items():
            if name != "step":
                metrics[f"gxpo/{name}"].append(_float(value))
        for index, values in enumerate(passes, start=1):
            metrics[f"gxpo/clip_frac_pass{index}"].append(values.get("clip_ratio/region_mean", [float("nan")])[0])
        return info

    def _generate_and_score_completions(self, inputs):
        """TRL's rollouts, plus the sampling policy's log-probs whenever TRL skipped them.

        Also measures the sampling-time entropy (token mean over all ranks) when the gate watches it.
        """
        output = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return output
        need_old = "old_per_token_logps" not in output
        need_entropy = uses_entropy_gate(self.args)
        if need_old or need_entropy:
            logps, entropies = self._sampling_policy_view(output, need_entropy)
            if need_old:
                output["old_per_token_logps"] = logps
            if need_entropy:
                mask = output["completion_mask"] * output.get("tool_mask", 1)
                totals = torch.stack([(entropies * mask).sum(), mask.sum().float()]).double()
                totals = self.accelerator.reduce(totals, reduction="sum")
                self._sampling_entropy = float(totals[0] / totals[1].clamp(min=1.0))
        return output

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (already gathered over ranks), timed and kept for the metrics row."""
        start = time.perf_counter()
        per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._reward_seconds += time.perf_counter() - start
        if self.model.training:
            weighted = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
            weighted[torch.isnan(per_func).all(dim=1)] = float("nan")
            self._last_rewards = weighted.detach().float().cpu()
        return per_func

    def _clip_grad_norm(self, model):
        """No clipping here (the rule clipped every pass); report the rule's pre-clip norm of the kept step."""
        if self.native_update:
            return super()._clip_grad_norm(model)
        norm = None if self.last_info is None else self.last_info.grad_norm
        return float("nan") if norm is None else float(norm)

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint, plus the rule (gate included) and the counters in gxpo_state.json."""
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        rule_state = self.rule.state_dict() if self.rule is not None else self._pending_rule_state
        state = {"step": self.state.global_step, "rule": rule_state, "counters": self.counters}
        with open(os.path.join(folder, STATE_FILE), "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=2)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """TRL's restore, plus the rule, the counters and metrics.jsonl cut back to the checkpoint."""
        if checkpoint is not None and self.args.world_size > 1 and self.args.device.type == "cpu":
            self._load_optimizer_and_scheduler_on_cpu(checkpoint)
        else:
            super()._load_optimizer_and_scheduler(checkpoint)
        path = None if checkpoint is None else os.path.join(checkpoint, STATE_FILE)
        if path is None or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
        self.counters.update(state["counters"])
        if state["rule"] is not None:
            if self.rule is not None:
                self.rule.load_state_dict(state["rule"])
            else:
                self._pending_rule_state = state["rule"]
        if self.metrics_log is not None and self.metrics_log.path.exists():
            self.metrics_log.truncate(int(state["step"]))

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

    # -- distributed agreement ---------------------------------------------------------------------
    def _mean_over_ranks(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean")[0])

    def _agree_on_finite_grads(self, params: list[torch.Tensor]) -> None:
        """If any rank's gradient is non-finite, make it non-finite on every rank (same fallback)."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        local_bad = bool(grads) and not math.isfinite(float(torch.nn.utils.get_total_norm(grads)))
        flag = torch.tensor([float(local_bad)], device=self.accelerator.device)
        if float(self.accelerator.gather(flag).max()) > 0 and not local_bad and grads:
            grads[0].view(-1)[0] = float("nan")

    def _check_ranks_agree(self, info: StepInfo) -> None:
        """Every rank must have taken the same decisions this step; raise if not."""
        if self.accelerator.num_processes == 1:
            return
        local = torch.tensor([float(info.active), float(info.fallback), float(info.skipped),
                              float(info.gate_open), float(info.backward_passes)], device=self.accelerator.device)
        every = self.accelerator.gather(local).view(self.accelerator.num_processes, -1)
        if not bool((every == every[0]).all()):
            raise RuntimeError(f"ranks diverged at step {info.step}: (active, fallback, skipped, gate_open, "
                               f"backward_passes) per rank = {every.tolist()}")

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

    def _record_step(self, info: StepInfo, rollout_seconds: float, update_seconds: float, inputs) -> None:
        """Update the counters, push the cumulative count to TRL's logs, write the metrics.jsonl row."""
        scoring = min(self._reward_seconds, rollout_seconds)
        self.counters["backward_passes"] += info.backward_passes
        self.counters["seconds_sampling"] += rollout_seconds - scoring
        self.counters["seconds_scoring"] += scoring
        self.counters["seconds_update"] += update_seconds
        self._metrics["train"]["gxpo/cumulative_backward_passes"].append(float(self.counters["backward_passes"]))
        length = None
        if inputs is not None:  # mean completion length over every rank
            lengths = self.accelerator.gather(inputs["completion_mask"].sum(1).float())
            length = float(lengths.mean())
        row = self._train_row(info, length)
        self.last_row = row
        if self.metrics_log is not None:
            self.metrics_log.write(row)

    def _train_row(self, info: StepInfo, response_length: float | None) -> dict[str, Any]:
        """One gxpo_lib-format "train" row (the keys gxpo_lib.trainer writes)."""
        rewards = self._last_rewards
        valid = rewards[~torch.isnan(rewards)] if rewards is not None else torch.empty(0)
        last = self.pass_metrics[-1] if self.pass_metrics else {}
        rule = self.rule
        gate = getattr(rule, "gate", None)
        r_clamp = getattr(rule, "r_clamp", None) or (None, None)
        return {
            "kind": "train", **info.to_dict(), "step": self.state.global_step + 1,
            "k": getattr(rule, "k", None), "alpha": getattr(rule, "alpha", None),
            "r_min": r_clamp[0], "r_max": r_clamp[1], "tau": None if gate is None else gate.tau,
            "reward_mean": float(valid.mean()) if valid.numel() else None,
            "reward_std": float(valid.std()) if valid.numel() > 1 else 0.0,
            "accuracy": float((valid >= 0.95).float().mean()) if valid.numel() else None,
            "response_length": response_length,
            "entropy": last.get("entropy", [None])[0], "kl": last.get("kl", [None])[0],
            "clip_frac": last.get("clip_ratio/region_mean", [None])[0],
            "learning_rate": self._get_learning_rate() if self.lr_scheduler is not None else self.args.learning_rate,
            **self.x_values(),
        }

    def x_values(self) -> dict[str, float]:
        """Cumulative backward passes and training seconds (as gxpo_lib.trainer writes them)."""
        c = self.counters
        return {"cumulative_backward_passes": c["backward_passes"],
                "seconds": c["seconds_sampling"] + c["seconds_scoring"] + c["seconds_update"],
                "seconds_sampling": c["seconds_sampling"], "seconds_scoring": c["seconds_scoring"],
                "seconds_update": c["seconds_update"], "seconds_eval": c["seconds_eval"]}

    def write_row(self, row: dict[str, Any]) -> None:
        """Append a row (e.g. an evaluation) to metrics.jsonl on rank 0."""
        if self.metrics_log is not None:
            self.metrics_log.write(row)


# ---------------------------------------------------------------------------------------------------
# TrainConfig -> TRL, and the headless entry point
# ---------------------------------------------------------------------------------------------------
def _bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def grpo_config_from_train_config(config: TrainConfig, workdir: str | os.PathLike, num_processes: int = 1,
                                  **overrides: Any) -> GXPOConfig:
    """Map a gxpo_lib TrainConfig onto a GXPOConfig (what has a TRL counterpart; ``overrides`` win).

    ``batch_prompts * group_size`` completions per step in total, split over the processes (so a run is
    the same experiment on 1 or N GPUs); ``loss_type="token_mean"`` is TRL's ``bnpo``; the LR is constant,
    as in gxpo_lib.trainer; ``mini_batches`` must be 1 (one rule step per batch).
    """
    config = config.validate()
    if config.mini_batches != 1:
        raise ValueError(f"mini_batches={config.mini_batches} is invalid for a TRL run: allowed 1")
    completions = config.batch_prompts * config.group_size
    if completions % num_processes:
        raise ValueError(f"batch_prompts * group_size = {completions} is invalid for {num_processes} processes: "
                         "allowed a multiple of the number of processes")
    values = dict(
        output_dir=str(workdir), per_device_train_batch_size=completions // num_processes,
        num_generations=config.group_size, max_completion_length=config.max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, top_k=0, learning_rate=config.lr,
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm or 0.0, optim="adamw_torch",
        lr_scheduler_type="constant", loss_type=LOSS_TYPES[config.loss_type], epsilon=config.clip_eps,
        epsilon_high=config.clip_eps_high, scale_rewards=config.adv_scale, beta=config.kl_beta,
        entropy_coef=config.entropy_coef, max_steps=config.steps, seed=config.seed, save_strategy="steps",
        save_steps=config.checkpoint_every, save_total_limit=config.keep_checkpoints, logging_steps=1,
        report_to="none", disable_tqdm=True, bf16=_bf16_available(), use_cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=1, log_completions=False,
        **{name: getattr(config, name) for name in RULE_FIELDS},
    )
    values["r_clamp"] = list(values["r_clamp"])
    return GXPOConfig(**(values | overrides))


def _completion_text(completion: Any) -> str:
    """A TRL completion (a string, or a conversational list of messages) as text."""
    if isinstance(completion, list):
        return "".join(m["content"] for m in completion if isinstance(m.get("content"), str))
    return str(completion)


def math_reward_func(completions, answer, **kwargs) -> list[float]:
    """TRL reward function: gxpo_lib.rewards.math_reward of each completion against the ``answer`` column."""
    from gxpo_lib.rewards import math_reward

    return [math_reward(_completion_text(c), str(a)) for c, a in zip(completions, answer)]


math_reward_func.__name__ = "math_reward"


def _instruction_suffix(config: TrainConfig) -> str:
    from gxpo_lib.trainer import MATH_INSTRUCTION

    instruction = config.instruction
    if instruction is None and config.train_set != "arith":
        instruction = MATH_INSTRUCTION
    return f"\n{instruction}" if instruction else ""


def build_dataset(config: TrainConfig, tokenizer):
    """The training prompts as a ``datasets.Dataset`` with ``prompt`` (chat messages) and ``answer``."""
    from datasets import Dataset

    from gxpo_lib.models import format_prompt
    from gxpo_lib.trainer import load_problems

    suffix = _instruction_suffix(config)
    problems = load_problems(config.train_set, config.train_path, "train", config.train_levels,
                             data_dir=config.data_dir)
    if getattr(tokenizer, "chat_template", None):
        prompts = [[{"role": "user", "content": p["prompt"] + suffix}] for p in problems]
    else:
        prompts = [format_prompt(p["prompt"] + suffix, tokenizer) for p in problems]
    return Dataset.from_list([{"prompt": q, "answer": str(p["answer"])} for q, p in zip(prompts, problems)])


def _eval_seed(seed: int, salt: int) -> int:
    """The evaluation seed gxpo_lib.trainer uses, so TRL and gxpo_lib runs sample the same eval draws."""
    return int(np.random.SeedSequence([seed, 0, salt]).generate_state(1)[0])


class EvaluationCallback(TrainerCallback):
    """Sampled pass@k on held-out problems (rank 0) at step 0, every ``eval_every`` steps and at the end;
    final benchmark evaluations after training. Rows go to metrics.jsonl like gxpo_lib.trainer's."""

    def __init__(self, trainer: GXPOTrainer, config: TrainConfig, tokenizer, workdir: Path):
        from gxpo_lib.trainer import load_problems

        self.trainer, self.config, self.tokenizer, self.workdir = trainer, config, tokenizer, workdir
        self.problems = load_problems(config.eval_set, config.eval_path, "test", limit=config.eval_problems,
                                      data_dir=config.data_dir)
        self.final_sets = {name: load_problems(name, None, "test", limit=config.final_eval_problems,
                                               data_dir=config.data_dir) for name in config.final_eval_sets}

    def _evaluate(self, problems, samples: int, salt: int) -> dict[str, Any]:
        from gxpo_lib.models import format_prompt
        from gxpo_lib.rewards import RewardScorer
        from gxpo_lib.sampling import HFSampler
        from gxpo_lib.trainer import evaluate

        cfg, suffix = self.config, _instruction_suffix(self.config)
        sampler = HFSampler(self.trainer.model, self.tokenizer, lambda t: format_prompt(t + suffix, self.tokenizer),
                            max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        with RewardScorer(workers=0, timeout_s=cfg.reward_timeout) as scorer:
            return evaluate(sampler, scorer, problems, samples, seed=_eval_seed(cfg.seed, salt))

    def _eval_row(self, step: int) -> None:
        trainer = self.trainer
        if trainer.accelerator.is_main_process:
            start = time.perf_counter()
            result = self._evaluate(self.problems, self.config.eval_samples, salt=1)
            trainer.counters["seconds_eval"] += time.perf_counter() - start
            row = {"kind": "eval", "step": step, **trainer.x_values(), **result}
            trainer.write_row(row)
            print(f"{PROGRESS_PREFIX} eval step {step} pass@1={result['pass@1']:.3f}", flush=True)
        trainer.accelerator.wait_for_everyone()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self._eval_row(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.config.eval_every == 0 or state.global_step == state.max_steps:
            self._eval_row(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if state.global_step >= state.max_steps and trainer.accelerator.is_main_process and self.final_sets:
            path = self.workdir / "final_eval.json"
            done = json.loads(path.read_text()) if path.exists() else {}
            for name, problems in self.final_sets.items():
                if name in done:
                    continue
                result = self._evaluate(problems, self.config.final_eval_samples, salt=3)
                done[name] = {"problems": len(problems), "samples": self.config.final_eval_samples, **result}
                trainer.write_row({"kind": "final_eval", "step": state.global_step, "benchmark": name, **done[name]})
                path.write_text(json.dumps(done, indent=2))
        trainer.accelerator.wait_for_everyone()


class ProgressCallback(TrainerCallback):
    """Prints one ``[gxpo] step ...`` line per step on rank 0 (what ``stream(progress_only=True)`` shows)."""

    def __init__(self, trainer: GXPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        row = self.trainer.last_row
        if row is None or not self.trainer.accelerator.is_main_process:
            return
        reward = row["reward_mean"]
        print(f"{PROGRESS_PREFIX} step {state.global_step}/{state.max_steps} "
              f"reward_mean={'nan' if reward is None else f'{reward:.3f}'} backward_passes={row['backward_passes']} "
              f"cumulative_backward_passes={row['cumulative_backward_passes']} gate_open={row['gate_open']} "
              f"active={row['active']} seconds={row['seconds']:.1f}", flush=True)


def train_with_trl(config: TrainConfig, workdir: str | os.PathLike, trl_overrides: dict[str, Any] | None = None,
                   model_and_tokenizer=None) -> GXPOTrainer:
    """Train (or resume) a TrainConfig-described run with GXPOTrainer in this process (one rank of a launch).

    Writes ``workdir/config.json`` (the TrainConfig), ``workdir/metrics.jsonl`` (gxpo_lib rows),
    ``checkpoint-*`` folders (TRL's, with ``gxpo_state.json``). Returns the trainer.
    """
    from accelerate import PartialState
    from peft import LoraConfig

    from gxpo_lib.models import load_model

    config = TrainConfig.from_dict(config.to_dict()).validate()
    workdir = Path(workdir)
    # cpu=True on a machine without CUDA: otherwise accelerate sets up no process group at all there
    # (each rank would silently train alone); it must also be the first PartialState of the process.
    state = PartialState(cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but accelerate sees {state.num_processes}")
    args = grpo_config_from_train_config(config, workdir, state.num_processes, **(trl_overrides or {}))
    # Records of the run, and a fresh metrics.jsonl unless resuming.
    checkpoint = get_last_checkpoint(str(workdir)) if workdir.is_dir() else None
    if state.is_main_process:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        (workdir / "trl_args.json").write_text(args.to_json_string())
        if checkpoint is None and (workdir / "metrics.jsonl").exists():
            (workdir / "metrics.jsonl").unlink()
    state.wait_for_everyone()
    # Model (on the CPU: the Trainer places it), LoRA, data, reward.
    dtype = config.dtype or ("bfloat16" if _bf16_available() else None)
    model, tokenizer = model_and_tokenizer or load_model(config.model, dtype=dtype, device="cpu")
    peft_config = None
    if config.lora:
        peft_config = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                 target_modules=list(config.lora_targets), task_type="CAUSAL_LM")
    trainer = GXPOTrainer(model=model, reward_funcs=math_reward_func, args=args,
                          train_dataset=build_dataset(config, tokenizer), processing_class=tokenizer,
                          peft_config=peft_config)
    trainer.add_callback(ProgressCallback(trainer))
    trainer.add_callback(EvaluationCallback(trainer, config, tokenizer, workdir))
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer


def main(argv: list[str] | None = None) -> None:
    """``python -m gxpo_lib.integrations.trl --config run.json --workdir DIR`` (one rank of a launch).

    The JSON holds TrainConfig settings, optionally with a ``"trl"`` dict of raw GXPOConfig overrides.
    """
    parser = argparse.ArgumentParser(description="Train with TRL's GRPOTrainer and a gxpo_lib update rule")
    parser.add_argument("--config", required=True, help="JSON of TrainConfig settings (+ optional 'trl' dict)")
    parser.add_argument("--workdir", required=True, help="run folder (resumed if it holds a checkpoint)")
    args = parser.parse_args(argv)
    values = json.loads(Path(args.config).read_text(encoding="utf-8"))
    overrides = values.pop("trl", None) or {}
    config = TrainConfig.from_dict(values)
    config.progress = False
    trainer = train_with_trl(config, args.workdir, overrides)
    if trainer.accelerator.is_main_process:
        print(f"{PROGRESS_PREFIX} done steps={trainer.state.global_step} "
              f"cumulative_backward_passes={trainer.counters['backward_passes']}", flush=True)


__all__ = [
    "TESTED_TRL",
    "TRL_HOOKS",
    "GXPOConfig",
    "GXPOTrainer",
    "ReducedGate",
    "RuleOwnedOptimizer",
    "check_trl_hooks",
    "grpo_config_from_train_config",
    "launch_trl",
    "main",
    "math_reward_func",
    "rule_config",
    "stream",
    "train_with_trl",
    "uses_entropy_gate",
]


if __name__ == "__main__":
    main()
