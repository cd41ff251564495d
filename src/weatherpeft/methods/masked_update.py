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

import torch

from weatherpeft import distributed
from weatherpeft.distributed import local_tensor

__all__ = ["MaskedUpdate"]

#: Environment switch for the cross-rank selection check (see the module doc).
CHECK_MASKS_ENV = "WEATHERPEFT_CHECK_MASKS"


class MaskedUpdate:
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
        #: name → sorted flat indices of the currently selected entries.
        self.selection: dict[str, torch.Tensor] = {}
        self._exp_avg: dict[str, torch.Tensor] = {}
        self._exp_avg_sq: dict[str, torch.Tensor] = {}
        self._steps: dict[str, torch.Tensor] = {}
        self._moved: dict[str, torch.Tensor] = {}
        self._moved_count: dict[str, int] = {}
        self._selections_made = 0
        self._selections_checked = 0

    # -- distributed training -------------------------------------------------------------

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP shards (DTensors)."""
        return any(distributed.is_dtensor(p) for p in self.parameters.values())

    def rebind_parameters(self, mapping: Mapping[int, torch.nn.Parameter]) -> None:
        """Follow parameters that FSDP replaced (``mapping``: id(old) → new); refuse shards
        unless this kind of update can select on them."""
        rebound = {name: mapping.get(id(p), p) for name, p in self.parameters.items()}
        if not self.supports_sharding and any(distributed.is_dtensor(p) for p in rebound.values()):
            raise ValueError(f"{type(self).__name__} chooses its mask on whole tensors and does not "
                             "support strategy='fsdp'; use strategy='ddp'")
        self.parameters = rebound

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
        for name, parameter in self.parameters.items():
            parameter = local_tensor(parameter)
            device = parameter.device
            new = selection.get(name)
            new = torch.empty(0, dtype=torch.long, device=device) if new is None \
                else torch.sort(new.to(device=device, dtype=torch.long)).values
            if new.numel() and (int(new[0]) < 0 or int(new[-1]) >= parameter.numel()):
                raise IndexError(f"selection of '{name}' lies outside its {parameter.numel()} entries")
            old = self.selection.get(name)
            exp_avg = torch.zeros(new.numel(), dtype=parameter.dtype, device=device)
            exp_avg_sq = torch.zeros_like(exp_avg)
            steps = torch.zeros(new.numel(), dtype=torch.float32, device=device)
            if old is not None and old.numel() and new.numel():
                position = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)
                kept = old[position] == new
                exp_avg[kept] = self._exp_avg[name][position[kept]]
                exp_avg_sq[kept] = self._exp_avg_sq[name][position[kept]]
                steps[kept] = self._steps[name][position[kept]]
            self.selection[name] = new
            self._exp_avg[name], self._exp_avg_sq[name], self._steps[name] = exp_avg, exp_avg_sq, steps
        self._selections_made += 1

    def selected_entries(self) -> int:
        return sum(int(indices.numel()) for indices in self.selection.values())

    def moved_mask(self, name: str) -> torch.Tensor:
        """Flat bool mask of the entries of ``name`` that have changed so far."""
        if name not in self._moved:
            parameter = local_tensor(self.parameters[name])
            self._moved[name] = torch.zeros(parameter.numel(), dtype=torch.bool,
                                            device=parameter.device)
            self._moved_count[name] = 0
        return self._moved[name]

    def moved_indices(self) -> dict[str, torch.Tensor]:
        """name → sorted flat indices of every entry that ever changed (what a file stores)."""
        return {name: torch.nonzero(mask).reshape(-1) for name, mask in self._moved.items()
                if self._moved_count[name]}

    def mark_moved(self, name: str, indices: torch.Tensor) -> None:
        """Record entries of ``name`` as changed (loading an adapter writes them directly)."""
        mask = self.moved_mask(name)
        indices = indices.to(mask.device)
        self._moved_count[name] += int((~mask[indices]).sum())
        mask[indices] = True

    def stored_entries(self) -> int:
        """How many entries ever changed: the adapter file's share of this update."""
        return sum(self._moved_count.values())

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
            for name, parameter in self.parameters.items():
                grad = parameter.grad
                if grad is None:
                    continue
                flat = local_tensor(grad).view(-1)
                indices = self.selection[name]
                kept = flat[indices]
                flat.zero_()
                flat[indices] = kept

    def on_before_optimizer_step(self, trainer: Any, step: int) -> None:
        groups = {id(p): group for group in trainer.optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                group = groups.get(id(parameter))
                if group is None:
                    raise RuntimeError(f"'{name}' is in no optimizer group: build the Trainer with "
                                       "the Adaptation's param_groups()")
                self._adamw(name, parameter, group)
                parameter.grad = None

    def _adamw(self, name: str, parameter: torch.nn.Parameter, group: Mapping[str, Any]) -> None:
        """torch.optim.AdamW's update, entry-wise on the selection (per-entry step counts)."""
        indices = self.selection[name]
        if not indices.numel():
            return
        flat = local_tensor(parameter.detach()).view(-1)
        grad = local_tensor(parameter.grad).view(-1)[indices] if parameter.grad is not None \
            else torch.zeros(indices.numel(), dtype=parameter.dtype, device=flat.device)
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        weight_decay = group["weight_decay"]
        old = flat[indices]
        values = old.clone()
        steps = self._steps[name].add_(1)
        if weight_decay:
            values.mul_(1 - lr * weight_decay)
        exp_avg, exp_avg_sq = self._exp_avg[name], self._exp_avg_sq[name]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        steps64 = steps.double()
        step_size = (lr / (1 - torch.pow(beta1, steps64))).to(values.dtype)
        bias_correction2_sqrt = (1 - torch.pow(beta2, steps64)).sqrt_().to(values.dtype)
        denominator = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        values.sub_(exp_avg.div(denominator).mul_(step_size))
        flat[indices] = values
        self.mark_moved(name, indices[values != old])

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "selection": dict(self.selection),
            "exp_avg": dict(self._exp_avg),
            "exp_avg_sq": dict(self._exp_avg_sq),
            "steps": dict(self._steps),
            "moved": self.moved_indices(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        devices = {name: local_tensor(p).device for name, p in self.parameters.items()}
        self.selection = {k: v.to(devices[k]) for k, v in state["selection"].items()}
        for target, key in ((self._exp_avg, "exp_avg"), (self._exp_avg_sq, "exp_avg_sq"),
                            (self._steps, "steps")):
            target.clear()
            target.update({k: v.to(devices[k]) for k, v in state[key].items()})
        self._moved.clear()
        self._moved_count.clear()
        for name, indices in state["moved"].items():
            self.mark_moved(name, indices)
