"""Saved activations of the policy's log-probs and entropies: the unchunked path against the chunked one.

Unchunked (what `sampling.completion_logprobs` did before it delegated to the chunked path; written out here
as ``model(...).logits`` + `losses.per_token_logprobs` + `losses.token_entropy`): the full model forward
computes logits for every position, prompt included, ``[rows, P + T, V]``, then a float32 log-softmax and
entropy over ``[rows, T, V]``; autograd keeps these for backward. Chunked (`losses.policy_token_logprobs`,
what `PolicyObjective` uses): the decoder's hidden states at the completion tokens go through the LM head
``chunk_tokens`` at a time and the backward pass recomputes each chunk's logits
(`losses.ChunkedHeadLogprobs`), so only the hidden states ``[rows * T, H]`` and a few ``[rows * T]`` vectors
are kept.

Measured: the bytes autograd saves for backward (``torch.autograd.graph.saved_tensors_hooks``; each storage
counted once; the model's parameters, which live anyway, not counted), on the CPU at small T, for

- the LM head alone (given hidden states that require grad): this is the O(T * V) part;
- the whole log-prob forward of a small Llama (decoder and head).

Fitting the head's saved bytes against rows * T * V at two vocabulary sizes gives bytes per token x vocab
element; the script extrapolates to T = 3,072, V = 151,936 (Qwen2.5-Math-1.5B's vocabulary, hidden 1,536),
and prints the preflight's arithmetic for the whole row (decoder + head) at that shape, with and without
gradient checkpointing (`per_row_goal`).

    python bench/bench_logprob_memory.py            # float32 and bfloat16, about a minute on one core
    python bench/bench_logprob_memory.py --json bench/results/logprob_memory.json   # also the JSON record
"""

from __future__ import annotations

import argparse
import os
import sys
import time
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import finish_record, machine_info, write_json

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

    def unchunked():   # the full model forward: [rows, P + T, V] logits, then log-softmax and entropy over T
        logits = model(input_ids=ids, attention_mask=mask).logits[:, prompt - 1:-1]
        return per_token_logprobs(logits, ids[:, prompt:]), token_entropy(logits)

    return (saved_bytes(unchunked, params),
            saved_bytes(lambda: policy_token_logprobs(model, ids, mask, prompt, with_entropy=True,
                                                      chunk_tokens=chunk), params))


def per_row_goal() -> dict:
    """The whole row, not the head alone: `preflight`'s arithmetic for the paper preset with Qwen2.5-1.5B
    (hidden 1,536, V 151,936, 28 layers) at P + T = 512 + 3,072, bf16, LoRA r=128 on q/k/v/o, with and without
    gradient checkpointing, against the goal of at most 1 GiB per row."""
    from gxpo_lib.config import resolve_config
    from gxpo_lib.rl import preflight as pf

    out = {}
    print(f"\nthe whole row (preflight arithmetic, paper-gxpo with Qwen2.5-1.5B, P + T = 512 + {TARGET_T}, bf16):")
    for checkpointing in (True, False):
        config = resolve_config("paper-gxpo", {"model": "Qwen/Qwen2.5-1.5B-Instruct",
                                               "gradient_checkpointing": checkpointing})
        est = pf.estimate(config, "h100")
        saved = next(line.bytes for line in est.phases["train micro-batch"] if line.what.startswith("saved"))
        phase = est.phase_bytes("train micro-batch")
        rows = est.micro_batch_size
        out[f"gradient_checkpointing={checkpointing}"] = {
            "micro_batch_size": rows, "saved_bytes_per_row": saved / rows, "train_phase_bytes_per_row": phase / rows,
            "peak_bytes": est.peak, "fits_h100": est.fits, "within_1_gib_per_row": phase / rows <= GIB}
        print(f"  gradient_checkpointing {checkpointing!s:5}: saved {saved / rows / GIB:6.3f} GiB per row, whole "
              f"micro-batch phase / {rows} rows = {phase / rows / GIB:6.3f} GiB per row "
              f"({'<=' if phase / rows <= GIB else '>'} 1 GiB); peak {est.peak / GIB:.1f} GiB, "
              f"{'fits' if est.fits else 'does not fit'} an H100 beside vLLM")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--width", type=int, default=128, help="completion tokens T")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64, help="chunk_tokens of the chunked path")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the record as JSON there (e.g. bench/results/logprob_memory.json)")
    args = parser.parse_args(argv)
    rows, width, hidden = args.rows, args.width, args.hidden
    vocabs = (8192, 32768)
    started = time.perf_counter()
    record = {"benchmark": "logprob_memory", "machine": machine_info(),
              "settings": {"rows": rows, "width_T": width, "hidden": hidden, "chunk_tokens": args.chunk,
                           "vocabs": list(vocabs), "whole_forward_prompt": 16},
              "target": {"T": TARGET_T, "V": TARGET_V, "hidden": TARGET_H, "rows": TARGET_ROWS,
                         "logit_chunk_elements": LOGIT_CHUNK_ELEMENTS},
              "method": "bytes of the distinct storages autograd saves (saved_tensors_hooks), parameters "
                        "excluded; slope in V of the LM head's saved bytes = bytes per token x vocab element",
              "dtypes": {}}
    for dtype in (torch.float32, torch.bfloat16):
        size = torch.finfo(dtype).bits // 8
        entry = record["dtypes"][str(dtype).removeprefix("torch.")] = {"head": [], "whole_forward": []}
        print(f"\n== {dtype} ({rows} rows x T={width}, hidden {hidden}, chunk {args.chunk} tokens) ==")
        fits = {}
        for vocab in vocabs:
            old, new = head_only(rows, width, hidden, vocab, dtype, args.chunk)
            fits[vocab] = (old, new)
            elements = rows * width * vocab
            entry["head"].append({"vocab": vocab, "unchunked_bytes": old, "chunked_bytes": new,
                                  "unchunked_bytes_per_token_x_vocab": old / elements,
                                  "chunked_bytes_per_token_x_vocab": new / elements,
                                  "chunked_bytes_per_token": new / (rows * width)})
            print(f"LM head, V={vocab:>6}: unchunked {old / 2**20:8.2f} MiB ({old / elements:5.2f} B per token x vocab "
                  f"element, {old / rows / 2**20:7.2f} MiB/row) | chunked {new / 2**20:6.3f} MiB "
                  f"({new / rows / width:6.1f} B per token, {new / elements:7.4f} B per token x vocab element, "
                  f"{new / rows / 2**10:6.1f} KiB/row) | ratio {old / new:7.1f}")
        (v1, (o1, n1)), (v2, (o2, n2)) = fits.items()
        per_element = (o2 - o1) / (rows * width * (v2 - v1))   # the slope in V: bytes per token x vocab element
        per_element_chunked = (n2 - n1) / (rows * width * (v2 - v1))   # 0: the chunked path keeps nothing of size V
        per_token_chunked = n2 / (rows * width)                   # flat in V: hidden x size + ids and [N] vectors
        per_token_extra = per_token_chunked - hidden * size
        for vocab in vocabs:
            old, new = whole_forward(rows, 16, width, vocab, dtype, args.chunk)
            entry["whole_forward"].append({"vocab": vocab, "unchunked_bytes": old, "chunked_bytes": new})
            print(f"whole log-prob forward (2-layer Llama, prompt 16), V={vocab:>6}: unchunked {old / 2**20:8.2f} MiB, "
                  f"chunked {new / 2**20:6.2f} MiB, ratio {old / new:5.1f}")
        old_row = per_element * TARGET_T * TARGET_V
        new_row = TARGET_T * (TARGET_H * size + per_token_extra)
        chunk = LOGIT_CHUNK_ELEMENTS // TARGET_V
        entry.update(unchunked_bytes_per_token_x_vocab_slope=per_element,
                     chunked_bytes_per_token_x_vocab_slope=per_element_chunked,
                     chunked_bytes_per_token=per_token_chunked, chunked_bytes_per_token_beyond_hidden=per_token_extra,
                     target_unchunked_head_bytes_per_row=old_row, target_chunked_head_bytes_per_row=new_row,
                     target_chunk_tokens=chunk, target_chunk_tensor_bytes=chunk * TARGET_V * 4)
        print(f"slope in V: unchunked {per_element:.3f} B, chunked {per_element_chunked:.4f} B "
              "per token x vocab element")
        print(f"extrapolated to T={TARGET_T}, V={TARGET_V}, hidden {TARGET_H} ({dtype}), LM head only:")
        print(f"  unchunked: {per_element:.2f} B x T x V = {old_row / GIB:6.2f} GiB per row, "
              f"{TARGET_ROWS * old_row / GIB:7.1f} GiB for a micro-batch of {TARGET_ROWS}")
        print(f"  chunked:   T x (hidden x {size} B + {per_token_extra:.0f} B) = {new_row / 2**20:6.1f} MiB per row, "
              f"{TARGET_ROWS * new_row / GIB:7.2f} GiB for {TARGET_ROWS} rows; ratio {old_row / new_row:6.0f}")
        print(f"  plus, transient and independent of rows and T: one chunk of {chunk} tokens, [chunk, V] float32 = "
              f"{chunk * TARGET_V * 4 / 2**20:.0f} MiB per tensor, about 4 alive in backward")
    record["per_row_goal"] = per_row_goal()
    finish_record(record, started)
    if args.json:
        print(f"wrote {write_json(record, args.json, 'logprob_memory')}")
    return record


if __name__ == "__main__":
    main()
