"""Running a (LoRA-wrapped) transformers SamModel on prompted batches, and mapping masks back.

The image encoder runs once per image (``encode_images``, with gradients when LoRA or full
training needs them: transformers' ``get_image_embeddings`` is wrapped in no_grad); the prompt
encoder and mask decoder run once per prompt round on those embeddings (``decode_prompts``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def encode_images(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """B×3×S×S normalised images -> B×C×g×g image embeddings."""
    return model.vision_encoder(pixel_values)[0]


def decode_prompts(
    model,
    image_embeddings: torch.Tensor,
    boxes: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    point_labels: torch.Tensor | None = None,
    mask_inputs: torch.Tensor | None = None,
    multimask_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt per embedding row.

    ``image_embeddings`` N×C×g×g; ``boxes`` N×4 xyxy; ``points`` N×K×2 (x, y) with ``point_labels``
    N×K (1, 0, -1 padding); ``mask_inputs`` N×1×4g×4g low-res logits; coordinates in input px.
    Returns N×M×4g×4g low-res mask logits and N×M IoU predictions (M = 3 with multimask, else 1).
    """
    out = model(
        image_embeddings=image_embeddings,
        input_boxes=boxes[:, None] if boxes is not None else None,
        input_points=points[:, None] if points is not None and points.shape[1] else None,
        input_labels=point_labels[:, None] if points is not None and points.shape[1] else None,
        input_masks=mask_inputs,
        multimask_output=multimask_output,
    )
    return out.pred_masks[:, 0], out.iou_scores[:, 0]


def upscale_logits(low_res: torch.Tensor, image_size: int) -> torch.Tensor:
    """N×M×s×s -> N×M×S×S logits in the padded input frame."""
    return F.interpolate(low_res, size=(image_size, image_size), mode="bilinear", align_corners=False)


def logits_to_original(
    logits: torch.Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]
) -> torch.Tensor:
    """1×S×S input-frame logits -> H×W logits of the original image: crop the padding, resize."""
    h, w = resized_hw
    cropped = logits[None, :, :h, :w]
    return F.interpolate(cropped, size=tuple(original_hw), mode="bilinear", align_corners=False)[0, 0]
