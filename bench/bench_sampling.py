"""Rollout throughput: HFSampler against LeanSampler, side by side in one run.

For the tiny model (full fine-tuning, i.e. the bare model, and with LoRA adapters) and SmolLM2-135M (LoRA), at
batch sizes 8 to 64 rows (prompts x 8 completions each, as a GRPO step samples them), times ``sample`` of each
backend and reports

  * generated tok/s   completion tokens actually generated (up to and including EOS: the completion
                      mask's sum) per second of the whole ``sample`` call (for HF: generate + the sampling
                      policy's log-prob/entropy forward + tokenising/decoding; for lean: everything)
  * generate tok/s    (HF only) the same tokens per second of ``model.generate`` alone (a timing wrapper
                      on transformers' GenerationMixin.generate)
  * padded pos/s      (HF only) rows x decode steps per second of generate
  * lean / hf         the speed-up: the ratio of the two backends' tok/s within each repetition (the two
                      run back to back, their order alternating), median and bootstrap 95% interval

Both backends sample with the same seed (the same law, not the same tokens), so their token counts differ
a little; tok/s accounts for that. Batch sizes are interleaved, medians reported. SmolLM2 is slow on this
2-core CPU, so its batch sizes run until a time budget is spent (skipped sizes are listed). Target of
The target: lean >= 5x hf on the tiny model at batch 64, and no slower on SmolLM2.

    python bench/bench_sampling.py             # tiny, tiny-lora 8-64 (5 reps) + SmolLM2 (budgeted)
    python bench/bench_sampling.py --quick     # tiny only, 1 rep (< 1 min)
    python bench/bench_sampling.py --models tiny --batch-sizes 8 16 32 64 128 --reps 3
"""

from __future__ import annotations

import os

# Before torch is imported: passive OpenMP waiting (see _benchlib.py; an explicit setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
import time

from _benchlib import (
    bootstrap_median_ci,
    finish_record,
    machine_info,
    print_table,
    quiet_transformers,
    setup_torch,
    summary,
    write_json,
)

# Benchmark key -> (model to load, LoRA adapters on it)
MODELS = {"tiny": ("tiny", False), "tiny-lora": ("tiny", True), "smollm2": ("smollm2-135m", True)}
BACKENDS = ("hf", "lean")


class GenerateTimer:
    """Adds up the wall time of transformers' GenerationMixin.generate (installed at class level)."""

    def __init__(self):
        from transformers.generation.utils import GenerationMixin

        self.seconds = 0.0
        self.cls, self.original = GenerationMixin, GenerationMixin.generate
        timer = self

        def generate(model_self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return timer.original(model_self, *args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - start

        GenerationMixin.generate = generate

    def close(self):
        self.cls.generate = self.original


def make_samplers(key: str, new_tokens: int, backends: list[str]):
    """(tokenizer, {backend: sampler}) for one benchmark key, both samplers on the same model object."""
    from gxpo_lib.rl.lean_sampler import LeanSampler
    from gxpo_lib.rl.models import apply_lora, format_prompt, load_model
    from gxpo_lib.rl.sampling import HFSampler

    name, lora = MODELS[key]
    model, tokenizer = load_model(name, device="cpu")
    if lora:
        model = apply_lora(model)
    classes = {"hf": HFSampler, "lean": LeanSampler}
    samplers = {b: classes[b](model, tokenizer, lambda t: format_prompt(t, tokenizer), max_new_tokens=new_tokens)
                for b in backends}
    return tokenizer, samplers


def time_sample(sampler, prompts, group: int, seed: int, timer: GenerateTimer, eos_id: int) -> dict:
    """One timed ``sample`` call: tokens, seconds, tok/s (and generate-only figures for HF)."""
    gen_before = timer.seconds
    t0 = time.perf_counter()
    rollouts = sampler.sample(prompts, group, seed=seed)
    total = time.perf_counter() - t0
    generate = timer.seconds - gen_before
    mask = rollouts.completion_mask
    tokens = int(mask.sum())
    rows, width = rollouts.completion_ids.shape
    ended = int(((rollouts.completion_ids == eos_id) & mask.bool()).any(1).sum())
    row = {"rows": rows, "decode_steps": width, "tokens": tokens, "sample_s": total,
           "prompt_length": rollouts.prompt_ids.shape[1], "rows_ended_with_eos": ended, "tok_per_s": tokens / total}
    if generate > 0:
        row.update(generate_s=generate, gen_tok_per_s=tokens / generate, padded_pos_per_s=rows * width / generate,
                   outside_generate_frac=1 - generate / total)
    return row


def measure_model(key: str, args, timer: GenerateTimer) -> dict:
    from gxpo_lib.rl.arith_task import load_split

    big = key == "smollm2"
    new_tokens = args.smollm2_new_tokens if big else args.new_tokens
    reps = args.smollm2_reps if big else args.reps
    budget = args.smollm2_budget_s if big else None
    print(f"\n[{key}] loading {MODELS[key][0]} (LoRA: {MODELS[key][1]}); max {new_tokens} new tokens, "
          f"{args.group} completions per prompt; backends {args.backends}", flush=True)
    tokenizer, samplers = make_samplers(key, new_tokens, args.backends)
    problems = [p["prompt"] for p in load_split("train", limit=max(args.batch_sizes) // args.group + 1)]
    for sampler in samplers.values():
        sampler.sample(problems[:1], min(args.group, 2), seed=args.seed)  # warm-up (first-call allocations)

    samples: dict[tuple[str, int], list[dict]] = {(b, n): [] for b in args.backends for n in args.batch_sizes}
    ratios: dict[int, list[float]] = {n: [] for n in args.batch_sizes}
    skipped: list[int] = []
    started = time.perf_counter()
    seconds_per_row = None
    for rep in range(reps):
        sizes = args.batch_sizes[rep % len(args.batch_sizes):] + args.batch_sizes[:rep % len(args.batch_sizes)]
        if budget is not None:
            sizes = sorted(sizes)  # budgeted: small first, stop before what would overrun
        for batch in sizes:
            if batch in skipped:
                continue
            if budget is not None and seconds_per_row is not None:
                projected = seconds_per_row * batch
                if time.perf_counter() - started + projected > budget:
                    skipped.append(batch)
                    print(f"[{key}] skip batch {batch}: ~{projected:.0f}s projected, over the {budget:.0f}s budget",
                          flush=True)
                    continue
            prompts = problems[:max(1, batch // args.group)]
            group = batch // len(prompts)
            order = args.backends if rep % 2 == 0 else args.backends[::-1]  # alternate who runs first
            rows = {b: time_sample(samplers[b], prompts, group, args.seed, timer, tokenizer.eos_token_id)
                    for b in order}
            for b, row in rows.items():
                samples[(b, batch)].append(row)
            if len(rows) == 2:
                ratios[batch].append(rows["lean"]["tok_per_s"] / rows["hf"]["tok_per_s"])
            seconds_per_row = max(seconds_per_row or 0.0, sum(r["sample_s"] for r in rows.values()) / batch)
            print(f"[{key}] rep {rep + 1} batch {batch:>3}: " + "  ".join(
                f"{b} {r['tokens']:>5} tok in {r['sample_s']:6.2f}s -> {r['tok_per_s']:8.1f} tok/s"
                for b, r in rows.items()), flush=True)
    results = []
    for (backend, batch), rows in samples.items():
        if not rows:
            continue
        keys = [k for k in ("tok_per_s", "gen_tok_per_s", "padded_pos_per_s", "sample_s", "generate_s",
                            "outside_generate_frac") if k in rows[0]]
        entry = {"backend": backend, "batch": batch, "reps": len(rows), "tokens": rows[0]["tokens"],
                 "decode_steps": rows[0]["decode_steps"], "prompt_length": rows[0]["prompt_length"],
                 "rows_ended_with_eos": rows[0]["rows_ended_with_eos"],
                 **{k: summary([r[k] for r in rows]) for k in keys}}
        if backend == "lean" and ratios[batch]:
            entry["speedup_vs_hf"] = {**summary(ratios[batch]), "ci95": bootstrap_median_ci(ratios[batch])}
        results.append(entry)
    return {"model": MODELS[key][0], "key": key, "lora": MODELS[key][1], "max_new_tokens": new_tokens,
            "group": args.group, "batches": results, "skipped_batches": skipped, "eos_token": tokenizer.eos_token,
            "eos_token_id": tokenizer.eos_token_id,
            "example_completions": {b: s.sample(problems[:1], 2, seed=args.seed).completions
                                    for b, s in samplers.items()},
            "measure_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny only, 1 rep, 12 new tokens (< 1 min)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                        help="default: tiny tiny-lora smollm2")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--group", type=int, default=8, help="completions per prompt (rows = prompts x group)")
    parser.add_argument("--new-tokens", type=int, default=24, help="tiny: max new tokens")
    parser.add_argument("--smollm2-new-tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5, help="tiny: repetitions per batch size")
    parser.add_argument("--smollm2-reps", type=int, default=1)
    parser.add_argument("--smollm2-budget-s", type=float, default=200.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="default bench/results/sampling[_quick].json")
    args = parser.parse_args()
    if args.quick:
        args.models = args.models or ["tiny"]
        args.reps, args.new_tokens = 1, 12
    models = args.models or list(MODELS)
    quiet_transformers()
    setup_torch(args.threads, args.seed)
    timer = GenerateTimer()
    started = time.perf_counter()
    record = {"benchmark": "sampling", "argv": sys.argv[1:], "settings": vars(args), "machine": machine_info(),
              "models": []}
    try:
        for key in models:
            record["models"].append(measure_model(key, args, timer))
            finish_record(record, started)
            path = write_json(record, args.json, "sampling_quick" if args.quick else "sampling")
    finally:
        timer.close()
    rows = []
    for m in record["models"]:
        for b in m["batches"]:
            speedup = b.get("speedup_vs_hf")
            rows.append({"model": m["key"], "backend": b["backend"], "batch": b["batch"], "reps": b["reps"],
                         "new": m["max_new_tokens"], "decode_steps": b["decode_steps"], "tokens": b["tokens"],
                         "sample_s": b["sample_s"]["median"], "tps": b["tok_per_s"]["median"],
                         "tps_iqr": b["tok_per_s"]["iqr"],
                         "gtps": b["gen_tok_per_s"]["median"] if "gen_tok_per_s" in b else None,
                         "outside": (b["outside_generate_frac"]["median"] * 100
                                     if "outside_generate_frac" in b else None),
                         "speedup": speedup["median"] if speedup else None,
                         "ci": "[{:.2f}, {:.2f}]".format(*speedup["ci95"]) if speedup else None})
    print_table(rows, [("model", "model", ""), ("backend", "backend", ""), ("batch", "rows", "d"),
                       ("reps", "reps", "d"), ("new", "max new", "d"), ("decode_steps", "decode steps", "d"),
                       ("tokens", "tokens", "d"), ("sample_s", "sample s", ".3f"), ("tps", "generated tok/s", ".1f"),
                       ("tps_iqr", "IQR", ".1f"), ("gtps", "generate-only tok/s", ".1f"),
                       ("outside", "% outside generate", ".1f"), ("speedup", "lean / hf", ".2f"),
                       ("ci", "95% CI", "")],
                title=f"Sampling throughput, HFSampler vs LeanSampler ({args.threads} thread(s); medians; "
                      f"load {record['machine'].get('loadavg_start')} -> {record['machine'].get('loadavg_end')})")
    for m in record["models"]:
        if m["skipped_batches"]:
            print(f"{m['key']}: skipped batch sizes {m['skipped_batches']} (time budget)")
        print(f"{m['key']}: eos token {m['eos_token']!r} (id {m['eos_token_id']}); example completions "
              f"{ {b: c[0] for b, c in m['example_completions'].items()} !r}")
    print(f"\nwrote {path}  ({record['machine']['wall_seconds']} s)")


if __name__ == "__main__":
    main()
