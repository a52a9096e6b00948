"""finetune/automatic.py: fusion of per-class logits into one label map, and the semantic
evaluation of a model's class prompts on every pixel."""

from __future__ import annotations

import math

import numpy as np
import torch

from samtune.adapters.registry import build_sam, family_of
from samtune.datasets.semantic import SemanticDataset
from samtune.finetune.automatic import class_logits, fuse, predict_index_maps
from samtune.finetune.scoring.protocol import evaluate_semantic


def test_fuse_takes_the_most_probable_class_or_background_below_the_threshold():
    logits = torch.tensor([[[3.0, -1.0, 0.1]], [[1.0, 2.0, 0.0]]])  # K=2 classes, 1×3 pixels
    assert fuse(logits, 0.5).tolist() == [[0, 1, 0]]
    assert fuse(logits, 0.6).tolist() == [[0, 1, 2]]  # p(0.1) = 0.52 < 0.6: background (index K)
    assert fuse(logits, 0.99).tolist() == [[2, 2, 2]]


def test_semantic_evaluation_scores_every_pixel_against_its_label(blob_source):
    blob_source = blob_source()
    family = family_of("tiny")
    model = build_sam("tiny", image_size=64)
    family.add_class_prompts(model, len(blob_source.class_names), 2)
    transform = family.make_transform(64)
    space = blob_source.label_space(sorted(blob_source.class_names))
    dataset = SemanticDataset(blob_source, transform, space, training=False)
    metrics = evaluate_semantic(model, family, dataset, 0.5, torch.device("cpu"), batch_size=3)
    assert set(metrics["per_class"]) == set(space.names) and "volume" not in metrics
    # the same numbers by hand: predicted maps, then TP/FP/FN over the whole split
    batch = [dataset[i] for i in range(len(dataset))]
    with torch.no_grad():
        maps = predict_index_maps(model, family, torch.stack([b["image"] for b in batch]), [b["meta"] for b in batch], 0.5)
    name = space.names[0]
    pred = np.concatenate([space.to_source_ids(m).ravel() for m in maps])
    truth = np.concatenate([b["meta"]["label"].ravel() for b in batch])
    keep = truth != blob_source.ignore_index
    tp = int(((pred == space.ids[0]) & (truth == space.ids[0]) & keep).sum())
    fp = int(((pred == space.ids[0]) & (truth != space.ids[0]) & keep).sum())
    fn = int(((pred != space.ids[0]) & (truth == space.ids[0]) & keep).sum())
    c = metrics["per_class"][name]
    assert (c["tp"], c["fp"], c["fn"]) == (tp, fp, fn)
    assert math.isclose(c["iou"], tp / (tp + fp + fn)) if tp + fp + fn else math.isnan(c["iou"])
    assert class_logits(model, family, batch[0]["image"][None]).shape == (1, len(space.ids), 64, 64)


def test_class_by_class_fusion_equals_fusing_all_resized_maps():
    from samtune.finetune.automatic import fuse_at_original

    family = family_of("tiny")
    low_res = torch.randn(5, 16, 16, generator=torch.Generator().manual_seed(0))
    meta = {"resized_size": (40, 64), "original_size": (75, 120)}
    full = family.logits_to_original(family.upscale_logits(low_res[None], 64)[0], meta["resized_size"], meta["original_size"])
    for threshold in (0.3, 0.5, 0.8):
        assert torch.equal(fuse_at_original(family, low_res, 64, meta, threshold), fuse(full, threshold))
