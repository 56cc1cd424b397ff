"""Every run setting, named once: `TrainConfig`, its checks, its presets. Importable without torch.

Each field of `TrainConfig` carries its default, its type (the annotation), a one-line help and a check.
Everything else that lists settings derives from here: the rule and gate keywords (`rule_kwargs`),
TRL's `GXPOConfig` fields, notebook 03's parameters cell (`parameters_cell`) and the analysis' grouping
keys (`RULE_SETTINGS`). Presets are YAML files of settings shipped in ``gxpo_lib/presets/``.

    config = resolve_config("smoke", {"algorithm": "grpo", "steps": 40})
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, get_type_hints

from gxpo_lib import validation as checks
from gxpo_lib.choices import (
    ALGORITHMS,
    GATE_KINDS,
    GATES,
    LORA_TARGETS,
    LOSS_AGGREGATIONS,
    LOSS_TYPES,
    OLD_LOGPROB_SOURCES,
    OPTIMIZERS,
    Q_MODES,
    REPORT_TO,
    ROLLOUT_BACKENDS,
    VERSIONS,
    VERSIONS_WITH_ENTROPY_GATE,
)
from gxpo_lib.validation import choice, integer, names, optional

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
KEEP_CHECKPOINTS = 2          # checkpoints kept per run
GENERATION_BATCH = 256        # sequences the HF and lean samplers generate at once (vLLM batches itself)
REWARD_TIMEOUT = 5.0          # seconds per answer in the reward pool
VLLM_REWARD_WORKERS = 4       # a vLLM (GPU) run scores in a guarded pool of this many processes; others in process

# Settings that once existed: name -> where the thing lives now (an old name is refused with this hint).
_VERSION_HINT = "an option of the authors' code versions: set version= (v1, v2, v3, v5), or pass it to GXPO(...)"
_GATE_HINT = "a ShutoffGate option: set version= (v1, v2, v3, v5), gate= (grad_norm, entropy), or pass it to GXPO(...)"
REMOVED = {
    **dict.fromkeys(("r_clamp", "optimizer_state", "retention", "skip_corrective", "vanishing_probe", "active_set",
                     "scale_form", "q_clamp", "gate_statistic"), _VERSION_HINT),
    **dict.fromkeys(("gate_omega", "omega", "gate_patience", "gate_mode", "gate_window", "gate_window_includes_current",
                     "gate_signal", "gate_two_sided", "gate_freeze_baseline", "gate_permanent", "gate_reopen_after",
                     "sfpo_official_gate"), _GATE_HINT),
    "gate_tau": "now tau", "gate_warmup": "now warmup",
    "train_path": "use data_dir (a folder of benchmark JSONL files)",
    "eval_path": "use data_dir (a folder of benchmark JSONL files)",
    "lora_alpha": "LoRA alpha is 2 x lora_rank", "keep_checkpoints": f"{KEEP_CHECKPOINTS} checkpoints are kept",
    "reward_timeout": f"{REWARD_TIMEOUT:g} s per answer", "adv_scale": "advantages are scaled per group",
    "reward_workers": f"vLLM runs score in a pool of {VLLM_REWARD_WORKERS}, others in process",
    "generation_batch_size": "the samplers generate 256 sequences at once (vLLM batches itself)",
    "top_p": "sampling uses the whole distribution (top_p 1)",
    "clip_eps_high": "the upper clip is clip_eps (losses.policy_loss takes clip_eps_high)",
    "gate_init": "a ShutoffGate option (init=): runs start the gate's statistics at 1 (V2); "
                 "pass gate=ShutoffGate(init='warmup') to GXPO(...)",
    "sfpo_sweeps": "SFPO runs use the authors' official sweeps (K sweeps over all mini-batches); one mini-batch at "
                   "a time is SFPO.step per mini-batch (the rule's Python API)",
    "progress": "a run option, not a setting: gxpo_lib.run(..., progress=False), train(..., progress=False), "
                "`python -m gxpo_lib run --no-progress`, or notebook 03's `progress` parameter",
}
# Settings that may change when a run resumes (they change no result).
RESUME_MAY_CHANGE = frozenset({"steps", "eval_every", "checkpoint_every", "report_to",
                               "micro_batch_size", "final_eval_sets", "final_eval_samples", "final_eval_problems"})


def _s(default: Any, help: str, check, group: str = "run") -> Any:
    """A TrainConfig field: its default, one line of help, its check (a callable (name, value)) and group."""
    meta = {"help": help, "check": check, "group": group}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_LISTS = ("lora_targets", "train_levels", "final_eval_sets", "report_to")  # lists become tuples


@dataclass
class TrainConfig:
    """Everything one run needs; plain values only, so it round-trips through JSON and papermill."""

    # -- the update rule (k and alpha: GXPO's K, alpha or SFPO's K, alpha) --
    algorithm: str = _s("gxpo", "update rule: grpo, gxpo or sfpo", choice(ALGORITHMS), "rule")
    k: int = _s(5, "GXPO's lookahead K / SFPO's fast steps (2 or more)", integer(2), "rule")
    alpha: float = _s(0.5, "reposition factor alpha (> 0)", checks.check_positive, "rule")
    version: str | None = _s(None, "the authors' code version (v1, v2, v3, v5) setting every other rule and gate "
                             "option; k, alpha, max_grad_norm still apply", optional(choice(tuple(VERSIONS))), "rule")
    q_mode: str = _s("per_coordinate", "GXPO's jump: per-coordinate q (authors) or one scalar q-bar (our control)",
                     choice(Q_MODES), "rule")
    ppo_epochs: int = _s(1, "GRPO only: passes over each batch (3: the matched-compute control of GXPO)",
                         integer(1), "rule")
    step_scale: float = _s(1.0, "GRPO only: lr multiplier (displacement-matched control: a GXPO run's update-norm "
                           "ratio)", checks.check_positive, "rule")
    # -- the shut-off gate --
    gate: str = _s("auto", "grad_norm (an EMA z-score of the corrective gradient norm), entropy (SFPO's entropy "
                   "window), none, or auto (GXPO: grad_norm; SFPO: its official entropy gate, tau 1.0)",
                   choice(GATES), "gate")
    tau: float = _s(0.5, "the gate's threshold on the z-score", checks.check_positive, "gate")
    warmup: int = _s(2, "the gate's observations before it may trip (grad_norm)", integer(0), "gate")
    # -- the model --
    model: str = _s("tiny", "tiny, smollm2-135m, a hub id or a local folder", checks.check_text, "model")
    dtype: str | None = _s(None, "float32, bfloat16, float16 or None (the model's own)", optional(checks.check_text),
                           "model")
    lora: bool = _s(True, "LoRA adapters, alpha 2 x rank (False: full fine-tuning)", checks.check_bool, "model")
    lora_rank: int = _s(8, "LoRA rank", integer(1), "model")
    lora_targets: tuple[str, ...] = _s(LORA_TARGETS, "module names that get adapters", names(), "model")
    gradient_checkpointing: bool = _s(False, "recompute activations in backward (saves memory)", checks.check_bool,
                                      "model")
    # -- data --
    train_set: str = _s("arith", "arith, gsm8k, math_train, math500, ...", checks.check_text, "data")
    train_levels: tuple[int, ...] | None = _s(None, "keep only these difficulty levels",
                                              optional(checks.check_levels), "data")
    eval_set: str = _s("arith", "held-out set evaluated during training", checks.check_text, "data")
    eval_problems: int = _s(64, "problems per evaluation", integer(1), "data")
    eval_samples: int = _s(4, "samples per problem per evaluation", integer(1), "data")
    final_eval_sets: tuple[str, ...] = _s((), "benchmarks evaluated after training", names(), "data")
    final_eval_samples: int = _s(4, "samples per problem in the final evaluation", integer(1), "data")
    final_eval_problems: int | None = _s(None, "problems per final benchmark (None: all)", optional(integer(1)), "data")
    data_dir: str | None = _s(None, "a folder of local benchmark JSONL files", optional(checks.check_text), "data")
    instruction: str | None = _s(None, "appended to each problem (None: none for arith, the math one else)",
                                 optional(checks.check_text), "data")
    # -- optimisation --
    optimizer: str = _s("adamw", "adamw (default) or sgd (plain gradient descent: r is 1 - lr*h exactly on a "
                        "quadratic)", choice(OPTIMIZERS), "optim")
    momentum: float = _s(0.0, "SGD momentum in [0, 1) (optimizer: sgd)", checks.check_nonnegative, "optim")
    lr: float = _s(2e-3, "learning rate", checks.check_positive, "optim")
    weight_decay: float = _s(0.01, "weight decay (AdamW: decoupled; SGD: L2 in the gradient)",
                             checks.check_nonnegative, "optim")
    max_grad_norm: float | None = _s(1.0, "global-norm clip (None: none)", checks.check_optional_positive, "optim")
    batch_prompts: int = _s(8, "prompts per step", integer(1), "optim")
    group_size: int = _s(8, "completions per prompt (2 or more: a group of one has advantage 0)", integer(2), "optim")
    mini_batches: int = _s(1, "optimizer steps per batch (one rule step each)", integer(1), "optim")
    micro_batch_size: int | None = _s(None, "sequences per forward/backward (None: the whole mini-batch)",
                                      optional(integer(1)), "optim")
    loss_aggregation: str = _s("exact", "micro-batch sums: exact (size-invariant) or verl (mean of means)",
                               choice(LOSS_AGGREGATIONS), "optim")
    max_new_tokens: int = _s(24, "completion length cap", integer(1), "optim")
    temperature: float = _s(1.0, "sampling temperature", checks.check_positive, "optim")
    loss_type: str = _s("token_mean", "token_mean, grpo, dr_grpo or dapo", choice(LOSS_TYPES), "optim")
    clip_eps: float = _s(0.2, "PPO clip epsilon", checks.check_positive, "optim")
    kl_beta: float = _s(0.0, "k3 KL coefficient", checks.check_nonnegative, "optim")
    entropy_coef: float = _s(0.0, "entropy bonus coefficient", checks.check_nonnegative, "optim")
    # -- schedule --
    steps: int = _s(30, "training steps", integer(1), "schedule")
    eval_every: int = _s(10, "steps between evaluations", integer(1), "schedule")
    checkpoint_every: int = _s(5, "steps between checkpoints", integer(1), "schedule")
    seed: int = _s(0, "run seed", integer(0), "schedule")
    # -- engines --
    old_logprobs: str = _s("sampler", "sampler (a forward after sampling, verl) or first_pass (TRL)",
                           choice(OLD_LOGPROB_SOURCES), "engine")
    rollout_backend: str = _s("auto", "auto (lean for small Llama models on CPU, else hf), lean, hf or vllm",
                              choice(ROLLOUT_BACKENDS), "engine")
    vllm_gpu_memory: float = _s(0.3, "vLLM's share of GPU memory", checks.check_unit_right, "engine")
    report_to: tuple[str, ...] = _s(("none",), "trackers: none, tensorboard, trackio", names(REPORT_TO), "engine")

    def __post_init__(self):
        for name in _LISTS:  # lists become tuples; one string is a list of one
            setattr(self, name, _as_tuple(getattr(self, name)))

    def validate(self) -> TrainConfig:
        """Check every value's type and range, then the settings that depend on each other.

        Raises ValueError naming the setting before anything is loaded; returns self.
        """
        for f in dataclasses.fields(self):
            f.metadata["check"](f.name, getattr(self, f.name))
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
            raise ValueError("old_logprobs='first_pass' is invalid with an entropy-signal gate (gate='entropy', SFPO's "
                             "official gate, or version='v5'): the gate needs the sampling policy's entropy "
                             "before the update; use 'sampler' (or gate='grad_norm')")

    @property
    def resolved_gate(self) -> str:
        """The gate the rule gets: "grad_norm", "entropy" or "none" ("auto" resolved per algorithm)."""
        if self.gate != "auto":
            return self.gate
        return "entropy" if self.algorithm == "sfpo" else "grad_norm"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict; an unknown or removed name is refused (a typo is never silently ignored)."""
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def refuse_unknown(values: dict[str, Any]) -> None:
    """Raise ValueError naming the first setting in `values` that TrainConfig does not have (and, for one
    that once existed, where that option lives now)."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in sorted(set(values) - known):
        hint = REMOVED.get(name)
        where = f"removed: {hint}" if hint else f"not a TrainConfig setting (allowed: {', '.join(sorted(known))})"
        raise ValueError(f"{name}={values[name]!r} is invalid: {where}")


def _refusing_init(dataclass_init):
    def __init__(self, **values):
        refuse_unknown(values)
        dataclass_init(self, **values)

    __init__.__doc__ = dataclass_init.__doc__
    return __init__


TrainConfig.__init__ = _refusing_init(TrainConfig.__init__)


def _as_tuple(value: Any) -> Any:
    """A list-like setting as a tuple; one string is a list of one (papermill's `-p sets math500`)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


# -- Derived views: the rule's keywords, groups of settings, notebook 03's parameters ---------------------
def settings_in(group: str) -> tuple[str, ...]:
    """Names of the TrainConfig settings in one group ("rule", "gate", "model", "data", ...)."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] == group)


RULE_SETTINGS = settings_in("rule") + settings_in("gate")   # what tells one rule's runs from another's


def uses_entropy_gate(config: TrainConfig) -> bool:
    """Does the rule's gate read the sampling policy's entropy (passed before each update)?"""
    if config.algorithm == "grpo" or config.gate == "none":
        return False
    if config.version is not None:
        return config.version in VERSIONS_WITH_ENTROPY_GATE
    return config.resolved_gate == "entropy"


def gate_settings(config: TrainConfig) -> dict[str, Any] | None:
    """The ShutoffGate keywords of the run's gate (None: no gate); `version` runs get their version's gate."""
    gate = config.resolved_gate
    if gate == "none":
        return None
    if gate == "entropy":  # SFPO's official gate under "auto" keeps its own tau
        return GATE_KINDS["entropy"] | ({} if config.gate == "auto" else {"tau": config.tau})
    return GATE_KINDS["grad_norm"] | {"tau": config.tau, "warmup": config.warmup}


def rule_kwargs(config: TrainConfig) -> dict[str, Any]:
    """The keywords of `PlainStep` / `GXPO` / `SFPO` that `config` describes (torch-free, for build_rule)."""
    kwargs: dict[str, Any] = {"max_grad_norm": config.max_grad_norm}
    if config.algorithm == "grpo":
        return kwargs
    kwargs |= {"k": config.k, "alpha": config.alpha}
    if config.algorithm == "gxpo" and config.q_mode != "per_coordinate":
        kwargs["q_mode"] = config.q_mode
    if config.version is not None:  # GXPO.from_version sets every other option as that version did
        return kwargs | {"version": config.version} | ({"gate": None} if config.gate == "none" else {})
    settings = gate_settings(config)
    return kwargs | ({"gate": None} if settings is None else {"gate": "default", **settings})


def field_types() -> dict[str, str]:
    """Each setting's type as written in the annotation, e.g. {"k": "int", "dtype": "str | None"}."""
    return {name: _type_text(hint) for name, hint in get_type_hints(TrainConfig).items()}


def _type_text(hint: Any) -> str:
    """A type as papermill's parameter parser reads it: `Optional[int]`, `tuple`, `str`."""
    args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
    if type(None) in getattr(hint, "__args__", ()):
        return f"Optional[{_type_text(args[0])}]"
    origin = getattr(hint, "__origin__", None)
    return (origin or hint).__name__


def field_help() -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}


# The run's own options (not TrainConfig settings: they change no result): notebook 03's parameters,
# keywords of `gxpo_lib.run`: name -> (type, default, help).
NOTEBOOK_PARAMETERS: dict[str, tuple[str, Any, str]] = {
    "preset": ("str", "smoke", "a preset name (gxpo_lib/presets/*.yaml) filling the defaults"),
    "output_dir": ("str", "run-smoke", "the run folder (relative to the working directory)"),
    "resume": ("bool", True, "False: refuse to reuse a folder that already holds a run"),
    "progress": ("bool", True, "show a progress bar (gxpo backend)"),
    "backend": ("str", "gxpo", "gxpo: gxpo_lib's trainer in this kernel; trl: TRL's GRPOTrainer via accelerate"),
    "num_processes": ("int", 1, "trl backend: processes (GPUs; gloo CPU processes without a GPU)"),
    "accelerate_config": ("Optional[str]", None, "trl backend: single_gpu, multi_gpu, zero2 or a YAML path"),
    "trl_overrides": ("Optional[dict]", None, "trl backend: raw GXPOConfig settings, e.g. {'use_vllm': True}"),
    "fit": ("bool", False, "lower micro_batch_size to what the memory preflight says fits, instead of refusing"),
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
        kind = types[f.name] if types[f.name].startswith("Optional[") else f"Optional[{types[f.name]}]"
        lines.append(f"{f.name}: {kind} = None  # {helps[f.name]}")
    return "\n".join(lines)


# -- Presets ----------------------------------------------------------------------------------------------
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
    try:
        TrainConfig.from_dict(values)  # unknown names fail here, naming the file's bad key
    except ValueError as error:
        raise ValueError(f"preset={name!r} ({path}): {error}") from None
    return values


def resolve_config(preset: str | None, overrides: dict[str, Any] | None = None,
                   directory: Path | str | None = None) -> TrainConfig:
    """Defaults < preset < explicit overrides; the result is validated before anything is loaded.

    Override values that are None mean "not given" (the notebook's parameters cell uses None that way).
    """
    values = load_preset(preset, directory) if preset else {}
    values |= {k: v for k, v in (overrides or {}).items() if v is not None}
    return TrainConfig.from_dict(values).validate()


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``["k=5", "lr=1e-4", "lora=false", "final_eval_sets=[arith]"]`` -> typed values (JSON, else YAML)."""
    import json

    import yaml

    values = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"-s {pair!r} is invalid: allowed NAME=VALUE")
        try:
            values[name.strip()] = json.loads(text)
        except json.JSONDecodeError:  # YAML reads what JSON does not: [arith], bare words
            values[name.strip()] = yaml.safe_load(text)
    return values
