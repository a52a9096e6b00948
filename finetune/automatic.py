"""The automatic mode: every class of an image predicted with no user input, from the learnt class
prompts (``samtune.adapters.family.ClassPrompts``), fused into one label map.

Fusion: each pixel takes the class with the highest probability, or background when no class
reaches ``automatic.threshold`` (per-class sigmoid masks, as SAM predicts them, so classes do not
compete during training and the threshold is one readable number).

Semantic evaluation runs this on every validation pixel: one confusion matrix over the split
(Cityscapes-style per-class IoU, void/255 excluded) and, for volumes, the whole predicted label
volume of each case (every slice) scored in 3D.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from samtune import SamtuneError
from samtune.adapters.family import CLASS_PROMPTS, ModelFamily
from samtune.datasets import semantic as SEM
from samtune.datasets.semantic import SemanticDataset, collate_semantic
from samtune.datasets.source import LabelSpace
from samtune.finetune.distributed import merge_across_ranks, shard
from samtune.finetune.label_files import write_label_png
from samtune.finetune.semantic_metrics import ConfusionAccumulator
from samtune.finetune.volume_metrics import SemanticVolumeAccumulator


def has_class_prompts(model) -> bool:
    return hasattr(model, CLASS_PROMPTS)


def class_low_res(model, family: ModelFamily, pixel_values: torch.Tensor, embeddings=None) -> torch.Tensor:
    """B×3×S×S images -> B×K×s×s low-res logits (float32), one mask per class."""
    if not has_class_prompts(model):
        raise SamtuneError("this model has no class prompts: it was not trained with task: automatic or both.")
    if embeddings is None:
        embeddings = family.encode_images(model, pixel_values)
    return family.decode_classes(model, embeddings, getattr(model, CLASS_PROMPTS)()).float()


def class_logits(model, family: ModelFamily, pixel_values: torch.Tensor, embeddings=None) -> torch.Tensor:
    """B×3×S×S images -> B×K×S×S logits (float32) in the padded input frame (training's loss)."""
    return family.upscale_logits(class_low_res(model, family, pixel_values, embeddings), pixel_values.shape[-1])


def fuse(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """K×H×W logits -> H×W class indexes, K where no class reaches the probability ``threshold``."""
    best, index = logits.max(0)
    return torch.where(best >= math.log(threshold / (1 - threshold)), index, torch.full_like(index, logits.shape[0]))


def fuse_at_original(family: ModelFamily, low_res: torch.Tensor, image_size: int, meta: dict, threshold: float) -> torch.Tensor:
    """K×s×s low-res logits of one image -> its H×W class-index map at the original resolution.

    Class by class with a running maximum: the same numbers as resizing all K maps and calling
    ``fuse``, without a K×H×W tensor (19×1024×2048 floats = 160 MB for a Cityscapes image).
    """
    best = index = None
    for k in range(low_res.shape[0]):
        up = family.upscale_logits(low_res[None, k : k + 1], image_size)[0]
        logits = family.logits_to_original(up, meta["resized_size"], meta["original_size"])
        if best is None:
            best, index = logits, torch.zeros(logits.shape, dtype=torch.long, device=logits.device)
        else:
            better = logits > best  # ties keep the lower class index, as argmax does
            best = torch.where(better, logits, best)
            index = torch.where(better, torch.full_like(index, k), index)
    background = torch.full_like(index, low_res.shape[0])
    return torch.where(best >= math.log(threshold / (1 - threshold)), index, background)


def predict_index_maps(model, family: ModelFamily, batch_images: torch.Tensor, metas: list[dict], threshold: float) -> list[np.ndarray]:
    """One H×W class-index map (uint8, K = background) per image, at its original resolution."""
    low_res = class_low_res(model, family, batch_images)
    size = batch_images.shape[-1]
    return [fuse_at_original(family, low_res[i], size, meta, threshold).to(torch.uint8).cpu().numpy() for i, meta in enumerate(metas)]


@torch.no_grad()
def evaluate_semantic(
    model, family: ModelFamily, dataset: SemanticDataset, threshold: float, device: torch.device, batch_size: int,
    desc: str = "eval (automatic)", predictions: Path | None = None,
) -> dict:
    """Label maps of every image of ``dataset`` against its labels; ``predictions``: a folder to
    write each 2D label map into (file ids, e.g. Cityscapes labelIds, named by the source)."""
    was_training = model.training
    model.eval()
    space: LabelSpace = dataset.space
    source = dataset.source
    class_names = dict(zip(space.ids, space.names))
    confusion = ConfusionAccumulator(class_names, source.ignore_index)
    volumes = SemanticVolumeAccumulator(source, class_names) if source.volumetric else None
    loader = DataLoader(Subset(dataset, shard(len(dataset), batch_size)), batch_size=batch_size, shuffle=False, collate_fn=collate_semantic)
    for batch in tqdm(loader, desc=desc, leave=False, unit="batch", disable=None):  # None: no bar when not a terminal
        metas = batch[SEM.META]
        for meta, index_map in zip(metas, predict_index_maps(model, family, batch[SEM.IMAGE].to(device), metas, threshold)):
            pred = space.to_source_ids(index_map)
            confusion.add(pred, meta["label"])
            if volumes is not None:
                volumes.add_label(meta["index"], pred.astype(np.uint8))
            elif predictions is not None:
                write_label_png(space.to_file_ids(index_map), predictions / source.prediction_name(meta["index"]))
    model.train(was_training)
    merge_across_ranks(confusion, *([volumes] if volumes is not None else []))
    metrics = confusion.result()
    metrics.pop("confusion", None)
    if volumes is not None:
        metrics["volume"] = volumes.result()
        metrics["label_volumes"] = volumes.volumes  # not JSON: the caller writes or drops them
    return metrics
