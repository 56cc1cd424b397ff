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
import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
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
            same = torch.is_tensor(v) and torch.is_tensor(live.get(k)) and live[k].shape == v.shape \
                and live[k].dtype == v.dtype and live[k].device == v.device
            if same and is_dtensor(v) == is_dtensor(live[k]):
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


# -- The trainer under torchrun: the process group, sharding the policy, prompt shares, DCP checkpoints ---
@dataclass
class World:
    """This process's place in a torchrun launch (rank, size, device); `owns_group`: `setup` created the
    process group (so `teardown` destroys it)."""

    rank: int
    size: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """WORLD_SIZE of a torchrun launch (or of an already initialised process group); 1 otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def setup() -> World | None:
    """None in a single process; under torchrun (WORLD_SIZE > 1) the process group (gloo on a CPU, nccl
    with CUDA; one device per LOCAL_RANK), initialised here unless the caller already did."""
    if launched_world_size() <= 1:
        return None
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), device, owns)


def teardown(world: World | None) -> None:
    """Destroy the process group `setup` created (a caller's own group is left alone)."""
    if world is not None and world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def leave_process_group() -> list[str]:
    """Every rank leaves the default process group together while the interpreter is whole.

    A group that an object still holds (a DDP wrapper's reducer inside a trainer) outlives
    ``destroy_process_group``, and its gloo worker threads run on into the interpreter's teardown. There a
    two-rank TRL run aborted a finished rank now and then ("terminate called without an active exception":
    1 launch in 15, rarer with a barrier before destroying, still once in a CI run); PyTorch's pull request
    179291 describes a gloo worker releasing a tensor and taking the GIL of a dying interpreter. So callers
    drop their trainers first; the cycles a trainer builds (callbacks that point back at it) go in the
    ``gc.collect()`` here. Under FSDP2 the threads remain whatever we drop (DTensor's sharding cache holds
    the mesh, and emptying it does not release the group: something below Python holds it too); no abort was
    seen there.

    Returns:
        The names of this process's gloo threads still running afterwards (Linux; [] where ``/proc`` has
        none): in a DDP or single-process run, anything here means an object still holds the group.
    """
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return gloo_threads()


def gloo_threads() -> list[str]:
    """Names of this process's running threads that belong to gloo (from ``/proc/self/task``; [] without)."""
    names = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return names
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm", encoding="utf-8") as handle:
                name = handle.read().strip()
        except OSError:   # the thread ended while we read
            continue
        if "gloo" in name:
            names.append(name)
    return sorted(names)


def shard_policy(model: torch.nn.Module) -> torch.nn.Module:
    """``fully_shard`` each decoder layer, then the decoder (embeddings, final norm and the tied LM head) as
    the root; LoRA adapters or full fine-tuning alike (frozen weights are sharded too).

    The decoder is the root because every forward runs through it: the model's own forward, ``generate``
    and the objective's memory-lean path (decoder, then the LM head's weight read directly). So the LM head
    must be tied to the input embeddings (the tiny model, SmolLM2, Llama-3.2-1B/3B); an untied head is a
    ValueError naming `model`. HF ``generate`` is told the module is FSDP-managed (``synced_gpus``: every
    rank keeps stepping until all are done, so the all-gathers stay in lockstep).
    """
    from torch.distributed.fsdp import fully_shard

    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    layers = getattr(decoder, "layers", None)
    if decoder is None or layers is None:
        raise ValueError(f"model {type(model).__name__} has no decoder with .layers: FSDP2 sharding is "
                         "implemented for HF causal LMs (Llama-style); run it in a single process")
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not embeddings.weight:
        raise ValueError("model has an LM head untied from its input embeddings: under torchrun (FSDP2) "
                         "gxpo_lib shards models with tied embeddings only (the tiny model, SmolLM2, "
                         "Llama-3.2-1B/3B); run this model in a single process")
    if getattr(head, "bias", None) is not None:
        raise ValueError("model has an LM head with a bias: under torchrun (FSDP2) gxpo_lib shards heads tied to "
                         "the input embeddings without a bias only; run this model in a single process")
    for parent in list(model.modules()):   # the head reads the embeddings' weight when it runs (see TiedHead)
        for name, child in list(parent.named_children()):
            if child is head:
                setattr(parent, name, TiedHead(embeddings))
    for layer in layers:
        fully_shard(layer)
    fully_shard(decoder)
    for module in model.modules():   # transformers' is_fsdp_managed_module -> generate(synced_gpus=True)
        module._is_fsdp_managed_module = True
    return model


class TiedHead(torch.nn.Module):
    """The LM head of a sharded policy: ``hidden @ embeddings.weight^T`` with the weight looked up on the
    embeddings module at each call. FSDP2 swaps the gathered weight into the module it was sharded in (the
    decoder's embeddings) and nowhere else, so an ``nn.Linear`` sharing the Parameter would keep reading the
    stale unsharded original; this head reads what FSDP2 put there (the decoder, the root, keeps its weights
    gathered from its forward through the backward)."""

    def __init__(self, embeddings: torch.nn.Module):
        super().__init__()
        self.__dict__["embeddings"] = embeddings   # not a submodule: its weight belongs to the decoder

    @property
    def weight(self) -> torch.Tensor:
        return self.embeddings.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.embeddings.weight)


def reshard(model: torch.nn.Module) -> None:
    """Free every FSDP group's gathered weights (the root keeps them after a no-grad forward), so the module
    holds its sharded parameters again before the rule, a checkpoint or the next all-gather reads them."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def share_seed(seed: int, share: int, shares: int) -> int:
    """The sampling seed of prompt share `share` of `shares`: `seed` itself with one share (the single-process
    run, unchanged), else a distinct seed per (seed, shares, share)."""
    if shares == 1:
        return seed
    return int(np.random.SeedSequence([seed, shares, share]).generate_state(1)[0])


def check_shares(batch_prompts: int, shares: int) -> None:
    """ValueError naming batch_prompts unless every share gets the same number of whole prompt groups."""
    if batch_prompts % shares:
        raise ValueError(f"batch_prompts={batch_prompts} is invalid with {shares} ranks (prompt shares): allowed "
                         f"a multiple of {shares}, so each rank samples whole groups of as many prompts")


def concat_rollouts(parts: list, pad_id: int):
    """One `Rollouts` from several (the shares of one process): prompts left-padded, completions right-padded
    to the widest, prompt indices offset by the prompts before."""
    from gxpo_lib.core.objective import Rollouts

    if len(parts) == 1:
        return parts[0]
    width_p = max(r.prompt_ids.shape[1] for r in parts)
    width_c = max(r.completion_ids.shape[1] for r in parts)
    left = lambda t, v: torch.nn.functional.pad(t, (width_p - t.shape[1], 0), value=v)
    right = lambda t, v: None if t is None else torch.nn.functional.pad(t, (0, width_c - t.shape[1]), value=v)
    cat = lambda ts: None if any(t is None for t in ts) else torch.cat(ts)
    offsets = np.cumsum([0] + [max(r.prompt_index, default=-1) + 1 for r in parts])
    return Rollouts(
        torch.cat([left(r.prompt_ids, pad_id) for r in parts]), torch.cat([left(r.prompt_mask, 0) for r in parts]),
        torch.cat([right(r.completion_ids, pad_id) for r in parts]),
        torch.cat([right(r.completion_mask, 0) for r in parts]),
        cat([right(r.old_logprobs, 0.0) for r in parts]), cat([right(r.entropy, 0.0) for r in parts]),
        [c for r in parts for c in r.completions],
        [int(i + offset) for r, offset in zip(parts, offsets) for i in r.prompt_index], parts[0].group_size)


def all_sum(values: Sequence[float], world: World | None) -> list[float]:
    """Element-wise sums over the ranks (float64; as is in a single process)."""
    if world is None:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=world.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather(value: Any, world: World | None) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank ([value] in a single process)."""
    if world is None:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


SHARDED_META = "meta.pt"   # rank 0: step, rule, counters, config; rng_<rank>.pt: each rank's RNG states


def save_sharded(folder, step: int, model, optimizer, meta: dict[str, Any], rng: dict[str, Any], world: World) -> None:
    """A torch.distributed.checkpoint (DCP) of the model and optimizer state dicts plus `meta` (rank 0) and
    each rank's `rng` into ``folder/step_N/``: written to ``step_N.tmp/``, renamed once every rank is done."""
    import shutil

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = folder / f"step_{step:06d}"
    tmp = folder / f"step_{step:06d}.tmp"
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    reshard(model)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    torch.save(rng, tmp / f"rng_{world.rank}.pt")
    if world.is_main:
        torch.save({"step": step, **meta}, tmp / SHARDED_META)
    dist.barrier()
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()


def read_sharded_meta(path, keys: Sequence[str], world: World) -> tuple[dict[str, Any] | None, str | None]:
    """``(meta with this rank's "rng", None)`` of an intact ``step_N/`` folder, else ``(None, what is wrong)``;
    the verdict is agreed by every rank (any rank's problem is everyone's)."""
    problem = None
    try:
        meta = torch.load(path / SHARDED_META, weights_only=False)
        meta["rng"] = torch.load(path / f"rng_{world.rank}.pt", weights_only=False)
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(".metadata (the DCP index) is missing")
    except Exception as error:   # missing, empty, truncated, garbage
        meta, problem = None, f"unreadable or incomplete ({_what(error)})"
    if meta is not None and (not isinstance(meta, dict) or any(k not in meta for k in keys)):
        meta, problem = None, "not a gxpo_lib checkpoint (its meta.pt lacks " + ", ".join(keys) + ")"
    if meta is not None and (not isinstance(meta["step"], int) or path.name != f"step_{meta['step']:06d}"):
        meta, problem = None, f"holds step {meta['step']!r}, not the step its name says"
    problems = [p for p in gather(problem, world) if p is not None]
    return (meta, None) if not problems else (None, problems[0])


def load_sharded(path, model, optimizer, world: World) -> str | None:
    """Load a ``step_N/`` DCP checkpoint into the sharded model and optimizer in place; None, or what failed
    (the same on every rank: DCP raises on all ranks when one fails)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    reshard(model)
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        problem = None
    except (Exception, dcp.api.CheckpointException) as error:   # the latter, a BaseException: raised on every rank
        problem = f"its sharded weights do not load ({_what(error)})"
    problems = [p for p in gather(problem, world) if p is not None]
    return problems[0] if problems else None


def _what(error: BaseException) -> str:
    """An error's first line (at most 160 characters), else its type's name."""
    text = str(error).strip()
    return text.splitlines()[0][:160] if text else type(error).__name__


def barrier(world: World | None) -> None:
    if world is not None:
        dist.barrier()


def normalizers(rollouts, parts: list[slice], world: World | None) -> list[tuple[float, float] | None]:
    """`PolicyObjective`'s global_normalizer for each mini-batch (`parts`, row slices of `rollouts`): its
    (tokens, rows) summed over every rank, divided by the world size (None in one process)."""
    if world is None:
        return [None] * len(parts)
    counts = all_sum([v for part in parts for v in (rollouts.completion_mask[part].sum(),
                                                     len(rollouts.completions[part]))], world)
    size = world.size
    return [(max(counts[2 * i], 1.0) / size, counts[2 * i + 1] / size) for i in range(len(parts))]


def whole_batch(measured: dict[str, Any], mask, entropy, tokens: int, world) -> dict[str, Any]:
    """A step's measured values over every rank: sums, and token-weighted means (as one process has them)."""
    kl, clip = measured["kl"], measured["clip_frac"]
    sums = all_sum([mask.sum(), mask.shape[0], 0.0 if entropy is None else entropy.float().sum(),
                    (kl or 0.0) * tokens, (clip or 0.0) * tokens, tokens, measured["reward_parse_fail"],
                    measured["reward_timeout"], measured["reward_error"]], world)
    return dict(response_length=sums[0] / sums[1], entropy=None if entropy is None else sums[2] / max(sums[0], 1.0),
                kl=None if kl is None else sums[3] / sums[5], clip_frac=None if clip is None else sums[4] / sums[5],
                reward_parse_fail=int(sums[6]), reward_timeout=int(sums[7]), reward_error=int(sums[8]))
