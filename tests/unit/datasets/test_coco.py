"""datasets/coco.py: COCO instances JSON (``data.kind: coco``), checked against pycocotools' own
``COCO.annToMask`` on the generated demo tree."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402

from samtune import SamtuneError  # noqa: E402
from samtune.adapters.preprocess import LongestSideTransform  # noqa: E402
from samtune.datasets import sample as S  # noqa: E402
from samtune.datasets.coco import CocoData, open_coco  # noqa: E402
from samtune.datasets.prompted import PromptedDataset  # noqa: E402
from samtune.finetune.cli import main  # noqa: E402
from samtune.finetune.recipe import PromptsSection  # noqa: E402

JSON = "annotations/instances_train2017.json"


@pytest.fixture
def root(coco_root) -> Path:
    return coco_root


def _open(root: Path, on_bad_case: str = "error"):
    return open_coco(CocoData(kind="coco", root=str(root)), seed=0, on_bad_case=on_bad_case, progress=False)


def _edit(root: Path, change) -> None:
    path = root / JSON
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_label_maps_equal_pycocotools_ann_to_mask(root):
    split = _open(root)
    for source, name in ((split.train, "train2017"), (split.val, "val2017")):
        coco = COCO(str(root / "annotations" / f"instances_{name}.json"))
        kinds = set()
        for index, image in enumerate(source.images):
            img_id = next(i for i, v in coco.imgs.items() if v["file_name"] == image.path.name)
            expected = np.zeros((image.height, image.width), np.uint8)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img_id], iscrowd=None)):  # file order: later wins
                kinds.add("polygons" if isinstance(ann["segmentation"], list) else type(ann["segmentation"]["counts"]).__name__)
                expected[coco.annToMask(ann) > 0] = 255 if ann["iscrowd"] else ann["category_id"]
            image_rgb, label = source.load(index)
            assert image_rgb.shape == (96, 128, 3) and np.array_equal(label, expected)
        assert kinds == {"polygons", "str", "list"}  # polygons, compressed and uncompressed RLE
    assert split.train.class_names == {1: "disc", 3: "tile", 7: "blob"}
    assert split.train.slice_classes(len(split.train) - 1) == {}  # the image without annotations is kept


def test_crowd_is_ignored_and_never_prompted(root):
    source = _open(root).train
    label = source.load(0)[1]
    assert (label == 255).sum() == 8 * 24 and (source.load_instances(0)[label == 255] == 0).all()
    assert 255 not in source.slice_classes(0)


def test_one_prompted_object_per_instance_touching_discs_stay_apart(root):
    source = _open(root).train
    assert source.slice_instances(0)[1] == [528, 516]  # two touching discs of class 1
    label = source.load(0)[1]
    from scipy import ndimage

    assert ndimage.label(label == 1)[1] == 1  # one connected component ...
    ds = PromptedDataset(source, LongestSideTransform(128), PromptsSection(per="instance"), min_pixels=10, training=False, seed=0)
    discs = [ds[k] for k, p in enumerate(ds.pairs) if p[:2] == (0, 1)]
    assert len(discs) == 2  # ... but two objects, each its own box
    targets = [d[S.META]["targets"][0] for d in discs]
    assert [int(t.sum()) for t in targets] == [528, 516] and not (targets[0] & targets[1]).any()
    assert discs[0][S.BOXES][0, 0] > discs[1][S.BOXES][0, 0] + 15  # the later (right) disc, whole, is the larger
    per_class = PromptedDataset(source, LongestSideTransform(128), PromptsSection(per="class"), min_pixels=10, training=False, seed=0)
    assert sum(p[:2] == (0, 1) for p in per_class.pairs) == 1
    train = PromptedDataset(source, LongestSideTransform(128), PromptsSection(per="instance"), min_pixels=10, training=True, seed=0, per_image=6)
    masks = train[0][S.MASKS].numpy().astype(bool)
    assert {int(m.sum()) for m in masks} <= {528, 516, 384, 311}  # instances, never the union 1044


def test_unknown_category_and_image_id_are_named(root):
    def change(data):
        data["annotations"][0]["category_id"] = 99
        data["annotations"].append({**data["annotations"][1], "id": 555, "image_id": 4242})

    _edit(root, change)
    with pytest.raises(SamtuneError, match="annotation id 555: image_id 4242 is not in the JSON's images"):
        _open(root)
    split = _open(root, "skip")
    problems = [(p["case"], p["file"], p["problem"]) for p in split.skipped]
    assert (None, str(root / JSON), "annotation id 555: image_id 4242 is not in the JSON's images. Fix the image_id or remove the annotation.") in problems
    assert any(p[0] == "000000000001" and p[1] == str(root / JSON) and "annotation id 1: category_id 99 is not in the JSON's categories (1, 3, 7)" in p[2] for p in problems)
    assert len(split.train) == 5  # the image with the unknown category is left out


def test_malformed_segmentation_and_layout_errors(root):
    shutil.move(root / "val2017", root / "images")
    with pytest.raises(SamtuneError, match=f"{root / 'val2017'}: no such folder"):
        _open(root)
    shutil.move(root / "images", root / "val2017")
    _edit(root, lambda d: d["annotations"][2].update(segmentation=[[1, 2, 3, 4]]))
    with pytest.raises(SamtuneError, match=r"case 000000000001: .*annotation id 3: malformed segmentation \(polygon"):
        _open(root)
    _edit(root, lambda d: d["annotations"][2].update(segmentation={"size": [96, 128], "counts": [5, 7]}))
    with pytest.raises(SamtuneError, match="RLE counts must be non-negative integers summing to"):
        _open(root)
    (root / JSON).unlink()
    with pytest.raises(SamtuneError, match=f"{root / JSON}: no such file"):
        _open(root)


def test_inspect_names_an_unknown_category(root, tmp_path, capsys):
    _edit(root, lambda d: d["annotations"][0].update(category_id=99))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"kind": "coco", "root": str(root)}, "output": {"dir": str(tmp_path / "run")}}))
    assert main(["-q", "inspect", str(recipe)]) == 2
    report = json.loads((tmp_path / "run" / "inspect.json").read_text())
    assert report["layout"] == "coco" and {"disc", "tile", "blob"} == set(report["classes"])
    assert [(p["case"], p["file"]) for p in report["problems"]] == [("000000000001", str(root / JSON))]
    assert "category_id 99" in report["problems"][0]["problem"]


def test_one_training_step_on_the_demo_recipe(tmp_path, one_torch_thread):
    recipe = Path(__file__).resolve().parents[3] / "recipes" / "general" / "coco_demo.yaml"
    overrides = [f"data.root={tmp_path / 'coco'}", "model.image_size=64", "train.steps=1", "train.eval_every=1", "train.batch_size=2",
                 "train.num_workers=0", "train.device=cpu", "eval.max_samples=4", f"output.dir={tmp_path / 'run'}"]  # fmt: skip
    assert main(["-q", "train", str(recipe), *overrides]) == 0  # generate_demo: the tree is written first
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["step"] == 1 and "prompted" in metrics and (tmp_path / "coco" / JSON).is_file()


def test_instances_follow_augmentation_and_square_resize(root):
    from samtune.adapters.sam2 import SquareResizeTransform
    from samtune.datasets.augment import build_augmentation

    source = _open(root).train
    flip = build_augmentation([{"name": "HorizontalFlip", "p": 1.0}])
    for transform in (LongestSideTransform(128), SquareResizeTransform(96)):
        ds = PromptedDataset(source, transform, PromptsSection(per="instance", box_jitter_px=0), min_pixels=10, training=True,
                             seed=0, per_image=8, augment=flip)  # fmt: skip
        sample = ds[0]
        masks = sample[S.MASKS].numpy().astype(bool)
        label = transform(image=source.load(0)[0][:, ::-1], mask=source.load(0)[1][:, ::-1])["mask"]
        for class_id, mask in zip(sample[S.META]["class_ids"], masks):
            assert (label[mask] == class_id).all()  # each object lies inside its class, flipped with the image
            assert class_id != 1 or mask.sum() < (label == 1).sum()  # a disc, never both


def test_missing_pycocotools_names_the_extra(root, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pycocotools", None)  # import pycocotools -> ImportError
    with pytest.raises(SamtuneError, match=r"pip install 'samtune\[coco\]'"):
        _open(root)
