"""BDD100K semantic segmentation: the layout as it unzips, trainId masks, 255 ignored, and what
`samtune inspect` says about a wrong layout or an unknown class id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from samtune import SamtuneError
from samtune.datasets.bdd100k import Bdd100kSource
from samtune.datasets.cityscapes import CLASS_NAMES, IGNORE_INDEX
from samtune.datasets.driving_demo import generate_bdd100k
from samtune.finetune.cli import main


def _mask(root: Path, split: str = "train") -> Path:
    return sorted((root / "labels" / "sem_seg" / "masks" / split).glob("*.png"))[0]


def test_reads_images_and_masks_as_they_unzip(bdd_root):
    src = Bdd100kSource(bdd_root, "train")
    assert len(src) == 2 and src.class_names == CLASS_NAMES and len(CLASS_NAMES) == 19
    image, label = src.load(0)
    assert image.shape == (64, 128, 3) and image.dtype == np.uint8 and label.shape == (64, 128)
    on_disk = np.asarray(Image.open(_mask(bdd_root)))
    np.testing.assert_array_equal(label, on_disk)  # trainIds as they are: no labelId mapping
    assert src.item_id(0) == _mask(bdd_root).stem and src.prediction_name(0) == f"{src.item_id(0)}.png"
    counts = src.slice_classes(0)
    assert IGNORE_INDEX not in counts and set(counts) <= set(range(19)) and {0, 2, 10, 13} <= set(counts)  # road building sky car
    assert sum(counts.values()) == int((on_disk != IGNORE_INDEX).sum())
    assert src.label_space([0, 13]).file_values() == [7, 26]  # predictions written as Cityscapes labelIds
    assert src.consistency_problems() == [] and len(Bdd100kSource(bdd_root, "val")) == 1


def test_wrong_layout_names_the_expected_paths(tmp_path, bdd_root):
    with pytest.raises(SamtuneError, match=r"images/10k/\{train,val\}/\*\.jpg with labels/sem_seg/masks"):
        Bdd100kSource(tmp_path, "train")
    with pytest.raises(SamtuneError, match="no such folder"):
        Bdd100kSource(bdd_root / "images", "train")  # one level too deep
    _mask(bdd_root).unlink()
    with pytest.raises(SamtuneError, match="mask .* is missing"):
        Bdd100kSource(bdd_root, "train")
    assert len(Bdd100kSource(bdd_root, "train", on_bad_case="skip")) == 1


def test_value_outside_the_trainids_is_refused(bdd_root):
    mask = _mask(bdd_root)
    values = np.asarray(Image.open(mask)).copy()
    values[:2, :3] = 40
    Image.fromarray(values).save(mask)
    with pytest.raises(SamtuneError, match=r"holds values \[40\] \(6 px\) that are not Cityscapes trainIds"):
        Bdd100kSource(bdd_root, "train")


def _inspect(tmp_path: Path, root: Path) -> tuple[int, dict]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"kind": "bdd100k", "root": str(root)}, "output": {"dir": str(tmp_path / "run")}}))
    code = main(["-q", "inspect", str(recipe)])
    return code, json.loads((tmp_path / "run" / "inspect.json").read_text())


def test_inspect_names_unknown_class_ids_and_wrong_layouts(bdd_root, tmp_path, capsys):
    code, report = _inspect(tmp_path, bdd_root)
    assert code == 0 and report["layout"] == "bdd100k" and report["slices"]["total"] == 3 and not report["warnings"]
    mask = _mask(bdd_root)
    values = np.asarray(Image.open(mask)).copy()
    values[0, 0] = 19
    Image.fromarray(values).save(mask)
    code, report = _inspect(tmp_path, bdd_root)
    assert code == 2 and [p["file"] for p in report["problems"]] == [str(mask)]
    assert "[19]" in report["problems"][0]["problem"] and report["slices"]["total"] == 2
    code, report = _inspect(tmp_path, bdd_root / "labels")
    assert code == 2 and "images/10k/{train,val}/*.jpg" in report["problems"][0]["problem"]


def test_demo_tree_is_deterministic(tmp_path):
    a = generate_bdd100k(tmp_path / "a", n_train=1, n_val=1, size_wh=(64, 32), seed=3)
    b = generate_bdd100k(tmp_path / "b", n_train=1, n_val=1, size_wh=(64, 32), seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*.*"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.*")) and len(files) == 6  # 2 jpg, 2 png, 2 markers
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
