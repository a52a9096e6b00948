"""EdgeTAM (transformers EdgeTamModel with samtune's RepViT, behind the model-family interface).

No reference package is installable here: the official code (facebookresearch/EdgeTAM, PyPI
``edgetam-dimos``) and transformers' own EdgeTAM encoder both build RepViT through timm, and timm
imports torchvision at import. So:

- RepViT is checked against timm's code through stored files: the keys and shapes of timm's
  ``repvit_m1`` (data/repvit_m1_timm_shapes.json) and, for a small layout, timm's weights, input and
  four output maps (data/repvit_timm_reference.safetensors). Both were written by ``write_timm_reference``
  below with timm 1.0.31 (torchvision's import stubbed out: RepViT never calls it);
  ``test_stored_references_are_timms`` rewrites and compares them where timm imports.
- The rest of the model is transformers' own: samtune's ``encode_images`` + ``decode_prompts`` must give
  what ``EdgeTamModel.forward`` gives on the same inputs, for boxes, clicks and mask prompts.
- The official checkpoint's layout is taken from transformers' convert_edgetam_to_hf.py and the
  official ``TimmBackbone`` (timm's model as ``body``); it is checked on a key list made from SAM 2.1's
  released keys (data/sam2.1_hiera_t_official_shapes.json) and timm's RepViT-M1 keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

from samtune import SamtuneError
from samtune.adapters.checkpoint_files import CheckpointError
from samtune.adapters.edgetam import is_video_only_edgetam, official_to_hf_edgetam, video_model_from
from samtune.adapters.edgetam_config import REPVIT_TEST, config_from_dict, edgetam_config, repvit_layout
from samtune.adapters.family import get_family
from samtune.adapters.lora import apply_lora, select_lora_modules
from samtune.adapters.registry import build_model, get_variant
from samtune.adapters.repvit import REPVIT_M1, RepViTFeatures, RepViTLayout
from samtune.finetune.recipe import LoraSection

DATA = Path(__file__).parent / "data"
REFERENCE, M1_SHAPES, SAM2_SHAPES = DATA / "repvit_timm_reference.safetensors", DATA / "repvit_m1_timm_shapes.json", DATA / "sam2.1_hiera_t_official_shapes.json"
FAMILY = get_family("edgetam")
SIZE = 64
TOLERANCE = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Two cores shared with other work: one thread is faster than two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny():
    return build_model("edgetam-tiny-random", image_size=SIZE)


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every weight, so that no zero table (``no_memory_embedding``) or unit scale hides a mistake."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point():
            tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
            if name.endswith("running_var"):
                tensor.abs_()
    return module.eval()


# --- RepViT against timm -----------------------------------------------------------------------


def write_timm_reference(reference: Path, shapes: Path) -> None:
    """The stored files, from timm (needs ``import timm`` to work)."""
    import timm
    from safetensors.torch import save_file

    layout = RepViTLayout((8, 16, 24, 32), (2, 1, 2, 1))  # stage 0: a block with SE and one without
    model = timm.create_model("repvit_m1", features_only=True, out_indices=(0, 1, 2, 3), embed_dim=layout.embed_dims, depth=layout.depths).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5 if key.endswith("running_var") else torch.randn(value.shape, generator=generator) * 0.3)
        pixels = torch.randn(2, 3, 32, 32, generator=generator)
        features = model(pixels)
    tensors = {**{f"weights.{k}": v.contiguous() for k, v in model.state_dict().items()}, "pixels": pixels}
    tensors.update({f"features.{i}": f.contiguous() for i, f in enumerate(features)})
    save_file(tensors, str(reference), metadata={"timm": timm.__version__, "architecture": "repvit_m1", "embed_dim": json.dumps(layout.embed_dims),
                                                 "depth": json.dumps(layout.depths)})  # fmt: skip
    m1 = timm.create_model("repvit_m1", features_only=True, out_indices=(0, 1, 2, 3))
    lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(list(v.shape))}" for k, v in m1.state_dict().items())
    source = f"timm {timm.__version__}: timm.create_model('repvit_m1', features_only=True, out_indices=(0, 1, 2, 3)).state_dict()"
    shapes.write_text('{\n"source": ' + json.dumps(source) + ',\n"shapes": {\n' + lines + "\n}\n}\n")


def read_reference(path: Path = REFERENCE) -> tuple[RepViTLayout, dict, torch.Tensor, list[torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    layout = RepViTLayout(json.loads(meta["embed_dim"]), json.loads(meta["depth"]))
    weights = {k[len("weights."):]: v for k, v in tensors.items() if k.startswith("weights.")}
    return layout, weights, tensors["pixels"], [tensors[f"features.{i}"] for i in range(len(layout.depths))]


def test_repvit_gives_timms_four_maps_on_timms_weights():
    layout, weights, pixels, expected = read_reference()
    model = RepViTFeatures(layout).eval()
    model.load_state_dict(weights, strict=True)  # timm's keys, as they are
    with torch.no_grad():
        ours = model(pixels)
    assert [tuple(f.shape) for f in ours] == [(2, 8, 8, 8), (2, 16, 4, 4), (2, 24, 2, 2), (2, 32, 1, 1)]
    diffs = [(a - b).abs().max().item() for a, b in zip(ours, expected)]
    print(f"\nmax|d| per stage vs timm: {', '.join(f'{d:.1e}' for d in diffs)}")
    assert min(f.abs().max().item() for f in expected) > 0.1 and max(diffs) < TOLERANCE


def test_repvit_m1_has_timms_keys_and_shapes():
    shapes = json.loads(M1_SHAPES.read_text())["shapes"]
    ours = {k: list(v.shape) for k, v in RepViTFeatures(REPVIT_M1).state_dict().items()}
    assert ours == shapes
    assert sum(v.numel() for v in RepViTFeatures(REPVIT_M1).parameters()) == 4_713_712  # RepViT-M1 without its classifier


def test_stored_references_are_timms(tmp_path):
    try:
        import timm  # noqa: F401
    except Exception:  # not installed, or installed without a working torchvision
        pytest.skip("timm does not import here (it needs torchvision); the stored files were written by write_timm_reference")
    write_timm_reference(tmp_path / "reference.safetensors", tmp_path / "shapes.json")
    assert json.loads((tmp_path / "shapes.json").read_text())["shapes"] == json.loads(M1_SHAPES.read_text())["shapes"]
    for ours, stored in zip(read_reference(tmp_path / "reference.safetensors")[3], read_reference()[3]):
        torch.testing.assert_close(ours, stored, atol=TOLERANCE, rtol=0)


def test_batch_norm_keeps_its_statistics_in_train_mode(tiny):
    encoder = tiny.vision_encoder.backbone.timm_model
    before = {k: v.clone() for k, v in encoder.state_dict().items() if "running" in k}
    tiny.train()
    assert not any(m.training for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    FAMILY.encode_images(tiny, torch.randn(2, 3, SIZE, SIZE)).image_embeddings.sum().backward()
    assert all(torch.equal(encoder.state_dict()[k], v) for k, v in before.items())


# --- the family against transformers' own forward ----------------------------------------------


@pytest.fixture(scope="module")
def randomised():
    return randomise(build_model("edgetam-tiny-random", image_size=128))


@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
def test_encode_and_decode_give_what_edgetam_model_forward_gives(randomised, multimask):
    """Boxes; clicks with a negative one and padding; a box with clicks and a mask prompt (a correction round)."""
    pixels = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor([[10.0, 20.0, 90.0, 110.0], [40.0, 8.0, 120.0, 60.0]])
    points = torch.tensor([[[50.0, 60.0], [12.0, 100.0]], [[80.0, 30.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, 0], [1, -1]])
    masks = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 5
    cases = [dict(boxes=boxes), dict(points=points, point_labels=labels), dict(boxes=boxes, points=points, point_labels=labels, mask_inputs=masks)]
    with torch.no_grad():
        embeddings = FAMILY.encode_images(randomised, pixels)
        for case in cases:
            ours, iou = FAMILY.decode_prompts(randomised, embeddings, multimask_output=multimask, **case)
            theirs = randomised(
                pixel_values=pixels, input_boxes=case["boxes"][:, None] if "boxes" in case else None,
                input_points=case["points"][:, None] if "points" in case else None,
                input_labels=case["point_labels"][:, None] if "points" in case else None, input_masks=case.get("mask_inputs"),
                multimask_output=multimask,
            )  # fmt: skip
            assert ours.shape == (2, 3 if multimask else 1, 32, 32)
            assert theirs.pred_masks[:, 0].abs().max() > 1e-2
            torch.testing.assert_close(ours, theirs.pred_masks[:, 0], atol=TOLERANCE, rtol=0)
            torch.testing.assert_close(iou, theirs.iou_scores[:, 0], atol=TOLERANCE, rtol=0)


# --- the tiny variant, LoRA, class prompts --------------------------------------------------------


def test_random_variant_is_small_seeded_and_calibrated(tiny):
    again, other = build_model("edgetam-tiny-random", image_size=SIZE), build_model("edgetam-tiny-random", image_size=SIZE, init_seed=1)
    a, b, o = tiny.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], o[k]) for k in a)
    assert 1.5e6 < sum(p.numel() for p in tiny.parameters()) < 2.0e6
    assert torch.equal(tiny.prompt_encoder.shared_embedding.positional_embedding, tiny.shared_image_embedding.positional_embedding)
    with torch.no_grad():  # BatchNorm statistics from random pixels: the last stage does not fade away
        features = tiny.vision_encoder.backbone(torch.randn(1, 3, SIZE, SIZE)).last_hidden_state
    assert [tuple(f.shape[1:]) for f in features] == [(16, 16, 16), (32, 8, 8), (48, 4, 4), (64, 2, 2)]
    assert min(f.std().item() for f in features) > 0.3
    assert not tiny.mask_decoder.dynamic_multimask_via_stability and tiny.config.mask_decoder_config.dynamic_multimask_via_stability
    assert get_variant("edgetam").hub_id == "yonigozlan/EdgeTAM-hf" and get_variant("edgetam").default_image_size == 1024


def test_lora_roles_wrap_repvit_convolutions_and_the_two_way_transformer(tiny):
    """REPVIT_TEST: 5 blocks (stages of 1, 1, 2, 1), squeeze-and-excitation on the first of each stage."""
    expected = {"encoder_attention": 4, "encoder_attention_out": 4, "encoder_mlp": 10, "decoder_attention": 28}
    for role, count in expected.items():
        assert len(select_lora_modules(tiny, FAMILY, LoraSection(preset=role))) == count, role
    assert FAMILY.encoder_depth(tiny) == 5 and FAMILY.block_index("vision_encoder.backbone.timm_model.stages_2.blocks.1.channel_mixer.conv1.c", tiny) == 3
    last = select_lora_modules(tiny, FAMILY, LoraSection(preset="encoder_attention", blocks=[-1]))
    assert last == ["vision_encoder.backbone.timm_model.stages_3.blocks.0.se.fc1"]
    wrapped = apply_lora(tiny, FAMILY, LoraSection(preset="encoder_all_linear"))
    assert not any("downsample" in n for n, m in wrapped.named_modules() if hasattr(m, "lora_A"))  # no role between stages
    trainable = {n.split(".")[2] for n, p in wrapped.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"mask_decoder"}


def test_merged_conv_lora_exports_and_loads_whole_and_at_another_size(tiny, tmp_path):
    """LoRA on 1×1 convolutions merges into them (``hf`` export); the folder loads whole, as
    ``model.checkpoint`` at another size, and its config.json is transformers' EdgeTAM with timm's RepViT."""
    wrapped = apply_lora(tiny, FAMILY, LoraSection(preset="encoder_all_linear"))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    pixels, box = torch.randn(1, 3, SIZE, SIZE), torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    with torch.no_grad():
        expected = FAMILY.decode_prompts(wrapped.eval(), FAMILY.encode_images(wrapped, pixels), boxes=box)[0]
    files = FAMILY.export(wrapped, "hf", tmp_path / "hf")
    assert [f.name for f in files] == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    backbone = config["vision_config"]["backbone_config"]
    assert config["architectures"] == ["EdgeTamModel"] and backbone["model_type"] == "timm_wrapper" and backbone["architecture"] == "repvit_m1"
    assert repvit_layout(backbone) == REPVIT_TEST
    whole = FAMILY.load_full(tmp_path / "hf")
    at_128 = build_model("edgetam-tiny-random", tmp_path / "hf", image_size=128)
    assert at_128.config.prompt_encoder_config.image_size == 128 and at_128.config.vision_config.backbone_feature_sizes[2] == [8, 8]
    untouched = build_model("edgetam-tiny-random", image_size=SIZE)
    with torch.no_grad():
        got = FAMILY.decode_prompts(whole, FAMILY.encode_images(whole, pixels), boxes=box)[0]
        base = FAMILY.decode_prompts(untouched, FAMILY.encode_images(untouched, pixels), boxes=box)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - base).abs().max() > 1e-4  # the merged LoRA is in the file
    with pytest.raises(SamtuneError, match="exports hf"):
        FAMILY.export(whole, "sam-pth", tmp_path / "x.pth")


def test_adapter_folder_carries_conv_lora(tiny, tmp_path):
    wrapped = apply_lora(tiny, FAMILY, LoraSection(preset="encoder_mlp"))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    wrapped.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build_model("edgetam-tiny-random", image_size=SIZE), str(tmp_path)).eval()
    pixels = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        a = FAMILY.encode_images(wrapped.eval(), pixels).image_embeddings
        b = FAMILY.encode_images(loaded, pixels).image_embeddings
    torch.testing.assert_close(a, b)


def test_backbone_configs_other_than_a_repvit_are_refused():
    args = {"in_chans": 3, "features_only": True, "out_indices": [0, 1, 2, 3]}
    assert repvit_layout({"architecture": "repvit_m1.dist_in1k", "model_args": args}) == REPVIT_M1  # timm's pretrained tag
    with pytest.raises(SamtuneError, match="'resnet50'.*repvit_m1"):
        repvit_layout({"architecture": "resnet50", "model_args": args})
    with pytest.raises(SamtuneError, match=r"\['drop_path_rate'\]: not a RepViT option"):
        repvit_layout({"architecture": "repvit_m1", "model_args": {**args, "drop_path_rate": 0.1}})
    with pytest.raises(SamtuneError, match="four stage maps"):
        repvit_layout({"architecture": "repvit_m1", "model_args": {**args, "out_indices": [2, 3]}})
    with pytest.raises(SamtuneError, match="not an EdgeTAM model"):
        config_from_dict({"model_type": "sam2", "vision_config": {}})


# --- official checkpoint layout --------------------------------------------------------------------


def official_layout() -> dict[str, list[int]]:
    """An official edgetam.pt's keys: SAM 2.1's (edgetam.yaml: the same prompt encoder, decoder and neck
    modules), the trunk replaced by timm's RepViT-M1 under ``image_encoder.trunk.body.``, plus some of
    the spatial perceiver's (memory: never loaded into the image model)."""
    sam2 = json.loads(SAM2_SHAPES.read_text())["shapes"]
    repvit = json.loads(M1_SHAPES.read_text())["shapes"]
    keys = {k: s for k, s in sam2.items() if not k.startswith("image_encoder.trunk.")}
    keys.update({f"image_encoder.trunk.body.{k}": s for k, s in repvit.items()})
    keys.update({"spatial_perceiver.latents": [256, 64], "spatial_perceiver.layers.0.attn.to_q.weight": [64, 64]})
    return keys


@pytest.fixture(scope="module")
def official_file(tmp_path_factory) -> tuple[Path, dict]:
    """Random tensors in the official layout, shaped for edgetam's config (the neck reads RepViT's widths)."""
    from transformers import EdgeTamModel

    with torch.device("meta"):
        target = EdgeTamModel(edgetam_config(1024)).state_dict()
    layout = {k: torch.empty(s, device="meta") for k, s in official_layout().items()}
    official_of = {id(v): k for k, v in layout.items()}
    shapes = {k: tuple(v.shape) for k, v in layout.items()}
    for hf_key, value in official_to_hf_edgetam(layout)[0].items():  # a renamed tensor is the same object
        if id(value) in official_of:  # shaped as its place in the model (the neck reads RepViT's widths, not Hiera-T's)
            shapes[official_of[id(value)]] = tuple(target[hf_key].shape)
    generator = torch.Generator().manual_seed(0)
    sd = {k: torch.tensor(0) if k.endswith("num_batches_tracked") else torch.rand(s, generator=generator) + 0.5 if k.endswith("running_var")
          else torch.randn(s, generator=generator) for k, s in shapes.items()}  # fmt: skip
    path = tmp_path_factory.mktemp("official") / "edgetam.pt"
    torch.save({"model": sd}, path)
    return path, sd


def test_official_layout_converts_completely():
    from transformers import EdgeTamModel

    official = {k: torch.empty(s, device="meta") for k, s in official_layout().items()}
    hf, left_out, unknown = official_to_hf_edgetam(official)
    with torch.device("meta"):
        expected = EdgeTamModel(edgetam_config(1024)).state_dict()
    assert unknown == [] and set(hf) == set(expected)
    assert {k.split(".")[0] for k in left_out} == {"memory_attention", "memory_encoder", "obj_ptr_proj", "obj_ptr_tpos_proj", "mask_downsample",
                                                   "maskmem_tpos_enc", "no_mem_pos_enc", "no_obj_ptr", "no_obj_embed_spatial", "spatial_perceiver"}  # fmt: skip
    with torch.device("meta"):
        assert sum(p.numel() for p in EdgeTamModel(edgetam_config(1024)).parameters()) == 9_120_641  # RepViT-M1: 4,713,712


def test_official_file_loads_every_tensor_where_it_belongs(official_file):
    path, sd = official_file
    model = build_model("edgetam", path)
    state = model.state_dict()
    pairs = {
        "image_encoder.trunk.body.stages_2.blocks.12.se.fc1.weight": "vision_encoder.backbone.timm_model.stages_2.blocks.12.se.fc1.weight",
        "image_encoder.trunk.body.stem.conv1.bn.running_var": "vision_encoder.backbone.timm_model.stem.conv1.bn.running_var",
        "image_encoder.neck.convs.3.conv.weight": "vision_encoder.neck.convs.3.weight",
        "sam_mask_decoder.iou_prediction_head.layers.0.weight": "mask_decoder.iou_prediction_head.proj_in.weight",
        "no_mem_embed": "no_memory_embedding",
    }
    assert all(torch.equal(state[hf], sd[official]) for official, hf in pairs.items())
    assert torch.equal(state["shared_image_embedding.positional_embedding"], sd["sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
    with pytest.raises(SamtuneError, match="memory propagation reads the memory modules from transformers' EdgeTAM.*eval.propagation=box"):
        FAMILY.video_model(model, get_variant("edgetam"), str(path))


def test_wrong_missing_or_unreachable_weights_are_refused_with_the_fix(official_file, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"no such file.*download edgetam\.pt"):
        build_model("edgetam", tmp_path / "edgetam.pt")
    with pytest.raises(CheckpointError, match=r"RepViT 48 wide; model\.name='edgetam-tiny-random' is 16 wide.*model\.name: edgetam"):
        build_model("edgetam-tiny-random", official_file[0])
    torch.save({"model": {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}}, tmp_path / "sam2.pt")
    with pytest.raises(CheckpointError, match="SAM 2 checkpoint.*sam2-hiera"):
        build_model("edgetam", tmp_path / "sam2.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SamtuneError, match="no config.json"):
        build_model("edgetam", tmp_path / "empty")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SamtuneError, match=r"could not load EdgeTAM weights for model.name='edgetam' from 'yonigozlan/EdgeTAM-hf'(.|\n)*Set model\.checkpoint"):
        build_model("edgetam")  # the released name, offline and without weights
    with pytest.raises(SamtuneError, match="multiple of 32"):
        build_model("edgetam-tiny-random", image_size=80)


# --- memory propagation -----------------------------------------------------------------------------


def test_video_model_holds_the_merged_image_weights_and_tracks_through_a_volume(tiny):
    from samtune.adapters.export import merge_model
    from samtune.finetune.predict.propagation import MemoryTracker, SlicePrompt, make_propagator

    wrapped = apply_lora(tiny, FAMILY, LoraSection(preset="encoder_mlp"))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    merged = merge_model(wrapped)  # what samtune predict runs (finetune.runtime.inference_model merges LoRA first)
    tracker, way = make_propagator("auto", merged, FAMILY, get_variant("edgetam-tiny-random"), None, FAMILY.make_transform(SIZE), torch.device("cpu"))
    assert way == "memory" and isinstance(tracker, MemoryTracker) and type(tracker.video_model).__name__ == "EdgeTamVideoModel"
    video, image = tracker.video_model.state_dict(), merged.state_dict()
    assert all(torch.equal(video[k], image[k]) for k in image)  # every image weight, LoRA merged
    assert any(k.startswith("spatial_perceiver.") for k in video)
    order, forward = [], tracker.video_model.forward

    def spy(*args, **kwargs):
        order.append(kwargs["frame_idx"])
        return forward(*args, **kwargs)

    tracker.video_model.forward = spy
    slices = np.random.default_rng(0).integers(0, 255, (5, 48, 40), dtype=np.uint8)
    volume = tracker(lambda z: slices[z], 5, SlicePrompt(1, box=np.array([8.0, 10, 30, 40])))
    assert volume.shape == (5, 48, 40) and volume.dtype == bool and order == [1, 1, 2, 3, 4, 1, 0]


def test_the_tracker_of_a_prediction_model_segments_the_prompted_slice_as_the_image_model_does(tiny, tracked_slices):
    """``samtune predict`` hands over its inference model (BatchNorm folded into RepViT's convolutions,
    channels-last): the tracker runs those very modules, and its prompted slice is the image model's mask."""
    from samtune.finetune.predict.propagation import make_propagator
    from samtune.finetune.runtime import inference_model

    ready = inference_model(randomise(tiny), FAMILY)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ready.modules())
    transform = FAMILY.make_transform(SIZE)
    tracker, _ = make_propagator("memory", ready, FAMILY, get_variant("edgetam-tiny-random"), None, transform, torch.device("cpu"))
    assert tracker.video_model.vision_encoder is ready.vision_encoder
    tracked, image_mask = tracked_slices(tracker, tiny, FAMILY, transform)
    assert image_mask.abs().max() > 1e-2
    torch.testing.assert_close(tracked[1], image_mask, atol=1e-4, rtol=0)


def test_memory_modules_come_from_a_folder_saved_from_the_video_model(tiny, tmp_path):
    from transformers import EdgeTamVideoModel

    from samtune.adapters.edgetam_config import TINY_MEMORY

    reference = video_model_from(build_model("edgetam-tiny-random", image_size=SIZE, init_seed=3), **TINY_MEMORY)
    reference.save_pretrained(tmp_path / "video")
    video = FAMILY.video_model(tiny, get_variant("edgetam-tiny-random"), str(tmp_path / "video"))
    assert isinstance(video, EdgeTamVideoModel) and video.config.memory_attention_num_layers == 1  # the folder's memory config
    ours, theirs, image = video.state_dict(), reference.state_dict(), tiny.state_dict()
    memory = [k for k in ours if is_video_only_edgetam(k)]
    assert memory and all(torch.equal(ours[k], theirs[k]) for k in memory)
    assert all(torch.equal(ours[k], image[k]) for k in image)
    loaded = build_model("edgetam-tiny-random", tmp_path / "video", image_size=SIZE)  # a video folder as the image model
    assert all(torch.equal(loaded.state_dict()[k], reference.state_dict()[k]) for k in loaded.state_dict())
    FAMILY.export(tiny, "hf", tmp_path / "image")  # an image-model folder has no memory: refused, not random
    with pytest.raises(SamtuneError, match="holds no memory modules"):
        FAMILY.video_model(tiny, get_variant("edgetam-tiny-random"), str(tmp_path / "image"))
