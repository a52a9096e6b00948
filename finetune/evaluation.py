"""Evaluation with prompts from the ground truth: per-class IoU/Dice at the original resolution,
after the initial prompt and after every corrective round."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from samtune.adapters.sam_io import logits_to_original
from samtune.datasets import sample as S
from samtune.datasets.prompted import PromptedDataset
from samtune.finetune.interaction import RoundSettings, run_rounds
from samtune.finetune.metrics import ClassIoUAccumulator
from samtune.finetune.volume_metrics import VolumeMetricAccumulator


@torch.no_grad()
def evaluate(
    model,
    dataset: PromptedDataset,
    batch_size: int,
    device: torch.device,
    rounds: RoundSettings = RoundSettings(),
    use_box: bool = True,
    seed: int = 0,
    desc: str = "eval",
) -> dict:
    """Headline metrics are those after the last round; ``by_round`` lists mIoU per round."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=S.collate_samples)
    accumulators = [ClassIoUAccumulator() for _ in range(rounds.total)]
    volumes = None  # volumetric sources with every slice evaluated: per-case 3D metrics in mm
    if hasattr(dataset.source, "case_volume") and not getattr(dataset, "subset", False):
        volumes = VolumeMetricAccumulator(dataset.source, dataset.class_names)
    generator = torch.Generator(device=device).manual_seed(seed)  # corrective clicks: the same on every evaluation
    for batch in tqdm(loader, desc=desc, leave=False, unit="batch"):
        batch = {k: (v.to(device) if k != S.META else v) for k, v in batch.items()}
        outputs, _ = run_rounds(model, batch, rounds, dataset.image_size, use_box, generator)
        for round_index, (round_logits, acc) in enumerate(zip(outputs, accumulators)):
            logits = round_logits.cpu()
            for i, meta in enumerate(batch[S.META]):
                pred = (logits_to_original(logits[i], meta["resized_size"], meta["original_size"]) > 0).numpy()
                acc.add(meta["class_names"][0], pred, meta["targets"][0], meta.get("ignore"))
                if volumes is not None and round_index == len(outputs) - 1:
                    volumes.add(meta["index"], meta["class_ids"][0], pred)
    model.train(was_training)
    results = [acc.result() for acc in accumulators]
    metrics = results[-1]
    metrics["prompt"] = "box" if use_box else "points"
    metrics["rounds"] = rounds.total
    if volumes is not None:
        metrics["volume"] = volumes.result()
    if rounds.total > 1:
        metrics["by_round"] = [{"round": r, "miou": m["miou"], "mdice": m["mdice"]} for r, m in enumerate(results)]
    return metrics
