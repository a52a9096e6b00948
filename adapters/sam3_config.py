"""SAM 3's configurations (the release, and ``sam3-tiny-random`` for tests) at any input size, the
text features a class name gives, and the tokenizers behind them (see adapters/sam3.py)."""

from __future__ import annotations

import torch
from transformers import (
    CLIPTextConfig,
    Sam3Config,
    Sam3TrackerVideoConfig,
    Sam3VideoConfig,
    Sam3VisionConfig,
    Sam3ViTConfig,
)

from samtune.errors import SamtuneError

PATCH_PX = 14  # SAM 3's ViT patch (Sam3ViTConfig.patch_size); the release runs at 1008 px = 72 patches
RELEASED_IMAGE_SIZE = 1008


def check_image_size(image_size: int) -> None:
    """Whole patches (a partial patch would be cut by the stride-14 patch convolution while prompt
    coordinates are normalised by the full size) and at least a 2×2 grid."""
    if image_size % PATCH_PX or image_size < 2 * PATCH_PX:
        below, above = image_size // PATCH_PX * PATCH_PX, (image_size // PATCH_PX + 1) * PATCH_PX
        raise SamtuneError(f"model.image_size={image_size}: a SAM 3 model needs a multiple of its {PATCH_PX} px patches "
                           f"(e.g. {max(below, 2 * PATCH_PX)} or {above}; the release uses {RELEASED_IMAGE_SIZE}).")  # fmt: skip


def with_image_size(config: Sam3VideoConfig, image_size: int) -> Sam3VideoConfig:
    """The same architecture at another input size. No weight depends on it: the ViT tiles its
    position embedding over the grid, rotary positions are computed, the prompt encoder's Fourier
    features take coordinates normalised by the image size."""
    check_image_size(image_size)
    g = image_size // PATCH_PX
    vision = config.detector_config.vision_config
    vision.backbone_config.image_size = image_size
    vision.backbone_feature_sizes = [[4 * g] * 2, [2 * g] * 2, [g] * 2]
    config.tracker_config.image_size = image_size  # its setter updates prompt encoder, feature sizes and memory rope grid
    config.low_res_mask_size = 4 * g
    return config


def released_config(image_size: int = RELEASED_IMAGE_SIZE) -> Sam3VideoConfig:
    """transformers' defaults, which are ``facebook/sam3``'s (the configs name that checkpoint):
    ViT-L-like 1024 wide × 32 layers (global attention at 7, 15, 23, 31; windows of 24 patches),
    neck width 256, CLIP text encoder 1024 × 24, DETR encoder and decoder 6 layers each at 256,
    200 queries."""
    return with_image_size(Sam3VideoConfig(), image_size)


# ``sam3-tiny-random``: the released structure (windowed + global ViT layers with rotary
# positions, both necks, every detector and tracker part) at widths that build in well under a
# second. The neck is 128 wide: the narrowest transformers' video tracker takes (64-wide memories).
TINY_WIDTH = 128


def make_tiny_sam3_config(image_size: int = 112) -> Sam3VideoConfig:
    check_image_size(image_size)
    vit = Sam3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                        window_size=4, global_attn_indexes=[1], pretrain_image_size=4 * PATCH_PX)  # fmt: skip
    vision = Sam3VisionConfig(backbone_config=vit, fpn_hidden_size=TINY_WIDTH)
    text = CLIPTextConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=32, bos_token_id=ByteTokenizer.bos, eos_token_id=ByteTokenizer.eos,
                          pad_token_id=ByteTokenizer.pad)  # fmt: skip
    small = dict(hidden_size=TINY_WIDTH, num_layers=1, intermediate_size=256, num_attention_heads=4)
    detector = Sam3Config(vision_config=vision, text_config=text, geometry_encoder_config=small, detr_encoder_config=small,
                          detr_decoder_config={**small, "num_queries": 8}, mask_decoder_config=dict(hidden_size=TINY_WIDTH, num_attention_heads=4))  # fmt: skip
    tracker = Sam3TrackerVideoConfig(
        vision_config=vision.to_dict(), prompt_encoder_config=dict(hidden_size=TINY_WIDTH), mask_decoder_config=dict(hidden_size=TINY_WIDTH),
        memory_attention_hidden_size=TINY_WIDTH, memory_attention_num_layers=1, memory_encoder_hidden_size=TINY_WIDTH,
        mask_downsampler_embed_dim=TINY_WIDTH, memory_fuser_embed_dim=TINY_WIDTH, memory_fuser_intermediate_dim=4 * TINY_WIDTH,
    )  # fmt: skip
    return with_image_size(Sam3VideoConfig(detector_config=detector, tracker_config=tracker), image_size)


# --- tokenizers and text features ----------------------------------------------------------------


class ByteTokenizer:
    """The tiny variant's tokenizer: UTF-8 bytes as ids 0-255 between a start and an end id. Its
    text encoder is random, so any fixed tokenizer shows only that the ``init: text`` path runs."""

    bos, eos, pad = 256, 257, 258
    vocab_size = 259

    def ids(self, text: str, max_length: int) -> list[int]:
        return [self.bos, *list(text.encode("utf-8"))[: max_length - 2], self.eos]


class HubTokenizer:
    """The released CLIP BPE tokenizer from a Hugging Face folder or hub id (``facebook/sam3``
    ships tokenizer.json / vocab.json / merges.txt beside the weights)."""

    def __init__(self, source: str):
        self.source = source
        self._tokenizer = None

    def ids(self, text: str, max_length: int) -> list[int]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.source)
            except (OSError, ValueError) as exc:
                raise SamtuneError(f"automatic.init=text: no tokenizer for SAM 3's text encoder in {self.source!r} ({exc}); "
                                   "point model.checkpoint at a folder holding the release's tokenizer files, or use automatic.init=random.") from None  # fmt: skip
        return list(self._tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


@torch.no_grad()
def name_features(text_encoder, text_projection, tokenizer, names: list[str]) -> list[torch.Tensor]:
    """Each name's concept prompt as SAM 3's detector reads it: the text encoder's last hidden
    states of the name's tokens (start and end tokens included, padding left out), projected to the
    detector's width by ``text_projection`` (``Sam3Model.get_text_features``). One L×C tensor per name."""
    max_length = text_encoder.config.max_position_embeddings
    rows = [tokenizer.ids(name, max_length) for name in names]
    longest = max(len(r) for r in rows)
    pad = text_encoder.config.pad_token_id or 0
    device = next(text_encoder.parameters()).device
    ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (longest - len(r)) for r in rows], device=device)
    hidden = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    projected = text_projection(hidden)
    return [projected[i, : len(r)] for i, r in enumerate(rows)]


def last_tokens(features: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """T×C from a name's L×C token features: the last T (ending with the end token). CLIP's text
    encoder is causal, so only later tokens have read the whole name (the start token's features
    are the same for every name; the end token's are CLIP's pooled summary). A name shorter than T
    tokens is padded in front with copies of its end token's features."""
    if len(features) >= n_tokens:
        return features[-n_tokens:]
    return torch.cat([features[-1:].expand(n_tokens - len(features), -1), features])
