"""datasets/synthetic_dicom.py: CT/MR series and Enhanced CT files written from numpy volumes carry
the headers a scanner export carries, decode to the volume they were given, and are accepted by
highdicom (DICOM-SEG over them) and dcm2niix."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from samtune import SamtuneError
from samtune.datasets.synthetic_dicom import (
    AXIAL,
    CORONAL,
    TRANSFER_SYNTAXES,
    SeriesIds,
    rotation_orientation,
    slice_positions,
    write_enhanced_ct,
    write_series,
)

SHAPE = (6, 32, 40)  # slices, rows, columns: every axis a different length


def _volume(low=-1024, high=2000, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, SHAPE).astype(np.int16)


def test_ct_headers_describe_the_geometry_and_the_study(tmp_path):
    paths = write_series(tmp_path, _volume(), spacing_mm=(0.8, 0.7, 2.5), origin_lps=(-10, 20, 30), rescale=(1, -1024))
    assert len(paths) == SHAPE[0] and all(p.suffix == "" for p in paths)  # PACS-style names, no .dcm
    headers = [pydicom.dcmread(p) for p in paths]
    first = headers[0]
    assert first.SOPClassUID == CTImageStorage and first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (first.Modality, first.RescaleType, first.PhotometricInterpretation) == ("CT", "HU", "MONOCHROME2")
    assert (first.BitsAllocated, first.PixelRepresentation, first.Rows, first.Columns) == (16, 1, 32, 40)
    assert [float(v) for v in first.PixelSpacing] == [0.8, 0.7]  # (between rows, between columns)
    assert (float(first.RescaleSlope), float(first.RescaleIntercept)) == (1.0, -1024.0)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PatientID", "StudyDate"):
        assert len({str(h.get(key)) for h in headers}) == 1, key
    assert len({h.SOPInstanceUID for h in headers}) == SHAPE[0]
    assert [h.InstanceNumber for h in headers] == list(range(1, SHAPE[0] + 1))
    np.testing.assert_allclose([[float(v) for v in h.ImagePositionPatient] for h in headers],
                               [[-10, 20, 30 + 2.5 * k] for k in range(SHAPE[0])])


def test_mr_series_and_shared_ids(tmp_path):
    ids = SeriesIds(seed="case-7", patient_id="P7")
    ct = write_series(tmp_path / "ct", _volume(), ids=ids, description="ct")
    mr = write_series(tmp_path / "mr", _volume(0, 4000).astype(np.uint16), modality="MR", rescale=(1.0, 0.0),
                      ids=ids, description="t1", orientation=CORONAL)
    a, b = pydicom.dcmread(ct[0]), pydicom.dcmread(mr[0])
    assert b.SOPClassUID == MRImageStorage and b.PixelRepresentation == 0 and "RescaleSlope" not in b
    assert a.StudyInstanceUID == b.StudyInstanceUID and a.FrameOfReferenceUID == b.FrameOfReferenceUID
    assert a.SeriesInstanceUID != b.SeriesInstanceUID and b.PatientID == "P7"


@pytest.mark.parametrize("syntax", TRANSFER_SYNTAXES, ids=lambda u: u.name)
def test_every_offered_transfer_syntax_decodes_to_the_volume(tmp_path, syntax):
    volume = _volume()  # negative stored values too: signed data through every codec
    paths = write_series(tmp_path, volume, transfer_syntax=syntax)
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(ds.pixel_array, volume[k])


def test_knobs_for_irregular_stacks(tmp_path):
    offsets = [0, 2.5, 5, 10, 12.5, 15]  # a slice missing between 5 and 10 mm
    positions = slice_positions(6, spacing_mm=(1, 1, 2.5), orientation=AXIAL, origin_lps=(0, 0, 0),
                                slice_offsets_mm=offsets, gantry_tilt_deg=10)
    np.testing.assert_allclose(positions[:, 2], offsets)
    # the shear runs along the column direction (+y, posterior, for axial slices)
    np.testing.assert_allclose(positions[:, 1], np.tan(np.radians(10)) * np.array(offsets))
    paths = write_series(tmp_path, _volume(), slice_offsets_mm=offsets, gantry_tilt_deg=10)
    assert float(pydicom.dcmread(paths[1]).GantryDetectorTilt) == 10
    with pytest.raises(SamtuneError, match="one per slice"):
        write_series(tmp_path / "x", _volume(), slice_offsets_mm=[0, 1])


def test_bad_arguments_are_refused_with_the_fix(tmp_path):
    with pytest.raises(SamtuneError, match="int16 or uint16"):
        write_series(tmp_path, _volume().astype(np.float32))
    with pytest.raises(SamtuneError, match="'CT' or 'MR'"):
        write_series(tmp_path, _volume(), modality="PT")
    with pytest.raises(SamtuneError, match="not offered"):
        write_series(tmp_path, _volume(), transfer_syntax="1.2.840.10008.1.2.4.50")  # JPEG baseline: lossy


def test_rotation_orientation_stays_orthonormal():
    orientation = np.array(rotation_orientation("x", 20))
    row, col = orientation[:3], orientation[3:]
    assert np.isclose(np.linalg.norm(row), 1) and np.isclose(np.linalg.norm(col), 1) and np.isclose(row @ col, 0)
    np.testing.assert_allclose(col, [0, np.cos(np.radians(20)), np.sin(np.radians(20))])


def test_enhanced_ct_holds_per_frame_positions_in_the_given_frame_order(tmp_path):
    volume, order = _volume(), [3, 0, 5, 1, 4, 2]
    path = write_enhanced_ct(tmp_path / "enhanced", volume, spacing_mm=(0.8, 0.7, 2.5), frame_order=order)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == EnhancedCTImageStorage and int(ds.NumberOfFrames) == 6
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == [0.8, 0.7]
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == list(AXIAL)
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert z == [2.5 * k for k in order]
    np.testing.assert_array_equal(ds.pixel_array, volume[order])
    with pytest.raises(SamtuneError, match="permutation"):
        write_enhanced_ct(tmp_path / "bad", volume, frame_order=[0, 0, 1, 2, 3, 4])


def test_highdicom_writes_a_segmentation_over_the_series(tmp_path):
    hd = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    paths = write_series(tmp_path / "ct", _volume(), orientation=rotation_orientation("x", 20))
    mask = np.zeros(SHAPE, bool)
    mask[2:4, 10:20, 5:30] = True
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="liver", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Liver, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=[pydicom.dcmread(p, stop_before_pixels=True) for p in paths], pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=[segment],
        series_instance_uid=hd.UID(), series_number=50, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="samtune", manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(paths[0]).SeriesInstanceUID


def test_dcm2niix_converts_the_series_and_the_enhanced_file(tmp_path):
    dcm2niix = pytest.importorskip("dcm2niix", reason="the dcm2niix wheel (dev extra) is not installed")
    if not Path(dcm2niix.bin).exists():
        pytest.skip(f"no dcm2niix binary at {dcm2niix.bin}")
    write_series(tmp_path / "series", _volume())
    write_enhanced_ct(tmp_path / "enhanced" / "file", _volume())
    for name in ("series", "enhanced"):
        out = tmp_path / f"{name}_nii"
        out.mkdir()
        run = subprocess.run([dcm2niix.bin, "-z", "n", "-b", "n", "-f", "out", "-o", str(out), str(tmp_path / name)],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and (out / "out.nii").exists(), run.stdout + run.stderr
        assert "(40x32x6x1)" in run.stdout  # columns × rows × slices
