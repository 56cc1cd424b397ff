"""A lean CPU sampler for small Llama models: a compact KV-cache decode loop behind the `Sampler` protocol.

`HFSampler` spends most of its time in per-step overhead on small models: the HF Llama forward costs about
8x its arithmetic on the tiny model, and a second, teacher-forced forward computes the old log-probs.
`LeanSampler` returns the same `Rollouts` (same fields, shapes, dtypes, left padding, EOS stop, pad after
EOS, ``max_new_tokens``) from a decode loop written for the Llama architecture alone:

* the weights are read from the HF module each ``sample`` call (LoRA deltas merged into a private copy;
  the trained model is never touched), with q/k/v and gate/up fused into one matrix each;
* a preallocated KV cache of ``prompt + max_new_tokens - 1`` positions per row, the keys stored
  transposed so each decode step's attention is one ``baddbmm`` (scores plus the padding bias), a
  softmax and one ``bmm``; the padding bias is built once per batch, never per step;
* each prompt is run through the model once per batch (prefill), not once per completion of its group;
  rows that have ended are dropped from the computation as the batch thins out;
* the old log-probs and entropies are taken from the very logits each token was sampled from, so no
  second forward runs. They equal a teacher-forced forward of the HF model (``completion_logprobs``) in
  float64 to ``allclose(atol=1e-5, rtol=1e-5)`` (the tests' check; largest gap seen 8e-6 over 11k tokens).
  Against HF's fp32 forward the gap is fp32 rounding on both sides, up to 2.5e-5 seen (SmolLM2 2.1e-5;
  its float64 check holds too): HF's fp32 forward is itself up to 1.4e-5 from float64, and HF's own
  KV-cache decode differs from its teacher forcing by up to 1.6e-5;
* temperature and top-p are HF's warpers (divide, then HF's nucleus rule); each row's token inverts its
  CDF at one uniform number from a generator seeded by ``seed`` (one number per row and step, where
  ``torch.multinomial`` draws one per vocabulary entry): the same seed gives the same rollouts.

Not used: ``torch.compile`` of the decode step: it recompiles for each cache index up to dynamo's limit,
and its compile time is not repaid within a run (timings: docs/machine-notes.md).

Supported: ``LlamaForCausalLM`` (RMSNorm, SwiGLU, GQA, RoPE incl. llama3 scaling, tied or untied
embeddings, no biases), bare or wrapped in a peft LoRA ``PeftModel`` (plain LoRA on linear layers).
Anything else raises `UnsupportedModelError` in the constructor; ``supports(model)`` asks first, so a caller
can fall back to `HFSampler`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gxpo_lib.rl.sampling import Rollouts, check_sampling, completion_mask, pad_right
from gxpo_lib.validation import check_int

# RoPE types whose cos/sin depend on the position alone (a table computed once per call is exact).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


class UnsupportedModelError(ValueError):
    """The model is not a plain (or LoRA-wrapped) Llama that `LeanSampler` can run; use `HFSampler`."""


# -- Which models: a Llama, bare or under plain LoRA -------------------------------------------------
def _llama(model):
    """The ``LlamaForCausalLM`` inside ``model`` (itself, or the base model of a peft ``PeftModel``)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def _linear_problem(module, name: str) -> str | None:
    """Why ``module`` is not a bias-free ``nn.Linear`` or plain LoRA around one (None: it is fine)."""
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer):
        base = module.get_base_layer()
        if type(base) is not torch.nn.Linear or base.bias is not None:
            return f"{name}: LoRA around {type(base).__name__} (with bias: {base.bias is not None})"
        if any(module.lora_variant.values()) or any(module.lora_bias.values()):
            return f"{name}: a LoRA variant (DoRA or similar) or a LoRA bias"
        if module.disable_adapters and module.merged:
            return f"{name}: adapters disabled while merged"
        return None
    if type(module) is not torch.nn.Linear or module.bias is not None:
        return f"{name}: {type(module).__name__} (with bias: {getattr(module, 'bias', None) is not None})"
    return None


def unsupported_reason(model) -> str | None:
    """Why `LeanSampler` cannot run ``model``, or None when it can."""
    if hasattr(model, "peft_config"):
        types = {str(getattr(c, "peft_type", "")).split(".")[-1] for c in model.peft_config.values()}
        if types != {"LORA"}:
            return f"peft adapter types {sorted(types)}: only plain LoRA is supported"
    llama = _llama(model)
    config = getattr(llama, "config", None)
    if type(llama).__name__ != "LlamaForCausalLM" or getattr(config, "model_type", None) != "llama":
        return f"{type(llama).__name__}: only LlamaForCausalLM is supported"
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default"}
    if rope.get("rope_type", "default") not in STATIC_ROPE_TYPES:
        return f"rope_type={rope.get('rope_type')!r}: supported {STATIC_ROPE_TYPES}"
    if config.hidden_act != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return f"hidden_act={config.hidden_act!r}, pretraining_tp={getattr(config, 'pretraining_tp', 1)}"
    if type(llama.model.embed_tokens) is not torch.nn.Embedding:
        return f"embed_tokens: {type(llama.model.embed_tokens).__name__} (LoRA on embeddings is not supported)"
    modules = [(f"layers.{i}.self_attn.{n}", getattr(layer.self_attn, n)) for i, layer in
               enumerate(llama.model.layers) for n in _ATTENTION]
    modules += [(f"layers.{i}.mlp.{n}", getattr(layer.mlp, n)) for i, layer in
                enumerate(llama.model.layers) for n in _MLP]
    for name, module in modules + [("lm_head", llama.lm_head)]:
        problem = _linear_problem(module, name)
        if problem is not None:
            return problem
    return None


def supports(model) -> bool:
    """True when `LeanSampler` can run ``model`` (a Llama, bare or under plain LoRA); else use `HFSampler`."""
    return unsupported_reason(model) is None


def _weight(module) -> torch.Tensor:
    """The effective ``[out, in]`` weight of a linear layer: base weight plus the active LoRA deltas.

    Returns the module's own tensor when nothing is to be merged (it is only read), else a new tensor in
    the base weight's dtype. peft keeps the adapters of a bfloat16 / float16 base in float32 (its
    ``autocast_adapter_dtype``), so the sum is taken in float32 and rounded once to the base dtype (the
    activations' dtype: a float32 merge would break every matmul of the layer).
    """
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer):
        return module.weight
    weight = module.get_base_layer().weight
    if module.disable_adapters or module.merged:  # merged: the deltas are in the base weight already
        return weight
    deltas = [module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A]
    return (weight + sum(deltas)).to(weight.dtype) if deltas else weight


# -- The compact forward: weights snapshot, prefill, one decode step ---------------------------------
@dataclass
class _Layer:
    """One decoder layer's weights, fused and laid out for the decode step (D: hidden size, I: MLP size)."""

    qkv: torch.Tensor       # [(H + 2 Hkv) * hd, D]: q, k, v projections stacked, input norm folded in
    o_t: torch.Tensor       # [H * hd, D]: o_proj transposed (a view), for addmm
    gate_up: torch.Tensor   # [2 I, D]: gate then up, post-attention norm folded in
    down_t: torch.Tensor    # [I, D]: down_proj transposed (a view), for addmm


class _LlamaDecoder:
    """The Llama forward for sampling: a prefill over left-padded prompts, then one token per row per step.

    Built from a snapshot of the model's weights (LoRA merged); each RMSNorm's weight is folded into the
    columns of the matrix that reads its output (W @ (w * x) == (W * w) @ x). Shapes: B rows, P prompt length,
    L cache length (P + max_new_tokens - 1), H / Hkv query / key-value heads of size hd, V vocabulary.

    Dtypes: the embedding's dtype (the model's: float32, bfloat16 or float16) is the compute dtype; every
    matrix, the RoPE table and the KV cache hold it, as HF's forward does. As in HF, the RMSNorm statistics
    and the decode step's attention softmax are taken in float32 and the logits are returned in float32.
    """

    def __init__(self, llama, max_positions: int):
        config = llama.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.scale = self.head_dim ** -0.5
        core = llama.model
        self.embed = core.embed_tokens.weight
        dtype = self.dtype = self.embed.dtype  # the activations' dtype; `.to(dtype)` is a no-op when equal
        self.eps_tensor = torch.tensor(config.rms_norm_eps, dtype=torch.float32, device=self.embed.device)
        self.lm_head = (_weight(llama.lm_head) * core.norm.weight).to(dtype)
        self.layers = []
        for layer in core.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                torch.cat([_weight(attn.q_proj), _weight(attn.k_proj), _weight(attn.v_proj)])
                .mul_(layer.input_layernorm.weight).to(dtype),
                _weight(attn.o_proj).to(dtype).t(),
                torch.cat([_weight(mlp.gate_proj), _weight(mlp.up_proj)])
                .mul_(layer.post_attention_layernorm.weight).to(dtype),
                _weight(mlp.down_proj).to(dtype).t()))
        # RoPE table [max_positions, hd] from the model's own rotary module (exact: an outer product).
        positions = torch.arange(max_positions, device=self.embed.device)[None]
        cos, sin = core.rotary_emb(self.embed[:1], positions)
        half = self.head_dim // 2
        self.cos = cos[0]
        # rotate_half(x) * sin == roll(x, half) * [-sin_first_half, sin_second_half]
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)

    def new_cache(self, prefix: tuple[torch.Tensor, torch.Tensor], rows_of: torch.Tensor,
                  length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Preallocated cache for B rows, row r starting from prompt ``rows_of[r]``'s keys and values.

        ``prefix``: keys transposed [layers, n, Hkv, hd, P] and values [layers, n, Hkv, P, hd] of n prompts.
        Returns keys transposed [layers, B * Hkv, hd, L] and values [layers, B * Hkv, L, hd].
        """
        keys, values = prefix
        layers, _, kv, hd, prompt = keys.shape
        rows = rows_of.shape[0]
        keys_t = keys.new_empty(layers, rows, kv, hd, length)
        keys_t[..., :prompt] = keys[:, rows_of]
        cached_values = values.new_empty(layers, rows, kv, length, hd)
        cached_values[:, :, :, :prompt] = values[:, rows_of]
        return keys_t.view(layers, rows * kv, hd, length), cached_values.view(layers, rows * kv, length, hd)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., hd] rotated by cos/sin broadcast to it."""
        return torch.addcmul(x * cos, x.roll(self.head_dim // 2, dims=-1), sin)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight (folded into the next matrix), in float32 as HF computes it. [..., D].

        mean(x^2) + eps is taken as eps + |x|^2 / D from one vector norm (four kernels instead of seven).
        """
        x32 = x if x.dtype == torch.float32 else x.float()
        norm = torch.linalg.vector_norm(x32, dim=-1, keepdim=True)
        x32 = x32 * torch.rsqrt(torch.addcmul(self.eps_tensor, norm, norm, value=1 / self.hidden))
        return x32 if x.dtype == torch.float32 else x32.to(x.dtype)

    @staticmethod
    def _softmax(scores: torch.Tensor) -> torch.Tensor:
        """Softmax over the last dim, in float32 for a half-precision input (as HF's eager attention). [...]"""
        if scores.dtype == torch.float32:
            return scores.softmax(-1)
        return scores.softmax(-1, dtype=torch.float32).to(scores.dtype)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [B, D] -> [B, V] in float32."""
        return F.linear(self._norm(x), self.lm_head).float()

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run the prompts [n, P] (mask [n, P], left padding) through the model.

        Returns the logits [n, V] after each prompt's last token and the prompts' keys (rotated,
        transposed) [layers, n, Hkv, hd, P] and values [layers, n, Hkv, P, hd], for `new_cache`.
        """
        rows, length = ids.shape
        heads, kv, hd = self.heads, self.kv_heads, self.head_dim
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [n, 1, P, hd]
        # Causal and padding mask [n, 1, P, P]; a pad query sees itself only, so no row is all-masked.
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
        allowed = (causal & mask.bool()[:, None, :]) | torch.eye(length, dtype=torch.bool, device=ids.device)
        allowed = allowed[:, None]
        x = F.embedding(ids, self.embed)
        keys_t = x.new_empty(len(self.layers), rows, kv, hd, length)
        values = x.new_empty(len(self.layers), rows, kv, length, hd)
        for index, layer in enumerate(self.layers):
            # Attention over the prompt; its keys and values are kept for the cache.
            qkv = F.linear(self._norm(x), layer.qkv)
            q, k, v = qkv.view(rows, length, heads + 2 * kv, hd).transpose(1, 2).split([heads, kv, kv], dim=1)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            keys_t[index], values[index] = k.transpose(2, 3), v
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=kv != heads)
            x = x + F.linear(out.transpose(1, 2).reshape(rows, length, heads * hd), layer.o_t.t())
            # SwiGLU MLP.
            gate, up = F.linear(self._norm(x), layer.gate_up).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, layer.down_t.t())
        return self._logits(x[:, -1]), (keys_t, values)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor],
             index: int, key_bias: torch.Tensor) -> torch.Tensor:
        """One decode step: tokens [B] at RoPE positions [B] written to cache slot ``index``; logits [B, V].

        ``cache``: from `new_cache`; ``key_bias`` [B * Hkv, 1, L]: 0 on real keys, -inf on prompt padding.
        """
        rows, heads, kv, hd = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        span = index + 1
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [B, 1, hd]
        bias = key_bias[:, :, :span]
        x = F.embedding(tokens, self.embed)
        for layer, keys_t, values in zip(self.layers, *cache):
            # Attention of the new token over the cache: scores [B * Hkv, H / Hkv, span].
            qkv = F.linear(self._norm(x), layer.qkv)
            qk = self._rope(qkv[:, :(heads + kv) * hd].view(rows, heads + kv, hd), cos, sin)
            keys_t.view(rows, kv, hd, -1)[:, :, :, index] = qk[:, heads:]
            values.view(rows, kv, -1, hd)[:, :, index] = qkv[:, (heads + kv) * hd:].view(rows, kv, hd)
            q = qk[:, :heads].reshape(rows * kv, heads // kv, hd)
            scores = torch.baddbmm(bias, q, keys_t[:, :, :span], alpha=self.scale)
            out = torch.bmm(self._softmax(scores), values[:, :span]).view(rows, heads * hd)
            x = torch.addmm(x, out, layer.o_t)
            # SwiGLU MLP.
            gate, up = F.linear(self._norm(x), layer.gate_up).chunk(2, -1)
            x = torch.addmm(x, F.silu(gate) * up, layer.down_t)
        return self._logits(x)


# -- Token selection: HF's temperature and top-p warpers, an inverse-CDF draw, log-probs of what was drawn ---
def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF's ``TopPLogitsWarper`` (min_tokens_to_keep=1): tokens outside the nucleus set to -inf. [B, V]."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)
    remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def _draw(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator,
          score: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Sample one token per row from logits [B, V] (float32).

    The draw inverts each row's CDF at one uniform number (float64 cumulative sums, so every token keeps
    its probability; a zero-probability token is never drawn). Returns tokens [B] and, when ``score``,
    the log-prob of each token and the entropy [B] under the temperature-scaled distribution without the
    top-p cut (what ``completion_logprobs`` computes).
    """
    scaled = logits / temperature if temperature != 1.0 else logits
    logp = scaled.log_softmax(dim=-1) if score or top_p >= 1.0 else None
    probs = logp.exp() if top_p >= 1.0 else top_p_filter(scaled, top_p).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    uniform = torch.rand(cdf.shape[0], 1, dtype=cdf.dtype, device=cdf.device, generator=generator)
    tokens = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp_(max=cdf.shape[1] - 1).squeeze(1)
    if not score:
        return tokens, None, None
    entropy = -((probs if top_p >= 1.0 else logp.exp()) * logp).sum(-1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1), entropy


# -- The sampler -------------------------------------------------------------------------------------
class LeanSampler:
    """`HFSampler`'s drop-in for small Llama models: same settings, same `Rollouts`, several times faster.

    Args:
        model, tokenizer: a ``LlamaForCausalLM`` (bare, or a peft LoRA ``PeftModel``) and its tokenizer
            (pad token set). The model is only read: its weights are snapshotted at each ``sample`` call.
        format_prompt: maps a problem text to the prompt string (the chat template).
        max_new_tokens: completion length cap.
        temperature, top_p: sampling settings (top_k is off), as in `HFSampler`.
        batch_size: rows decoded together (bounds the KV cache: rows x (prompt + max_new_tokens)).
    Raises:
        UnsupportedModelError: the model is not one `supports` accepts (fall back to `HFSampler`).
    """

    def __init__(self, model, tokenizer, format_prompt, max_new_tokens: int = 32, temperature: float = 1.0,
                 top_p: float = 1.0, batch_size: int = 256):
        self.model, self.tokenizer, self.format_prompt = model, tokenizer, format_prompt
        self.max_new_tokens, self.temperature, self.top_p = check_sampling(max_new_tokens, temperature, top_p)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token: set tokenizer.pad_token (e.g. to the EOS token)")
        reason = unsupported_reason(model)
        if reason is not None:
            raise UnsupportedModelError(f"LeanSampler cannot run this model ({reason}); use HFSampler "
                                        f"(rollout_backend='hf')")

    @torch.no_grad()
    def sample(self, prompts: list[str], group_size: int, seed: int, score_policy: bool = True) -> Rollouts:
        """`group_size` completions for each prompt; the same seed gives the same rollouts.

        `score_policy`: also record the sampling policy's log-probs and entropies of the drawn tokens
        (``old_logprobs`` / ``entropy``, taken from the sampling logits: no extra forward); False leaves
        them None.
        """
        check_int("group_size", group_size, minimum=1)
        if not prompts:
            raise ValueError("prompts=[] is invalid: allowed a non-empty list of problem texts")
        llama = _llama(self.model)
        device, dtype = llama.model.embed_tokens.weight.device, llama.model.embed_tokens.weight.dtype
        # Prompts tokenized once each, left-padded to the longest: [n, P]; row r holds prompt r // group_size.
        encoded = self.tokenizer([self.format_prompt(p) for p in prompts], add_special_tokens=False, padding=True,
                                 padding_side="left", return_tensors="pt").to(device)
        which = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
        generator = torch.Generator(device).manual_seed(seed)
        parts = []
        with torch.inference_mode():  # the decode loop; everything returned is rebuilt outside it (below)
            decoder = _LlamaDecoder(llama, encoded["input_ids"].shape[1] + self.max_new_tokens)
            for start in range(0, len(which), self.batch_size):
                # One batch of rows; each distinct prompt in it is run through the model once (prefill).
                unique, counts = torch.unique_consecutive(which[start:start + self.batch_size], return_counts=True)
                parts.append(self._generate(decoder, encoded["input_ids"][unique],
                                            encoded["attention_mask"][unique], counts, generator, score_policy))
        # Outside inference mode, so the tensors below are ordinary ones the trainer's autograd accepts.
        prompt_ids = encoded["input_ids"][which]
        prompt_mask = encoded["attention_mask"][which]
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        completion_ids = pad_right([p[0] for p in parts], pad)
        mask = completion_mask(completion_ids, eos)
        completion_ids = torch.where(mask.bool(), completion_ids, pad)
        rollouts = Rollouts(
            prompt_ids, prompt_mask, completion_ids, mask, None, None,
            self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
            [i for i in range(len(prompts)) for _ in range(group_size)], group_size)
        if score_policy:  # the sampling logits' own view of the drawn tokens: the fixed old log-probs
            rollouts.old_logprobs = (pad_right([p[1] for p in parts], 0) * mask).to(dtype)
            rollouts.entropy = (pad_right([p[2] for p in parts], 0) * mask).to(dtype)
        return rollouts

    def _generate(self, decoder: _LlamaDecoder, ids: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor,
                  generator: torch.Generator, score: bool):
        """Decode ``counts[i]`` rows from prompt i of ``ids`` [n, P] (mask [n, P]) until every row has emitted
        EOS or ``max_new_tokens`` tokens.

        Rows that have ended are dropped from the computation (with their cache) once a quarter of the
        computed rows have ended. Returns tokens [b, t] (b = counts.sum(); pad after a row's EOS) and, when
        ``score``, log-probs and entropies [b, t] (else None).
        """
        length, steps, kv = ids.shape[1], self.max_new_tokens, decoder.kv_heads
        rows = int(counts.sum())
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        rows_of = torch.arange(len(ids), device=ids.device).repeat_interleave(counts, output_size=rows)
        logits, prefix = decoder.prefill(ids, mask)
        logits = logits[rows_of]
        cache = decoder.new_cache(prefix, rows_of, length + steps - 1)
        # Additive key bias [b * Hkv, 1, L]: -inf on the prompt's padding, 0 elsewhere; built once.
        key_bias = torch.zeros(rows, length + steps - 1, dtype=cache[0].dtype, device=ids.device)
        key_bias[:, :length].masked_fill_(mask[rows_of] == 0, float("-inf"))
        key_bias = key_bias.repeat_interleave(kv, dim=0)[:, None]
        # Outputs, one row per step: [steps, b]; `live` [b'] names the rows still computed.
        tokens = ids.new_full((steps, rows), pad)
        logprobs = torch.zeros(steps, rows, device=ids.device) if score else None
        entropy = torch.zeros(steps, rows, device=ids.device) if score else None
        live = torch.arange(rows, device=ids.device)
        positions = mask.sum(-1)[rows_of] - 1  # RoPE position of each row's last prompt token
        ended = torch.zeros(rows, dtype=torch.bool, device=ids.device)
        for t in range(steps):
            # Draw token t for every live row; ended rows get pad.
            token, logprob, ent = _draw(logits, self.temperature, self.top_p, generator, score)
            token = token.masked_fill(ended, pad)
            tokens[t].index_copy_(0, live, token)
            if score:
                logprobs[t].index_copy_(0, live, logprob)
                entropy[t].index_copy_(0, live, ent)
            ended |= token == eos
            done = int(ended.sum())
            if t + 1 == steps or done == len(live):
                break
            if 4 * done >= len(live):  # drop the ended rows and their cache
                keep = (~ended).nonzero().squeeze(1)
                keep_kv = (keep[:, None] * kv + torch.arange(kv, device=keep.device)).flatten()
                cache = tuple(c.index_select(1, keep_kv) for c in cache)
                key_bias, live, token = key_bias[keep_kv], live[keep], token[keep]
                positions, ended = positions[keep], ended[keep]
            positions = positions + 1
            logits = decoder.step(token, positions, cache, length + t, key_bias)
        width = t + 1
        outputs = (tokens, logprobs, entropy) if score else (tokens,)
        return tuple(o[:width].t() for o in outputs) + (None,) * (3 - len(outputs))
