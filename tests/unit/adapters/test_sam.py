"""adapters/sam.py: the SAM family; a Hugging Face checkpoint loaded at another input size."""

from __future__ import annotations

import torch

from samtune.adapters.registry import build_sam
from samtune.adapters.sam import resize_hf_model  # moved here from registry.py by the family refactor


def test_hf_model_at_another_input_size(tmp_path):
    model = build_sam("tiny", image_size=128)
    model.save_pretrained(tmp_path / "hf")
    same = build_sam("sam-vit-base", checkpoint=tmp_path / "hf", image_size=128)
    for (name, a), (_, b) in zip(model.state_dict().items(), same.state_dict().items()):
        assert torch.equal(a, b), name
    smaller = build_sam("sam-vit-base", checkpoint=tmp_path / "hf", image_size=64)
    grid = 64 // model.config.vision_config.patch_size
    assert smaller.vision_encoder.pos_embed.shape[1:3] == (grid, grid)
    out = smaller(pixel_values=torch.zeros(1, 3, 64, 64), input_boxes=torch.tensor([[[8.0, 8.0, 30.0, 30.0]]]))
    assert out.pred_masks.shape[-1] == 4 * grid
    resized_back = resize_hf_model(smaller, 128)
    assert resized_back.vision_encoder.pos_embed.shape == model.vision_encoder.pos_embed.shape
