"""datasets/splits.py: split files (train/val lists, nnU-Net folds) and fraction splits."""

from __future__ import annotations

import json

import pytest

from samtune import SamtuneError
from samtune.datasets.nifti import discover_dataset
from samtune.datasets.splits import read_split_file, resolve_split_file, split_by_file, split_by_fraction
from samtune.finetune.recipe import validate_recipe


def test_split_file_train_val_and_nnunet_folds(phantom, tmp_path):
    from samtune.finetune.data import open_split

    cases = discover_dataset(phantom).cases
    plain = tmp_path / "split.json"
    plain.write_text(json.dumps({"train": ["phantom_002", "phantom_000"], "val": ["phantom_001"]}))
    train, val = split_by_file(cases, plain, 0, lambda c: c.name)
    assert [c.name for c in train] == ["phantom_002", "phantom_000"] and [c.name for c in val] == ["phantom_001"]
    folds = tmp_path / "splits_final.json"
    folds.write_text(json.dumps([{"train": ["phantom_000", "phantom_001"], "val": ["phantom_002"]},
                                 {"train": ["phantom_001", "phantom_002"], "val": ["phantom_000"]}]))  # fmt: skip
    recipe = validate_recipe({"data": {"kind": "nifti", "root": str(phantom), "split_file": str(folds), "fold": 1}})
    sources = open_split(recipe, progress=False)
    assert [c.name for c in sources.val.cases] == ["phantom_000"]
    assert [c.name for c in sources.train.cases] == ["phantom_001", "phantom_002"]
    (phantom / "splits_final.json").write_text(folds.read_text())  # relative: looked up in data.root too
    recipe = validate_recipe({"data": {"kind": "nifti", "root": str(phantom), "split_file": "splits_final.json"}})
    assert [c.name for c in open_split(recipe, progress=False).val.cases] == ["phantom_002"]
    with pytest.raises(SamtuneError, match="data.fold=2"):
        split_by_file(cases, folds, 2, lambda c: c.name)
    plain.write_text(json.dumps({"train": ["phantom_00"], "val": ["phantom_001"]}))
    with pytest.raises(SamtuneError, match="did you mean 'phantom_00"):
        split_by_file(cases, plain, 0, lambda c: c.name)
    plain.write_text(json.dumps({"train": ["phantom_001"], "val": ["phantom_001"]}))
    with pytest.raises(SamtuneError, match="both train and val"):
        split_by_file(cases, plain, 0, lambda c: c.name)


def _named(*names):
    return [type("Item", (), {"name": n})() for n in names]


def test_fraction_split_is_seeded_sorted_and_never_leaves_a_side_empty():
    items = _named("e", "a", "d", "b", "c")
    train, val = split_by_fraction(items, 0.4, seed=3, name=lambda i: i.name)
    assert len(val) == 2 and len(train) == 3 and {i.name for i in train} | {i.name for i in val} == set("abcde")
    assert [i.name for i in val] == sorted(i.name for i in val) and [i.name for i in train] == sorted(i.name for i in train)
    again = split_by_fraction(items, 0.4, seed=3, name=lambda i: i.name)
    assert [i.name for i in again[1]] == [i.name for i in val]
    tiny_train, tiny_val = split_by_fraction(_named("a", "b"), 0.01, seed=0, name=lambda i: i.name)  # rounds to 0
    assert len(tiny_train) == len(tiny_val) == 1
    with pytest.raises(SamtuneError, match="at least 2 cases"):
        split_by_fraction(_named("a"), 0.5, seed=0, name=lambda i: i.name)


def test_split_file_is_found_beside_the_data_and_bad_files_are_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    root.mkdir()
    (root / "split.json").write_text(json.dumps({"train": ["a"], "val": ["b"]}))
    assert resolve_split_file("split.json", root) == root / "split.json"  # not in the cwd: the dataset folder
    with pytest.raises(SamtuneError, match="no such file"):
        resolve_split_file("nope.json", root)
    bad = root / "bad.json"
    for text, message in [("{not json", "not a readable JSON"), ('{"train": ["a"]}', "expected"),
                          ('{"train": [], "val": ["b"]}', "train list is empty"), ("[]", "list of folds is empty")]:  # fmt: skip
        bad.write_text(text)
        with pytest.raises(SamtuneError, match=message) as info:
            read_split_file(bad, 0)
        assert str(bad) in str(info.value)
