"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samtune.datasets.cityscapes import map_label_ids
from samtune.datasets.source import SliceSource
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


def two_blobs() -> np.ndarray:
    mask = np.zeros((40, 40), bool)
    mask[5:15, 5:15] = True  # 100 px
    mask[25:30, 25:37] = True  # 60 px
    return mask


class BlobSource(SliceSource):
    """Two 40×40 images, each with two blobs of class 1 (100 and 60 px) and a bar of class 2."""

    class_names = {1: "blob", 2: "bar"}
    ignore_index = 255

    def __init__(self):
        self.label = np.zeros((40, 40), np.uint8)
        self.label[two_blobs()] = 1
        self.label[32:38, 2:20] = 2

    def __len__(self):
        return 2

    def item_id(self, i):
        return f"img{i}"

    def slice_classes(self, i):
        ids, counts = np.unique(self.label, return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    def load(self, i):
        image = np.full((40, 40, 3), 60, np.uint8)
        image[self.label > 0] = 200
        return image, self.label.copy()


@pytest.fixture
def blob_source() -> type[BlobSource]:
    """The ``BlobSource`` class (tests subclass it to count loads or add a slice index)."""
    return BlobSource


@pytest.fixture
def write_train_ids():
    """Writes ``*_gtFine_labelTrainIds.png`` beside every labelIds file of a tree, as
    cityscapesScripts' createTrainIdLabelImgs does (from the official table); returns the files."""

    def write(root: Path) -> list[Path]:
        written = []
        for label_ids in sorted(root.glob("gtFine/*/*/*_gtFine_labelIds.png")):
            train_ids = label_ids.with_name(label_ids.name.replace("_labelIds", "_labelTrainIds"))
            Image.fromarray(map_label_ids(np.asarray(Image.open(label_ids)))).save(train_ids)
            written.append(train_ids)
        return written

    return write
