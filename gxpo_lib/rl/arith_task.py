"""A synthetic, verifiable reasoning task: multi-step integer arithmetic word problems.

Each problem is a short story ("Tom has 7 apples. He buys 5 more and gives away 3. ...") whose answer is
an integer; the target completion is a short worked line, one equation per operation, and the answer
in ``\\boxed{}``: ``"7 + 5 = 12. 12 - 3 = 9. \\boxed{9}"``. Problems are seeded and come in three
difficulty levels:

- level 1: one operation, numbers 1-9;
- level 2: two operations, numbers 1-20;
- level 3: three operations, numbers 1-50.

Counts never go negative. The vocabulary is deliberately small (``task_words()``) so that the tiny
word-level tokenizer in ``gxpo_lib.rl.tiny_model`` covers every prompt and solution.

Records use the schema of the real-dataset loaders: ``prompt``, ``answer`` (a string), plus metadata
(``solution``, ``level``, ``id``, ``operands``, ``ops``). Rebuild the shipped splits with::

    python -m gxpo_lib.rl.arith_task --out data/arith --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from gxpo_lib.paths import shipped

DATA_DIR = shipped("arith")  # package data; data/arith in a checkout
LEVELS = (1, 2, 3)
SPLITS = ("train", "test")

# Per level: (number of operations, largest operand).
_LEVEL_SPEC = {1: (1, 9), 2: (2, 20), 3: (3, 50)}

# Names with their subject pronoun.
_NAMES = (("Tom", "he"), ("Sam", "he"), ("Ben", "he"), ("Max", "he"),
          ("Ann", "she"), ("Mia", "she"), ("Zoe", "she"), ("Lily", "she"))
_ITEMS = ("apples", "pens", "books", "coins", "cards", "shells", "marbles", "stickers")

# Story templates. Placeholders: {name}, {p} / {P} (pronoun, lower / capitalised), {item}, {n}.
# "add" / "sub" are phrases for one operation; "join" glues the operation phrases of one sentence.
_TEMPLATES = (
    {"intro": "{name} has {n} {item}.",
     "add": ("buys {n} more", "finds {n} more"), "sub": ("gives away {n}", "loses {n}"),
     "lead": "{P}", "join": " and then ",
     "question": "How many {item} does {p} have now?"},
    {"intro": "There are {n} {item} in a box.",
     "add": ("puts in {n} more", "adds {n} more"), "sub": ("takes out {n}", "removes {n}"),
     "lead": "{name}", "join": " and then ",
     "question": "How many {item} are in the box now?"},
    {"intro": "{name} had {n} {item}.",
     "add": ("got {n} more", "won {n} more"), "sub": ("sold {n}", "gave away {n}"),
     "lead": "Then {p}", "join": ", then ",
     "question": "How many {item} does {p} have left?"},
)


@dataclass(frozen=True)
class ArithProblem:
    """One word problem.

    ``operands[0]`` is the starting count and ``ops[i]`` ("+" or "-") applies ``operands[i + 1]``;
    ``answer`` is the result as a string and ``solution`` the target completion.
    """

    prompt: str
    answer: str
    solution: str
    level: int
    id: str
    operands: tuple[int, ...]
    ops: tuple[str, ...]

    def as_dict(self) -> dict:
        """The JSON record (lists instead of tuples)."""
        return asdict(self) | {"operands": list(self.operands), "ops": list(self.ops)}


def _check_int(name: str, value, low: int, high: int | None = None) -> None:
    """Raise ValueError unless ``value`` is an int in [low, high] (high None = unbounded)."""
    upper = "inf" if high is None else str(high)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} is invalid: expected an integer in [{low}, {upper}]")


def _normalise_levels(level: int | Sequence[int]) -> tuple[int, ...]:
    """Turn ``level`` (one level or a sequence of them) into a validated non-empty tuple."""
    levels = (level,) if isinstance(level, int) else tuple(level)
    if not levels or any(isinstance(lv, bool) or lv not in LEVELS for lv in levels):
        raise ValueError(f"level={level!r} is invalid: expected one of {LEVELS} or a non-empty sequence of them")
    return levels


def evaluate_ops(operands: Sequence[int], ops: Sequence[str]) -> int:
    """Left-to-right value of ``operands[0] ops[0] operands[1] ...`` (only "+" and "-")."""
    total = operands[0]
    for op, value in zip(ops, operands[1:]):
        total = total + value if op == "+" else total - value
    return total


def _draw_chain(rng: random.Random, level: int) -> tuple[list[int], list[str]]:
    """Random operands and operators for one problem; the running total stays >= 0."""
    n_ops, high = _LEVEL_SPEC[level]
    operands = [rng.randint(1, high)]
    ops: list[str] = []
    total = operands[0]
    for _ in range(n_ops):
        # Subtract only what is there; an empty pile forces an addition.
        op = "-" if total > 0 and rng.random() < 0.5 else "+"
        value = rng.randint(1, min(high, total)) if op == "-" else rng.randint(1, high)
        total = total + value if op == "+" else total - value
        operands.append(value)
        ops.append(op)
    return operands, ops


def _render_prompt(rng: random.Random, operands: Sequence[int], ops: Sequence[str]) -> str:
    """Write the story for a chain of operations with a random template, name and item."""
    template = rng.choice(_TEMPLATES)
    name, pronoun = rng.choice(_NAMES)
    fill = {"name": name, "p": pronoun, "P": pronoun.capitalize(), "item": rng.choice(_ITEMS)}
    phrases = [rng.choice(template["add" if op == "+" else "sub"]).format(n=value)
               for op, value in zip(ops, operands[1:])]
    # At most two operations per sentence, so long chains read naturally.
    sentences = [template["lead"].format(**fill) + " " + template["join"].join(phrases[i:i + 2]) + "."
                 for i in range(0, len(phrases), 2)]
    return " ".join([template["intro"].format(n=operands[0], **fill), *sentences, template["question"].format(**fill)])


def format_solution(operands: Sequence[int], ops: Sequence[str]) -> str:
    """The target completion: one equation per operation, then the boxed answer.

    E.g. ``"7 + 5 = 12. 12 - 3 = 9. \\boxed{9}"``. One operation per equation (rather than the whole
    chain at once) is what lets a tiny model learn the task in a few hundred steps.
    """
    total, steps = operands[0], []
    for op, value in zip(ops, operands[1:]):
        result = evaluate_ops((total, value), (op,))
        steps.append(f"{total} {op} {value} = {result}.")
        total = result
    return " ".join(steps) + f" \\boxed{{{total}}}"


def _problem_stream(level: int | Sequence[int], seed: int, id_prefix: str):
    """Endless stream of distinct problems (by prompt); levels cycle through ``level`` in order."""
    levels = _normalise_levels(level)
    rng = random.Random(seed)
    seen: set[str] = set()
    index = 0
    while True:
        lv = levels[index % len(levels)]
        operands, ops = _draw_chain(rng, lv)
        prompt = _render_prompt(rng, operands, ops)
        if prompt in seen:
            continue
        seen.add(prompt)
        yield ArithProblem(prompt=prompt, answer=str(evaluate_ops(operands, ops)),
                           solution=format_solution(operands, ops), level=lv,
                           id=f"{id_prefix}{index:05d}", operands=tuple(operands), ops=tuple(ops))
        index += 1


def generate_problems(n: int, level: int | Sequence[int] = LEVELS, seed: int = 0) -> list[ArithProblem]:
    """``n`` distinct problems (no repeated prompt), deterministic in ``seed``.

    ``level`` is 1, 2, 3 or a sequence of levels; with a sequence, problem ``i`` has level
    ``level[i % len(level)]``, so the default mixes the three levels evenly.
    """
    _check_int("n", n, 0)
    _check_int("seed", seed, 0)
    stream = _problem_stream(level, seed, id_prefix=f"arith-s{seed}-")
    return [next(stream) for _ in range(n)]


def write_splits(out_dir: str | Path = DATA_DIR, seed: int = 0, n_train: int = 3000,
                 n_test: int = 500, level: int | Sequence[int] = LEVELS) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (disjoint by prompt) into ``out_dir``.

    Both splits come from one stream of distinct problems (test first, then train), so they never share
    a prompt, and the same arguments always give byte-identical files. Returns ``{split: path}``.
    """
    _check_int("n_train", n_train, 1)
    _check_int("n_test", n_test, 1)
    _check_int("seed", seed, 0)
    stream = _problem_stream(level, seed, id_prefix="")
    problems = [next(stream) for _ in range(n_test + n_train)]
    # One id namespace per split: "arith-test-00000", "arith-train-00000", ...
    chunks = {"test": problems[:n_test], "train": problems[n_test:]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, chunk in chunks.items():
        lines = [json.dumps(problem.as_dict() | {"id": f"arith-{split}-{i:05d}"}, sort_keys=True, separators=(",", ":"))
                 for i, problem in enumerate(chunk)]
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def load_split(split: str, data_dir: str | Path = DATA_DIR, limit: int | None = None) -> list[dict]:
    """Records of ``train`` or ``test`` as dicts (``prompt``, ``answer``, ``solution``, ``level``, ...)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: expected one of {SPLITS}")
    if limit is not None:
        _check_int("limit", limit, 0)
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build it with `python -m gxpo_lib.rl.arith_task --out "
                                f"{Path(data_dir)} --seed 0`")
    with path.open(encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return records if limit is None else records[:limit]


def task_words() -> list[str]:
    """Every alphabetic word that prompts and solutions can contain, sorted (for the tokenizer)."""
    texts = [name + " " + pronoun + " " + pronoun.capitalize() for name, pronoun in _NAMES]
    texts += list(_ITEMS)
    for template in _TEMPLATES:
        texts += [template["intro"], template["lead"], template["join"], template["question"],
                  *template["add"], *template["sub"]]
    # Placeholders such as {name} are not words of the text.
    texts = [re.sub(r"\{\w+\}", " ", text) for text in texts]
    return sorted({word for text in texts for word in re.findall(r"[A-Za-z]+", text)})


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m gxpo_lib.rl.arith_task --out data/arith --seed 0``."""
    parser = argparse.ArgumentParser(description="Write the arithmetic task's train/test splits.")
    parser.add_argument("--out", default=str(DATA_DIR), help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-test", type=int, default=500)
    args = parser.parse_args(argv)
    paths = write_splits(args.out, seed=args.seed, n_train=args.n_train, n_test=args.n_test)
    for split, path in paths.items():
        print(f"{split}: {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
