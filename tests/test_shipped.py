"""Replay: a compact exported run draws the same tables and figures as the run folder it came from."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from gxpo_lib import analysis
from gxpo_lib.analysis import shipped
from gxpo_lib.rl import runlog
from gxpo_lib.rl.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """Two real 4-step runs (GRPO and GXPO) on the tiny model, evaluated every 2 steps and at the end."""
    root = tmp_path_factory.mktemp("replay-runs")
    for algorithm in ("grpo", "gxpo"):
        train(TrainConfig(algorithm=algorithm, steps=4, eval_every=2, batch_prompts=4, group_size=4,
                          eval_problems=16, eval_samples=2, final_eval_sets=("arith",), final_eval_problems=16,
                          final_eval_samples=2, checkpoint_every=4), root / algorithm, progress=False)
    (root / "unfinished").mkdir()     # a folder with a metrics.jsonl but no train rows
    (root / "unfinished" / "metrics.jsonl").write_text('{"kind": "eval", "step": 0, "pass@1": 0.5}\n')
    return root


@pytest.fixture(scope="module")
def exported(original, tmp_path_factory):
    out = tmp_path_factory.mktemp("replay-out") / "study"
    written = shipped.export_runs(original, out, meta={"machine": "test"})
    return out, written


def _figure_data(figure) -> list[dict]:
    """Every trace's name and coordinates, JSON-normalised (numpy arrays as lists)."""
    return [{k: trace[k] for k in ("name", "x", "y") if k in trace}
            for trace in json.loads(figure.to_json())["data"]]


def test_export_keeps_finished_runs_small_and_indexes_them(exported, original):
    out, written = exported
    assert sorted(p.name for p in written) == ["grpo", "gxpo"]
    index = shipped.read_index(out)
    assert index["runs"] == ["grpo", "gxpo"] and index["unfinished"] == ["unfinished"]
    assert index["machine"] == "test"
    for folder in written:
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", "final_eval.json", "metrics.jsonl"]
        compact = folder / "metrics.jsonl"
        assert compact.stat().st_size < (original / folder.name / "metrics.jsonl").stat().st_size
        assert all(set(r) <= set(shipped.TRAIN_KEYS) for r in map(json.loads, compact.read_text().splitlines())
                   if r["kind"] == "train")


def test_replayed_tables_and_figures_equal_the_originals(exported, original):
    out, _ = exported
    before = analysis.load_runs([original / "grpo", original / "gxpo"])
    after = analysis.load_runs(out)
    assert [r.name for r in after] == [r.name for r in before]
    for a, b in zip(after, before):
        assert (a.config, a.eval, a.final_eval, a.shutoff_step) == (b.config, b.eval, b.final_eval, b.shutoff_step)
    tables = [lambda runs: analysis.speedup_table(runs, resamples=50), analysis.final_table,
              analysis.activity_table,
              lambda runs: pd.DataFrame([analysis.mechanism_summary(r) for r in runs])]
    for table in tables:
        pd.testing.assert_frame_equal(table(after), table(before))
    xs = ("step", "seconds", "cumulative_backward_passes")
    for figure in (lambda runs: analysis.plot_curves(runs, "pass@1", xs=xs),
                   analysis.plot_diagnostics, analysis.plot_mechanism):
        assert _figure_data(figure(after)) == _figure_data(figure(before))
    assert any(trace.get("y") for trace in _figure_data(analysis.plot_diagnostics(after)))


def test_bad_input_is_a_clear_error(tmp_path, original):
    with pytest.raises(ValueError, match="not a finished run"):
        shipped.export_run(original / "unfinished", tmp_path)
    with pytest.raises(ValueError, match="no finished run"):
        shipped.export_runs(original / "unfinished", tmp_path)
    with pytest.raises(ValueError, match="name='no-such-study' is invalid"):
        shipped.shipped_results("no-such-study")
    with pytest.raises(ValueError, match="holds no replay.json"):
        shipped.read_index(tmp_path)


@pytest.mark.parametrize("name", ["nb02", "seed-study"])
def test_shipped_studies_load_as_runs(name):
    folder = shipped.shipped_results(name)
    index = shipped.read_index(folder)
    runs = analysis.load_runs(folder)
    assert sorted(r.name for r in runs) == sorted(index["runs"]) and all(r.eval and r.train for r in runs)
    for run in runs:   # re-exported under today's names: every config.json builds a TrainConfig as it is
        TrainConfig.from_dict(runlog.read_config(run.folder)).validate()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 60_000 * len(runs)       # tens of KB per run
