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
    # full fine-tuning: the weights are the trainable parameters, counted once
    assert fixed["weights = trainable"] == n * 2 and fixed["their gradients"] == n * 2 and "trainable" not in fixed
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
    assert "peak = fixed +" in text and "weights = trainable (full fine-tuning), bfloat16" in text and "fits" in text


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


# -- Several GPUs (FSDP2), the TRL backend, run(fit=...) ---------------------------------------------------
SEVEN_B = {"model": "Qwen/Qwen2.5-7B-Instruct", "lora": False}     # full fine-tuning (docs/gpu.md "7B, 8 GPUs")


@pytest.fixture
def no_cuda(monkeypatch):
    """The checks below compare against the GPU a preset names, as on a CPU machine, even where CUDA exists."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_bad_world_size_is_named(monkeypatch, capsys):
    config = resolve_config("paper-gxpo")
    for bad in (0, -2, True, 2.5, "eight", None):
        with pytest.raises(ValueError, match="^world_size="):
            pf.estimate(config, "h100", world_size=bad)
    with pytest.raises(ValueError, match="^batch_prompts=128 is invalid with world_size 3"):
        pf.estimate(config, "h100", world_size=3)          # the native trainer gives each rank whole prompt groups
    with pytest.raises(ValueError, match="^backend='jax' is invalid"):
        pf.estimate(config, "h100", backend="jax")
    monkeypatch.setenv("WORLD_SIZE", "abc")               # torchrun's, read by the check before a run
    with pytest.raises(ValueError, match="^WORLD_SIZE='abc' is invalid"):
        pf.check_before_run(config, "paper-gxpo")
    assert pf.main(["--preset", "paper-gxpo", "--world-size", "0"]) == 1
    assert "world_size=0 is invalid" in capsys.readouterr().out


def test_fsdp2_shards_the_fixed_state_and_each_rank_takes_its_share_of_the_rows():
    config = resolve_config("paper-gxpo", {**SEVEN_B, "micro_batch_size": 4, "rollout_backend": "hf"})
    one, eight = pf.estimate(config, "h100"), pf.estimate(config, "h100", world_size=8)
    assert pf.estimate(config, "h100", world_size=1) == one and not one.sharded and eight.sharded
    gathered = eight.fixed[-1]
    assert gathered.what.startswith("FSDP2 all-gathered")
    # every fixed line of one GPU, 1/8 of it per rank; plus the root and two layers FSDP2 gathers unsharded
    assert [line.what for line in eight.fixed[:-1]] == [line.what for line in one.fixed]
    assert [line.bytes for line in eight.fixed[:-1]] == [-(-line.bytes // 8) for line in one.fixed]
    shape = pf.model_shape(config.model)
    root = 2 * shape.vocab * shape.hidden + shape.hidden          # Qwen2.5-7B's LM head is untied
    assert gathered.bytes == (root + 2 * ((shape.parameters - root) // shape.layers)) * 2
    sharded_parts = sum(line.bytes - -(-line.bytes // 8) for line in one.fixed)
    assert one.fixed_bytes - eight.fixed_bytes == sharded_parts - gathered.bytes > 0
    assert eight.peak < one.peak
    # per rank: the micro-batch's lines are one GPU's (not divided), sampling takes 640 / 8 rows, not 256
    assert (one.rows, eight.rows) == (640, 80)
    assert eight.phases["train micro-batch"][:4] == one.phases["train micro-batch"][:4]
    assert eight.phases["train micro-batch"][4].what == "FSDP2 unsharded gradients (root + 1 layer)"
    assert eight.phases["HF sampling"][0].bytes * 256 == one.phases["HF sampling"][0].bytes * 80
    text = pf.format_estimate(eight)
    assert "world_size 8 (FSDP2)" in text and "1/8 shard" in text and "/ 8 ranks" in text
    ddp = pf.estimate(config, "h100", world_size=8, sharded=False)       # replicated ranks hold everything
    assert ddp.fixed == one.fixed and ddp.rows == 80 and "replicated (DDP)" in pf.format_estimate(ddp)


def test_the_refusal_names_the_setting_that_can_fix_it():
    seven_b = resolve_config("paper-gxpo", SEVEN_B)
    # the fixed state alone exceeds one H100: no micro_batch_size helps, more GPUs (FSDP2) or LoRA do
    with pytest.raises(ValueError, match=r"^world_size=1 is invalid on h100: the fixed state .*no micro_batch_size "
                                         r"fits.*allowed: world_size >= \d+ with FSDP2.*lora=True"):
        pf.preflight(seven_b, "h100")
    with pytest.raises(ValueError, match="^world_size=8 without FSDP2 is invalid on h100: the fixed state"):
        pf.preflight(seven_b, "h100", world_size=8, sharded=False)
    # sharded over 8 ranks a smaller micro-batch fits: then micro_batch_size is the setting named
    with pytest.raises(ValueError, match=r"^micro_batch_size=32 is invalid on h100: .*allowed \d+ or less \(the "
                                         r"largest divisor of one rank's 80 rows"):
        pf.preflight(seven_b, "h100", world_size=8)
    # HF sampling's KV cache, which no micro-batch changes (TRL generates a rank's 640 rows at once)
    with pytest.raises(ValueError, match="^rollout_backend='hf' is invalid on a100-40: HF sampling's KV cache of 640"):
        pf.preflight(resolve_config("paper-gxpo", {"rollout_backend": "hf"}), "a100-40", backend="trl")
    # one row's activations: checkpointing, then the completion length
    with pytest.raises(ValueError, match="^gradient_checkpointing=False is invalid on 20 GiB: even micro_batch_size=1"):
        pf.preflight(resolve_config("paper-gxpo", {"gradient_checkpointing": False}), 20)
    with pytest.raises(ValueError, match="^max_new_tokens=16384 is invalid on 14 GiB: even micro_batch_size=1"):
        pf.preflight(resolve_config("paper-gxpo", {"max_new_tokens": 16384}), 14)


def test_the_7b_recipe_on_8_gpus_fits_each_h100():
    """docs/gpu.md "GXPO on FSDP2 shards (7B, 8 GPUs)": full fine-tuning of Qwen2.5-7B with the paper preset's
    batch through TRL and accelerate's fsdp2.yaml (float32 master shards, bf16 compute), 8 H100s. The docs give
    4, 8, 16, 20 or 40 as the micro-batches of 8 GPUs; 4 fits, and --fit finds at least that."""
    layout = dict(world_size=8, backend="trl", trainable_float32=True)
    est = pf.preflight(resolve_config("paper-gxpo", {**SEVEN_B, "micro_batch_size": 4}), "h100", **layout)
    assert est.fits and est.sharded
    # the docs' parameter-sized state per GPU, fp32 shards: GXPO 24.5 GB at 7e9 parameters
    state = sum(line.bytes for line in est.fixed if not line.what.startswith(("FSDP2", "frozen KL")))
    assert state == pytest.approx(24.5e9 * est.shape.parameters / 7e9, rel=0.005)
    lowered, fitted = pf.preflight(resolve_config("paper-gxpo", {**SEVEN_B, "micro_batch_size": 80}), "h100",
                                   fit=True, **layout)
    assert fitted.fits and lowered.micro_batch_size >= 4 and 80 % lowered.micro_batch_size == 0
    assert pf.preflight(resolve_config("paper-gxpo", {**SEVEN_B, "micro_batch_size": 4}), "h100", world_size=8,
                        backend="trl").fits                   # bf16 shards: the docs' other column
    assert pf.main(["--preset", "paper-gxpo", "-s", "model=Qwen/Qwen2.5-7B-Instruct", "-s", "lora=false", "-s",
                    "micro_batch_size=4", "--world-size", "8", "--backend", "trl", "--float32-master"]) == 0


def test_the_trl_backend_counts_its_fused_head_and_generation_batch():
    config = resolve_config("paper-gxpo", {"rollout_backend": "hf"})
    native, trl = pf.estimate(config, "h100"), pf.estimate(config, "h100", backend="trl")
    # TRL's HF generate takes all 640 rows at once, the native samplers 256 (GENERATION_BATCH)
    assert native.phases["HF sampling"][0].bytes * 640 == trl.phases["HF sampling"][0].bytes * 256
    shape, b, t = pf.model_shape(config.model), 32, 3072
    tile = min(b * t, 4096) * min(shape.vocab, 32768)              # one 4096-token x 32768-logit tile, no [b, T, V]
    assert trl.phases["old/ref log-prob scoring"][-1].bytes == b * t * shape.hidden * 2 + tile * 2 + b * t * 28
    text = pf.format_estimate(trl)
    assert "backend trl" in text and "TRL 1.16 scores with its fused LM head" in text
    assert "backend" not in pf.format_estimate(native).splitlines()[0]


def test_a_trl_run_is_checked_before_it_launches(tmp_path, monkeypatch, no_cuda):
    import gxpo_lib
    from gxpo_lib import integrations

    launched = []

    def launch(config, workdir, **options):
        launched.append((config, options))
        raise RuntimeError("launched")

    monkeypatch.setattr(integrations, "launch_trl", launch)
    with pytest.raises(ValueError, match="^micro_batch_size=128 is invalid on h100"):
        gxpo_lib.run("paper-gxpo", {"micro_batch_size": 128}, tmp_path / "a", backend="trl")
    assert not launched
    seven_b = {**SEVEN_B, "micro_batch_size": 4}
    with pytest.raises(ValueError, match="^world_size=1 is invalid on h100"):
        gxpo_lib.run("paper-gxpo", seven_b, tmp_path / "b", backend="trl")
    with pytest.raises(ValueError, match="^world_size=8 without FSDP2 is invalid"):      # DDP: nothing sharded
        gxpo_lib.run("paper-gxpo", seven_b, tmp_path / "c", backend="trl", num_processes=8)
    assert not launched
    with pytest.raises(RuntimeError, match="launched"):                                 # FSDP2 over 8 ranks
        gxpo_lib.run("paper-gxpo", seven_b, tmp_path / "d", backend="trl", num_processes=8, accelerate_config="fsdp2")
    assert launched[-1][0]["micro_batch_size"] == 4 and launched[-1][1]["num_processes"] == 8


def test_run_with_fit_lowers_micro_batch_size_and_logs_it(tmp_path, monkeypatch, caplog, no_cuda):
    import logging

    import gxpo_lib
    from gxpo_lib import experiment, integrations
    from gxpo_lib.rl import trainer

    trained = []

    def train(config, run_dir, progress=True):
        trained.append(config)
        raise RuntimeError("trained")

    monkeypatch.setattr(trainer, "train", train)
    monkeypatch.setattr(trainer, "check_runtime", lambda config: None)       # vLLM is not installed here
    monkeypatch.setattr(integrations, "launch_trl", lambda config, workdir, **o: trained.append(config) or 1 / 0)
    big = {"micro_batch_size": 640}
    with pytest.raises(ValueError, match="^micro_batch_size=640 is invalid on h100"):
        gxpo_lib.run("paper-gxpo", big, tmp_path / "a")
    with caplog.at_level(logging.INFO, logger="gxpo_lib.rl.preflight"), pytest.raises(RuntimeError, match="trained"):
        gxpo_lib.run("paper-gxpo", big, tmp_path / "b", fit=True)
    assert trained[-1].micro_batch_size == 40 and trained[-1].rollout_backend == "vllm"
    assert "micro_batch_size lowered from 640 to 40" in caplog.text
    with pytest.raises(RuntimeError, match="trained"):                           # python -m gxpo_lib run --fit
        experiment.main(["--preset", "paper-gxpo", "-s", "micro_batch_size=640", "--out", str(tmp_path / "c"),
                         "--fit"])
    assert trained[-1].micro_batch_size == 40
    with pytest.raises(ZeroDivisionError):                                       # the TRL backend launches it
        gxpo_lib.run("paper-gxpo", big, tmp_path / "d", backend="trl", fit=True)
    assert trained[-1]["micro_batch_size"] == 40
    with pytest.raises(ValueError, match="^fit='yes' is invalid"):
        gxpo_lib.run("paper-gxpo", {}, tmp_path / "e", fit="yes")
