"""Pretrain the whole ``tiny`` SAM on generated generic shapes: the weights of ``tiny-pretrained``.

Why: the offline demo fine-tunes LoRA on a frozen image encoder; with the random ``tiny`` model
that encoder is noise. This script gives the tiny architecture (``make_tiny_config(128)``, built
through the registry's ``tiny`` variant with init_seed 0) SAM-style promptable-segmentation
pretraining on images that have nothing to do with any dataset samtune ships demos for (no CT
phantoms, no street scenes): random ellipses, rotated rectangles, polygons, blobs, rings and
strokes, each with its own texture (flat, pixel noise, stripes, gradients, checkerboards, smooth
noise), on textured grey or colour backgrounds, occluding and touching one another, from a few
pixels to most of the image. Every visible shape is an instance.

Training is samtune's own prompted path: batches in the sample format (samtune.datasets.sample),
box prompts with jitter or one positive point (``box_probability`` 0.5; a single point predicts
SAM's three masks and the best one counts), ``run_rounds`` with ``make_mask_loss`` (Dice + 20 ×
focal) plus the IoU head's MSE. Every weight trains except the prompt encoder's random Fourier
matrix, which official SAM keeps as a fixed buffer (PositionEmbeddingRandom).

Data is deterministic: training batch ``t`` draws only from ``default_rng([seed, 0, t])``, held-out
image ``i`` from ``default_rng([seed, 1, i])``.

    .venv/bin/python benchmarks/pretrain_tiny.py --steps 4000 --out adapters/pretrained/tiny_shapes

writes ``config.json`` + ``model.safetensors`` (loaded by ``SamModel.from_pretrained``) and
``pretrain.yaml`` (the settings used, the loss curve, the final training loss and the held-out
mIoU with box prompts) into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

SIZE = 128
SHAPES = ("ellipse", "rectangle", "polygon", "blob", "ring", "stroke")
SHAPE_P = (0.24, 0.18, 0.2, 0.22, 0.08, 0.08)
TEXTURES = ("flat", "noise", "stripes", "gradient", "checker", "smooth")
MIN_VISIBLE = 16  # px: smaller visible parts are not objects
MIN_RADIUS = 6.0  # px at full difficulty: the tiny model's tokens are 8 px wide, smaller shapes fall inside one token
MIN_VISIBLE_FRACTION = 0.2  # of the shape as drawn: mostly hidden shapes are not objects


# ------------------------------------------------------------------ generated images
def _colour(rng: np.random.Generator, grey: bool) -> np.ndarray:
    return np.full(3, rng.uniform(0, 255)) if grey else rng.uniform(0, 255, 3)


def texture(rng: np.random.Generator, size: int, grey: bool, near: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A size×size×3 float32 texture in about 0..255 and its main colour. ``near``: a colour the
    texture's main colour stays close to (low-contrast objects)."""
    c1 = _colour(rng, grey) if near is None else np.clip(near + (rng.normal(0, 25) if grey else rng.normal(0, 25, 3)), 0, 255)
    c2 = _colour(rng, grey) if rng.random() < 0.5 else np.clip(c1 + (rng.normal(0, 50) if grey else rng.normal(0, 50, 3)), 0, 255)
    c1, c2 = c1.astype(np.float32), c2.astype(np.float32)
    kind = TEXTURES[rng.choice(len(TEXTURES), p=(0.25, 0.15, 0.15, 0.15, 0.12, 0.18))]
    theta = rng.uniform(0, np.pi)
    weight = None
    if kind in ("stripes", "gradient", "checker"):
        yy, xx = _grid(size)
        along = xx * np.float32(np.cos(theta)) + yy * np.float32(np.sin(theta))
        if kind == "stripes":
            weight = 0.5 + 0.5 * np.sin(along * np.float32(2 * np.pi / rng.uniform(3, 24)) + np.float32(rng.uniform(0, 2 * np.pi)))
            if rng.random() < 0.5:
                weight = (weight > 0.5).astype(np.float32)
        elif kind == "gradient":
            weight = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
        else:
            cell, across = np.float32(rng.uniform(3, 16)), -xx * np.float32(np.sin(theta)) + yy * np.float32(np.cos(theta))
            weight = ((np.floor(along / cell) + np.floor(across / cell)) % 2).astype(np.float32)
    elif kind == "smooth":
        grid = int(rng.integers(2, 13))
        weight = np.clip(cv2.resize(rng.random((grid, grid), dtype=np.float32), (size, size), interpolation=cv2.INTER_CUBIC), 0, 1)
    if weight is None:  # flat, noise: one colour
        image = np.broadcast_to(c1, (size, size, 3)).copy()
    else:
        image = c1 + weight[..., None] * (c2 - c1)
    sigma = rng.uniform(15, 45) if kind == "noise" else rng.uniform(0, 12)
    image += np.float32(sigma) * _noise(rng, size, 1 if grey else 3)
    return image, c1


_NOISE_BANK: dict[int, np.ndarray] = {}


def _noise(rng: np.random.Generator, size: int, channels: int) -> np.ndarray:
    """size×size×channels standard normal noise: a random crop of a fixed bank of normals (seeded
    once), 4× cheaper than drawing fresh normals for every texture."""
    if size not in _NOISE_BANK:
        _NOISE_BANK[size] = np.random.default_rng(20240601).standard_normal((4 * size, 4 * size, 3), dtype=np.float32)
    bank = _NOISE_BANK[size]
    y, x, c = int(rng.integers(3 * size)), int(rng.integers(3 * size)), int(rng.integers(3))
    return bank[y : y + size, x : x + size, c : c + 1] if channels == 1 else bank[y : y + size, x : x + size]


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    if size not in _GRIDS:
        _GRIDS[size] = tuple(np.mgrid[0:size, 0:size].astype(np.float32))
    return _GRIDS[size]


def shape_mask(rng: np.random.Generator, size: int, centre: tuple[float, float] | None = None, min_radius: float = 3.0, upright: float = 0.0) -> np.ndarray:
    """One random shape as a size×size bool mask; radius log-uniform from ``min_radius`` to 56 px.
    ``upright``: the chance of an axis-aligned rectangle, which fills its box prompt (the curriculum's start)."""
    r = float(np.exp(rng.uniform(np.log(min_radius), np.log(56))))
    cx, cy = centre if centre is not None else rng.uniform(-0.05 * size, 1.05 * size, 2)
    kind = SHAPES[rng.choice(len(SHAPES), p=SHAPE_P)]
    canvas = np.zeros((size, size), np.uint8)
    angle = rng.uniform(0, 180)
    if rng.random() < upright:
        kind, angle = "rectangle", 0.0
    if kind in ("ellipse", "ring"):
        axes = (max(1, round(r)), max(1, round(r * rng.uniform(0.3, 1.0))))
        cv2.ellipse(canvas, (round(cx), round(cy)), axes, angle, 0, 360, 1, -1)
        if kind == "ring":
            inner = rng.uniform(0.35, 0.75)
            cv2.ellipse(canvas, (round(cx), round(cy)), (max(1, round(axes[0] * inner)), max(1, round(axes[1] * inner))), angle, 0, 360, 0, -1)
    elif kind == "rectangle":
        corners = cv2.boxPoints(((float(cx), float(cy)), (2 * r, 2 * r * rng.uniform(0.2, 1.0)), angle))
        cv2.fillPoly(canvas, [np.round(corners).astype(np.int32)], 1)
    elif kind == "polygon":
        n = int(rng.integers(3, 11))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = r * rng.uniform(0.35 if rng.random() < 0.5 else 0.8, 1.0, n)  # star-like or near-convex
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    elif kind == "blob":  # thresholded smooth noise with a radial fall-off: organic outlines
        side = max(4, round(2 * r))
        grid = int(rng.integers(3, 7))
        field = cv2.resize(rng.normal(0, 1, (grid, grid)).astype(np.float32), (side, side), interpolation=cv2.INTER_CUBIC)
        yy, xx = (np.mgrid[0:side, 0:side] + 0.5) / side * 2 - 1
        blob = (field * 0.6 + 1.0 - 1.6 * (xx**2 + yy**2)) > 0
        x0, y0 = round(cx - side / 2), round(cy - side / 2)
        sx0, sy0, sx1, sy1 = max(0, -x0), max(0, -y0), min(side, size - x0), min(side, size - y0)
        if sx1 > sx0 and sy1 > sy0:
            canvas[y0 + sy0 : y0 + sy1, x0 + sx0 : x0 + sx1] = blob[sy0:sy1, sx0:sx1]
    else:  # stroke: a thick polyline
        n = int(rng.integers(2, 6))
        points = np.stack([cx + rng.uniform(-r, r, n), cy + rng.uniform(-r, r, n)], 1)
        cv2.polylines(canvas, [np.round(points).astype(np.int32)], False, 1, int(rng.integers(2, 7)))
    return canvas.astype(bool)


def make_image(rng: np.random.Generator, size: int = SIZE, difficulty: float = 1.0) -> tuple[np.ndarray, list[np.ndarray]]:
    """A size×size×3 uint8 RGB image and the visible instance mask of each shape in it (≥ 1).
    ``difficulty`` 0..1 (the curriculum): 0 = 1-3 shapes of radius ≥ 20 px, 80 % of them upright
    rectangles, never low-contrast; 1 = 1-8 shapes of every kind, radius ≥ MIN_RADIUS px, a fifth low-contrast."""
    grey = rng.random() < 0.35
    image, background = texture(rng, size, grey)
    drawn: list[np.ndarray] = []  # each shape's visible part so far (later shapes occlude it)
    areas: list[int] = []
    colours: list[np.ndarray] = [background]
    for _ in range(int(rng.integers(1, 4 + round(5 * difficulty)))):
        centre = None
        if drawn and rng.random() < 0.35:  # centred on an earlier shape's outline: touching, overlapping objects
            other = drawn[int(rng.integers(len(drawn)))].astype(np.uint8)
            ys, xs = np.nonzero(other - cv2.erode(other, np.ones((3, 3), np.uint8)))
            if len(xs):
                k = int(rng.integers(len(xs)))
                centre = (float(xs[k]), float(ys[k]))
        mask = shape_mask(rng, size, centre, min_radius=MIN_RADIUS + (20.0 - MIN_RADIUS) * (1.0 - difficulty), upright=0.8 * (1.0 - difficulty))
        if mask.sum() < MIN_VISIBLE:
            continue
        near = colours[int(rng.integers(len(colours)))] if rng.random() < 0.2 * difficulty else None  # low contrast
        tex, colour = texture(rng, size, grey, near)
        image[mask] = tex[mask]
        for other in drawn:
            other &= ~mask
        drawn.append(mask.copy())
        areas.append(int(mask.sum()))
        colours.append(colour)
    if rng.random() < 0.35:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.4))
    if rng.random() < 0.3:  # global contrast / brightness
        image = (image - 128) * rng.uniform(0.5, 1.3) + 128 + rng.uniform(-30, 30)
    objects = [m for m, area in zip(drawn, areas) if m.sum() >= max(MIN_VISIBLE, MIN_VISIBLE_FRACTION * area)]
    image = np.clip(image, 0, 255).astype(np.uint8)
    if not objects:  # every shape hidden or too small: draw again from the same generator
        return make_image(rng, size, difficulty)
    return image, objects


# ------------------------------------------------------------------ samples in samtune's format
def make_batch(rngs: list[np.random.Generator], transform, prompts, per_image: int, difficulty: float = 1.0) -> dict:
    """One image per generator, ``per_image`` of its objects (repeated when it has fewer),
    each with a jittered box and point prompts: the dict run_rounds takes (datasets/sample.py)."""
    from samtune.datasets import sample as S
    from samtune.datasets.prompts import sample_box, sample_points

    samples = []
    for rng in rngs:
        image, objects = make_image(rng, difficulty=difficulty)
        out = transform(image=image, mask=np.zeros(image.shape[:2], np.uint8))
        # every object once (as far as per_image allows), the rest drawn again at random
        chosen = np.concatenate([rng.permutation(len(objects)), rng.integers(len(objects), size=per_image)])[:per_image]
        boxes, points, labels, masks = [], [], [], []
        for k in chosen:
            mask = objects[k]
            box = sample_box(mask, prompts.box_jitter_px, rng, prompts.box_jitter_frac * difficulty)
            p, lab = sample_points(mask, box, prompts.positive_points, prompts.negative_points, prompts.point_placement, rng)
            boxes.append(box), points.append(p), labels.append(lab), masks.append(mask)
        samples.append({
            S.IMAGE: torch.from_numpy(out["image"].transpose(2, 0, 1).copy()),
            S.MASKS: torch.from_numpy(np.stack(masks).astype(np.float32)),
            S.BOXES: torch.from_numpy(np.stack(boxes)),
            S.POINTS: torch.from_numpy(np.stack(points)),
            S.POINT_LABELS: torch.from_numpy(np.stack(labels)),
            S.META: {"item": "generated", "index": 0, "resized_size": image.shape[:2], "original_size": image.shape[:2]},
        })  # fmt: skip
    return S.collate_samples(samples)


def held_out_batches(seed: int, n_images: int, transform, jitter_px: float = 0.0, point_seed: int = 0):
    """Held-out images (their own seed stream), every object of each image, tight boxes (jitter 0,
    as samtune's prompted validation) and one uniform positive point."""
    from samtune.finetune.recipe import PromptsSection

    prompts = PromptsSection(box_jitter_px=jitter_px, positive_points=1)
    for i in range(n_images):
        rng = np.random.default_rng([seed, 1, i])
        image, objects = make_image(rng)
        # all objects, in order: make_batch with a generator that picks them as they are
        yield _all_objects_batch(image, objects, transform, prompts, np.random.default_rng([seed, 2, i, point_seed]))


def _all_objects_batch(image, objects, transform, prompts, rng) -> dict:
    from samtune.datasets import sample as S
    from samtune.datasets.prompts import sample_box, sample_points

    out = transform(image=image, mask=np.zeros(image.shape[:2], np.uint8))
    boxes, points, labels = [], [], []
    for mask in objects:
        box = sample_box(mask, prompts.box_jitter_px, rng)
        p, lab = sample_points(mask, box, 1, 0, "uniform", rng)
        boxes.append(box), points.append(p), labels.append(lab)
    return {
        S.IMAGE: torch.from_numpy(out["image"].transpose(2, 0, 1).copy())[None],
        S.MASKS: torch.from_numpy(np.stack(objects).astype(np.float32))[None],
        S.BOXES: torch.from_numpy(np.stack(boxes))[None],
        S.POINTS: torch.from_numpy(np.stack(points))[None],
        S.POINT_LABELS: torch.from_numpy(np.stack(labels))[None],
        S.META: [{"item": "held-out", "index": 0, "resized_size": image.shape[:2], "original_size": image.shape[:2]}],
    }  # fmt: skip


@torch.no_grad()
def held_out_miou(model, family, seed: int, n_images: int) -> dict:
    """Mean IoU over every object of ``n_images`` held-out images: tight box, and one point (the
    IoU head picks one of the three masks), one prompt round each; plus box mIoU by object size."""
    from samtune.datasets import sample as S
    from samtune.finetune.interaction import mask_iou, run_rounds
    from samtune.finetune.recipe import PromptsSection

    was_training = model.training
    model.eval()
    prompts = PromptsSection(box_jitter_px=0.0, positive_points=1)
    generator = torch.Generator().manual_seed(0)
    box_ious, point_ious, sizes = [], [], []
    for batch in held_out_batches(seed, n_images, family.make_transform(SIZE)):
        embeddings = family.encode_images(model, batch[S.IMAGE])
        target = batch[S.MASKS][0] > 0.5
        valid = torch.ones_like(target)
        for use_box, into in ((True, box_ious), (False, point_ious)):
            (logits,), _ = run_rounds(model, family, batch, prompts, SIZE, use_box, generator, embeddings=embeddings)
            into.append(mask_iou(logits[:, 0] > 0, target, valid))
        sizes.append(target.flatten(1).sum(1))
    box, point, size = torch.cat(box_ious), torch.cat(point_ious), torch.cat(sizes).float()
    buckets = {"small (<150 px)": size < 150, "medium (150-1500 px)": (size >= 150) & (size < 1500), "large (>=1500 px)": size >= 1500}
    model.train(was_training)
    return {
        "images": n_images,
        "objects": len(box),
        "box_miou": round(box.mean().item(), 4),
        "point_miou": round(point.mean().item(), 4),
        "box_miou_by_size": {k: {"objects": int(m.sum()), "miou": round(box[m].mean().item(), 4) if m.any() else None} for k, m in buckets.items()},
    }


# ------------------------------------------------------------------ training
@torch.no_grad()
def init_for_pretraining(model, seed: int, neck_scale: float) -> None:
    """Two changes to the registry's random ``tiny`` that let the prompt path learn from scratch
    (measured on the decoder alone, frozen random encoder, fresh generated images each step, box
    prompts, 64 per step, lr 3e-3: box-filling rectangles reached train IoU 0.000 after 300 steps
    as built, 0.64 with both changes):

    - the mask decoder's Linear and (transposed) convolution layers get PyTorch's default init
      (Kaiming-uniform), as official SAM's decoder starts. transformers' SAM draws them from
      N(0, 0.02), which makes a random decoder's mask logits ~1e-4 and their dependence on the
      prompt ~1e-4; the decoder then settled on "nothing" (every logit negative) and stayed.
    - the encoder neck's last LayerNorm starts with weight ``neck_scale`` (0.1) instead of 1, so
      that the image embedding's content, random at first and different in every image, does not
      drown the positional encoding that the decoder's attention needs to find the prompt: the
      embedding and its positional encoding are summed in the same 64 channels. The weight
      trains and grows as the content becomes useful.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module in model.mask_decoder.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                module.reset_parameters()
    finally:
        torch.random.set_rng_state(generator_state)
    model.vision_encoder.neck.layer_norm2.weight.fill_(neck_scale)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    parser.add_argument("--batch", type=int, default=8, help="images per step")
    parser.add_argument("--per-image", type=int, default=4, help="objects prompted per image (one encoder pass)")
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (warm-up, then cosine to 0)")
    parser.add_argument("--lr-decoder", type=float, default=3e-3, help="peak learning rate of the prompt encoder and mask decoder")
    parser.add_argument("--curriculum", type=int, default=2000,
                        help="steps over which the data goes from easy (1-3 large shapes, boxes only, no box jitter) to the full mix")
    parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    parser.add_argument("--init", choices=("registry", "pretraining"), default="pretraining",
                        help="registry: the 'tiny' variant's random init as is; pretraining: then init_for_pretraining "
                             "(PyTorch's default init in the mask decoder, the neck's last LayerNorm weight at --neck-scale)")
    parser.add_argument("--neck-scale", type=float, default=0.1, help="initial weight of the encoder neck's last LayerNorm")
    parser.add_argument("--focal-weight", type=float, default=20.0, help="focal : Dice (1) weight of the mask loss")
    parser.add_argument("--bce-weight", type=float, default=0.0, help="binary cross-entropy weight added to the mask loss")
    parser.add_argument("--box-probability", type=float, default=0.5, help="chance that a step prompts with boxes, else one point")
    parser.add_argument("--out", type=Path, default=Path("adapters/pretrained/tiny_shapes"), help="output folder")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: on a shared 2-core machine two threads ran 13× slower)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data and of training")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=1000, help="held-out mIoU on --eval-images images every N steps")
    parser.add_argument("--eval-images", type=int, default=30)
    parser.add_argument("--final-eval-images", type=int, default=100)
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="dtype of the saved weights")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import yaml

    from samtune.adapters.registry import build_model, family_of
    from samtune.datasets import sample as S
    from samtune.finetune.interaction import mask_iou, run_rounds
    from samtune.finetune.train.losses import make_mask_loss
    from samtune.finetune.train.optim import build_scheduler
    from samtune.finetune.recipe import LossSection, PromptsSection, TrainSection

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    family = family_of("tiny")
    model = build_model("tiny", image_size=SIZE, init_seed=0).train()
    if args.init == "pretraining":
        init_for_pretraining(model, args.seed, args.neck_scale)
    model.requires_grad_(True)
    # official SAM's random Fourier matrix is a fixed buffer; transformers makes it a parameter
    model.shared_image_embedding.positional_embedding.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    prompts = PromptsSection(box_probability=args.box_probability, box_jitter_px=5.0, box_jitter_frac=0.1, positive_points=1)
    loss_cfg = LossSection(focal_weight=args.focal_weight, bce_weight=args.bce_weight)  # Dice 1 + focal 20 + IoU head 1 by default (SAM paper)
    train_cfg = TrainSection(mode="full", steps=args.steps, batch_size=args.batch, lr=args.lr, lr_decoder=args.lr_decoder, weight_decay=args.weight_decay,
                             warmup_steps=args.warmup, clip_grad_norm=args.clip, device="cpu")  # fmt: skip
    # two learning rates: the image encoder's, and the prompt encoder's + mask decoder's
    encoder = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(family.image_encoder + ".")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(family.image_encoder + ".")]
    optimizer = torch.optim.AdamW([{"name": "encoder", "params": encoder, "lr": args.lr}, {"name": "decoder", "params": rest, "lr": args.lr_decoder}],
                                  lr=args.lr, weight_decay=args.weight_decay)  # fmt: skip
    scheduler = build_scheduler(optimizer, train_cfg)
    loss_fn = make_mask_loss(loss_cfg.dice_weight, loss_cfg.focal_weight, loss_cfg.bce_weight)
    transform = family.make_transform(SIZE)
    clicks = torch.Generator().manual_seed(args.seed + 1)
    task_rng = np.random.default_rng([args.seed, 3])
    n_params = sum(p.numel() for p in trainable)
    print(f"pretraining tiny SAM ({n_params:,} trainable parameters) on generated shapes: {args.steps} steps × {args.batch} images × "
          f"{args.per_image} objects, lr {args.lr}, {args.threads} threads", flush=True)  # fmt: skip
    curve, window, ious, window_start, data_seconds = [], [], [], time.perf_counter(), 0.0
    valid = torch.ones(args.batch * args.per_image, SIZE, SIZE, dtype=torch.bool)
    loop_start = time.perf_counter()
    evaluations = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        rngs = [np.random.default_rng([args.seed, 0, step, i]) for i in range(args.batch)]
        difficulty = min(1.0, step / args.curriculum) if args.curriculum else 1.0
        batch = make_batch(rngs, transform, prompts, args.per_image, difficulty)
        data_seconds += time.perf_counter() - t0
        use_box = bool(task_rng.random() < 1.0 - (1.0 - prompts.box_probability) * difficulty)  # boxes only at first
        outputs, loss = run_rounds(model, family, batch, prompts, SIZE, use_box, clicks, loss_fn, loss_cfg.iou_weight)
        if not torch.isfinite(loss):
            print(f"loss became {loss.item()} at step {step}; lower --lr", file=sys.stderr)
            return 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, args.clip)
        optimizer.step()
        scheduler.step()
        window.append(loss.item())
        with torch.no_grad():
            ious.append(mask_iou(outputs[-1][:, 0] > 0, batch[S.MASKS].flatten(0, 1) > 0.5, valid).mean().item())
        if step % args.log_every == 0 or step == args.steps:
            now = time.perf_counter()
            rate = len(window) / (now - window_start)
            mean = float(np.mean(window))
            curve.append({"step": step, "loss": round(mean, 4), "train_miou": round(float(np.mean(ious)), 4)})
            eta = (args.steps - step) / max(rate, 1e-9)
            print(f"step {step}/{args.steps}  loss {mean:.4f}  train mIoU {np.mean(ious):.3f} (means of {len(window)})  lr {scheduler.get_last_lr()[0]:.2e}  "
                  f"{rate:.2f} steps/s  ETA {int(eta // 60)}m{int(eta % 60):02d}s", flush=True)  # fmt: skip
            window, ious, window_start = [], [], now
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            t_eval = time.perf_counter()
            result = held_out_miou(model, family, args.seed, args.eval_images)
            evaluations.append({"step": step, "box_miou": result["box_miou"], "point_miou": result["point_miou"], "images": args.eval_images})
            print(f"step {step}: held-out ({args.eval_images} images, {result['objects']} objects) box mIoU {result['box_miou']:.4f}, "
                  f"point mIoU {result['point_miou']:.4f}", flush=True)  # fmt: skip
            window_start += time.perf_counter() - t_eval  # the evaluation is not training time
    train_seconds = time.perf_counter() - loop_start
    final = held_out_miou(model, family, args.seed, args.final_eval_images)
    random_init = held_out_miou(build_model("tiny", image_size=SIZE, init_seed=0), family, args.seed, args.final_eval_images)
    last = curve[-max(1, math.ceil(200 / args.log_every)) :]
    final_loss = float(np.average([c["loss"] for c in last]))
    print(f"held-out ({args.final_eval_images} images, {final['objects']} objects): box mIoU {final['box_miou']:.4f} "
          f"(random-init tiny: {random_init['box_miou']:.4f}), point mIoU {final['point_miou']:.4f} ({random_init['point_miou']:.4f}); "
          f"by size {final['box_miou_by_size']}", flush=True)  # fmt: skip

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    saved = model.to(torch.float16) if args.dtype == "float16" else model
    saved.save_pretrained(str(args.out))
    total_seconds = time.perf_counter() - started
    record = {
        "what": "tiny SAM (make_tiny_config(128), registry 'tiny' init_seed 0) pretrained on generated shapes by benchmarks/pretrain_tiny.py",
        "command": "benchmarks/pretrain_tiny.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"base": "tiny", "image_size": SIZE, "init_seed": 0, "trainable_parameters": n_params,
                  "frozen": ["shared_image_embedding.positional_embedding (random Fourier matrix, a buffer in official SAM)"],
                  "saved_dtype": args.dtype},  # fmt: skip
        "train": train_cfg.model_dump(),
        "prompts": prompts.model_dump(),
        "prompts_per_image": args.per_image,
        "loss": loss_cfg.model_dump(),
        "data": {
            "generator": "benchmarks/pretrain_tiny.py make_image: 1-8 shapes on a textured background, later shapes occlude earlier ones",
            "shapes": dict(zip(SHAPES, SHAPE_P)),
            "textures": list(TEXTURES),
            "grey_images": 0.35,
            "seed_streams": {"train": "default_rng([seed, 0, step, image])", "held_out": "default_rng([seed, 1, image])"},
            "min_visible_px": MIN_VISIBLE,
            "min_visible_fraction": MIN_VISIBLE_FRACTION,
        },
        "results": {
            "final_train_loss": round(final_loss, 4),
            "final_train_loss_note": f"mean of the last {len(last) * args.log_every} steps' losses",
            "loss_curve": curve,
            "held_out_during_training": evaluations,
            "held_out": final,
            "held_out_random_init_tiny": random_init,
            "train_seconds": round(train_seconds, 1),
            "data_generation_seconds": round(data_seconds, 1),
            "total_seconds": round(total_seconds, 1),
        },
        "environment": {"torch": str(torch.__version__), "python": platform.python_version(), "threads": args.threads, "machine": platform.machine()},
    }
    (args.out / "pretrain.yaml").write_text(yaml.safe_dump(record, sort_keys=False, width=120))
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"wrote {args.out} ({size / 2**20:.2f} MiB): {', '.join(sorted(f.name for f in args.out.iterdir()))}; "
          f"final training loss {final_loss:.4f}; {train_seconds:.0f} s training, {total_seconds:.0f} s in all", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
