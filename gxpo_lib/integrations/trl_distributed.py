"""GXPOTrainer over several processes: which update runs under each accelerate backend, how DDP ranks
agree, and accelerate's FSDP2 (``fsdp_version: 2``).

- DDP (``multi_gpu.yaml``): every rank holds whole parameters and DDP all-reduces each pass's gradients;
  `ReducedGate` averages the gate's statistic over the ranks, `agree_on_finite_grads` makes a non-finite
  gradient on one rank non-finite on all, and `check_ranks_agree` raises if the ranks' decisions differ.
- FSDP2 (``fsdp2.yaml``): accelerate's ``fully_shard`` turns the optimizer's parameters into DTensors, so the
  rule builds its buffers over each rank's local shards and all-reduces its few global quantities itself
  (``gxpo_lib.core.distributed``: the pre-clip norm of every pass, which clipping, the fallback checks and the
  gate read; the loss; the diagnostic sums; an entropy gate's signal). No `ReducedGate` and no finite-flag
  exchange then: the global norm is already the same number on every rank. FSDP2's reduce-scatter averages
  the ranks' gradients, as DDP does, so the loss weights (``loss_aggregation="exact"``) are DDP's.
  HF ``generate`` is told the model is FSDP-managed (`mark_synced_generation`), so every rank keeps decoding
  until all are done and the all-gathers stay in lockstep.
- DeepSpeed and FSDP1 own the gradients and the step: only ``algorithm="grpo"`` runs there (TRL's own step);
  gxpo / sfpo are a ValueError that points to FSDP2 (`update_backend`).

accelerate 1.16 enables FSDP only on an accelerator (CUDA, XPU, NPU, ...): on a CPU it picks ``MULTI_CPU``
and drops the FSDP plugin, so a CPU launch with an FSDP config trains as DDP (`fsdp_dropped` warns).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch

from gxpo_lib.core.gate import ShutoffGate

FSDP2_CONFIG_HINT = ("shard with FSDP2 instead: accelerate config `distributed_type: FSDP` with "
                     "`fsdp_config: {fsdp_version: 2}` (shipped: launch_trl(..., accelerate_config=\"fsdp2\"); "
                     "docs/gpu.md 'GXPO on FSDP2 shards'), or DDP (accelerate_config=\"multi_gpu\") with LoRA")


def update_backend(algorithm: str, deepspeed: bool, fsdp_version: int | None) -> bool:
    """Whether TRL's own update runs (True: DeepSpeed, FSDP1) or a gxpo_lib rule (False: one process, DDP,
    FSDP2). ValueError naming `algorithm` for gxpo / sfpo under DeepSpeed or FSDP1, pointing to FSDP2."""
    native = bool(deepspeed or fsdp_version == 1)
    if native and algorithm != "grpo":
        backend = "DeepSpeed" if deepspeed else "FSDP1 (fsdp_version: 1)"
        raise ValueError(f"algorithm={algorithm!r} is invalid under {backend} through TRL: allowed 'grpo' "
                         f"(TRL's own step: {backend} owns the gradients and the optimizer step, so a rule "
                         f"cannot take GXPO's probe steps). For gxpo and sfpo {FSDP2_CONFIG_HINT}")
    return native


def fsdp_version(accelerator) -> int | None:
    """1 or 2 when accelerate runs FSDP, else None."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return None if plugin is None else int(getattr(plugin, "fsdp_version", 1) or 1)


def fsdp_dropped(accelerator) -> bool:
    """True (and a warning) when the launch asked for FSDP (``ACCELERATE_USE_FSDP``) but accelerate runs
    without it: accelerate 1.16 enables FSDP on accelerators only, so CPU ranks train as DDP, unsharded."""
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or fsdp_version(accelerator) is not None:
        return False
    warnings.warn(f"the launch asks for FSDP but accelerate runs {accelerator.distributed_type} on "
                  f"{accelerator.device}: accelerate enables FSDP on accelerators (CUDA, XPU, NPU, ...) only, "
                  "so these ranks train as DDP with whole parameters on every rank", RuntimeWarning,
                  stacklevel=3)
    return True


def check_sharded(rule) -> None:
    """Under FSDP2 the rule must see DTensor shards (else its norms would be one rank's); else RuntimeError."""
    if rule.reducer is None:
        raise RuntimeError("FSDP2 is on but the optimizer's parameters are plain tensors: the rule would read "
                           "one rank's gradients as the whole; build the optimizer after accelerator.prepare "
                           "(the Trainer does) so it holds the sharded parameters")


def mark_synced_generation(model: torch.nn.Module) -> None:
    """Mark every submodule FSDP-managed for HF ``generate`` (transformers' ``is_fsdp_managed_module`` ->
    ``synced_gpus=True``), which accelerate's FSDP2 does not do: without it a rank whose sequences all ended
    stops decoding while another still all-gathers its layers."""
    for module in model.modules():
        module._is_fsdp_managed_module = True


def fsdp_checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with the sharded part of a TRL checkpoint under FSDP (None when intact, or when the
    folder holds none): every ``pytorch_model_fsdp_*`` / ``optimizer_*`` DCP folder needs its ``.metadata``
    (written last, by rank 0, once every rank's shards are written)."""
    for path in sorted(folder.glob("pytorch_model_fsdp_*")) + sorted(folder.glob("optimizer_*")):
        if path.is_dir() and not (path / ".metadata").is_file():
            return f"{path.name}/.metadata (the sharded checkpoint's index) is missing: a save cut short"
    return None


def has_fsdp_weights(folder: Path) -> bool:
    """Whether a TRL checkpoint holds FSDP-sharded model weights (a ``pytorch_model_fsdp_*`` DCP folder)."""
    return any(p.is_dir() for p in folder.glob("pytorch_model_fsdp_*"))


# ---------------------------------------------------------------------------------------------------
# DDP: the ranks agree on what the rule decides
# ---------------------------------------------------------------------------------------------------
class ReducedGate(ShutoffGate):
    """A ShutoffGate that scores the mean of its observation over all ranks (same decision everywhere)."""

    def __init__(self, reduce, **settings):
        super().__init__(**settings)
        self.reduce = reduce

    @classmethod
    def wrapping(cls, gate: ShutoffGate, reduce) -> ReducedGate:
        reduced = cls(reduce, **gate.settings())
        reduced.load_state_dict(gate.state_dict())
        return reduced

    def observe(self, value: float, step: int | None = None) -> float:
        return super().observe(self.reduce(float(value)), step=step)


def mean_over_ranks(accelerator, value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(tensor, reduction="mean")[0])


def agree_on_finite_grads(accelerator, params: list[torch.Tensor]) -> None:
    """DDP: if any rank's gradient is non-finite, make it non-finite on every rank (same fallback)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    local_bad = bool(grads) and not math.isfinite(float(torch.nn.utils.get_total_norm(grads)))
    flag = torch.tensor([float(local_bad)], device=accelerator.device)
    if float(accelerator.gather(flag).max()) > 0 and not local_bad and grads:
        grads[0].view(-1)[0] = float("nan")


def check_ranks_agree(accelerator, info) -> None:
    """Every rank must have taken the same decisions this step; raise if not."""
    if accelerator.num_processes == 1:
        return
    local = torch.tensor([float(info.active), float(info.fallback), float(info.skipped),
                          float(info.gate_open), float(info.backward_passes)], device=accelerator.device)
    every = accelerator.gather(local).view(accelerator.num_processes, -1)
    if not bool((every == every[0]).all()):
        raise RuntimeError(f"ranks diverged at step {info.step}: (active, fallback, skipped, gate_open, "
                           f"backward_passes) per rank = {every.tolist()}")
