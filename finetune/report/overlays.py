"""Pictures of the model's predictions on a few fixed validation samples, for TensorBoard's Images
tab during training (``train.image_every``).

Prompted: the image at its original resolution with the prediction tinted green, the ground
truth's outline in red, and the prompt drawn (box in yellow, positive points green, negative
red). Semantic: the predicted label map tinted with the class palette beside the ground truth.
The samples are the same at every step (evenly spaced over the validation split), so the pictures
show one model learning.
"""

from __future__ import annotations

import numpy as np
import torch

from samtune.datasets import sample as S
from samtune.finetune.predict.label_files import tint_labels

PICTURES = 4  # validation samples drawn per part


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, 2) if image.ndim == 2 else np.ascontiguousarray(image[..., :3])


def draw_prompted(image: np.ndarray, pred: np.ndarray, target: np.ndarray | None, box_xyxy=None, points=None, point_labels=None) -> np.ndarray:
    """H×W(×3) uint8 image, H×W bool prediction and ground truth, box / points in original px ->
    H×W×3 uint8 picture."""
    import cv2

    rgb = _rgb(image).astype(np.float32)
    rgb[pred] = 0.55 * rgb[pred] + 0.45 * np.array((40, 220, 60), np.float32)
    rgb = rgb.round().astype(np.uint8)
    if target is not None:
        contours, _ = cv2.findContours(target.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, (230, 30, 30), 1)
    if box_xyxy is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box_xyxy)
        cv2.rectangle(rgb, (x0, y0), (x1, y1), (250, 220, 0), 1)
    for (x, y), label in zip(points if points is not None else [], point_labels if point_labels is not None else []):
        if label >= 0:  # -1 marks padding
            cv2.circle(rgb, (int(round(x)), int(round(y))), 2, (40, 220, 60) if label == 1 else (230, 30, 30), -1)
    return rgb


@torch.no_grad()
def prompted_pictures(model, family, dataset, recipe, device: torch.device, count: int = PICTURES) -> list[np.ndarray]:
    """Pictures of the evaluation protocol's prediction (first prompt and rounds) on ``count`` samples."""
    from samtune.finetune.scoring.protocol import uses_box
    from samtune.finetune.interaction import run_rounds

    indices = sorted(set(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int).tolist()))
    batch = S.collate_samples([dataset[i] for i in indices])
    metas = batch[S.META]
    batch = {k: (v.to(device) if k != S.META else v) for k, v in batch.items()}
    use_box = uses_box(recipe)
    outputs, _ = run_rounds(model, family, batch, recipe.prompts, dataset.image_size, use_box, torch.Generator(device=device).manual_seed(recipe.seed))
    logits = outputs[-1].float().cpu()
    pictures = []
    for i, meta in enumerate(metas):
        pred = (family.logits_to_original(logits[i], meta["resized_size"], meta["original_size"]) > 0).numpy()
        image = dataset.source.load(meta["index"])[0]
        scale = np.array(meta["original_size"], np.float64) / np.array(meta["resized_size"], np.float64)  # (h, w) original / input px
        xy_scale = scale[::-1]
        box = batch[S.BOXES][i, 0].cpu().numpy() * np.tile(xy_scale, 2) if use_box else None
        points = labels = None
        if not use_box:
            points = batch[S.POINTS][i, 0].cpu().numpy() * xy_scale
            labels = batch[S.POINT_LABELS][i, 0].cpu().numpy()
        pictures.append(draw_prompted(image, pred, meta["targets"][0], box, points, labels))
    return pictures


@torch.no_grad()
def semantic_pictures(model, family, dataset, threshold: float, device: torch.device, count: int = PICTURES) -> list[np.ndarray]:
    """Predicted label map | ground truth, side by side, on ``count`` validation images."""
    from samtune.datasets import semantic as SEM
    from samtune.datasets.semantic import collate_semantic
    from samtune.finetune.automatic import predict_index_maps

    indices = sorted(set(np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round().astype(int).tolist()))
    batch = collate_semantic([dataset[i] for i in indices])
    space = dataset.space
    pictures = []
    for meta, index_map in zip(batch[SEM.META], predict_index_maps(model, family, batch[SEM.IMAGE].to(device), batch[SEM.META], threshold)):
        image = _rgb(dataset.source.load(meta["index"])[0])
        predicted = tint_labels(image, space.to_source_ids(index_map), space, values=space.ids)
        truth = tint_labels(image, meta["label"], space, values=space.ids)
        pictures.append(np.concatenate([predicted, np.full((image.shape[0], 4, 3), 255, np.uint8), truth], axis=1))
    return pictures


def log_pictures(writer, model, family, data, recipe, device: torch.device, step: int) -> None:
    """Both parts' pictures into TensorBoard (``val_prompted_images/k``, ``val_semantic_images/k``)."""
    was_training = model.training
    model.eval()
    try:
        parts = []
        if data.val is not None and len(data.val):
            parts.append(("val_prompted_images", prompted_pictures(model, family, data.val, recipe, device)))
        if data.val_semantic is not None and len(data.val_semantic):
            parts.append(("val_semantic_images", semantic_pictures(model, family, data.val_semantic, recipe.automatic.threshold, device)))
        for tag, pictures in parts:
            for k, picture in enumerate(pictures):
                writer.add_image(f"{tag}/{k}", picture, step, dataformats="HWC")
    finally:
        model.train(was_training)
