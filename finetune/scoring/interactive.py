"""``eval.volume_mode: interactive``: the interactive 3D evaluation of the CVPR 2025 challenge
"Foundation Models for Interactive 3D Biomedical Image Segmentation", per validation case and class.

Step 0 is a first prediction: from the challenge's box (``task: promptable``) or, for a checkpoint
with class prompts (``task: automatic``/``both``), the automatic label volume; then ``CLICKS``
corrective clicks, each at the centre of the largest 3D error region of the current mask, given to
the correction engine with every click so far. Dice and NSD are scored in 3D after every step; the
summary is the area under their curves over the clicks and their final values.

The challenge's facts, from its evaluation code (github.com/JunMa11/CVPR-MedSegFMCompetition,
``CVPR25_iter_eval.py`` and ``get_boxes.py``):

- box: per class ``z_min``, ``z_max``, ``z_mid`` (the slice of the middle foreground voxel in
  C order, ``np.where(gt)[0][n // 2]``) and a 2D box on slice ``z_mid`` shifted out by a random
  0-5 px (scaled by size/256); some cases get no box (their step 0 scores 0).
- click: error = prediction != ground truth of the class; its 26-connected components
  (``cc3d``); the largest by voxel count; the Euclidean distance transform of that component in
  its bounding box padded with background (voxel units: no spacing), so the volume's edge counts
  as border; the click is a voxel of maximal distance, ties broken by ``np.random.seed(42)`` then a
  uniform choice; a foreground click when the ground truth holds the voxel, else background; no
  click when the class has no error.
- scores: Dice, and NSD at 2 mm (set to 0 when the case's mean Dice is <= 0.2), after the box and
  after each of the 5 clicks; ``DSC_AUC = cumulative_trapezoid(dscs[-5:], np.arange(5))[-1]``, the
  trapezoid over the 5 click steps with unit spacing (0-4; the box step left out "since the bbox
  prompt is optional"); final = after the last click.

What differs here is written into the ``protocol`` of metrics.json (``interactive_protocol``).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from scipy import ndimage
from tqdm.auto import tqdm

from samtune.adapters.registry import get_variant
from samtune.finetune.automatic import has_class_prompts
from samtune.finetune.corrections import VolumeCorrector
from samtune.finetune.predict.propagation import SlicePrompt, make_propagator
from samtune.finetune.recipe import Recipe
from samtune.finetune.scoring.metrics import nan_mean
from samtune.finetune.scoring.volume_metrics import case_scores

CLICKS = 5  # the challenge's corrective clicks per class
NSD_TOLERANCE_MM = 2.0  # the challenge's (compute_multi_class_nsd, tolerance=2.0) and MedSAM's
TIE_SEED = 42  # the challenge's sample_coord: np.random.seed(42), then a uniform choice among the maxima


def challenge_box(target: np.ndarray) -> tuple[int, int, int, np.ndarray]:
    """The challenge's box of a non-empty Z×H×W bool mask: z_min, z_max, z_mid (the slice of the
    middle foreground voxel in C order, as get_boxes.py's ``z_indices[len(z_indices) // 2]``) and
    the tight 2D box x0, y0, x1, y1 (pixel edges) of slice z_mid."""
    per_slice = target.reshape(len(target), -1).sum(1)
    zs = np.flatnonzero(per_slice)
    z_mid = int(np.searchsorted(np.cumsum(per_slice), per_slice.sum() // 2, side="right"))
    ys, xs = np.nonzero(target[z_mid])
    return int(zs[0]), int(zs[-1]), z_mid, np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def error_click(pred: np.ndarray, target: np.ndarray) -> tuple[tuple[int, int, int], bool] | None:
    """The challenge's next click on Z×H×W bool masks: ((z, y, x), foreground?) at the voxel
    farthest from the border of the largest 26-connected error component; None without error."""
    error = pred != target
    if not error.any():
        return None
    components, _ = ndimage.label(error, structure=np.ones((3, 3, 3), bool))  # 26-connectivity, as cc3d's connectivity=26
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = int(sizes.argmax())  # the first label of that size, as np.argmax in the challenge
    box = ndimage.find_objects(components, max_label=largest)[largest - 1]
    # the component's bounding box padded with background: the volume's edge is border too
    crop = np.pad(components[box] == largest, 1)
    distance = ndimage.distance_transform_edt(crop)[1:-1, 1:-1, 1:-1]  # voxel units, as the challenge (no sampling=)
    ties = np.argwhere(distance == distance.max())  # C order, as np.argwhere on the whole volume
    z, y, x = (int(v) for v in ties[np.random.RandomState(TIE_SEED).choice(len(ties))] + [s.start for s in box])
    return (z, y, x), bool(target[z, y, x])


def click_auc(values: list[float]) -> float:
    """The challenge's AUC of a curve [step 0, click 1, ..., click 5]: the trapezoid over the click
    steps only, unit spacing (scipy's ``cumulative_trapezoid(v[-5:], np.arange(5))[-1]``), 0-4."""
    clicks = np.asarray(values[1:], float)
    return float(((clicks[1:] + clicks[:-1]) / 2).sum())


def simulate(corrector: VolumeCorrector, first: np.ndarray, target: np.ndarray, class_index: int | None,
             spacing_mm: tuple[float, ...], clicks: int = CLICKS, tolerance_mm: float = NSD_TOLERANCE_MM, key=None) -> dict:  # fmt: skip
    """One case and class: step 0 is ``first`` (Z×H×W bool), then ``clicks`` corrections by
    ``corrector.correct`` (clicks as (z, row, col) voxels), each with every click so far.
    ``key``: the object's cache key in the corrector (default ``class_index``; the class id where
    the model has no class prompts, so classes do not share mask prompts).
    -> per-step ``dice``/``nsd``, their AUCs and the clicks placed ([z, row, col, "fg"|"bg"])."""
    mask = first.astype(bool)
    foreground: list[tuple[int, int, int]] = []
    background: list[tuple[int, int, int]] = []
    placed, dice, nsd = [], [], []
    for step in range(clicks + 1):
        if step:
            click = error_click(mask, target)
            if click is not None:  # a perfect mask gets no click and stays (the challenge reruns the model on the same prompts)
                (foreground if click[1] else background).append(click[0])
                placed.append([*click[0], "fg" if click[1] else "bg"])
                mask = np.asarray(corrector.correct(mask, class_index, list(foreground), list(background), key=class_index if key is None else key), bool)
        scores = case_scores(mask, target, spacing_mm, tolerance_mm)
        dice.append(scores["dice"])
        nsd.append(scores["nsd"])
    return {"dice": dice, "nsd": nsd, "dice_auc": click_auc(dice), "nsd_auc": click_auc(nsd), "clicks": placed}


def summarise(rows: dict[str, list[dict]]) -> dict:
    """Per class (the mean over its cases of every step, AUC and final value) and their mean over
    classes; ``rows``: class name -> one ``simulate`` result (with ``case``) per case holding it."""

    def means(results: list[dict]) -> dict:
        steps = len(results[0]["dice"]) if results else CLICKS + 1
        curve = {key: [nan_mean(r[key][s] for r in results) for s in range(steps)] for key in ("dice", "nsd")}
        return {**curve, "dice_auc": nan_mean(r["dice_auc"] for r in results), "nsd_auc": nan_mean(r["nsd_auc"] for r in results),
                "final_dice": curve["dice"][-1], "final_nsd": curve["nsd"][-1]}  # fmt: skip

    per_class = {name: {**means(results), "cases": len(results), "per_case": results} for name, results in rows.items()}
    scored = [c for c in per_class.values() if c["cases"]]
    mean = {key: nan_mean(c[key] for c in scored) for key in ("dice_auc", "nsd_auc", "final_dice", "final_nsd")}
    for key in ("dice", "nsd"):
        mean[key] = [nan_mean(c[key][s] for c in scored) for s in range(CLICKS + 1)]
    return {"per_class": per_class, "mean": mean}


def interactive_protocol(first: str, propagation: str | None) -> dict:
    """The protocol as run, and where it differs from the challenge's (CVPR25_iter_eval.py)."""
    step0 = {
        "box": f"the challenge's box of each class (z_min, z_max, and the tight 2D box on z_mid, the slice of its middle voxel): "
               f"the 2D box on slice z_mid carried through the volume ({propagation} propagation, as eval.volume_mode: propagate) "
               f"and cut to z_min..z_max",
        "automatic": "the class's voxels in the checkpoint's automatic label volume (its learnt class prompts, no input)",
    }[first]  # fmt: skip
    return {
        "source": "CVPR 2025 challenge 'Foundation Models for Interactive 3D Biomedical Image Segmentation', evaluation code "
                  "CVPR25_iter_eval.py and get_boxes.py (github.com/JunMa11/CVPR-MedSegFMCompetition)",
        "objects": "every class present in a validation case (3D ground truth not empty), each on its own",
        "step_0": step0,
        "clicks": f"{CLICKS} corrective clicks, each at the voxel farthest (Euclidean distance transform, voxel units) from the border "
                  f"of the largest 26-connected error component (prediction != ground truth) of the current mask, ties broken by "
                  f"seed {TIE_SEED} as the challenge; foreground when the ground truth holds it, else background; none when "
                  f"there is no error; the correction engine gets the current mask and every click so far",
        "scored": f"per case and class in 3D after step 0 and every click: Dice, NSD at {NSD_TOLERANCE_MM:g} mm with the voxel spacing "
                  f"(MONAI, as the per-case 3D metrics)",
        "auc": "the challenge's: trapezoid over the 5 click steps with unit spacing (scipy cumulative_trapezoid(v[-5:], "
               "arange(5))[-1]), 0-4, step 0 left out; final = after the last click",
        "accumulation": "per case and class, then mean over cases per class, then mean over classes",
        "differs_from_challenge": [
            *(["2D model: the 3D box is given as its middle slice's 2D box propagated through the volume and cut to its z range",
               "the box is tight (the challenge shifts each side out by a random 0-5 px at 256 px) and every class gets one "
               "(the challenge gives none for some structures, their step 0 scoring 0)"] if first == "box" else
              ["step 0 is the checkpoint's automatic result, not a box (the challenge gives a box, or nothing for some structures)"]),
            "classes are predicted and scored each on its own (binary masks, overlaps possible); the challenge scores one "
            "multi-class label map per case and takes the mean over its classes per case",
            "NSD is always computed (the challenge sets a case's NSD to 0 when its mean Dice is <= 0.2)",
            "means over cases per class, then over classes (the challenge: over classes per case, then over cases)",
            "no time limit (the challenge: 90 s per class), seconds are reported",
        ],
    }  # fmt: skip


def box_first_mask(propagate: Callable, load: Callable[[int], np.ndarray], target: np.ndarray) -> np.ndarray:
    """Step 0 from the challenge's box: its 2D box on slice z_mid carried through the volume by
    ``propagate`` (``make_propagator``'s), cut to z_min..z_max. -> Z×H×W bool."""
    z_min, z_max, z_mid, box_2d = challenge_box(target)
    mask = np.asarray(propagate(load, len(target), SlicePrompt(z_mid, box=box_2d)), bool)
    mask[:z_min] = False
    mask[z_max + 1 :] = False
    return mask


@torch.no_grad()
def evaluate_interactive(model, family, source, class_names: dict[int, str], recipe: Recipe, device: torch.device,
                         desc: str = "eval (interactive)", class_ids: list[int] | None = None) -> dict:  # fmt: skip
    """``eval.volume_mode: interactive`` on every validation case of a volumetric ``source``;
    ``class_ids``: the checkpoint's classes in the order of its class prompts (automatic step 0)."""
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    source = source.every_slice()
    transform = family.make_transform(recipe.model.image_size or get_variant(recipe.model.name).default_image_size)
    first, way, propagate = "automatic", None, None
    if not has_class_prompts(model):  # task: promptable: step 0 from the box
        variant = get_variant(recipe.model.name)
        first, (propagate, way) = "box", make_propagator(recipe.eval.propagation, model, family, variant, recipe.model.checkpoint, transform, device)
    order = list(class_ids if class_ids is not None else class_names)
    slices: dict[str, dict[int, int]] = {}
    for index in range(len(source)):
        case, z = source.slice_position(index)
        slices.setdefault(case, {})[z] = index
    rows: dict[str, list[dict]] = {name: [] for name in class_names.values()}
    encoded = 0
    for case in tqdm(sorted(slices), desc=desc, leave=False, unit="case", disable=None):
        label, spacing = source.case_volume(case)
        label = np.asarray(label)
        indexes = slices[case]

        def load(z: int, indexes=indexes) -> np.ndarray:
            return source.load(indexes[z])[0]

        corrector = VolumeCorrector(model, family, transform, device, load, len(label), recipe.eval.batch_size, recipe.automatic.threshold)
        automatic = corrector.automatic() if first == "automatic" else None  # D×H×W class indexes, K = background
        for class_id, name in class_names.items():
            target = label == class_id
            if not target.any():
                continue
            class_index = order.index(class_id) if first == "automatic" else None
            start_mask = automatic == class_index if automatic is not None else box_first_mask(propagate, load, target)
            result = simulate(corrector, start_mask, target, class_index, spacing, key=class_id)
            rows[name].append({"case": case, **result})
        encoded += corrector.encoded
    model.train(was_training)
    out = summarise(rows)
    out.update(first_prompt=first, propagation=way, clicks=CLICKS, nsd_tolerance_mm=NSD_TOLERANCE_MM, seconds=round(time.perf_counter() - start, 1),
               slices_encoded=encoded, protocol=interactive_protocol(first, way))  # fmt: skip
    if math.isnan(out["mean"]["final_dice"]):
        out["note"] = "no validation case holds any of the classes"
    return out
