"""datasets/dicom_series.py (with dicom_geometry.py): DICOM series found in a folder tree, chosen,
and read as a RAS NIfTI image, checked against dcm2niix (an independent converter) and against
the volumes written by synthetic_dicom.py; every irregular stack is refused with a message naming
the series and the slices, or resampled when asked."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless
from samtune import SamtuneError
from samtune.datasets.dicom_series import choose_series, find_series, read_series
from samtune.datasets.synthetic_dicom import (
    AXIAL,
    CORONAL,
    SeriesIds,
    rotation_orientation,
    write_enhanced_ct,
    write_series,
)

SHAPE = (8, 32, 40)  # slices, rows, columns
SPACING = (0.8, 0.7, 2.5)  # between rows, between columns, between slices (mm): non-square pixels
ORIGIN = (-101.3, 57.2, 30.0)  # LPS mm
OBLIQUE = rotation_orientation("z", 30, rotation_orientation("x", 20))


def _dcm2niix_binary() -> str | None:
    try:
        import dcm2niix
    except ImportError:
        return None
    return dcm2niix.bin if Path(dcm2niix.bin).exists() else None


DCM2NIIX = _dcm2niix_binary()
needs_dcm2niix = pytest.mark.skipif(DCM2NIIX is None, reason="no dcm2niix binary: pip install dcm2niix (dev extra)")


def _volume(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3000, shape).astype(np.int16)


def _read(folder, **kwargs):
    found, _ = find_series(folder)
    return read_series(choose_series(found, where=folder), **kwargs)


def _data(volume) -> np.ndarray:
    return np.asarray(volume.image.dataobj)


def _as_read(stored: np.ndarray, slope=1.0, intercept=-1024.0) -> np.ndarray:
    """What read_series must return for a written volume: rescaled, (columns, rows, slices)."""
    return (stored * slope + intercept).transpose(2, 1, 0)


def _dcm2niix(series: Path, out: Path) -> dict[str, nib.Nifti1Image]:
    out.mkdir(parents=True)
    run = subprocess.run([DCM2NIIX, "-z", "n", "-b", "n", "-f", "out", "-o", str(out), str(series)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return {p.name: nib.load(p) for p in sorted(out.glob("*.nii"))}


def _assert_same_as(ours: nib.Nifti1Image, reference: nib.Nifti1Image, atol_mm=1e-4) -> None:
    """Same voxels at the same places: both in closest-canonical (RAS+) order, then affines and
    values compared (dcm2niix stores rows bottom-up and raw values with scl_slope / scl_inter)."""
    a, b = nib.as_closest_canonical(ours), nib.as_closest_canonical(reference)
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=atol_mm, rtol=0)
    np.testing.assert_array_equal(np.asarray(a.dataobj, float), b.get_fdata())


# --- the independent reference: dcm2niix --------------------------------------------------------------
# dcm2niix keeps 2D-acquired oblique series on their acquisition grid with the oblique sform/qform (its
# -x option crops/rotates 3D acquisitions only) and writes the rows bottom-up; so it is compared in
# closest-canonical order. Its float32 header fields bound the affine agreement (~1e-5 mm here).


@needs_dcm2niix
@pytest.mark.parametrize("orientation", [AXIAL, CORONAL, rotation_orientation("x", 20), OBLIQUE],
                         ids=["axial", "coronal", "oblique-x20", "oblique-x20-z30"])
def test_equals_dcm2niix(tmp_path, orientation):
    stored = _volume()
    write_series(tmp_path / "dicom", stored, spacing_mm=SPACING, orientation=orientation, origin_lps=ORIGIN,
                 rescale=(1, -1024))
    ours = _read(tmp_path / "dicom")
    assert ours.image.get_data_dtype() == np.int16 and ours.units == "HU"
    np.testing.assert_array_equal(_data(ours), _as_read(stored))
    (reference,) = _dcm2niix(tmp_path / "dicom", tmp_path / "nii").values()
    _assert_same_as(ours.image, reference)
    assert int(ours.image.header["sform_code"]) == int(ours.image.header["qform_code"]) == 1


@needs_dcm2niix
@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=lambda u: u.name)
def test_compressed_series_equal_dcm2niix(tmp_path, syntax):
    write_series(tmp_path / "dicom", _volume(), spacing_mm=SPACING, orientation=OBLIQUE, origin_lps=ORIGIN,
                 transfer_syntax=syntax)
    (reference,) = _dcm2niix(tmp_path / "dicom", tmp_path / "nii").values()
    _assert_same_as(_read(tmp_path / "dicom").image, reference)


@needs_dcm2niix
def test_enhanced_ct_equals_dcm2niix(tmp_path):
    write_enhanced_ct(tmp_path / "dicom" / "ENHANCED", _volume(), spacing_mm=SPACING, orientation=OBLIQUE,
                      origin_lps=ORIGIN, frame_order=[5, 2, 7, 0, 1, 6, 3, 4])
    (reference,) = _dcm2niix(tmp_path / "dicom", tmp_path / "nii").values()
    _assert_same_as(_read(tmp_path / "dicom").image, reference)


@needs_dcm2niix
def test_tilt_resampling_agrees_with_dcm2niix_tilt_correction(tmp_path):
    # A tilted stack of a pattern fixed in the patient: slice k shows world y = row · 0.8 mm + shear_k.
    # dcm2niix writes a corrected volume (out_Tilt_1.nii: a matrix taller by ceil(total shear) rows, values
    # rounded to int16). Measured with dcm2niix v1.0.20260724: that file's origin is off by (ceil(s) - s) rows
    # for a total shear of s rows (0.74 mm for 8 slices at 8°; it prints "Gantry Tilt Correction is new:
    # please validate conversions"), so the tilt here shears exactly 4 rows and both must agree.
    tilt = np.degrees(np.arctan(4 * SPACING[0] / (SPACING[2] * (SHAPE[0] - 1))))  # the stack shears 4 rows in all
    shear = np.tan(np.radians(tilt)) * SPACING[2] * np.arange(SHAPE[0])
    world_y = np.arange(SHAPE[1])[None, :, None] * SPACING[0] + shear[:, None, None]
    stored = np.broadcast_to(np.round(100 + 10 * world_y), SHAPE).astype(np.int16)
    write_series(tmp_path / "dicom", stored, spacing_mm=SPACING, rescale=(1, 0), gantry_tilt_deg=tilt)
    ours = _read(tmp_path / "dicom", resample=True)
    reference = _dcm2niix(tmp_path / "dicom", tmp_path / "nii")["out_Tilt_1.nii"]
    values = _data(ours)
    ijk = np.argwhere(values != values.min())  # pixels shifted out of the frame take the fill value
    theirs = nib.affines.apply_affine(np.linalg.inv(reference.affine), nib.affines.apply_affine(ours.image.affine, ijk))
    assert np.abs(theirs - np.round(theirs)).max() < 1e-4  # the same grid, only a taller matrix
    np.testing.assert_allclose(reference.get_fdata()[tuple(np.round(theirs).astype(int).T)], values[tuple(ijk.T)],
                               atol=0.5 + 1e-4)  # dcm2niix rounds to int16
    np.testing.assert_allclose(values[tuple(ijk.T)], 100 + 10 * ijk[:, 1] * SPACING[0], atol=0.5 + 1e-4)


# --- finding and choosing ----------------------------------------------------------------------------


def test_two_series_error_lists_both_and_a_uid_picks_one(tmp_path):
    ct = write_series(tmp_path / "a", _volume(), description="abdomen 2.5mm", series_number=3)
    write_series(tmp_path / "b", _volume(seed=1)[:6], description="abdomen 5mm", series_number=4)
    found, _ = find_series(tmp_path)
    assert [s.n_slices for s in found] == [8, 6]
    with pytest.raises(SamtuneError) as err:
        choose_series(found, where=tmp_path)
    message = str(err.value)
    for series in found:
        assert series.uid in message and f"'{series.description}'" in message and f"{series.n_slices} slices" in message
    assert "--series UID" in message and "data.series" in message
    uid = pydicom.dcmread(ct[0]).SeriesInstanceUID
    assert choose_series(found, uid).files == tuple(sorted(ct))


def test_an_unknown_uid_lists_the_choices(tmp_path):
    write_series(tmp_path, _volume())
    found, _ = find_series(tmp_path)
    with pytest.raises(SamtuneError, match=rf"(?s)no image series with UID 1\.2\.3.*{found[0].uid}.*data\.series"):
        choose_series(found, "1.2.3", where=tmp_path)


def test_non_dicom_files_are_skipped_and_reported(tmp_path):
    write_series(tmp_path / "scan", _volume())
    (tmp_path / "README.txt").write_text("exported by PACS")
    (tmp_path / "scan" / "empty").write_bytes(b"")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\2\0\0\0UL\4\0\0\0\0\0")  # a preamble, no series
    import shutil

    shutil.copytree(tmp_path / "scan", tmp_path / ".samtune_cache" / "copy")  # a hidden folder (samtune's cache): not read
    (tmp_path / "scan" / "._IM0001").write_bytes(b"\0" * 10)  # a macOS fork
    found, skipped = find_series(tmp_path)
    assert len(found) == 1 and found[0].n_instances == SHAPE[0]
    reasons = {p.name: why for p, why in skipped.not_dicom}
    assert set(reasons) == {"README.txt", "empty", "DICOMDIR"} and "not DICOM" in reasons["README.txt"]
    assert "3 file(s) not DICOM" in skipped.summary()
    found, skipped = find_series(tmp_path / "README.txt")
    with pytest.raises(SamtuneError, match=r"README.txt: no DICOM image series found \(skipped 1 file"):
        choose_series(found, where=tmp_path / "README.txt", skipped=skipped)


def test_segmentations_are_listed_with_the_series_they_refer_to(tmp_path):
    hd = pytest.importorskip("highdicom")
    from pydicom.sr.codedict import codes

    write_series(tmp_path / "ct", _volume())
    volume = _read(tmp_path / "ct")
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="liver", segmented_property_category=codes.SCT.Organ,
        segmented_property_type=codes.SCT.Liver, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    mask = np.zeros(SHAPE, bool)
    mask[2:5, 4:9, 6:20] = True
    hd.seg.Segmentation(  # highdicom takes the reader's source headers (no pixel data) as they are
        source_images=volume.sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="samtune", manufacturer_model_name="test", software_versions="0",
        device_serial_number="0").save_as(tmp_path / "ct" / "SEG0001")
    found, skipped = find_series(tmp_path)
    assert [s.uid for s in found] == [volume.info.uid]  # the SEG is not an image series
    assert skipped.segmentations == [(tmp_path / "ct" / "SEG0001", volume.info.uid)]


def test_nested_folders_shuffled_names_and_instance_numbers_still_give_slice_order(tmp_path):
    stored = _volume()
    names = ["IM9", "A7", "zz", "IM10", "IM1", "B", "0003", "X"]  # sorted file order is not slice order
    paths = write_series(tmp_path / "patient" / "study" / "series", stored, spacing_mm=SPACING, file_names=names)
    for k, path in enumerate(paths):  # instance numbers that disagree with the positions
        ds = pydicom.dcmread(path)
        ds.InstanceNumber = (5 * k) % 8 + 1
        ds.save_as(path)
    volume = _read(tmp_path)
    np.testing.assert_array_equal(_data(volume), _as_read(stored))
    assert [Path(s.filename).name for s in volume.sources] == names
    assert all("PixelData" not in s for s in volume.sources) and volume.frames is None
    np.testing.assert_allclose(volume.spacing_mm, (0.7, 0.8, 2.5))  # (columns i, rows j, slices k)


# --- values ------------------------------------------------------------------------------------------


def test_rescale_gives_float32_when_int16_would_not_be_exact(tmp_path):
    stored = _volume()
    write_series(tmp_path / "a", stored, rescale=(0.5, -1024.25))
    volume = _read(tmp_path / "a")
    assert _data(volume).dtype == np.float32
    np.testing.assert_allclose(_data(volume), _as_read(stored, 0.5, -1024.25), rtol=0, atol=1e-3)
    big = _volume().astype(np.uint16) * 20 + 1000  # unsigned MR values up to ~61000: beyond int16
    write_series(tmp_path / "b", big, modality="MR", rescale=(1.0, 0.0))
    volume = _read(tmp_path / "b")
    assert _data(volume).dtype == np.float32 and volume.units == "" and volume.modality == "MR"
    np.testing.assert_array_equal(_data(volume), big.transpose(2, 1, 0).astype(np.float32))


def test_single_image_series_takes_its_slice_thickness(tmp_path):
    write_series(tmp_path, _volume()[:1], spacing_mm=(0.8, 0.7, 3.0))
    volume = _read(tmp_path)
    assert volume.image.shape == (40, 32, 1) and volume.spacing_mm[2] == pytest.approx(3.0)


# --- geometry errors ---------------------------------------------------------------------------------


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(path)


def test_gantry_tilt_is_refused_with_the_angle(tmp_path):
    write_series(tmp_path, _volume(), spacing_mm=SPACING, gantry_tilt_deg=12.0)
    with pytest.raises(SamtuneError) as err:
        _read(tmp_path)
    message = str(err.value)
    for part in ("gantry tilt", "12.00°", "GantryDetectorTilt 12°", "series ", "samtune predict --resample", "data.resample: true", "tolerance"):
        assert part in message, part


def test_tilt_tag_alone_is_not_an_error_when_the_positions_stack_along_the_normal(tmp_path):
    # The positions and orientation define the grid (PS3.3 C.7.6.2.1.1); the tag is acquisition
    # information. Scanners that reconstruct in the gantry frame write a tilted orientation instead.
    paths = write_series(tmp_path, _volume(), orientation=rotation_orientation("x", 15))
    _edit(paths[0], GantryDetectorTilt="15")
    assert _read(tmp_path).image.shape == (40, 32, 8)


def test_uneven_spacing_is_refused_with_the_tolerance(tmp_path):
    offsets = [0, 2.5, 5, 7.6, 10, 12.5, 15, 17.5]
    write_series(tmp_path, _volume(), slice_offsets_mm=offsets)
    with pytest.raises(SamtuneError, match=r"uneven slice spacing: .* 2\.400 \.\. 2\.600 mm; instance 4 .*"
                                           r"tolerance 0\.025 mm: 1% of the slice distance, at least 0\.01 mm"):
        _read(tmp_path)
    write_series(tmp_path / "fine", _volume(), slice_offsets_mm=np.arange(8) * 2.5 + [0, 0, 0, 0.02, 0, 0, 0, 0])
    assert _read(tmp_path / "fine").spacing_mm[2] == pytest.approx(2.5)  # 0.02 mm: within tolerance


def test_a_missing_slice_names_the_instances_around_the_gap(tmp_path):
    paths = write_series(tmp_path, _volume())
    paths[4].unlink()  # instance 5
    with pytest.raises(SamtuneError, match=r"missing slices: instance 4 \(file \w+\) and instance 6 \(file \w+\) are "
                                           r"5\.00 mm apart, 2\.0 × the usual 2\.50 mm: about 1 slice"):
        _read(tmp_path)


def test_duplicate_positions_are_refused(tmp_path):
    write_series(tmp_path, _volume(), slice_offsets_mm=[0, 2.5, 5, 5, 7.5, 10, 12.5, 15])
    with pytest.raises(SamtuneError, match=r"instance [34] .* and instance [34] .* lie at the same position.*echoes"):
        _read(tmp_path, resample=True)  # resampling cannot choose between two images


@pytest.mark.parametrize("what, edit, fragment", [
    ("orientation", {"ImageOrientationPatient": [1, 0, 0, 0, 0.9998, 0.02]}, "mixed orientation"),
    ("pixel spacing", {"PixelSpacing": [0.8, 0.75]}, r"mixed pixel spacing .*\(0\.8, 0\.75\) mm"),
])  # fmt: skip
def test_mixed_planes_are_refused(tmp_path, what, edit, fragment):
    paths = write_series(tmp_path, _volume(), spacing_mm=SPACING)
    _edit(paths[3], **edit)
    with pytest.raises(SamtuneError, match=rf"{fragment}.*One series must hold one stack"):
        _read(tmp_path, resample=True)


def test_mixed_image_sizes_are_refused(tmp_path):
    uid = "1.2.826.0.1.3680043.8.498.1"
    write_series(tmp_path, _volume(), series_uid=uid)
    write_series(tmp_path, _volume((2, 32, 36)), series_uid=uid, slice_offsets_mm=[20, 22.5], file_names=["X1", "X2"])
    with pytest.raises(SamtuneError, match=r"mixed image size .* 32 × 40.* 32 × 36"):
        _read(tmp_path)


# --- resampling --------------------------------------------------------------------------------------


def test_resample_puts_an_uneven_stack_on_a_regular_grid_with_a_warning(tmp_path, caplog):
    offsets = np.array([0, 2.5, 5, 7.9, 10, 12.5, 15, 17.5])
    stored = np.broadcast_to((100 + 10 * offsets)[:, None, None], SHAPE).astype(np.int16)  # linear along z
    write_series(tmp_path, stored, slice_offsets_mm=offsets, rescale=(1, 0))
    with caplog.at_level(logging.WARNING, logger="samtune.datasets.dicom_series"):
        volume = _read(tmp_path, resample=True)
    assert "uneven slice spacing" in caplog.text and "resampling" in caplog.text
    assert volume.resampled and volume.spacing_mm[2] == pytest.approx(2.5) and _data(volume).dtype == np.float32
    np.testing.assert_allclose(_data(volume)[3, 4, :], 100 + 10 * 2.5 * np.arange(8), atol=1e-3)


def test_resample_fills_a_gap(tmp_path):
    z = 2.5 * np.arange(SHAPE[0])
    stored = np.broadcast_to((100 + 4 * z)[:, None, None], SHAPE).astype(np.int16)
    paths = write_series(tmp_path, stored, rescale=(1, 0))
    paths[5].unlink()
    volume = _read(tmp_path, resample=True)
    assert volume.image.shape == (40, 32, 8) and len(volume.sources) == 7
    np.testing.assert_allclose(_data(volume)[0, 0, :], 100 + 4 * z, atol=1e-3)


# --- encodings and multi-frame -----------------------------------------------------------------------


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless], ids=lambda u: u.name)
def test_compressed_series_reads_equal_to_the_uncompressed_one(tmp_path, syntax):
    stored = _volume() - 1500  # negative stored values through the codec
    ids = SeriesIds(seed="one")
    write_series(tmp_path / "raw", stored, ids=ids, orientation=OBLIQUE)
    write_series(tmp_path / "packed", stored, ids=ids, orientation=OBLIQUE, transfer_syntax=syntax)
    raw, packed = _read(tmp_path / "raw"), _read(tmp_path / "packed")
    np.testing.assert_array_equal(_data(packed), _data(raw))
    np.testing.assert_array_equal(packed.image.affine, raw.image.affine)


def test_a_missing_decoder_names_the_package_to_install(tmp_path, monkeypatch):
    from pydicom.pixels import get_decoder

    paths = write_series(tmp_path, _volume(), transfer_syntax=JPEG2000Lossless)
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})  # as if no plugin were installed
    with pytest.raises(SamtuneError) as err:
        _read(tmp_path)
    message = str(err.value)
    assert "JPEG 2000" in message and str(paths[0].parent) in message
    assert 'pip install "samtune[dicom-codecs]"' in message


def test_enhanced_ct_equals_the_single_frame_series(tmp_path):
    stored, order = _volume(), [5, 2, 7, 0, 1, 6, 3, 4]  # frames stored out of slice order
    ids = SeriesIds(seed="same")
    write_series(tmp_path / "single", stored, ids=ids, spacing_mm=SPACING, orientation=OBLIQUE, origin_lps=ORIGIN)
    write_enhanced_ct(tmp_path / "enhanced" / "ENH", stored, ids=ids, spacing_mm=SPACING, orientation=OBLIQUE,
                      origin_lps=ORIGIN, frame_order=order)
    single, enhanced = _read(tmp_path / "single"), _read(tmp_path / "enhanced")
    np.testing.assert_array_equal(_data(enhanced), _data(single))
    np.testing.assert_allclose(enhanced.image.affine, single.image.affine, atol=1e-9)
    assert enhanced.frames == [order.index(k) + 1 for k in range(8)] and enhanced.units == "HU"
    assert all(s is enhanced.sources[0] for s in enhanced.sources)


def test_highdicom_legacy_converted_enhanced_ct_equals_the_series(tmp_path):
    hd = pytest.importorskip("highdicom")
    paths = write_series(tmp_path / "single", _volume(), spacing_mm=SPACING, orientation=CORONAL, origin_lps=ORIGIN)
    legacy = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths], series_instance_uid=hd.UID(), series_number=7,
        sop_instance_uid=hd.UID(), instance_number=1)
    (tmp_path / "legacy").mkdir()
    legacy.save_as(tmp_path / "legacy" / "LEGACY")
    single, converted = _read(tmp_path / "single"), _read(tmp_path / "legacy")
    np.testing.assert_array_equal(_data(converted), _data(single))
    np.testing.assert_allclose(converted.image.affine, single.image.affine, atol=1e-9)


# --- damaged and unusual files -----------------------------------------------------------------------


def test_an_undecodable_transfer_syntax_and_a_truncated_file_are_named(tmp_path):
    paths = write_series(tmp_path / "jxl", _volume())
    ds = pydicom.dcmread(paths[2])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video: no decoder in pydicom 3.0
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
    ds.save_as(paths[2])
    with pytest.raises(SamtuneError, match=rf"{paths[2].name}: its pixel data is compressed as .* cannot decode"):
        _read(tmp_path / "jxl")
    paths = write_series(tmp_path / "cut", _volume())
    paths[3].write_bytes(paths[3].read_bytes()[:-1000])  # a transfer cut short
    with pytest.raises(SamtuneError, match=rf"{paths[3].name}: the pixel data .* could not be decoded"):
        _read(tmp_path / "cut")


def test_an_image_without_a_position_is_refused(tmp_path):
    paths = write_series(tmp_path, _volume())
    ds = pydicom.dcmread(paths[0])
    del ds.ImagePositionPatient  # a secondary capture or screenshot has no place in the patient
    ds.save_as(paths[0])
    with pytest.raises(SamtuneError, match=r"series .*: instance 1 \(file \w+\): no ImagePositionPatient"):
        _read(tmp_path)
