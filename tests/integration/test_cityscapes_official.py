"""End to end against the official Cityscapes evaluator (cityscapesScripts, a dev dependency):
``api.evaluate`` with ``task: automatic`` and ``eval.save_predictions: true`` writes one labelIds PNG
per validation image; the official ``evaluateImgLists`` scores those files against the gtFine
labelIds, and every per-class IoU, the class mean and the confusion counts of our
``metrics["semantic"]`` must be the official ones.

The checkpoint is built without training, as the trainer builds its first one (base model, class
prompts, LoRA; ``classes.json`` with the data's label space). An untrained tiny model's class logits
are all within ~1e-3 of 0, so the last layer of the decoder's hypernetwork MLPs is scaled up (it
is saved with the mask decoder): the logits then spread, and at ``automatic.threshold`` 0.6 the
label maps hold void (no class), several classes, and classes never predicted (NaN where also
absent from the ground truth: the official evaluator's NaN, not a 0).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from samtune.adapters.lora import prepare_trainable
from samtune.datasets.cityscapes import CLASS_NAMES, TRAIN_CLASSES, prediction_name
from samtune.datasets.synthetic import generate_cityscapes
from samtune.finetune import api
from samtune.finetune.checkpoints import save_checkpoint
from samtune.finetune.data import build_datasets
from samtune.finetune.recipe import dump_recipe, validate_recipe
from samtune.finetune.runtime import build_base_model, image_size_of, model_family

SHARPEN = 3000.0  # logits of the untrained tiny model are ~1e-3: scaled to O(1)
THRESHOLD = 0.6


def _dataset(tmp_path):
    """3 val images, 2 in frankfurt (the generator's val city) and one moved to a second city, lindau;
    150×70 px, so each prediction is cropped from the 64 px square input and resized back by a
    non-integer factor."""
    root = generate_cityscapes(tmp_path / "cityscapes", n_train=1, n_val=3, size_wh=(150, 70), seed=0)
    for top, suffix in (("leftImg8bit", "leftImg8bit"), ("gtFine", "gtFine_labelIds")):
        (root / top / "val" / "lindau").mkdir()
        shutil.move(root / top / "val" / "frankfurt" / f"frankfurt_000002_000019_{suffix}.png",
                    root / top / "val" / "lindau" / f"lindau_000007_000042_{suffix}.png")  # fmt: skip
    return root


def _checkpoint(recipe, folder):
    """What the trainer saves before its first step (finetune/train/loop.py), decoder sharpened."""
    family = model_family(recipe)
    space = build_datasets(recipe, family.make_transform(image_size_of(recipe)), progress=False, training=False).space
    assert space.ids == list(range(19)) and space.file_values() == [lid for _, lid in TRAIN_CLASSES]
    base = build_base_model(recipe)
    family.add_class_prompts(base, len(space.ids), recipe.automatic.tokens, seed=recipe.seed)
    with torch.no_grad():
        for mlp in base.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.mul_(SHARPEN)
            mlp.proj_out.bias.mul_(SHARPEN)
    model = prepare_trainable(base, family, "lora", recipe.adapter.lora)
    classes = {"task": recipe.task, "tokens": recipe.automatic.tokens, "label_space": space.to_dict()}
    save_checkpoint(model, folder, dump_recipe(recipe), {"step": 0}, classes)
    return folder


def test_saved_predictions_score_as_the_official_evaluator_scores_them(tmp_path, monkeypatch, official_cityscapes_args, same_as_official):
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))  # keeps its default paths out of site-packages
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    root = _dataset(tmp_path)
    recipe = validate_recipe({
        "task": "automatic",
        "data": {"kind": "cityscapes", "root": str(root)},
        "model": {"name": "tiny", "image_size": 64},
        "train": {"device": "cpu"},
        "automatic": {"threshold": THRESHOLD},
        "eval": {"save_predictions": True, "batch_size": 2},  # 2 batches, the last one short
        "output": {"dir": str(tmp_path / "run")},
    })  # fmt: skip
    checkpoint = _checkpoint(recipe, tmp_path / "run" / "checkpoints" / "last")

    out = tmp_path / "eval" / "metrics.json"
    metrics = api.evaluate(recipe, checkpoint, out=out, quiet=True)
    ours = metrics["semantic"]
    assert metrics["headline"] == "semantic" and "prompted" not in metrics
    saved = json.loads(out.read_text())["semantic"]
    assert repr(saved["per_class"]) == repr(ours["per_class"])  # repr: NaN != NaN under ==

    # one prediction per validation image, in its city folder, named and sized like its ground truth
    gt_files = sorted((root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    assert len(gt_files) == 3
    predictions = tmp_path / "eval" / "predictions"
    written = sorted(p for p in predictions.rglob("*") if p.is_file())
    expected = sorted(predictions / gt.parent.name / gt.name for gt in gt_files)
    assert written == expected
    assert all(prediction_name(gt) == gt.name for gt in gt_files)
    allowed = {0} | {lid for _, lid in TRAIN_CLASSES}  # labelId 0 "unlabeled": no class reached the threshold
    seen = set()
    for gt, pred in zip(sorted(gt_files, key=lambda p: p.name), sorted(written, key=lambda p: p.name)):
        with Image.open(gt) as g, Image.open(pred) as p:
            assert p.mode == "L" and p.size == g.size == (150, 70), pred
            values = np.asarray(p)
        assert set(np.unique(values).tolist()) <= allowed, pred
        seen |= set(np.unique(values).tolist())
    assert 0 in seen  # void pixels
    assert len(seen - {0}) >= 5, seen  # several classes
    assert len(allowed - seen) >= 2, seen  # and some never predicted

    # the official evaluator finds each prediction by name (getPrediction) and scores it
    args = official_cityscapes_args(ev, tmp_path / "official.json", predictions)
    pred_files = [ev.getPrediction(args, str(gt)) for gt in gt_files]
    assert pred_files == [str(predictions / gt.parent.name / gt.name) for gt in gt_files]
    theirs = ev.evaluateImgLists(pred_files, [str(gt) for gt in gt_files], args)

    nan_classes = same_as_official(ours, theirs, ev)
    assert nan_classes  # absent from ground truth and predictions: NaN on both sides, not 0
    assert any(0 < ours["per_class"][n]["iou"] < 1 for n in CLASS_NAMES.values())
