"""Forward hooks that rewrite chosen modules' outputs, for methods that adapt by hooking.

SSF (scale and shift) and AdaptFormer (a parallel adapter) leave the backbone's modules
and parameter names untouched: each hooked module's output goes through
:meth:`OutputHooks.rewrite` while attached. The hooked modules are referenced, not
registered, so the method's state dict holds only what it created.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["OutputHooks", "module_key"]


def module_key(name: str) -> str:
    """A ModuleDict key for a dotted module name."""
    return name.replace(".", "_")


class OutputHooks(nn.Module):
    """Base for methods that rewrite outputs of ``hooked`` modules (key → module)."""

    def __init__(self, hooked: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.__dict__["_hooked"] = dict(hooked)  # references, not submodules
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def rewrite(self, key: str, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        """The new output of hooked module ``key`` given its positional inputs."""
        raise NotImplementedError

    def attach(self) -> OutputHooks:
        """Install the hooks on every hooked module."""
        if self._handles:
            raise RuntimeError(f"{type(self).__name__} is already attached")
        for key, module in self._hooked.items():
            self._handles.append(module.register_forward_hook(functools.partial(self._hook, key)))
        return self

    def detach(self) -> None:
        """Remove the hooks: the backbone computes what its weights say."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, key: str, module: nn.Module, args: tuple[Any, ...],
              output: torch.Tensor) -> torch.Tensor:
        return self.rewrite(key, args, output)
