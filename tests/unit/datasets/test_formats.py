"""The data-format registry: every kind has its section and factories; sources open without labels."""

from __future__ import annotations

import numpy as np
import pytest

from samtune import SamtuneError
from samtune.datasets.formats import all_formats, get_format, kinds_with_key, open_images
from samtune.datasets.source import SliceSource
from samtune.finetune.recipe import validate_recipe


def test_every_kind_registers_a_section_and_factories():
    formats = all_formats()
    assert list(formats) == ["cityscapes", "bdd100k", "acdc", "mapillary", "nifti", "folder2d", "coco", "dicom"]
    for kind, fmt in formats.items():
        assert fmt.section.model_fields["kind"].annotation.__args__ == (kind,)
        assert callable(fmt.open) and callable(fmt.open_images)
    assert {k for k, f in formats.items() if f.make_demo} == {"cityscapes", "bdd100k", "acdc", "mapillary", "nifti", "coco", "dicom"}
    assert kinds_with_key("context_slices") == ["nifti", "dicom"] and kinds_with_key("cities") == ["cityscapes"]
    with pytest.raises(SamtuneError, match="did you mean `nifti`"):
        get_format("nifty")


def _section(kind: str, root) -> object:
    return validate_recipe({"data": {"kind": kind, "root": str(root)}}).data


def test_nifti_scans_open_without_labels(phantom):
    source = open_images(_section("nifti", phantom), [phantom / "imagesTr"])
    assert isinstance(source, SliceSource) and not source.has_labels and source.volumetric
    assert [c.name for c in source.cases] == ["phantom_000", "phantom_001", "phantom_002"]
    assert len(source) == sum(c.image.shape[0] for c in source.cases)  # every slice, none dropped for lack of labels
    image, label = source.load(0)
    assert image.dtype == np.uint8 and image.shape == label.shape and not label.any()  # a grey slice
    assert set(source.class_names.values()) == {"liver", "spleen", "kidney_right", "kidney_left"}  # from dataset.json


def test_duplicate_scan_names_are_refused(phantom):
    file = sorted((phantom / "imagesTr").glob("*_0000.nii.gz"))[0]
    with pytest.raises(SamtuneError, match="a second scan named"):
        open_images(_section("nifti", phantom), [file, file])


def test_cityscapes_and_folder_images_open_without_labels(cs_root, tmp_path):
    source = open_images(_section("cityscapes", cs_root), [cs_root / "leftImg8bit" / "val"])
    assert len(source) == 1 and not source.has_labels and not source.volumetric
    image, label = source.load(0)
    assert image.shape[:2] == label.shape and image.dtype == np.uint8 and not label.any()
    with pytest.raises(SamtuneError, match="no such file or folder"):
        open_images(_section("folder2d", tmp_path), [tmp_path / "missing.png"])
