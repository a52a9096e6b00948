"""Instance AP during evaluation (``samtune.finetune.scoring.protocol``), on sources with the
Cityscapes instance ground truth: the predictions of the prompted and of the automatic mode, scored
by ``instance_metrics`` and, with ``eval.save_predictions``, written as the official evaluator reads
them (``instances/prompted/``, ``instances/automatic/``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from samtune.datasets.prompted import PromptedDataset
from samtune.datasets.source import LabelSpace
from samtune.finetune.distributed import current, merge_across_ranks
from samtune.finetune.scoring.instance_metrics import (
    InstanceAPAccumulator,
    InstancePredictionFiles,
    has_instance_benchmark,
    instance_name,
    instance_protocol,
    thing_components,
)


class PromptedInstances:
    """Instance AP of the prompted masks (``prompts.per: instance`` on Cityscapes with instanceIds):
    each prompted instance's final mask is one prediction, its confidence the mean probability over
    it; every validation image's ground truth counts (instances too small to prompt are misses)."""

    def __init__(self, dataset: PromptedDataset, folder: Path | None):
        self.source = source = dataset.source
        ids = sorted(dataset.class_names)
        self.label_ids = dict(zip(ids, source.label_space(ids).file_values()))
        self.scores = InstanceAPAccumulator()
        self.files = InstancePredictionFiles(folder) if folder is not None else None
        for index in range(len(source)):
            self.scores.add_ground_truth(instance_name(source, index), source.instance_ids(index))
            if self.files is not None:
                self.files.add_image(instance_name(source, index))

    @staticmethod
    def wanted(dataset: PromptedDataset, per: str) -> bool:
        """Per-instance prompts on every object (no ``eval.max_samples`` subset) of a source with the benchmark's ground truth."""
        return per == "instance" and not dataset.is_subset and has_instance_benchmark(dataset.source)

    def add(self, meta: dict, logits: torch.Tensor, pred: np.ndarray) -> None:
        name, class_id = instance_name(self.source, meta["index"]), meta["class_ids"][0]
        confidence = float(torch.sigmoid(logits.float())[torch.from_numpy(pred)].mean()) if pred.any() else 0.0
        kept = self.scores.add_prediction(name, self.source.instance_ids(meta["index"]), self.label_ids[class_id], pred, confidence)
        if kept and self.files is not None:
            self.files.add(name, f"{class_id:03d}_{meta['object']:03d}", self.label_ids[class_id], pred, confidence)

    def result(self) -> dict:
        merge_across_ranks(self.scores, *([self.files] if self.files is not None else []))
        if self.files is not None and current().main:
            self.files.write()
        objects = "one mask per prompted instance (the final round's), confidence = its mean predicted probability"
        return {**self.scores.result(), "protocol": instance_protocol(objects)}


class AutomaticInstances:
    """Instance AP of the automatic mode: each connected component (8-connectivity) of a thing class
    in the fused label map is one instance, its confidence the mean probability of that class over
    it (touching objects of one class therefore come out as one instance)."""

    def __init__(self, source, space: LabelSpace, folder: Path | None):
        self.source, self.label_ids = source, space.file_values()
        self.scores = InstanceAPAccumulator()
        self.files = InstancePredictionFiles(folder) if folder is not None else None

    def add(self, index: int, index_map: np.ndarray, scores: np.ndarray) -> None:
        name, ids = instance_name(self.source, index), self.source.instance_ids(index)
        self.scores.add_ground_truth(name, ids)
        if self.files is not None:
            self.files.add_image(name)
        for n, (label_id, mask, confidence) in enumerate(thing_components(index_map, scores, self.label_ids)):
            if self.scores.add_prediction(name, ids, label_id, mask, confidence) and self.files is not None:
                self.files.add(name, f"{n:04d}", label_id, mask, confidence)

    def result(self) -> dict:
        merge_across_ranks(self.scores, *([self.files] if self.files is not None else []))
        if self.files is not None and current().main:
            self.files.write()
        objects = ("each connected component (8-connectivity) of a thing class in the automatic label map, confidence = the mean "
                   "probability of that class over it")
        return {**self.scores.result(), "protocol": instance_protocol(objects)}
