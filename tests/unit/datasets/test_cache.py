"""datasets/cache.py: the preprocessed-case cache (reuse, invalidation, atomic entries, location, pickling)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from samtune.datasets import cache as cache_module
from samtune.datasets.nifti import NiftiSliceSource, discover_dataset, read_dataset
from samtune.finetune.data import open_split
from samtune.finetune.recipe import validate_recipe


WINDOW = (-160.0, 240.0)


def _count_loads(monkeypatch) -> list:
    calls, real = [], nib.load
    monkeypatch.setattr(nib, "load", lambda path, *a, **k: calls.append(Path(path).name) or real(path, *a, **k))
    return calls


def _entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir())


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
    sources = open_split(recipe, progress=False)
    assert sources.cache_dir == phantom / ".samtune_cache" and len(_entries(sources.cache_dir)) == 3
    assert [c.name for c in discover_dataset(phantom).cases] == ["phantom_000", "phantom_001", "phantom_002"]


def test_read_only_dataset_caches_in_the_user_cache(phantom, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module.os, "access", lambda path, mode: not str(path).startswith(str(phantom)))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_module.default_cache_dir(phantom) == tmp_path / "xdg" / "samtune"
    recipe = validate_recipe({"data": {"kind": "nifti", "root": str(phantom), "val_fraction": 0.34}})
    assert open_split(recipe, progress=False).cache_dir == tmp_path / "xdg" / "samtune"
    assert not (phantom / ".samtune_cache").exists() and len(_entries(tmp_path / "xdg" / "samtune")) == 3
