"""Per-answer cost of the math reward: the old path (plain math-verify) against the grader.

The old path is what ``score_pair`` did before the grading layer: the gold wrapped in a box and parsed,
the last box of the completion (else the whole completion) parsed, ``verify(gold, pred)``; here it is
rebuilt from math-verify directly. The new path is ``gxpo_lib.rl.rewards.score_pair`` with the problem text.
Both run in this process (math-verify's signal timeouts active), on two input sets:

  * ``grader-set``  the labelled cases of tests/fixtures/grader/cases.jsonl (varied forms, sets, units)
  * ``tiny-task``   completions of the synthetic arithmetic task (``\\boxed{N}`` right, wrong, or missing)
  * ``hostile``     100 adversarial completions of tests/test_hostile_rewards.py (huge LaTeX, unbalanced
                    braces, nested fractions, exponent towers, random bytes); one repetition, it is slow

For each set the two paths run in alternating order, ``--reps`` times over the whole set, and per-answer
milliseconds are the median over repetitions of (set time / set size); ``new/old`` is the ratio within
each repetition (median and bootstrap 95% interval). The machine is shared, so only the ratio matters.

    python bench/bench_rewards.py            # 5 reps, writes bench/results/rewards.json
    python bench/bench_rewards.py --quick    # 1 rep, bench/results/rewards_quick.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import time
from collections import Counter
from pathlib import Path

from _benchlib import REPO, bootstrap_median_ci, finish_record, machine_info, print_table, summary, write_json
from math_verify import parse, verify

from gxpo_lib.rl.arith_task import generate_problems
from gxpo_lib.rl.rewards import GOLD_CONFIG, MAX_PARSE_CHARS, PRED_CONFIG, last_boxed, score_pair

CASES = REPO / "tests" / "fixtures" / "grader" / "cases.jsonl"


def old_score(completion: str, gold: str) -> float:
    """The pre-grader protocol: math-verify alone, gold first, last box or the whole completion."""
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", list(GOLD_CONFIG), parsing_timeout=3)
        box = last_boxed(completion)
        if box is not None and len(box) > MAX_PARSE_CHARS:
            return 0.0
        text = completion[-MAX_PARSE_CHARS:] if box is None else f"\\boxed{{{box}}}"
        pred_parsed = parse(text, list(PRED_CONFIG), parsing_timeout=3)
        return float(bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=3)))
    except Exception:
        return 0.0


def new_score(completion: str, gold: str, problem: str | None) -> float:
    return score_pair(completion, gold, problem=problem)[0]


def grader_set() -> list[tuple[str, str, str | None, object]]:
    rows = [json.loads(line) for line in CASES.read_text(encoding="utf-8").splitlines()]
    return [(r["completion"], r["gold"], r["problem"], r["label"]) for r in rows]


def tiny_task_set(n: int = 300, seed: int = 0) -> list[tuple[str, str, str | None, object]]:
    """Completions as the tiny model writes them: the target, an off-by-one box, no box, a cut-off box."""
    rng = random.Random(seed)
    items = []
    for p in generate_problems(n, seed=seed):
        kind = rng.random()
        if kind < 0.5:
            text, label = p.solution, 1
        elif kind < 0.8:
            text, label = p.solution.rsplit("\\boxed", 1)[0] + f"\\boxed{{{int(p.answer) + 1}}}", 0
        elif kind < 0.9:
            text, label = p.solution.rsplit("\\boxed", 1)[0], "?"
        else:
            text, label = p.solution[: max(1, len(p.solution) - 2)], "?"
        items.append((text, p.answer, p.prompt, label))
    return items


def hostile_set(n: int = 100) -> list[tuple[str, str, str | None, object]]:
    """The hostile completions of the hostile-input test (gold "1"; not labelled)."""
    spec = importlib.util.spec_from_file_location("hostile", REPO / "tests" / "test_hostile_rewards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [(text, "1", "What is 1?", "?") for _, text in module.hostile_completions(n)]


def time_path(items, new: bool) -> tuple[float, list[float]]:
    """Seconds for the whole set and the rewards."""
    start = time.perf_counter()
    rewards = [new_score(c, g, p) if new else old_score(c, g) for c, g, p, _ in items]
    return time.perf_counter() - start, rewards


def agreement(items, rewards) -> dict[str, float | int]:
    scored = [(r, lab) for r, (_, _, _, lab) in zip(rewards, items) if lab in (0, 1)]
    return {"n_scored": len(scored),
            "agree": sum(r == lab for r, lab in scored) / len(scored) if scored else float("nan"),
            "false_positives": sum(r == 1.0 and lab == 0 for r, lab in scored)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 repetition")
    parser.add_argument("--json", default=None, help="output path (default bench/results/rewards[_quick].json)")
    args = parser.parse_args()
    reps = 1 if args.quick else args.reps
    if reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}")
    started = time.perf_counter()
    record = {"benchmark": "rewards", "reps": reps, "machine": machine_info(), "sets": {}}
    old_score("\\boxed{1}", "1"), new_score("\\boxed{1}", "1", None)  # warm math-verify and sympy
    rows = []
    for name, items in (("grader-set", grader_set()), ("tiny-task", tiny_task_set()), ("hostile", hostile_set())):
        times = {"old": [], "new": []}
        rewards = {}
        for rep in range(1 if name == "hostile" else reps):
            for path in (("old", "new") if rep % 2 == 0 else ("new", "old")):
                seconds, rewards[path] = time_path(items, path == "new")
                times[path].append(seconds / len(items) * 1000)
        ratios = [n / o for n, o in zip(times["new"], times["old"])]
        entry = {"n": len(items), "old_ms": summary(times["old"]), "new_ms": summary(times["new"]),
                 "ratio": summary(ratios), "ratio_ci95": bootstrap_median_ci(ratios),
                 "old_agreement": agreement(items, rewards["old"]), "new_agreement": agreement(items, rewards["new"]),
                 "old_vs_new_rewards": {f"{o}->{n}": k for (o, n), k in
                                        Counter(zip(rewards["old"], rewards["new"])).items()}}
        record["sets"][name] = entry
        rows.append({"set": name, "n": len(items), "old": entry["old_ms"]["median"], "new": entry["new_ms"]["median"],
                     "ratio": entry["ratio"]["median"], "lo": entry["ratio_ci95"][0], "hi": entry["ratio_ci95"][1],
                     "agree_old": entry["old_agreement"]["agree"], "agree_new": entry["new_agreement"]["agree"],
                     "fp_old": entry["old_agreement"]["false_positives"],
                     "fp_new": entry["new_agreement"]["false_positives"]})
    print_table(rows, [("set", "set", ""), ("n", "n", "d"), ("old", "old ms/answer", ".2f"),
                       ("new", "new ms/answer", ".2f"), ("ratio", "new/old", ".2f"), ("lo", "95% lo", ".2f"),
                       ("hi", "95% hi", ".2f"), ("agree_old", "agree old", ".3f"), ("agree_new", "agree new", ".3f"),
                       ("fp_old", "FP old", "d"), ("fp_new", "FP new", "d")],
                title=f"math reward per-answer cost, {reps} rep(s), in-process")
    finish_record(record, started)
    print("load:", record["machine"]["loadavg_start"], "->", record["machine"]["loadavg_end"])
    path = write_json(record, args.json, "rewards_quick" if args.quick else "rewards")
    print(f"wrote {Path(path).relative_to(REPO) if Path(path).is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
