"""GXPOTrainer under accelerate's FSDP2 on 2 CPU ranks (gloo) vs one plain process (run by
tests/test_trl_fsdp2.py).

    accelerate launch --config_file gxpo_lib/integrations/accelerate_configs/fsdp2.yaml --num_processes 2 \\
        --mixed_precision no tests/trl_fsdp2_script.py --model DIR --out DIR --mode sharded
    python tests/trl_fsdp2_script.py --model DIR --out DIR --mode reference

Runs (``CASES``), each on the shipped tiny model with SGD (momentum 0.9) on scripted rollouts
(tests/trl_ddp_script.py's ScriptedTrainer: a fixed function of the prompt, so every layout trains on the
same data), 8 completions per step: GXPO (3 steps, a loud reward: the gate trips at step 1, so steps 2-3
are GRPO steps), SFPO and GRPO (2 steps each) in float64 with the forward pass in float64 throughout (the
float64 RoPE and LM head of trl_ddp_script), GRPO in float32 (``grpo_float32``, HF's own float32 RoPE) and
GXPO with LoRA (``gxpo_lora``, 2 steps). Sharded: each rank holds 4 of the 8 completions and accelerate's
``fully_shard`` the parameters.
The GXPO run saves checkpoint-2 (accelerate's sharded checkpoint); ``gxpo_resumed`` resumes it in a fresh
trainer and runs step 3. A last sharded run (``generate``) samples with HF ``generate`` on the shards (real
completions, each rank its own) and evaluates 3 problems over 2 ranks, to show the ranks'
all-gathers stay in lockstep. Every rank writes ``{case}-rank{r}.json`` (its StepInfo per step, the gate's
state); rank 0 writes ``{case}.pt`` (the whole parameters, gathered from the shards).

accelerate 1.16 turns FSDP on only for accelerators (`allow_fsdp_on_cpu` explains the one patch, test-only).
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trl_ddp_script import ScriptedTrainer, float64_lm_head, float64_rotary_embedding, text_length_reward

from gxpo_lib.config import TrainConfig
from gxpo_lib.integrations.trl import GXPOConfig, GXPOTrainer
from gxpo_lib.integrations.trl_run import build_dataset
from gxpo_lib.rl.models import load_model

COMPLETIONS_PER_STEP = 8
CASES = {  # name: (algorithm, steps, dtype)
    "gxpo": ("gxpo", 3, torch.float64),
    "sfpo": ("sfpo", 2, torch.float64),
    "grpo": ("grpo", 2, torch.float64),
    "grpo_float32": ("grpo", 2, torch.float32),
    "gxpo_lora": ("gxpo", 2, torch.float64),  # LoRA adapters (r 4) on q/v: frozen base weights sharded too
}
LORA_CASES = {"gxpo_lora"}


def allow_fsdp_on_cpu() -> None:
    """Let accelerate run FSDP on CPU ranks (test-only).

    accelerate 1.16's AcceleratorState turns FSDP on only when the process group's type is an accelerator's
    (MULTI_GPU, MULTI_XPU, MULTI_NPU, ...: state.py, the ``if ... fsdp_plugin is not None`` branch under
    ``elif self.distributed_type in [MULTI_GPU, ...]``). On CPU ranks the type is MULTI_CPU, so it drops the
    plugin and trains as DDP; no environment variable, ``cpu=`` flag or plugin option changes that. This patch
    runs the original ``__init__`` and then does what that branch does, for MULTI_CPU too: sets the type to
    FSDP, applies the mixed precision to the plugin and keeps the plugin. It bypasses only that device-type
    gate. What runs is real: the gloo process group accelerate set up, ``Accelerator.prepare``'s FSDP2 path
    (``fsdp2_prepare_model``: ``fully_shard`` of each decoder layer, the tied embeddings and the root; the
    optimizer's parameters swapped for the DTensor shards), FSDP2's all-gathers and reduce-scatters,
    accelerate's sharded checkpoint save / load, TRL's trainer and gxpo_lib's rules and trainer code.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP) \
                and getattr(self, "fsdp_plugin", None) is None:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def loud_reward(completions, **kwargs):
    """text_length_reward x 100 with unscaled advantages: the first corrective norm is far above the gate's
    unit start, so GXPO's and SFPO's gates trip at step 1."""
    return [100.0 * r for r in text_length_reward(completions)]


def full_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter whole (DTensor shards gathered: a collective, so every rank calls it)."""
    out = {}
    for name, p in model.named_parameters():
        p = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name.replace("_checkpoint_wrapped_module.", "")] = p.detach().clone().cpu()
    return out


class Record:
    """Collects every step's StepInfo (as a dict) on this rank."""

    def __init__(self):
        self.rows = []

    def callback(self, trainer):
        from transformers import TrainerCallback

        record = self

        class Recorder(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                record.rows.append(trainer.last_info.to_dict())

        return Recorder()


def make_trainer(options, name: str, algorithm: str, steps: int, output_dir: Path, generate: bool = False,
                 dtype: torch.dtype = torch.float64, lora: bool = False, **overrides) -> GXPOTrainer:
    model, tokenizer = load_model(options.model, device="cpu")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if not generate and dtype == torch.float64:  # scripted rollouts, all of the arithmetic in float64
        model = model.to(torch.float64)
        float64_rotary_embedding(model)
    dataset = build_dataset(TrainConfig(), tokenizer).select(range(32))
    settings = dict(output_dir=str(output_dir), algorithm=algorithm, optim="sgd", optim_args="momentum=0.9",
                    learning_rate=0.02, max_grad_norm=1.0,
                    per_device_train_batch_size=COMPLETIONS_PER_STEP // processes,
                    num_generations=4, max_completion_length=16, max_steps=steps, bf16=False, use_cpu=True,
                    report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0,
                    loss_type="bnpo", top_k=0, scale_rewards="none", warmup=0, tau=0.5)
    args = GXPOConfig(**(settings | overrides))
    cls = GXPOTrainer if generate else ScriptedTrainer
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                 task_type="CAUSAL_LM")
    return cls(model=model, reward_funcs=[text_length_reward if generate else loud_reward], args=args,
               train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)


def finish(options, name: str, trainer: GXPOTrainer, record: Record) -> None:
    """{name}-rank{r}.json on every rank; {name}.pt (whole parameters) on rank 0."""
    accelerator = trainer.accelerator
    rank = accelerator.process_index
    parameters = full_parameters(trainer.model)
    report = {"world_size": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
              "fsdp_version": trainer.fsdp_version, "sharded": trainer.sharded,
              "rule_reducer": trainer.rule.reducer is not None, "steps": record.rows,
              "gate": trainer.rule.gate.state_dict() if getattr(trainer.rule, "gate", None) else None,
              "global_step": trainer.state.global_step,
              "dtensor_parameters": sum(hasattr(p, "full_tensor") for p in trainer.model.parameters()),
              "parameters": sum(1 for _ in trainer.model.parameters()),
              "trainable": sum(p.requires_grad for p in trainer.model.parameters())}
    Path(options.out, f"{name}-rank{rank}.json").write_text(json.dumps(report, indent=2))
    if accelerator.is_main_process:
        torch.save(parameters, Path(options.out, f"{name}.pt"))


def run(options, name: str, algorithm: str, steps: int, resume: str | None = None, **overrides) -> GXPOTrainer:
    output_dir = Path(options.out, name)
    trainer = make_trainer(options, name, algorithm, steps, output_dir, **overrides)
    record = Record()
    trainer.add_callback(record.callback(trainer))
    if options.mode == "reference":  # the starting point (LoRA adapters included), for "a real update happened"
        torch.save(full_parameters(trainer.model), Path(options.out, f"{name}-initial.pt"))
    trainer.train(resume_from_checkpoint=resume)
    finish(options, name, trainer, record)
    return trainer


def evaluate_sharded(options, trainer: GXPOTrainer) -> None:
    """EvaluationCallback's row of 3 problems over the 2 ranks (rank 1's share padded): eval-rank{r}.json."""
    from gxpo_lib.integrations.trl_run import EvaluationCallback

    config = TrainConfig(eval_problems=3, eval_samples=2, max_new_tokens=16, seed=3)
    callback = EvaluationCallback(trainer, config, trainer.processing_class, Path(options.out))
    row = callback._evaluate(callback.problems, config.eval_samples, final=False)
    Path(options.out, f"eval-rank{trainer.accelerator.process_index}.json").write_text(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("sharded", "reference"), required=True)
    options = parser.parse_args()
    torch.set_num_threads(1)
    if options.mode == "sharded":
        allow_fsdp_on_cpu()
    float64_lm_head()  # with float64_rotary_embedding: all of the scripted runs' arithmetic in float64
    for name, (algorithm, steps, dtype) in CASES.items():
        save = dict(save_strategy="steps", save_steps=2) if name == "gxpo" and options.mode == "sharded" else {}
        run(options, name, algorithm, steps, dtype=dtype, lora=name in LORA_CASES, **save)
    if options.mode == "reference":
        return
    checkpoint = Path(options.out, "gxpo", "checkpoint-2")
    resumed_dir = Path(options.out, "gxpo_resumed")
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.copytree(checkpoint, resumed_dir / "checkpoint-2")
    torch.distributed.barrier()
    run(options, "gxpo_resumed", "gxpo", 3, resume=str(resumed_dir / "checkpoint-2"))
    trainer = run(options, "generate", "gxpo", 2, generate=True)
    evaluate_sharded(options, trainer)


if __name__ == "__main__":
    main()
