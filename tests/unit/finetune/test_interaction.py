"""finetune/interaction.py: prompt rounds (corrective clicks, mask-only rounds) and the padding-aware mask IoU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samtune.adapters.registry import build_sam
from samtune.datasets import sample as S
from samtune.datasets.prompted import PromptedDataset
from samtune.adapters.family import get_family
from samtune.adapters.preprocess import LongestSideTransform
from samtune.finetune.interaction import mask_iou, run_rounds
from samtune.finetune.recipe import PromptsSection
from samtune.finetune.train.losses import make_mask_loss


@pytest.mark.parametrize("use_box", [True, False])
def test_rounds_add_one_click_each_and_train_end_to_end(use_box, blob_source):
    model = build_sam("tiny", image_size=64)
    settings = PromptsSection(positive_points=1, box_probability=0.5)
    ds = PromptedDataset(blob_source(), LongestSideTransform(64), settings, min_pixels=10, training=True, seed=0, per_image=2)
    batch = S.collate_samples([ds[0], ds[1]])
    rounds = PromptsSection(corrective_rounds=2, mask_only_rounds=1)
    calls = []
    original = model.forward

    def spy(**kwargs):
        points = kwargs.get("input_points")
        calls.append((0 if points is None else points.shape[2], kwargs.get("input_masks") is not None, kwargs["multimask_output"]))
        return original(**kwargs)

    model.forward = spy
    outputs, loss = run_rounds(model, get_family("sam"), batch, rounds, 64, use_box, torch.Generator().manual_seed(0), make_mask_loss(1.0, 20.0), 1.0)
    first = 0 if use_box else 1
    assert [c[0] for c in calls] == [first, first + 1, first + 2, first + 2]  # clicks: +1, +1, then none
    assert [c[1] for c in calls] == [False, True, True, True]  # previous logits fed from round 2 on
    assert calls[0][2] == (not use_box)  # a single click is ambiguous: multimask in round 1 only
    assert len(outputs) == 4 and outputs[0].shape == (4, 1, 64, 64)
    loss.backward()
    assert torch.isfinite(loss) and model.mask_decoder.iou_prediction_head.proj_out.weight.grad.abs().sum() > 0


def test_low_res_loss_trains_through_the_decoder_output_and_keeps_the_rounds(blob_source):
    """loss.resolution: low_res: same rounds and full-size outputs, a loss on the s×s logits (the
    ground truth area-averaged), gradients reaching the decoder; close to the full-size loss."""
    model = build_sam("tiny", image_size=64)
    ds = PromptedDataset(blob_source(), LongestSideTransform(64), PromptsSection(), min_pixels=10, training=True, seed=0, per_image=2)
    batch = S.collate_samples([ds[0], ds[1]])
    rounds = PromptsSection(corrective_rounds=1)
    args = (model, get_family("sam"), batch, rounds, 64, True)
    loss_fn = make_mask_loss(1.0, 20.0)
    outputs, low = run_rounds(*args, torch.Generator().manual_seed(0), loss_fn, 1.0, low_res_loss=True)
    _, full = run_rounds(*args, torch.Generator().manual_seed(0), loss_fn, 1.0)
    assert len(outputs) == 2 and outputs[0].shape == (4, 1, 64, 64) and not outputs[0].requires_grad
    assert torch.isfinite(low) and abs(low.item() - full.item()) < 0.25 * full.item()
    low.backward()
    assert model.mask_decoder.upscale_conv1.weight.grad.abs().sum() > 0


def test_mask_iou_ignores_padding():
    pred = torch.ones(1, 4, 4, dtype=torch.bool)
    target = torch.zeros(1, 4, 4, dtype=torch.bool)
    target[0, :2, :2] = True
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[0, :2, :2] = True
    assert mask_iou(pred, target, valid).item() == 1.0
    assert mask_iou(pred, target, torch.ones_like(valid)).item() == 0.25


def semantic_batch() -> dict:
    """Two 64 px images: a bright square of class 0 and a grey bar of class 1 (K = 2 background)."""
    from samtune.datasets import semantic as SEM

    image = torch.full((2, 3, 64, 64), -1.0)
    labels = torch.full((2, 64, 64), 2, dtype=torch.uint8)
    for i, (y, x) in enumerate([(10, 12), (30, 20)]):
        image[i, :, y : y + 20, x : x + 20] = 1.5
        labels[i, y : y + 20, x : x + 20] = 0
        image[i, :, 50:56, 5:40] = 0.3
        labels[i, 50:56, 5:40] = 1
    labels[1, :, 60:] = 255  # padding
    return {SEM.IMAGE: image, SEM.LABELS: labels}


def automatic_setup(rounds: int):
    from samtune.adapters.lora import prepare_trainable
    from samtune.finetune.recipe import validate_recipe
    from samtune.finetune.train.losses import AutomaticLoss
    from samtune.finetune.train.step import build_optimization

    torch.manual_seed(0)
    recipe = validate_recipe({"task": "both", "data": {"kind": "nifti", "root": "-"}, "automatic": {"corrective_rounds": rounds},
                              "train": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"}})  # fmt: skip
    family = get_family("sam")
    base = build_sam("tiny", image_size=64)
    family.add_class_prompts(base, 2, 2, seed=0)
    model = prepare_trainable(base, family, "lora", recipe.adapter.lora).train()
    return model, family, recipe, build_optimization(model, family, recipe, {"automatic": AutomaticLoss(1.0, 20.0)})


def test_class_correction_rounds_decode_class_prompt_clicks_and_previous_logits():
    """``automatic.corrective_rounds``: each round one click per class mask of every image, the class
    prompt of that mask, the clicks so far and the previous logits as mask prompt."""
    from samtune.finetune.automatic import class_low_res
    from samtune.finetune.interaction import class_correction_rounds
    from samtune.finetune.train.losses import AutomaticLoss

    model, family, _, _ = automatic_setup(2)
    batch = semantic_batch()
    calls = []
    decode = family.decode_prompts

    def spy(model, embeddings, boxes=None, points=None, point_labels=None, mask_inputs=None, multimask_output=False, class_tokens=None):
        calls.append((tuple(points.shape), tuple(mask_inputs.shape), tuple(class_tokens.shape), point_labels.clone()))
        return decode(model, embeddings, boxes, points, point_labels, mask_inputs, multimask_output, class_tokens)

    family.decode_prompts = spy  # the family object is shared: restored below
    try:
        embeddings = family.encode_images(model, batch["image"])
        low_res = class_low_res(model, family, batch["image"], embeddings=embeddings).detach()
        loss = class_correction_rounds(model, family, embeddings, low_res, batch["labels"], 2, torch.Generator().manual_seed(0), AutomaticLoss(1.0, 20.0))
    finally:
        del family.decode_prompts
    s = low_res.shape[-1]
    assert [c[:3] for c in calls] == [((4, 1, 2), (4, 1, s, s), (4, 2, 64)), ((4, 2, 2), (4, 1, s, s), (4, 2, 64))]  # B·K rows
    assert set(calls[-1][3].flatten().tolist()) <= {-1, 0, 1}
    loss.backward()
    tokens = model.class_prompts.modules_to_save["default"].tokens
    assert torch.isfinite(loss) and tokens.grad is not None and tokens.grad.abs().sum() > 0


def test_two_training_steps_with_corrective_rounds_add_their_loss_and_change_the_weights():
    from samtune.finetune.train.step import MicroBatch, automatic_loss, optimizer_step

    model, family, recipe, opt = automatic_setup(1)
    _, _, plain, _ = automatic_setup(0)
    batch = semantic_batch()
    with torch.no_grad():
        without = automatic_loss(model, family, batch, plain, opt.loss_fns["automatic"])
        with_rounds = automatic_loss(model, family, batch, recipe, opt.loss_fns["automatic"], click_generator=torch.Generator().manual_seed(0))
    assert with_rounds > without  # the refined masks' loss is added to the class loss
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    clicks = torch.Generator().manual_seed(0)
    for n in (1, 2):
        result = optimizer_step(opt, lambda: MicroBatch(batch, None, 4), "automatic", True, clicks, n)
        assert np.isfinite(result.loss)
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, start[n])]
    assert any("class_prompts" in n for n in changed) and any("lora_" in n for n in changed)
    assert not torch.equal(clicks.get_state(), torch.Generator().manual_seed(0).get_state())  # clicks were drawn
