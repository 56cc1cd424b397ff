"""The RL loop: `train(config, workdir)` runs GRPO, GXPO or SFPO and can be killed and resumed.

One step: pick prompts -> sample a group of completions each -> score them -> group advantages -> the
update rule over the mini-batches, with a closure that recomputes the loss on the same mini-batch.
Everything a plot needs goes to ``workdir/metrics.jsonl``, one JSON line per step (``"kind": "train"``)
and per evaluation (``"kind": "eval"``). Checkpoints hold the trainable weights, the optimizer, the rule
and its gate, RNG states and the cumulative counters; `train` on a workdir that has one resumes from it.

Randomness is derived from (seed, step), so a resumed run samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .evaluation import bootstrap_ci, pass_at_k
from .gate import GATE_MODES, GATE_SIGNALS
from .losses import LOSS_TYPES, group_advantages, grpo_objective
from .rules import GXPO, OPTIMIZER_STATE_MODES, RETENTION_MODES, SFPO, PlainStep, StepInfo
from .sampling import HFSampler, Rollouts, completion_logprobs
from .validation import check_choice, check_int, check_interval, check_optional_positive, check_positive

ALGORITHMS = ("grpo", "gxpo", "sfpo")
ROLLOUT_BACKENDS = ("hf", "vllm")
OLD_LOGPROB_SOURCES = ("sampler", "first_pass")
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class TrainConfig:
    """Everything one run needs; plain values only, so it round-trips through JSON and papermill."""

    # algorithm and its settings (k and alpha are GXPO's K, alpha or SFPO's K, alpha)
    algorithm: str = "gxpo"
    k: int = 5
    alpha: float = 0.5
    r_clamp: tuple[float, float] = (-2.0, 3.0)
    optimizer_state: str = "carry"
    retention: str = "grad"
    skip_corrective: bool = False
    gate: bool = True                  # False: never shut off
    tau: float = 0.5
    omega: float = 0.1
    gate_warmup: int = 2
    gate_patience: int = 1
    gate_mode: str = "ema"
    gate_window: int = 30
    gate_window_includes_current: bool = False
    gate_signal: str = "grad_norm"
    gate_permanent: bool = True
    sfpo_official_gate: bool = True    # SFPO: the official entropy-window gate instead of the settings above
    # model
    model: str = "tiny"
    dtype: str | None = None
    lora: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                     "down_proj")
    # data
    train_set: str = "arith"
    train_path: str | None = None
    train_levels: tuple[int, ...] | None = None
    eval_set: str = "arith"
    eval_path: str | None = None
    eval_problems: int = 64
    eval_samples: int = 4
    final_eval_sets: tuple[str, ...] = ()   # after training: pass@1 and pass@k per benchmark
    final_eval_samples: int = 4
    final_eval_problems: int | None = None  # None: every problem of each set
    data_dir: str | None = None        # a folder of local JSONL files (e.g. ../shared/data) instead of the hub
    instruction: str | None = None     # appended to each problem; None: none for arith, MATH_INSTRUCTION else
    # optimisation
    lr: float = 2e-3
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    batch_prompts: int = 8
    group_size: int = 8
    mini_batches: int = 1
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_p: float = 1.0
    loss_type: str = "token_mean"
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    adv_scale: str = "group"
    kl_beta: float = 0.0
    entropy_coef: float = 0.0
    # schedule
    steps: int = 30
    eval_every: int = 10
    checkpoint_every: int = 5
    keep_checkpoints: int = 2
    seed: int = 0
    reward_workers: int = 0            # 0: score in this process; >0: a process pool with an outer timeout
    reward_timeout: float = 5.0
    # engines
    old_logprobs: str = "sampler"      # "sampler": a no-grad forward after sampling (verl); "first_pass": TRL's
    rollout_backend: str = "hf"        # "hf": model.generate; "vllm": gxpo_lib.vllm_sampler (GPU extra)
    vllm_gpu_memory: float = 0.3       # vLLM's share of accelerator memory (colocated engine)
    progress: bool = True

    def __post_init__(self):
        self.r_clamp = tuple(self.r_clamp)
        self.lora_targets = tuple(self.lora_targets)
        self.final_eval_sets = tuple(self.final_eval_sets)
        if self.train_levels is not None:
            self.train_levels = tuple(self.train_levels)

    def validate(self) -> TrainConfig:
        """Check every value before any model is loaded; raises ValueError naming the setting."""
        check_choice("algorithm", self.algorithm, ALGORITHMS)
        check_int("k", self.k, minimum=2)
        check_positive("alpha", self.alpha)
        check_interval("r_clamp", self.r_clamp)
        check_choice("optimizer_state", self.optimizer_state, OPTIMIZER_STATE_MODES)
        check_choice("retention", self.retention, RETENTION_MODES)
        check_positive("tau", self.tau)
        if not 0 < self.omega < 1:
            raise ValueError(f"omega={self.omega!r} is invalid: allowed a number in the open interval (0, 1)")
        check_int("gate_warmup", self.gate_warmup, minimum=0)
        check_int("gate_patience", self.gate_patience, minimum=1)
        check_choice("gate_mode", self.gate_mode, GATE_MODES)
        check_choice("gate_signal", self.gate_signal, GATE_SIGNALS)
        check_positive("lr", self.lr)
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} is invalid: allowed a number >= 0")
        check_optional_positive("max_grad_norm", self.max_grad_norm)
        for name in ("batch_prompts", "group_size", "mini_batches", "max_new_tokens", "steps",
                     "eval_every", "checkpoint_every", "keep_checkpoints", "eval_problems", "eval_samples",
                     "lora_rank", "final_eval_samples", "gate_window"):
            check_int(name, getattr(self, name), minimum=1)
        if self.final_eval_problems is not None:
            check_int("final_eval_problems", self.final_eval_problems, minimum=1)
        check_int("seed", self.seed, minimum=0)
        check_int("reward_workers", self.reward_workers, minimum=0)
        check_positive("reward_timeout", self.reward_timeout)
        if (self.batch_prompts * self.group_size) % self.mini_batches:
            raise ValueError(f"mini_batches={self.mini_batches} is invalid: allowed a divisor of "
                             f"batch_prompts * group_size = {self.batch_prompts * self.group_size}")
        check_positive("temperature", self.temperature)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is invalid: allowed a number in (0, 1]")
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_positive("clip_eps", self.clip_eps)
        check_optional_positive("clip_eps_high", self.clip_eps_high)
        check_choice("adv_scale", self.adv_scale, ("group", "batch", "none"))
        for name in ("kl_beta", "entropy_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed a number >= 0")
        check_positive("lora_alpha", self.lora_alpha)
        check_choice("rollout_backend", self.rollout_backend, ROLLOUT_BACKENDS)
        self._check_old_logprobs()
        if not 0 < self.vllm_gpu_memory <= 1:
            raise ValueError(f"vllm_gpu_memory={self.vllm_gpu_memory!r} is invalid: allowed a number in (0, 1]")
        return self

    def _check_old_logprobs(self) -> None:
        """"first_pass" needs one mini-batch (all rows at the sampling weights) and a gate that reads no entropy."""
        check_choice("old_logprobs", self.old_logprobs, OLD_LOGPROB_SOURCES)
        if self.old_logprobs != "first_pass":
            return
        if self.mini_batches != 1:
            raise ValueError(f"old_logprobs='first_pass' is invalid with mini_batches={self.mini_batches}: only a "
                             "single mini-batch sees every rollout at the sampling weights; use 'sampler'")
        if self.entropy_gate:
            raise ValueError("old_logprobs='first_pass' is invalid with an entropy-signal gate (SFPO's official "
                             "gate, or gate_signal='entropy'): the gate needs the sampling policy's entropy "
                             "before the update; use 'sampler' (or sfpo_official_gate=False)")

    @property
    def entropy_gate(self) -> bool:
        """Does the rule's shut-off gate read the sampling policy's entropy (passed before each update)?"""
        if self.algorithm == "sfpo" and self.sfpo_official_gate:
            return True
        return self.algorithm != "grpo" and self.gate and self.gate_signal == "entropy"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown names (a typo must not be silently ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}={values[unknown[0]]!r} is invalid: not a TrainConfig setting "
                             f"(allowed: {', '.join(sorted(known))})")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Live control (the dashboard's buttons and sliders talk to a running `train` through this)
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# Building the pieces
# ---------------------------------------------------------------------------------------------------
def build_rule(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """The update rule the config names, wrapping `optimizer`."""
    if config.algorithm == "grpo":
        return PlainStep(optimizer, max_grad_norm=config.max_grad_norm)
    gate_settings = dict(tau=config.tau, omega=config.omega, warmup=config.gate_warmup,
                         patience=config.gate_patience, mode=config.gate_mode, window=config.gate_window,
                         window_includes_current=config.gate_window_includes_current,
                         signal=config.gate_signal, permanent=config.gate_permanent)
    if config.algorithm == "sfpo":
        if not config.gate:
            return SFPO(optimizer, k=config.k, alpha=config.alpha, max_grad_norm=config.max_grad_norm, gate=None)
        if config.sfpo_official_gate:
            return SFPO(optimizer, k=config.k, alpha=config.alpha, max_grad_norm=config.max_grad_norm)
        return SFPO(optimizer, k=config.k, alpha=config.alpha, max_grad_norm=config.max_grad_norm,
                    gate="default", **gate_settings)
    return GXPO(optimizer, k=config.k, alpha=config.alpha, max_grad_norm=config.max_grad_norm,
                r_clamp=config.r_clamp, optimizer_state=config.optimizer_state, retention=config.retention,
                skip_corrective=config.skip_corrective,
                **({"gate": None} if not config.gate else gate_settings))


def load_problems(name: str, path: str | None, split: str, levels=None, limit=None,
                  data_dir: str | None = None) -> list[dict]:
    """Problems with `prompt` and `answer`: the synthetic task or a real benchmark.

    A benchmark comes from `path`, else from its file in `data_dir`, else from the hub.
    """
    if name == "arith":
        from . import task

        records = task.load_split(split, data_dir=path or task.DATA_DIR)
        if levels is not None:
            records = [r for r in records if r["level"] in levels]
        return records if limit is None else records[:limit]
    from .data import HUB, load_benchmark, local_path

    # A hub set offers the wanted split ("train"/"test") or only its default one.
    split = split if name in HUB and split in HUB[name].splits else None
    if path is None and data_dir is not None:
        path = str(local_path(name, data_dir, split))
    return load_benchmark(name, path=path, split=split, levels=levels, limit=limit)


def _prompt_formatter(config: TrainConfig, tokenizer) -> Callable[[str], str]:
    """problem text -> the exact prompt string (chat template plus the optional instruction)."""
    from .models import format_prompt

    instruction = config.instruction
    if instruction is None and config.train_set != "arith":
        instruction = MATH_INSTRUCTION
    suffix = f"\n{instruction}" if instruction else ""
    return lambda text: format_prompt(text + suffix, tokenizer)


def _set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _step_seed(seed: int, step: int, salt: int = 0) -> int:
    """A distinct, reproducible seed for each (run seed, step, purpose)."""
    return int(np.random.SeedSequence([seed, step, salt]).generate_state(1)[0])


# ---------------------------------------------------------------------------------------------------
# Checkpoints and the metrics log
# ---------------------------------------------------------------------------------------------------
def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Write to a temporary name, then rename: a kill mid-write never leaves a broken checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(workdir: Path, step: int, model, optimizer, rule, counters: dict, keep: int) -> Path:
    """Trainable weights, optimizer, rule + gate, RNG states, counters; keeps the newest `keep` files."""
    folder = workdir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.pt"
    _atomic_torch_save({
        "step": step, "trainable": _trainable_state(model), "optimizer": optimizer.state_dict(),
        "rule": rule.state_dict(), "counters": dict(counters),
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }, path)
    for old in sorted(folder.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


def latest_checkpoint(workdir: Path) -> Path | None:
    found = sorted((workdir / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl; a torn last line (a kill mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def summarize_run(workdir: Path | str) -> dict[str, Any]:
    """What `train` returns (without the model), read back from a run folder's files.

    Works for folders written by `train` and by the TRL backend (same metrics.jsonl rows), so a notebook
    that launched a run in another process can report on it.
    """
    workdir = Path(workdir)
    rows = read_metrics(workdir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{str(workdir)!r} holds no metrics.jsonl rows: nothing was trained there")
    train_rows = [r for r in rows if r.get("kind") == "train"]
    eval_rows = [r for r in rows if r.get("kind") == "eval"]
    closed = [r["step"] for r in train_rows if r.get("gate_open") is False]
    last = (eval_rows or rows)[-1]
    counters = {key: last.get(key, 0.0) for key in ("seconds_sampling", "seconds_scoring", "seconds_update",
                                                     "seconds_eval")}
    final_path = workdir / "final_eval.json"
    return {"workdir": str(workdir), "steps_done": max((r["step"] for r in train_rows), default=0),
            "last_eval": eval_rows[-1] if eval_rows else None,
            "final_eval": json.loads(final_path.read_text()) if final_path.exists() else {},
            "shutoff_step": closed[0] + 1 if closed else None,  # the gate's convention: the first plain step
            "backward_passes": last.get("cumulative_backward_passes", 0), **counters}


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep only rows up to `step` (the checkpoint resumed from); rewritten atomically."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)


class _MetricsLog:
    """Appends one JSON line per row and flushes it to disk at once."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = path.open("a", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        self.handle.write(json.dumps(row, allow_nan=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        self.handle.close()


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------
def evaluate(sampler, scorer, problems: Sequence[dict], samples: int, seed: int) -> dict[str, Any]:
    """Sampled pass@1 (mean over `samples` per problem) and unbiased pass@k with bootstrap intervals."""
    rollouts = sampler.sample([p["prompt"] for p in problems], samples, seed=seed, score_policy=False)
    scored = scorer.score(rollouts.completions, [problems[i]["answer"] for i in rollouts.prompt_index])
    correct = np.asarray(scored.rewards).reshape(len(problems), samples) >= 0.95  # the authors' threshold
    result: dict[str, Any] = {}
    k = 1
    while k <= samples:
        per_problem = [pass_at_k(samples, int(c), k) for c in correct.sum(axis=1)]
        low, high = bootstrap_ci(per_problem, seed=seed)
        result[f"pass@{k}"] = float(np.mean(per_problem))
        result[f"pass@{k}_ci"] = [float(low), float(high)]
        k *= 2
    result["response_length"] = float(rollouts.completion_mask.sum(1).float().mean())
    return result


# ---------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------
def _aggregate(infos: list[StepInfo]) -> dict[str, Any]:
    """One row from the mini-batches' step records: passes summed, flags or-ed, numbers averaged."""
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


def _rule_settings_row(rule) -> dict[str, Any]:
    """The settings in force this step (so live changes show up in the log)."""
    row = {"k": getattr(rule, "k", None), "alpha": getattr(rule, "alpha", None)}
    r_clamp = getattr(rule, "r_clamp", None)
    row["r_min"], row["r_max"] = (r_clamp if r_clamp else (None, None))
    gate = getattr(rule, "gate", None)
    row["tau"] = gate.tau if gate is not None else None
    return row


def _finite_or_none(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def train(
    config: TrainConfig,
    workdir: str | Path,
    callbacks: Sequence[Callable[[dict[str, Any]], None]] = (),
    control: TrainControl | None = None,
    model_and_tokenizer=None,
) -> dict[str, Any]:
    """Run (or resume) a training run in `workdir`; returns a summary.

    Args:
        config: the run's settings (validated first).
        workdir: the run folder: config.json, metrics.jsonl, checkpoints/.
        callbacks: called with every metrics row as it is written (live plots).
        control: pause / stop / live settings from another thread.
        model_and_tokenizer: an already loaded (model, tokenizer) to use instead of `config.model`.
    """
    from .models import apply_lora, load_model, reference_policy
    from .rewards import RewardScorer

    config = copy.deepcopy(config).validate()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_resumable(workdir, config)
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    _set_seeds(config.seed)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))

    # The data and the model.
    train_problems = load_problems(config.train_set, config.train_path, "train", config.train_levels,
                                   data_dir=config.data_dir)
    eval_problems = load_problems(config.eval_set, config.eval_path, "test", limit=config.eval_problems,
                                  data_dir=config.data_dir)
    final_sets = {name: load_problems(name, None, "test", limit=config.final_eval_problems,
                                      data_dir=config.data_dir) for name in config.final_eval_sets}
    model, tokenizer = model_and_tokenizer or load_model(config.model, dtype=config.dtype)
    if config.lora:
        model = apply_lora(model, rank=config.lora_rank, alpha=config.lora_alpha,
                           target_modules=config.lora_targets)
    reference = None
    if config.kl_beta > 0 and not config.lora:
        reference = copy.deepcopy(model).requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    rule = build_rule(config, optimizer)
    format_prompt = _prompt_formatter(config, tokenizer)
    sampler = _make_sampler(config, model, tokenizer, format_prompt, workdir)
    scorer = RewardScorer(workers=config.reward_workers, timeout_s=config.reward_timeout)

    # Resume if a checkpoint exists.
    counters = {"backward_passes": 0, "seconds_sampling": 0.0, "seconds_scoring": 0.0,
                "seconds_update": 0.0, "seconds_eval": 0.0}
    start_step = 0
    checkpoint = latest_checkpoint(workdir)
    metrics_path = workdir / "metrics.jsonl"
    if checkpoint is not None:
        state = torch.load(checkpoint, weights_only=False)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        rule.load_state_dict(state["rule"])
        counters.update(state["counters"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        start_step = state["step"]
        _truncate_metrics(metrics_path, start_step)
    elif metrics_path.exists():
        metrics_path.unlink()  # a run that died before its first checkpoint starts over
    log = _MetricsLog(metrics_path)

    def emit(row: dict[str, Any]) -> None:
        row = _finite_or_none(row)
        log.write(row)
        for callback in callbacks:
            callback(row)

    def run_eval(step: int) -> dict[str, Any]:
        start = time.perf_counter()
        result = evaluate(sampler, scorer, eval_problems, config.eval_samples, seed=_step_seed(config.seed, 0, 1))
        counters["seconds_eval"] += time.perf_counter() - start
        row = {"kind": "eval", "step": step, **_x_values(counters), **result}
        emit(row)
        return row

    progress = _progress_bar(config, start_step)
    last_eval = None
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
                    rule.update_settings(**pending)
            row = _train_step(step, config, model, tokenizer, rule, sampler, scorer, train_problems,
                              reference, counters, reference_policy)
            emit(row)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{row['reward_mean']:.2f}", bp=counters["backward_passes"])
            if step % config.eval_every == 0 or step == config.steps:
                last_eval = run_eval(step)
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(workdir, step, model, optimizer, rule, counters, config.keep_checkpoints)
        finished = rule.num_steps >= config.steps
        final = _final_evaluation(workdir, config, sampler, scorer, final_sets, counters, emit) if finished else {}
    finally:
        log.close()
        scorer.close()
        if hasattr(sampler, "close"):
            sampler.close()  # a vLLM engine frees its memory and worker processes
        if progress is not None:
            progress.close()
    gate = getattr(rule, "gate", None)
    return {"workdir": str(workdir), "steps_done": rule.num_steps, "last_eval": last_eval, "final_eval": final,
            "shutoff_step": gate.shutoff_step if gate is not None else None, **counters,
            "model": model, "tokenizer": tokenizer}


def _make_sampler(config: TrainConfig, model, tokenizer, format_prompt, workdir: Path):
    """The rollout engine: HF generate, or a colocated vLLM engine that follows the trained weights."""
    if config.rollout_backend == "vllm":
        from .vllm_sampler import VLLMSampler

        return VLLMSampler(model, tokenizer, format_prompt, max_new_tokens=config.max_new_tokens,
                           temperature=config.temperature, top_p=config.top_p,
                           gpu_memory_utilization=config.vllm_gpu_memory, workdir=workdir / "vllm")
    return HFSampler(model, tokenizer, format_prompt, max_new_tokens=config.max_new_tokens,
                     temperature=config.temperature, top_p=config.top_p)


def _final_evaluation(workdir, config, sampler, scorer, sets, counters, emit) -> dict[str, Any]:
    """Every final benchmark once, into final_eval.json (kept across resumes) and the metrics log."""
    path = workdir / "final_eval.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for name, problems in sets.items():
        if name in done:
            continue
        result = evaluate(sampler, scorer, problems, config.final_eval_samples, seed=_step_seed(config.seed, 0, 3))
        done[name] = {"problems": len(problems), "samples": config.final_eval_samples, **result}
        emit({"kind": "final_eval", "step": config.steps, "benchmark": name, **done[name]})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=2))
        os.replace(tmp, path)
    return done


def _x_values(counters: dict[str, float]) -> dict[str, float]:
    """The x-axes of every comparison: cumulative backward passes and training seconds (split by phase)."""
    train_seconds = counters["seconds_sampling"] + counters["seconds_scoring"] + counters["seconds_update"]
    return {"cumulative_backward_passes": counters["backward_passes"], "seconds": train_seconds,
            "seconds_sampling": counters["seconds_sampling"], "seconds_scoring": counters["seconds_scoring"],
            "seconds_update": counters["seconds_update"], "seconds_eval": counters["seconds_eval"]}


def _progress_bar(config: TrainConfig, start_step: int):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start_step, desc=config.algorithm, unit="step")


def _train_step(step, config, model, tokenizer, rule, sampler, scorer, problems, reference, counters,
                reference_policy) -> dict[str, Any]:
    """Sample, score, advantages, update over the mini-batches; returns the metrics row."""
    # Which prompts: a reproducible draw for this step.
    rng = np.random.default_rng(_step_seed(config.seed, step, 2))
    chosen = [problems[i] for i in rng.choice(len(problems), size=config.batch_prompts, replace=False)]

    start = time.perf_counter()
    rollouts = sampler.sample([p["prompt"] for p in chosen], config.group_size, seed=_step_seed(config.seed, step),
                              score_policy=config.old_logprobs == "sampler")
    counters["seconds_sampling"] += time.perf_counter() - start

    start = time.perf_counter()
    golds = [chosen[i]["answer"] for i in rollouts.prompt_index]
    scored = scorer.score(rollouts.completions, golds)
    rewards = torch.tensor(scored.rewards, dtype=torch.float32)
    counters["seconds_scoring"] += time.perf_counter() - start

    start = time.perf_counter()
    advantages = group_advantages(rewards, config.group_size, scale=config.adv_scale)
    ref_logprobs = None
    if config.kl_beta > 0:  # the reference policy's view, computed once per step
        with torch.no_grad(), reference_policy(model, reference) as ref_model:
            ref_logprobs = completion_logprobs(ref_model, rollouts, temperature=config.temperature)
    total_tokens = rollouts.completion_mask.sum()
    rows = len(rollouts.completions)
    size = rows // config.mini_batches
    infos, stats = [], {}
    model.train()
    for start_row in range(0, rows, size):
        part = slice(start_row, start_row + size)
        # One mini-batch: all rows (then the closure may fill in the rollouts' old log-probs) or a slice.
        batch = rollouts if size == rows else rollouts.rows(part)
        closure = _make_closure(model, batch, advantages[part],
                                None if ref_logprobs is None else ref_logprobs[part], config, total_tokens, stats)
        entropy_signal = None if config.old_logprobs == "first_pass" else \
            float(rollouts.entropy[part].sum() / rollouts.completion_mask[part].sum().clamp(min=1))
        infos.append(rule.step(closure, gate_signal=entropy_signal))
    counters["seconds_update"] += time.perf_counter() - start

    record = _aggregate(infos)
    counters["backward_passes"] += record["backward_passes"]
    mask = rollouts.completion_mask
    return {
        "kind": "train", **record, "step": step, **_rule_settings_row(rule),
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if rows > 1 else 0.0,
        "accuracy": float((rewards >= 0.95).float().mean()),
        "response_length": float(mask.sum(1).float().mean()),
        "entropy": float(rollouts.entropy.sum() / mask.sum().clamp(min=1)),
        "kl": stats.get("kl"), "clip_frac": stats.get("clip_frac"),
        "reward_parse_fail": scored.counts.n_parse_fail, "reward_timeout": scored.counts.n_timeout,
        "reward_error": scored.counts.n_error,
        **_x_values(counters),
    }


def _make_closure(model, batch: Rollouts, advantages, ref_logprobs, config, total_tokens, stats):
    """forward + loss.backward() on one mini-batch; the loss uses the fixed sampling log-probs.

    With ``old_logprobs="first_pass"`` the rollouts arrive without them: the first call runs at the
    sampling weights, so its own log-probs (detached) become the fixed old log-probs of every later pass
    (GXPO's probes and corrective step included), and its entropies the logged ones. That is TRL's
    shortcut for a single-iteration step; it saves the sampler's extra forward.
    """

    def closure():
        first_pass = batch.old_logprobs is None
        want_entropy = config.entropy_coef > 0 or first_pass
        out = completion_logprobs(model, batch, temperature=config.temperature, with_entropy=want_entropy)
        logprobs, entropy = out if want_entropy else (out, None)
        if first_pass:
            mask = batch.completion_mask
            batch.old_logprobs, batch.entropy = logprobs.detach() * mask, entropy.detach() * mask
        loss, step_stats = grpo_objective(
            logprobs, batch.old_logprobs, advantages, batch.completion_mask, ref_logprobs=ref_logprobs,
            beta=config.kl_beta, entropy=entropy if config.entropy_coef > 0 else None,
            entropy_coef=config.entropy_coef,
            loss_type=config.loss_type, clip_eps=config.clip_eps, clip_eps_high=config.clip_eps_high,
            max_completion_length=config.max_new_tokens, num_items_in_batch=total_tokens)
        loss.backward()
        stats.update(step_stats)
        return loss

    return closure


def _check_resumable(workdir: Path, config: TrainConfig) -> None:
    """A workdir holding a different run must not be silently continued with other settings."""
    saved_path = workdir / "config.json"
    if not saved_path.exists() or latest_checkpoint(workdir) is None:
        return
    saved = json.loads(saved_path.read_text())
    may_change = {"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "progress", "reward_workers",
                  "reward_timeout"}
    current = json.loads(json.dumps(config.to_dict()))
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))  # a setting newer than the run: its default
    differing = sorted(k for k in current if k not in may_change and saved.get(k, defaults[k]) != current[k])
    if differing:
        name = differing[0]
        raise ValueError(f"{name}={current[name]!r} differs from the run in {workdir} ({saved.get(name)!r}): "
                         "use another workdir, or the same settings to resume")
