"""The memory preflight: its arithmetic, its refusal, --fit, every shipped preset and sweep, and the
CPU-measured activation constant against the tiny model's saved bytes."""

from pathlib import Path

import pytest

from gxpo_lib.config import NOTEBOOK_PARAMETERS, list_presets, resolve_config
from gxpo_lib.rl import preflight as pf
from gxpo_lib.sweep import load_sweep

ROOT = Path(__file__).resolve().parents[1]
TOY = pf.ModelShape("toy", vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16)


def test_parameter_counts_match_the_known_models():
    assert pf.model_shape("meta-llama/Llama-3.2-1B-Instruct").parameters == 1_235_814_400
    assert pf.model_shape("Qwen/Qwen2.5-1.5B-Instruct").parameters == 1_543_714_304
    assert pf.model_shape("tiny").hidden == 128 and pf.model_shape("tiny").layers == 4
    with pytest.raises(ValueError, match="^model="):
        pf.model_shape("nobody/unknown-model")


def test_the_arithmetic_against_hand_values():
    # toy: embeddings 1000 x 64 (tied); per layer q 64x64, k, v 64x32, o 64x64, mlp 3 x 64x128, 2 norms of 64
    n = 64_000 + 2 * (4096 + 2 * 2048 + 4096 + 3 * 8192 + 128) + 64
    assert TOY.parameters == n
    assert TOY.lora_parameters(8, ("q_proj", "v_proj")) == 2 * 8 * ((64 + 64) + (64 + 32))
    config = resolve_config("smoke", {"dtype": "bfloat16", "lora": False, "kl_beta": 0.1, "max_new_tokens": 10,
                                      "micro_batch_size": 4, "gradient_checkpointing": True,
                                      "rollout_backend": "vllm", "vllm_gpu_memory": 0.5})
    est = pf.estimate(config, 10, prompt_tokens=6, shape=TOY)
    fixed = {line.what.split(",")[0].split(" (")[0]: line.bytes for line in est.fixed}
    assert fixed["weights"] == n * 2 and fixed["trainable"] == n * 2 and fixed["their gradients"] == n * 2
    assert fixed["adamw state"] == 2 * n * 2                       # AdamW's moments in the parameters' dtype
    assert fixed["GXPO theta0 + g0"] == n * (2 + 2 * 4)             # theta0 bf16, g0 and g1 float32
    assert fixed["frozen KL reference copy"] == n * 2
    f, t = 6 + 10 - 1, 10
    per_row = 2 * 2 * 64 * f + f * (4 * 64 + 4) + t * (2 * 64 + 8) + 8 * (f + 1) + f * (2 * 64 + 8)
    assert pf.saved_bytes_per_row(TOY, f, t, 2, True) == per_row
    train = {line.what: line.bytes for line in est.phases["train micro-batch"]}
    assert train["saved activations (checkpointed)"] == 4 * per_row
    assert train["attention mask (bool)"] == 4 * (f + 1) ** 2
    layer = 24 * 64 + 8 * 128 + 4 * 4 + 2 * f
    head = 4 * t * 1000 * (2 * 2 + 16) + 4 * t * 64 * 2 + 1000 * 64 * 4
    assert train["backward transient: max(layer, LM head)"] == max(4 * f * layer + 4 * f * 2 * (2 * 128 + 4 * 64), head)
    assert est.rollout_share == int(0.5 * 10 * pf.GIB)
    assert est.budget == 10 * pf.GIB - est.rollout_share - pf.GIB
    assert est.peak == est.fixed_bytes + max(est.phase_bytes(name) for name in est.phases)
    text = pf.format_estimate(est)
    assert "peak = fixed +" in text and "weights, bfloat16" in text and "fits" in text


def test_a_run_that_cannot_fit_is_refused_naming_micro_batch_size():
    config = resolve_config("paper-gxpo", {"micro_batch_size": 128})
    with pytest.raises(ValueError, match=r"^micro_batch_size=128 is invalid on h100.*allowed 40 or less"):
        pf.preflight(config, "h100")
    with pytest.raises(ValueError, match="^micro_batch_size="):
        pf.check_before_run(config, "paper-gxpo")      # a GPU preset is checked even on a CPU machine
    assert pf.main(["--preset", "paper-gxpo", "-s", "micro_batch_size=128"]) == 1


def test_fit_lowers_micro_batch_size_to_the_largest_divisor_that_fits(capsys):
    config = resolve_config("paper-gxpo", {"micro_batch_size": 640})   # the whole mini-batch
    lowered, est = pf.preflight(config, "h100", fit=True)
    rows = config.batch_prompts * config.group_size
    assert est.fits and rows % lowered.micro_batch_size == 0 and lowered.micro_batch_size < rows
    bigger = [d for d in range(lowered.micro_batch_size + 1, rows + 1) if rows % d == 0]
    assert not pf.estimate(config, "h100", micro_batch_size=bigger[0]).fits
    assert f"lowered from 640 to {lowered.micro_batch_size}" in capsys.readouterr().out
    assert pf.main(["--preset", "paper-gxpo", "-s", "micro_batch_size=640", "--fit"]) == 0


def _named_gpu(preset):
    return pf.PRESET_GPUS.get(preset, "l4")     # the CPU presets name no GPU: the smallest listed one


@pytest.mark.parametrize("preset", list_presets())
def test_every_shipped_preset_fits_its_gpu(preset):
    assert pf.preflight(resolve_config(preset), _named_gpu(preset)).fits


def test_every_shipped_sweep_fits_its_gpu():
    for grid in sorted((ROOT / "sweeps").glob("*.yaml")):
        sweep = load_sweep(grid)
        for name, settings in sweep.runs():
            preset = settings.get("preset", sweep.preset)
            overrides = {k: v for k, v in settings.items() if k not in NOTEBOOK_PARAMETERS}   # run options
            assert pf.preflight(resolve_config(preset, overrides), _named_gpu(preset)).fits, (grid.name, name)


def test_bad_gpu_is_named():
    with pytest.raises(ValueError, match="^gpu="):
        pf.gpu_bytes("tpu")


@pytest.mark.parametrize("lora, checkpointing, tolerance", [
    (False, True, 0.02), (False, False, 0.03), (True, True, 0.02), (True, False, 0.05)])
def test_the_measured_constant_reproduces_the_tiny_models_saved_bytes(lora, checkpointing, tolerance):
    """The shipped tiny Llama (fp32) with the smoke preset's LoRA (r 8 on all seven modules) or fully trained:
    the bytes autograd saves for 2 rows, against `saved_bytes_per_row` (LoRA without checkpointing: an upper
    bound, at most 40% above, never more than 5% below)."""
    torch = pytest.importorskip("torch")
    from gxpo_lib.rl.models import apply_lora, load_model

    model, _ = load_model("tiny", dtype=torch.float32, device="cpu")
    if lora:
        model = apply_lora(model, rank=8, alpha=16)
    else:
        model.requires_grad_(True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    shape = pf.model_shape("tiny")
    for prompt, completion in ((12, 40), (30, 20)):
        measured = pf.measure_saved_bytes(model, 2, prompt, completion)
        predicted = 2 * pf.saved_bytes_per_row(shape, prompt + completion - 1, completion, 4, checkpointing,
                                               8 if lora else None, 7 if lora else 0)
        error = predicted / measured - 1
        assert -tolerance <= error <= (tolerance if not (lora and not checkpointing) else 0.40), error
