"""``/activelearning/{strategy}``: which unlabelled image the viewer should open next.

- ``first``: the first unlabelled image by id;
- ``random``: any unlabelled image (``params.seed`` makes the draw repeatable);
- ``least_confident``: the unlabelled image the model is least sure of. The measure is the fused
  class probabilities the automatic label is made from, not the IoU head: the class prompts are
  decoded without asking for the IoU head's estimate (``ModelFamily.decode_classes`` returns the
  masks only), and the probabilities are what decides every voxel of the proposal. Per pixel,
  ``u = 1 - |2 p_max - 1|`` (0 where the most likely class is certain either way, 1 at p = 0.5),
  averaged over the pixels the model gives any class at least 10 % (``p_max >= 0.1``): a large organ
  predicted with confidence scores low, a ragged or hesitant one high. It is computed on up to
  ``SLICES_PER_IMAGE`` evenly spaced slices per image (a 300-slice CT would otherwise cost a full
  automatic inference per image) and kept while the file is unchanged.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from samtune.finetune.serve.errors import BadRequest, NotFound

STRATEGIES = {
    "first": "the first unlabelled image (by id)",
    "random": "a random unlabelled image",
    "least_confident": "the unlabelled image whose automatic proposal is least certain (mean 1 - |2p - 1| of the fused class probabilities)",
}
SLICES_PER_IMAGE = 16
CONSIDERED_P = 0.1


def choose(strategy: str, studies, engine, params: dict, scores: dict) -> dict:
    """The next image as MONAI Label answers it (``{}`` when every image is labelled)."""
    if strategy not in STRATEGIES:
        raise NotFound("strategy", f"{strategy!r} is not a strategy of this server ({', '.join(STRATEGIES)})")
    todo = studies.unlabelled()
    if not todo:
        return {}
    if strategy == "first":
        image_id = todo[0]
    elif strategy == "random":
        seed = params.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise BadRequest("seed", f"{seed!r}: an integer")
        image_id = random.Random(seed).choice(todo)
    else:
        if not engine.automatic_mode:
            raise BadRequest("strategy", "least_confident needs a checkpoint with the automatic mode (task: automatic or both)")
        uncertainty = {i: image_uncertainty(engine, studies.existing_image(i), scores) for i in todo}
        image_id = max(todo, key=lambda i: (uncertainty[i], i))
    out = {"id": image_id, "name": f"{image_id}.nii.gz", "strategy": strategy}
    if strategy == "least_confident":
        out["uncertainty"] = round(float(uncertainty[image_id]), 6)
    return out


@torch.no_grad()
def image_uncertainty(engine, path, scores: dict) -> float:
    """Mean ``1 - |2 p_max - 1|`` over the considered pixels of up to SLICES_PER_IMAGE slices."""
    from samtune.datasets.formats import open_images
    from samtune.finetune.automatic import class_low_res
    from samtune.finetune.predict.propagation import pixels

    stat = path.stat()
    key = (str(path), stat.st_mtime_ns)
    if key in scores:
        return scores[key]
    p = engine.predictor
    source = open_images(engine.section, [path])
    depth = len(source)
    picks = np.unique(np.linspace(0, depth - 1, min(SLICES_PER_IMAGE, depth)).round().astype(int))
    total, count = 0.0, 0
    for start in range(0, len(picks), p.batch_size):
        batch = torch.stack([pixels(p.transform, source.load(int(z))[0]) for z in picks[start : start + p.batch_size]])
        probs = torch.sigmoid(class_low_res(p.model, p.family, batch.to(p.device)))
        best = probs.max(1).values  # B×s×s
        considered = best >= CONSIDERED_P
        total += float((1 - (2 * best - 1).abs())[considered].sum())
        count += int(considered.sum())
    scores[key] = total / count if count else 0.0
    return scores[key]
