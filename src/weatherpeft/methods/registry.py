"""Looking methods up and applying them: every built-in method module is imported here (each
registers its methods with :func:`~weatherpeft.methods.base.register_method`), so the lookup
always sees them, and the method modules depend only on :mod:`weatherpeft.methods.base`."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from weatherpeft.backbones import load_backbone
from weatherpeft.backbones.base import Backbone
from weatherpeft.methods import (  # noqa: F401  (each module registers its methods on import)
    adaptformer,
    child_tuning,
    frozen,
    full,
    hf_peft,
    sfas,
    ssf,
    vpt,
    weatherpeft,
)
from weatherpeft.methods.base import Adaptation, MethodSpec, check_budget, registered_methods

__all__ = ["apply_method", "describe_methods", "get_method", "method_names"]


def method_names() -> list[str]:
    """Every registered method's name, sorted (the built-in ones and any registered since)."""
    return sorted(registered_methods())


def get_method(name: str) -> MethodSpec:
    """The registered method ``name``; ``ValueError`` listing the known ones otherwise."""
    methods = registered_methods()
    if not isinstance(name, str) or name not in methods:
        raise ValueError(f"unknown method {name!r}; known: {sorted(methods)}")
    return methods[name]


def apply_method(name: str, backbone: Backbone, budget: float,
                 options: Mapping[str, Any] | None = None,
                 encoder_decoder: str = "frozen") -> Adaptation:
    """Apply method ``name`` to ``backbone`` at ``budget`` (fraction of pretrained parameters)
    under the ``encoder_decoder`` protocol (:data:`ENCODER_DECODER_PROTOCOLS`: "frozen", the
    default, or "train", the authors': encoder/decoder trained whole by every method, outside
    the budget).

    Raises ``ValueError`` for an unknown method, a budget outside (0, 1], an unknown protocol
    or one the backbone cannot honour, or an unknown option or one of the wrong type or value
    (a pattern that is not a regular expression included); :class:`BudgetError` where the
    method cannot reach the budget on this backbone.
    """
    spec = get_method(name)
    budget = check_budget(budget)
    options = spec.make_options(options)
    backbone.set_encoder_decoder(encoder_decoder)
    try:
        return spec.build(backbone, budget, options)
    except re.error as error:  # include/exclude/targets options are regular expressions
        raise ValueError(f"method '{name}': option pattern {error.pattern!r} is not a regular "
                         f"expression: {error}") from error


def _option_defaults(options: type) -> dict[str, Any]:
    defaults = {}
    for field in dataclasses.fields(options):
        if field.default is not dataclasses.MISSING:
            defaults[field.name] = field.default
        elif field.default_factory is not dataclasses.MISSING:
            defaults[field.name] = field.default_factory()
    return defaults


def describe_methods(backbone_path: str, budget: float,
                     encoder_decoder: str = "frozen") -> list[dict[str, Any]]:
    """Every method: summary, option defaults, and its parameter report at ``budget`` under the
    ``encoder_decoder`` protocol on the backbone checkpoint ``backbone_path`` (or the reason
    it cannot reach that budget).

    The checkpoint is loaded once; each method is applied to a deep copy of it (what loading
    it again would give, at a fraction of the cost)."""
    loaded = load_backbone(backbone_path)
    rows = []
    for name in method_names():
        spec = get_method(name)
        row: dict[str, Any] = {"name": name, "summary": spec.summary,
                               "options": _option_defaults(spec.options)}
        try:
            adaptation = apply_method(name, copy.deepcopy(loaded), budget,
                                      encoder_decoder=encoder_decoder)
            row.update(adaptation.report().as_dict(), resolved=adaptation.resolved)
        except ValueError as error:
            row["error"] = str(error)
        rows.append(row)
    return rows
