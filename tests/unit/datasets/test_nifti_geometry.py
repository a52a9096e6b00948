"""datasets/nifti_geometry.py: display-layout labels back onto the scan's voxel grid and header, and
prompt points (voxel indices, RAS/LPS millimetres) to display pixels."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, inv_ornt_aff
from samtune import SamtuneError
from samtune.datasets.nifti_geometry import (
    canonical_ornt,
    display_to_file_order,
    label_dtype,
    voxel_to_display,
    world_to_display,
    write_label_like,
)
from samtune.datasets.volume import preprocess, read_case, to_display

WINDOW = (-100.0, 100.0)
LEVELS = np.array([-80, -20, 20, 80], np.int16)  # windowed to 26, 102, 153, 230: four classes by thresholds
THRESHOLDS = [64, 128, 192]
SHAPE = (7, 9, 5)  # every axis a different length: a permutation mix-up changes the shape


def _rotation_z(degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _affine(columns: np.ndarray, offset=(12.5, -30.0, 7.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = columns, offset
    return affine


RAS = _affine(np.diag([2.0, 2.0, 2.5]))
LPS_OBLIQUE = _affine(_rotation_z(12) @ np.diag([-2.0, -2.0, 3.0]))  # i -> left, j -> posterior, rotated
PERMUTED = _affine(np.array([[0, -2.0, 0], [0, 0, -2.0], [2.5, 0, 0]]))  # i -> superior, j -> left, k -> posterior
LAS_OBLIQUE = _affine(np.array([[-2.0, 0, 0], [0, 1.97, -0.36], [0, 0.32, 2.17]]))  # like nibabel's example4d


@dataclass
class Spec:
    name: str
    affine: np.ndarray
    suffix: str = ".nii.gz"
    nifti2: bool = False
    endianness: str = "<"
    qform: np.ndarray | None = None  # a qform (code 1) differing from the sform (code 2)
    channels: int = 0  # > 0: 4D with this many channels, channel 1 used


SPECS = [
    Spec("ras", RAS),
    Spec("lps_oblique_sform2_qform1", LPS_OBLIQUE, qform=_affine(_rotation_z(-5) @ np.diag([-2.0, -2.0, 3.0]), (1, 2, 3))),
    Spec("big_endian_permuted", PERMUTED, suffix=".nii", endianness=">"),
    Spec("nifti2_4d_channels", LAS_OBLIQUE, suffix=".nii", nifti2=True, channels=3),
]


def _write_scan(folder: Path, spec: Spec, data: np.ndarray, name: str = "scan") -> Path:
    """``data`` (file order; with channels, the one used) saved as ``spec`` says; returns the path."""
    rng = np.random.default_rng(1)
    if spec.channels:
        noise = rng.integers(-500, 500, data.shape + (spec.channels,)).astype(data.dtype)
        noise[..., 1] = data
        data = noise
    klass = nib.Nifti2Image if spec.nifti2 else nib.Nifti1Image
    header = klass.header_class(endianness=spec.endianness)
    img = klass(data.astype(data.dtype.newbyteorder(spec.endianness)), None, header)
    img.set_sform(spec.affine, code=2)
    img.set_qform(spec.qform if spec.qform is not None else spec.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_dim_info(0, 1, 2)
    path = folder / f"{name}{spec.suffix}"
    nib.save(img, str(path))
    return path


def _levels(shape=SHAPE, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).choice(LEVELS, shape)


def _threshold_prediction(path: Path, spacing_mm=None, channel=0) -> tuple[np.ndarray, dict]:
    """The "model": class = which threshold the windowed display image passes, in display layout."""
    image, _, meta = preprocess(read_case("scan", path, None, channel), WINDOW, spacing_mm)
    return np.digitize(image, THRESHOLDS).astype(np.uint8), meta


def _assert_same_grid(out: Path, ref: Path) -> None:
    """The written label lies on the reference's grid: header fields equal, bit for bit."""
    o, r = nib.load(out), nib.load(ref)
    assert type(o) is (nib.Nifti2Image if isinstance(r, nib.Nifti2Image) else nib.Nifti1Image)
    assert o.shape == r.shape[:3]
    oh, rh = o.header, r.header
    for key in ("sform_code", "qform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c", "quatern_d",
                "qoffset_x", "qoffset_y", "qoffset_z", "dim_info"):  # fmt: skip
        np.testing.assert_array_equal(oh[key], rh[key], err_msg=key)
    for coded_o, coded_r in ((oh.get_sform(coded=True), rh.get_sform(coded=True)), (oh.get_qform(coded=True), rh.get_qform(coded=True))):
        assert coded_o[1] == coded_r[1]
        np.testing.assert_array_equal(coded_o[0], coded_r[0])
    np.testing.assert_array_equal(o.affine, r.affine)
    spatial = len(r.shape) == 3
    np.testing.assert_array_equal(oh["pixdim"] if spatial else oh["pixdim"][:4], rh["pixdim"] if spatial else rh["pixdim"][:4])
    assert int(oh["xyzt_units"]) == (int(rh["xyzt_units"]) if spatial else int(rh["xyzt_units"]) % 8)
    assert oh["dim"][0] == 3
    assert o.get_data_dtype().kind in "iu"
    assert (o.dataobj.slope, o.dataobj.inter) == (1.0, 0.0)  # as stored in the file: unscaled
    assert oh.get_intent()[0] == "label" and oh["descrip"].item().startswith(b"samtune")
    assert (out.read_bytes()[:2] == b"\x1f\x8b") == out.name.endswith(".gz")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_round_trip_on_generated_scans(tmp_path, spec):
    data = _levels()
    ref = _write_scan(tmp_path, spec, data)
    assert nib.load(ref).header.endianness == spec.endianness
    prediction, meta = _threshold_prediction(ref, channel=1 if spec.channels else 0)
    label = display_to_file_order(prediction, ref, meta)
    out = write_label_like(label, ref, tmp_path / f"pred{spec.suffix}")
    _assert_same_grid(out, ref)
    expected = np.searchsorted(LEVELS, data)  # the class of every voxel, in the file's own order
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([ref.name, out.name])  # no temp file left


@pytest.mark.parametrize("spacing_mm", [(1.0, 1.0), (1.3, 0.7)], ids=["x2", "non_integer"])
@pytest.mark.parametrize("spec", SPECS[1:3], ids=lambda s: s.name)
def test_round_trip_through_in_plane_resampling(tmp_path, spec, spacing_mm):
    """Upsampled slices (nearest neighbour) come back exactly: every voxel keeps a display pixel."""
    truth = np.random.default_rng(2).integers(0, 4, SHAPE).astype(np.uint8)
    ref = _write_scan(tmp_path, spec, _levels())
    lab = tmp_path / f"truth{spec.suffix}"
    nib.save(nib.Nifti1Image(truth, nib.load(ref).affine), str(lab))
    _, label_zhw, meta = preprocess(read_case("scan", ref, lab), WINDOW, spacing_mm)
    assert tuple(meta["shape_zhw"][1:]) != tuple(meta["original_shape"][1::-1])  # resampled
    np.testing.assert_array_equal(display_to_file_order(label_zhw, ref, meta), truth)


def test_downsampled_slices_come_back_at_full_size(tmp_path):
    truth = np.zeros(SHAPE, np.uint8)
    truth[1:5, 2:8, 1:4] = 1  # a block, well sampled at half resolution
    ref = _write_scan(tmp_path, SPECS[1], _levels())
    lab = tmp_path / "truth.nii.gz"
    nib.save(nib.Nifti1Image(truth, nib.load(ref).affine), str(lab))
    _, label_zhw, meta = preprocess(read_case("scan", ref, lab), WINDOW, (4.0, 4.0))
    back = display_to_file_order(label_zhw, ref, meta)
    assert back.shape == SHAPE and back.dtype == np.uint8
    assert (back == truth).mean() > 0.8


@pytest.mark.parametrize("ornt", [[[0, -1], [1, -1], [2, 1]], [[2, 1], [0, -1], [1, 1]], [[1, -1], [2, -1], [0, -1]]])
def test_same_object_in_any_voxel_order_gives_the_same_label_in_world_space(tmp_path, ornt):
    data = _levels()
    base_spec = Spec("base", LPS_OBLIQUE)
    base = _write_scan(tmp_path, base_spec, data, "base")
    ornt = np.array(ornt, float)
    moved = Spec("moved", LPS_OBLIQUE @ inv_ornt_aff(ornt, data.shape), suffix=".nii")
    other = _write_scan(tmp_path, moved, apply_orientation(data, ornt), "other")
    outs = []
    for path in (base, other):
        prediction, meta = _threshold_prediction(path)
        outs.append(write_label_like(display_to_file_order(prediction, path, meta), path, tmp_path / f"pred_{path.name}"))
    a, b = (nib.as_closest_canonical(nib.load(p)) for p in outs)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert np.asarray(a.dataobj).any()


VOXELS = [(0, 0, 0), (6, 8, 4), (3, 1, 4), (5, 7, 0)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_points_land_on_their_voxel(tmp_path, spec):
    data = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)  # every voxel its own value
    ref = _write_scan(tmp_path, spec, data)
    raw = read_case("scan", ref, None, 1 if spec.channels else 0)
    display = to_display(raw.image)
    _, _, meta = preprocess(raw, WINDOW, None)
    affine = nib.load(ref).affine
    for ijk in VOXELS:
        z, row, col = voxel_to_display(ijk, ref, meta)
        assert np.allclose((z, row, col), np.round((z, row, col)), atol=1e-6)
        assert display[round(z), round(row), round(col)] == data[ijk]
        ras = affine[:3, :3] @ ijk + affine[:3, 3]
        np.testing.assert_allclose(world_to_display(ras, "RAS", ref, meta), (z, row, col), atol=1e-6)
        lps = ras * [-1, -1, 1]
        np.testing.assert_allclose(world_to_display(lps, "LPS", ref, meta), (z, row, col), atol=1e-6)


def test_points_in_resampled_slices(tmp_path):
    spec = SPECS[2]
    ref = _write_scan(tmp_path, spec, _levels())
    for ijk in VOXELS:
        truth = np.zeros(SHAPE, np.uint8)
        truth[ijk] = 1
        lab = tmp_path / "one_voxel.nii.gz"
        nib.save(nib.Nifti1Image(truth, nib.load(ref).affine), str(lab))
        _, label_zhw, meta = preprocess(read_case("scan", ref, lab), WINDOW, (1.0, 1.0))  # 2 mm -> 1 mm: 2×2 pixels
        z, row, col = voxel_to_display(ijk, ref, meta)
        assert (row % 1, col % 1) == (0.5, 0.5)  # the centre of the 2×2 block
        block = label_zhw[round(z), int(row) : int(row) + 2, int(col) : int(col) + 2]
        assert block.shape == (2, 2) and block.all() and label_zhw.sum() == 4


def test_points_outside_the_image_name_the_file(tmp_path):
    spec = SPECS[1]
    ref = _write_scan(tmp_path, spec, _levels())
    _, meta = _threshold_prediction(ref)
    voxel_to_display((-0.5, 0, SHAPE[2] - 0.5), ref, meta)  # the outer edge of a corner voxel: inside
    with pytest.raises(SamtuneError, match=r"voxel point \(-0\.6, 0\.0, 0\.0\).*scan\.nii\.gz.*7×9×5 voxels"):
        voxel_to_display((-0.6, 0, 0), ref, meta)
    with pytest.raises(SamtuneError, match=r"scan\.nii\.gz.*indices"):
        voxel_to_display((0, SHAPE[1], 0), ref, meta)
    with pytest.raises(SamtuneError, match=r"\(LPS\).*scan\.nii\.gz.*LPS extent x"):
        world_to_display((500.0, 0.0, 0.0), "LPS", ref, meta)
    with pytest.raises(ValueError, match="RAS or LPS"):
        world_to_display((0, 0, 0), "RAI", ref, meta)


def test_a_prediction_for_another_scan_is_refused(tmp_path):
    ref = _write_scan(tmp_path, SPECS[0], _levels())
    prediction, meta = _threshold_prediction(ref)
    wrong = dict(meta, original_shape=[9, 7, 5])
    with pytest.raises(SamtuneError, match=r"scan\.nii\.gz.*pass the scan it was made from"):
        display_to_file_order(prediction, ref, wrong)
    with pytest.raises(SamtuneError, match="missing"):
        display_to_file_order(prediction, tmp_path / "gone.nii.gz", meta)
    with pytest.raises(ValueError, match="display slices"):
        display_to_file_order(prediction[:, :-1], ref, meta)


def test_dtype_suffix_and_overwrite(tmp_path):
    ref = _write_scan(tmp_path, SPECS[0], _levels())
    label = np.zeros(SHAPE, np.int64)
    label[1, 2, 3] = 300
    out = write_label_like(label, ref, tmp_path / "sub" / "pred.nii.gz")
    img = nib.load(out)
    assert img.get_data_dtype() == np.int16 and img.header["cal_max"] == 300
    np.testing.assert_array_equal(np.asarray(img.dataobj), label)
    write_label_like(label.clip(0, 2), ref, out)  # replaces the file in place
    assert nib.load(out).get_data_dtype() == np.uint8 and sorted(p.name for p in out.parent.iterdir()) == ["pred.nii.gz"]
    with pytest.raises(SamtuneError, match=r"\.nii or \.nii\.gz"):
        write_label_like(label, ref, tmp_path / "pred.mha")
    assert label_dtype(np.array([0, 40000])) == np.uint16
    with pytest.raises(ValueError):
        label_dtype(np.array([-1, 2]))


def test_canonical_ornt_is_as_closest_canonical():
    for affine in (RAS, LPS_OBLIQUE, PERMUTED, LAS_OBLIQUE):
        img = nib.Nifti1Image(np.zeros(SHAPE, np.uint8), affine)
        canonical = nib.as_closest_canonical(img)
        ornt = canonical_ornt(affine)
        assert canonical.shape == apply_orientation(np.zeros(SHAPE), ornt).shape


# nibabel ships a few real files with its tests: a big-endian NIfTI-1 (LAS) and an oblique 4D NIfTI-2.
NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


@pytest.mark.parametrize("name, channel, spacing_mm", [
    ("anatomical.nii", 0, None), ("example_nifti2.nii.gz", 1, None), ("example_nifti2.nii.gz", 0, (1.0, 1.0)),
])  # fmt: skip
def test_nibabel_test_files(tmp_path, name, channel, spacing_mm):
    ref = NIBABEL_DATA / name
    if not ref.is_file():
        pytest.skip(f"{ref} is not installed with this nibabel (the generated scans above cover the same cases)")
    img = nib.load(ref)
    data = np.asarray(img.dataobj)
    data = data[..., channel] if data.ndim == 4 else data
    threshold = float(np.median(data))
    raw = read_case("ref", ref, None, channel)
    # the "model" thresholds the scan; its prediction takes the label's path into display slices
    _, prediction, meta = preprocess(replace(raw, label=(raw.image > threshold).astype(np.uint8)), WINDOW, spacing_mm)
    assert (meta["shape_zhw"] != list(to_display(raw.image).shape)) == (spacing_mm is not None)
    out = write_label_like(display_to_file_order(prediction, ref, meta), ref, tmp_path / "pred.nii.gz")
    _assert_same_grid(out, ref)
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), data > threshold)
    ijk = tuple(n // 3 for n in data.shape)
    ras = img.affine[:3, :3] @ ijk + img.affine[:3, 3]
    np.testing.assert_allclose(world_to_display(ras, "RAS", ref, meta), voxel_to_display(ijk, ref, meta), atol=1e-6)

