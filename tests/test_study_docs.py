"""The verdict study's numbers in README.md and docs/regime.md are the shipped runs', recomputed here."""

from pathlib import Path

import pytest

from gxpo_lib.analysis import verdict

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "results" / "verdict"


@pytest.fixture(scope="module")
def records():
    return verdict.load_records(SHIPPED)


@pytest.mark.parametrize("doc, blocks", [("README.md", ("verdict-lesson", "verdict-claims")),
                                         ("docs/regime.md", ("verdict-lesson", "verdict-report"))])
def test_generated_blocks_are_the_shipped_studys(records, doc, blocks):
    text = (ROOT / doc).read_text(encoding="utf-8")
    for name in blocks:
        assert f"<!-- {name}:" in text and f"<!-- /{name} -->" in text, name
    assert verdict.render_blocks(text, records) == text, (
        f"{doc}: rerun `python -m gxpo_lib.analysis.verdict docs data/results/verdict {doc}`")


def test_shipped_study_is_the_preregistered_design(records):
    # every shipped run is one of the pre-registered arms, finished, with per-problem final results
    for record in records:
        c = record["config"]
        assert c["steps"] in (60, verdict.HORIZON_STEPS)
        assert record["final"]["problems"] == 500 and record["final"]["samples"] == 8
        assert len(record["final"]["correct_counts"]) == 500
        assert all(r.get("update_norm") is not None for r in record["train"])
