"""Math benchmarks as lists of plain dicts with one schema, from the Hugging Face hub or local JSONL.

Every row: ``id`` (str), ``source`` (the benchmark name), ``prompt`` (the problem text, no chat template),
``answer`` (str, the gold final answer), ``level`` (int 1-5 or None), ``subject`` (str or None).

Benchmarks (``load_benchmark(name, ...)``), hub source and split:

=================  ===========================================================  =====================
name               hub dataset (config)                                         splits (default first)
=================  ===========================================================  =====================
``gsm8k``          ``openai/gsm8k`` (``main``); answer after ``####``, commas    test, train
                   removed
``math500``        ``HuggingFaceH4/MATH-500``                                    test
``math_train``     ``EleutherAI/hendrycks_math`` (its 7 subject configs           train
                   concatenated; answer = last ``\\boxed{}`` of the solution;
                   "Level N" -> N). The original MATH train split, 7,500 rows.
``aime24``         ``HuggingFaceH4/aime_2024``                                   train
``amc23``          ``math-ai/amc23``                                             test
``olympiadbench``  ``Hothan/OlympiadBench`` (``OE_TO_maths_en_COMP``, the        train
                   675-problem English text-only subset Qwen2.5-Math evaluates);
                   answer = ``final_answer[0]`` without ``$``
=================  ===========================================================  =====================

Local files (``path=``, or a run's ``data_dir`` holding the file names of ``LOCAL_FILES``) are JSONL,
one problem per line: gsm8k rows carry ``question`` and ``answer`` (the final number), the others
``problem`` and ``answer`` (plus ``level``/``subject``/``subfield``/``final_answer`` where the set has
them); the hub's column names are read too. A ``math_train.jsonl`` may be the prm800k train split
(12,000 rows: MATH train plus MATH test minus MATH-500), a superset of the hub's 7,500; both are disjoint
from MATH-500. ``tests/fixtures/benchmarks`` in the repository holds 50-row samples in this layout, with
their sources and licences.
The paper trains on Hendrycks MATH levels 3-5: ``load_benchmark("math_train", levels=(3, 4, 5))``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class HubSource:
    """Where a benchmark lives on the hub."""

    repo: str
    configs: tuple[str | None, ...]
    splits: tuple[str, ...]  # the first is the default


HUB = {
    "gsm8k": HubSource("openai/gsm8k", ("main",), ("test", "train")),
    "math500": HubSource("HuggingFaceH4/MATH-500", (None,), ("test",)),
    "math_train": HubSource("EleutherAI/hendrycks_math", ("algebra", "counting_and_probability", "geometry",
                                                          "intermediate_algebra", "number_theory", "prealgebra",
                                                          "precalculus"), ("train",)),
    "aime24": HubSource("HuggingFaceH4/aime_2024", (None,), ("train",)),
    "amc23": HubSource("math-ai/amc23", (None,), ("test",)),
    "olympiadbench": HubSource("Hothan/OlympiadBench", ("OE_TO_maths_en_COMP",), ("train",)),
}
BENCHMARKS = tuple(HUB)
LOCAL_FILES = {
    "gsm8k": {"test": "gsm8k_test.jsonl", "train": "gsm8k_train.jsonl"},
    "math500": {"test": "math500.jsonl"},
    "math_train": {"train": "math_train.jsonl"},
    "aime24": {"train": "aime24.jsonl"},
    "amc23": {"test": "amc23.jsonl"},
    "olympiadbench": {"train": "olympiadbench.jsonl"},
}
LEVELLED = ("math500", "math_train")


def load_benchmark(name: str, path: str | Path | None = None, split: str | None = None,
                   levels: Sequence[int] | None = None, limit: int | None = None,
                   drop_empty: bool = True) -> list[dict[str, Any]]:
    """Load one benchmark in the common schema.

    Args:
        name: one of ``BENCHMARKS``.
        path: a local JSONL file; None downloads from the hub through ``datasets.load_dataset``.
        split: the hub split (default: the benchmark's first split in ``HUB``); ignored with ``path``.
        levels: keep only these MATH levels (1-5); rows without a level are dropped. Only for
            ``math500`` and ``math_train``.
        limit: keep the first ``limit`` rows (after filtering).
        drop_empty: drop rows whose answer is empty (2 rows of prm800k's ``math_train``).

    Returns:
        A list of row dicts (see the module docstring), in file/hub order.
    """
    _check_name(name)
    split = _check_split(name, split)
    if levels is not None:
        levels = _check_levels(name, levels)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit={limit!r} is invalid: allowed None or an integer >= 0")

    # Raw rows from the file or the hub, then the common schema
    raw = read_jsonl(path) if path is not None else _hub_rows(name, split)
    rows = to_common_schema(raw, name, split)

    # Filters
    if drop_empty:
        rows = [r for r in rows if r["answer"].strip()]
    if levels is not None:
        rows = [r for r in rows if r["level"] in levels]
    return rows if limit is None else rows[:limit]


def local_path(name: str, data_dir: str | Path, split: str | None = None) -> Path:
    """The local JSONL file of a benchmark's split under ``data_dir`` (file names: ``LOCAL_FILES``)."""
    _check_name(name)
    return Path(data_dir) / LOCAL_FILES[name][_check_split(name, split)]


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; blank lines are skipped.

    Raises:
        ValueError: the file does not exist, or a line is not a JSON object (names file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: malformed JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def to_common_schema(rows: Iterable[Mapping[str, Any]], name: str, split: str | None = None) -> list[dict]:
    """Map rows with either the hub's or the local files' column names to the common schema.

    Args:
        rows: dicts, a ``datasets.Dataset`` or any iterable of mappings.
        name: the benchmark (decides how the answer, level and subject are read).
        split: used only to build ids for rows that have none (hub GSM8K, hub MATH train).
    """
    _check_name(name)
    split = _check_split(name, split)
    out = []
    for index, row in enumerate(rows):
        prompt = row.get("problem", row.get("question"))
        if not isinstance(prompt, str):
            raise ValueError(f"{name} row {index}: no 'problem' or 'question' text (columns: {sorted(row)})")
        out.append({"id": _row_id(row, name, split, index), "source": name, "prompt": prompt,
                    "answer": _row_answer(row, name, index), "level": _row_level(row.get("level")),
                    "subject": row.get("subfield") or row.get("subject") or row.get("type")})
    return out


def _row_answer(row: Mapping[str, Any], name: str, index: int) -> str:
    """The gold answer as a string, whichever source the row came from."""
    answer = row.get("answer")
    # OlympiadBench on the hub: the first final answer, without math delimiters
    if answer is None and name == "olympiadbench" and row.get("final_answer"):
        answer = str(row["final_answer"][0]).replace("$", "").strip()
    # Hendrycks MATH on the hub: the last box of the worked solution
    if answer is None and name in LEVELLED and row.get("solution") is not None:
        from gxpo_lib.rl.rewards import last_boxed

        answer = last_boxed(row["solution"]) or ""
    if answer is None:
        raise ValueError(f"{name} row {index}: no answer column (columns: {sorted(row)})")
    answer = str(answer).strip()
    # GSM8K: the text after "####", thousands commas removed
    if name == "gsm8k":
        answer = answer.rsplit("####", 1)[-1].strip().replace(",", "")
    # AIME/AMC: integers, stored by some sources as "025" or 27.0
    if name in ("aime24", "amc23") and re.fullmatch(r"-?\d+(\.0*)?", answer):
        answer = str(int(float(answer)))
    return answer


def _row_id(row: Mapping[str, Any], name: str, split: str, index: int) -> str:
    """The row's own id (``id`` or MATH's ``unique_id``), else one built from its position."""
    rid = row.get("id", row.get("unique_id"))
    if rid is None:
        return f"{name}-{split}-{index:05d}"
    return f"{name}-{rid}" if isinstance(rid, int) else str(rid)


def _row_level(level: Any) -> int | None:
    """MATH level as an int: 3, "3" and "Level 3" give 3; "Level ?" and None give None."""
    if level is None or isinstance(level, bool):
        return None
    if isinstance(level, int):
        return level
    match = re.fullmatch(r"(?:Level\s*)?(\d+)", str(level).strip())
    return int(match.group(1)) if match else None


def _hub_rows(name: str, split: str) -> list[dict[str, Any]]:
    """Download (or read from the datasets cache) every config of the benchmark's split."""
    from datasets import load_dataset

    source = HUB[name]
    rows: list[dict[str, Any]] = []
    for config in source.configs:
        rows.extend(load_dataset(source.repo, config, split=split))
    return rows


def _check_name(name: str) -> None:
    if name not in HUB:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {BENCHMARKS}")


def _check_split(name: str, split: str | None) -> str:
    """The split, defaulting to the benchmark's first; unknown splits raise."""
    allowed = HUB[name].splits
    if split is None:
        return allowed[0]
    if split not in allowed:
        raise ValueError(f"split={split!r} is invalid for {name}: expected one of {allowed}")
    return split


def _check_levels(name: str, levels: Sequence[int]) -> tuple[int, ...]:
    """Levels are ints in 1-5 and only make sense for the MATH sets."""
    if name not in LEVELLED:
        raise ValueError(f"levels only applies to {LEVELLED}, not {name!r}")
    levels = tuple(levels)
    if not levels or any(isinstance(lv, bool) or not isinstance(lv, int) or not 1 <= lv <= 5 for lv in levels):
        raise ValueError(f"levels={levels!r} is invalid: allowed a non-empty sequence of integers in 1-5")
    return levels
