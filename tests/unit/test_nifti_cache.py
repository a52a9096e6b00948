"""The NIfTI preprocessing cache and the layouts/settings around it: reuse, invalidation, atomic
writes, intensity presets, in-plane resampling, 2.5D context, empty-slice sampling, MSD 4D
channels, plain folders and split files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samtune import SamtuneError
from samtune.datasets import cache as cache_module
from samtune.datasets.nifti import NiftiSliceSource, discover_dataset, read_dataset
from samtune.datasets.splits import split_by_file
from samtune.finetune.data import build_sources
from samtune.finetune.recipe import validate_recipe

WINDOW = (-160.0, 240.0)


def _save(arr, path: Path, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))


def _count_loads(monkeypatch) -> list:
    calls, real = [], nib.load
    monkeypatch.setattr(nib, "load", lambda path, *a, **k: calls.append(Path(path).name) or real(path, *a, **k))
    return calls


def _entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


# ------------------------------------------------------------------------------------- reuse
def test_cache_is_built_once_and_reused_without_reading_nifti(phantom, tmp_path, monkeypatch):
    cases, classes = read_dataset(phantom)
    first = NiftiSliceSource(cases, classes, WINDOW, cache_dir=tmp_path / "cache")
    assert len(_entries(tmp_path / "cache")) == 3 and len(first) == 36
    monkeypatch.setattr(nib, "load", lambda *a, **k: pytest.fail("the second build opened a NIfTI file"))
    second = NiftiSliceSource(cases, classes, WINDOW, cache_dir=tmp_path / "cache")
    assert isinstance(second.cases[0].image.base, np.memmap)  # file-backed, not read into memory
    for i in (0, 7, 35):
        for a, b in zip(first.load(i), second.load(i)):
            np.testing.assert_array_equal(a, b)
        assert first.slice_classes(i) == second.slice_classes(i)


def test_cache_matches_uncached_preprocessing(phantom, tmp_path):
    cases, classes = read_dataset(phantom)
    cached = NiftiSliceSource(cases, classes, WINDOW, cache_dir=tmp_path / "cache")
    memory = NiftiSliceSource(cases, classes, WINDOW)
    assert cached.slices == memory.slices
    for i in range(0, len(cached), 5):
        for a, b in zip(cached.load(i), memory.load(i)):
            np.testing.assert_array_equal(a, b)


def test_touching_a_file_rebuilds_only_its_case(phantom, tmp_path, monkeypatch):
    cases, classes = read_dataset(phantom)
    NiftiSliceSource(cases, classes, WINDOW, cache_dir=tmp_path / "cache")
    label = cases[1].label
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    calls = _count_loads(monkeypatch)
    NiftiSliceSource(cases, classes, WINDOW, cache_dir=tmp_path / "cache")
    assert sorted(calls) == sorted([cases[1].image.name, cases[1].label.name])
    assert len(_entries(tmp_path / "cache")) == 4  # the old entry stays until removed by hand


def test_changing_a_setting_rebuilds(phantom, tmp_path, monkeypatch):
    cases, classes = read_dataset(phantom)
    NiftiSliceSource(cases, classes, WINDOW, cache_dir=tmp_path / "cache")
    calls = _count_loads(monkeypatch)
    NiftiSliceSource(cases, classes, "ct_samed", cache_dir=tmp_path / "cache")
    assert len(calls) == 6
    calls.clear()
    NiftiSliceSource(cases, classes, "ct_samed", cache_dir=tmp_path / "cache", spacing_mm=(2.0, 2.0))
    assert len(calls) == 6
    calls.clear()  # read-time settings do not touch the cache
    NiftiSliceSource(cases, classes, "ct_samed", cache_dir=tmp_path / "cache", context_slices=1, empty_slice_ratio=1.0)
    assert calls == []


def test_interrupted_build_leaves_no_half_entry(phantom, tmp_path, monkeypatch):
    cases, classes = read_dataset(phantom)
    real_save, saved = np.save, []

    def failing_save(path, arr, *a, **k):
        saved.append(path)
        if len(saved) == 3:  # second case: image written, label not
            raise KeyboardInterrupt
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(cache_module.np, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        NiftiSliceSource(cases, classes, WINDOW, cache_dir=tmp_path / "cache")
    entries = _entries(tmp_path / "cache")
    assert len(entries) == 1 and not any(e.startswith(".tmp") for e in entries)  # case 0 complete, nothing else
    assert sorted(p.name for p in (tmp_path / "cache" / entries[0]).iterdir()) == ["image.npy", "label.npy", "meta.json"]
    monkeypatch.setattr(cache_module.np, "save", real_save)
    assert len(NiftiSliceSource(cases, classes, WINDOW, cache_dir=tmp_path / "cache")) == 36


def test_source_pickles_without_the_volumes(phantom, tmp_path):
    cases, classes = read_dataset(phantom)
    src = NiftiSliceSource(cases, classes, WINDOW, cache_dir=tmp_path / "cache")
    src.load(0)  # opens the memmaps
    clone = pickle.loads(pickle.dumps(src))  # as DataLoader workers get it with spawn
    assert len(pickle.dumps(src)) < 20_000
    np.testing.assert_array_equal(clone.load(5)[0], src.load(5)[0])


def test_default_cache_dir_is_inside_the_dataset(phantom):
    recipe = validate_recipe({"data": {"kind": "nifti", "root": str(phantom), "val_fraction": 0.34}})
    sources = build_sources(recipe, progress=False)
    assert sources.cache_dir == phantom / ".samtune_cache" and len(_entries(sources.cache_dir)) == 3
    assert [c.name for c in discover_dataset(phantom).cases] == ["phantom_000", "phantom_001", "phantom_002"]


def test_read_only_dataset_caches_in_the_user_cache(phantom, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module.os, "access", lambda path, mode: not str(path).startswith(str(phantom)))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_module.default_cache_dir(phantom) == tmp_path / "xdg" / "samtune"
    recipe = validate_recipe({"data": {"kind": "nifti", "root": str(phantom), "val_fraction": 0.34}})
    assert build_sources(recipe, progress=False).cache_dir == tmp_path / "xdg" / "samtune"
    assert not (phantom / ".samtune_cache").exists() and len(_entries(tmp_path / "xdg" / "samtune")) == 3


# ---------------------------------------------------------------------------------- intensity
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
    got = src.load(0)[0][::-1, 0, 0]  # rows are y reversed; the 14 values lie along y
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


# ------------------------------------------------------------------------------- resampling
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
    assert image.shape == (72, 96, 3) and lab.shape == (72, 96)


# ------------------------------------------------------------------------- context and empty
def test_context_slices_are_the_neighbours(phantom, tmp_path):
    cases, classes = read_dataset(phantom)
    src = NiftiSliceSource(cases[:1], classes, WINDOW, cache_dir=tmp_path / "c", context_slices=1)
    volume = np.asarray(src.cases[0].image)
    for i, (_, z) in enumerate(src.slices):
        image = src.load(i)[0]
        for channel, zz in enumerate((max(z - 1, 0), z, min(z + 1, 11))):
            np.testing.assert_array_equal(image[..., channel], volume[zz])
    assert src.slices[0][1] == 0 and src.slices[-1][1] == 11  # the clamped ends are served
    flat = NiftiSliceSource(cases[:1], classes, WINDOW, cache_dir=tmp_path / "c")
    image = flat.load(4)[0]
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_empty_slice_ratio(phantom, tmp_path):
    cases, classes = read_dataset(phantom)
    kw = dict(cache_dir=tmp_path / "c", seed=0)
    every = NiftiSliceSource(cases, classes, WINDOW, **kw)
    fg = {c.name: sum(1 for e in c.meta["slices"] if e) for c in every.cases}
    empty = {c.name: 12 - fg[c.name] for c in every.cases}
    assert len(every) == 36 and sum(empty.values()) > 0
    none = NiftiSliceSource(cases, classes, WINDOW, empty_slice_ratio=0.0, **kw)
    assert len(none) == sum(fg.values()) and all(none.slice_classes(i) for i in range(len(none)))
    some = NiftiSliceSource(cases, classes, WINDOW, empty_slice_ratio=0.2, **kw)
    assert len(some) == sum(fg[n] + min(empty[n], round(0.2 * fg[n])) for n in fg)
    again = NiftiSliceSource(cases, classes, WINDOW, empty_slice_ratio=0.2, **kw)
    assert some.slices == again.slices  # seeded
    only_kidney = NiftiSliceSource(cases, classes, WINDOW, empty_slice_ratio=0.0, foreground={3}, **kw)
    assert all(3 in only_kidney.slice_classes(i) for i in range(len(only_kidney)))


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


# ------------------------------------------------------------------------- layouts and splits
def _msd_4d(root: Path) -> Path:
    rng = np.random.default_rng(0)
    training = []
    for name in ("b1", "b2"):
        image = np.stack([np.full((8, 8, 4), 10.0), np.full((8, 8, 4), 90.0)], axis=-1)  # 2 modalities
        image += rng.normal(0, 1, image.shape)
        label = np.zeros((8, 8, 4), np.uint8)
        label[2:5, 2:6, 1:3] = 1
        _save(image.astype(np.float32), root / "imagesTr" / f"{name}.nii.gz")
        _save(label, root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {"labels": {"0": "background", "1": "tumour"}, "modality": {"0": "FLAIR", "1": "T1w"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_4d_channel_selection(tmp_path):
    root = _msd_4d(tmp_path / "Task01_BrainTumour")
    means = []
    for channel in (0, 1):
        ds = discover_dataset(root, channel=channel)
        assert ds.layout == "msd" and ds.channel_names == {0: "FLAIR", 1: "T1w"}
        assert all(c.channel == channel for c in ds.cases)
        src = NiftiSliceSource(ds.cases, ds.classes, (0.0, 100.0), cache_dir=tmp_path / "c")
        means.append(float(np.asarray(src.cases[0].image).mean()))
    assert means[0] == pytest.approx(10 * 2.55, abs=1) and means[1] == pytest.approx(90 * 2.55, abs=1)
    with pytest.raises(SamtuneError, match="data.channel=2.*FLAIR"):
        discover_dataset(root, channel=2)


def test_nnunet_channel_selects_the_channel_file(phantom):
    ds = discover_dataset(phantom, channel=0)
    assert ds.cases[0].image.name == "phantom_000_0000.nii.gz" and ds.channel_names == {0: "CT"}
    with pytest.raises(SamtuneError, match="data.channel=1"):
        discover_dataset(phantom, channel=1)


def test_plain_folders_matched_by_case_name(phantom, tmp_path):
    plain = tmp_path / "plain"
    for p in (phantom / "imagesTr").glob("*.nii.gz"):
        (plain / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, plain / "images" / p.name.replace("_0000", "") if p.name.startswith("phantom_000") else plain / "images" / p.name)
    shutil.copytree(phantom / "labelsTr", plain / "labels")
    ds = discover_dataset(plain)
    assert ds.layout == "folders" and ds.classes is None
    assert [(c.name, c.image.name, c.label.name) for c in ds.cases] == [
        ("phantom_000", "phantom_000.nii.gz", "phantom_000.nii.gz"),  # {case}.nii.gz
        ("phantom_001", "phantom_001_0000.nii.gz", "phantom_001.nii.gz"),  # {case}_0000.nii.gz
        ("phantom_002", "phantom_002_0000.nii.gz", "phantom_002.nii.gz"),
    ]
    src = NiftiSliceSource(ds.cases, None, WINDOW)
    assert src.class_names == {1: "class_1", 2: "class_2", 3: "class_3", 4: "class_4"}
    named = discover_dataset(plain, class_names={1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"})
    assert named.classes[1] == "liver"
    recipe = validate_recipe({"data": {"kind": "nifti", "root": str(plain), "class_names": {1: "liver"}, "val_fraction": 0.34}})
    with pytest.raises(SamtuneError, match=r"label values \[2, 3, 4\] are not in the class map"):
        build_sources(recipe, progress=False)


def test_split_file_train_val_and_nnunet_folds(phantom, tmp_path):
    cases = discover_dataset(phantom).cases
    plain = tmp_path / "split.json"
    plain.write_text(json.dumps({"train": ["phantom_002", "phantom_000"], "val": ["phantom_001"]}))
    train, val = split_by_file(cases, plain, 0, lambda c: c.name)
    assert [c.name for c in train] == ["phantom_002", "phantom_000"] and [c.name for c in val] == ["phantom_001"]
    folds = tmp_path / "splits_final.json"
    folds.write_text(json.dumps([{"train": ["phantom_000", "phantom_001"], "val": ["phantom_002"]},
                                 {"train": ["phantom_001", "phantom_002"], "val": ["phantom_000"]}]))  # fmt: skip
    recipe = validate_recipe({"data": {"kind": "nifti", "root": str(phantom), "split_file": str(folds), "fold": 1}})
    sources = build_sources(recipe, progress=False)
    assert [c.name for c in sources.val.cases] == ["phantom_000"]
    assert [c.name for c in sources.train.cases] == ["phantom_001", "phantom_002"]
    (phantom / "splits_final.json").write_text(folds.read_text())  # relative: looked up in data.root too
    recipe = validate_recipe({"data": {"kind": "nifti", "root": str(phantom), "split_file": "splits_final.json"}})
    assert [c.name for c in build_sources(recipe, progress=False).val.cases] == ["phantom_002"]
    with pytest.raises(SamtuneError, match="data.fold=2"):
        split_by_file(cases, folds, 2, lambda c: c.name)
    plain.write_text(json.dumps({"train": ["phantom_00"], "val": ["phantom_001"]}))
    with pytest.raises(SamtuneError, match="did you mean 'phantom_00"):
        split_by_file(cases, plain, 0, lambda c: c.name)
    plain.write_text(json.dumps({"train": ["phantom_001"], "val": ["phantom_001"]}))
    with pytest.raises(SamtuneError, match="both train and val"):
        split_by_file(cases, plain, 0, lambda c: c.name)
