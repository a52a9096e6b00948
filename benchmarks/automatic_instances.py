"""The ceiling of the automatic mode's instances on a Cityscapes-style tree: instance AP when the
automatic label map is perfect (the ground truth's trainIds), its instances the connected
components of each thing class, as ``samtune evaluate`` makes them
(``samtune.finetune.scoring.instance_metrics.thing_components``).

With a perfect label map every component is exact, so what AP loses is only what components cannot
express: touching objects of one class (a row of parked cars, a crowd of people) merge into one
instance, and an object cut in two by an occluder splits. ``--downsample F`` also shrinks the
label map by F and enlarges it back (nearest neighbour), as a model's coarse masks would be (SAM's
masks are predicted at 1/4 of its input: F = 8 for a 2048-px-wide Cityscapes image at 1024 px).
Confidences are all 1 (one operating point). Prompted instances have no such ceiling: each
instance is its own prompt.

    .venv/bin/python benchmarks/automatic_instances.py                           # the demo scenes (generated)
    .venv/bin/python benchmarks/automatic_instances.py --data-root /data/cityscapes --downsample 8

Last line: ``RESULT ap=<AP> ap50=<AP50> car_ap50=<car AP50> images=<n> downsample=<F>``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np


def perfect_label_map(train_ids: np.ndarray, downsample: int) -> np.ndarray:
    """Class indexes = trainIds, 19 where ignored, optionally through a coarser grid."""
    index_map = np.where(train_ids == 255, 19, train_ids).astype(np.uint8)
    if downsample > 1:
        h, w = index_map.shape
        small = cv2.resize(index_map, (max(1, w // downsample), max(1, h // downsample)), interpolation=cv2.INTER_NEAREST_EXACT)
        index_map = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)
    return index_map


def ceiling(root: Path, split: str, downsample: int) -> dict:
    from samtune.datasets.cityscapes import TRAIN_CLASSES, CityscapesSource
    from samtune.finetune.scoring.instance_metrics import InstanceAPAccumulator, instance_name, thing_components

    source = CityscapesSource(root, split)
    if source.instance_problem():
        raise SystemExit(f"{root}: {source.instance_problem()}")
    label_ids = [label_id for _, label_id in TRAIN_CLASSES]
    scores = InstanceAPAccumulator()
    for index in range(len(source)):
        name, ids = instance_name(source, index), source.instance_ids(index)
        scores.add_ground_truth(name, ids)
        index_map = perfect_label_map(source.load_label(index), downsample)
        for label_id, mask, _ in thing_components(index_map, np.ones(index_map.shape, np.float32), label_ids):
            scores.add_prediction(name, ids, label_id, mask, 1.0)
    return scores.result()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, help="a Cityscapes tree with *_gtFine_instanceIds.png (default: demo scenes, generated)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--downsample", type=int, default=1, help="shrink the label map by this factor and enlarge it back")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root
        if root is None:
            from samtune.datasets.synthetic import generate_cityscapes

            root = generate_cityscapes(Path(tmp) / "cityscapes", n_train=0, n_val=8, size_wh=(512, 256))
        result = ceiling(root, args.split, args.downsample)
    print(f"{'class':<12} {'AP':>6} {'AP50':>6} {'instances':>9} {'components':>10}")
    for name, c in result["per_class"].items():
        if c["instances"] or c["predictions"]:
            print(f"{name:<12} {c['ap']:>6.3f} {c['ap50']:>6.3f} {c['instances']:>9} {c['predictions']:>10}")
    print(f"RESULT ap={result['ap']:.4f} ap50={result['ap50']:.4f} car_ap50={result['per_class']['car']['ap50']:.4f} "
          f"images={result['images']} downsample={args.downsample}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
