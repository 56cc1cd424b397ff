"""Tests for gxpo_lib.rl.benchmarks: the benchmark files, level filters, errors, and the hub column mapping.

The benchmark files come from ``tests/fixtures/benchmarks`` (at most 50 real rows of each set, with their
licences), so these tests run in any clone. With ``GXPO_DATA_DIR`` pointing at a folder of the full files
the full-size checks run too, and the fixtures are checked against those files line by line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import datasets
import pytest

from gxpo_lib.rl.benchmarks import BENCHMARKS, LOCAL_FILES, load_benchmark, local_path, read_jsonl, to_common_schema
from gxpo_lib.rl.rewards import last_boxed

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
MANIFEST = json.loads((FIXTURES / "MANIFEST.json").read_text(encoding="utf-8"))
KEYS = {"id", "source", "prompt", "answer", "level", "subject"}
README_ROWS = {("gsm8k", "test"): 1319, ("gsm8k", "train"): 7473, ("math500", "test"): 500,
               ("math_train", "train"): 12000, ("aime24", "train"): 30, ("amc23", "test"): 40,
               ("olympiadbench", "train"): 675}


@pytest.fixture(scope="module")
def data_dir() -> Path:
    """The fixture folder: the same file names and layout as a full data folder."""
    return FIXTURES


@pytest.fixture(scope="module")
def full_data_dir() -> Path:
    """A folder of the full benchmark files, from GXPO_DATA_DIR (developers); skipped without it."""
    folder = os.environ.get("GXPO_DATA_DIR")
    if not folder or not Path(folder).is_dir():
        pytest.skip("set GXPO_DATA_DIR to a folder of the full benchmark files for the full-size checks")
    return Path(folder)


def _check_rows(rows: list[dict], name: str) -> None:
    """Every row has the common schema, a non-empty prompt, a string answer and a unique id."""
    assert all(set(r) == KEYS and r["source"] == name for r in rows)
    assert all(isinstance(r["prompt"], str) and r["prompt"] and isinstance(r["answer"], str) for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)


# ---------------------------------------------------------------- the fixtures (every clone)


@pytest.mark.parametrize("name, split", sorted(README_ROWS))
def test_fixture_files_load_in_the_common_schema(data_dir, name, split):
    rows = load_benchmark(name, path=local_path(name, data_dir, split), drop_empty=False)
    entry = MANIFEST[LOCAL_FILES[name][split]]
    assert len(rows) == len(entry["lines"]) == min(50, README_ROWS[name, split])
    assert entry["source_rows"] == README_ROWS[name, split]
    _check_rows(rows, name)


def test_fixtures_ship_their_licences():
    licences = {p.name for p in (FIXTURES / "licenses").iterdir()}
    assert {"grade-school-math_LICENSE.txt", "hendrycks-math_LICENSE.txt", "prm800k_LICENSE.txt",
            "OlympiadBench_LICENSE.txt", "Qwen2.5-Math_evaluation_LICENSE.txt"} <= licences
    assert all("MIT License" in (FIXTURES / "licenses" / n).read_text() for n in licences
               if n != "aiwaves-agents_LICENSE.txt")
    readme = (FIXTURES / "README.md").read_text()
    assert all(f"`{file}`" in readme for files in LOCAL_FILES.values() for file in files.values())


def test_local_values_are_mapped(data_dir):
    gsm = load_benchmark("gsm8k", path=local_path("gsm8k", data_dir), limit=1)[0]
    assert (gsm["id"], gsm["answer"], gsm["level"]) == ("gsm8k-test-00000", "18", None)
    assert gsm["prompt"].startswith("Janet")
    m500 = load_benchmark("math500", path=local_path("math500", data_dir))
    assert m500[0]["id"] == "test/precalculus/807.json" and m500[0]["level"] == 2
    assert m500[0]["subject"] == "Precalculus"
    assert {r["level"] for r in m500} == {1, 2, 3, 4, 5}
    olymp = load_benchmark("olympiadbench", path=local_path("olympiadbench", data_dir), limit=2)
    assert [r["answer"] for r in olymp] == ["2", "\\frac{1}{2 n+2}"] and olymp[0]["subject"]
    aime = load_benchmark("aime24", path=local_path("aime24", data_dir))
    assert all(r["answer"].isdigit() and not r["answer"].startswith("0") for r in aime)


def test_math_train_levels_and_empty_answers(data_dir):
    path = local_path("math_train", data_dir)
    everything = load_benchmark("math_train", path=path, drop_empty=False)
    assert sum(1 for r in everything if not r["answer"]) == 2
    assert sum(1 for r in everything if r["level"] is None) == 2
    assert len(load_benchmark("math_train", path=path)) == 48
    hard = load_benchmark("math_train", path=path, levels=(3, 4, 5))
    want = sum(1 for r in everything if r["level"] in (3, 4, 5) and r["answer"])
    assert len(hard) == want == 39
    assert {r["level"] for r in hard} == {3, 4, 5}
    assert len(load_benchmark("math_train", path=path, levels=[5], limit=10)) == 10


# ---------------------------------------------------------------- the full files (GXPO_DATA_DIR)


def test_full_files_have_their_readme_row_counts_and_the_fixtures_are_byte_copies(full_data_dir):
    for (name, split), count in sorted(README_ROWS.items()):
        rows = load_benchmark(name, path=local_path(name, full_data_dir, split), drop_empty=False)
        assert len(rows) == count, name
        _check_rows(rows, name)
    for file_name, entry in sorted(MANIFEST.items()):
        raw = (full_data_dir / file_name).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == entry["source_sha256"], file_name
        lines = raw.splitlines(keepends=True)
        assert (FIXTURES / file_name).read_bytes() == b"".join(lines[i] for i in entry["lines"]), file_name


def test_full_math_train_levels_empty_answers_and_box_rule(full_data_dir):
    path = local_path("math_train", full_data_dir)
    everything = load_benchmark("math_train", path=path, drop_empty=False)
    assert sum(1 for r in everything if not r["answer"]) == 2
    assert sum(1 for r in everything if r["level"] is None) == 2
    assert len(load_benchmark("math_train", path=path)) == 11998
    hard = load_benchmark("math_train", path=path, levels=(3, 4, 5))
    want = sum(1 for r in everything if r["level"] in (3, 4, 5) and r["answer"])
    assert len(hard) == want == 8886
    _check_box_rule(full_data_dir)


def test_malformed_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n\n{"problem": "oops", \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: malformed JSON"):
        load_benchmark("math500", path=bad)
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: expected a JSON object"):
        read_jsonl(bad)


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'math'.*gsm8k"):
        load_benchmark("math", path=tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        load_benchmark("math500", path=tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="levels only applies"):
        load_benchmark("gsm8k", path=tmp_path / "x.jsonl", levels=(1,))
    with pytest.raises(ValueError, match=r"levels=\(0, 6\) is invalid"):
        load_benchmark("math_train", path=tmp_path / "x.jsonl", levels=(0, 6))
    with pytest.raises(ValueError, match="split='validation'"):
        load_benchmark("gsm8k", split="validation")
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("math500", path=tmp_path / "x.jsonl", limit=-1)
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"problem": "1+1?"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="no answer column"):
        load_benchmark("amc23", path=no_answer)
    assert set(LOCAL_FILES) == set(BENCHMARKS)


# ---------------------------------------------------------------- hub column names, no network


def test_hub_gsm8k_columns():
    hub = datasets.Dataset.from_list([
        {"question": "How many?", "answer": "Some steps <<2*3=6>>\n#### 1,080"},
        {"question": "Debt?", "answer": "She owes\n#### -5"},
    ])
    rows = to_common_schema(hub, "gsm8k", "train")
    assert [r["answer"] for r in rows] == ["1080", "-5"]
    assert rows[0]["id"] == "gsm8k-train-00000" and rows[0]["prompt"] == "How many?"


def test_hub_math500_and_hendrycks_columns():
    m500 = datasets.Dataset.from_list([{"problem": "P", "solution": "S \\boxed{3}", "answer": "3",
                                       "subject": "Algebra", "level": 4, "unique_id": "test/algebra/1.json"}])
    row = to_common_schema(m500, "math500")[0]
    assert row == {"id": "test/algebra/1.json", "source": "math500", "prompt": "P", "answer": "3", "level": 4,
                   "subject": "Algebra"}
    hendrycks = datasets.Dataset.from_list([
        {"problem": "P1", "level": "Level 5", "type": "Geometry", "solution": "so \\boxed{\\frac{1}{2}}."},
        {"problem": "P2", "level": "Level ?", "type": "Geometry", "solution": "it is \\boxed 7$."},
        {"problem": "P3", "level": "Level 2", "type": "Algebra", "solution": "empty \\boxed{}"},
    ])
    rows = to_common_schema(hendrycks, "math_train", "train")
    assert [(r["answer"], r["level"], r["subject"]) for r in rows] == [
        ("\\frac{1}{2}", 5, "Geometry"), ("7", None, "Geometry"), ("", 2, "Algebra")]
    assert rows[1]["id"] == "math_train-train-00001"


def test_hub_aime_amc_olympiad_columns():
    aime = datasets.Dataset.from_list([{"id": 60, "problem": "A", "solution": "s", "answer": "025",
                                        "url": "u", "year": "2024"}])
    assert to_common_schema(aime, "aime24")[0]["answer"] == "25"
    amc = datasets.Dataset.from_list([{"id": 0, "question": "Q", "answer": 27.0, "url": "u"}])
    row = to_common_schema(amc, "amc23")[0]
    assert (row["prompt"], row["answer"], row["id"]) == ("Q", "27", "amc23-0")
    olymp = datasets.Dataset.from_list([{
        "id": 1606, "question": "Q", "solution": ["s"], "final_answer": ["$2$"], "subfield": "Combinatorics",
        "subject": "Math", "is_multiple_answer": False, "unit": None, "answer_type": "Numerical",
        "error": None}])
    row = to_common_schema(olymp, "olympiadbench")[0]
    assert (row["id"], row["answer"], row["subject"]) == ("olympiadbench-1606", "2", "Combinatorics")


def _check_box_rule(folder: Path) -> None:
    """The hub mapping's box rule reproduces every local MATH answer (Hendrycks' rule) from its solution."""
    for name in ("math500", "math_train"):
        raw = read_jsonl(local_path(name, folder))
        assert all(last_boxed(r["solution"]) == r["answer"] for r in raw)


def test_local_math_answers_follow_the_box_rule(data_dir):
    _check_box_rule(data_dir)

