"""SAM 3 (adapters/sam3.py) against transformers' own classes on the same random weights: the
prompted path equals ``Sam3TrackerModel``, the detector equals ``Sam3Model`` with text embeddings;
class logits, presence gating, text init, the released key layout, Meta's sam3.pt conversion and the weight errors.

Meta's ``sam3`` package (0.1.4 on PyPI) is not the reference here: its model modules import
torchvision at module level and its builder needs timm, iopath and pycocotools (docs/howto/models.md)."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Sam3Config, Sam3Model, Sam3TrackerConfig, Sam3TrackerModel, Sam3TrackerVideoModel, Sam3VideoModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from samtune import SamtuneError
from samtune.adapters.checkpoint_files import CheckpointError
from samtune.adapters.export import merge_model
from samtune.adapters.family import get_family
from samtune.adapters.lora import apply_lora
from samtune.adapters.registry import build_model, get_variant
from samtune.adapters.sam3 import PROBABILITY_FLOOR, concept_logits, same_positional_tables
from samtune.adapters.sam3_checkpoints import official_to_released
from samtune.adapters.sam3_config import ByteTokenizer, last_tokens, name_features, released_config
from samtune.adapters.sam3_model import Sam3Segmenter, released_key, samtune_key
from samtune.adapters.sam3_video import IMAGE_MODULES, is_memory_key, video_model_from
from samtune.finetune.automatic import fuse
from samtune.finetune.predict.propagation import MemoryTracker, SlicePrompt, make_propagator
from samtune.finetune.recipe import LoraSection
from samtune.finetune.runtime import inference_model

KEY_LIST = Path(__file__).parent / "data" / "sam3_released_shapes.json"
SIZE = 112


@pytest.fixture(scope="module")
def tiny():
    return get_family("sam3"), build_model("sam3-tiny-random", image_size=SIZE)


def test_tiny_builds_in_seconds():
    start = time.perf_counter()
    model = build_model("sam3-tiny-random")
    assert time.perf_counter() - start < 10 and sum(p.numel() for p in model.parameters()) < 6e6


def tracker_of(model: Sam3Segmenter) -> Sam3TrackerModel:
    """transformers' Sam3TrackerModel holding the tiny model's ViT, tracker neck and tracker heads.
    Its neck is built with the three levels the tracker reads ([4, 2, 1]): with a fourth level,
    Sam3TrackerModel adds ``no_memory_embedding`` to that (unused) 28 px map instead of the 14 px
    one that its decoder reads (the release's zeros hide it; a trained embedding would not)."""
    vision = model.config.detector_config.vision_config.to_dict()
    vision["scale_factors"] = [4.0, 2.0, 1.0]
    config = Sam3TrackerConfig(vision_config=vision, prompt_encoder_config=model.config.tracker_config.prompt_encoder_config.to_dict(),
                               mask_decoder_config=model.config.tracker_config.mask_decoder_config.to_dict())  # fmt: skip
    reference = Sam3TrackerModel(config).eval()
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("vision_encoder.backbone."):
            state[key] = value
        elif key.startswith("vision_encoder.tracker_neck.") and ".fpn_layers.3." not in key:
            state[key.replace("tracker_neck.", "neck.")] = value
        elif key.startswith(("prompt_encoder.", "mask_decoder.", "shared_image_embedding.", "no_memory_embedding")):
            state[key] = value
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k], missing
    reference.mask_decoder.dynamic_multimask_via_stability = False
    return reference


def test_prompted_path_equals_transformers_tracker(tiny):
    family, model = tiny
    with torch.no_grad():
        model.no_memory_embedding.normal_()  # non-zero, so the test sees where it is added
    reference = tracker_of(model)
    pixels = torch.randn(2, 3, SIZE, SIZE)
    boxes = torch.tensor([[4.0, 6.0, 60.0, 70.0], [20.0, 10.0, 100.0, 90.0]])
    points = torch.tensor([[[30.0, 40.0], [5.0, 5.0]], [[60.0, 50.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])
    with torch.no_grad():
        embeddings = family.encode_images(model, pixels)
        for kwargs, theirs in (
            (dict(boxes=boxes), dict(input_boxes=boxes[:, None])),
            (dict(points=points, point_labels=labels), dict(input_points=points[:, None], input_labels=labels[:, None])),
        ):
            ours, iou = family.decode_prompts(model, embeddings, multimask_output=True, **kwargs)
            out = reference(pixel_values=pixels, multimask_output=True, **theirs)
            torch.testing.assert_close(ours, out.pred_masks[:, 0], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(iou, out.iou_scores[:, 0], atol=1e-5, rtol=1e-4)
        previous = ours[:, :1]
        ours, _ = family.decode_prompts(model, embeddings, boxes=boxes, mask_inputs=previous)
        out = reference(pixel_values=pixels, input_boxes=boxes[:, None], input_masks=previous, multimask_output=False)
        torch.testing.assert_close(ours, out.pred_masks[:, 0], atol=1e-4, rtol=1e-4)


def test_detector_equals_transformers_sam3model_with_text(tiny):
    family, model = tiny
    detector_config = Sam3Config.from_dict(model.config.detector_config.to_dict())
    reference = Sam3Model(detector_config).eval()
    state = {}
    for key, value in model.state_dict().items():
        released = released_key(key)
        if released and released.startswith("detector_model."):
            state[released[len("detector_model.") :]] = value
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k and not k.startswith("vision_encoder.neck.fpn_layers.3")]
    pixels = torch.randn(1, 3, SIZE, SIZE)
    text = name_features(model.text_encoder, model.detector.text_projection, ByteTokenizer(), ["liver"])[0][None]
    with torch.no_grad():
        embeddings = family.encode_images(model, pixels)
        features = list(embeddings.high_res_features[2:])
        positions = [model.vision_encoder.neck.position_encoding(f.shape, f.device, f.dtype) for f in features]
        scores, presence, masks = model.detector(features, positions, text)
        out = reference(pixel_values=pixels, text_embeds=BaseModelOutputWithPooling(pooler_output=text))
    torch.testing.assert_close(scores, out.pred_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(presence, out.presence_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(masks, out.pred_masks, atol=1e-4, rtol=1e-4)


def test_concept_logits_are_the_gated_best_query():
    scores, presence = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0]])
    masks = torch.tensor([[[[3.0, -2.0]], [[-1.0, 0.5]]]])  # B×Q×1×2
    p = torch.sigmoid(presence)[:, :, None] * (torch.sigmoid(scores)[:, :, None, None] * torch.sigmoid(masks)).amax(1)
    torch.testing.assert_close(concept_logits(scores, presence, masks), torch.log(p / (1 - p)))


def test_presence_gates_an_empty_class(tiny):
    """A class the detector calls absent is background everywhere, however confident its queries."""
    family, model = tiny
    family.add_class_prompts(model, 2, 2, seed=0)
    with torch.no_grad():
        embeddings = family.encode_images(model, torch.randn(1, 3, SIZE, SIZE))
        head = model.detector.detr_decoder.presence_head.layer3
        original = head.bias.clone()
        head.bias.fill_(-40.0)
        try:
            logits = family.decode_classes(model, embeddings, model.class_prompts())
        finally:
            head.bias.copy_(original)
    assert logits.shape == (1, 2, 4 * SIZE // 14, 4 * SIZE // 14)
    # transformers clamps presence logits to ±10: p <= sigmoid(-10), a logit of at most -10
    assert logits.max() <= -10 + 1e-3 and logits.min() >= math.log(PROBABILITY_FLOOR) - 1e-3
    assert (fuse(logits[0], 0.5) == 2).all()  # every pixel background


def test_text_init_gives_the_text_encoders_features_for_the_names(tiny):
    family, model = tiny
    names = ["liver", "left kidney", "a"]
    family.add_class_prompts(model, 3, 3, class_names=names, init="text")
    tokens = model.class_prompts.tokens.detach()
    with torch.no_grad():
        for k, name in enumerate(names):
            ids = ByteTokenizer().ids(name, 32)
            hidden = model.text_encoder(input_ids=torch.tensor([ids])).last_hidden_state
            features = model.detector.text_projection(hidden)[0]  # L×C, Sam3Model.get_text_features
            torch.testing.assert_close(tokens[k], last_tokens(features, 3), atol=1e-5, rtol=1e-5)
    # "a" has 3 tokens: start, "a", end; "liver" ends with its last letter and the end token
    assert torch.equal(last_tokens(torch.arange(5.0)[:, None], 2), torch.tensor([[3.0], [4.0]]))
    assert torch.equal(last_tokens(torch.arange(2.0)[:, None], 3), torch.tensor([[1.0], [0.0], [1.0]]))


def test_text_init_on_a_family_without_text_encoder_names_automatic_init_and_sam3():
    family = get_family("sam2")
    model = build_model("sam2-tiny-random", image_size=64)
    with pytest.raises(SamtuneError, match=r"automatic.init=text: the sam2 family has no text encoder.*\(sam3\)"):
        family.add_class_prompts(model, 2, 2, class_names=["a", "b"], init="text")


def test_released_key_layout_matches_the_stored_list():
    """Sam3Segmenter at the release's configuration (meta device: no memory) holds exactly the released
    image-model keys and shapes; the rest of the stored list is the tracker's memory (video model)."""
    stored = json.loads(KEY_LIST.read_text())["shapes"]
    with torch.device("meta"):
        ours = Sam3Segmenter(released_config()).state_dict()
        theirs = Sam3VideoModel(released_config()).state_dict()
    assert {k: list(v.shape) for k, v in theirs.items()} == stored  # transformers' layout has not moved
    mapped = {released_key(k): list(v.shape) for k, v in ours.items() if released_key(k) is not None}
    assert all(samtune_key(k) == own for own in ours if (k := released_key(own)) is not None)
    assert mapped == {k: v for k, v in stored.items() if samtune_key(k) is not None}
    memory = {k for k in stored if samtune_key(k) is None}
    assert memory and all(k.startswith("tracker_model.memory") or "memory" in k or "pointer" in k or "mask_downsample" in k
                          or "occlusion" in k or "temporal" in k for k in memory)  # fmt: skip
    vit = released_config().detector_config.vision_config.backbone_config
    assert (vit.hidden_size, vit.num_hidden_layers, vit.patch_size, vit.image_size) == (1024, 32, 14, 1008)


def test_full_size_without_weights_says_set_model_checkpoint(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SamtuneError, match="set model.checkpoint"):
        build_model("sam3")
    official = tmp_path / "sam3.pt"
    official.write_bytes(b"")
    with pytest.raises(SamtuneError, match="cannot be read as a checkpoint"):  # read before the 850 M model is built
        build_model("sam3", checkpoint=official)
    with pytest.raises(SamtuneError, match="multiple of its 14 px patches"):
        build_model("sam3-tiny-random", image_size=64)


# --- memory propagation (adapters/sam3_video.py) ---------------------------------------------------


def randomise(model: Sam3Segmenter, seed: int = 0) -> Sam3Segmenter:
    """Noise on every weight, so that no zero table (``no_memory_embedding``) or small init hides a mistake."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def test_video_model_shares_the_merged_modules_and_tracks_through_a_volume(tiny):

    family, model = tiny
    wrapped = apply_lora(build_model("sam3-tiny-random", image_size=SIZE), family, LoraSection(preset="encoder_mlp"))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    merged = merge_model(wrapped)  # what samtune predict runs (finetune.runtime.inference_model merges LoRA first)
    tracker, way = make_propagator("auto", merged, family, get_variant("sam3-tiny-random"), None, family.make_transform(SIZE), torch.device("cpu"))
    assert way == "memory" and isinstance(tracker, MemoryTracker) and isinstance(tracker.video_model, Sam3TrackerVideoModel)
    video = tracker.video_model
    assert video.vision_encoder.backbone is merged.vision_encoder.backbone and video.vision_encoder.neck is merged.vision_encoder.tracker_neck
    assert all(getattr(video, name) is getattr(merged, name) for name in IMAGE_MODULES)
    ours = {t.data_ptr() for t in merged.state_dict().values()}
    shared = [k for k in video.state_dict() if not is_memory_key(k)]
    assert shared and all(video.state_dict()[k].data_ptr() in ours for k in shared)  # the same tensors, not copies
    assert any(k.startswith("memory_attention.") for k in video.state_dict()) and video.config.memory_attention_num_layers == 1
    order, forward = [], video.forward

    def spy(*args, **kwargs):
        order.append(kwargs["frame_idx"])
        return forward(*args, **kwargs)

    video.forward = spy
    slices = np.random.default_rng(0).integers(0, 255, (5, 48, 40), dtype=np.uint8)
    volume = tracker(lambda z: slices[z], 5, SlicePrompt(1, box=np.array([8.0, 10, 30, 40])))
    assert volume.shape == (5, 48, 40) and volume.dtype == bool and order == [1, 1, 2, 3, 4, 1, 0]


def test_the_tracker_of_a_prediction_model_segments_the_prompted_slice_as_the_image_model_does(tiny, tracked_slices):
    """``samtune predict`` hands over its inference model (a copy, channels-last): the tracker runs
    those very modules, and its prompted slice is the image model's ``decode_prompts`` mask."""
    family, _ = tiny
    model = randomise(build_model("sam3-tiny-random", image_size=SIZE))
    with torch.no_grad():  # the object present on every slice: an absent one has its masks replaced by -1024 (SAM 2's NO_OBJ_SCORE)
        model.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(10.0)
    ready = inference_model(model, family)
    transform = family.make_transform(SIZE)
    tracker, _ = make_propagator("memory", ready, family, get_variant("sam3-tiny-random"), None, transform, torch.device("cpu"))
    assert tracker.video_model.vision_encoder.backbone is ready.vision_encoder.backbone
    tracked, image_mask = tracked_slices(tracker, model, family, transform, prompted=2)
    assert image_mask.abs().max() > 1e-1
    torch.testing.assert_close(tracked[2], image_mask, atol=1e-4, rtol=0)
    assert not torch.allclose(tracked[3], image_mask, atol=1e-2)  # the next slice: another image, through the memory


def released_folder(model: Sam3Segmenter, memory: dict, folder: Path) -> Path:
    """A folder in the released layout (``Sam3VideoModel``'s key names, what facebook/sam3 holds):
    the image model's weights renamed by ``released_key``, ``memory`` under ``tracker_model.``."""

    state = {released_key(k): v for k, v in model.state_dict().items() if released_key(k) is not None}
    state.update({f"tracker_model.{k}": v for k, v in memory.items()})
    folder.mkdir()
    model.config.save_pretrained(folder)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def test_memory_modules_come_from_the_released_folder_and_a_folder_without_them_is_refused(tiny, tmp_path):
    family, model = tiny[0], build_model("sam3-tiny-random", image_size=SIZE)  # the fixture's may carry class prompts by now
    variant = get_variant("sam3-tiny-random")
    reference = video_model_from(randomise(build_model("sam3-tiny-random", image_size=SIZE, init_seed=3)))
    memory = {k: v for k, v in reference.state_dict().items() if is_memory_key(k)}
    folder = released_folder(model, memory, tmp_path / "sam3")
    loaded = build_model("sam3-tiny-random", folder, image_size=SIZE)  # the image model reads the same folder, memory left out
    video = family.video_model(loaded, variant, str(folder))
    ours = video.state_dict()
    assert memory and all(torch.equal(ours[k], v) for k, v in memory.items())
    family.export(model, "hf", tmp_path / "image")  # samtune's export: the image model only
    with pytest.raises(SamtuneError, match=r"(?s)holds no memory modules.*eval.propagation=box"):
        family.video_model(model, variant, str(tmp_path / "image"))
    with pytest.raises(SamtuneError, match=r"(?s)no such folder.*eval.propagation=box"):
        family.video_model(model, variant, str(tmp_path / "missing"))


def test_the_released_memory_keys_are_the_trackers_memory_modules():
    """At the release's configuration, the stored list's memory keys (``samtune_key`` None) are exactly
    ``Sam3TrackerVideoModel``'s memory modules under ``tracker_model.``, with the same shapes."""
    stored = json.loads(KEY_LIST.read_text())["shapes"]
    with torch.device("meta"):
        video = Sam3TrackerVideoModel(released_config().tracker_config, remove_vision_encoder=True)
    memory = {f"tracker_model.{k}": list(v.shape) for k, v in video.state_dict().items() if is_memory_key(k)}
    assert memory == {k: v for k, v in stored.items() if samtune_key(k) is None}


# --- Meta's sam3.pt (adapters/sam3_checkpoints.py) -------------------------------------------------
#
# No real sam3.pt is at hand. The official names below are written by hand, in the released ->
# official direction, from the names transformers' conversion script documents
# (models/sam3_video/convert_sam3_video_to_hf.py); they share no code with the converter.

_DETECTOR_BACK = (  # released name under detector_model. / tracker_neck. -> official name under sam3_model., applied in order
    (r"^vision_encoder\.backbone\.embeddings\.position_embeddings$", "backbone.vision_backbone.trunk.pos_embed"),
    (r"^vision_encoder\.backbone\.embeddings\.patch_embeddings\.projection\.", "backbone.vision_backbone.trunk.patch_embed.proj."),
    (r"^vision_encoder\.backbone\.layer_norm\.", "backbone.vision_backbone.trunk.ln_pre."),
    (r"^vision_encoder\.backbone\.layers\.(\d+)\.layer_norm(\d)\.", r"backbone.vision_backbone.trunk.blocks.\1.norm\2."),
    (r"^vision_encoder\.backbone\.layers\.(\d+)\.attention\.o_proj\.", r"backbone.vision_backbone.trunk.blocks.\1.attn.proj."),
    (r"^vision_encoder\.backbone\.layers\.(\d+)\.attention\.", r"backbone.vision_backbone.trunk.blocks.\1.attn."),
    (r"^vision_encoder\.backbone\.layers\.(\d+)\.mlp\.", r"backbone.vision_backbone.trunk.blocks.\1.mlp."),
    (r"^vision_encoder\.neck\.fpn_layers\.", "backbone.vision_backbone.convs."),
    (r"^tracker_neck\.fpn_layers\.", "backbone.vision_backbone.sam2_convs."),
    (r"convs\.0\.scale_layers\.0\.", "convs.0.dconv_2x2_0."),  # the ×4 level: two transposed convolutions
    (r"convs\.0\.scale_layers\.2\.", "convs.0.dconv_2x2_1."),
    (r"convs\.(\d)\.scale_layers\.0\.", r"convs.\1.dconv_2x2."),
    (r"\.proj1\.", ".conv_1x1."),
    (r"\.proj2\.", ".conv_3x3."),
    (r"^text_encoder\.text_model\.embeddings\.token_embedding\.", "backbone.language_backbone.encoder.token_embedding."),
    (r"^text_encoder\.text_model\.embeddings\.position_embedding\.weight$", "backbone.language_backbone.encoder.positional_embedding"),
    (r"^text_encoder\.text_model\.final_layer_norm\.", "backbone.language_backbone.encoder.ln_final."),
    (r"^text_encoder\.text_projection\.weight$", "backbone.language_backbone.encoder.text_projection"),
    (r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.self_attn\.", r"backbone.language_backbone.encoder.transformer.resblocks.\1.attn."),
    (r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"backbone.language_backbone.encoder.transformer.resblocks.\1.ln_\2."),
    (r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", r"backbone.language_backbone.encoder.transformer.resblocks.\1.mlp.c_fc."),
    (r"^text_encoder\.text_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.", r"backbone.language_backbone.encoder.transformer.resblocks.\1.mlp.c_proj."),
    (r"^text_projection\.", "backbone.language_backbone.resizer."),
    (r"^geometry_encoder\.layers\.(\d+)\.cross_attn\.", r"geometry_encoder.encode.\1.cross_attn_image."),
    (r"^geometry_encoder\.layers\.(\d+)\.mlp\.fc(\d)\.", r"geometry_encoder.encode.\1.linear\2."),
    (r"^geometry_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"geometry_encoder.encode.\1.norm\2."),
    (r"^geometry_encoder\.layers\.", "geometry_encoder.encode."),
    (r"^geometry_encoder\.vision_layer_norm\.", "geometry_encoder.img_pre_norm."),
    (r"^geometry_encoder\.prompt_layer_norm\.", "geometry_encoder.norm."),
    (r"^geometry_encoder\.output_layer_norm\.", "geometry_encoder.encode_norm."),
    (r"^detr_encoder\.layers\.(\d+)\.cross_attn\.", r"transformer.encoder.layers.\1.cross_attn_image."),
    (r"^detr_encoder\.layers\.(\d+)\.mlp\.fc(\d)\.", r"transformer.encoder.layers.\1.linear\2."),
    (r"^detr_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"transformer.encoder.layers.\1.norm\2."),
    (r"^detr_encoder\.", "transformer.encoder."),
    (r"^detr_decoder\.layers\.(\d+)\.vision_cross_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm1."),
    (r"^detr_decoder\.layers\.(\d+)\.text_cross_attn_layer_norm\.", r"transformer.decoder.layers.\1.catext_norm."),
    (r"^detr_decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"transformer.decoder.layers.\1.norm2."),
    (r"^detr_decoder\.layers\.(\d+)\.mlp_layer_norm\.", r"transformer.decoder.layers.\1.norm3."),
    (r"^detr_decoder\.layers\.(\d+)\.text_cross_attn\.", r"transformer.decoder.layers.\1.ca_text."),
    (r"^detr_decoder\.layers\.(\d+)\.vision_cross_attn\.", r"transformer.decoder.layers.\1.cross_attn."),
    (r"^detr_decoder\.layers\.(\d+)\.mlp\.fc(\d)\.", r"transformer.decoder.layers.\1.linear\2."),
    (r"^detr_decoder\.presence_layer_norm\.", "transformer.decoder.presence_token_out_norm."),
    (r"^detr_decoder\.output_layer_norm\.", "transformer.decoder.norm."),
    (r"^detr_decoder\.presence_head\.", "transformer.decoder.presence_token_head."),
    (r"^detr_decoder\.box_head\.", "transformer.decoder.bbox_embed."),
    (r"^detr_decoder\.instance_box_head\.", "transformer.decoder.instance_bbox_embed."),
    (r"^detr_decoder\.box_rpb_embed_(x|y)\.", r"transformer.decoder.boxRPB_embed_\1."),
    (r"^detr_decoder\.", "transformer.decoder."),
    (r"^dot_product_scoring\.text_mlp\.", "dot_prod_scoring.prompt_mlp."),
    (r"^dot_product_scoring\.text_mlp_out_norm\.", "dot_prod_scoring.prompt_mlp.out_norm."),
    (r"^dot_product_scoring\.text_proj\.", "dot_prod_scoring.prompt_proj."),
    (r"^dot_product_scoring\.query_proj\.", "dot_prod_scoring.hs_proj."),
    (r"^mask_decoder\.mask_embedder\.", "segmentation_head.mask_predictor.mask_embed."),
    (r"^mask_decoder\.instance_projection\.", "segmentation_head.instance_seg_head."),
    (r"^mask_decoder\.semantic_projection\.", "segmentation_head.semantic_seg_head."),
    (r"^mask_decoder\.prompt_cross_attn_norm\.", "segmentation_head.cross_attn_norm."),
    (r"^mask_decoder\.prompt_cross_attn\.", "segmentation_head.cross_attend_prompt."),
    (r"^mask_decoder\.", "segmentation_head."),
    (r"\.layer(\d)\.", lambda m: f".layers.{int(m[1]) - 1}."),  # the DETR heads' MLPs count from 1 in transformers
    (r"\.o_proj\.", ".out_proj."),
)
_TRACKER_BACK = (  # released name under tracker_model. -> official name under sam2_predictor.model. (SAM 2's names)
    (r"^no_memory_embedding$", "no_mem_embed"),
    (r"^no_memory_positional_encoding$", "no_mem_pos_enc"),
    (r"^memory_temporal_positional_encoding$", "maskmem_tpos_enc"),
    (r"^no_object_pointer$", "no_obj_ptr"),
    (r"^occlusion_spatial_embedding_parameter$", "no_obj_embed_spatial"),
    (r"^prompt_encoder\.shared_embedding\.positional_embedding$", "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
    (r"^prompt_encoder\.mask_embed\.(\w+)\.", lambda m: f"sam_prompt_encoder.mask_downscaling.{dict(conv1=0, layer_norm1=1, conv2=3, layer_norm2=4, conv3=6)[m[1]]}."),
    (r"^prompt_encoder\.", "sam_prompt_encoder."),
    (r"^mask_decoder\.upscale_conv1\.", "sam_mask_decoder.output_upscaling.0."),
    (r"^mask_decoder\.upscale_layer_norm\.", "sam_mask_decoder.output_upscaling.1."),
    (r"^mask_decoder\.upscale_conv2\.", "sam_mask_decoder.output_upscaling.3."),
    (r"^mask_decoder\.", "sam_mask_decoder."),
    (r"^memory_attention\.", "transformer.encoder."),
    (r"^memory_encoder\.mask_downsampler\.layers\.(\d)\.conv\.", lambda m: f"maskmem_backbone.mask_downsampler.encoder.{3 * int(m[1])}."),
    (r"^memory_encoder\.mask_downsampler\.layers\.(\d)\.layer_norm\.", lambda m: f"maskmem_backbone.mask_downsampler.encoder.{3 * int(m[1]) + 1}."),
    (r"^memory_encoder\.mask_downsampler\.final_conv\.", "maskmem_backbone.mask_downsampler.encoder.FINAL."),
    (r"^memory_encoder\.feature_projection\.", "maskmem_backbone.pix_feat_proj."),
    (r"^memory_encoder\.projection\.", "maskmem_backbone.out_proj."),
    (r"^memory_encoder\.memory_fuser\.", "maskmem_backbone.fuser."),
    (r"^memory_encoder\.", "maskmem_backbone."),
    (r"^object_pointer_proj\.", "obj_ptr_proj."),
    (r"^temporal_positional_encoding_projection_layer\.", "obj_ptr_tpos_proj."),
    (r"\.scale$", ".gamma"),
    (r"\.depthwise_conv\.", ".dwconv."),
    (r"\.pointwise_conv(\d)\.", r".pwconv\1."),
    (r"\.layer_norm(\d?)\.", r".norm\1."),
    (r"\.layer_norm_final_attn\.", ".norm_final_attn."),
    (r"\.o_proj\.", ".out_proj."),
)
_FUSED_Q_K_V = re.compile(r"^(sam3_model\..*)\.(q|k|v)_proj\.(weight|bias)$")  # every detector attention is fused in Meta's file


def _rename(key: str, rules) -> str:
    for pattern, replace in rules:
        key = re.sub(pattern, replace, key)
    return key


def official_state(released: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in the released layout -> Meta's layout (see above): q|k|v fused (qkv in the ViT,
    in_proj_* elsewhere), the class-token row prepended to the ViT's position table, CLIP's text
    projection transposed, the four point embeddings apart, MLP heads counted from layers.0."""
    out, fused = {}, {}
    depth = {}  # the tracker's MLPs: proj_in, layers.0 .., proj_out
    for key in released:
        if m := re.match(r"^tracker_model\.(.*)\.(?:proj_in|proj_out|layers\.(\d+))\.(?:weight|bias)$", key):
            depth[m[1]] = max(depth.get(m[1], 2), int(m[2]) + 3 if m[2] else 2)
    downsampler_layers = len({k for k in released if "mask_downsampler.layers" in k and k.endswith("conv.weight")})
    for key, value in released.items():
        if key == "tracker_model.shared_image_embedding.positional_embedding":
            continue  # one matrix in Meta's file (the prompt encoder's)
        if key.startswith("tracker_model."):
            rest = key[len("tracker_model.") :]
            if m := re.match(r"^(.*)\.(proj_in|proj_out|layers\.(\d+))\.(weight|bias)$", rest):
                if m[1] in depth:
                    index = 0 if m[2] == "proj_in" else depth[m[1]] - 1 if m[2] == "proj_out" else int(m[3]) + 1
                    rest = f"{m[1]}.layers.{index}.{m[4]}"
            if rest == "prompt_encoder.point_embed.weight":
                for i, row in enumerate(value):
                    out[f"sam2_predictor.model.sam_prompt_encoder.point_embeddings.{i}.weight"] = row[None].clone()
                continue
            name = "sam2_predictor.model." + _rename(rest, _TRACKER_BACK).replace("FINAL", str(3 * downsampler_layers))
        else:
            rest = key[len("detector_model.") :] if key.startswith("detector_model.") else key
            name = "sam3_model." + _rename(rest, _DETECTOR_BACK)
        if name.endswith("trunk.pos_embed"):
            value = torch.cat([torch.randn_like(value[:, :1]), value], 1)
        elif name.endswith("encoder.text_projection"):
            value = value.T
        if m := _FUSED_Q_K_V.match(name):
            fused.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            out[name] = value
    for (module, param), parts in fused.items():
        name = f"{module}.qkv.{param}" if ".trunk.blocks." in module else f"{module}.in_proj_{param}"
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def test_representative_official_keys_land_on_their_released_keys_with_their_values():
    """One or a few keys per component, official name and expected result both written out by hand."""
    g = torch.Generator().manual_seed(0)
    t = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    official = {
        "sam3_model.backbone.vision_backbone.trunk.pos_embed": t(1, 5, 8),  # class row + 2×2 grid
        "sam3_model.backbone.vision_backbone.trunk.blocks.3.attn.qkv.weight": t(24, 8),
        "sam3_model.backbone.vision_backbone.trunk.blocks.3.attn.proj.bias": t(8),
        "sam3_model.backbone.vision_backbone.trunk.blocks.3.attn.freqs_cis": t(4, 2),  # computed by the released model
        "sam3_model.backbone.vision_backbone.convs.0.dconv_2x2_1.weight": t(4, 2, 2, 2),
        "sam3_model.backbone.vision_backbone.convs.1.dconv_2x2.bias": t(4),
        "sam3_model.backbone.vision_backbone.sam2_convs.2.conv_3x3.bias": t(4),
        "sam3_model.backbone.language_backbone.encoder.text_projection": t(8, 6),
        "sam3_model.backbone.language_backbone.encoder.positional_embedding": t(7, 8),
        "sam3_model.backbone.language_backbone.encoder.transformer.resblocks.1.attn.in_proj_bias": t(24),
        "sam3_model.backbone.language_backbone.encoder.transformer.resblocks.1.mlp.c_proj.weight": t(8, 16),
        "sam3_model.backbone.language_backbone.resizer.weight": t(4, 8),
        "sam3_model.geometry_encoder.encode.0.cross_attn_image.out_proj.weight": t(4, 4),
        "sam3_model.geometry_encoder.encode_norm.bias": t(4),
        "sam3_model.geometry_encoder.norm.weight": t(4),
        "sam3_model.transformer.encoder.layers.5.norm3.weight": t(4),
        "sam3_model.transformer.encoder.layers.5.self_attn.in_proj_weight": t(12, 4),
        "sam3_model.transformer.decoder.layers.2.ca_text.in_proj_weight": t(12, 4),
        "sam3_model.transformer.decoder.layers.2.catext_norm.weight": t(4),
        "sam3_model.transformer.decoder.layers.2.norm2.bias": t(4),
        "sam3_model.transformer.decoder.bbox_embed.layers.2.bias": t(4),
        "sam3_model.transformer.decoder.boxRPB_embed_y.layers.0.weight": t(4, 2),
        "sam3_model.dot_prod_scoring.hs_proj.weight": t(4, 4),
        "sam3_model.segmentation_head.mask_predictor.mask_embed.layers.1.weight": t(4, 4),
        "sam3_model.segmentation_head.cross_attend_prompt.out_proj.bias": t(4),
        **{f"sam2_predictor.model.sam_prompt_encoder.point_embeddings.{i}.weight": t(1, 4) for i in range(4)},
        "sam2_predictor.model.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": t(2, 2),
        "sam2_predictor.model.sam_mask_decoder.transformer.layers.1.mlp.lin2.weight": t(4, 8),
        **{f"sam2_predictor.model.sam_mask_decoder.iou_prediction_head.layers.{i}.bias": t(4) for i in range(3)},
        "sam2_predictor.model.transformer.encoder.layers.0.cross_attn_image.k_proj.weight": t(4, 2),
        "sam2_predictor.model.transformer.encoder.norm.weight": t(4),
        **{f"sam2_predictor.model.maskmem_backbone.mask_downsampler.encoder.{i}.weight": t(4) for i in (0, 4, 12)},
        "sam2_predictor.model.maskmem_backbone.fuser.layers.1.gamma": t(4),
        "sam2_predictor.model.obj_ptr_tpos_proj.weight": t(2, 4),
        "sam2_predictor.model.no_obj_embed_spatial": t(1, 2),
    }
    o = lambda key: official[key]  # noqa: E731
    vit, text, detr = "detector_model.vision_encoder.backbone.", "detector_model.text_encoder.", "detector_model.detr_decoder."
    qkv, in_proj_bias = o("sam3_model.backbone.vision_backbone.trunk.blocks.3.attn.qkv.weight"), o(
        "sam3_model.backbone.language_backbone.encoder.transformer.resblocks.1.attn.in_proj_bias")
    encoder_in, text_in = o("sam3_model.transformer.encoder.layers.5.self_attn.in_proj_weight"), o("sam3_model.transformer.decoder.layers.2.ca_text.in_proj_weight")
    expected = {
        vit + "embeddings.position_embeddings": o("sam3_model.backbone.vision_backbone.trunk.pos_embed")[:, 1:],
        vit + "layers.3.attention.q_proj.weight": qkv[:8], vit + "layers.3.attention.k_proj.weight": qkv[8:16],
        vit + "layers.3.attention.v_proj.weight": qkv[16:],
        vit + "layers.3.attention.o_proj.bias": o("sam3_model.backbone.vision_backbone.trunk.blocks.3.attn.proj.bias"),
        "detector_model.vision_encoder.neck.fpn_layers.0.scale_layers.2.weight": o("sam3_model.backbone.vision_backbone.convs.0.dconv_2x2_1.weight"),
        "detector_model.vision_encoder.neck.fpn_layers.1.scale_layers.0.bias": o("sam3_model.backbone.vision_backbone.convs.1.dconv_2x2.bias"),
        "tracker_neck.fpn_layers.2.proj2.bias": o("sam3_model.backbone.vision_backbone.sam2_convs.2.conv_3x3.bias"),
        text + "text_projection.weight": o("sam3_model.backbone.language_backbone.encoder.text_projection").T,
        text + "text_model.embeddings.position_embedding.weight": o("sam3_model.backbone.language_backbone.encoder.positional_embedding"),
        text + "text_model.encoder.layers.1.self_attn.q_proj.bias": in_proj_bias[:8],
        text + "text_model.encoder.layers.1.self_attn.k_proj.bias": in_proj_bias[8:16],
        text + "text_model.encoder.layers.1.self_attn.v_proj.bias": in_proj_bias[16:],
        text + "text_model.encoder.layers.1.mlp.fc2.weight": o("sam3_model.backbone.language_backbone.encoder.transformer.resblocks.1.mlp.c_proj.weight"),
        "detector_model.text_projection.weight": o("sam3_model.backbone.language_backbone.resizer.weight"),
        "detector_model.geometry_encoder.layers.0.cross_attn.o_proj.weight": o("sam3_model.geometry_encoder.encode.0.cross_attn_image.out_proj.weight"),
        "detector_model.geometry_encoder.output_layer_norm.bias": o("sam3_model.geometry_encoder.encode_norm.bias"),
        "detector_model.geometry_encoder.prompt_layer_norm.weight": o("sam3_model.geometry_encoder.norm.weight"),
        "detector_model.detr_encoder.layers.5.layer_norm3.weight": o("sam3_model.transformer.encoder.layers.5.norm3.weight"),
        **{f"detector_model.detr_encoder.layers.5.self_attn.{p}_proj.weight": encoder_in[4 * i : 4 * i + 4] for i, p in enumerate("qkv")},
        **{f"{detr}layers.2.text_cross_attn.{p}_proj.weight": text_in[4 * i : 4 * i + 4] for i, p in enumerate("qkv")},
        detr + "layers.2.text_cross_attn_layer_norm.weight": o("sam3_model.transformer.decoder.layers.2.catext_norm.weight"),
        detr + "layers.2.self_attn_layer_norm.bias": o("sam3_model.transformer.decoder.layers.2.norm2.bias"),
        detr + "box_head.layer3.bias": o("sam3_model.transformer.decoder.bbox_embed.layers.2.bias"),
        detr + "box_rpb_embed_y.layer1.weight": o("sam3_model.transformer.decoder.boxRPB_embed_y.layers.0.weight"),
        "detector_model.dot_product_scoring.query_proj.weight": o("sam3_model.dot_prod_scoring.hs_proj.weight"),
        "detector_model.mask_decoder.mask_embedder.layers.1.weight": o("sam3_model.segmentation_head.mask_predictor.mask_embed.layers.1.weight"),
        "detector_model.mask_decoder.prompt_cross_attn.o_proj.bias": o("sam3_model.segmentation_head.cross_attend_prompt.out_proj.bias"),
        "tracker_model.prompt_encoder.point_embed.weight": torch.cat([o(f"sam2_predictor.model.sam_prompt_encoder.point_embeddings.{i}.weight") for i in range(4)]),
        "tracker_model.prompt_encoder.shared_embedding.positional_embedding": o("sam2_predictor.model.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
        "tracker_model.shared_image_embedding.positional_embedding": o("sam2_predictor.model.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"),
        "tracker_model.mask_decoder.transformer.layers.1.mlp.proj_out.weight": o("sam2_predictor.model.sam_mask_decoder.transformer.layers.1.mlp.lin2.weight"),
        **{f"tracker_model.mask_decoder.iou_prediction_head.{n}.bias": o(f"sam2_predictor.model.sam_mask_decoder.iou_prediction_head.layers.{i}.bias")
           for i, n in enumerate(("proj_in", "layers.0", "proj_out"))},
        "tracker_model.memory_attention.layers.0.cross_attn_image.k_proj.weight": o("sam2_predictor.model.transformer.encoder.layers.0.cross_attn_image.k_proj.weight"),
        "tracker_model.memory_attention.layer_norm.weight": o("sam2_predictor.model.transformer.encoder.norm.weight"),
        **{f"tracker_model.memory_encoder.mask_downsampler.{n}.weight": o(f"sam2_predictor.model.maskmem_backbone.mask_downsampler.encoder.{i}.weight")
           for i, n in ((0, "layers.0.conv"), (4, "layers.1.layer_norm"), (12, "final_conv"))},
        "tracker_model.memory_encoder.memory_fuser.layers.1.scale": o("sam2_predictor.model.maskmem_backbone.fuser.layers.1.gamma"),
        "tracker_model.temporal_positional_encoding_projection_layer.weight": o("sam2_predictor.model.obj_ptr_tpos_proj.weight"),
        "tracker_model.occlusion_spatial_embedding_parameter": o("sam2_predictor.model.no_obj_embed_spatial"),
    }  # fmt: skip
    released = official_to_released(official)
    assert sorted(released) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(released[key], value), key


def test_every_released_key_comes_out_of_the_official_names():
    """The whole stored released list (release configuration, shapes only: meta tensors), written in
    Meta's names by the hand-written inverse above, converts back to exactly that list. Weaker than
    a real sam3.pt: the official names are derived, not read from Meta's file."""
    stored = json.loads(KEY_LIST.read_text())["shapes"]
    released = {k: torch.empty(shape, device="meta") for k, shape in stored.items()}
    official = official_state(released)
    official["sam3_model.backbone.vision_backbone.trunk.blocks.0.attn.freqs_cis"] = torch.empty(576, 32, device="meta")
    assert len(official) < len(stored) and all(k.startswith(("sam3_model.", "sam2_predictor.model.")) for k in official)
    converted = official_to_released(official)
    assert {k: list(v.shape) for k, v in converted.items()} == stored


def tiny_official_file(model: Sam3Segmenter, memory: dict, path: Path) -> Path:
    """A synthetic sam3.pt: the tiny model (and tracker memory) in Meta's layout, wrapped as Meta saves it."""
    released = {released_key(k): v for k, v in model.state_dict().items() if released_key(k) is not None}
    released.update({f"tracker_model.{k}": v for k, v in memory.items()})
    torch.save({"model": {k: v.clone().contiguous() for k, v in official_state(released).items()}}, path)
    return path


def test_an_official_file_with_a_key_that_maps_nowhere_is_refused_naming_it(tmp_path):
    model = build_model("sam3-tiny-random", image_size=SIZE)
    official = official_state({released_key(k): v for k, v in model.state_dict().items() if released_key(k) is not None})
    official["sam3_model.extra_head.weight"] = torch.zeros(2)
    official["sam2_predictor.model.image_encoder.trunk.pos_embed"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"sam3_model\.extra_head\.weight"):
        official_to_released(official)
    path = tmp_path / "sam3.pt"
    torch.save({"model": official}, path)
    with pytest.raises(CheckpointError, match=r"(?s)unexpected keys.*sam2_predictor\.model\.image_encoder\.trunk\.pos_embed.*sam3_model\.extra_head"):
        build_model("sam3-tiny-random", checkpoint=path, image_size=SIZE)


def test_a_tiny_official_file_loads_and_segments_as_the_model_it_was_written_from(tmp_path):
    family, variant = get_family("sam3"), get_variant("sam3-tiny-random")
    model = randomise(build_model("sam3-tiny-random", image_size=SIZE))
    same_positional_tables(model)  # Meta's file holds one Fourier matrix for image and prompts
    reference = video_model_from(randomise(build_model("sam3-tiny-random", image_size=SIZE, init_seed=3)))
    memory = {k: v for k, v in reference.state_dict().items() if is_memory_key(k)}
    path = tiny_official_file(model, memory, tmp_path / "sam3.pt")
    loaded = build_model("sam3-tiny-random", checkpoint=path, image_size=SIZE)
    theirs = loaded.state_dict()  # every weight, the detector's heads included (samtune's own class projection aside)
    assert all(torch.equal(theirs[k], v) for k, v in model.state_dict().items() if released_key(k) is not None)
    pixels = torch.randn(1, 3, SIZE, SIZE)
    boxes = torch.tensor([[4.0, 6.0, 60.0, 70.0]])
    with torch.no_grad():
        ours, theirs = family.encode_images(loaded, pixels), family.encode_images(model, pixels)
        torch.testing.assert_close(ours.image_embeddings, theirs.image_embeddings, atol=0, rtol=0)
        for a, b in zip(ours.high_res_features, theirs.high_res_features):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(family.decode_prompts(loaded, ours, boxes=boxes), family.decode_prompts(model, theirs, boxes=boxes), atol=0, rtol=0)
    video = family.video_model(loaded, variant, str(path))  # the memory modules come out of the same file
    assert memory and all(torch.equal(video.state_dict()[k], v) for k, v in memory.items())
