"""Several adapters on one backbone, switched per call: one pretrained model in memory, N tasks.

Each adapter gets a *view* of the backbone: a copy of its module tree that shares every
parameter and buffer with it (no tensor is copied), onto which the adapter is loaded as
:func:`~weatherpeft.adapters.load_adapter` loads it — so modules a method adds (LoRA matrices,
TADP generators, prompt hooks) live in that view only and never meet another adapter's.
What an adapter changes *in* pretrained tensors (SFAS's sparse entries, dense tensors, task
heads, the encoder/decoder under the "train" protocol) is kept as its stored values and
written into the shared tensors when the adapter is switched on; the entries it overwrote are
kept aside and written back when it is switched off. So an adapter costs its stored tensors
plus what its method builds at run time (its modules, cached prompts), and one set of saved
entries exists, for the active adapter. Outputs equal the adapter's own model (and its merged
model) because the very same modules and values compute them.

Bad input is refused before anything changes: an adapter made for another backbone
(fingerprint) or variable set, a name already taken, switching to an unknown name.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from aurora import Batch

from weatherpeft.adapters import (
    AdapterError,
    check_adapter_fits,
    load_adapter,
    read_adapter_config,
    read_adapter_tensors,
)
from weatherpeft.backbones.base import Backbone
from weatherpeft.methods.base import Adaptation, ParameterReport

__all__ = ["MultiAdapterModel"]

#: Adapter file roles whose tensors are values of the backbone's own parameters.
_IN_PLACE_ROLES = ("dense", "head", "encoder_decoder")


@dataclass
class _Patch:
    """Values an adapter writes into one shared parameter: whole (``indices`` None) or at flat
    ``indices``."""

    parameter: torch.nn.Parameter
    indices: torch.Tensor | None
    values: torch.Tensor

    def swap_in(self) -> torch.Tensor:
        """Write the values; return what they replaced."""
        flat = self.parameter.data.view(-1)
        if self.indices is None:
            replaced = flat.clone()
            flat.copy_(self.values.reshape(-1))
        else:
            replaced = flat[self.indices].clone()
            flat[self.indices] = self.values
        return replaced

    def restore(self, replaced: torch.Tensor) -> None:
        flat = self.parameter.data.view(-1)
        if self.indices is None:
            flat.copy_(replaced)
        else:
            flat[self.indices] = replaced


def _shared_view(backbone: Backbone) -> Backbone:
    """A copy of ``backbone``'s modules sharing all of its parameters and buffers."""
    memo = {id(t): t for t in (*backbone.parameters(), *backbone.buffers())}
    return copy.deepcopy(backbone, memo)


class MultiAdapterModel(torch.nn.Module):
    """One backbone, many adapters: :meth:`add_adapter`, :meth:`set_adapter`, then call it.

    ``forward(batch)`` runs the active adapter's model (the bare backbone when none is active).
    For inference: the model stays in eval mode; call it under ``torch.no_grad()``. Put the
    backbone on its device before adding adapters (they are built where its tensors are).
    """

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self._adaptations: dict[str, Adaptation] = {}
        self._patches: dict[str, list[_Patch]] = {}
        self._reports: dict[str, ParameterReport] = {}
        self._adapter_flags: dict[str, list[bool]] = {}
        self._base_flags = self._flags()
        self._active: str | None = None
        self._replaced: list[torch.Tensor] = []

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters, in loading order."""
        return list(self._adaptations)

    @property
    def active(self) -> str | None:
        return self._active

    def adaptation(self, name: str) -> Adaptation:
        """The loaded adapter ``name`` (its method and options; without training hooks)."""
        self._check_known(name)
        return self._adaptations[name]

    def report(self, name: str) -> ParameterReport:
        """The parameter report of adapter ``name`` as loaded."""
        self._check_known(name)
        return self._reports[name]

    def add_adapter(self, name: str, path: str | os.PathLike, *, force: bool = False) -> None:
        """Load the adapter folder ``path`` under ``name``; the active adapter stays active.

        :class:`AdapterError` for a name already taken, an adapter made for another variable set
        or (unless ``force``) another backbone, or any problem of the file; nothing already
        loaded changes."""
        if not isinstance(name, str) or not name:
            raise AdapterError(f"an adapter name must be a non-empty string, got {name!r}")
        if name in self._adaptations:
            raise AdapterError(f"an adapter named '{name}' is already loaded; choose another name "
                               f"(loaded: {self.adapters})")
        path = Path(path)
        config = read_adapter_config(path)
        check_adapter_fits(path, config, self.backbone, force)
        patches = self._patches_of(path, config)
        # load_adapter writes into the shared tensors too, and sets their requires_grad flags:
        # put both back, keeping the adapter's flags for when it is active.
        replaced = [patch.swap_in() for patch in patches]
        flags = self._flags()
        try:
            adaptation = load_adapter(path, _shared_view(self.backbone), force=force)
            self._adapter_flags[name] = self._flags()
        finally:
            for patch, values in zip(reversed(patches), reversed(replaced)):
                patch.restore(values)
            self._set_flags(flags)
        self._reports[name] = adaptation.report()
        # Inference only: drop the masked updates (their bookkeeping holds a flag per
        # selectable entry); what they moved is in the patches.
        adaptation.hooks = [h for h in adaptation.hooks if h not in adaptation.masked_updates]
        adaptation.masked_updates = []
        self._adaptations[name] = adaptation.eval()
        self._patches[name] = patches

    def _patches_of(self, path: Path, config: dict) -> list[_Patch]:
        """What the adapter writes into the backbone's own parameters, from its file."""
        tensors = read_adapter_tensors(path, config)
        parameters = dict(self.backbone.named_parameters())

        def parameter(name: str) -> torch.nn.Parameter:
            own = name.replace(".base_layer.", ".")  # HF peft's name of a wrapped layer's weight
            if own not in parameters:
                raise AdapterError(f"{path}: tensor '{name}' is no parameter of this backbone")
            return parameters[own]

        patches = []
        for key, value in sorted(tensors.items()):
            role, _, name = key.partition(".")
            if role in _IN_PLACE_ROLES:
                target = parameter(name)
                patches.append(_Patch(target, None, value.to(target.device, target.dtype)))
            elif role == "sparse" and name.endswith(".indices") \
                    and f"sparse.{name.removesuffix('.indices')}.values" in tensors:
                name = name.removesuffix(".indices")  # (an unpaired entry: load_adapter refuses it)
                target = parameter(name)
                values = tensors[f"sparse.{name}.values"]
                patches.append(_Patch(target, value.to(target.device, torch.long),
                                      values.to(target.device, target.dtype)))
        return patches

    def _flags(self) -> list[bool]:
        return [parameter.requires_grad for parameter in self.backbone.parameters()]

    def _set_flags(self, flags: list[bool]) -> None:
        for parameter, flag in zip(self.backbone.parameters(), flags):
            parameter.requires_grad_(flag)

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (None: the bare backbone). :class:`AdapterError` for
        an unknown name, with the active adapter unchanged."""
        if name is not None:
            self._check_known(name)
        if name == self._active:
            return
        with torch.no_grad():
            if self._active is not None:
                for patch, values in zip(reversed(self._patches[self._active]),
                                         reversed(self._replaced)):
                    patch.restore(values)
            self._replaced = [] if name is None else \
                [patch.swap_in() for patch in self._patches[name]]
        # requires_grad changes the kernel some layers choose (Aurora's output heads), so an
        # adapter runs with its own model's flags, to the last bit.
        self._set_flags(self._base_flags if name is None else self._adapter_flags[name])
        self._active = name

    def _check_known(self, name: str) -> None:
        if name not in self._adaptations:
            raise AdapterError(f"no adapter named {name!r} is loaded (loaded: {self.adapters})")

    def forward(self, batch: Batch) -> Batch:
        model = self.backbone if self._active is None else self._adaptations[self._active]
        return model(batch)

    def each(self) -> Iterator[str]:
        """Switch to every loaded adapter in turn (yielding its name); the one active before is
        active again afterwards."""
        before = self._active
        try:
            for name in self.adapters:
                self.set_adapter(name)
                yield name
        finally:
            self.set_adapter(before)
