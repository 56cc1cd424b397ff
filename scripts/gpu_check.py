"""A 15-minute proof on one lent GPU, no network: six legs, one table, non-zero exit on any failure.

    python scripts/gpu_check.py                 # CUDA; torch, transformers, peft, accelerate (+ trl for leg d)
    python scripts/gpu_check.py --cpu-dry-run   # every leg at reduced shapes on the CPU (a few minutes)

(a) peak memory of one micro-batch (forward + backward of `PolicyObjective`) of random-initialised models of
    the exact target shapes (Llama-3.2-1B, Qwen2.5-1.5B; built from config dicts) at the length cap, against
    the preflight's arithmetic (+-15%); on the CPU: autograd's saved bytes against `saved_bytes_per_row`.
(b) GXPO and GRPO update throughput (one rule step each) and their ratio (3 passes vs 1: about 3).
(c) one native run end to end: `gxpo_lib.run("smoke")`, 2 steps, rollout_backend hf.
(d) the TRL leg: `gxpo_lib.run(backend="trl")` 2 steps, then 3 steps resuming (skipped when trl is missing).
(e) the bf16 retention noise floor: median |g0'/g0 - 1| (g0' from a different micro-batch split at the same
    point) against median |g1/g0 - 1| after one AdamW step at lr 1e-7 and 1e-5.
(f) the CUDA-only paths: GXPO v5 (transactional optimizer state, relative active set, the gate) on the device.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from gxpo_lib.config import resolve_config
from gxpo_lib.rl import preflight as pf

RESULTS: list[tuple[str, str, str, float]] = []


def leg(name):
    def wrap(fn):
        def run(*args):
            start = time.time()
            try:
                status, detail = fn(*args)
            except Exception as error:  # a failed leg is a row, not the end of the check
                traceback.print_exc()
                status, detail = "FAIL", f"{type(error).__name__}: {error}"[:160]
            RESULTS.append((name, status, detail, time.time() - start))
            print(f"[gpu_check] {name}: {status} {detail} ({time.time() - start:.0f} s)", flush=True)
        return run
    return wrap


def build(shape: pf.ModelShape, device, dtype, lora_rank: int | None = 128, checkpointing: bool = True):
    """A random-initialised causal LM of `shape` (Llama or Qwen2 architecture), LoRA on q/k/v/o."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kind = "qwen2" if shape.qkv_bias else "llama"
    config = AutoConfig.for_model(kind, vocab_size=shape.vocab, hidden_size=shape.hidden,
                                  intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                                  num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                                  head_dim=shape.head_dim, tie_word_embeddings=shape.tied, max_position_embeddings=8192)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if lora_rank:
        from gxpo_lib.rl.models import apply_lora

        model = apply_lora(model, rank=lora_rank, alpha=2 * lora_rank,
                           target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def rollouts(rows: int, prompt: int, completion: int, vocab: int, device):
    """Synthetic rollouts at the cap: every completion full length (the worst case for memory)."""
    from gxpo_lib.rl.sampling import Rollouts

    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (rows, prompt), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[: rows // 2, :2] = 0          # some left padding: a real attention mask, as in training
    completion_ids = torch.randint(3, vocab, (rows, completion), generator=g)
    fields = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=torch.ones_like(completion_ids), old_logprobs=torch.full((rows, completion), -5.0),
                  entropy=torch.ones(rows, completion), completions=["x"] * rows, prompt_index=list(range(rows)),
                  group_size=rows)
    return Rollouts(**fields)


def objective(model, batch, micro_batch_size):
    from gxpo_lib.core.objective import PolicyObjective

    rows = len(batch.completions)
    advantages = torch.linspace(-1, 1, rows)
    return PolicyObjective(model, batch, advantages, batch.old_logprobs.clone(), batch.old_logprobs.clone(),
                           loss_type="token_mean", clip_eps=0.2, clip_eps_high=None, kl_beta=0.001,
                           entropy_coef=0.001, temperature=1.0, max_completion_length=batch.completion_ids.shape[1],
                           micro_batch_size=micro_batch_size)


@leg("a. peak memory vs preflight")
def leg_memory(args, shapes):
    details = []
    for shape in shapes:
        model = build(shape, args.device, args.dtype)
        if args.cuda:
            config = resolve_config("paper-gxpo", {"model": "tiny", "max_new_tokens": args.t,
                                                   "micro_batch_size": args.rows})
            est = pf.estimate(config, 80, micro_batch_size=args.rows, prompt_tokens=args.p, shape=shape)
            fixed = sum(line.bytes for line in est.fixed[:3])       # weights, adapters, their gradients
            predicted = fixed + est.phase_bytes("train micro-batch")
            batch = rollouts(args.rows, args.p, args.t, shape.vocab, args.device)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            objective(model, batch, args.rows)()
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated()
        else:
            measured = pf.measure_saved_bytes(model, args.rows, args.p, args.t)
            predicted = args.rows * pf.saved_bytes_per_row(shape, args.p + args.t - 1, args.t, 2, True, 128, 4)
        error = predicted / measured - 1
        details.append(f"{shape.name}: {measured / 2**20:.1f} MiB measured, {predicted / 2**20:.1f} predicted "
                       f"({error:+.0%})")
        del model
        if args.cuda:
            torch.cuda.empty_cache()
        if abs(error) > 0.15:
            return "FAIL", "; ".join(details)
    return "ok", "; ".join(details)


@leg("b. GXPO vs GRPO update throughput")
def leg_throughput(args, shapes):
    from gxpo_lib.core.rules import GXPO, PlainStep

    model = build(shapes[0], args.device, args.dtype)
    batch = rollouts(args.rows * 2, args.p, args.t, shapes[0].vocab, args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    seconds, passes = {}, {}
    for name, make in (("grpo", lambda o: PlainStep(o, max_grad_norm=1.0)),
                       ("gxpo", lambda o: GXPO(o, k=5, alpha=0.5))):
        rule = make(torch.optim.AdamW(params, lr=1e-7))
        rule.step(objective(model, batch, args.rows))                   # warm-up (allocations, kernels)
        _sync(args)
        start = time.time()
        info = rule.step(objective(model, batch, args.rows))
        _sync(args)
        seconds[name], passes[name] = time.time() - start, info.backward_passes
    tokens = batch.completion_ids.numel() + batch.prompt_ids.numel()
    ratio = seconds["gxpo"] / seconds["grpo"]
    detail = (f"{shapes[0].name}: GRPO {tokens / seconds['grpo']:.0f} tok/s, "
              f"GXPO {tokens / seconds['gxpo']:.0f} tok/s, "
              f"time ratio {ratio:.2f} ({passes['gxpo']} passes vs {passes['grpo']})")
    ok = (passes["gxpo"], passes["grpo"]) == (3, 1) and (not args.cuda or 1.5 <= ratio <= 4.5)  # CPU timing: noise
    return ("ok" if ok else "FAIL"), detail


def _sync(args):
    if args.cuda:
        torch.cuda.synchronize()


def _small_run(overrides):
    return {"steps": 2, "batch_prompts": 2, "group_size": 4, "max_new_tokens": 12, "eval_every": 2,
            "eval_problems": 4, "eval_samples": 2, "final_eval_sets": [], "checkpoint_every": 1, **overrides}


@leg("c. native run (smoke, hf rollouts)")
def leg_native(args, shapes):
    from gxpo_lib import run

    with tempfile.TemporaryDirectory() as folder:
        summary = run("smoke", _small_run({"rollout_backend": "hf"}), Path(folder) / "native", figures=False)
    steps, passes = summary["steps"], summary["cumulative_backward_passes"]
    return ("ok" if steps == 2 and passes >= 2 else "FAIL"), f"{steps} steps, {passes} backward passes"


@leg("d. TRL single GPU, resume")
def leg_trl(args, shapes):
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return "skip", "trl is not installed"
    from gxpo_lib import run

    with tempfile.TemporaryDirectory() as folder:
        where = Path(folder) / "trl"
        first = run("smoke", _small_run({}), where, backend="trl", figures=False)
        second = run("smoke", _small_run({"steps": 3}), where, backend="trl", figures=False)
    ok = (first["steps"], second["steps"]) == (2, 3)
    return ("ok" if ok else "FAIL"), f"steps {first['steps']} then {second['steps']} (resumed)"


def _flat_grad(model):
    return torch.cat([p.grad.detach().float().reshape(-1) for p in model.parameters() if p.requires_grad])


@leg("e. bf16 retention noise floor")
def leg_noise(args, shapes):
    shape = shapes[-1] if not args.cuda else pf.model_shape("meta-llama/Llama-3.2-1B-Instruct")
    batch = rollouts(8, args.p, min(args.t, 256), shape.vocab, args.device)
    details, ok = [], True
    for lr in (1e-7, 1e-5):
        torch.manual_seed(0)
        model = build(shape, args.device, torch.bfloat16, checkpointing=args.cuda)
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():                                  # LoRA B starts at 0: give the adapters a point
            for p in params:
                p.normal_(0, 0.02)
        grads = []
        for split in (4, 2):                                   # g0 and g0': the same point, another split
            model.zero_grad(set_to_none=True)
            objective(model, batch, split)()
            grads.append(_flat_grad(model))
        torch.optim.AdamW(params, lr=lr).step()
        model.zero_grad(set_to_none=True)
        objective(model, batch, 4)()
        g0, g0b, g1 = grads[0], grads[1], _flat_grad(model)
        active = g0.abs() > 1e-3 * g0.pow(2).mean().sqrt()
        noise = float((g0b[active] / g0[active] - 1).abs().median())
        signal = float((g1[active] / g0[active] - 1).abs().median())
        details.append(f"lr {lr:g}: |g0'/g0-1| {noise:.2e}, |g1/g0-1| {signal:.2e}")
        ok = ok and noise == noise and signal == signal
        del model
    return ("ok" if ok else "FAIL"), "; ".join(details)


@leg("f. CUDA-only paths (GXPO v5)")
def leg_rule_paths(args, shapes):
    from gxpo_lib.core.rules import GXPO

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64, device=args.device))
    target = torch.randn(64, 64, device=args.device)
    optimizer = torch.optim.AdamW([weight], lr=1e-2)
    rule = GXPO.from_version("v5", optimizer, k=5, alpha=0.5)

    def closure():
        loss = ((weight - target) ** 2).mean()
        loss.backward()
        return loss

    infos = [rule.step(closure, gate_signal=1.0 + 0.01 * step) for step in range(6)]
    moments = optimizer.state[weight]["exp_avg"]
    ok = all(torch.isfinite(weight).all() for _ in [0]) and moments.device.type == weight.device.type
    return ("ok" if ok else "FAIL"), (f"{sum(i.active for i in infos)} of 6 steps extrapolated, state on "
                                      f"{moments.device}, transactional + relative active set + entropy gate")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="every leg at reduced shapes on the CPU")
    parser.add_argument("--legs", default="abcdef")
    args = parser.parse_args(argv)
    args.cuda = not args.cpu_dry_run
    if args.cuda and not torch.cuda.is_available():
        print("[gpu_check] no CUDA device: use --cpu-dry-run", flush=True)
        return 2
    args.device = "cuda" if args.cuda else "cpu"
    args.dtype = torch.bfloat16
    if args.cuda:   # the exact targets at the cap: P 512 + T 3072, 4 rows
        shapes = [pf.model_shape("meta-llama/Llama-3.2-1B-Instruct"), pf.model_shape("Qwen/Qwen2.5-1.5B-Instruct")]
        args.rows, args.p, args.t = 4, 512, 3072
    else:           # reduced: tiny widths, 2 layers, short sequences
        shapes = [pf.ModelShape("llama-mini", 2048, 128, 352, 2, 4, 2, 32),
                  pf.ModelShape("qwen-mini", 2048, 96, 320, 2, 6, 2, 16, qkv_bias=True)]
        args.rows, args.p, args.t = 2, 16, 48
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    legs = {"a": leg_memory, "b": leg_throughput, "c": leg_native, "d": leg_trl, "e": leg_noise, "f": leg_rule_paths}
    start = time.time()
    for key in args.legs:
        legs[key](args, shapes)
    print(f"\n{'leg':<38} {'status':<6} {'s':>5}  detail")
    for name, status, detail, seconds in RESULTS:
        print(f"{name:<38} {status:<6} {seconds:5.0f}  {detail}")
    print(f"total {time.time() - start:.0f} s on {torch.cuda.get_device_name(0) if args.cuda else 'the CPU'}")
    return 1 if any(status == "FAIL" for _, status, _, _ in RESULTS) else 0


if __name__ == "__main__":
    sys.exit(main())
