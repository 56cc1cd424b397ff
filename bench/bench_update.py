"""What does GXPO's update cost? Times one rule step against plain steps on the same mini-batch.

Ratios, not seconds, are the result: every measurement is interleaved with its baseline in the same
process, many repetitions, medians. The floor for an active GXPO step is three backward passes, so the
headline is GXPO / (3 x plain) (target <= 1.10); SFPO against K+1 plain steps; the step after shutoff
against one plain step (target <= 1.02).

    python bench/bench_update.py [--model tiny|smollm2-135m] [--full] [--reps 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from gxpo_lib import GXPO, SFPO, PlainStep
from gxpo_lib.losses import group_advantages, grpo_objective
from gxpo_lib.models import apply_lora, format_prompt, load_model
from gxpo_lib.sampling import HFSampler, completion_logprobs
from gxpo_lib.task import load_split


def make_batch(model, tokenizer, prompts: int, group: int, new_tokens: int):
    """One real rollout batch from the model (fixed seed) and its advantages."""
    sampler = HFSampler(model, tokenizer, lambda t: format_prompt(t, tokenizer), max_new_tokens=new_tokens)
    rollouts = sampler.sample([p["prompt"] for p in load_split("train", limit=prompts)], group, seed=0)
    rewards = torch.rand(len(rollouts.completions), generator=torch.Generator().manual_seed(0)).round()
    return rollouts, group_advantages(rewards, group)


def closure_for(model, rollouts, advantages):
    def closure():
        logprobs = completion_logprobs(model, rollouts)
        loss, _ = grpo_objective(logprobs, rollouts.old_logprobs, advantages, rollouts.completion_mask)
        loss.backward()
        return loss
    return closure


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(model, rollouts, advantages, reps: int, lr: float) -> dict[str, float]:
    """Interleaved timings of each rule against its plain-step floor; returns median ratios."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    start_state = copy.deepcopy({id(p): p.detach().clone() for p in trainable})
    closure = closure_for(model, rollouts, advantages)

    def fresh(rule_factory):
        with torch.no_grad():
            for p in trainable:
                p.copy_(start_state[id(p)])
        return rule_factory(torch.optim.AdamW(trainable, lr=lr))

    gxpo = fresh(lambda opt: GXPO(opt, k=5, alpha=0.5, gate=None))
    sfpo = fresh(lambda opt: SFPO(opt, k=3, alpha=0.8, gate=None))
    closed = fresh(lambda opt: GXPO(opt, k=5, alpha=0.5, tau=1e-6, warmup=0))
    plain = fresh(lambda opt: PlainStep(opt))
    closed.step(closure)  # trips the gate: every later call is the post-shutoff path
    assert not closed.gate.is_open
    for rule in (gxpo, sfpo, plain):  # warm-up: allocate buffers and optimizer state
        rule.step(closure)

    samples = {"plain": [], "gxpo": [], "sfpo": [], "closed": []}
    for _ in range(reps):
        samples["plain"].append(timed(lambda: plain.step(closure)))
        samples["gxpo"].append(timed(lambda: gxpo.step(closure)))
        samples["plain"].append(timed(lambda: plain.step(closure)))
        samples["sfpo"].append(timed(lambda: sfpo.step(closure)))
        samples["plain"].append(timed(lambda: plain.step(closure)))
        samples["closed"].append(timed(lambda: closed.step(closure)))
    median = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "plain_s": median["plain"], "gxpo_s": median["gxpo"], "sfpo_s": median["sfpo"],
        "closed_s": median["closed"],
        "gxpo_over_3_plain": median["gxpo"] / (3 * median["plain"]),
        "sfpo_over_k_plus_1_plain": median["sfpo"] / (4 * median["plain"]),
        "closed_over_plain": median["closed"] / median["plain"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)

    model, tokenizer = load_model(args.model)
    rollouts, advantages = make_batch(model, tokenizer, args.prompts, args.group, args.new_tokens)
    model = model if args.full else apply_lora(model)
    result = {"model": args.model, "mode": "full" if args.full else "lora", "reps": args.reps,
              "rows": len(rollouts.completions), "torch_threads": torch.get_num_threads(),
              **measure(model, rollouts, advantages, args.reps, lr=1e-4)}
    print(f"{'measure':<28}{'value':>10}  target")
    for key, target in (("gxpo_over_3_plain", "<= 1.10"), ("sfpo_over_k_plus_1_plain", "~1"),
                        ("closed_over_plain", "<= 1.02")):
        print(f"{key:<28}{result[key]:>10.3f}  {target}")
    print(f"{'plain step (median, s)':<28}{result['plain_s']:>10.4f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
