"""Model variants: named configurations of a model family (``tiny``, ``sam-vit-base``, ...).

``build_sam("tiny")`` gives a small randomly initialised SAM for tests, ``build_sam("tiny-pretrained")``
the same architecture pretrained on generated shapes (weights shipped in the package, for the offline demo);
``sam-vit-base|large|huge`` and ``medsam-vit-base`` load weights from a local Hugging Face folder,
a hub id (when online) or an official ``.pth`` file. Variants register themselves with
``register_model`` in their family's module (adapters/sam.py), like timm's ``@register_model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from samtune.errors import SamtuneError
from samtune.suggest import did_you_mean


@dataclass(frozen=True)
class ModelVariant:
    name: str
    family: str  # a registered ModelFamily (samtune.adapters.family)
    description: str
    default_image_size: int
    hub_id: str | None  # Hugging Face hub id (or absolute folder, for weights shipped in the package) with the pretrained weights, if any
    official_variant: str | None  # e.g. "vit_b": key shapes of official checkpoint files
    make_config: Callable[[int], Any] | None = None  # random-init config at an image size (tiny models)


_REGISTRY: dict[str, ModelVariant] = {}


def register_model(variant: ModelVariant) -> ModelVariant:
    if variant.name in _REGISTRY:
        raise ValueError(f"model {variant.name!r} registered twice")
    _REGISTRY[variant.name] = variant
    return variant


def _builtin() -> dict[str, ModelVariant]:
    import samtune.adapters.mobile_sam  # noqa: F401  (registers the MobileSAM variants)
    import samtune.adapters.sam  # noqa: F401  (registers the SAM variants)
    import samtune.adapters.sam2  # noqa: F401  (registers the SAM 2 variants)

    return _REGISTRY


def list_models() -> list[str]:
    return sorted(_builtin())


def get_variant(name: str) -> ModelVariant:
    registry = _builtin()
    if name not in registry:
        raise SamtuneError(f"model.name={name!r} is unknown; {did_you_mean(name, registry, fmt='{!r}')}(known: {', '.join(list_models())})")
    return registry[name]


def family_of(name: str):
    """The ModelFamily that builds and runs variant ``name``."""
    from samtune.adapters.family import get_family

    return get_family(get_variant(name).family)


def build_model(name: str, checkpoint: str | Path | None = None, image_size: int | None = None, init_seed: int = 0):
    """Build variant ``name`` in eval mode.

    ``checkpoint``: an official ``.pth`` (or ``.safetensors`` with official keys), a local Hugging
    Face folder, or a hub id; ``None`` uses the variant's hub id (or random init for tiny variants,
    seeded by ``init_seed`` so the same base model can be rebuilt to load an adapter onto).
    """
    variant = get_variant(name)
    model = family_of(name).build(variant, None if checkpoint is None else str(checkpoint), image_size or variant.default_image_size, init_seed)
    model.eval()
    return model


build_sam = build_model  # the name the README and users know
