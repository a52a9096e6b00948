"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from samtune.datasets.synthetic import generate_cityscapes, generate_ct_phantom


@pytest.fixture(scope="session")
def phantom_template(tmp_path_factory) -> Path:
    """A small CT phantom dataset (nnU-Net v2 layout, 3 cases of 48×48×12), generated once."""
    return generate_ct_phantom(tmp_path_factory.mktemp("ct"), n_cases=3, shape=(48, 48, 12))


@pytest.fixture
def phantom(phantom_template, tmp_path) -> Path:
    """A private copy of the phantom dataset that a test may modify."""
    root = tmp_path / phantom_template.name
    shutil.copytree(phantom_template, root)
    return root


@pytest.fixture(scope="session")
def cs_template(tmp_path_factory) -> Path:
    """A small Cityscapes-style tree (2 train images in 2 cities, 1 val, 128×64), generated once."""
    return generate_cityscapes(tmp_path_factory.mktemp("cs") / "cityscapes", n_train=2, n_val=1, size_wh=(128, 64))


@pytest.fixture
def cs_root(cs_template, tmp_path) -> Path:
    """A private copy of the Cityscapes-style tree that a test may modify."""
    root = tmp_path / "cityscapes"
    shutil.copytree(cs_template, root)
    return root
