"""The automatic mode: every class of an image predicted with no user input, from the learnt class
prompts (``samtune.adapters.family.ClassPrompts``), fused into one label map.

Fusion: each pixel takes the class with the highest probability, or background when no class
reaches ``automatic.threshold`` (per-class sigmoid masks, as SAM predicts them, so classes do not
compete during training and the threshold is one readable number).

Semantic evaluation (``samtune.finetune.scoring.protocol.evaluate_semantic``) runs this on every
validation pixel.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from samtune import SamtuneError
from samtune.adapters.family import CLASS_PROMPTS, ModelFamily


def has_class_prompts(model) -> bool:
    return hasattr(model, CLASS_PROMPTS)


def class_low_res(model, family: ModelFamily, pixel_values: torch.Tensor, embeddings=None, classes: torch.Tensor | None = None) -> torch.Tensor:
    """B×3×S×S images -> B×K×s×s low-res logits (float32), one mask per class (``classes``: only
    those class indexes, in that order)."""
    if not has_class_prompts(model):
        raise SamtuneError("this model has no class prompts: it was not trained with task: automatic or both.")
    if embeddings is None:
        embeddings = family.encode_images(model, pixel_values)
    tokens = getattr(model, CLASS_PROMPTS)()
    return family.decode_classes(model, embeddings, tokens if classes is None else tokens[classes]).float()


def class_logits(model, family: ModelFamily, pixel_values: torch.Tensor, embeddings=None) -> torch.Tensor:
    """B×3×S×S images -> B×K×S×S logits (float32) in the padded input frame (training's loss)."""
    return family.upscale_logits(class_low_res(model, family, pixel_values, embeddings), pixel_values.shape[-1])


def fuse(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """K×H×W logits -> H×W class indexes, K where no class reaches the probability ``threshold``."""
    best, index = logits.max(0)
    return torch.where(best >= math.log(threshold / (1 - threshold)), index, torch.full_like(index, logits.shape[0]))


def fuse_at_original(family: ModelFamily, low_res: torch.Tensor, image_size: int, meta: dict, threshold: float,
                     with_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """K×s×s low-res logits of one image -> its H×W class-index map at the original resolution
    (``with_logits``: and the H×W logit of the class each pixel took, the highest).

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
    fused = torch.where(best >= math.log(threshold / (1 - threshold)), index, background)
    return (fused, best) if with_logits else fused


def predict_index_maps(model, family: ModelFamily, batch_images: torch.Tensor, metas: list[dict], threshold: float) -> list[np.ndarray]:
    """One H×W class-index map (uint8, K = background) per image, at its original resolution."""
    low_res = class_low_res(model, family, batch_images)
    size = batch_images.shape[-1]
    return [fuse_at_original(family, low_res[i], size, meta, threshold).to(torch.uint8).cpu().numpy() for i, meta in enumerate(metas)]


def predict_scored_maps(model, family: ModelFamily, batch_images: torch.Tensor, metas: list[dict], threshold: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """As ``predict_index_maps``, each map with the H×W float32 probability of the class each pixel
    took (the confidence of automatic instances)."""
    low_res = class_low_res(model, family, batch_images)
    size = batch_images.shape[-1]
    out = []
    for i, meta in enumerate(metas):
        index, best = fuse_at_original(family, low_res[i], size, meta, threshold, with_logits=True)
        out.append((index.to(torch.uint8).cpu().numpy(), torch.sigmoid(best.float()).cpu().numpy()))
    return out
