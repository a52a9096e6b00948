"""Bad data (datasets/checks.py and the readers that use it): every way a case or image can be wrong gives one
SamtuneError naming the file (and the fix), or with ``data.on_bad_case: skip`` is left out and listed; harmless
oddities are notes or warnings, never errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from samtune import SamtuneError
from samtune.adapters.preprocess import LongestSideTransform
from samtune.finetune.data import build_datasets, open_split
from samtune.finetune.recipe import validate_recipe


SHAPE = (16, 16, 6)
CASES = ("c0", "c1", "c2", "c3")


def _save(arr, path: Path, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), str(path))


def _nnunet(root: Path) -> Path:
    """Four tiny cases; c1 is the one the tests break. c3 is validation (split file)."""
    rng = np.random.default_rng(0)
    for name in CASES:
        hu = rng.integers(-200, 300, SHAPE).astype(np.int16)
        label = np.zeros(SHAPE, np.uint8)
        label[4:12, 4:12, 1:5] = 1
        label[1:3, 1:3, 2:4] = 2
        _save(hu, root / "imagesTr" / f"{name}_0000.nii.gz")
        _save(label, root / "labelsTr" / f"{name}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1, "spleen": 2}, "file_ending": ".nii.gz"}))
    (root / "split.json").write_text(json.dumps({"train": ["c0", "c1", "c2"], "val": ["c3"]}))
    return root


def _recipe(root: Path, **data):
    raw = {"data": {"kind": "nifti", "root": str(root), "split_file": str(root / "split.json"), "min_pixels": 1, **data}}
    return validate_recipe(raw)


def _image(root, name="c1"):
    return root / "imagesTr" / f"{name}_0000.nii.gz"


def _label(root, name="c1"):
    return root / "labelsTr" / f"{name}.nii.gz"


def _shape_mismatch(root):
    _save(np.zeros((16, 16, 5), np.uint8), _label(root))
    return _label(root), "same 3D grid"


def _affine_mismatch(root):
    _save(np.asarray(nib.load(_label(root)).dataobj), _label(root), np.diag([2.0, 2.0, 2.5, 1.0]))
    return _label(root), "affines"


def _unknown_label_values(root):
    label = np.asarray(nib.load(_label(root)).dataobj).copy()
    label[0, 0, 0] = 7
    _save(label, _label(root))
    return _label(root), r"label values \[7\] are not in the class map"


def _fractional_label(root):
    _save(np.full(SHAPE, 0.5, np.float32), _label(root))
    return _label(root), "non-integer"


def _nan_voxels(root):
    image = np.asarray(nib.load(_image(root)).dataobj).astype(np.float32)
    image[3, 3, 3] = np.nan
    _save(image, _image(root))
    return _image(root), "NaN"


def _inf_voxels(root):
    image = np.asarray(nib.load(_image(root)).dataobj).astype(np.float32)
    image[3, 3, 3] = np.inf
    _save(image, _image(root))
    return _image(root), "infinite"


def _truncated(root):
    data = _image(root).read_bytes()
    _image(root).write_bytes(data[: len(data) // 2])
    return _image(root), "truncated"


def _corrupt(root):
    _label(root).write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    return _label(root), "not a readable NIfTI"


def _empty_volume(root):
    _save(np.zeros(SHAPE, np.int16), _image(root))
    return _image(root), "single value"


def _label_2d(root):
    _save(np.zeros((16, 16), np.uint8), _label(root))
    return _label(root), "2D"


def _label_4d(root):
    _save(np.zeros(SHAPE + (2,), np.uint8), _label(root))
    return _label(root), "4D"


def _stray_file(root):
    path = root / "imagesTr" / "c1_notes.txt"
    path.write_text("scanner protocol")
    return path, "not a NIfTI image file"


BREAKAGES = [_shape_mismatch, _affine_mismatch, _unknown_label_values, _fractional_label, _nan_voxels, _inf_voxels,
             _truncated, _corrupt, _empty_volume, _label_2d, _label_4d, _stray_file]  # fmt: skip
# a missing label is no bad case: the image is one still to be labelled, left out with a note (test_nifti.py)


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__.strip("_"))
def test_bad_case_is_a_clear_error_or_skipped(tmp_path, breakage):
    root = _nnunet(tmp_path / "Dataset001_Bad")
    path, fragment = breakage(root)
    with pytest.raises(SamtuneError, match=fragment) as info:
        open_split(_recipe(root, cache_dir=str(tmp_path / "cache")), progress=False)
    assert str(path) in str(info.value)
    assert "Traceback" not in str(info.value)

    sources = open_split(_recipe(root, cache_dir=str(tmp_path / "cache"), on_bad_case="skip"), progress=False)
    assert len(sources.skipped) == 1
    record = sources.skipped[0]
    assert set(record) == {"case", "file", "problem"} and record["file"] == str(path)
    assert record["case"] in ("c1", None) and record["problem"]
    train_names = [c.name for c in sources.train.cases]
    assert "c0" in train_names and "c2" in train_names and [c.name for c in sources.val.cases] == ["c3"]
    if record["case"] == "c1":
        assert "c1" not in train_names


def test_skipped_cases_reach_the_datasets_and_the_log(tmp_path, caplog):
    root = _nnunet(tmp_path / "Dataset001_Bad")
    _nan_voxels(root)
    data = build_datasets(_recipe(root, on_bad_case="skip"), LongestSideTransform(32), progress=False)
    assert [s["case"] for s in data.skipped] == ["c1"]  # once: it used to be listed by both sides
    assert any("1 cases left out: c1" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_all_background_label_is_a_warning_not_an_error(tmp_path):
    root = _nnunet(tmp_path / "Dataset001_Bad")
    _save(np.zeros(SHAPE, np.uint8), _label(root))
    sources = open_split(_recipe(root), progress=False)
    assert sources.skipped == []
    case = next(c for c in sources.train.cases if c.name == "c1")
    assert case.meta["warnings"] and "all background" in case.meta["warnings"][0]


def test_macos_forks_and_hidden_files_are_notes(tmp_path):
    root = _nnunet(tmp_path / "Dataset001_Bad")
    (root / "imagesTr" / "._c0_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    (root / "labelsTr" / ".DS_Store").write_bytes(b"\x00")
    sources = open_split(_recipe(root), progress=False)
    assert sources.skipped == []
    assert any("._c0_0000.nii.gz" in n and "macOS" in n for n in sources.notes)


def test_all_cases_of_a_side_bad_is_a_clear_error(tmp_path):
    root = _nnunet(tmp_path / "Dataset001_Bad")
    _nan_voxels(root)
    _save(np.zeros(SHAPE, np.int16), _image(root, "c3"))  # the only val case
    with pytest.raises(SamtuneError, match="validation split has no images or slices left"):
        open_split(_recipe(root, on_bad_case="skip"), progress=False)


def _folder2d(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(4):
        image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
        label = np.zeros((20, 30), np.uint8)
        label[5:15, 5:20] = 1
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"im{i}.png")
        Image.fromarray(label).save(root / "labels" / f"im{i}.png")
    (root / "split.json").write_text(json.dumps({"train": ["im0", "im1", "im2"], "val": ["im3"]}))
    return root


def _size_mismatch(root):
    Image.fromarray(np.zeros((10, 30), np.uint8)).save(root / "labels" / "im1.png")
    return root / "labels" / "im1.png", "must match"


def _unknown_2d_value(root):
    label = np.zeros((20, 30), np.uint8)
    label[0, 0] = 9
    Image.fromarray(label).save(root / "labels" / "im1.png")
    return root / "labels" / "im1.png", r"label values \[9\]"


def _colour_label(root):
    Image.fromarray(np.random.default_rng(1).integers(0, 3, (20, 30, 3), dtype=np.uint8)).save(root / "labels" / "im1.png")
    return root / "labels" / "im1.png", "colour label"


def _binary_0_255(root):
    label = np.zeros((20, 30), np.uint8)
    label[5:10, 5:10] = 255
    Image.fromarray(label).save(root / "labels" / "im1.png")
    return root / "labels" / "im1.png", "0/255"


def _jpeg_label(root):
    (root / "labels" / "im1.png").rename(root / "labels" / "im1.jpg")
    return root / "labels" / "im1.jpg", "JPEG"


def _corrupt_image(root):
    data = (root / "images" / "im1.png").read_bytes()
    (root / "images" / "im1.png").write_bytes(data[: len(data) // 2])
    return root / "images" / "im1.png", "truncated or corrupt"


BREAKAGES_2D = [_size_mismatch, _unknown_2d_value, _colour_label, _binary_0_255, _jpeg_label, _corrupt_image]


@pytest.mark.parametrize("breakage", BREAKAGES_2D, ids=lambda f: f.__name__.strip("_"))
def test_bad_2d_pair_is_a_clear_error_or_skipped(tmp_path, breakage):
    root = _folder2d(tmp_path / "xray")
    path, fragment = breakage(root)
    data = {"kind": "folder2d", "root": str(root), "class_names": {1: "lung"}, "split_file": str(root / "split.json")}
    with pytest.raises(SamtuneError, match=fragment) as info:
        open_split(validate_recipe({"data": data}), progress=False)
    assert str(path) in str(info.value)
    sources = open_split(validate_recipe({"data": {**data, "on_bad_case": "skip"}}), progress=False)
    assert [s["file"] for s in sources.skipped] == [str(path)]
    assert [sources.train.item_id(i) for i in range(len(sources.train))] == ["im0", "im2"]


def test_binary_masks_saved_as_0_255_work_when_255_is_a_class(tmp_path):
    root = _folder2d(tmp_path / "polyps")
    for i in range(4):
        Image.fromarray((np.asarray(Image.open(root / "labels" / f"im{i}.png")) * 255).astype(np.uint8)).save(root / "labels" / f"im{i}.png")
    data = {"kind": "folder2d", "root": str(root), "class_names": {255: "polyp"}, "split_file": str(root / "split.json")}
    sources = open_split(validate_recipe({"data": data}), progress=False)
    assert sources.train.ignore_index == -1 and sources.train.slice_classes(0) == {255: 150}


def test_skip_log_names_each_case_with_its_file_and_problem(caplog):
    from samtune.datasets.checks import BadCase, log_skipped

    records = [
        BadCase("c1", "/data/labelsTr/c1.nii.gz", "the label holds NaN or infinite values", "re-export it").record(),
        BadCase(None, "/data/imagesTr/notes.txt", "not a NIfTI image file").record(),
    ]
    with caplog.at_level("WARNING"):
        log_skipped(records)
    message = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "2 cases left out" in message
    assert "case c1 (/data/labelsTr/c1.nii.gz): the label holds NaN or infinite values. Re-export it." in message
    assert "/data/imagesTr/notes.txt: not a NIfTI image file." in message


def test_skip_log_is_capped_but_says_how_many_more(caplog):
    from samtune.datasets.checks import BadCase, log_skipped

    records = [BadCase(f"c{i}", f"/d/c{i}.nii.gz", "broken").record() for i in range(25)]
    with caplog.at_level("WARNING"):
        log_skipped(records)
    message = caplog.records[-1].getMessage()
    assert "case c19 (/d/c19.nii.gz): broken." in message and "case c20 (" not in message and "and 5 more" in message
