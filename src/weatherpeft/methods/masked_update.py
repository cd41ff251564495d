"""Masked updates: AdamW on selected entries of pretrained tensors, nothing else moves.

Shared by SFAS (selection refreshed during training), Child-Tuning_D and the random mask
(selection fixed). Masking the gradient is not enough — AdamW's decoupled weight decay and
stale momentum would still move "frozen" entries — so the update itself is masked:

- ``on_after_backward`` (before gradient clipping): a subclass may refresh the selection
  from the full gradients; then every unselected gradient entry is zeroed, so clipping sees
  only the gradient that is applied;
- ``on_before_optimizer_step``: AdamW, exactly as ``torch.optim.AdamW`` computes it, on the
  selected entries only, with the lr, betas, eps and weight decay of the optimizer group
  that holds the parameter; then the gradient is dropped, so the dense optimizer never
  sees it and keeps no state for these tensors.

Optimizer state (first and second moments, per-entry step count) exists only for the
selected entries: O(k) memory instead of 2 × the parameters. An entry that leaves the
selection loses its state; one that (re-)enters starts fresh, as a newly trained entry.
The union of entries that ever changed is tracked (one byte per entry) — it is what an
adapter file must store.

Layout. The tensors of one device and dtype form a *bucket*: their selected entries are
fused into flat buffers in parameter order (indices, moments, step counts), so AdamW runs
as a dozen whole-buffer operations whatever the number of tensors; per tensor there remain
one gather of the gradient, one of the weights and one scatter back (and, in
``on_after_backward``, the masking of its gradient). The "moved" masks of a bucket are one
flat byte buffer. Per selected entry: 8 bytes of index and 8 of position, 2 × the weight's
bytes of moments, 4 of step count and 1 moved flag; per selectable entry: 1 byte.

Distributed training. Under DDP every rank holds full tensors and identical (all-reduced)
gradients, so every rank computes the same selection and update; with
``WEATHERPEFT_CHECK_MASKS=1`` (or ``check_masks = True``) a cheap checksum of every new
selection is compared across ranks. Under FSDP the parameters are DTensors sharded along
dim 0: everything here — selection indices, optimizer state, the moved mask — then refers
to this rank's shard (flat indices into ``to_local()``), and a subclass must select on
shards (``supports_sharding = True``, as SFAS does); others refuse FSDP when the Trainer
rebinds them to the sharded parameters (:meth:`MaskedUpdate.rebind_parameters`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from weatherpeft import distributed
from weatherpeft.distributed import local_tensor
from weatherpeft.training.hooks import TrainingHook

__all__ = ["MaskedUpdate"]

#: Environment switch for the cross-rank selection check (see the module doc).
CHECK_MASKS_ENV = "WEATHERPEFT_CHECK_MASKS"


class _Bucket:
    """The selected entries of the tensors of one device and dtype, fused in parameter order.

    ``offsets[j]``: where tensor j starts in the bucket's virtual concatenation;
    ``positions``: the selected entries' places in it (sorted, so per-tensor slices are the
    tensors' selections); ``counts[j]``: entries selected in tensor j.
    """

    def __init__(self, names: list[str], sizes: list[int], device: torch.device,
                 dtype: torch.dtype) -> None:
        self.names, self.sizes, self.device, self.dtype = names, sizes, device, dtype
        self.offsets = [0]
        for size in sizes[:-1]:
            self.offsets.append(self.offsets[-1] + size)
        self.total = sum(sizes)
        self.counts = [0] * len(names)
        self.indices = torch.empty(0, dtype=torch.long, device=device)
        self.positions = torch.empty(0, dtype=torch.long, device=device)
        self.exp_avg = torch.empty(0, dtype=dtype, device=device)
        self.exp_avg_sq = torch.empty(0, dtype=dtype, device=device)
        self.steps = torch.empty(0, dtype=torch.float32, device=device)
        #: Selected entries that changed since the last flush into ``moved_mask``.
        self.pending = torch.empty(0, dtype=torch.bool, device=device)
        #: One flag per entry of every tensor: changed so far (allocated at first use).
        self.moved_mask: torch.Tensor | None = None
        self.moved_count = 0

    def slices(self):
        """(name, start, end) of each tensor's part of the fused buffers."""
        start = 0
        for name, count in zip(self.names, self.counts):
            yield name, start, start + count
            start += count

    def mask(self) -> torch.Tensor:
        if self.moved_mask is None:
            self.moved_mask = torch.zeros(self.total, dtype=torch.bool, device=self.device)
        return self.moved_mask

    def mark(self, positions: torch.Tensor) -> None:
        """Record entries at bucket ``positions`` as changed."""
        if not positions.numel():
            return
        mask = self.mask()
        self.moved_count += int((~mask[positions]).sum())
        mask[positions] = True

    def flush(self) -> None:
        """Move the pending changed flags of the selected entries into the moved mask."""
        if self.pending.numel() and bool(self.pending.any()):
            self.mark(self.positions[self.pending])
        self.pending.zero_()


class MaskedUpdate(TrainingHook):
    """Trainer hook that trains only the selected entries of ``parameters`` (see module doc).

    ``parameters``: name → pretrained parameter (contiguous, floating point).
    ``per_step_entries``: how many entries one selection holds (reported as trainable).
    """

    #: Whether selections can be made on FSDP shards (subclasses that can say so).
    supports_sharding = False
    #: Compare a checksum of every new selection across ranks (None: ``$WEATHERPEFT_CHECK_MASKS``).
    check_masks: bool | None = None

    def __init__(self, parameters: Mapping[str, torch.nn.Parameter], per_step_entries: int) -> None:
        for name, parameter in parameters.items():
            if not parameter.is_floating_point():
                raise TypeError(f"masked updates need floating-point parameters; '{name}' is "
                                f"{parameter.dtype}")
            if not parameter.is_contiguous():
                raise ValueError(f"masked updates need contiguous parameters; '{name}' is not")
        total = sum(p.numel() for p in parameters.values())
        if not 0 < per_step_entries <= total:
            raise ValueError(f"a selection of {per_step_entries} entries is impossible among "
                             f"{total} selectable entries")
        self.parameters = dict(parameters)
        self.per_step_entries = int(per_step_entries)
        #: name → sorted flat indices of the currently selected entries (views of the buckets').
        self.selection: dict[str, torch.Tensor] = {}
        #: name → that tensor's part of the fused moments and step counts (views).
        self._exp_avg: dict[str, torch.Tensor] = {}
        self._exp_avg_sq: dict[str, torch.Tensor] = {}
        self._steps: dict[str, torch.Tensor] = {}
        self._buckets: list[_Bucket] | None = None
        self._sharded: bool | None = None
        self._unflushed = False  # an update ran since the moved masks were last brought up to date
        self._selections_made = 0
        self._selections_checked = 0

    # -- layout ---------------------------------------------------------------------------

    def buckets(self) -> list[_Bucket]:
        """The tensors grouped by device and dtype (built at first use, after any rebinding)."""
        if self._buckets is None:
            groups: dict[tuple, list[str]] = {}
            for name, parameter in self.parameters.items():
                local = local_tensor(parameter)
                groups.setdefault((local.device, local.dtype), []).append(name)
            self._buckets = [_Bucket(names, [local_tensor(self.parameters[n]).numel() for n in names],
                                     device, dtype) for (device, dtype), names in groups.items()]
            self._owner = {name: (bucket, j) for bucket in self._buckets
                           for j, name in enumerate(bucket.names)}
        return self._buckets

    def _publish(self, bucket: _Bucket) -> None:
        """Per-tensor views of a bucket's fused buffers."""
        for name, start, end in bucket.slices():
            self.selection[name] = bucket.indices[start:end]
            self._exp_avg[name] = bucket.exp_avg[start:end]
            self._exp_avg_sq[name] = bucket.exp_avg_sq[start:end]
            self._steps[name] = bucket.steps[start:end]

    # -- distributed training -------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP shards (DTensors)."""
        if self._sharded is None:
            self._sharded = any(distributed.is_dtensor(p) for p in self.parameters.values())
        return self._sharded

    def rebind_parameters(self, mapping: Mapping[int, torch.nn.Parameter]) -> None:
        """Follow parameters that FSDP replaced (``mapping``: id(old) → new); refuse shards
        unless this kind of update can select on them."""
        rebound = {name: mapping.get(id(p), p) for name, p in self.parameters.items()}
        if not self.supports_sharding and any(distributed.is_dtensor(p) for p in rebound.values()):
            raise ValueError(f"{type(self).__name__} chooses its mask on whole tensors and does not "
                             "support strategy='fsdp'; use strategy='ddp'")
        state = self.state_dict() if self.selection else None
        self.parameters = rebound
        self._sharded = None
        self._buckets = None  # lay out the new (local) tensors
        if state is not None:
            self.load_state_dict(state)

    def selection_checksum(self) -> torch.Tensor:
        """int64 [entries, Σ position, Σ position² mod p] of the selection, positions counted
        across the concatenated tensors: equal selections give equal checksums."""
        modulus = (1 << 31) - 1
        count = total = squares = 0
        offset = 0
        for name, parameter in self.parameters.items():
            indices = self.selection.get(name)
            if indices is not None and indices.numel():
                position = indices.to(torch.int64) + offset
                count += int(position.numel())
                total += int(position.sum())
                squares += int(position.remainder(modulus).square().remainder(modulus).sum())
            offset += parameter.numel()
        return torch.tensor([count, total % (1 << 62), squares % (1 << 62)], dtype=torch.int64)

    def _check_across_ranks(self, step: int) -> None:
        enabled = self.check_masks if self.check_masks is not None \
            else os.environ.get(CHECK_MASKS_ENV, "") not in ("", "0")
        if enabled and not self.sharded and distributed.world_size() > 1:
            distributed.check_identical(self.selection_checksum(),
                                        f"{type(self).__name__}'s selection at step {step}")

    # -- selection ------------------------------------------------------------------------

    def set_selection(self, selection: Mapping[str, torch.Tensor]) -> None:
        """Select these flat indices (name → int64 tensor); moments carry over for entries
        that stay selected, new entries start from zero state."""
        unknown = sorted(set(selection) - set(self.parameters))
        if unknown:
            raise KeyError(f"selection names unknown parameters: {unknown}")
        self._flush()
        for bucket in self.buckets():
            chosen = []
            for name in bucket.names:
                new = selection.get(name)
                chosen.append(torch.empty(0, dtype=torch.long, device=bucket.device) if new is None
                              else torch.sort(new.to(device=bucket.device, dtype=torch.long)).values)
            counts = [c.numel() for c in chosen]
            indices = torch.cat(chosen)
            sizes = torch.repeat_interleave(torch.tensor(bucket.sizes, device=bucket.device),
                                            torch.tensor(counts, device=bucket.device))
            outside = (indices < 0) | (indices >= sizes)
            if bool(outside.any()):
                at = int(outside.nonzero()[0, 0])
                name = bucket.names[int(np.searchsorted(np.cumsum(counts), at, side="right"))]
                raise IndexError(f"selection of '{name}' lies outside its "
                                 f"{local_tensor(self.parameters[name]).numel()} entries")
            positions = indices + torch.repeat_interleave(
                torch.tensor(bucket.offsets, device=bucket.device), torch.tensor(counts, device=bucket.device))
            exp_avg = torch.zeros(indices.numel(), dtype=bucket.dtype, device=bucket.device)
            exp_avg_sq = torch.zeros_like(exp_avg)
            steps = torch.zeros(indices.numel(), dtype=torch.float32, device=bucket.device)
            old = bucket.positions
            if old.numel() and positions.numel():
                place = torch.searchsorted(old, positions).clamp_(max=old.numel() - 1)
                kept = old[place] == positions
                place = place[kept]
                exp_avg[kept] = bucket.exp_avg[place]
                exp_avg_sq[kept] = bucket.exp_avg_sq[place]
                steps[kept] = bucket.steps[place]
            bucket.counts, bucket.indices, bucket.positions = counts, indices, positions
            bucket.exp_avg, bucket.exp_avg_sq, bucket.steps = exp_avg, exp_avg_sq, steps
            bucket.pending = torch.zeros(indices.numel(), dtype=torch.bool, device=bucket.device)
            self._publish(bucket)
        self._selections_made += 1

    def selected_entries(self) -> int:
        return sum(int(indices.numel()) for indices in self.selection.values())

    def _flush(self) -> None:
        if self._unflushed:
            for bucket in self.buckets():
                bucket.flush()
            self._unflushed = False

    def moved_mask(self, name: str) -> torch.Tensor:
        """Flat bool mask of the entries of ``name`` that have changed so far (a view: do
        not write to it; use :meth:`mark_moved`)."""
        self._flush()
        bucket, j = self._owner[name]
        return bucket.mask()[bucket.offsets[j]:bucket.offsets[j] + bucket.sizes[j]]

    def moved_indices(self) -> dict[str, torch.Tensor]:
        """name → sorted flat indices of every entry that ever changed (what a file stores)."""
        self._flush()
        moved = {}
        for bucket in self.buckets():
            if not bucket.moved_count:
                continue
            for j, name in enumerate(bucket.names):
                start = bucket.offsets[j]
                indices = torch.nonzero(bucket.moved_mask[start:start + bucket.sizes[j]]).reshape(-1)
                if indices.numel():
                    moved[name] = indices
        return moved

    def mark_moved(self, name: str, indices: torch.Tensor) -> None:
        """Record entries of ``name`` as changed (loading an adapter writes them directly)."""
        self.buckets()
        bucket, j = self._owner[name]
        bucket.mark(indices.to(device=bucket.device, dtype=torch.long) + bucket.offsets[j])

    def stored_entries(self) -> int:
        """How many entries ever changed: the adapter file's share of this update."""
        self._flush()
        return sum(bucket.moved_count for bucket in self.buckets())

    def update_selection(self, trainer: Any, step: int) -> None:
        """Refresh the selection from the gradients of this step (subclasses; fixed here)."""

    # -- the trainer hooks ----------------------------------------------------------------

    def on_after_backward(self, trainer: Any, step: int) -> None:
        self.update_selection(trainer, step)
        if not self.selection:
            raise RuntimeError(f"{type(self).__name__}: no selection was made before step {step}")
        if self._selections_made != self._selections_checked:  # new since the last step
            self._check_across_ranks(step)
            self._selections_checked = self._selections_made
        with torch.no_grad():
            flats, kept = [], []
            for name, parameter in self.parameters.items():
                if parameter.grad is not None:
                    flat = local_tensor(parameter.grad).view(-1)
                    flats.append(flat)
                    kept.append((self.selection[name], flat[self.selection[name]]))
            if flats:
                torch._foreach_zero_(flats)
            for flat, (indices, values) in zip(flats, kept):
                flat.index_copy_(0, indices, values)

    def on_before_optimizer_step(self, trainer: Any, step: int) -> None:
        groups = {id(p): group for group in trainer.optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for bucket in self.buckets():
                hyper = []
                for name in bucket.names:
                    group = groups.get(id(self.parameters[name]))
                    if group is None:
                        raise RuntimeError(f"'{name}' is in no optimizer group: build the Trainer "
                                           "with the Adaptation's param_groups()")
                    hyper.append(group)
                self._adamw(bucket, hyper)
            for parameter in self.parameters.values():
                parameter.grad = None

    def _adamw(self, bucket: _Bucket, groups: list[Mapping[str, Any]]) -> None:
        """torch.optim.AdamW's update, entry-wise on a bucket's selection (per-entry step
        counts), with the lr and weight decay of each tensor's group (``groups``, in the
        bucket's order) and their common betas and eps."""
        total = bucket.indices.numel()
        if not total:
            return
        betas, eps = groups[0]["betas"], groups[0]["eps"]
        if any(g["betas"] != betas or g["eps"] != eps for g in groups):
            raise ValueError("a masked update needs the same AdamW betas and eps in the optimizer "
                             "groups of its tensors")
        beta1, beta2 = betas
        grad = torch.zeros(total, dtype=bucket.dtype, device=bucket.device)
        values = torch.empty(total, dtype=bucket.dtype, device=bucket.device)
        flats = []
        for name, start, end in bucket.slices():
            parameter = self.parameters[name]
            flat = local_tensor(parameter.detach()).view(-1)
            flats.append(flat)
            if end == start:
                continue
            indices = bucket.indices[start:end]
            torch.index_select(flat, 0, indices, out=values[start:end])
            if parameter.grad is not None:
                torch.index_select(local_tensor(parameter.grad).view(-1), 0, indices,
                                   out=grad[start:end])
        old = values.clone()
        lrs = [g["lr"] for g in groups]
        decays = [1 - g["lr"] * g["weight_decay"] for g in groups]
        steps = bucket.steps.add_(1)
        if any(d != 1 for d in decays):
            values.mul_(decays[0] if len(set(decays)) == 1 else self._per_entry(bucket, decays, bucket.dtype))
        bucket.exp_avg.lerp_(grad, 1 - beta1)
        bucket.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        steps64 = steps.double()
        lr = lrs[0] if len(set(lrs)) == 1 else self._per_entry(bucket, lrs, torch.float64)
        step_size = (lr / (1 - torch.pow(beta1, steps64))).to(bucket.dtype)
        bias_correction2_sqrt = (1 - torch.pow(beta2, steps64)).sqrt_().to(bucket.dtype)
        denominator = (bucket.exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        values.sub_(bucket.exp_avg.div(denominator).mul_(step_size))
        for flat, (_, start, end) in zip(flats, bucket.slices()):
            if end > start:
                flat.index_copy_(0, bucket.indices[start:end], values[start:end])
        bucket.pending |= values != old
        self._unflushed = True

    @staticmethod
    def _per_entry(bucket: _Bucket, per_tensor: list[float], dtype: torch.dtype) -> torch.Tensor:
        """A per-tensor value repeated over each tensor's selected entries."""
        return torch.repeat_interleave(torch.tensor(per_tensor, dtype=dtype, device=bucket.device),
                                       torch.tensor(bucket.counts, device=bucket.device))

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "selection": {k: v.clone() for k, v in self.selection.items()},
            "exp_avg": {k: v.clone() for k, v in self._exp_avg.items()},
            "exp_avg_sq": {k: v.clone() for k, v in self._exp_avg_sq.items()},
            "steps": {k: v.clone() for k, v in self._steps.items()},
            "moved": self.moved_indices(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._buckets = None
        self.selection, self._exp_avg, self._exp_avg_sq, self._steps = {}, {}, {}, {}
        self.set_selection(state["selection"])
        for target, key in ((self._exp_avg, "exp_avg"), (self._exp_avg_sq, "exp_avg_sq"),
                            (self._steps, "steps")):
            for name, value in state[key].items():
                target[name].copy_(value)  # views of the fused buffers
        for name, indices in state["moved"].items():
            self.mark_moved(name, indices)
