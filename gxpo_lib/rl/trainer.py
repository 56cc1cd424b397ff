"""The RL loop: `train(config, workdir)` runs GRPO, GXPO or SFPO and can be killed and resumed.

One step (`train_step`): pick prompts -> sample a group of completions each -> score them -> group
advantages -> the update rule over the mini-batches, each pass a `PolicyObjective` that recomputes the
loss on the same mini-batch in micro-batches. The run folder's records are `gxpo_lib.rl.runlog`'s:
``config.json``, ``metrics.jsonl`` (a row per step and per evaluation), ``final_eval.json``.
Checkpoints hold the trainable weights, the optimizer, the rule and its gate, RNG states and the
cumulative counters; `train` on a workdir that has one resumes from it.

Randomness is derived from (seed, step), so a resumed run samples exactly what an uninterrupted one would.

Under ``torchrun --nproc-per-node N`` (WORLD_SIZE > 1) the same `train` runs on every rank: the policy is
sharded with FSDP2 (`distributed.shard_policy`), rank r samples, scores and trains on prompt share r of each
step (batch_prompts / N prompts, whole groups, its own seed `distributed.share_seed`), each rank's loss is
normalised by the whole batch's counts (`PolicyObjective`'s ``global_normalizer``) so FSDP2's gradient
average is the single-process gradient, the rules all-reduce their global sums (`distributed.ShardReducer`),
evaluations split the problems over the ranks and gather the counts, rank 0 alone writes the run folder,
and checkpoints are ``checkpoints/step_N/`` folders (torch.distributed.checkpoint). ``train(...,
prompt_shares=N)`` in one process samples the same N shares in turn: the N-rank run's reference.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import shutil
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gxpo_lib import config as run_settings
from gxpo_lib.config import RESUME_MAY_CHANGE, TrainConfig, refuse_unknown, rule_kwargs, uses_entropy_gate
from gxpo_lib.core import distributed
from gxpo_lib.core.losses import group_advantages
from gxpo_lib.core.objective import PolicyObjective
from gxpo_lib.core.rules import GXPO, PlainStep, StepInfo
from gxpo_lib.core.sfpo import SFPO
from gxpo_lib.rl import runlog
from gxpo_lib.rl.evaluation import evaluate
from gxpo_lib.rl.problems import prompt_formatter, run_problems
from gxpo_lib.rl.sampling import batched_logprobs

__all__ = ["TrainConfig", "TrainControl", "TrainState", "build_rule", "make_sampler", "train", "train_step"]

RULES = {"grpo": PlainStep, "gxpo": GXPO, "sfpo": SFPO}


# -- Live control (the dashboard's buttons and sliders talk to a running `train` through this) ------------
class TrainControl:
    """Thread-safe pause / stop and settings changes that the next step picks up."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._running = threading.Event()
        self._running.set()
        self.stop_requested = False

    def update(self, **settings: Any) -> None:
        """Queue rule settings (k, alpha, r_clamp, tau, ...) for the next step."""
        with self._lock:
            self._pending.update(settings)

    def take_pending(self) -> dict[str, Any]:
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def stop(self) -> None:
        self.stop_requested = True
        self._running.set()

    def wait_if_paused(self) -> None:
        self._running.wait()


# -- Building the pieces ----------------------------------------------------------------------------------
def build_rule(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """The update rule the config names, wrapping `optimizer` (a GXPO `version` via GXPO.from_version)."""
    kwargs = rule_kwargs(config)
    if "version" in kwargs:
        return GXPO.from_version(kwargs.pop("version"), optimizer, **kwargs)
    return RULES[config.algorithm](optimizer, **kwargs)


def build_optimizer(config: TrainConfig, trainable: list[torch.Tensor]) -> torch.optim.Optimizer:
    """AdamW (decoupled decay) or plain SGD (optionally with momentum; L2 decay) at lr x step_scale: GRPO's
    displacement-matched control scales the learning rate, which scales each plain step (AdamW's decay too)."""
    lr = config.lr * config.step_scale
    if config.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=config.weight_decay)


def check_runtime(config: TrainConfig) -> None:
    """What the machine must offer for `config`, checked before anything loads; ValueError names the setting."""
    world_size = distributed.launched_world_size()
    if world_size > 1:   # torchrun: FSDP2 shards, which the lean decoder and vLLM cannot read
        distributed.check_shares(config.batch_prompts, world_size)
        if config.rollout_backend in ("lean", "vllm"):
            raise ValueError(f"rollout_backend={config.rollout_backend!r} is invalid under torchrun ({world_size} "
                             "ranks, FSDP2 shards): it reads whole weights; allowed 'hf' or 'auto' (= 'hf' there)")
    if config.rollout_backend == "vllm" and importlib.util.find_spec("vllm") is None:
        gpu = "this machine has a CUDA GPU" if torch.cuda.is_available() else "no CUDA GPU is present here"
        raise ValueError("rollout_backend='vllm' is invalid here: vLLM is not installed and " + gpu + ". The "
                         "paper-* presets are for GPU machines (pip install '.[gpu]', README: GPU recipes); on "
                         "a CPU use preset='smoke' or preset='cpu-smollm2', or set rollout_backend='auto'")


def prefer_expandable_segments() -> bool:
    """``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` for this process (the update's micro-batches vary in
    length, and fixed segments fragment), only when CUDA is available, no allocator variable is set (ROCm's
    PYTORCH_HIP_ALLOC_CONF included), and CUDA has not initialised yet (the allocator reads it once). Returns
    whether it was set. A vLLM engine's sleep-mode pool copes with it (gxpo_lib.rl.vllm_sampler keeps it from
    vLLM < 0.31, which refuses it)."""
    if (any(name in os.environ for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF"))
            or not torch.cuda.is_available() or torch.cuda.is_initialized()):
        return False
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    return True


def make_sampler(config: TrainConfig, model, tokenizer, format_prompt, workdir: Path, sharded: bool = False):
    """The rollout engine. "auto": the lean decoder for Llama-architecture models on a CPU (the tiny model,
    SmolLM2; bare or LoRA), HF generate otherwise (always on FSDP2 shards, `sharded`); "lean" / "hf" force
    one; "vllm": a colocated vLLM engine that follows the trained weights."""
    settings = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
    if config.rollout_backend == "vllm":
        from gxpo_lib.rl.vllm_sampler import VLLMSampler

        return VLLMSampler(model, tokenizer, format_prompt, gpu_memory_utilization=config.vllm_gpu_memory,
                           workdir=workdir / "vllm", score_batch_size=config.micro_batch_size, **settings)
    from gxpo_lib.rl.lean_sampler import LeanSampler, supports

    on_cpu = next(model.parameters()).device.type == "cpu"
    if not sharded and (config.rollout_backend == "lean" or (config.rollout_backend == "auto" and on_cpu
                                                              and supports(model))):
        return LeanSampler(model, tokenizer, format_prompt, batch_size=run_settings.GENERATION_BATCH, **settings)
    from gxpo_lib.rl.sampling import HFSampler

    return HFSampler(model, tokenizer, format_prompt, batch_size=run_settings.GENERATION_BATCH,
                     score_batch_size=config.micro_batch_size, **settings)


@dataclass
class TrainState:
    """Everything a step reads and changes. `counters` are cumulative (passes, seconds per phase)."""

    config: TrainConfig
    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    rule: Any
    sampler: Any
    scorer: Any
    problems: list[dict]
    reference: Any = None        # a frozen copy for the KL term in full fine-tuning (LoRA: adapters off)
    counters: dict[str, float] = field(default_factory=runlog.new_counters)
    world: distributed.World | None = None   # under torchrun: this rank (None: a single process)
    shares: int = 1              # prompt shares per step (the world size; `train`'s prompt_shares)


def build_state(config: TrainConfig, workdir: Path, problems: list[dict], model_and_tokenizer=None,
                world: distributed.World | None = None) -> TrainState:
    """Model (+ LoRA), optimizer, rule, sampler and scorer for a validated config; under torchrun (`world`)
    the policy (and a full fine-tuning KL reference) sharded with FSDP2."""
    from gxpo_lib.rl.models import apply_lora, load_model
    from gxpo_lib.rl.rewards import RewardScorer

    model, tokenizer = model_and_tokenizer or load_model(config.model, dtype=config.dtype)
    if config.lora:
        model = apply_lora(model, rank=config.lora_rank, alpha=2 * config.lora_rank, target_modules=config.lora_targets)
    if not config.lora and next(model.parameters()).dtype == torch.bfloat16:
        warnings.warn(f"full fine-tuning in bfloat16 without float32 master weights: AdamW steps of about "
                      f"lr={config.lr * config.step_scale:g} below half a bfloat16 ulp (|w| * 2^-9) are lost; "
                      "use dtype='float32' or lora=True", RuntimeWarning, stacklevel=2)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = copy.deepcopy(model).requires_grad_(False) if config.kl_beta > 0 and not config.lora else None
    if world is not None:   # every rank builds the same model, then keeps its shard
        model = distributed.shard_policy(model)
        reference = None if reference is None else distributed.shard_policy(reference)
    optimizer = build_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    sampler = make_sampler(config, model, tokenizer, prompt_formatter(config, tokenizer), workdir, world is not None)
    workers = run_settings.VLLM_REWARD_WORKERS if config.rollout_backend == "vllm" else 0
    scorer = RewardScorer(workers=workers, timeout_s=run_settings.REWARD_TIMEOUT)
    return TrainState(config, model, tokenizer, optimizer, build_rule(config, optimizer), sampler, scorer,
                      problems, reference, world=world, shares=1 if world is None else world.size)


# -- Checkpoints ------------------------------------------------------------------------------------------
def save_checkpoint(workdir: Path, step: int, state: TrainState) -> Path:
    """Trainable weights, optimizer, rule + gate, RNG states, counters; keeps the newest KEEP_CHECKPOINTS.
    Under torchrun a ``step_N/`` folder instead (`distributed.save_sharded`: DCP shards + rank 0's meta.pt)."""
    folder = workdir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    if state.world is not None:
        meta = {"rule": state.rule.state_dict(), "counters": dict(state.counters), "config": state.config.to_dict()}
        distributed.save_sharded(folder, step, state.model, state.optimizer, meta, _rng_states(), state.world)
        if state.world.is_main:
            for old in _checkpoints(folder, sharded=True)[:-run_settings.KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        return folder / f"step_{step:06d}"
    path = folder / f"step_{step:06d}.pt"
    trainable = {n: p.detach().cpu().clone() for n, p in state.model.named_parameters() if p.requires_grad}
    tmp = path.with_suffix(".tmp")  # written whole, then renamed: a kill never leaves a broken checkpoint
    torch.save({"step": step, "trainable": trainable, "optimizer": state.optimizer.state_dict(),
                "rule": state.rule.state_dict(), "counters": dict(state.counters), "rng": _rng_states(),
                "config": state.config.to_dict()}, tmp)  # the settings again, should config.json be lost
    os.replace(tmp, path)
    for old in sorted(folder.glob("step_*.pt"))[:-run_settings.KEEP_CHECKPOINTS]:
        old.unlink()
    return path


def _rng_states() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _checkpoints(folder: Path, sharded: bool) -> list[Path]:
    """The ``step_N.pt`` files (single process) or ``step_N/`` folders (torchrun), oldest first."""
    if sharded:
        return sorted(p for p in folder.glob("step_*") if p.is_dir() and p.name[5:].isdigit())
    return sorted(folder.glob("step_*.pt"))


def latest_checkpoint(workdir: Path) -> Path | None:
    found = sorted(_checkpoints(workdir / "checkpoints", False) + _checkpoints(workdir / "checkpoints", True))
    return found[-1] if found else None


CHECKPOINT_KEYS = ("step", "trainable", "optimizer", "rule", "counters", "rng")
SHARDED_KEYS = ("step", "rule", "counters", "rng")   # a step_N/ folder's meta.pt (+ rng_<rank>.pt)


def read_checkpoint(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(contents, None)`` for an intact checkpoint, ``(None, what is wrong)`` for a damaged one (empty,
    truncated, garbage, not a checkpoint, or holding another step than its name says)."""
    try:
        saved = torch.load(path, weights_only=False)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a broken file
        if path.stat().st_size == 0:
            return None, "empty"
        return None, f"unreadable, truncated or damaged ({_first_line(str(error)) or type(error).__name__})"
    if not isinstance(saved, dict) or any(key not in saved for key in CHECKPOINT_KEYS):
        return None, "not a gxpo_lib checkpoint (its contents lack " + ", ".join(CHECKPOINT_KEYS) + ")"
    step = saved["step"]
    if not isinstance(step, int) or path.name != f"step_{step:06d}.pt":
        return None, f"holds step {step!r}, not the step its name says"
    return saved, None


def _first_line(message: str) -> str:
    return (message.strip().splitlines() or [""])[0][:160]


def restore_checkpoint(workdir: Path, state: TrainState) -> int:
    """Load the newest usable checkpoint into `state`; returns its step (0 when there is none).

    What a crash, a full disk or a kill can leave, and what a resume does with it:

    - ``checkpoints/*.tmp`` (a save cut short; never a checkpoint): removed.
    - A damaged ``step_*.pt`` (empty, truncated, garbage, another step inside than its name): passed over
      for the next older one, with a warning naming it; it is moved aside to ``<name>.damaged``.
    - A checkpoint whose steps metrics.jsonl does not hold whole (a train row of a step up to it, or the
      evaluation row that ended it, is lost): passed over for the next older one that the rows cover, with a
      warning naming metrics.jsonl (`runlog.log_gap`).
    - Then metrics.jsonl is cut back to the step resumed from (`runlog.MetricsLog`) and the steps after it
      are re-run: the same seeds give the same rows, so no logged step is lost or repeated.
    - No usable checkpoint left, or a checkpoint whose backward-pass count disagrees with the log's row of
      its step (two runs mixed in one folder): ValueError naming the file and what to do.

    Under torchrun the checkpoints are ``step_N/`` folders (a leftover ``step_N.tmp/`` is removed, a damaged
    folder -- meta.pt, an rng file or the DCP shards unreadable -- is passed over and moved aside alike); every
    rank takes the same decision. The two formats do not mix: ValueError naming the folder.
    """
    folder, world = workdir / "checkpoints", state.world
    main = world is None or world.is_main
    if main:
        for leftover in folder.glob("*.tmp"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    distributed.barrier(world)
    candidates = _checkpoints(folder, sharded=world is not None)[::-1]
    if not candidates:
        other = _checkpoints(folder, sharded=world is None)
        if other:
            kind = "sharded step_N/ folders (a torchrun run)" if world is None else "single-process step_N.pt files"
            this = "single-process" if world is None else "torchrun"
            raise ValueError(f"{folder}: holds {kind} only, which this {this} run cannot resume; resume it as it "
                             "was launched, or start over in another workdir")
        return 0
    metrics = workdir / runlog.METRICS_FILE
    rows = runlog.read_rows(metrics, stacklevel=3)
    damaged, uncovered = [], []  # (path, what is wrong)
    for path in candidates:
        saved, problem = read_checkpoint(path) if world is None else distributed.read_sharded_meta(
            path, SHARDED_KEYS, world)
        if saved is None:
            damaged.append((path, problem))
            continue
        gap = runlog.log_gap(rows, saved["step"], saved["counters"].get("seconds_eval"))
        if gap is not None:
            uncovered.append((path, f"lacks {gap}, which {path.name} follows"))
            continue
        _check_against_rows(path, saved, rows, metrics)
        problem = None if world is None else distributed.load_sharded(path, state.model, state.optimizer, world)
        if problem is not None:
            damaged.append((path, problem))
            continue
        _apply_checkpoint(path, saved, state)
        used = f"resumed from {path.name} (step {saved['step']}); the steps after it are re-run"
        for bad, problem in damaged if main else ():
            bad.replace(bad.with_name(bad.name + ".damaged"))
            warnings.warn(f"{bad}: {problem}; moved it aside to {bad.name}.damaged and {used}", RuntimeWarning,
                          stacklevel=3)
        for _, problem in uncovered if main else ():
            warnings.warn(f"{metrics}: {problem}; {used}", RuntimeWarning, stacklevel=3)
        distributed.barrier(world)   # every rank has read the log before rank 0 cuts it back
        return saved["step"]
    over = f"start the run over in another workdir, or delete {folder} to start it over here"
    if uncovered and not damaged:
        path, problem = uncovered[-1]
        raise ValueError(f"{metrics}: {problem}, the oldest checkpoint left, so the logged steps cannot be kept "
                         f"whole; restore {metrics.name} from a copy, or {over}")
    path, problem = damaged[0]
    others = "; ".join(f"{p.name}: {why}" for p, why in damaged[1:] + uncovered)
    raise ValueError(f"{path}: {problem}; no other usable checkpoint is left{f' ({others})' if others else ''}, "
                     f"so the run cannot resume; {over}")


def _check_against_rows(path: Path, saved: dict[str, Any], rows: list[dict[str, Any]], metrics: Path) -> None:
    """The log's row of the checkpoint's step must count the backward passes the checkpoint does."""
    row = next((r for r in rows if r.get("kind") == "train" and r.get("step") == saved["step"]), {})
    held = runlog.saved_counters(saved["counters"]).get("cumulative_backward_passes")
    logged = row.get("cumulative_backward_passes")
    if logged is not None and held is not None and logged != held:
        raise ValueError(f"{path}: counts {held} backward passes at step {saved['step']}, but {metrics.name}'s "
                         f"row of that step counts {logged}: the checkpoints and the log come from different "
                         f"runs; start the run over in another workdir, or delete {path.parent} and "
                         f"{metrics.name} to start it over here")


def _apply_checkpoint(path: Path, saved: dict[str, Any], state: TrainState) -> None:
    """Copy a read checkpoint into `state` (ValueError naming `path` when it does not fit this model); a
    sharded one's weights and optimizer are already in (`distributed.load_sharded`)."""
    named = dict(state.model.named_parameters())
    unfit = [n for n, v in saved.get("trainable", {}).items() if n not in named or named[n].shape != v.shape]
    if unfit:
        raise ValueError(f"{path}: its weight {unfit[0]!r} does not fit the model being trained: the folder "
                         "holds another model's run; use another workdir")
    try:
        with torch.no_grad():
            for name, value in saved.get("trainable", {}).items():
                named[name].copy_(value)
        if "optimizer" in saved:
            state.optimizer.load_state_dict(saved["optimizer"])
        state.rule.load_state_dict(saved["rule"])
        state.counters.update(runlog.saved_counters(saved["counters"]))
        torch.set_rng_state(saved["rng"]["torch"])
        np.random.set_state(saved["rng"]["numpy"])
        random.setstate(saved["rng"]["python"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: does not restore into this run ({_first_line(str(error))}); use another "
                         "workdir, or delete its checkpoints to start the run over") from error


def _settings_copy(workdir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint holding a copy of the run's settings, and that copy (None: none)."""
    folder = workdir / "checkpoints"
    for path in sorted(_checkpoints(folder, False) + _checkpoints(folder, True), reverse=True):
        if path.is_dir():
            try:
                saved = torch.load(path / distributed.SHARDED_META, weights_only=False)
            except Exception:   # a damaged folder holds no usable copy
                saved = None
        else:
            saved, _ = read_checkpoint(path)
        if isinstance(saved, dict) and isinstance(saved.get("config"), dict):
            return path, saved["config"]
    return None


def check_resumable(workdir: Path, config: TrainConfig) -> None:
    """A workdir holding a different run must not be silently continued with other settings.

    The run's settings are config.json's; when that is missing or damaged, the copy in the newest readable
    checkpoint stands in (with a warning naming config.json; `train` then rewrites it), and without one
    it is a ValueError naming config.json and what to do.
    """
    if latest_checkpoint(workdir) is None:
        return
    path = workdir / runlog.CONFIG_FILE
    saved, problem = runlog.load_json_object(path)
    source = path.name
    if saved is None:
        problem = problem or "missing"
        copy_ = _settings_copy(workdir)
        if copy_ is None:
            raise ValueError(f"{path}: {problem}, and no checkpoint holds a copy of the run's settings, so they "
                             "cannot be checked; restore config.json from a copy, or start the run over in another "
                             f"workdir (or delete {workdir / 'checkpoints'})")
        saved, source = copy_[1], f"{copy_[0].name}'s copy of config.json"
        warnings.warn(f"{path}: {problem}; checked the settings against {source} and rewrote it", RuntimeWarning,
                      stacklevel=3)
    saved = runlog.current_settings(json.loads(json.dumps(saved)))   # a folder older code wrote, under today's names
    try:
        refuse_unknown(saved)
    except ValueError as error:
        raise ValueError(f"{source} in {workdir} holds a setting this gxpo_lib does not have ({error}); "
                         "resume it with the code that started it, or start over in another workdir") from None
    current = json.loads(json.dumps(config.to_dict()))
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))  # a setting newer than the run: its default
    differing = sorted(k for k in current if k not in RESUME_MAY_CHANGE and saved.get(k, defaults[k]) != current[k])
    if differing:
        name = differing[0]
        raise ValueError(f"{name}={current[name]!r} differs from the run in {workdir} ({saved.get(name)!r}, "
                         f"{source}): use another workdir, or the same settings to resume")


# -- One step ---------------------------------------------------------------------------------------------
def _aggregate(infos: list[StepInfo]) -> dict[str, Any]:
    """One record from the mini-batches' step records: passes summed, flags or-ed, numbers averaged."""
    if len(infos) == 1:
        return infos[0].to_dict()
    rows = [i.to_dict() for i in infos]
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key == "backward_passes":
            out[key] = sum(values)
        elif key in ("active", "fallback", "skipped"):
            out[key] = any(values)
        elif key in ("step", "gate_open"):
            out[key] = values[-1]
        else:
            numbers = [v for v in values if v is not None]
            out[key] = float(np.mean(numbers)) if numbers else None
    return out


def _objective(state: TrainState, batch, advantages, ref_logprobs, normalizer=None) -> PolicyObjective:
    config = state.config
    return PolicyObjective(
        state.model, batch, advantages, ref_logprobs, batch.old_logprobs, loss_type=config.loss_type,
        clip_eps=config.clip_eps, clip_eps_high=None, kl_beta=config.kl_beta,
        entropy_coef=config.entropy_coef, temperature=config.temperature, max_completion_length=config.max_new_tokens,
        micro_batch_size=config.micro_batch_size, aggregation=config.loss_aggregation, global_normalizer=normalizer)


def _entropy_signal(rollouts, rows: slice, world=None) -> float:
    """The sampling policy's token-mean entropy over `rows` (what an entropy-signal gate reads); under
    torchrun over every rank's `rows`, the same number on each."""
    if world is not None:
        total, tokens = distributed.all_sum(
            [rollouts.entropy[rows].float().sum(), rollouts.completion_mask[rows].sum()], world)
        return total / max(tokens, 1.0)
    return float(rollouts.entropy[rows].float().sum() / rollouts.completion_mask[rows].sum().clamp(min=1))


def _update(state: TrainState, rollouts, advantages, ref_logprobs) -> tuple[list[StepInfo], list[PolicyObjective]]:
    """The rule over the step's mini-batches: one `rule.step` each (``ppo_epochs`` times over for GRPO's
    matched-compute control), or SFPO's official sweeps (K sweeps over all mini-batches, reposition, one
    more sweep) as one `rule.step_sweeps`."""
    config = state.config
    rows = len(rollouts.completions)
    size = rows // config.mini_batches
    parts = [slice(start, start + size) for _ in range(config.ppo_epochs) for start in range(0, rows, size)]
    objectives = [_objective(state, rollouts.rows(part), advantages[part],
                             None if ref_logprobs is None else ref_logprobs[part], normalizer)
                  for part, normalizer in zip(parts, distributed.normalizers(rollouts, parts, state.world))]
    state.model.train()
    entropy_gate, world = uses_entropy_gate(config), state.world
    if config.algorithm == "sfpo" and len(parts) > 1:
        signal = _entropy_signal(rollouts, slice(0, rows), world) if entropy_gate else None
        return [state.rule.step_sweeps(objectives, gate_signal=signal)], objectives
    return [state.rule.step(objective, gate_signal=_entropy_signal(rollouts, part, world) if entropy_gate else None)
            for part, objective in zip(parts, objectives)], objectives


def train_step(state: TrainState, step: int) -> dict[str, Any]:
    """Sample, score, advantages, the rule over the mini-batches; returns the step's metrics row."""
    from gxpo_lib.rl.models import reference_policy

    config, counters, world = state.config, state.counters, state.world
    # Which prompts: a reproducible draw for this step; this process's shares of it (all of it in one process).
    rng = np.random.default_rng(runlog.step_seed(config.seed, step, runlog.SALT_PROMPTS))
    chosen = [state.problems[i] for i in rng.choice(len(state.problems), size=config.batch_prompts, replace=False)]
    shares, size = state.shares, 1 if world is None else world.size
    per_share, mine = config.batch_prompts // shares, range((world.rank if world else 0) * shares // size,
                                                               ((world.rank if world else 0) + 1) * shares // size)
    chosen = chosen[mine[0] * per_share:(mine[-1] + 1) * per_share]

    with runlog.timed(counters, "seconds_sampling"):
        parts = [state.sampler.sample([p["prompt"] for p in chosen[i * per_share:(i + 1) * per_share]],
                                      config.group_size, seed=distributed.share_seed(
                                          runlog.step_seed(config.seed, step), share, shares),
                                      score_policy=config.old_logprobs == "sampler") for i, share in enumerate(mine)]
        rollouts = distributed.concat_rollouts(parts, state.tokenizer.pad_token_id)
    with runlog.timed(counters, "seconds_scoring"):
        picked = [chosen[i] for i in rollouts.prompt_index]  # the grader reads each problem's demanded form
        scored = state.scorer.score(rollouts.completions, [p["answer"] for p in picked], [p["prompt"] for p in picked])

    with runlog.timed(counters, "seconds_update"):
        rewards = torch.tensor(scored.rewards, dtype=torch.float32)
        advantages = group_advantages(rewards, config.group_size, scale="group")
        ref_logprobs = None
        if config.kl_beta > 0:  # the reference policy's view, once per step, a micro-batch at a time
            with reference_policy(state.model, state.reference) as ref_model:
                ref_logprobs = batched_logprobs(ref_model, rollouts, config.temperature, config.micro_batch_size)
        if world is not None:   # the no-grad forwards left the root's weights gathered
            distributed.reshard(state.model)
        several = config.mini_batches * config.ppo_epochs > 1 and config.algorithm != "sfpo"
        before = state.rule.snapshot_params() if several else None  # the step spans several rule steps
        infos, objectives = _update(state, rollouts, advantages, ref_logprobs)

    record = _aggregate(infos)
    if before is not None:  # ||theta_{t+1} - theta_t|| over the whole step, not a mean of its parts
        record["update_norm"] = state.rule.distance_from(before)
    counters["cumulative_backward_passes"] += record["backward_passes"]
    mask = rollouts.completion_mask
    entropy = rollouts.entropy if rollouts.entropy is not None else objectives[0].sampling_entropy
    stats = objectives[-1].stats
    measured = dict(
        response_length=float(mask.sum(1).float().mean()),
        entropy=None if entropy is None else float(entropy.float().sum() / mask.sum().clamp(min=1)),
        kl=stats.get("kl"), clip_frac=stats.get("clip_frac"), reward_parse_fail=scored.counts.n_parse_fail,
        reward_timeout=scored.counts.n_timeout, reward_error=scored.counts.n_error)
    rewards = scored.rewards
    if world is not None:   # the whole batch's numbers, the same row on every rank
        rewards = [r for part in distributed.gather(list(rewards), world) for r in part]
        measured = distributed.whole_batch(measured, mask, entropy, objectives[-1].tokens, world)
    return runlog.train_row(step, record, state.rule, rewards, counters, **measured,
                            learning_rate=config.lr * config.step_scale)


# -- The run ----------------------------------------------------------------------------------------------
def train(config: TrainConfig, workdir: str | Path, callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
          control: TrainControl | None = None, model_and_tokenizer=None, prompt_shares: int | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a training run in `workdir`; returns a summary. Under torchrun: on every rank (the
    module docstring); rank 0 writes the folder and runs `callbacks`, every rank returns the same summary.

    Args:
        config: the run's settings (validated first).
        workdir: the run folder: config.json, metrics.jsonl, checkpoints/, final_eval.json.
        callbacks: called with every metrics row as it is written (live plots).
        control: pause / stop / live settings from another thread.
        model_and_tokenizer: an already loaded (model, tokenizer) to use instead of `config.model`.
        prompt_shares: sample each step's prompts (and each evaluation's problems) in this many shares, each
            with its own seed (None: one per rank); one process given N samples what N ranks do.
        progress: show a progress bar (a run option: it changes no result).
    """
    from gxpo_lib.rl.tracking import Trackers

    config = copy.deepcopy(config).validate()
    check_runtime(config)
    prefer_expandable_segments()  # before the model reaches the GPU
    world = distributed.setup()   # None in a single process
    shares = prompt_shares or (1 if world is None else world.size)
    if shares % (1 if world is None else world.size):
        raise ValueError(f"prompt_shares={prompt_shares} is invalid: allowed a multiple of the world size")
    distributed.check_shares(config.batch_prompts, shares)
    main = world is None or world.is_main
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_resumable(workdir, config)
    distributed.barrier(world)   # every rank has checked config.json before rank 0 rewrites it
    if main:
        runlog.write_config(workdir, config.to_dict())
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

    train_problems, eval_problems, final_sets = run_problems(config)
    state = build_state(config, workdir, train_problems, model_and_tokenizer, world)
    state.shares = shares
    start_step = restore_checkpoint(workdir, state)
    log = runlog.MetricsLog(workdir, resume_step=start_step if start_step else None) if main else None
    trackers = Trackers(config.report_to, workdir, config.to_dict()) if main else None
    distributed.barrier(world)   # the log is cut back before any rank reads final_eval.json

    def emit(row: dict[str, Any]) -> dict[str, Any]:
        if not main:   # the other ranks write nothing; the row as rank 0 wrote it
            return runlog._finite_or_none(row)
        row = log.write(row)
        trackers.log(row)
        for callback in callbacks:
            callback(row)
        return row

    def run_eval(step: int) -> dict[str, Any]:
        with runlog.timed(state.counters, "seconds_eval"):
            result = evaluate(state.sampler, state.scorer, eval_problems, config.eval_samples,
                              seed=runlog.eval_seed(config.seed), shares=shares, world=world)
            if world is not None:
                distributed.reshard(state.model)
        return emit({"kind": "eval", "step": step, **runlog.x_values(state.counters), **result})

    bar = _progress_bar(config, start_step) if main and progress else None
    last_eval, final = None, {}
    try:
        if start_step == 0:
            last_eval = run_eval(0)
        for step in range(start_step + 1, config.steps + 1):
            if control is not None:
                control.wait_if_paused()
                if control.stop_requested:
                    break
                pending = control.take_pending()
                if pending:
                    state.rule.update_settings(**pending)
            row = emit(train_step(state, step))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean'] or 0:.2f}", passes=row["cumulative_backward_passes"])
            if step % config.eval_every == 0 or step == config.steps:
                last_eval = run_eval(step)
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(workdir, step, state)
        if state.rule.num_steps >= config.steps:
            final = final_evaluation(workdir, config, state, final_sets, emit)
    finally:
        if main:
            log.close()
            trackers.close()
        state.scorer.close()
        if hasattr(state.sampler, "close"):
            state.sampler.close()  # a vLLM engine frees its memory and worker processes
        if bar is not None:
            bar.close()
        distributed.teardown(world)
    gate = getattr(state.rule, "gate", None)
    return {"workdir": str(workdir), "steps_done": state.rule.num_steps, "last_eval": last_eval, "final_eval": final,
            "shutoff_step": gate.shutoff_step if gate is not None else None, **state.counters,
            "model": state.model, "tokenizer": state.tokenizer}


def final_evaluation(workdir: Path, config: TrainConfig, state: TrainState, sets: dict[str, list[dict]],
                     emit: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Every final benchmark once, into final_eval.json (kept across resumes) and the metrics log."""
    world = state.world
    done = distributed.gather(runlog.read_final_eval(workdir), world)[0]   # rank 0's view on every rank
    for name, problems in sets.items():
        if name in done:
            continue
        result = evaluate(state.sampler, state.scorer, problems, config.final_eval_samples,
                          seed=runlog.eval_seed(config.seed, final=True), shares=state.shares, world=world)
        done[name] = {"problems": len(problems), "samples": config.final_eval_samples, **result}
        emit({"kind": "final_eval", "step": config.steps, "benchmark": name, **done[name]})
        if world is None or world.is_main:
            runlog.write_final_eval(workdir, done)
    return done


def _progress_bar(config: TrainConfig, start_step: int):
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start_step, desc=config.algorithm, unit="step")
