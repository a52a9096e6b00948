"""``samtune inspect``: the exact JSON report, exit status 0 on good data and 2 on bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from samtune.datasets.synthetic import generate_cityscapes
from samtune.finetune.cli import main

KEYS = {"kind", "layout", "root", "cache_dir", "volumetric", "cases", "slices", "classes", "spacing_mm", "orientation", "intensity", "problems", "warnings", "notes"}


def _recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": data, "output": {"dir": str(tmp_path / "run")}}))
    return path


def test_inspect_good_nifti_dataset(phantom, tmp_path, capsys):
    recipe = _recipe(tmp_path, {"kind": "nifti", "root": str(phantom), "val_fraction": 0.34, "intensity": "ct_abdomen"})
    assert main(["-q", "inspect", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "no problems" in out and "liver" in out and "LPS: 3" in out
    report = json.loads((tmp_path / "run" / "inspect.json").read_text())  # default: <output.dir>/inspect.json
    assert set(report) == KEYS
    assert report["kind"] == "nifti" and report["volumetric"] and report["layout"] == "nnunet_v2" and report["root"] == str(phantom)
    assert report["cache_dir"] == str(phantom / ".samtune_cache")
    assert sorted(report["cases"]["train"] + report["cases"]["val"]) == ["phantom_000", "phantom_001", "phantom_002"]
    assert len(report["cases"]["val"]) == 1
    assert set(report["slices"]) == {"total", "with_foreground", "train", "val"}
    assert report["slices"]["total"] == 36 and 0 < report["slices"]["with_foreground"] <= 36
    assert report["slices"]["train"] + report["slices"]["val"] == report["slices"]["with_foreground"]  # empty_slice_ratio 0
    assert list(report["classes"]) == ["liver", "spleen", "kidney_right", "kidney_left"]
    for c in report["classes"].values():
        assert set(c) == {"id", "voxels", "slices", "cases"} and c["voxels"] > 0 and c["cases"] == 3
    assert report["classes"]["liver"]["id"] == 1
    assert report["spacing_mm"] == {"min": [3.0, 3.0, 5.0], "median": [3.0, 3.0, 5.0], "max": [3.0, 3.0, 5.0]}
    assert report["orientation"] == {"LPS": 3} and report["intensity"] == "ct_abdomen"
    assert report["problems"] == [] and report["warnings"] == [] and report["notes"] == []


def test_inspect_bad_nifti_dataset_exits_2_and_lists_the_problem(phantom, tmp_path, capsys):
    victim = phantom / "imagesTr" / "phantom_001_0000.nii.gz"
    victim.write_bytes(victim.read_bytes()[:300])  # truncated
    (phantom / "imagesTr" / "._phantom_000_0000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    out_file = tmp_path / "report.json"
    recipe = _recipe(tmp_path, {"kind": "nifti", "root": str(phantom), "val_fraction": 0.34})
    assert main(["-q", "inspect", str(recipe), "data.min_pixels=5", "--out", str(out_file)]) == 2
    captured = capsys.readouterr()
    assert "problems found" in captured.out and str(victim) in captured.out and "Traceback" not in captured.err
    report = json.loads(out_file.read_text())
    assert set(report) == KEYS
    assert [p["case"] for p in report["problems"]] == ["phantom_001"] and report["problems"][0]["file"] == str(victim)
    assert "phantom_001" not in report["cases"]["train"] + report["cases"]["val"]
    assert len(report["notes"]) == 1 and "macOS" in report["notes"][0]


def test_inspect_fatal_problem_still_writes_the_report(tmp_path, capsys):
    recipe = _recipe(tmp_path, {"kind": "nifti", "root": str(tmp_path / "nowhere")})
    assert main(["-q", "inspect", str(recipe)]) == 2
    report = json.loads((tmp_path / "run" / "inspect.json").read_text())
    assert set(report) == KEYS and "no such folder" in report["problems"][0]["problem"]


def test_inspect_cityscapes_and_folder2d(tmp_path, capsys):
    cs = generate_cityscapes(tmp_path / "cs", n_train=2, n_val=1, size_wh=(128, 64))
    recipe = _recipe(tmp_path, {"kind": "cityscapes", "root": str(cs)})
    assert main(["-q", "inspect", str(recipe)]) == 0
    report = json.loads((tmp_path / "run" / "inspect.json").read_text())
    assert set(report) == KEYS and report["layout"] == "cityscapes" and report["spacing_mm"] is None
    assert report["cases"]["val"] == ["frankfurt_000000_000019"] and report["slices"]["total"] == 3
    assert {"road", "car", "sky"} <= {n for n, c in report["classes"].items() if c["voxels"] > 0}

    from PIL import Image

    root = tmp_path / "xray"
    for i in range(3):
        for sub in ("images", "labels"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 20), 80 + i, np.uint8)).save(root / "images" / f"p{i}.png")
        label = np.zeros((20, 20), np.uint8)
        label[5:15, 5:15] = 1
        Image.fromarray(label).save(root / "labels" / f"p{i}.png")
    label[0, 0] = 3
    Image.fromarray(label).save(root / "labels" / "p1.png")
    recipe = _recipe(tmp_path, {"kind": "folder2d", "root": str(root), "class_names": {1: "lung"}, "val_fraction": 0.34})
    assert main(["-q", "inspect", str(recipe)]) == 2
    report = json.loads((tmp_path / "run" / "inspect.json").read_text())
    assert report["layout"] == "folder2d" and report["classes"] == {"lung": {"id": 1, "voxels": 200, "slices": 2, "cases": 2}}
    assert [p["file"] for p in report["problems"]] == [str(root / "labels" / "p1.png")]


def test_inspect_help():
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "--help"])
    assert exc.value.code == 0
