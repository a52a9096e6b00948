"""Instance AP against cityscapesScripts' evalInstanceLevelSemanticLabeling (a dev dependency) on the
files ``write_instance_predictions`` writes: touching cars, a car group, an instance under 100 px,
void ground truth, duplicates, ties in confidence, classes the benchmark does not score and empty
masks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from samtune.finetune.scoring.instance_metrics import (
    INSTANCE_CLASSES,
    InstanceAPAccumulator,
    average_precision,
    thing_components,
    InstancePredictionFiles,
)

H, W = 96, 160


def _scene(rng) -> np.ndarray:
    """H×W instanceIds: road, a sidewalk, void, a row of touching cars, a small car, a car group,
    people, a caravan (has instances, not evaluated) and a bicycle nobody predicts."""
    ids = np.full((H, W), 7, np.int32)
    ids[:20] = 8
    ids[:6, :30] = 0  # unlabeled
    ids[80:, 120:] = 4  # static
    x = int(rng.integers(5, 30))
    for n in range(int(rng.integers(2, 5))):  # touching cars 26000..
        ids[40:60, x + 22 * n : x + 22 * (n + 1)] = 26000 + n
    ids[25:31, 130:140] = 26010  # 60 px: under minRegionSize
    ids[65:78, 100:130] = 26  # car group
    ids[22:50, 140:148] = 24000
    ids[70:92, 10:18] = 24001
    ids[5:15, 60:90] = 29000  # caravan
    ids[84:96, 40:60] = 33000  # bicycle
    return ids


def _predictions(rng, ids: np.ndarray) -> list[tuple[int, np.ndarray, float]]:
    confidences = [0.3, 0.5, 0.5, 0.7, 0.9, 0.95]
    out = []
    for region in np.unique(ids[ids >= 1000]).tolist():
        if region // 1000 == 33 or rng.uniform() < 0.15:
            continue
        mask = np.roll(ids == region, int(rng.integers(0, 8)), axis=1)
        if rng.uniform() < 0.4:
            mask |= np.roll(mask, int(rng.integers(1, 6)), axis=0)
        out.append((region // 1000, mask, float(rng.choice(confidences))))
        if rng.uniform() < 0.4:  # a duplicate of the same object
            out.append((region // 1000, np.roll(mask, 2, axis=0), float(rng.choice(confidences))))
    blob = np.zeros((H, W), bool)
    blob[int(rng.integers(0, 60)) :, int(rng.integers(0, 120)) :][:20, :25] = True
    out.append((26, blob, float(rng.choice(confidences))))  # a false positive somewhere
    void = np.zeros((H, W), bool)
    void[:8, :26] = True
    out.append((24, void, 0.6))  # mostly on void: ignored
    group = ids == 26
    group[60:65, 100:130] = True
    out.append((26, group, 0.8))  # the car group: ignored
    out.append((26, ids == 26010, 0.4))  # the small car: ignored
    out.append((7, ids == 7, 0.9))  # road: not an instance class
    out.append((29, ids == 29000, 0.9))  # caravan: not evaluated
    out.append((25, np.zeros((H, W), bool), 0.9))  # empty: skipped by both
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_instance_ap_equals_the_official_evaluator(tmp_path, official_instance_evaluator, seed):
    rng = np.random.default_rng(seed)
    acc, gt_files = InstanceAPAccumulator(), []
    predictions = tmp_path / "instances"
    files = InstancePredictionFiles(predictions)
    for n in range(3):
        ids = _scene(rng)
        name = f"frankfurt/frankfurt_{n:06d}_000019"
        gt = tmp_path / "gtFine" / "val" / f"{name}_gtFine_instanceIds.png"
        gt.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ids.astype(np.uint16)).save(gt)
        gt_files.append(gt)
        preds = _predictions(rng, ids)
        acc.add_ground_truth(name, ids)
        kept = [acc.add_prediction(name, ids, label, mask, conf) for label, mask, conf in preds]
        assert kept == [label in INSTANCE_CLASSES and bool(mask.any()) for label, mask, _ in preds]  # road, caravans, empty: not kept
        files.add_image(name)
        for k, (label, mask, conf) in enumerate(preds):
            if mask.any():  # as evaluation writes them: empty masks are not predictions
                files.add(name, f"{k:03d}", label, mask, conf)
    files.write()
    ours = acc.result()
    theirs = official_instance_evaluator(predictions, gt_files)["averages"]

    assert set(ours["per_class"]) == set(theirs["classes"]) == set(INSTANCE_CLASSES.values())
    for name, scores in theirs["classes"].items():
        for key, official in (("ap", scores["ap"]), ("ap50", scores["ap50%"])):
            got = ours["per_class"][name][key]
            assert (math.isnan(got) and math.isnan(official)) or got == pytest.approx(official, abs=1e-12), (name, key)
    assert ours["ap"] == pytest.approx(theirs["allAp"], abs=1e-12)
    assert ours["ap50"] == pytest.approx(theirs["allAp50%"], abs=1e-12)
    assert ours["per_class"]["bicycle"]["ap"] == 0.0 and math.isnan(ours["per_class"]["rider"]["ap"])
    assert 0 < ours["per_class"]["car"]["ap"] < ours["per_class"]["car"]["ap50"] < 1


def test_average_precision_of_simple_curves():
    assert average_precision(np.array([1.0, 1.0]), np.array([0.9, 0.8]), 0) == pytest.approx(1.0)
    assert average_precision(np.array([1.0]), np.array([0.9]), 1) == pytest.approx(0.5)  # recall 1/2 at precision 1
    assert average_precision(np.array([]), np.array([]), 2) == 0.0  # nothing scored: no true positive


def test_automatic_instances_are_the_thing_components_of_the_label_map():
    index_map = np.full((20, 30), 3, np.uint8)  # 3 = no class
    index_map[2:8, 2:8] = 1  # car
    index_map[10:15, 20:28] = 1  # another car
    index_map[2:8, 15:20] = 0  # road: not a thing
    scores = np.full((20, 30), 0.5, np.float32)
    scores[2:8, 2:8] = 0.9
    found = thing_components(index_map, scores, [7, 26, 24])
    assert [(label, int(mask.sum()), round(conf, 6)) for label, mask, conf in found] == [(26, 36, 0.9), (26, 40, 0.5)]
