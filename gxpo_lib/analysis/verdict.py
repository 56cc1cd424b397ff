"""The verdict study (docs/regime.md, pre-registered): arms, the displacement-matched control, the families.

Run folders (``runs/verdict``) or their compact copies (``data/results/verdict``, `replay.export_runs`) are
read the same way. Each finished run becomes a record; a record's *arm* says what was run ("GRPO",
"GXPO K=5", "GXPO K=5 scalar-q", "GRPO x3.21" for a step-scaled GRPO, prefixed "SGD " for plain SGD); the
arms are compared per family with paired tests (`analysis.inference`).

    python -m gxpo_lib.analysis.verdict matched runs/verdict --lr 1e-4 --k 5 [--append sweeps/verdict.yaml]
    python -m gxpo_lib.analysis.verdict report runs/verdict          # the families' tables, markdown
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import runlog
from .inference import equivalence, holm, paired_difference, two_level_bootstrap

MARGIN = 0.02            # the pre-registered equivalence margin, pass@1
ALPHA = 0.05
SEEDS = (0, 1, 2, 3, 4)
MATCH_TOLERANCE = 0.15   # the matched arm's mean update_norm must be within 15% of GXPO's
LEARNING_RATES = (1e-4, 3e-4, 5.5e-4, 1e-3, 2e-3)


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
    gxpo, matched = cell(records, f"{prefix}GXPO K={k}", lr, steps), cell(records, f"{prefix}GRPO x{scale:g}", lr, steps)
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
                 margin: float = MARGIN) -> list[dict[str, Any]]:
    """Rows for one family: each (label, arm a, arm b, lr, equivalence tested?) compared, then Holm over the
    family's difference tests and, separately, over its equivalence tests. Missing cells give "pending" rows."""
    rows = []
    for label, arm_a, arm_b, lr, test_equivalence in comparisons:
        result = compare(cell(records, arm_a, lr), cell(records, arm_b, lr), margin)
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


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A family's rows as a markdown table (differences in pass@1, 95% paired-t and two-level bootstrap)."""
    lines = ["| comparison | lr | seeds | difference [95% paired t] | bootstrap 95% | p (Holm) | TOST p (Holm) | verdict |",
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
    report = sub.add_parser("report", help="family 1's table (markdown)")
    report.add_argument("runs")
    args = parser.parse_args(argv)
    records = load_records(args.runs)
    if args.command == "report":
        print(markdown(adamw_family(records)))
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
