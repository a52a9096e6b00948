"""The tables of registered model families and variants, and their lookups.

A family module (adapters/sam.py, ...) registers itself at import with ``@register_family`` and
``register_model``. This module knows the built-in ones only by module name (``BUILTIN``) and
imports them with importlib on the first lookup: it imports no other adapters module, so the
interface (adapters/family.py), the registry (adapters/registry.py) and the implementations can
all import it without an import circle.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from samtune.errors import SamtuneError
from samtune.suggest import did_you_mean

if TYPE_CHECKING:
    from samtune.adapters.family import ModelFamily

# imported in this order on the first lookup: families and variants are listed in registration order
BUILTIN = ("samtune.adapters.sam", "samtune.adapters.mobile_sam", "samtune.adapters.sam2", "samtune.adapters.sam3",
           "samtune.adapters.edgetam")


@dataclass(frozen=True)
class ModelVariant:
    name: str
    family: str  # a registered ModelFamily (samtune.adapters.family)
    description: str
    default_image_size: int
    hub_id: str | None  # Hugging Face hub id (or absolute folder, for weights shipped in the package) with the pretrained weights, if any
    official_variant: str | None  # e.g. "vit_b": key shapes of official checkpoint files
    make_config: Callable[[int], Any] | None = None  # random-init config at an image size (tiny models)
    licence: str | None = None  # of the pretrained weights, as their source states it (the model card names it)


_REGISTRY: dict[str, ModelVariant] = {}
_FAMILIES: dict[str, ModelFamily] = {}
_loaded = False


def register_model(variant: ModelVariant) -> ModelVariant:
    if variant.name in _REGISTRY:
        raise ValueError(f"model {variant.name!r} registered twice")
    _REGISTRY[variant.name] = variant
    return variant


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Class decorator: one instance per family, under ``cls.name``."""
    if cls.name in _FAMILIES:
        raise ValueError(f"model family {cls.name!r} registered twice")
    _FAMILIES[cls.name] = cls()
    return cls


def _load_builtin() -> None:
    global _loaded
    if not _loaded:  # set only after every import succeeded: a failed one fails again on the next lookup
        for name in BUILTIN:
            importlib.import_module(name)
        _loaded = True


def list_models() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_variant(name: str) -> ModelVariant:
    _load_builtin()
    if name not in _REGISTRY:
        raise SamtuneError(f"model.name={name!r} is unknown; {did_you_mean(name, _REGISTRY, fmt='{!r}')}(known: {', '.join(list_models())})")
    return _REGISTRY[name]


def get_family(name: str) -> ModelFamily:
    _load_builtin()
    if name not in _FAMILIES:
        raise SamtuneError(f"unknown model family {name!r}; {did_you_mean(name, _FAMILIES)}(known: {', '.join(_FAMILIES)})")
    return _FAMILIES[name]


def list_families() -> list[str]:
    _load_builtin()
    return sorted(_FAMILIES)
