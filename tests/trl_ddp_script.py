"""One rank of tests/test_trl.py's DDP check: 3 GXPO steps on the tiny model, then a per-rank report.

Run with ``accelerate launch --num_processes 2 --cpu tests/trl_ddp_script.py --model DIR --out DIR``.
Each rank writes ``rank{r}.json``: its decisions per step, the gate's final state and a SHA-256 of its
parameters, so the test can check that both ranks took the same decisions and ended identical.
"""

import argparse
import hashlib
import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from gxpo_lib.integrations.trl import GXPOConfig, GXPOTrainer, build_dataset, math_reward_func
from gxpo_lib.models import load_model
from gxpo_lib.trainer import TrainConfig


def length_reward(completions, **kwargs):
    """Varies with any change of the text; large and unscaled, so the gate trips at step 1."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [100.0 * (sum(map(ord, t)) % 13) / 4.0 for t in texts]


def param_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Decisions(TrainerCallback):
    """Collects each step's decisions (what must agree across ranks) and this rank's completions."""

    def __init__(self, trainer):
        self.trainer, self.rows = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        info = self.trainer.last_info
        self.rows.append({"active": info.active, "fallback": info.fallback, "gate_open": info.gate_open,
                          "backward_passes": info.backward_passes, "grad_norm": info.grad_norm,
                          "gate_z": info.gate_z})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    options = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load_model(options.model, device="cpu")
    initial = param_sha256(model)
    args = GXPOConfig(output_dir=options.out, algorithm="gxpo", gate_warmup=0, tau=0.5, scale_rewards="none",
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=16, max_steps=3,
                      learning_rate=1e-3, optim="adamw_torch", bf16=False, use_cpu=True, report_to="none",
                      logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, loss_type="bnpo", top_k=0)
    dataset = build_dataset(TrainConfig(), tokenizer).select(range(32))
    trainer = GXPOTrainer(model=model, reward_funcs=[math_reward_func, length_reward], args=args,
                          train_dataset=dataset, processing_class=tokenizer)
    decisions = Decisions(trainer)
    trainer.add_callback(decisions)
    completions = []
    original = trainer._calculate_rewards

    def recording(inputs, prompts, completions_, completion_ids_list):  # this rank's own completions
        completions.append([str(c) for c in completions_])
        return original(inputs, prompts, completions_, completion_ids_list)

    trainer._calculate_rewards = recording
    trainer.train()
    report = {"world_size": trainer.accelerator.num_processes, "decisions": decisions.rows,
              "gate": {k: v for k, v in trainer.rule.gate.state_dict().items()},
              "param_sha256": param_sha256(trainer.accelerator.unwrap_model(trainer.model)),
              "initial_sha256": initial, "completions": completions}
    rank = trainer.accelerator.process_index
    Path(options.out, f"rank{rank}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
