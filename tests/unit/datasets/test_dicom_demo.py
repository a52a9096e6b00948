"""samtune.datasets.dicom_demo: the CT phantom as a PACS export (CT series + ground-truth DICOM-SEG).

The DICOM is read back with samtune's own reader and compared with the NIfTI phantom generated with
the same arguments: same affine (1e-4 mm), same HU, same labels. Small sizes: ~1 s per generation.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from samtune import SamtuneError
from samtune.datasets import dicom_demo, synthetic, synthetic_dicom
from samtune.datasets.dicom_demo import DICOM_DATASET_NAME, generate_dicom_phantom, series_geometry
from samtune.datasets.dicom_seg import read_seg
from samtune.datasets.dicom_series import choose_series, find_series, read_series
from samtune.datasets.label_codes import resolve_codes
from samtune.datasets.synthetic import CT_LABELS, generate_ct_phantom
from samtune.finetune.cli import main

KW = dict(n_cases=2, shape=(48, 48, 12), spacing_mm=(3.0, 3.0, 5.0))


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """(DICOM root, NIfTI root) of the same arguments and seed."""
    out = tmp_path_factory.mktemp("phantoms")
    return generate_dicom_phantom(out / "dicom", seed=3, **KW), generate_ct_phantom(out / "nifti", seed=3, **KW)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_case(patient: Path):
    found, skipped = find_series(patient / "CT")
    return read_series(choose_series(found, skipped=skipped))


def test_layout_one_folder_per_patient_with_ct_and_seg(phantoms):
    root, _ = phantoms
    assert root.name == DICOM_DATASET_NAME
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["PHANTOM_000", "PHANTOM_001"]
    assert (root / "README.txt").is_file() and (root / synthetic._MARKER).is_file()
    assert "PHANTOM_000" in (root / "README.txt").read_text() and "kidney_left" in (root / "README.txt").read_text()
    for patient in ("PHANTOM_000", "PHANTOM_001"):
        ct, seg = sorted((root / patient / "CT").iterdir()), sorted((root / patient / "SEG").iterdir())
        assert len(ct) == KW["shape"][2] and len(seg) == 1
        assert all(p.suffix == "" and len(p.name) == 16 for p in ct + seg)  # PACS export: no suffix
    assert not list(root.parent.glob(".tmp-synthetic-*"))  # the build folder is gone


def test_ct_headers_name_patient_study_and_series(phantoms):
    root, _ = phantoms
    studies = set()
    for case in range(KW["n_cases"]):
        found, _ = find_series(root / f"PHANTOM_{case:03d}")  # the SEG is not an image series
        assert len(found) == 1
        ds = pydicom.dcmread(found[0].files[0], stop_before_pixels=True)
        assert (ds.PatientID, str(ds.PatientName)) == (f"PHANTOM_{case:03d}", f"Phantom^Case{case:03d}")
        assert (ds.Modality, ds.SeriesDescription) == ("CT", "CT abdomen phantom")
        assert ds.SOPClassUID.name == "CT Image Storage"
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept), ds.RescaleType) == (1.0, -1024.0, "HU")
        assert ds.StudyDate == ds.InstanceCreationDate == "20240102"
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in found[0].files]
        assert len({h.StudyInstanceUID for h in headers}) == len({h.SeriesInstanceUID for h in headers}) == 1
        studies.add(ds.StudyInstanceUID)
    assert len(studies) == KW["n_cases"]  # one study per patient


def test_seg_headers_reference_the_series_with_coded_segments(phantoms):
    root, _ = phantoms
    vol = _read_case(root / "PHANTOM_000")
    seg = pydicom.dcmread(next((root / "PHANTOM_000" / "SEG").iterdir()))
    ct = vol.sources[0]
    assert (seg.Modality, seg.PatientID, seg.StudyInstanceUID) == ("SEG", "PHANTOM_000", ct.StudyInstanceUID)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.SeriesInstanceUID
    assert seg.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert seg.SeriesDescription == dicom_demo.SEG_DESCRIPTION and seg.SegmentationType == "BINARY"
    assert seg.ContentDescription == dicom_demo.SEG_CONTENT
    assert seg.file_meta.MediaStorageSOPInstanceUID == seg.SOPInstanceUID
    names = [n for n, v in sorted(CT_LABELS.items(), key=lambda kv: kv[1]) if v]
    codes = resolve_codes(names)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == names
    for item, name in zip(seg.SegmentSequence, names):
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes[name].type.value
        assert item.SegmentAlgorithmName == dicom_demo.SEG_ALGORITHM
    types = [s.SegmentedPropertyTypeCodeSequence[0] for s in seg.SegmentSequence]
    modifiers = [t.get("SegmentedPropertyTypeModifierCodeSequence") for t in types]
    assert [m[0].CodeMeaning if m else None for m in modifiers] == [None, None, "Right", "Left"]


def test_round_trip_equals_the_nifti_phantom(phantoms):
    root, nifti = phantoms
    for case in range(KW["n_cases"]):
        patient = root / f"PHANTOM_{case:03d}"
        image = nib.load(nifti / "imagesTr" / f"phantom_{case:03d}_0000.nii.gz")
        label = np.asarray(nib.load(nifti / "labelsTr" / f"phantom_{case:03d}.nii.gz").dataobj)
        vol = _read_case(patient)
        assert vol.units == "HU" and vol.image.shape == KW["shape"]
        np.testing.assert_allclose(vol.image.affine, image.affine, atol=1e-4, rtol=0)
        got = np.asarray(vol.image.dataobj)
        assert got.dtype == np.int16 and np.array_equal(got, np.asarray(image.dataobj))
        seg_label, classes = read_seg(next((patient / "SEG").iterdir()), vol.sources)
        assert {c.name: c.value for c in classes} == {n: v for n, v in CT_LABELS.items() if v}
        assert np.array_equal(seg_label, label)


def test_same_seed_same_bytes_other_seed_other_patients(phantoms, tmp_path):
    root, _ = phantoms
    again = generate_dicom_phantom(tmp_path / "again", seed=3, **KW)
    assert _files(again) == _files(root)
    other = generate_dicom_phantom(tmp_path / "other", seed=4, n_cases=1, shape=KW["shape"])
    a, b = (pydicom.dcmread(next((r / "PHANTOM_000" / "SEG").iterdir())) for r in (root, other))
    assert a.StudyInstanceUID != b.StudyInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID


def test_replaces_its_own_tree_but_never_other_data(tmp_path):
    small = dict(n_cases=1, shape=(48, 48, 12))
    generate_dicom_phantom(tmp_path, **small)
    (tmp_path / DICOM_DATASET_NAME / "PHANTOM_000" / "stale").write_text("old")
    generate_dicom_phantom(tmp_path, **small)
    assert not (tmp_path / DICOM_DATASET_NAME / "PHANTOM_000" / "stale").exists()
    foreign = tmp_path / "foreign"
    (foreign / DICOM_DATASET_NAME).mkdir(parents=True)
    with pytest.raises(FileExistsError):
        generate_dicom_phantom(foreign, **small)


def test_geometry_of_a_left_handed_grid_is_written_last_slice_first(tmp_path):
    """k against row × column: the series holds the same world voxels; the reader gives them flipped in k."""
    affine = np.array([[-2.0, 0, 0, -40], [0, 2.5, 0, 10], [0, 0, 4.0, -300], [0, 0, 0, 1]])  # det < 0: LAS
    geo = series_geometry(affine, 5)
    assert geo.reversed and geo.spacing_mm == (2.5, 2.0, 4.0)
    data = np.random.default_rng(0).integers(-1000, 1000, (6, 7, 5)).astype(np.int16)
    image = nib.Nifti1Image(data, affine)
    vol, reverse = dicom_demo._write_ct(tmp_path / "CT", image, synthetic_dicom.SeriesIds(seed="flip"))
    assert reverse
    dicom_demo._check_same(vol, image, reverse)  # raises when the world geometry differs
    world = nib.affines.apply_affine
    assert np.allclose(world(vol.image.affine, [0, 0, 0]), world(affine, [0, 0, 4]), atol=1e-4)


def test_geometry_right_handed_and_refused_shear():
    rot = np.deg2rad(3.0)
    c, s = np.cos(rot), np.sin(rot)
    lin = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([-3.0, -2.0, 5.0])
    geo = series_geometry(nib.affines.from_matvec(lin, [10.0, 20.0, -500.0]), 8)
    assert not geo.reversed and np.allclose(geo.spacing_mm, (2.0, 3.0, 5.0))
    assert np.allclose(geo.orientation, (c, s, 0, -s, c, 0))  # row direction ~ L, column direction ~ P
    assert np.allclose(geo.origin_lps, (-10, -20, -500))
    sheared = np.diag([1.0, 1.0, 1.0, 1.0])
    sheared[0, 2] = 0.5
    with pytest.raises(SamtuneError, match="not orthogonal"):
        series_geometry(sheared, 4)


def test_demo_data_kind_dicom(tmp_path, monkeypatch, capsys):
    small = functools.partial(generate_dicom_phantom, n_cases=1, shape=(48, 48, 12))
    monkeypatch.setattr(dicom_demo, "generate_dicom_phantom", small)
    assert main(["demo-data", "--kind", "dicom", "--out", str(tmp_path), "--seed", "2"]) == 0
    assert capsys.readouterr().out.strip() == f"dicom: {tmp_path / DICOM_DATASET_NAME}"
    marker = json.loads((tmp_path / DICOM_DATASET_NAME / synthetic._MARKER).read_text())
    assert marker == {"kind": "dicom", "seed": 2}
    assert not (tmp_path / synthetic.CT_DATASET_NAME).exists()  # only the kind asked for
