"""gxpo_lib.analysis on hand-made run folders: loading (ours and the authors' verl format), seed bands,
the speed-up table, the final table, grouping, discovery and the figures."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gxpo_lib import analysis
from gxpo_lib.analysis import (
    activity_table,
    band,
    final_table,
    find_run_folders,
    format_speedups,
    group_runs,
    load_run,
    load_runs,
    resolve_run_dirs,
    speedup_table,
    t_critical,
)
from gxpo_lib.rl import runlog
from gxpo_lib.rl.evaluation import bootstrap_ci


# ---------------------------------------------------------------------------------------------------
# Hand-made run folders in the trainer's format
# ---------------------------------------------------------------------------------------------------
def write_run(folder, algorithm="grpo", seed=0, evals=(), train=(), final=None, summary=None, **config):
    """A run folder as gxpo_lib.rl.trainer writes it.

    evals: (step, pass@1, seconds, cumulative backward passes) tuples (CPU seconds: half the seconds, as on
    a machine shared with another job); train: dicts merged into train rows.
    """
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"algorithm": algorithm, "seed": seed, "k": 5, "alpha": 0.5, "tau": 0.5, "model": "tiny",
                "steps": 30, "checkpoint_every": 5} | config
    (folder / "config.json").write_text(json.dumps(settings))
    rows = [{"kind": "eval", "step": s, "pass@1": p, "pass@1_ci": [p - 0.1, p + 0.1], "seconds": t,
             "cpu_seconds": t / 2, "cumulative_backward_passes": bp} for s, p, t, bp in evals]
    rows += [{"kind": "train", **row} for row in train]
    if final is not None:
        (folder / "final_eval.json").write_text(json.dumps(final))
    if summary is not None:
        (folder / "run_summary.json").write_text(json.dumps(summary))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def curve_rows(values, seconds_per_step=10.0, passes_per_step=1):
    """Eval tuples at steps 0, 10, 20, ... for the given pass@1 values."""
    return [(10 * i, v, 10 * i * seconds_per_step, 10 * i * passes_per_step) for i, v in enumerate(values)]


# ---------------------------------------------------------------------------------------------------
# Loading our own folders
# ---------------------------------------------------------------------------------------------------
def test_own_run_eval_rows_get_cumulative_passes_and_train_rows_the_jump_ratio(tmp_path):
    train = [{"step": 1, "backward_passes": 3, "cumulative_backward_passes": 3, "gate_open": True,
              "jump_norm": 0.5, "param_norm": 10.0},
             {"step": 2, "backward_passes": 3, "cumulative_backward_passes": 6, "gate_open": False},
             {"step": 3, "backward_passes": 1, "cumulative_backward_passes": 7, "gate_open": False}]
    folder = write_run(tmp_path / "run", "gxpo", evals=[(0, 0.2, 0.0, 0), (3, 0.4, 12.0, 7)], train=train,
                       final={"arith": {"pass@1": 0.5, "pass@1_ci": [0.4, 0.6]}})
    with open(folder / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "st')  # a torn last line (killed mid-write) is skipped
    with pytest.warns(RuntimeWarning, match="torn last line"):
        run = load_run(folder)
    assert [r["cumulative_backward_passes"] for r in run.eval] == [0, 7]
    assert not any("backward_passes" in r for r in run.eval)     # one name per thing: no per-step count here
    assert [r["step"] for r in run.train] == [1, 2, 3]
    assert run.train[0]["jump_over_param_norm"] == pytest.approx(0.05)
    assert run.shutoff_step == 3            # gate closed during step 2: no extrapolation from step 3
    assert run.final_eval["arith"]["pass@1"] == 0.5 and run.algorithm == "gxpo" and run.source == "gxpo_lib"
    write_run(tmp_path / "run", "gxpo", evals=[(0, 0.2, 0.0, 0)], train=train, summary={"shutoff_step": 9})
    assert load_run(tmp_path / "run").shutoff_step == 9  # notebook 03's summary wins


def test_folder_without_metrics_is_a_value_error_naming_it(tmp_path):
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(ValueError, match="empty-run"):
        load_run(tmp_path / "empty-run")
    with pytest.raises(ValueError, match="nowhere"):
        load_runs([str(tmp_path / "nowhere")])


# ---------------------------------------------------------------------------------------------------
# The authors' logs
# ---------------------------------------------------------------------------------------------------
MATH500 = "HuggingFaceH4/MATH-500"


def test_authors_flat_rows_map_onto_our_schema(tmp_path):
    """ray_trainer.fit's rows: {"step": N, **metrics}, validation keys in the row of their step."""
    rows = [
        {"step": 1, "actor/gxpo_enabled": 1.0, "actor/gxpo_r_mean": 0.8, "actor/gxpo_r_std": 0.1,
         "actor/gxpo_scale_mean": 2.5, "actor/gxpo_trigger_z": -0.3, "actor/gxpo_cos_g0_g1": 0.9,
         "actor/gxpo_disp2_norm": 2.0, "actor/gxpo_dispK_norm": 4.0, "actor/gxpo_inactive_frac": 0.25,
         "actor/gxpo_ratio_clip_frac": 0.05, "actor/gxpo_gslow_norm": 0.7, "actor/grad_norm": 0.7,
         "reposition/jump_norm": 2.0, "reposition/jump_relative_to_param_norm": 0.01,
         "actor/cumulative_bp": 3, "train/elapsed_hours": 0.5, "critic/score/mean": 0.4,
         "actor/entropy_loss": 1.2},
        {"step": 2, "actor/gxpo_enabled": 1.0, "actor/cumulative_bp": 6, "eff/cum_policy_grad_evals": 5.0,
         "train/elapsed_hours": 1.0, "time/cum_train_active_s": 3000.0, "actor/gxpo_r_mean": 0.7,
         f"val/pass_at_1/{MATH500}": 0.31, f"val/pass_at_16/{MATH500}": 0.62,
         f"val/pass_at_1/{MATH500}/seed0": 0.99, f"val/pass_at_1/{MATH500}/std": 0.5,
         "val/pass_at_1/math-ai/amc23": 0.11, "val/test_score/average": 0.2,
         f"val/test_score/{MATH500}": 0.98, "val/test_score/math-ai/minerva": 0.21},
        {"step": 3, "actor/gxpo_enabled": 0.0, "actor/gxpo_fallback_triggered": 1.0,
         "actor/gxpo_shutoff_step": 3.0, "actor/cumulative_bp": 7, "train/elapsed_hours": 1.2},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_run(tmp_path)
    assert run.source == "authors" and run.algorithm == "gxpo" and run.shutoff_step == 3
    first, second, third = run.train
    assert first["r_mean"] == 0.8 and first["r_std"] == 0.1 and first["scale_mean"] == 2.5
    assert first["gate_z"] == -0.3 and first["cos_g0_g1"] == 0.9 and first["dispK_norm"] == 4.0
    assert first["inactive_frac"] == 0.25 and first["ratio_clip_frac"] == 0.05 and first["gslow_norm"] == 0.7
    assert first["jump_norm"] == 2.0 and first["jump_over_param_norm"] == 0.01 and first["grad_norm"] == 0.7
    assert first["cumulative_backward_passes"] == 3 and first["seconds"] == pytest.approx(1800.0)
    assert first["active"] is True and first["reward_mean"] == 0.4 and first["entropy"] == 1.2
    # eff/cum_policy_grad_evals and time/cum_train_active_s win over the older keys
    assert second["cumulative_backward_passes"] == 5.0 and second["seconds"] == 3000.0
    assert third["active"] is False and third["gate_open"] is False
    [evaluation] = run.eval
    assert evaluation["step"] == 2 and evaluation["benchmark"] == MATH500
    assert evaluation["pass@1"] == 0.31 and evaluation["pass@16"] == 0.62       # the seed copy is skipped
    assert evaluation["cumulative_backward_passes"] == 5.0 and evaluation["seconds"] == 3000.0
    assert "backward_passes" not in evaluation
    assert evaluation["pass@1/math-ai/amc23"] == 0.11
    assert evaluation["pass@1/math-ai/minerva"] == 0.21      # test_score stands in where pass_at_1 is missing
    assert load_run(tmp_path, benchmark="amc").eval[0]["pass@1"] == 0.11
    with pytest.raises(ValueError, match="benchmark"):
        load_run(tmp_path, benchmark="aime")


def test_verl_file_logger_rows_and_validation_only_rows(tmp_path):
    """Upstream verl's FileLogger: {"step": N, "data": {...}}; val-core names; a step-0 validation row."""
    core = f"val-core/{MATH500}/acc"
    rows = [{"step": 0, "data": {f"{core}/mean@16": 0.30, f"{core}/best@16/mean": 0.60}},
            {"step": 1, "elapsed_seconds": 9.0, "data": {"actor/grad_norm": 1.5, "actor/cumulative_bp": 1,
                                                         "train/elapsed_hours": 0.25}},
            {"step": 2, "data": {"actor/grad_norm": 1.4, "actor/cumulative_bp": 2, "train/elapsed_hours": 0.5,
                                 f"{core}/mean@16": 0.40, f"{core}/best@16/mean": 0.70}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = load_run(tmp_path, config={"seed": 7})
    assert run.algorithm == "grpo" and run.seed == 7
    assert [r["step"] for r in run.train] == [1, 2]                       # step 0 holds validation only
    assert [(r["step"], r["pass@1"], r["pass@16"], r["cumulative_backward_passes"], r["seconds"])
            for r in run.eval] == \
        [(0, 0.30, 0.60, 0, 0.0), (2, 0.40, 0.70, 2, 1800.0)]


def test_authors_run_manifest_names_the_method(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "actor/grad_norm": 1.0}) + "\n")
    (tmp_path / "run_manifest.json").write_text(json.dumps({"method": "SFPO", "hyperparameters": {
        "actor_rollout_ref": {"actor": {"sfpo_inner_steps": 3, "sfpo_step_size": 0.8}}}}))
    run = load_run(tmp_path)
    assert (run.algorithm, run.config["k"], run.config["alpha"]) == ("sfpo", 3, 0.8)


# ---------------------------------------------------------------------------------------------------
# Seed bands
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("df, expected", [(1, 12.706204736), (2, 4.302652730), (4, 2.776445105),
                                          (10, 2.228138852), (30, 2.042272456)])
def test_t_critical_matches_the_table(df, expected):
    assert t_critical(df) == pytest.approx(expected, abs=1e-8)
    assert t_critical(df, level=0.5) < t_critical(df)


def test_band_over_three_seeds_equals_the_hand_computed_t_interval(tmp_path):
    values = {0: [0.2, 0.5, 0.6], 1: [0.3, 0.4, 0.9], 2: [0.1, 0.6, 0.6]}  # seed -> pass@1 at steps 0, 10, 20
    runs = [load_run(write_run(tmp_path / f"s{s}", seed=s, evals=curve_rows(v))) for s, v in values.items()]
    df = band(runs, "pass@1")
    assert list(df["step"]) == [0, 10, 20] and list(df["n"]) == [3, 3, 3]
    for i, row in df.iterrows():
        column = np.array([values[s][i] for s in values])
        half = 4.302652730 * column.std(ddof=1) / math.sqrt(3)
        assert row["mean"] == pytest.approx(column.mean())
        # the t interval, clipped to [0, 1] (pass@1 cannot be below 0: step 0's lower end would be -0.05)
        assert (row["lo"], row["hi"]) == pytest.approx((max(0, column.mean() - half), min(1, column.mean() + half)))
    boot = band(runs, "pass@1", interval="bootstrap")
    assert (boot["lo"][1], boot["hi"][1]) == pytest.approx(bootstrap_ci([0.5, 0.4, 0.6], n_boot=2000, seed=0))


def test_band_on_passes_interpolates_each_seed_inside_its_own_range(tmp_path):
    a = load_run(write_run(tmp_path / "a", evals=[(0, 0.0, 0.0, 0), (10, 1.0, 5.0, 30)]))
    b = load_run(write_run(tmp_path / "b", evals=[(0, 0.2, 0.0, 0), (10, 0.4, 5.0, 10)]))
    df = band([a, b], "pass@1", x="cumulative_backward_passes")
    assert list(df["cumulative_backward_passes"]) == [0, 10, 30] and list(df["n"]) == [2, 2, 1]
    assert list(df["mean"]) == pytest.approx([0.1, (1 / 3 + 0.4) / 2, 1.0])
    assert math.isnan(df["lo"][2])                            # one seed left: no interval
    hours = band([a], "pass@1", x="hours")
    assert list(hours["hours"]) == pytest.approx([0.0, 5 / 3600])
    with pytest.raises(ValueError, match="x="):
        band([a], "pass@1", x="minutes")


def test_band_reads_train_rows_with_cumulative_passes(tmp_path):
    train = [{"step": 1, "backward_passes": 3, "cumulative_backward_passes": 3, "reward_mean": 0.25},
             {"step": 2, "backward_passes": 1, "cumulative_backward_passes": 4, "reward_mean": 0.75}]
    run = load_run(write_run(tmp_path / "r", "gxpo", train=train))
    df = band([run], "reward_mean", x="cumulative_backward_passes")
    assert list(df["cumulative_backward_passes"]) == [3, 4] and list(df["mean"]) == [0.25, 0.75]


def test_the_per_step_count_is_never_an_x_axis(tmp_path):
    """``backward_passes`` is a step's own count: every function taking an x refuses it, naming the setting
    and the cumulative name to use instead."""
    run = load_run(write_run(tmp_path / "r", evals=[(0, 0.1, 0.0, 0), (10, 0.2, 5.0, 10)]))
    calls = (lambda: analysis.curve(run, "pass@1", x="backward_passes"),
             lambda: band([run], "pass@1", x="backward_passes"),
             lambda: band([], "pass@1", x="backward_passes"),
             lambda: analysis.plot_curves([run], xs=("step", "backward_passes")))
    for call in calls:
        with pytest.raises(ValueError, match=r"xs?='backward_passes' is invalid: allowed .*use "
                                             r"'cumulative_backward_passes'"):
            call()
    assert "backward_passes" not in analysis.X_CHOICES and "cumulative_backward_passes" in analysis.SPEEDUP_X


# ---------------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------------
def test_groups_hold_only_seed_replicates(tmp_path):
    runs = [load_run(write_run(tmp_path / name, algo, seed, evals=curve_rows([0.1]), **extra))
            for name, algo, seed, extra in [
                ("g0", "grpo", 0, {"k": 3}), ("g1", "grpo", 1, {"k": 7, "checkpoint_every": 2}),
                ("x0", "gxpo", 0, {}), ("x1", "gxpo", 1, {}), ("x2", "gxpo", 0, {"steps": 60}),
                ("y0", "gxpo", 0, {"k": 10})]]
    groups = {g.label: [r.name for r in g.runs] for g in group_runs(runs)}
    assert groups == {"grpo": ["g0", "g1"],                      # K does not steer GRPO; bookkeeping ignored
                      "gxpo K=5 α=0.5 τ=0.5 (steps=30)": ["x0", "x1"],
                      "gxpo K=5 α=0.5 τ=0.5 (steps=60)": ["x2"],
                      "gxpo K=10 α=0.5 τ=0.5": ["y0"]}


# ---------------------------------------------------------------------------------------------------
# The speed-up table
# ---------------------------------------------------------------------------------------------------
def test_speedup_table_on_hand_made_curves(tmp_path):
    # GRPO, two seeds: seed-averaged pass@1 at steps 10..40 is 0.3, 0.4, 0.5, 0.45 -> peak 0.5 at step 30,
    # 300 s and 30 passes (one per step). The shared initial evaluation (0.6) is not a target.
    write_run(tmp_path / "grpo0", "grpo", 0, evals=curve_rows([0.6, 0.2, 0.4, 0.6, 0.4]))
    write_run(tmp_path / "grpo1", "grpo", 1, evals=curve_rows([0.6, 0.4, 0.4, 0.4, 0.5]))
    # GXPO reaches 0.5 at step 10 (3 passes per step, 2x the seconds): 3x steps, 1x passes, 1.5x CPU time.
    write_run(tmp_path / "gxpo0", "gxpo", 0, evals=curve_rows([0.6, 0.5, 0.7], 20.0, 3))
    # SFPO (with our gate, which reads tau) never reaches it.
    write_run(tmp_path / "sfpo0", "sfpo", 0, evals=curve_rows([0.6, 0.3, 0.49, 0.4], 10.0, 4), k=3, alpha=0.8,
              gate="grad_norm")
    df = speedup_table(load_runs(str(tmp_path)))
    rows = {r["algorithm"]: r for r in df.to_dict("records")}
    assert rows["grpo"]["status"] == "reference" and rows["grpo"]["target"] == pytest.approx(0.5)
    assert (rows["grpo"]["ref_step"], rows["grpo"]["ref_cumulative_backward_passes"]) == (30, 30)
    assert rows["grpo"]["ref_cpu_seconds"] == pytest.approx(150)        # CPU seconds, not the wall clock
    gx = rows["gxpo"]
    assert gx["status"] == "reached" and (gx["step"], gx["cumulative_backward_passes"]) == (10, 30)
    ratios = (gx["speedup_steps"], gx["speedup_backward_passes"], gx["speedup_cpu_seconds"])
    assert ratios == pytest.approx((3, 1, 1.5))
    sf = rows["sfpo"]
    assert sf["status"] == "not reached" and math.isnan(sf["speedup_steps"]) and math.isnan(sf["step"])
    assert df.attrs["reference_improved"] == {"grpo": False}       # 0.5 never beat the initial 0.6
    shown = format_speedups(df).set_index("group")
    assert shown.loc["sfpo K=3 α=0.8 τ=0.5", "speed-up in backward passes"] == "not reached"
    assert shown.loc["gxpo K=5 α=0.5 τ=0.5", "speed-up in steps"] == "3.00×"
    assert "hours" not in shown.columns and "speed-up in CPU time" in shown.columns   # ratios, named as such
    # Counting the initial evaluation, 0.6 at step 0 becomes the target and the ratios are undefined.
    initial = speedup_table(load_runs(str(tmp_path)), include_initial=True).set_index("algorithm")
    assert initial.loc["grpo", "ref_step"] == 0 and initial.loc["sfpo", "status"] == "reached"


def test_speedup_needs_a_reference_with_the_same_budget(tmp_path):
    write_run(tmp_path / "grpo", "grpo", evals=curve_rows([0.1, 0.3]))
    write_run(tmp_path / "gxpo", "gxpo", evals=curve_rows([0.1, 0.4]), eval_problems=8)
    write_run(tmp_path / "grpo8", "grpo", evals=curve_rows([0.1, 0.5]), eval_problems=8)
    df = speedup_table(load_runs(str(tmp_path))).set_index("group")
    assert df.loc["gxpo K=5 α=0.5 τ=0.5", "reference"] == "grpo (eval_problems=8)"
    assert df.loc["gxpo K=5 α=0.5 τ=0.5", "status"] == "not reached"   # 0.4 < that GRPO's 0.5
    write_run(tmp_path / "long" / "gxpo", "gxpo", evals=curve_rows([0.1, 0.4]), steps=60)
    [_, row] = speedup_table([load_run(tmp_path / "grpo"), load_run(tmp_path / "long" / "gxpo")]).to_dict("records")
    assert row["status"] == "no reference" and row["note"] == "differs from grpo: steps 60 vs 30"
    only_gxpo = speedup_table([load_run(tmp_path / "gxpo")])
    assert list(only_gxpo["status"]) == ["no reference"] and only_gxpo.attrs["reference_improved"] == {}


def test_speedup_intervals_resample_seeds_and_count_misses_as_not_reached(tmp_path):
    # GRPO (both seeds alike) peaks at 0.5 at step 30. GXPO seed 0 reaches 0.5 at step 10 (3x steps); seed 1
    # never does, and neither does their mean, so only the draws {0, 0} (1/4 of them) reach the target.
    for seed in (0, 1):
        write_run(tmp_path / f"grpo{seed}", "grpo", seed, evals=curve_rows([0.1, 0.2, 0.3, 0.5]))
    write_run(tmp_path / "gxpo0", "gxpo", 0, evals=curve_rows([0.1, 0.5, 0.5, 0.5], 20.0, 3))
    write_run(tmp_path / "gxpo1", "gxpo", 1, evals=curve_rows([0.1, 0.1, 0.1, 0.1], 20.0, 3))
    # SFPO: both seeds reach it at step 10, so every draw gives the same ratios and the interval is a point.
    for seed in (0, 1):
        write_run(tmp_path / f"sfpo{seed}", "sfpo", seed, evals=curve_rows([0.1, 0.6, 0.6], 20.0, 4),
                  k=3, alpha=0.8, gate="grad_norm")
    runs = load_runs(str(tmp_path))
    df = speedup_table(runs, resamples=2000, seed=1).set_index("algorithm")
    gx, sf = df.loc["gxpo"], df.loc["sfpo"]
    assert gx["status"] == "not reached" and 0.21 < gx["reached_share"] < 0.29
    assert (gx["speedup_steps_lo"], gx["speedup_steps_hi"]) == (0.0, 3.0)
    assert sf["status"] == "reached" and sf["reached_share"] == 1.0
    assert (sf["speedup_steps_lo"], sf["speedup_steps_hi"]) == (3.0, 3.0)
    assert sf["speedup_cpu_seconds_lo"] == pytest.approx(1.5)
    assert sf["speedup_backward_passes_hi"] == pytest.approx(0.75)
    assert math.isnan(df.loc["grpo", "speedup_steps_lo"])             # the reference has no interval
    shown = format_speedups(df.reset_index()).set_index("group")
    assert shown.loc["gxpo K=5 α=0.5 τ=0.5", "speed-up in steps"] == "not reached [not reached, 3.00×]"
    write_run(tmp_path / "sfpo-official", "sfpo", 0, evals=curve_rows([0.1, 0.6]), k=3, alpha=0.8,
              gate="auto")   # its official gate ignores tau, so the label leaves it out
    assert "sfpo K=3 α=0.8" in {g.label for g in group_runs(load_runs(str(tmp_path)))}
    assert shown.loc["sfpo K=3 α=0.8 τ=0.5", "speed-up in CPU time"] == "1.50× [1.50×, 1.50×]"
    assert shown.loc["sfpo K=3 α=0.8 τ=0.5", "reached in"] == "100% of resamples"
    same = speedup_table(runs, resamples=2000, seed=1).set_index("algorithm")
    assert same.loc["gxpo", "reached_share"] == gx["reached_share"]   # seeded
    assert "reached_share" not in speedup_table(runs).columns         # no resamples: no interval columns
    for bad in ({"resamples": -1}, {"resamples": 2.5}, {"level": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            speedup_table(runs, **bad)


def test_activity_table_counts_extrapolating_steps_and_shutoffs_with_t_intervals(tmp_path):
    def train(active_steps, steps=8):
        """Extrapolating steps 1..active_steps; the gate closes during the last of them (if before the end)."""
        return [{"step": s, "active": s <= active_steps, "gate_open": s < active_steps or active_steps == steps}
                for s in range(1, steps + 1)]

    write_run(tmp_path / "gxpo0", "gxpo", 0, evals=curve_rows([0.1, 0.2], 10.0, 3), train=train(4))
    write_run(tmp_path / "gxpo1", "gxpo", 1, evals=curve_rows([0.1, 0.3], 30.0, 2), train=train(6))
    write_run(tmp_path / "gxpo2", "gxpo", 0, evals=curve_rows([0.1, 0.3]), train=train(8), tau=2.0)
    write_run(tmp_path / "grpo0", "grpo", 0, evals=curve_rows([0.1, 0.2]), train=train(0))
    df = activity_table(load_runs(str(tmp_path))).set_index("group")
    gx = df.loc["gxpo K=5 α=0.5 τ=0.5"]
    assert gx["seeds"] == 2 and gx["steps"] == 8 and gx["active_steps"] == 5
    half = t_critical(1) * np.std([4, 6], ddof=1) / math.sqrt(2)      # Student-t over the two seeds: 12.7
    # clipped to what a count of 8 steps can be (unclipped, 5 + 12.7 = 17.7 active steps out of 8)
    assert (gx["active_steps_lo"], gx["active_steps_hi"]) == pytest.approx((max(0, 5 - half), min(8, 5 + half)))
    assert (gx["active_steps_lo"], gx["active_steps_hi"]) == (0, 8)
    assert gx["shutoff_step"] == 6 and gx["never_shut"] == 0         # no extrapolation from steps 5 and 7
    assert gx["cumulative_backward_passes"] == 25 and gx["cpu_seconds"] == 100  # (30 + 20) / 2, (50 + 150) / 2
    assert gx["cpu_seconds_lo"] == 0 and "seconds" not in df.columns   # time: CPU seconds, never below 0
    shown = analysis.format_activity(df.reset_index()).set_index("group")
    assert shown.loc["gxpo K=5 α=0.5 τ=0.5", "active steps"] == "5.0 [0.0, 8.0]"
    assert shown.loc["grpo", "active steps"] == "0" and shown.loc["grpo", "gate never shut"] == "0 of 1"
    never = df.loc["gxpo K=5 α=0.5 τ=2.0"]
    assert never["never_shut"] == 1 and math.isnan(never["shutoff_step"]) and never["active_steps"] == 8
    assert df.loc["grpo", "active_steps"] == 0 and df.loc["grpo", "never_shut"] == 0


def test_activity_table_keeps_the_per_step_count_apart_from_the_cumulative_one(tmp_path):
    """``backward_passes_per_step``: the mean of the train rows' own counts; ``cumulative_backward_passes``:
    the running total at the last evaluation."""
    train = [{"step": 1, "backward_passes": 3, "cumulative_backward_passes": 3, "active": True},
             {"step": 2, "backward_passes": 1, "cumulative_backward_passes": 4, "active": False}]
    write_run(tmp_path / "gxpo0", "gxpo", 0, evals=[(0, 0.1, 0.0, 0), (2, 0.2, 4.0, 4)], train=train)
    row = activity_table(load_runs(str(tmp_path))).iloc[0]
    assert row["backward_passes_per_step"] == 2 and row["cumulative_backward_passes"] == 4
    assert "backward_passes" not in row.index


def test_speedup_with_the_authors_pass_at_16(tmp_path):
    def authors(folder, values):
        folder.mkdir()
        rows = [{"step": s, "actor/cumulative_bp": s, "train/elapsed_hours": s / 10,
                 f"val/pass_at_16/{MATH500}": v, f"val/pass_at_1/{MATH500}": v / 2} for s, v in values]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    authors(tmp_path / "grpo", [(5, 0.5), (10, 0.7), (15, 0.6)])
    authors(tmp_path / "gxpo", [(5, 0.75), (10, 0.8)])
    (tmp_path / "gxpo" / "run_manifest.json").write_text(json.dumps({"method": "gxpo"}))
    df = speedup_table(load_runs(str(tmp_path)), metric="pass@16").set_index("algorithm")
    assert df.loc["gxpo", "status"] == "reached" and df.loc["gxpo", "speedup_steps"] == 2.0
    assert math.isnan(df.loc["gxpo", "speedup_cpu_seconds"])       # their logs carry no CPU seconds
    assert df.loc["gxpo", "note"] == "no CPU seconds logged: time not compared"


# ---------------------------------------------------------------------------------------------------
# The final table
# ---------------------------------------------------------------------------------------------------
def test_final_table_per_run_and_per_group(tmp_path):
    def final(p1, p4):
        return {"arith": {"problems": 64, "samples": 4, "pass@1": p1, "pass@1_ci": [p1 - 0.1, p1 + 0.1],
                          "pass@2": 0.0, "pass@4": p4, "pass@4_ci": [p4 - 0.05, p4 + 0.05]}}

    write_run(tmp_path / "a", "gxpo", 0, evals=curve_rows([0.1]), final=final(0.4, 0.7))
    write_run(tmp_path / "b", "gxpo", 1, evals=curve_rows([0.1]), final=final(0.6, 0.9))
    write_run(tmp_path / "c", "grpo", 0, evals=curve_rows([0.1]))              # no final evaluation
    runs = load_runs(str(tmp_path))
    per_run = final_table(runs).set_index("run")
    assert list(per_run.index) == ["a", "b"] and per_run.loc["a", "k"] == 4
    assert (per_run.loc["a", "pass@k"], per_run.loc["a", "pass@k_lo"], per_run.loc["a", "pass@k_hi"]) == \
        pytest.approx((0.7, 0.65, 0.75))
    [group] = final_table(runs, by=analysis.DEFAULT_BY).to_dict("records")
    half = 12.706204736 * np.std([0.4, 0.6], ddof=1) / math.sqrt(2)
    assert group["seeds"] == 2 and group["pass@1"] == pytest.approx(0.5)
    assert (group["pass@1_lo"], group["pass@1_hi"]) == pytest.approx((max(0, 0.5 - half), min(1, 0.5 + half)))
    assert group["interval"] == "t over seeds"


# ---------------------------------------------------------------------------------------------------
# Finding run folders
# ---------------------------------------------------------------------------------------------------
def test_auto_finds_runs_up_to_depth_three_and_nothing_in_an_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_run_dirs("auto") == [] and load_runs("auto") == []
    write_run(tmp_path / "nb02-runs" / "grpo", "grpo")
    write_run(tmp_path / "run-smoke", "gxpo")
    write_run(tmp_path / "a" / "b" / "c", "gxpo")
    write_run(tmp_path / "a" / "b" / "c" / "d", "gxpo")                    # depth 4: too deep
    (tmp_path / "run-smoke" / "checkpoints" / "x").mkdir(parents=True)
    (tmp_path / "run-smoke" / "checkpoints" / "x" / "metrics.jsonl").write_text("{}\n")
    names = sorted(str(p.relative_to(tmp_path)) for p in resolve_run_dirs("auto"))
    assert names == ["a/b/c", "nb02-runs/grpo", "run-smoke"]
    assert len(find_run_folders(tmp_path, max_depth=4)) == 4
    assert [p.name for p in resolve_run_dirs(json.dumps(["nb02-runs/*"]))] == ["grpo"]   # papermill -p text
    assert [p.name for p in resolve_run_dirs("nb02-runs")] == ["grpo"]                   # a parent folder
    with pytest.raises(ValueError, match="nothing-here"):
        resolve_run_dirs("nothing-here/*")


def test_duplicate_folder_names_are_told_apart(tmp_path):
    write_run(tmp_path / "sweep1" / "gxpo", "gxpo")
    write_run(tmp_path / "sweep2" / "gxpo", "gxpo", seed=1)
    assert sorted(r.name for r in load_runs(str(tmp_path))) == ["sweep1/gxpo", "sweep2/gxpo"]


# ---------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------
def test_figures_have_a_band_per_group_and_mark_the_shutoff(tmp_path):
    diag = [{"step": s, "gate_z": z, "r_mean": 0.5, "r_std": 0.1, "scale_mean": 2.0, "jump_norm": 1.0,
             "param_norm": 100.0, "tau": 0.5, "gate_open": s < 2} for s, z in [(1, 0.1), (2, 0.9), (3, 0.0)]]
    runs = [load_run(write_run(tmp_path / f"gx{s}", "gxpo", s, evals=curve_rows([0.1, 0.2]), train=diag))
            for s in (0, 1)] + [load_run(write_run(tmp_path / "grpo", "grpo", evals=curve_rows([0.1, 0.3])))]
    fig = analysis.plot_curves(runs, xs=("step", "cumulative_backward_passes"))
    fills = [t for t in fig.data if t.fill == "toself"]
    lines = [t for t in fig.data if t.fill != "toself"]
    assert len(lines) == 4 and len(fills) == 2          # 2 groups x 2 panels; only GXPO has two seeds
    assert all(t.mode == "lines" for t in fig.data)     # a mean is a line, not data points
    assert {t.line.color for t in lines} == {analysis.method_color("GRPO"), analysis.method_color("GXPO K=5")}
    assert fig.layout.xaxis.dtick == 1 and tuple(fig.layout.yaxis.range) == pytest.approx((-0.02, 1.02))
    diagnostics = analysis.plot_diagnostics(runs)
    assert {t.meta for t in diagnostics.data} >= {"gate_z", "r_mean", "jump_over_param_norm"}
    # one band per group and key (the two seeds averaged), not one line per run
    assert len([t for t in diagnostics.data if t.meta == "gate_z" and t.fill != "toself"]) == 1
    assert all(t.mode == "lines" for t in diagnostics.data)
    assert [s.x0 for s in diagnostics.layout.shapes if s.line.dash == "dash"] == [3]   # both shut off at step 3
    assert analysis.plot_diagnostics([runs[-1]]) is None                                  # GRPO only


def test_single_run_band_is_its_bootstrap_interval_over_problems(tmp_path):
    run = load_run(write_run(tmp_path / "grpo", "grpo", evals=curve_rows([0.1, 0.3])))
    fig = analysis.plot_curves([run], xs=("step",), single_run_interval=True)
    [fill] = [t for t in fig.data if t.fill == "toself"]
    assert list(fill.y) == pytest.approx([0.2, 0.4, 0.2, 0.0])   # hi forward, lo back: pass@1 ± 0.1


# ---------------------------------------------------------------------------------------------------
# Folders from before the setting renames; folder names from settings
# ---------------------------------------------------------------------------------------------------
def test_a_folder_from_before_the_rename_is_re_exported_and_groups_with_a_new_one(tmp_path):
    from gxpo_lib.analysis.shipped import export_runs
    from gxpo_lib.config import TrainConfig

    old = {"algorithm": "gxpo", "seed": 0, "k": 5, "alpha": 0.5, "gate": True, "tau": 0.7, "omega": 0.1,
           "sfpo_official_gate": True, "steps": 1, "model": "tiny"}           # no gate_init, old_logprobs...
    new = TrainConfig(algorithm="gxpo", seed=1, tau=0.7, steps=1).to_dict()
    for name, config in (("old", old), ("new", new)):
        (tmp_path / "src" / name).mkdir(parents=True)
        (tmp_path / "src" / name / "config.json").write_text(json.dumps(config))
        (tmp_path / "src" / name / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in (
            {"kind": "eval", "step": 0, "pass@1": 0.2, "seconds": 0.0, "cumulative_backward_passes": 0},
            {"kind": "train", "step": 1, "r_min": -2.0, "r_max": 3.0, "tau": 0.7})))
    export_runs(str(tmp_path / "src"), tmp_path / "out")
    runs = load_runs(str(tmp_path / "out"))
    assert [r.config["tau"] for r in runs] == [0.7, 0.7] and "gate_tau" not in runs[1].config
    assert runs[0].config["gate"] == "auto" and "omega" not in runs[0].config
    assert runlog.read_rows(tmp_path / "out" / "old")[1]["r_clamp"] == [-2.0, 3.0]
    [group] = group_runs(runs)
    assert group.label == "gxpo K=5 α=0.5 τ=0.7" and group.seeds == [0, 1]
    assert [g.label for g in group_runs(runs, by=("algorithm", "tau"))] == ["gxpo τ=0.7"]


def test_run_name_names_the_settings_that_differ_and_resumes_more_steps():
    from gxpo_lib.config import TrainConfig

    assert analysis.run_name(TrainConfig(algorithm="gxpo")) == "gxpo"
    assert analysis.run_name(TrainConfig(algorithm="grpo", lr=1e-3, steps=90, k=7)) == "grpo_lr=0.001"
    base = TrainConfig(batch_prompts=4)
    assert analysis.run_name(TrainConfig(algorithm="sfpo", k=3, alpha=0.8, batch_prompts=4), base) == \
        "sfpo_k=3_alpha=0.8"
    long = [analysis.run_name(TrainConfig(model=f"some/very-long-model-name-{i}", lr=1e-3, seed=7 + i), max_length=40)
            for i in range(2)]
    assert all(len(name) == 40 for name in long) and long[0] != long[1] and "/" not in long[0]


# ---------------------------------------------------------------------------------------------------
# The mechanism
# ---------------------------------------------------------------------------------------------------
def test_mechanism_summary_names_what_the_jump_did(tmp_path):
    rows = [{"step": s, "active": s <= 2, "r_mean": 0.2, "cos_g0_g1": 0.1, "scale_mean": 1.2,
             "effective_multiplier": q, "gate_z": 0.0} for s, q in [(1, 0.5), (2, 0.7), (3, None)]]
    run = load_run(write_run(tmp_path / "gx", "gxpo", train=rows, evals=curve_rows([0.1])))
    summary = analysis.mechanism_summary(run)
    assert (summary["active_steps"], summary["steps"]) == (2, 3)
    assert summary["alpha_q"] == pytest.approx(0.6) and summary["r_mean"] == pytest.approx(0.2)
    assert "α·q̄ = 0.60 < 1: the jump retreated" in summary["verdict"] and "far from 1" in summary["verdict"]
    # retreated is about θ̃ against θ2: with the corrective step the update is still 1 + 2 x 0.6 plain steps
    assert "the update is still about 1 + 2α·q̄ = 2.20 plain steps" in summary["verdict"]
    assert "not a shorter step" in summary["verdict"]
    beyond = load_run(write_run(tmp_path / "gx2", "gxpo", evals=curve_rows([0.1]),
                                train=[{"step": 1, "active": True, "r_mean": 1.05, "effective_multiplier": 1.3}]))
    beyond_verdict = analysis.mechanism_summary(beyond)["verdict"]
    assert "≥ 1: the jump went beyond θ2" in beyond_verdict and "1 + 2α·q̄ = 3.60 plain steps" in beyond_verdict
    assert "retreated" not in beyond_verdict
    sfpo = load_run(write_run(tmp_path / "sf", "sfpo", evals=curve_rows([0.1]), k=3, alpha=0.8,
                              train=[{"step": 1, "active": True, "effective_multiplier": 0.8}]))
    sfpo_verdict = analysis.mechanism_summary(sfpo)["verdict"]
    assert "between θ0 and θK, short of where its K fast steps went" in sfpo_verdict
    assert "1 + K·α = 3.40 plain steps" in sfpo_verdict       # K = 3 fast steps scaled by 0.8, then the slow step
    idle = load_run(write_run(tmp_path / "gx3", "gxpo", train=[{"step": 1, "active": False}], evals=curve_rows([0.1])))
    assert analysis.mechanism_summary(idle)["verdict"].startswith("GXPO never extrapolated")
    fig = analysis.plot_mechanism([run, idle])
    references = sorted((s.y0, s.yref) for s in fig.layout.shapes)
    assert references == [(0.0, "y2"), (1.0, "y"), (1.0, "y3")]       # cos = 0; r = 1; alpha*q = 1
    assert all(fig.layout[axis].title.text for axis in ("xaxis", "yaxis", "xaxis3", "yaxis3"))
    assert analysis.plot_mechanism([idle]) is None                    # nothing extrapolated: no figure


def test_training_figure_marks_tau_and_the_shutoff_on_the_gate_panel(tmp_path):
    rows = [{"step": s, "gate_z": z, "tau": 0.5, "reward_mean": 0.3, "gate_open": s < 2, "active": s < 3}
            for s, z in [(1, 0.1), (2, 0.9), (3, 0.0)]]
    run = load_run(write_run(tmp_path / "gx", "gxpo", train=rows, evals=curve_rows([0.1, 0.2])))
    fig = analysis.plot_training(run)
    assert len(fig.data) == 3 and list(fig.data[1].error_y.array) == pytest.approx([0.1, 0.1])
    marks = {(s.line.dash, s.xref, s.yref) for s in fig.layout.shapes}
    assert ("dot", "x3 domain", "y3") in marks and ("dash", "x3", "y3 domain") in marks
    assert analysis.setup_plotly() == "plotly_mimetype+notebook_connected"
    import plotly.io as pio

    assert pio.renderers.default == "plotly_mimetype+notebook_connected"


# ---------------------------------------------------------------------------------------------------
# The suite's conventions: colours, clipped intervals, folded tables, integer ticks
# ---------------------------------------------------------------------------------------------------
STUDY_METHODS = ["GRPO", "GRPO matched step", "GRPO matched step K=10", "GRPO x3 epochs", "GXPO K=10 grad",
                 "GXPO K=10 update", "GXPO K=3 grad", "GXPO K=3 update", "GXPO K=5 grad",
                 "GXPO K=5 grad gate warmup", "GXPO K=5 update", "SFPO K=3", "GXPO K=5 scalar-q"]


def test_each_method_has_one_colour_across_the_suite():
    colors = [analysis.method_color(m) for m in STUDY_METHODS]
    assert len(set(colors)) == len(STUDY_METHODS)                      # 13 methods, 13 colours (no cycle)
    assert analysis.method_color("GRPO") != analysis.method_color("GXPO K=5 grad")
    # the same method named by notebook 04's groups, the regime study, the verdict arms and the toy
    assert analysis.method_color("gxpo K=5 α=0.5 τ=0.5") == analysis.method_color("GXPO K=5 grad") \
        == analysis.method_color("GXPO K=5") == analysis.method_color("gxpo")
    assert analysis.method_color("grpo") == analysis.method_color("GRPO") == analysis.method_color("gd")
    assert analysis.method_color("sfpo K=3 α=0.8") == analysis.method_color("SFPO K=3")
    assert analysis.method_color("GRPO x3.21") == analysis.method_color("GRPO matched step")
    assert analysis.method_color("gxpo K=5 α=0.25 τ=0.5") != analysis.method_color("GXPO K=5")  # another setting
    many = [f"GXPO K={k} lr={lr}" for k in (2, 3, 5, 10) for lr in (1, 2, 3, 4, 5)] + STUDY_METHODS
    per_figure = analysis.method_colors(many)
    assert len(set(per_figure.values())) == len(many)                   # distinct inside one figure
    assert per_figure["GRPO"] == analysis.method_color("GRPO")


def test_t_bands_over_three_seeds_are_clipped_to_the_metric_range(tmp_path):
    values = {0: [0.0, 0.0], 1: [0.0, 0.5], 2: [0.05, 1.0]}     # near 0 at step 0, spread at step 10
    runs = [load_run(write_run(tmp_path / f"s{s}", seed=s, evals=curve_rows(v))) for s, v in values.items()]
    df = band(runs, "pass@1")
    assert df["lo"].min() >= 0 and df["hi"].max() <= 1
    raw = band(runs, "pass@1", bounds=None)                     # unclipped: below 0 and above 1
    assert raw["lo"].min() < 0 and raw["hi"].max() > 1
    assert analysis.metric_range("pass@16") == (0, 1) and analysis.metric_range("cos_g0_g1") == (-1, 1)
    assert analysis.metric_range("cpu_seconds") == (0, math.inf)
    finals = {"arith": {"pass@1": 0.02, "pass@1_ci": [0.0, 0.05]}}
    for seed, p1 in enumerate((0.0, 0.0, 0.1)):
        write_run(tmp_path / f"f{seed}", seed=seed, evals=curve_rows([0.1]),
                  final={"arith": finals["arith"] | {"pass@1": p1}})
    runs = load_runs([str(tmp_path / f"f{s}") for s in range(3)])
    [row] = final_table(runs, by=analysis.DEFAULT_BY).to_dict("records")
    assert row["pass@1_lo"] == 0 and row["pass@1_hi"] <= 1


def test_long_tables_fold_behind_a_short_summary():
    import pandas as pd

    table = pd.DataFrame({"method": [f"m{i}" for i in range(48)], "final": np.linspace(0, 1, 48)})
    folded = analysis.fold_table(table, ["48 cells", "best: m47"])
    page = folded._repr_html_()
    assert page.count("<details>") == 1 and "48 rows × 2 columns" in page and page.count("<td>m") == 48
    assert repr(folded).splitlines()[:2] == ["48 cells", "best: m47"]
    assert "<table" in analysis.fold_table(table)._repr_html_().split("<details>")[0]   # default: first rows
    with pytest.raises(ValueError, match="at most 5"):
        analysis.fold_table(table, [str(i) for i in range(6)])
    lines = analysis.fold_lines([f"run {i}" for i in range(89)], "89 runs")
    assert "all 89 lines" in lines._repr_html_() and repr(lines).startswith("89 runs")


def test_integer_quantities_get_integer_ticks():
    assert analysis.integer_ticks([1, 3]) == {"tick0": 0, "dtick": 1}
    assert analysis.integer_ticks(range(0, 41, 5)) == {"tickformat": "d"}
    from gxpo_lib.teach import toy

    gate = toy.gate_snapshot(toy.make_landscape("diagonal"), steps=20, surge_step=8)
    fig = toy.gate_figure(gate)
    assert list(fig.layout.yaxis2.tickvals) == sorted({0, *gate["passes"]})   # 0, 1, 3: never 1.75
    assert fig.layout.xaxis.tickformat == "d"
