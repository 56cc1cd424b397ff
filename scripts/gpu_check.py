"""A 15-minute proof on one lent GPU, no network: six legs, one table, non-zero exit on any failure.

    python scripts/gpu_check.py                 # CUDA; torch, transformers, peft, accelerate, math-verify (+ trl: d)
    python scripts/gpu_check.py --cpu-dry-run   # every leg at reduced shapes on the CPU (a few minutes)

(a) peak memory of one micro-batch (forward + backward of `PolicyObjective`) of random-initialised models of
    the exact target shapes (Llama-3.2-1B, Qwen2.5-1.5B; built from config dicts) at the length cap, against
    the preflight's arithmetic (+-15%); on the CPU: autograd's saved bytes against `saved_bytes_per_row`.
(b) GXPO and GRPO update throughput (one rule step each) and their ratio (3 passes vs 1: about 3).
(c) one native run end to end: `gxpo_lib.run("smoke")`, 2 steps, rollout_backend hf. Building it needs no
    math-verify, but grading the tiny model's answers does wherever one is not a plain number (a box cut off
    by the token cap): carry the math-verify wheel (with latex2sympy2_extended, antlr4-python3-runtime 4.13.2).
(d) the TRL leg: `gxpo_lib.run(backend="trl")` 2 steps, then 3 steps resuming (skipped when trl is missing);
    the resume must keep the log rows of steps 0-2 and checkpoint-2 as they were and carry on its trainer state.
(e) the bf16 retention noise floor, a measurement with no pass bound (status "meas"; FAIL only on a non-finite
    value): median |g0'/g0 - 1| (g0' from a different micro-batch split at the same point) against median
    |g1/g0 - 1| after one AdamW step at lr 1e-7 and 1e-5.
(f) the CUDA-only paths: GXPO v5 (transactional optimizer state, relative active set, the gate) on the device:
    steps extrapolate, each restores its optimizer snapshot exactly (AdamW counts one step per rule step), the
    relative active set leaves out the coordinates it should, every state tensor lives on the parameter's device.
"""

from __future__ import annotations

import argparse
import math
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
    from gxpo_lib.rl import runlog

    with tempfile.TemporaryDirectory() as folder:
        where = Path(folder) / "trl"
        first = run("smoke", _small_run({}), where, backend="trl", figures=False)
        logged = _rows_through(where, 2)
        step2 = {name: (where / "checkpoint-2" / name).read_bytes() for name in _TRL_STATE_FILES}
        second = run("smoke", _small_run({"steps": 3}), where, backend="trl", figures=False)
        rows = runlog.read_rows(where / runlog.METRICS_FILE)
        checks = {   # what only a resume from checkpoint-2 gives: a restart would rewrite the log and checkpoint-2
            "steps 2 then 3": (first["steps"], second["steps"]) == (2, 3),
            "train rows 1, 2, 3 once": sorted(r["step"] for r in rows if r.get("kind") == "train") == [1, 2, 3],
            "rows of steps 0-2 kept": bool(logged) and _rows_through(where, 2) == logged,
            "checkpoint-2 untouched": all((where / "checkpoint-2" / name).read_bytes() == data
                                          for name, data in step2.items()),
            "checkpoint-3 continues checkpoint-2's trainer state": _continues(where, step2["trainer_state.json"]),
        }
    failed = [name for name, good in checks.items() if not good]
    detail = (f"steps {first['steps']} then {second['steps']}, resumed from checkpoint-2 (log rows of steps 0-2 "
              "and checkpoint-2 unchanged, trainer state continued)" if not failed else "not: " + "; ".join(failed))
    return ("FAIL" if failed else "ok"), detail


_TRL_STATE_FILES = ("gxpo_state.json", "trainer_state.json")


def _rows_through(where: Path, step: int) -> list[dict]:
    """metrics.jsonl's rows (train and eval) of steps 0..`step`, parsed."""
    from gxpo_lib.rl import runlog

    return [row for row in runlog.read_rows(where / runlog.METRICS_FILE) if row.get("step", 0) <= step]


def _continues(where: Path, step2_state: bytes) -> bool:
    """checkpoint-3's trainer state is checkpoint-2's carried on: global step 3, its log history starting with
    checkpoint-2's whole history (transformers loads the trainer state of the checkpoint it resumes from)."""
    import json

    before, after = json.loads(step2_state), json.loads((where / "checkpoint-3" / "trainer_state.json").read_text())
    history = before["log_history"]
    return after["global_step"] == 3 and bool(history) and after["log_history"][:len(history)] == history


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
        ok = ok and all(math.isfinite(x) for x in (noise, signal))
        del model
    # A measurement: how far one AdamW step moves the gradient (g1/g0) against the floor that re-splitting the
    # same batch gives (g0'/g0). Neither has a bound to hold (both depend on the random model and the kernels);
    # the row fails only on a non-finite value, and its status says "meas", not "ok".
    return ("meas" if ok else "FAIL"), "measurement, no pass bound: " + "; ".join(details)


@leg("f. CUDA-only paths (GXPO v5)")
def leg_rule_paths(args, shapes):
    """GXPO v5 on the device: transactional optimizer state, relative active set, entropy gate. The loss sees
    columns 0-31 of the weight fully, columns 32-47 scaled by 1e-12 and columns 48-63 not at all: the relative
    active set (|d0| > 1e-3 RMS(d0) per tensor) leaves exactly half the coordinates out, where the absolute one
    (|d0| > 1e-8) keeps some of the scaled columns in and V1's "all" leaves none out."""
    from gxpo_lib.core.rules import GXPO

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64, device=args.device))
    target = torch.randn(64, 64, device=args.device)
    scale = torch.ones(64, 64, device=args.device)
    scale[:, 32:48], scale[:, 48:] = 1e-12, 0.0
    optimizer = torch.optim.AdamW([weight], lr=1e-2)
    rule = GXPO.from_version("v5", optimizer, k=5, alpha=0.5)
    seen = {"snapshots": 0, "restores": 0, "exact": 0, "devices": set()}
    snapshot, restore = rule._snapshot_optimizer, rule._restore_optimizer

    def spy_snapshot():
        saved = snapshot()
        seen["snapshots"] += 1
        seen["devices"] |= {(str(v.device), str(p.device)) for p, st in saved.items() for v in st.values()
                            if torch.is_tensor(v) and v.dim() > 0}
        return saved

    def spy_restore(saved):
        restore(saved)
        seen["restores"] += 1
        seen["exact"] += all(torch.equal(optimizer.state[p][k], v) for p, st in saved.items()
                             for k, v in st.items() if torch.is_tensor(v))

    rule._snapshot_optimizer, rule._restore_optimizer = spy_snapshot, spy_restore

    def closure():
        loss = (((weight - target) ** 2) * scale).sum()
        loss.backward()
        return loss

    infos = [rule.step(closure, gate_signal=1.0 + 0.01 * step) for step in range(6)]
    active = [i for i in infos if i.active]
    state = optimizer.state[weight]
    # AdamW keeps its 0-dim step counter on the CPU unless capturable or fused; every other state tensor
    # must live where its parameter does (a snapshot restored from the host would leave the moments there)
    misplaced = [k for p, st in optimizer.state.items() for k, v in st.items()
                 if torch.is_tensor(v) and v.dim() > 0 and v.device != p.device]
    misplaced += [f"snapshot {v} for {p}" for v, p in seen["devices"] if v != p]
    checks = {
        "at least one step extrapolated (3 backward passes)": bool(active) and all(
            i.backward_passes == 3 for i in active),
        "one snapshot and one exact restore per step": seen["snapshots"] == len(infos) and
            seen["restores"] == seen["exact"] == len(active) + sum(i.fallback for i in infos),
        "transactional: AdamW counted 1 step per rule step, not 3": int(state["step"]) == len(infos),
        "relative active set: half the coordinates out": all(
            i.inactive_frac is not None and abs(i.inactive_frac - 0.5) < 0.02 for i in active),
        "state tensors on the parameters' device": not misplaced and state["exp_avg"].device == weight.device,
        "finite weights": bool(torch.isfinite(weight).all()),
    }
    failed = [name for name, good in checks.items() if not good]
    inactive = ", ".join(f"{i.inactive_frac:.3f}" for i in active if i.inactive_frac is not None)
    detail = (f"{len(active)} of 6 steps extrapolated, {seen['restores']} exact restores, AdamW step "
              f"{int(state['step'])}, inactive {inactive}, moments on {state['exp_avg'].device}")
    return ("FAIL" if failed else "ok"), (detail if not failed else f"not: {'; '.join(failed)} ({detail})")


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
