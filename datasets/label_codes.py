"""What each class of a model *is*, in codes any DICOM viewer understands, and its display colour:
the label metadata that travels with a checkpoint (``classes.json``) and into DICOM-SEG files,
3D Slicer colour tables and ITK-SNAP label descriptions.

A class is described as DICOM PS3.3 C.8.20.2 (Segment Description) describes a segment: a
segmented property *category* (DICOM PS3.16 CID 7150 "Segmentation Property Categories"), a
*type* (for anatomy, CID 7192 "Anatomical Structure Segmentation Property Type" and its sub-groups,
e.g. CID 7154 "Abdominal Segmentation Types"), an optional type *modifier* (here laterality,
CID 244: SCT 7771000 "Left", SCT 24028007 "Right") and a recommended display colour.

Codes are never typed by hand: each is taken by keyword from pydicom's copy of the DICOM code
tables (``pydicom.sr.codedict.codes``); the tests check each organ's code against the CID its row
names. The category is SCT 91723000 "Anatomical Structure", as CID 7150 lists it today (3D Slicer's
terminology files and dcmqi examples still carry the earlier SCT 123037004 "Body structure").

A class name with no shipped code maps to ``UNKNOWN``, never to a guessed organ: callers warn and
write it as "Unknown" (SCT 261665006), so nothing downstream mistakes it for a specific structure.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from samtune import SamtuneError

log = logging.getLogger(__name__)

ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure  # SCT 91723000, CID 7150
LEFT, RIGHT = codes.SCT.Left, codes.SCT.Right  # SCT 7771000, SCT 24028007 (CID 244 Laterality)
UNKNOWN_CONCEPT = codes.SCT.Unknown  # SCT 261665006 "Unknown" (qualifier value; CIDs 3703, 6096)
_LATERALITY_WORDS = {"left": LEFT, "l": LEFT, "lt": LEFT, "right": RIGHT, "r": RIGHT, "rt": RIGHT}
# SCHEME:VALUE[:MEANING]; the scheme as DICOM coding scheme designators are written (SCT, DCM, FMA,
# NCIt, 99LOCAL ...); the meaning may itself hold colons, so only the first two split.
_CODE_TEXT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9_.\-]{0,15})\s*:\s*([^:\s][^:]*?)\s*(?::\s*(.*?)\s*)?$")


class Unknown:
    """The marker for a class with no code (one instance, ``UNKNOWN``): test with ``code is UNKNOWN``."""

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __reduce__(self):
        return "UNKNOWN"  # pickles as the module attribute, so ``is UNKNOWN`` holds after a round trip


UNKNOWN = Unknown()


@dataclass(frozen=True)
class ClassCode:
    """A class's segmented property category, type, optional type modifier and display RGB (0-255)."""

    category: Code
    type: Code
    modifier: Code | None = None
    color: tuple[int, int, int] | None = None

    def __post_init__(self):
        if self.color is not None:
            object.__setattr__(self, "color", _check_color(self.color, "ClassCode"))

    def to_dict(self) -> dict:
        return {"category": format_code(self.category), "type": format_code(self.type),
                "modifier": format_code(self.modifier) if self.modifier else None,
                "color": list(self.color) if self.color else None}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping, class_name: str = "?") -> "ClassCode":
        """A recipe's or classes.json's ``{"category": "SCT:91723000", "type": "SCT:10200004",
        "modifier": null, "color": [221, 130, 101]}``; ``category`` defaults to Anatomical Structure."""
        where = f"class {class_name!r}"
        if not isinstance(d, Mapping):
            raise SamtuneError(f"{where}: a class code is a mapping with 'type' (e.g. 'SCT:10200004'), not {d!r}.")
        unknown = set(d) - {"category", "type", "modifier", "color"}
        if unknown or "type" not in d:
            raise SamtuneError(f"{where}: code keys are category, type, modifier, color; "
                               f"{'unknown: ' + ', '.join(sorted(unknown)) if unknown else 'type is missing'}.")  # fmt: skip
        category = parse_code(d["category"], where=f"{where} category") if d.get("category") else ANATOMICAL_STRUCTURE
        modifier = parse_code(d["modifier"], where=f"{where} modifier") if d.get("modifier") else None
        color = _check_color(d["color"], f"{where} color") if d.get("color") is not None else None
        return cls(category, parse_code(d["type"], where=f"{where} type"), modifier, color)

    def __str__(self) -> str:
        side = f" ({self.modifier.meaning})" if self.modifier else ""
        return f"{self.type.meaning}{side} [{format_code(self.type, meaning=False)}]"


class LabelClass(NamedTuple):
    """One class of a label map: its voxel value, its name, its code (or ``UNKNOWN``)."""

    value: int
    name: str
    code: ClassCode | Unknown = UNKNOWN


# ---- the shipped table -----------------------------------------------------------------------
# name, pydicom codes.SCT keyword, the PS3.16 context group listing that code (checked by the tests
# against pydicom's CID tables), paired (takes a Left/Right modifier), display RGB, colour source,
# synonyms. Colour sources: "slicer" = 3D Slicer's GenericAnatomyColors, as its terminology file
# SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json (or -DICOM-Master.json) recommends it
# for that type (generic "Vein", "Bone", "Salivary gland", "Cranial nerve" entries where the organ has
# none); "samtune" = chosen here, where Slicer recommends none.
_ORGANS = (
    # abdomen
    ("liver", "Liver", 7154, False, (221, 130, 101), "slicer", ()),
    ("spleen", "Spleen", 7154, False, (157, 108, 162), "slicer", ()),
    ("kidney", "Kidney", 7154, True, (185, 102, 83), "slicer", ("kidneys",)),
    ("pancreas", "Pancreas", 7154, False, (249, 180, 111), "slicer", ()),
    ("gallbladder", "Gallbladder", 7154, False, (139, 150, 98), "slicer", ("gall bladder",)),
    ("stomach", "Stomach", 7192, False, (216, 132, 105), "slicer", ()),
    ("aorta", "Aorta", 7192, False, (224, 97, 76), "slicer", ()),
    ("inferior vena cava", "InferiorVenaCava", 7154, False, (0, 151, 206), "slicer",
     ("ivc", "postcava", "vena cava inferior")),
    ("portal vein", "PortalVein", 7192, False, (0, 170, 160), "samtune", ()),
    ("adrenal gland", "AdrenalGland", 7154, True, (249, 186, 150), "slicer",
     ("adrenal", "adrenal glands", "suprarenal gland")),
    ("esophagus", "Esophagus", 7155, False, (211, 171, 143), "slicer", ("oesophagus",)),
    ("duodenum", "Duodenum", 7192, False, (255, 253, 229), "slicer", ()),
    ("small intestine", "SmallIntestine", 7154, False, (205, 167, 142), "slicer", ("small bowel",)),
    ("colon", "Colon", 7192, False, (204, 168, 143), "slicer", ()),
    # pelvis
    ("urinary bladder", "Bladder", 7160, False, (222, 154, 132), "slicer", ("bladder",)),
    ("rectum", "Rectum", 7160, False, (190, 110, 90), "samtune", ()),
    ("prostate", "Prostate", 7160, False, (230, 158, 140), "slicer", ("prostate gland",)),
    ("uterus", "Uterus", 7160, False, (255, 181, 158), "slicer", ()),
    ("femur", "Femur", 7192, True, (241, 214, 145), "slicer", ("femoral bone",)),
    ("sacrum", "Sacrum", 7192, False, (241, 214, 145), "slicer", ()),
    # thorax
    ("lung", "Lung", 7155, True, (197, 165, 145), "slicer", ("lungs",)),
    ("lung upper lobe", "UpperLobeOfLung", 7155, True, (172, 138, 115), "slicer", ("upper lobe of lung",)),
    ("lung lower lobe", "LowerLobeOfLung", 7155, True, (224, 186, 162), "slicer", ("lower lobe of lung",)),
    ("lung middle lobe right", "MiddleLobeOfRightLung", 7155, False, (202, 164, 140), "slicer",
     ("middle lobe of right lung", "right lung middle lobe", "lung middle lobe")),
    ("heart", "Heart", 7152, False, (206, 110, 84), "slicer", ()),
    ("trachea", "Trachea", 7155, False, (182, 228, 255), "slicer", ()),
    ("pulmonary artery", "PulmonaryArtery", 7192, False, (0, 122, 171), "slicer", ()),
    ("superior vena cava", "SuperiorVenaCava", 7192, False, (70, 130, 200), "samtune", ("svc",)),
    ("sternum", "Sternum", 7155, False, (244, 217, 154), "slicer", ()),
    ("thyroid gland", "Thyroid", 7192, False, (62, 162, 114), "slicer", ("thyroid",)),
    # head and neck, central nervous system
    ("brain", "Brain", 7153, False, (250, 250, 225), "slicer", ()),
    ("brainstem", "BrainStem", 7153, False, (170, 120, 130), "samtune", ("brain stem",)),
    ("cerebellum", "Cerebellum", 7153, False, (200, 160, 180), "samtune", ()),
    ("hippocampus", "Hippocampus", 7153, True, (100, 150, 110), "samtune", ()),
    ("spinal cord", "SpinalCord", 7153, False, (244, 214, 49), "slicer", ()),
    ("pituitary gland", "Pituitary", 7153, False, (57, 157, 110), "slicer", ("pituitary", "hypophysis")),
    ("optic chiasm", "OpticChiasm", 7153, False, (99, 106, 24), "slicer", ("chiasm", "optic chiasma")),
    # optic nerve: no segmentation context group of pydicom 3.0's tables lists it; CID 7706 Cranial Nerve does
    ("optic nerve", "OpticNerve", 7706, True, (255, 234, 92), "slicer", ("optic nrv", "opticnerve", "opticnrv")),
    ("eye", "Eyeball", 7192, True, (194, 142, 0), "slicer", ("eyeball", "globe", "eyes")),
    # lens: SCT 78076003, listed by CID 10044 Radiosensitive Organ (no segmentation CID lists a lens)
    ("lens", "EyeLenses", 10044, True, (255, 230, 180), "samtune", ("eye lens", "lens of eye")),
    ("parotid gland", "ParotidGland", 7192, True, (70, 163, 117), "slicer", ("parotid", "glnd parotid")),
    ("submandibular gland", "SubmandibularGland", 7192, True, (100, 190, 140), "samtune",
     ("submandibular", "glnd submand", "submand")),
    ("mandible", "Mandible", 7192, False, (222, 198, 101), "slicer", ("bone mandible", "lower jaw")),
    ("larynx", "Larynx", 7192, False, (150, 208, 243), "slicer", ()),
    ("skull", "Skull", 7192, False, (241, 213, 144), "slicer", ()),
)


class OrganEntry(NamedTuple):
    name: str
    keyword: str  # in pydicom's codes.SCT
    cid: int  # DICOM PS3.16 context group that lists the code
    paired: bool
    color: tuple[int, int, int]
    color_source: str
    synonyms: tuple[str, ...]

    @property
    def type(self) -> Code:
        return getattr(codes.SCT, self.keyword)

    def code(self, modifier: Code | None = None) -> ClassCode:
        return ClassCode(ANATOMICAL_STRUCTURE, self.type, modifier, self.color)


ORGANS: tuple[OrganEntry, ...] = tuple(OrganEntry(*row) for row in _ORGANS)


# ---- lookup by class name --------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """'Kidney_L', 'kidney-l', 'KidneyL'? -> 'kidney l': camel case split ('SpinalCord' -> 'spinal
    cord', as TG-263 names are written), lower case, runs of ``_ - . , / ( )`` and spaces -> one space."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", str(name))
    return " ".join(re.split(r"[\s_\-.,/()]+", spaced.lower())).strip()


@functools.cache
def _name_index() -> dict[str, OrganEntry]:
    index: dict[str, OrganEntry] = {}
    for entry in ORGANS:
        for alias in (entry.name, *entry.synonyms):
            key = normalize_name(alias)
            if index.setdefault(key, entry) is not entry:  # a table error: caught by the tests
                raise RuntimeError(f"label_codes: {alias!r} names both {index[key].name} and {entry.name}")
    return index


def lookup(name: str) -> ClassCode | Unknown:
    """The shipped code for a class name, or ``UNKNOWN``. Case, ``_``/``-``/space and camel case are
    ignored; a leading or trailing left/right word ('left', 'l', 'lt', 'right', 'r', 'rt') adds the
    laterality modifier to a paired organ: 'kidney_left', 'Left Kidney', 'kidney_l' and 'Kidney_L'
    are the kidney with modifier SCT 7771000 "Left". A side on an unpaired organ is ``UNKNOWN``."""
    index = _name_index()
    key = normalize_name(name)
    if key in index:
        return index[key].code()
    words = key.split()
    for side_at, rest in ((0, words[1:]), (-1, words[:-1])):
        side = _LATERALITY_WORDS.get(words[side_at]) if len(words) > 1 else None
        entry = index.get(" ".join(rest)) if side else None
        if entry is not None and entry.paired:
            return entry.code(side)
    return UNKNOWN


def resolve_codes(names: Iterable[str], given: Mapping[str, object] | None = None) -> dict[str, ClassCode | Unknown]:
    """Each class name's code: the recipe's (``given[name]``: a ClassCode or its dict form), else the
    shipped table's, else ``UNKNOWN``, with one warning naming every class left without a code."""
    given = dict(given or {})
    out: dict[str, ClassCode | Unknown] = {}
    for name in names:
        value = given.pop(name, None)
        out[name] = value if isinstance(value, ClassCode) else ClassCode.from_dict(value, name) if value else lookup(name)
    if given:
        raise SamtuneError(f"class codes given for {', '.join(map(repr, sorted(given)))}, which are not classes of "
                           f"this model ({', '.join(map(repr, out))}); fix the names.")  # fmt: skip
    uncoded = [name for name, code in out.items() if code is UNKNOWN]
    if uncoded:
        log.warning(uncoded_message(uncoded))
    return out


def uncoded_message(names: Iterable[str]) -> str:
    names = ", ".join(map(repr, names))
    return (f"no standard code known for class(es) {names}: they are written as 'Unknown' (SCT 261665006), "
            "not as a guessed organ; give each a code in the recipe's data.class_codes, e.g. {liver: {type: 'SCT:10200004'}}.")


# ---- codes as text: SCHEME:VALUE[:MEANING] -----------------------------------------------------


def format_code(code: Code, meaning: bool = True) -> str:
    return f"{code.scheme_designator}:{code.value}" + (f":{code.meaning}" if meaning else "")


@functools.cache
def _meanings(scheme: str) -> dict[str, Code]:
    """value -> Code for a scheme of pydicom's dictionary (SCT has ~8000 values; built once)."""
    collection = getattr(codes, scheme, None)
    if collection is None:
        return {}
    out: dict[str, Code] = {}
    for keyword in collection.dir():
        code = getattr(collection, keyword)
        out.setdefault(code.value, code)
    return out


def parse_code(text, *, where: str) -> Code:
    """``"SCT:10200004"`` (the meaning from pydicom's copy of the DICOM code tables) or
    ``"SCT:10200004:Liver"`` (any scheme, meaning as given) -> Code. SNOMED CT ids are checked
    for their form and Verhoeff check digit, so a mistyped digit is caught here."""
    if isinstance(text, Code):
        return text
    match = _CODE_TEXT.match(text) if isinstance(text, str) else None
    if match is None:
        raise SamtuneError(f"{where}: {text!r} is not a code; write SCHEME:VALUE or SCHEME:VALUE:MEANING, "
                           "e.g. 'SCT:10200004' or 'SCT:10200004:Liver'.")  # fmt: skip
    scheme, value, meaning = match.groups()
    scheme = {"sct": "SCT", "dcm": "DCM"}.get(scheme, scheme)
    if scheme == "SCT" and not is_valid_sctid(value):
        raise SamtuneError(f"{where}: {value!r} is not a SNOMED CT concept id (6-18 digits ending in a Verhoeff check "
                           "digit); check it for a typo against the DICOM standard (PS3.16) or a SNOMED CT browser.")  # fmt: skip
    known = _meanings(scheme).get(value)
    if not meaning and known is None:
        raise SamtuneError(f"{where}: {scheme}:{value} is not in the DICOM code tables shipped with pydicom, so its "
                           f"meaning is unknown; write it with its meaning, e.g. '{scheme}:{value}:Meaning'.")  # fmt: skip
    return Code(value, scheme, meaning or known.meaning)


def is_valid_sctid(value: str) -> bool:
    """A SNOMED CT concept id: 6 to 18 digits, no leading zero, partition digits 00 or 10 (a concept,
    short or long format) and a Verhoeff check digit (SNOMED CT Technical Implementation Guide, SCTID)."""
    if not (isinstance(value, str) and value.isdigit() and 6 <= len(value) <= 18 and value[0] != "0"):
        return False
    if value[-3:-1] not in ("00", "10"):
        return False
    check = 0
    for position, digit in enumerate(reversed(value)):
        check = _dihedral(check, _VERHOEFF_P[position % 8][int(digit)])
    return check == 0


def _dihedral(j: int, k: int) -> int:
    """Composition in the dihedral group D5 (0-4 rotations, 5-9 reflections): Verhoeff's product."""
    if j < 5:
        return (j + k) % 5 + (5 if k >= 5 else 0)
    return (j - k) % 5 + (5 if k < 5 else 0)


def _permutations() -> list[list[int]]:
    # Verhoeff's position permutations: powers of (1 5 7 6 2 8 3 0 9 4), period 8
    base = (1, 5, 7, 6, 2, 8, 3, 0, 9, 4)
    rows = [list(range(10))]
    for _ in range(7):
        rows.append([base[x] for x in rows[-1]])
    return rows


_VERHOEFF_P = _permutations()


# ---- colours ---------------------------------------------------------------------------------


def _check_color(color, where: str) -> tuple[int, int, int]:
    try:
        rgb = tuple(int(c) for c in color)
        ok = len(rgb) == 3 and all(0 <= c <= 255 and c == float(v) for c, v in zip(rgb, color))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SamtuneError(f"{where}: {color!r} is not a colour; write three integers 0-255, e.g. [221, 130, 101].")
    return rgb


def display_color(code: ClassCode | Unknown, value: int) -> tuple[int, int, int]:
    """The code's colour, else one picked by class value: hues a golden angle apart (137.5°), so
    neighbouring values differ clearly; mid saturation and value, as the anatomy colours are."""
    if isinstance(code, ClassCode) and code.color is not None:
        return code.color
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((value * 0.381966) % 1.0, 0.55, 0.85)
    return round(r * 255), round(g * 255), round(b * 255)


# ---- classes.json -----------------------------------------------------------------------------


def code_to_dict(code: ClassCode | Unknown) -> dict | None:
    return None if code is UNKNOWN else code.to_dict()  # classes.json: null for UNKNOWN


def code_from_dict(d: Mapping | None, class_name: str) -> ClassCode | Unknown:
    return UNKNOWN if d is None else ClassCode.from_dict(d, class_name)


# ---- colour files beside a NIfTI label map --------------------------------------------------------


def write_slicer_color_table(path, classes: Iterable[LabelClass], *, title: str = "samtune classes"):
    """A 3D Slicer colour table (``.ctbl``; Slicer's "Color table file format": ``#`` header lines,
    then ``value name R G B A`` per line, 0-255, spaces in names replaced by ``_``), background 0
    transparent. Load it in Slicer, then pick it as the label map's colour node."""
    from samtune.files import write_atomic

    rows = [(0, "Background", (0, 0, 0), 0)] + [(c.value, c.name, display_color(c.code, c.value), 255) for c in _checked(classes)]
    lines = [f"# Color table file {title}", f"# {len(rows)} values"]
    lines += [f"{value} {'_'.join(name.split())} {r} {g} {b} {a}" for value, name, (r, g, b), a in rows]
    return write_atomic(path, "\n".join(lines) + "\n")


def write_itksnap_labels(path, classes: Iterable[LabelClass]):
    """An ITK-SNAP label description file (``.txt``: ``#`` header, then ``IDX R G B A VIS MSH "LABEL"``
    per line; R G B 0-255, A opacity 0-1, VIS/MSH 0/1), background 0 as ITK-SNAP's "Clear Label"."""
    from samtune.files import write_atomic

    header = ["# ITK-SnAP Label Description File (written by samtune)", "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
              "# IDX: label value; -R- -G- -B-: colour 0..255; -A--: opacity 0..1; VIS, MSH: shown in 2D, 3D"]  # fmt: skip
    rows = [f'{0:5d} {0:5d} {0:4d} {0:4d} {0:8g} {0:2d} {0:2d}    "Clear Label"']
    for c in _checked(classes):
        r, g, b = display_color(c.code, c.value)
        name = c.name.replace('"', "'")  # ITK-SNAP ends the label at the next double quote
        rows.append(f'{c.value:5d} {r:5d} {g:4d} {b:4d} {1:8g} {1:2d} {1:2d}    "{name}"')
    return write_atomic(path, "\n".join(header + rows) + "\n")


def _checked(classes: Iterable[LabelClass]) -> list[LabelClass]:
    out = [LabelClass(*c) for c in classes]
    values = [c.value for c in out]
    bad = [v for v in values if not (isinstance(v, int) and 0 < v <= 65535)]
    if bad or len(set(values)) != len(values):
        problem = f"values {bad} are outside 1-65535" if bad else f"values repeat: {sorted(values)}"
        raise SamtuneError(f"label colour file: class {problem} (0 is the background); give each class its own value.")
    return sorted(out)
