"""TRL-path settings that only act with a vLLM engine or several processes, checked where they are decided.

`grpo_config_from_train_config` (and ``GXPOConfig`` itself) on this machine, no engine and no process group:

- vLLM importance-sampling correction: off by default (parity with the native trainer), a named opt-in; a
  non-bool switch, a mode the installed TRL does not know, or a bad clip bound is a ValueError naming the
  setting when the config is built, before any model loads (TRL itself would switch a flag on for a truthy
  string, and reject an unknown mode only inside the first training step);
- an unknown ``trl_overrides`` key is a ValueError naming it (not a TypeError from the dataclass);
- ``ddp_find_unused_parameters``: False with LoRA; with full fine-tuning left to transformers (None);
- ``vllm_enable_sleep_mode``: what vLLM supports here (False on its CPU platform, or without vLLM).
"""

import re

import pytest

pytest.importorskip("trl")

from trl import GRPOConfig

from gxpo_lib.config import TrainConfig
from gxpo_lib.integrations.trl import VLLM_IS_MODES, GXPOConfig
from gxpo_lib.integrations.trl_run import check_trl_overrides, grpo_config_from_train_config

SMALL = dict(batch_prompts=2, group_size=2, steps=1)


def build(tmp_path, lora=True, **overrides):
    return grpo_config_from_train_config(TrainConfig(lora=lora, **SMALL), tmp_path, **overrides)


def test_importance_sampling_correction_is_off_by_default_and_a_named_opt_in(tmp_path):
    args = build(tmp_path)
    assert args.vllm_importance_sampling_correction is False  # TRL's own default is True
    assert GRPOConfig.__dataclass_fields__["vllm_importance_sampling_correction"].default is True
    on = build(tmp_path, vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_mask",
               vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=2.0)
    assert on.vllm_importance_sampling_correction is True and on.vllm_importance_sampling_mode == "token_mask"
    assert (on.vllm_importance_sampling_clip_min, on.vllm_importance_sampling_clip_max) == (0.5, 2.0)
    assert build(tmp_path, vllm_importance_sampling_clip_max=None).vllm_importance_sampling_clip_max is None


def test_every_mode_the_installed_trl_names_is_accepted_and_no_other():
    """VLLM_IS_MODES is exactly the list in TRL's GRPOConfig help (a TRL upgrade that adds or drops a mode
    fails here), and each one builds."""
    help_text = GRPOConfig.__dataclass_fields__["vllm_importance_sampling_mode"].metadata["help"]
    named = re.findall(r"'(\w+)'", help_text.split("Supported options are:")[1])
    assert set(named) == set(VLLM_IS_MODES) and len(named) == len(VLLM_IS_MODES)
    assert GRPOConfig.__dataclass_fields__["vllm_importance_sampling_mode"].default in VLLM_IS_MODES


@pytest.mark.parametrize("mode", VLLM_IS_MODES)
def test_each_mode_builds(tmp_path, mode):
    args = build(tmp_path, vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=mode)
    assert args.vllm_importance_sampling_mode == mode


@pytest.mark.parametrize("overrides, name", [
    (dict(vllm_importance_sampling_correction="yes"), "vllm_importance_sampling_correction"),
    (dict(vllm_importance_sampling_correction="false"), "vllm_importance_sampling_correction"),
    (dict(vllm_importance_sampling_correction=1), "vllm_importance_sampling_correction"),
    (dict(vllm_importance_sampling_correction=None), "vllm_importance_sampling_correction"),
    (dict(vllm_importance_sampling_mode="bogus"), "vllm_importance_sampling_mode"),
    (dict(vllm_importance_sampling_mode="Sequence_Mask"), "vllm_importance_sampling_mode"),
    (dict(vllm_importance_sampling_mode=None), "vllm_importance_sampling_mode"),
    (dict(vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="sequence"),
     "vllm_importance_sampling_mode"),
    (dict(vllm_importance_sampling_clip_max="3"), "vllm_importance_sampling_clip_max"),
    (dict(vllm_importance_sampling_clip_min=-0.5), "vllm_importance_sampling_clip_min"),
    (dict(vllm_importance_sampling_clip_min=True), "vllm_importance_sampling_clip_min"),
    (dict(vllm_enable_sleep_mode="no"), "vllm_enable_sleep_mode"),
])
def test_bad_importance_sampling_settings_raise_naming_the_setting(tmp_path, overrides, name):
    with pytest.raises(ValueError, match=name):
        build(tmp_path, **overrides)
    with pytest.raises(ValueError, match=name):  # GXPOConfig built directly checks the same
        GXPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **overrides)
    with pytest.raises(ValueError, match=name):  # and so does the launcher's parent, before any rank starts
        check_trl_overrides(overrides)


def test_a_trl_run_refuses_bad_overrides_before_it_launches(tmp_path, monkeypatch):
    """gxpo_lib.run checks trl_overrides in the calling process: no rank is launched for a bad one."""
    from gxpo_lib import integrations
    from gxpo_lib.experiment import run

    def no_launch(*args, **kwargs):
        raise AssertionError("launched a TRL run with bad trl_overrides")

    monkeypatch.setattr(integrations, "launch_trl", no_launch)
    for overrides, name in ((dict(vllm_importance_sampling_mode="bogus"), "vllm_importance_sampling_mode"),
                            (dict(learning_rat=1e-4), "learning_rat"), ("use_vllm", "trl_overrides")):
        with pytest.raises(ValueError, match=name):
            run("smoke", {"steps": 1}, tmp_path / "run", backend="trl", trl_overrides=overrides)
    assert not (tmp_path / "run").exists()


def test_clip_bounds_out_of_order_are_trls_value_error(tmp_path):
    with pytest.raises(ValueError, match="vllm_importance_sampling_clip_min"):
        build(tmp_path, vllm_importance_sampling_clip_min=3.0, vllm_importance_sampling_clip_max=2.0)


def test_unknown_override_key_raises_naming_it(tmp_path):
    with pytest.raises(ValueError, match="vllm_importance_sampling_corection"):
        build(tmp_path, vllm_importance_sampling_corection=True)


def test_lora_turns_off_ddp_unused_parameter_search(tmp_path):
    """With LoRA every adapter gets a gradient, so DDP's search for unused parameters (a graph traversal per
    backward) is switched off; with full fine-tuning it is left to transformers (None: it searches unless
    gradient checkpointing is on). No vLLM engine involved (rollout_backend is not "vllm")."""
    lora = build(tmp_path, lora=True)
    assert lora.use_vllm is False and lora.ddp_find_unused_parameters is False
    full = build(tmp_path, lora=False)
    assert full.use_vllm is False and full.ddp_find_unused_parameters is None
    assert build(tmp_path, lora=True, ddp_find_unused_parameters=True).ddp_find_unused_parameters is True


def test_sleep_mode_follows_what_vllm_supports_here(tmp_path):
    """vllm_enable_sleep_mode is `sleep_mode_supported(in_process=True)`: False without vLLM or on its CPU
    platform (this machine), True on a CUDA machine with vLLM; an explicit override wins."""
    from gxpo_lib.rl.vllm_sampler import sleep_mode_supported

    assert build(tmp_path).vllm_enable_sleep_mode is sleep_mode_supported(in_process=True)[0]
    assert build(tmp_path, vllm_enable_sleep_mode=False).vllm_enable_sleep_mode is False
