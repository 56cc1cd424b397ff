"""One rank of tests/test_trl.py's multi-process checks (also runs as a single plain process).

Run with ``accelerate launch --num_processes 2 --cpu tests/trl_ddp_script.py --model DIR --out DIR [--mode M]``:

- ``--mode decisions`` (default): 3 GXPO steps on the tiny model. Each rank writes ``rank{r}.json``: its
  decisions per step, the gate's final state and a SHA-256 of its parameters, so the test can check that both
  ranks took the same decisions and ended identical.
- ``--mode scaleout``: 2 GXPO steps of 8 completions each, once with ``gradient_accumulation_steps=1`` and once
  with 2 (the per-process micro-batch is 8 / processes / accumulation), on scripted rollouts (a fixed function
  of the prompt, so every layout trains on the same data) in float64 with SGD. Rank 0 writes
  ``scaleout-w{processes}-ga{accumulation}.pt`` (the trained parameters) and ``.json`` (the steps' records);
  then every rank evaluates 12 problems with a scripted sampler through ``EvaluationCallback`` (each rank its
  share) and writes ``eval-rank{r}.json`` with the sharded row and the row of all problems in one process.
"""

import argparse
import hashlib
import json
import zlib
from collections import Counter
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback

from gxpo_lib.core.distributed import leave_process_group
from gxpo_lib.integrations.trl import GXPOConfig, GXPOTrainer
from gxpo_lib.integrations.trl_run import EvaluationCallback, build_dataset, math_reward_func
from gxpo_lib.rl import runlog
from gxpo_lib.rl.evaluation import correct_counts, summarize_counts
from gxpo_lib.rl.models import load_model
from gxpo_lib.rl.rewards import RewardScorer
from gxpo_lib.rl.sampling import Rollouts
from gxpo_lib.rl.trainer import TrainConfig

COMPLETIONS_PER_STEP = 8  # scaleout: 2 prompts x 4 completions per optimizer step, whatever the layout


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


def decisions(options) -> None:
    """3 GXPO steps (the gate trips at step 1); rank{r}.json per rank."""
    model, tokenizer = load_model(options.model, device="cpu")
    initial = param_sha256(model)
    args = GXPOConfig(output_dir=options.out, algorithm="gxpo", warmup=0, tau=0.5, scale_rewards="none",
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=16, max_steps=3,
                      learning_rate=1e-3, optim="adamw_torch", bf16=False, use_cpu=True, report_to="none",
                      logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0, loss_type="bnpo", top_k=0)
    dataset = build_dataset(TrainConfig(), tokenizer).select(range(32))
    trainer = GXPOTrainer(model=model, reward_funcs=[math_reward_func, length_reward], args=args,
                          train_dataset=dataset, processing_class=tokenizer)
    recorder = Decisions(trainer)
    trainer.add_callback(recorder)
    completions = []
    original = trainer._calculate_rewards

    def recording(inputs, prompts, completions_, completion_ids_list):  # this rank's own completions
        completions.append([str(c) for c in completions_])
        return original(inputs, prompts, completions_, completion_ids_list)

    trainer._calculate_rewards = recording
    trainer.train()
    report = {"world_size": trainer.accelerator.num_processes, "decisions": recorder.rows,
              "gate": {k: v for k, v in trainer.rule.gate.state_dict().items()},
              "param_sha256": param_sha256(trainer.accelerator.unwrap_model(trainer.model)),
              "initial_sha256": initial, "completions": completions}
    rank = trainer.accelerator.process_index
    Path(options.out, f"rank{rank}.json").write_text(json.dumps(report, indent=2))


# ---------------------------------------------------------------------------------------------------
# scaleout: the same data in every layout of processes x accumulation
# ---------------------------------------------------------------------------------------------------
class ScriptedTrainer(GXPOTrainer):
    """GXPOTrainer whose completions are a fixed function of (prompt, index within its group), 3 to 12
    tokens long: every layout of processes and micro-batches trains on exactly the same rollouts."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        special = set(self.processing_class.all_special_ids)
        allowed = [i for i in range(len(self.processing_class)) if i not in special]
        seen, completions = Counter(), []
        for ids in prompt_ids:
            key = tuple(int(i) for i in ids)
            index = seen[key] % num_generations
            seen[key] += 1
            digest = zlib.crc32(repr((key, index)).encode())
            picks = torch.randint(len(allowed), (3 + digest % 10,), generator=torch.Generator().manual_seed(digest))
            completions.append([allowed[i] for i in picks.tolist()])
        return completions, None


def text_length_reward(completions, **kwargs):
    """Differs between a group's scripted completions, so the advantages are not all zero."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(len(t) % 7) for t in texts]


# The scaleout layouts must do the same arithmetic up to float64 rounding, but two steps of the forward pass
# run in float32 whatever the model's dtype, and in both the float32 rounding depends on the layout:
# - HF's Llama computes RoPE's cos / sin in float32. The layouts pad their micro-batches differently (prompts
#   are left-padded to the longest prompt of the batch), so a token sits at another absolute position in each
#   layout; RoPE is relative only in exact arithmetic, and with float32 cos / sin the logits of the same token
#   differ by ~2e-7 relative between two paddings (float32's eps is 1.2e-7).
# - TRL 1.16 scores tokens with its fused LM head (trl.kernels.ChunkedLogProbFunction), whose online
#   log-sum-exp and gradient GEMMs accumulate in float32, over however many tokens the micro-batch holds.
# GXPO's per-coordinate retention ratio r = g1 / g0 (active where |g0| > delta, a step function, then
# clamped) turns such 1e-7 gradient differences into parameter differences no eps-based bound covers (2e-6
# was seen on one CPU, under 1e-6 on another). Both are replaced here by the same math in float64, so every
# layout computes in float64 and the tests compare at float64 rounding.
def float64_rotary_embedding(model) -> None:
    """Make the model's rotary embedding compute cos / sin in float64 (HF's Llama forces float32 there)."""
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.to(torch.float64)  # the same constants (float32 values, exact in float64)

    def forward(x, position_ids):
        freqs = position_ids[:, :, None].to(torch.float64) * inv_freq.to(x.device)
        angles = torch.cat((freqs, freqs), dim=-1)
        return ((angles.cos() * rotary.attention_scaling).to(x.dtype),
                (angles.sin() * rotary.attention_scaling).to(x.dtype))

    rotary.forward = forward


class Float64LogProb:
    """Stands in for TRL's ``ChunkedLogProbFunction`` (same ``apply`` arguments and outputs): the LM head's
    log-softmax, entropy and the rest in the hidden states' dtype, with plain autograd, instead of TRL's
    float32 accumulators."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("entropy",)):
        z = hidden @ weight.to(hidden.dtype).t()
        if bias is not None:
            z = z + bias.to(hidden.dtype)
        z = z * logit_scale
        if final_logit_softcapping is not None:
            z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
        z = z / temperature
        log_p = torch.log_softmax(z, dim=-1)
        logprobs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1) if "entropy" in outputs else None
        with torch.no_grad():
            log_sum_sq = torch.logsumexp(2 * log_p, dim=-1) if "log_sum_sq_probs" in outputs else None
            mean_logits = z.mean(-1) if "mean_logits" in outputs else None
            is_top1 = z.argmax(-1) == targets if "is_top1" in outputs else None  # first maximum, as TRL's
        return logprobs, entropy, log_sum_sq, mean_logits, is_top1


def float64_lm_head() -> None:
    """Route TRL's fused LM head (``model(..., fused_lm_head=True)``) through Float64LogProb."""
    import trl.trainer.utils as trl_utils

    assert hasattr(trl_utils, "_ChunkedLogProbFunction"), "TRL moved its fused LM head: update Float64LogProb"
    trl_utils._ChunkedLogProbFunction = Float64LogProb


def scaleout_run(options, accumulation: int) -> GXPOTrainer:
    """2 GXPO steps of COMPLETIONS_PER_STEP scripted completions, float64 + SGD; rank 0 saves the parameters."""
    model, tokenizer = load_model(options.model, device="cpu")
    model = model.to(torch.float64)
    float64_rotary_embedding(model)  # all of the forward pass in float64, whatever the padding
    dataset = build_dataset(TrainConfig(), tokenizer).select(range(32))
    processes = PartialState().num_processes
    args = GXPOConfig(output_dir=options.out, algorithm="gxpo", optim="sgd", learning_rate=0.02, max_grad_norm=1.0,
                      per_device_train_batch_size=COMPLETIONS_PER_STEP // processes // accumulation,
                      gradient_accumulation_steps=accumulation, num_generations=4, max_completion_length=16,
                      max_steps=2, bf16=False, use_cpu=True, report_to="none", logging_steps=1, save_strategy="no",
                      disable_tqdm=True, seed=0, loss_type="bnpo", top_k=0, gxpo_metrics_file="")
    trainer = ScriptedTrainer(model=model, reward_funcs=[text_length_reward], args=args, train_dataset=dataset,
                              processing_class=tokenizer)
    recorder = Decisions(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    if trainer.accelerator.is_main_process:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        stem = Path(options.out, f"scaleout-w{processes}-ga{accumulation}")
        torch.save({n: p.detach().clone() for n, p in unwrapped.named_parameters()}, f"{stem}.pt")
        stem.with_suffix(".json").write_text(json.dumps({
            "world_size": processes, "accumulation": accumulation, "decisions": recorder.rows,
            "per_device_train_batch_size": args.per_device_train_batch_size}, indent=2))
    return trainer


class ScriptedSampler:
    """The Sampler protocol without a model: problem i's sample j is right when crc32(prompt, j) % 3 == 0,
    and 1 to 5 tokens long."""

    def __init__(self, problems):
        self.answers = {p["prompt"]: p["answer"] for p in problems}

    def sample(self, prompts, group_size, seed, score_policy=True) -> Rollouts:
        rows = [(i, j) for i in range(len(prompts)) for j in range(group_size)]
        digests = [zlib.crc32(repr((prompts[i], j, seed)).encode()) for i, j in rows]
        texts = [f"\\boxed{{{self.answers[prompts[i]]}}}" if d % 3 == 0 else "\\boxed{-1}"
                 for (i, _), d in zip(rows, digests)]
        mask = torch.tensor([[1 if t < 1 + d % 5 else 0 for t in range(5)] for d in digests])
        zeros = torch.zeros(len(rows), 1, dtype=torch.long)
        return Rollouts(zeros, zeros.clone(), torch.zeros_like(mask), mask, None, None, texts,
                        [i for i, _ in rows], group_size)


class ScriptedEvaluation(EvaluationCallback):
    """EvaluationCallback (rank shares, gather, pass@k) with the scripted sampler in place of HF generate."""

    def sampler(self):
        return ScriptedSampler(self.problems)


def evaluation_check(options, trainer: GXPOTrainer) -> None:
    """The sharded evaluation row vs the row of all problems graded in this one process."""
    config = TrainConfig(eval_problems=12, eval_samples=4, seed=3)
    callback = ScriptedEvaluation(trainer, config, trainer.processing_class, Path(options.out))
    problems, samples = callback.problems, config.eval_samples
    sharded = callback._evaluate(problems, samples, final=False)
    seed = runlog.eval_seed(config.seed)
    with RewardScorer(workers=0) as scorer:
        counts, lengths = correct_counts(ScriptedSampler(problems), scorer, problems, samples, seed)
    world = trainer.accelerator.num_processes
    rank_major = [c for r in range(world) for c in counts[r::world]]  # the gathered order, unsorted
    report = {"world_size": world, "problems": len(problems), "counts": counts, "sharded": sharded,
              "one_process": summarize_counts(counts, samples, lengths, seed),
              "rank_major_order": summarize_counts(rank_major, samples, lengths, seed)}
    Path(options.out, f"eval-rank{trainer.accelerator.process_index}.json").write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mode", choices=("decisions", "scaleout"), default="decisions")
    options = parser.parse_args()
    torch.set_num_threads(1)
    if options.mode == "decisions":
        decisions(options)
    else:
        PartialState(cpu=True)  # first of the process: a gloo process group on CPU ranks
        float64_lm_head()  # with float64_rotary_embedding in scaleout_run: all of the arithmetic in float64
        scaleout_run(options, accumulation=1)
        evaluation_check(options, scaleout_run(options, accumulation=2))
    left = leave_process_group()   # as gxpo_lib.integrations.trl_run does: no gloo thread for the teardown
    assert not left, f"gloo threads outlive the process group: {left}"


if __name__ == "__main__":
    main()
