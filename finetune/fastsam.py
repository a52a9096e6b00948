"""FastSAM (Zhao et al., 2023, "Fast Segment Anything") beside SAM + LoRA, as an optional extra.

FastSAM is not an adapter on SAM: it is a YOLOv8-seg instance-segmentation network (Ultralytics,
AGPL-3.0) trained on 2 % of SA-1B. Fine-tuning it on a domain means training that network on the
domain's instances of each class; it then answers without prompts, like samtune's automatic mode.
So the fair comparison is FastSAM fine-tuned on the recipe's classes against samtune's *semantic*
evaluation of the same validation split, scored by the same code (``ConfusionAccumulator``: one
dataset-level confusion matrix, every pixel, ignore excluded, background counted).

What samtune does here, and what it leaves to Ultralytics:

- ``export_yolo``: the recipe's train / validation images, read by samtune's own dataset readers
  (windowed CT slices, Cityscapes images, ...), written in Ultralytics' YOLO segmentation format:
  ``images/{train,val}/*.png``, ``labels/{train,val}/*.txt`` with one line per connected component
  of each class (``class x1 y1 x2 y2 ...``, polygon vertices normalised to 0..1) and ``data.yaml``.
  Validation images are every slice of the validation cases (what samtune's semantic evaluation
  scores), empty ones included (an empty label file is a background image for YOLO).
  A YOLO polygon has no holes: a ring-shaped region is exported filled (its hole is lost).
- ``train_fastsam``: Ultralytics' own trainer (``YOLO(weights).train``) on that folder, from
  FastSAM's checkpoint (``FastSAM-s.pt`` / ``FastSAM-x.pt``; their detection head is re-sized to the
  recipe's classes by Ultralytics) or a model YAML for random init (``yolov8n-seg.yaml``: offline tests).
- ``evaluate_fastsam``: predicts every validation image, paints instances in increasing confidence
  (the most confident wins where two overlap; no instance = background) and scores the class maps.

Installing: ``pip install "samtune[fastsam]"`` pulls ``ultralytics``, which needs ``torchvision``.
PyPI's torchvision is built for exactly one torch release, so pip replaces the installed torch by
the one torchvision needs (on the development machine: torch 2.13.0 CPU -> torch 2.14.1 + CUDA
libraries, about 5.5 GB, with torchvision 0.29.1; the wheel of torchvision built for torch 2.13 does
not import beside the CPU build: "operator torchvision::nms does not exist"). Use a separate
environment for FastSAM; ``samtune`` itself never imports ultralytics unless this module is run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from samtune.errors import SamtuneError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    'FastSAM needs the optional extra: pip install "samtune[fastsam]" (ultralytics; it installs torchvision and the torch '
    "release that torchvision needs, so use a separate environment: see samtune.finetune.fastsam)."
)
MIN_COMPONENT_PX = 4  # smaller connected components are not exported (a polygon needs an area)


def _ultralytics():
    try:
        import ultralytics
    except ImportError as exc:  # not installed, or torchvision does not import beside this torch
        raise SamtuneError(f"{INSTALL_HINT} (import failed: {exc})") from exc
    return ultralytics


def polygons(mask: np.ndarray) -> list[np.ndarray]:
    """The outer contour of each connected component of an H×W bool mask, as K×2 (x, y) pixel
    vertices (OpenCV's contour tracing: what no other dependency of samtune does); components
    under ``MIN_COMPONENT_PX`` pixels or with fewer than 3 vertices are left out."""
    import cv2

    count, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    out = []
    for k in range(1, count):
        if stats[k, cv2.CC_STAT_AREA] < MIN_COMPONENT_PX:
            continue
        contours, _ = cv2.findContours((components == k).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contour = max(contours, key=cv2.contourArea)[:, 0, :]
        if len(contour) >= 3:
            out.append(contour.astype(np.float64))
    return out


def label_lines(label_map: np.ndarray, class_ids: list[int]) -> list[str]:
    """YOLO segmentation lines of one H×W label map: ``k x1 y1 ...`` per component of class
    ``class_ids[k]``; vertex coordinates are pixel centres divided by the width / height."""
    h, w = label_map.shape
    lines = []
    for k, class_id in enumerate(class_ids):
        for poly in polygons(label_map == class_id):
            xy = (poly + 0.5) / np.array([w, h])
            lines.append(f"{k} " + " ".join(f"{v:.6f}" for v in np.clip(xy, 0, 1).ravel()))
    return lines


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


def export_yolo(recipe, out: str | Path, *, progress: bool = True) -> dict:
    """Write the recipe's data in YOLO segmentation format under ``out``; returns what was written."""
    import cv2
    from tqdm.auto import tqdm

    from samtune.finetune.data import label_space, open_split

    out = Path(out)
    split = open_split(recipe, progress=progress)
    space = label_space(split, recipe)
    sides = {"train": split.train, "val": split.val.every_slice()}
    written = {"root": str(out), "classes": space.names, "images": {}, "instances": {}}
    for side, source in sides.items():
        (out / "images" / side).mkdir(parents=True, exist_ok=True)
        (out / "labels" / side).mkdir(parents=True, exist_ok=True)
        instances = 0
        for i in tqdm(range(len(source)), desc=f"export {side}", disable=not progress):
            image, label = source.load(i)
            name = source.item_id(i).replace("/", "__")
            if not cv2.imwrite(str(out / "images" / side / f"{name}.png"), cv2.cvtColor(_rgb(image), cv2.COLOR_RGB2BGR)):
                raise SamtuneError(f"could not write {out / 'images' / side / name}.png (disk full or not writable?)")
            lines = label_lines(np.asarray(label), space.ids)
            instances += len(lines)
            (out / "labels" / side / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines))
        written["images"][side] = len(source)
        written["instances"][side] = instances
    data_yaml = out / "data.yaml"
    # Ultralytics finds labels/ beside images/ by replacing the folder name
    data_yaml.write_text(
        json.dumps({"path": str(out.resolve()), "train": "images/train", "val": "images/val", "names": dict(enumerate(space.names))}, indent=1)
    )
    written["data_yaml"] = str(data_yaml)
    (out / "export.json").write_text(json.dumps({**written, "recipe_data": recipe.data.model_dump(mode="json")}, indent=1))
    return written


def train_fastsam(data_yaml: str | Path, weights: str, out: str | Path, *, epochs: int, image_size: int, batch: int, device: str, seed: int) -> Path:
    """Ultralytics' trainer on an exported folder; returns the best weights (``.../weights/best.pt``)."""
    _ultralytics()
    from ultralytics import YOLO

    out = Path(out).resolve()
    model = YOLO(weights)
    # plots=False: Ultralytics' plots download a font on first use, which fails offline
    model.train(data=str(data_yaml), epochs=epochs, imgsz=image_size, batch=batch, device=device, seed=seed,
                project=str(out.parent), name=out.name, exist_ok=True, plots=False, verbose=False, workers=0, amp=device != "cpu")  # fmt: skip
    best = out / "weights" / "best.pt"
    if not best.is_file():
        raise SamtuneError(f"Ultralytics' training wrote no {best}; see its log above.")
    return best


def class_map(masks: np.ndarray, classes: np.ndarray, confidences: np.ndarray, background: int, shape: tuple[int, int]) -> np.ndarray:
    """N×H×W instance masks with class indexes and confidences -> an H×W class-index map
    (``background`` where no instance is): painted in increasing confidence, so the most
    confident instance wins where two overlap."""
    out = np.full(shape, background, np.int64)
    for j in np.argsort(confidences, kind="stable"):
        out[masks[j]] = int(classes[j])
    return out


def evaluate_fastsam(weights: str | Path, recipe, out: str | Path | None = None, *, image_size: int, conf: float = 0.25, device: str = "cpu",
                     progress: bool = True) -> dict:  # fmt: skip
    """Score a FastSAM / YOLOv8-seg model on the recipe's validation split with samtune's semantic metrics."""
    _ultralytics()
    from tqdm.auto import tqdm
    from ultralytics import YOLO

    from samtune.finetune.data import label_space, open_split
    from samtune.finetune.scoring.semantic_metrics import ConfusionAccumulator

    split = open_split(recipe, progress=progress)
    space = label_space(split, recipe)
    source = split.val.every_slice()
    model = YOLO(str(weights))
    accumulator = ConfusionAccumulator(dict(zip(space.ids, space.names)), source.ignore_index)
    for i in tqdm(range(len(source)), desc="FastSAM val", disable=not progress):
        image, label = source.load(i)
        result = model.predict(_rgb(image)[..., ::-1].copy(), imgsz=image_size, conf=conf, device=device, retina_masks=True, verbose=False)[0]
        k = len(space.ids)
        if result.masks is None:
            index = np.full(label.shape, k, np.int64)
        else:
            masks = result.masks.data.cpu().numpy() > 0.5
            index = class_map(masks, result.boxes.cls.cpu().numpy(), result.boxes.conf.cpu().numpy(), k, label.shape)
        accumulator.add(space.to_source_ids(index), np.asarray(label))
    metrics = {
        "protocol": {
            "model": f"FastSAM / YOLOv8-seg instance segmentation from {weights}, trained on the recipe's classes",
            "prompts": "none (every class, every pixel)",
            "images": f"{len(source)} validation images / slices (every slice of the validation cases), at {image_size} px "
            "(Ultralytics letterbox), masks at the original resolution (retina_masks)",
            "instances": f"confidence >= {conf}; overlaps go to the most confident instance; no instance = background",
            "empty_mask_rule": "dataset-level confusion matrix: a class never in the ground truth nor predicted has no IoU (NaN, skipped)",
        },
        "semantic": accumulator.result(),
    }
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(metrics, indent=1))
    return metrics


def run(recipe, weights: str, out: str | Path, *, epochs: int, image_size: int, batch: int, device: str, conf: float,
        export_only: bool = False, progress: bool = True) -> dict:  # fmt: skip
    """export -> train -> evaluate, under ``out`` (yolo_data/, train/, metrics.json)."""
    from samtune.finetune.scoring.metrics import format_table

    out = Path(out)
    if not export_only:
        _ultralytics()  # fail before the export, not after it
    written = export_yolo(recipe, out / "yolo_data", progress=progress)
    log.info("exported %s: %s images, %s instances", written["root"], written["images"], written["instances"])
    if export_only:
        return written
    best = train_fastsam(written["data_yaml"], weights, out / "train", epochs=epochs, image_size=image_size, batch=batch, device=device, seed=recipe.seed)
    metrics = evaluate_fastsam(best, recipe, out / "metrics.json", image_size=image_size, conf=conf, device=device, progress=progress)
    print(format_table({"FastSAM": metrics["semantic"]}, "SEMANTIC validation (no prompts; every pixel, void excluded)"))
    print(f"wrote {out / 'metrics.json'}")
    return metrics
