"""PlainStep, GXPO and SFPO on FSDP2 shards vs one unsharded process (run by tests/test_fsdp2.py).

    python tests/fsdp2_script.py --out DIR [--port N]

Spawns 2 CPU ranks (gloo, localhost). Every rank builds the same float64 MLP (uneven shapes: a [33, 7]
weight splits 17/16 rows, a [1, 5] weight and its [1] bias leave rank 1 with empty shards), then for each
case runs the rule twice: on an unsharded copy over the whole batch (the reference, no collectives) and
on a ``fully_shard`` copy whose rank r sees half r of the batch (FSDP2 averages the two halves' gradients,
the whole batch's mean). It records the largest parameter difference, whether every rank's StepInfo is
identical, and the largest StepInfo difference to the reference. A last case checkpoints with
torch.distributed.checkpoint (model + optimizer + rule.state_dict()) after 2 of 4 steps, resumes in fresh
objects and compares with the uninterrupted run. Rank 0 writes DIR/result.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gxpo_lib import GXPO, SFPO, PlainStep

BATCH, WORLD = 8, 2
ENTROPY = [1.0, 1.1, 1.0, 1.05, 1.02, 6.0, 1.0, 1.0]  # a surge at step 6 closes the entropy gates


def build_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 1)).double()


def shard(model: torch.nn.Sequential) -> torch.nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def batch(step: int, minibatch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + minibatch)
    x = torch.randn(BATCH, 7, generator=g, dtype=torch.float64)
    return x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(BATCH, 1, generator=g, dtype=torch.float64)


class Closures:
    """Closure factory: the whole batch (reference) or this rank's half (sharded); pass `nan_pass` sees a NaN."""

    def __init__(self, model, rank: int | None, nan_pass: int | None = None):
        self.model, self.rank, self.nan_pass, self.passes = model, rank, nan_pass, 0

    def __call__(self, step: int, minibatch: int = 0):
        def closure():
            self.passes += 1
            x, y = batch(step, minibatch)
            if self.passes == self.nan_pass:
                x = x.clone()
                x[-1, 0] = float("nan")  # a row of the second half: rank 1's
            if self.rank is not None:
                half = BATCH // WORLD
                x, y = x[self.rank * half:(self.rank + 1) * half], y[self.rank * half:(self.rank + 1) * half]
            loss = (self.model(x) - y).pow(2).mean()
            loss.backward()
            return loss
        return closure


def make_rule(case: str, model):
    params = list(model.parameters())
    adamw = lambda: torch.optim.AdamW(params, lr=2e-2, weight_decay=0.01)
    sgd = lambda: torch.optim.SGD(params, lr=0.2, momentum=0.5, weight_decay=0.01)
    return {
        "plain_sgd": lambda: PlainStep(sgd(), max_grad_norm=0.5),
        "plain_adamw": lambda: PlainStep(adamw(), max_grad_norm=0.5),
        "gxpo_adamw": lambda: GXPO(adamw(), k=5, alpha=0.5, max_grad_norm=1.0, tau=0.5),
        "gxpo_sgd": lambda: GXPO(torch.optim.SGD(params, lr=0.2), k=4, alpha=0.5, max_grad_norm=0.5, tau=0.3,
                                 init="warmup", warmup=2),
        "gxpo_v1_sgd": lambda: GXPO.from_version("v1", torch.optim.SGD(params, lr=0.2), k=5, alpha=0.5),
        "gxpo_v5_adamw": lambda: GXPO.from_version("v5", adamw(), k=5, alpha=0.5, window=2, patience=1, tau=3.0),
        "gxpo_fallback_adamw": lambda: GXPO(adamw(), k=5, alpha=0.5, optimizer_state="transactional",
                                            q_mode="scalar", gate=None),
        "sfpo_adamw": lambda: SFPO(adamw(), k=3, alpha=0.8, gate="default", signal="entropy", mode="window",
                                   window=2, warmup=0, tau=3.0),
        "sfpo_sgd": lambda: SFPO(sgd(), k=2, alpha=0.8, gate=None),
    }[case]()


CASES = {  # case: (steps, mini-batches per step (SFPO sweeps), pass that sees a NaN)
    "plain_sgd": (4, 1, None), "plain_adamw": (4, 1, None), "gxpo_adamw": (6, 1, None), "gxpo_sgd": (5, 1, None),
    "gxpo_v1_sgd": (4, 1, None), "gxpo_v5_adamw": (8, 1, None), "gxpo_fallback_adamw": (4, 1, 5),
    "sfpo_adamw": (7, 2, None), "sfpo_sgd": (3, 1, None),
}


def run_steps(rule, closures: Closures, steps, minibatches: int, rank: int | None) -> list[dict]:
    infos = []
    for step in steps:
        signal = ENTROPY[step]
        if rank is not None:  # each rank's own entropy; their mean is the reference's
            signal += 0.01 * (1 if rank == 0 else -1)
        gate = getattr(rule, "gate", None)
        entropy = signal if gate is not None and gate.signal == "entropy" else None
        if minibatches > 1:
            info = rule.step_sweeps([closures(step, m) for m in range(minibatches)], gate_signal=entropy)
        else:
            info = rule.step(closures(step), gate_signal=entropy)
        infos.append(info.to_dict())
    return infos


@torch.no_grad()
def full_params(model) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def info_difference(a: list[dict], b: list[dict]) -> tuple[float, list[str]]:
    """Largest |x - y| / max(1, |y|) over the float fields; the fields whose None-ness or bools/ints differ."""
    worst, mismatched = 0.0, []
    for row_a, row_b in zip(a, b, strict=True):
        for key, x in row_a.items():
            y = row_b[key]
            if isinstance(x, float) and isinstance(y, float):
                if math.isfinite(x) or math.isfinite(y):
                    worst = max(worst, abs(x - y) / max(1.0, abs(y)))
            elif x != y:
                mismatched.append(f"step {row_a['step']} {key}: {x!r} vs {y!r}")
    return worst, mismatched


def same_on_every_rank(infos: list[dict]) -> bool:
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, json.dumps(infos))  # NaN/inf survive json.dumps; exact float repr
    return all(g == gathered[0] for g in gathered)


def run_case(case: str, rank: int) -> dict:
    steps, minibatches, nan_pass = CASES[case]
    base = build_model()
    reference, sharded = copy.deepcopy(base), shard(copy.deepcopy(base))
    ref_rule, rule = make_rule(case, reference), make_rule(case, sharded)
    ref_infos = run_steps(ref_rule, Closures(reference, None, nan_pass), range(steps), minibatches, None)
    infos = run_steps(rule, Closures(sharded, rank, nan_pass), range(steps), minibatches, rank)
    diff = max(float((a - b).abs().max()) for a, b in zip(full_params(sharded), full_params(reference)))
    info_diff, mismatched = info_difference(infos, ref_infos)
    return {"param_max_abs_diff": diff, "info_max_rel_diff": info_diff, "info_mismatches": mismatched,
            "ranks_identical": same_on_every_rank(infos), "reducer": rule.reducer is not None,
            "active": [i["active"] for i in infos], "gate_open": [i["gate_open"] for i in infos],
            "fallback": [i["fallback"] for i in infos], "param_scale": max(float(p.abs().max())
                                                                           for p in full_params(reference))}


def run_checkpoint(rank: int, folder: str) -> dict:
    """GXPO (v5 options: transactional DTensor snapshots) 2 steps, DCP save, 2 steps; vs resume from the save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def fresh():
        model = shard(build_model())
        return model, make_rule("gxpo_v5_adamw", model)

    model, rule = fresh()
    closures = Closures(model, rank)
    run_steps(rule, closures, range(2), 1, rank)
    model_state, optim_state = get_state_dict(model, rule.optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state, "rule": json.dumps(rule.state_dict())},
             checkpoint_id=folder)
    straight = run_steps(rule, closures, range(2, 8), 1, rank)  # the gate closes after step 6
    model2, rule2 = fresh()
    model_state, optim_state = get_state_dict(model2, rule2.optimizer)
    state = {"model": model_state, "optimizer": optim_state, "rule": ""}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(model2, rule2.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rule2.load_state_dict(json.loads(state["rule"]))
    resumed = run_steps(rule2, Closures(model2, rank), range(2, 8), 1, rank)
    diff = max(float((a - b).abs().max()) for a, b in zip(full_params(model), full_params(model2)))
    info_diff, mismatched = info_difference(resumed, straight)
    return {"param_max_abs_diff": diff, "info_max_rel_diff": info_diff, "info_mismatches": mismatched,
            "gate_open": [i["gate_open"] for i in straight]}


def mixed_parameters_error(rank: int) -> str:
    """The ValueError for an optimizer over sharded and plain parameters (its message)."""
    model = shard(build_model())
    try:
        PlainStep(torch.optim.SGD([*model.parameters(), torch.nn.Parameter(torch.zeros(3))], lr=0.1))
    except ValueError as error:
        return str(error)
    return ""


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {case: run_case(case, rank) for case in CASES}
        result["checkpoint"] = run_checkpoint(rank, os.path.join(out, "checkpoint"))
        result["mixed_error"] = mixed_parameters_error(rank)
        if rank == 0:
            with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as handle:
                json.dump(result, handle, indent=1)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    mp.spawn(worker, args=(args.port or free_port(), args.out), nprocs=WORLD, join=True)
