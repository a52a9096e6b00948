"""datasets/folder2d.py: generic image/label folders (``data.kind: folder2d``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samtune import SamtuneError
from samtune.datasets.folder2d import Folder2DSource, discover_folder2d, read_rgb
from samtune.adapters.preprocess import LongestSideTransform
from samtune.finetune.data import build_datasets, open_split
from samtune.finetune.recipe import validate_recipe


H, W = 24, 32


def _label(i: int) -> np.ndarray:
    label = np.zeros((H, W), np.uint8)
    label[4 : 12 + i, 3:20] = 1
    label[15:20, 22 + i % 4 : 30] = 2
    return label


def _write_pair(folder: Path, name: str, i: int, fmt: str = "png") -> None:
    rng = np.random.default_rng(i)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(exist_ok=True)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    if fmt == "tif16":  # 16-bit grey microscopy/X-ray style
        Image.fromarray(rng.integers(1000, 4000, (H, W)).astype(np.uint16)).save(folder / "images" / f"{name}.tif")
    elif fmt == "grey":
        Image.fromarray(rgb[..., 0]).save(folder / "images" / f"{name}.png")
    else:
        Image.fromarray(rgb).save(folder / "images" / f"{name}.{fmt}")
    Image.fromarray(_label(i)).save(folder / "labels" / f"{name}.png")


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "endoscopy"
    for i, fmt in enumerate(["png", "jpg", "grey", "tif16", "png", "png"]):
        _write_pair(root, f"frame{i:02d}", i, fmt)
    return root


def test_images_and_labels_matched_by_stem(folder):
    layout = discover_folder2d(folder)
    assert layout.val is None and [i.name for i in layout.train] == [f"frame{i:02d}" for i in range(6)]
    assert [i.image.suffix for i in layout.train] == [".png", ".jpg", ".png", ".tif", ".png", ".png"]
    src = Folder2DSource(layout.train, {1: "polyp", 2: "tool"})
    for k in range(len(src)):
        image, label = src.load(k)
        assert image.shape == (H, W, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(label, _label(k))
        assert src.slice_classes(k) == {1: int((_label(k) == 1).sum()), 2: int((_label(k) == 2).sum())}
    grey = src.load(2)[0]
    assert (grey[..., 0] == grey[..., 1]).all()
    tif = read_rgb(layout.train[3].image)  # 16-bit scaled by its percentiles to the full 0-255 range
    assert tif.min() == 0 and tif.max() == 255


def test_palette_labels_give_their_indices(folder):
    label = Image.fromarray(_label(0), mode="L").convert("P")
    label.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    label.save(folder / "labels" / "frame00.png")
    src = Folder2DSource(discover_folder2d(folder).train[:1], {1: "polyp", 2: "tool"})
    np.testing.assert_array_equal(src.load(0)[1], _label(0))


def test_val_folder_fraction_and_split_file(folder):
    base = {"kind": "folder2d", "root": str(folder), "class_names": {1: "polyp", 2: "tool"}}
    by_fraction = open_split(validate_recipe({"data": {**base, "val_fraction": 0.34}}), progress=False)
    train_names = [i.name for i in by_fraction.train.items]
    val_names = [i.name for i in by_fraction.val.items]
    assert len(val_names) == 2 and not set(train_names) & set(val_names) and len(train_names) == 4
    again = open_split(validate_recipe({"data": {**base, "val_fraction": 0.34}}), progress=False)
    assert [i.name for i in again.val.items] == val_names  # seeded
    (folder / "split.json").write_text(json.dumps({"train": ["frame00", "frame01"], "val": ["frame05"]}))
    split = open_split(validate_recipe({"data": {**base, "split_file": "split.json"}}), progress=False)
    assert [i.name for i in split.train.items] == ["frame00", "frame01"] and [i.name for i in split.val.items] == ["frame05"]
    for i in (6, 7):
        _write_pair(folder / "val", f"val{i}", i)
    with_val = open_split(validate_recipe({"data": base}), progress=False)
    assert len(with_val.train) == 6 and [i.name for i in with_val.val.items] == ["val6", "val7"]
    with pytest.raises(SamtuneError, match="use one way"):
        open_split(validate_recipe({"data": {**base, "split_file": "split.json"}}), progress=False)


def test_class_names_default_to_label_values(folder):
    recipe = validate_recipe({"data": {"kind": "folder2d", "root": str(folder)}, "model": {"image_size": 32}})
    sources = open_split(recipe, progress=False)
    assert sources.train.class_names == sources.val.class_names == {1: "class_1", 2: "class_2"}
    data = build_datasets(recipe, LongestSideTransform(32), progress=False)
    assert len(data.train) > 0 and len(data.val) > 0 and data.skipped == []


def test_notes_for_forks_and_labels_without_images(folder):
    (folder / "images" / "._frame00.png").write_bytes(b"\x00\x05\x16\x07")
    Image.fromarray(_label(9)).save(folder / "labels" / "orphan.png")
    layout = discover_folder2d(folder)
    assert len(layout.train) == 6 and layout.skipped == []
    assert any("._frame00.png" in n for n in layout.notes) and any("orphan.png" in n for n in layout.notes)


def test_missing_folders_is_a_clear_error(tmp_path):
    with pytest.raises(SamtuneError, match="images/ and labels/"):
        discover_folder2d(tmp_path)


def test_sixteen_bit_label_maps_are_read_as_8_bit_or_skipped(folder):
    Image.fromarray(_label(0).astype(np.uint16)).save(folder / "labels" / "frame00.png")  # 16-bit, small ids: fine
    mask = (_label(1) > 0).astype(np.uint16) * 65535  # a binary mask saved as 16-bit 0/65535
    Image.fromarray(mask).save(folder / "labels" / "frame01.png")
    items = discover_folder2d(folder).train
    with pytest.raises(SamtuneError, match=r"16-bit label map holding values \[65535\]") as info:
        Folder2DSource(items, {1: "polyp", 2: "tool"})
    assert str(folder / "labels" / "frame01.png") in str(info.value)
    src = Folder2DSource(items, {1: "polyp", 2: "tool"}, on_bad_case="skip")
    assert [s["file"] for s in src.skipped] == [str(folder / "labels" / "frame01.png")] and "8-bit" in src.skipped[0]["problem"]
    assert src.item_id(0) == "frame00"
    label = src.load(0)[1]
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, _label(0))
