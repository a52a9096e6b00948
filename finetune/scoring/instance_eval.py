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


class _InstanceScores:
    """Scores (and, with a folder, the evaluator's files) of one kind of predicted instances."""

    OBJECTS = ""  # what one prediction is, for the protocol

    def __init__(self, source, folder: Path | None):
        self.source = source
        self.scores = InstanceAPAccumulator()
        self.files = InstancePredictionFiles(folder) if folder is not None else None

    def _image(self, index: int) -> tuple[str, np.ndarray]:
        """(name, ground truth) of image ``index``, registered for scoring and files."""
        name, ids = instance_name(self.source, index), self.source.instance_ids(index)
        self.scores.add_ground_truth(name, ids)
        if self.files is not None:
            self.files.add_image(name)
        return name, ids

    def _predict(self, name: str, ids: np.ndarray, tag: str, label_id: int, mask: np.ndarray, confidence: float) -> None:
        if self.scores.add_prediction(name, ids, label_id, mask, confidence) and self.files is not None:
            self.files.add(name, tag, label_id, mask, confidence)

    def result(self) -> dict:
        merge_across_ranks(self.scores, *([self.files] if self.files is not None else []))
        if self.files is not None and current().main:
            self.files.write()
        return {**self.scores.result(), "protocol": instance_protocol(self.OBJECTS)}


class PromptedInstances(_InstanceScores):
    """Instance AP of the prompted masks (``prompts.per: instance`` on Cityscapes with instanceIds):
    each prompted instance's final mask is one prediction, its confidence the mean probability over
    it; every validation image's ground truth counts (instances too small to prompt are misses)."""

    OBJECTS = "one mask per prompted instance (the final round's), confidence = its mean predicted probability"

    def __init__(self, dataset: PromptedDataset, folder: Path | None):
        super().__init__(dataset.source, folder)
        ids = sorted(dataset.class_names)
        self.label_ids = dict(zip(ids, dataset.source.label_space(ids).file_values()))
        for index in range(len(dataset.source)):
            self._image(index)

    @staticmethod
    def wanted(dataset: PromptedDataset, per: str) -> bool:
        """Per-instance prompts on every object (no ``eval.max_samples`` subset) of a source with the benchmark's ground truth."""
        return per == "instance" and not dataset.is_subset and has_instance_benchmark(dataset.source)

    def add(self, meta: dict, logits: torch.Tensor, pred: np.ndarray) -> None:
        name, class_id = instance_name(self.source, meta["index"]), meta["class_ids"][0]
        confidence = float(torch.sigmoid(logits.float())[torch.from_numpy(pred)].mean()) if pred.any() else 0.0
        label_id = self.label_ids[class_id]
        self._predict(name, self.source.instance_ids(meta["index"]), f"{class_id:03d}_{meta['object']:03d}", label_id, pred, confidence)


class AutomaticInstances(_InstanceScores):
    """Instance AP of the automatic mode: each connected component (8-connectivity) of a thing class
    in the fused label map is one instance, its confidence the mean probability of that class over
    it (touching objects of one class therefore come out as one instance)."""

    OBJECTS = ("each connected component (8-connectivity) of a thing class in the automatic label map, confidence = the mean "
               "probability of that class over it")

    def __init__(self, source, space: LabelSpace, folder: Path | None):
        super().__init__(source, folder)
        self.label_ids = space.file_values()

    def add(self, index: int, index_map: np.ndarray, scores: np.ndarray) -> None:
        name, ids = self._image(index)
        for n, (label_id, mask, confidence) in enumerate(thing_components(index_map, scores, self.label_ids)):
            self._predict(name, ids, f"{n:04d}", label_id, mask, confidence)
