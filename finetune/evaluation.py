"""Evaluation with box prompts from the ground truth: per-class IoU/Dice at the original resolution."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from samtune.adapters.sam_io import logits_to_original, predict_low_res, upscale_logits
from samtune.datasets import sample as S
from samtune.datasets.prompted import PromptedDataset
from samtune.finetune.metrics import ClassIoUAccumulator


@torch.no_grad()
def evaluate(model, dataset: PromptedDataset, batch_size: int, device: torch.device, desc: str = "eval") -> dict:
    was_training = model.training
    model.eval()
    image_size = dataset.transform.transforms[0].max_size
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=S.collate_samples)
    acc = ClassIoUAccumulator()
    for batch in tqdm(loader, desc=desc, leave=False, unit="batch"):
        low_res = predict_low_res(model, batch[S.IMAGE].to(device), batch[S.BOXES].to(device))
        logits = upscale_logits(low_res, image_size).cpu()
        for i, meta in enumerate(batch[S.META]):
            pred = logits_to_original(logits[i], meta["resized_size"], meta["original_size"]) > 0
            acc.add(meta["class_name"], pred.numpy(), meta["target"], meta.get("ignore"))
    model.train(was_training)
    return acc.result()
