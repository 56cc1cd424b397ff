"""Saved activations of the policy's log-probs and entropies: the unchunked path against the chunked one.

Unchunked (the earlier `sampling.completion_logprobs`): the full model forward computes logits for every
position, prompt included, ``[rows, P + T, V]``, then a float32 log-softmax and entropy over ``[rows, T, V]``;
autograd keeps these for backward. Chunked (`losses.policy_token_logprobs`, what `PolicyObjective` uses): the
decoder's hidden states at the completion tokens go through the LM head ``chunk_tokens`` at a time and the
backward pass recomputes each chunk's logits (`losses.ChunkedHeadLogprobs`), so only the hidden states
``[rows * T, H]`` and a few ``[rows * T]`` vectors are kept.

Measured: the bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``; each storage
counted once; the model's parameters, which live anyway, not counted), on the CPU at small T, for

- the LM head alone (given hidden states that require grad): this is the O(T * V) part;
- the whole log-prob forward of a small Llama (decoder and head).

Fitting the head's saved bytes against rows * T * V at two vocabulary sizes gives bytes per token x vocab
element; the script extrapolates to T = 3,072, V = 151,936 (Qwen2.5-Math-1.5B's vocabulary, hidden 1,536).

    python bench/bench_logprob_memory.py            # float32 and bfloat16, about a minute on one core
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gxpo_lib.core.losses import (
    LOGIT_CHUNK_ELEMENTS,
    chunked_head_logprobs,
    per_token_logprobs,
    policy_token_logprobs,
    token_entropy,
)
from gxpo_lib.rl.sampling import completion_logprobs

GIB = 1024 ** 3
TARGET_T, TARGET_V, TARGET_H, TARGET_ROWS = 3072, 151_936, 1536, 32


def saved_bytes(run, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while `run()` builds its graph (the graph is kept alive
    until counting ends)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in exclude:
                storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = run()
    del outputs
    return sum(storages.values())


def head_only(rows: int, width: int, hidden: int, vocab: int, dtype, chunk: int) -> tuple[int, int]:
    """(unchunked, chunked) saved bytes of the LM head's log-probs and entropies for [rows, width] tokens."""
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype)
    states = torch.randn(rows, width, hidden, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, vocab, (rows, width))
    params = {head.weight.untyped_storage().data_ptr()}

    def unchunked():
        logits = head(states)
        return per_token_logprobs(logits, ids), token_entropy(logits)

    def chunked():
        return chunked_head_logprobs(head, states.reshape(-1, hidden), ids.reshape(-1), 1.0, None, chunk, True)

    return saved_bytes(unchunked, params), saved_bytes(chunked, params)


def whole_forward(rows: int, prompt: int, width: int, vocab: int, dtype, chunk: int) -> tuple[int, int]:
    """(unchunked, chunked) saved bytes of a 2-layer Llama's log-prob forward (decoder + head)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = LlamaForCausalLM(config).to(dtype)
    ids = torch.randint(0, vocab, (rows, prompt + width))
    mask = torch.ones_like(ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return (saved_bytes(lambda: completion_logprobs(model, ids, mask, prompt, with_entropy=True), params),
            saved_bytes(lambda: policy_token_logprobs(model, ids, mask, prompt, with_entropy=True,
                                                      chunk_tokens=chunk), params))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--width", type=int, default=128, help="completion tokens T")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64, help="chunk_tokens of the chunked path")
    args = parser.parse_args(argv)
    rows, width, hidden = args.rows, args.width, args.hidden
    vocabs = (8192, 32768)
    for dtype in (torch.float32, torch.bfloat16):
        size = torch.finfo(dtype).bits // 8
        print(f"\n== {dtype} ({rows} rows x T={width}, hidden {hidden}, chunk {args.chunk} tokens) ==")
        fits = {}
        for vocab in vocabs:
            old, new = head_only(rows, width, hidden, vocab, dtype, args.chunk)
            fits[vocab] = (old, new)
            elements = rows * width * vocab
            print(f"LM head, V={vocab:>6}: unchunked {old / 2**20:8.2f} MiB ({old / elements:5.2f} B per token x vocab "
                  f"element, {old / rows / 2**20:7.2f} MiB/row) | chunked {new / 2**20:6.3f} MiB "
                  f"({new / rows / width:6.1f} B per token, {new / rows / 2**10:6.1f} KiB/row) "
                  f"| ratio {old / new:7.1f}")
        (v1, (o1, _)), (v2, (o2, n2)) = fits.items()
        per_element = (o2 - o1) / (rows * width * (v2 - v1))   # the slope in V: bytes per token x vocab element
        per_token_chunked = n2 / (rows * width)                   # flat in V: hidden x size + ids and [N] vectors
        per_token_extra = per_token_chunked - hidden * size
        for vocab in vocabs:
            old, new = whole_forward(rows, 16, width, vocab, dtype, args.chunk)
            print(f"whole log-prob forward (2-layer Llama, prompt 16), V={vocab:>6}: unchunked {old / 2**20:8.2f} MiB, "
                  f"chunked {new / 2**20:6.2f} MiB, ratio {old / new:5.1f}")
        old_row = per_element * TARGET_T * TARGET_V
        new_row = TARGET_T * (TARGET_H * size + per_token_extra)
        chunk = LOGIT_CHUNK_ELEMENTS // TARGET_V
        print(f"extrapolated to T={TARGET_T}, V={TARGET_V}, hidden {TARGET_H} ({dtype}), LM head only:")
        print(f"  unchunked: {per_element:.2f} B x T x V = {old_row / GIB:6.2f} GiB per row, "
              f"{TARGET_ROWS * old_row / GIB:7.1f} GiB for a micro-batch of {TARGET_ROWS}")
        print(f"  chunked:   T x (hidden x {size} B + {per_token_extra:.0f} B) = {new_row / 2**20:6.1f} MiB per row, "
              f"{TARGET_ROWS * new_row / GIB:7.2f} GiB for {TARGET_ROWS} rows; ratio {old_row / new_row:6.0f}")
        print(f"  plus, transient and independent of rows and T: one chunk of {chunk} tokens, [chunk, V] float32 = "
              f"{chunk * TARGET_V * 4 / 2**20:.0f} MiB per tensor, about 4 alive in backward")

if __name__ == "__main__":
    main()
