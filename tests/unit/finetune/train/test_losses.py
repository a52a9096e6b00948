"""finetune/train/losses.py: the per-mask Dice + focal loss used to pick the best of SAM's multimask outputs."""

from __future__ import annotations

import torch

from samtune.finetune.train.losses import make_mask_loss


def test_loss_is_per_mask_and_ranks_the_better_mask_lower():
    target = torch.zeros(1, 2, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    logits = torch.full((1, 2, 8, 8), -8.0)
    logits[0, 0, 2:6, 2:6] = 8.0  # mask 0 right, mask 1 predicts nothing
    loss = make_mask_loss(1.0, 20.0)(logits, target)
    assert loss.shape == (1, 2, 8, 8)  # reduction "none": the caller reduces per mask
    per_mask = loss.mean(dim=(2, 3))[0]
    assert per_mask[0] < 0.01 and per_mask[1] > 0.5
    dice_only = make_mask_loss(1.0, 0.0)(logits, target).mean(dim=(2, 3))[0]
    assert dice_only[1] > 0.9  # 1 - Dice with no overlap (up to MONAI's smoothing)


def test_automatic_loss_ignores_255_and_prefers_the_right_classes():
    from samtune.finetune.train.losses import AutomaticLoss

    labels = torch.full((1, 8, 8), 2, dtype=torch.uint8)  # K = 2 classes; 2 = background
    labels[0, :4, :4] = 0
    labels[0, 4:, 4:] = 1
    labels[0, :, 7] = 255
    target = torch.stack([(labels == k).float() for k in range(2)], 1)
    good = (target * 2 - 1) * 8  # confident and right
    bad = -good
    loss = AutomaticLoss(1.0, 20.0)
    assert loss(good, labels) < 0.05 < loss(bad, labels)
    changed = good.clone()
    changed[..., 7] = torch.randn(1, 2, 8)  # ignored column: anything goes
    torch.testing.assert_close(loss(changed, labels), loss(good, labels))
    # class weights: an error on class 1 only counts for less when class 1 weighs less
    wrong_1 = good.clone()
    wrong_1[:, 1] = -wrong_1[:, 1]
    light = AutomaticLoss(1.0, 20.0, torch.tensor([1.0, 0.1]))
    assert light(wrong_1, labels) < loss(wrong_1, labels)


def test_automatic_loss_at_low_res_equals_the_full_size_loss_on_block_labels():
    """loss.resolution: low_res: labels constant over each 4×4 block (255 blocks too) and logits
    constant over the same blocks give the loss of the full-size maps (Dice is a ratio of sums,
    focal a mean over counted pixels; smoothing made negligible)."""
    from samtune.finetune.train.losses import AutomaticLoss

    torch.manual_seed(0)
    low_labels = torch.randint(0, 3, (2, 8, 8), dtype=torch.uint8)
    low_labels[0, 0, :3] = 255
    labels = low_labels.repeat_interleave(4, 1).repeat_interleave(4, 2)  # 2×32×32
    low_logits = torch.randn(2, 2, 8, 8) * 3
    logits = low_logits.repeat_interleave(4, 2).repeat_interleave(4, 3)
    loss = AutomaticLoss(1.0, 20.0, smooth=1e-6)
    torch.testing.assert_close(loss(low_logits, labels), loss(logits, labels), rtol=1e-5, atol=1e-6)
    # a half-ignored block counts half, a block split between classes targets their shares
    mixed = labels.clone()
    mixed[0, :2, 16:20] = 255
    assert torch.isfinite(loss(low_logits, mixed)) and not torch.allclose(loss(low_logits, mixed), loss(low_logits, labels))
    mixed = labels.clone()
    mixed[1, :2, :4] = (int(labels[1, 0, 0]) + 1) % 3
    assert torch.isfinite(loss(low_logits, mixed)) and not torch.allclose(loss(low_logits, mixed), loss(low_logits, labels))


def test_bce_term_adds_the_weighted_binary_cross_entropy():
    """loss.bce_weight (SAMed's 0.2 CE + 0.8 Dice): the prompted loss gains w × BCE per pixel; the
    automatic loss gains w × BCE averaged over the counted pixels, per class."""
    import torch.nn.functional as F

    from samtune.finetune.train.losses import AutomaticLoss, make_mask_loss

    torch.manual_seed(0)
    logits, target = torch.randn(3, 2, 8, 8), (torch.rand(3, 2, 8, 8) > 0.5).float()
    expected = make_mask_loss(0.8, 0.0)(logits, target) + 0.2 * F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    torch.testing.assert_close(make_mask_loss(0.8, 0.0, 0.2)(logits, target), expected)

    labels = torch.randint(0, 3, (2, 8, 8), dtype=torch.uint8)
    labels[0, 0] = 255
    class_logits = torch.randn(2, 2, 8, 8)
    valid = (labels != 255).unsqueeze(1).float()
    onehot = torch.stack([(labels == k).float() for k in range(2)], 1)
    bce = (F.binary_cross_entropy_with_logits(class_logits, onehot, reduction="none") * valid).sum((0, 2, 3)) / valid.sum()
    with_bce = AutomaticLoss(0.8, 0.0, bce_weight=0.2)(class_logits, labels)
    torch.testing.assert_close(with_bce, AutomaticLoss(0.8, 0.0)(class_logits, labels) + 0.2 * bce.mean())


def test_class_targets_count_what_area_averaging_the_one_hot_labels_gives():
    """The low-res targets (one bincount over the labels) are the area average of the one-hot
    labels over each block, and the counted share that of the not-ignored mask; at the labels' own
    size they are the one-hot labels and a 0/1 mask; a size that does not divide the labels falls
    back to area interpolation."""
    import torch.nn.functional as F

    from samtune.finetune.train.losses import class_targets

    torch.manual_seed(0)
    k = 3
    labels = torch.randint(0, k + 1, (2, 32, 24), dtype=torch.uint8)  # K = 3 background
    labels[0, :5, :7] = 255
    labels[1, 8:12, 4:8] = 255  # one whole block ignored
    onehot = torch.stack([(labels == c).float() for c in range(k)], 1)
    valid = (labels != 255).unsqueeze(1).float()
    for size in ((8, 6), (16, 12), (10, 7)):
        target, counted = class_targets(labels, k, size)
        area_valid = F.interpolate(valid, size=size, mode="area")
        expected = F.interpolate(onehot * valid, size=size, mode="area") / area_valid.clamp(min=1e-6)
        torch.testing.assert_close(counted, area_valid)
        torch.testing.assert_close(target, expected)
    target, counted = class_targets(labels, k, (32, 24))
    assert torch.equal(target, onehot) and torch.equal(counted, valid)
    target, counted = class_targets(labels, k, (8, 6))
    assert counted[1, 0, 2, 1] == 0 and target[1, :, 2, 1].abs().sum() == 0  # the ignored block: no weight, no target


def test_sigmoid_focal_is_monai_focal_loss_with_soft_targets():
    import torch.nn.functional as F
    from monai.losses import FocalLoss

    from samtune.finetune.train.losses import sigmoid_focal

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8) * 6
    for target in ((torch.rand(2, 3, 8, 8) > 0.5).float(), torch.rand(2, 3, 8, 8)):
        focal, bce = sigmoid_focal(logits, target)
        torch.testing.assert_close(focal, FocalLoss(gamma=2.0, use_softmax=False, reduction="none")(logits, target), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bce, F.binary_cross_entropy_with_logits(logits, target, reduction="none"))
