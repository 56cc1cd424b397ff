"""Memory preflight: the peak GPU memory of a run, estimated from the model's shape before anything loads.

    python -m gxpo_lib preflight --preset paper-gxpo [-s micro_batch_size=64]
        [--gpu h100|h200|a100-80|a100-40|l4|GiB] [--fit] [--world-size N [--replicated]] [--backend trl]
    estimate = preflight(resolve_config("paper-gxpo"), gpu="h100")        # ValueError naming micro_batch_size
    config, estimate = preflight(config, gpu="h100", fit=True)            # the largest divisor that fits
    estimate = preflight(config, gpu="h100", world_size=8)                # per GPU of an 8-rank FSDP2 run

The estimate is arithmetic, printed line by line (`format_estimate`) so a reader can check it:

- **fixed**: weights (parameters x dtype bytes); the trainable parameters (LoRA adapters in float32: peft
  upcasts them; full fine-tuning: the weights themselves), their gradients, AdamW's two moments (in the
  trainable dtype, as ``torch.optim.AdamW`` keeps them), the rule's buffers (GXPO: theta0 in the trainable
  dtype and g0, g1 in at least float32; SFPO: theta0; a transactional optimizer state adds one copy of the
  moments), the frozen reference copy for the KL term in full fine-tuning.
- **phases** (the peak is fixed + the largest): the training micro-batch (autograd's saved activations,
  the attention mask, then the larger of one layer's recompute in backward and the LM head's chunk, see
  `losses.ChunkedHeadLogprobs`), the no-grad scoring of old / reference log-probs, HF sampling's KV cache
  (``rollout_backend`` hf or lean), the optimizer step's temporary.
- **budget**: GPU memory - ``vllm_gpu_memory`` x GPU memory (``rollout_backend="vllm"``) - 1 GiB (CUDA
  context, cuBLAS workspaces, not in ``max_memory_allocated``); a run fits when the peak is at most 90% of
  that (the caching allocator's fragmentation and this estimate's error).

**The activation constant was measured on a CPU**: the bytes autograd saves
(``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters excluded; `measure_saved_bytes`)
for one row of `losses.policy_token_logprobs` with the entropy, random-init Llama models of 1 and 2 layers
(the difference is one layer) at hidden/intermediate/heads/kv-heads 128/352/4/2 (the tiny model),
896/4864/14/2 (Qwen2.5-0.5B), 1536/8960/12/2 (Qwen2.5-1.5B) and 2048/8192/32/8 (Llama-3.2-1B), fed lengths
f = 31 and 63, with and without gradient checkpointing, transformers 5.17, torch 2.13 (CPU, SDPA). Per
layer and fed token, e the dtype's bytes:

- without checkpointing, full fine-tuning: **bf16 24 H + 8 I + 4 heads + 2 f bytes** (least-squares
  residual <= 0.13% over the four shapes), **fp32 40 H + 16 I + 4 heads + 4 f** (exact on two shapes). The
  ``e f`` term is SDPA's attention mask, converted to the dtype per layer; ``4 heads`` the float32 logsumexp.
- LoRA on q/k/v/o: the same bf16 constant (fp32: 30 H + 12 I, fitted at r = 8 on two shapes; LoRA on the
  MLP too: the full-fine-tuning constant) + 2 e r per
  adapted module for the adapters' own activations: an upper bound, 2-8% above the measurement at r = 128
  on the three real shapes, 3-4% above at r = 8 in fp32.
- with checkpointing: **e H** exactly (the checkpointed layer input), on every shape, LoRA or not.
- outside the layers: per fed token f (4 H + 4) (the final RMSNorm's float32 copy and rsqrt) and 8 B (the
  ids), + e H in full fine-tuning (the norm weight's gradient); per completion token T (e H + 8) (the hidden
  states the LM head keeps, its log-normalisers and entropies).
- checked against 2-row measurements at (P, T) = (8, 56) and (40, 24) (`measure_saved_bytes`, which passes
  the active token positions as the objective does): with checkpointing within 0.8% on every shape and
  dtype, full fine-tuning without it within 1.2%; ``tests/test_preflight.py`` re-measures the tiny model.

What a CPU cannot measure (``scripts/gpu_check.py`` leg (a) checks it, +-15%): CUDA's SDPA kernels, the
caching allocator, the transients (the backward's gradient working set of one layer, ``(2 I + 4 H) e``
per token here, and the LM head's chunks ``(2 e + 16)`` bytes per logit), which are estimates.

**Several GPUs** (``world_size`` N > 1: WORLD_SIZE under torchrun, ``num_processes`` for TRL): every rank
samples, scores and trains on 1/N of the rows (the micro-batch is per rank: a divisor of the rank's rows).
With FSDP2 (the native trainer under torchrun, `distributed.shard_policy`; TRL with an ``fsdp_version: 2``
accelerate config) every fixed line is the rank's 1/N shard (weights, frozen ones too, trainable parameters,
gradients, optimizer state, the rule's buffers, the KL reference), plus what FSDP2 all-gathers unsharded: the
root (embeddings, the LM head when untied, final norm: kept from forward through backward) and two decoder
layers (one prefetched), and in full fine-tuning their unsharded gradients before the reduce-scatter. The
activations, scoring and sampling lines are one rank's, never divided. ``sharded=False`` (TRL's DDP) keeps
the whole state on each rank. accelerate's FSDP2 with mixed precision upcasts the trainable parameters to
float32 (``trainable_float32``).

**The TRL backend** (``backend="trl"``, TRL 1.16) scores with TRL's fused LM head
(``trl.kernels.chunked_logprob``: 4096-token x 32768-logit tiles; no ``[rows, T, V]`` logits are made):
the head lines count its tile, its float32 hidden-state gradient and, in full fine-tuning, its float32 head
gradient; the decoder layers' arithmetic is the native path's (measured there, not on TRL). TRL's HF
``generate`` takes a rank's whole generation batch at once (the native samplers take ``GENERATION_BATCH``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gxpo_lib.choices import VERSIONS
from gxpo_lib.config import GENERATION_BATCH, TrainConfig, resolve_config

logger = logging.getLogger(__name__)

GIB = 1024 ** 3
LOGIT_CHUNK_ELEMENTS = 1 << 26          # losses.LOGIT_CHUNK_ELEMENTS (not imported: this module is torch-free)
CONTEXT_BYTES = 1 * GIB                 # CUDA context and workspaces, outside max_memory_allocated
HEADROOM = 0.90                         # the peak may use at most this share of the budget
# GPU memory as torch.cuda reports it (GiB), roughly: what a run can have before vLLM takes its share.
GPUS = {"h100": 79.0, "h200": 139.0, "a100-80": 79.1, "a100-40": 39.4, "l4": 22.0}
# The GPU each shipped preset is written for (presets hold only TrainConfig settings, so it is named here).
PRESET_GPUS = {"paper-grpo": "h100", "paper-gxpo": "h100", "paper-sfpo": "h100", "gpu-workshop": "a100-40"}
# The longest prompt (chat template included) a batch is padded to, by training set: a judgement, not a
# measurement; `prompt_tokens=` overrides it.
PROMPT_TOKENS = {"arith": 64, "gsm8k": 256}
DEFAULT_PROMPT_TOKENS = 512
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
BACKENDS = ("gxpo", "trl")              # config.BACKENDS: the native trainer, TRL's GRPOTrainer
TRL_TILE = (4096, 32768)                # TRL 1.16's fused LM head: TOKEN_CHUNK_SIZE x its vocabulary chunk

# Measured activation constants (bytes per layer per fed token, see the docstring): (c_H, c_I) by
# (dtype bytes, LoRA).
LAYER_CONSTANTS = {(2, False): (24, 8), (2, True): (24, 8), (4, False): (40, 16), (4, True): (30, 12)}


@dataclass(frozen=True)
class ModelShape:
    """What the memory depends on, read from an HF ``config.json``."""

    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = True
    qkv_bias: bool = False
    dtype: str = "float32"        # the checkpoint's own dtype (config.json's torch_dtype / dtype)

    @property
    def parameters(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        layer = attention + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h

    def lora_parameters(self, rank: int, targets: tuple[str, ...]) -> int:
        """Adapter parameters: rank x (in + out) per adapted module and layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        sizes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                 "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        return self.layers * sum(rank * sum(sizes[t]) for t in targets if t in sizes)


def _shape(name, vocab, hidden, intermediate, layers, heads, kv_heads, head_dim=None, tied=True, qkv_bias=False,
           dtype="bfloat16") -> ModelShape:
    return ModelShape(name, vocab, hidden, intermediate, layers, heads, kv_heads, head_dim or hidden // heads,
                      tied, qkv_bias, dtype)


# Known hub models' shapes (their config.json), since nothing may be downloaded.
KNOWN_SHAPES = {s.name: s for s in (
    _shape("meta-llama/Llama-3.2-1B-Instruct", 128256, 2048, 8192, 16, 32, 8, 64),
    _shape("meta-llama/Llama-3.2-3B-Instruct", 128256, 3072, 8192, 28, 24, 8, 128),
    _shape("Qwen/Qwen2.5-0.5B-Instruct", 151936, 896, 4864, 24, 14, 2, 64, qkv_bias=True),
    _shape("Qwen/Qwen2.5-1.5B-Instruct", 151936, 1536, 8960, 28, 12, 2, 128, qkv_bias=True),
    _shape("Qwen/Qwen2.5-7B-Instruct", 152064, 3584, 18944, 28, 28, 4, 128, tied=False, qkv_bias=True),
    _shape("HuggingFaceTB/SmolLM2-135M-Instruct", 49152, 576, 1536, 30, 9, 3, 64),
)}
KNOWN_SHAPES["smollm2-135m"] = replace(KNOWN_SHAPES["HuggingFaceTB/SmolLM2-135M-Instruct"], name="smollm2-135m",
                                       dtype="float32")


def shape_from_config(values: dict[str, Any], name: str = "model") -> ModelShape:
    """A `ModelShape` from the dict of an HF ``config.json`` (a Llama/Qwen2/Mistral-style decoder)."""
    heads = int(values["num_attention_heads"])
    return ModelShape(name, int(values["vocab_size"]), int(values["hidden_size"]), int(values["intermediate_size"]),
                      int(values["num_hidden_layers"]), heads, int(values.get("num_key_value_heads") or heads),
                      int(values.get("head_dim") or values["hidden_size"] // heads),
                      bool(values.get("tie_word_embeddings", False)),
                      bool(values.get("attention_bias", False) or values.get("model_type") == "qwen2"),
                      str(values.get("torch_dtype") or values.get("dtype") or "float32"))


def model_shape(model: str) -> ModelShape:
    """The shape of `model`: "tiny" (the shipped config), a local folder's config.json, or `KNOWN_SHAPES`.

    Raises ValueError naming ``model`` for anything else (nothing is downloaded)."""
    if model == "tiny":
        from gxpo_lib.paths import shipped

        folder = shipped("models", "tiny-llama-arith")
        return shape_from_config(json.loads((folder / "config.json").read_text()), "tiny")
    if model in KNOWN_SHAPES:
        return KNOWN_SHAPES[model]
    path = Path(model).expanduser() / "config.json"
    if path.is_file():
        return shape_from_config(json.loads(path.read_text()), model)
    raise ValueError(f"model={model!r} has no known shape: give a local folder holding its config.json, or one "
                     f"of {sorted(KNOWN_SHAPES)} or 'tiny' (the preflight downloads nothing)")


def gpu_bytes(gpu: str | float) -> tuple[str, int]:
    """(label, bytes) of a GPU name in `GPUS` or a size in GiB."""
    if isinstance(gpu, str) and gpu.lower() in GPUS:
        return gpu.lower(), int(GPUS[gpu.lower()] * GIB)
    try:
        size = float(gpu)
    except (TypeError, ValueError):
        size = float("nan")
    if not size > 0 or math.isinf(size):
        raise ValueError(f"gpu={gpu!r} is invalid: allowed one of {sorted(GPUS)} or a size in GiB")
    return f"{size:g} GiB", int(size * GIB)


# -- The arithmetic ---------------------------------------------------------------------------------
def layer_bytes_per_token(shape: ModelShape, e: int, fed: int, lora_rank: int | None, adapted: int) -> int:
    """Saved bytes of one decoder layer per fed token, without checkpointing (the measured constant);
    `adapted` > 4 means LoRA on the MLP too, which saves what full fine-tuning does."""
    c_h, c_i = LAYER_CONSTANTS[(2 if e <= 2 else 4, lora_rank is not None and adapted <= 4)]
    lora = 2 * e * lora_rank * adapted if lora_rank else 0      # the adapters' rank-r activations
    return c_h * shape.hidden + c_i * shape.intermediate + 4 * shape.heads + e * fed + lora


def saved_bytes_per_row(shape: ModelShape, fed: int, completion: int, e: int, checkpointing: bool,
                        lora_rank: int | None = None, adapted: int = 0) -> int:
    """Bytes autograd saves for one row of `losses.policy_token_logprobs` (fed = P + T - 1 tokens, T completion
    tokens); `lora_rank` None means full fine-tuning, `adapted` the adapted modules per layer."""
    h = shape.hidden
    if checkpointing:
        layers = shape.layers * e * h * fed
    else:
        layers = shape.layers * fed * layer_bytes_per_token(shape, e, fed, lora_rank, adapted)
    outer = fed * (4 * h + 4) + completion * (e * h + 8) + 8 * (fed + 1)
    if lora_rank is None:
        outer += fed * (e * h + 8)
    return layers + outer


@dataclass
class Line:
    what: str
    arithmetic: str
    bytes: int


@dataclass
class Estimate:
    """The preflight's arithmetic for one config on one GPU (bytes)."""

    config: TrainConfig
    shape: ModelShape
    gpu: str
    gpu_total: int
    micro_batch_size: int
    prompt_tokens: int
    fixed: list[Line] = field(default_factory=list)
    phases: dict[str, list[Line]] = field(default_factory=dict)
    rollout_share: int = 0
    rows: int = 0                 # one rank's rows of a mini-batch (the micro-batch divides them)
    world_size: int = 1
    sharded: bool = False         # FSDP2: the fixed lines are one rank's shard
    backend: str = "gxpo"
    notes: list[str] = field(default_factory=list)

    @property
    def fixed_bytes(self) -> int:
        return sum(line.bytes for line in self.fixed)

    def phase_bytes(self, name: str) -> int:
        return sum(line.bytes for line in self.phases[name])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def peak(self) -> int:
        """The estimated torch.cuda.max_memory_allocated of the run."""
        return self.fixed_bytes + self.phase_bytes(self.peak_phase)

    @property
    def budget(self) -> int:
        return self.gpu_total - self.rollout_share - CONTEXT_BYTES

    @property
    def fits(self) -> bool:
        return self.peak <= HEADROOM * self.budget


def check_world_size(world_size: Any, name: str = "world_size") -> int:
    """`world_size` as an int >= 1, else a ValueError naming `name`."""
    if isinstance(world_size, str):
        try:
            world_size = int(world_size.strip())
        except ValueError:
            pass
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{name}={world_size!r} is invalid: allowed an integer >= 1 (the number of GPUs, one "
                         "rank each)")
    return world_size


def _rows(config: TrainConfig, world_size: int = 1, backend: str = "gxpo") -> int:
    """One rank's rows of a mini-batch: the native trainer splits the prompts over the ranks (whole groups),
    TRL the completions; ValueError naming batch_prompts when they do not divide."""
    completions = config.batch_prompts * config.group_size
    if world_size > 1 and backend == "gxpo" and config.batch_prompts % world_size:
        raise ValueError(f"batch_prompts={config.batch_prompts} is invalid with world_size {world_size}: allowed a "
                         f"multiple of {world_size}, so each rank samples whole groups of as many prompts")
    if world_size > 1 and completions % world_size:
        raise ValueError(f"batch_prompts={config.batch_prompts} is invalid with world_size {world_size}: "
                         f"batch_prompts * group_size = {completions} completions must divide by {world_size}")
    return completions // world_size // config.mini_batches


def estimate(config: TrainConfig, gpu: str | float = "h100", *, micro_batch_size: int | None = None,
             prompt_tokens: int | None = None, shape: ModelShape | None = None, world_size: int = 1,
             sharded: bool | None = None, backend: str = "gxpo", trainable_float32: bool = False) -> Estimate:
    """The line-by-line estimate of `config`'s peak GPU memory on `gpu` (see the module docstring): per GPU of
    `world_size` ranks, the fixed state sharded over them when `sharded` (None: FSDP2 whenever world_size > 1),
    as `backend` ("gxpo" or "trl") computes it; `trainable_float32` keeps the trainable parameters in float32
    (accelerate's FSDP2 under mixed precision)."""
    label, total = gpu_bytes(gpu)
    world = check_world_size(world_size)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: allowed one of {list(BACKENDS)}")
    sharded = world > 1 if sharded is None else bool(sharded) and world > 1
    shape = shape or model_shape(config.model)
    dtype = config.dtype or ("bfloat16" if shape.dtype in ("bfloat16", "float16") else "float32")
    e = DTYPE_BYTES.get(dtype, 4)
    rows = _rows(config, world, backend)
    b = micro_batch_size or config.micro_batch_size or rows
    b = min(b, rows)
    p = prompt_tokens or PROMPT_TOKENS.get(config.train_set, DEFAULT_PROMPT_TOKENS)
    t = config.max_new_tokens
    f = p + t - 1
    n = shape.parameters
    lora = config.lora
    adapted = sum(1 for name in config.lora_targets if name in ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"))
    trainable = shape.lora_parameters(config.lora_rank, config.lora_targets) if lora else n
    te = 4 if lora or trainable_float32 else e   # peft keeps adapters in float32 (accelerate's FSDP2 upcast too)
    we = max(te, 4)                                # GXPO's g0, g1: at least float32
    what = f"LoRA r={config.lora_rank} on {adapted} modules" if lora else "full fine-tuning"
    est = Estimate(config, shape, label, total, b, p, rows=rows, world_size=world, sharded=sharded, backend=backend)
    fixed = est.fixed
    if lora:   # the frozen weights, then the adapters
        fixed.append(Line(f"weights, {dtype}", f"{n / 1e9:.3f} B params x {e} B", n * e))
        fixed.append(Line(f"trainable ({what}), float32", f"{trainable / 1e6:.2f} M x {te} B", trainable * te))
    else:      # full fine-tuning: the weights are the trainable parameters (one copy)
        fixed.append(Line(f"weights = trainable ({what}), {'float32' if te == 4 else dtype}",
                          f"{n / 1e9:.3f} B params x {te} B", n * te))
    fixed.append(Line("their gradients", f"{trainable / 1e6:.2f} M x {te} B", trainable * te))
    moments = 2 if config.optimizer == "adamw" else (1 if config.momentum > 0 else 0)
    if moments:
        fixed.append(Line(f"{config.optimizer} state", f"{moments} x {trainable / 1e6:.2f} M x {te} B",
                          moments * trainable * te))
    if config.algorithm == "gxpo":
        fixed.append(Line("GXPO theta0 + g0, g1", f"{trainable / 1e6:.2f} M x ({te} + 2 x {we}) B",
                          trainable * (te + 2 * we)))
        if VERSIONS.get(config.version, {}).get("optimizer_state") == "transactional":
            fixed.append(Line("transactional optimizer snapshot", f"{moments} x {trainable / 1e6:.2f} M x {te} B",
                              moments * trainable * te))
    elif config.algorithm == "sfpo":
        fixed.append(Line("SFPO theta0", f"{trainable / 1e6:.2f} M x {te} B", trainable * te))
    if config.kl_beta > 0 and not lora:
        fixed.append(Line("frozen KL reference copy", f"{n / 1e9:.3f} B x {e} B", n * e))

    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    root = v * h * (1 if shape.tied else 2) + h             # FSDP2's root: embeddings (+ untied head), final norm
    layer_params = (n - root) // shape.layers
    if sharded:   # each rank keeps 1/N of every line above; FSDP2 gathers the root and two layers unsharded
        est.fixed = fixed = [Line(line.what, f"{line.arithmetic} / {world} ranks", -(-line.bytes // world))
                             for line in fixed]
        fixed.append(Line("FSDP2 all-gathered root + 2 layers",
                          f"({root / 1e6:.1f} M root + 2 x {layer_params / 1e6:.1f} M layer) x {e} B",
                          (root + 2 * layer_params) * e))
        est.notes.append(f"FSDP2 over {world} ranks: each fixed line is one rank's 1/{world} shard (weights, frozen "
                         "ones too, trainable parameters, gradients, optimizer state, the rule's buffers, the KL "
                         "reference) except the all-gathered root and layers; the micro-batch, scoring and "
                         f"sampling lines are one rank's ({rows} rows of a mini-batch), not divided")
    elif world > 1:
        est.notes.append(f"{world} ranks, replicated (DDP): nothing is sharded; each rank samples, scores and "
                         f"trains on 1/{world} of the rows ({rows} rows of a mini-batch)")

    # The training micro-batch.
    gc = config.gradient_checkpointing
    per_row = saved_bytes_per_row(shape, f, t, e, gc, config.lora_rank if lora else None, adapted if lora else 0)
    layer = layer_bytes_per_token(shape, e, f, config.lora_rank if lora else None, adapted if lora else 0)
    chunk = min(b * t, max(1, LOGIT_CHUNK_ELEMENTS // v)) * v
    tile = min(b * t, TRL_TILE[0]) * min(v, TRL_TILE[1])
    grad_work = b * f * e * (2 * i + 4 * h)
    recompute = b * f * layer if gc else 0
    if backend == "trl":      # TRL's fused head: one tile, float32 grad of the hidden states (and of the head)
        head = tile * e + b * t * h * 4 + (v * h * (4 + e) if not lora else 0)
        head_text = (f"head (TRL fused): {tile / 2**20:.0f} Mi logits x {e} B + fp32 grad hidden"
                     + ("" if lora else " + fp32 head grad and its cast"))
        est.notes.append(f"backend trl: TRL 1.16 scores with its fused LM head ({TRL_TILE[0]} x {TRL_TILE[1]} "
                         "logit tiles, no [rows, T, V] logits), counted as such; the decoder layers' arithmetic "
                         "is the native path's (measured there, not on TRL); TRL's HF generate takes a rank's "
                         "whole generation batch at once")
    else:
        head = chunk * (2 * e + 16) + b * t * h * e + (v * h * 4 if not lora else 0)
        head_text = (f"head: {chunk / 2**20:.0f} Mi logits x {2 * e + 16} B + grad hidden"
                     + ("" if lora else " + fp32 head grad"))
    train = [
        Line("saved activations" + (" (checkpointed)" if gc else ""),
             f"{b} rows x {per_row / 2**20:.2f} MiB (P+T-1 = {f}: "
             + (f"{shape.layers} layers x {e} B x H {h} x f + head" if gc else
                f"{shape.layers} layers x f x {layer} B + head") + ")", b * per_row),
        Line("attention mask (bool)", f"{b} x {f + 1}^2 x 1 B", b * (f + 1) ** 2),
        Line("backward transient: max(layer, LM head)",
             f"layer: {b} x {f} x ({layer if gc else 0} + {e} x (2 I + 4 H)) B; {head_text}",
             max(recompute + grad_work, head)),
        Line("loss vectors", f"{b} x {t} x 64 B", b * t * 64),
    ]
    if sharded and not lora:
        train.append(Line("FSDP2 unsharded gradients (root + 1 layer)", f"({root / 1e6:.1f} M + "
                          f"{layer_params / 1e6:.1f} M) x {e} B, before the reduce-scatter", (root + layer_params) * e))
    est.phases["train micro-batch"] = train
    if backend == "trl":
        head_line = Line("hidden states at T + head tile", f"{b} x {t} x {h} x {e} B + {tile / 2**20:.0f} Mi x {e} B "
                         f"+ {b} x {t} x 28 B", b * t * h * e + tile * e + b * t * 28)
    else:
        head_line = Line("hidden states at T + head chunk", f"{b} x {t} x {h} x {e} B + {chunk / 2**20:.0f} Mi x "
                         f"{e + 12} B", b * t * h * e + chunk * (e + 12))
    scoring = [
        Line("no-grad layer working set", f"{b} x {f} x ({e} x (3 I + 4 H) + 4 H) B",
             b * f * (e * (3 * i + 4 * h) + 4 * h)),
        Line("mask, bool and per-layer copy", f"{b} x {f + 1}^2 x (1 + {e}) B", b * (f + 1) ** 2 * (1 + e)),
        head_line,
    ]
    est.phases["old/ref log-prob scoring"] = scoring
    if config.rollout_backend == "vllm":
        est.rollout_share = int(config.vllm_gpu_memory * total)
    else:
        generated = config.batch_prompts * config.group_size // world      # one rank's rows of a step
        g = generated if backend == "trl" else min(GENERATION_BATCH, generated)
        kv = g * (p + t) * shape.layers * 2 * shape.kv_heads * shape.head_dim * e
        est.phases["HF sampling"] = [
            Line("KV cache", f"{g} rows x {p + t} x {shape.layers} layers x 2 x {shape.kv_heads * shape.head_dim} "
                             f"x {e} B", kv),
            Line("last-position logits", f"{g} x {v} x 4 B x 3", g * v * 12)]
    step = -(-trainable * we // world) if sharded else trainable * we
    est.phases["optimizer step"] = [Line("foreach temporary", f"{trainable / 1e6:.2f} M x {we} B"
                                         + (f" / {world} ranks" if sharded else ""), step)]
    return est


def format_estimate(est: Estimate) -> str:
    """The estimate, line by line."""
    c, shape = est.config, est.shape
    out = [(f"preflight: {c.algorithm} on {shape.name} ({shape.parameters / 1e9:.3f} B params, H {shape.hidden}, "
            f"I {shape.intermediate}, {shape.layers} layers, V {shape.vocab}), "
            f"micro_batch_size {est.micro_batch_size}, "
            f"P {est.prompt_tokens} + T {c.max_new_tokens}, gradient_checkpointing {c.gradient_checkpointing}, "
            f"GPU {est.gpu}"
            + (f", backend {est.backend}" if est.backend != "gxpo" else "")
            + (f", world_size {est.world_size} ({'FSDP2' if est.sharded else 'replicated'})"
               if est.world_size > 1 else ""))]
    out += [f"  note: {note}" for note in est.notes]
    row = "  {:<44} {:>10}  {}"
    groups = {"fixed": (est.fixed, est.fixed_bytes), **{n: (v, est.phase_bytes(n)) for n, v in est.phases.items()}}
    for name, (lines, total) in groups.items():
        out.append(f"  {name}:" + ("   <- the peak" if name == est.peak_phase else ""))
        out += [row.format(line.what, _gib(line.bytes), line.arithmetic) for line in lines]
        out.append(row.format("= " + name, _gib(total), ""))
    share = (f"- vLLM {c.vllm_gpu_memory:g} x {est.gpu_total / GIB:.1f} GiB " if est.rollout_share else "")
    out.append(f"  peak = fixed + {est.peak_phase} = {_gib(est.peak)}; budget = {est.gpu_total / GIB:.1f} GiB "
               f"{share}- 1 GiB context = {_gib(est.budget)}; {est.peak / est.budget:.0%} of it -> "
               + ("fits (<= 90%)" if est.fits else "DOES NOT FIT (> 90%)"))
    return "\n".join(out)


def _gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def _divisors(rows: int) -> list[int]:
    return [d for d in range(rows, 0, -1) if rows % d == 0]


def preflight(config: TrainConfig, gpu: str | float = "h100", *, fit: bool = False, prompt_tokens: int | None = None,
              shape: ModelShape | None = None, echo: bool = False, world_size: int = 1, sharded: bool | None = None,
              backend: str = "gxpo", trainable_float32: bool = False, announce: bool = True):
    """Check that `config` fits `gpu` (each of `world_size` ranks, see `estimate`). Returns the `Estimate`; with
    ``fit=True`` returns ``(config, estimate)``, `config` with micro_batch_size lowered to the largest divisor of
    a rank's mini-batch rows that fits (printed unless ``announce=False``). Raises ValueError when it does not
    fit, naming micro_batch_size (and what would fit) when a smaller micro-batch fits, else the setting that can
    fix it (`_no_fit_message`)."""
    layout = dict(prompt_tokens=prompt_tokens, shape=shape, world_size=world_size, sharded=sharded, backend=backend,
                  trainable_float32=trainable_float32)
    est = estimate(config, gpu, **layout)
    if echo:
        print(format_estimate(est), flush=True)
    if est.fits:
        return (config, est) if fit else est
    rows = est.rows
    fitting = next((d for d in _divisors(rows) if d < est.micro_batch_size and estimate(
        config, gpu, micro_batch_size=d, **layout).fits), None)
    whose = "the mini-batch's" if est.world_size == 1 else "one rank's"
    if fit and fitting is not None:
        lowered = replace(config, micro_batch_size=fitting)
        est = estimate(lowered, gpu, **layout)
        message = (f"preflight: micro_batch_size lowered from {config.micro_batch_size} to {fitting} (the largest "
                   f"divisor of {rows if est.world_size == 1 else whose + f' {rows} rows'} that fits {est.gpu}: "
                   f"{_gib(est.peak)} of {_gib(est.budget)})")
        if announce:
            print(message, flush=True)
        if echo:
            print(format_estimate(est), flush=True)
        return lowered, est
    if fitting is None:
        raise ValueError(_no_fit_message(config, gpu, layout))
    raise ValueError(f"micro_batch_size={est.micro_batch_size} is invalid on {est.gpu}: the estimated peak "
                     f"{_gib(est.peak)} exceeds 90% of the {_gib(est.budget)} budget; allowed {fitting} or less "
                     f"(the largest divisor of {whose} {rows} rows that fits)")


def _no_fit_message(config: TrainConfig, gpu: str | float, layout: dict[str, Any]) -> str:
    """Why no micro_batch_size fits, naming the setting that can fix it: the fixed state (more GPUs to shard it,
    LoRA), HF sampling's KV cache (rollout_backend), or one row's activations (gradient_checkpointing,
    max_new_tokens)."""
    one = estimate(config, gpu, micro_batch_size=1, **layout)
    world, limit = one.world_size, HEADROOM * one.budget
    where = f"on {one.gpu}" + (f" with world_size {world}" if world > 1 else "")
    fixed = f"the fixed state {_gib(one.fixed_bytes)} per GPU"
    if one.fixed_bytes > limit:
        more = None   # the fewest FSDP2 ranks whose shards fit (replicated ranks: FSDP2 over as many counts)
        for size in range(world if one.world_size > 1 and not one.sharded else world + 1, 65):
            try:
                bigger = estimate(config, gpu, micro_batch_size=1, **(layout | {"world_size": size, "sharded": True}))
            except ValueError:   # batch_prompts does not divide over `size` ranks
                continue
            if bigger.fits:
                more = size
                break
        shard = f"world_size >= {more} with FSDP2 sharding the fixed state (torchrun; TRL: accelerate_config='fsdp2')"
        options = ([shard] if more else []) + (["lora=True"] if not config.lora else []) + (
            [f"a smaller vllm_gpu_memory than {config.vllm_gpu_memory:g}"] if one.rollout_share else []) + [
            "a larger GPU"]
        if more:
            head = f"world_size={world}{' without FSDP2' if one.world_size > 1 and not one.sharded else ''} is invalid"
            where = f"on {one.gpu}"
        else:
            head = f"model={config.model!r} does not fit"
        return (f"{head} {where}: {fixed} (weights, gradients, optimizer state, the rule's buffers) exceeds 90% of "
                f"the {_gib(one.budget)} budget before any activation, so no micro_batch_size fits and gradient "
                f"checkpointing cannot help; allowed: {', '.join(options)}")
    if one.peak_phase == "HF sampling":
        rows = one.phases["HF sampling"][0].arithmetic.split(" rows")[0]
        return (f"rollout_backend={config.rollout_backend!r} is invalid {where}: HF sampling's KV cache of {rows} rows "
                f"({_gib(one.phase_bytes('HF sampling'))}) + {fixed} exceeds 90% of the {_gib(one.budget)} budget "
                "whatever micro_batch_size; allowed rollout_backend='vllm', more GPUs (each samples 1/N of the rows) "
                "or a shorter max_new_tokens")
    if not config.gradient_checkpointing:
        return (f"gradient_checkpointing=False is invalid {where}: even micro_batch_size=1 peaks at "
                f"{_gib(one.peak)} ({one.peak_phase}), over 90% of the {_gib(one.budget)} budget; allowed "
                "gradient_checkpointing=True (or a shorter max_new_tokens, a larger GPU)")
    return (f"max_new_tokens={config.max_new_tokens} is invalid {where}: even micro_batch_size=1 with gradient "
            f"checkpointing peaks at {_gib(one.peak)} ({one.peak_phase}), over 90% of the {_gib(one.budget)} "
            "budget; allowed a shorter max_new_tokens, "
            + (f"a smaller vllm_gpu_memory than {config.vllm_gpu_memory:g}, " if one.rollout_share else "")
            + ("lora=True, " if not config.lora else "") + "or a larger GPU")


def world_size_from_env() -> int:
    """WORLD_SIZE of a torchrun launch (1 when unset); ValueError naming WORLD_SIZE when it is not an int >= 1."""
    return check_world_size(os.environ.get("WORLD_SIZE", "1") or "1", "WORLD_SIZE")


def cuda_memory_gib(device: int = 0, isolated: bool = False) -> float:
    """Total memory (GiB, torch's count) of CUDA device `device`; `isolated` asks a child process, so this one
    never initialises CUDA (the TRL backend's parent process, whose GPUs belong to the ranks it launches)."""
    if isolated:
        code = f"import torch; print(torch.cuda.get_device_properties({int(device)}).total_memory)"
        try:
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                                  check=True)
            return int(done.stdout.strip().splitlines()[-1]) / GIB
        except (OSError, ValueError, IndexError, subprocess.SubprocessError) as error:
            logger.info("preflight: the GPU's memory from a child process failed (%s); asking here", error)
    import torch

    return torch.cuda.get_device_properties(device).total_memory / GIB


def check_before_run(config: TrainConfig, preset: str | None = None, *, fit: bool = False, backend: str = "gxpo",
                     world_size: int | None = None, sharded: bool | None = None, trainable_float32: bool = False,
                     gpu: str | float | None = None) -> TrainConfig:
    """The check `gxpo_lib.run` makes before loading anything, for either backend: on a CUDA machine against
    its GPU, or against the GPU a preset is written for (`PRESET_GPUS`), or `gpu`; on a CPU otherwise it only
    reports (logging). `world_size` None reads WORLD_SIZE (torchrun; the native trainer shards with FSDP2
    there). Returns `config`, with micro_batch_size lowered to what fits when `fit` (logged)."""
    import torch

    world = world_size_from_env() if world_size is None else check_world_size(world_size)
    if gpu is None and torch.cuda.is_available():
        local = os.environ.get("LOCAL_RANK", "0") if backend == "gxpo" else "0"   # torchrun: this rank's GPU
        device = int(local) if local.isdigit() and int(local) < torch.cuda.device_count() else 0
        gpu = cuda_memory_gib(device, isolated=backend == "trl")
    elif gpu is None and preset in PRESET_GPUS:
        gpu = PRESET_GPUS[preset]
    try:
        shape = model_shape(config.model)
    except ValueError as error:
        logger.info("preflight skipped: %s", error)
        return config
    layout = dict(shape=shape, world_size=world, sharded=sharded, backend=backend, trainable_float32=trainable_float32)
    if gpu is None:
        try:
            est = estimate(config, "l4", **layout)
        except ValueError as error:
            logger.info("preflight (report only, CPU) skipped: %s", error)
            return config
        logger.info("preflight (report only, CPU): estimated GPU peak %s", _gib(est.peak))
        return config
    result = preflight(config, gpu, fit=fit, announce=False, **layout)
    if not fit:
        return config
    lowered, est = result
    if lowered.micro_batch_size != config.micro_batch_size:
        logger.warning("preflight: micro_batch_size lowered from %s to %s to fit %s (estimated peak %s of %s)",
                       config.micro_batch_size, lowered.micro_batch_size, est.gpu, _gib(est.peak), _gib(est.budget))
    else:
        logger.info("preflight: micro_batch_size %s fits %s (estimated peak %s of %s)", config.micro_batch_size,
                    est.gpu, _gib(est.peak), _gib(est.budget))
    return lowered


def main(argv: list[str] | None = None) -> int:
    """``python -m gxpo_lib preflight --preset P [-s NAME=VALUE ...] [--gpu G] [--fit] [--prompt-tokens N]
    [--world-size N [--replicated]] [--backend gxpo|trl]``."""
    from gxpo_lib.config import parse_settings

    parser = argparse.ArgumentParser(prog="python -m gxpo_lib preflight", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None)
    parser.add_argument("-s", "--set", dest="settings", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--gpu", default=None, help=f"one of {sorted(GPUS)} or a size in GiB (default: the "
                        "preset's GPU, else this machine's CUDA device)")
    parser.add_argument("--fit", action="store_true", help="lower micro_batch_size to the largest divisor that fits")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="the prompt cap P (default: by train_set)")
    parser.add_argument("--world-size", default="1", help="GPUs of the run, one rank each (default 1): FSDP2 "
                        "shards the fixed state over them, each rank takes 1/N of the rows")
    parser.add_argument("--replicated", action="store_true", help="with --world-size: every rank holds the whole "
                        "state (DDP, TRL's multi_gpu) instead of an FSDP2 shard")
    parser.add_argument("--backend", default="gxpo", help="gxpo (the native trainer) or trl (TRL's fused head and "
                        "generation batch)")
    parser.add_argument("--float32-master", action="store_true", help="trainable parameters in float32 (accelerate's "
                        "FSDP2 with mixed_precision bf16 upcasts them)")
    args = parser.parse_args(argv)
    try:
        world = check_world_size(args.world_size)
        config = resolve_config(args.preset, parse_settings(args.settings))
        gpu = args.gpu or PRESET_GPUS.get(args.preset or "")
        if gpu is None:
            import torch

            if not torch.cuda.is_available():
                raise ValueError("gpu=None is invalid here: no CUDA device and the preset names no GPU; give --gpu")
            gpu = torch.cuda.get_device_properties(0).total_memory / GIB
        result = preflight(config, gpu, fit=args.fit, prompt_tokens=args.prompt_tokens, echo=True, world_size=world,
                           sharded=False if args.replicated else None, backend=args.backend,
                           trainable_float32=args.float32_master)
    except ValueError as error:
        print(f"preflight: {error}", flush=True)
        return 1
    est = result[1] if args.fit else result
    return 0 if est.fits else 1


def measure_saved_bytes(model, rows: int, prompt: int, completion: int, seed: int = 0) -> int:
    """Bytes autograd saves for `rows` rows of `losses.policy_token_logprobs` with the entropy (prompt + completion
    tokens, two left-padding columns), each storage once, the model's parameters excluded (torch needed)."""
    import torch

    from gxpo_lib.core.losses import policy_token_logprobs

    generator = torch.Generator().manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (rows, prompt + completion), generator=generator)
    mask = torch.ones_like(ids)
    mask[:, :min(2, prompt - 1)] = 0
    device = model.get_input_embeddings().weight.device
    ids, mask = ids.to(device), mask.to(device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    positions = torch.arange(rows * completion, device=device)   # as the objective passes its active tokens
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = policy_token_logprobs(model, ids, mask, prompt, with_entropy=True, token_positions=positions)
    del out
    return sum(storages.values())
