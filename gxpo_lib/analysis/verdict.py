"""The verdict study (docs/regime.md, pre-registered): arms, the displacement-matched control, the families.

Run folders (``runs/verdict``) or their compact copies (``data/results/verdict``, `replay.export_runs`) are
read the same way. Each finished run becomes a record; a record's *arm* says what was run ("GRPO",
"GXPO K=5", "GXPO K=5 scalar-q", "GRPO x3.21" for a step-scaled GRPO, prefixed "SGD " for plain SGD); the
arms are compared per family with paired tests (`analysis.inference`).

    python -m gxpo_lib.analysis.verdict matched runs/verdict --lr 1e-4 --k 5 [--append sweeps/verdict.yaml]
    python -m gxpo_lib.analysis.verdict report runs/verdict          # the families' tables, markdown
    python -m gxpo_lib.analysis.verdict docs data/results/verdict README.md docs/regime.md   # generated blocks
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gxpo_lib.analysis.inference import equivalence, holm, paired_difference, two_level_bootstrap
from gxpo_lib.analysis.stats import check_x
from gxpo_lib.rl import runlog

MARGIN = 0.02            # the pre-registered equivalence margin, pass@1
ALPHA = 0.05
SEEDS = (0, 1, 2, 3, 4)
MATCH_TOLERANCE = 0.15   # the matched arm's mean update_norm must be within 15% of GXPO's
LEARNING_RATES = (1e-4, 3e-4, 5.5e-4, 1e-3, 2e-3)
GRPO_LEARNING_RATES = (1e-4, 3e-4, 4.5e-4, 5.5e-4, 6.7e-4, 1e-3, 1.5e-3, 2e-3)
SGD_LEARNING_RATES = (0.03, 0.1, 0.3)     # chosen by the pre-registered pilot (docs/regime.md, study log)


# ---------------------------------------------------------------------------------------------------
# Records and arms
# ---------------------------------------------------------------------------------------------------
def load_records(root: Path | str) -> list[dict[str, Any]]:
    """Every finished run (a final evaluation written) under `root`, one level down, sorted by name.

    A record: {"name", "config", "train": [rows], "eval": [rows], "final": the first benchmark's result}.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"root={str(root)!r} is invalid: allowed a folder of run folders")
    records = []
    for folder in sorted(p for p in root.iterdir() if (p / runlog.METRICS_FILE).is_file()):
        final = runlog.read_final_eval(folder)
        if not final:
            continue
        rows = runlog.read_rows(folder)
        records.append({"name": folder.name, "config": runlog.read_config(folder),
                        "train": [r for r in rows if r.get("kind") == "train"],
                        "eval": [r for r in rows if r.get("kind") == "eval"],
                        "final": next(iter(final.values()))})
    return records


def arm(config: dict[str, Any]) -> str:
    """What a run's settings make it: "GRPO", "GRPO x3.21", "GXPO K=5", "GXPO K=5 scalar-q", "SGD GXPO K=5"."""
    prefix = "SGD " if config.get("optimizer") == "sgd" else ""
    if config.get("algorithm") == "grpo":
        scale = config.get("step_scale", 1.0)
        return prefix + ("GRPO" if scale == 1.0 else f"GRPO x{scale:g}")
    name = f"{config.get('algorithm', '').upper()} K={config.get('k')}"
    return prefix + name + (" scalar-q" if config.get("q_mode") == "scalar" else "")


def cell(records: Sequence[dict[str, Any]], arm_name: str, lr: float, steps: int | None = None) -> dict[int, dict]:
    """The records of one arm at one lr (and horizon), by seed."""
    return {r["config"]["seed"]: r for r in records if arm(r["config"]) == arm_name
            and math.isclose(r["config"]["lr"], lr, rel_tol=1e-9) and (steps is None or r["config"]["steps"] == steps)}


def mean_update_norm(record: dict[str, Any]) -> float:
    """The run's mean ||theta_{t+1} - theta_t|| over its train steps."""
    values = [r["update_norm"] for r in record["train"] if r.get("update_norm") is not None]
    if not values:
        raise ValueError(f"run {record['name']}: no update_norm in its train rows (made before it was logged)")
    return float(np.mean(values))


def significant(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits}g}")


# ---------------------------------------------------------------------------------------------------
# The displacement-matched control
# ---------------------------------------------------------------------------------------------------
def matched_scale(records: Sequence[dict[str, Any]], lr: float, k: int = 5, sgd: bool = False,
                  seeds: Sequence[int] = SEEDS, steps: int = 60) -> dict[str, Any]:
    """The pre-registered step_scale: the mean over `seeds` of sum_t update_norm(GXPO) / sum_t update_norm(GRPO),
    same seed and lr, rounded to 3 significant figures. Raises ValueError while a seed is missing."""
    prefix = "SGD " if sgd else ""
    gxpo, grpo = cell(records, f"{prefix}GXPO K={k}", lr, steps), cell(records, f"{prefix}GRPO", lr, steps)
    missing = [s for s in seeds if s not in gxpo or s not in grpo]
    if missing:
        raise ValueError(f"lr={lr:g}, K={k}: seeds {missing} of GXPO or GRPO are not finished yet")
    ratios = [mean_update_norm(gxpo[s]) / mean_update_norm(grpo[s]) for s in seeds]  # equal step counts
    return {"lr": lr, "k": k, "sgd": sgd, "ratios": ratios, "step_scale": significant(float(np.mean(ratios)))}


def match_check(records: Sequence[dict[str, Any]], lr: float, k: int = 5, sgd: bool = False,
                steps: int = 60) -> dict[str, Any] | None:
    """Is the matched arm matched? Its seed-mean update_norm against GXPO's (None until both exist)."""
    prefix = "SGD " if sgd else ""
    try:
        scale = matched_scale(records, lr, k, sgd, steps=steps)["step_scale"]
    except ValueError:
        return None
    gxpo = cell(records, f"{prefix}GXPO K={k}", lr, steps)
    matched = cell(records, f"{prefix}GRPO x{scale:g}", lr, steps)
    if not matched:
        return None
    ratio = float(np.mean([mean_update_norm(r) for r in matched.values()]) /
                  np.mean([mean_update_norm(r) for r in gxpo.values()]))
    return {"step_scale": scale, "matched_over_gxpo": ratio, "ok": abs(ratio - 1) <= MATCH_TOLERANCE}


def append_matched_arm(grid_file: Path | str, lr: float, scale: float, sgd: bool = False,
                       seeds: Sequence[int] = SEEDS) -> str:
    """Append the matched GRPO arm to a study grid file whose last key is ``grids`` (comments kept)."""
    path = Path(grid_file)
    text = path.read_text(encoding="utf-8")
    if not text.rstrip().splitlines()[-1].startswith((" ", "-")) or "\ngrids:" not in text:
        raise ValueError(f"grid_file={str(path)!r} is invalid: its last key must be 'grids'")
    base = f"algorithm: grpo, lr: {lr:g}, step_scale: {scale:g}"
    if sgd:
        base += ", optimizer: sgd, momentum: 0.0, weight_decay: 0.0"
    block = f"- base: {{{base}}}\n  grid:\n    seed: [{', '.join(map(str, seeds))}]\n"
    if block in text:
        return "already there"
    path.write_text(text.rstrip("\n") + "\n" + block, encoding="utf-8")
    return block


# ---------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------
def per_problem(record: dict[str, Any]) -> np.ndarray:
    """The final evaluation's per-problem pass@1 (correct samples / samples), [problems]."""
    final = record["final"]
    return np.asarray(final["correct_counts"], dtype=float) / final["samples"]


def compare(a: dict[int, dict], b: dict[int, dict], margin: float = MARGIN, draws: int = 2000) -> dict[str, Any] | None:
    """Arm a against arm b on the primary metric (final pass@1), paired by the seeds both have (None if < 2)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = paired_difference([a[s]["final"]["pass@1"] for s in seeds], [b[s]["final"]["pass@1"] for s in seeds])
    tost = equivalence(d, margin)
    boot = two_level_bootstrap(np.stack([per_problem(a[s]) for s in seeds]),
                               np.stack([per_problem(b[s]) for s in seeds]), draws=draws)
    return {"seeds": seeds, "mean": d["mean"], "ci": d["ci"], "p": d["p"], "tost_p": tost["p"],
            "ci90": tost["ci90"], "boot_ci": boot}


def family_table(records: Sequence[dict[str, Any]], comparisons: Sequence[tuple[str, str, str, float, bool]],
                 margin: float = MARGIN, steps: int = 60) -> list[dict[str, Any]]:
    """Rows for one family: each (label, arm a, arm b, lr, equivalence tested?) compared on runs of `steps`
    steps, then Holm over the family's difference tests and, separately, over its equivalence tests. Missing
    cells give "pending" rows."""
    rows = []
    for label, arm_a, arm_b, lr, test_equivalence in comparisons:
        result = compare(cell(records, arm_a, lr, steps), cell(records, arm_b, lr, steps), margin)
        rows.append({"comparison": label, "lr": lr, "equivalence": test_equivalence, **(result or {"pending": True})})
    for key, flag in (("p", None), ("tost_p", True)):
        chosen = [i for i, r in enumerate(rows) if "pending" not in r and (flag is None or r["equivalence"])]
        for i, adjusted in zip(chosen, holm([rows[i][key] for i in chosen])):
            rows[i][f"{key}_holm"] = adjusted
    for row in rows:
        row["verdict"] = _verdict(row)
    return rows


def _verdict(row: dict[str, Any]) -> str:
    if row.get("pending"):
        return "pending"
    words = []
    if row.get("p_holm") is not None and row["p_holm"] < ALPHA:
        words.append("higher" if row["mean"] > 0 else "lower")
    if row["equivalence"] and row.get("tost_p_holm") is not None and row["tost_p_holm"] < ALPHA:
        words.append(f"equivalent (±{MARGIN})")
    return ", ".join(words) or "not decided"


def matched_arm(records: Sequence[dict[str, Any]], lr: float, k: int = 5, sgd: bool = False) -> str | None:
    try:
        scale = matched_scale(records, lr, k, sgd)["step_scale"]
    except ValueError:
        return None
    return ("SGD " if sgd else "") + f"GRPO x{scale:g}"


def adamw_family(records: Sequence[dict[str, Any]], lrs: Sequence[float] = LEARNING_RATES) -> list[dict[str, Any]]:
    """Family 1: GXPO K=5 against GRPO, its matched GRPO and scalar-q GXPO at each lr (H1-H3)."""
    comparisons = []
    for lr in lrs:
        comparisons.append(("GXPO K=5 - GRPO", "GXPO K=5", "GRPO", lr, False))
        matched = matched_arm(records, lr)
        comparisons.append(("GXPO K=5 - matched GRPO", "GXPO K=5", matched or "(matched: pending)", lr, True))
        comparisons.append(("GXPO K=5 - scalar-q", "GXPO K=5", "GXPO K=5 scalar-q", lr, True))
    return family_table(records, comparisons)


def k10_family(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Family 2: GXPO K=10 against GRPO and its own matched GRPO at 1e-4 and 3e-4."""
    comparisons = []
    for lr in (1e-4, 3e-4):
        comparisons.append(("GXPO K=10 - GRPO", "GXPO K=10", "GRPO", lr, False))
        comparisons.append(("GXPO K=10 - matched GRPO", "GXPO K=10", matched_arm(records, lr, k=10) or "(pending)",
                            lr, True))
    return family_table(records, comparisons)


def sgd_family(records: Sequence[dict[str, Any]], lrs: Sequence[float] = SGD_LEARNING_RATES) -> list[dict[str, Any]]:
    """Family 4: family 1's comparisons with plain SGD."""
    comparisons = []
    for lr in lrs:
        comparisons.append(("SGD GXPO K=5 - GRPO", "SGD GXPO K=5", "SGD GRPO", lr, False))
        matched = matched_arm(records, lr, sgd=True) or "(pending)"
        comparisons.append(("SGD GXPO K=5 - matched GRPO", "SGD GXPO K=5", matched, lr, True))
        comparisons.append(("SGD GXPO K=5 - scalar-q", "SGD GXPO K=5", "SGD GXPO K=5 scalar-q", lr, True))
    return family_table(records, comparisons)


def late_validation(records_by_seed: dict[int, dict]) -> float | None:
    """The seed mean of validation pass@1 averaged over the last three evaluations (the best-lr criterion)."""
    values = [np.mean([r["pass@1"] for r in record["eval"][-3:]]) for record in records_by_seed.values()]
    return float(np.mean(values)) if values else None


def best_lr(records: Sequence[dict[str, Any]], arm_name: str, lrs: Sequence[float]) -> float | None:
    """The pre-registered best lr of an arm: the highest `late_validation` over `lrs`; None until every lr has
    all 5 seeds (a best chosen from part of the grid would not be the pre-registered one)."""
    cells = {lr: cell(records, arm_name, lr, 60) for lr in lrs}
    if any(len(c) < len(SEEDS) for c in cells.values()):
        return None
    scored = {lr: late_validation(c) for lr, c in cells.items()}
    return max(scored, key=scored.get)


def best_family(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Family 3: best-tuned GXPO K=5 against best-tuned GRPO (final pass@1, paired by seed)."""
    grpo, gxpo = best_lr(records, "GRPO", GRPO_LEARNING_RATES), best_lr(records, "GXPO K=5", LEARNING_RATES)
    if grpo is None or gxpo is None:
        return [{"comparison": "best GXPO K=5 - best GRPO", "lr": math.nan, "equivalence": True, "pending": True,
                 "verdict": "pending"}]
    result = compare(cell(records, "GXPO K=5", gxpo, 60), cell(records, "GRPO", grpo, 60))
    row = {"comparison": f"best GXPO K=5 (lr {gxpo:g}) - best GRPO (lr {grpo:g})", "lr": gxpo, "equivalence": True,
           **(result or {"pending": True})}
    if result:
        row["p_holm"], row["tost_p_holm"] = row["p"], row["tost_p"]   # a family of one of each
    row["verdict"] = _verdict(row)
    return [row]


def seed_mean_curve(records_by_seed: dict[int, dict], seeds: Sequence[int] | None = None) -> list[dict[str, float]]:
    """Validation pass@1, cumulative backward passes and CPU seconds per evaluation step, averaged over seeds."""
    return _EvalTable(records_by_seed).curve(seeds if seeds is not None else sorted(records_by_seed))


class _EvalTable:
    """One arm's evaluations as an array [seeds, evaluations, 3] (pass@1, cumulative backward passes, CPU
    seconds), so that seed means over resampled seeds cost one numpy reduction (`speedup` draws thousands)."""

    KEYS = ("pass@1", "cumulative_backward_passes", "cpu_seconds")

    def __init__(self, records_by_seed: dict[int, dict]) -> None:
        self.index = {seed: i for i, seed in enumerate(records_by_seed)}
        first = next(iter(records_by_seed.values()))
        self.steps = [r["step"] for r in first["eval"]]
        self.values = np.array([[[r["pass@1"], r.get("cumulative_backward_passes", 0), r.get("cpu_seconds", 0.0)]
                                 for r in record["eval"][:len(self.steps)]] for record in records_by_seed.values()],
                               dtype=float)

    def curve(self, seeds: Sequence[int]) -> list[dict[str, float]]:
        # a mean over axis 0 adds the seeds in order, as np.mean of a short list does
        means = self.values[[self.index[s] for s in seeds]].mean(axis=0).tolist()
        return [{"step": step, **dict(zip(self.KEYS, row))} for step, row in zip(self.steps, means)]


def speedup(reference: dict[int, dict], method: dict[int, dict], draws: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Steps to the reference's seed-mean validation peak, reference / method (None: not reached), with a
    paired seed bootstrap (the same seeds drawn for both sides) and the identical-method baseline: how often a
    resample of the reference reaches the peak of another resample of itself."""
    from gxpo_lib.rl.evaluation import speedup_to_peak

    seeds = sorted(set(reference) & set(method))
    keys = ("step", "cumulative_backward_passes")

    tables = {id(reference): _EvalTable(reference), id(method): _EvalTable(method)}

    def hit(ref_seeds, meth_seeds, meth):
        return speedup_to_peak(tables[id(reference)].curve(ref_seeds), tables[id(meth)].curve(meth_seeds),
                               metric="pass@1", x_keys=keys)

    point = hit(seeds, seeds, method)
    rng = np.random.default_rng(seed)
    reached = baseline = 0
    ratios = []
    for _ in range(draws):
        chosen = list(rng.choice(seeds, len(seeds)))
        result = hit(chosen, chosen, method)
        if result["step_speedup"] is not None:
            reached += 1
            ratios.append(result["step_speedup"])
        baseline += hit(chosen, list(rng.choice(seeds, len(seeds))), reference)["step_speedup"] is not None
    interval = tuple(float(v) for v in np.quantile(ratios, [0.025, 0.975])) if ratios else None
    return {"target": point["target"], "step_method": point["step_method"], "speedup_steps": point["step_speedup"],
            "speedup_passes": point["cumulative_backward_passes_speedup"], "interval": interval,
            "reached_share": reached / draws, "baseline_share": baseline / draws}


# ---------------------------------------------------------------------------------------------------
# Family 5: the longer horizon
# ---------------------------------------------------------------------------------------------------
HORIZON_STEPS = 200


def horizon_lrs(records: Sequence[dict[str, Any]]) -> list[float]:
    """The lrs of the 200-step GXPO K=5 runs (3e-4 and GRPO's best lr by family 3's rule)."""
    return sorted({r["config"]["lr"] for r in records
                   if r["config"].get("steps") == HORIZON_STEPS and arm(r["config"]) == "GXPO K=5"})


def horizon_family(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Family 5: GXPO K=5 against GRPO and the matched GRPO (the 60-step step_scale) over 200 steps, seeds 0-2;
    difference tests only, Holm over the family. At an lr with no 60-step GXPO run (GRPO's best lr can lie off
    GXPO's grid) the matched arm has no pre-registered step_scale and is left out (docs/regime.md says so)."""
    comparisons = []
    for lr in horizon_lrs(records) or [3e-4]:
        comparisons.append(("GXPO K=5 - GRPO, 200 steps", "GXPO K=5", "GRPO", lr, False))
        if not any(math.isclose(lr, x, rel_tol=1e-9) for x in LEARNING_RATES):
            continue   # no 60-step GXPO at this lr, so no pre-registered step_scale: the matched arm is not formed
        comparisons.append(("GXPO K=5 - matched GRPO, 200 steps", "GXPO K=5", matched_arm(records, lr) or "(pending)",
                            lr, False))
    return family_table(records, comparisons, steps=HORIZON_STEPS)


def gate_shut_step(record: dict[str, Any]) -> int | None:
    """The first train step after which GXPO's gate was shut (None: open to the end, or not GXPO)."""
    rows = [r for r in record["train"] if r.get("gate_open") is not None]
    return next((r["step"] for r in rows if r["gate_open"] is False), None)


# ---------------------------------------------------------------------------------------------------
# Descriptive: step size, envelopes, speed-ups, equal passes
# ---------------------------------------------------------------------------------------------------
def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """The mean of independent values and its Student-t interval (the point when there is one value)."""
    from gxpo_lib.analysis.stats import t_critical

    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if x.size < 2:
        return mean, (mean, mean)
    half = t_critical(x.size - 1, level) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, (mean - half, mean + half)


def step_size_points(records: Sequence[dict[str, Any]], sgd: bool = False,
                     steps: int = 60) -> list[dict[str, Any]]:
    """Every arm at every lr placed at its *effective* lr: lr x its mean update-norm ratio to GRPO at that lr
    (same seed), with its final pass@1 (seed mean, 95% t interval). GRPO's own points have ratio 1, so if
    GXPO is a bigger step its points fall on GRPO's curve of final pass@1 against lr."""
    prefix = "SGD " if sgd else ""
    grpo_lrs = {r["config"]["lr"] for r in records if arm(r["config"]) == prefix + "GRPO"
                and r["config"].get("steps") == steps}
    points = []
    for name in sorted({arm(r["config"]) for r in records if arm(r["config"]).startswith(prefix)
                        and (sgd or not arm(r["config"]).startswith("SGD "))}):
        for lr in sorted(grpo_lrs):
            runs, grpo = cell(records, name, lr, steps), cell(records, prefix + "GRPO", lr, steps)
            seeds = sorted(set(runs) & set(grpo))
            if not seeds:
                continue
            ratio = float(np.mean([mean_update_norm(runs[s]) / mean_update_norm(grpo[s]) for s in seeds]))
            mean, ci = mean_interval([runs[s]["final"]["pass@1"] for s in seeds])
            points.append({"arm": name, "lr": lr, "ratio": ratio, "effective_lr": lr * ratio, "seeds": seeds,
                           "pass@1": mean, "ci": ci})
    return points


ENVELOPE_X = ("step", "cumulative_backward_passes")


def envelope(records: Sequence[dict[str, Any]], arm_name: str, lrs: Sequence[float], x: str = "step",
             steps: int = 60) -> list[dict[str, float]]:
    """Best over lrs of the seed-mean validation pass@1 at each x (`step`, or `cumulative_backward_passes`
    where every lr's curve holds its last value between evaluations), with the lr that gives it."""
    check_x(x, ENVELOPE_X)
    curves = {lr: seed_mean_curve(c) for lr in lrs if (c := cell(records, arm_name, lr, steps))}
    if not curves:
        return []
    grid = sorted({row[x] for curve in curves.values() for row in curve})
    out = []
    for value in grid:
        best = None
        for lr, curve in curves.items():
            seen = [row["pass@1"] for row in curve if row[x] <= value]
            if seen and (best is None or seen[-1] > best[1]):
                best = (lr, seen[-1])
        if best:
            out.append({x: value, "pass@1": best[1], "lr": best[0]})
    return out


def speedup_rows(records: Sequence[dict[str, Any]], draws: int = 1000) -> list[dict[str, Any]]:
    """Speed-ups to same-lr GRPO's seed-mean validation peak (steps and backward passes), every arm of families
    1, 2 and 4, with the share of seed-bootstrap draws that reach it beside the identical-method baseline."""
    arms = [(lr, a, "GRPO") for lr in LEARNING_RATES
            for a in ("GXPO K=5", "GXPO K=5 scalar-q", matched_arm(records, lr))]
    arms += [(lr, a, "GRPO") for lr in (1e-4, 3e-4) for a in ("GXPO K=10", matched_arm(records, lr, k=10))]
    arms += [(lr, a, "SGD GRPO") for lr in SGD_LEARNING_RATES
             for a in ("SGD GXPO K=5", "SGD GXPO K=5 scalar-q", matched_arm(records, lr, sgd=True))]
    rows = []
    for lr, name, reference in arms:
        ref, method = cell(records, reference, lr, 60), cell(records, name or "-", lr, 60)
        if len(set(ref) & set(method)) < 2:
            continue
        rows.append({"arm": name, "lr": lr, **speedup(ref, method, draws=draws)})
    return rows


def equal_passes(records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Family 3's descriptive comparison: best GXPO K=5's validation pass@1 at its last evaluation with
    cumulative backward passes <= best GRPO's at step 60, against GRPO's at step 60 (seed means)."""
    grpo_lr, gxpo_lr = best_lr(records, "GRPO", GRPO_LEARNING_RATES), best_lr(records, "GXPO K=5", LEARNING_RATES)
    if grpo_lr is None or gxpo_lr is None:
        return None
    grpo = seed_mean_curve(cell(records, "GRPO", grpo_lr, 60))
    gxpo = seed_mean_curve(cell(records, "GXPO K=5", gxpo_lr, 60))
    budget = grpo[-1]["cumulative_backward_passes"]
    within = [row for row in gxpo if row["cumulative_backward_passes"] <= budget]
    return {"grpo_lr": grpo_lr, "gxpo_lr": gxpo_lr, "passes": budget, "grpo": grpo[-1]["pass@1"],
            "gxpo_step": within[-1]["step"], "gxpo": within[-1]["pass@1"],
            "gxpo_passes": within[-1]["cumulative_backward_passes"]}


def speedup_markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| arm | lr | target | speed-up in steps [95% over the draws reaching it] | in backward passes "
             + "| draws reaching it | identical-method baseline |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = "not reached" if r["speedup_steps"] is None else f"{r['speedup_steps']:.2f}"
        if r["interval"]:
            steps += f" [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]"
        passes = "-" if r["speedup_passes"] is None else f"{r['speedup_passes']:.2f}"
        lines.append(f"| {r['arm']} | {r['lr']:g} | {r['target']:.3f} | {steps} | {passes} | "
                     f"{r['reached_share']:.0%} | {r['baseline_share']:.0%} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The lesson, computed
# ---------------------------------------------------------------------------------------------------
def _by_verdict(rows: Sequence[dict[str, Any]], label: str) -> str:
    """"equivalent at lr 1e-4, 3e-4; not decided at 1e-3" for the rows of one comparison."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r["comparison"] == label and not r.get("pending"):
            groups.setdefault(r["verdict"], []).append(f"{r['lr']:g} ({r['mean']:+.3f})")
    pending = sum(r["comparison"] == label and bool(r.get("pending")) for r in rows)
    text = "; ".join(f"{verdict} at lr {', '.join(lrs)}" for verdict, lrs in groups.items()) or "no data yet"
    return text + (f"; {pending} lr(s) pending" if pending else "")


def lesson(records: Sequence[dict[str, Any]]) -> str:
    """The study's answer in sentences, every number and verdict computed from `records` (markdown)."""
    f1, f2, f4, f5 = adamw_family(records), k10_family(records), sgd_family(records), horizon_family(records)
    sizes = {lr: matched_scale(records, lr) for lr in LEARNING_RATES if _finished(records, lr)}
    parts = []
    if sizes:
        low, high = min(s["step_scale"] for s in sizes.values()), max(s["step_scale"] for s in sizes.values())
        by_lr = ", ".join(f"{lr:g} → {size['step_scale']:g}" for lr, size in sizes.items())
        parts.append(f"**Step size.** One GXPO K=5 update moved {low:g}-{high:g} plain AdamW steps (the measured "
                     f"update-norm ratio to GRPO, by lr: {by_lr}).")
    parts.append("**H1, a bigger step** (GXPO K=5 − GRPO with GXPO's measured step, difference and equivalence "
                 f"tests Holm-corrected within the family): {_by_verdict(f1, 'GXPO K=5 - matched GRPO')}.")
    parts.append("**H2, the per-coordinate q** (GXPO K=5 − scalar-q GXPO K=5): "
                 f"{_by_verdict(f1, 'GXPO K=5 - scalar-q')}.")
    parts.append("**H3, the paper's comparison** (GXPO K=5 − GRPO at the same lr): "
                 f"{_by_verdict(f1, 'GXPO K=5 - GRPO')}.")
    parts.append(f"**K = 10**: against GRPO {_by_verdict(f2, 'GXPO K=10 - GRPO')}; against its matched GRPO "
                 f"{_by_verdict(f2, 'GXPO K=10 - matched GRPO')}.")
    parts.append(f"**Plain SGD** (the geometric premise exact on a quadratic): against the matched GRPO "
                 f"{_by_verdict(f4, 'SGD GXPO K=5 - matched GRPO')}; against scalar-q "
                 f"{_by_verdict(f4, 'SGD GXPO K=5 - scalar-q')}; against GRPO "
                 f"{_by_verdict(f4, 'SGD GXPO K=5 - GRPO')}.")
    best = best_family(records)[0]
    if not best.get("pending"):
        passes = equal_passes(records)
        parts.append(f"**Best-tuned against best-tuned**: {best['comparison']}: {best['mean']:+.3f} "
                     f"[{best['ci'][0]:+.3f}, {best['ci'][1]:+.3f}], {best['verdict']}; at GRPO's "
                     f"{passes['passes']:.0f} "
                     f"backward passes GXPO's validation pass@1 was {passes['gxpo']:.3f} (step {passes['gxpo_step']}) "
                     f"against GRPO's {passes['grpo']:.3f}.")
    else:
        parts.append("**Best-tuned against best-tuned**: pending.")
    parts.append(f"**200 steps** (3 seeds): against GRPO {_by_verdict(f5, 'GXPO K=5 - GRPO, 200 steps')}; against "
                 f"the matched GRPO {_by_verdict(f5, 'GXPO K=5 - matched GRPO, 200 steps')}.")
    matched_rows = [r for r in (*f1, *f2, *f4, *f5) if "matched" in r["comparison"]]
    beyond = [f"{r['comparison'].split(' - ')[0]} at lr {r['lr']:g}" for r in matched_rows
              if r.get("verdict", "").startswith("higher")]
    pending = sum(bool(r.get("pending")) for r in matched_rows)
    answer = (f"In this study: {', '.join(beyond)} (higher than GRPO with the same measured step, after Holm)."
              if beyond else f"Nowhere among the {len(matched_rows) - pending} comparisons with the "
              "displacement-matched GRPO that have data: none came out higher after Holm's correction.")
    for r in matched_rows:
        if r.get("verdict", "").startswith("higher") and r["comparison"] == "GXPO K=5 - matched GRPO":
            answer += " " + _why_higher(records, r["lr"], f1)
    if pending:
        answer += f" ({pending} of {len(matched_rows)} such comparisons have no data yet.)"
    parts.append("**When does the lookahead pay beyond a bigger step?** " + answer)
    return "\n\n".join(parts)


def _why_higher(records: Sequence[dict[str, Any]], lr: float, family1: Sequence[dict[str, Any]]) -> str:
    """What sits behind "GXPO beat its matched GRPO" at an lr: the three arms' finals, the gate, scalar-q."""
    def final(name: str) -> float:
        return float(np.mean([r["final"]["pass@1"] for r in cell(records, name, lr, 60).values()]))

    gxpo = cell(records, "GXPO K=5", lr, 60)
    shut = [s for r in gxpo.values() if (s := gate_shut_step(r)) is not None]
    h2 = next((r for r in family1 if r["comparison"] == "GXPO K=5 - scalar-q" and r["lr"] == lr), {})
    text = (f"At lr {lr:g} the matched GRPO ended at {final(matched_arm(records, lr)):.3f} against GRPO's "
            f"{final('GRPO'):.3f} at the same lr and GXPO's {final('GXPO K=5'):.3f}: the constant bigger step hurt. "
            f"GXPO's gate shut in {len(shut)} of {len(gxpo)} seeds"
            + (f" (median step {int(np.median(shut))}), after which it took plain steps" if shut else "") + "; ")
    if h2 and not h2.get("pending") and not h2["verdict"].startswith("higher"):
        text += (f"scalar-q GXPO did no worse (GXPO − scalar-q {h2['mean']:+.3f}, {h2['verdict']}), so the "
                 "per-coordinate q is not what paid there.")
    else:
        text += f"GXPO − scalar-q there: {h2.get('verdict', 'pending')}."
    return text


def _finished(records: Sequence[dict[str, Any]], lr: float) -> bool:
    try:
        matched_scale(records, lr)
    except ValueError:
        return False
    return True


def claims_table(records: Sequence[dict[str, Any]], draws: int = 1000) -> str:
    """The paper's claims against this study (markdown), every cell computed from `records`."""
    f1 = adamw_family(records)
    speed = [r for r in speedup_rows(records, draws) if r["arm"] == "GXPO K=5"]
    reached = [f"{r['lr']:g}: {r['speedup_steps']:.2f}x steps, {r['speedup_passes']:.2f}x passes" for r in speed
               if r["speedup_steps"] is not None]
    missed = [f"{r['lr']:g}" for r in speed if r["speedup_steps"] is None]
    best = best_family(records)[0]
    best_text = ("pending" if best.get("pending") else
                 f"{best['comparison']}: {best['mean']:+.3f} [{best['ci'][0]:+.3f}, {best['ci'][1]:+.3f}], "
                 f"{best['verdict']}")
    rows = [
        ("higher pass@1 than GRPO at the same lr", f"GXPO K=5 − GRPO by lr: {_by_verdict(f1, 'GXPO K=5 - GRPO')}"),
        ("the gain comes from the lookahead", "against GRPO with GXPO's measured step: "
         + f"{_by_verdict(f1, 'GXPO K=5 - matched GRPO')}; against scalar-q GXPO: "
         + _by_verdict(f1, "GXPO K=5 - scalar-q")),
        ("fewer steps to GRPO's peak", "same-lr GRPO's validation peak reached at lr " + ("; ".join(reached) or "none")
         + (f"; not reached at lr {', '.join(missed)}" if missed else "")),
        ("better than GRPO when both are tuned", best_text),
    ]
    lines = ["| the paper's claim (Qwen2.5 / Llama 1.5-8B, lr 1e-7) | this study (tiny Llama + LoRA, 60 steps, "
             + "5 seeds, Holm within each family) |", "|---|---|"]
    return "\n".join(lines + [f"| {claim} | {here} |" for claim, here in rows])


def report(records: Sequence[dict[str, Any]], draws: int = 1000) -> str:
    """Every family's table as markdown, with the matched controls' update-size check and the speed-ups."""
    parts = ["### Family 1: AdamW", markdown(adamw_family(records)), "", "### Family 2: K = 10",
             markdown(k10_family(records)), "", "### Family 3: best-tuned", markdown(best_family(records))]
    passes = equal_passes(records)
    if passes:
        parts.append(f"\nAt equal backward passes (descriptive): best GXPO K=5 (lr {passes['gxpo_lr']:g}) at step "
                     f"{passes['gxpo_step']} ({passes['gxpo_passes']:.0f} passes) validation pass@1 "
                     f"{passes['gxpo']:.3f}; best GRPO (lr {passes['grpo_lr']:g}) at step 60 ({passes['passes']:.0f} "
                     f"passes) {passes['grpo']:.3f}.")
    parts += ["", "### Family 4: plain SGD", markdown(sgd_family(records)), "",
              "### Family 5: 200 steps (seeds 0-2)", markdown(horizon_family(records)), "",
              "### Matched controls: update size",
              "| lr | K | optimizer | step_scale | matched / GXPO mean update_norm | within ±15% |",
              "|---|---|---|---|---|---|"]
    for lr, k, sgd in [(lr, 5, False) for lr in LEARNING_RATES] + [(1e-4, 10, False), (3e-4, 10, False)] + [
            (lr, 5, True) for lr in SGD_LEARNING_RATES]:
        check = match_check(records, lr, k, sgd)
        if check:
            parts.append(f"| {lr:g} | {k} | {'SGD' if sgd else 'AdamW'} | {check['step_scale']:g} | "
                         f"{check['matched_over_gxpo']:.3f} | {'yes' if check['ok'] else 'NO'} |")
    parts += ["", "### Speed-ups to same-lr GRPO's validation peak (descriptive; validation every 5 steps)",
              speedup_markdown(speedup_rows(records, draws))]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------
# Generated blocks in the docs: <!-- name: ... --> ... <!-- /name -->
# ---------------------------------------------------------------------------------------------------
BLOCKS = {"verdict-report": report, "verdict-lesson": lesson, "verdict-claims": claims_table}


def render_blocks(text: str, records: Sequence[dict[str, Any]]) -> str:
    """`text` with every generated block's body recomputed from `records` (the markers are kept)."""
    import re

    def body(match: re.Match) -> str:
        return f"{match.group(1)}\n{BLOCKS[match.group(2)](records)}\n{match.group(3)}"

    names = "|".join(map(re.escape, BLOCKS))
    return re.sub(rf"(<!-- ({names})(?::[^>]*)? -->)\n.*?\n(<!-- /\2 -->)", body, text, flags=re.DOTALL)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A family's rows as a markdown table (differences in pass@1, 95% paired-t and two-level bootstrap)."""
    lines = ["| comparison | lr | seeds | difference [95% paired t] | bootstrap 95% | p (Holm) | TOST p (Holm) "
             + "| verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("pending"):
            lines.append(f"| {r['comparison']} | {r['lr']:g} | - | - | - | - | - | pending |")
            continue
        tost = f"{r['tost_p_holm']:.3f}" if r.get("tost_p_holm") is not None else "-"
        lines.append(f"| {r['comparison']} | {r['lr']:g} | {len(r['seeds'])} | {r['mean']:+.3f} "
                     f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}] | [{r['boot_ci'][0]:+.3f}, {r['boot_ci'][1]:+.3f}] "
                     f"| {r['p_holm']:.3f} | {tost} | {r['verdict']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gxpo_lib.analysis.verdict", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    matched = sub.add_parser("matched", help="the displacement-matched step_scale at an lr (and append its arm)")
    matched.add_argument("runs")
    matched.add_argument("--lr", type=float, required=True)
    matched.add_argument("--k", type=int, default=5)
    matched.add_argument("--sgd", action="store_true")
    matched.add_argument("--append", default=None, help="a study grid file to append the matched arm to")
    report_parser = sub.add_parser("report", help="every family's table (markdown)")
    report_parser.add_argument("runs")
    docs = sub.add_parser("docs", help="recompute the generated blocks of markdown files in place")
    docs.add_argument("runs")
    docs.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    records = load_records(args.runs)
    if args.command == "report":
        print(report(records))
        return 0
    if args.command == "docs":
        for name in args.files:
            path = Path(name)
            path.write_text(render_blocks(path.read_text(encoding="utf-8"), records), encoding="utf-8")
            print(f"[gxpo] {name}: generated blocks rewritten")
        return 0
    try:
        result = matched_scale(records, args.lr, args.k, args.sgd)
    except ValueError as error:
        parser.error(str(error))
    print(f"[gxpo] lr {args.lr:g}, K={args.k}: per-seed update-norm ratios "
          f"{', '.join(f'{r:.3f}' for r in result['ratios'])} -> step_scale {result['step_scale']:g}")
    if args.append:
        print(append_matched_arm(args.append, args.lr, result["step_scale"], args.sgd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
