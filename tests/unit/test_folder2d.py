"""2D sources: generic image/label folders (``data.kind: folder2d``) and Cityscapes' labelTrainIds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samtune import SamtuneError
from samtune.datasets.cityscapes import CityscapesSource, map_label_ids
from samtune.datasets.folder2d import Folder2DSource, discover_folder2d, read_rgb
from samtune.finetune.data import build_datasets, build_sources
from samtune.finetune.inspection import inspect_data
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
    by_fraction = build_sources(validate_recipe({"data": {**base, "val_fraction": 0.34}}), progress=False)
    train_names = [i.name for i in by_fraction.train.items]
    val_names = [i.name for i in by_fraction.val.items]
    assert len(val_names) == 2 and not set(train_names) & set(val_names) and len(train_names) == 4
    again = build_sources(validate_recipe({"data": {**base, "val_fraction": 0.34}}), progress=False)
    assert [i.name for i in again.val.items] == val_names  # seeded
    (folder / "split.json").write_text(json.dumps({"train": ["frame00", "frame01"], "val": ["frame05"]}))
    split = build_sources(validate_recipe({"data": {**base, "split_file": "split.json"}}), progress=False)
    assert [i.name for i in split.train.items] == ["frame00", "frame01"] and [i.name for i in split.val.items] == ["frame05"]
    for i in (6, 7):
        _write_pair(folder / "val", f"val{i}", i)
    with_val = build_sources(validate_recipe({"data": base}), progress=False)
    assert len(with_val.train) == 6 and [i.name for i in with_val.val.items] == ["val6", "val7"]
    with pytest.raises(SamtuneError, match="use one way"):
        build_sources(validate_recipe({"data": {**base, "split_file": "split.json"}}), progress=False)


def test_class_names_default_to_label_values(folder):
    recipe = validate_recipe({"data": {"kind": "folder2d", "root": str(folder)}, "model": {"image_size": 32}})
    sources = build_sources(recipe, progress=False)
    assert sources.train.class_names == sources.val.class_names == {1: "class_1", 2: "class_2"}
    train, val = build_datasets(recipe, image_size=32, progress=False)
    assert len(train) > 0 and len(val) > 0 and train.skipped == []


def test_notes_for_forks_and_labels_without_images(folder):
    (folder / "images" / "._frame00.png").write_bytes(b"\x00\x05\x16\x07")
    Image.fromarray(_label(9)).save(folder / "labels" / "orphan.png")
    layout = discover_folder2d(folder)
    assert len(layout.train) == 6 and layout.skipped == []
    assert any("._frame00.png" in n for n in layout.notes) and any("orphan.png" in n for n in layout.notes)


def test_missing_folders_is_a_clear_error(tmp_path):
    with pytest.raises(SamtuneError, match="images/ and labels/"):
        discover_folder2d(tmp_path)


# ------------------------------------------------------------------------------ Cityscapes


def _write_train_ids(root: Path) -> list[Path]:
    """What cityscapesScripts' createTrainIdLabelImgs writes, from the official table."""
    written = []
    for label_ids in sorted(root.glob("gtFine/*/*/*_gtFine_labelIds.png")):
        train_ids = label_ids.with_name(label_ids.name.replace("_labelIds", "_labelTrainIds"))
        Image.fromarray(map_label_ids(np.asarray(Image.open(label_ids)))).save(train_ids)
        written.append(train_ids)
    return written


def test_label_train_ids_are_used_when_present_and_agree(cs_root):
    mapped = CityscapesSource(cs_root, "train")
    expected = [mapped.load_label(i) for i in range(len(mapped))]
    assert mapped.train_ids == [False, False]
    _write_train_ids(cs_root)
    src = CityscapesSource(cs_root, "train")
    assert src.train_ids == [True, True] and all(p.name.endswith("_gtFine_labelTrainIds.png") for p in src.labels)
    for i in range(len(src)):
        np.testing.assert_array_equal(src.load_label(i), expected[i])  # both agree
        np.testing.assert_array_equal(src.load(i)[1], expected[i])
    assert src.slice_classes(0) == mapped.slice_classes(0)


def test_inspect_flags_train_ids_that_disagree_with_label_ids(cs_root):
    written = _write_train_ids(cs_root)
    recipe = validate_recipe({"data": {"kind": "cityscapes", "root": str(cs_root)}})
    assert inspect_data(recipe, progress=False)["problems"] == []
    train_ids = next(p for p in written if "/train/" in str(p))
    wrong = np.asarray(Image.open(train_ids)).copy()
    wrong[wrong == 0] = 1  # road as sidewalk: another label table
    Image.fromarray(wrong).save(train_ids)
    problems = inspect_data(recipe, progress=False)["problems"]
    assert len(problems) == 1 and problems[0]["file"] == str(train_ids) and "createTrainIdLabelImgs" in problems[0]["problem"]


def test_cityscapes_skip_mode_lists_a_missing_label(cs_root):
    missing = next(cs_root.glob("gtFine/train/*/*_gtFine_labelIds.png"))
    missing.unlink()
    src = CityscapesSource(cs_root, "train", on_bad_case="skip")
    assert len(src) == 1 and len(src.skipped) == 1 and str(missing) in src.skipped[0]["problem"]
