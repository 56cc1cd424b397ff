"""GXPO._jump alone, interleaved: an older gxpo_lib copy ("old") against this one ("new").

On the tiny model's full-fine-tuning shapes (758,400 parameters in 38 tensors) with fixed synthetic gradients
(no forward/backward), every repetition times one active step of each variant in a shuffled order; the
ratio is the median of per-repetition ratios against the first variant.

    REFERENCE=/tmp/ref/old_gxpo_lib VARIANTS=old:262144,new:262144 REPS=50 OMP_NUM_THREADS=1 \\
        python bench/bench_jump.py        # VARIANTS: which:CHUNK_MIN, the first is the baseline
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: see _benchlib.py

import importlib
import random
import statistics
import sys
import time

import torch
from _benchlib import quiet_transformers, setup_torch


def load_rules():
    """(old rules, old extrapolation), (new ...): the old ones from REFERENCE, else this gxpo_lib again."""
    import gxpo_lib.core.extrapolation as new_ext
    import gxpo_lib.core.rules as new_rules

    old = (new_rules, new_ext)
    if os.environ.get("REFERENCE"):
        ref_dir, ref_pkg = os.path.split(os.path.abspath(os.environ["REFERENCE"]))
        sys.path.insert(0, ref_dir)
        old = tuple(importlib.import_module(f"{ref_pkg}.{m}") for m in ("rules", "extrapolation"))
    return old, (new_rules, new_ext)


def main() -> None:
    from gxpo_lib.rl.models import apply_lora, load_model

    quiet_transformers()
    setup_torch(int(os.environ.get("THREADS", "1")), 0)
    old, new = load_rules()
    model, _ = load_model("tiny", device="cpu")
    params = [p for p in apply_lora(model, full_finetune=True).parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    grads_a = [torch.randn(p.shape, generator=generator) * 1e-2 for p in params]
    grads_b = [a * (torch.rand(a.shape, generator=generator) * 4 - 1.5) for a in grads_a]
    for a in grads_a:
        a.view(-1)[::13] = 0  # some inactive coordinates
    calls = [0]

    def closure():  # alternates the two gradients: r is neither 0 nor 1
        source = grads_a if calls[0] % 2 == 0 else grads_b
        calls[0] += 1
        for p, g in zip(params, source):
            p.grad = g.clone() if p.grad is None else p.grad.copy_(g)
        return torch.tensor(1.0)

    optimizer = torch.optim.AdamW(params, lr=1e-4)
    saved = [p.detach().clone() for p in params]

    def restore():
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)

    variants = {}
    for spec in os.environ.get("VARIANTS", "old:262144,new:262144").split(","):
        which, chunk = spec.split(":")
        rules, ext = old if which == "old" else new
        ext.CHUNK_MIN = int(chunk)
        rule = rules.GXPO(optimizer, k=5, alpha=0.5, gate=None)
        restore()
        rule.step(closure)  # warm-up: buffers and layout
        variants[spec] = (rule, ext, int(chunk))
    jump_s = {v: [] for v in variants}
    for _ in range(int(os.environ.get("REPS", "50"))):
        order = list(variants)
        random.shuffle(order)
        for spec in order:
            rule, ext, chunk = variants[spec]
            ext.CHUNK_MIN = chunk
            restore()
            original = rule._jump

            def timed(*args, _original=original, _spec=spec):
                start = time.perf_counter()
                _original(*args)
                jump_s[_spec].append(time.perf_counter() - start)

            rule._jump = timed
            rule.step(closure)
            del rule._jump
    base = next(iter(variants))
    print(f"load {os.getloadavg()}")
    for spec, values in jump_s.items():
        ratio = statistics.median([a / b for a, b in zip(values, jump_s[base])])
        print(f"{spec:14s} jump median {statistics.median(values) * 1e3:7.3f} ms  x{ratio:.3f} of {base}")


if __name__ == "__main__":
    main()
