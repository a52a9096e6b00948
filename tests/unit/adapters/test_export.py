"""Export of a fine-tuned (LoRA) model: merged transformers folder, official .pth, ONNX."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import SamModel

from samtune import SamtuneError
from samtune.adapters.export import ONNX_DECODER_FILE, ONNX_ENCODER_FILE, export_model, merge_model
from samtune.adapters.family import get_family
from samtune.adapters.lora import apply_lora
from samtune.adapters.checkpoint_files import load_state_dict_file
from samtune.adapters.registry import build_sam
from samtune.finetune.recipe import LoraSection

sys.path.insert(0, str(Path(__file__).parent))  # helpers_official.py lies beside this file; tests/ has no __init__.py
import helpers_official  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module")
def tuned():
    """A LoRA model whose adapter and decoder weights moved away from the base."""
    model = apply_lora(build_sam("tiny", image_size=SIZE), get_family("sam"), LoraSection(preset="encoder_qkv_proj"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=generator)
    boxes = torch.tensor([[[4.0, 6.0, 40.0, 30.0]], [[10.0, 10.0, 60.0, 58.0]]])
    return pixels, boxes


def low_res(model, pixels, boxes):
    with torch.no_grad():
        out = model(pixel_values=pixels, input_boxes=boxes, multimask_output=False)
    return out.pred_masks, out.iou_scores


def test_merge_keeps_outputs_and_leaves_the_adapter_model_alone(tuned, inputs):
    before = low_res(tuned, *inputs)
    merged = merge_model(tuned)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    for a, b in zip(low_res(merged, *inputs), before):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(low_res(tuned, *inputs), before):  # the PeftModel itself was not merged in place
        assert torch.equal(a, b)


def test_hf_export_loads_with_plain_transformers(tuned, inputs, tmp_path):
    export_model(tuned, "hf", tmp_path / "hf")
    loaded = SamModel.from_pretrained(tmp_path / "hf").eval()
    for a, b in zip(low_res(loaded, *inputs), low_res(tuned, *inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sam_pth_export_loads_into_the_official_model(tuned, inputs, tmp_path):
    path = tmp_path / "organ_sam.pth"
    export_model(tuned, "sam-pth", path)
    cfg = tuned.base_model.model.config
    vision, decoder = cfg.vision_config, cfg.mask_decoder_config
    official = helpers_official.build_official_sam(
        vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.global_attn_indexes,
        image_size=vision.image_size, patch_size=vision.patch_size, window_size=vision.window_size,
        prompt_embed_dim=vision.output_channels, decoder_mlp_dim=decoder.mlp_dim,
        decoder_num_heads=decoder.num_attention_heads, iou_head_hidden_dim=decoder.iou_head_hidden_dim,
    )  # fmt: skip
    state = torch.load(path, map_location="cpu", weights_only=True)
    official.load_state_dict(state, strict=True)
    pixels, boxes = inputs
    with torch.no_grad():
        embeddings = official.image_encoder(pixels)
        masks = []
        for i in range(len(pixels)):
            sparse, dense = official.prompt_encoder(points=None, boxes=boxes[i], masks=None)
            m, _ = official.mask_decoder(
                image_embeddings=embeddings[i : i + 1], image_pe=official.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )  # fmt: skip
            masks.append(m)
    ours = low_res(tuned, pixels, boxes)[0][:, 0]  # B×1×s×s
    # the tiny model's decoder LayerNorm eps is transformers' 1e-6, the official one 1e-5
    torch.testing.assert_close(torch.cat(masks), ours, atol=1e-3, rtol=1e-3)
    assert load_state_dict_file(path).keys() == state.keys()


def test_sam_pth_export_of_an_automatic_model_keeps_the_promptable_part_and_says_so(tmp_path):
    """The official layout has no slot for the learnt class prompts (task: automatic/both): the
    export writes the promptable model and warns; nothing else is dropped."""
    model = build_sam("tiny", image_size=SIZE)
    get_family("sam").add_class_prompts(model, 3, 2, seed=0)
    plain = tmp_path / "plain.pth"
    export_model(build_sam("tiny", image_size=SIZE), "sam-pth", plain)
    with pytest.warns(UserWarning, match="class prompts have no place in the official layout"):
        export_model(model, "sam-pth", tmp_path / "auto.pth")
    assert load_state_dict_file(tmp_path / "auto.pth").keys() == load_state_dict_file(plain).keys()


def test_sam_pth_needs_a_pth_name(tuned, tmp_path):
    with pytest.raises(SamtuneError, match=r"\.pth"):
        export_model(tuned, "sam-pth", tmp_path / "folder")


def test_onnx_export_matches_pytorch(tuned, inputs, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    files = export_model(tuned, "onnx", tmp_path / "onnx")
    assert [f.name for f in files] == [ONNX_ENCODER_FILE, ONNX_DECODER_FILE]
    pixels, boxes = inputs
    merged = merge_model(tuned)
    with torch.no_grad():
        embeddings = merged.get_image_embeddings(pixels)
        reference = merged(image_embeddings=embeddings, input_boxes=boxes, multimask_output=False)
    encoder = ort.InferenceSession(str(files[0]))
    decoder = ort.InferenceSession(str(files[1]))
    (onnx_embeddings,) = encoder.run(None, {"pixel_values": pixels.numpy()})  # batch of 2: dynamic axis
    np.testing.assert_allclose(onnx_embeddings, embeddings.numpy(), atol=1e-4)
    masks, iou = decoder.run(None, {"image_embeddings": onnx_embeddings, "input_boxes": boxes.numpy()})
    np.testing.assert_allclose(masks, reference.pred_masks[:, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(iou, reference.iou_scores[:, 0].numpy(), atol=1e-4)
