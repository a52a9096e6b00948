"""datasets/nifti.py: nnU-Net v2 / MSD / plain dataset folders, channels, the patient-level split, reading a case
(orientation, HU window) and the slice source (context slices, empty slices)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samtune import SamtuneError
from samtune.datasets.nifti import Case, NiftiSliceSource, discover_dataset, load_case, read_dataset, split_cases
from samtune.datasets.synthetic import CT_LABELS
from samtune.finetune.data import open_split
from samtune.finetune.recipe import validate_recipe


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


def test_image_without_label_is_left_out_with_a_note(phantom):
    """An image still to be labelled (a `samtune serve` studies folder) is no training case and no error."""
    label = phantom / "labelsTr" / "phantom_001.nii.gz"
    label.unlink()
    ds = discover_dataset(phantom)
    assert "phantom_001" not in [c.name for c in ds.cases] and ds.cases
    assert any("phantom_001_0000.nii.gz" in n and "left out" in n and "labelsTr/phantom_001.nii.gz" in n for n in ds.notes)
    assert not ds.skipped


def test_missing_channel_file_names_the_file(phantom):
    image = phantom / "imagesTr" / "phantom_001_0000.nii.gz"
    image.rename(phantom / "imagesTr" / "phantom_001_0001.nii.gz")
    with pytest.raises(SamtuneError) as info:
        read_dataset(phantom)
    assert str(image) in str(info.value)


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
    assert image.shape == label.shape == (5, 6)  # a grey slice: one plane
    assert (image[0] == 255).all() and (image[1:] == 0).all()
    assert src.item_id(1) == "x/z001"


def _save_nii(arr, path: Path, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))


def test_context_slices_are_the_neighbours(phantom, tmp_path):
    cases, classes = read_dataset(phantom)
    src = NiftiSliceSource(cases[:1], classes, WINDOW, cache_dir=tmp_path / "c", context_slices=1)
    volume = np.asarray(src.cases[0].image)
    for i, (_, z) in enumerate(src.slices):
        image = src.load(i)[0]
        for channel, zz in enumerate((max(z - 1, 0), z, min(z + 1, 11))):
            np.testing.assert_array_equal(image[..., channel], volume[zz])
    assert src.slices[0][1] == 0 and src.slices[-1][1] == 11  # the clamped ends are served
    flat = NiftiSliceSource(cases[:1], classes, WINDOW, cache_dir=tmp_path / "c")
    image = flat.load(4)[0]  # without context: the grey slice itself, one plane
    np.testing.assert_array_equal(image, volume[flat.slices[4][1]])


def test_empty_slice_ratio(phantom, tmp_path):
    cases, classes = read_dataset(phantom)
    kw = dict(cache_dir=tmp_path / "c", seed=0)
    every = NiftiSliceSource(cases, classes, WINDOW, **kw)
    fg = {c.name: sum(1 for e in c.meta["slices"] if e) for c in every.cases}
    empty = {c.name: 12 - fg[c.name] for c in every.cases}
    assert len(every) == 36 and sum(empty.values()) > 0
    none = NiftiSliceSource(cases, classes, WINDOW, empty_slice_ratio=0.0, **kw)
    assert len(none) == sum(fg.values()) and all(none.slice_classes(i) for i in range(len(none)))
    some = NiftiSliceSource(cases, classes, WINDOW, empty_slice_ratio=0.2, **kw)
    assert len(some) == sum(fg[n] + min(empty[n], round(0.2 * fg[n])) for n in fg)
    again = NiftiSliceSource(cases, classes, WINDOW, empty_slice_ratio=0.2, **kw)
    assert some.slices == again.slices  # seeded
    only_kidney = NiftiSliceSource(cases, classes, WINDOW, empty_slice_ratio=0.0, foreground={3}, **kw)
    assert all(3 in only_kidney.slice_classes(i) for i in range(len(only_kidney)))


def _msd_4d(root: Path) -> Path:
    rng = np.random.default_rng(0)
    training = []
    for name in ("b1", "b2"):
        image = np.stack([np.full((8, 8, 4), 10.0), np.full((8, 8, 4), 90.0)], axis=-1)  # 2 modalities
        image += rng.normal(0, 1, image.shape)
        label = np.zeros((8, 8, 4), np.uint8)
        label[2:5, 2:6, 1:3] = 1
        _save_nii(image.astype(np.float32), root / "imagesTr" / f"{name}.nii.gz")
        _save_nii(label, root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {"labels": {"0": "background", "1": "tumour"}, "modality": {"0": "FLAIR", "1": "T1w"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_4d_channel_selection(tmp_path):
    root = _msd_4d(tmp_path / "Task01_BrainTumour")
    means = []
    for channel in (0, 1):
        ds = discover_dataset(root, channel=channel)
        assert ds.layout == "msd" and ds.channel_names == {0: "FLAIR", 1: "T1w"}
        assert all(c.channel == channel for c in ds.cases)
        src = NiftiSliceSource(ds.cases, ds.classes, (0.0, 100.0), cache_dir=tmp_path / "c")
        means.append(float(np.asarray(src.cases[0].image).mean()))
    assert means[0] == pytest.approx(10 * 2.55, abs=1) and means[1] == pytest.approx(90 * 2.55, abs=1)
    with pytest.raises(SamtuneError, match="data.channel=2.*FLAIR"):
        discover_dataset(root, channel=2)


def test_nnunet_channel_selects_the_channel_file(phantom):
    ds = discover_dataset(phantom, channel=0)
    assert ds.cases[0].image.name == "phantom_000_0000.nii.gz" and ds.channel_names == {0: "CT"}
    with pytest.raises(SamtuneError, match="data.channel=1"):
        discover_dataset(phantom, channel=1)


def test_plain_folders_matched_by_case_name(phantom, tmp_path):
    plain = tmp_path / "plain"
    for p in (phantom / "imagesTr").glob("*.nii.gz"):
        (plain / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, plain / "images" / p.name.replace("_0000", "") if p.name.startswith("phantom_000") else plain / "images" / p.name)
    shutil.copytree(phantom / "labelsTr", plain / "labels")
    ds = discover_dataset(plain)
    assert ds.layout == "folders" and ds.classes is None
    assert [(c.name, c.image.name, c.label.name) for c in ds.cases] == [
        ("phantom_000", "phantom_000.nii.gz", "phantom_000.nii.gz"),  # {case}.nii.gz
        ("phantom_001", "phantom_001_0000.nii.gz", "phantom_001.nii.gz"),  # {case}_0000.nii.gz
        ("phantom_002", "phantom_002_0000.nii.gz", "phantom_002.nii.gz"),
    ]
    src = NiftiSliceSource(ds.cases, None, WINDOW)
    assert src.class_names == {1: "class_1", 2: "class_2", 3: "class_3", 4: "class_4"}
    named = discover_dataset(plain, class_names={1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"})
    assert named.classes[1] == "liver"
    recipe = validate_recipe({"data": {"kind": "nifti", "root": str(plain), "class_names": {1: "liver"}, "val_fraction": 0.34}})
    with pytest.raises(SamtuneError, match=r"label values \[2, 3, 4\] are not in the class map"):
        open_split(recipe, progress=False)


# ------------------------------------------------- bad inputs: 4D images, no dataset.json, v1 labels


def _make_4d_first_case(root: Path, channel_names: dict | None = None, every: bool = False) -> Path:
    """The first case's image (``every``: each case's) as a 4D file holding two channels (CT and
    CT/2 + 500), nothing else changed; returns the first one's path."""
    paths = sorted((root / "imagesTr").glob("*_0000.nii.gz"))
    for path in paths if every else paths[:1]:
        img = nib.load(path)
        if img.ndim == 4:
            continue
        ct = np.asarray(img.dataobj).astype(np.int16)
        nib.save(nib.Nifti1Image(np.stack([ct, ct // 2 + 500], axis=-1), img.affine), str(path))
    path = paths[0]
    if channel_names is not None:
        meta = json.loads((root / "dataset.json").read_text())
        meta["channel_names"] = channel_names
        (root / "dataset.json").write_text(json.dumps(meta))
    return path


def test_4d_image_in_nnunet_tree_warns_which_channel_is_used(phantom, tmp_path, caplog):
    from samtune.finetune.data import open_split

    path = _make_4d_first_case(phantom, {"0": "CT", "1": "PET"})
    recipe = validate_recipe({"data": {"kind": "nifti", "root": str(phantom), "cache_dir": str(tmp_path / "c"), "min_pixels": 1}})
    with caplog.at_level("WARNING"):
        split = open_split(recipe, progress=False)
    warning = next(w for w in split.warnings if "4D" in w)
    for fragment in ("1 of 3 cases", "2 channels", str(path), "channel 0 (CT) is used", "data.channel to 0..1", "0: CT, 1: PET"):
        assert fragment in warning, fragment
    assert any(warning in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    # choosing explicitly: no warning, and data.channel indexes the 4D files' channels
    _make_4d_first_case(phantom, every=True)
    chosen = open_split(validate_recipe({"data": {**recipe.data.model_dump(include=recipe.data.model_fields_set), "channel": 1}}), progress=False)
    assert not any("4D" in w for w in chosen.warnings)
    first = path.name.replace("_0000.nii.gz", "")
    case = next(c for src in (chosen.train, chosen.val) for c in src.cases if c.name == first)
    default = next(c for src in (split.train, split.val) for c in src.cases if c.name == first)
    assert case.meta["image_file"] == str(path) and not np.array_equal(case.image, default.image)


def test_nnunet_tree_without_dataset_json_says_so(phantom):
    (phantom / "dataset.json").unlink()
    ds = discover_dataset(phantom)
    assert ds.layout == "folders" and len(ds.cases) == 3
    assert len(ds.warnings) == 1
    for fragment in (str(phantom / "dataset.json"), "missing", "class_<k>", '"labels"', "data.class_names"):
        assert fragment in ds.warnings[0], fragment
    assert discover_dataset(phantom, class_names={1: "liver"}).warnings == []  # names given: nothing to say


def test_v1_style_labels_in_nnunet_tree_are_read_as_value_to_name(phantom):
    labels = {"0": "background", "1": "liver", "2": "spleen", "3": "kidney_right", "4": "kidney_left"}
    (phantom / "dataset.json").write_text(json.dumps({"labels": labels, "channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    ds = discover_dataset(phantom)
    assert ds.layout == "nnunet_v2" and ds.classes == {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}
    assert len(ds.warnings) == 1 and "MSD / nnU-Net v1" in ds.warnings[0] and '"liver": 1' in ds.warnings[0]
    assert "region" not in ds.warnings[0]


def test_region_and_non_integer_label_values_are_explained(phantom):
    meta = json.loads((phantom / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "liver": [1, 2]}
    (phantom / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(SamtuneError, match=r"'liver' has value \[1, 2\]: a region"):
        discover_dataset(phantom)
    meta["labels"] = {"background": 0, "liver": "1"}
    (phantom / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(SamtuneError, match="map each class name to an integer") as info:
        discover_dataset(phantom)
    assert "a region" not in str(info.value) and "region-based" not in str(info.value)
