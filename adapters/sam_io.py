"""Running a (LoRA-wrapped) transformers SamModel on prompted batches, and mapping its masks back.

The trainer goes through ``SamModel.forward`` with gradients on (transformers' forward has no
``no_grad``), single-mask output for box prompts as SAM does for unambiguous prompts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def predict_low_res(model, pixel_values: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """B×3×S×S images, B×1×4 xyxy boxes (input px) -> B×1×s×s low-res mask logits (s = S/4·grid/…)."""
    out = model(pixel_values=pixel_values, input_boxes=boxes, multimask_output=False)
    return out.pred_masks[:, 0]  # B×1(box)×1(mask)×s×s -> B×1×s×s


def upscale_logits(low_res: torch.Tensor, image_size: int) -> torch.Tensor:
    """B×1×s×s -> B×1×S×S logits in the padded input frame."""
    return F.interpolate(low_res, size=(image_size, image_size), mode="bilinear", align_corners=False)


def logits_to_original(
    logits: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]
) -> torch.Tensor:
    """1×S×S input-frame logits -> H×W logits of the original image: crop the padding, resize."""
    h, w = resized_hw
    cropped = logits[None, :, :h, :w]
    return F.interpolate(cropped, size=tuple(original_hw), mode="bilinear", align_corners=False)[0, 0]
