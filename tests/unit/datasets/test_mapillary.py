"""Mapillary Vistas: the layout as it unzips, classes read from the dataset's config, labels with
`evaluate: false` ignored (255), palette PNGs read as label values, and what a wrong layout or an
unknown label value says; `data.cityscapes_classes` checked against the Vistas v1.2 -> Cityscapes
table applied by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from samtune import SamtuneError
from samtune.constants import IGNORE_INDEX
from samtune.datasets.cityscapes import CLASS_NAMES, CLASS_SPACE, cityscapes_label_space
from samtune.datasets.driving_demo import generate_mapillary
from samtune.datasets.mapillary import VISTAS_TO_CITYSCAPES, MapillaryData, MapillarySource, open_mapillary, open_mapillary_images, read_classes
from samtune.finetune.cli import main

# The Vistas v1.2 -> Cityscapes table as published (matejgrcic/Vistas-NP, make_vistas_np.py's
# vistas_to_cityscapes), typed out again here; every other label is 255.
TABLE = dict(pair.split(": ") for pair in (
    "construction--barrier--curb: sidewalk; construction--barrier--fence: fence; construction--barrier--guard-rail: fence; "
    "construction--barrier--wall: wall; construction--flat--bike-lane: road; construction--flat--crosswalk-plain: road; "
    "construction--flat--curb-cut: sidewalk; construction--flat--parking: road; construction--flat--pedestrian-area: sidewalk; "
    "construction--flat--rail-track: road; construction--flat--road: road; construction--flat--service-lane: road; "
    "construction--flat--sidewalk: sidewalk; construction--structure--bridge: building; construction--structure--building: building; "
    "construction--structure--tunnel: building; human--person: person; human--rider--bicyclist: rider; "
    "human--rider--motorcyclist: rider; human--rider--other-rider: rider; marking--crosswalk-zebra: road; marking--general: road; "
    "nature--sand: terrain; nature--sky: sky; nature--snow: terrain; nature--terrain: terrain; nature--vegetation: vegetation; "
    "object--support--pole: pole; object--support--traffic-sign-frame: traffic sign; object--support--utility-pole: pole; "
    "object--traffic-light: traffic light; object--traffic-sign--front: traffic sign; object--vehicle--bicycle: bicycle; "
    "object--vehicle--bus: bus; object--vehicle--car: car; object--vehicle--motorcycle: motorcycle; "
    "object--vehicle--on-rails: train; object--vehicle--truck: truck"
).split("; "))
# Cityscapes trainIds 0..18 in the official order (cityscapesScripts' labels.py)
CITYSCAPES_19 = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
                 "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")  # fmt: skip


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
    assert 6 not in classes.names and classes.names[0] == "Street" and classes.n_values == 12 and classes.unlabeled == 11
    src = MapillarySource(mapillary_root, "training")
    assert all(6 not in src.slice_classes(i) for i in range(len(src)))
    assert not (src.load_label(0) == 6).any()


def test_v1_2_layouts(mapillary_root):
    v12 = MapillarySource(mapillary_root, "training", version="v1.2")  # the v2.0 download: {split}/v1.2/labels
    assert len(v12) == 2 and v12.labels[0].parent == mapillary_root / "training" / "v1.2" / "labels"
    assert v12.class_names[9] == "Car" == MapillarySource(mapillary_root, "training").class_names[6]  # each config its own values
    (mapillary_root / "validation" / "v1.2" / "labels").rename(mapillary_root / "validation" / "labels")  # the v1.x download
    (mapillary_root / "config_v1.2.json").rename(mapillary_root / "config.json")
    assert len(MapillarySource(mapillary_root, "validation", version="v1.2")) == 2


def test_wrong_layout_names_the_expected_paths(tmp_path, mapillary_root):
    pattern = r"\{split\}/images/\*\.jpg with \{split\}/\{version\}/labels/\*\.png and config_\{version\}\.json"
    with pytest.raises(SamtuneError, match=r"config_v2\.0\.json: no such file.*" + pattern):
        MapillarySource(tmp_path, "training")
    shutil.rmtree(mapillary_root / "training" / "v1.2")
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
    values[:2, :3] = 40  # the config has 12 labels: 0..11
    _rewrite(label, values)
    code, report = _inspect(tmp_path, mapillary_root)
    assert code == 2 and [p["file"] for p in report["problems"]] == [str(label)] and report["slices"]["total"] == 3
    assert "holds values [40] (6 px) outside the 12 labels of config_v2.0.json" in report["problems"][0]["problem"]


def test_demo_tree_is_deterministic(tmp_path):
    a = generate_mapillary(tmp_path / "a", n_train=1, n_val=1, size_wh=(64, 32), seed=3)
    b = generate_mapillary(tmp_path / "b", n_train=1, n_val=1, size_wh=(64, 32), seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and len(files) == 10  # 2 jpg, 4 png, 2 markers, 2 configs
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_demo_v1_2_config_has_official_v1_2_names_the_table_maps(tmp_path):
    root = generate_mapillary(tmp_path / "m", n_train=1, n_val=1, size_wh=(64, 32))
    labels = {v: json.loads((root / f"config_{v}.json").read_text())["labels"] for v in ("v1.2", "v2.0")}
    v12 = [e["name"] for e in labels["v1.2"]]
    assert v12 == sorted(v12) and "human--person" in v12 and "human--person--individual" in [e["name"] for e in labels["v2.0"]]
    assert {n for n in v12 if not n.startswith("void--")} <= set(TABLE)


# ------------------------------------------- data.cityscapes_classes -------------------------------------------

def _section(root: Path, **keys) -> MapillaryData:
    return MapillaryData(kind="mapillary", root=str(root), **{"version": "v1.2", "cityscapes_classes": True, **keys})


def _add_labels(root: Path, names: list[str]) -> list[int]:
    """Append labels to config_v1.2.json (values past the demo's) and paint a 4×4 patch of each,
    side by side at the top left, into the first training label; returns their values."""
    path = root / "config_v1.2.json"
    config = json.loads(path.read_text())
    first = len(config["labels"])
    config["labels"] += [{"name": n, "readable": n.split("--")[-1].title(), "color": [9, 9, 9], "instances": False, "evaluate": True} for n in names]
    path.write_text(json.dumps(config))
    label = _label(root, version="v1.2")
    values = np.asarray(Image.open(label)).copy()
    for k in range(len(names)):
        values[:4, 4 * k: 4 * k + 4] = first + k
    _rewrite(label, values)
    return list(range(first, first + len(names)))


def test_cityscapes_classes_equal_the_table_applied_by_hand(mapillary_root):
    assert VISTAS_TO_CITYSCAPES == TABLE and tuple(CLASS_NAMES.values()) == CITYSCAPES_19
    # many-to-one (marking--general -> road, guard-rail -> fence) and a label the table leaves out (trash can)
    added = _add_labels(mapillary_root, ["marking--general", "construction--barrier--guard-rail", "object--trash-can"])
    names = [e["name"] for e in json.loads((mapillary_root / "config_v1.2.json").read_text())["labels"]]
    by_hand = np.full(256, IGNORE_INDEX, np.uint8)  # label value -> trainId, from the config's names and the table
    for value, name in enumerate(names):
        if name in TABLE:
            by_hand[value] = CITYSCAPES_19.index(TABLE[name])
    src = MapillarySource(mapillary_root, "training", version="v1.2", cityscapes_classes=True)
    assert src.class_names == CLASS_NAMES
    for i in range(len(src)):
        with Image.open(src.labels[i]) as img:
            on_disk = np.asarray(img)
        expected = by_hand[on_disk]
        np.testing.assert_array_equal(src.load_label(i), expected)
        present, counts = np.unique(expected[expected != IGNORE_INDEX], return_counts=True)
        assert src.slice_classes(i) == dict(zip(present.tolist(), counts.tolist()))
    with Image.open(src.labels[0]) as img:  # the painted patches: road, fence, ignored
        assert [int(np.asarray(img)[0, 4 * k]) for k in range(3)] == added
    assert [int(src.load(0)[1][0, 4 * k]) for k in range(3)] == [0, 4, IGNORE_INDEX]
    assert {0, 1, 2, 10, 13} <= {c for i in range(len(src)) for c in src.slice_classes(i)}  # road, sidewalk, building, sky, car


def test_cityscapes_classes_share_cityscapes_label_space_and_protocol(mapillary_root):
    src = MapillarySource(mapillary_root, "validation", version="v1.2", cityscapes_classes=True)
    assert src.label_space([0, 5, 13]) == cityscapes_label_space([0, 5, 13])
    assert src.label_space([0, 13]).file_values() == [7, 26]  # predictions written as Cityscapes labelIds
    split = open_mapillary(_section(mapillary_root), seed=0, on_bad_case="error")
    assert split.train.class_names == split.val.class_names == CLASS_NAMES
    subset = _section(mapillary_root).scored_subset()
    assert subset["class_space"].startswith(CLASS_SPACE) and "Vistas v1.2" in subset["class_space"] and subset["version"] == "v1.2"
    images = open_mapillary_images(_section(mapillary_root), [str(mapillary_root / "validation" / "images")])
    assert images.class_names == CLASS_NAMES


def test_cityscapes_classes_with_v2_0_are_refused(mapillary_root):
    for open_section in (lambda s: open_mapillary(s, seed=0, on_bad_case="error"),
                         lambda s: open_mapillary_images(s, [str(mapillary_root / "validation" / "images")])):  # fmt: skip
        with pytest.raises(SamtuneError, match=r"covers the v1\.2 labels only.*Set data\.version: v1\.2"):
            open_section(_section(mapillary_root, version="v2.0"))


def test_a_config_with_none_of_the_table_names_is_refused(mapillary_root):
    path = mapillary_root / "config_v1.2.json"
    config = json.loads(path.read_text())
    for entry in config["labels"]:  # a few table names missing is fine ...
        if entry["name"] in ("nature--terrain", "object--support--pole"):
            entry["name"] += "--other"
    path.write_text(json.dumps(config))
    assert len(MapillarySource(mapillary_root, "training", version="v1.2", cityscapes_classes=True)) == 2
    for entry in config["labels"]:  # ... none at all is another label set
        entry["name"] = "my--" + entry["name"]
    path.write_text(json.dumps(config))
    with pytest.raises(SamtuneError, match=r"config_v1\.2\.json: none of its 12 label names is one of the 38 .*not a Vistas v1\.2 config"):
        open_mapillary(_section(mapillary_root), seed=0, on_bad_case="error")
    assert len(MapillarySource(mapillary_root, "training", version="v1.2")) == 2  # without the option: its own classes


def test_cityscapes_classes_still_name_an_unknown_label_value(mapillary_root):
    label = _label(mapillary_root, version="v1.2")
    values = np.asarray(Image.open(label)).copy()
    values[:1, :5] = 200
    _rewrite(label, values)
    with pytest.raises(SamtuneError, match=r"holds values \[200\] \(5 px\) outside the 12 labels of config_v1\.2\.json"):
        MapillarySource(mapillary_root, "training", version="v1.2", cityscapes_classes=True)
    src = MapillarySource(mapillary_root, "training", on_bad_case="skip", version="v1.2", cityscapes_classes=True)
    assert len(src) == 1 and [s["file"] for s in src.skipped] == [str(label)]


def test_without_the_option_v1_2_keeps_its_own_classes(mapillary_root):
    config = json.loads((mapillary_root / "config_v1.2.json").read_text())["labels"]
    src = MapillarySource(mapillary_root, "training", version="v1.2")
    evaluated = {v: e["readable"] for v, e in enumerate(config) if e["evaluate"]}
    assert src.class_names == evaluated and not MapillaryData(kind="mapillary", root=str(mapillary_root)).cityscapes_classes
    with Image.open(src.labels[0]) as img:
        on_disk = np.asarray(img)
    kept = np.isin(on_disk, list(evaluated))
    np.testing.assert_array_equal(src.load_label(0)[kept], on_disk[kept])
    assert src.label_space([9]).file_values() == [9] and "config_v1.2.json labels" in _section(mapillary_root, cityscapes_classes=False).scored_subset()["class_space"]
