"""ACDC: the rgb_anon/ + gt/ layout by condition, labelIds mapped to the 19 trainIds (255 ignored),
the condition filter, and what `samtune inspect` says about a wrong layout or an unknown class id."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from samtune import SamtuneError
from samtune.datasets.acdc import CONDITIONS, AcdcData, AcdcSource
from samtune.datasets.cityscapes import CLASS_NAMES, IGNORE_INDEX, map_label_ids
from samtune.finetune.cli import main


def _label(root: Path, condition: str = "night", split: str = "train") -> Path:
    return sorted((root / "gt" / condition / split).glob("*/*_gt_labelIds.png"))[0]


def test_reads_every_condition_and_maps_label_ids(acdc_root):
    src = AcdcSource(acdc_root, "train")
    assert len(src) == 4 and src.conditions == list(CONDITIONS) and src.class_names == CLASS_NAMES
    i = src.conditions.index("night")
    image, label = src.load(i)
    assert image.shape == (64, 128, 3) and label.shape == (64, 128)
    label_ids = np.asarray(Image.open(_label(acdc_root)))
    np.testing.assert_array_equal(label, map_label_ids(label_ids))
    assert {0, 1, 3, 4} & set(np.unique(label_ids).tolist()) and (label == IGNORE_INDEX).any()  # void ids -> 255
    assert src.item_id(i) == "GOPR0410_frame_000000"
    assert src.prediction_name(i) == "night/GOPR0410/GOPR0410_frame_000000_gt_labelIds.png"
    assert sum(src.slice_classes(i).values()) == int((label != IGNORE_INDEX).sum())


def test_condition_filter(acdc_root):
    assert AcdcSource(acdc_root, "val", conditions=["night"]).conditions == ["night"]
    assert AcdcSource(acdc_root, "train", conditions=["fog", "snow"]).conditions == ["fog", "snow"]
    shutil.rmtree(acdc_root / "rgb_anon" / "rain" / "val")
    with pytest.raises(SamtuneError, match=r"data.conditions: \['rain'\] have no 'val' split"):
        AcdcSource(acdc_root, "val", conditions=["rain"])
    with pytest.raises(ValueError, match="sunny"):
        AcdcData(kind="acdc", root=str(acdc_root), conditions=["sunny"])


def test_wrong_layout_names_the_expected_paths(tmp_path, acdc_root):
    with pytest.raises(SamtuneError, match=r"rgb_anon/\{condition\}/\{split\}/\{sequence\}/\*_rgb_anon.png with gt/"):
        AcdcSource(tmp_path, "train")
    with pytest.raises(SamtuneError, match="no condition folder"):
        AcdcSource(acdc_root / "rgb_anon", "train")  # one level too deep
    _label(acdc_root).unlink()
    with pytest.raises(SamtuneError, match="label file .* is missing"):
        AcdcSource(acdc_root, "train")
    assert AcdcSource(acdc_root, "train", on_bad_case="skip").conditions == ["fog", "rain", "snow"]


def test_train_ids_files_are_used_and_checked_against_the_label_ids(acdc_root):
    label = _label(acdc_root)
    mapped = map_label_ids(np.asarray(Image.open(label)))
    train_ids = Path(str(label).replace("_gt_labelIds.png", "_gt_labelTrainIds.png"))
    Image.fromarray(mapped).save(train_ids)
    src = AcdcSource(acdc_root, "train", conditions=["night"])
    assert src.labels == [train_ids] and src.consistency_problems() == []
    Image.fromarray(np.where(mapped == 0, 1, mapped).astype(np.uint8)).save(train_ids)  # road painted as sidewalk
    problems = AcdcSource(acdc_root, "train", conditions=["night"]).consistency_problems()
    assert problems[0]["file"] == str(train_ids) and "differs from the official trainId mapping" in problems[0]["problem"]


def test_inspect_names_the_file_and_the_unknown_label_id(acdc_root, tmp_path, capsys):
    label = _label(acdc_root, "fog")
    values = np.asarray(Image.open(label)).copy()
    values[0, :2] = 50
    Image.fromarray(values).save(label)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"kind": "acdc", "root": str(acdc_root)}, "output": {"dir": str(tmp_path / "run")}}))
    assert main(["-q", "inspect", str(recipe)]) == 2
    report = json.loads((tmp_path / "run" / "inspect.json").read_text())
    assert [p["file"] for p in report["problems"]] == [str(label)] and report["layout"] == "acdc"
    assert "holds ids [50] (2 px) that are not Cityscapes labelIds" in report["problems"][0]["problem"]
    assert report["cases"]["val"] == [f"GOPR{401 + 10 * k:04d}_frame_000000" for k in range(4)]
