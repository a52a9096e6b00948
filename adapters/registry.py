"""Model variants: named configurations of a model family (``tiny``, ``sam-vit-base``, ...).

``build_sam("tiny")`` gives a small randomly initialised SAM for tests, ``build_sam("tiny-pretrained")``
the same architecture pretrained on generated shapes (weights shipped in the package, for the offline demo);
``sam-vit-base|large|huge`` and ``medsam-vit-base`` load weights from a local Hugging Face folder,
a hub id (when online) or an official ``.pth`` file. Variants register themselves with
``register_model`` in their family's module (adapters/sam.py), like timm's ``@register_model``.

The tables and lookups live in adapters/catalog.py (a leaf the families import without a circle);
they are re-exported here, where callers have always found them.
"""

from __future__ import annotations

from pathlib import Path

from samtune.adapters.catalog import ModelVariant, get_family, get_variant, list_models, register_model  # noqa: F401  (re-exported)


def family_of(name: str):
    """The ModelFamily that builds and runs variant ``name``."""
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
