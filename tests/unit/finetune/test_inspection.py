"""finetune/inspection.py: ``samtune inspect``'s data checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from samtune.finetune.inspection import inspect_data
from samtune.finetune.recipe import validate_recipe


def test_inspect_flags_train_ids_that_disagree_with_label_ids(cs_root, write_train_ids):
    written = write_train_ids(cs_root)
    recipe = validate_recipe({"data": {"kind": "cityscapes", "root": str(cs_root)}})
    assert inspect_data(recipe, progress=False)["problems"] == []
    train_ids = next(p for p in written if "/train/" in str(p))
    wrong = np.asarray(Image.open(train_ids)).copy()
    wrong[wrong == 0] = 1  # road as sidewalk: another label table
    Image.fromarray(wrong).save(train_ids)
    problems = inspect_data(recipe, progress=False)["problems"]
    assert len(problems) == 1 and problems[0]["file"] == str(train_ids) and "createTrainIdLabelImgs" in problems[0]["problem"]


# --------------------------------------------- bad inputs reach the report (problems or warnings)


def _nifti_report(root: Path, tmp_path: Path, **data) -> dict:
    recipe = validate_recipe({"data": {"kind": "nifti", "root": str(root), "cache_dir": str(tmp_path / "cache"), **data}})
    return inspect_data(recipe, progress=False)


def test_inspect_warns_about_a_4d_image_and_which_channel_is_used(phantom, tmp_path):
    import nibabel as nib

    from samtune.finetune.inspection import format_report

    path = sorted((phantom / "imagesTr").glob("*_0000.nii.gz"))[0]
    img = nib.load(path)
    ct = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([ct, ct], axis=-1), img.affine), str(path))
    report = _nifti_report(phantom, tmp_path)
    assert report["problems"] == []
    (warning,) = [w for w in report["warnings"] if "4D image" in w]
    assert str(path) in warning and "channel 0 (CT) is used" in warning and "data.channel" in warning
    assert f"  - {warning}" in format_report(report)
    again = _nifti_report(phantom, tmp_path)  # from the cache: still said
    assert any("4D image" in w for w in again["warnings"])


def test_inspect_warns_about_a_missing_dataset_json(phantom, tmp_path):
    (phantom / "dataset.json").unlink()
    report = _nifti_report(phantom, tmp_path)
    assert report["layout"] == "folders" and report["problems"] == []
    assert any("dataset.json: missing" in w and "class_<k>" in w and "data.class_names" in w for w in report["warnings"])


def test_inspect_reads_v1_labels_in_an_nnunet_tree_with_a_warning(phantom, tmp_path):
    import json

    labels = {"0": "background", "1": "liver", "2": "spleen", "3": "kidney_right", "4": "kidney_left"}
    (phantom / "dataset.json").write_text(json.dumps({"labels": labels, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    report = _nifti_report(phantom, tmp_path)
    assert report["problems"] == [] and list(report["classes"]) == ["liver", "spleen", "kidney_right", "kidney_left"]
    assert any("MSD / nnU-Net v1" in w for w in report["warnings"])


def test_inspect_lists_cityscapes_labels_with_unknown_ids_as_problems(cs_root, tmp_path):
    from samtune.finetune.inspection import format_report

    label = sorted(cs_root.glob("gtFine/train/*/*_gtFine_labelIds.png"))[0]
    ids = np.asarray(Image.open(label)).copy()
    ids[:2, :2] = 34
    ids[2:4, :2] = 40
    Image.fromarray(ids).save(label)
    recipe = validate_recipe({"data": {"kind": "cityscapes", "root": str(cs_root)}, "output": {"dir": str(tmp_path / "out")}})
    report = inspect_data(recipe, progress=False)
    (problem,) = report["problems"]
    assert problem["file"] == str(label) and "[34, 40]" in problem["problem"] and "labelIds" in problem["problem"]
    assert len(report["cases"]["train"]) == 1
    assert str(label) in format_report(report)


def test_inspect_flags_instance_ids_that_disagree_with_label_ids_and_missing_ones(cs_root):
    recipe = validate_recipe({"data": {"kind": "cityscapes", "root": str(cs_root)}, "prompts": {"per": "instance"}})
    assert inspect_data(recipe, progress=False)["problems"] == []
    first = sorted(cs_root.glob("gtFine/train/*/*_gtFine_instanceIds.png"))[0]
    ids = np.asarray(Image.open(first)).copy()
    ids[ids // 1000 == 26] = 27000  # the cars as a truck instance: not what the labelIds file says
    Image.fromarray(ids).save(first)
    (problem,) = inspect_data(recipe, progress=False)["problems"]
    assert problem["file"] == str(first) and "instance id 27000, labelId 26" in problem["problem"] and "json2instanceImg" in problem["problem"]
    first.unlink()
    (problem,) = inspect_data(recipe, progress=False)["problems"]
    assert problem["problem"].startswith("prompts.per=instance, train split: 1 of 2 images have no _gtFine_instanceIds.png") and str(first) in problem["problem"]
    assert inspect_data(validate_recipe({"data": {"kind": "cityscapes", "root": str(cs_root)}}), progress=False)["problems"] == []
