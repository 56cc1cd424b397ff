"""`train(config, workdir)` on 2 FSDP2 ranks (gloo, CPU), as torchrun would run it (run by tests/test_fsdp2_trainer.py).

    python tests/fsdp2_trainer_script.py --out DIR [--port N]

Spawns 2 ranks with the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and a gloo
process group of the script's own (so `train` leaves it up and the final weights can be gathered). Every
run trains the shipped tiny model in float64 (given to `train` as ``model_and_tokenizer``). The cases
(`CASES`) are shared with the test, which runs their one-process references (``prompt_shares=2``).
For each case rank 0 writes DIR/<case>/params.pt (the trainable weights, gathered whole) and every run
records each rank's train rows; DIR/result.json holds, per case, whether the ranks' rows (StepInfo, gate
decisions, statistics; times aside) are identical and rank 0's rows. The resume cases: "resume" trains 2
steps (no final evaluation: as if killed after step 2's checkpoint), then resumes to 3 from the step_2 DCP
checkpoint; "resume_damaged" copies the 2-step folder, makes
step_2's shards garbage and resumes (from step_1, with a warning).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORLD = 2
TIME_KEYS = {"seconds", "seconds_sampling", "seconds_scoring", "seconds_update", "seconds_eval", "cpu_seconds"}
BASE = dict(batch_prompts=4, group_size=4, max_new_tokens=16, temperature=1.5, eval_every=2, eval_problems=3,
            eval_samples=2, checkpoint_every=1, seed=5, lr=2e-3, rollout_backend="hf")
CASES = {   # name: settings (3 steps unless said)
    "gxpo_full": dict(algorithm="gxpo", lora=False, steps=3, k=3, final_eval_sets=("arith",),
                      final_eval_problems=3, final_eval_samples=1),
    "grpo_full_kl": dict(algorithm="grpo", lora=False, steps=2, loss_type="grpo", kl_beta=0.05),
    "sfpo_lora_dapo": dict(algorithm="sfpo", lora=True, steps=2, k=2, loss_type="dapo", lr=2e-2),
}
RESUMED = "gxpo_full"   # the "resume" cases stop this one after 2 steps and resume it to 3


def config(case: str, **changes):
    from gxpo_lib.rl.trainer import TrainConfig

    return TrainConfig(**(BASE | CASES[case] | changes))


def float64_tiny():
    from gxpo_lib.rl.models import load_model

    model, tokenizer = load_model("tiny", device="cpu")
    return model.double(), tokenizer


def stripped(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIME_KEYS}


@torch.no_grad()
def whole_params(model) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).clone()
            for n, p in model.named_parameters() if p.requires_grad}


def run(case: str, workdir: str, out: str, rank: int, **changes) -> dict:
    """One `train` call on this rank; the rows every rank computed (through train_step) and rank 0's params."""
    from gxpo_lib.rl import trainer

    rows: list[dict] = []
    original = trainer.train_step

    def recording(state, step):
        row = original(state, step)
        rows.append(stripped(row))
        return row

    trainer.train_step = recording
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = trainer.train(config(case, **changes), workdir, model_and_tokenizer=float64_tiny(),
                                        progress=False)
    finally:
        trainer.train_step = original
    params = whole_params(summary["model"])   # a collective: every rank
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        torch.save(params, os.path.join(out, "params.pt"))
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, json.dumps(rows))
    return {"ranks_identical": all(r == everyone[0] for r in everyone), "rows": rows,
            "last_eval_same": _same(stripped(summary["last_eval"] or {})), "warnings": [str(w.message) for w in caught
                                                                       if "moved it aside" in str(w.message)]}


def _same(value) -> bool:
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, json.dumps(value, sort_keys=True, default=str))
    return all(v == everyone[0] for v in everyone)


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {}
        for case in CASES:
            result[case] = run(case, os.path.join(out, "runs", case), os.path.join(out, case), rank)
        # Killed after step 2 (the 2-step run ends there), resumed to step 3 from its DCP checkpoint.
        folder, damaged = os.path.join(out, "runs", "resume"), os.path.join(out, "runs", "resume_damaged")
        result["stopped"] = run(RESUMED, folder, os.path.join(out, "stopped"), rank, steps=2, final_eval_sets=())
        if rank == 0:
            shutil.copytree(folder, damaged)
            for shard in os.listdir(os.path.join(damaged, "checkpoints", "step_000002")):
                if shard.endswith(".distcp"):
                    with open(os.path.join(damaged, "checkpoints", "step_000002", shard), "wb") as handle:
                        handle.write(b"\x00\xff garbage " * 64)
        dist.barrier()
        result["checkpoint_dirs"] = sorted(os.listdir(os.path.join(folder, "checkpoints")))
        result["resume"] = run(RESUMED, folder, os.path.join(out, "resume"), rank)
        result["resume_damaged"] = run(RESUMED, damaged, os.path.join(out, "resume_damaged"), rank)
        result["damaged_dirs"] = sorted(os.listdir(os.path.join(damaged, "checkpoints")))
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
