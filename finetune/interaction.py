"""Prompt rounds on one batch, shared by training and evaluation.

SAM's interactive training scheme (Kirillov et al., 2023): an initial box or point prompt, then
``corrective_rounds`` rounds that each add one click sampled from the error region of the previous
prediction, then ``mask_only_rounds`` rounds with no new click; from the second round on, the
previous low-res logits are given as the mask prompt. A single initial click is ambiguous, so that
round predicts three masks and only the best one (lowest loss in training, highest predicted IoU in
evaluation) counts. The image encoder runs once per image; decoder rounds reuse its embeddings.

``class_correction_rounds``: the same corrective rounds for the automatic path
(``automatic.corrective_rounds``): every class mask of a batch is corrected by clicks from its
error region, each round decoding the class prompt + the clicks so far + the previous low-res
logits as mask prompt (``decode_prompts(class_tokens=...)``), what ``samtune.finetune.corrections``
does for a user's clicks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from samtune.adapters.family import CLASS_PROMPTS, ImageEmbeddings, ModelFamily
from samtune.datasets import sample as S
from samtune.datasets.prompts import sample_error_clicks
from samtune.finetune.recipe import PromptsSection


def total_rounds(prompts: PromptsSection) -> int:
    """The initial prompt, the corrective clicks, then the mask-only rounds."""
    return 1 + prompts.corrective_rounds + prompts.mask_only_rounds


def valid_region(meta: list[dict], per_image: int, image_size: int, device) -> torch.Tensor:
    """(B·P)×S×S bool: the resized image area, without the padding."""
    valid = torch.zeros(len(meta), image_size, image_size, dtype=torch.bool, device=device)
    for i, m in enumerate(meta):
        h, w = m["resized_size"]
        valid[i, :h, :w] = True
    return valid.repeat_interleave(per_image, 0)


def mask_iou(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """N×S×S bool masks -> N IoU within ``valid`` (1 where both are empty)."""
    inter = (pred & target & valid).flatten(1).sum(1).float()
    union = ((pred | target) & valid).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def run_rounds(
    model,
    family: ModelFamily,
    batch: dict,
    prompts: PromptsSection,
    image_size: int,
    use_box: bool,
    generator: torch.Generator,
    mask_loss=None,
    iou_weight: float = 0.0,
    embeddings: ImageEmbeddings | None = None,
    low_res_loss: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Returns the chosen S×S logits of every round ((B·P)×1×S×S each) and, when ``mask_loss``
    (reduction="none") is given, the loss averaged over rounds. ``embeddings``: the batch's image
    embeddings (one row per image) when already known (the embedding cache); else the encoder runs.
    ``low_res_loss`` (``loss.resolution: low_res``): the loss compares the decoder's s×s logits
    with the ground truth area-averaged to s×s (soft targets at object borders) instead of every
    mask upsampled to S×S: 16× fewer pixels at 1024 px, and only the chosen mask is upsampled (no
    gradient) for the IoU target and the next click."""
    device = batch[S.IMAGE].device
    per_image = batch[S.MASKS].shape[1]
    if embeddings is None:
        embeddings = family.encode_images(model, batch[S.IMAGE])
    embeddings = embeddings.repeat_interleave(per_image)
    target = batch[S.MASKS].flatten(0, 1)[:, None]  # N×1×S×S
    target_bool = target[:, 0] > 0.5
    valid = valid_region(batch[S.META], per_image, image_size, device)
    boxes = batch[S.BOXES].flatten(0, 1) if use_box else None
    if use_box:
        points = torch.zeros(len(target), 0, 2, device=device)
        labels = torch.zeros(len(target), 0, dtype=torch.long, device=device)
    else:
        points, labels = batch[S.POINTS].flatten(0, 1), batch[S.POINT_LABELS].flatten(0, 1)
    ambiguous = not use_box and points.shape[1] == 1
    target_low = None  # N×1×s×s, made at the first round once s is known
    previous = None
    outputs, losses = [], []
    for round_index in range(total_rounds(prompts)):
        multimask = ambiguous and round_index == 0
        low_res, iou_pred = family.decode_prompts(
            model, embeddings, boxes, points, labels,
            mask_inputs=previous if prompts.feed_mask else None, multimask_output=multimask,
        )  # fmt: skip
        if mask_loss is not None and low_res_loss:
            if target_low is None:
                target_low = F.interpolate(target.float(), size=low_res.shape[-2:], mode="area")
            per_mask = mask_loss(low_res.float(), target_low.expand_as(low_res)).flatten(2).mean(2)  # N×M
            choice = per_mask.argmin(1, keepdim=True)
            with torch.no_grad():
                chosen_low = low_res.gather(1, choice[:, :, None, None].expand(-1, 1, *low_res.shape[2:]))
                chosen = family.upscale_logits(chosen_low.float(), image_size)  # N×1×S×S
        else:
            logits = family.upscale_logits(low_res.float(), image_size)  # N×M×S×S, float32 for the loss even under autocast
            if mask_loss is not None:
                per_mask = mask_loss(logits, target.expand_as(logits)).flatten(2).mean(2)  # N×M
                choice = per_mask.argmin(1, keepdim=True)
            else:
                choice = iou_pred.argmax(1, keepdim=True)
            chosen = logits.gather(1, choice[:, :, None, None].expand(-1, 1, *logits.shape[2:]))  # N×1×S×S
        index = choice[:, :, None, None]
        outputs.append(chosen)
        if mask_loss is not None:
            actual_iou = mask_iou(chosen[:, 0].detach() > 0, target_bool, valid)
            iou_loss = F.mse_loss(iou_pred.gather(1, choice)[:, 0].float(), actual_iou)
            losses.append(per_mask.gather(1, choice).mean() + iou_weight * iou_loss)
        previous = low_res.gather(1, index.expand(-1, 1, *low_res.shape[2:])).detach()
        if round_index < prompts.corrective_rounds:
            click, click_label = sample_error_clicks(chosen[:, 0].detach() > 0, target_bool, valid, generator)
            points = torch.cat([points, click.to(points.dtype)], dim=1)
            labels = torch.cat([labels, click_label], dim=1)
    loss = torch.stack(losses).mean() if losses else None
    return outputs, loss


def class_correction_rounds(
    model,
    family: ModelFamily,
    embeddings: ImageEmbeddings,
    low_res: torch.Tensor,
    labels: torch.Tensor,
    rounds: int,
    generator: torch.Generator,
    loss_fn,
    low_res_loss: bool = False,
) -> torch.Tensor:
    """The automatic path's corrective rounds on one batch: ``low_res`` B×K×s×s class logits (of
    ``embeddings``, one row per image), ``labels`` B×S×S class indexes (K background, 255 ignored
    or padding). Each round samples one click per class mask from its error region (no click where
    it has none), then decodes class prompt k + every click so far + the previous (detached) logits
    as mask prompt; returns ``loss_fn`` (``AutomaticLoss``) on the refined B×K masks, averaged over
    rounds (s×s logits with ``low_res_loss``, else upscaled to S×S)."""
    batch, k = low_res.shape[:2]
    size = labels.shape[-1]
    rows = embeddings.repeat_interleave(k)  # (B·K) rows: image b, class k at b·K + k
    tokens = getattr(model, CLASS_PROMPTS)().repeat(batch, 1, 1)  # (B·K)×T×C
    target = (labels[:, None] == torch.arange(k, device=labels.device).view(1, k, 1, 1)).flatten(0, 1)  # (B·K)×S×S
    valid = (labels != 255).repeat_interleave(k, 0)
    previous = low_res.flatten(0, 1)[:, None]  # (B·K)×1×s×s
    points = torch.zeros(len(target), 0, 2, device=labels.device)
    clicks = torch.zeros(len(target), 0, dtype=torch.long, device=labels.device)
    losses = []
    for _ in range(rounds):
        with torch.no_grad():
            pred = family.upscale_logits(previous.float(), size)[:, 0] > 0
            click, click_label = sample_error_clicks(pred, target, valid, generator)
        points = torch.cat([points, click.to(points.dtype)], dim=1)
        clicks = torch.cat([clicks, click_label], dim=1)
        refined, _ = family.decode_prompts(model, rows, None, points, clicks, mask_inputs=previous.detach(), class_tokens=tokens)
        logits = refined[:, 0].float().unflatten(0, (batch, k))  # B×K×s×s
        losses.append(loss_fn(logits if low_res_loss else family.upscale_logits(logits, size), labels))
        previous = refined[:, :1].detach()
    return torch.stack(losses).mean()
