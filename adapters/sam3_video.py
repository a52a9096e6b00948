"""SAM 3's memory tracker for volumes: transformers' ``Sam3TrackerVideoModel`` around samtune's
``Sam3Segmenter`` (adapters/sam3_model.py), the slices of a volume as the frames of a video.

``Sam3TrackerVideoModel`` is SAM 2's video tracker (transformers writes it as ``Sam2Video*``
subclasses with nothing added: modular_sam3_tracker_video.py, its inference session included, so
finetune/predict/propagation.py drives it as it drives SAM 2's) reading the tracker's half of SAM 3:

    vision_encoder          the ViT and the *tracker* neck (samtune: ``vision_encoder.backbone`` and
                            ``vision_encoder.tracker_neck``; the detector's neck is not read), through
                            ``TrackerVision``, which gives what ``Sam3VisionModel`` gives
    prompt_encoder, mask_decoder, shared_image_embedding, no_memory_embedding   samtune's, as they are
    memory_attention, memory_encoder, object_pointer_proj, ...   the memory modules (``is_memory_key``)

Every image module is the image model's own (shared, not copied; LoRA merged first), so whatever
prediction arranged in them (finetune.runtime.inference_model) holds in the tracker too. The memory
modules come from the released folder, where they are ``tracker_model.<name>`` beside the image
modules (``Sam3VideoModel``'s layout: tests/unit/adapters/data/sam3_released_shapes.json), or stay at
random init for random variants (propagation then only shows that the path runs).

Like ``Sam3VideoModel``, the tracker runs the neck's four levels and drops the 28 px one
(``Sam3TrackerVideoModel.get_image_features``); the prompted slice therefore decodes exactly as
samtune's ``decode_prompts`` (the 14 px map plus ``no_memory_embedding``, the two finer maps through
``conv_s0``/``conv_s1``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import Sam3TrackerVideoModel
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoVisionEncoderOutput

from samtune.adapters.checkpoint_files import load_part

# Sam3Segmenter's top-level modules that Sam3TrackerVideoModel has under the same name (same code:
# transformers' Sam3Tracker* and Sam3TrackerVideo* prompt encoder and mask decoder are both SAM 2's)
IMAGE_MODULES = ("prompt_encoder", "mask_decoder", "shared_image_embedding", "no_memory_embedding")
RELEASED_PREFIX = "tracker_model."  # the memory modules' prefix in the released Sam3VideoModel folder


class TrackerVision(nn.Module):
    """``Sam3VisionModel.forward`` on samtune's ViT and tracker neck (shared modules): B×3×S×S ->
    the neck's four maps (strides 14/4, 14/2, 14, 28 px) and their sine position encodings."""

    def __init__(self, trunk):
        super().__init__()
        self.patch_size = trunk.patch_size
        self.backbone = trunk.backbone
        self.neck = trunk.tracker_neck

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> Sam3TrackerVideoVisionEncoderOutput:
        hidden = self.backbone(pixel_values).last_hidden_state  # B×g²×W
        b, g = hidden.shape[0], pixel_values.shape[-1] // self.patch_size
        maps, positions = self.neck(hidden.view(b, g, g, -1).permute(0, 3, 1, 2))
        return Sam3TrackerVideoVisionEncoderOutput(last_hidden_state=hidden, fpn_hidden_states=maps, fpn_position_encoding=positions)


def is_memory_key(key: str) -> bool:
    """A ``Sam3TrackerVideoModel`` key that samtune's image model does not hold."""
    return key.split(".")[0] not in (*IMAGE_MODULES, "vision_encoder")


def memory_of_released(keys_and_tensors) -> dict[str, torch.Tensor]:
    """(key, tensor) pairs of a released SAM 3 folder -> its memory modules in the tracker's key names."""
    memory = {}
    for key, value in keys_and_tensors:
        own = key[len(RELEASED_PREFIX) :]
        if key.startswith(RELEASED_PREFIX) and is_memory_key(own):
            memory[own] = value
    return memory


def video_model_from(image_model, memory: dict[str, torch.Tensor] | None = None) -> Sam3TrackerVideoModel:
    """``Sam3TrackerVideoModel`` around a ``Sam3Segmenter`` (LoRA merged first), eval mode: its image
    modules *are* the image model's; the memory modules come from ``memory`` (the tracker's key
    names: ``memory_of_released``), or stay at random init when it is None."""
    from samtune.adapters.export import merge_model

    image = merge_model(image_model)
    # the configuration of the image model's tracker (a copy: transformers' __init__ writes into it);
    # built on the CPU: its rotary tables are buffers that no state dict holds
    video = Sam3TrackerVideoModel(copy.deepcopy(image.config.tracker_config), remove_vision_encoder=True)
    video.vision_encoder = TrackerVision(image.vision_encoder)
    for name in IMAGE_MODULES:
        setattr(video, name, getattr(image, name))
    if memory is not None:
        load_part(video, memory, is_memory_key, "this SAM 3 tracker")
    return video.eval()
