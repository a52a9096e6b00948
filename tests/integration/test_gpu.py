"""GPU smoke tests (marker `gpu`, not in the default selection: `pytest -m gpu` on a CUDA machine)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_tiny_training_on_cuda(tmp_path):
    import yaml

    from samtune.datasets.synthetic import generate_ct_phantom
    from samtune.finetune.cli import main

    root = generate_ct_phantom(tmp_path / "data", n_cases=3, shape=(48, 48, 12))
    recipe = {
        "data": {"kind": "nifti", "root": str(root), "val_fraction": 0.34},
        "model": {"name": "tiny", "image_size": 64},
        "train": {"steps": 20, "batch_size": 4, "eval_every": 10, "device": "cuda"},
        "prompts": {"corrective_rounds": 2, "positive_points": 1, "box_probability": 0.5},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["-q", "train", str(path)]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and math.isfinite(metrics["miou"])
    assert len(metrics["prompted"]["by_round"]) == 3


def test_gradient_checkpointing_saves_memory_on_vit_b():
    from transformers import SamConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    from samtune.adapters.lora import prepare_trainable
    from samtune.adapters.registry import family_of
    from samtune.finetune.recipe import LoraSection

    def peak_bytes(checkpointing: bool) -> tuple[float, int]:
        torch.manual_seed(0)
        config = SamConfig(vision_config=SamVisionConfig(initializer_range=0.02), prompt_encoder_config=SamPromptEncoderConfig())
        base = SamModel(config)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = prepare_trainable(base, family_of("sam-vit-base"), "lora", LoraSection()).cuda().train()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        pixels = torch.randn(2, 3, 1024, 1024, device="cuda")
        boxes = torch.tensor([[[100.0, 100.0, 600.0, 700.0]]] * 2, device="cuda")
        out = model(pixel_values=pixels, input_boxes=boxes, multimask_output=False)
        loss = out.pred_masks.float().square().mean()
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        del model, base, out
        torch.cuda.empty_cache()
        return loss.item(), peak

    loss_plain, plain = peak_bytes(False)
    loss_ckpt, ckpt = peak_bytes(True)
    print(f"ViT-B LoRA step, batch 2 @ 1024: peak {plain / 2**30:.2f} GiB plain, {ckpt / 2**30:.2f} GiB checkpointed")
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-4)
    assert ckpt < 0.7 * plain
