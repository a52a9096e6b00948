"""A small synthetic COCO tree for ``samtune demo-data --kind coco`` and the tests: every way the
format stores a segmentation, in a few 128×96 images.

``{out}/annotations/instances_{train,val}2017.json`` + ``{out}/{train,val}2017/*.jpg``. Categories
1 ``disc`` (ellipses as polygons), 3 ``tile`` (rectangles as compressed RLE strings) and 7 ``blob``
(two ellipses as a two-polygon annotation); ids with gaps, as COCO's own. Each image has one crowd
region (uncompressed RLE, ``iscrowd: 1``, as COCO stores crowds), the first image of each split
two touching discs, and the last training image no annotations. The image is painted from the
decoded masks, so its edges are exactly the label edges.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from samtune.datasets.coco_masks import annotation_mask, mask_api

CATEGORIES = {1: "disc", 3: "tile", 7: "blob"}
_COLOURS = {1: (220, 60, 50), 3: (40, 170, 70), 7: (60, 80, 210), 0: (200, 200, 200)}
SIZE_WH = (128, 96)


def ellipse_polygon(cx: float, cy: float, rx: float, ry: float, n: int = 20) -> list[float]:
    """A flat [x1, y1, x2, y2, ...] polygon of ``n`` vertices on an ellipse, in px."""
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.round(np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).ravel(), 2).tolist()


def _rle(mask: np.ndarray, compressed: bool) -> dict:
    """A bool mask as COCO RLE: compressed (``counts`` a string, pycocotools' encoding) or
    uncompressed (``counts`` a list of run lengths, column-major, starting with zeros)."""
    if compressed:
        rle = mask_api().encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
    flat = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + runs}


def _annotations(rng: np.random.Generator, i: int, w: int, h: int) -> list[tuple[int, dict, int]]:
    """(category id, segmentation, iscrowd) of one image, in painting order."""
    anns = []
    if i == 0:  # two touching discs of one class: two objects, not one component
        anns += [(1, [ellipse_polygon(30, 40, 14, 12)], 0), (1, [ellipse_polygon(56, 40, 14, 12)], 0)]
    else:
        anns.append((1, [ellipse_polygon(rng.uniform(20, 50), rng.uniform(20, 70), rng.uniform(8, 16), rng.uniform(8, 14))], 0))
    x0, y0 = int(rng.integers(70, 90)), int(rng.integers(10, 40))
    tile = np.zeros((h, w), bool)
    tile[y0 : y0 + int(rng.integers(14, 24)), x0 : x0 + int(rng.integers(14, 28))] = True
    anns.append((3, _rle(tile, compressed=True), 0))
    bx, by = rng.uniform(40, 90), rng.uniform(70, 82)
    anns.append((7, [ellipse_polygon(bx, by, 10, 6), ellipse_polygon(bx + 22, by, 8, 5)], 0))
    crowd = np.zeros((h, w), bool)
    crowd[2:10, 100:124] = True  # a crowd strip, top right: ignored, never prompted
    anns.append((1, _rle(crowd, compressed=False), 1))
    return anns


def _write_split(root: Path, split: str, n_images: int, rng: np.random.Generator, empty_last: bool, first_ids: tuple[int, int]) -> None:
    w, h = SIZE_WH
    (root / split).mkdir(parents=True)
    images, annotations = [], []
    image_id, ann_id = first_ids
    for i in range(n_images):
        anns = [] if empty_last and i == n_images - 1 else _annotations(rng, i, w, h)
        rgb = np.empty((h, w, 3), np.float32)
        rgb[:] = _COLOURS[0]
        for cid, seg, crowd in anns:
            mask = annotation_mask(seg, h, w)
            rgb[mask] = (120, 120, 120) if crowd else _COLOURS[cid]
        rgb += rng.normal(0.0, 8.0, rgb.shape)
        name = f"{image_id:012d}.jpg"  # COCO's own naming
        Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8)).save(root / split / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        for cid, seg, crowd in anns:
            area = int(annotation_mask(seg, h, w).sum())
            ys, xs = np.nonzero(annotation_mask(seg, h, w))
            bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
            annotations.append({"id": ann_id, "image_id": image_id, "category_id": cid, "segmentation": seg,
                                "area": area, "bbox": bbox, "iscrowd": crowd})  # fmt: skip
            ann_id += 1
        image_id += 1
    (root / "annotations").mkdir(exist_ok=True)
    categories = [{"id": k, "name": v, "supercategory": "shape"} for k, v in CATEGORIES.items()]
    data = {"info": {"description": "samtune synthetic COCO demo"}, "images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def generate_coco(out_dir, n_train: int = 6, n_val: int = 3, seed: int = 0) -> Path:
    """Write the tree (see the module doc) to ``out_dir`` (must not exist; written in a temporary
    folder beside it, then renamed) and return ``out_dir``."""
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} exists; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-coco-", dir=out.parent))
    try:
        rng = np.random.default_rng([seed, 7])
        _write_split(tmp, "train2017", n_train, rng, empty_last=True, first_ids=(1, 1))
        _write_split(tmp, "val2017", n_val, rng, empty_last=False, first_ids=(1001, 1001))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
