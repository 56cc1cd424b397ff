"""What does an update rule cost on top of its backward passes?

Measures, on one fixed mini-batch of real rollouts (sampled once with HFSampler), the wall time of one
rule step against plain GRPO steps (PlainStep) on the same batch:

  * active GXPO (K=5, alpha=0.5, gate open)   vs 3 x PlainStep    target  GXPO / (3 x plain)      <= 1.05
  * active GXPO, optimizer_state=transactional vs 3 x PlainStep    (informational, 1.10 bound)
  * active SFPO (K=3, alpha=0.8, no gate)      vs (K+1) x PlainStep target SFPO / (4 x plain)     <= 1.10
  * GXPO after shutoff (gate forced closed)    vs 1 x PlainStep    target  closed / plain          <= 1.02
  * GXPO's own work: its time outside the closure minus three plain steps' time outside the
    closure, in units of one bare ``optimizer.step()`` (AdamW)                          target  <= 3

With ``--reference DIR/PACKAGE`` (a copy of an older gxpo_lib, imported under its own package name) the
older GXPO runs as a further interleaved unit ("gxpo_ref"), which gives before/after numbers in one run.

Method. All rules share one model, one AdamW and the batch. Before every timed step the trainable
parameters, the optimizer state (moments, step counters) and the gradients are restored in place from a
snapshot, so every repetition does exactly the same work (a warm-up step first allocates the AdamW state
and each rule's buffers). Each repetition times, in a shuffled order, three single PlainSteps and one step
of every rule; the per-repetition ratios use that repetition's own plain steps (their sum is "three
PlainStep updates"), which cancels slow drifts of the machine's load. Results are medians with IQR and a
bootstrap 95% interval of the median ratio. The machine is shared, so repetitions run until a per-case time
budget is spent (at least --min-reps).

Because the forward/backward passes dominate and are noisy, the closure's own time is also recorded: a
rule's *overhead* is its step time minus the time spent inside closure() (clipping, optimizer steps, the
snapshots, the extrapolation). The "projected" ratio (passes x median closure + median overhead of the
rule) / (passes x (median closure + median plain overhead)) is a low-noise estimate of the same target.
A last phase splits GXPO's overhead into its parts by timing wrappers put on one rule instance.

Cases: tiny model + LoRA, tiny model full fine-tuning, "mlp-120" (a CPU MLP of 60 LoRA-like low-rank
residual blocks: 120 small trainable tensors, AdamW; the closure is sized by --mlp-batch), and with
--smollm2 SmolLM2-135M + LoRA (slow on a 2-core CPU: ~45 s per repetition; 1 prompt x 4 there).

Threads: 1 by default, and OMP_WAIT_POLICY=PASSIVE unless set: on the shared, oversubscribed 2-core
machine, 2 spin-waiting OpenMP threads made a tiny-model step 10-50x slower and erratic.

    python bench/bench_update.py                   # tiny LoRA + tiny full + mlp-120, ~6 min
    python bench/bench_update.py --quick           # < 1 min, smoke test
    python bench/bench_update.py --smollm2         # adds SmolLM2-135M + LoRA (+ ~8 min)
    python bench/bench_update.py --cases tiny-lora --budget-s 60 --json out.json
"""

from __future__ import annotations

import os

# Before torch is imported: passive OpenMP waiting (see _benchlib.py; an explicit setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import random
import sys
import time

import torch
from _benchlib import (
    TimedClosure,
    TrainingState,
    bootstrap_median_ci,
    finish_record,
    machine_info,
    make_rollouts,
    make_trainable,
    print_table,
    quiet_transformers,
    setup_torch,
    summary,
    verdict,
    write_json,
)

TARGETS = {"gxpo": 1.05, "gxpo_tx": 1.10, "sfpo": 1.10, "closed": 1.02, "gxpo_ref": 1.05}
OWN_WORK_TARGET = 3.0  # GXPO's own work, in bare optimizer steps
SFPO_K = 3
GXPO_K = 5
CASES = {  # name: (model, lora)
    "tiny-lora": ("tiny", True),
    "tiny-full": ("tiny", False),
    "smollm2-lora": ("smollm2-135m", True),
    "mlp-120": ("mlp", False),
}


def build_rules(optimizer, transactional: bool, reference=None):
    from gxpo_lib import GXPO, SFPO, PlainStep

    rules = {
        "plain": PlainStep(optimizer),
        # A real (default EMA) gate that cannot trip: the gate's bookkeeping is part of an active step.
        "gxpo": GXPO(optimizer, k=GXPO_K, alpha=0.5, tau=1e9),
        "sfpo": SFPO(optimizer, k=SFPO_K, alpha=0.8, gate=None),
        "closed": GXPO(optimizer, k=GXPO_K, alpha=0.5, tau=0.5),
    }
    if transactional:
        rules["gxpo_tx"] = GXPO(optimizer, k=GXPO_K, alpha=0.5, tau=1e9, optimizer_state="transactional")
    if reference is not None:
        rules["gxpo_ref"] = reference.GXPO(optimizer, k=GXPO_K, alpha=0.5, tau=1e9)
    rules["closed"].gate.is_open = False  # forced shut (permanent gate): every step is the plain path
    return rules


EXPECTED = {  # (backward passes, active) of one step of each unit
    "plain": (1, False), "gxpo": (3, True), "gxpo_tx": (3, True), "sfpo": (SFPO_K + 1, True),
    "closed": (1, False), "gxpo_ref": (3, True),
}


def floor_passes(unit: str) -> int:
    return {"gxpo": 3, "gxpo_tx": 3, "gxpo_ref": 3, "sfpo": SFPO_K + 1, "closed": 1}[unit]


class MLPClosure:
    """The "mlp-120" case: 60 LoRA-like residual blocks h <- h + tanh(h A^T) B^T (A [r, d], B [d, r]),
    120 small trainable tensors, an MSE loss on a fixed batch; accumulates its own wall time."""

    def __init__(self, blocks: int, width: int, rank: int, batch: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.params = []
        for _ in range(blocks):
            self.params.append(torch.nn.Parameter(0.02 * torch.randn(rank, width, generator=generator)))
            self.params.append(torch.nn.Parameter(1e-3 * torch.randn(width, rank, generator=generator)))
        self.inputs = torch.randn(batch, width, generator=generator)
        self.targets = torch.randn(batch, width, generator=generator)
        self.seconds, self.calls = 0.0, 0

    def __call__(self):
        start = time.perf_counter()
        h = self.inputs
        for a, b in zip(self.params[::2], self.params[1::2]):
            h = h + torch.tanh(h @ a.T) @ b.T
        loss = torch.nn.functional.mse_loss(h, self.targets)
        loss.backward()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return loss

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def time_optimizer_step(optimizer, params, closure, state) -> float:
    """One bare optimizer.step() (gradients from an untimed closure call), from the snapshot state."""
    state.restore()
    optimizer.zero_grad(set_to_none=False)
    closure()
    t0 = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - t0


def measure_case(name: str, args) -> dict:
    from gxpo_lib.rl.models import load_model

    model_name, lora = CASES[name]
    if model_name == "mlp":
        print(f"\n[{name}] 120 tensors, batch {args.mlp_batch}", flush=True)
        closure = MLPClosure(60, args.mlp_width, 8, args.mlp_batch, args.seed)
        params, model, rollouts = closure.params, None, None
    else:
        prompts, group, new_tokens = ((args.smollm2_prompts, args.smollm2_group, args.smollm2_new_tokens)
                                      if model_name != "tiny" else (args.prompts, args.group, args.new_tokens))
        print(f"\n[{name}] loading {model_name}, sampling {prompts} prompts x {group} (max {new_tokens} new "
              "tokens)", flush=True)
        model, tokenizer = load_model(model_name, device="cpu")
        rollouts, advantages = make_rollouts(model, tokenizer, prompts, group, new_tokens, seed=args.seed)
        model = make_trainable(model, lora, args.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        closure = TimedClosure(model, rollouts, advantages)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    rules = build_rules(optimizer, transactional=not args.no_transactional, reference=args.reference_module)

    # Warm-up: AdamW state, then the snapshot every timed step starts from; then each rule's buffers.
    rules["plain"].step(closure)
    state = TrainingState(params, optimizer)
    gate_state = rules["gxpo"].gate.state_dict()
    for unit, rule in rules.items():
        state.restore()
        info = rule.step(closure)
        check(unit, info)
    budget = args.smollm2_budget_s if model_name == "smollm2-135m" else args.budget_s
    units = ["plain", "plain", "plain", "adamw"] + [u for u in rules if u != "plain"]
    samples: dict[str, list[dict]] = {u: [] for u in list(rules) + ["adamw"]}
    per_rep: list[dict[str, dict]] = []
    order_rng = random.Random(args.seed)
    started = time.perf_counter()
    while len(per_rep) < args.max_reps and (len(per_rep) < args.min_reps or time.perf_counter() - started < budget):
        order = units[:]
        order_rng.shuffle(order)
        rep: dict[str, list[dict]] = {u: [] for u in list(rules) + ["adamw"]}
        for unit in order:
            if unit == "adamw":
                seconds = time_optimizer_step(optimizer, params, closure, state)
                row = {"total": seconds, "closure": 0.0, "passes": 0, "overhead": seconds}
                rep[unit].append(row)
                samples[unit].append(row)
                continue
            state.restore()
            if unit.startswith("gxpo"):
                rules[unit].gate.load_state_dict(gate_state | {"tau": rules[unit].gate.tau})
            closure.reset()
            t0 = time.perf_counter()
            info = rules[unit].step(closure)
            total = time.perf_counter() - t0
            check(unit, info)
            row = {"total": total, "closure": closure.seconds, "passes": closure.calls,
                   "overhead": total - closure.seconds}
            rep[unit].append(row)
            samples[unit].append(row)
        per_rep.append(rep)
        plain3 = sum(r["total"] for r in rep["plain"])
        print(f"[{name}] rep {len(per_rep):>3}  plain {plain3 / 3:7.3f}s  gxpo/3plain "
              f"{rep['gxpo'][0]['total'] / plain3:6.3f}  own/adamw {own_work(rep, 'gxpo'):6.2f}  sfpo/4plain "
              f"{rep['sfpo'][0]['total'] / (plain3 * (SFPO_K + 1) / 3):6.3f}  closed/plain "
              f"{rep['closed'][0]['total'] / (plain3 / 3):6.3f}  ({time.perf_counter() - started:5.0f}s)", flush=True)

    result = {
        "case": name, "model": model_name, "mode": "lora" if lora else "full",
        "trainable_params": sum(p.numel() for p in params),
        "trainable_tensors": len(params), "reps": len(per_rep),
        "measure_seconds": round(time.perf_counter() - started, 1),
        "units": {u: {k: summary([r[k] for r in rows]) for k in ("total", "closure", "overhead")}
                  for u, rows in samples.items()},
    }
    closure_per_pass = summary([r["closure"] / r["passes"] for rows in samples.values() for r in rows
                                if r["passes"]])["median"]
    plain_overhead = result["units"]["plain"]["overhead"]["median"]
    plain_median = result["units"]["plain"]["total"]["median"]
    ratios, own = {}, {}
    for unit in rules:
        if unit == "plain":
            continue
        if unit in ("gxpo", "gxpo_tx", "gxpo_ref"):
            values = [own_work(rep, unit) for rep in per_rep]
            own[unit] = {
                "baseline": "1 x optimizer.step()", "target": OWN_WORK_TARGET, "per_rep": summary(values),
                "ci95": list(bootstrap_median_ci(values, seed=args.seed)),
                "verdict": verdict(summary(values)["median"], bootstrap_median_ci(values, seed=args.seed),
                                   OWN_WORK_TARGET)}
        n = floor_passes(unit)
        values = [rep[unit][0]["total"] / (sum(r["total"] for r in rep["plain"]) / 3 * n) for rep in per_rep]
        stats = summary(values)
        ci = bootstrap_median_ci(values, seed=args.seed)
        overhead = result["units"][unit]["overhead"]["median"]
        projected = (n * closure_per_pass + overhead) / (n * (closure_per_pass + plain_overhead))
        ratios[unit] = {
            "baseline": f"{n} x PlainStep", "target": TARGETS[unit], "per_rep": stats, "ci95": list(ci),
            "ratio_of_medians": result["units"][unit]["total"]["median"] / (n * plain_median),
            "projected": projected, "verdict": verdict(stats["median"], ci, TARGETS[unit]),
            "projected_verdict": "pass" if projected <= TARGETS[unit] else "FAIL",
            "overhead_s": overhead, "extra_overhead_vs_floor_s": overhead - n * plain_overhead,
        }
    result.update(ratios=ratios, own_work=own, closure_per_pass_s=closure_per_pass, plain_overhead_s=plain_overhead,
                  optimizer_step_s=result["units"]["adamw"]["total"]["median"])
    if rollouts is not None:
        result.update(rows=len(rollouts.completions), prompt_length=rollouts.prompt_ids.shape[1],
                      completion_length=rollouts.completion_ids.shape[1],
                      completion_tokens=int(rollouts.completion_mask.sum()))
    result["gxpo_breakdown"] = breakdown(rules, state, closure, gate_state, args.breakdown_steps)
    del model, optimizer, rules, state
    return result


def own_work(rep: dict, unit: str) -> float:
    """GXPO's own work in one repetition: its time outside the closure minus three plain steps' time
    outside the closure, in units of that repetition's bare optimizer step."""
    plain_outside = sum(r["overhead"] for r in rep["plain"]) / len(rep["plain"])
    return (rep[unit][0]["overhead"] - 3 * plain_outside) / rep["adamw"][0]["total"]


def check(unit: str, info) -> None:
    passes, active = EXPECTED[unit]
    if info.backward_passes != passes or info.active != active or info.fallback or info.skipped:
        raise RuntimeError(f"{unit}: unexpected step {info.backward_passes} passes, active={info.active}, "
                           f"fallback={info.fallback}, skipped={info.skipped}: the timing would be wrong")


def breakdown(rules, state, closure, gate_state, steps: int) -> dict:
    """Where an active GXPO step's time goes: timing wrappers on one rule instance (and plain for scale)."""
    spent: dict[str, float] = {}

    def timed(label, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - t0
        return wrapper

    out = {}
    for unit in ("plain", "gxpo"):
        rule = rules[unit]
        optimizer = rule.optimizer
        originals = {"norm": torch.nn.utils.get_total_norm}
        patched = ["_save_params", "_jump", "_cos_g0_gslow", "_snapshot_optimizer",
                   "_restore_optimizer", "_load_params", "_relative_thresholds"]
        for attr in patched:
            if hasattr(rule, attr):
                setattr(rule, attr, timed(attr, getattr(rule, attr)))
        optimizer.step = timed("optimizer.step", optimizer.step)
        torch.nn.utils.get_total_norm = timed("get_total_norm (every pass)", originals["norm"])
        rows = []
        try:
            for _ in range(steps):
                state.restore()
                if unit == "gxpo":
                    rule.gate.load_state_dict(gate_state)
                spent.clear()
                closure.reset()
                t0 = time.perf_counter()
                rule.step(closure)
                total = time.perf_counter() - t0
                rows.append(dict(spent, total=total, **{"closure (forward+backward)": closure.seconds}))
        finally:
            for attr in patched:
                rule.__dict__.pop(attr, None)
            del optimizer.step
            torch.nn.utils.get_total_norm = originals["norm"]
        keys = sorted({k for r in rows for k in r})
        medians = {k: summary([r.get(k, 0.0) for r in rows])["median"] for k in keys}
        measured = sum(v for k, v in medians.items() if k not in ("total",))
        medians["other (rule bookkeeping, clip, zero_grad, info)"] = medians["total"] - measured
        out[unit] = medians
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny cases, small batch, ~10 s each (< 1 min)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=None,
                        help="default: tiny-lora tiny-full (+ smollm2-lora with --smollm2)")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M + LoRA (minutes per rep here)")
    parser.add_argument("--prompts", type=int, default=4, help="tiny: prompts in the mini-batch")
    parser.add_argument("--group", type=int, default=8, help="tiny: completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=24, help="tiny: max new tokens")
    parser.add_argument("--smollm2-prompts", type=int, default=1)
    parser.add_argument("--smollm2-group", type=int, default=4)
    parser.add_argument("--smollm2-new-tokens", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=100.0, help="tiny: seconds of repetitions per case")
    parser.add_argument("--smollm2-budget-s", type=float, default=420.0)
    parser.add_argument("--min-reps", type=int, default=5)
    parser.add_argument("--max-reps", type=int, default=200)
    parser.add_argument("--breakdown-steps", type=int, default=3)
    parser.add_argument("--no-transactional", action="store_true", help="skip the transactional GXPO unit")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--mlp-batch", type=int, default=512, help="mlp-120: rows of the batch (sizes the closure)")
    parser.add_argument("--mlp-width", type=int, default=256, help="mlp-120: width d (tensors are 8 x d, d x 8)")
    parser.add_argument("--reference", default=None,
                        help="DIR/PACKAGE: an older copy of gxpo_lib whose GXPO runs as unit gxpo_ref")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the most stable timings on this shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="default bench/results/update[_quick].json")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.group, args.new_tokens = 2, 4, 12
        args.budget_s, args.min_reps, args.breakdown_steps = 6.0, 3, 2
        args.smollm2_budget_s = 30.0
        args.smollm2_prompts, args.smollm2_group, args.smollm2_new_tokens = 1, 2, 8
    cases = args.cases or (["tiny-lora", "tiny-full", "mlp-120"] + (["smollm2-lora"] if args.smollm2 else []))
    args.reference_module = None
    if args.reference:
        import importlib
        from pathlib import Path
        reference = Path(args.reference).resolve()
        sys.path.insert(0, str(reference.parent))
        args.reference_module = importlib.import_module(f"{reference.name}.rules")
    quiet_transformers()
    setup_torch(args.threads, args.seed)
    started = time.perf_counter()
    record = {"benchmark": "update", "argv": sys.argv[1:], "settings": vars(args), "machine": machine_info(),
              "targets": TARGETS, "cases": []}
    for name in cases:
        record["cases"].append(measure_case(name, args))
        finish_record(record, started)
        path = write_json(record, args.json, "update_quick" if args.quick else "update")  # partial results too
    report(record)
    print(f"\nwrote {path}  ({record['machine']['wall_seconds']} s, load {record['machine']['loadavg_start']} -> "
          f"{record['machine']['loadavg_end']})")


def report(record: dict) -> None:
    rows = []
    for case in record["cases"]:
        for unit, r in case["ratios"].items():
            rows.append({"case": case["case"], "rule": unit, "baseline": r["baseline"], "reps": case["reps"],
                         "median": r["per_rep"]["median"],
                         "iqr": f"{r['per_rep']['q25']:.3f}-{r['per_rep']['q75']:.3f}",
                         "ci": f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}", "rom": r["ratio_of_medians"],
                         "proj": r["projected"], "target": f"<= {r['target']:.2f}", "verdict": r["verdict"],
                         "pverdict": r["projected_verdict"]})
    print_table(rows, [("case", "case", ""), ("rule", "rule", ""), ("baseline", "vs", ""), ("reps", "reps", "d"),
                       ("median", "ratio (median)", ".3f"), ("iqr", "IQR", ""), ("ci", "95% CI", ""),
                       ("rom", "ratio of medians", ".3f"), ("proj", "projected", ".4f"), ("target", "target", ""),
                       ("verdict", "verdict (measured)", ""), ("pverdict", "verdict (projected)", "")],
                title="Update cost: rule step / floor of plain steps, per repetition (interleaved)")
    rows = [{"case": case["case"], "rule": unit, "reps": case["reps"], "median": r["per_rep"]["median"],
             "iqr": f"{r['per_rep']['q25']:.2f}-{r['per_rep']['q75']:.2f}",
             "ci": f"{r['ci95'][0]:.2f}-{r['ci95'][1]:.2f}",
             "opt_ms": case["optimizer_step_s"] * 1e3, "target": f"<= {r['target']:.0f}", "verdict": r["verdict"]}
            for case in record["cases"] for unit, r in case.get("own_work", {}).items()]
    print_table(rows, [("case", "case", ""), ("rule", "rule", ""), ("reps", "reps", "d"),
                       ("median", "own work / optimizer step", ".2f"), ("iqr", "IQR", ""), ("ci", "95% CI", ""),
                       ("opt_ms", "optimizer step ms", ".2f"), ("target", "target", ""), ("verdict", "verdict", "")],
                title="GXPO's own work (outside the closure, beyond 3 plain steps) in bare optimizer steps")
    rows = []
    for case in record["cases"]:
        for unit, u in case["units"].items():
            rows.append({"case": case["case"], "unit": unit, "total": u["total"]["median"] * 1e3,
                         "iqr": u["total"]["iqr"] * 1e3, "closure": u["closure"]["median"] * 1e3,
                         "overhead": u["overhead"]["median"] * 1e3, "n": u["total"]["n"]})
    print_table(rows, [("case", "case", ""), ("unit", "step", ""), ("n", "n", "d"), ("total", "median ms", ".1f"),
                       ("iqr", "IQR ms", ".1f"), ("closure", "in closure ms", ".1f"),
                       ("overhead", "outside closure ms", ".2f")],
                title="Step times (median over repetitions; 'outside closure' = the rule's own cost)")
    for case in record["cases"]:
        bd = case["gxpo_breakdown"]
        keys = sorted(set(bd["gxpo"]) | set(bd["plain"]), key=lambda k: -bd["gxpo"].get(k, 0.0))
        rows = [{"part": k, "plain": bd["plain"].get(k), "gxpo": bd["gxpo"].get(k),
                 "share": bd["gxpo"].get(k, 0.0) / bd["gxpo"]["total"] * 100} for k in keys]
        for r in rows:
            r["plain"] = None if r["plain"] is None else r["plain"] * 1e3
            r["gxpo"] = None if r["gxpo"] is None else r["gxpo"] * 1e3
        print_table(rows, [("part", "part of one step", ""), ("plain", "PlainStep ms", ".2f"),
                           ("gxpo", "GXPO ms", ".2f"), ("share", "% of GXPO step", ".2f")],
                    title=f"[{case['case']}] where the time goes (median of {record['settings']['breakdown_steps']} "
                          f"instrumented steps; {case['trainable_tensors']} trainable tensors, "
                          f"{case['trainable_params']:,} parameters)")


if __name__ == "__main__":
    main()
