"""Mapillary Vistas: the layout as it unzips, classes read from the dataset's config, labels with
`evaluate: false` ignored (255), palette PNGs read as label values, and what a wrong layout or an
unknown label value says."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from samtune import SamtuneError
from samtune.constants import IGNORE_INDEX
from samtune.datasets.driving_demo import generate_mapillary
from samtune.datasets.mapillary import MapillarySource, read_classes
from samtune.finetune.cli import main


def _label(root: Path, split: str = "training", version: str = "v2.0") -> Path:
    return sorted((root / split / version / "labels").glob("*.png"))[0]


def _rewrite(path: Path, values: np.ndarray) -> None:
    """Save ``values`` as a palette PNG, keeping the file's colours (padded to 256: PIL writes a
    shorter palette with fewer bits per pixel, which would wrap larger values)."""
    with Image.open(path) as img:
        palette = img.getpalette()
    out = Image.fromarray(values.astype(np.uint8), mode="P")
    out.putpalette(palette + [0] * (768 - len(palette)))
    out.save(path)


def test_reads_the_v2_layout_with_classes_from_its_config(mapillary_root):
    src = MapillarySource(mapillary_root, "training")
    config = json.loads((mapillary_root / "config_v2.0.json").read_text())["labels"]
    evaluated = {v: e["readable"] for v, e in enumerate(config) if e["evaluate"]}
    assert src.class_names == evaluated and len(src) == 2 and len(MapillarySource(mapillary_root, "validation")) == 2
    with Image.open(_label(mapillary_root)) as img:
        assert img.mode == "P"  # palette PNG: the values are indices, not the RGB of the palette
        on_disk = np.asarray(img)
    image, label = src.load(0)
    assert image.shape == (64, 128, 3) and label.shape == (64, 128) and src.item_id(0) == _label(mapillary_root).stem
    kept = np.isin(on_disk, list(evaluated))
    np.testing.assert_array_equal(label[kept], on_disk[kept])  # label values as they are
    assert (label[~kept] == IGNORE_INDEX).all() and (~kept).any()  # evaluate: false -> 255
    counts = src.slice_classes(0)
    assert set(counts) <= set(evaluated) and sum(counts.values()) == int(kept.sum())
    space = src.label_space([0, 6])
    assert space.names == ["Road", "Car"] and space.file_values() == [0, 6] and space.file_background == len(config) - 1  # "Unlabeled"


def test_config_drives_the_classes(mapillary_root):
    path = mapillary_root / "config_v2.0.json"
    config = json.loads(path.read_text())
    config["labels"][6]["evaluate"] = False  # Car no longer evaluated
    config["labels"][0]["readable"] = "Street"
    path.write_text(json.dumps(config))
    classes = read_classes(mapillary_root, "v2.0")
    assert 6 not in classes.names and classes.names[0] == "Street" and classes.n_values == 9 and classes.unlabeled == 8
    src = MapillarySource(mapillary_root, "training")
    assert all(6 not in src.slice_classes(i) for i in range(len(src)))
    assert not (src.load_label(0) == 6).any()


def test_v1_2_layouts(mapillary_root):
    for split in ("training", "validation"):  # the v2.0 download: {split}/v1.2/labels; v1.x: {split}/labels
        (mapillary_root / split / "v2.0").rename(mapillary_root / split / ("v1.2" if split == "training" else "x"))
        if split == "validation":
            (mapillary_root / split / "x" / "labels").rename(mapillary_root / split / "labels")
    (mapillary_root / "config_v2.0.json").rename(mapillary_root / "config.json")
    assert len(MapillarySource(mapillary_root, "training", version="v1.2")) == 2
    assert len(MapillarySource(mapillary_root, "validation", version="v1.2")) == 2


def test_wrong_layout_names_the_expected_paths(tmp_path, mapillary_root):
    pattern = r"\{split\}/images/\*\.jpg with \{split\}/\{version\}/labels/\*\.png and config_\{version\}\.json"
    with pytest.raises(SamtuneError, match=r"config_v2\.0\.json: no such file.*" + pattern):
        MapillarySource(tmp_path, "training")
    with pytest.raises(SamtuneError, match=r"v1\.2/labels: no such folder.*" + pattern):
        MapillarySource(mapillary_root, "training", version="v1.2", classes=read_classes(mapillary_root, "v2.0"))
    _label(mapillary_root).unlink()
    with pytest.raises(SamtuneError, match="label file .* is missing"):
        MapillarySource(mapillary_root, "training")
    assert len(MapillarySource(mapillary_root, "training", on_bad_case="skip")) == 1


def test_rgb_label_is_refused(mapillary_root):
    label = _label(mapillary_root)
    Image.open(label).convert("RGB").save(label)
    with pytest.raises(SamtuneError, match="a RGB label PNG .* 8-bit palette PNGs of label values"):
        MapillarySource(mapillary_root, "training")


def _inspect(tmp_path: Path, root: Path) -> tuple[int, dict]:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"kind": "mapillary", "root": str(root)}, "output": {"dir": str(tmp_path / "run")}}))
    code = main(["-q", "inspect", str(recipe)])
    return code, json.loads((tmp_path / "run" / "inspect.json").read_text())


def test_inspect_names_an_unknown_label_value(mapillary_root, tmp_path):
    code, report = _inspect(tmp_path, mapillary_root)
    assert code == 0 and report["layout"] == "mapillary" and report["slices"]["total"] == 4 and not report["warnings"]
    label = _label(mapillary_root)
    values = np.asarray(Image.open(label)).copy()
    values[:2, :3] = 40  # the config has 9 labels: 0..8
    _rewrite(label, values)
    code, report = _inspect(tmp_path, mapillary_root)
    assert code == 2 and [p["file"] for p in report["problems"]] == [str(label)] and report["slices"]["total"] == 3
    assert "holds values [40] (6 px) outside the 9 labels of config_v2.0.json" in report["problems"][0]["problem"]


def test_demo_tree_is_deterministic(tmp_path):
    a = generate_mapillary(tmp_path / "a", n_train=1, n_val=1, size_wh=(64, 32), seed=3)
    b = generate_mapillary(tmp_path / "b", n_train=1, n_val=1, size_wh=(64, 32), seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and len(files) == 7  # 2 jpg, 2 png, 2 markers, config
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
