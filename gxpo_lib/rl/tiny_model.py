"""The shipped tiny model: its word-level tokenizer, its Llama-3.2-style config and its supervised warm start.

Everything here exists to build ``data/models/tiny-llama-arith`` (``models.load_model("tiny")`` loads it):

- ``build_tokenizer()``: a word-level tokenizer over the arithmetic task's vocabulary (156 tokens);
- ``tiny_llama_config()``: a few-hundred-thousand-parameter ``LlamaConfig`` (RMSNorm, SwiGLU, GQA, llama3
  RoPE, tied embeddings);
- ``task_pass_at_1()``: sampled pass@1 on task problems, with the library's own sampler
  (``sampling.HFSampler``), reward (``rewards.math_reward``) and metric (``evaluation.sampled_pass_at_1``);
- ``build_tiny()``: supervised training on the task's train split until that pass@1 reaches a target, then
  the checkpoint folder with its model card (``model_card()``).

Rebuild the shipped checkpoint (deterministic for a seed on a given machine, 2 threads)::

    python -m gxpo_lib.rl.tiny_model build --out data/models/tiny-llama-arith --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from gxpo_lib.rl import arith_task
from gxpo_lib.rl.evaluation import sampled_pass_at_1
from gxpo_lib.rl.models import ASSISTANT, BOS, EOS, PAD, UNK, USER, count_parameters, format_prompt, tiny_model_dir
from gxpo_lib.rl.rewards import math_reward
from gxpo_lib.rl.sampling import HFSampler

logger = logging.getLogger(__name__)

# Renders [{"role": "user", ...}, {"role": "assistant", ...}] as <|bos|><|user|>...<|assistant|>...<|eos|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Pre-tokenizer: \boxed, a word or a symbol, each with an optional leading space; a bare digit; a space.
# Digits never carry the space, so each digit has exactly one token wherever it appears.
_PIECE_PATTERN = r" ?\\boxed| ?[A-Za-z]+|[0-9]| ?[^A-Za-z0-9\s]|\s"
_SYMBOLS = list(".,?!:;'+-*/=(){}")
MAX_POSITIONS = 256
# Longest task completion is 45 tokens (three equations of 3-digit numbers, the boxed answer, EOS).
MAX_NEW_TOKENS = 48
WARMUP_STEPS = 50
CORRECT = 0.95  # a reward at or above this counts as a correct sample (the authors' threshold)


# -- Tokenizer and config ----------------------------------------------------------------------------
def _tiny_vocabulary() -> list[str]:
    """Special tokens, digits, then every other piece of the task's text with and without a leading space."""
    pieces = _SYMBOLS + ["\\boxed"] + arith_task.task_words()
    specials = [PAD, BOS, EOS, UNK, USER, ASSISTANT, " ", "\n"]
    return specials + list("0123456789") + pieces + [" " + p for p in pieces]


def build_tokenizer(padding_side: str = "left"):
    """A word-level ``PreTrainedTokenizerFast`` for the arithmetic task (156 tokens).

    Words and symbols are single tokens, each optionally carrying its leading space; digits are single
    bare tokens (a number's leading space is its own token). Decoding is plain concatenation and
    round-trips the task's text exactly. Words outside the task's vocabulary map to ``<|unk|>``. No
    special token is added automatically: the chat template (``models.format_prompt``) writes ``<|bos|>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r} is invalid: expected 'left' or 'right'")
    vocab = {piece: index for index, piece in enumerate(_tiny_vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_PIECE_PATTERN), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT], padding_side=padding_side,
        model_max_length=MAX_POSITIONS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                      num_kv_heads: int = 2, intermediate_size: int | None = None,
                      max_position_embeddings: int = MAX_POSITIONS, bos_token_id: int | None = None,
                      eos_token_id: int | None = None, pad_token_id: int | None = None):
    """A ``LlamaConfig`` with the Llama 3.2 design at toy size.

    RMSNorm, SwiGLU MLP (``intermediate_size`` defaults to 8/3 * hidden rounded up to a multiple of 32),
    grouped-query attention (``num_kv_heads`` < ``num_heads``), llama3 RoPE scaling, tied embeddings.
    """
    from transformers import LlamaConfig

    for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                        ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: expected an integer >= 1")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads} "
                         f"are invalid: num_heads must divide hidden_size and num_kv_heads divide num_heads")
    if intermediate_size is None:
        intermediate_size = 32 * math.ceil(hidden_size * 8 / 3 / 32)
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5, hidden_act="silu",
        tie_word_embeddings=True, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        rope_scaling={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})


# -- Measuring: sampled pass@1 with the library's sampler, reward and metric -------------------------
def task_pass_at_1(model, tokenizer, problems: Sequence[dict], num_samples: int = 4, seed: int = 0,
                   max_new_tokens: int = MAX_NEW_TOKENS) -> float:
    """Sampled pass@1 (temperature 1, top_p 1, top_k off) of ``model`` on ``problems``.

    ``problems``: dicts with ``prompt`` and ``answer`` (task records or benchmark rows). Each gets
    ``num_samples`` completions from ``HFSampler`` (seeded; the global RNG is left alone); a completion
    is correct when ``math_reward`` gives at least 0.95. Returns the mean over the [P, num_samples]
    correctness matrix.
    """
    if not problems:
        raise ValueError("problems=[] is invalid: expected at least one problem")
    sampler = HFSampler(model, tokenizer, lambda text: format_prompt(text, tokenizer), max_new_tokens=max_new_tokens)
    rollouts = sampler.sample([p["prompt"] for p in problems], num_samples, seed=seed, score_policy=False)
    # [P * n] completions, n consecutive per problem -> [P, n] correctness.
    rewards = [math_reward(text, problems[i]["answer"]) for text, i in zip(rollouts.completions, rollouts.prompt_index)]
    correct = [[r >= CORRECT for r in rewards[p * num_samples:(p + 1) * num_samples]] for p in range(len(problems))]
    return sampled_pass_at_1(correct)


# -- Supervised warm start ---------------------------------------------------------------------------
def _sft_example(tokenizer, record: dict) -> tuple[list[int], int]:
    """Token ids of prompt + solution + EOS, and the prompt's length (the loss starts after it)."""
    prompt_ids = tokenizer(format_prompt(record["prompt"], tokenizer), add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(record["solution"] + EOS, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, len(prompt_ids)


def _sft_batch(examples: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` [B, T] (labels -100 off-completion)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, prompt_len:len(ids)] = torch.tensor(ids[prompt_len:])
        attention_mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def build_command(out: str | Path, seed: int) -> str:
    """The shell command that rebuilds a checkpoint folder."""
    return f"python -m gxpo_lib.rl.tiny_model build --out {out} --seed {seed}"


def build_tiny(out_dir: str | Path | None = None, seed: int = 0, data_dir: str | Path = arith_task.DATA_DIR,
               target_pass_at_1: float = 0.4, max_steps: int = 2000, batch_size: int = 64, lr: float = 3e-3,
               eval_every: int = 50, monitor_problems: int = 128, num_samples: int = 4) -> dict:
    """Warm-start the tiny Llama by supervised training on the task's train split and save it.

    Teacher forcing on prompt + solution, cross-entropy on the completion tokens only, AdamW with a
    short warm-up. Every ``eval_every`` steps ``task_pass_at_1`` (``num_samples`` per problem) on the
    first ``monitor_problems`` test problems is measured; training stops at the first evaluation reaching
    ``target_pass_at_1``, leaving room for RL. The final pass@1 on the whole test split is written to
    ``training_info.json``. Deterministic in ``seed`` on a given machine (2 threads). Returns the info.
    The caller's torch thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        from transformers import LlamaForCausalLM

        out = Path(out_dir) if out_dir is not None else tiny_model_dir()
        if not 0.0 < target_pass_at_1 < 1.0:
            raise ValueError(f"target_pass_at_1={target_pass_at_1!r} is invalid: expected a value in (0, 1)")
        started = time.time()
        torch.manual_seed(seed)
        # Data: tokenized train examples; the monitor and final evaluation use the test split.
        tokenizer = build_tokenizer()
        train = [_sft_example(tokenizer, r) for r in arith_task.load_split("train", data_dir)]
        test = arith_task.load_split("test", data_dir)
        # Model and optimizer.
        config = tiny_llama_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
        order = torch.Generator().manual_seed(seed)
        history, step, permutation = [], 0, []
        while step < max_steps:
            # Next mini-batch from a seeded permutation of the train split (a new one each epoch).
            if len(permutation) < batch_size:
                permutation = torch.randperm(len(train), generator=order).tolist()
            batch_ids, permutation = permutation[:batch_size], permutation[batch_size:]
            model.train()
            loss = model(**_sft_batch([train[i] for i in batch_ids], tokenizer.pad_token_id)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            # Periodic sampled pass@1 on the monitor problems; stop once it reaches the target.
            if step % eval_every == 0:
                score = task_pass_at_1(model, tokenizer, test[:monitor_problems], num_samples, seed=seed)
                history.append({"step": step, "loss": round(loss.item(), 4), "monitor_pass_at_1": round(score, 4)})
                logger.info("step %d loss %.4f monitor pass@1 %.3f", step, loss.item(), score)
                if score >= target_pass_at_1:
                    break
        # Final measurement on the whole test split.
        final = task_pass_at_1(model, tokenizer, test, num_samples, seed=seed)
        info = {
            "seed": seed, "steps": step, "batch_size": batch_size, "lr": lr, "warmup_steps": WARMUP_STEPS,
            "target_pass_at_1": target_pass_at_1, "eval_every": eval_every,
            "monitor": f"first {monitor_problems} test problems x {num_samples} samples",
            "test_pass_at_1": round(final, 4), "test_problems": len(test), "samples_per_problem": num_samples,
            "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": MAX_NEW_TOKENS},
            "parameters": count_parameters(model), "train_seconds": round(time.time() - started, 1),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "history": history,
            "reward": f"gxpo_lib.rl.rewards.math_reward gives at least {CORRECT}",
            "command": build_command(out, seed),
        }
        _save_tiny(model, tokenizer, out, info)
        return info
    finally:
        torch.set_num_threads(threads)


def _save_tiny(model, tokenizer, out: Path, info: dict) -> None:
    """Write the checkpoint folder: weights (fp32), config, tokenizer, generation config, info, model card."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
        max_new_tokens=MAX_NEW_TOKENS)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(info), encoding="utf-8")


# -- Model card --------------------------------------------------------------------------------------
def model_card(info: dict) -> str:
    """The checkpoint's README.md: Hugging Face metadata front matter, then how it was built and what for.

    ``info``: the folder's ``training_info.json`` (as ``build_tiny`` returns it). Every number in the
    card comes from ``info``, so a rebuilt checkpoint gets a card that matches it.
    """
    monitor = info["history"][-1] if info["history"] else None
    stop = (f"stopped at step {info['steps']}, the first monitor evaluation at or above the target "
            f"{info['target_pass_at_1']} (monitor pass@1 {monitor['monitor_pass_at_1']})"
            if monitor and monitor["monitor_pass_at_1"] >= info["target_pass_at_1"]
            else f"ran its {info['steps']} steps without reaching the target {info['target_pass_at_1']}")
    sampling = info["sampling"]
    command = build_command("data/models/tiny-llama-arith", info["seed"])
    # Checkpoints built before the reward was recorded were scored by an exact boxed-integer match.
    reward = info.get("reward", "its last boxed integer equals the gold answer")
    return f"""---
license: mit
library_name: transformers
pipeline_tag: text-generation
tags:
- llama
- gxpo
- grpo
- reinforcement-learning
- toy-model
model-index:
- name: tiny-llama-arith
  results:
  - task:
      type: text-generation
      name: synthetic arithmetic word problems
    dataset:
      type: gxpo-arith
      name: gxpo_lib.rl.arith_task arithmetic, test split ({info['test_problems']} problems)
    metrics:
    - type: pass@1
      name: sampled pass@1 ({info['samples_per_problem']} samples, temperature {sampling['temperature']})
      value: {info['test_pass_at_1']}
---

# tiny-llama-arith

A {info['parameters']:,}-parameter `LlamaForCausalLM` with the Llama 3.2 design (RMSNorm, SwiGLU,
grouped-query attention with 4 query and 2 key/value heads, `llama3` RoPE scaling, tied embeddings;
4 layers, hidden size 128, fp32) and a 156-token word-level tokenizer, warm-started by supervised
training on the synthetic arithmetic task of `gxpo_lib.rl.arith_task` (`data/arith`). It is the default policy of
the gxpo notebooks (`gxpo_lib.rl.models.load_model("tiny")`): small enough that a GRPO, GXPO or SFPO run
takes a minute on a laptop CPU, good enough that reinforcement learning has something to improve.

Load it with the plain Auto classes:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("data/models/tiny-llama-arith")
tokenizer = AutoTokenizer.from_pretrained("data/models/tiny-llama-arith")
```

Prompt format: `<|bos|><|user|>{{problem}}<|assistant|>` (the tokenizer's chat template; tokenize it with
`add_special_tokens=False`). Target completion: `7 + 5 = 12. 12 - 3 = 9. \\boxed{{9}}<|eos|>`.

## How it was built

- Data: the task's train split (3,000 seeded problems, levels 1-3: one to three additions or subtractions
  in a short story); the test split (500 problems, disjoint by prompt) only measures.
- Training: teacher forcing on prompt + solution, cross-entropy on the completion tokens only; AdamW
  (lr {info['lr']}, betas 0.9/0.98, weight decay 0.01, {info['warmup_steps']} warm-up steps), batch
  {info['batch_size']}, gradient clipping at 1.0, seed {info['seed']}.
- Stopping: every {info['eval_every']} steps the sampled pass@1 on the {info['monitor']} was measured;
  the run {stop}. Stopping early on purpose leaves room for RL.
- Cost: {info['train_seconds']} s on a CPU with {info['threads']} threads (torch {info['torch']}).
- Rebuild (deterministic for a seed on a given machine): `{command}`.
  Every number here is in `training_info.json`.

## Evaluation

Sampled pass@1 on the whole test split: **{info['test_pass_at_1']}** ({info['test_problems']} problems x
{info['samples_per_problem']} samples at temperature {sampling['temperature']}, top_p {sampling['top_p']},
top_k off, at most {sampling['max_new_tokens']} new tokens; a sample is correct when {reward}).

## Intended use

Teaching and testing: watching GRPO, GXPO and SFPO change a real transformer's policy within seconds on a
CPU, and exercising the training, sampling, reward and evaluation code end to end.

## Limits

- It knows only this task: a closed vocabulary of 156 tokens (other words become `<|unk|>`), counts
  from 0 to a few hundred, additions and subtractions. It is not a language model in any useful sense.
- Results on it say nothing directly about billion-parameter models on real reasoning benchmarks; the
  gxpo README's seed study shows how differently methods can behave at this scale.
- Its pass@1 is a sampled estimate over 500 problems; expect a few points of noise between seeds.

## Licence

MIT, like the gxpo code (`LICENSE` at the repository root). The training data is generated by
`gxpo_lib.rl.arith_task` and carries no third-party text.
"""


# -- CLI ---------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m gxpo_lib.rl.tiny_model build --out data/models/tiny-llama-arith --seed 0``."""
    parser = argparse.ArgumentParser(prog="python -m gxpo_lib.rl.tiny_model",
                                     description="build the shipped tiny Llama checkpoint")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="warm-start and save the tiny Llama checkpoint")
    build.add_argument("--out", default=str(tiny_model_dir()))
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--data", default=str(arith_task.DATA_DIR), help="folder with train.jsonl / test.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = build_tiny(args.out, seed=args.seed, data_dir=args.data)
    print(f"saved {args.out}: {info['steps']} steps, test pass@1 {info['test_pass_at_1']}, "
          f"{info['train_seconds']} s")


if __name__ == "__main__":
    main()
