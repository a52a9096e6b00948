"""SAM 2's video tracker (``transformers.Sam2VideoModel``: memory attention across frames or
slices) built from a samtune SAM 2 image model; memory modules from the official file or a
Hugging Face folder saved from ``Sam2VideoModel`` (see finetune/propagation.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from transformers import Sam2Config

from samtune.adapters.checkpoint_files import CheckpointError, load_part, load_state_dict_file
from samtune.adapters.family import CLASS_PROMPTS
from samtune.adapters.sam2_checkpoints import is_video_only_hf, official_to_hf
from samtune.adapters.sam2_config import EMBEDDING_STRIDE
from samtune.errors import SamtuneError

# --- the video tracker --------------------------------------------------------------------------


# transformers' Sam2VideoMemoryAttentionLayer hard-codes 64-wide memories (kv_in_dim=64), as released
VIDEO_MEMORY_WIDTH = 64


def sam2_video_config(config: Sam2Config, official: Mapping[str, torch.Tensor] | None = None):
    """A ``transformers.Sam2VideoConfig`` around an image model's config: the same encoder, prompt
    encoder and decoder, memory modules as wide as the neck, the memory attention's rotary grid
    = the embedding grid. With ``official`` (an official state dict), what differs between SAM 2.0,
    2.1 and MedSAM2 is read from its keys: the number of memory-attention layers, the occlusion
    embedding and the temporal projection of object pointers (both new in 2.1)."""
    from transformers import Sam2VideoConfig

    if config.vision_config.fpn_hidden_size % VIDEO_MEMORY_WIDTH or config.vision_config.fpn_hidden_size <= VIDEO_MEMORY_WIDTH:
        raise SamtuneError(
            f"a SAM 2 video model needs a neck width that is a multiple of {VIDEO_MEMORY_WIDTH} above it (this model: "
            f"{config.vision_config.fpn_hidden_size}): transformers' memory attention reads {VIDEO_MEMORY_WIDTH}-wide memories "
            "and splits each object pointer into width/64 of them."
        )
    image_size, width = config.prompt_encoder_config.image_size, config.vision_config.fpn_hidden_size
    grid = image_size // EMBEDDING_STRIDE
    fields = dict(
        image_size=image_size, memory_attention_hidden_size=width, memory_attention_rope_feat_sizes=[grid, grid],
        memory_encoder_hidden_size=width, mask_downsampler_embed_dim=width, memory_fuser_embed_dim=width,
        memory_fuser_intermediate_dim=4 * width,
        memory_encoder_output_channels=VIDEO_MEMORY_WIDTH,
    )  # fmt: skip
    if official is not None:
        layers = {int(m[1]) for k in official if (m := re.match(r"memory_attention\.layers\.(\d+)\.", k))}
        fields.update(
            memory_attention_num_layers=len(layers), enable_occlusion_spatial_embedding="no_obj_embed_spatial" in official,
            enable_temporal_pos_encoding_for_object_pointers="obj_ptr_tpos_proj.weight" in official,
        )  # fmt: skip
    return Sam2VideoConfig(
        vision_config=config.vision_config.to_dict(), prompt_encoder_config=config.prompt_encoder_config.to_dict(),
        mask_decoder_config=config.mask_decoder_config.to_dict(), **fields,
    )  # fmt: skip


# the modules (and the one parameter) Sam2VideoModel shares with Sam2Model, by name
IMAGE_MODULES = ("shared_image_embedding", "vision_encoder", "prompt_encoder", "mask_decoder", "no_memory_embedding")


def video_model_from(image_model, official=None):
    """SAM 2's video tracker (``transformers.Sam2VideoModel``, memory propagation across frames or
    slices) around an image model (LoRA merged first, class prompts left out), eval mode.

    Its image modules *are* the image model's (shared, not copied), so whatever prediction arranged
    in them holds in the tracker too: channels-last weights, and ``--precision int8``'s quantised
    encoder, which a state-dict copy into a float model could not take. The memory modules come from
    ``official`` (the official checkpoint the image model was fine-tuned from: path or state dict,
    converted by ``official_to_hf(video=True)``); ``official=None`` leaves them at random init
    (tests, ``sam2-tiny-random``)."""
    from transformers import Sam2VideoModel

    from samtune.adapters.export import merge_model

    image = merge_model(image_model)
    source = None
    if official is not None and not isinstance(official, Mapping):
        source, official = str(official), load_state_dict_file(official)
    model = Sam2VideoModel(sam2_video_config(image.config, official))  # on the CPU: its rotary tables are buffers that no state dict holds
    extra = {k.split(".")[0] for k in image.state_dict()} - {*IMAGE_MODULES, CLASS_PROMPTS}
    if extra:
        raise CheckpointError(f"the image model has modules Sam2VideoModel has no place for: {sorted(extra)}")
    if official is not None:
        converted, _, unknown = official_to_hf(official, video=True)
        if unknown:
            raise CheckpointError(f"{source or '<state dict>'}: keys no SAM 2 conversion knows: {sorted(unknown)[:10]}. "
                                  "Use the official SAM 2 / MedSAM2 file the image model comes from.")  # fmt: skip
        memory = {k: v for k, v in converted.items() if is_video_only_hf(k)}
        load_part(model, memory, is_video_only_hf, f"the SAM 2 video model ({source or '<state dict>'})")
    for name in IMAGE_MODULES:
        setattr(model, name, getattr(image, name))
    return model.eval()


def video_model_from_folder(image_model, source: str):
    """``video_model_from`` with the memory modules of a Hugging Face folder or hub repo saved from
    ``Sam2VideoModel`` (what ``facebook/sam2.1-hiera-*`` hold for video use); a folder saved from
    ``Sam2Model`` has none, which is an error rather than a silently random memory."""
    from transformers import Sam2VideoModel

    try:
        pretrained, info = Sam2VideoModel.from_pretrained(source, output_loading_info=True)
    except (OSError, ValueError) as exc:  # offline, unknown hub id, no weights, not a SAM 2 config
        raise SamtuneError(
            f"could not load SAM 2's memory modules from {source!r} for volume propagation: {exc}\n"
            "Set model.checkpoint to the official .pt file (e.g. sam2.1_hiera_tiny.pt, MedSAM2_latest.pt) or a local folder saved from Sam2VideoModel."
        ) from None
    lacking = [k for k in info.get("missing_keys", []) if is_video_only_hf(k)]
    if lacking:
        raise SamtuneError(f"{source}: holds no memory modules ({len(lacking)} missing, e.g. {lacking[0]}): it was saved from the image model. "
                           "Set model.checkpoint to the official .pt file for memory propagation, or use eval.propagation=box.")  # fmt: skip
    from samtune.adapters.export import merge_model

    image = merge_model(image_model)
    state = {k: v for k, v in image.state_dict().items() if not k.startswith(CLASS_PROMPTS + ".")}
    config = sam2_video_config(image.config)
    for key in ("memory_attention_num_layers", "enable_occlusion_spatial_embedding", "enable_temporal_pos_encoding_for_object_pointers"):
        setattr(config, key, getattr(pretrained.config, key))  # what differs between SAM 2.0, 2.1 and MedSAM2
    video = Sam2VideoModel(config)
    memory = {k: v for k, v in pretrained.state_dict().items() if is_video_only_hf(k)}
    missing, unexpected = video.load_state_dict({**state, **memory}, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: its memory modules do not fit this model (missing {missing[:8]}, unexpected {unexpected[:8]}).")
    return video.eval()
