"""The studies folder: ids and paths that cannot leave it, labels mapped to the checkpoint's class
values and checked against their image, and a layout `data.kind: nifti` trains on as it is."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samtune.datasets.nifti_layouts import discover_dataset
from samtune.finetune.serve.errors import BadRequest, NotFound
from samtune.finetune.serve.studies import Studies, check_id

CLASSES = {1: "liver", 2: "spleen"}


def _volume(path: Path, data: np.ndarray, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 5.0, 1.0]) if affine is None else affine), str(path))
    return path


def _studies(tmp_path) -> Studies:
    studies = Studies(tmp_path / "studies", CLASSES)
    for name in ("a", "b", "c"):
        _volume(studies.root / "imagesTr" / f"{name}_0000.nii.gz", np.zeros((8, 8, 4), np.int16))
    return studies


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "a/b", "..", ".hidden", "", "a\\b", "x" * 200])
def test_ids_that_could_name_a_path_are_refused(bad):
    with pytest.raises(BadRequest) as info:
        check_id(bad, "image")
    assert info.value.field == "image"


def test_new_folder_is_an_nnunet_dataset_with_the_checkpoints_classes(tmp_path):
    studies = _studies(tmp_path)
    meta = json.loads((studies.root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1, "spleen": 2} and meta["file_ending"] == ".nii.gz"
    assert studies.ids() == ["a", "b", "c"] and studies.unlabelled() == ["a", "b", "c"]


def test_saved_labels_are_training_data_and_unlabelled_images_are_left_out(tmp_path):
    studies = _studies(tmp_path)
    label = np.zeros((8, 8, 4), np.uint8)
    label[2:5, 2:5, 1] = 7  # the viewer's segment value 7 is "spleen"
    label[5:7, 5:7, 2] = 3  # value 3 is "liver"
    upload = _volume(tmp_path / "up.nii.gz", label)
    studies.save_label("b", "final", upload, {"spleen": 7, "liver": 3})
    saved = np.asarray(nib.load(str(studies.root / "labelsTr" / "b.nii.gz")).dataobj)
    assert set(np.unique(saved)) == {0, 1, 2} and (saved[2:5, 2:5, 1] == 2).all() and (saved[5:7, 5:7, 2] == 1).all()
    ds = discover_dataset(studies.root)
    assert [c.name for c in ds.cases] == ["b"] and ds.classes == CLASSES
    assert sum("still to be labelled" in n for n in ds.notes) == 2
    assert studies.json()["objects"]["b"]["labels"]["final"]["info"]["label_names"] == {"liver": 1, "spleen": 2}
    assert studies.status() == {"total": 3, "completed": 1, "label_tags": {"final": 1}}


def test_label_with_an_unknown_segment_or_value_or_grid_is_refused(tmp_path):
    studies = _studies(tmp_path)
    label = np.zeros((8, 8, 4), np.uint8)
    label[1, 1, 1] = 5
    upload = _volume(tmp_path / "up.nii.gz", label)
    with pytest.raises(BadRequest, match="tumour"):
        studies.save_label("a", "final", upload, {"tumour": 5})
    with pytest.raises(BadRequest, match=r"values \[5\]"):
        studies.save_label("a", "final", upload, {"liver": 1})
    wrong = _volume(tmp_path / "wrong.nii.gz", np.zeros((8, 8, 5), np.uint8))
    with pytest.raises(BadRequest, match="shape"):
        studies.save_label("a", "final", wrong, None)
    assert not (studies.root / "labelsTr" / "a.nii.gz").exists()


def test_other_tags_stay_out_of_the_training_labels(tmp_path):
    studies = _studies(tmp_path)
    upload = _volume(tmp_path / "up.nii.gz", np.ones((8, 8, 4), np.uint8))
    studies.save_label("a", "original", upload, None)
    assert studies.tags("a") == ["original"] and studies.unlabelled() == ["a", "b", "c"]
    assert not any((studies.root / "labelsTr").iterdir())


def test_a_symlink_out_of_the_folder_is_neither_listed_nor_served(tmp_path):
    studies = _studies(tmp_path)
    outside = _volume(tmp_path / "secret.nii.gz", np.zeros((8, 8, 4), np.int16))
    (studies.root / "imagesTr" / "leak_0000.nii.gz").symlink_to(outside)
    assert "leak" not in studies.ids()
    with pytest.raises(NotFound):
        studies.existing_image("leak")
