"""FastSAM's data export (YOLO segmentation format) and the scoring of its instance masks; the
Ultralytics trainer itself is an optional extra that the test environment does not install."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from samtune.errors import SamtuneError
from samtune.finetune import fastsam
from samtune.finetune.recipe import validate_recipe


@pytest.fixture
def recipe(phantom, tmp_path):
    return validate_recipe({"data": {"kind": "nifti", "root": str(phantom), "val_fraction": 0.5}, "model": {"name": "tiny", "image_size": 64},
                            "output": {"dir": str(tmp_path / "run")}})  # fmt: skip


def _rasterise(lines: list[str], shape: tuple[int, int], n_classes: int) -> np.ndarray:
    """YOLO polygon lines -> H×W class map (n_classes = background), as a YOLO loader would fill them."""
    h, w = shape
    out = np.full(shape, n_classes, np.int64)
    for line in lines:
        k, *xy = line.split()
        poly = np.array(xy, float).reshape(-1, 2) * [w, h] - 0.5
        canvas = np.zeros(shape, np.uint8)
        cv2.fillPoly(canvas, [np.round(poly).astype(np.int32)], 1)
        out[canvas > 0] = int(k)
    return out


def test_label_lines_describe_every_component_of_every_class():
    label = np.zeros((64, 80), np.uint8)
    cv2.circle(label, (20, 20), 9, 3, -1)  # class id 3, one component
    cv2.rectangle(label, (50, 10), (70, 30), 7, -1)  # class id 7, two components
    cv2.rectangle(label, (5, 45), (30, 60), 7, -1)
    label[0, 79] = 3  # one pixel: below MIN_COMPONENT_PX, left out
    lines = fastsam.label_lines(label, [3, 7])
    assert sorted(line.split()[0] for line in lines) == ["0", "1", "1"]
    for line in lines:
        values = np.array(line.split()[1:], float)
        assert len(values) >= 6 and len(values) % 2 == 0 and values.min() >= 0 and values.max() <= 1
    back = _rasterise(lines, label.shape, 2)
    for k, class_id in enumerate([3, 7]):
        truth = label == class_id
        truth[0, 79] = False
        iou = (truth & (back == k)).sum() / (truth | (back == k)).sum()
        assert iou > 0.9, (class_id, iou)


def test_class_map_gives_overlaps_to_the_most_confident_instance():
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2] = True  # class 1, conf 0.9
    masks[1, 1:3] = True  # class 0, conf 0.5: loses row 1 to instance 0
    masks[2, 3, 3] = True  # class 1, conf 0.3
    out = fastsam.class_map(masks, np.array([1, 0, 1]), np.array([0.9, 0.5, 0.3]), 2, (4, 4))
    assert out[:2].tolist() == [[1] * 4] * 2
    assert out[2].tolist() == [0] * 4
    assert out[3].tolist() == [2, 2, 2, 1]


def test_export_writes_the_recipe_data_in_yolo_layout(recipe, tmp_path):
    written = fastsam.export_yolo(recipe, tmp_path / "yolo", progress=False)
    root = tmp_path / "yolo"
    data = json.loads((root / "data.yaml").read_text())  # JSON is YAML: Ultralytics reads it
    assert data["train"] == "images/train" and data["val"] == "images/val"
    assert list(data["names"].values()) == written["classes"]
    for side in ("train", "val"):
        images = sorted(p.stem for p in (root / "images" / side).glob("*.png"))
        labels = sorted(p.stem for p in (root / "labels" / side).glob("*.txt"))
        assert images == labels and len(images) == written["images"][side] > 0
        assert cv2.imread(str(next((root / "images" / side).glob("*.png")))).ndim == 3
    assert written["instances"]["train"] > 0 and written["instances"]["val"] > 0
    assert json.loads((root / "export.json").read_text())["images"] == written["images"]


def test_training_without_the_extra_names_the_install_command(recipe, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ultralytics(name, *args, **kwargs):
        if name == "ultralytics" or name.startswith("ultralytics."):
            raise ImportError("No module named 'ultralytics'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ultralytics)
    with pytest.raises(SamtuneError, match=r'pip install "samtune\[fastsam\]"'):
        fastsam.run(recipe, "yolov8n-seg.yaml", tmp_path / "out", epochs=1, image_size=64, batch=2, device="cpu", conf=0.25, progress=False)
    assert not (tmp_path / "out").exists()  # failed before exporting anything


def test_cli_export_only_writes_the_yolo_folder(recipe, tmp_path, capsys):
    import yaml

    from samtune.finetune.cli import main

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    assert main(["-q", "fastsam", str(path), "--export-only", "--out", str(tmp_path / "fs")]) == 0
    root = tmp_path / "fs" / "yolo_data"
    assert capsys.readouterr().out.strip().endswith(str(root / "data.yaml"))
    assert sorted(p.name for p in root.iterdir()) == ["data.yaml", "export.json", "images", "labels"]
    assert sorted(p.name for p in (root / "images").iterdir()) == ["train", "val"]
