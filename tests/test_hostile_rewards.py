"""Rewards under hostile completions: 1,000 generated adversarial strings, none hangs or breaks the scorer."""

import random
import time
from collections import Counter

import pytest

from gxpo_lib.rl.rewards import MAX_PARSE_CHARS, STATUSES, RewardScorer, last_boxed, score_pair

KINDS = ("huge_latex", "unbalanced", "nested_frac", "huge_exponent", "binary_junk")


def hostile_completions(n: int = 1000, seed: int = 0) -> list[tuple[str, str]]:
    """(kind, completion) pairs, the kinds in turn: enormous LaTeX, unbalanced braces, deeply nested
    fractions, towers of exponents, random bytes."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if kind == "huge_latex":
            terms = (f"\\sqrt{{{rng.randint(1, 99)}}}" for _ in range(rng.randint(2000, 6000)))
            text = "\\boxed{" + "+".join(terms) + "}"
        elif kind == "unbalanced":
            text = "\\boxed{" * rng.randint(1, 500) + "}" * rng.randint(0, 3) + "\\left(" * rng.randint(0, 50)
        elif kind == "nested_frac":
            depth = rng.randint(50, 400)
            text = "\\boxed{" + "\\frac{1}{" * depth + "2" + "}" * depth + "}"
        elif kind == "huge_exponent":
            text = ("\\boxed{" + "^".join(["9"] * rng.randint(3, 8)) + "}" if rng.random() < 0.5
                    else "\\boxed{10^{10^{10^{" + str(rng.randint(10, 99)) + "}}}}")
        else:
            text = bytes(rng.getrandbits(8) for _ in range(rng.randint(100, 5000))).decode("latin-1")
        items.append((kind, text))
    return items


@pytest.mark.slow
def test_a_thousand_hostile_completions_are_scored_and_counted():
    items = hostile_completions()
    # inner_timeout_s=1: about a fifth of the items (towers of exponents, deep fractions) run into the
    # limit, which dominates the test's cost; any limit proves the same (the pool survives, all are counted).
    with RewardScorer(workers=2, timeout_s=5.0, inner_timeout_s=1) as scorer:
        batch = scorer.score([text for _, text in items], ["1"] * len(items))
        # The pool survives: an ordinary batch right after is scored correctly.
        after = scorer.score(["so \\boxed{1}", "\\boxed{2}"], ["1", "1"])
    assert after.statuses == ["correct", "wrong"]
    assert len(batch.statuses) == len(items) and set(batch.statuses) <= set(STATUSES)
    by_kind = Counter(zip([kind for kind, _ in items], batch.statuses))
    print("hostile completions by kind and status:", dict(by_kind), "pool restarts:", scorer.n_restarts)
    # What must be a parse failure is one: an over-long box (the guard) and braces that never close.
    for (kind, text), status in zip(items, batch.statuses):
        box = last_boxed(text)
        if kind == "huge_latex" or (box is not None and len(box) > MAX_PARSE_CHARS):
            assert status == "no_answer", (kind, len(text))
        if kind == "unbalanced":
            assert status == "no_answer"
        if kind in ("huge_exponent", "nested_frac"):
            assert status != "correct"
    assert batch.counts.n_parse_fail == batch.statuses.count("no_answer") >= 400
    assert batch.counts.n_timeout == batch.statuses.count("timeout")


def test_hostile_final_lines_and_problem_texts_through_the_grader():
    """The grader's own inputs (a final answer line, the problem text) under attack: no crash, no hang."""
    rng = random.Random(1)
    lines = ["The answer is " + "(" * 5000, "Final answer: " + "\\frac{" * 300, "so x = " + "1 or " * 2000 + "1",
             "The answer is " + "a " * 3000, "#### " + "9" * 5000, "Answer: " + "\\sqrt" * 1000 + "2",
             "The answer is " + "1,000" * 500, "is " + "%$" * 2000]
    problems = [None, "Express your answer as a common fraction in interval notation, in hours. " * 200,
                "(A) " + "x " * 5000, "".join(chr(rng.randint(0, 0x2FF)) for _ in range(20_000))]
    start = time.monotonic()
    for line in lines:
        for problem in problems:
            reward, status = score_pair("work\n" + line, "1", problem=problem, timeout_s=2)
            assert status in STATUSES and reward in (0.0, 1.0)
    # a hang guard, not a speed test: 32 calls, each stopped by its own 2 s limit at worst
    assert time.monotonic() - start < 32 * 2.0 + 120.0
