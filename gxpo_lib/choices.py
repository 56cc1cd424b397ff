"""Every allowed value of the library's named options, and the authors' versions table, declared once.

Torch-free: `config` checks run settings against these, and the torch modules (`rules`, `gate`, `sfpo`,
`losses`, `extrapolation`, `models`, `check`) import them from here.
"""

from __future__ import annotations

from typing import Any

ALGORITHMS = ("grpo", "gxpo", "sfpo")
OPTIMIZERS = ("adamw", "sgd")
Q_MODES = ("per_coordinate", "scalar")
LOSS_TYPES = ("token_mean", "grpo", "dr_grpo", "dapo")
LOSS_AGGREGATIONS = ("exact", "verl")
ADV_SCALES = ("group", "batch", "none")
ROLLOUT_BACKENDS = ("auto", "lean", "hf", "vllm")
OLD_LOGPROB_SOURCES = ("sampler", "first_pass")
REPORT_TO = ("none", "tensorboard", "trackio")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# GXPO's options beyond k, alpha and max_grad_norm (the rule's keywords; `VERSIONS` sets them per version).
OPTIMIZER_STATE_MODES = ("carry", "transactional")
RETENTION_MODES = ("grad", "clip_corrected", "update")
VANISHING_PROBE = ("continue", "fallback")
ACTIVE_SETS = ("absolute", "relative", "all")
SCALE_FORMS = ("horner", "closed")
GATE_STATISTICS = ("pre_clip", "post_clip")
R_CLAMP = (-2.0, 3.0)
"""Default stability clamp (r_min, r_max) of the retention ratio."""

# The shutoff gate's options (ShutoffGate's keywords).
GATE_MODES = ("ema", "window")
GATE_SIGNALS = ("grad_norm", "entropy")
GATE_INITS = ("unit", "warmup")

# The gate a run gets (the `gate` setting), each named for what it watches; "auto" picks per algorithm.
GATE_KINDS: dict[str, dict[str, Any]] = {
    # GXPO's gate: an EMA z-score of the corrective pre-clip gradient norm (ShutoffGate's defaults)
    "grad_norm": {},
    # SFPO's official switch-off: the policy entropy's z-score over a window of 30 that includes the scored
    # value, no warm-up, permanent; tau 1.0 unless the run sets it (gate: entropy)
    "entropy": {"tau": 1.0, "warmup": 0, "mode": "window", "window": 30, "window_includes_current": True,
                "signal": "entropy"},
}
GATES = ("auto", *GATE_KINDS, "none")

# Every option as each version of the authors' code behaves (docs/versions.md); "gate": the ShutoffGate's.
_V2 = {"retention": "grad", "active_set": "absolute", "scale_form": "horner", "q_clamp": False,
       "optimizer_state": "carry", "gate_statistic": "pre_clip", "vanishing_probe": "continue",
       "gate": {"mode": "ema", "warmup": 2, "patience": 1, "two_sided": False, "signal": "grad_norm", "init": "unit"}}
_V3_GATE = {"mode": "window", "window": 30, "warmup": 0, "patience": 1, "two_sided": False, "signal": "grad_norm",
            "window_includes_current": False}
VERSIONS: dict[str, dict[str, Any]] = {
    "v1": _V2 | {"retention": "clip_corrected", "active_set": "all", "scale_form": "closed", "q_clamp": True,
                 "gate_statistic": "post_clip", "gate": _V2["gate"] | {"warmup": 0, "two_sided": True}},
    "v2": _V2,
    "v3": _V2 | {"q_clamp": True, "gate": _V3_GATE},
    "v5": _V2 | {"retention": "update", "active_set": "relative", "q_clamp": True, "optimizer_state": "transactional",
                 "gate": _V3_GATE | {"tau": 3.0, "patience": 3, "signal": "entropy", "freeze_baseline": True}},
}
VERSIONS_WITH_ENTROPY_GATE = tuple(v for v, preset in VERSIONS.items() if preset["gate"].get("signal") == "entropy")
