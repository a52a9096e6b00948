"""adapters/registry.py (tables in adapters/catalog.py): named model variants, lookup errors, seeded tiny models."""

from __future__ import annotations

import pytest
import torch

from samtune import SamtuneError
from samtune.adapters.registry import build_sam, get_variant, list_models, register_model


def test_builtin_variants_are_listed():
    names = list_models()
    assert {"tiny", "sam-vit-base", "sam-vit-large", "sam-vit-huge", "medsam-vit-base"} <= set(names)
    assert names == sorted(names)
    assert get_variant("sam-vit-base").official_variant == "vit_b"


def test_unknown_name_suggests_the_closest_variant():
    with pytest.raises(SamtuneError, match="sam-vit-base"):
        get_variant("sam-vit-bsae")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        register_model(get_variant("tiny"))


def test_tiny_model_is_seeded_and_sized():
    a, b = build_sam("tiny", image_size=64), build_sam("tiny", image_size=64)
    other = build_sam("tiny", image_size=64, init_seed=1)
    assert not a.training  # built in eval mode
    assert a.config.vision_config.image_size == 64
    sd_a, sd_b, sd_o = a.state_dict(), b.state_dict(), other.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)  # the same base can be rebuilt to load an adapter
    assert any(not torch.equal(sd_a[k], sd_o[k]) for k in sd_a)


def test_moved_names_are_still_importable_from_their_old_modules():
    # catalog.py took the tables out of registry.py and family.py (to break the import circle);
    # callers keep importing them from where they always did, and get the same objects.
    from samtune.adapters import catalog, family, registry

    assert registry.ModelVariant is catalog.ModelVariant and registry.register_model is catalog.register_model
    assert registry.get_variant is catalog.get_variant and registry.list_models is catalog.list_models
    assert family.get_family is catalog.get_family and family.list_families is catalog.list_families
    assert family.register_family is catalog.register_family
    assert registry.family_of("tiny") is family.get_family("sam")
