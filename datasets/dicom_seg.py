"""Label maps <-> DICOM Segmentation (DICOM-SEG) objects on a source CT/MR series, with highdicom.

Layout: a label map here is what ``dicom_series.read_series`` gives for the scan, an integer array
indexed (i = column, j = row, k = slice), slice k being ``source_headers[k]``; DICOM frames are
rows × columns, so frame pixel [j, i] of slice k is voxel [i, j, k].

Writing (``write_seg``), choices and why:

* every class of the model is a segment, present in this case or not, numbered 1..N in order of
  class value (BINARY Segment Numbers start at 1 and increase by 1, PS3.3 C.8.20.2, as highdicom
  enforces it; LABELMAP uses the same numbers). The same model thus gives the same segment numbers in every
  case, and an organ the model found nowhere is an explicit empty segment, not a missing one.
  Each segment's Segment Description (0062,0006) records the samtune class value
  ("samtune class value 5"), so ``read_seg`` gives back the NIfTI values even when they are not 1..N;
* segmented property category/type/modifier and display colour from ``label_codes``; a class
  without a code is written with category and type SCT 261665006 "Unknown" (no segmentation
  context group has an "unknown" entry, and a specific organ code would be a false statement;
  MONAI Label's writer, for one, labels every uncoded segment SCT 78961009 "Spleen"). Its Segment
  Label still names the class, and a warning says how to give it a code;
* algorithm identification: name, version, family DCM 123110 "Artificial Intelligence" (from
  pydicom's DICOM code tables), the checkpoint as an algorithm parameter; Content Qualification
  (0018,9004) RESEARCH: samtune's output is not a cleared product's;
* BINARY (one bit per voxel and segment, the type every SEG reader supports) by default;
  LABELMAP (Label Map Segmentation Storage, DICOM Supplement 243: one frame per slice holding
  segment numbers) on request, smaller but newer and not yet read everywhere; it needs a highdicom
  that has ``SegmentationTypeValues.LABELMAP`` (0.28 is tested);
* empty frames are left out (highdicom keeps them all when the whole map is empty, since a SEG needs
  one frame); the file is written to a temporary sibling and renamed into place.

Reading (``read_seg``) refuses a SEG that is not on the given series (its referenced series and
instances, frame of reference and frame size), maps frames to slices by the SOP Instance UID each
frame references (highdicom's ``get_pixels_by_source_instance``), and refuses overlapping
segments, which a label map cannot hold, naming the segments and the voxels they share.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from samtune import SamtuneError
from samtune.datasets.label_codes import UNKNOWN, UNKNOWN_CONCEPT, ClassCode, LabelClass, display_color, uncoded_message

log = logging.getLogger(__name__)

SEGMENTATION_TYPES = ("BINARY", "LABELMAP")
_VALUE_NOTE = re.compile(r"samtune class value (\d+)")
_LO_MAX = 64  # characters of a DICOM LO value (Segment Label, Series Description), PS3.5 6.2


def write_seg(label, source_headers: Sequence[Dataset], classes, out_path, *, algorithm_version: str,
              checkpoint: str, algorithm_name: str = "samtune", series_description: str | None = None,
              segmentation_type: str = "BINARY", series_number: int | None = None, algorithm_type: str = "AUTOMATIC",
              content_description: str = "Segmentation by a fine-tuned Segment Anything model") -> Path:
    """Write ``label`` (i, j, k class values; 0 background) as a DICOM-SEG on the series of
    ``source_headers``; ``classes``: (value, name, ClassCode or UNKNOWN) for every class of the
    model. ``series_description`` defaults to one naming the algorithm, version and checkpoint;
    ``series_number`` to the source's + 1000, so the SEG sorts after its scan; ``algorithm_type``:
    AUTOMATIC (a prediction) or SEMIAUTOMATIC (a prediction a reader corrected, as `samtune serve`
    saves them; PS3.3 C.8.20.2: both name the algorithm). Returns the path."""
    import highdicom as hd

    out_path = Path(out_path)
    headers = _check_headers(source_headers, out_path)
    classes = _check_classes(classes, out_path)
    numbers = _segment_numbers(np.asarray(label), headers, classes, out_path)
    kind = str(segmentation_type).upper()
    if kind not in SEGMENTATION_TYPES:
        raise SamtuneError(f"{out_path}: segmentation type {segmentation_type!r}; samtune writes {' or '.join(SEGMENTATION_TYPES)}.")
    if kind not in hd.seg.SegmentationTypeValues.__members__:
        raise SamtuneError(f"{out_path}: highdicom {hd.__version__} cannot write {kind} SEGs; upgrade it (0.28 can) or write BINARY.")
    algorithm = hd.AlgorithmIdentificationSequence(algorithm_name, codes.DCM.ArtificialIntelligence,
                                                   algorithm_version, parameters={"checkpoint": str(checkpoint)})  # fmt: skip
    uncoded = [c.name for c in classes if c.code is UNKNOWN]
    if uncoded:
        log.warning(f"{out_path}: {uncoded_message(uncoded)}")
    description = series_description or f"{algorithm_name} {algorithm_version} {Path(str(checkpoint)).name}"
    seg = hd.seg.Segmentation(
        headers, numbers, kind, [_segment(n, c, algorithm, algorithm_type) for n, c in enumerate(classes, 1)],
        hd.UID(), _series_number(series_number, headers), hd.UID(), 1,
        manufacturer=algorithm_name, manufacturer_model_name=_lo(f"{algorithm_name} {checkpoint}"),
        software_versions=algorithm_version, device_serial_number="none",
        series_description=_lo(description), content_qualification="RESEARCH",
        content_description=_lo(content_description),
    )  # fmt: skip
    return _save_atomic(seg, out_path)


def _segment(number: int, cls: LabelClass, algorithm, algorithm_type: str = "AUTOMATIC"):
    """One SegmentDescription: the class's codes, modifier, colour, and its value in a note."""
    import highdicom as hd

    code = cls.code
    category, concept = (code.category, code.type) if code is not UNKNOWN else (UNKNOWN_CONCEPT, UNKNOWN_CONCEPT)
    desc = hd.seg.SegmentDescription(
        number, cls.name, category, concept, algorithm_type, algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*display_color(code, cls.value)),
    )  # fmt: skip
    if code is not UNKNOWN and code.modifier is not None:
        # PS3.3 C.8.20.2: the modifier sits inside the Segmented Property Type Code Sequence item
        modifier = hd.sr.CodedConcept(code.modifier.value, code.modifier.scheme_designator, code.modifier.meaning)
        desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [modifier]
    note = f"samtune class value {cls.value}"
    desc.SegmentDescription = note if code is not UNKNOWN else f"{note}; no standard code known for this class"
    return desc


def _check_headers(source_headers, where: Path) -> list[Dataset]:
    headers = list(source_headers)
    if not headers:
        raise SamtuneError(f"{where}: no source slices given; a DICOM-SEG is written on the series it segments.")
    if len({str(h.get("SOPInstanceUID")) for h in headers}) != len(headers):  # multi-frame or resampled stacks
        raise SamtuneError(f"{where}: the source slices repeat SOP instances; DICOM-SEG is written here on single-frame "
                           "series read without resampling (one instance per slice).")  # fmt: skip
    for key in ("SeriesInstanceUID", "Rows", "Columns", "FrameOfReferenceUID"):
        found = {str(h.get(key)) for h in headers}
        if len(found) != 1 or "None" in found:
            raise SamtuneError(f"{where}: the source slices disagree on {key} ({sorted(found)}); "
                               "give the headers of one series, as read_series returns them.")  # fmt: skip
    return headers


def _check_classes(classes, where: Path) -> list[LabelClass]:
    out = sorted((LabelClass(*c) for c in classes), key=lambda c: c.value)
    values, names = [c.value for c in out], [c.name for c in out]
    for c in out:
        if not isinstance(c.value, (int, np.integer)) or not 0 < c.value <= 65535:
            raise SamtuneError(f"{where}: class {c.name!r} has value {c.value!r}; class values are 1-65535 (0 is the background).")
        if not c.name or len(c.name) > _LO_MAX or "\\" in c.name:
            raise SamtuneError(f"{where}: class name {c.name!r} cannot be a Segment Label (1-64 characters, no backslash); rename it.")
        if c.code is not UNKNOWN and not isinstance(c.code, ClassCode):
            raise SamtuneError(f"{where}: class {c.name!r} has code {c.code!r}; give a label_codes.ClassCode or UNKNOWN.")
    if len(set(values)) != len(values) or len(set(names)) != len(names) or not out:
        raise SamtuneError(f"{where}: classes {list(zip(values, names))}: give at least one, each value and name once.")
    return out


def _segment_numbers(label: np.ndarray, headers, classes, where: Path) -> np.ndarray:
    """(i, j, k) class values -> (k, rows, columns) segment numbers, as highdicom takes frames."""
    label = label.astype(np.uint8) if label.dtype == bool else label  # a bool array would index as a mask
    expected = (int(headers[0].Columns), int(headers[0].Rows), len(headers))
    if label.shape != expected or label.dtype.kind not in "biu":
        raise SamtuneError(f"{where}: label map of shape {label.shape} ({label.dtype}); the series needs integers of "
                           f"shape {expected} (columns, rows, slices), as read_series lays the scan out.")  # fmt: skip
    present = np.unique(label)
    stray = sorted(set(present.tolist()) - {0} - {c.value for c in classes})
    if stray:
        raise SamtuneError(f"{where}: label values {stray[:10]} belong to no class ({[c.value for c in classes]}); "
                           "add those classes or fix the label map.")  # fmt: skip
    lut = np.zeros(int(present.max()) + 1, np.uint16)
    for number, cls in enumerate(classes, 1):
        if cls.value < len(lut):
            lut[cls.value] = number
    dtype = np.uint8 if len(classes) < 256 else np.uint16
    return np.ascontiguousarray(lut[label].astype(dtype).transpose(2, 1, 0))


def _series_number(series_number, headers) -> int:
    if series_number is not None:
        return int(series_number)
    source = headers[0].get("SeriesNumber")
    return (int(source) if source not in (None, "") else 0) + 1000


def _lo(text: str) -> str:
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."


def _save_atomic(seg: Dataset, out_path: Path) -> Path:
    from samtune.files import write_atomic

    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)  # the SEG of one CT is small (bits per voxel)
    return write_atomic(out_path, buffer.getvalue())


def read_seg(path, source_headers: Sequence[Dataset]) -> tuple[np.ndarray, list[LabelClass]]:
    """A DICOM-SEG on the series of ``source_headers`` -> (label map (i, j, k) of class values,
    classes as (value, name, ClassCode or UNKNOWN)). Values: the samtune note of each segment, else
    its segment number (SEGs from other tools)."""
    path = Path(path)
    headers = _check_headers(source_headers, path)
    seg = _load(path)
    _check_references(seg, headers, path)
    classes = [_class_of(seg, number) for number in seg.segment_numbers]
    values = [c.value for c in classes]
    if len(set(values)) != len(values):  # two notes claiming one value: fall back to segment numbers
        classes = [c._replace(value=n) for c, n in zip(classes, seg.segment_numbers)]
    label = _label_map(seg, headers, classes, path)
    return label, classes


def _load(path: Path):
    import highdicom as hd

    if not path.is_file():
        raise SamtuneError(f"{path}: no such DICOM-SEG file.")
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001  (pydicom and highdicom raise many types for a bad file)
        raise SamtuneError(f"{path}: not a readable DICOM Segmentation ({type(exc).__name__}: {exc}).") from None
    if seg.segmentation_type.value not in SEGMENTATION_TYPES:
        raise SamtuneError(f"{path}: a {seg.segmentation_type.value} SEG; samtune reads BINARY and LABELMAP ones "
                           "(threshold a FRACTIONAL one with highdicom first).")  # fmt: skip
    return seg


def _check_references(seg, headers, path: Path) -> None:
    """The SEG must reference this series, only instances of it, on its frame of reference and grid."""
    series = str(headers[0].SeriesInstanceUID)
    referenced = seg.get_source_image_uids()  # (study, series, instance) from ReferencedSeriesSequence
    seg_series = sorted({str(s) for _, s, _ in referenced})
    if series not in seg_series:
        raise SamtuneError(f"{path}: this SEG segments series {', '.join(seg_series) or '(none named)'}, not the series "
                           f"given ({series}); pair each SEG with the series it references.")  # fmt: skip
    ours = {str(h.SOPInstanceUID) for h in headers}
    missing = sorted({str(i) for _, s, i in referenced if str(s) == series} - ours)
    if missing:
        raise SamtuneError(f"{path}: the SEG references {len(missing)} instance(s) of series {series} that the slices "
                           f"given lack (e.g. {missing[0]}); read the complete series.")  # fmt: skip
    if str(seg.get("FrameOfReferenceUID")) != str(headers[0].FrameOfReferenceUID):
        raise SamtuneError(f"{path}: frame of reference {seg.get('FrameOfReferenceUID')} differs from the series' "
                           f"{headers[0].FrameOfReferenceUID}; the SEG was not made on this scan.")  # fmt: skip
    if (int(seg.Rows), int(seg.Columns)) != (int(headers[0].Rows), int(headers[0].Columns)):
        raise SamtuneError(f"{path}: SEG frames are {seg.Rows}×{seg.Columns}, the series' slices "
                           f"{headers[0].Rows}×{headers[0].Columns}; samtune reads SEGs on the scan's own grid.")  # fmt: skip


def _class_of(seg, number: int) -> LabelClass:
    """Segment ``number`` -> (value, name, code): codes back from the description; "Unknown" -> UNKNOWN."""
    from highdicom.color import CIELabColor

    item = seg.get_segment_description(number)
    note = _VALUE_NOTE.search(str(item.get("SegmentDescription", "")))
    value = int(note.group(1)) if note else number
    type_item = item.SegmentedPropertyTypeCodeSequence[0]
    concept = _code(type_item)
    if concept == UNKNOWN_CONCEPT:
        return LabelClass(value, str(item.SegmentLabel), UNKNOWN)
    modifiers = type_item.get("SegmentedPropertyTypeModifierCodeSequence") or []
    lab = item.get("RecommendedDisplayCIELabValue")
    color = CIELabColor.from_dicom_value(lab).to_rgb(clip=True) if lab else None
    code = ClassCode(_code(item.SegmentedPropertyCategoryCodeSequence[0]), concept,
                     _code(modifiers[0]) if modifiers else None, color)  # fmt: skip
    return LabelClass(value, str(item.SegmentLabel), code)


def _code(item: Dataset) -> Code:
    value = item.get("CodeValue") or item.get("LongCodeValue") or item.get("URNCodeValue")
    return Code(str(value), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def _label_map(seg, headers, classes: list[LabelClass], path: Path) -> np.ndarray:
    """Segment by segment (a stacked array of every segment can take gigabytes), noting overlaps."""
    uids = [str(h.SOPInstanceUID) for h in headers]
    owner = np.zeros((len(headers), int(headers[0].Rows), int(headers[0].Columns)), np.uint16)  # k, row, column
    shared: dict[tuple[int, int], int] = {}
    for index, number in enumerate(seg.segment_numbers, 1):
        mask = seg.get_pixels_by_source_instance(uids, segment_numbers=[number], assert_missing_frames_are_empty=True,
                                                 skip_overlap_checks=True)[..., 0].astype(bool)  # fmt: skip
        clash = mask & (owner > 0)
        if clash.any():
            others, counts = np.unique(owner[clash], return_counts=True)
            shared.update({(int(o), index): int(n) for o, n in zip(others, counts)})
        owner[mask & ~clash] = index
    if shared:
        pairs = "; ".join(f"{classes[a - 1].name!r} (segment {seg.segment_numbers[a - 1]}) and {classes[b - 1].name!r} "
                          f"(segment {seg.segment_numbers[b - 1]}): {n} voxels" for (a, b), n in sorted(shared.items()))  # fmt: skip
        raise SamtuneError(f"{path}: segments overlap, which one label map cannot hold: {pairs}. "
                           "Skip this case, or split the SEG into non-overlapping label maps.")  # fmt: skip
    values = np.asarray([0] + [c.value for c in classes], np.int64)
    dtype = np.uint8 if values.max() <= 255 else np.uint16
    return np.ascontiguousarray(values[owner].astype(dtype).transpose(2, 1, 0))
