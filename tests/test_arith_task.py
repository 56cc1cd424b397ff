"""The synthetic arithmetic task: determinism, correctness of answers, levels, splits, argument checks."""

import re

import pytest

from gxpo_lib.rl import arith_task
from gxpo_lib.rl.rewards import last_boxed, math_reward

# Independent reading of the story: each phrase's sign, as a human would read it.
_SIGNS = {"buys": 1, "finds": 1, "puts in": 1, "adds": 1, "got": 1, "won": 1,
          "gives away": -1, "loses": -1, "takes out": -1, "removes": -1, "sold": -1, "gave away": -1}
_PHRASE = re.compile(r"\b(" + "|".join(_SIGNS) + r") (\d+)")
_START = re.compile(r"^(?:\w+ has|\w+ had|There are) (\d+) ")


def _answer_from_prompt(prompt: str) -> int:
    """Recompute the answer from the words of the prompt alone."""
    total = int(_START.match(prompt).group(1))
    for phrase, number in _PHRASE.findall(prompt):
        total += _SIGNS[phrase] * int(number)
    return total


def test_same_seed_same_problems_and_other_seed_differs():
    first = arith_task.generate_problems(50, seed=3)
    assert first == arith_task.generate_problems(50, seed=3)
    assert [p.prompt for p in first] != [p.prompt for p in arith_task.generate_problems(50, seed=4)]


@pytest.mark.parametrize("level", arith_task.LEVELS)
def test_answers_are_correct(level):
    for problem in arith_task.generate_problems(200, level=level, seed=1):
        expected = _answer_from_prompt(problem.prompt)
        assert problem.answer == str(expected)
        assert problem.answer == str(arith_task.evaluate_ops(problem.operands, problem.ops))
        assert expected >= 0
        # The worked line chains correct equations over the prompt's numbers and boxes the result.
        equations = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", problem.solution)
        assert len(equations) == len(problem.ops) == level
        assert int(equations[0][0]) == problem.operands[0]
        for (a, op, b, result), previous in zip(equations, [None] + equations[:-1]):
            assert int(result) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert previous is None or previous[3] == a
        assert [int(e[2]) for e in equations] == list(problem.operands[1:])
        assert problem.solution.endswith(f"= {expected}. \\boxed{{{expected}}}")
        assert math_reward(problem.solution, problem.answer) == 1.0


def test_levels_differ_in_operations_and_number_size():
    for level, (n_ops, high) in {1: (1, 9), 2: (2, 20), 3: (3, 50)}.items():
        problems = arith_task.generate_problems(300, level=level, seed=2)
        assert {len(p.ops) for p in problems} == {n_ops}
        assert {p.level for p in problems} == {level}
        assert max(max(p.operands) for p in problems) == high
    mixed = arith_task.generate_problems(30, seed=0)
    assert [p.level for p in mixed] == [1, 2, 3] * 10


def test_prompts_are_distinct_and_use_the_task_vocabulary():
    problems = arith_task.generate_problems(1000, seed=5)
    assert len({p.prompt for p in problems}) == 1000
    words = set(arith_task.task_words())
    for problem in problems:
        assert set(re.findall(r"[A-Za-z]+", problem.prompt)) <= words


def test_write_splits_is_byte_reproducible_and_disjoint(tmp_path):
    a = arith_task.write_splits(tmp_path / "a", seed=7, n_train=300, n_test=60)
    b = arith_task.write_splits(tmp_path / "b", seed=7, n_train=300, n_test=60)
    for split in arith_task.SPLITS:
        assert a[split].read_bytes() == b[split].read_bytes()
    train = arith_task.load_split("train", tmp_path / "a")
    test = arith_task.load_split("test", tmp_path / "a")
    assert (len(train), len(test)) == (300, 60)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len({r["id"] for r in train + test}) == 360
    assert set(test[0]) >= {"prompt", "answer", "solution", "level", "id"}
    assert isinstance(test[0]["answer"], str)


def test_shipped_splits_match_the_generator_and_stay_small(tmp_path):
    shipped = arith_task.DATA_DIR
    rebuilt = arith_task.write_splits(tmp_path, seed=0)
    for split in arith_task.SPLITS:
        assert (shipped / f"{split}.jsonl").read_bytes() == rebuilt[split].read_bytes()
        assert rebuilt[split].stat().st_size < 800_000
    assert arith_task.load_split("test", limit=5) == arith_task.load_split("test")[:5]


def test_task_answers_score_with_the_library_reward():
    # The task has no reward of its own: its completions go through math_reward like a benchmark's.
    assert last_boxed("1 + 2 = 3. \\boxed{3}") == "3"
    assert last_boxed("\\boxed{4} then \\boxed{ 12 }") == " 12 "
    assert last_boxed("no answer") is None
    assert math_reward("\\boxed{4} then \\boxed{ 12 }", "12") == 1.0
    assert math_reward("\\boxed{5}", "6") == 0.0
    assert math_reward("5", "5", require_boxed=True) == 0.0
    assert not hasattr(arith_task, "is_correct")


@pytest.mark.parametrize("call, name", [
    (lambda: arith_task.generate_problems(-1), "n"),
    (lambda: arith_task.generate_problems(5, level=4), "level"),
    (lambda: arith_task.generate_problems(5, level=[]), "level"),
    (lambda: arith_task.generate_problems(5, seed=-2), "seed"),
    (lambda: arith_task.generate_problems(2.5), "n"),
    (lambda: arith_task.write_splits("/tmp/unused", n_train=0), "n_train"),
    (lambda: arith_task.write_splits("/tmp/unused", n_test=-5), "n_test"),
    (lambda: arith_task.load_split("validation"), "split"),
])
def test_bad_arguments_raise_value_error_naming_them(call, name):
    with pytest.raises(ValueError, match=rf"^{name}="):
        call()


def test_missing_split_file_explains_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m gxpo_lib.rl.arith_task"):
        arith_task.load_split("train", tmp_path)
