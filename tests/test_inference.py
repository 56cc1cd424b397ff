"""Paired tests, TOST, Holm, the two-level bootstrap, and the verdict study's matched control and families."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from gxpo_lib.analysis import inference, verdict
from gxpo_lib.analysis.stats import t_critical


def test_paired_difference_by_hand():
    d = inference.paired_difference([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 2.0, 5.0])   # d = 1, 0, 1, -1
    sd = math.sqrt(((0.75**2) * 2 + 0.25**2 + 1.25**2) / 3)
    assert d["mean"] == pytest.approx(0.25) and d["sd"] == pytest.approx(sd)
    half = t_critical(3) * sd / 2
    assert d["ci"] == pytest.approx((0.25 - half, 0.25 + half))
    assert d["t"] == pytest.approx(0.25 / (sd / 2))


def test_p_value_at_the_critical_t_is_the_level():
    # a difference whose t equals the 95% critical value has two-sided p = 0.05
    t = t_critical(4)
    d = inference.paired_difference([t * math.sqrt(5) * x for x in (1.0, 1.0, 1.0, 1.0, 1.0)], [0.0] * 5)
    assert d["p"] == 0.0  # no spread: decided
    diffs = np.array([1.0, -1.0, 1.0, -1.0, 0.0])
    shift = t * diffs.std(ddof=1) / math.sqrt(5)
    d = inference.paired_difference((diffs + shift).tolist(), [0.0] * 5)
    assert d["p"] == pytest.approx(0.05, abs=1e-9)
    assert d["ci"][0] == pytest.approx(0.0, abs=1e-12)


def test_tost_agrees_with_the_90_percent_interval():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = rng.normal(0.5, 0.02, 5), rng.normal(0.5 + rng.uniform(-0.03, 0.03), 0.02, 5)
        d = inference.paired_difference(a, b)
        tost = inference.equivalence(d, 0.02)
        inside = -0.02 < tost["ci90"][0] and tost["ci90"][1] < 0.02
        assert (tost["p"] < 0.05) == inside


def test_holm_by_hand_and_order_kept():
    assert inference.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert inference.holm([0.5, None, 0.001]) == [pytest.approx(0.5), None, pytest.approx(0.002)]


def test_two_level_bootstrap_of_a_constant_shift_is_the_shift():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, size=(5, 40))
    assert inference.two_level_bootstrap(a, a) == (0.0, 0.0)
    low, high = inference.two_level_bootstrap(a + 0.1, a)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)
    low, high = inference.two_level_bootstrap(a, rng.uniform(0, 1, size=(5, 40)))
    assert low < high


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="equal-length"):
        inference.paired_difference([1.0], [1.0])
    with pytest.raises(ValueError, match="margin"):
        inference.equivalence(inference.paired_difference([1, 2], [0, 2]), 0)


def _record(algorithm, lr, seed, update_norm, final, k=5, q_mode="per_coordinate", step_scale=1.0, counts=None):
    counts = counts or [round(final * 8)] * 10
    return {"name": f"{algorithm}-{lr}-{seed}", "config": {"algorithm": algorithm, "k": k, "lr": lr, "seed": seed,
            "q_mode": q_mode, "step_scale": step_scale, "optimizer": "adamw", "steps": 60},
            "train": [{"update_norm": update_norm}] * 3, "eval": [],
            "final": {"pass@1": final, "samples": 8, "correct_counts": counts}}


def test_arm_names():
    assert verdict.arm({"algorithm": "grpo", "step_scale": 1.0}) == "GRPO"
    assert verdict.arm({"algorithm": "grpo", "step_scale": 3.21}) == "GRPO x3.21"
    assert verdict.arm({"algorithm": "gxpo", "k": 5, "q_mode": "scalar"}) == "GXPO K=5 scalar-q"
    assert verdict.arm({"algorithm": "gxpo", "k": 10, "optimizer": "sgd"}) == "SGD GXPO K=10"


def test_matched_scale_is_the_mean_per_seed_update_norm_ratio(tmp_path):
    records = [_record("grpo", 1e-4, s, 1.0 + s, 0.5) for s in range(5)]
    with pytest.raises(ValueError, match="not finished"):
        verdict.matched_scale(records, 1e-4)
    records += [_record("gxpo", 1e-4, s, 3.0 * (1.0 + s) + s * 0.1, 0.5) for s in range(5)]
    result = verdict.matched_scale(records, 1e-4)
    expected = np.mean([(3.0 * (1 + s) + s * 0.1) / (1 + s) for s in range(5)])
    assert result["step_scale"] == float(f"{expected:.3g}")
    grid = tmp_path / "study.yaml"
    grid.write_text("# a study\npreset: smoke\nout: runs/x\ngrids:\n"
                    "- base: {algorithm: grpo}\n  grid:\n    seed: [0]\n")
    verdict.append_matched_arm(grid, 1e-4, result["step_scale"])
    assert verdict.append_matched_arm(grid, 1e-4, result["step_scale"]) == "already there"
    loaded = yaml.safe_load(grid.read_text())
    assert loaded["grids"][-1]["base"] == {"algorithm": "grpo", "lr": 1e-4, "step_scale": result["step_scale"]}
    assert grid.read_text().startswith("# a study")


def test_family_rows_pair_by_seed_and_correct_with_holm():
    records = []
    for s in range(5):
        records += [_record("grpo", 1e-4, s, 1.0, 0.40 + 0.01 * s), _record("gxpo", 1e-4, s, 3.0, 0.50 + 0.01 * s),
                    _record("gxpo", 1e-4, s, 3.0, 0.50 + 0.01 * s + 0.001 * (-1) ** s, q_mode="scalar")]
    scale = verdict.matched_scale(records, 1e-4)["step_scale"]
    records += [_record("grpo", 1e-4, s, 3.0, 0.50 + 0.01 * s + 0.002 * (-1) ** s, step_scale=scale) for s in range(5)]
    rows = verdict.adamw_family(records, lrs=[1e-4, 3e-4])
    by = {(r["comparison"], r["lr"]): r for r in rows}
    assert by[("GXPO K=5 - GRPO", 1e-4)]["mean"] == pytest.approx(0.10)
    assert by[("GXPO K=5 - GRPO", 1e-4)]["verdict"] == "higher"
    assert "equivalent" in by[("GXPO K=5 - scalar-q", 1e-4)]["verdict"]
    assert by[("GXPO K=5 - GRPO", 3e-4)]["verdict"] == "pending"
    assert verdict.match_check(records, 1e-4)["ok"]
    assert "| GXPO K=5 - GRPO | 0.0001 | 5 |" in verdict.markdown(rows)


def _curve_record(algorithm, lr, seed, curve, k=5):
    record = _record(algorithm, lr, seed, 1.0, curve[-1], k=k)
    passes_per_step = 3 if algorithm == "gxpo" else 1
    record["eval"] = [{"step": 5 * i, "pass@1": v, "cumulative_backward_passes": 5 * i * passes_per_step,
                       "cpu_seconds": float(i)} for i, v in enumerate(curve)]
    return record


def test_speedup_counts_steps_to_the_reference_peak_with_its_baseline():
    grpo = {s: _curve_record("grpo", 1e-4, s, [0.3, 0.35, 0.4, 0.45 + 0.01 * s]) for s in range(5)}
    fast = {s: _curve_record("gxpo", 1e-4, s, [0.3, 0.5, 0.5, 0.5]) for s in range(5)}
    result = verdict.speedup(grpo, fast, draws=200)
    assert result["target"] == pytest.approx(0.47) and result["step_method"] == 5
    assert result["speedup_steps"] == pytest.approx(15 / 5) and result["speedup_passes"] == pytest.approx(15 / 15)
    assert result["reached_share"] == 1.0 and 0 < result["baseline_share"] <= 1.0
    slow = {s: _curve_record("gxpo", 1e-4, s, [0.3, 0.3, 0.3, 0.3]) for s in range(5)}
    assert verdict.speedup(grpo, slow, draws=50)["reached_share"] == 0.0


def test_best_lr_is_chosen_on_late_validation_and_the_report_renders():
    records = [_curve_record("grpo", lr, s, [0.3, 0.4, 0.5, value]) for lr, value in ((1e-4, 0.4), (3e-4, 0.6))
               for s in range(5)]
    assert verdict.best_lr(records, "GRPO", [1e-4, 3e-4]) == 3e-4
    assert verdict.best_lr(records, "GRPO", [1e-4, 3e-4, 1e-3]) is None      # 1e-3 not run yet: no best
    assert verdict.best_lr(records[:-1], "GRPO", [1e-4, 3e-4]) is None         # a seed missing: no best either
    text = verdict.report(records)
    assert "### Family 1: AdamW" in text and "pending" in text and "### Family 3: best-tuned" in text


def _study(horizon=False):
    """A small study: GRPO at two lrs, GXPO K=5 (3x GRPO's update, +0.05), scalar-q (same), the matched arm."""
    records = []
    for s in range(5):
        for lr, base in ((1e-4, 0.40), (3e-4, 0.45)):
            records += [_curve_record("grpo", lr, s, [0.3, 0.35, 0.4, base + 0.01 * s]),
                        _curve_record("gxpo", lr, s, [0.3, 0.45, 0.5, base + 0.05 + 0.01 * s])]
            records[-1]["train"] = [{"update_norm": 3.0}] * 3
            records[-2]["train"] = [{"update_norm": 1.0}] * 3
    return records


def test_step_size_points_place_each_arm_at_its_effective_lr():
    records = _study()
    points = {(p["arm"], p["lr"]): p for p in verdict.step_size_points(records)}
    assert points[("GRPO", 1e-4)]["effective_lr"] == pytest.approx(1e-4)
    assert points[("GXPO K=5", 1e-4)]["ratio"] == pytest.approx(3.0)
    assert points[("GXPO K=5", 3e-4)]["effective_lr"] == pytest.approx(9e-4)
    mean, (low, high) = verdict.mean_interval([0.45, 0.46, 0.47, 0.48, 0.49])
    assert points[("GXPO K=5", 1e-4)]["pass@1"] == pytest.approx(mean) and low < mean < high


def test_envelope_takes_the_best_lr_at_each_budget():
    records = _study()
    env = verdict.envelope(records, "GRPO", [1e-4, 3e-4])
    assert [e["step"] for e in env] == [0, 5, 10, 15]
    assert env[-1]["lr"] == 3e-4 and env[-1]["pass@1"] == pytest.approx(0.47)
    by_passes = verdict.envelope(records, "GXPO K=5", [1e-4, 3e-4], x="cumulative_backward_passes")
    assert by_passes[-1]["cumulative_backward_passes"] == 45 and by_passes[-1]["pass@1"] == pytest.approx(0.52)
    with pytest.raises(ValueError, match="x='backward_passes' is invalid: allowed .*'cumulative_backward_passes'"):
        verdict.envelope(records, "GXPO K=5", [1e-4, 3e-4], x="backward_passes")   # a step's own count: no axis


def test_horizon_family_keeps_200_step_runs_apart_from_60_step_runs():
    records = _study()
    long_runs = []
    for s in range(3):
        for algorithm, final in (("grpo", 0.50), ("gxpo", 0.60)):
            record = _curve_record(algorithm, 3e-4, s, [0.3, final + 0.01 * s])
            record["config"]["steps"] = 200
            record["train"] = [{"update_norm": 1.0, "gate_open": True, "step": 1},
                               {"update_norm": 1.0, "gate_open": False, "step": 2}]
            long_runs.append(record)
    rows = verdict.horizon_family(records + long_runs)
    first = rows[0]
    assert first["comparison"] == "GXPO K=5 - GRPO, 200 steps" and first["seeds"] == [0, 1, 2]
    assert first["mean"] == pytest.approx(0.10)          # the 200-step runs, not the 60-step ones (+0.05)
    assert verdict.horizon_lrs(records + long_runs) == [3e-4]
    assert verdict.gate_shut_step(long_runs[1]) == 2 and verdict.gate_shut_step(records[0]) is None
    assert verdict.family_table(records + long_runs, [("x", "GXPO K=5", "GRPO", 3e-4, False)])[0]["mean"] \
        == pytest.approx(0.05)                            # families 1-4 read the 60-step runs only


def test_lesson_and_generated_blocks_are_computed_and_stable():
    records = _study()
    text = verdict.lesson(records)
    assert "**H3, the paper's comparison**" in text and "0.0001 (+0.050)" in text
    assert "have no data yet" in text                     # no matched arm: the answer says it is pending
    doc = "intro\n<!-- verdict-lesson: generated -->\nstale\n<!-- /verdict-lesson -->\nend\n"
    rendered = verdict.render_blocks(doc, records)
    assert "stale" not in rendered and text in rendered and rendered.endswith("<!-- /verdict-lesson -->\nend\n")
    assert verdict.render_blocks(rendered, records) == rendered
    claims = verdict.claims_table(records, draws=20)
    assert claims.count("\n| ") == 4 and "GXPO K=5 − GRPO by lr" in claims
