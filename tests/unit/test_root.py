"""The root package's shared helpers: atomic files and did-you-mean."""

from __future__ import annotations

import json
import math

import pytest

from samtune.files import write_atomic, write_json_atomic
from samtune.suggest import closest, did_you_mean


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "metrics.json", {"miou": 0.5, "hd95_mm": math.nan})
    assert json.loads(path.read_text().replace("NaN", "null")) == {"miou": 0.5, "hd95_mm": None}
    write_atomic(path, "second")
    assert path.read_text() == "second" and sorted(p.name for p in path.parent.iterdir()) == ["metrics.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = write_atomic(tmp_path / "recipe.yaml", "old")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("samtune.files.os.fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]


def test_did_you_mean():
    assert did_you_mean("encoder_qvk", ["encoder_qkv", "decoder_attention"]) == "did you mean `encoder_qkv`? "
    assert did_you_mean("zzz", ["encoder_qkv"]) == "" and closest("nifty", ["nifti", "folder2d"]) == "nifti"
