"""Peak memory of one GXPO step by micro-batch size: bounded by the micro-batch, not the batch.

The paper preset (``paper-gxpo``: 128 prompts x 5 = 640 rollouts, one mini-batch, gradient checkpointing,
LoRA r=128 on q/k/v/o, KL and entropy terms on) with the tiny Llama substituted for Llama-3.2-1B, HF
rollouts instead of vLLM, fp32, and ``max_new_tokens`` cut to fit a CPU. One GXPO step (sample, score,
reference forward, three forward/backward passes, the extrapolation) runs through
`gxpo_lib.rl.trainer.build_state` + `train_step` for each ``micro_batch_size`` in {8, 32, whole batch},
each in its own fresh subprocess so the peaks never mix.

Measured in each child (Linux):

- ``peak_rss``: the process's peak resident set size over its whole life (``getrusage`` ru_maxrss):
  imports, model, sampling, scoring and the update together.
- ``update_peak``: the exact peak RSS of the update phase alone (after scoring: the reference log-probs,
  the three passes of the rule, the optimizer), above the RSS at its start. The kernel's high-water mark
  ``VmHWM`` is reset through ``/proc/self/clear_refs`` (= 5) when the phase starts and read when it ends:
  page-exact, no sampling thread to miss a spike. ``sampling_peak`` is the same for the rollout phase
  (``generate`` plus the no-grad forward for the old log-probs, which also runs in micro-batches).
  The child runs with glibc's mmap threshold pinned at 64 KiB, so freed tensors go back to the OS and RSS
  follows live tensor memory (a heap that kept freed pages would hide the next phase's peak).
- on a CUDA machine also ``torch.cuda.max_memory_allocated`` of the update phase.

Beside them the arithmetic of the largest single tensor of a pass, the logits of one micro-batch:
rows x (prompt + completion tokens) x vocab x 4 bytes (fp32).

    python bench/bench_microbatch.py              # tiny, 128 x 5, micro-batch 8 / 32 / 640 (~11 min*)
    python bench/bench_microbatch.py --quick      # tiny, 16 x 5, micro-batch 8 / 32 / 80 (~1-2 min*)
    python bench/bench_microbatch.py --smollm2    # adds SmolLM2-135M, 2 x 8 rows, micro 1 / 4 / 16 (+16 min*)

    * on 2 CPU cores shared with other jobs (load 4-8), 1 torch thread; memory does not depend on the load.
"""

from __future__ import annotations

import os

# Before torch is imported: passive OpenMP waiting (see _benchlib.py; an explicit setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _benchlib import finish_record, machine_info, print_table, quiet_transformers, write_json

MiB = 2**20
# glibc: return freed blocks >= 64 KiB to the OS at once, so RSS tracks live tensor memory (as bench_memory).
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
# The paper preset's settings that must change on a CPU without network: everything else stays the preset's.
CPU_OVERRIDES = {
    "rollout_backend": "hf",      # vLLM is a GPU extra; HF generate samples the same rollouts here
    "dtype": "float32",           # bf16 matmuls are slow on most CPUs
    "train_set": "arith",         # the shipped synthetic task instead of MATH from the hub
    "eval_set": "arith", "eval_problems": 8, "final_eval_sets": [],  # no evaluation runs in this bench
    # (rollout_backend hf: rewards are scored in process, so a worker pool's memory is not counted)
}
CASES = {  # name: (overrides of the paper preset, micro-batch sizes; None = the whole mini-batch)
    "tiny": ({"model": "tiny", "max_new_tokens": 32}, (8, 32, None)),
    "tiny-quick": ({"model": "tiny", "max_new_tokens": 32, "batch_prompts": 16},
                   (8, 32, None)),
    "smollm2": ({"model": "smollm2-135m", "max_new_tokens": 16, "batch_prompts": 2, "group_size": 8},
                (1, 4, None)),
}


# ---------------------------------------------------------------------------------------------------
# The child: one setting, one GXPO step, its peaks
# ---------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Reset the RSS high-water mark (and CUDA's peak) to now; returns the current RSS in KiB."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def child_config(case: str, micro: int | None):
    """The resolved paper-gxpo config of one case at one micro-batch size (None: the whole mini-batch)."""
    from gxpo_lib.config import resolve_config

    overrides, _ = CASES[case]
    config = resolve_config("paper-gxpo", CPU_OVERRIDES | overrides | {"steps": 1})
    # resolve_config reads an override of None as "not given", so the whole batch is set afterwards.
    return dataclasses.replace(config, micro_batch_size=micro).validate()


def run_child(case: str, micro: int | None, threads: int) -> dict:
    """Build the paper run's state, take one GXPO step, and measure each phase's peak."""
    from gxpo_lib.rl.problems import run_problems
    from gxpo_lib.rl.trainer import build_state, check_runtime, train_step

    torch.set_num_threads(threads)
    config = child_config(case, micro)
    check_runtime(config)
    torch.manual_seed(config.seed)
    train_problems, _, _ = run_problems(config)
    peaks: dict[str, float] = {}
    shape: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as workdir:
        state = build_state(config, Path(workdir), train_problems)
        loaded_kib = _status_kib("VmRSS")

        # Phase boundaries: wrap this state's sampler and scorer (instance attributes; the library is as is).
        sample, score = state.sampler.sample, state.scorer.score

        def measured_sample(*args, **kwargs):
            start = _reset_peak()
            rollouts = sample(*args, **kwargs)
            peaks["sampling_peak_mib"] = (_status_kib("VmHWM") - start) / 1024
            shape.update(rows=len(rollouts.completions), prompt_tokens=rollouts.prompt_ids.shape[1],
                         completion_tokens=rollouts.completion_ids.shape[1],
                         completion_tokens_mean=float(rollouts.completion_mask.sum(1).float().mean()))
            return rollouts

        def measured_score(*args, **kwargs):
            scored = score(*args, **kwargs)
            peaks["update_start_kib"] = _reset_peak()  # what follows in train_step is the update phase
            return scored

        state.sampler.sample, state.scorer.score = measured_sample, measured_score
        started = time.perf_counter()
        row = train_step(state, 1)
        seconds = time.perf_counter() - started
        update_kib = _status_kib("VmHWM") - peaks.pop("update_start_kib")
        cuda_peak = torch.cuda.max_memory_allocated() / MiB if torch.cuda.is_available() else None
        state.scorer.close()
    vocab = state.model.config.vocab_size
    rows_per_pass = shape["rows"] if micro is None else min(micro, shape["rows"])
    tokens = shape["prompt_tokens"] + shape["completion_tokens"]
    return {
        "case": case, "model": config.model, "micro_batch_size": micro, **shape,
        "rows_per_pass": rows_per_pass, "vocab": vocab,
        "logits_mib_per_micro_batch": rows_per_pass * tokens * vocab * 4 / MiB,
        "logits_mib_whole_batch": shape["rows"] * tokens * vocab * 4 / MiB,
        "rss_after_load_mib": loaded_kib / 1024,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "update_peak_mib": update_kib / 1024, **peaks, "cuda_update_peak_mib": cuda_peak,
        "step_seconds": seconds, "backward_passes": row["backward_passes"], "active": row["active"],
        "reward_mean": row["reward_mean"], "gradient_checkpointing": config.gradient_checkpointing,
        "lora_rank": config.lora_rank, "batch": f"{config.batch_prompts} x {config.group_size}",
        "max_new_tokens": config.max_new_tokens, "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------
# The parent: one subprocess per setting, the table, the JSON record
# ---------------------------------------------------------------------------------------------------
def run_case(case: str, args) -> list[dict]:
    """Every micro-batch size of `case`, each in a fresh child process; `--reps` times, interleaved."""
    _, micros = CASES[case]
    results: list[dict] = []
    env = dict(os.environ, **CHILD_ENV)
    for rep in range(args.reps):
        for micro in micros:
            command = [sys.executable, __file__, "--child", "--case", case, "--micro", str(micro or 0),
                       "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout,
                                  check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{case} micro={micro} failed (rc {done.returncode}):\n"
                                   f"{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["rep"] = rep
            results.append(result)
            print(f"{case:10s} micro {micro or 'whole'!s:>5}  rep {rep}  update peak "
                  f"{result['update_peak_mib']:7.1f} MiB  peak RSS {result['peak_rss_mib']:7.1f} MiB  "
                  f"step {result['step_seconds']:5.1f} s", flush=True)
    return results


def summarise(results: list[dict]) -> list[dict]:
    """One row per (case, micro-batch): the median over repetitions, and the ratio to the smallest one."""
    rows = []
    keys = sorted({(r["case"], r["micro_batch_size"] or 10**9) for r in results})
    for case, micro_key in keys:
        runs = [r for r in results if r["case"] == case and (r["micro_batch_size"] or 10**9) == micro_key]
        row = dict(runs[0])
        for key in ("update_peak_mib", "sampling_peak_mib", "peak_rss_mib", "step_seconds"):
            values = sorted(r[key] for r in runs)
            row[key] = values[len(values) // 2]
        row["micro"] = "whole" if row["micro_batch_size"] is None else str(row["micro_batch_size"])
        rows.append(row)
    for case in {r["case"] for r in rows}:
        first = next(r for r in rows if r["case"] == case)  # the smallest micro-batch
        for r in rows:
            if r["case"] == case:
                r["update_vs_smallest"] = r["update_peak_mib"] / max(first["update_peak_mib"], 1e-9)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 16 x 5 rollouts (a smoke check)")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (vocab 49152), 2 x 8 rows")
    parser.add_argument("--reps", type=int, default=1, help="repetitions of every setting (interleaved)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds allowed per child")
    parser.add_argument("--json", default=None, help="output path (default bench/results/microbatch.json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", default="tiny", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--micro", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reps < 1:
        raise ValueError(f"--reps={args.reps} is invalid: allowed an integer >= 1")
    quiet_transformers()
    if args.child:
        print(json.dumps(run_child(args.case, args.micro or None, args.threads)))
        return

    started = time.perf_counter()
    record = {"benchmark": "microbatch", "machine": machine_info(), "cpu_overrides": CPU_OVERRIDES,
              "cases": {c: {"overrides": CASES[c][0], "micro_batch_sizes": CASES[c][1]} for c in CASES},
              "method": "one fresh subprocess per setting; update_peak = VmHWM reset at the update's start "
                        "(page-exact); peak_rss = ru_maxrss of the whole child", "results": []}
    cases = ["tiny-quick" if args.quick else "tiny"] + (["smollm2"] if args.smollm2 else [])
    for case in cases:
        record["results"] += run_case(case, args)
    record["summary"] = summarise(record["results"])
    finish_record(record, started)
    print_table(record["summary"], [
        ("case", "case", ""), ("batch", "batch", ""), ("micro", "micro", ""), ("vocab", "vocab", "d"),
        ("logits_mib_per_micro_batch", "logits/micro MiB", ".1f"),
        ("update_peak_mib", "update peak MiB", ".1f"),
        ("update_vs_smallest", "x smallest", ".2f"), ("sampling_peak_mib", "sampling peak MiB", ".1f"),
        ("peak_rss_mib", "peak RSS MiB", ".1f"), ("step_seconds", "step s", ".1f"),
        ("backward_passes", "passes", "d")],
        title="One GXPO step of the paper preset (tiny model substituted): peak memory by micro-batch")
    machine = record["machine"]
    print(f"\nload average {machine['loadavg_start']} -> {machine['loadavg_end']}, "
          f"{machine['wall_seconds']} s")
    print(f"wrote {write_json(record, args.json, 'microbatch')}")


if __name__ == "__main__":
    main()
