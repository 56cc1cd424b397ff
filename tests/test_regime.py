"""The regime study's helpers (gxpo_lib.regime): compact records, the cell table, verdicts, the matched step.

Most tests build small records by hand, so every number in the table can be recomputed here; one test
exports a real (tiny) training run, and one reads the shipped study in data/results/regime.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gxpo_lib import regime, regime_plots, toy
from gxpo_lib.analysis import t_critical
from gxpo_lib.extrapolation import geometric_scale
from gxpo_lib.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "results" / "regime"


def record(algorithm="grpo", lr=1e-3, seed=0, curve=(0.4, 0.5, 0.6), final=0.5, passes_per_step=1,
           seconds_per_step=1.0, multiplier=None, shutoff=None, **config):
    """A compact record by hand: evaluations at steps 0, 10, 20, ... with pass@1 `curve` after step 0."""
    steps = 10 * len(curve)
    eval_steps = [0] + [10 * (i + 1) for i in range(len(curve))]
    active = [algorithm != "grpo" and (shutoff is None or s < shutoff) for s in range(1, steps + 1)]
    base = {"algorithm": algorithm, "k": 5, "alpha": 0.5, "retention": "grad", "lr": lr, "step_scale": 1.0,
            "ppo_epochs": 1, "gate_tau": 0.5, "gate_init": "unit", "seed": seed, "steps": steps}
    return {
        "version": regime.RECORD_VERSION, "name": f"{algorithm}-{lr}-{seed}", "config": base | config,
        "eval": {"step": eval_steps, "pass@1": [0.3, *curve],
                 "backward_passes": [s * passes_per_step for s in eval_steps],
                 "seconds": [s * seconds_per_step for s in eval_steps],
                 "cpu_seconds": [0.0] * len(eval_steps)},
        "train": {"step": list(range(1, steps + 1)),
                  "backward_passes": [s * passes_per_step for s in range(1, steps + 1)],
                  "seconds": [s * seconds_per_step for s in range(1, steps + 1)],
                  "active": active, "gate_open": [True] * steps, "gate_z": [None] * steps,
                  "grad_norm": [0.1] * steps, "reward_mean": [0.5] * steps,
                  "r_mean": [0.9 if a else None for a in active],
                  "cos_g0_g1": [0.8 if a else None for a in active],
                  "effective_multiplier": [multiplier if a else None for a in active],
                  "ratio_clip_frac": [0.01 if a else None for a in active]},
        "final": {"benchmark": "arith", "problems": 64, "samples": 4, "pass@1": final, "pass@1_ci": [0, 1],
                  "pass@4": final},
        "shutoff_step": shutoff,
    }


def test_method_labels_tell_every_control_apart():
    assert regime.method_label({"algorithm": "grpo"}) == "GRPO"
    assert regime.method_label({"algorithm": "grpo", "ppo_epochs": 3}) == "GRPO x3 epochs"
    assert regime.method_label({"algorithm": "grpo", "step_scale": 1.2}) == "GRPO matched step"
    assert regime.method_label({"algorithm": "gxpo", "k": 10, "retention": "update"}) == "GXPO K=10 update"
    warm = {"algorithm": "gxpo", "k": 5, "gate_init": "warmup"}
    assert regime.method_label(warm) == "GXPO K=5 grad gate warmup"
    assert regime.method_label({"algorithm": "sfpo", "k": 3}) == "SFPO K=3"


def test_cell_table_final_and_peak_with_t_intervals():
    finals = [0.40, 0.50, 0.45]
    runs = [record(seed=s, final=f, curve=(0.4, 0.6 + 0.01 * s, 0.5)) for s, f in enumerate(finals)]
    row = regime.cell_table(runs, resamples=50).iloc[0]
    half = t_critical(2) * np.std(finals, ddof=1) / math.sqrt(3)
    assert row["method"] == "GRPO" and row["seeds"] == 3
    assert row["final"] == pytest.approx(np.mean(finals))
    mean = np.mean(finals)
    assert (row["final_lo"], row["final_hi"]) == pytest.approx((mean - half, mean + half))
    assert row["peak"] == pytest.approx(np.mean([0.60, 0.61, 0.62]))
    assert row["backward_passes"] == 30 and row["steps"] == 30
    assert math.isnan(row["r_mean"]) and row["shut_runs"] == 0  # GRPO never extrapolates (None in pandas)


def test_speedup_to_grpo_peak_same_and_best_lr():
    # GRPO at lr 1e-3 peaks at 0.6 (step 30); at lr 2e-3 it peaks at 0.7 (step 20): the best lr is 2e-3.
    grpo_a = [record(lr=1e-3, seed=s, curve=(0.4, 0.5, 0.6)) for s in range(3)]
    grpo_b = [record(lr=2e-3, seed=s, curve=(0.5, 0.7, 0.6)) for s in range(3)]
    # GXPO at lr 1e-3 reaches 0.6 at step 10 with 3 passes a step: 3x fewer steps, 1x the passes.
    gxpo = [record("gxpo", lr=1e-3, seed=s, curve=(0.6, 0.6, 0.55), passes_per_step=3, multiplier=1.2)
            for s in range(3)]
    table = regime.cell_table(grpo_a + grpo_b + gxpo, resamples=100)
    assert regime.best_grpo_lr(grpo_a + grpo_b + gxpo) == 2e-3
    row = table[table["method"] == "GXPO K=5 grad"].iloc[0]
    assert row["same_lr_speedup_step"] == pytest.approx(3.0) and row["same_lr_step"] == 10
    assert row["same_lr_speedup_backward_passes"] == pytest.approx(1.0)
    assert row["same_lr_reached_share"] == 1.0  # identical seeds: every resample is the same
    assert (row["same_lr_speedup_step_lo"], row["same_lr_speedup_step_hi"]) == pytest.approx((3.0, 3.0))
    # The best lr's GRPO peak (0.7) is never reached.
    assert row["best_lr_reached_share"] == 0.0 and math.isnan(row["best_lr_speedup_step"])  # None in pandas
    assert row["alpha_q"] == pytest.approx(1.2) and row["cos_g0_g1"] == pytest.approx(0.8)
    ks, lrs, values, texts = regime.speedup_map(table)
    assert ks == [5] and lrs == [1e-3, 2e-3]
    assert values == [[pytest.approx(3.0), None]] and texts[0][1] == "not run"


def test_speedup_interval_resamples_seeds():
    grpo = [record(seed=s, curve=(0.4, 0.5, c)) for s, c in enumerate((0.55, 0.6, 0.65))]
    gxpo = [record("gxpo", seed=s, curve=(0.5, c, 0.5), multiplier=1.0)
            for s, c in enumerate((0.5, 0.6, 0.7))]
    out = regime.speedup_interval(grpo, gxpo, resamples=400)
    assert out["target"] == pytest.approx(0.6)       # GRPO's seed-mean peak (step 30)
    assert out["speedup_step"] == pytest.approx(1.5)  # GXPO's seed mean reaches 0.6 at step 20
    assert 0 < out["reached_share"] < 1               # some seed draws miss the target
    assert out["speedup_step_lo"] <= 1.5 <= out["speedup_step_hi"]
    itself = regime.speedup_interval(grpo, grpo, resamples=100)  # the reference against itself: exactly 1
    assert itself["reached_share"] == 1.0 and itself["speedup_step_lo"] == itself["speedup_step_hi"] == 1.0


def test_compare_verdicts_with_welch_interval():
    grpo = [record(seed=s, final=f) for s, f in enumerate((0.40, 0.42, 0.44))]
    better = [record("gxpo", seed=s, final=f, multiplier=1.0) for s, f in enumerate((0.60, 0.61, 0.62))]
    close = [record("gxpo", lr=2e-3, seed=s, final=f, multiplier=1.0)
             for s, f in enumerate((0.30, 0.45, 0.55))]
    grpo2 = [record(lr=2e-3, seed=s, final=f) for s, f in enumerate((0.40, 0.42, 0.44))]
    records = grpo + better + close + grpo2
    v = regime.compare(records, "GXPO K=5 grad", 1e-3)
    a, b = np.array([0.60, 0.61, 0.62]), np.array([0.40, 0.42, 0.44])
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 3
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    half = t_critical(int(df)) * math.sqrt(va + vb)
    assert v["verdict"] == "higher" and v["difference"] == pytest.approx(0.19)
    assert (v["lo"], v["hi"]) == pytest.approx((0.19 - half, 0.19 + half))
    assert regime.compare(records, "GXPO K=5 grad", 2e-3)["verdict"] == "undecided"
    assert regime.compare(records, "GRPO", 1e-3, reference="GXPO K=5 grad")["verdict"] == "lower"
    missing = regime.compare(records, "GXPO K=5 update", 1e-3)
    assert missing["verdict"] == "missing" and missing["difference"] is None
    with pytest.raises(ValueError, match="metric"):
        regime.compare(records, "GXPO K=5 grad", 1e-3, metric="best")


def test_matched_step_multiplier_and_its_sweep(tmp_path):
    gxpo = [record("gxpo", lr=2e-3, seed=s, multiplier=m) for s, m in enumerate((1.0, 1.2, 1.4))]
    assert regime.matched_step_multiplier(gxpo, 2e-3) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="lr=0.001"):
        regime.matched_step_multiplier(gxpo, 1e-3)
    path = tmp_path / "regime-matched.yaml"
    scale = regime.write_matched_sweep(gxpo, 2e-3, path, base_from=ROOT / "sweeps" / "regime-grpo.yaml")
    assert scale == 1.2
    sweep = load_sweep(path)  # validated like any sweep file
    names = [name for name, _ in sweep.runs()]
    assert names[0] == "algorithm=grpo_step_scale=1.2_lr=0.002_seed=0" and len(names) == 3
    assert all(s["step_scale"] == 1.2 and s["lr"] == 2e-3 for _, s in sweep.runs())


def test_only_extrapolating_steps_count_in_the_mechanism():
    run = record("gxpo", multiplier=1.5, shutoff=11)  # active on steps 1-10 of 30
    mech = regime.mechanism(run)
    assert mech["active_steps"] == 10 and mech["alpha_q"] == pytest.approx(1.5)
    assert mech["clamp_frac"] == pytest.approx(0.01)


def test_export_of_a_real_run_and_round_trip(tmp_path):
    from gxpo_lib.trainer import TrainConfig, read_metrics, train

    torch.set_num_threads(1)
    root = tmp_path / "runs"
    train(TrainConfig(algorithm="gxpo", steps=2, eval_every=1, batch_prompts=2, group_size=4, eval_problems=4,
                      eval_samples=2, final_eval_sets=("arith",), final_eval_problems=4, final_eval_samples=2,
                      checkpoint_every=2, progress=False), root / "gxpo-run")
    (root / "unfinished").mkdir()
    (root / "unfinished" / "metrics.jsonl").write_text('{"kind": "eval", "step": 0, "pass@1": 0.5}\n')
    written = regime.export_study(root, tmp_path / "out", {"note": "test"})
    assert [p.name for p in written] == ["gxpo-run.json"]
    study = json.loads((tmp_path / "out" / "study.json").read_text())
    assert study == {"runs": ["gxpo-run"], "unfinished": ["unfinished"], "note": "test"}
    [loaded] = regime.load_study(tmp_path / "out")
    rows = read_metrics(root / "gxpo-run" / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert loaded["eval"]["step"] == [0, 1, 2]
    assert loaded["train"]["backward_passes"] == [r["cumulative_backward_passes"] for r in train_rows]
    for kept, row in zip(loaded["train"]["effective_multiplier"], train_rows, strict=True):
        value = row["effective_multiplier"]
        assert kept == (None if value is None else pytest.approx(value, rel=1e-4))
    final = json.loads((root / "gxpo-run" / "final_eval.json").read_text())["arith"]
    assert loaded["final"]["pass@1"] == pytest.approx(final["pass@1"])
    assert loaded["final"]["pass@2"] == pytest.approx(final["pass@2"], rel=1e-4)
    assert loaded["config"]["algorithm"] == "gxpo" and loaded["config"]["lr"] == 2e-3
    with pytest.raises(ValueError, match="not a finished run"):
        regime.compact_run(root / "unfinished")


def test_bad_folders_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="runs_root"):
        regime.export_study(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="folder"):
        regime.load_study(tmp_path / "missing")
    with pytest.raises(ValueError, match="reference"):
        regime.speedup_map(regime.cell_table([record()], resamples=10), reference="median")


def test_toy_race_gives_every_method_the_same_passes():
    race = regime.toy_race(1.0, steps=10, k=5, alpha=0.5, noise=0.02)
    assert len(race["curves"]) == 5 and "GXPO, scalar q" in race["curves"]
    assert {c["passes"][-1] for c in race["curves"].values()} == {30}
    land = toy.DiagonalQuadratic(h=(1.0, 0.02))
    gd = land(toy.gd_path(land, lr=1.0, steps=30)).tolist()
    assert race["curves"]["GD"]["loss"] == pytest.approx(gd)
    gxpo = toy.run_rule("gxpo", land, lr=1.0, steps=10, k=5, alpha=0.5)
    # the displacement-matched multiplier: GXPO's update in plain steps (its first probe is one plain step)
    measured = [i["update_norm"] / i["probe_step_norm"] for i in gxpo.infos if i["active"]]
    assert race["multiplier"] == pytest.approx(np.mean(measured))
    assert race["multiplier"] > 2.0   # about 1 + 2 alpha q-bar: far above the old alpha q-bar control


def test_coordinate_q_flat_direction_extrapolates_further():
    out = regime.coordinate_q((1.0, 0.3), 0.3, k=5, alpha=1.0)  # notebook 01's exactness case
    assert out["r"] == pytest.approx([0.7, 0.91])
    expected = geometric_scale(torch.tensor([0.7, 0.91], dtype=torch.float64), 5)
    assert out["q"] == pytest.approx(expected.tolist())
    assert out["q"][1] > out["q"][0]
    snap = toy.lookahead_snapshot(toy.DiagonalQuadratic(), lr=0.3, k=5, alpha=1.0)
    assert out["q"] == pytest.approx(snap["q"].tolist())


def test_shipped_study_is_small_finished_and_loads():
    study = json.loads((SHIPPED / "study.json").read_text())
    records = regime.load_study(SHIPPED)
    assert len(records) == len(study["runs"]) >= 1
    for path in SHIPPED.glob("*.json"):
        assert path.stat().st_size < 60_000, path.name  # tens of KB per run at most
    for rec in records:
        assert rec["train"]["step"][-1] == rec["config"]["steps"] >= 60
        assert rec["eval"]["step"][-1] == rec["config"]["steps"]
    table = regime.cell_table(records, resamples=20)
    assert {"GXPO K=5 grad"} <= set(table["method"]) and set(table["lr"]) >= {3e-4, 2e-3}
    if study.get("note") != "interim":  # a study marked final must hold the grid's minimum
        assert len(records) >= 12 and {"GRPO"} <= set(table["method"])
        assert (table[table["method"] == "GRPO"]["seeds"] >= 3).all()


def test_gate_replay_unit_versus_warmup_cold_start():
    run = record("gxpo", multiplier=1.0)  # 30 extrapolating steps
    norms = [0.05] * 10 + [0.1] * 20      # small corrective norms that double at step 11
    run["train"]["grad_norm"] = norms
    # From mu = sigma = 1 the doubled signal still scores z < 0: the unit gate never trips.
    assert regime.replay_gate(run, "unit") is None
    # Started from the warm-up observations (sigma floored at 0.01), the doubling is a large z at once.
    assert regime.replay_gate(run, "warmup") == 12
    run["train"]["grad_norm"] = [1.0] * 5 + [5.0] * 25  # a surge the unit gate sees too
    assert regime.replay_gate(run, "unit") == 7
    assert regime.replay_gate(run) == 7                       # the run's own gate_init (unit by default)
    run["config"]["gate_init"] = "warmup"
    run["train"]["grad_norm"] = norms
    assert regime.replay_gate(run) == 12


def test_markdown_table_has_a_row_per_cell_with_intervals():
    grpo = [record(seed=s, final=f, curve=(0.4, 0.5, 0.6)) for s, f in enumerate((0.40, 0.50, 0.45))]
    gxpo = [record("gxpo", seed=s, curve=(0.4, 0.45, 0.5), multiplier=1.1, shutoff=21) for s in range(3)]
    text = regime.markdown_table(regime.cell_table(grpo + gxpo, resamples=50))
    lines = text.splitlines()
    assert len(lines) == 2 + 2 and lines[0].count("|") == lines[2].count("|") == 16
    grpo_row, gxpo_row = lines[2], lines[3]
    assert grpo_row.startswith("| GRPO | 0.001 | 3 | 0.450 [") and grpo_row.endswith("| - |")
    assert "not reached (0% of draws)" in gxpo_row and "| 1.10 |" in gxpo_row
    assert gxpo_row.endswith("| 3 of 3 (step 21) |")


def test_every_regime_figure_titles_its_axes_and_writes_powers_of_ten():
    records = [record(lr=lr, seed=s) for lr in (1e-4, 1e-3) for s in range(2)]
    records += [record("gxpo", lr=lr, seed=s, multiplier=1.1, passes_per_step=3) for lr in (1e-4, 1e-3)
                for s in range(2)]
    table = regime.cell_table(records, resamples=20)
    figures = [regime_plots.plot_pass_vs_lr(table), regime_plots.plot_diagnostics_vs_lr(table),
               regime_plots.plot_speedup_map(table), regime_plots.plot_toy_race(regime.toy_race(0.3, steps=5))]
    for fig in figures:
        axes = [v for k, v in fig.layout.to_plotly_json().items() if k.startswith(("xaxis", "yaxis"))]
        assert axes and all(a.get("title", {}).get("text") for a in axes), fig.layout.title.text
        assert all(a.get("exponentformat") == "power" for a in axes if a.get("type") == "log")


def test_a_scaled_grpo_run_joins_the_matched_step_of_the_k_whose_alpha_q_it_equals():
    gxpo = [record("gxpo", seed=s, multiplier=1.1) for s in range(2)]
    gxpo += [record("gxpo", seed=s, multiplier=2.0, k=10) for s in range(2)]
    scaled = [record(seed=0, step_scale=1.1), record(seed=1, step_scale=1.12),   # within 5% of K=5's 1.1
              record(seed=0, step_scale=2.0), record(seed=0, step_scale=1.5)]
    labels = {key[0]: [r["config"]["step_scale"] for r in runs] for key, runs in regime.cells(gxpo + scaled).items()}
    assert labels["GRPO matched step"] == [1.1, 1.12]
    assert labels["GRPO matched step K=10"] == [2.0] and labels["GRPO step x1.5"] == [1.5]
    assert regime.matched_step_multiplier(gxpo, 1e-3, k=10) == pytest.approx(2.0)
