"""`samtune predict` end to end through the command line, on untrained checkpoints written by hand
(the files and messages are the subject here; tests/unit/finetune/test_predict.py checks voxels)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from samtune.datasets.source import LabelSpace
from samtune.finetune import api  # noqa: F401  (imported at collection: its import of monai is not a test's time)
from samtune.finetune.cli import main

CT_SPACE = LabelSpace([1, 2, 3, 4], ["liver", "spleen", "kidney_right", "kidney_left"])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory, phantom_template, make_run) -> Path:
    return make_run(tmp_path_factory.mktemp("ct_run"), {"kind": "nifti", "root": str(phantom_template)}, CT_SPACE)


@pytest.fixture(scope="module")
def scans(tmp_path_factory, phantom_template) -> Path:
    """A folder of two 3-slice phantom scans (LPS, oblique) and a stray text file."""
    folder = tmp_path_factory.mktemp("scans")
    for source in sorted((phantom_template / "imagesTr").glob("*.nii.gz"))[:2]:
        nib.save(nib.load(source).slicer[:, :, 4:7], str(folder / source.name.replace("_0000", "")))
    (folder / "notes.txt").write_text("not a scan")
    return folder


@pytest.fixture(scope="module")
def promptable_run(tmp_path_factory, make_run) -> Path:
    folder = tmp_path_factory.mktemp("promptable")
    return make_run(folder, {"kind": "folder2d", "root": str(folder / "data")}, LabelSpace([1, 2], ["blob", "bar"]), task="promptable", tokens=0)


def test_predict_writes_exactly_the_documented_files(ct_run, scans, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ct_run), "--input", str(scans), "--out", str(out)]) == 0
    names = ("phantom_000", "phantom_001")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}{s}" for n in names for s in (".json", ".nii.gz", ".ctbl", "_itksnap.txt"))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3, lines
    for line, name in zip(lines, ("phantom_000", "phantom_001")):
        assert line.startswith(f"{name}: ") and line.endswith(f"-> {out / name}.nii.gz")
        voxels = json.loads((out / f"{name}.json").read_text())["voxels"]
        assert all(f"{n} {c:,} voxels" in line for n, c in voxels.items())
    assert lines[2] == f"2 inputs predicted; files in {out}"
    for name in ("phantom_000", "phantom_001"):
        label, scan = nib.load(out / f"{name}.nii.gz"), nib.load(scans / f"{name}.nii.gz")
        assert label.shape == scan.shape and np.array_equal(label.affine, scan.affine)
        # the viewers' class tables: every class by its label value and name, with the organ table's colour
        classes = json.loads((out / f"{name}.json").read_text())["classes"]
        slicer = [line.split() for line in (out / f"{name}.ctbl").read_text().splitlines() if not line.startswith("#")]
        assert {int(row[0]): row[1] for row in slicer if row[0] != "0"} == {int(v): n for v, n in classes.items()}
        itksnap = (out / f"{name}_itksnap.txt").read_text()
        assert all(f'"{n}"' in itksnap for n in classes.values())


def test_checkpoint_folder_glob_and_overrides(ct_run, scans, tmp_path, capsys):
    """A checkpoint folder instead of the run folder, a quoted glob, and key=value overrides after the options."""
    checkpoint = ct_run / "checkpoints" / "best"
    out = tmp_path / "out"
    argv = ["-q", "predict", "--checkpoint", str(checkpoint), "--input", str(scans / "*_001.nii.gz"), "--out", str(out), "automatic.threshold=0.999"]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["phantom_001.ctbl", "phantom_001.json", "phantom_001.nii.gz", "phantom_001_itksnap.txt"]
    strict = json.loads((out / "phantom_001.json").read_text())["voxels"]
    assert main(argv[:-1] + ["automatic.threshold=0.001"]) == 0
    loose = json.loads((out / "phantom_001.json").read_text())["voxels"]
    assert sum(strict.values()) < sum(loose.values())
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_prompted_images(promptable_run, tmp_path, capsys):
    inputs = tmp_path / "images"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a", (40, 60)), ("b", (50, 30))):
        Image.fromarray(rng.integers(0, 255, size + (3,), np.uint8)).save(inputs / f"{name}.png")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"coordinates": "pixel", "prompts": [
        {"class": "blob", "box": [5, 5, 25, 20], "input": "a"}, {"class": "bar", "points": [[10, 30]], "input": "b.png"},
    ]}))  # fmt: skip
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(promptable_run), "--input", str(inputs), "--out", str(out), "--prompts", str(prompts)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_overlay.png", "b.png", "b_overlay.png"]
    for name, size in (("a", (40, 60)), ("b", (50, 30))):
        assert np.asarray(Image.open(out / f"{name}.png")).shape == size
        assert np.asarray(Image.open(out / f"{name}_overlay.png")).shape == size + (3,)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:2]] == ["a", "b"] and lines[2].startswith("2 inputs predicted")


def test_help_explains_prompts_and_coordinates(capsys):
    with pytest.raises(SystemExit) as info:
        main(["predict", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in ("--prompts", "--checkpoint", "--input", "--out", "voxel", "RAS", "LPS", "pixel", "data.channel", "automatic.threshold"):
        assert word in text, word


def _bad_inputs(tmp: Path) -> dict:
    garbage = tmp / "garbage.nii.gz"
    garbage.write_bytes(b"\x00\x01 definitely not a scan " * 20)
    flat = tmp / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), str(flat))
    bad_json = tmp / "bad.json"
    bad_json.write_text('{"prompts": [')
    unknown_class = tmp / "unknown.json"
    unknown_class.write_text(json.dumps({"prompts": [{"class": "spleeen", "points": [[1, 1, 1]]}]}))
    return {"garbage": garbage, "flat": flat, "bad_json": bad_json, "unknown_class": unknown_class}


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("garbage", r"garbage\.nii\.gz: not a readable NIfTI file"),
        ("flat", r"flat\.nii\.gz: expected a 3D \(or 4D\) NIfTI scan"),
        ("bad_json", r"--prompts .*bad\.json: not valid JSON"),
        ("unknown_class", r"--prompts .*unknown\.json: prompts\[0\]: class 'spleeen' is not a class of this checkpoint; did you mean `spleen`\?"),
        ("glob", r"--input .*nothing_\*\.nii\.gz: the pattern matches no file"),
        ("promptable_without_prompts", r"--checkpoint .* was trained with task: promptable .*pass --prompts FILE"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(case, match, ct_run, promptable_run, scans, tmp_path, capsys):
    bad = _bad_inputs(tmp_path)
    checkpoint, inputs, extra = ct_run, [str(scans / "phantom_000.nii.gz")], []
    if case in ("garbage", "flat"):
        inputs = [str(scans / "phantom_000.nii.gz"), str(bad[case])]  # refused before the good scan is predicted
    elif case == "glob":
        inputs = [str(tmp_path / "nothing_*.nii.gz")]
    elif case == "promptable_without_prompts":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
        checkpoint, inputs = promptable_run, [str(tmp_path / "x.png")]
    else:
        extra = ["--prompts", str(bad[case])]
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"), "--input", *inputs, *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("samtune predict: error: ")]
    assert len(message) == 1 and re.search(match, message[0]), err
    assert not any((tmp_path / "out").glob("*.nii.gz"))


# ------------------------------------------------ DICOM ------------------------------------------------
def _dcm2niix() -> str | None:
    try:
        import dcm2niix
    except ImportError:
        return None
    binary = Path(dcm2niix.__file__).with_name("dcm2niix")
    return str(binary) if binary.is_file() else None


@pytest.fixture(scope="module")
def dicom_patient(tmp_path_factory, phantom_template) -> tuple[Path, Path]:
    """One phantom scan's HU as an oblique DICOM CT series (PACS-like: files without suffix, a stray
    file), and the NIfTI that the independent converter dcm2niix makes of it."""
    import subprocess

    from samtune.datasets.synthetic_dicom import rotation_orientation, write_series

    binary = _dcm2niix()
    if binary is None:
        pytest.skip("the dcm2niix reference converter is not installed (dev extra)")
    tmp = tmp_path_factory.mktemp("dicom")
    hu = np.asanyarray(nib.load(sorted((phantom_template / "imagesTr").glob("*.nii.gz"))[0]).dataobj)[:, :, 3:8]
    stored = (hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.int16).transpose(2, 1, 0)  # slices × rows × columns
    folder = tmp / "patient_7"
    write_series(folder / "CT", stored, spacing_mm=(3.0, 3.0, 5.0), orientation=rotation_orientation("x", 20.0), origin_lps=(-70.0, -60.0, 10.0))
    (folder / "DICOMDIR.txt").write_text("exported by a PACS")
    converted = tmp / "nifti"
    converted.mkdir()
    subprocess.run([binary, "-z", "y", "-b", "n", "-f", "patient_7", "-o", str(converted), str(folder / "CT")], check=True, capture_output=True)
    return folder, converted / "patient_7.nii.gz"


def test_a_dicom_series_predicts_as_its_nifti_conversion_and_writes_a_seg(ct_run, dicom_patient, tmp_path):
    """The same patient from its DICOM series and from dcm2niix's NIfTI: the same label on the same
    grid; the DICOM-SEG references the series and holds that label voxel for voxel."""
    import pydicom

    from samtune.datasets.dicom_seg import read_seg
    from samtune.datasets.dicom_series import choose_series, find_series, read_series

    folder, converted = dicom_patient
    loose = "automatic.threshold=0.05"  # an untrained checkpoint: a low threshold gives labels worth comparing
    assert main(["-q", "predict", "--checkpoint", str(ct_run), "--input", str(folder), "--out", str(tmp_path / "dicom"), loose]) == 0
    assert main(["-q", "predict", "--checkpoint", str(ct_run), "--input", str(converted), "--out", str(tmp_path / "nifti"), loose]) == 0
    written = sorted(p.name for p in (tmp_path / "dicom").iterdir())
    assert written == ["patient_7.ctbl", "patient_7.json", "patient_7.nii.gz", "patient_7.seg.dcm", "patient_7_itksnap.txt"]
    from_dicom = nib.as_closest_canonical(nib.load(tmp_path / "dicom" / "patient_7.nii.gz"))
    from_nifti = nib.as_closest_canonical(nib.load(tmp_path / "nifti" / "patient_7.nii.gz"))
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)
    label = np.asanyarray(from_dicom.dataobj)
    assert np.array_equal(label, np.asanyarray(from_nifti.dataobj)) and len(np.unique(label)) > 1

    volume = read_series(choose_series(find_series(folder)[0]))
    seg_label, classes = read_seg(tmp_path / "dicom" / "patient_7.seg.dcm", volume.sources)
    assert np.array_equal(seg_label, np.asanyarray(nib.load(tmp_path / "dicom" / "patient_7.nii.gz").dataobj))
    assert [c.name for c in classes] == CT_SPACE.names and classes[0].code.type.value == "10200004"  # liver
    seg = pydicom.dcmread(tmp_path / "dicom" / "patient_7.seg.dcm")
    assert seg.Modality == "SEG" and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == volume.info.uid
    meta = json.loads((tmp_path / "dicom" / "patient_7.json").read_text())
    assert meta["input"] == f"{folder} (series {volume.info.uid})"


def test_dicom_outputs_series_choice_and_refusals(ct_run, dicom_patient, tmp_path, capsys):
    from samtune.datasets.synthetic_dicom import write_series

    folder, converted = dicom_patient
    out = tmp_path / "seg_only"
    assert main(["-q", "predict", "--checkpoint", str(ct_run), "--input", str(folder), "--out", str(out), "--output-format", "dicom-seg"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["patient_7.json", "patient_7.seg.dcm"]
    labelmap = tmp_path / "labelmap"
    assert main(["-q", "predict", "--checkpoint", str(ct_run), "--input", str(folder), "--out", str(labelmap), "--output-format", "dicom-seg", "--seg-type", "LABELMAP"]) == 0
    import pydicom

    from samtune.datasets.dicom_seg import read_seg
    from samtune.datasets.dicom_series import choose_series, find_series, read_series

    assert pydicom.dcmread(labelmap / "patient_7.seg.dcm").SegmentationType == "LABELMAP"
    sources = read_series(choose_series(find_series(folder)[0])).sources
    assert np.array_equal(read_seg(labelmap / "patient_7.seg.dcm", sources)[0], read_seg(out / "patient_7.seg.dcm", sources)[0])
    # a second series in the folder: the choice is the user's, and the message lists both
    two = tmp_path / "two"
    import shutil

    shutil.copytree(folder, two)
    write_series(two / "MR", np.zeros((3, 8, 8), np.int16), modality="MR", rescale=(1.0, 0.0), description="T2 axial", series_number=5)
    assert main(["-q", "predict", "--checkpoint", str(ct_run), "--input", str(two), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "2 image series found" in err and "T2 axial" in err and "--series UID" in err and "Traceback" not in err
    ct_uid = next(line.split()[0] for line in err.splitlines() if "CT " in line and "'synthetic'" in line)
    assert main(["-q", "predict", "--checkpoint", str(ct_run), "--input", str(two), "--out", str(tmp_path / "o3"), "--series", ct_uid]) == 0
    # DICOM-SEG of a NIfTI input: refused, naming the input
    assert main(["-q", "predict", "--checkpoint", str(ct_run), "--input", str(converted), "--out", str(tmp_path / "o4"), "--output-format", "both"]) == 2
    assert f"{converted} is not a DICOM folder" in capsys.readouterr().err


def test_precision_option(ct_run, scans, tmp_path, capsys):
    from samtune.finetune.cli import PREDICT_PRECISIONS
    from samtune.finetune.predict.prediction import PRECISIONS

    assert PREDICT_PRECISIONS == PRECISIONS  # the parser's choices (no torch import there) are the predictor's
    out = tmp_path / "int8"
    assert main(["predict", "--checkpoint", str(ct_run), "--input", str(scans / "phantom_000.nii.gz"), "--out", str(out), "--precision", "int8"]) == 0
    assert nib.load(out / "phantom_000.nii.gz").shape == nib.load(scans / "phantom_000.nii.gz").shape
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["predict", "--checkpoint", str(ct_run), "--input", str(scans), "--out", str(tmp_path / "x"), "--precision", "fp16"])
    assert stop.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


def test_batch_size_and_threads_options(ct_run, scans, tmp_path, capsys, monkeypatch):
    import samtune.finetune.predict.prediction as P
    import torch

    sizes, real = [], P.predict_index_maps

    def counting(model, family, images, metas, threshold):
        sizes.append(len(images))
        return real(model, family, images, metas, threshold)

    monkeypatch.setattr(P, "predict_index_maps", counting)
    threads = torch.get_num_threads()
    try:
        args = ["predict", "--checkpoint", str(ct_run), "--input", str(scans / "phantom_000.nii.gz"), "--batch-size", "2", "--threads", "1"]
        assert main([*args, "--out", str(tmp_path / "a")]) == 0
        assert sizes == [2, 1] and torch.get_num_threads() == 1  # 3 slices
    finally:
        torch.set_num_threads(threads)
    assert main(["predict", "--checkpoint", str(ct_run), "--input", str(scans), "--out", str(tmp_path / "b"), "--batch-size", "0"]) == 2
    assert "--batch-size 0: give a whole number of at least 1" in capsys.readouterr().err
