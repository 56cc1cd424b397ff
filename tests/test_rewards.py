"""Tests for gxpo_lib.rl.rewards: box extraction, the math-verify protocol on real gold answers, robustness."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from decimal import Decimal, InvalidOperation
from pathlib import Path

import pytest

from gxpo_lib.rl.rewards import RewardScorer, format_reward, last_boxed, math_reward, score_pair

# Hang guards: far above the seconds these take on any machine, far below an unbounded hang.
HANG_GUARD_S = 120.0

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
# GXPO_DATA_DIR=<folder of the full benchmark files> checks every gold; the fixtures hold the first 50 rows.
DATA = Path(os.environ.get("GXPO_DATA_DIR") or FIXTURES)
HUGE_POWER = "So the answer is \\boxed{9^{9^{9^{9}}}}."


def _rows(name: str) -> list[dict]:
    """Rows of a benchmark fixture (the first rows of the real set, shipped with its licence)."""
    path = DATA / name
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _answer_text(answer: str) -> str:
    return f"Let me work through it step by step. ... so the answer is \\boxed{{{answer}}}."


def perturb(gold: str) -> str:
    """A surely different answer: integers and decimals + 1; any other expression gets "+1" appended."""
    if re.fullmatch(r"-?\d+", gold.strip()):
        return str(int(gold) + 1)
    try:
        return str(Decimal(gold.strip()) + 1)
    except InvalidOperation:
        return f"{gold}+1"


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(workers=2, timeout_s=10.0, inner_timeout_s=3) as s:
        yield s


# ---------------------------------------------------------------- box extraction and format


@pytest.mark.parametrize(
    "text, want",
    [
        ("x \\boxed{1} y \\boxed{\\frac{2}{3}} z", "\\frac{2}{3}"),
        ("nested \\boxed{a^{b^{c}}}", "a^{b^{c}}"),
        ("escaped \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("truncated \\boxed{7} then \\boxed{8", "7"),
        ("hendrycks form \\boxed 7$.", "7"),
        ("fbox \\fbox{42}", "42"),
        ("space before the brace \\boxed {3}", "3"),
        ("no box at all", None),
        ("\\boxed{}", ""),
    ],
)
def test_last_boxed(text, want):
    assert last_boxed(text) == want


@pytest.mark.parametrize(
    "text, want",
    [("\\boxed{3}", 1.0), ("\\boxed{3} or \\boxed{4}", 0.0), ("\\boxed{}", 0.0), ("\\boxed{3", 0.0), ("3", 0.0)],
)
def test_format_reward(text, want):
    assert format_reward(text) == want


# ---------------------------------------------------------------- the protocol, one pair at a time


@pytest.mark.parametrize(
    "completion, gold, want",
    [
        ("\\boxed{1} first, but finally \\boxed{2}", "2", ("correct")),
        ("\\boxed{1} first, but finally \\boxed{2}", "1", ("wrong")),
        ("\\boxed{\\frac{1}{2}}", "0.5", "correct"),
        ("\\boxed{\\text{(C)}}", "C", "correct"),
        ("no box, the answer is 42.", "42", "correct"),
        ("nothing to parse here", "5", "no_answer"),
        ("\\boxed{7}", "", "bad_gold"),
    ],
)
def test_score_pair_statuses(completion, gold, want):
    reward, status = score_pair(completion, gold)
    assert status == want and reward == float(want == "correct")


def test_require_boxed_and_math_reward_returns_float():
    assert score_pair("the answer is 42", "42", require_boxed=True) == (0.0, "no_answer")
    value = math_reward("so \\boxed{42}", "42")
    assert isinstance(value, float) and value == 1.0
    assert math_reward("so \\boxed{41}", "42") == 0.0


def test_hostile_text_is_handled_quickly_in_process():
    start = time.monotonic()
    assert last_boxed("\\boxed{" * 20_000) is None  # linear, not quadratic, in unclosed boxes
    assert math_reward("\\boxed{" * 20_000, "1") == 0.0
    assert math_reward("{" * 100_000 + " so \\boxed{1}", "1") == 1.0
    # a hang guard, not a speed test: linear work here takes milliseconds, the quadratic one took minutes
    assert time.monotonic() - start < HANG_GUARD_S


def test_math_reward_works_off_the_main_thread():
    out = []
    worker = threading.Thread(target=lambda: out.append(math_reward("\\boxed{2}", "2")))
    worker.start()
    worker.join()
    assert out == [1.0]


def test_gold_is_first_argument():
    # math-verify accepts a predicted value that lies inside a gold interval, not the reverse
    assert math_reward("\\boxed{x = 2}", "2") == 1.0
    assert score_pair("\\boxed{(1, 2)}", "1")[1] == "wrong"


# ---------------------------------------------------------------- real gold answers


@pytest.mark.parametrize("file, min_rows", [("math500.jsonl", 500), ("gsm8k_test.jsonl", 1319)])
def test_real_gold_answers_score_one_and_perturbed_score_zero(scorer, record_property, file, min_rows):
    golds = [r["answer"] for r in _rows(file)]
    assert len(golds) >= (min_rows if DATA != FIXTURES else 50)
    gold_batch = scorer.score([_answer_text(g) for g in golds], golds)
    wrong_batch = scorer.score([_answer_text(perturb(g)) for g in golds], golds)
    gold_rate = sum(gold_batch.rewards) / len(golds)
    wrong_zero_rate = wrong_batch.rewards.count(0.0) / len(golds)
    record_property(f"{file}:gold_rate", gold_rate)
    record_property(f"{file}:perturbed_zero_rate", wrong_zero_rate)
    print(f"\n{file}: n={len(golds)} gold scored 1: {gold_rate:.4f} {gold_batch.counts.as_dict()}; "
          f"perturbed scored 0: {wrong_zero_rate:.4f} {wrong_batch.counts.as_dict()}")
    assert gold_rate >= 0.99
    assert wrong_zero_rate >= 0.99
    assert gold_batch.counts.n_timeout == gold_batch.counts.n_error == 0


# ---------------------------------------------------------------- robustness


def test_inner_timeout_and_junk_score_zero_with_their_counters(scorer):
    start = time.monotonic()
    batch = scorer.score([HUGE_POWER, "x" * 100_000 + "}{\\frac{" * 1000, "so \\boxed{5}"], ["5", "5", "5"])
    elapsed = time.monotonic() - start
    assert batch.rewards == [0.0, 0.0, 1.0]
    assert batch.statuses == ["timeout", "no_answer", "correct"]
    assert (batch.counts.n_timeout, batch.counts.n_parse_fail, batch.counts.n_correct) == (1, 1, 1)
    assert elapsed < HANG_GUARD_S  # the inner timeout stopped the huge power (a hang guard, not a speed test)
    assert scorer.totals.n_timeout >= 1


def test_outer_timeout_kills_the_stuck_worker_and_reruns_the_others():
    # math-verify's own timeouts off: only the scorer's wall-clock limit can stop the huge power
    with RewardScorer(workers=2, timeout_s=1.5, inner_timeout_s=None) as s:
        s.score(["\\boxed{1}"], ["1"])
        start = time.monotonic()
        batch = s.score([HUGE_POWER, "\\boxed{5}", "\\boxed{4}", "\\boxed{5}"], ["5", "5", "5", "5"])
        elapsed = time.monotonic() - start
        assert batch.statuses == ["timeout", "correct", "wrong", "correct"]
        assert batch.counts.n_timeout == 1 and s.n_restarts == 1
        assert elapsed < 1.5 + HANG_GUARD_S  # the limit plus starting fresh workers (a hang guard)
        assert s.score(["\\boxed{3}"], ["3"]).rewards == [1.0]


def test_a_dead_worker_is_replaced():
    with RewardScorer(workers=2, timeout_s=10.0) as s:
        s.score(["\\boxed{1}"], ["1"])
        for proc in list(s._pool._processes.values()):
            proc.kill()
        batch = s.score(["\\boxed{1}", "\\boxed{2}"], ["1", "3"])
        assert batch.statuses == ["correct", "wrong"]
        assert s.n_restarts >= 1


def test_main_thread_mode_and_argument_errors():
    with RewardScorer(workers=0) as s:
        batch = s.score(["\\boxed{1}", "junk"], ["1", "1"])
    assert batch.statuses == ["correct", "no_answer"]
    with pytest.raises(ValueError, match="differ in length"):
        RewardScorer(workers=0).score(["a"], [])
    for kwargs, needle in [({"workers": -1}, "workers"), ({"timeout_s": 0}, "timeout_s"),
                           ({"inner_timeout_s": 0.5}, "inner_timeout_s"), ({"start_method": "x"}, "start_method")]:
        with pytest.raises(ValueError, match=needle):
            RewardScorer(**kwargs)
