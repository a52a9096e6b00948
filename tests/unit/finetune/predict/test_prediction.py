"""finetune/predict/prediction.py: ``samtune predict`` on untrained checkpoints written by hand (no training).

An untrained model predicts deterministic garbage, which is enough for files, headers and
orientation invariance. Where exact voxels matter, an "oracle" replaces the network: automatic
maps threshold the display image the model receives, prompted masks are the prompt's box (within
bright pixels), so every voxel of the written label can be checked against the scan itself.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import weakref
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import samtune.finetune.predict.prediction as P
from nibabel.orientations import apply_orientation, inv_ornt_aff
from PIL import Image
from samtune import SamtuneError
from samtune.constants import PIXEL_MEAN, PIXEL_STD
from samtune.datasets.cityscapes import TRAIN_CLASSES, cityscapes_label_space
from samtune.datasets.formats import open_images
from samtune.datasets.source import LabelSpace
from samtune.finetune import api
from samtune.finetune.predict.prompt_file import Prompt, display_prompt
from samtune.finetune.recipe import load_recipe

CT_SPACE = LabelSpace([1, 2, 3, 4], ["liver", "spleen", "kidney_right", "kidney_left"])
CT_CLASSES = {"1": "liver", "2": "spleen", "3": "kidney_right", "4": "kidney_left"}
SIDECAR_KEYS = {"input", "output", "checkpoint", "mode", "classes", "background", "voxels", "ml"}
LABEL_IDS = {label_id for _, label_id in TRAIN_CLASSES}

# the oracle's scans: four HU levels, windowed (abdomen, -160..240 HU) to 6, 102, 166, 249
LEVELS = np.array([-150, 0, 100, 230], np.int16)
THRESHOLDS = [50, 130, 210]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def with_overrides(loaded: api.LoadedModel, *overrides: str) -> api.LoadedModel:
    """The same loaded model under its recipe with overrides (as the CLI's key=value arguments)."""
    return dataclasses.replace(loaded, recipe=load_recipe(loaded.checkpoint / "recipe.yaml", list(overrides)))


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory, phantom_template, make_run) -> Path:
    return make_run(tmp_path_factory.mktemp("ct_run"), {"kind": "nifti", "root": str(phantom_template)}, CT_SPACE)


@pytest.fixture(scope="module")
def ct_model(ct_run) -> api.LoadedModel:
    return api.load_model(ct_run)


@pytest.fixture(scope="module")
def cs_model(tmp_path_factory, cs_template, make_run) -> api.LoadedModel:
    space = cityscapes_label_space(list(range(len(TRAIN_CLASSES))))
    return api.load_model(make_run(tmp_path_factory.mktemp("cs_run"), {"kind": "cityscapes", "root": str(cs_template)}, space))


@pytest.fixture(scope="module")
def promptable_model(tmp_path_factory, make_run) -> api.LoadedModel:
    """A task: promptable checkpoint (classes.json with tokens 0): no automatic mode."""
    folder = tmp_path_factory.mktemp("prompt_run")
    run = make_run(folder, {"kind": "folder2d", "root": str(folder / "data")}, LabelSpace([1, 2], ["blob", "bar"]), task="promptable", tokens=0)
    return api.load_model(run)


@pytest.fixture(scope="module")
def nibabel_data() -> Path:
    folder = Path(nib.__file__).parent / "tests" / "data"
    if not (folder / "anatomical.nii").is_file() or not (folder / "example_nifti2.nii.gz").is_file():
        pytest.skip("nibabel's test data (tests/data/anatomical.nii, example_nifti2.nii.gz) is not installed with this nibabel")
    return folder


@pytest.fixture(scope="module")
def small_scan(lps_scan) -> Path:
    """The LPS phantom cut to 3 slices (real-model tests that predict it more than once)."""
    path = lps_scan.with_name("small.nii.gz")
    nib.save(nib.load(lps_scan).slicer[:, :, 2:5], str(path))
    return path


@pytest.fixture(scope="module")
def lps_scan(tmp_path_factory, phantom_template) -> Path:
    """A phantom CT cut to 6 slices: LPS storage, oblique (rotated about z), non-zero origin."""
    source = min((phantom_template / "imagesTr").glob("*.nii.gz"))
    path = tmp_path_factory.mktemp("lps") / "lps_case.nii.gz"
    nib.save(nib.load(source).slicer[:, :, 3:9], str(path))
    assert nib.aff2axcodes(nib.load(path).affine) == ("L", "P", "S")
    return path


def write_scan(path: Path, data: np.ndarray, affine: np.ndarray, *, nifti2: bool = False, endianness: str = "<", qform: np.ndarray | None = None) -> Path:
    klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = klass(data.astype(data.dtype.newbyteorder(endianness)), None, klass.header_class(endianness=endianness))
    img.set_sform(affine, code=2)
    img.set_qform(affine if qform is None else qform, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    return path


def _affine(columns, offset=(12.5, -30.0, 7.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = columns, offset
    return affine


def _rot_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


LPS_OBLIQUE = _affine(_rot_z(12) @ np.diag([-2.0, -2.0, 3.0]))


def assert_on_the_scans_grid(out: Path, scan: Path) -> np.ndarray:
    """The label file's header is the scan's (shape, affine, sform/qform and codes); returns its voxels."""
    o, r = nib.load(out), nib.load(scan)
    assert type(o) is (nib.Nifti2Image if isinstance(r, nib.Nifti2Image) else nib.Nifti1Image)
    assert o.shape == r.shape[:3] and len(o.shape) == 3
    np.testing.assert_array_equal(o.affine, r.affine)
    for got, want in ((o.header.get_sform(coded=True), r.header.get_sform(coded=True)), (o.header.get_qform(coded=True), r.header.get_qform(coded=True))):
        np.testing.assert_array_equal(got[0], want[0])
        assert int(got[1]) == int(want[1])
    assert o.get_data_dtype().kind in "iu" and o.header.endianness == "<"
    data = np.asarray(o.dataobj)
    assert data.dtype.kind in "iu" and data.shape == r.shape[:3]
    return data


def check_sidecar(sidecar: Path, label: np.ndarray, scan: Path, mode: str = "automatic") -> dict:
    meta = json.loads(sidecar.read_text())
    assert set(meta) == SIDECAR_KEYS
    assert meta["classes"] == CT_CLASSES and meta["background"] == 0 and meta["mode"] == mode
    counts = np.bincount(label.ravel(), minlength=5)
    assert meta["voxels"] == {name: int(counts[int(v)]) for v, name in CT_CLASSES.items() if counts[int(v)]}
    ml = abs(np.linalg.det(nib.load(scan).affine[:3, :3])) / 1000
    assert meta["ml"] == {name: pytest.approx(n * ml, abs=1e-3) for name, n in meta["voxels"].items()}
    assert Path(meta["input"]) == scan and Path(meta["output"]) == sidecar.with_name(sidecar.name[: -len(".json")] + ".nii.gz")
    return meta


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def volume_files(name: str) -> list[str]:
    """What predict writes per scan: the label, its summary, the Slicer and ITK-SNAP class tables."""
    return sorted(f"{name}{suffix}" for suffix in (".json", ".nii.gz", ".ctbl", "_itksnap.txt"))


def oracle_maps(model, family, images, metas, threshold):
    """The automatic "model": class by the threshold each display pixel passes (levels 1..3 ->
    classes 1..3, level 0 -> background); the scans fill the 64 px input, so nothing is resized."""
    maps = []
    for image, meta in zip(images, metas):
        h, w = meta["original_size"]
        assert tuple(meta["resized_size"]) == (h, w), "oracle scans must be 64 px on their longest in-plane side"
        grey = image[0, :h, :w].cpu().numpy() * PIXEL_STD[0] + PIXEL_MEAN[0]
        maps.append(np.array([len(CT_SPACE.ids), 0, 1, 2], np.uint8)[np.digitize(grey, THRESHOLDS)])
    return maps


SLICE_CLASSES = np.array([1, 2, 3, 4, 0])  # slice_oracle: the value written on display slice z is SLICE_CLASSES[z % 5]


def slice_oracle(model, family, images, metas, threshold):
    """An automatic "model" that labels all of display slice z with class z % 5 (4: background),
    at any image size: the written label must change along the scan's axial axis only."""
    return [np.full(tuple(m["original_size"]), m["index"] % 5, np.uint8) for m in metas]


def box_oracle(self, image, box, points, labels):
    """The prompted "model": the box's pixels that are bright (windowed above 128)."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in np.round(box)) if box is not None else (0, 0, 0, 0)
    mask = np.zeros((h, w), bool)
    mask[max(y0, 0) : y1, max(x0, 0) : x1] = True
    return mask & (image > 128)


def prompts_file(path: Path, prompts: list[dict], coordinates: str | None = "voxel", **extra) -> Path:
    body = {"prompts": prompts, **extra}
    if coordinates is not None:
        body["coordinates"] = coordinates
    path.write_text(json.dumps(body))
    return path


# ------------------------------------------------------------------ automatic, NIfTI: files and headers


@pytest.mark.parametrize("which", ["anatomical_big_endian", "nifti2_4d_channel_1", "lps_oblique"])
def test_automatic_nifti_label_is_written_on_the_scans_grid(which, ct_model, nibabel_data, lps_scan, tmp_path, capsys, monkeypatch):
    """Real model on a NIfTI-2 4D scan and a phantom; anatomical.nii (25 slices, 2.5 s of model
    time here) with the slice oracle."""
    loaded = ct_model
    if which == "anatomical_big_endian":
        scan = nibabel_data / "anatomical.nii"
        assert nib.load(scan).header.endianness == ">"
        monkeypatch.setattr(P, "predict_index_maps", slice_oracle)
        monkeypatch.setattr(P, "uniform_key", lambda image, meta: None)  # the oracle labels by slice index: blank slices differ too
    elif which == "nifti2_4d_channel_1":
        scan = nibabel_data / "example_nifti2.nii.gz"
        assert isinstance(nib.load(scan), nib.Nifti2Image) and len(nib.load(scan).shape) == 4
        loaded = with_overrides(ct_model, "data.channel=1")
    else:
        scan = lps_scan
    name = scan.name.split(".")[0]
    out = tmp_path / "out"
    records = P.predict(loaded, [str(scan)], out)
    assert files(out) == volume_files(name)
    label = assert_on_the_scans_grid(out / f"{name}.nii.gz", scan)
    assert set(np.unique(label).tolist()) <= {0, 1, 2, 3, 4}
    meta = check_sidecar(out / f"{name}.json", label, scan)
    if which == "anatomical_big_endian":  # LAS: the canonical axial axis is k, unflipped
        np.testing.assert_array_equal(label, np.broadcast_to(SLICE_CLASSES[np.arange(label.shape[2]) % 5], label.shape))
    else:
        assert len(meta["voxels"]) >= 2  # the untrained model predicts something
    assert [r["output"] for r in records] == [str(out / f"{name}.nii.gz")] and records[0]["voxels"] == meta["voxels"]
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f"{name}: ") and printed[0].endswith(f"-> {out / name}.nii.gz") and printed[1].startswith("1 input predicted")
    if meta["voxels"]:
        first = next(iter(meta["voxels"]))
        assert f"{first} {meta['voxels'][first]:,} voxels" in printed[0]


ORACLE_SCANS = {  # name: (file shape, affine, options); the canonical in-plane size is 64 × 40
    "ras": ((64, 40, 5), _affine(np.diag([2.0, 2.0, 2.5])), {}),
    "lps_oblique_qform_differs": ((64, 40, 5), LPS_OBLIQUE, {"qform": _affine(_rot_z(-5) @ np.diag([-2.0, -2.0, 3.0]), (1, 2, 3))}),
    "permuted_big_endian": ((5, 64, 40), _affine(np.array([[0, -2.0, 0], [0, 0, -2.0], [2.5, 0, 0]])), {"endianness": ">", "suffix": ".nii"}),
    "nifti2_4d": ((64, 40, 5), _affine(np.array([[-2.0, 0, 0], [0, 1.97, -0.36], [0, 0.32, 2.17]])), {"nifti2": True, "channels": 3, "suffix": ".nii"}),
}


def write_oracle_scan(folder: Path, which: str, data: np.ndarray | None = None, seed: int = 0) -> tuple[Path, np.ndarray]:
    shape, affine, options = ORACLE_SCANS[which]
    options = dict(options)
    suffix, channels = options.pop("suffix", ".nii.gz"), options.pop("channels", 0)
    levels = np.random.default_rng(seed).choice(LEVELS, shape) if data is None else data
    stored = levels
    if channels:  # channel 1 holds the scan, the others noise
        stored = np.random.default_rng(seed + 1).integers(-1000, 1000, shape + (channels,)).astype(np.int16)
        stored[..., 1] = levels
    return write_scan(folder / f"{which}{suffix}", stored, affine, **options), levels


@pytest.mark.parametrize("which", list(ORACLE_SCANS))
def test_every_voxel_gets_its_own_class_in_any_orientation(which, ct_model, tmp_path, monkeypatch):
    """With the threshold oracle, the label of voxel (i, j, k) of the file must be the class of
    the scan's own voxel (i, j, k): any flip, permutation or channel mix-up shows."""
    monkeypatch.setattr(P, "predict_index_maps", oracle_maps)
    scan, levels = write_oracle_scan(tmp_path, which)
    loaded = with_overrides(ct_model, "data.channel=1") if which == "nifti2_4d" else ct_model
    P.predict(loaded, [str(scan)], tmp_path / "out", quiet=True)
    label = assert_on_the_scans_grid(tmp_path / "out" / f"{which}.nii.gz", scan)
    np.testing.assert_array_equal(label, np.searchsorted(LEVELS, levels))
    check_sidecar(tmp_path / "out" / f"{which}.json", label, scan)


def test_a_4d_scan_uses_data_channel(ct_model, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "predict_index_maps", oracle_maps)
    scan, levels = write_oracle_scan(tmp_path, "nifti2_4d")
    P.predict(ct_model, [str(scan)], tmp_path / "out", quiet=True)  # channel 0: the noise
    assert not np.array_equal(np.asarray(nib.load(tmp_path / "out" / "nifti2_4d.nii.gz").dataobj), np.searchsorted(LEVELS, levels))
    with pytest.raises(SamtuneError, match=r"data.channel=3 but this 4D image has 3 channels"):
        P.predict(with_overrides(ct_model, "data.channel=3"), [str(scan)], tmp_path / "out3", quiet=True)


# ------------------------------------------------------------------ orientation invariance, real model

VOXEL_ORDERS = [[[1, -1], [0, 1], [2, -1]], [[2, 1], [0, -1], [1, -1]]]  # i<->j swapped + flips; k first


def test_same_scan_in_another_voxel_order_gives_the_same_label_in_world_space(ct_model, small_scan, tmp_path):
    img = nib.load(small_scan)
    data = np.asarray(img.dataobj)
    scans = [small_scan]
    for n, ornt in enumerate(VOXEL_ORDERS):
        ornt = np.array(ornt, float)
        moved = nib.Nifti1Image(apply_orientation(data, ornt), img.affine @ inv_ornt_aff(ornt, data.shape))
        nib.save(moved, str(tmp_path / f"order{n}.nii.gz"))
        scans.append(tmp_path / f"order{n}.nii.gz")
    out = tmp_path / "out"
    P.predict(ct_model, [str(s) for s in scans], out, quiet=True)
    canonical = [nib.as_closest_canonical(nib.load(out / f"{s.name[: -len('.nii.gz')]}.nii.gz")) for s in scans]
    reference = np.asarray(canonical[0].dataobj)
    # the check means something: several classes, and a label that any flip or in-plane transposition changes
    assert len(np.unique(reference)) >= 2, "the untrained model predicts one class everywhere: the comparison is void"
    for axis in range(3):
        assert not np.array_equal(reference, np.flip(reference, axis)), f"label symmetric along axis {axis}"
    assert not np.array_equal(reference, reference.transpose(1, 0, 2))
    for other, scan in zip(canonical[1:], scans[1:]):
        stored = np.asarray(nib.load(scan).dataobj)
        assert stored.shape != data.shape or not np.array_equal(stored, data)  # really stored differently
        np.testing.assert_allclose(other.affine, canonical[0].affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(other.dataobj), reference)


def test_threshold_override_changes_the_fusion(ct_model, small_scan, tmp_path):
    low = P.predict(with_overrides(ct_model, "automatic.threshold=0.001"), [str(small_scan)], tmp_path / "low", quiet=True)[0]
    high = P.predict(with_overrides(ct_model, "automatic.threshold=0.999"), [str(small_scan)], tmp_path / "high", quiet=True)[0]
    total = int(np.prod(nib.load(small_scan).shape))
    assert sum(low["voxels"].values()) > 0.9 * total  # nearly every voxel reaches 0.1%
    assert sum(high["voxels"].values()) < sum(low["voxels"].values())


# ------------------------------------------------------------------ prompted volumes


def _block_scan(folder: Path) -> tuple[Path, np.ndarray]:
    """LPS oblique 40×32×8 scan, dark, with a bright block on slices k 1..3 and again on 5..6."""
    data = np.full((40, 32, 8), LEVELS[0], np.int16)
    data[10:31, 8:26, 1:4] = LEVELS[3]
    data[10:31, 8:26, 5:7] = LEVELS[3]
    return write_scan(folder / "block.nii.gz", data, LPS_OBLIQUE), data


def test_prompted_box_in_voxel_ras_and_lps_is_the_same_box_and_propagation_stops(ct_model, tmp_path, monkeypatch):
    monkeypatch.setattr(P.Predictor, "prompted_mask", box_oracle)
    scan, data = _block_scan(tmp_path)
    corners = np.array([[14, 12, 2], [20, 18, 2]], float)  # voxels 14..20 × 12..18 on slice 2, inside the block
    ras = (LPS_OBLIQUE[:3, :3] @ corners.T).T + LPS_OBLIQUE[:3, 3]
    labels = {}
    for system, box in (("voxel", corners), ("RAS", ras), ("LPS", ras * [-1, -1, 1])):
        prompts = prompts_file(tmp_path / f"{system}.json", [{"class": "spleen", "box": box.tolist()}], system)
        P.predict(ct_model, [str(scan)], tmp_path / system, prompts, quiet=True)
        assert files(tmp_path / system) == volume_files("block")
        labels[system] = assert_on_the_scans_grid(tmp_path / system / "block.nii.gz", scan)
        check_sidecar(tmp_path / system / "block.json", labels[system], scan, mode="prompted")
    label = labels["voxel"]
    np.testing.assert_array_equal(labels["RAS"], label)
    np.testing.assert_array_equal(labels["LPS"], label)
    expected = np.zeros(data.shape, bool)
    expected[14:21, 12:19, 2] = True  # the prompted slice: exactly the box's voxels
    np.testing.assert_array_equal(label[..., 2] == 2, expected[..., 2])
    assert set(np.unique(label).tolist()) == {0, 2}
    assert sorted(set(np.nonzero(label)[2].tolist())) == [1, 2, 3]  # followed while it lasts, not past slice 4
    bright = data == LEVELS[3]
    assert not (label.astype(bool) & ~bright).any()


def test_prompted_point_lands_on_its_voxel(ct_model, tmp_path):
    data = np.full((40, 32, 6), LEVELS[0], np.int16)
    voxel = (29, 5, 4)
    data[voxel] = LEVELS[3]
    scan = write_scan(tmp_path / "dot.nii.gz", data, LPS_OBLIQUE)
    source = open_images(ct_model.recipe.data, [scan])
    case = source.cases[0]
    world = LPS_OBLIQUE[:3, :3] @ voxel + LPS_OBLIQUE[:3, 3]
    for system, xyz in (("voxel", voxel), ("RAS", world), ("LPS", world * [-1, -1, 1])):
        prompt = Prompt("liver", points=np.array([xyz], float), labels=np.array([1]), where="test")
        z, box, points = display_prompt(prompt, system, scan, case.meta)
        assert box is None and points.shape == (1, 2)
        col, row = points[0]
        assert (z, row, col) == tuple(round(v) for v in (z, row, col))  # snapped to the pixel
        assert case.image[z, int(row), int(col)] == case.image.max()


def test_prompted_with_the_real_model(ct_model, small_scan, tmp_path):
    lps_scan = small_scan
    affine = nib.load(lps_scan).affine

    def lps(voxels: list) -> list:
        return ((affine[:3, :3] @ np.array(voxels, float).T).T + affine[:3, 3]) * [-1, -1, 1]

    box, points = [[15, 14, 1], [32, 30, 1]], [[24, 22, 2], [5, 5, 2]]
    prompts = [{"class": "liver", "box": box}, {"class": "kidney_left", "points": points, "labels": [1, 0]}]
    lps = [{"class": "liver", "box": lps(box).tolist()}, {"class": "kidney_left", "points": lps(points).tolist(), "labels": [1, 0]}]
    out = {}
    for system, given in (("voxel", prompts), ("LPS", lps)):
        P.predict(ct_model, [str(lps_scan)], tmp_path / system, prompts_file(tmp_path / f"{system}.json", given, system), quiet=True)
        assert files(tmp_path / system) == volume_files("small")
        out[system] = assert_on_the_scans_grid(tmp_path / system / "small.nii.gz", lps_scan)
        check_sidecar(tmp_path / system / "small.json", out[system], lps_scan, mode="prompted")
    np.testing.assert_array_equal(out["LPS"], out["voxel"])
    label = out["voxel"]
    assert set(np.unique(label).tolist()) <= {0, 1, 4}
    for value, prompted_slice in ((1, 1), (4, 2)):
        slices = sorted(set(np.nonzero(label == value)[2].tolist()))
        if slices:  # contiguous, through the prompted slice (propagation stops where the mask vanishes)
            assert slices == list(range(slices[0], slices[-1] + 1)) and prompted_slice in slices


# ------------------------------------------------------------------ images (PNG)


def _cs_image(cs_template: Path) -> Path:
    return min((cs_template / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))


def test_cityscapes_automatic_writes_label_ids_at_the_original_size(cs_model, cs_template, tmp_path):
    image = _cs_image(cs_template)
    name = image.name[: -len(".png")]
    records = P.predict(cs_model, [str(image)], tmp_path / "out", quiet=True)
    assert files(tmp_path / "out") == [f"{name}.png", f"{name}_overlay.png"]
    original = np.asarray(Image.open(image))
    label = np.asarray(Image.open(tmp_path / "out" / f"{name}.png"))
    overlay = np.asarray(Image.open(tmp_path / "out" / f"{name}_overlay.png"))
    assert label.shape == original.shape[:2] == (64, 128) and label.dtype == np.uint8
    assert overlay.shape == original.shape and overlay.dtype == np.uint8
    assert set(np.unique(label).tolist()) <= LABEL_IDS | {0}
    assert len(np.unique(label)) >= 2  # something was predicted
    assert records[0]["pixels"] == {n: int((label == v).sum()) for (n, v) in TRAIN_CLASSES if (label == v).any()}
    tinted = label != 0
    assert (overlay[tinted] != original[tinted]).any(axis=-1).mean() > 0.5 and (overlay[~tinted] == original[~tinted]).all()


def test_pixel_box_on_an_image(cs_model, cs_template, tmp_path, monkeypatch):
    image = _cs_image(cs_template)
    name = image.name[: -len(".png")]
    prompts = prompts_file(tmp_path / "p.json", [{"class": "car", "box": [20, 10, 60, 40], "input": name}], "pixel")
    P.predict(cs_model, [str(image)], tmp_path / "real", prompts, quiet=True)
    label = np.asarray(Image.open(tmp_path / "real" / f"{name}.png"))
    assert label.shape == (64, 128) and set(np.unique(label).tolist()) <= {0, 26}  # car: labelId 26
    monkeypatch.setattr(P.Predictor, "prompted_mask", lambda self, img, box, pts, lbl: box_oracle(self, np.full(img.shape[:2], 255, np.uint8), box, pts, lbl))
    P.predict(cs_model, [str(image)], tmp_path / "oracle", prompts, quiet=True)
    label = np.asarray(Image.open(tmp_path / "oracle" / f"{name}.png"))
    expected = np.zeros((64, 128), np.uint8)
    expected[10:40, 20:60] = 26
    np.testing.assert_array_equal(label, expected)


def test_promptable_checkpoint_takes_pixel_points(promptable_model, tmp_path):
    image = tmp_path / "in" / "photo.jpg"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), np.uint8)).save(image)
    prompts = prompts_file(tmp_path / "p.json", [{"class": "blob", "points": [[10, 12]]}, {"class": "bar", "box": [30, 5, 69, 49]}], None)
    records = P.predict(promptable_model, [str(image.parent)], tmp_path / "out", prompts, quiet=True)
    assert files(tmp_path / "out") == ["photo.png", "photo_overlay.png"]
    label = np.asarray(Image.open(tmp_path / "out" / "photo.png"))
    assert label.shape == (50, 70) and set(np.unique(label).tolist()) <= {0, 1, 2}
    assert records[0]["input"] == "photo"


# ------------------------------------------------------------------ bad input: one SamtuneError naming the file or key


def test_unreadable_scan(ct_model, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file at all" * 10)
    with pytest.raises(SamtuneError, match=r"broken\.nii\.gz.*not a readable NIfTI file"):
        P.predict(ct_model, [str(bad)], tmp_path / "out", quiet=True)


def test_2d_nifti_for_a_volume_model(ct_model, tmp_path):
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.int16), np.eye(4)), str(flat))
    with pytest.raises(SamtuneError, match=r"flat\.nii\.gz: expected a 3D \(or 4D\) NIfTI scan, found Nifti1Image of shape \(20, 20\)"):
        P.predict(ct_model, [str(flat)], tmp_path / "out", quiet=True)


@pytest.mark.parametrize(
    ("coordinates", "prompt", "match"),
    [
        ("voxel", {"class": "liver", "box": [[0, 0, 2], [60, 10, 2]]}, r"voxel point \(60\.0, 10\.0, 2\.0\) lies outside .*block\.nii\.gz"),
        ("voxel", {"class": "liver", "points": [[5, 5, 8]]}, r"lies outside .*block\.nii\.gz"),
        ("RAS", {"class": "liver", "points": [[500.0, 0.0, 0.0]]}, r"point \(500\.0, 0\.0, 0\.0\) mm \(RAS\) lies outside .*RAS extent"),
        ("voxel", {"class": "liver", "box": [0, 0, 10, 10]}, r"prompts\[0\]: a volume box is two opposite corners"),
        ("voxel", {"class": "liver", "box": [[1, 1, 1], [5, 5, 3]]}, r"prompts\[0\]: .*different axial slices \(\[1, 3\]\)"),
        ("pixel", {"class": "liver", "box": [[1, 1, 1], [5, 5, 1]]}, r"prompts\[0\]: volumes take coordinates \"voxel\""),
    ],
    ids=["box_outside", "point_past_last_slice", "mm_outside", "pixel_box_on_volume", "two_slices", "pixel_coordinates"],
)
def test_bad_volume_prompts(ct_model, tmp_path, coordinates, prompt, match):
    scan, _ = _block_scan(tmp_path)
    prompts = prompts_file(tmp_path / "p.json", [prompt], coordinates)
    with pytest.raises(SamtuneError, match=match):
        P.predict(ct_model, [str(scan)], tmp_path / "out", prompts, quiet=True)
    assert not (tmp_path / "out" / "block.nii.gz").exists()


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ({"class": "car", "box": [0, 0, 129, 10]}, r"box \[0\.0, 0\.0, 129\.0, 10\.0\] lies outside .*leftImg8bit\.png \(128×64 px"),
        ({"class": "car", "points": [[10, 64]]}, r"points .* lie outside"),
        ({"class": "car", "box": [[0, 0, 1], [5, 5, 1]]}, r"a box on an image .* is \[x0, y0, x1, y1\]"),
        ({"class": "car", "box": [50, 10, 20, 40]}, r"empty or inverted"),
        ({"class": "car", "points": [[1, 2, 3]]}, r"take 2 numbers per point"),
    ],
    ids=["box_outside", "point_outside", "volume_box_on_image", "inverted_box", "3d_point"],
)
def test_bad_image_prompts(cs_model, cs_template, tmp_path, prompt, match):
    prompts = prompts_file(tmp_path / "p.json", [prompt], "pixel")
    with pytest.raises(SamtuneError, match=match):
        P.predict(cs_model, [str(_cs_image(cs_template))], tmp_path / "out", prompts, quiet=True)


def test_volume_coordinates_on_an_image(cs_model, cs_template, tmp_path):
    prompts = prompts_file(tmp_path / "p.json", [{"class": "car", "box": [[0, 0, 1], [5, 5, 1]]}], "RAS")
    with pytest.raises(SamtuneError, match=r"images take coordinates \"pixel\", not 'RAS'"):
        P.predict(cs_model, [str(_cs_image(cs_template))], tmp_path / "out", prompts, quiet=True)


BAD_PROMPTS = [
    ("{not json", r"not valid JSON"),
    (json.dumps([{"class": "liver"}]), r'expected \{"coordinates"'),
    (json.dumps({"prompts": [], "coordinates": "voxel"}), r"prompts list is empty"),
    (json.dumps({"prompts": [{"class": "liver", "box": [[1, 2, 3]]}]}), r"prompts\[0\]: box must be"),
    (json.dumps({"prompts": [{"class": "liver", "box": [1, 2, 3]}]}), r"prompts\[0\]: box must be"),
    (json.dumps({"prompts": [{"class": "liver", "points": [1, 2, 3]}]}), r"prompts\[0\]: points must be"),
    (json.dumps({"prompts": [{"class": "liver", "points": [[1, 2, 3]], "labels": [1, 0]}]}), r"labels must hold one 1"),
    (json.dumps({"prompts": [{"class": "liver", "points": [[1, 2, 3]], "labels": [2]}]}), r"labels must hold one 1"),
    (json.dumps({"prompts": [{"class": "liver", "box": [[1, 2, "x"], [3, 4, 5]]}]}), r"prompts\[0\]: could not convert"),
    (json.dumps({"prompts": [{"class": "liver", "box": [[1, 2, 3], [4, 5]]}]}), r"prompts\[0\]: "),
    ('{"prompts": [{"class": "liver", "points": [[1, NaN, 3]]}]}', r"finite"),
    (json.dumps({"prompts": [{"class": "liver"}]}), r"prompts\[0\]: give a box and/or points"),
    (json.dumps({"prompts": [{"class": "liver", "box": [[1, 1, 1], [2, 2, 1]], "labels": [1]}]}), r"labels without points"),
    (json.dumps({"prompts": [{"class": "liver", "box": [[1, 1, 1], [2, 2, 1]], "input": 3}]}), r"input=3"),
    (json.dumps({"prompts": [{"class": "livr", "box": [[1, 1, 1], [2, 2, 1]]}]}), r"prompts\[0\]: class 'livr' is not a class of this checkpoint; did you mean `liver`\?"),
    (json.dumps({"prompts": [{"class": "liver", "bx": [[1, 1, 1], [2, 2, 1]]}]}), r"prompts\[0\]: unknown keys \['bx'\]"),
    (json.dumps({"prompt": [], "prompts": []}), r"unknown keys \['prompt'\]"),
    (json.dumps({"coordinates": "ijk", "prompts": [{"class": "liver", "points": [[1, 2, 3]]}]}), r"coordinates='ijk'; use one of pixel, voxel, RAS, LPS"),
]


@pytest.mark.parametrize(("text", "match"), BAD_PROMPTS, ids=[f"bad_prompts_{k}" for k in range(len(BAD_PROMPTS))])
def test_malformed_prompts_file(ct_model, lps_scan, tmp_path, text, match):
    path = tmp_path / "prompts.json"
    path.write_text(text)
    with pytest.raises(SamtuneError, match=match) as info:
        P.predict(ct_model, [str(lps_scan)], tmp_path / "out", path, quiet=True)
    assert str(path) in str(info.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_missing_prompts_file(ct_model, lps_scan, tmp_path):
    with pytest.raises(SamtuneError, match=r"--prompts .*nowhere\.json: cannot read it"):
        P.predict(ct_model, [str(lps_scan)], tmp_path / "out", tmp_path / "nowhere.json", quiet=True)


def test_prompt_for_an_input_that_is_not_given(ct_model, lps_scan, tmp_path):
    prompts = prompts_file(tmp_path / "p.json", [{"class": "liver", "points": [[3, 3, 2]], "input": "lps_cas"}])
    with pytest.raises(SamtuneError, match=r"prompts\[0\]: input 'lps_cas' is not one of the inputs; did you mean `lps_case`\?"):
        P.predict(ct_model, [str(lps_scan)], tmp_path / "out", prompts, quiet=True)


def test_prompt_input_by_file_name_and_inputs_without_prompts(ct_model, lps_scan, tmp_path, monkeypatch):
    monkeypatch.setattr(P.Predictor, "prompted_mask", box_oracle)
    scan, _ = _block_scan(tmp_path)
    prompts = prompts_file(tmp_path / "p.json", [{"class": "liver", "box": [[14, 12, 2], [20, 18, 2]], "input": "block.nii.gz"}])
    records = P.predict(ct_model, [str(scan), str(lps_scan)], tmp_path / "out", prompts, quiet=True)
    assert records[0]["voxels"]["liver"] > 0
    assert records[1]["voxels"] == {} and "no prompt for this input" in records[1]["summary"]


def test_promptable_checkpoint_needs_prompts(promptable_model, tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(SamtuneError, match=r"task: promptable .*pass --prompts FILE"):
        P.predict(promptable_model, [str(tmp_path / "x.png")], tmp_path / "out", quiet=True)


def test_checkpoint_without_classes_file(ct_run, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(ct_run / "checkpoints" / "best", folder)
    (folder / "classes.json").unlink()
    loaded = api.load_model(folder)
    with pytest.raises(SamtuneError, match=r"classes\.json is missing"):
        P.predict(loaded, [str(tmp_path)], tmp_path / "out", quiet=True)


def test_glob_that_matches_nothing(ct_model, tmp_path):
    with pytest.raises(SamtuneError, match=r"--input .*\*\.nii\.gz: the pattern matches no file"):
        P.predict(ct_model, [str(tmp_path / "scans" / "*.nii.gz")], tmp_path / "out", quiet=True)


def test_missing_input_and_empty_folder(ct_model, tmp_path):
    with pytest.raises(SamtuneError, match=r"nowhere\.nii\.gz: no such file or folder"):
        P.predict(ct_model, [str(tmp_path / "nowhere.nii.gz")], tmp_path / "out", quiet=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SamtuneError, match=r"empty: no \.nii\.gz / \.nii files found"):
        P.predict(ct_model, [str(tmp_path / "empty")], tmp_path / "out", quiet=True)


def test_glob_is_expanded(ct_model, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "predict_index_maps", oracle_maps)
    (tmp_path / "scans").mkdir()
    for which in ("ras", "lps_oblique_qform_differs"):
        write_oracle_scan(tmp_path / "scans", which)
    records = P.predict(ct_model, [str(tmp_path / "scans" / "*.nii.gz")], tmp_path / "out", quiet=True)
    assert [Path(r["input"]).name for r in records] == ["lps_oblique_qform_differs.nii.gz", "ras.nii.gz"]


def test_output_would_overwrite_an_input(ct_model, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "predict_index_maps", oracle_maps)
    scan, _ = write_oracle_scan(tmp_path, "ras")
    before = scan.read_bytes()
    with pytest.raises(SamtuneError, match=r"--out .*would overwrite the input .*ras\.nii\.gz; choose another --out folder"):
        P.predict(ct_model, [str(scan)], tmp_path, quiet=True)
    assert scan.read_bytes() == before


def test_two_inputs_with_the_same_name(ct_model, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_oracle_scan(tmp_path / folder, "ras")
    with pytest.raises(SamtuneError, match=r"a/ras\.nii\.gz and .*b/ras\.nii\.gz would both be predicted into .*ras\.nii\.gz"):
        P.predict(ct_model, [str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_nnunet_channel_files(ct_model, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "predict_index_maps", oracle_maps)
    folder = tmp_path / "case"
    folder.mkdir()
    for channel in (0, 1):
        scan, _ = write_oracle_scan(tmp_path, "ras", seed=channel)
        scan.rename(folder / f"pat_{channel:04d}.nii.gz")
    records = P.predict(with_overrides(ct_model, "data.channel=1"), [str(folder)], tmp_path / "out", quiet=True)
    assert [Path(r["input"]).name for r in records] == ["pat_0001.nii.gz"] and files(tmp_path / "out") == volume_files("pat")
    with pytest.raises(SamtuneError, match=r"no scan to predict: pat_0000\.nii\.gz, pat_0001\.nii\.gz are nnU-Net channel files .*data\.channel=2"):
        P.predict(with_overrides(ct_model, "data.channel=2"), [str(folder)], tmp_path / "out2", quiet=True)


# ------------------------------------------------------------------ memory: one volume at a time


def test_volumes_are_read_one_at_a_time(ct_model, tmp_path, monkeypatch):
    monkeypatch.setattr(P, "predict_index_maps", oracle_maps)
    scans = [write_oracle_scan(tmp_path, which)[0] for which in ("ras", "lps_oblique_qform_differs", "permuted_big_endian")]
    opened: list[tuple[list, weakref.ref]] = []

    def recording_open(section, paths):
        gc.collect()
        alive = [paths for paths, ref in opened if ref() is not None]
        assert not alive, f"{alive} still in memory when the next scan is opened"
        source = open_images(section, paths)
        opened.append((list(paths), weakref.ref(source)))
        return source

    monkeypatch.setattr(P, "open_images", recording_open)
    P.predict(ct_model, [str(tmp_path)], tmp_path / "out", quiet=True)
    assert [paths for paths, _ in opened] == [[s] for s in sorted(scans)]


def test_batches_follow_eval_batch_size(ct_model, lps_scan, tmp_path, monkeypatch):
    sizes = []

    def counting(model, family, images, metas, threshold):
        sizes.append(len(images))
        return [np.zeros(m["original_size"], np.uint8) for m in metas]

    monkeypatch.setattr(P, "predict_index_maps", counting)
    P.predict(ct_model, [str(lps_scan)], tmp_path / "out", quiet=True, batch_size=4)
    assert sizes == [4, 2]  # 6 slices


# ------------------------------------------------------------------ speed: uniform slices, precision


def test_uniform_key_names_equal_inputs_and_only_those():
    import torch

    meta = {"resized_size": (40, 64), "original_size": (75, 120)}
    image = torch.zeros(3, 64, 64)
    image[:, :40, :64] = torch.tensor([-2.0, -1.5, -1.0])[:, None, None]  # one value per channel; the rest is padding
    key = P.uniform_key(image, meta)
    assert key == ((-2.0, -1.5, -1.0), (40, 64), (75, 120))
    assert P.uniform_key(image + 0.5, meta) != key
    assert P.uniform_key(image, {**meta, "original_size": (76, 120)}) != key  # another size: another label map
    image[1, 39, 63] = 0.0
    assert P.uniform_key(image, meta) is None


def test_uniform_slices_are_predicted_once_and_give_the_labels_of_running_every_slice(ct_model, tmp_path, monkeypatch):
    """A scan with air above and below the body (and one air slice inside): the real model's labels
    are those of running every slice, with one model pass for all the air slices."""
    data = np.asarray(nib.load(min((Path(ct_model.recipe.data.root) / "imagesTr").glob("*.nii.gz"))).dataobj)[:, :, :6].copy()
    data = np.concatenate([np.full(data.shape[:2] + (3,), -1000, data.dtype), data, np.full(data.shape[:2] + (2,), -1000, data.dtype)], axis=2)
    data[:, :, 5] = -1000 + np.random.default_rng(0).integers(-30, 30, data.shape[:2])  # noisy air: windowed to 0 all the same
    scan = write_scan(tmp_path / "airy.nii.gz", data, _affine(np.diag([2.0, 2.0, 3.0])))
    calls = []
    real = P.predict_index_maps

    def counting(model, family, images, metas, threshold):
        calls.append([m["index"] for m in metas])
        return real(model, family, images, metas, threshold)

    monkeypatch.setattr(P, "predict_index_maps", counting)
    skipped = P.predict(ct_model, [str(scan)], tmp_path / "skip", quiet=True, batch_size=4)[0]
    run_slices = sorted(i for c in calls for i in c)
    assert len(run_slices) == 11 - 6 + 1  # 5 body slices (one of the 6 was made air) + one air slice for all 6
    monkeypatch.setattr(P, "uniform_key", lambda image, meta: None)
    every = P.predict(ct_model, [str(scan)], tmp_path / "every", quiet=True, batch_size=4)[0]
    assert skipped["voxels"] == every["voxels"]
    np.testing.assert_array_equal(np.asarray(nib.load(skipped["output"]).dataobj), np.asarray(nib.load(every["output"]).dataobj))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_every_precision_predicts_a_label(precision, ct_model, small_scan, tmp_path):
    record = P.predict(ct_model, [str(small_scan)], tmp_path / precision, quiet=True, precision=precision)[0]
    label = np.asarray(nib.load(record["output"]).dataobj)
    assert label.shape == nib.load(small_scan).shape and set(np.unique(label).tolist()) <= {0, 1, 2, 3, 4}


def test_precision_default_is_the_recipes_and_int8_is_cpu_only(ct_model, monkeypatch):
    import torch
    from samtune.finetune import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2"}))
    assert P.Predictor(ct_model, 4, 0.5).precision == "fp32"  # train.precision: auto, no native bf16
    assert P.Predictor(with_overrides(ct_model, "train.precision=bf16"), 4, 0.5).precision == "bf16"
    assert P.Predictor(ct_model, 4, 0.5, "int8").precision == "int8"
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert P.Predictor(ct_model, 4, 0.5).precision == "bf16"
    with pytest.raises(SamtuneError, match="--precision int8 runs on the CPU only"):
        P.Predictor(dataclasses.replace(ct_model, device=torch.device("cuda")), 4, 0.5, "int8")
    with pytest.raises(SamtuneError, match="--precision fp16: not one of auto, fp32, bf16, int8"):
        P.Predictor(ct_model, 4, 0.5, "fp16")


def test_predictor_keeps_the_loaded_model_as_loaded(ct_model):
    predictor = P.Predictor(ct_model, 4, 0.5, "int8")
    assert predictor.model is not ct_model.model and predictor.loaded.model is ct_model.model
    assert any("lora_" in name for name, _ in ct_model.model.named_modules())
