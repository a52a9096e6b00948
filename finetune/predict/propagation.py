"""Carrying one prompted slice through a volume: ``samtune predict`` with a prompt on one slice,
and ``eval.volume_mode: propagate`` in evaluation.

Two ways, chosen by ``eval.propagation`` (``auto``: memory where the model family has it):

- ``box`` (every family): the prompted slice is predicted from its prompt; each next slice, in
  both directions, from the bounding box of the mask predicted on the slice before it (grown by
  ``MARGIN``); the object
  ends at the first slice predicted empty. No memory: each slice sees only a box.
- ``memory`` (SAM 2, EdgeTAM and SAM 3 families): SAM 2's video tracker (``transformers.Sam2VideoModel``,
  ``EdgeTamVideoModel``, whose memory attention reads perceiver-compressed memories, or
  ``Sam3TrackerVideoModel`` on SAM 3's tracker neck: adapters/sam3_video.py) with the slices as
  frames: the prompted slice is segmented from its prompt and written to the memory bank; every
  other slice is segmented from the image features conditioned on the memories of the slices
  already done (memory attention), going away from the prompted slice one way, then the other. The
  tracker's object score blanks slices where it judges the object absent.

Both return the object's Z×H×W mask at the volume's original slice resolution.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

PROPAGATIONS = ("auto", "memory", "box")


@dataclass
class SlicePrompt:
    """A prompt on slice ``z``: ``box`` x0, y0, x1, y1 in pixel edges (x1 one past the last column,
    as training's boxes) and/or ``points`` N×2 (x, y) pixel indices with ``labels`` (1 / 0), in the
    slice's original pixels."""

    z: int
    box: np.ndarray | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None


MARGIN = 0.1  # box propagation: the previous mask's box grown by 10 % of its size on each side (at least 2 px): organs grow between slices


def bbox(mask: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """x0, y0, x1, y1 (pixel edges) of a non-empty H×W bool mask, grown by ``margin`` × its size
    (at least 2 px) on each side when ``margin`` > 0, clipped to the image."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    if not margin:
        return np.array([x0, y0, x1, y1], float)
    mx, my = max(2.0, margin * (x1 - x0)), max(2.0, margin * (y1 - y0))
    h, w = mask.shape
    return np.array([max(0, x0 - mx), max(0, y0 - my), min(w, x1 + mx), min(h, y1 + my)], float)


def prompt_in_input(transform, original_hw: tuple[int, int], box, points) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A prompt in original pixels -> the model input's pixels (box 4, points N×2)."""
    resized = transform.resized_shape(original_hw)
    scale = np.array([resized[1] / original_hw[1], resized[0] / original_hw[0]])
    box_in = None if box is None else (np.asarray(box, float).reshape(2, 2) * scale).reshape(4)
    # pixel indices, as training samples them in the resized frame: the centre (c + 0.5) scales
    points_in = None if points is None else (np.asarray(points, float) + 0.5) * scale - 0.5
    return box_in, points_in


def pixels(transform, image: np.ndarray) -> torch.Tensor:
    """One H×W(×3) uint8 image -> the 3×S×S model input."""
    out = transform(image=image, mask=np.zeros(image.shape[:2], np.uint8))
    return torch.from_numpy(out["image"].transpose(2, 0, 1).copy())


@torch.no_grad()
def predict_slice(model, family, transform, device, image: np.ndarray, box, points, labels) -> np.ndarray:
    """H×W bool mask of one image from a box and/or points (original pixels). One point alone is
    ambiguous: SAM's three masks are predicted and the one with the highest predicted IoU kept."""
    original = image.shape[:2]
    embeddings = family.encode_images(model, pixels(transform, image)[None].to(device))
    box_in, points_in = prompt_in_input(transform, original, box, points)
    boxes = torch.tensor(box_in[None], dtype=torch.float32, device=device) if box_in is not None else None
    pts = lbl = None
    if points_in is not None:
        pts = torch.tensor(points_in[None], dtype=torch.float32, device=device)
        lbl = torch.tensor(np.asarray(labels)[None], dtype=torch.long, device=device)
    multimask = box is None and points is not None and len(points) == 1
    low_res, iou = family.decode_prompts(model, embeddings, boxes, pts, lbl, multimask_output=multimask)
    logits = family.upscale_logits(low_res.float(), transform.image_size)[0]
    best = int(iou[0].argmax()) if multimask else 0
    return (family.logits_to_original(logits[best : best + 1], transform.resized_shape(original), original) > 0).cpu().numpy()


def box_propagation(predict: Callable, load: Callable[[int], np.ndarray], depth: int, prompt: SlicePrompt) -> np.ndarray:
    """``predict(image, box, points, labels) -> H×W bool``; ``load(z)`` -> slice z. The prompted
    slice from its prompt, then slice by slice from the previous slice's box, while it lasts."""
    first = predict(load(prompt.z), prompt.box, prompt.points, prompt.labels)
    volume = np.zeros((depth, *first.shape), bool)
    volume[prompt.z] = first
    for step in (1, -1):
        previous, z = first, prompt.z + step
        while 0 <= z < depth and previous.any():
            volume[z] = previous = predict(load(z), bbox(previous, MARGIN), None, None)
            z += step
    return volume


class MemoryTracker:
    """SAM 2's video tracker (or EdgeTAM's, or SAM 3's) over the slices of one volume at a time (see
    the module docstring). All three take the same inference session: transformers defines EdgeTAM's
    and SAM 3's as SAM 2's with nothing added (modular_edgetam_video.py, modular_sam3_tracker_video.py:
    ``...InferenceSession(Sam2VideoInferenceSession): pass``); how a family's tracker computes its
    image features is the family's (``ModelFamily.video_model``), behind the same ``get_image_features``."""

    def __init__(self, video_model, family, transform, device):
        self.video_model, self.family, self.transform, self.device = video_model.to(device).eval(), family, transform, device
        # one box -> the single-mask token, as samtune's SAM 2 image model decodes it in training and
        # evaluation (the official "dynamic multimask via stability" fallback would swap in a multimask
        # token that fine-tuning never trained for boxes); the prompted slice then gets the image model's mask
        for module in video_model.modules():
            if hasattr(module, "dynamic_multimask_via_stability"):
                module.dynamic_multimask_via_stability = False

    @torch.no_grad()
    def __call__(self, load: Callable[[int], np.ndarray], depth: int, prompt: SlicePrompt) -> np.ndarray:
        from transformers.models.sam2_video.modeling_sam2_video import Sam2VideoInferenceSession

        images = [load(z) for z in range(depth)]
        original = images[0].shape[:2]
        frames = torch.stack([pixels(self.transform, image) for image in images])
        size = self.transform.image_size
        # frames stay on the CPU (a 1024 px float frame is 12 MB); features are computed on the device per frame
        session = Sam2VideoInferenceSession(video=frames, video_height=size, video_width=size, inference_device=self.device,
                                            video_storage_device="cpu", inference_state_device=self.device, dtype=torch.float32)  # fmt: skip
        box_in, points_in = prompt_in_input(self.transform, original, prompt.box, prompt.points)
        coords, codes = [], []
        if box_in is not None:  # SAM 2 encodes a box as its two corners, labelled 2 and 3
            coords += box_in.reshape(2, 2).tolist()
            codes += [2, 3]
        if points_in is not None:
            coords += points_in.tolist()
            codes += [int(v) for v in prompt.labels]
        session.add_point_inputs(session.obj_id_to_idx(1), prompt.z, {
            "point_coords": torch.tensor([[coords]], dtype=torch.float32),
            "point_labels": torch.tensor([[codes]], dtype=torch.int32),
        })  # fmt: skip
        session.obj_with_new_inputs = [1]
        low_res = {}
        self.video_model(inference_session=session, frame_idx=prompt.z)
        for reverse in (False, True):
            for out in self.video_model.propagate_in_video_iterator(session, start_frame_idx=prompt.z, reverse=reverse):
                low_res[out.frame_idx] = out.pred_masks[0].float().cpu()  # 1×s×s logits of object 1
        volume = np.zeros((depth, *original), bool)
        resized = self.transform.resized_shape(original)
        for z, logits in low_res.items():
            full = self.family.upscale_logits(logits[None], size)[0]
            volume[z] = (self.family.logits_to_original(full, resized, original) > 0).numpy()
        return volume


def make_propagator(kind: str, model, family, variant, checkpoint, transform, device, predict: Callable | None = None) -> tuple[Callable, str]:
    """(propagate(load, depth, prompt) -> Z×H×W bool, the way used: "memory" or "box"); ``auto``:
    memory where the family can build it from this checkpoint, else boxes (with a warning).
    ``predict(image, box, points, labels)``: the one-slice prediction box propagation uses
    (default ``predict_slice`` with this model)."""
    from samtune.errors import SamtuneError

    video = None
    if kind in ("auto", "memory"):
        try:
            video = family.video_model(model, variant, checkpoint)
        except SamtuneError as exc:  # auto: a checkpoint without memory modules still propagates, with boxes
            if kind == "memory":
                raise
            logging.getLogger(__name__).warning("propagation auto: no memory (%s); propagating with boxes instead", exc)
    if kind == "memory" and video is None:
        raise SamtuneError(f"eval.propagation=memory: the {family.name} family has no memory (SAM 2, EdgeTAM and SAM 3 families have); use box or auto.")
    if video is not None:
        return MemoryTracker(video, family, transform, device), "memory"

    if predict is None:
        def predict(image, box, points, labels):
            return predict_slice(model, family, transform, device, image, box, points, labels)

    return (lambda load, depth, prompt: box_propagation(predict, load, depth, prompt)), "box"
