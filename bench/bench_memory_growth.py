"""Resident memory over a long CPU run: does anything grow after warm-up?

Runs `train` for N steps (default 200, GXPO on the tiny Llama with LoRA, evaluations and checkpoints
on) and samples the process's resident set size after every step through the trainer's callbacks.
Reports the RSS after warm-up (step `--warmup`), at the end, the growth, and a least-squares slope in
MiB per 100 steps over the post-warm-up part; the bound is `--bound-mib` (default 50 MiB) of growth.
Writes bench/results/memory_growth.json (the whole curve) and prints a short table.

    python bench/bench_memory_growth.py [--steps 200] [--algorithm gxpo] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gxpo_lib.rl.trainer import TrainConfig, train

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mib() -> float:
    """Current resident set size of this process, MiB (from /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--algorithm", default="gxpo", choices=["grpo", "gxpo", "sfpo"])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--bound-mib", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="40 steps, warm-up 10")
    parser.add_argument("--json", default=str(RESULTS / "memory_growth.json"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 40, 10
    if not 0 < args.warmup < args.steps:
        raise ValueError(f"--warmup={args.warmup} is invalid: allowed 0 < warmup < steps={args.steps}")

    curve: list[tuple[int, float]] = []

    def on_row(row: dict) -> None:
        if row.get("kind") == "train":
            curve.append((row["step"], rss_mib()))
            if row["step"] % 20 == 0:
                print(f"step {row['step']:4d}  rss {curve[-1][1]:8.1f} MiB", flush=True)

    config = TrainConfig(algorithm=args.algorithm, steps=args.steps, batch_prompts=4, group_size=8,
                         eval_every=50, eval_problems=32, eval_samples=2, checkpoint_every=25, seed=args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        train(config, workdir, callbacks=[on_row], progress=False)
    seconds = time.perf_counter() - start

    steps = np.array([s for s, _ in curve], dtype=float)
    rss = np.array([r for _, r in curve])
    after = steps >= args.warmup
    slope = float(np.polyfit(steps[after], rss[after], 1)[0] * 100) if after.sum() > 2 else float("nan")
    at_warmup = float(rss[after][0])
    growth = float(rss[-1] - at_warmup)
    result = {
        "algorithm": args.algorithm, "steps": args.steps, "warmup": args.warmup, "seconds": round(seconds, 1),
        "rss_at_warmup_mib": round(at_warmup, 1), "rss_end_mib": round(float(rss[-1]), 1),
        "rss_max_after_warmup_mib": round(float(rss[after].max()), 1),
        "growth_after_warmup_mib": round(growth, 1), "slope_mib_per_100_steps": round(slope, 2),
        "bound_mib": args.bound_mib, "within_bound": bool(growth <= args.bound_mib),
        "curve": [[int(s), round(r, 1)] for s, r in curve],
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": __import__("os").cpu_count()},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"\n{args.algorithm}, {args.steps} steps in {seconds:.0f} s")
    print(f"RSS after warm-up (step {args.warmup}): {at_warmup:.1f} MiB; end: {rss[-1]:.1f} MiB; "
          f"growth {growth:+.1f} MiB (bound {args.bound_mib:.0f}); slope {slope:+.2f} MiB / 100 steps")
    print("within bound" if result["within_bound"] else "OVER THE BOUND")


if __name__ == "__main__":
    main()
