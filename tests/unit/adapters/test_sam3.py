"""SAM 3 (adapters/sam3.py) against transformers' own classes on the same random weights: the
prompted path equals ``Sam3TrackerModel``, the detector equals ``Sam3Model`` with text embeddings;
class logits, presence gating, text init, the released key layout and the weight errors.

Meta's ``sam3`` package (0.1.4 on PyPI) is not the reference here: its model modules import
torchvision at module level and its builder needs timm, iopath and pycocotools (docs/howto/models.md)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Sam3Config, Sam3Model, Sam3TrackerConfig, Sam3TrackerModel, Sam3TrackerVideoModel, Sam3VideoModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from samtune import SamtuneError
from samtune.adapters.export import merge_model
from samtune.adapters.family import get_family
from samtune.adapters.lora import apply_lora
from samtune.adapters.registry import build_model, get_variant
from samtune.adapters.sam3 import PROBABILITY_FLOOR, concept_logits
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
    with pytest.raises(SamtuneError, match="Set model.checkpoint to a Hugging Face folder"):
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
