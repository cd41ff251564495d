"""Multi-process training on PyTorch's distributed engine: process group, wrapping, reductions,
and the exact global top-k of scores that are sharded across ranks.

Launch with ``torchrun --nproc_per_node N -m weatherpeft finetune --strategy ddp|fsdp …``:
:func:`init` joins the process group torchrun describes in the environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``; NCCL on CUDA, Gloo on CPU) and is a no-op
in a plain single process, where every helper here answers as for a world of one (rank 0,
main, reductions return their input).

Strategies (:func:`wrap_model`):

- ``"ddp"``: :class:`~torch.nn.parallel.DistributedDataParallel`, every rank a full replica,
  gradients averaged (all-reduced) during backward. Every method runs under it.
- ``"fsdp"``: FSDP2, :func:`torch.distributed.fsdp.fully_shard` on every Swin block and then
  on the root; parameters, gradients and optimizer state are sharded along dim 0 (DTensors);
  bf16 parameters with float32 gradient reduction on CUDA when ``amp="bf16"``. Methods whose
  Trainer hooks cannot work on shards refuse it when the Trainer is built.

The sharded top-k (:func:`sharded_top_k`) is what SFAS needs under FSDP: every rank scores
its shard of every tensor, keeps its local top-k candidates (the exact streaming
:func:`~weatherpeft.methods.selection.select_top_k`), and one all-gather of k·world
(score, global position) pairs lets every rank take the same exact global top k — the same
selection, ties included, as :func:`select_top_k` on the unsharded scores.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "STRATEGIES",
    "all_reduce",
    "barrier",
    "block_modules",
    "check_identical",
    "consolidated_copy",
    "device_for_rank",
    "full_model_state",
    "gather_objects",
    "init",
    "is_dtensor",
    "is_initialized",
    "is_main",
    "launched",
    "load_full_model_state",
    "local_rank",
    "local_tensor",
    "rank",
    "shard_offset",
    "sharded_top_k",
    "world_size",
    "wrap_model",
]

log = logging.getLogger(__name__)

STRATEGIES = ("none", "ddp", "fsdp")

#: Module classes (by name) that FSDP shards as units before the root when no backbone names
#: its blocks: Aurora's Swin blocks.
BLOCK_CLASSES = ("Swin3DTransformerBlock",)


# --------------------------------------------------------------------------------------
# Process group and ranks
# --------------------------------------------------------------------------------------


def launched() -> bool:
    """Whether this process was started by torchrun (or alike) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device: torch.device | str | None = None) -> bool:
    """Join the process group described by the environment; True if distributed.

    No-op (False) when not launched distributed; idempotent. The backend is NCCL when
    ``device`` is CUDA (the rank's GPU is ``cuda:LOCAL_RANK``), Gloo otherwise. Ranks other
    than 0 then log errors only, so messages appear once.
    """
    if is_initialized():
        return True
    if not launched():
        return False
    if not dist.is_available():
        raise RuntimeError("launched with WORLD_SIZE > 1, but this torch build has no torch.distributed")
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() != 0:
        logging.getLogger("weatherpeft").setLevel(logging.ERROR)
    return True


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs, shows progress and writes files."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def device_for_rank(device: torch.device) -> torch.device:
    """``cuda`` without an index becomes this rank's GPU, ``cuda:LOCAL_RANK``, when launched."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", local_rank())
    return device


def _collective_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------
# Reductions
# --------------------------------------------------------------------------------------


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(values: torch.Tensor | Sequence[float] | float, op: str = "sum") -> torch.Tensor:
    """A reduced copy over ranks (``op``: sum | max | min | mean) as a float64 or the input's
    dtype; the input itself is left alone. One collective, whatever the number of values."""
    if op not in (*_OPS, "mean"):
        raise ValueError(f"op must be one of {[*_OPS, 'mean']}, got {op!r}")
    tensor = values.detach().clone() if isinstance(values, torch.Tensor) \
        else torch.tensor(values, dtype=torch.float64)
    if world_size() == 1:
        return tensor
    device = tensor.device
    work = tensor.to(_collective_device())
    dist.all_reduce(work, op=getattr(dist.ReduceOp, _OPS.get(op, "SUM")))
    if op == "mean":
        work = work / world_size()
    return work.to(device)


def gather_objects(value: Any) -> list[Any] | None:
    """Every rank's ``value`` (picklable) as a list on rank 0; None on the other ranks."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def check_identical(values: torch.Tensor, what: str) -> None:
    """Raise on every rank if the int64 ``values`` differ between ranks (a debug check)."""
    if world_size() == 1:
        return
    values = values.to(torch.int64).reshape(-1)
    high, low = all_reduce(values, "max"), all_reduce(values, "min")
    if not torch.equal(high, low):
        raise RuntimeError(f"{what} differs between ranks (checksums range {low.tolist()} … "
                           f"{high.tolist()}; this rank {rank()}: {values.tolist()})")


# --------------------------------------------------------------------------------------
# Sharded tensors (FSDP2 DTensors)
# --------------------------------------------------------------------------------------


def is_dtensor(tensor: Any) -> bool:
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (an alias: in-place writes change the DTensor), else
    the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def shard_offset(tensor: torch.Tensor) -> int:
    """Flat index, in the full tensor, of this rank's first shard entry (0 if not sharded).

    FSDP2 shards dim 0 in ``torch.chunk`` fashion: ⌈rows / world⌉ rows per rank, the last
    ranks possibly with fewer or none. Other placements are refused.
    """
    if not is_dtensor(tensor):
        return 0
    from torch.distributed.tensor import Shard

    placements = tuple(tensor.placements)
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(f"only dim-0 sharding on a 1-D mesh (FSDP2's) is supported, got "
                         f"placements {placements}")
    mesh = tensor.device_mesh
    rows = tensor.shape[0] if tensor.ndim else 1
    per_rank = math.ceil(rows / mesh.size())
    start = min(mesh.get_local_rank() * per_rank, rows)
    local = tensor.to_local()
    expected = min(rows, start + per_rank) - start
    if (local.shape[0] if local.ndim else 1) != expected:
        raise ValueError(f"unexpected shard of a tensor of shape {tuple(tensor.shape)}: local "
                         f"shape {tuple(local.shape)}, expected {expected} rows from row {start}")
    return start * (tensor.numel() // rows if rows else 0)


# Above radon C on purpose: an exact distributed top-k: local candidates, global threshold, ties resolved across ranks.
def sharded_top_k(scores: Callable[[int], torch.Tensor], local_sizes: Sequence[int],
                  positions: Sequence[int], k: int,
                  subsets: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Local flat indices (one sorted int64 tensor per local block) of this rank's part of the
    exact global top k over every rank's scores.

    ``scores(i)``/``local_sizes[i]``: this rank's part of block i, as for
    :func:`~weatherpeft.methods.selection.select_top_k` (called once per block, in order).
    ``positions[i]``: the global position of that part's first entry (the block's offset in
    the concatenation of all full blocks plus the shard's flat offset); along a rank's
    blocks, positions must increase with (block, index), as dim-0 shards of blocks visited in
    the same order on every rank do. Ties are broken by lower global position: the result is
    what :func:`select_top_k` gives on the concatenated, unsharded scores. Collective: every
    rank must call it with the same k. Communication: one all-gather of k + 1 (score,
    position) pairs per rank. Errors on one rank (NaN scores, k too large) are raised on all.

    ``subsets``: block i's scores are those of the entries ``subsets[i]`` (sorted flat indices
    into this rank's part; ``local_sizes[i]`` is then their count) — the others are known not
    to make the top k; the result is still flat indices into the parts.
    """
    from weatherpeft.methods.selection import select_top_k_scored

    local_total = sum(int(n) for n in local_sizes)
    world = world_size()
    error: str | None = None
    chosen: list[torch.Tensor] = []
    candidate_values = torch.empty(0)
    candidate_positions = torch.empty(0, dtype=torch.int64)
    try:
        chosen, values = select_top_k_scored(scores, local_sizes, min(k, local_total))
        if subsets is not None:
            chosen = [subset[picked] for subset, picked in zip(subsets, chosen)]
        device = chosen[0].device if chosen else torch.device("cpu")
        candidate_values = torch.cat([v.to(device) for v in values]) if values else \
            torch.empty(0, device=device)
        candidate_positions = torch.cat([idx.to(device) + int(p) for idx, p in zip(chosen, positions)]) \
            if chosen else torch.empty(0, dtype=torch.int64, device=device)
    except ValueError as failure:
        error = str(failure)
    device = _collective_device()
    # (k + 1) slots: the candidates, padded with (-inf, max position), then [local_total, error].
    values = torch.full((k + 1,), -math.inf, dtype=torch.float32, device=device)
    where = torch.full((k + 1,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    count = candidate_values.numel()
    values[:count] = candidate_values.to(device)
    where[:count] = candidate_positions.to(device)
    values[k] = 1.0 if error else 0.0
    where[k] = local_total
    if world > 1:
        every_value = [torch.empty_like(values) for _ in range(world)]
        every_where = [torch.empty_like(where) for _ in range(world)]
        dist.all_gather(every_value, values)
        dist.all_gather(every_where, where)
        all_values, all_where = torch.stack(every_value).cpu(), torch.stack(every_where).cpu()
    else:
        all_values, all_where = values.unsqueeze(0).cpu(), where.unsqueeze(0).cpu()
    failed = [r for r in range(world) if all_values[r, k] != 0]
    if failed:
        raise ValueError(error or f"the sharded top-k failed on rank(s) {failed}")
    total = int(all_where[:, k].sum())
    if not 0 <= k <= total:
        raise ValueError(f"cannot select {k} of {total} entries")
    keep = _top_k_of_candidates(all_values[:, :k].reshape(-1), all_where[:, :k].reshape(-1), k)
    mine = keep.view(world, k)[rank(), :count]
    out, start = [], 0
    for indices in chosen:
        out.append(indices[mine[start:start + indices.numel()].to(indices.device)])
        start += indices.numel()
    return out if chosen else [torch.empty(0, dtype=torch.int64) for _ in local_sizes]


def _top_k_of_candidates(values: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k best candidates: larger value first, then lower position."""
    from weatherpeft.methods.selection import _kth_largest

    keep = torch.zeros(values.numel(), dtype=torch.bool)
    if k == 0:
        return keep
    kth = _kth_largest(values, k)
    above = values > kth
    keep |= above
    need = k - int(above.sum())
    ties = (values == kth).nonzero().squeeze(1)
    order = torch.argsort(positions[ties], stable=True)
    keep[ties[order[:need]]] = True
    return keep


# --------------------------------------------------------------------------------------
# Wrapping and state
# --------------------------------------------------------------------------------------


def block_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP shards as units before the root: every backbone's transformer blocks
    (``Backbone.transformer_blocks()``), else modules whose class is in :data:`BLOCK_CLASSES`."""
    from weatherpeft.backbones.base import Backbone

    blocks: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        if isinstance(module, Backbone) and hasattr(module, "transformer_blocks"):
            blocks.update({id(block): block for _, block in module.transformer_blocks()})
    if not blocks:
        blocks = {id(m): m for m in model.modules() if type(m).__name__ in BLOCK_CLASSES}
    return list(blocks.values())


def wrap_model(model: torch.nn.Module, strategy: str, device: torch.device | None = None, *,
               mixed_precision: bool = False) -> torch.nn.Module:
    """``model`` prepared for ``strategy`` ("none" | "ddp" | "fsdp"); returns what to call.

    "ddp" returns a DistributedDataParallel wrapper (``find_unused_parameters=True``: tasks
    may leave some trainable embeddings unused). "fsdp" shards ``model`` in place (the
    returned module is ``model``; its parameters become new DTensor objects) — blocks of
    :data:`BLOCK_CLASSES` first, then the root; ``mixed_precision`` on CUDA: bf16 parameters
    in compute, float32 gradient reduction. Needs the process group (:func:`init`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "none":
        return model
    if not is_initialized():
        raise RuntimeError(f"strategy '{strategy}' needs the process group: launch with torchrun "
                           "(weatherpeft.distributed.init joins it)")
    device = torch.device("cpu") if device is None else torch.device(device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision and device.type == "cuda" else MixedPrecisionPolicy()
    blocks = block_modules(model)
    if not blocks:
        log.warning("FSDP: no %s module in %s; sharding the root only", BLOCK_CLASSES,
                    type(model).__name__)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU: on rank 0 for a sharded model (empty elsewhere;
    collective), else ``model.state_dict()``."""
    if not any(is_dtensor(p) for p in model.parameters()):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_model_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                          strict: bool = True) -> None:
    """Load a full state dict into ``model``, sharding it if ``model`` is sharded (every rank
    passes the full state)."""
    if not any(is_dtensor(p) for p in model.parameters()):
        model.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, strict=strict))


def consolidated_copy(model: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
    """An unsharded module equal to the trained ``model``, for writing files on rank 0.

    Not sharded: ``model`` itself, on every rank. Sharded (FSDP): collective; rank 0 gets
    ``build()`` (a fresh module of the same structure, e.g. the method re-applied to a fresh
    backbone) loaded with the gathered full weights, and with every masked update's moved
    entries (global indices, gathered from the shards) marked, so that adapter files and
    parameter reports are those of a single-process run; other ranks get None.
    """
    if not any(is_dtensor(p) for p in model.parameters()):
        return model
    state = full_model_state(model)
    moved = [{name: (update.moved_indices().get(name, torch.empty(0, dtype=torch.int64)).cpu()
                     + shard_offset(parameter))
              for name, parameter in update.parameters.items()}
             for update in getattr(model, "masked_updates", [])]
    gathered = gather_objects(moved)
    if not is_main():
        return None
    copy = build()
    copy.load_state_dict(state)
    updates = getattr(copy, "masked_updates", [])
    if len(updates) != len(moved):
        raise ValueError(f"the rebuilt model has {len(updates)} masked update(s), the trained one {len(moved)}")
    for index, update in enumerate(updates):
        for per_rank in gathered:
            for name, indices in per_rank[index].items():
                if indices.numel():
                    update.mark_moved(name, indices)
    return copy
