"""datasets/volume.py: intensity windows (CT presets, MR percentiles), in-plane resampling, the per-slice index."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samtune.datasets.nifti import NiftiSliceSource, read_dataset


WINDOW = (-160.0, 240.0)


def _save(arr, path: Path, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))


HU = np.array([-2000, -1350, -600, -500, -160, -125, 0, 40, 150, 240, 275, 400, 1300, 3000], np.int16)


@pytest.mark.parametrize("preset, window", [
    ("ct_abdomen", (-160, 240)), ("ct_samed", (-125, 275)), ("ct_lung", (-1350, 150)), ("ct_bone", (-500, 1300)),
    ([-100, 300], (-100, 300)),
])  # fmt: skip
def test_intensity_presets(tmp_path, preset, window):
    _save(np.tile(HU, (2, 1, 1)).transpose(0, 2, 1).astype(np.int16), tmp_path / "img.nii.gz")  # 2×14×1
    _save(np.zeros((2, 14, 1), np.uint8), tmp_path / "lab.nii.gz")
    from samtune.datasets.nifti import Case

    src = NiftiSliceSource([Case("x", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")], {1: "a"}, preset)
    lo, hi = window
    assert src.cases[0].meta["window"] == [lo, hi]
    got = src.load(0)[0][::-1, 0]  # rows are y reversed; the 14 values lie along y
    expected = np.round((np.clip(HU.astype(np.float64), lo, hi) - lo) * 255.0 / (hi - lo)).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert got[HU <= lo].max() == 0 and got[HU >= hi].min() == 255


def test_mr_percentile_window(tmp_path):
    values = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    _save(values, tmp_path / "img.nii.gz")
    _save(np.zeros((10, 10, 10), np.uint8), tmp_path / "lab.nii.gz")
    from samtune.datasets.nifti import Case

    src = NiftiSliceSource([Case("mr", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")], {1: "a"}, "mr_percentile")
    lo, hi = src.cases[0].meta["window"]
    assert lo == pytest.approx(np.percentile(values, 0.5)) and hi == pytest.approx(np.percentile(values, 99.5))
    volume = np.asarray(src.cases[0].image)
    assert volume.min() == 0 and volume.max() == 255
    display = values.transpose(2, 1, 0)[:, ::-1, :]  # canonical x, y, z -> z, rows, columns
    expected = np.round((np.clip(display.astype(np.float64), lo, hi) - lo) * 255 / (hi - lo))
    np.testing.assert_array_equal(volume, expected.astype(np.uint8))
    assert (display <= lo).sum() == 5 and (display >= hi).sum() == 5  # the clipped 0.5 % tails


def test_spacing_resampling_changes_the_in_plane_shape(phantom, tmp_path):
    cases, classes = read_dataset(phantom)  # 48×48×12 at 3 × 3 × 5 mm
    src = NiftiSliceSource(cases[:1], classes, WINDOW, cache_dir=tmp_path / "c", spacing_mm=(1.5, 2.0))
    meta = src.cases[0].meta
    assert meta["shape_zhw"] == [12, 72, 96]  # rows: 48 × 3 / 2, columns: 48 × 3 / 1.5
    assert meta["spacing_mm"] == [1.5, 2.0, 5.0] and meta["original_spacing_mm"] == [3.0, 3.0, 5.0]
    label = np.asarray(src.cases[0].label)
    assert label.dtype == np.uint8 and set(np.unique(label).tolist()) <= {0, 1, 2, 3, 4}
    base = NiftiSliceSource(cases[:1], classes, WINDOW, cache_dir=tmp_path / "c")
    for z in (3, 6):  # nearest-neighbour labels keep area ~ (3/1.5) × (3/2) = 3× the pixels
        for c, n in base.cases[0].meta["slices"][z].items():
            assert meta["slices"][z][c][0] == pytest.approx(3 * n[0], rel=0.25)
    image, lab = src.load(0)
    assert image.shape == lab.shape == (72, 96)


def test_slice_index_counts_pixels_and_components(phantom, tmp_path):
    cases, classes = read_dataset(phantom)
    src = NiftiSliceSource(cases[:1], classes, WINDOW, cache_dir=tmp_path / "c")
    from scipy import ndimage

    for i in range(len(src)):
        label = src.load(i)[1]
        expected = {int(v): int((label == v).sum()) for v in np.unique(label) if v != 0}
        assert src.slice_classes(i) == expected
        for c, sizes in src.slice_components(i).items():
            _, n = ndimage.label(label == c, structure=np.ones((3, 3)))
            assert len(sizes) == n and sum(sizes) == expected[c] and sizes == sorted(sizes, reverse=True)


# ------------------------------------------------------------- bad inputs: label and image dimensions


def _two_files(tmp_path: Path, image: np.ndarray, label: np.ndarray) -> tuple[Path, Path]:
    _save(image, tmp_path / "img.nii.gz")
    _save(label, tmp_path / "lab.nii.gz")
    return tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz"


def test_2d_label_is_not_explained_as_one_hot(tmp_path):
    from samtune.datasets.checks import BadCase
    from samtune.datasets.volume import read_case

    image, label = _two_files(tmp_path, np.zeros((8, 8, 4), np.int16), np.zeros((8, 8), np.uint8))
    with pytest.raises(BadCase) as info:
        read_case("x", image, label)
    message = str(info.value)
    assert str(label) in message and "the label is 2D" in message and "every slice" in message
    assert "channel" not in message and "one-hot" not in message


def test_2d_image_and_label_point_to_folder2d(tmp_path):
    from samtune.datasets.checks import BadCase
    from samtune.datasets.volume import read_case

    image, label = _two_files(tmp_path, np.zeros((8, 8), np.int16), np.zeros((8, 8), np.uint8))
    with pytest.raises(BadCase, match="data.kind: folder2d"):
        read_case("x", image, label)


def test_4d_label_is_explained_as_channels(tmp_path):
    from samtune.datasets.checks import BadCase
    from samtune.datasets.volume import read_case

    image, label = _two_files(tmp_path, np.zeros((8, 8, 4), np.int16), np.zeros((8, 8, 4, 3), np.uint8))
    with pytest.raises(BadCase, match=r"the label is 4D .*one channel per class \(one-hot\).*argmax"):
        read_case("x", image, label)


def test_4d_image_records_its_channels(tmp_path):
    from samtune.datasets.volume import preprocess, read_case

    rng = np.random.default_rng(0)
    image, label = _two_files(tmp_path, rng.integers(-100, 100, (8, 8, 4, 2)).astype(np.int16), np.ones((8, 8, 4), np.uint8))
    raw = read_case("x", image, label, channel=1)
    assert raw.channels == 2 and raw.image.shape == (8, 8, 4)
    assert preprocess(raw, WINDOW, None)[2]["channels"] == 2
    flat = tmp_path / "flat"
    flat.mkdir()
    image3, label3 = _two_files(flat, np.zeros((8, 8, 4), np.int16) + np.arange(4, dtype=np.int16), np.ones((8, 8, 4), np.uint8))
    assert read_case("y", image3, label3).channels == 1
