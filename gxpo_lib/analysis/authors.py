"""The authors' logs: a verl ``metrics.jsonl`` (the official GXPO/SFPO code) read into a `Run`.

**The authors' logs.** The official code (a verl fork, ``ray_trainer.fit``) appends one flat JSON object
per outer step to ``metrics.jsonl``: ``{"step": N, "actor/...": ..., "val/...": ...}`` (validation
metrics sit in the row of the step they follow). Upstream verl's ``FileLogger`` writes
``{"step": N, "data": {...}}`` instead (sometimes with ``elapsed_seconds``); both are read. A row with
any non-validation metric becomes a train row; a row with validation metrics also becomes an eval row.

===================================  =========================================================================
our name                             the authors' key (first one present wins)
===================================  =========================================================================
step                                 ``step``
backward_passes (this step)          ``actor/policy_grad_evals_step``, ``eff/policy_grad_evals_step``
cumulative_backward_passes           ``eff/cum_policy_grad_evals``, ``actor/cumulative_policy_grad_evals``,
                                     ``actor/cumulative_bp``
seconds                              ``time/cum_train_active_s`` (excludes validation and checkpoints), else
                                     ``train/elapsed_hours`` x 3600 (includes them)
reward_mean / accuracy               ``train/reward_mean``, ``critic/score/mean`` / ``train/accuracy``
entropy / kl / clip_frac             ``actor/entropy_loss``, ``train/entropy_mean`` / ``actor/kl_loss`` /
                                     ``actor/pg_clipfrac``
grad_norm                            ``actor/grad_norm`` (= the kept step's gradient, gn_slow)
gate_z                               ``actor/gxpo_trigger_z``, ``actor/sfpo_trigger_z``
active                               ``actor/gxpo_prediction_active``, ``actor/gxpo_enabled``,
                                     ``actor/sfpo_fast_phase_active`` (> 0)
gate_open                            not ``actor/gxpo_fallback_triggered`` / ``actor/sfpo_fallback_triggered``
                                     (the authors' "fallback" is the gate's shut-off, not our non-finite
                                     fallback)
g0_norm, g1_norm, gslow_norm,        ``actor/gxpo_<name>``, else the ``gxpo/*`` alias (``gxpo/g0_norm``,
r_mean, r_std, scale_mean,           ``gxpo/fresh_grad_norm``, ``gxpo/retention_mean``, ``gxpo/retention_std``,
scale_max, inactive_frac,            ``gxpo/prediction_scale_mean``, ``gxpo/prediction_scale_max``,
ratio_clip_frac, disp2_norm,         ``gxpo/unsafe_coordinate_fraction``, ``gxpo/two_step_displacement_norm``,
dispK_norm, cos_g0_g1,               ``gxpo/predicted_displacement_norm``, ``gxpo/g0_g1_cosine``,
cos_g0_gslow, effective_multiplier   ``gxpo/g1_fresh_cosine``)
jump_norm                            ``reposition/jump_norm``, ``actor/sfpo_jump_norm``,
                                     ``gxpo/reposition_displacement_norm``
jump_over_param_norm                 ``reposition/jump_relative_to_param_norm``
k / alpha / tau                      ``gxpo/k``, ``actor/sfpo_k`` / ``gxpo/alpha``, ``actor/sfpo_alpha`` /
                                     ``gxpo/reliability_threshold``
shutoff step (run level)             ``actor/gxpo_shutoff_step``, ``actor/gxpo_fallback_step``,
                                     ``actor/sfpo_fallback_step``
eval pass@1                          ``val/pass_at_1/<source>``, else ``val/test_score/<source>`` (the mean
                                     of thresholded rewards), else ``val-core/<source>/acc/mean@N``
eval pass@N                          ``val/pass_at_N/<source>``, ``val-core/<source>/acc/best@N/mean``
===================================  =========================================================================

Per-seed copies (``.../seed3``) and across-seed spreads (``.../std``) of validation keys are skipped. With
several validation sources the eval rows follow one benchmark: MATH-500 when present (the authors'
choice), else the first source by name; every source's values are kept as ``pass@N/<source>``. The
authors' tables prefer pass@16 over pass@8/4/1 for the speed-up (``scripts/gxpo_report/common.py``):
pass ``metric="pass@16"`` to `speedup_table` to follow them; our default is sampled pass@1, the
paper's headline metric. A folder without ``config.json`` gets its settings from ``run_manifest.json``
when present, else from the log itself (GXPO if ``actor/gxpo_*`` keys appear, SFPO if ``actor/sfpo_*``
keys do, GRPO otherwise).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from gxpo_lib.analysis.records import Run, is_number
from gxpo_lib.rl.runlog import read_config

# GXPO's per-step diagnostics, and the ``gxpo/*`` aliases some of the authors' versions log them under.
_DIAGNOSTICS = ("g0_norm", "g1_norm", "gslow_norm", "r_mean", "r_std", "scale_mean", "scale_max",
                "inactive_frac", "ratio_clip_frac", "disp2_norm", "dispK_norm", "cos_g0_g1", "cos_g0_gslow",
                "effective_multiplier")
_GXPO_ALIASES = {
    "g0_norm": "gxpo/g0_norm", "g1_norm": "gxpo/g1_norm", "gslow_norm": "gxpo/fresh_grad_norm",
    "r_mean": "gxpo/retention_mean", "r_std": "gxpo/retention_std", "scale_mean": "gxpo/prediction_scale_mean",
    "scale_max": "gxpo/prediction_scale_max", "ratio_clip_frac": "gxpo/unsafe_coordinate_fraction",
    "disp2_norm": "gxpo/two_step_displacement_norm", "dispK_norm": "gxpo/predicted_displacement_norm",
    "cos_g0_g1": "gxpo/g0_g1_cosine", "cos_g0_gslow": "gxpo/g1_fresh_cosine",
}
# Our train-row name -> the authors' keys, first present wins (the table in the module docstring).
AUTHORS_TRAIN_KEYS: dict[str, tuple[str, ...]] = {
    "backward_passes": ("actor/policy_grad_evals_step", "eff/policy_grad_evals_step"),
    "cumulative_backward_passes": ("eff/cum_policy_grad_evals", "actor/cumulative_policy_grad_evals",
                                   "actor/cumulative_bp"),
    "seconds": ("time/cum_train_active_s",),
    "reward_mean": ("train/reward_mean", "critic/score/mean"),
    "accuracy": ("train/accuracy",),
    "entropy": ("actor/entropy_loss", "train/entropy_mean"),
    "kl": ("actor/kl_loss",),
    "clip_frac": ("actor/pg_clipfrac",),
    "response_length": ("response_length/mean", "train/response_length_mean"),
    "grad_norm": ("actor/grad_norm",),
    "gate_z": ("actor/gxpo_trigger_z", "actor/sfpo_trigger_z"),
    "jump_norm": ("reposition/jump_norm", "actor/sfpo_jump_norm", "gxpo/reposition_displacement_norm"),
    "jump_over_param_norm": ("reposition/jump_relative_to_param_norm",),
    "k": ("gxpo/k", "actor/sfpo_k"),
    "alpha": ("gxpo/alpha", "actor/sfpo_alpha"),
    "tau": ("gxpo/reliability_threshold",),
    **{name: (f"actor/gxpo_{name}",) + ((_GXPO_ALIASES[name],) if name in _GXPO_ALIASES else ())
       for name in _DIAGNOSTICS},
}
AUTHORS_ACTIVE_KEYS = ("actor/gxpo_prediction_active", "actor/gxpo_enabled", "actor/sfpo_fast_phase_active")
AUTHORS_SHUTOFF_FLAG_KEYS = ("actor/gxpo_fallback_triggered", "actor/sfpo_fallback_triggered")
AUTHORS_SHUTOFF_STEP_KEYS = ("actor/gxpo_shutoff_step", "actor/gxpo_fallback_step", "actor/sfpo_fallback_step")
# Validation keys: pass@k per source (per-seed copies and std skipped), and the fallbacks for pass@1.
_VAL_PASS = re.compile(r"^val/pass_at_(\d+)/(.+?)(/seed\d+|/std)?$")
_VAL_SCORE = re.compile(r"^val/test_score/(.+?)(/seed\d+|/std)?$")
_VAL_CORE_MEAN = re.compile(r"^val-core/(.+)/acc/mean@(\d+)$")
_VAL_CORE_BEST = re.compile(r"^val-core/(.+)/acc/best@(\d+)/mean$")


def load_authors_run(folder: Path, rows: list[dict], summary: dict, benchmark: str | None) -> Run:
    """A folder written by the official verl fork: flat (or FileLogger "data") rows mapped to our names.

    `rows` are the lines of its metrics.jsonl, `summary` its run_summary.json ({} if none); `benchmark`
    picks the validation source the eval rows follow (see the module docstring).
    """
    flat = [_flatten_verl_row(r) for r in rows]
    flat = [r for r in flat if r is not None]
    sources = sorted({src for r in flat for src in _val_values(r)})
    chosen = _choose_benchmark(sources, benchmark, folder)
    train, evals, last = [], [], {"cumulative_backward_passes": 0, "seconds": 0.0}
    for row in sorted(flat, key=lambda r: r["step"]):
        mapped = _map_authors_train(row)
        if mapped is not None:
            train.append(mapped)
            last.update({k: mapped[k] for k in last if mapped.get(k) is not None})  # x of later evals
        values = _val_values(row)
        if chosen in values:
            evals.append(_authors_eval_row(row, values, chosen, last))
    config = _authors_config(folder, flat)
    summary = dict(summary)
    shutoff = next((r[k] for r in flat for k in AUTHORS_SHUTOFF_STEP_KEYS if is_number(r.get(k))), None)
    if summary.get("shutoff_step") is None and shutoff is not None:
        summary["shutoff_step"] = int(shutoff)
    if chosen is not None:
        summary.setdefault("benchmark", chosen)
    return Run(folder.name, folder, config, train, evals, {}, summary, "authors")


def _flatten_verl_row(row: dict) -> dict | None:
    """``{"step", "data": {...}}`` (verl FileLogger) or a flat row -> one flat dict; None without a step."""
    if not isinstance(row, dict) or not is_number(row.get("step")):
        return None
    if isinstance(row.get("data"), dict):
        return {**row["data"], "step": int(row["step"])}
    return {**row, "step": int(row["step"])}


def _val_values(row: dict) -> dict[str, dict[int, float]]:
    """Validation results in a flat authors' row: ``{source: {k: pass@k}}`` (per-seed and std keys skipped).

    pass@1 comes from ``val/pass_at_1``, else ``val/test_score`` (the mean thresholded reward), else
    ``val-core/.../acc/mean@N``; pass@N from ``val/pass_at_N``, else ``val-core/.../acc/best@N/mean``.
    """
    passes: dict[str, dict[int, float]] = {}
    fallbacks: list[dict[str, dict[int, float]]] = [{}, {}, {}]   # test_score, core mean@N, core best@N
    for key, value in row.items():
        if not is_number(value):
            continue
        if (match := _VAL_PASS.match(key)) and match.group(3) is None:
            passes.setdefault(match.group(2), {})[int(match.group(1))] = float(value)
        elif (match := _VAL_SCORE.match(key)) and match.group(2) is None and match.group(1) != "average":
            fallbacks[0].setdefault(match.group(1), {})[1] = float(value)
        elif match := _VAL_CORE_MEAN.match(key):
            fallbacks[1].setdefault(match.group(1), {})[1] = float(value)
        elif match := _VAL_CORE_BEST.match(key):
            fallbacks[2].setdefault(match.group(1), {})[int(match.group(2))] = float(value)
    for fallback in fallbacks:  # in order of preference: a value already found is kept
        for source, ks in fallback.items():
            for k, value in ks.items():
                passes.setdefault(source, {}).setdefault(k, value)
    return passes


def _choose_benchmark(sources: list[str], wanted: str | None, folder: Path) -> str | None:
    """The validation source the eval rows follow."""
    if not sources:
        return None
    if wanted is not None:
        hits = [s for s in sources if wanted.lower() in s.lower()]
        if not hits:
            raise ValueError(f"benchmark={wanted!r} is invalid for {str(folder)!r}: allowed one of {sources}")
        return hits[0]
    math500 = [s for s in sources if "math500" in re.sub(r"[^a-z0-9]", "", s.lower())]
    return (math500 or sources)[0]


def _map_authors_train(row: dict) -> dict | None:
    """One authors' row -> our train row; None for a validation-only row (e.g. before training)."""
    if not any(not key.startswith(("val/", "val-core/", "val-aux/", "eval_greedy/")) and key != "step"
               for key in row):
        return None
    out: dict[str, Any] = {"kind": "train", "step": row["step"]}
    for name, keys in AUTHORS_TRAIN_KEYS.items():
        value = next((row[k] for k in keys if is_number(row.get(k))), None)
        if value is not None:
            out[name] = float(value)
    if out.get("seconds") is None and is_number(row.get("train/elapsed_hours")):
        out["seconds"] = float(row["train/elapsed_hours"]) * 3600.0
    active = next((row[k] for k in AUTHORS_ACTIVE_KEYS if is_number(row.get(k))), None)
    if active is not None:
        out["active"] = bool(active > 0)
    shut = next((row[k] for k in AUTHORS_SHUTOFF_FLAG_KEYS if is_number(row.get(k))), None)
    if shut is not None:
        out["gate_open"] = not shut > 0
    return out


def _authors_eval_row(row: dict, values: dict, chosen: str, last: dict) -> dict:
    """Our eval row from an authors' row: the chosen source's pass@k plus every source's, tagged."""
    out: dict[str, Any] = {"kind": "eval", "step": row["step"], "benchmark": chosen,
                           "cumulative_backward_passes": last["cumulative_backward_passes"],
                           "seconds": last["seconds"]}
    for k, value in sorted(values[chosen].items()):
        out[f"pass@{k}"] = value
    for source, ks in values.items():
        for k, value in ks.items():
            out[f"pass@{k}/{source}"] = value
    return out


def _authors_config(folder: Path, rows: list[dict]) -> dict[str, Any]:
    """Settings for an authors' run: config.json, else run_manifest.json, else read off the log."""
    config = read_config(folder)
    if config:
        return config
    manifest = _read_manifest(folder / "run_manifest.json")
    actor = (((manifest.get("hyperparameters") or {}).get("actor_rollout_ref") or {}).get("actor") or {})
    method = str(manifest.get("method") or "").lower()
    if method in ("grpo", "gxpo", "sfpo"):
        config["algorithm"] = method
    elif actor.get("use_gxpo"):
        config["algorithm"] = "gxpo"
    elif actor.get("use_sfpo"):
        config["algorithm"] = "sfpo"
    for ours, theirs in (("k", ("gxpo_k", "sfpo_inner_steps")), ("alpha", ("gxpo_alpha", "sfpo_step_size")),
                         ("tau", ("gxpo_tau",))):
        value = next((actor[t] for t in theirs if is_number(actor.get(t))), None)
        if value is not None:
            config[ours] = value
    keys = {key for r in rows for key in r}
    if "algorithm" not in config:
        gx = any(k.startswith(("actor/gxpo_", "gxpo/")) for k in keys)
        sf = any(k.startswith(("actor/sfpo_", "sfpo/")) for k in keys)
        config["algorithm"] = "gxpo" if gx else "sfpo" if sf else "grpo"
    for name in ("k", "alpha", "tau"):
        if name not in config:
            mapped = (_map_authors_train(r) or {} for r in rows)
            value = next((m[name] for m in mapped if is_number(m.get(name))), None)
            if value is not None:
                config[name] = int(value) if name == "k" else value
    config.setdefault("seed", None)
    return config


def _read_manifest(path: Path) -> dict[str, Any]:
    """The authors' run_manifest.json ({} if missing or unreadable): their format, not one of our files."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}
