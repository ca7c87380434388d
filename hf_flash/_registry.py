"""The registry of model families hf_flash knows how to patch. Each patches/<family>.py declares
one `Family` and calls `register_family`; nothing else decides which models are supported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


class UnsupportedModelError(ValueError):
    """The model (or its configuration) is not one hf_flash can patch."""


@dataclass(frozen=True)
class Family:
    """One architecture family.

    name:            shown in errors and explain().
    model_types:     config.model_type values this entry serves; empty for the generic entry.
    attention_classes: class names of the modules that compute attention (for explain()).
    quirks:          config attribute -> how hf_flash honours it (documentation, shown by explain).
    check:           model -> None; raises UnsupportedModelError for configs it cannot serve.
                     Runs before anything is changed.
    apply / revert:  only for families whose attention does not go through transformers'
                     AttentionInterface: patch / restore the model's attention modules.
                     Families without them are switched with model.set_attn_implementation.
    matches:         for the generic entry: model -> bool.
    pack / unpack:   for families that can run on packed real tokens (patch(packed=True)):
                     model -> data, and (model, data) -> None to undo it.
    """

    name: str
    model_types: tuple = ()
    attention_classes: tuple = ()
    quirks: dict = field(default_factory=dict)
    check: Optional[Callable] = None
    apply: Optional[Callable] = None
    revert: Optional[Callable] = None
    matches: Optional[Callable] = None
    describe_layer: Optional[Callable] = None
    pack: Optional[Callable] = None
    unpack: Optional[Callable] = None


_FAMILIES: list = []


def register_family(family: Family) -> Family:
    for other in _FAMILIES:
        if other.name == family.name:
            raise ValueError(f"a family named {family.name!r} is already registered; Family.name "
                             f"must differ from {[f.name for f in _FAMILIES]}")
        clash = set(other.model_types) & set(family.model_types)
        if clash:
            raise ValueError(f"Family.model_types {sorted(clash)} are already served by "
                             f"{other.name!r}; a model type belongs to one family")
    _FAMILIES.append(family)
    return family


def families() -> tuple:
    return tuple(_FAMILIES)


def supported_model_types() -> list:
    return sorted(t for f in _FAMILIES for t in f.model_types)


def family_for(model: torch.nn.Module) -> Family:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in _FAMILIES:
        if model_type in fam.model_types:
            return fam
    for fam in _FAMILIES:
        if fam.matches is not None and fam.matches(model):
            return fam
    raise UnsupportedModelError(
        f"hf_flash does not support model type {model_type!r} ({type(model).__name__}). "
        f"Supported model types: {', '.join(supported_model_types())}; plus any model whose "
        f"attention goes through transformers' AttentionInterface (this one does not, or its "
        f"configuration uses a feature hf_flash cannot serve).")
