"""nnU-Net v2 / MSD dataset folders, the patient-level split, and reading a case (orientation, HU window)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samtune import SamtuneError
from samtune.datasets.nifti import Case, NiftiSliceSource, load_case, read_dataset, split_cases
from samtune.datasets.synthetic import CT_LABELS

WINDOW = (-160.0, 240.0)  # the recipe default (data.window_hu)


def _save(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, affine), str(path))


LPS = np.diag([-2.0, -2.0, 3.0, 1.0])  # voxel i -> patient left, j -> posterior: not canonical
LPS[:3, 3] = (10.0, 20.0, -30.0)


def _msd(tmp_path: Path, names=("a", "b"), shape=(6, 5, 4)) -> Path:
    root = tmp_path / "Task03_Liver"
    rng = np.random.default_rng(0)
    training = []
    for name in names:
        hu = rng.integers(-300, 400, shape).astype(np.int16)
        label = (rng.random(shape) < 0.3).astype(np.uint8)
        _save(hu, LPS, root / "imagesTr" / f"{name}.nii.gz")
        _save(label, LPS, root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {"name": "Liver", "labels": {"0": "background", "1": "liver"}, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


# -------------------------------------------- read_dataset -----------------------------------------
def test_read_nnunet_dataset(phantom):
    cases, classes = read_dataset(phantom)
    assert classes == {v: k for k, v in CT_LABELS.items() if v != 0}
    assert [c.name for c in cases] == ["phantom_000", "phantom_001", "phantom_002"]
    for case in cases:
        assert case.image == phantom / "imagesTr" / f"{case.name}_0000.nii.gz"
        assert case.label == phantom / "labelsTr" / f"{case.name}.nii.gz"


def test_nnunet_ignores_macos_resource_forks(phantom):
    (phantom / "imagesTr" / "._phantom_000_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    cases, _ = read_dataset(phantom)
    assert [c.name for c in cases] == ["phantom_000", "phantom_001", "phantom_002"]


def test_read_msd_task(tmp_path):
    root = _msd(tmp_path)
    cases, classes = read_dataset(root)
    assert classes == {1: "liver"}
    assert [c.name for c in cases] == ["a", "b"]
    assert cases[0].image == (root / "imagesTr" / "a.nii.gz").resolve()
    assert cases[0].label == (root / "labelsTr" / "a.nii.gz").resolve()


def test_missing_dataset_json_names_the_file(tmp_path):
    with pytest.raises(SamtuneError) as info:
        read_dataset(tmp_path)
    assert str(tmp_path / "dataset.json") in str(info.value)


def test_invalid_dataset_json_names_the_file(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(SamtuneError, match="dataset.json"):
        read_dataset(tmp_path)


def test_missing_label_file_names_the_file(phantom):
    label = phantom / "labelsTr" / "phantom_001.nii.gz"
    label.unlink()
    with pytest.raises(SamtuneError) as info:
        read_dataset(phantom)
    assert str(label) in str(info.value)


def test_msd_missing_label_file_names_the_file(tmp_path):
    root = _msd(tmp_path)
    label = root / "labelsTr" / "b.nii.gz"
    label.unlink()
    with pytest.raises(SamtuneError) as info:
        read_dataset(root)
    assert str(label.resolve()) in str(info.value)


def test_shape_mismatch_names_the_files(tmp_path):
    root = _msd(tmp_path)
    label = root / "labelsTr" / "a.nii.gz"
    _save(np.zeros((6, 5, 3), np.uint8), LPS, label)
    cases, _ = read_dataset(root)
    with pytest.raises(SamtuneError) as info:
        load_case(cases[0], WINDOW)
    msg = str(info.value)
    assert str(cases[0].image) in msg and str(cases[0].label) in msg
    load_case(cases[1], WINDOW)  # the intact case still loads


def test_no_cases(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    with pytest.raises(SamtuneError, match="no training cases"):
        read_dataset(tmp_path)


# -------------------------------------------- split_cases ------------------------------------------
def _cases(n: int) -> list[Case]:
    return [Case(f"p{i:02d}", Path(f"p{i:02d}_0000.nii.gz"), Path(f"p{i:02d}.nii.gz")) for i in range(n)]


@pytest.mark.parametrize("n,fraction", [(2, 0.25), (3, 0.25), (10, 0.25), (10, 0.9), (7, 0.01), (5, 0.5)])
def test_split_is_patient_level_and_never_empty(n, fraction):
    cases = _cases(n)
    train, val = split_cases(cases, fraction, seed=0)
    names_train, names_val = {c.name for c in train}, {c.name for c in val}
    assert not names_train & names_val
    assert names_train | names_val == {c.name for c in cases}
    assert len(train) >= 1 and len(val) >= 1
    assert len(train) + len(val) == n
    if n == 10 and fraction == 0.25:
        assert len(val) == 2  # round(2.5) with at least one on each side


def test_split_is_seeded_and_deterministic():
    cases = _cases(12)
    first = split_cases(cases, 0.25, seed=3)
    assert split_cases(list(cases), 0.25, seed=3) == first
    vals = {tuple(c.name for c in split_cases(cases, 0.25, seed=s)[1]) for s in range(8)}
    assert len(vals) > 1  # the seed matters


def test_split_needs_two_cases():
    with pytest.raises(SamtuneError):
        split_cases(_cases(1), 0.25, seed=0)


def test_split_keeps_all_slices_of_a_patient_on_one_side(phantom):
    cases, classes = read_dataset(phantom)
    train, val = split_cases(cases, 0.25, seed=0)
    train_src = NiftiSliceSource(train, classes, WINDOW)
    val_src = NiftiSliceSource(val, classes, WINDOW)
    train_patients = {train_src.item_id(i).split("/")[0] for i in range(len(train_src))}
    val_patients = {val_src.item_id(i).split("/")[0] for i in range(len(val_src))}
    assert train_patients and val_patients and not train_patients & val_patients
    assert len(train_src) == 12 * len(train)  # every axial slice of each case


# --------------------------------------------- load_case -------------------------------------------
def test_load_case_reorients_to_canonical(tmp_path):
    root = _msd(tmp_path, names=("a",))
    case = read_dataset(root)[0][0]
    image, label, spacing = load_case(case, WINDOW)
    canon_img = nib.as_closest_canonical(nib.load(case.image))
    canon_lab = nib.as_closest_canonical(nib.load(case.label))
    assert nib.aff2axcodes(canon_img.affine) == ("R", "A", "S")
    hu = canon_img.get_fdata()
    expected = np.round((np.clip(hu, *WINDOW) - WINDOW[0]) * 255.0 / (WINDOW[1] - WINDOW[0])).astype(np.uint8)
    np.testing.assert_array_equal(image, expected)
    np.testing.assert_array_equal(label, np.asarray(canon_lab.dataobj))
    # the stored array was LPS: canonical flips the first two axes
    raw = np.asarray(nib.load(case.label).dataobj)
    np.testing.assert_array_equal(label, raw[::-1, ::-1, :])
    assert not np.array_equal(label, raw)
    assert spacing == (2.0, 2.0, 3.0)
    assert image.dtype == np.uint8 and label.dtype == np.uint8


def test_load_case_phantom_matches_nibabel_canonical(phantom):
    case = read_dataset(phantom)[0][0]
    image, label, _ = load_case(case, WINDOW)
    canon = nib.as_closest_canonical(nib.load(case.label))
    np.testing.assert_array_equal(label, np.asarray(canon.dataobj))
    assert image.shape == label.shape == (48, 48, 12)


def test_hu_window_scales_to_0_255(tmp_path):
    hu = np.array([-1000, -160, -159, 40, 239, 240, 1000, 0], np.int16).reshape(2, 2, 2)
    _save(hu, np.eye(4), tmp_path / "img.nii.gz")
    _save(np.zeros((2, 2, 2), np.uint8), np.eye(4), tmp_path / "lab.nii.gz")
    image, _, _ = load_case(Case("x", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"), WINDOW)
    values = dict(zip(hu.ravel().tolist(), image.ravel().tolist()))
    assert values[-1000] == 0 and values[-160] == 0
    assert values[240] == 255 and values[1000] == 255
    assert values[-159] == 1  # 255/400 = 0.64 -> 1
    assert values[40] == 128  # mid-window: 127.5 rounds to 128
    assert values[239] == 254
    assert values[0] == 102  # 160 * 0.6375 = 102
    # another window rescales
    image2, _, _ = load_case(Case("x", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"), (0.0, 1000.0))
    assert dict(zip(hu.ravel().tolist(), image2.ravel().tolist()))[240] == round(240 * 0.255)


def test_slices_are_displayed_anterior_up(tmp_path):
    # One bright voxel column at the anterior edge (high canonical y): it must land in row 0.
    shape = (6, 5, 2)
    hu = np.full(shape, -1000, np.int16)
    hu[:, -1, :] = 240  # canonical y = last -> most anterior with an identity (RAS) affine
    _save(hu, np.eye(4), tmp_path / "img.nii.gz")
    _save(np.zeros(shape, np.uint8), np.eye(4), tmp_path / "lab.nii.gz")
    src = NiftiSliceSource([Case("x", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")], {1: "liver"}, WINDOW)
    image, label = src.load(0)
    assert image.shape == (5, 6, 3) and label.shape == (5, 6)
    assert (image[0] == 255).all() and (image[1:] == 0).all()
    assert src.item_id(1) == "x/z001"
