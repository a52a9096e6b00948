"""datasets/dicom.py: a PACS-style tree of studies (image series + DICOM-SEG) trains through the
NIfTI machinery: cases per labelled series, classes matched by segment label across studies whose
segment numbers differ, labels equal to the SEGs slice for slice, codes returned, bad cases (SEG
without its series, two SEGs, overlapping segments, irregular series) raised or skipped, unlabelled
series noted, the conversion cache reused and redone after a change, one `samtune train` step."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from samtune import SamtuneError
from samtune.datasets.dicom import CONVERTED, open_dicom
from samtune.datasets.formats import open_images
from samtune.datasets.label_codes import LabelClass, lookup
from samtune.datasets.dicom_seg import write_seg
from samtune.datasets.synthetic_dicom import SeriesIds, write_series
from samtune.finetune.recipe import validate_recipe

SLICES, ROWS, COLUMNS = 8, 44, 40  # every axis a different length: a transposition changes the shape
# organ -> (centre (slice, row, column), radii): ellipsoids over several slices
ORGANS = {"liver": ((4, 14, 12), (3, 9, 8)), "spleen": ((4, 14, 30), (3, 7, 6)), "kidney_left": ((3, 32, 28), (2, 6, 5))}
# each patient: its SEG's classes as (value written, name); the same organ has other values (and,
# for P3, no samtune value notes: its values are the segment numbers) from study to study
PATIENTS = {
    "P1": [(1, "liver"), (2, "spleen"), (3, "kidney_left")],
    "P2": [(1, "spleen"), (2, "kidney_left"), (3, "liver")],
    "P3": [(5, "Liver"), (7, "kidney_left")],  # no spleen segment; "Liver" spelled otherwise
}
GLOBAL = {"kidney_left": 1, "liver": 2, "spleen": 3}  # alphabetical by normalised name


def _masks(seed: int) -> dict[str, np.ndarray]:
    """Slices × rows × columns masks per organ, shifted a little per patient."""
    k, r, c = np.ogrid[:SLICES, :ROWS, :COLUMNS]
    out = {}
    for n, (name, (centre, radii)) in enumerate(ORGANS.items()):
        dr, dc = (seed + n) % 3 - 1, (seed * 2 + n) % 3 - 1
        dist = ((k - centre[0]) / radii[0]) ** 2 + ((r - centre[1] - dr) / radii[1]) ** 2 + ((c - centre[2] - dc) / radii[2]) ** 2
        out[name] = dist <= 1
    return out


def write_patient(root: Path, pid: str, classes, *, notes=True, seg_folder="SEG", series_number=2, description="CT abdomen",
                  offsets=None, seed=None) -> dict:  # fmt: skip
    """One study: a CT series and (unless ``classes`` is None) its DICOM-SEG; returns what was written."""
    seed = sum(map(ord, pid)) if seed is None else seed
    masks = _masks(seed)
    rng = np.random.default_rng(seed)
    hu = rng.normal(0, 8, (SLICES, ROWS, COLUMNS))
    for n, name in enumerate(ORGANS):
        hu[masks[name]] += 60 + 30 * n
    ids = SeriesIds(seed=pid, patient_id=pid)
    paths = write_series(root / pid / f"CT{series_number}", np.round(hu + 1024).astype(np.int16), ids=ids,
                         description=description, series_number=series_number, spacing_mm=(2.0, 2.0, 4.0),
                         slice_offsets_mm=offsets)  # fmt: skip
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    out = {"series": paths, "headers": headers, "masks": masks, "uid": str(headers[0].SeriesInstanceUID)}
    if classes is None:
        return out
    label = np.zeros((SLICES, ROWS, COLUMNS), np.uint8)
    for value, name in classes:
        label[masks[ORGANS_KEY[name]]] = value
    seg = write_seg(label.transpose(2, 1, 0), headers, [LabelClass(v, n, lookup(n)) for v, n in classes],
                    root / pid / seg_folder / "seg.dcm", algorithm_version="1", checkpoint="manual")  # fmt: skip
    if not notes:  # a SEG from another tool: no "samtune class value" notes
        ds = pydicom.dcmread(seg)
        for item in ds.SegmentSequence:
            del item.SegmentDescription
        ds.save_as(seg)
    out["seg"] = seg
    return out


ORGANS_KEY = {"liver": "liver", "Liver": "liver", "spleen": "spleen", "kidney_left": "kidney_left"}


def _section(root: Path, **keys):
    return validate_recipe({"data": {"kind": "dicom", "root": str(root), "val_fraction": 0.34, **keys}}).data


def _open(root: Path, on_bad_case="error", **keys):
    return open_dicom(_section(root, on_bad_case=on_bad_case, **keys), seed=0, on_bad_case=on_bad_case, progress=False)


@pytest.fixture(scope="module")
def tree_template(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("dicom") / "export"
    written = {pid: write_patient(root, pid, classes, notes=pid != "P3") for pid, classes in PATIENTS.items()}
    return root, written


@pytest.fixture
def tree(tree_template, tmp_path) -> tuple[Path, dict]:
    """A private copy of the 3-patient tree that a test may change (mtimes kept: copy2)."""
    root = tmp_path / "export"
    shutil.copytree(tree_template[0], root)
    return root, tree_template[1]


def _expected(masks: dict[str, np.ndarray], names) -> np.ndarray:
    """The label in global values, laid out as the source serves it (Z×H×W display slices)."""
    label = np.zeros((SLICES, ROWS, COLUMNS), np.uint8)
    for name in names:
        label[masks[ORGANS_KEY[name]]] = GLOBAL[ORGANS_KEY[name]]
    # axial LPS series: slice k is z, rows run anterior -> posterior as displayed; the column index
    # runs to patient left (+L), which canonical RAS reverses (columns along +x = right)
    return label[:, :, ::-1]


def test_a_tree_of_studies_trains_ready(tree, caplog):
    root, written = tree
    with caplog.at_level(logging.WARNING):
        split = _open(root)
    assert split.layout == "dicom"
    cases = {c.name: c for src in (split.train, split.val) for c in src.cases}
    assert sorted(cases) == ["P1", "P2", "P3"] and len(split.val.cases) == 1
    assert split.train.class_names == split.val.class_names == {1: "kidney_left", 2: "liver", 3: "spleen"}
    for pid, classes in PATIENTS.items():
        src = split.train if any(c.name == pid for c in split.train.cases) else split.val
        label, spacing = src.case_volume(pid)
        assert np.array_equal(label, _expected(written[pid]["masks"], [n for _, n in classes])), pid
        assert spacing == pytest.approx((4.0, 2.0, 2.0))
    # the codes of the SEG segments, by class name
    for name in ("liver", "kidney_left"):  # colours pass through CIELab: compare the codes
        assert (split.codes[name].type, split.codes[name].modifier) == (lookup(name).type, lookup(name).modifier)
    assert set(split.codes) == {"kidney_left", "liver", "spleen"}
    # spleen is missing from P3's SEG: legal, a warning naming the study
    assert any("'spleen' is segmented in 2 of 3 studies" in w and "P3" in w for w in split.warnings)
    assert "'spleen' is segmented in 2 of 3" in caplog.text
    assert split.skipped == [] and (split.cache_dir / CONVERTED).is_dir()
    assert not any(CONVERTED in n or ".samtune_cache" in n for n in split.notes)  # the cache inside root is not data


def test_served_slices_and_the_converted_nifti(tree):
    import nibabel as nib

    root, written = tree
    split = _open(root)
    src = split.train
    case = src.cases[0]
    image, label = src.load(next(i for i in range(len(src)) if src.slice_position(i)[0] == case.name))
    assert image.dtype == np.uint8 and image.shape == label.shape == (ROWS, COLUMNS)
    # the converted pair on disk: the series' grid (columns, rows, slices), values in the global space
    nii = sorted((split.cache_dir / CONVERTED).glob(f"{case.name}-*.nii"))
    assert [p.name.endswith("_0000.nii") for p in nii] == [False, True]
    lab = np.asarray(nib.load(nii[0]).dataobj)
    assert lab.shape == (COLUMNS, ROWS, SLICES) and lab.dtype == np.uint8
    assert set(np.unique(lab)) == {0} | {GLOBAL[ORGANS_KEY[n]] for _, n in PATIENTS[case.name]}


def test_several_labelled_series_of_a_patient(tree):
    root, _ = tree
    write_patient(root, "P1", [(1, "liver")], seg_folder="SEG5", series_number=5, description="CT late")
    split = _open(root, val_fraction=0.5)
    names = sorted(c.name for src in (split.train, split.val) for c in src.cases)
    assert names == ["P1_2", "P1_5", "P2", "P3"]
    sides = [{c.name[:2] for c in src.cases} for src in (split.train, split.val)]
    assert not sides[0] & sides[1]  # one patient, one side
    only = _open(root, series="ct abdomen")  # data.series by SeriesDescription (any case): one series a patient
    assert sorted(c.name for src in (only.train, only.val) for c in src.cases) == ["P1", "P2", "P3"]
    assert any("'CT late'" in n and "left out (data.series='ct abdomen')" in n for n in only.notes)
    with pytest.raises(SamtuneError, match="data.series='CT arterial'.*no labelled series"):
        _open(root, series="CT arterial")


def test_unlabelled_series_are_noted(tree):
    root, written = tree
    extra = write_patient(root, "P4", None)
    split = _open(root)
    assert any(extra["uid"] in n and "no DICOM-SEG references it" in n for n in split.notes)
    assert "P4" not in {c.name for src in (split.train, split.val) for c in src.cases}


def _orphan(root: Path, tmp_path: Path) -> Path:
    away = tmp_path / "elsewhere"
    info = write_patient(away, "P9", [(1, "liver")])
    return Path(shutil.move(str(info["seg"]), root / "stray_seg.dcm"))


def _second_seg(root: Path, tmp_path: Path) -> Path:
    shutil.copy2(root / "P2" / "SEG" / "seg.dcm", root / "P2" / "seg_copy.dcm")
    return root / "P2" / "CT2"  # the series' folder: the problem is the series' two SEGs


def _overlap(root: Path, tmp_path: Path) -> Path:
    info = write_patient(root, "P5", None)
    stacked = np.zeros((SLICES, ROWS, COLUMNS, 2), np.uint8)
    stacked[3, 10:20, 10:20, 0] = 1
    stacked[3, 15:25, 15:25, 1] = 1  # 25 voxels shared
    descriptions = [hd.seg.SegmentDescription(n, name, codes.SCT.AnatomicalStructure, getattr(codes.SCT, kw), "MANUAL")
                    for n, name, kw in [(1, "liver", "Liver"), (2, "gallbladder", "Gallbladder")]]  # fmt: skip
    seg = hd.seg.Segmentation(info["headers"], stacked, "BINARY", descriptions, hd.UID(), 2, hd.UID(), 1, "tool", "m", "1", "1")
    (root / "P5" / "SEG").mkdir()
    seg.save_as(root / "P5" / "SEG" / "seg.dcm")
    return root / "P5" / "SEG" / "seg.dcm"


def _gappy(root: Path, tmp_path: Path) -> Path:
    offsets = [0, 4, 8, 12, 20, 24, 28, 32]  # a slice missing between 12 and 20 mm
    info = write_patient(root, "P6", [(1, "liver"), (2, "spleen")], offsets=offsets)
    return info["series"][0].parent


BAD = {  # builder, case named, message fragment
    "orphan": (_orphan, "P9", "references series .* which is not under"),
    "two_segs": (_second_seg, "P2", "2 DICOM-SEGs reference series"),
    "overlap": (_overlap, "P5", r"segments overlap.*'liver' \(segment 1\) and 'gallbladder' \(segment 2\): 25 voxels"),
    "irregular": (_gappy, "P6", "do not form a regular grid: missing slices"),
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_cases_raise_or_are_skipped(tree, tmp_path, kind):
    root, _ = tree
    build, case, fragment = BAD[kind]
    file = build(root, tmp_path)
    with pytest.raises(SamtuneError, match=fragment) as err:
        _open(root)
    assert f"case {case}:" in str(err.value)
    split = _open(root, "skip")
    assert [(s["case"], s["file"]) for s in split.skipped] == [(case, str(file))]
    names = {c.name for src in (split.train, split.val) for c in src.cases}
    assert names == {"P1", "P2", "P3"} - ({"P2"} if kind == "two_segs" else set())


def test_resample_takes_an_irregular_series(tree, tmp_path):
    root, _ = tree
    _gappy(root, tmp_path)
    split = _open(root, resample=True)
    src = next(s for s in (split.train, split.val) if any(c.name == "P6" for c in s.cases))
    label, spacing = src.case_volume("P6")
    assert label.shape[0] == 9 and spacing[0] == pytest.approx(4.0)  # 0..32 mm every 4 mm: the gap filled
    assert {2, 3} <= set(np.unique(label))  # liver and spleen, on the regular grid


def test_the_conversion_is_reused_and_redone_after_a_change(tree, caplog):
    root, written = tree
    with caplog.at_level(logging.INFO, logger="samtune.datasets.dicom"):
        _open(root)
        assert "(3 converted to NIfTI now, 0 reused" in caplog.text
        caplog.clear()
        split = _open(root)
        assert "(0 converted to NIfTI now, 3 reused" in caplog.text
        caplog.clear()
        # the annotator re-exports P1's segmentation (liver only); its series is untouched
        liver = written["P1"]["masks"]["liver"].transpose(2, 1, 0).astype(np.uint8)
        write_seg(liver, written["P1"]["headers"], [LabelClass(1, "liver", lookup("liver"))], root / "P1" / "SEG" / "seg.dcm",
                  algorithm_version="1", checkpoint="manual")  # fmt: skip
        split = _open(root)
        assert "(1 converted to NIfTI now, 2 reused" in caplog.text
    src = split.train if any(c.name == "P1" for c in split.train.cases) else split.val
    assert set(np.unique(src.case_volume("P1")[0])) == {0, GLOBAL["liver"]}


def test_prediction_opens_nifti_scans(tree):
    root, _ = tree
    split = _open(root)
    scans = sorted((split.cache_dir / CONVERTED).glob("*_0000.nii"))
    source = open_images(_section(root), [scans[0]])
    assert not source.has_labels and len(source) == SLICES and source.class_names == {}
    assert source.cases[0].name == scans[0].name[: -len("_0000.nii")]


def test_no_labelled_series_is_an_error(tmp_path):
    write_patient(tmp_path / "export", "P1", None)
    with pytest.raises(SamtuneError, match="no image series with a DICOM-SEG"):
        _open(tmp_path / "export")


def test_one_training_step(tree, tmp_path):
    from samtune.finetune.cli import main

    root, _ = tree
    recipe = Path(__file__).resolve().parents[3] / "recipes" / "medical" / "dicom_demo.yaml"
    overrides = [
        "model.name=tiny", "model.checkpoint=null", "model.image_size=64", f"data.root={root}", "data.generate_demo=false",
        "data.val_fraction=0.34", "train.steps=2", "train.eval_every=2", "train.batch_size=2", "train.num_workers=0",
        "train.device=cpu", "train.precision=fp32", "eval.max_samples=4", "eval.batch_size=4", f"output.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    assert main(["-q", "train", str(recipe), *overrides]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 2 and {"prompted", "semantic"} <= set(metrics)
    classes = json.loads((tmp_path / "run" / "checkpoints" / "last" / "classes.json").read_text())
    assert classes["label_space"]["names"] == ["kidney_left", "liver", "spleen"]


def test_the_dicom_demo_serves_the_slices_of_the_nifti_phantom(tmp_path):
    """The demo export holds the NIfTI phantom's patients: through DICOM, the same slices and labels."""
    from samtune.datasets.dicom_demo import generate_dicom_phantom
    from samtune.datasets.nifti import open_nifti
    from samtune.datasets.synthetic import generate_ct_phantom

    args = dict(n_cases=3, shape=(48, 48, 12))
    dicom = _open(generate_dicom_phantom(tmp_path / "dicom", **args))
    nifti_root = generate_ct_phantom(tmp_path / "nifti", **args)
    nifti_section = validate_recipe({"data": {"kind": "nifti", "root": str(nifti_root), "val_fraction": 0.34}}).data
    nifti = open_nifti(nifti_section, seed=0, on_bad_case="error", progress=False)
    assert sorted(dicom.train.class_names.values()) == sorted(nifti.train.class_names.values())
    by_name = {v: k for k, v in nifti.train.class_names.items()}
    lut = np.zeros(256, np.uint8)
    for value, name in dicom.train.class_names.items():
        lut[value] = by_name[name]
    cases = {c.name: c for src in (nifti.train, nifti.val) for c in src.cases}
    for src in (dicom.train, dicom.val):
        for case in src.cases:
            twin = cases[case.name.lower()]  # PHANTOM_000 <-> phantom_000
            assert np.array_equal(lut[case.label], twin.label) and np.array_equal(case.image, twin.image), case.name
    assert str(dicom.codes["kidney_left"]) == "Kidney (Left) [SCT:64033007]"
