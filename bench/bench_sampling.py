"""Rollout throughput of HFSampler: completion tokens generated per second (issue 6, benchmark 4).

For the tiny model and SmolLM2-135M, at batch sizes 8 to 64 rows (prompts x 8 completions each, as a
GRPO step samples them), times ``HFSampler.sample`` and reports

  * generated tok/s   completion tokens actually generated (up to and including EOS: the completion
                      mask's sum) per second of the whole ``sample`` call (generate + the sampling
                      policy's log-prob/entropy forward + tokenising/decoding)
  * generate tok/s    the same tokens per second of ``model.generate`` alone (a timing wrapper on
                      transformers' GenerationMixin.generate)
  * padded pos/s      rows x decode steps per second of generate: the positions the model computed
                      (generate runs until the longest completion of the batch ends)

and the share of ``sample`` spent outside ``generate`` (the extra forward that records old log-probs).
There is no pass/fail target: this is a throughput profile. Every batch size is repeated with the same
seed (same tokens, same work), batch sizes interleaved, medians reported. SmolLM2 is slow on this 2-core
CPU, so its batch sizes run until a time budget is spent (skipped sizes are listed).

    python bench/bench_sampling.py             # tiny 8-64 (5 reps) + SmolLM2 8-64 (budgeted), ~5 min
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
    finish_record,
    machine_info,
    print_table,
    quiet_transformers,
    setup_torch,
    summary,
    write_json,
)

MODELS = {"tiny": "tiny", "smollm2": "smollm2-135m"}


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


def measure_model(key: str, args, timer: GenerateTimer) -> dict:
    from gxpo_lib.models import format_prompt, load_model
    from gxpo_lib.sampling import HFSampler
    from gxpo_lib.task import load_split

    name = MODELS[key]
    new_tokens = args.new_tokens if key == "tiny" else args.smollm2_new_tokens
    reps = args.reps if key == "tiny" else args.smollm2_reps
    budget = None if key == "tiny" else args.smollm2_budget_s
    print(f"\n[{key}] loading {name}; max {new_tokens} new tokens, {args.group} completions per prompt", flush=True)
    model, tokenizer = load_model(name, device="cpu")
    sampler = HFSampler(model, tokenizer, lambda t: format_prompt(t, tokenizer), max_new_tokens=new_tokens)
    problems = [p["prompt"] for p in load_split("train", limit=max(args.batch_sizes) // args.group + 1)]
    sampler.sample(problems[:1], min(args.group, 2), seed=args.seed)  # warm-up (first-call allocations)

    samples: dict[int, list[dict]] = {b: [] for b in args.batch_sizes}
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
            gen_before = timer.seconds
            t0 = time.perf_counter()
            rollouts = sampler.sample(prompts, group, seed=args.seed)
            total = time.perf_counter() - t0
            generate = timer.seconds - gen_before
            mask = rollouts.completion_mask
            tokens = int(mask.sum())
            rows, width = rollouts.completion_ids.shape
            ended = int(((rollouts.completion_ids == tokenizer.eos_token_id) & mask.bool()).any(1).sum())
            row = {"rows": rows, "decode_steps": width, "tokens": tokens, "sample_s": total, "generate_s": generate,
                   "prompt_length": rollouts.prompt_ids.shape[1], "rows_ended_with_eos": ended,
                   "tok_per_s": tokens / total, "gen_tok_per_s": tokens / generate,
                   "padded_pos_per_s": rows * width / generate, "outside_generate_frac": 1 - generate / total}
            samples[batch].append(row)
            seconds_per_row = max(seconds_per_row or 0.0, total / rows)
            print(f"[{key}] rep {rep + 1} batch {batch:>3}: {tokens:>5} tokens in {total:6.2f}s "
                  f"(generate {generate:6.2f}s) -> {row['tok_per_s']:8.1f} tok/s", flush=True)
    example = sampler.sample(problems[:1], 2, seed=args.seed).completions
    results = []
    for batch, rows in samples.items():
        if not rows:
            continue
        med = {k: summary([r[k] for r in rows]) for k in ("tok_per_s", "gen_tok_per_s", "padded_pos_per_s",
                                                           "sample_s", "generate_s", "outside_generate_frac")}
        results.append({"batch": batch, "reps": len(rows), "tokens": rows[0]["tokens"],
                        "decode_steps": rows[0]["decode_steps"], "prompt_length": rows[0]["prompt_length"],
                        "rows_ended_with_eos": rows[0]["rows_ended_with_eos"], **{k: v for k, v in med.items()}})
    return {"model": name, "max_new_tokens": new_tokens, "group": args.group, "batches": results,
            "skipped_batches": skipped, "eos_token": tokenizer.eos_token, "eos_token_id": tokenizer.eos_token_id,
            "generation_config_eos_token_id": model.generation_config.eos_token_id,
            "example_completions": example, "measure_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny only, 1 rep, 12 new tokens (< 1 min)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None, help="default: tiny smollm2")
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
    models = args.models or ["tiny", "smollm2"]
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
    rows = [{"model": m["model"], "new": m["max_new_tokens"], **b, "tps": b["tok_per_s"]["median"],
             "tps_iqr": b["tok_per_s"]["iqr"], "gtps": b["gen_tok_per_s"]["median"],
             "pps": b["padded_pos_per_s"]["median"], "outside": b["outside_generate_frac"]["median"] * 100,
             "sample_s": b["sample_s"]["median"]}
            for m in record["models"] for b in m["batches"]]
    print_table(rows, [("model", "model", ""), ("batch", "rows", "d"), ("reps", "reps", "d"), ("new", "max new", "d"),
                       ("decode_steps", "decode steps", "d"), ("tokens", "tokens", "d"),
                       ("sample_s", "sample s", ".2f"), ("tps", "generated tok/s", ".1f"), ("tps_iqr", "IQR", ".1f"),
                       ("gtps", "generate-only tok/s", ".1f"), ("pps", "padded pos/s", ".1f"),
                       ("outside", "% outside generate", ".1f")],
                title=f"HFSampler throughput ({args.threads} thread(s); medians)")
    for m in record["models"]:
        if m["skipped_batches"]:
            print(f"{m['model']}: skipped batch sizes {m['skipped_batches']} (time budget)")
        print(f"{m['model']}: eos token {m['eos_token']!r} (id {m['eos_token_id']}), generation_config eos id "
              f"{m['generation_config_eos_token_id']}; example completion {m['example_completions'][0]!r}")
    print(f"\nwrote {path}  ({record['machine']['wall_seconds']} s)")


if __name__ == "__main__":
    main()
