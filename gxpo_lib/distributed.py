"""The rules on sharded parameters: FSDP2 (``torch.distributed.fsdp.fully_shard``) DTensors.

GXPO's math is elementwise plus a few global sums, so it runs on each rank's local shard unchanged: the
rules build their flat work buffers (`extrapolation.FlatLayout`) over the local shards (``param.to_local()``,
``grad.to_local()``) and a `ShardReducer` all-reduces the handful of global quantities at a few sync points:

- each pass's pre-clip gradient norm (a SUM of squared sums: clipping, the non-finite / vanishing checks and
  the gate all read it) and the pass's loss (the mean over ranks, so StepInfo.loss is the whole batch's);
- the extrapolation's diagnostic sums (r mean/std, q sums, active counts, displacement and parameter norms,
  cos(g0, g1)) in one SUM, and q_max in one MAX; cos(g0, g_slow), the q-bar of ``q_mode="scalar"``, V5's
  per-tensor RMS thresholds and every ||theta - reference|| (update_norm, probe_step_norm, corrective_norm);
- an entropy gate's caller-given signal (the mean over ranks).

Every rank therefore computes the same StepInfo and its gate takes the same decisions. A rank whose shard
of a tensor is empty (uneven sharding: a [1, n] weight on 2 ranks) contributes zeros. Unsharded parameters
(plain tensors) get no reducer at all: that path is the single-process code, bit for bit.

Sums run over the mesh dimensions the parameters are sharded on (``Shard`` placements); the loss and the
gate signal are averaged over every rank of the mesh (HSDP's replicas included).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

try:  # torch >= 2.4; older torch has no public DTensor (then nothing is ever sharded)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(x: Any) -> bool:
    return DTensor is not None and isinstance(x, DTensor)


def local(x: torch.Tensor) -> torch.Tensor:
    """The rank's own shard of a DTensor, detached (it shares the DTensor's storage); a plain tensor as is."""
    return x.to_local().detach() if is_dtensor(x) else x


class ShardReducer:
    """All-reduces a rule's global quantities over the ranks a set of DTensor parameters is sharded on.

    Args:
        mesh: the parameters' ``DeviceMesh``.
        placements: their placements (one per mesh dimension): SUM/MAX run over the ``Shard`` dimensions,
            `mean_over_ranks` over every dimension.
    """

    def __init__(self, mesh, placements: Sequence[Any]):
        self.mesh = mesh
        self.shard_groups = [mesh.get_group(d) for d, p in enumerate(placements) if p.is_shard()]
        self.rank_groups = [mesh.get_group(d) for d in range(mesh.ndim)]
        self.world_size = int(mesh.size())

    def _all_reduce(self, values: torch.Tensor, op, groups) -> torch.Tensor:
        for group in groups:
            dist.all_reduce(values, op=op, group=group)
        return values

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """SUM over the shards (in place; returned). values: any shape, float64 recommended."""
        return self._all_reduce(values, dist.ReduceOp.SUM, self.shard_groups)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """MAX over the shards (in place; returned)."""
        return self._all_reduce(values, dist.ReduceOp.MAX, self.shard_groups)

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over every rank of the mesh (in place; returned)."""
        return self._all_reduce(values, dist.ReduceOp.SUM, self.rank_groups).div_(self.world_size)

    def sum_float(self, value: torch.Tensor | float, device) -> float:
        """One number (a local sum) summed over the shards, as a Python float."""
        tensor = torch.as_tensor(value, dtype=torch.float64).to(device).reshape(1).clone()
        return float(self.sum(tensor)[0])

    def mean_float(self, value: float | None, device) -> float | None:
        """One number averaged over every rank (None stays None: the caller's choice, the same everywhere)."""
        if value is None:
            return None
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
        return float(self.mean_over_ranks(tensor)[0])

    def pass_totals(self, loss: float | None, square: torch.Tensor) -> tuple[float | None, float]:
        """One backward pass's (loss mean over ranks, global gradient norm) from this rank's loss and squared
        gradient sum (a 0-dim float64 tensor); one collective when the mesh is 1-D (FSDP), two with HSDP."""
        device = square.device
        if self.shard_groups == self.rank_groups:
            values = torch.stack([square.reshape(()), torch.tensor(0.0 if loss is None else loss,
                                                                  dtype=torch.float64, device=device)])
            self.sum(values)
            return (None if loss is None else float(values[1]) / self.world_size), float(values[0]) ** 0.5
        norm = float(self.sum(square.reshape(1).clone())[0]) ** 0.5
        return self.mean_float(loss, device), norm


def reducer_for(params: Sequence[torch.Tensor]) -> ShardReducer | None:
    """None for plain parameters; a `ShardReducer` when every parameter is a DTensor on one mesh.

    Raises ValueError (naming `optimizer`) when plain tensors and DTensors are mixed, when the parameters
    live on different meshes or placements, or when a placement is neither Shard nor Replicate.
    """
    sharded = [is_dtensor(p) for p in params]
    if not any(sharded):
        return None
    if not all(sharded):
        raise ValueError("optimizer mixes DTensor (sharded) and plain parameters: allowed all plain or all "
                         "sharded; apply fully_shard to the root module too, so every trainable parameter is sharded")
    mesh, placements = params[0].device_mesh, tuple(params[0].placements)
    for p in params[1:]:
        if p.device_mesh != mesh or tuple(p.placements) != placements:
            raise ValueError(f"optimizer parameters are sharded differently ({placements} on {mesh} vs "
                             f"{tuple(p.placements)} on {p.device_mesh}): allowed one mesh and one placement")
    if not all(p.is_shard() or p.is_replicate() for p in placements):
        raise ValueError(f"optimizer parameter placements {placements} are invalid: allowed Shard or Replicate "
                         "per mesh dimension (FSDP2 / HSDP)")
    return ShardReducer(mesh, placements)


def snapshot_optimizer(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, dict[str, Any]]:
    """A copy of the optimizer's per-parameter state (moments, step counters). The floating-point tensors
    are copied in one batched call (x * 1.0 is x bit for bit, -0.0 and inf included); a DTensor state
    (FSDP2) is copied on its local shard and re-wrapped with its mesh, placements, shape and stride."""
    state, floating = optimizer.state, lambda v: torch.is_tensor(v) and v.is_floating_point()
    batched = [v for st in state.values() for v in st.values() if floating(v)]
    if any(is_dtensor(v) for v in batched):
        done = torch._foreach_mul([local(v) for v in batched], 1.0)
        copies = iter([_rewrap(v, c) for v, c in zip(batched, done)])
    else:
        copies = iter(torch._foreach_mul(batched, 1.0) if batched else [])
    return {p: {k: next(copies) if floating(v) else (v.clone() if torch.is_tensor(v) else copy.deepcopy(v))
                for k, v in st.items()} for p, st in state.items()}


def restore_optimizer(optimizer: torch.optim.Optimizer, snapshot: dict[torch.Tensor, dict[str, Any]]) -> None:
    """Put the optimizer state back exactly as `snapshot_optimizer` saw it (state created since is dropped)."""
    for p in list(optimizer.state.keys()):
        if p not in snapshot:
            del optimizer.state[p]
    live_tensors, saved_tensors = [], []
    for p, st in snapshot.items():
        live = optimizer.state[p]
        for k, v in st.items():
            if torch.is_tensor(v) and torch.is_tensor(live.get(k)) and live[k].shape == v.shape \
                    and live[k].dtype == v.dtype and live[k].device == v.device and is_dtensor(v) == is_dtensor(live[k]):
                live_tensors.append(local(live[k]))
                saved_tensors.append(local(v))
            else:
                live[k] = v
    if live_tensors:  # one batched copy instead of one per state tensor
        torch._foreach_copy_(live_tensors, saved_tensors)


def _rewrap(like: torch.Tensor, local_copy: torch.Tensor) -> torch.Tensor:
    """`local_copy` as a DTensor laid out like `like` (a plain tensor stays plain)."""
    if not is_dtensor(like):
        return local_copy
    return DTensor.from_local(local_copy, like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def square_sum(tensors: Sequence[torch.Tensor], device) -> torch.Tensor:
    """sum ||t||^2 over (local) tensors, each squared in at least float32 and summed in float64 (0-dim)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in tensors:
        total = total + t.to(torch.promote_types(t.dtype, torch.float32)).pow(2).sum(dtype=torch.float64).to(device)
    return total
