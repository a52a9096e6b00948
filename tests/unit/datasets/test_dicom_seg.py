"""datasets/dicom_seg.py: a labelled volume written as DICOM-SEG on a small synthetic CT series and
read back with highdicom and with plain pydicom: frames reference the right slices, pixels equal
the label voxel for voxel, codes, colours and algorithm identification are there, an uncoded class
is "Unknown" (not a wrong organ), a SEG of another series and overlapping segments are refused."""

from __future__ import annotations

import logging

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import UID
from samtune import SamtuneError
from samtune.datasets.dicom_seg import read_seg, write_seg
from samtune.datasets.label_codes import UNKNOWN, LabelClass, lookup
from samtune.datasets.synthetic_dicom import SeriesIds, rotation_orientation, write_series

SLICES, ROWS, COLUMNS = 5, 7, 6  # every axis a different length: a transposition changes the shape
SEGMENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")  # PS3.4 B.5: Segmentation Storage
LABELMAP_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.7")  # PS3.4 B.5: Label Map Segmentation Storage
CLASSES = [
    LabelClass(1, "liver", lookup("liver")),
    LabelClass(3, "kidney_left", lookup("kidney_left")),
    LabelClass(4, "tumour", UNKNOWN),
    LabelClass(6, "spleen", lookup("spleen")),  # in no voxel: an empty segment
]


def _series(folder, description="ct", ids=None):
    # an oblique series: frames must map by the instances they reference, not by an axis assumption
    volume = np.zeros((SLICES, ROWS, COLUMNS), np.int16)
    paths = write_series(folder, volume, ids=ids or SeriesIds(seed="seg-test"), description=description,
                         orientation=rotation_orientation("z", 20.0), spacing_mm=(0.8, 0.7, 2.5))  # fmt: skip
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


@pytest.fixture(scope="module")
def headers(tmp_path_factory):
    return _series(tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def label():
    lab = np.zeros((COLUMNS, ROWS, SLICES), np.uint8)  # i = column, j = row, k = slice
    lab[1:4, 2:6, 1] = 1
    lab[0, 0, 1] = 3
    lab[4:6, 0:3, 3] = 3
    lab[2, 5, 4] = 4
    lab[5, 6, 0] = 1
    return lab


def _write(tmp_path, label, headers, classes=CLASSES, **kw):
    kw.setdefault("algorithm_version", "0.1.0")
    kw.setdefault("checkpoint", "runs/abdomen/checkpoints/best")
    return write_seg(label, headers, classes, tmp_path / "seg.dcm", **kw)


def _frame_item(ds, frame, name):
    """A functional group item: per-frame if there, else shared (highdicom shares what all frames have)."""
    per_frame = ds.PerFrameFunctionalGroupsSequence[frame]
    if name in per_frame:
        return per_frame[name][0]
    return ds.SharedFunctionalGroupsSequence[0][name][0]


@pytest.mark.parametrize("kind", ["BINARY", "LABELMAP"])
def test_round_trip(tmp_path, headers, label, kind):
    back, classes = read_seg(_write(tmp_path, label, headers, segmentation_type=kind), headers)
    assert back.shape == label.shape and np.array_equal(back, label)
    assert [(c.value, c.name) for c in classes] == [(c.value, c.name) for c in CLASSES]
    for got, want in zip(classes, CLASSES):
        if want.code is UNKNOWN:
            assert got.code is UNKNOWN
        else:
            assert (got.code.category, got.code.type, got.code.modifier) == (want.code.category, want.code.type, want.code.modifier)
            assert np.abs(np.subtract(got.code.color, want.code.color)).max() <= 1  # via CIELab


def test_binary_frames_map_to_source_slices_plain_pydicom(tmp_path, headers, label):
    ds = pydicom.dcmread(_write(tmp_path, label, headers))
    assert ds.SOPClassUID == SEGMENTATION_STORAGE and ds.SegmentationType == "BINARY"
    by_uid = {h.SOPInstanceUID: k for k, h in enumerate(headers)}
    number_to_value = {n: c.value for n, c in enumerate(CLASSES, 1)}
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ROWS, COLUMNS)
    seen = set()
    for f in range(int(ds.NumberOfFrames)):
        number = int(_frame_item(ds, f, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        source = _frame_item(ds, f, "DerivationImageSequence").SourceImageSequence[0]
        k = by_uid[source.ReferencedSOPInstanceUID]
        position = _frame_item(ds, f, "PlanePositionSequence").ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], [float(v) for v in headers[k].ImagePositionPatient])
        expected = (label[:, :, k] == number_to_value[number]).T  # frame rows × columns = label[i, j].T
        assert np.array_equal(pixels[f].astype(bool), expected), (number, k)
        seen.add((number, k))
    # exactly the (segment, slice) pairs with voxels have frames
    wanted = {(n, k) for n, v in number_to_value.items() for k in range(SLICES) if (label[:, :, k] == v).any()}
    assert seen == wanted


def test_labelmap_frames_hold_segment_numbers_plain_pydicom(tmp_path, headers, label):
    ds = pydicom.dcmread(_write(tmp_path, label, headers, segmentation_type="LABELMAP"))
    assert ds.SOPClassUID == LABELMAP_STORAGE and ds.SegmentationType == "LABELMAP"
    value_to_number = {c.value: n for n, c in enumerate(CLASSES, 1)}
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ROWS, COLUMNS)
    by_uid = {h.SOPInstanceUID: k for k, h in enumerate(headers)}
    for f in range(int(ds.NumberOfFrames)):
        k = by_uid[_frame_item(ds, f, "DerivationImageSequence").SourceImageSequence[0].ReferencedSOPInstanceUID]
        expected = np.vectorize(lambda v: value_to_number.get(int(v), 0))(label[:, :, k]).T
        assert np.array_equal(pixels[f], expected)


def test_codes_colours_and_algorithm(tmp_path, headers, label):
    ds = pydicom.dcmread(_write(tmp_path, label, headers))
    items = {int(s.SegmentNumber): s for s in ds.SegmentSequence}
    assert [items[n].SegmentLabel for n in sorted(items)] == [c.name for c in CLASSES]  # every class, spleen too
    kidney = items[2]
    assert (kidney.SegmentedPropertyCategoryCodeSequence[0].CodeValue, kidney.SegmentedPropertyTypeCodeSequence[0].CodeValue) == (
        "91723000", "64033007")  # fmt: skip
    modifier = kidney.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0]
    assert (modifier.CodeValue, modifier.CodingSchemeDesignator, modifier.CodeMeaning) == ("7771000", "SCT", "Left")
    assert hd.color.CIELabColor.from_dicom_value(items[1].RecommendedDisplayCIELabValue).to_rgb() == (221, 130, 101)
    assert items[3].SegmentDescription.startswith("samtune class value 4") and items[4].SegmentDescription == "samtune class value 6"
    algorithm = items[1].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("samtune", "0.1.0")
    family = algorithm.AlgorithmFamilyCodeSequence[0]
    assert (family.CodeValue, family.CodingSchemeDesignator) == (codes.DCM.ArtificialIntelligence.value, "DCM") == ("123110", "DCM")
    assert "runs/abdomen/checkpoints/best" in algorithm.AlgorithmParameters
    assert items[1].SegmentAlgorithmType == "AUTOMATIC" and ds.ContentQualification == "RESEARCH"
    assert "samtune 0.1.0 best" == ds.SeriesDescription and int(ds.SeriesNumber) == int(headers[0].SeriesNumber) + 1000
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == headers[0].SeriesInstanceUID
    referenced = {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {h.SOPInstanceUID for h in headers}
    assert (ds.PatientID, ds.StudyInstanceUID, ds.FrameOfReferenceUID) == (
        headers[0].PatientID, headers[0].StudyInstanceUID, headers[0].FrameOfReferenceUID)  # fmt: skip


def test_uncoded_class_is_unknown_not_an_organ(tmp_path, headers, label, caplog):
    with caplog.at_level(logging.WARNING):
        ds = pydicom.dcmread(_write(tmp_path, label, headers))
    assert "'tumour'" in caplog.text
    tumour = next(s for s in ds.SegmentSequence if s.SegmentLabel == "tumour")
    for sequence in ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence"):
        code = tumour[sequence][0]
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("261665006", "SCT", "Unknown")
    spleen_like = [s.SegmentLabel for s in ds.SegmentSequence if s.SegmentedPropertyTypeCodeSequence[0].CodeValue == "78961009"]
    assert spleen_like == ["spleen"]


def test_slice_order_follows_the_headers(tmp_path, headers, label):
    reversed_headers = headers[::-1]
    path = _write(tmp_path, label, reversed_headers)  # label slice k is reversed_headers[k]
    assert np.array_equal(read_seg(path, reversed_headers)[0], label)
    assert np.array_equal(read_seg(path, headers)[0], label[:, :, ::-1])


def test_values_beyond_one_byte_and_an_empty_map(tmp_path, headers, label):
    classes = [LabelClass(2, "liver", lookup("liver")), LabelClass(300, "aorta", lookup("aorta"))]
    wide = np.where(label == 1, 2, np.where(label == 3, 300, 0)).astype(np.uint16)
    back, read = read_seg(_write(tmp_path, wide, headers, classes), headers)
    assert np.array_equal(back, wide) and [c.value for c in read] == [2, 300]
    empty = np.zeros_like(label)
    assert not read_seg(_write(tmp_path, empty, headers, classes), headers)[0].any()


def test_seg_of_another_series_is_refused(tmp_path, headers, label):
    path = _write(tmp_path, label, headers)
    other = _series(tmp_path / "other", description="other series")
    assert other[0].SeriesInstanceUID != headers[0].SeriesInstanceUID
    with pytest.raises(SamtuneError) as err:
        read_seg(path, other)
    assert headers[0].SeriesInstanceUID in str(err.value) and other[0].SeriesInstanceUID in str(err.value)
    with pytest.raises(SamtuneError, match="lack"):
        read_seg(path, headers[:3])  # an incomplete series


def test_overlapping_segments_are_reported(tmp_path, headers):
    stacked = np.zeros((SLICES, ROWS, COLUMNS, 2), np.uint8)  # frames × rows × columns × segments
    stacked[2, 1:4, 1:3, 0] = 1  # 6 voxels
    stacked[2, 3:5, 2:4, 1] = 1  # shares rows 3, column 2: 1 voxel
    descriptions = [hd.seg.SegmentDescription(n, name, codes.SCT.AnatomicalStructure, getattr(codes.SCT, kw), "MANUAL")
                    for n, name, kw in [(1, "liver", "Liver"), (2, "gallbladder", "Gallbladder")]]  # fmt: skip
    seg = hd.seg.Segmentation(headers, stacked, "BINARY", descriptions, hd.UID(), 2, hd.UID(), 1,
                              "other tool", "model", "1", "1")  # fmt: skip
    seg.save_as(tmp_path / "overlap.dcm")
    with pytest.raises(SamtuneError, match=r"'liver' \(segment 1\) and 'gallbladder' \(segment 2\): 1 voxels"):
        read_seg(tmp_path / "overlap.dcm", headers)
    stacked[2, 3, 2, 1] = 0  # apart now: a foreign SEG without samtune notes reads with values = segment numbers
    seg = hd.seg.Segmentation(headers, stacked, "BINARY", descriptions, hd.UID(), 2, hd.UID(), 1, "other tool", "model", "1", "1")
    seg.save_as(tmp_path / "apart.dcm")
    back, classes = read_seg(tmp_path / "apart.dcm", headers)
    assert [(c.value, c.name, c.code.type.meaning) for c in classes] == [(1, "liver", "Liver"), (2, "gallbladder", "Gallbladder")]
    assert np.array_equal(back, (stacked[..., 0] + 2 * stacked[..., 1]).transpose(2, 1, 0))


@pytest.mark.parametrize(("change", "fragment"), [
    ("shape", "shape"), ("stray", "belong to no class"), ("duplicate", "each value and name once"),
    ("zero", "0 is the background"), ("kind", "segmentation type"), ("long_name", "Segment Label"),
    ("multiframe", "repeat SOP instances"),
])  # fmt: skip
def test_write_errors(tmp_path, headers, label, change, fragment):
    lab, classes, kw = label, list(CLASSES), {}
    if change == "multiframe":  # one instance standing for every slice, as an Enhanced CT's frames would
        headers = [headers[0]] * len(headers)
    if change == "shape":
        lab = label.transpose(1, 0, 2)
    elif change == "stray":
        lab = label.copy()
        lab[0, 0, 0] = 9
    elif change == "duplicate":
        classes.append(LabelClass(7, "liver", UNKNOWN))
    elif change == "zero":
        classes.append(LabelClass(0, "background", UNKNOWN))
    elif change == "kind":
        kw["segmentation_type"] = "FRACTIONAL"
    elif change == "long_name":
        classes[2] = LabelClass(4, "t" * 65, UNKNOWN)
    with pytest.raises(SamtuneError, match=fragment):
        _write(tmp_path, lab, headers, classes, **kw)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_written_atomically_over_an_old_file(tmp_path, headers, label):
    (tmp_path / "seg.dcm").write_bytes(b"old")
    path = _write(tmp_path, label, headers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]  # no temporary sibling left
    assert pydicom.dcmread(path).Modality == "SEG"


def test_unreadable_file(tmp_path, headers):
    (tmp_path / "bad.dcm").write_bytes(b"not dicom")
    with pytest.raises(SamtuneError, match="bad.dcm"):
        read_seg(tmp_path / "bad.dcm", headers)


def test_boolean_mask_of_one_class(tmp_path, headers, label):
    mask = label == 1
    back, classes = read_seg(_write(tmp_path, mask, headers, [LabelClass(1, "liver", lookup("liver"))]), headers)
    assert np.array_equal(back, mask.astype(np.uint8)) and classes[0].code == lookup("liver")
