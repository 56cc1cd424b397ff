"""gxpo_lib.config: every setting named once, checked by name before work, removed names refused with where
the option lives now; the rule, the gate and TRL's GXPOConfig all derive their settings from it."""

import dataclasses
import inspect
import json
import subprocess
import sys

import pytest

from gxpo_lib import config as cfg
from gxpo_lib.config import TrainConfig, resolve_config, rule_kwargs, uses_entropy_gate


def test_importing_config_loads_no_torch():
    code = ("import sys, gxpo_lib.config, gxpo_lib.rl.runlog; print(json.dumps(sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_every_setting_has_a_type_a_help_line_and_a_check():
    types, helps = cfg.field_types(), cfg.field_help()
    for f in dataclasses.fields(TrainConfig):
        assert callable(f.metadata["check"]), f.name
        assert helps[f.name] and "\n" not in helps[f.name], f.name
        assert types[f.name] not in ("", "Any"), f.name
        f.metadata["check"](f.name, getattr(TrainConfig(), f.name))  # defaults pass their checks


@pytest.mark.parametrize("name, value, message", [
    ("group_size", 1, "group_size=1"), ("steps", "10", "steps='10'"), ("lora", "yes", "lora='yes'"),
    ("tau", -1.0, "tau=-1.0"), ("gate_tau", -1.0, "gate_tau=-1.0"), ("top_p", 0.0, "top_p=0.0"),
    ("algorithm", "ppo", "algorithm='ppo'"),
    ("train_levels", [0, 2], "train_levels"), ("report_to", ["wandb"], "report_to='wandb'"),
    ("micro_batch_size", 0, "micro_batch_size=0"), ("lr", float("nan"), "lr=nan"), ("k", True, "k=True"),
    ("gate", "official", "gate='official'"), ("r_clamp", (3.0, -2.0), "r_clamp"),
    ("loss_aggregation", "mean", "loss_aggregation='mean'"),
])
def test_bad_values_are_refused_by_name_before_any_work(name, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        TrainConfig(**{name: value}).validate()


def test_a_list_setting_given_as_one_string_is_a_list_of_one():
    # what `papermill -p final_eval_sets math500` passes
    config = resolve_config("smoke", {"final_eval_sets": "math500", "lora_targets": "q_proj", "report_to": "none"})
    assert config.final_eval_sets == ("math500",) and config.lora_targets == ("q_proj",)
    assert TrainConfig(train_levels=[3, 4]).train_levels == (3, 4)


def test_removed_settings_are_refused_by_name_saying_where_the_option_lives():
    with pytest.raises(ValueError, match=r"retention='update' is invalid: removed: .*version="):
        TrainConfig(retention="update")
    with pytest.raises(ValueError, match=r"gate_mode='window' is invalid: removed: .*version="):
        TrainConfig.from_dict({"gate_mode": "window"})
    with pytest.raises(ValueError, match="gate_tau=0.7 is invalid: removed: now tau"):
        resolve_config("smoke", {"gate_tau": 0.7})
    for name, value, where in (("progress", False, r"run option.*progress=False"),
                               ("sfpo_sweeps", "per_minibatch", r"official sweeps.*SFPO\.step"),
                               ("gate_init", "warmup", r"ShutoffGate\(init='warmup'\)")):
        with pytest.raises(ValueError, match=f"{name}={value!r} is invalid: removed: .*{where}"):
            TrainConfig(**{name: value})
    assert set(cfg.REMOVED).isdisjoint(f.name for f in dataclasses.fields(TrainConfig))
    assert len(dataclasses.fields(TrainConfig)) <= 50


def test_a_folder_older_code_wrote_reads_under_todays_names():
    from gxpo_lib.rl.runlog import current_settings

    old = {"k": 5, "progress": True, "sfpo_sweeps": "official", "gate_init": "unit", "gate_tau": 0.7}
    assert current_settings(old) == {"k": 5, "tau": 0.7}        # run options and fixed values dropped
    kept = current_settings({"sfpo_sweeps": "per_minibatch"})    # a run that did otherwise keeps saying so
    with pytest.raises(ValueError, match="sfpo_sweeps='per_minibatch' is invalid: removed"):
        TrainConfig(**kept)


def test_unknown_names_are_refused_with_the_allowed_list():
    with pytest.raises(ValueError, match="stpes=3 is invalid: not a TrainConfig setting"):
        TrainConfig.from_dict({"stpes": 3})


def test_rule_and_gate_keywords_derive_from_the_config():
    from gxpo_lib.choices import GATE_KINDS
    from gxpo_lib.core.gate import ShutoffGate
    from gxpo_lib.core.rules import GXPO
    from gxpo_lib.core.sfpo import SFPO

    gate_params = set(inspect.signature(ShutoffGate.__init__).parameters) - {"self"}
    for kind, settings in GATE_KINDS.items():
        assert set(settings) <= gate_params, kind
    assert set(cfg.gate_settings(TrainConfig())) <= gate_params
    import torch

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    for algorithm, rule in (("gxpo", GXPO), ("sfpo", SFPO)):
        for gate in ("auto", "grad_norm", "entropy", "none"):
            built = rule(optimizer, **rule_kwargs(TrainConfig(algorithm=algorithm, gate=gate, tau=0.3)))
            assert (built.gate is None) == (gate == "none")
            if gate in ("grad_norm", "entropy"):
                assert built.gate.tau == 0.3
            if gate == "auto" and algorithm == "sfpo":  # SFPO's official gate, its own tau
                assert built.gate.settings() == SFPO(optimizer).gate.settings()


def test_version_presets_and_their_entropy_gates_agree_with_the_rules():
    from gxpo_lib.core.rules import GXPO, VERSIONS

    gxpo_params = set(inspect.signature(GXPO.__init__).parameters)
    for version, preset in VERSIONS.items():
        entropy = preset["gate"].get("signal") == "entropy"
        assert uses_entropy_gate(TrainConfig(version=version)) == entropy, version
        assert set(preset) - {"gate"} <= gxpo_params, version


def test_entropy_gate_is_decided_in_one_place():
    assert uses_entropy_gate(TrainConfig(algorithm="sfpo"))                 # the official gate reads entropy
    assert not uses_entropy_gate(TrainConfig(algorithm="sfpo", gate="none"))  # the drift once seen
    TrainConfig(algorithm="sfpo", gate="none", old_logprobs="first_pass").validate()
    assert uses_entropy_gate(TrainConfig(gate="entropy"))
    assert not uses_entropy_gate(TrainConfig(algorithm="grpo", gate="entropy"))


def test_gxpo_config_has_every_rule_setting():
    trl = pytest.importorskip("gxpo_lib.integrations.trl")
    fields = {f.name: f for f in dataclasses.fields(trl.GXPOConfig)}
    defaults = TrainConfig()
    for name in cfg.RULE_SETTINGS:
        assert name in fields, name
        default = fields[name].default if fields[name].default is not dataclasses.MISSING \
            else fields[name].default_factory()
        expected = getattr(defaults, name)
        assert (list(expected) if isinstance(expected, tuple) else expected) == default, name
        assert fields[name].metadata["help"] == cfg.field_help()[name]
    extra = set(fields) - {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    assert extra == set(cfg.RULE_SETTINGS) | {"gxpo_metrics_file", "loss_aggregation"}
    assert fields["loss_aggregation"].default == TrainConfig().loss_aggregation


def test_the_run_notebooks_parameters_cell_is_generated_from_the_config():
    cell = cfg.parameters_cell()
    names = [line.split(":")[0] for line in cell.splitlines() if line and not line.startswith(("#", "from "))]
    assert names == list(cfg.NOTEBOOK_PARAMETERS) + [f.name for f in dataclasses.fields(TrainConfig)]
    assert "k: Optional[int] = None  # GXPO's lookahead K" in cell
    assert all(line.count("=") == 1 for line in cell.splitlines() if ": " in line and not line.startswith("#"))


def test_grpo_controls_are_refused_for_other_rules():
    TrainConfig(algorithm="grpo", ppo_epochs=3, step_scale=2.5).validate()
    with pytest.raises(ValueError, match="ppo_epochs=3 is invalid with algorithm='gxpo'"):
        TrainConfig(ppo_epochs=3).validate()
    with pytest.raises(ValueError, match="step_scale"):
        TrainConfig(algorithm="sfpo", step_scale=2.0).validate()
