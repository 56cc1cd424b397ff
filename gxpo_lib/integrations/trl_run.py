"""A TrainConfig-described run on TRL: the GXPOConfig it maps to, the dataset, the reward, evaluation
callbacks and the headless entry point (``python -m gxpo_lib.integrations.trl_run``, one rank of a launch).

The run folder is the native trainer's (``gxpo_lib.rl.runlog``): ``config.json``, ``metrics.jsonl`` (the same
rows), ``final_eval.json``, plus TRL's ``checkpoint-*`` folders and ``trl_args.json``.

vLLM sleep mode on this path is level 2, not the native path's level 1: TRL's colocated engine
(``trl.generation.vllm_generation``) puts itself to sleep at level 2 after every generation and re-pushes the
weights before the next one, and this module follows it (a deliberate deviation from "level 1"). Level 1 would
keep a CPU copy of weights that TRL overwrites from the trainer anyway; sleeping the engine at another level
than TRL's would break TRL's own wake / push bookkeeping (``_llm_weights_sleeping``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from gxpo_lib.config import KEEP_CHECKPOINTS, REWARD_TIMEOUT, RULE_SETTINGS, TrainConfig
from gxpo_lib.core import distributed
from gxpo_lib.integrations import PROGRESS_PREFIX
from gxpo_lib.integrations.trl import LOSS_TYPES, STATE_FILE, GXPOConfig, GXPOTrainer, _check_vllm_settings
from gxpo_lib.rl import runlog
from gxpo_lib.rl.problems import instruction_suffix, load_problems, run_problems

logger = logging.getLogger(__name__)


def _bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def grpo_config_from_train_config(config: TrainConfig, workdir: str | os.PathLike, num_processes: int = 1,
                                  **overrides: Any) -> GXPOConfig:
    """Map a gxpo_lib TrainConfig onto a GXPOConfig (what has a TRL counterpart; ``overrides`` win).

    ``batch_prompts * group_size`` completions per step in total, split over the processes (so a run is
    the same experiment on 1 or N GPUs), in micro-batches of ``micro_batch_size`` sequences per process:
    ``per_device_train_batch_size = micro_batch_size`` and ``gradient_accumulation_steps = completions /
    (num_processes * micro_batch_size)`` (None: one micro-batch per process); one rule step spans them all.
    ``loss_type="token_mean"`` is TRL's ``bnpo``; the LR is constant, as in gxpo_lib.rl.trainer;
    ``mini_batches`` must be 1 (one rule step per batch).

    TRL's vLLM settings (they act when ``use_vllm``: ``rollout_backend="vllm"`` or ``trl_overrides``):

    - ``vllm_importance_sampling_correction=False``: TRL's default (True, mode ``sequence_mask`` in 1.16)
      zeroes the loss of samples whose vLLM/trainer probability ratio leaves [clip_min, clip_max], which
      drops some long samples; neither the native trainer nor the paper's code does that. Opt in with
      ``trl_overrides={"vllm_importance_sampling_correction": True}`` (and ``vllm_importance_sampling_mode``
      / ``_clip_min`` / ``_clip_max``); the masked share is then logged (`track_importance_sampling`).
      GXPOConfig refuses a non-bool switch, a mode outside ``VLLM_IS_MODES`` or a bad bound (ValueError).
    - ``vllm_enable_sleep_mode``: True where vLLM supports sleep mode (a CUDA / ROCm machine), so the
      engine's memory is free during the update; False elsewhere (vLLM's CPU platform refuses it). TRL
      sleeps at level 2 (weights dropped, re-pushed from the trainer before the next generation), so the
      evaluation here does too: level 2, not the native path's level 1 (see the module docstring).
    - ``ddp_find_unused_parameters=False`` with LoRA: every adapter receives a gradient, and the search
      for unused parameters would cost a graph traversal per backward pass.
    """
    config = config.validate()
    if config.mini_batches != 1:
        raise ValueError(f"mini_batches={config.mini_batches} is invalid for a TRL run: allowed 1")
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes={num_processes!r} is invalid: allowed an integer >= 1")
    completions = config.batch_prompts * config.group_size
    if completions % num_processes:
        raise ValueError(f"batch_prompts * group_size = {completions} is invalid for {num_processes} processes: "
                         "allowed a multiple of the number of processes")
    micro = config.micro_batch_size or completions // num_processes
    if completions % (num_processes * micro):
        raise ValueError(f"micro_batch_size={config.micro_batch_size} is invalid for batch_prompts * group_size = "
                         f"{completions} completions on {num_processes} processes: allowed a divisor of "
                         f"{completions // num_processes} (the completions per process)")
    values = dict(
        output_dir=str(workdir), per_device_train_batch_size=micro,
        gradient_accumulation_steps=completions // (num_processes * micro), loss_aggregation=config.loss_aggregation,
        num_generations=config.group_size, max_completion_length=config.max_new_tokens,
        temperature=config.temperature, top_p=1.0, top_k=0, learning_rate=config.lr,
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm or 0.0,
        optim="sgd" if config.optimizer == "sgd" else "adamw_torch",
        optim_args=f"momentum={config.momentum}" if config.optimizer == "sgd" else None,
        lr_scheduler_type="constant", loss_type=LOSS_TYPES[config.loss_type], epsilon=config.clip_eps,
        epsilon_high=None, scale_rewards="group", beta=config.kl_beta,
        entropy_coef=config.entropy_coef, max_steps=config.steps, seed=config.seed, save_strategy="steps",
        save_steps=config.checkpoint_every, save_total_limit=KEEP_CHECKPOINTS, logging_steps=1,
        report_to=[name for name in config.report_to if name != "none"] or "none", disable_tqdm=True,
        bf16=_bf16_available(), use_cpu=not torch.cuda.is_available(), log_completions=False,
        gradient_checkpointing=config.gradient_checkpointing,
        **{name: getattr(config, name) for name in RULE_SETTINGS},
    )
    if config.rollout_backend == "vllm":  # TRL's own colocated vLLM engine
        values |= {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": config.vllm_gpu_memory}
    values |= {"vllm_importance_sampling_correction": False,  # parity with the native trainer (docstring)
               "vllm_enable_sleep_mode": _vllm_sleep_mode()}
    if config.lora:
        values["ddp_find_unused_parameters"] = False
    check_trl_overrides(overrides)
    return GXPOConfig(**(values | overrides))


def check_trl_overrides(overrides: dict[str, Any]) -> None:
    """ValueError naming a `trl_overrides` key GXPOConfig does not have, or a bad vLLM switch or importance-sampling
    setting, without building a GXPOConfig (whose TrainingArguments would set up the devices: a launcher's parent
    process checks with this before any rank starts)."""
    if not isinstance(overrides, dict):
        raise ValueError(f"trl_overrides={overrides!r} is invalid: allowed a dict of GXPOConfig settings")
    fields = GXPOConfig.__dataclass_fields__
    unknown = sorted(name for name in overrides if name not in fields)
    if unknown:
        raise ValueError(f"trl_overrides={unknown} is invalid: allowed GXPOConfig settings (TRL's GRPOConfig "
                         "fields and the rule's)")
    checked = {"vllm_importance_sampling_correction": False, "vllm_enable_sleep_mode": False} | {
        name: fields[name].default for name in ("vllm_importance_sampling_mode", "vllm_importance_sampling_clip_min",
                                                "vllm_importance_sampling_clip_max")}
    _check_vllm_settings(argparse.Namespace(**(checked | overrides)))


def _vllm_sleep_mode() -> bool:
    """Sleep mode for TRL's vLLM engine where vLLM supports it (not on its CPU platform, where it is refused);
    TRL's colocated engine runs in the trainer's process."""
    from gxpo_lib.rl.vllm_sampler import sleep_mode_supported

    supported, reason = sleep_mode_supported(in_process=True)
    if not supported and importlib.util.find_spec("vllm") is not None:
        logger.info("vllm_enable_sleep_mode=False: %s", reason)
    return supported


def track_importance_sampling(trainer: GXPOTrainer) -> None:
    """With TRL's vLLM importance-sampling correction on, the share of the batch it zeroes: sequences in the
    ``sequence_*`` modes, completion tokens in the ``token_*`` modes (an IS weight of 0; the ``*_mask``
    modes set it for ratios outside [clip_min, clip_max]), over all ranks. Logged as TRL's metric
    ``sampling/importance_sampling_masked_frac`` (beside TRL's own ``sampling/importance_sampling_ratio/
    {min,mean,max}`` and ``sampling/sampling_logp_difference/{mean,max}``) and as ``vllm_is_masked_frac`` in
    the step's metrics.jsonl row (over the step's generations). A no-op when the correction is off."""
    if not (trainer.use_vllm and trainer.args.vllm_importance_sampling_correction):
        return
    generate, write_row = trainer._generate_and_score_completions, trainer.write_row
    totals = torch.zeros(2, dtype=torch.float64)

    def generate_and_track(inputs):
        output = generate(inputs)
        ratio = output.get("importance_sampling_ratio")
        if ratio is not None and trainer.model.training:
            mask = output["completion_mask"].bool()
            zeroed = ratio == 0 if ratio.shape[1] == 1 else (ratio == 0) & mask
            count = torch.tensor([float(zeroed.sum()), float(ratio.shape[0] if ratio.shape[1] == 1 else mask.sum())],
                                 dtype=torch.float64, device=ratio.device)
            if trainer.accelerator.num_processes > 1:
                count = trainer.accelerator.reduce(count, reduction="sum")
            totals.add_(count.cpu())
            trainer._metrics["train"]["sampling/importance_sampling_masked_frac"].append(
                float(count[0] / count[1].clamp(min=1.0)))
        return output

    def write_row_with_share(row):
        if row.get("kind") == "train":
            row = {**row, "vllm_is_masked_frac": float(totals[0] / totals[1]) if totals[1] > 0 else None}
            totals.zero_()
        write_row(row)

    trainer._generate_and_score_completions = generate_and_track
    trainer.write_row = write_row_with_share


def _completion_text(completion: Any) -> str:
    """A TRL completion (a string, or a conversational list of messages) as text."""
    if isinstance(completion, list):
        return "".join(m["content"] for m in completion if isinstance(m.get("content"), str))
    return str(completion)


def math_reward_func(completions, answer, problem=None, **kwargs) -> list[float]:
    """TRL reward function: gxpo_lib.rl.rewards.math_reward of each completion against the ``answer`` column
    (given the ``problem`` column's text, when the dataset has one, for the forms and units it demands)."""
    from gxpo_lib.rl.rewards import math_reward

    problems = problem if problem is not None else [None] * len(answer)
    return [math_reward(_completion_text(c), str(a), problem=p) for c, a, p in zip(completions, answer, problems)]


math_reward_func.__name__ = "math_reward"


def build_dataset(config: TrainConfig, tokenizer):
    """The training prompts as a ``datasets.Dataset`` with ``prompt`` (chat messages) and ``answer``."""
    from datasets import Dataset

    from gxpo_lib.rl.models import format_prompt

    suffix = instruction_suffix(config)
    problems = load_problems(config.train_set, None, "train", config.train_levels, data_dir=config.data_dir)
    if getattr(tokenizer, "chat_template", None):
        prompts = [[{"role": "user", "content": p["prompt"] + suffix}] for p in problems]
    else:
        prompts = [format_prompt(p["prompt"] + suffix, tokenizer) for p in problems]
    return Dataset.from_list([{"prompt": q, "answer": str(p["answer"]), "problem": p["prompt"]}
                              for q, p in zip(prompts, problems)])


class EvaluationCallback(TrainerCallback):
    """Sampled pass@k on held-out problems at step 0, every ``eval_every`` steps and at the end; final
    benchmark evaluations after training. Every rank samples and grades its own share of the problems
    (no rank idles at a barrier while another generates); rank 0 writes the rows, as gxpo_lib.rl.trainer's.

    With TRL's colocated vLLM engine (``use_vllm``, ``vllm_mode="colocate"``, tensor parallel size 1) the
    samples come from that engine, serving the current weights (`sampler`); otherwise from HF ``generate``
    on the policy. ``engine_evaluations`` counts the evaluations the engine served."""

    def __init__(self, trainer: GXPOTrainer, config: TrainConfig, tokenizer, workdir: Path):
        self.trainer, self.config, self.tokenizer, self.workdir = trainer, config, tokenizer, workdir
        _, self.problems, self.final_sets = run_problems(config)
        self.engine_evaluations = 0

    def uses_engine(self) -> bool:
        """True when evaluation samples with TRL's colocated vLLM engine (server mode and tensor parallelism,
        whose ranks must generate together, keep HF generate)."""
        trainer = self.trainer
        generation = getattr(trainer, "vllm_generation", None) if getattr(trainer, "use_vllm", False) else None
        return (generation is not None and generation.mode == "colocate"
                and generation.tensor_parallel_size == 1 and getattr(generation, "llm", None) is not None)

    def sampler(self):
        """The evaluation sampler on this rank: TRL's colocated vLLM engine when `uses_engine`, else HF
        ``generate`` on the policy being trained. Same prompts, sampling settings and length cap either way;
        with the engine, each problem's seed follows its index in the whole list (rank r holds problems
        r, r + N, ...), so the samples do not depend on the number of ranks."""
        from gxpo_lib.rl.models import format_prompt

        cfg, suffix, trainer = self.config, instruction_suffix(self.config), self.trainer
        formatter = lambda t: format_prompt(t + suffix, self.tokenizer)
        if self.uses_engine():
            from gxpo_lib.rl.vllm_sampler import EngineSampler

            rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
            return EngineSampler(trainer.vllm_generation.llm, self.tokenizer, formatter,
                                 max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0,
                                 before=self._engine_ready, after=self._engine_done,
                                 index=lambda i: rank + world * i, device=trainer.accelerator.device)
        from gxpo_lib.rl.sampling import HFSampler

        if getattr(trainer, "sharded", False):  # FSDP2: generate keeps every rank decoding (synced_gpus)
            from gxpo_lib.integrations.trl_distributed import mark_synced_generation

            mark_synced_generation(trainer.model)
        return HFSampler(trainer.accelerator.unwrap_model(trainer.model), self.tokenizer, formatter,
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0)

    def _engine_ready(self) -> None:
        """Make TRL's engine serve the current weights, as TRL does before a generation: push them when they
        changed since the last push or when a sleep dropped them (TRL sleeps at level 2), then wake the KV
        cache. The push is recorded as TRL's (``_last_loaded_step``), so TRL does not repeat it."""
        trainer = self.trainer
        generation = trainer.vllm_generation
        sleeping = generation.enable_sleep_mode and getattr(generation, "_llm_weights_sleeping", False)
        if sleeping or getattr(trainer, "_last_loaded_step", None) != trainer.state.global_step:
            generation.sync_weights()  # wakes the weights first under sleep mode
            trainer._last_loaded_step = trainer.state.global_step
        if generation.enable_sleep_mode:
            generation.llm.wake_up(tags=["kv_cache"])

    def _engine_done(self) -> None:
        """Back to sleep after an evaluation, so the update has the engine's memory: level 2, as TRL sleeps
        after its own generations (not level 1; see the module docstring), with TRL's flag set so its next
        generation re-pushes the weights."""
        generation = self.trainer.vllm_generation
        if generation.enable_sleep_mode:
            generation.llm.sleep(level=2)
            generation._llm_weights_sleeping = True

    def _evaluate(self, problems, samples: int, final: bool) -> dict[str, Any]:
        """pass@k of `problems`: rank r samples and grades problems r, r + N, ...; the counts are gathered
        back into the problems' order, so the row (bootstrap intervals included) is the one the counts of
        all problems in one process give. Under FSDP2 every rank samples as many problems (a short share is
        padded with problem 0, whose results are dropped), so the ranks' all-gathers stay in lockstep."""
        from gxpo_lib.rl.evaluation import correct_counts, summarize_counts
        from gxpo_lib.rl.rewards import RewardScorer

        cfg, accelerator = self.config, self.trainer.accelerator
        seed = runlog.eval_seed(cfg.seed, final=final)
        rank, world = accelerator.process_index, accelerator.num_processes
        share = problems[rank::world]
        real = len(share)
        if getattr(self.trainer, "sharded", False):
            share = share + [problems[0]] * (-(-len(problems) // world) - real)
        counts, lengths = [], []
        if share:
            sampler = self.sampler()
            with RewardScorer(workers=0, timeout_s=REWARD_TIMEOUT) as scorer:
                counts, lengths = correct_counts(sampler, scorer, share, samples, seed)
            counts, lengths = counts[:real], lengths[:real * samples]
            from gxpo_lib.rl.vllm_sampler import EngineSampler

            if isinstance(sampler, EngineSampler):
                self.engine_evaluations += 1
                logger.info("evaluation of %d problems on rank %d sampled by TRL's vLLM engine", len(share), rank)
        elif self.uses_engine():  # no problem here, but the weight push may gather parameters (ZeRO-3)
            self._engine_ready()
            self._engine_done()
        if world > 1:
            from accelerate.utils import gather_object

            gathered = gather_object([(counts, lengths)])
            ordered = [0] * len(problems)
            for part, (part_counts, _) in enumerate(gathered):  # rank `part` holds problems part, part + N, ...
                ordered[part::world] = part_counts
            counts, lengths = ordered, [x for _, part_lengths in gathered for x in part_lengths]
        return summarize_counts(counts, samples, lengths, seed)

    def _eval_row(self, step: int) -> None:
        trainer = self.trainer
        start = time.perf_counter()
        result = self._evaluate(self.problems, self.config.eval_samples, final=False)
        trainer.counters["seconds_eval"] += time.perf_counter() - start
        if trainer.accelerator.is_main_process:
            trainer.write_row({"kind": "eval", "step": step, **trainer.x_values(), **result})
            print(f"{PROGRESS_PREFIX} eval step {step} pass@1={result['pass@1']:.3f}", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self._eval_row(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.config.eval_every == 0 or state.global_step == state.max_steps:
            self._eval_row(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if state.global_step < state.max_steps or not self.final_sets:
            return
        done = runlog.read_final_eval(self.workdir)
        for name, problems in self.final_sets.items():
            if name in done:
                continue
            result = self._evaluate(problems, self.config.final_eval_samples, final=True)
            done[name] = {"problems": len(problems), "samples": self.config.final_eval_samples, **result}
            if trainer.accelerator.is_main_process:
                trainer.write_row({"kind": "final_eval", "step": state.global_step, "benchmark": name, **done[name]})
                runlog.write_final_eval(self.workdir, done)
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
def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with a TRL ``checkpoint-N`` folder (None when intact): TRL writes it in place, so a
    kill or a full disk can leave it partial. trainer_state.json and gxpo_state.json (written last) must be
    JSON objects of step N; the weights (safetensors headers) and every ``*.pt`` / ``*.pth`` / ``*.bin``
    (torch zip archives) must be whole; under FSDP, each sharded ``pytorch_model_fsdp_*`` / ``optimizer_*``
    folder needs its index (``trl_distributed.fsdp_checkpoint_problem``)."""
    from safetensors import safe_open

    from gxpo_lib.integrations.trl_distributed import fsdp_checkpoint_problem, has_fsdp_weights

    step = int(folder.name.rsplit("-", 1)[1])
    for name in ("trainer_state.json", STATE_FILE):
        value, problem = runlog.load_json_object(folder / name)
        if value is None:
            return f"{name} is {problem or 'missing'} (a save cut short)"
        saved = value.get("global_step" if name == "trainer_state.json" else "step")
        if saved != step:
            return f"{name} holds step {saved!r}, not {step}"
    sharded = fsdp_checkpoint_problem(folder)
    if sharded is not None:
        return sharded
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not weights and not has_fsdp_weights(folder):
        return "holds no model weights (*.safetensors, *.bin or an FSDP pytorch_model_fsdp_* folder)"
    for path in weights + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), "pt"):
                    pass
            except Exception as error:  # SafetensorError / OSError: a truncated or garbage file
                return f"{path.name} is damaged ({str(error).splitlines()[0][:100] if str(error) else 'empty'})"
        elif not zipfile.is_zipfile(path):
            return f"{path.name} is {'empty' if path.stat().st_size == 0 else 'truncated or damaged'}"
    return None


def resumable_checkpoint(workdir: Path, warn: bool = True) -> tuple[Path | None, list[Path]]:
    """The newest intact ``checkpoint-N`` whose step metrics.jsonl's train rows reach, and the damaged
    folders newer than it (to move aside). The rule is the native trainer's (`restore_checkpoint`): damaged
    or uncovered checkpoints are passed over for older ones with a warning naming them (`warn`), the log is
    then cut back to the step resumed from; none usable among several is a ValueError naming the file.
    ``(None, [])`` when the folder holds no checkpoint."""
    found = [p for p in workdir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    candidates = sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)
    if not candidates:
        return None, []
    metrics = workdir / runlog.METRICS_FILE
    rows = runlog.read_rows(metrics)
    damaged, uncovered = [], []
    for folder in candidates:
        problem = checkpoint_problem(folder)
        if problem is not None:
            damaged.append((folder, problem))
            continue
        step = int(folder.name.split("-")[1])
        gap = runlog.log_gap(rows, step)
        if gap is not None:
            uncovered.append((folder, f"lacks {gap}, which {folder.name} follows"))
            continue
        for bad, problem in damaged if warn else ():
            warnings.warn(f"{bad}: {problem}; moved it aside to damaged-{bad.name} and resumed from "
                          f"{folder.name}; the steps after it are re-run", RuntimeWarning, stacklevel=2)
        for _, problem in uncovered if warn else ():
            warnings.warn(f"{metrics}: {problem}; resumed from {folder.name}; the steps after it are re-run",
                          RuntimeWarning, stacklevel=2)
        return folder, [bad for bad, _ in damaged]
    over = "start the run over in another workdir, or delete its checkpoint-* folders to start it over here"
    if uncovered and not damaged:
        raise ValueError(f"{metrics}: {uncovered[-1][1]}, the oldest checkpoint left, so the logged steps cannot "
                         f"be kept whole; restore {metrics.name} from a copy, or {over}")
    folder, problem = damaged[0]
    raise ValueError(f"{folder}: {problem}; no other usable checkpoint is left, so the run cannot resume; {over}")


def train_with_trl(config: TrainConfig, workdir: str | os.PathLike, trl_overrides: dict[str, Any] | None = None,
                   model_and_tokenizer=None) -> GXPOTrainer:
    """Train (or resume) a TrainConfig-described run with GXPOTrainer in this process (one rank of a launch).

    Writes ``workdir/config.json`` (the TrainConfig), ``workdir/metrics.jsonl`` (gxpo_lib rows),
    ``checkpoint-*`` folders (TRL's, with ``gxpo_state.json``). Returns the trainer.
    """
    from accelerate import PartialState
    from peft import LoraConfig

    from gxpo_lib.rl.models import load_model

    config = TrainConfig.from_dict(config.to_dict()).validate()
    workdir = Path(workdir)
    # cpu=True on a machine without CUDA: otherwise accelerate sets up no process group at all there
    # (each rank would silently train alone); it must also be the first PartialState of the process.
    state = PartialState(cpu=not torch.cuda.is_available())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise RuntimeError(f"{launched} processes were launched but accelerate sees {state.num_processes}")
    args = grpo_config_from_train_config(config, workdir, state.num_processes, **(trl_overrides or {}))
    # Records of the run, and a fresh metrics.jsonl unless resuming (from the newest intact checkpoint).
    checkpoint, damaged = resumable_checkpoint(workdir, warn=state.is_main_process) if workdir.is_dir() else (None, [])
    state.wait_for_everyone()  # every rank has chosen before rank 0 moves damaged checkpoints aside
    if state.is_main_process:
        for folder in damaged:  # out of TRL's rotation, which would otherwise keep them over intact ones
            aside = folder.with_name(f"damaged-{folder.name}")
            shutil.rmtree(aside, ignore_errors=True)  # an older damaged copy of the same step
            folder.rename(aside)
        workdir.mkdir(parents=True, exist_ok=True)
        runlog.write_config(workdir, config.to_dict())
        runlog.atomic_write_text(workdir / "trl_args.json", args.to_json_string())
        if checkpoint is None:
            (workdir / runlog.METRICS_FILE).unlink(missing_ok=True)
    state.wait_for_everyone()
    # Model (on the CPU: the Trainer places it), LoRA, data, reward.
    dtype = config.dtype or ("bfloat16" if _bf16_available() else None)
    model, tokenizer = model_and_tokenizer or load_model(config.model, dtype=dtype, device="cpu")
    peft_config = None
    if config.lora:
        peft_config = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                                 target_modules=list(config.lora_targets), task_type="CAUSAL_LM")
    trainer = GXPOTrainer(model=model, reward_funcs=math_reward_func, args=args,
                          train_dataset=build_dataset(config, tokenizer), processing_class=tokenizer,
                          peft_config=peft_config)
    track_importance_sampling(trainer)
    trainer.add_callback(ProgressCallback(trainer))
    trainer.add_callback(EvaluationCallback(trainer, config, tokenizer, workdir))
    trainer.train(resume_from_checkpoint=None if checkpoint is None else str(checkpoint))
    return trainer


def main(argv: list[str] | None = None) -> None:
    """``python -m gxpo_lib.integrations.trl_run --config run.json --workdir DIR`` (one rank of a launch).

    The JSON holds TrainConfig settings, optionally with a ``"trl"`` dict of raw GXPOConfig overrides.
    """
    parser = argparse.ArgumentParser(description="Train with TRL's GRPOTrainer and a gxpo_lib update rule")
    parser.add_argument("--config", required=True, help="JSON of TrainConfig settings (+ optional 'trl' dict)")
    parser.add_argument("--workdir", required=True, help="run folder (resumed if it holds a checkpoint)")
    args = parser.parse_args(argv)
    values = json.loads(Path(args.config).read_text(encoding="utf-8"))
    overrides = values.pop("trl", None) or {}
    config = TrainConfig.from_dict(values)
    trainer = train_with_trl(config, args.workdir, overrides)
    if trainer.accelerator.is_main_process:
        print(f"{PROGRESS_PREFIX} done steps={trainer.state.global_step} "
              f"cumulative_backward_passes={trainer.counters['cumulative_backward_passes']}", flush=True)
    # The trainer's DDP wrapper holds the process group: it goes first, so the group's gloo threads end
    # here and not in the interpreter's teardown, where they abort a rank now and then (leave_process_group).
    # Under FSDP2 they run on whatever we drop (torch itself keeps that group), so only a DDP or
    # single-process run reports threads left over.
    sharded = bool(getattr(trainer, "is_fsdp_enabled", False))
    del trainer
    left = distributed.leave_process_group()
    if left and not sharded:
        print(f"{PROGRESS_PREFIX} warning: gloo threads outlive the process group: {', '.join(left)}", flush=True)


if __name__ == "__main__":
    main()
