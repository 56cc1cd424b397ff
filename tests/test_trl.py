"""gxpo_lib.integrations.trl: GXPOTrainer (TRL's GRPOTrainer + a gxpo_lib rule) on the tiny model, for real.

Everything runs TRL 1.16 with HF generate on the CPU: the hook signatures, forced old log-probs (so PPO
clipping binds at theta1), GRPO parity with gxpo_lib's own PlainStep + policy_loss on the same rollouts,
two real training steps per algorithm with a checkpoint and a resume that keeps the gate closed, the
subprocess launcher, and 2-process DDP (gloo) with identical parameters and gate decisions on both ranks;
gradient accumulation (one rule step over every micro-batch) giving the same parameters in 1 and 2
processes, evaluation sharded over ranks, and train rows with the native trainer's keys.
"""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from gxpo_lib.core.losses import per_token_logprobs, policy_loss
from gxpo_lib.core.rules import PlainStep
from gxpo_lib.integrations import accelerate_launch_args, cpu_environment, launch_command, launch_trl, stream
from gxpo_lib.integrations.trl import (
    TRL_ATTRIBUTES,
    GXPOConfig,
    GXPOTrainer,
    RuleOwnedOptimizer,
    check_trl_hooks,
    trl_version_is_tested,
)
from gxpo_lib.integrations.trl_run import math_reward_func
from gxpo_lib.rl.runlog import read_rows

REPO = Path(__file__).resolve().parents[1]
SHIPPED_TINY = REPO / "data" / "models" / "tiny-llama-arith"


# ---------------------------------------------------------------------------------------------------
# Fixtures: the tiny model (shipped, or a random one of the same design), prompts, rewards
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The shipped tiny checkpoint, or a random tiny Llama saved to a temporary folder."""
    if (SHIPPED_TINY / "model.safetensors").is_file():
        return SHIPPED_TINY
    from transformers import LlamaForCausalLM

    from gxpo_lib.rl.tiny_model import build_tokenizer, tiny_llama_config

    folder = tmp_path_factory.mktemp("tiny-random")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = tiny_llama_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load(model_dir):
    from gxpo_lib.rl.models import load_model

    return load_model(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def dataset(model_dir):
    """32 arithmetic prompts in TRL's conversational format, with their answers."""
    from gxpo_lib.integrations.trl_run import build_dataset
    from gxpo_lib.rl.trainer import TrainConfig

    _, tokenizer = load(model_dir)
    return build_dataset(TrainConfig(), tokenizer).select(range(32))


def length_reward(completions, **kwargs):
    """A reward that varies with any change of the text (so a group's advantages are not all zero)."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(map(ord, t)) % 13 / 4.0 for t in texts]


def loud_reward(completions, **kwargs):
    """length_reward x 100: with unscaled advantages every gradient norm is far above 1."""
    return [100.0 * r for r in length_reward(completions)]


def make_trainer(model_dir, dataset, tmp_path, reward_funcs=(math_reward_func, length_reward), **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=24, learning_rate=1e-3, bf16=False, use_cpu=True, report_to="none",
                    logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, loss_type="bnpo", top_k=0,
                    optim="adamw_torch", max_steps=2)
    model, tokenizer = load(model_dir)
    args = GXPOConfig(**(settings | overrides))
    return GXPOTrainer(model=model, reward_funcs=list(reward_funcs), args=args, train_dataset=dataset,
                       processing_class=tokenizer)


def first_batch(trainer):
    """One generation batch of dataset rows, as TRL's dataloader hands it to _prepare_inputs."""
    return next(iter(trainer.get_train_dataloader()))


# ---------------------------------------------------------------------------------------------------
# Tolerances: what rounding alone explains, from the dtype (not from one CPU's results)
# ---------------------------------------------------------------------------------------------------
# Two computations of the same update that differ only in the order and blocking of their sums (TRL's fused
# LM head vs our full-logits loss; one micro-batch vs two; one process vs an all-reduce over two) end with
# parameters that differ by
#   (a) the rounding of the update itself: a gradient coordinate sums over the batch's tokens (~400 here)
#       and, through each of the 4 layers, over hidden units (128-352); rounding errors of a sum of n terms
#       grow like sqrt(n) u (u = eps / 2, the unit roundoff; Higham & Mary 2019), so the update is right to
#       about (sqrt(400) + 4 sqrt(352)) u ~ 100 u of its size, at most `moved` (the largest |theta - theta0|);
#       `amplification` is what the rule does to such an error: 2 for a clipped SGD step (the gradient and
#       the clip factor 1 / ||g|| each carry it), more for GXPO (below);
#   (b) the final rounding of theta0 + update on each side: half an ulp, at most u |theta|, so 2 u max|theta|.
SUM_ROUNDING = 100
GXPO_AMPLIFICATION = 1e3  # 2 steps; the retention ratio r = g1 / g0 divides by g0 (|g0| > delta = 1e-8),
# clamped to [-2, 3], and the jump multiplies the displacement by alpha q(r): a generous bound on how much a
# relative gradient error grows (float64 runs measured 1e-16, one ulp). It stays far below what a float32
# operation anywhere in the step gives (1e-7 relative, which GXPO turned into 2e-6 here): what the float64
# checks are there to catch.


def rounding_tolerance(dtype, moved: float, magnitude: float, amplification: float = 2.0) -> float:
    """The largest parameter difference rounding explains between two computations of the same update:
    (a) + (b) above, for parameters in `dtype` that moved by at most `moved` from at most `magnitude`."""
    u = torch.finfo(dtype).eps / 2
    return amplification * SUM_ROUNDING * u * moved + 2 * u * magnitude


def largest(tensors) -> float:
    return max(float(t.abs().max()) for t in tensors)


# ---------------------------------------------------------------------------------------------------
# TRL version and the private hooks relied on
# ---------------------------------------------------------------------------------------------------
def test_installed_trl_is_in_the_tested_range_and_hooks_match():
    assert trl_version_is_tested()
    assert check_trl_hooks() == []


def test_trainer_attributes_relied_on_exist(model_dir, dataset, tmp_path):
    trainer = make_trainer(model_dir, dataset, tmp_path)
    missing = [name for name in TRL_ATTRIBUTES if not hasattr(trainer, name)]
    assert missing == []


@pytest.mark.parametrize("settings, name", [
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (dict(loss_aggregation="mean"), "loss_aggregation"),
    (dict(algorithm="grpo", ppo_epochs=3), "ppo_epochs"), (dict(algorithm="grpo", step_scale=2.0), "step_scale"),
    (dict(k=1), "k"), (dict(alpha=0.0), "alpha"), (dict(algorithm="adam"), "algorithm"),
    (dict(tau=-1.0), "tau"), (dict(gate="median"), "gate"), (dict(warmup=-1), "warmup"),
])
def test_invalid_settings_raise_naming_the_setting(tmp_path, settings, name):
    with pytest.raises(ValueError, match=name):
        GXPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", **settings)


# ---------------------------------------------------------------------------------------------------
# Old log-probs are the sampling policy's, so PPO clipping can bind at theta1
# ---------------------------------------------------------------------------------------------------
def test_old_logprobs_are_forced_and_clipping_binds_at_theta1(model_dir, dataset, tmp_path):
    from trl import GRPOTrainer

    trainer = make_trainer(model_dir, dataset, tmp_path, learning_rate=0.05, gate="none",
                           reward_funcs=(length_reward,))
    trainer.model.train()
    batch = first_batch(trainer)
    torch.manual_seed(0)
    plain = GRPOTrainer._generate_and_score_completions(trainer, batch)
    assert "old_per_token_logps" not in plain  # what TRL alone does in this configuration
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(batch)
    assert "old_per_token_logps" in inputs
    start = copy.deepcopy(trainer.model.state_dict())

    # With the sampling log-probs: ratio 1 at theta0, clipped tokens at theta1 and at theta~.
    trainer.create_optimizer()
    info = trainer.update(trainer.model, inputs)
    clip = [p["clip_ratio/region_mean"][0] for p in trainer.pass_metrics]
    assert info.active and info.backward_passes == 3
    assert clip[0] == 0.0 and clip[1] > 0.0 and clip[2] > 0.0

    # Without them (TRL's default here) the ratio is 1 at every pass and clipping never binds.
    trainer.model.load_state_dict(start)
    trainer.optimizer, trainer.rule = None, None
    trainer.create_optimizer()
    trainer.update(trainer.model, {k: v for k, v in inputs.items() if k != "old_per_token_logps"})
    assert [p["clip_ratio/region_mean"][0] for p in trainer.pass_metrics] == [0.0, 0.0, 0.0]


def test_sfpo_entropy_gate_gets_the_sampling_entropy(model_dir, dataset, tmp_path):
    # SFPO's official gate watches the policy entropy; it is measured at sampling time (theta0), so it
    # equals the entropy TRL's loss reports at SFPO's first pass (same parameters, same tokens).
    trainer = make_trainer(model_dir, dataset, tmp_path, algorithm="sfpo", k=2, reward_funcs=(length_reward,))
    trainer.model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(first_batch(trainer))
    trainer.create_optimizer()
    info = trainer.update(trainer.model, inputs)
    assert info.active and info.backward_passes == 3  # K + 1
    assert trainer.rule.gate.signal == "entropy" and trainer.rule.gate.history[-1] == trainer._sampling_entropy
    assert trainer._sampling_entropy == pytest.approx(trainer.pass_metrics[0]["entropy"][0], rel=1e-4)


# ---------------------------------------------------------------------------------------------------
# Parity: one GRPO step of GXPOTrainer == gxpo_lib's PlainStep + policy_loss on the same rollouts
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("trl_loss, our_loss", [("bnpo", "token_mean"), ("grpo", "grpo"), ("dr_grpo", "dr_grpo"),
                                                ("dapo", "dapo")])
def test_grpo_step_matches_plain_step_with_policy_loss(model_dir, dataset, tmp_path, trl_loss, our_loss):
    # Plain SGD on both sides, so the update is -lr * (clipped gradient) and compares tightly (Adam's
    # first step, g / (|g| + eps), would amplify float noise on near-zero coordinates).
    temperature, lr, clip = 0.8, 0.5, 0.2
    trainer = make_trainer(model_dir, dataset, tmp_path, algorithm="grpo", temperature=temperature, optim="sgd",
                           learning_rate=lr, max_grad_norm=1.0, epsilon=clip, reward_funcs=(length_reward,),
                           loss_type=trl_loss)
    trainer.model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(first_batch(trainer))
    ours, _ = load(model_dir)  # same initial weights, never touched by TRL
    theta0 = {n: p.detach().clone() for n, p in ours.named_parameters()}

    # gxpo_lib: SGD + PlainStep + policy_loss("token_mean") on TRL's rollouts.
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    mask = inputs["completion_mask"]
    optimizer = torch.optim.SGD(ours.parameters(), lr=lr)

    def closure():
        logits = ours(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                      attention_mask=torch.cat([inputs["prompt_mask"], mask], 1)).logits
        logps = per_token_logprobs(logits[:, prompt_ids.size(1) - 1:-1], completion_ids, temperature=temperature)
        loss = policy_loss(logps, inputs["old_per_token_logps"], inputs["advantages"], mask,
                           loss_type=our_loss, clip_eps=clip, max_completion_length=trainer.max_completion_length,
                           num_items_in_batch=inputs["num_items_in_batch"])
        loss.backward()
        return loss

    ours_info = PlainStep(optimizer, max_grad_norm=1.0).step(closure)

    # GXPOTrainer with extrapolation off, on the same inputs.
    trainer.create_optimizer()
    trl_info = trainer.update(trainer.model, inputs)

    assert isinstance(trainer.rule.optimizer, torch.optim.SGD)
    theirs = {n: p.detach() for n, p in trainer.model.named_parameters()}
    mine = {n: p.detach() for n, p in ours.named_parameters()}
    moved = max(float((p - theta0[n]).abs().max()) for n, p in mine.items())
    differ = max(float((p - theirs[n]).abs().max()) for n, p in mine.items())
    assert moved > 1e-3  # a real update happened
    # float32 on both sides (TRL's fused LM head, our loss on full logits): rounding alone, derived above
    assert differ <= rounding_tolerance(torch.float32, moved, largest(mine.values()))
    assert trl_info.loss == pytest.approx(ours_info.loss, rel=1e-5, abs=1e-7)
    assert trl_info.grad_norm == pytest.approx(ours_info.grad_norm, rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Real training: 2 steps of GRPO and of GXPO through Trainer.train(), checkpoint and resume
# ---------------------------------------------------------------------------------------------------
def adam_steps(trainer):
    return {int(s["step"]) for s in trainer.rule.optimizer.state.values()}


def test_grpo_two_steps_one_optimizer_step_each(model_dir, dataset, tmp_path):
    trainer = make_trainer(model_dir, dataset, tmp_path, algorithm="grpo", lr_scheduler_type="linear")
    trainer.train()
    rows = [r for r in read_rows(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["backward_passes"] for r in rows] == [1, 1]
    assert [r["cumulative_backward_passes"] for r in rows] == [1, 2]
    # The rule stepped AdamW once per step; the Trainer's own step() was swallowed, once per step.
    assert adam_steps(trainer) == {2}
    assert isinstance(trainer.optimizer.optimizer, RuleOwnedOptimizer)
    assert trainer.optimizer.optimizer.ignored_steps == 2
    # The LR scheduler stepped once per outer step (linear decay over 2 steps: 1e-3, then 5e-4).
    assert [r["learning_rate"] for r in rows] == pytest.approx([1e-3, 5e-4])
    # The logged grad_norm is the rule's pre-clip norm (the Trainer did not clip again).
    logs = [h for h in trainer.state.log_history if "gxpo/backward_passes" in h]
    assert [h["grad_norm"] for h in logs] == pytest.approx([r["grad_norm"] for r in rows])
    for key in ("gxpo/gate_open", "gxpo/cumulative_backward_passes", "gxpo/grad_norm", "reward", "entropy"):
        assert key in logs[0], key


def test_gxpo_two_steps_gate_closes_and_resume_keeps_it_closed(model_dir, dataset, tmp_path):
    # Unscaled advantages of a large reward make the corrective gradient norm >> 1 = the EMA's start,
    # so the gate (no warm-up) trips at step 1: step 1 is GXPO (3 passes), step 2 plain GRPO (1 pass).
    settings = dict(algorithm="gxpo", warmup=0, tau=0.5, scale_rewards="none", save_strategy="steps",
                    save_steps=2, reward_funcs=(math_reward_func, loud_reward))
    trainer = make_trainer(model_dir, dataset, tmp_path, **settings)
    trainer.train()
    rows = [r for r in read_rows(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["backward_passes"] for r in rows] == [3, 1]
    assert [r["active"] for r in rows] == [True, False]
    assert [r["gate_open"] for r in rows] == [False, False]
    assert rows[0]["gate_z"] >= 0.5 and rows[0]["r_mean"] is not None and rows[0]["jump_norm"] > 0
    assert adam_steps(trainer) == {4} and trainer.optimizer.optimizer.ignored_steps == 2
    for key in ("reward_mean", "accuracy", "response_length", "entropy", "clip_frac", "seconds",
                "seconds_sampling", "seconds_scoring", "seconds_update", "k", "tau", "scale_mean"):
        assert key in rows[0], key
    saved = json.loads((tmp_path / "checkpoint-2" / "gxpo_state.json").read_text())
    assert saved["rule"]["gate"]["is_open"] is False and saved["rule"]["gate"]["shutoff_step"] == 2
    assert saved["counters"]["cumulative_backward_passes"] == 4

    # Resume to step 3 in a new trainer: the restored gate is closed, so step 3 is one plain pass
    # (a fresh gate would be open and take 3).
    resumed = make_trainer(model_dir, dataset, tmp_path, **(settings | dict(max_steps=3)))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    rows = [r for r in read_rows(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[2]["backward_passes"] == 1 and rows[2]["cumulative_backward_passes"] == 5
    assert resumed.rule.gate.is_open is False and resumed.rule.num_steps == 3


# ---------------------------------------------------------------------------------------------------
# The launcher (accelerate launch in a subprocess) and 2-process DDP
# ---------------------------------------------------------------------------------------------------
def test_launch_command_names_the_module_and_the_config():
    command = launch_command("run.json", "out", num_processes=2, cpu=True)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    # Several CPU processes need the torchrun launcher: accelerate's --cpu launcher starts only one.
    assert command[command.index("--num_processes") + 1] == "2" and "--multi_gpu" in command
    assert "--cpu" not in command and "--cpu" in launch_command("run.json", "out", num_processes=1, cpu=True)
    assert command[-5:] == ["gxpo_lib.integrations.trl_run", "--config", "run.json", "--workdir", "out"]
    zero2 = launch_command("run.json", "out", accelerate_config="zero2", cpu=False)
    assert zero2[zero2.index("--config_file") + 1].endswith("accelerate_configs/zero2.yaml")
    with pytest.raises(ValueError, match="accelerate_config"):
        launch_command("run.json", "out", accelerate_config="zero9")


def test_multi_process_launches_rendezvous_on_a_free_port_of_their_own(tmp_path):
    # Two runs launched at once (a sweep's --parallel) must not meet on accelerate's default port 29500.
    ports = [launch_command("run.json", "out", num_processes=2, cpu=True) for _ in range(2)]
    ports = [int(c[c.index("--main_process_port") + 1]) for c in ports]
    assert all(1024 <= p < 65536 for p in ports)
    with socket.socket() as server:  # a port handed out is free: it can be bound
        server.bind(("127.0.0.1", ports[0]))
    assert "--main_process_port" not in launch_command("run.json", "out", num_processes=1, cpu=True)
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text("distributed_type: MULTI_GPU\nmain_process_port: 29555\n")
    assert "--main_process_port" not in launch_command("run.json", "out", 2, accelerate_config=fixed, cpu=False)


@pytest.mark.slow
def test_launcher_runs_two_processes_writes_our_metrics_and_resumes(model_dir, tmp_path):
    # The notebook's path: accelerate launch -m gxpo_lib.integrations.trl_run in a subprocess, 2 CPU ranks,
    # LoRA, evaluations; then the same workdir with one more step resumes from checkpoint-2.
    config = dict(algorithm="gxpo", model=str(model_dir), lora=True, steps=2, batch_prompts=2, group_size=4,
                  max_new_tokens=16, eval_every=2, eval_problems=4, eval_samples=2, checkpoint_every=2, seed=1)
    run = tmp_path / "run"
    progress = list(stream(launch_trl(config, run, num_processes=2, cpu=True), progress_only=True))
    assert any(line.startswith("[gxpo] step 2/2") for line in progress), progress
    assert not [line for line in progress if "outlive" in line]   # each rank left its gloo group whole
    rows = read_rows(run / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in rows] == [("eval", 0), ("train", 1), ("train", 2), ("eval", 2)]
    assert rows[2]["cumulative_backward_passes"] == rows[1]["backward_passes"] + rows[2]["backward_passes"]
    assert json.loads((run / "config.json").read_text())["algorithm"] == "gxpo"
    assert json.loads((run / "trl_args.json").read_text())["per_device_train_batch_size"] == 4  # 8 / 2 ranks
    saved = json.loads((run / "checkpoint-2" / "gxpo_state.json").read_text())
    assert saved["counters"]["cumulative_backward_passes"] == rows[2]["cumulative_backward_passes"]

    resumed = list(stream(launch_trl(config | {"steps": 3}, run, num_processes=2, cpu=True)))
    assert not [line for line in resumed if "outlive" in line]
    rows = read_rows(run / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in rows][4:] == [("train", 3), ("eval", 3)]
    assert rows[4]["cumulative_backward_passes"] == rows[2]["cumulative_backward_passes"] + rows[4]["backward_passes"]


def test_ddp_two_ranks_take_the_same_decisions_and_end_identical(model_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), **cpu_environment(2))
    command = accelerate_launch_args(num_processes=2, cpu=True) + [
        str(REPO / "tests" / "trl_ddp_script.py"), "--model", str(model_dir), "--out", str(tmp_path)]
    done = subprocess.run(command, check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["decisions"] == ranks[1]["decisions"]
    assert [d["backward_passes"] for d in ranks[0]["decisions"]] == [3, 1, 1]  # GXPO, gate trips, GRPO
    assert ranks[0]["gate"] == ranks[1]["gate"] and ranks[0]["gate"]["shutoff_step"] == 2
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    assert ranks[0]["param_sha256"] != ranks[0]["initial_sha256"]
    assert ranks[0]["completions"] != ranks[1]["completions"]  # each rank trained on its own rollouts


# ---------------------------------------------------------------------------------------------------
# Scaling out: micro-batches, gradient accumulation, sharded evaluation, the rows' keys
# ---------------------------------------------------------------------------------------------------
def test_train_config_micro_batch_size_maps_to_gradient_accumulation(tmp_path):
    from gxpo_lib.integrations.trl_run import grpo_config_from_train_config
    from gxpo_lib.rl.trainer import TrainConfig

    config = TrainConfig(batch_prompts=8, group_size=8, micro_batch_size=16, gradient_checkpointing=True,
                         report_to=("tensorboard",), loss_aggregation="verl")
    args = grpo_config_from_train_config(config, tmp_path, num_processes=2)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (16, 2)  # 64 / (2 x 16)
    assert args.steps_per_generation == 2 and args.gradient_checkpointing and args.report_to == ["tensorboard"]
    assert args.loss_aggregation == "verl"
    whole = grpo_config_from_train_config(TrainConfig(batch_prompts=8, group_size=8), tmp_path, num_processes=2)
    assert (whole.per_device_train_batch_size, whole.gradient_accumulation_steps) == (32, 1)
    with pytest.raises(ValueError, match="micro_batch_size"):
        grpo_config_from_train_config(TrainConfig(batch_prompts=8, group_size=8, micro_batch_size=24), tmp_path, 2)


def test_accumulated_micro_batches_give_the_whole_batch_gradient(model_dir, dataset, tmp_path):
    # One GRPO pass with SGD over the same prepared inputs as 1 micro-batch of 8 and as 2 of 4 (completion
    # lengths differ between them): the same update for every loss type, with bnpo re-weighted to the token
    # mean of the whole batch; TRL's own mean of micro-batch means ("verl") differs.
    trainer = make_trainer(model_dir, dataset, tmp_path, algorithm="grpo", optim="sgd", learning_rate=0.5,
                           reward_funcs=(length_reward,))
    trainer.model.train()
    torch.manual_seed(0)
    inputs = trainer._generate_and_score_completions(first_batch(trainer))
    halves = [{k: v[i * 4:(i + 1) * 4] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in inputs.items()}
              for i in (0, 1)]
    assert halves[0]["completion_mask"].sum() != halves[1]["completion_mask"].sum()
    start = copy.deepcopy(trainer.model.state_dict())
    theta0 = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])

    def update(batches, loss_type, aggregation="exact"):
        trainer.model.load_state_dict(start)
        trainer.optimizer, trainer.rule = None, None
        trainer.loss_type, trainer.args.loss_aggregation = loss_type, aggregation
        trainer.args.steps_per_generation = len(batches)  # as TRL sets it for that accumulation (dapo reads it)
        trainer.create_optimizer()
        info = trainer.update(trainer.model, batches)
        return info, torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])

    for loss_type in ("bnpo", "grpo", "dr_grpo", "dapo"):
        whole_info, whole = update([inputs], loss_type)
        split_info, split = update(halves, loss_type)
        assert split_info.backward_passes == 1 and len(trainer.pass_metrics[-1]["entropy"]) == 2
        moved = float((whole - theta0).abs().max())
        assert moved > 1e-3, loss_type  # a real update happened
        # float32, one clipped SGD step, the same sums in another order: rounding alone, derived above
        tolerance = rounding_tolerance(torch.float32, moved, float(whole.abs().max()))
        assert float((split - whole).abs().max()) <= tolerance, loss_type
        assert split_info.loss == pytest.approx(whole_info.loss, rel=1e-5, abs=1e-7)
        assert split_info.grad_norm == pytest.approx(whole_info.grad_norm, rel=1e-5)
    _, whole = update([inputs], "bnpo", "verl")
    _, split = update(halves, "bnpo", "verl")
    assert float((split - whole).abs().max()) > 1e-5


@pytest.mark.slow
def test_accumulated_gxpo_steps_checkpoint_and_resume(model_dir, dataset, tmp_path):
    # 2 micro-batches of 4 per step through Trainer.train(): one rule step (3 passes, each over both
    # micro-batches) per optimizer step, one row per step; resuming from checkpoint-2 continues the same way.
    settings = dict(algorithm="gxpo", gate="none", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                    save_strategy="steps", save_steps=2)
    trainer = make_trainer(model_dir, dataset, tmp_path, **settings)
    trainer.train()
    rows = [r for r in read_rows(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [(r["step"], r["backward_passes"], r["active"]) for r in rows] == [(1, 3, True), (2, 3, True)]
    assert adam_steps(trainer) == {6} and trainer.optimizer.optimizer.ignored_steps == 2
    assert [len(p["entropy"]) for p in trainer.pass_metrics] == [2, 2, 2]  # every pass saw both micro-batches
    assert trainer._step == 4  # TRL's micro-batch counter: 2 calls per optimizer step
    resumed = make_trainer(model_dir, dataset, tmp_path, **(settings | dict(max_steps=3)))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    rows = [r for r in read_rows(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["cumulative_backward_passes"] == 9
    assert adam_steps(resumed) == {9}


@pytest.fixture(scope="module")
def scaleout(model_dir, tmp_path_factory):
    """tests/trl_ddp_script.py --mode scaleout in 1 plain process and in 2 accelerate processes, at once."""
    folders = {n: tmp_path_factory.mktemp(f"scaleout{n}") for n in (1, 2)}
    script = [str(REPO / "tests" / "trl_ddp_script.py"), "--model", str(model_dir), "--mode", "scaleout"]
    env = dict(os.environ, PYTHONPATH=str(REPO), **cpu_environment(2))
    runs = [subprocess.Popen([sys.executable, *script, "--out", str(folders[1])], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
            subprocess.Popen(accelerate_launch_args(num_processes=2, cpu=True) + [*script, "--out", str(folders[2])],
                             env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    for run in runs:
        output, _ = run.communicate(timeout=900)
        assert run.returncode == 0, output[-4000:]
    return folders


def scaleout_parameters(folder, processes, accumulation):
    return torch.load(folder / f"scaleout-w{processes}-ga{accumulation}.pt")


def max_difference(a, b):
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def float64_tolerance(parameters, initial) -> float:
    """What float64 rounding explains between two layouts of the scaleout run (everything in it is float64:
    see tests/trl_ddp_script.py), 2 GXPO steps: rounding_tolerance with GXPO_AMPLIFICATION. About 2e-14
    for these parameters (|theta| < 2, moved ~2e-3); one float32 operation left anywhere in the step shows
    as 1e-9 to 1e-6."""
    return rounding_tolerance(torch.float64, max_difference(parameters, initial), largest(parameters.values()),
                              amplification=GXPO_AMPLIFICATION)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_micro_batch_in_one_process(scaleout, model_dir):
    # 2 GXPO steps (3 passes each) of 8 scripted completions: 1 micro-batch of 8 vs 2 of 4 accumulated.
    one = scaleout_parameters(scaleout[1], 1, 1)
    accumulated = scaleout_parameters(scaleout[1], 1, 2)
    initial = {n: p.detach().double() for n, p in load(model_dir)[0].named_parameters()}
    assert max_difference(one, initial) > 1e-3  # a real update happened
    assert max_difference(accumulated, one) <= float64_tolerance(one, initial)
    for accumulation in (1, 2):
        record = json.loads((scaleout[1] / f"scaleout-w1-ga{accumulation}.json").read_text())
        assert record["per_device_train_batch_size"] == 8 // accumulation
        assert [(d["active"], d["backward_passes"]) for d in record["decisions"]] == [(True, 3), (True, 3)]


@pytest.mark.slow
def test_two_processes_with_accumulation_match_one_process(scaleout, model_dir):
    # The check: 2 DDP processes (accumulation 1, and 2 micro-batches of 2 each) end with the
    # 1-process run's parameters on the same data, to float64 rounding (all of the run is float64).
    reference = scaleout_parameters(scaleout[1], 1, 2)
    initial = {n: p.detach().double() for n, p in load(model_dir)[0].named_parameters()}
    assert max_difference(reference, initial) > 1e-3  # a real update happened
    tolerance = float64_tolerance(reference, initial)
    for accumulation in (1, 2):
        assert max_difference(scaleout_parameters(scaleout[2], 2, accumulation), reference) <= tolerance
        record = json.loads((scaleout[2] / f"scaleout-w2-ga{accumulation}.json").read_text())
        assert record["world_size"] == 2 and record["per_device_train_batch_size"] == 4 // accumulation
        assert [d["backward_passes"] for d in record["decisions"]] == [3, 3]


@pytest.mark.slow
def test_sharded_evaluation_rows_equal_one_process_rows(scaleout):
    # Each of 2 ranks grades its share of 12 problems; the gathered row (bootstrap intervals included)
    # is the row of all 12 graded in one process. Gathered in rank order instead, the intervals differ.
    ranks = [json.loads((scaleout[2] / f"eval-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world_size"] == 2 and ranks[0]["problems"] == 12
    assert len(set(ranks[0]["counts"])) > 1  # problems differ, so their order matters to the bootstrap
    for report in ranks:
        assert report["sharded"] == report["one_process"] == ranks[0]["one_process"]
    assert ranks[0]["rank_major_order"] != ranks[0]["one_process"]


def test_trl_train_rows_have_the_native_trainer_keys(model_dir, dataset, tmp_path):
    from dataclasses import fields

    from gxpo_lib.core.rules import StepInfo
    from gxpo_lib.rl import runlog
    from gxpo_lib.rl.trainer import TrainConfig, train

    (tmp_path / "trl").mkdir()
    make_trainer(model_dir, dataset, tmp_path / "trl", max_steps=1).train()
    trl_row = read_rows(tmp_path / "trl" / "metrics.jsonl")[-1]
    config = TrainConfig(model=str(model_dir), steps=1, batch_prompts=2, group_size=2, max_new_tokens=8,
                         eval_problems=2, eval_samples=1)
    train(config, tmp_path / "native", progress=False)
    native_row = [r for r in read_rows(tmp_path / "native" / "metrics.jsonl") if r["kind"] == "train"][-1]
    expected = ({*runlog.TRAIN_ROW_KEYS} | {f.name for f in fields(StepInfo)}
                | set(runlog.x_values(runlog.new_counters())))
    assert trl_row["kind"] == "train" and set(trl_row) == set(native_row) == expected
