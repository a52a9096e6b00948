"""benchmarks/automatic_instances.py: the ceiling of automatic instances (components of a perfect
label map) on generated scenes whose parked cars touch."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
from PIL import Image

from samtune.datasets.synthetic import generate_cityscapes

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "automatic_instances.py"


def load_script():
    spec = importlib.util.spec_from_file_location("automatic_instances", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_touching_cars_cap_the_automatic_instances_and_separate_ones_do_not(tmp_path, capsys):
    script = load_script()
    root = generate_cityscapes(tmp_path / "cs", n_train=0, n_val=2, size_wh=(256, 128))
    assert script.main(["--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    result = dict(kv.split("=") for kv in re.search(r"^RESULT (.*)$", out, re.M).group(1).split())
    assert result["images"] == "2" and result["downsample"] == "1"
    instances, components = (int(v) for v in re.search(r"^car\s+\S+\s+\S+\s+(\d+)\s+(\d+)$", out, re.M).groups())
    assert components < instances and float(result["car_ap50"]) < 1  # touching cars: one component, several instances
    # the same scenes with every car but one relabelled road: the one car is one exact component
    for path in root.glob("gtFine/val/*/*_gtFine_instanceIds.png"):
        ids = np.asarray(Image.open(path)).astype(np.int64)
        labels_path = Path(str(path).replace("instanceIds", "labelIds"))
        labels = np.asarray(Image.open(labels_path)).copy()
        cars = sorted(np.unique(ids[ids // 1000 == 26]).tolist())
        keep = max(cars, key=lambda c: int((ids == c).sum()))
        others = (labels == 26) & (ids != keep)
        labels[others], ids[others] = 7, 7
        Image.fromarray(labels).save(labels_path)
        Image.fromarray(ids.astype(np.uint16)).save(path)
    assert script.main(["--data-root", str(root)]) == 0
    assert "car_ap50=1.0000" in capsys.readouterr().out
