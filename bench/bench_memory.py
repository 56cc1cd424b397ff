"""Peak extra memory of an active GXPO step over a plain GRPO step.

GXPO keeps three trainable-parameter-sized buffers alive through its step (theta0, g0, g1; gradients are
kept in fp32 at least) and, with optimizer_state="transactional", a copy of the optimizer state (AdamW:
exp_avg + exp_avg_sq + step). That is the floor:

    floor(gxpo)    = 3 x P            floor(gxpo_tx) = 3 x P + optimizer state      floor(sfpo) = 1 x P

where P = the trainable parameters' bytes. Reported: the measured extra peak over a plain step, and
extra / floor (1.00 = nothing beyond the unavoidable buffers; the excess is transient temporaries).

Every measurement starts from the same state: gradients and the AdamW state already allocated by a
warm-up plain step, a *fresh* rule (its buffers are allocated inside the measured step, as on the first
step of a run; they then persist between steps). Two independent methods:

1. torch allocator accounting (primary; in-process). ``torch.profiler`` with ``profile_memory=True`` makes
   c10's CPU allocator report every allocation and free with the running total of the bytes it handed out
   during profiling. Peak above start = max(total) - total at start. Exact, to the byte, for tensor memory
   allocated through the CPU allocator during the step (it excludes Python objects, allocator overheads
   and fragmentation). Each allocation is tagged with the part of the step it happened in, so the table
   names where the peak is.
2. Resident set size (cross-check; one fresh subprocess per measurement). The child loads the model,
   does the warm-up, resets the kernel's RSS high-water mark (``/proc/self/clear_refs`` = 5), runs the
   measured step and reads ``VmHWM``: the exact peak RSS over the step, at page (4 KiB) granularity. To make
   RSS follow live tensor memory, the child runs with glibc's mmap threshold pinned at 64 KiB (freed large
   blocks go back to the OS at once) and transparent huge pages disabled (prctl). Precision: a few hundred
   KiB of Python/heap noise; small allocations (< 64 KiB) that stay in glibc's heap are invisible.

The accounting row also reports the rule's persistent buffers (exact ``nbytes``) and what stays allocated
after the gate closes.

    python bench/bench_memory.py                  # tiny LoRA, tiny full, SmolLM2-135M LoRA (~4-5 min)
    python bench/bench_memory.py --quick          # tiny full only (< 1 min)
    python bench/bench_memory.py --smollm2-full   # adds SmolLM2-135M full fine-tuning (~6 GB RAM, long)
"""

from __future__ import annotations

import os

# Before torch is imported: passive OpenMP waiting (see _benchlib.py; an explicit setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _benchlib import (
    TimedClosure,
    TrainingState,
    finish_record,
    machine_info,
    make_rollouts,
    make_trainable,
    optimizer_state_bytes,
    print_table,
    quiet_transformers,
    setup_torch,
    tensor_bytes,
    write_json,
)

CASES = {  # name: (model, lora)
    "tiny-lora": ("tiny", True),
    "tiny-full": ("tiny", False),
    "smollm2-lora": ("smollm2-135m", True),
    "smollm2-full": ("smollm2-135m", False),
}
MODES = ("plain", "gxpo", "gxpo_tx", "sfpo")
MiB = 2**20


def make_rule(mode: str, optimizer):
    from gxpo_lib import GXPO, SFPO, PlainStep

    if mode == "plain":
        return PlainStep(optimizer)
    if mode == "gxpo":
        return GXPO(optimizer, k=5, alpha=0.5, tau=1e9)
    if mode == "gxpo_tx":
        return GXPO(optimizer, k=5, alpha=0.5, tau=1e9, optimizer_state="transactional")
    if mode == "sfpo":
        return SFPO(optimizer, k=3, alpha=0.8, gate=None)
    raise ValueError(mode)


def floors(param_bytes: int, state_bytes: int) -> dict[str, int]:
    return {"plain": 0, "gxpo": 3 * param_bytes, "gxpo_tx": 3 * param_bytes + state_bytes, "sfpo": param_bytes}


def setup(case: str, batch_file: Path, seed: int):
    """Model (trainable), optimizer, closure on the saved batch, after a warm-up plain step."""
    from gxpo_lib import PlainStep
    from gxpo_lib.rl.models import load_model

    model_name, lora = CASES[case]
    model, _ = load_model(model_name, device="cpu")
    batch = torch.load(batch_file, weights_only=False)
    model = make_trainable(model, lora, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    closure = TimedClosure(model, batch["rollouts"], batch["advantages"])
    PlainStep(optimizer).step(closure)  # grads and AdamW state now exist, as in a running training
    return model, params, optimizer, closure


# ---------------------------------------------------------------------------------------------------
# Method 1: allocator accounting with torch.profiler
# ---------------------------------------------------------------------------------------------------
LABELLED = ("_save_params", "_probe", "_jump", "_cos_g0_gslow", "_snapshot_optimizer", "_restore_optimizer")


def profiled_step(rule, closure) -> dict:
    """Run one rule.step under the profiler; peak and retained bytes above the start, and where the peak is."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    passes = [0]

    def labelled_closure():
        passes[0] += 1
        with record_function(f"gxpo:pass{passes[0]} (forward+backward)"):
            return closure()

    def label(name, fn):
        def wrapper(*a, **k):
            with record_function(f"gxpo:{name}"):
                return fn(*a, **k)
        return wrapper

    for attr in LABELLED:
        if hasattr(rule, attr):
            setattr(rule, attr, label(attr, getattr(rule, attr)))
    rule.optimizer.step = label("optimizer.step", rule.optimizer.step)
    gc.collect()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            info = rule.step(labelled_closure)
    finally:
        for attr in LABELLED:
            rule.__dict__.pop(attr, None)
        del rule.optimizer.step

    def walk(nodes):
        for n in nodes:
            yield n
            yield from walk(n.children)

    events = []
    for node in walk(prof.profiler.kineto_results.experimental_event_tree()):
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            where, parent = "step (outside the labelled parts)", node.parent
            while parent is not None:
                if parent.name.startswith("gxpo:"):
                    where = parent.name[5:]
                parent = parent.parent
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated,
                           where))
    events.sort(key=lambda e: e[0])
    if not events:
        return {"peak_bytes": 0, "retained_bytes": 0, "peak_in": None, "events": 0}
    start = events[0][2] - events[0][1]
    peak_event = max(events, key=lambda e: e[2])
    by_part: dict[str, int] = {}
    for _, _, total, where in events:
        by_part[where] = max(by_part.get(where, 0), total - start)
    return {"peak_bytes": peak_event[2] - start, "retained_bytes": events[-1][2] - start,
            "peak_in": peak_event[3], "peak_by_part": by_part, "events": len(events),
            "active": info.active, "backward_passes": info.backward_passes}


def rule_buffers(rule) -> int:
    return sum(tensor_bytes(getattr(rule, name, None) or []) for name in ("_theta0", "_g0", "_g1"))


def profiler_case(case: str, batch_file: Path, seed: int) -> dict:
    model, params, optimizer, closure = setup(case, batch_file, seed)
    state = TrainingState(params, optimizer)
    param_bytes = tensor_bytes(params)
    state_bytes = optimizer_state_bytes(optimizer)
    results = {}
    for mode in ("plain",) + MODES[1:] + ("plain",):  # plain twice: first and last, to see the drift
        state.restore()
        rule = make_rule(mode, optimizer)
        measured = profiled_step(rule, closure)
        measured["rule_buffer_bytes"] = rule_buffers(rule)
        key = mode if mode not in results else "plain_again"
        results[key] = measured
        del rule
        print(f"  [{case}] profiler {key:<12} peak +{measured['peak_bytes'] / MiB:9.2f} MiB "
              f"(in {measured['peak_in']}), retained +{measured['retained_bytes'] / MiB:8.2f} MiB", flush=True)
    # What a closed gate keeps: the buffers of the active steps are never released.
    state.restore()
    rule = make_rule("gxpo", optimizer)
    rule.step(closure)
    rule.gate.is_open = False
    info = rule.step(closure)
    kept_after_shutoff = rule_buffers(rule) if not info.active else None
    del model
    return {"param_bytes": param_bytes, "optimizer_state_bytes": state_bytes,
            "largest_tensor_bytes": max(tensor_bytes([p]) for p in params),
            "trainable_params": sum(p.numel() for p in params), "trainable_tensors": len(params),
            "grad_bytes": tensor_bytes([p.grad for p in params if p.grad is not None]),
            "profiler": results, "buffers_kept_after_shutoff_bytes": kept_after_shutoff}


# ---------------------------------------------------------------------------------------------------
# Method 2: peak RSS in a fresh subprocess
# ---------------------------------------------------------------------------------------------------
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def child(case: str, mode: str, batch_file: Path, seed: int) -> dict:
    """One RSS measurement (run in a fresh process)."""
    try:  # transparent huge pages would make RSS move in 2 MiB steps
        ctypes.CDLL(None, use_errno=True).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
        thp_disabled = True
    except (OSError, AttributeError):
        thp_disabled = False
    _model, _params, optimizer, closure = setup(case, batch_file, seed)
    rule = make_rule(mode, optimizer)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = _status_kib("VmRSS")
    info = rule.step(closure)
    peak, end = _status_kib("VmHWM"), _status_kib("VmRSS")
    return {"case": case, "mode": mode, "rss_start_kib": start, "peak_above_start_bytes": (peak - start) * 1024,
            "retained_bytes": (end - start) * 1024, "active": info.active, "thp_disabled": thp_disabled,
            "rule_buffer_bytes": rule_buffers(rule)}


def rss_case(case: str, batch_file: Path, args) -> dict:
    out: dict[str, list[dict]] = {m: [] for m in MODES}
    env = dict(os.environ, **CHILD_ENV)
    for rep in range(args.rss_reps):
        for mode in MODES:
            command = [sys.executable, __file__, "--child", "--case", case, "--mode", mode, "--batch-file",
                       str(batch_file), "--seed", str(args.seed), "--threads", str(args.threads)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, check=False)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"child {case}/{mode} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
            row = json.loads(lines[-1])
            out[mode].append(row)
            print(f"  [{case}] rss rep {rep + 1} {mode:<8} peak +{row['peak_above_start_bytes'] / MiB:9.2f} MiB, "
                  f"retained +{row['retained_bytes'] / MiB:8.2f} MiB", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------
def measure(case: str, args, workdir: Path) -> dict:
    from gxpo_lib.rl.models import load_model

    model_name, _ = CASES[case]
    prompts, group, new_tokens = (args.prompts, args.group, args.new_tokens) if model_name == "tiny" else \
        (args.smollm2_prompts, args.smollm2_group, args.smollm2_new_tokens)
    batch_file = workdir / f"{model_name}-batch.pt"
    if not batch_file.exists():
        model, tokenizer = load_model(model_name, device="cpu")
        rollouts, advantages = make_rollouts(model, tokenizer, prompts, group, new_tokens, seed=args.seed)
        torch.save({"rollouts": rollouts, "advantages": advantages}, batch_file)
        del model
    print(f"\n[{case}] {prompts} prompts x {group} completions, max {new_tokens} new tokens", flush=True)
    result = {"case": case, "model": model_name, "mode": "lora" if CASES[case][1] else "full",
              **profiler_case(case, batch_file, args.seed)}
    batch = torch.load(batch_file, weights_only=False)["rollouts"]
    result.update(rows=len(batch.completions), sequence_length=batch.input_ids.shape[1])
    result["rss"] = None if args.no_rss else rss_case(case, batch_file, args)
    # The comparison: extra over a plain step, against the floor.
    floor = floors(result["param_bytes"], result["optimizer_state_bytes"])
    plain_prof = min(result["profiler"]["plain"]["peak_bytes"], result["profiler"]["plain_again"]["peak_bytes"])
    rows = {}
    for mode in MODES[1:]:
        extra_prof = result["profiler"][mode]["peak_bytes"] - plain_prof
        jump_peak = result["profiler"][mode].get("peak_by_part", {}).get("_jump")
        row = {"floor_bytes": floor[mode], "profiler_extra_bytes": extra_prof,
               # temporaries of the extrapolation on top of the buffers (and snapshot) live at that moment
               "jump_transient_bytes": None if jump_peak is None else jump_peak - floor[mode],
               "profiler_ratio": extra_prof / floor[mode], "peak_in": result["profiler"][mode]["peak_in"],
               "rule_buffer_bytes": result["profiler"][mode]["rule_buffer_bytes"]}
        if result["rss"]:
            plain_rss = min(r["peak_above_start_bytes"] for r in result["rss"]["plain"])
            extras = [r["peak_above_start_bytes"] - plain_rss for r in result["rss"][mode]]
            row.update(rss_extra_bytes=min(extras), rss_extra_all=extras, rss_ratio=min(extras) / floor[mode])
        rows[mode] = row
    result["extra"] = rows
    return result


def report(record: dict) -> None:
    rows = []
    for case in record["cases"]:
        for mode, r in case["extra"].items():
            rows.append({"case": case["case"], "rule": mode, "P": case["param_bytes"] / MiB,
                         "floor": r["floor_bytes"] / MiB, "prof": r["profiler_extra_bytes"] / MiB,
                         "pratio": r["profiler_ratio"], "rss": r.get("rss_extra_bytes", float("nan")) / MiB,
                         "rratio": r.get("rss_ratio"), "where": r["peak_in"],
                         "jump": None if r["jump_transient_bytes"] is None else r["jump_transient_bytes"] / MiB,
                         "largest": case["largest_tensor_bytes"] / MiB})
    print_table(rows, [("case", "case", ""), ("rule", "rule", ""), ("P", "P (MiB)", ".3f"),
                       ("floor", "floor (MiB)", ".3f"), ("prof", "extra, allocator (MiB)", ".3f"),
                       ("pratio", "extra/floor", ".3f"), ("rss", "extra, RSS (MiB)", ".2f"),
                       ("rratio", "RSS extra/floor", ".3f"), ("where", "peak during", ""),
                       ("jump", "jump temporaries (MiB)", ".2f"), ("largest", "largest tensor (MiB)", ".3f")],
                title="Peak extra memory of one step over a plain step (fresh rule, same start state)")
    rows = []
    for case in record["cases"]:
        prof = case["profiler"]
        rows.append({"case": case["case"], "params": case["trainable_params"], "tensors": case["trainable_tensors"],
                     "plain": prof["plain"]["peak_bytes"] / MiB, "plain2": prof["plain_again"]["peak_bytes"] / MiB,
                     "buffers": prof["gxpo"]["rule_buffer_bytes"] / MiB, "P3": 3 * case["param_bytes"] / MiB,
                     "state": case["optimizer_state_bytes"] / MiB,
                     "kept": (case["buffers_kept_after_shutoff_bytes"] or 0) / MiB})
    print_table(rows, [("case", "case", ""), ("params", "trainable", ",d"), ("tensors", "tensors", "d"),
                       ("plain", "plain peak (MiB)", ".2f"), ("plain2", "plain again", ".2f"),
                       ("buffers", "GXPO buffers (MiB)", ".3f"), ("P3", "3 x P (MiB)", ".3f"),
                       ("state", "AdamW state (MiB)", ".3f"), ("kept", "kept after shutoff (MiB)", ".3f")],
                title="Accounting (exact nbytes): the rule's persistent buffers; the plain step's own peak")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny full fine-tuning only (< 1 min)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None,
                        help="default: tiny-lora tiny-full smollm2-lora (+ smollm2-full with --smollm2-full)")
    parser.add_argument("--smollm2-full", action="store_true", help="also SmolLM2-135M full fine-tuning (~6 GB)")
    parser.add_argument("--no-smollm2", action="store_true", help="tiny cases only")
    parser.add_argument("--no-rss", action="store_true", help="skip the subprocess RSS cross-check")
    parser.add_argument("--rss-reps", type=int, default=1, help="fresh processes per (case, rule)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--smollm2-prompts", type=int, default=1)
    parser.add_argument("--smollm2-group", type=int, default=2)
    parser.add_argument("--smollm2-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="default bench/results/memory[_quick].json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet_transformers()
    setup_torch(args.threads, args.seed)
    if args.child:
        print(json.dumps(child(args.case, args.mode, Path(args.batch_file), args.seed)), flush=True)
        return
    if args.quick:
        args.prompts, args.group, args.new_tokens = 2, 4, 12
    cases = args.cases or (["tiny-full"] if args.quick else
                           ["tiny-lora", "tiny-full"] + ([] if args.no_smollm2 else ["smollm2-lora"])
                           + (["smollm2-full"] if args.smollm2_full else []))
    started = time.perf_counter()
    record = {"benchmark": "memory", "argv": sys.argv[1:], "settings": vars(args), "machine": machine_info(),
              "child_env": CHILD_ENV, "cases": []}
    with tempfile.TemporaryDirectory(prefix="gxpo-bench-memory-") as tmp:
        for case in cases:
            record["cases"].append(measure(case, args, Path(tmp)))
            finish_record(record, started)
            path = write_json(record, args.json, "memory_quick" if args.quick else "memory")
    report(record)
    print(f"\nwrote {path}  ({record['machine']['wall_seconds']} s)")


if __name__ == "__main__":
    main()
