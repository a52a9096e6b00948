"""datasets/label_codes.py: the shipped organ codes are the DICOM standard's (checked against
pydicom's copy of the PS3.16 tables), names find them, uncoded names stay UNKNOWN, user codes are
parsed and validated, and the Slicer / ITK-SNAP colour files parse back."""

from __future__ import annotations

import logging
import re

import pytest
from pydicom.sr import _cid_dict
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from samtune import SamtuneError
from samtune.datasets.label_codes import (
    ANATOMICAL_STRUCTURE,
    ORGANS,
    UNKNOWN,
    ClassCode,
    LabelClass,
    code_from_dict,
    code_to_dict,
    display_color,
    is_valid_sctid,
    lookup,
    parse_code,
    resolve_codes,
    write_itksnap_labels,
    write_slicer_color_table,
)


def _in_cid(cid: int, scheme: str, keyword: str) -> bool:
    return keyword in _cid_dict.cid_concepts[cid].get(scheme, [])


# ---- the shipped table ---------------------------------------------------------------------


def test_shipped_table_size_and_regions():
    names = {e.name for e in ORGANS}
    assert len(ORGANS) >= 40 and len(names) == len(ORGANS)
    assert {"liver", "spleen", "kidney", "pancreas", "inferior vena cava", "adrenal gland", "esophagus",
            "lung", "heart", "trachea", "brain", "optic nerve", "parotid gland", "mandible", "spinal cord"} <= names  # fmt: skip


@pytest.mark.parametrize("entry", ORGANS, ids=lambda e: e.name)
def test_each_organ_code_is_in_the_context_group_it_names(entry):
    # the code comes from pydicom's dictionary by keyword and is listed by the PS3.16 CID of its row
    assert entry.type == getattr(codes.SCT, entry.keyword)
    assert _in_cid(entry.cid, "SCT", entry.keyword), f"{entry.keyword} not in CID {entry.cid}"
    assert is_valid_sctid(entry.type.value)
    assert all(0 <= c <= 255 for c in entry.color) and entry.color_source in ("slicer", "samtune")


def test_category_and_laterality_are_the_standard_codes():
    # CID 7150 lists Anatomical Structure as SCT 91723000 (not the older 123037004)
    assert ANATOMICAL_STRUCTURE == Code("91723000", "SCT", "Anatomical Structure")
    assert _in_cid(7150, "SCT", "AnatomicalStructure")
    left, right = lookup("kidney_left").modifier, lookup("kidney_right").modifier
    assert (left.value, right.value) == ("7771000", "24028007")
    assert _in_cid(244, "SCT", "Left") and _in_cid(244, "SCT", "Right")


def test_known_values_spot_checks():
    # values as printed in DICOM PS3.16 (CID 7154 / 7155 / 7153)
    expected = {"liver": "10200004", "spleen": "78961009", "kidney": "64033007", "pancreas": "15776009",
                "inferior vena cava": "64131007", "heart": "80891009", "brain": "12738006", "spinal cord": "2748008"}  # fmt: skip
    assert {name: lookup(name).type.value for name in expected} == expected


# ---- lookup ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kidney_left", "left kidney", "kidney_l", "Kidney_L", "KIDNEY-LEFT", "l_kidney", "KidneyLeft"])
def test_left_kidney_spellings(name):
    code = lookup(name)
    assert code.type == codes.SCT.Kidney and code.modifier == codes.SCT.Left


@pytest.mark.parametrize(("name", "keyword", "side"), [
    ("Liver", "Liver", None), ("right_adrenal_gland", "AdrenalGland", "Right"), ("postcava", "InferiorVenaCava", None),
    ("BrainStem", "BrainStem", None), ("SpinalCord", "SpinalCord", None), ("OpticNrv_L", "OpticNerve", "Left"),
    ("Parotid_R", "ParotidGland", "Right"), ("Glnd_Submand_L", "SubmandibularGland", "Left"), ("Bone_Mandible", "Mandible", None),
    ("lung_upper_lobe_left", "UpperLobeOfLung", "Left"), ("lung_middle_lobe_right", "MiddleLobeOfRightLung", None),
    ("urinary_bladder", "Bladder", None), ("oesophagus", "Esophagus", None), ("Eye_R", "Eyeball", "Right"),
])  # fmt: skip
def test_lookup_synonyms(name, keyword, side):
    code = lookup(name)
    assert code.type == getattr(codes.SCT, keyword)
    assert (code.modifier.meaning if code.modifier else None) == side


@pytest.mark.parametrize("name", ["tumour", "portal_vein_and_splenic_vein", "liver_left", "background", "", "left", "cochlea_l"])
def test_uncoded_names_are_unknown_never_a_guess(name):
    assert lookup(name) is UNKNOWN


def test_only_spleen_is_spleen():
    # the MONAI Label failure: every uncoded segment written as SCT 78961009 "Spleen"
    for name in ["tumour", "vessel", "organ", "class_3", "label 7", "kidney_cyst", "splenic vein"]:
        assert lookup(name) is UNKNOWN
    assert lookup("spleen").type == codes.SCT.Spleen


def test_resolve_codes_given_shipped_unknown(caplog):
    with caplog.at_level(logging.WARNING):
        out = resolve_codes(["liver", "lesion"], {"lesion": {"category": "SCT:49755003", "type": "SCT:52988006"}})
    assert out["liver"] == lookup("liver") and out["lesion"].type == Code("52988006", "SCT", "Lesion")
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        out = resolve_codes(["liver", "blob"])
    assert out["blob"] is UNKNOWN and "'blob'" in caplog.text and "SCT 261665006" in caplog.text
    with pytest.raises(SamtuneError, match="'kidny'"):
        resolve_codes(["kidney"], {"kidny": {"type": "SCT:64033007"}})


# ---- codes as text ---------------------------------------------------------------------------------


def test_parse_code_forms():
    assert parse_code("SCT:10200004", where="x") == Code("10200004", "SCT", "Liver")
    assert parse_code("SCT:10200004", where="x").meaning == "Liver"
    assert parse_code(" SCT : 64033007 : Kidney ", where="x").meaning == "Kidney"
    assert parse_code("DCM:123110", where="x").meaning == "Artificial Intelligence"
    assert parse_code("99LOCAL:tumour-1:Tumour: core", where="x") == Code("tumour-1", "99LOCAL", "Tumour: core")


@pytest.mark.parametrize(("text", "fragment"), [
    ("10200004", "not a code"), ("SCT:10200005", "Verhoeff"), ("SCT:1020000", "Verhoeff"), ("SCT:abc", "SNOMED"),
    ("99LOCAL:X1", "meaning"), (42, "not a code"), ("SCT:", "not a code"),
])  # fmt: skip
def test_parse_code_errors_name_the_class_and_value(text, fragment):
    with pytest.raises(SamtuneError, match=fragment) as err:
        parse_code(text, where="class 'liver' type")
    assert "class 'liver' type" in str(err.value)


def test_check_digit_catches_single_digit_typos():
    for entry in ORGANS:
        value = entry.type.value
        for position in range(len(value)):
            for digit in "0123456789":
                typo = value[:position] + digit + value[position + 1 :]
                if typo != value and typo[0] != "0":
                    assert not is_valid_sctid(typo), (value, typo)


def test_pydicom_snomed_values_pass_the_check():
    values = {getattr(codes.SCT, k).value for k in codes.SCT.dir()}
    failing = {v for v in values if not is_valid_sctid(v)}
    assert len(values) > 5000 and len(failing) <= 2, sorted(failing)  # a stray typo in the tables at most


def test_class_code_dict_round_trip():
    for entry in ORGANS:
        for code in [entry.code()] + ([entry.code(codes.SCT.Right)] if entry.paired else []):
            assert ClassCode.from_dict(code.to_dict(), entry.name) == code
            assert code_from_dict(code_to_dict(code), entry.name) == code
    assert code_to_dict(UNKNOWN) is None and code_from_dict(None, "blob") is UNKNOWN
    given = ClassCode.from_dict({"category": "SCT:123037004", "type": "SCT:10200004", "modifier": None, "color": [221, 130, 101]})
    assert given.type.meaning == "Liver" and given.color == (221, 130, 101)
    assert ClassCode.from_dict({"type": "SCT:64033007", "modifier": "SCT:7771000"}).category == ANATOMICAL_STRUCTURE


@pytest.mark.parametrize(("d", "fragment"), [
    ({"type": "SCT:10200004", "colour": [1, 2, 3]}, "unknown: colour"), ({"category": "SCT:91723000"}, "type is missing"),
    ({"type": "SCT:10200004", "color": [300, 0, 0]}, r"\[300, 0, 0\]"), ({"type": "SCT:10200004", "color": "red"}, "'red'"),
    ("SCT:10200004", "mapping"),
])  # fmt: skip
def test_class_code_dict_errors(d, fragment):
    with pytest.raises(SamtuneError, match=fragment) as err:
        ClassCode.from_dict(d, "my_liver")
    assert "'my_liver'" in str(err.value)


def test_display_colours():
    assert display_color(lookup("liver"), 1) == (221, 130, 101)
    fallback = [display_color(UNKNOWN, v) for v in range(1, 21)]
    assert len(set(fallback)) == 20 and all(0 <= c <= 255 for rgb in fallback for c in rgb)


# ---- colour files -----------------------------------------------------------------------------------

CLASSES = [LabelClass(5, "kidney left", lookup("kidney_left")), LabelClass(1, "liver", lookup("liver")),
           LabelClass(12, 'odd "name"', UNKNOWN)]  # fmt: skip


def test_slicer_color_table_parses_back(tmp_path):
    path = write_slicer_color_table(tmp_path / "label.ctbl", CLASSES)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# Color table file")
    rows = [line.split() for line in lines if not line.startswith("#")]
    assert all(len(row) == 6 for row in rows)  # value name R G B A, names without spaces
    table = {int(v): (name, tuple(map(int, rgba))) for v, name, *rgba in rows}
    assert table[0] == ("Background", (0, 0, 0, 0))
    assert table[1] == ("liver", (221, 130, 101, 255))
    assert table[5] == ("kidney_left", (185, 102, 83, 255))
    assert table[12][1][:3] == display_color(UNKNOWN, 12) and f"# {len(rows)} values" in lines[1]


def test_itksnap_labels_parse_back(tmp_path):
    path = write_itksnap_labels(tmp_path / "labels.txt", CLASSES)
    text = path.read_text()
    assert "IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL" in text
    row = re.compile(r'^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([01])\s+([01])\s+"([^"]*)"\s*$')
    parsed = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            m = row.match(line)
            assert m, line
            parsed[int(m[1])] = (tuple(int(c) for c in m.groups()[1:4]), float(m[5]), m[6], m[7], m[8])
    assert parsed[0] == ((0, 0, 0), 0.0, "0", "0", "Clear Label")
    assert parsed[1] == ((221, 130, 101), 1.0, "1", "1", "liver")
    assert parsed[5][4] == "kidney left" and parsed[12][4] == "odd 'name'"


@pytest.mark.parametrize("classes", [[(0, "background", UNKNOWN)], [(1, "a", UNKNOWN), (1, "b", UNKNOWN)], [(70000, "x", UNKNOWN)]])
def test_colour_files_refuse_bad_values(tmp_path, classes):
    for writer in (write_slicer_color_table, write_itksnap_labels):
        with pytest.raises(SamtuneError, match="value"):
            writer(tmp_path / "out.txt", classes)
    assert not list(tmp_path.iterdir())
