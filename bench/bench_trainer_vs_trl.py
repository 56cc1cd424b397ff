"""Our trainer's GRPO step vs TRL's GRPOTrainer on the same model and batch.

Contenders, each a real training run of a few steps on the shipped tiny model (LoRA by default; --full for
full fine-tuning), same batch (prompts x group size), same completion cap, HF ``generate`` in both, same
optimizer (AdamW, constant LR, clip 1.0), same reward (gxpo_lib's math reward), one update per batch:

  * ours      gxpo_lib.rl.trainer.train(TrainConfig(algorithm="grpo"))   (old_logprobs="sampler", the default)
  * ours-fp   the same with old_logprobs="first_pass" (TRL's shortcut: no separate old-log-prob forward)
  * trl       trl.GRPOTrainer (vanilla; bnpo = our token_mean loss, beta 0)
  * gxpo-trl  gxpo_lib.integrations.trl.GXPOTrainer(algorithm="grpo")  (ours inside TRL; --no-gxpo-trainer skips)

Target: ours no slower than TRL, i.e. ours / trl <= 1.00 per step (wall clock), reported per phase where
the two can be split; for both of our variants, the verdict is read on ours-fp, which does TRL's work:

  * rollout  ours: HFSampler.sample (generate + the sampling policy's log-probs and entropy) + rewards;
             TRL: _generate_and_score_completions (generate, rewards, advantages)
  * generate model.generate alone (a timing wrapper on transformers' GenerationMixin.generate, both sides)
  * rollout rest  rollout - generate - rewards (ours: mostly the sampling policy's log-prob forward)
  * update   ours: advantages + forward/backward + clip + AdamW step; TRL: the rest of the step
             (compute_loss + backward, clip, optimizer, scheduler)
  * wall     one whole loop iteration, from the end of the previous step to the end of this one
             (ours: between metrics rows; TRL: between on_step_end callbacks) -- logging included

Method: runs alternate in the same process (the order rotates every round), each run a fresh model and
trainer; the first step of every run is a warm-up and is dropped. Medians over the pooled steps with a
bootstrap 95% interval of the ratio of medians, and the per-round ratios. Work done differs in one known
way for "ours": by default our sampler computes the sampling policy's log-probs (one extra no-grad forward,
as the authors' verl code does); TRL skips it for a single-iteration GRPO step, and so does ours-fp, which
takes them from its first backward pass. Completion lengths are reported, since generation time follows
the longest completion of the batch.

    python bench/bench_trainer_vs_trl.py              # ~5 min
    python bench/bench_trainer_vs_trl.py --quick      # < 1 min
    python bench/bench_trainer_vs_trl.py --full --rounds 4 --steps 6
"""

from __future__ import annotations

import os

# Before torch is imported: passive OpenMP waiting (see _benchlib.py; an explicit setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import itertools
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _benchlib import (
    finish_record,
    machine_info,
    print_table,
    quiet_transformers,
    setup_torch,
    summary,
    write_json,
)

PHASES = ("wall", "rollout", "generate", "rewards", "rollout_rest", "update", "other")


# ---------------------------------------------------------------------------------------------------
# Timing hooks
# ---------------------------------------------------------------------------------------------------
class GenerateTimer:
    """Wraps transformers' GenerationMixin.generate (class level) to add up its time and decode steps."""

    def __init__(self):
        self.seconds = 0.0
        self.decode_steps = 0
        self.calls = 0

    def install(self):
        from transformers.generation.utils import GenerationMixin

        original = GenerationMixin.generate
        timer = self

        def generate(model_self, *args, **kwargs):
            start = time.perf_counter()
            out = original(model_self, *args, **kwargs)
            timer.seconds += time.perf_counter() - start
            timer.calls += 1
            ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
            sequences = out.sequences if hasattr(out, "sequences") else out
            if ids is not None and torch.is_tensor(sequences):
                timer.decode_steps += sequences.shape[1] - ids.shape[1]
            return out

        GenerationMixin.generate = generate
        self._restore = (GenerationMixin, original)

    def snapshot(self) -> tuple[float, int]:
        return self.seconds, self.decode_steps

    def uninstall(self):
        cls, original = self._restore
        cls.generate = original


GEN = GenerateTimer()


def train_config(args, seed: int, old_logprobs: str = "sampler"):
    from gxpo_lib.rl.trainer import TrainConfig

    return TrainConfig(algorithm="grpo", model="tiny", lora=not args.full, lr=args.lr, old_logprobs=old_logprobs,
                       batch_prompts=args.prompts, group_size=args.group, max_new_tokens=args.new_tokens,
                       steps=args.steps, eval_every=10**6, eval_problems=1, eval_samples=1,
                       checkpoint_every=10**6, seed=seed)


# ---------------------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------------------
def run_ours(args, seed: int, workdir: Path, old_logprobs: str = "sampler") -> list[dict]:
    from gxpo_lib.rl.models import load_model
    from gxpo_lib.rl.trainer import train

    marks: list[tuple[float, dict, tuple[float, int]]] = []

    def callback(row):
        marks.append((time.perf_counter(), dict(row, threads=torch.get_num_threads()), GEN.snapshot()))

    train(train_config(args, seed, old_logprobs), workdir, callbacks=[callback], progress=False,
          model_and_tokenizer=load_model("tiny", device="cpu"))
    steps = []
    for (t_prev, prev, g_prev), (t, row, g) in itertools.pairwise(marks):
        if row.get("kind") != "train":
            continue
        sampling = row["seconds_sampling"] - prev["seconds_sampling"]
        scoring = row["seconds_scoring"] - prev["seconds_scoring"]
        update = row["seconds_update"] - prev["seconds_update"]
        wall = t - t_prev
        steps.append({"step": row["step"], "wall": wall, "rollout": sampling + scoring, "generate": g[0] - g_prev[0],
                      "rewards": scoring, "update": update, "other": wall - sampling - scoring - update,
                      "decode_steps": g[1] - g_prev[1], "completion_length": row["response_length"],
                      "reward_mean": row["reward_mean"], "threads": row["threads"]})
    return _with_rest(steps)


def _with_rest(steps: list[dict]) -> list[dict]:
    """rollout_rest = rollout - generate - rewards (ours: the sampling policy's log-prob forward, decoding)."""
    for row in steps:
        row["rollout_rest"] = row["rollout"] - row["generate"] - row["rewards"]
    return steps


def _trl_values(args, seed: int, workdir: Path) -> dict:
    """GRPOConfig settings equivalent to train_config (what grpo_config_from_train_config maps)."""
    return dict(output_dir=str(workdir), per_device_train_batch_size=args.prompts * args.group,
                num_generations=args.group, max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0,
                top_k=0, learning_rate=args.lr, weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch",
                lr_scheduler_type="constant", loss_type="bnpo", epsilon=0.2, scale_rewards="group", beta=0.0,
                max_steps=args.steps, seed=seed, save_strategy="no", logging_steps=1, report_to="none",
                disable_tqdm=True, bf16=False, use_cpu=True, gradient_accumulation_steps=1, log_completions=False,
                # TRL defaults to gradient checkpointing (a second forward inside backward); our trainer does
                # not checkpoint, so it is off unless asked for (--trl-gradient-checkpointing).
                gradient_checkpointing=args.trl_gradient_checkpointing)


def run_trl(args, seed: int, workdir: Path, gxpo_trainer: bool) -> list[dict]:
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from gxpo_lib.integrations.trl import GXPOConfig, GXPOTrainer
    from gxpo_lib.integrations.trl_run import build_dataset, math_reward_func
    from gxpo_lib.rl.models import load_model

    base = GXPOTrainer if gxpo_trainer else GRPOTrainer

    class Timed(base):
        def _generate_and_score_completions(self, inputs):
            start = time.perf_counter()
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self.bench_rollout += time.perf_counter() - start

        def _calculate_rewards(self, *a, **k):
            start = time.perf_counter()
            try:
                return super()._calculate_rewards(*a, **k)
            finally:
                self.bench_rewards += time.perf_counter() - start

    marks: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, targs, state, control, **kwargs):
            t = time.perf_counter()
            marks.append({"t": t, "begin": self.begin, "rollout": trainer.bench_rollout,
                          "rewards": trainer.bench_rewards, "gen": GEN.snapshot(), "step": state.global_step,
                          "threads": torch.get_num_threads()})

    config = train_config(args, seed)
    model, tokenizer = load_model("tiny", device="cpu")
    values = _trl_values(args, seed, workdir)
    if gxpo_trainer:
        targs = GXPOConfig(**values, algorithm="grpo", gxpo_metrics_file="")
    else:
        targs = GRPOConfig(**values)
    peft_config = None if args.full else LoraConfig(
        r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0, target_modules=list(config.lora_targets),
        task_type="CAUSAL_LM")
    trainer = Timed(model=model, reward_funcs=math_reward_func, args=targs,
                    train_dataset=build_dataset(config, tokenizer), processing_class=tokenizer, peft_config=peft_config)
    trainer.bench_rollout = trainer.bench_rewards = 0.0
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    start_mark = {"t": None, "rollout": 0.0, "rewards": 0.0, "gen": GEN.snapshot()}
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    steps = []
    for i, (prev, m) in enumerate(zip([start_mark] + marks, marks)):
        rollout = m["rollout"] - prev["rollout"]
        inside = m["t"] - m["begin"]
        wall = m["t"] - (prev["t"] if prev["t"] is not None else m["begin"])
        steps.append({"step": m["step"], "wall": wall, "rollout": rollout, "generate": m["gen"][0] - prev["gen"][0],
                      "rewards": m["rewards"] - prev["rewards"], "update": inside - rollout,
                      "other": wall - inside, "decode_steps": m["gen"][1] - prev["gen"][1],
                      "completion_length": lengths[i] if i < len(lengths) else None, "threads": m["threads"]})
    return _with_rest(steps)


# ---------------------------------------------------------------------------------------------------
def _compare(record: dict, steps: dict, mine: str, other: str, phase: str, args) -> dict:
    """Median ratio mine / other for one phase, its bootstrap interval and the per-round ratios."""
    ours = [r[phase] for r in steps[mine]]
    theirs = [r[phase] for r in steps[other]]
    ratio = statistics.median(ours) / statistics.median(theirs) if theirs and statistics.median(theirs) else None
    per_round = []
    for round_index in range(args.rounds):
        o = [r[phase] for run in record["runs"] if run["round"] == round_index and run["contender"] == mine
             for r in run["steps"][1:]]
        t = [r[phase] for run in record["runs"] if run["round"] == round_index and run["contender"] == other
             for r in run["steps"][1:]]
        if o and t and statistics.median(t):
            per_round.append(statistics.median(o) / statistics.median(t))
    return {"ratio": ratio, "ci95": list(ratio_ci(ours, theirs, args.seed)), "per_round": per_round}


def _verdict(wall: dict) -> str:
    """pass / FAIL against 1.00, confident when the interval excludes 1."""
    passed = wall["ratio"] <= 1.0
    confident = wall["ci95"][1] <= 1.0 if passed else wall["ci95"][0] > 1.0
    return ("pass" if passed else "FAIL") + (" (confident)" if confident else " (within noise)")


def ratio_ci(ours: list[float], theirs: list[float], seed: int, resamples: int = 2000) -> tuple[float, float]:
    """Bootstrap 95% interval of median(ours) / median(theirs), each sample resampled on its own."""
    if len(ours) < 3 or len(theirs) < 3:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    values = sorted(statistics.median(rng.choices(ours, k=len(ours)))
                    / statistics.median(rng.choices(theirs, k=len(theirs))) for _ in range(resamples))
    return values[int(0.025 * resamples)], values[int(0.975 * resamples) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batch, 1 round of 3 steps (< 1 min)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--steps", type=int, default=6, help="steps per run (the first is dropped)")
    parser.add_argument("--rounds", type=int, default=6, help="alternations of the contenders")
    parser.add_argument("--no-gxpo-trainer", action="store_true", help="skip the GXPOTrainer(algorithm=grpo) runs")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="TRL's own default (gradient_checkpointing=True) for the trl and gxpo-trl runs")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="default bench/results/trainer_vs_trl[_quick].json")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.group, args.new_tokens, args.steps, args.rounds = 2, 4, 12, 3, 1
    quiet_transformers()
    setup_torch(args.threads, args.seed)
    GEN.install()
    ours_variants = {"ours": "sampler", "ours-fp": "first_pass"}
    theirs = ["trl"] + ([] if args.no_gxpo_trainer else ["gxpo-trl"])
    contenders = [*ours_variants, *theirs]
    started = time.perf_counter()
    record = {"benchmark": "trainer_vs_trl", "argv": sys.argv[1:], "settings": vars(args), "machine": machine_info(),
              "runs": []}
    steps: dict[str, list[dict]] = {c: [] for c in contenders}
    for round_index in range(args.rounds):
        order = contenders[round_index % len(contenders):] + contenders[:round_index % len(contenders)]
        for name in order:
            workdir = Path(tempfile.mkdtemp(prefix=f"gxpo-bench-{name}-"))
            seed = args.seed + round_index
            t0 = time.perf_counter()
            try:
                if name in ours_variants:
                    rows = run_ours(args, seed, workdir, ours_variants[name])
                else:
                    rows = run_trl(args, seed, workdir, gxpo_trainer=name == "gxpo-trl")
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            torch.set_num_threads(args.threads)  # a trainer may have changed it
            kept = rows[1:]  # the first step of a run is a warm-up
            steps[name] += kept
            record["runs"].append({"round": round_index, "contender": name, "seed": seed, "steps": rows,
                                   "run_seconds": time.perf_counter() - t0})
            print(f"round {round_index + 1}/{args.rounds} {name:<8} steps: "
                  + " ".join(f"{r['wall']:.2f}s" for r in rows) + f"   (run {time.perf_counter() - t0:.0f}s)",
                  flush=True)
    GEN.uninstall()

    table = {}
    for name in contenders:
        table[name] = {phase: summary([r[phase] for r in steps[name]]) for phase in PHASES}
        table[name]["decode_steps"] = summary([r["decode_steps"] for r in steps[name]])
        table[name]["completion_length"] = summary([r["completion_length"] for r in steps[name]
                                                    if r["completion_length"] is not None])
    comparisons = {}
    for mine, other in itertools.product(ours_variants, theirs):
        for phase in PHASES[:6]:
            comparisons[f"{mine}/{other}:{phase}"] = _compare(record, steps, mine, other, phase, args)
    verdicts = {mine: _verdict(comparisons[f"{mine}/trl:wall"]) for mine in ours_variants}
    record.update(per_step=table, comparisons=comparisons, target="ours-fp/trl wall <= 1.00",
                  verdict=verdicts["ours-fp"], verdicts=verdicts)
    finish_record(record, started)
    path = write_json(record, args.json, "trainer_vs_trl_quick" if args.quick else "trainer_vs_trl")

    rows = [{"who": name, "n": table[name]["wall"]["n"],
             **{phase: table[name][phase]["median"] for phase in PHASES},
             "iqr": table[name]["wall"]["iqr"], "decode": table[name]["decode_steps"]["median"],
             "length": table[name]["completion_length"]["median"]} for name in contenders]
    print_table(rows, [("who", "contender", ""), ("n", "steps", "d"), ("wall", "wall s", ".3f"),
                       ("iqr", "wall IQR", ".3f"), ("rollout", "rollout s", ".3f"), ("generate", "generate s", ".3f"),
                       ("rewards", "rewards s", ".4f"),
                       ("rollout_rest", "rollout rest s", ".3f"), ("update", "update s", ".3f"),
                       ("other", "loop other s", ".3f"),
                       ("decode", "decode steps", ".0f"), ("length", "mean completion", ".1f")],
                title=f"Per-step medians: tiny model ({'full' if args.full else 'LoRA'}), {args.prompts} prompts x "
                      f"{args.group}, max {args.new_tokens} new tokens, {args.threads} thread(s)")
    rows = [{"cmp": key, "ratio": c["ratio"], "ci": f"{c['ci95'][0]:.3f}-{c['ci95'][1]:.3f}",
             "rounds": " ".join(f"{x:.2f}" for x in c["per_round"])} for key, c in comparisons.items()]
    print_table(rows, [("cmp", "ratio (ours / other): phase", ""), ("ratio", "median ratio", ".3f"),
                       ("ci", "95% CI", ""), ("rounds", "per round", "")],
                title="Ratios (< 1: ours faster)")
    print(f"\ntarget ours/trl wall <= 1.00 (same work: ours-fp): {verdicts['ours-fp']}; "
          f"default ours (one extra forward): {verdicts['ours']}")
    print(f"wrote {path}  ({record['machine']['wall_seconds']} s)")


if __name__ == "__main__":
    main()
