"""samtune.datasets.synthetic: layout, determinism, anatomy/orientation and label contents.

Small sizes keep every test around a second on 2 CPU cores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
import pytest
from PIL import Image

from samtune.datasets import synthetic
from samtune.datasets.synthetic import (
    CT_DATASET_NAME,
    CT_LABELS,
    generate_cityscapes,
    generate_ct_phantom,
    generate_demo_data,
)

CT_KW = dict(n_cases=2, shape=(48, 48, 12), spacing_mm=(3.0, 3.0, 5.0))
CS_KW = dict(n_train=2, n_val=1, size_wh=(128, 64))
CS_ALLOWED = {0, 1, 3, 4, 7, 8, 11, 17, 20, 21, 22, 23, 24, 26}
CS_REQUIRED = {7, 8, 11, 23, 26}


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _world(img: nib.Nifti1Image, mask: np.ndarray) -> np.ndarray:
    """World (RAS+ mm) position of the centroid of a boolean voxel mask."""
    return nib.affines.apply_affine(img.affine, np.argwhere(mask).mean(axis=0))


@pytest.fixture(scope="module")
def ct_root(tmp_path_factory) -> Path:
    return generate_ct_phantom(tmp_path_factory.mktemp("ct"), seed=0, **CT_KW)


@pytest.fixture(scope="module")
def cs_root(tmp_path_factory) -> Path:
    return generate_cityscapes(tmp_path_factory.mktemp("cs") / "cityscapes", seed=0, **CS_KW)


def _cs_pairs(root: Path):
    for image in sorted((root / "leftImg8bit").rglob("*_leftImg8bit.png")):
        rel = image.relative_to(root / "leftImg8bit").parent
        label = root / "gtFine" / rel / image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        yield image, label


# ------------------------------------------------------------------------------------------- CT
def test_ct_layout_and_dataset_json(ct_root):
    assert ct_root == ct_root.parent / CT_DATASET_NAME
    names = {p.relative_to(ct_root).as_posix() for p in ct_root.rglob("*.nii.gz")}
    assert names == {"imagesTr/phantom_000_0000.nii.gz", "imagesTr/phantom_001_0000.nii.gz",
                     "labelsTr/phantom_000.nii.gz", "labelsTr/phantom_001.nii.gz"}
    meta = json.loads((ct_root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == CT_LABELS
    assert meta["numTraining"] == 2
    assert meta["file_ending"] == ".nii.gz"
    assert meta["description"].startswith("synthetic")
    assert not [p for p in ct_root.parent.iterdir() if p.name.startswith(".tmp")]  # no leftovers


@pytest.mark.parametrize("case", [0, 1])
def test_ct_geometry_dtypes_and_labels(ct_root, case):
    img = nib.load(ct_root / "imagesTr" / f"phantom_{case:03d}_0000.nii.gz")
    lab = nib.load(ct_root / "labelsTr" / f"phantom_{case:03d}.nii.gz")
    assert img.shape == lab.shape == (48, 48, 12)
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(img.affine, lab.affine)
    assert not np.allclose(img.affine, np.eye(4))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # stored like a DICOM-derived volume
    assert np.linalg.norm(img.affine[:3, 3]) > 10  # non-zero origin
    assert np.allclose(nib.affines.voxel_sizes(img.affine), (3.0, 3.0, 5.0))
    for hdr_img in (img, lab):
        assert int(hdr_img.header["qform_code"]) == 1 and int(hdr_img.header["sform_code"]) == 1
        np.testing.assert_allclose(hdr_img.get_qform(), img.affine, atol=1e-4)
    values = np.unique(np.asarray(lab.dataobj))
    assert set(values.tolist()) == set(CT_LABELS.values())  # only declared labels, all present
    z_counts = {k: int((np.asarray(lab.dataobj) == k).any(axis=(0, 1)).sum()) for k in (1, 2, 3, 4)}
    assert min(z_counts.values()) >= 3, z_counts  # every organ on several slices


@pytest.mark.parametrize("case", [0, 1])
def test_ct_anatomy_in_world_coordinates(ct_root, case):
    img = nib.as_closest_canonical(nib.load(ct_root / "imagesTr" / f"phantom_{case:03d}_0000.nii.gz"))
    lab = nib.as_closest_canonical(nib.load(ct_root / "labelsTr" / f"phantom_{case:03d}.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    hu, label = np.asarray(img.dataobj), np.asarray(lab.dataobj)
    liver, spleen = _world(lab, label == 1), _world(lab, label == 2)
    kid_r, kid_l = _world(lab, label == 3), _world(lab, label == 4)
    body = _world(img, hu > -500)
    # RAS+: x grows toward the patient's Right, y toward Anterior.
    assert liver[0] > body[0] > spleen[0]
    assert kid_r[0] > body[0] > kid_l[0]
    assert kid_r[1] < body[1] and kid_l[1] < body[1]  # kidneys posterior
    # same in canonical voxel order: a larger first index is further to the right
    assert np.argwhere(label == 1)[:, 0].mean() > np.argwhere(label == 2)[:, 0].mean()


@pytest.mark.parametrize("case", [0, 1])
def test_ct_hounsfield_values(ct_root, case):
    hu = np.asarray(nib.load(ct_root / "imagesTr" / f"phantom_{case:03d}_0000.nii.gz").dataobj)
    label = np.asarray(nib.load(ct_root / "labelsTr" / f"phantom_{case:03d}.nii.gz").dataobj)
    assert -1024 <= hu.min() <= -990 and 500 < hu.max() < 1000  # air outside, bone inside
    corners = np.concatenate([hu[:3, :3].ravel(), hu[-3:, -3:].ravel()])
    assert abs(corners.mean() + 1000) < 10  # air is -1000 HU
    mean = {k: hu[label == k].mean() for k in (1, 2, 3, 4)}
    assert 70 < mean[1] < mean[2] < min(mean[3], mean[4]) < 200, mean
    body_bg = hu[(label == 0) & (hu > -500)]
    assert -120 < np.median(body_bg) < 80  # soft tissue and fat


def test_ct_deterministic_and_seed_dependent(ct_root, tmp_path):
    again = generate_ct_phantom(tmp_path / "a", seed=0, **CT_KW)
    assert _files(again) == _files(ct_root)
    other = _files(generate_ct_phantom(tmp_path / "b", seed=1, **CT_KW))
    same = _files(ct_root)
    assert other.keys() == same.keys()
    assert other["imagesTr/phantom_000_0000.nii.gz"] != same["imagesTr/phantom_000_0000.nii.gz"]
    assert other["labelsTr/phantom_001.nii.gz"] != same["labelsTr/phantom_001.nii.gz"]


def test_ct_case_does_not_depend_on_case_count(ct_root, tmp_path):
    one = generate_ct_phantom(tmp_path, seed=0, n_cases=1, shape=(48, 48, 12))
    name = "labelsTr/phantom_000.nii.gz"
    assert (one / name).read_bytes() == (ct_root / name).read_bytes()


def test_ct_regenerates_over_its_own_output_but_never_over_foreign_data(tmp_path):
    first = generate_ct_phantom(tmp_path, seed=0, n_cases=1, shape=(48, 48, 12))
    second = generate_ct_phantom(tmp_path, seed=1, n_cases=1, shape=(48, 48, 12))
    assert first == second and json.loads((second / "dataset.json").read_text())["numTraining"] == 1
    foreign = tmp_path / "x" / CT_DATASET_NAME
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("real data")
    with pytest.raises(FileExistsError):
        generate_ct_phantom(tmp_path / "x", n_cases=1, shape=(48, 48, 12))
    assert (foreign / "mine.txt").read_text() == "real data"
    assert [p.name for p in (tmp_path / "x").iterdir()] == [CT_DATASET_NAME]


def test_interrupted_run_leaves_no_dataset(tmp_path, monkeypatch):
    calls = []

    def fail_on_second_save(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    real_save = synthetic._save_nifti
    monkeypatch.setattr(synthetic, "_save_nifti", fail_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        generate_ct_phantom(tmp_path, n_cases=2, shape=(48, 48, 12))
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its temp folder


def test_ct_rejects_too_small_volumes(tmp_path):
    with pytest.raises(ValueError):
        generate_ct_phantom(tmp_path, n_cases=1, shape=(32, 32, 8))


# ----------------------------------------------------------------------------------- Cityscapes
def test_cityscapes_layout(cs_root):
    rel = sorted(p.relative_to(cs_root).as_posix() for p in cs_root.rglob("*.png"))
    assert rel == [
        "gtFine/train/aachen/aachen_000000_000019_gtFine_instanceIds.png",
        "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png",
        "gtFine/train/bochum/bochum_000000_000019_gtFine_instanceIds.png",
        "gtFine/train/bochum/bochum_000000_000019_gtFine_labelIds.png",
        "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_instanceIds.png",
        "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png",
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "leftImg8bit/train/bochum/bochum_000000_000019_leftImg8bit.png",
        "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png",
    ]
    pattern = re.compile(r"[a-z]+_\d{6}_\d{6}_leftImg8bit\.png")
    assert all(pattern.fullmatch(Path(p).name) for p in rel if p.startswith("leftImg8bit"))


def test_cityscapes_instance_ids_follow_the_official_encoding_and_cars_touch(tmp_path):
    """instanceIds = labelId × 1000 + n (n from 0 per class, as json2instanceImg numbers them) on car and
    person objects, the labelId elsewhere (car groups included); every scene has touching cars: two
    instances in one connected component of the car class."""
    root = generate_cityscapes(tmp_path / "cs", n_train=0, n_val=4, size_wh=(256, 128))
    groups = 0
    for label_path in sorted(root.glob("gtFine/val/*/*_gtFine_labelIds.png")):
        with Image.open(label_path) as lb, Image.open(str(label_path).replace("labelIds", "instanceIds")) as ins:
            labels, ids = np.asarray(lb).astype(np.int64), np.asarray(ins).astype(np.int64)
        assert ids.shape == labels.shape and ids.max() < 2**16
        things = ids >= 1000
        assert np.array_equal(ids[~things], labels[~things]) and np.array_equal(ids[things] // 1000, labels[things])
        assert set(np.unique(ids[things] // 1000).tolist()) <= {24, 26}
        for cls in (24, 26):
            numbers = sorted(np.unique(ids[ids // 1000 == cls] % 1000).tolist())
            assert numbers == list(range(len(numbers)))
        groups += bool(((labels == 26) & ~things).any())
        components, _ = ndimage.label(labels == 26, structure=np.ones((3, 3), bool))
        assert any(len(np.unique(ids[(components == k) & things])) >= 2 for k in range(1, components.max() + 1))
    assert groups >= 1  # a "car group" region (labelId 26 without an instance) in some scene


def test_cityscapes_images_and_labels(cs_root):
    seen = set()
    pairs = list(_cs_pairs(cs_root))
    assert len(pairs) == 3
    for image_path, label_path in pairs:
        with Image.open(image_path) as im, Image.open(label_path) as lb:
            assert im.mode == "RGB" and lb.mode == "L"
            assert im.size == lb.size == (128, 64)
            image, label = np.asarray(im), np.asarray(lb)
        ids = set(np.unique(label).tolist())
        assert ids <= CS_ALLOWED, ids - CS_ALLOWED
        assert CS_REQUIRED <= ids, CS_REQUIRED - ids
        seen |= ids
        # appearance carries the class: road and sky differ in colour, and are not one flat colour
        road, sky = image[label == 7].astype(float), image[label == 23].astype(float)
        assert np.abs(road.mean(0) - sky.mean(0)).sum() > 60
        assert road.std(0).min() > 2
    assert {0, 1, 3, 4} <= seen  # the ignored ids occur somewhere


def test_cityscapes_default_mix_of_classes(tmp_path):
    root = generate_cityscapes(tmp_path, n_train=6, n_val=2, size_wh=(256, 128), seed=3)
    counts: dict[int, int] = {}
    for _, label_path in _cs_pairs(root):
        for k in np.unique(np.asarray(Image.open(label_path))).tolist():
            counts[k] = counts.get(k, 0) + 1
    assert all(counts[k] == 8 for k in CS_REQUIRED)
    assert all(counts.get(k, 0) >= 4 for k in (17, 21, 24)), counts  # most images


def test_cityscapes_deterministic_and_seed_dependent(cs_root, tmp_path):
    assert _files(generate_cityscapes(tmp_path / "a", seed=0, **CS_KW)) == _files(cs_root)
    other = _files(generate_cityscapes(tmp_path / "b", seed=1, **CS_KW))
    same = _files(cs_root)
    assert other.keys() == same.keys()
    name = "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelIds.png"
    assert other[name] != same[name]


# ------------------------------------------------------------------------------------ demo data
def test_generate_demo_data_kinds(tmp_path, monkeypatch):
    """Defaults-sized generation is timed elsewhere; here only the wiring: folders, seed, kinds."""
    made = {}

    def fake_ct(out, seed=0):
        made["ct"] = (Path(out), seed)
        return Path(out) / CT_DATASET_NAME

    def fake_cs(out, seed=0):
        made["cityscapes"] = (Path(out), seed)
        return Path(out)

    monkeypatch.setattr(synthetic, "generate_ct_phantom", fake_ct)
    monkeypatch.setattr(synthetic, "generate_cityscapes", fake_cs)
    paths = generate_demo_data(tmp_path, seed=5)
    assert paths == {"ct": tmp_path / CT_DATASET_NAME, "cityscapes": tmp_path / "cityscapes"}
    assert made == {"ct": (tmp_path, 5), "cityscapes": (tmp_path / "cityscapes", 5)}
    made.clear()
    assert generate_demo_data(tmp_path, kinds=("cityscapes",)).keys() == {"cityscapes"}
    assert made.keys() == {"cityscapes"}
    with pytest.raises(ValueError):
        generate_demo_data(tmp_path, kinds=("mri",))
