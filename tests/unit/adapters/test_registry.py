"""adapters/registry.py: named model variants, lookup errors, seeded tiny models."""

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
