"""Shared helpers of the benchmark scripts in bench/ (not a public API).

Statistics (median, IQR, a bootstrap interval of the median), machine information for the JSON records,
a fixed rollout mini-batch and its closure, parameter + optimizer snapshots, a plain-text table printer.
The machine these run on is shared: every result that matters is a ratio of interleaved measurements.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# OpenMP's default spin-waiting makes 2-thread torch ops 10-50x slower, and wildly noisy, on this shared,
# oversubscribed 2-core machine (measured: a tiny-model step 0.5-11 s with 2 spinning threads, 0.10-0.15 s
# with 1 thread or with passive waiting). Set before torch is imported; an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere imports the in-repo gxpo_lib
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------
def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), q in [0, 1]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, median, q25, q75, iqr, min, max of a sample."""
    values = [float(v) for v in values]
    if not values:
        return {"n": 0, "median": float("nan"), "q25": float("nan"), "q75": float("nan"),
                "iqr": float("nan"), "min": float("nan"), "max": float("nan")}
    q25, q75 = quantile(values, 0.25), quantile(values, 0.75)
    return {"n": len(values), "median": statistics.median(values), "q25": q25, "q75": q75, "iqr": q75 - q25,
            "min": min(values), "max": max(values)}


def bootstrap_median_ci(values: Sequence[float], seed: int = 0, resamples: int = 2000,
                        level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the median (nan, nan for fewer than 3 values)."""
    values = list(values)
    if len(values) < 3:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return quantile(medians, tail), quantile(medians, 1 - tail)


def verdict(median: float, ci: tuple[float, float], target: float) -> str:
    """'pass' / 'fail' by the median; '(confident)' when the bootstrap interval is on the same side."""
    if median != median:
        return "n/a"
    passed = median <= target
    low, high = ci
    confident = (high <= target) if passed else (low > target)
    return ("pass" if passed else "FAIL") + (" (confident)" if confident else " (within noise)")


# ---------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------
def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gxpo_lib"], cwd=REPO, capture_output=True,
                               text=True, timeout=10, check=False)
        return done.stdout.strip() + ("+dirty-gxpo_lib" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the numbers: CPUs, threads, versions, the load while running."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_count": os.cpu_count(), "cpu_affinity": affinity, "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "transformers": _version("transformers"), "trl": _version("trl"), "peft": _version("peft"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "git_commit": _git_commit(), "loadavg_start": list(os.getloadavg()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def finish_record(record: dict[str, Any], started: float) -> dict[str, Any]:
    record["machine"]["loadavg_end"] = list(os.getloadavg())
    record["machine"]["wall_seconds"] = round(time.perf_counter() - started, 1)
    return record


def write_json(record: dict[str, Any], path: str | Path | None, name: str) -> Path:
    """Write the record (default bench/results/<name>.json); returns the path."""
    path = Path(path) if path else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    return path


def _jsonable(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]], title: str | None = None) -> None:
    """columns: (key, header, format spec such as '.3f' or '' for str)."""
    cells = [[_cell(row.get(key), spec) for key, _, spec in columns] for row in rows]
    headers = [header for _, header, _ in columns]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(c, widths))))


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:
        return "nan"
    try:
        return format(value, spec) if spec else str(value)
    except (TypeError, ValueError):
        return str(value)


def setup_torch(threads: int, seed: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)


# ---------------------------------------------------------------------------------------------------
# A fixed mini-batch of real rollouts, its closure, and snapshots
# ---------------------------------------------------------------------------------------------------
def make_rollouts(model, tokenizer, prompts: int, group: int, new_tokens: int, seed: int = 0):
    """One real rollout batch sampled once with HFSampler, and advantages that are never all zero.

    Rewards alternate 0/1 inside every group, so every group has advantages +-0.93 and the gradient is
    not zero (a zero first-probe gradient would send GXPO to its fallback).
    """
    from gxpo_lib.core.losses import group_advantages
    from gxpo_lib.rl.arith_task import load_split
    from gxpo_lib.rl.models import format_prompt
    from gxpo_lib.rl.sampling import HFSampler

    sampler = HFSampler(model, tokenizer, lambda t: format_prompt(t, tokenizer), max_new_tokens=new_tokens)
    problems = [p["prompt"] for p in load_split("train", limit=prompts)]
    rollouts = sampler.sample(problems, group, seed=seed)
    rewards = (torch.arange(len(rollouts.completions)) % 2).float()
    return rollouts, group_advantages(rewards, group)


class TimedClosure:
    """closure(): forward + backward of the GRPO loss on a fixed batch; accumulates its own wall time."""

    def __init__(self, model, rollouts, advantages):
        self.model, self.rollouts, self.advantages = model, rollouts, advantages
        self.seconds = 0.0
        self.calls = 0

    def __call__(self):
        from gxpo_lib.core.losses import grpo_objective
        from gxpo_lib.rl.sampling import completion_logprobs

        start = time.perf_counter()
        logprobs = completion_logprobs(self.model, self.rollouts)
        loss, _ = grpo_objective(logprobs, self.rollouts.old_logprobs, self.advantages,
                                 self.rollouts.completion_mask)
        loss.backward()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return loss

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


class TrainingState:
    """Snapshot of the trainable parameters and the optimizer state, restored in place (same tensors)."""

    def __init__(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer):
        self.params, self.optimizer = params, optimizer
        self.saved_params = [p.detach().clone() for p in params]
        self.saved_state = {p: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                            for p, st in optimizer.state.items()}

    @torch.no_grad()
    def restore(self) -> None:
        for p, saved in zip(self.params, self.saved_params):
            p.copy_(saved)
        for p in list(self.optimizer.state):
            if p not in self.saved_state:
                del self.optimizer.state[p]
        for p, st in self.saved_state.items():
            live = self.optimizer.state[p]
            for k, v in st.items():
                if torch.is_tensor(v) and torch.is_tensor(live.get(k)) and live[k].shape == v.shape:
                    live[k].copy_(v)
                else:
                    live[k] = v.clone() if torch.is_tensor(v) else v
        for p in self.params:
            if p.grad is not None:
                p.grad.zero_()


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(st.values()) for st in optimizer.state.values())


def make_trainable(model, lora: bool, seed: int, rank: int = 8, alpha: float = 16):
    """LoRA adapters (seeded initialisation) or every parameter trainable (full fine-tuning)."""
    from gxpo_lib.rl.models import apply_lora

    torch.manual_seed(seed)
    model = apply_lora(model, rank=rank, alpha=alpha) if lora else apply_lora(model, full_finetune=True)
    model.train()
    return model


def quiet_transformers() -> None:
    """Silence the load-time progress bars and advisory warnings (they drown the tables)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
