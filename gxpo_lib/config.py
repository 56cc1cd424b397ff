"""Every run setting, named once: `TrainConfig`, its checks, its presets. Importable without torch.

Each field of `TrainConfig` carries its default, its type (the annotation), a one-line help and a check.
Everything else that lists settings derives from here: the rule and gate keywords (`rule_kwargs`),
TRL's `GXPOConfig` fields, notebook 03's parameters cell (`parameters_cell`) and the analysis' grouping
keys (`RULE_SETTINGS`). Presets are YAML files of settings shipped in ``gxpo_lib/presets/``.

    config = resolve_config("smoke", {"algorithm": "grpo", "steps": 40})
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

from . import validation as checks

ALGORITHMS = ("grpo", "gxpo", "sfpo")
GATES = ("auto", "default", "official", "none")
GATE_MODES = ("ema", "window")
GATE_SIGNALS = ("grad_norm", "entropy")
GATE_INITS = ("unit", "warmup")
OPTIMIZER_STATE_MODES = ("carry", "transactional")
RETENTION_MODES = ("grad", "clip_corrected", "update")
VANISHING_PROBE = ("continue", "fallback")
ACTIVE_SETS = ("absolute", "relative", "all")
SCALE_FORMS = ("horner", "closed")
GATE_STATISTICS = ("pre_clip", "post_clip")
Q_MODES = ("per_coordinate", "scalar")
OPTIMIZERS = ("adamw", "sgd")
VERSIONS = ("v1", "v2", "v3", "v5")
VERSIONS_WITH_ENTROPY_GATE = ("v5",)  # rules.VERSIONS holds each version's gate (a test keeps the two in step)
SFPO_SWEEPS = ("official", "per_minibatch")
LOSS_TYPES = ("token_mean", "grpo", "dr_grpo", "dapo")
LOSS_AGGREGATIONS = ("exact", "verl")
ADV_SCALES = ("group", "batch", "none")
ROLLOUT_BACKENDS = ("auto", "lean", "hf", "vllm")
OLD_LOGPROB_SOURCES = ("sampler", "first_pass")
REPORT_TO = ("none", "tensorboard", "trackio")
R_CLAMP = (-2.0, 3.0)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

# Old names still accepted for one release (with a FutureWarning): old -> new.
ALIASES = {"tau": "gate_tau", "omega": "gate_omega"}
# Settings that may change when a run resumes (they change no result).
RESUME_MAY_CHANGE = frozenset({"steps", "eval_every", "checkpoint_every", "keep_checkpoints", "progress",
                               "reward_workers", "reward_timeout", "report_to", "generation_batch_size",
                               "micro_batch_size", "final_eval_sets", "final_eval_samples",
                               "final_eval_problems"})


def _s(default: Any, help: str, check: tuple = (), group: str = "run") -> Any:
    """A TrainConfig field: its default, one line of help, a check spec and the group it belongs to."""
    meta = {"help": help, "check": check, "group": group}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything one run needs; plain values only, so it round-trips through JSON and papermill."""

    # -- the update rule (k and alpha: GXPO's K, alpha or SFPO's K, alpha) --
    algorithm: str = _s("gxpo", "update rule: grpo, gxpo or sfpo", ("choice", ALGORITHMS), "rule")
    k: int = _s(5, "GXPO's lookahead K / SFPO's fast steps (2 or more)", ("int", 2), "rule")
    alpha: float = _s(0.5, "reposition factor alpha (> 0)", ("positive",), "rule")
    r_clamp: tuple[float, float] = _s(R_CLAMP, "stability clamp (r_min, r_max) on the retention ratio",
                                      ("interval",), "rule")
    optimizer_state: str = _s("carry", "carry or transactional (optimizer state across the probe)",
                              ("choice", OPTIMIZER_STATE_MODES), "rule")
    retention: str = _s("grad", "r from raw grads, clip_corrected grads, or the optimizer's update (V5)",
                        ("choice", RETENTION_MODES), "rule")
    skip_corrective: bool = _s(False, "ablation: stop at the extrapolated point (2 passes)", ("bool",), "rule")
    vanishing_probe: str = _s("continue", "second probe gradient ~0: continue with r 0 (authors) or fall back",
                              ("choice", VANISHING_PROBE), "rule")
    active_set: str = _s("absolute", "coordinates extrapolated: |g0|>delta, |g0|>1e-3*RMS (V5) or all",
                         ("choice", ACTIVE_SETS), "rule")
    scale_form: str = _s("horner", "q by Horner's rule or the closed form (1-r^K)/(1-r)", ("choice", SCALE_FORMS),
                         "rule")
    q_clamp: bool = _s(True, "clamp q to [1, K/2+1] (V3 and later; V2 does not)", ("bool",), "rule")
    gate_statistic: str = _s("pre_clip", "the corrective norm the gate reads: pre_clip (V2+) or post_clip (V1)",
                             ("choice", GATE_STATISTICS), "rule")
    version: str | None = _s(None, "the authors' code version (v1, v2, v3, v5) setting every other rule and gate "
                             "option; k, alpha, max_grad_norm still apply", ("optional_choice", VERSIONS), "rule")
    q_mode: str = _s("per_coordinate", "GXPO's jump: per-coordinate q (authors) or one scalar q-bar (our control)",
                     ("choice", Q_MODES), "rule")
    ppo_epochs: int = _s(1, "GRPO only: passes over each batch (3: the matched-compute control of GXPO)",
                         ("int", 1), "rule")
    step_scale: float = _s(1.0, "GRPO only: lr multiplier (displacement-matched control: a GXPO run's update-norm "
                           "ratio)",
                           ("positive",), "rule")
    sfpo_sweeps: str = _s("official", "SFPO with mini-batches: K full sweeps (official) or per mini-batch",
                          ("choice", SFPO_SWEEPS), "rule")
    # -- the shut-off gate --
    gate: str = _s("auto", "auto (GXPO: default, SFPO: official), default, official (SFPO) or none",
                   ("choice", GATES), "gate")
    gate_tau: float = _s(0.5, "threshold tau on the z-score", ("positive",), "gate")
    gate_omega: float = _s(0.1, "EMA rate omega", ("open_unit",), "gate")
    gate_warmup: int = _s(2, "observations before the gate may trip", ("int", 0), "gate")
    gate_patience: int = _s(1, "consecutive steps with z at or above tau needed to trip", ("int", 1), "gate")
    gate_mode: str = _s("ema", "ema or window statistics", ("choice", GATE_MODES), "gate")
    gate_window: int = _s(30, "window length (gate_mode: window)", ("int", 2), "gate")
    gate_window_includes_current: bool = _s(False, "score the value inside its own window", ("bool",), "gate")
    gate_signal: str = _s("grad_norm", "grad_norm (corrective pre-clip norm) or entropy",
                          ("choice", GATE_SIGNALS), "gate")
    gate_init: str = _s("unit", "cold start: unit (mu and sigma start at 1, V2) or warmup (from the warm-up observations)",
                        ("choice", GATE_INITS), "gate")
    gate_two_sided: bool = _s(False, "trip on |z| at or above tau in both directions (V1)", ("bool",), "gate")
    gate_freeze_baseline: bool = _s(False, "window mode: keep the warm-up baseline fixed (V5)", ("bool",), "gate")
    gate_permanent: bool = _s(True, "once closed, stay closed", ("bool",), "gate")
    gate_reopen_after: int = _s(10, "closed steps before re-opening (gate_permanent: false)", ("int", 1), "gate")
    # -- the model --
    model: str = _s("tiny", "tiny, smollm2-135m, a hub id or a local folder", ("str",), "model")
    dtype: str | None = _s(None, "float32, bfloat16, float16 or None (the model's own)", ("optional_str",),
                           "model")
    lora: bool = _s(True, "LoRA adapters (False: full fine-tuning)", ("bool",), "model")
    lora_rank: int = _s(8, "LoRA rank", ("int", 1), "model")
    lora_alpha: float = _s(16.0, "LoRA alpha", ("positive",), "model")
    lora_targets: tuple[str, ...] = _s(LORA_TARGETS, "module names that get adapters", ("names",), "model")
    gradient_checkpointing: bool = _s(False, "recompute activations in backward (saves memory)", ("bool",),
                                      "model")
    # -- data --
    train_set: str = _s("arith", "arith, gsm8k, math_train, math500, ...", ("str",), "data")
    train_path: str | None = _s(None, "a local JSONL instead of the hub", ("optional_str",), "data")
    train_levels: tuple[int, ...] | None = _s(None, "keep only these difficulty levels", ("levels",), "data")
    eval_set: str = _s("arith", "held-out set evaluated during training", ("str",), "data")
    eval_path: str | None = _s(None, "a local JSONL for eval_set", ("optional_str",), "data")
    eval_problems: int = _s(64, "problems per evaluation", ("int", 1), "data")
    eval_samples: int = _s(4, "samples per problem per evaluation", ("int", 1), "data")
    final_eval_sets: tuple[str, ...] = _s((), "benchmarks evaluated after training", ("names",), "data")
    final_eval_samples: int = _s(4, "samples per problem in the final evaluation", ("int", 1), "data")
    final_eval_problems: int | None = _s(None, "problems per final benchmark (None: all)", ("optional_int", 1),
                                         "data")
    data_dir: str | None = _s(None, "a folder of local benchmark JSONL files", ("optional_str",), "data")
    instruction: str | None = _s(None, "appended to each problem (None: none for arith, the math one else)",
                                 ("optional_str",), "data")
    # -- optimisation --
    optimizer: str = _s("adamw", "adamw (default) or sgd (plain gradient descent: r is 1 - lr*h exactly on a quadratic)",
                        ("choice", OPTIMIZERS), "optim")
    momentum: float = _s(0.0, "SGD momentum in [0, 1) (optimizer: sgd)", ("nonneg",), "optim")
    lr: float = _s(2e-3, "learning rate", ("positive",), "optim")
    weight_decay: float = _s(0.01, "weight decay (AdamW: decoupled; SGD: L2 in the gradient)", ("nonneg",), "optim")
    max_grad_norm: float | None = _s(1.0, "global-norm clip (None: none)", ("optional_positive",), "optim")
    batch_prompts: int = _s(8, "prompts per step", ("int", 1), "optim")
    group_size: int = _s(8, "completions per prompt (2 or more: a group of one has advantage 0)", ("int", 2), "optim")
    mini_batches: int = _s(1, "optimizer steps per batch (one rule step each)", ("int", 1), "optim")
    micro_batch_size: int | None = _s(None, "sequences per forward/backward (None: the whole mini-batch)",
                                      ("optional_int", 1), "optim")
    loss_aggregation: str = _s("exact", "micro-batch sums: exact (size-invariant) or verl (mean of means)",
                               ("choice", LOSS_AGGREGATIONS), "optim")
    max_new_tokens: int = _s(24, "completion length cap", ("int", 1), "optim")
    temperature: float = _s(1.0, "sampling temperature", ("positive",), "optim")
    top_p: float = _s(1.0, "nucleus sampling mass in (0, 1]", ("unit_right",), "optim")
    loss_type: str = _s("token_mean", "token_mean, grpo, dr_grpo or dapo", ("choice", LOSS_TYPES), "optim")
    clip_eps: float = _s(0.2, "PPO clip epsilon", ("positive",), "optim")
    clip_eps_high: float | None = _s(None, "upper clip epsilon (None: clip_eps)", ("optional_positive",), "optim")
    adv_scale: str = _s("group", "advantage scaling: group, batch or none", ("choice", ADV_SCALES), "optim")
    kl_beta: float = _s(0.0, "k3 KL coefficient", ("nonneg",), "optim")
    entropy_coef: float = _s(0.0, "entropy bonus coefficient", ("nonneg",), "optim")
    # -- schedule --
    steps: int = _s(30, "training steps", ("int", 1), "schedule")
    eval_every: int = _s(10, "steps between evaluations", ("int", 1), "schedule")
    checkpoint_every: int = _s(5, "steps between checkpoints", ("int", 1), "schedule")
    keep_checkpoints: int = _s(2, "checkpoints kept", ("int", 1), "schedule")
    seed: int = _s(0, "run seed", ("int", 0), "schedule")
    reward_workers: int = _s(0, "0: score in process; >0: a guarded process pool", ("int", 0), "schedule")
    reward_timeout: float = _s(5.0, "seconds per answer in the pool", ("positive",), "schedule")
    # -- engines --
    old_logprobs: str = _s("sampler", "sampler (a forward after sampling, verl) or first_pass (TRL)",
                           ("choice", OLD_LOGPROB_SOURCES), "engine")
    rollout_backend: str = _s("auto", "auto (lean for small Llama models on CPU, else hf), lean, hf or vllm",
                              ("choice", ROLLOUT_BACKENDS), "engine")
    generation_batch_size: int | None = _s(None, "prompts x samples generated at once (None: all)",
                                           ("optional_int", 1), "engine")
    vllm_gpu_memory: float = _s(0.3, "vLLM's share of GPU memory", ("unit_right",), "engine")
    report_to: tuple[str, ...] = _s(("none",), "trackers: none, tensorboard, trackio", ("report_to",), "engine")
    progress: bool = _s(True, "show a progress bar", ("bool",), "engine")

    def __post_init__(self):
        for f in dataclasses.fields(self):  # lists become tuples; one string is a list of one
            if f.metadata["check"][:1] in (("names",), ("levels",), ("interval",), ("report_to",)):
                setattr(self, f.name, _as_tuple(getattr(self, f.name)))

    def validate(self) -> TrainConfig:
        """Check every value's type and range, then the settings that depend on each other.

        Raises ValueError naming the setting before anything is loaded; returns self.
        """
        for f in dataclasses.fields(self):
            _check(f.name, getattr(self, f.name), f.metadata["check"])
        if (self.batch_prompts * self.group_size) % self.mini_batches:
            raise ValueError(f"mini_batches={self.mini_batches} is invalid: allowed a divisor of "
                             f"batch_prompts * group_size = {self.batch_prompts * self.group_size}")
        for name, plain in (("ppo_epochs", 1), ("step_scale", 1.0)):
            if getattr(self, name) != plain and self.algorithm != "grpo":
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid with algorithm={self.algorithm!r}: "
                                 f"it is a GRPO control (allowed {plain} for gxpo and sfpo)")
        if self.ppo_epochs > 1 and self.old_logprobs == "first_pass":
            raise ValueError(f"ppo_epochs={self.ppo_epochs} is invalid with old_logprobs='first_pass': later "
                             "epochs need the sampler's fixed old log-probs; use 'sampler'")
        if self.q_mode != "per_coordinate" and self.algorithm != "gxpo":
            raise ValueError(f"q_mode={self.q_mode!r} is invalid with algorithm={self.algorithm!r}: it is GXPO's "
                             "(allowed 'per_coordinate')")
        if self.momentum != 0.0 and (self.optimizer != "sgd" or self.momentum >= 1.0):
            raise ValueError(f"momentum={self.momentum!r} is invalid with optimizer={self.optimizer!r}: allowed "
                             "a value in [0, 1) with optimizer='sgd' (0 otherwise)")
        if self.dtype == "float16" and not self.lora:
            raise ValueError("dtype='float16' is invalid with lora=False: full fine-tuning in float16 has no "
                             "float32 master weights or loss scaling, and AdamW's state underflows (its eps "
                             "1e-8 is 0 in float16), turning the weights NaN at the first step; use "
                             "dtype='bfloat16' or 'float32', or lora=True (peft keeps adapters in float32)")
        if self.version is not None and self.algorithm != "gxpo":
            raise ValueError(f"version={self.version!r} is invalid with algorithm={self.algorithm!r}: the "
                             "version presets are GXPO's (allowed None)")
        if self.gate == "official" and self.algorithm != "sfpo":
            raise ValueError(f"gate='official' is invalid with algorithm={self.algorithm!r}: the official "
                             "entropy-window gate is SFPO's; allowed 'auto', 'default' or 'none'")
        self._check_old_logprobs()
        return self

    def _check_old_logprobs(self) -> None:
        """"first_pass" needs one mini-batch (all rows at the sampling weights) and a gate that reads no entropy."""
        if self.old_logprobs != "first_pass":
            return
        if self.mini_batches != 1:
            raise ValueError(f"old_logprobs='first_pass' is invalid with mini_batches={self.mini_batches}: only a "
                             "single mini-batch sees every rollout at the sampling weights; use 'sampler'")
        if uses_entropy_gate(self):
            raise ValueError("old_logprobs='first_pass' is invalid with an entropy-signal gate (SFPO's official "
                             "gate, or gate_signal='entropy'): the gate needs the sampling policy's entropy "
                             "before the update; use 'sampler' (or gate='default')")

    @property
    def resolved_gate(self) -> str:
        """The gate the rule gets: "default", "official" or "none" ("auto" resolved per algorithm)."""
        if self.gate != "auto":
            return self.gate
        return "official" if self.algorithm == "sfpo" else "default"

    @classmethod
    def from_dict(cls, values: dict[str, Any], warn: bool = True) -> TrainConfig:
        """Build from a dict: old names normalised, unknown names refused (a typo is never silently ignored)."""
        values = normalise_names(values, warn=warn)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}={values[unknown[0]]!r} is invalid: not a TrainConfig setting "
                             f"(allowed: {', '.join(sorted(known))})")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def accept_old_names(cls: type) -> type:
    """Let a dataclass's constructor take the old setting names too (normalised, with a FutureWarning)."""
    dataclass_init = cls.__init__

    @functools.wraps(dataclass_init)
    def __init__(self, *args, **kwargs):
        dataclass_init(self, *args, **normalise_names(kwargs))

    cls.__init__ = __init__
    return cls


accept_old_names(TrainConfig)


def _old_name_reader(new: str) -> property:
    def read(self):
        _deprecated(True, f"{new!r} was read by its old name")
        return getattr(self, new)

    return property(read)


for _old, _new in ALIASES.items():  # config.tau still reads config.gate_tau, for one release
    setattr(TrainConfig, _old, _old_name_reader(_new))


def normalise_names(values: dict[str, Any], warn: bool = True) -> dict[str, Any]:
    """Old setting names -> current ones (`ALIASES`, and the old boolean `gate` / `sfpo_official_gate`).

    A name given twice (old and new) must agree. `warn=False` reads old run folders quietly.
    """
    values = dict(values)
    for old, new in ALIASES.items():
        if old in values:
            value = values.pop(old)
            if new in values and values[new] != value:
                raise ValueError(f"{old}={value!r} conflicts with {new}={values[new]!r}: give only {new}")
            values[new] = value
            _deprecated(warn, f"setting {old!r} is now {new!r}")
    official = values.pop("sfpo_official_gate", None)
    gate = values.get("gate")
    if isinstance(gate, bool):
        values["gate"] = "auto" if gate else "none"
        _deprecated(warn, "gate=True/False is now gate='auto'/'none'")
    if official is not None:
        _deprecated(warn, "sfpo_official_gate is now gate='official' (or 'default' for our gate)")
        if official is False and values.get("gate", "auto") == "auto" and values.get("algorithm") == "sfpo":
            values["gate"] = "default"
    return values


def _deprecated(warn: bool, message: str) -> None:
    if warn:
        warnings.warn(message + " (the old name works for one release)", FutureWarning, stacklevel=4)


def _as_tuple(value: Any) -> Any:
    """A list-like setting as a tuple; one string is a list of one (papermill's `-p sets math500`)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _check(name: str, value: Any, spec: tuple) -> None:
    """Type and range of one setting by its check spec; raises ValueError naming it."""
    kind, *args = spec
    if kind == "choice":
        checks.check_choice(name, value, args[0])
    elif kind == "optional_choice":
        if value is not None:
            checks.check_choice(name, value, args[0])
    elif kind == "int":
        checks.check_int(name, value, minimum=args[0])
    elif kind == "optional_int":
        if value is not None:
            checks.check_int(name, value, minimum=args[0])
    elif kind == "positive":
        checks.check_positive(name, value)
    elif kind == "optional_positive":
        checks.check_optional_positive(name, value)
    elif kind == "open_unit":
        checks.check_open_unit(name, value)
    elif kind in ("nonneg", "unit_right"):
        upper = 1.0 if kind == "unit_right" else float("inf")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            0 < value <= upper if kind == "unit_right" else 0 <= value < upper)
        if not ok:
            allowed = "a number in (0, 1]" if kind == "unit_right" else "a finite number >= 0"
            raise ValueError(f"{name}={value!r} is invalid: allowed {allowed}")
    elif kind == "interval":
        checks.check_interval(name, value)
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} is invalid: allowed true or false")
    elif kind in ("str", "optional_str"):
        if not (isinstance(value, str) and value) and not (value is None and kind == "optional_str"):
            raise ValueError(f"{name}={value!r} is invalid: allowed a non-empty string"
                             + (" or None" if kind == "optional_str" else ""))
    elif kind in ("names", "report_to"):
        if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"{name}={value!r} is invalid: allowed a list of names")
        if kind == "report_to":
            for v in value:
                checks.check_choice(name, v, REPORT_TO)
    elif kind == "levels":
        if value is not None and not (isinstance(value, tuple) and value and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
            raise ValueError(f"{name}={value!r} is invalid: allowed None or a list of integers >= 1")
    else:  # pragma: no cover - a field without a known check is a bug here
        raise AssertionError(f"{name}: unknown check {kind!r}")


# ---------------------------------------------------------------------------------------------------
# Derived views: the rule's keywords, groups of settings, notebook 03's parameters
# ---------------------------------------------------------------------------------------------------
def settings_in(group: str) -> tuple[str, ...]:
    """Names of the TrainConfig settings in one group ("rule", "gate", "model", "data", ...)."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] == group)


RULE_SETTINGS = settings_in("rule") + settings_in("gate")   # what tells one rule's runs from another's
GATE_KEYWORDS = {name: name.removeprefix("gate_") for name in settings_in("gate") if name != "gate"}
# GXPO's own keywords beyond k, alpha, max_grad_norm and the gate (SFPO takes none of them).
GXPO_KEYWORDS = ("r_clamp", "optimizer_state", "retention", "skip_corrective", "vanishing_probe", "active_set",
                 "scale_form", "q_clamp", "gate_statistic", "q_mode")


def uses_entropy_gate(config: TrainConfig) -> bool:
    """Does the rule's gate read the sampling policy's entropy (passed before each update)?"""
    if config.algorithm == "grpo" or config.gate == "none":
        return False
    if config.version is not None:
        return config.version in VERSIONS_WITH_ENTROPY_GATE
    gate = config.resolved_gate
    return gate == "official" or (gate == "default" and config.gate_signal == "entropy")


def rule_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The keywords of `PlainStep` / `GXPO` / `SFPO` that `config` describes (torch-free, for build_rule)."""
    kwargs: dict[str, Any] = {"max_grad_norm": config.max_grad_norm}
    if config.algorithm == "grpo":
        return kwargs
    kwargs |= {"k": config.k, "alpha": config.alpha}
    if config.version is not None:  # GXPO.from_version sets every other option as that version did
        return kwargs | {"version": config.version} | ({"gate": None} if config.gate == "none" else {}) | (
            {"q_mode": config.q_mode} if config.q_mode != "per_coordinate" else {})
    gate = config.resolved_gate
    if gate == "none":
        kwargs["gate"] = None
    elif gate == "official":
        kwargs["gate"] = "official"
    else:
        kwargs["gate"] = "default"
        kwargs |= {keyword: getattr(config, name) for name, keyword in GATE_KEYWORDS.items()}
    if config.algorithm == "gxpo":
        kwargs |= {name: getattr(config, name) for name in GXPO_KEYWORDS}
    return kwargs


def field_types() -> dict[str, str]:
    """Each setting's type as written in the annotation, e.g. {"k": "int", "dtype": "str | None"}."""
    hints = get_type_hints(TrainConfig)
    return {name: _type_text(hint) for name, hint in hints.items()}


def _type_text(hint: Any) -> str:
    """A type as papermill's parameter parser reads it: `Optional[int]`, `tuple`, `str`."""
    args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
    if type(None) in getattr(hint, "__args__", ()):
        return f"Optional[{_type_text(args[0])}]"
    origin = getattr(hint, "__origin__", None)
    return (origin or hint).__name__


def field_help() -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}


# The run notebook's own parameters (not TrainConfig settings): name -> (type, default, help).
NOTEBOOK_PARAMETERS: dict[str, tuple[str, Any, str]] = {
    "preset": ("str", "smoke", "a preset name (gxpo_lib/presets/*.yaml) filling the defaults"),
    "output_dir": ("str", "run-smoke", "the run folder (relative to the working directory)"),
    "resume": ("bool", True, "False: refuse to reuse a folder that already holds a run"),
    "backend": ("str", "gxpo", "gxpo: gxpo_lib's trainer in this kernel; trl: TRL's GRPOTrainer via accelerate"),
    "num_processes": ("int", 1, "trl backend: processes (GPUs; gloo CPU processes without a GPU)"),
    "accelerate_config": ("Optional[str]", None, "trl backend: single_gpu, multi_gpu, zero2 or a YAML path"),
    "trl_overrides": ("Optional[dict]", None, "trl backend: raw GXPOConfig settings, e.g. {'use_vllm': True}"),
}
BACKENDS = ("gxpo", "trl")
_PYTHON_TYPES = {"str": (str,), "bool": (bool,), "int": (int,), "dict": (dict,)}


def check_notebook_parameters(values: dict[str, Any]) -> None:
    """The run notebook's own parameters in `values`: each of its declared type, `backend` one of `BACKENDS`,
    `num_processes` >= 1. Raises ValueError naming the parameter."""
    for name, (kind, _, _) in NOTEBOOK_PARAMETERS.items():
        if name not in values:
            continue
        value, optional = values[name], kind.startswith("Optional[")
        allowed = _PYTHON_TYPES[kind.removeprefix("Optional[").removesuffix("]")]
        if (value is None and not optional) or (value is not None and (
                not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed))):
            raise ValueError(f"{name}={value!r} is invalid: allowed {kind}")
    if "backend" in values:
        checks.check_choice("backend", values["backend"], BACKENDS)
    if "num_processes" in values:
        checks.check_int("num_processes", values["num_processes"], minimum=1)


def parameters_cell() -> str:
    """The source of notebook 03's `parameters` cell: typed, one line of help each (papermill --help-notebook).

    TrainConfig settings default to None there, meaning "keep the preset's value".
    """
    lines = ["# Run parameters (papermill -p NAME VALUE). Settings left at None keep the preset's value.",
             "from typing import Optional", ""]
    for name, (kind, default, help_text) in NOTEBOOK_PARAMETERS.items():
        lines.append(f"{name}: {kind} = {default!r}  # {help_text}")
    types, helps = field_types(), field_help()
    for f in dataclasses.fields(TrainConfig):
        kind = types[f.name]
        kind = kind if kind.startswith("Optional[") else f"Optional[{kind}]"
        lines.append(f"{f.name}: {kind} = None  # {helps[f.name]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------
PRESET_DIR = resources.files("gxpo_lib") / "presets"


def list_presets(directory: Path | str | None = None) -> list[str]:
    """Names of the preset files (without .yaml)."""
    folder = PRESET_DIR if directory is None else Path(directory)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name: str, directory: Path | str | None = None) -> dict[str, Any]:
    """The settings a preset file holds; an unknown preset or setting raises ValueError."""
    import yaml

    folder = PRESET_DIR if directory is None else Path(directory)
    path = folder / f"{name}.yaml"
    if not isinstance(name, str) or not path.is_file():
        raise ValueError(f"preset={name!r} is invalid: allowed one of {list_presets(directory)}")
    values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"preset={name!r}: {path} must hold a mapping of setting: value")
    TrainConfig.from_dict(values)  # unknown names fail here, naming the file's bad key
    return normalise_names(values, warn=False)


def resolve_config(preset: str | None, overrides: dict[str, Any] | None = None,
                   directory: Path | str | None = None) -> TrainConfig:
    """Defaults < preset < explicit overrides; the result is validated before anything is loaded.

    Override values that are None mean "not given" (the notebook's parameters cell uses None that way).
    """
    values = load_preset(preset, directory) if preset else {}
    values |= normalise_names({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig.from_dict(values).validate()
