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
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from samtune.adapters.lora import prepare_trainable
from samtune.datasets.cityscapes import CLASS_NAMES, TRAIN_CLASSES, prediction_name
from samtune.datasets.synthetic import generate_cityscapes
from samtune.datasets import sample as S
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



def _oracle_rounds(model, family, batch, prompts, image_size, use_box, generator):
    """The prompted masks of a model that is right up to a shift: sample k's mask moved by k % 3 px
    to the right, every fifth one missed, its logits' height (so its confidence) varying with k."""
    masks = batch[S.MASKS].float()  # B×1×S×S, the prompted objects in the input frame
    logits = []
    for k, mask in enumerate(masks):
        height = 1.0 + k % 3 if k % 5 != 4 else -1.0
        logits.append(torch.roll(mask, shifts=k % 3, dims=-1) * 2 * height - height)
    return [torch.stack(logits)], None


def _oracle_maps(model, family, images, metas, threshold):
    """Automatic label maps equal to the ground truth (trainIds as class indexes, void -> none), one
    row shifted; the probability of each pixel's class from a seeded generator."""
    out = []
    for meta in metas:
        index_map = np.where(meta["label"] == 255, 19, meta["label"]).astype(np.uint8)
        index_map[20:] = np.roll(index_map[20:], 1, axis=1)
        scores = np.random.default_rng(meta["index"]).uniform(0.5, 1.0, index_map.shape).astype(np.float32)
        out.append((index_map, scores))
    return out


def test_saved_instances_score_as_the_official_instance_evaluator_scores_them(tmp_path, monkeypatch, official_instance_evaluator):
    """task both, prompts per instance: ``samtune evaluate`` writes the instance benchmark's files for
    the prompted masks (one per instance) and for the automatic ones (thing components); the
    official evaluator, reading those files against the gtFine instanceIds, gives our AP and AP50.
    The model's outputs are those of a near-oracle (shifted ground truth), so AP is neither 0 nor 1."""
    from samtune.finetune.scoring import protocol

    monkeypatch.setattr(protocol, "run_rounds", _oracle_rounds)
    monkeypatch.setattr(protocol, "predict_scored_maps", _oracle_maps)
    monkeypatch.setattr(api, "report", lambda *a, **k: tmp_path / "report.html")  # the page runs the real model: not under test
    root = generate_cityscapes(tmp_path / "cityscapes", n_train=1, n_val=3, size_wh=(256, 128), seed=1)
    recipe = validate_recipe({
        "task": "both",
        "data": {"kind": "cityscapes", "root": str(root), "min_pixels": 20},
        "model": {"name": "tiny", "image_size": 64},
        "train": {"device": "cpu"},
        "prompts": {"per": "instance"},
        "eval": {"save_predictions": True, "batch_size": 4},
        "output": {"dir": str(tmp_path / "run")},
    })  # fmt: skip
    checkpoint = _checkpoint(recipe, tmp_path / "run" / "checkpoints" / "last")
    metrics = api.evaluate(recipe, checkpoint, out=tmp_path / "eval" / "metrics.json", quiet=True)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    gt_files = sorted((root / "gtFine" / "val").glob("*/*_gtFine_instanceIds.png"))
    assert len(gt_files) == 3
    for part, folder_name in (("prompted", "prompted"), ("semantic", "automatic")):
        ours = metrics[part]["instances"]
        assert saved[part]["instances"]["protocol"]["benchmark"].startswith("Cityscapes instance-level")
        folder = tmp_path / "eval" / "instances" / folder_name
        texts = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.txt"))
        assert texts == [f"frankfurt/{gt.name.replace('_gtFine_instanceIds.png', '')}.txt" for gt in gt_files]
        theirs = official_instance_evaluator(folder, gt_files)["averages"]
        for name, scores in theirs["classes"].items():
            got = ours["per_class"][name]
            for key, official in (("ap", scores["ap"]), ("ap50", scores["ap50%"])):
                assert (math.isnan(got[key]) and math.isnan(official)) or got[key] == pytest.approx(official, abs=1e-12), (part, name, key)
        assert ours["ap"] == pytest.approx(theirs["allAp"], abs=1e-12) and ours["ap50"] == pytest.approx(theirs["allAp50%"], abs=1e-12)
        assert 0 < ours["ap"] < ours["ap50"] < 1, (part, ours)
    prompted, automatic = metrics["prompted"]["instances"]["per_class"]["car"], metrics["semantic"]["instances"]["per_class"]["car"]
    assert 0 < prompted["ap"] < prompted["ap50"] < 1
    assert prompted["predictions"] >= prompted["instances"] - 1  # each car of >= min_pixels prompted on its own
    assert automatic["predictions"] < automatic["instances"]  # touching cars: one component, one automatic instance
