"""finetune/checkpoints.py: save/load round trips (peft adapter and whole model), atomic replacement."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from samtune import SamtuneError
from samtune.adapters.registry import build_sam, family_of
from samtune.finetune.checkpoints import load_checkpoint, save_checkpoint

SIZE = 64


def _tiny():
    return build_sam("tiny", image_size=SIZE)


def _outputs(model) -> torch.Tensor:
    pixels = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(pixel_values=pixels, input_boxes=torch.tensor([[[4.0, 6.0, 40.0, 50.0]]]), multimask_output=False).pred_masks


def _adapter():
    model = get_peft_model(_tiny(), LoraConfig(r=2, lora_alpha=2, target_modules=r"vision_encoder\.layers\.\d+\.attn\.qkv"))
    with torch.no_grad():  # lora_B starts at zero: make the adapter change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def test_adapter_round_trip(tmp_path):
    model = _adapter()
    save_checkpoint(model, tmp_path / "best", "model:\n  name: tiny\n", {"step": 3})
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file() and (tmp_path / "best" / "trainer_state.json").is_file()
    loaded = load_checkpoint(tmp_path / "best", family_of("tiny"), _tiny).eval()
    torch.testing.assert_close(_outputs(loaded), _outputs(model))
    assert not torch.allclose(_outputs(loaded), _outputs(_tiny()))  # the adapter really was loaded


def test_whole_model_round_trip_and_atomic_overwrite(tmp_path, monkeypatch):
    model = _tiny()
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.proj_out.bias.add_(1.0)
    save_checkpoint(model, tmp_path / "last", "", {"step": 1})
    loaded = load_checkpoint(tmp_path / "last", family_of("tiny"), _tiny).eval()
    torch.testing.assert_close(_outputs(loaded), _outputs(model))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, tmp_path / "last", "", {"step": 2})
    assert (tmp_path / "last" / "trainer_state.json").read_text().count('"step": 1') == 1  # the good one stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary leftovers


def test_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(SamtuneError, match="neither a peft adapter folder"):
        load_checkpoint(tmp_path, family_of("tiny"), _tiny)


def test_adapter_on_another_base_model_is_a_short_error(tmp_path):
    from transformers import SamModel

    from samtune.adapters.sam import make_tiny_config

    save_checkpoint(_adapter(), tmp_path / "best", "model:\n  name: tiny\n  checkpoint: null\n  image_size: 64\n  init_seed: 0\n", {})
    config = make_tiny_config(SIZE)
    config.vision_config.hidden_size, config.vision_config.mlp_dim = 48, 192  # another width: every shape differs

    def other_base():
        return SamModel(config)

    keys = {"name": "tiny-wide", "checkpoint": None, "image_size": 64, "init_seed": 0}
    with pytest.raises(SamtuneError) as info:
        load_checkpoint(tmp_path / "best", family_of("tiny"), other_base, keys)
    message = str(info.value)
    assert len(message) < 600, message  # peft's own size-mismatch dump runs to tens of thousands of characters
    assert "trained on the base model.name='tiny'" in message and "the recipe builds model.name='tiny-wide'" in message
    assert str(tmp_path / "best" / "recipe.yaml") in message


def test_adapter_on_a_base_of_the_same_shapes_but_other_weights_is_refused(tmp_path, caplog):
    """Every tiny size and seed has the same shapes: peft would load silently onto the wrong base."""
    recipe_yaml = "model:\n  name: tiny\n  checkpoint: null\n  image_size: 64\n  init_seed: 0\n"
    save_checkpoint(_adapter(), tmp_path / "best", recipe_yaml, {})
    keys = {"name": "tiny", "checkpoint": None, "image_size": 64, "init_seed": 0}
    with pytest.raises(SamtuneError, match="model.init_seed=0.*the recipe builds.*model.init_seed=1"):
        load_checkpoint(tmp_path / "best", family_of("tiny"), _tiny, {**keys, "init_seed": 1})
    with caplog.at_level("WARNING"):
        load_checkpoint(tmp_path / "best", family_of("tiny"), _tiny, {**keys, "image_size": 128})
    assert "trained at model.image_size=64; the recipe runs it at 128" in caplog.text
    load_checkpoint(tmp_path / "best", family_of("tiny"), _tiny, keys)  # the same base: loads


CLASSES = {"task": "both", "tokens": 2, "label_space": {"ids": [1, 2, 3], "names": ["a", "b", "c"], "background_id": 0, "file_ids": [1, 2, 3], "file_background": 0}}


def test_automatic_checkpoints_keep_their_class_prompts(tmp_path):
    """Adapter folders (peft modules_to_save) and whole-model folders (decoder_only) both bring
    back the trained class prompts; classes.json tells the loader to add them to the base."""
    from samtune.adapters.lora import prepare_trainable
    from samtune.finetune.checkpoints import read_classes
    from samtune.finetune.recipe import LoraSection

    family = family_of("tiny")
    for mode in ("lora", "decoder_only"):
        base = _tiny()
        family.add_class_prompts(base, 3, 2, seed=0)
        model = prepare_trainable(base, family, mode, LoraSection())
        tokens = model.class_prompts.modules_to_save["default"].tokens if mode == "lora" else model.class_prompts.tokens
        assert tokens.requires_grad
        with torch.no_grad():
            tokens.add_(0.5)
        save_checkpoint(model, tmp_path / mode, "", {"step": 1}, classes=CLASSES)
        assert read_classes(tmp_path / mode) == CLASSES
        loaded = load_checkpoint(tmp_path / mode, family, _tiny)
        torch.testing.assert_close(loaded.class_prompts(), model.class_prompts())


def test_promptable_checkpoint_gets_no_class_prompts_and_a_bad_classes_file_is_named(tmp_path):
    from samtune.finetune.automatic import has_class_prompts

    save_checkpoint(_adapter(), tmp_path / "p", "", {"step": 1}, classes={**CLASSES, "task": "promptable", "tokens": 0})
    assert not has_class_prompts(load_checkpoint(tmp_path / "p", family_of("tiny"), _tiny))
    (tmp_path / "p" / "classes.json").write_text("{not json")
    with pytest.raises(SamtuneError, match="classes.json"):
        load_checkpoint(tmp_path / "p", family_of("tiny"), _tiny)
