"""Evaluation with prompts from the ground truth: per-class IoU/Dice at the original resolution,
after the initial prompt and after every corrective round.

The protocol comes from the recipe, so training and ``samtune evaluate`` give the same numbers:
the first prompt is the box when ``prompts.box_probability >= 0.5``, else the points; jitter is
seeded by the sample index; corrective clicks by ``seed``.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from samtune.adapters.family import ModelFamily
from samtune.datasets import sample as S
from samtune.datasets.prompted import PromptedDataset
from samtune.finetune.interaction import run_rounds, total_rounds
from samtune.finetune.metrics import ClassIoUAccumulator
from samtune.finetune.recipe import Recipe
from samtune.finetune.volume_metrics import VolumeMetricAccumulator


def uses_box(recipe: Recipe) -> bool:
    """Evaluation's first prompt: the box when training mostly starts from boxes."""
    return recipe.prompts.box_probability >= 0.5


@torch.no_grad()
def evaluate(model, family: ModelFamily, dataset: PromptedDataset, recipe: Recipe, device: torch.device, desc: str = "eval") -> dict:
    """Headline metrics are those after the last round; ``by_round`` lists mIoU per round."""
    was_training = model.training
    model.eval()
    use_box = uses_box(recipe)
    rounds = total_rounds(recipe.prompts)
    loader = DataLoader(dataset, batch_size=recipe.eval.batch_size, shuffle=False, collate_fn=S.collate_samples)
    accumulators = [ClassIoUAccumulator() for _ in range(rounds)]
    volumes = None  # volumetric sources with every slice evaluated: per-case 3D metrics in mm
    if dataset.source.volumetric and not dataset.is_subset:
        volumes = VolumeMetricAccumulator(dataset.source, dataset.class_names)
    generator = torch.Generator(device=device).manual_seed(recipe.seed)  # corrective clicks: the same on every evaluation
    for batch in tqdm(loader, desc=desc, leave=False, unit="batch"):
        batch = {k: (v.to(device) if k != S.META else v) for k, v in batch.items()}
        outputs, _ = run_rounds(model, family, batch, recipe.prompts, dataset.image_size, use_box, generator)
        for round_index, (round_logits, acc) in enumerate(zip(outputs, accumulators)):
            logits = round_logits.cpu()
            for i, meta in enumerate(batch[S.META]):
                pred = (family.logits_to_original(logits[i], meta["resized_size"], meta["original_size"]) > 0).numpy()
                acc.add(meta["class_names"][0], pred, meta["targets"][0], meta["ignore"])
                if volumes is not None and round_index == len(outputs) - 1:
                    volumes.add(meta["index"], meta["class_ids"][0], pred)
    model.train(was_training)
    results = [acc.result() for acc in accumulators]
    metrics = results[-1]
    metrics["prompt"] = "box" if use_box else "points"
    metrics["rounds"] = rounds
    if volumes is not None:
        metrics["volume"] = volumes.result()
    if rounds > 1:
        metrics["by_round"] = [{"round": r, "miou": m["miou"], "mdice": m["mdice"]} for r, m in enumerate(results)]
    return metrics
