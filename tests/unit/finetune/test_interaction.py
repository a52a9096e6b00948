"""finetune/interaction.py: prompt rounds (corrective clicks, mask-only rounds) and the padding-aware mask IoU."""

from __future__ import annotations

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
