"""The shipped ``tiny-pretrained`` weights (adapters/pretrained/tiny_shapes, made by
benchmarks/pretrain_tiny.py): they load from the package, from any working directory, and segment
shapes from a box prompt far better than the random-init ``tiny``."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import samtune.adapters
from samtune.adapters.registry import build_sam, family_of, get_variant, list_models
from samtune.datasets import sample as S
from samtune.finetune.interaction import mask_iou, run_rounds
from samtune.finetune.recipe import PromptsSection

FOLDER = Path(samtune.adapters.__file__).resolve().parent / "pretrained" / "tiny_shapes"
SIZE = 128


def test_the_folder_ships_with_the_package_and_is_small():
    files = {f.name: f.stat().st_size for f in FOLDER.iterdir() if f.is_file()}
    assert {"config.json", "model.safetensors", "pretrain.yaml"} <= set(files)
    assert sum(files.values()) <= 20 * 2**20, files
    assert "tiny-pretrained" in list_models()
    assert Path(get_variant("tiny-pretrained").hub_id) == FOLDER


def test_builds_load_the_shipped_weights_not_a_random_init(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)  # the folder is found from the package, not the working directory
    a, b, random = build_sam("tiny-pretrained"), build_sam("tiny-pretrained"), build_sam("tiny")
    assert not a.training and a.config.vision_config.image_size == SIZE
    sd_a, sd_b, sd_r = a.state_dict(), b.state_dict(), random.state_dict()
    assert sd_a.keys() == sd_r.keys() and all(sd_a[k].shape == sd_r[k].shape for k in sd_a)  # the tiny architecture
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert sum(not torch.equal(sd_a[k], sd_r[k]) for k in sd_a) > 0.9 * len(sd_a)
    shipped = load_file(str(FOLDER / "model.safetensors"))
    assert all(torch.equal(sd_a[k], shipped[k].to(sd_a[k].dtype)) for k in shipped)


def test_other_image_sizes_interpolate_the_position_tables():
    model = build_sam("tiny-pretrained", image_size=64)
    assert model.config.vision_config.image_size == 64
    embeddings = family_of("tiny-pretrained").encode_images(model, torch.zeros(1, 3, 64, 64))
    assert embeddings.image_embeddings.shape[-2:] == (8, 8)  # patch 8 kept: the token grid shrinks


def _scene() -> tuple[np.ndarray, list[np.ndarray]]:
    """A 128×128 RGB image (noisy textured background) with five shapes of their own colour and
    texture, one touching another, and their masks."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    image = np.empty((SIZE, SIZE, 3), np.float32)
    image[:] = (90, 110, 70)
    image += 25 * np.sin(xx / 5.0)[..., None]  # stripes
    masks = []
    for draw, colour in (
        (lambda c: cv2.ellipse(c, (40, 40), (24, 14), 30, 0, 360, 1, -1), (230, 200, 40)),
        (lambda c: cv2.fillPoly(c, [np.array([[80, 20], [120, 30], [110, 60], [85, 55]], np.int32)], 1), (40, 60, 200)),
        (lambda c: cv2.rectangle(c, (20, 80), (60, 115), 1, -1), (200, 60, 60)),
        (lambda c: cv2.circle(c, (90, 95), 18, 1, -1), (240, 240, 240)),
        (lambda c: cv2.circle(c, (60, 68), 8, 1, -1), (20, 20, 20)),  # touches the rectangle and the ellipse's neighbourhood
    ):
        canvas = np.zeros((SIZE, SIZE), np.uint8)
        draw(canvas)
        mask = canvas.astype(bool)
        image[mask] = colour
        for other in masks:
            other &= ~mask
        masks.append(mask)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), masks


def _box_ious(name: str) -> torch.Tensor:
    from samtune.datasets.prompts import box_from_mask

    image, masks = _scene()
    family = family_of(name)
    model = build_sam(name)
    out = family.make_transform(SIZE)(image=image, mask=np.zeros((SIZE, SIZE), np.uint8))
    n = len(masks)
    batch = {
        S.IMAGE: torch.from_numpy(out["image"].transpose(2, 0, 1).copy())[None],
        S.MASKS: torch.from_numpy(np.stack(masks).astype(np.float32))[None],
        S.BOXES: torch.from_numpy(np.stack([box_from_mask(m) for m in masks]))[None],
        S.POINTS: torch.zeros(1, n, 0, 2), S.POINT_LABELS: torch.zeros(1, n, 0, dtype=torch.long),
        S.META: [{"resized_size": (SIZE, SIZE)}],
    }  # fmt: skip
    with torch.no_grad():
        (logits,), _ = run_rounds(model, family, batch, PromptsSection(), SIZE, True, torch.Generator().manual_seed(0))
    target = batch[S.MASKS][0] > 0.5
    return mask_iou(logits[:, 0] > 0, target, torch.ones_like(target))


@pytest.fixture(scope="module")
def ious() -> dict[str, torch.Tensor]:
    return {name: _box_ious(name) for name in ("tiny-pretrained", "tiny")}


def test_pretrained_segments_shapes_from_a_box_far_better_than_random_init(ious):
    # measured: tiny-pretrained 0.73 / 0.70 / 0.59 / 0.75 / 0.14 (the small dark disc), mean 0.58;
    # random-init tiny 0.01-0.10, mean 0.06
    pretrained, random = ious["tiny-pretrained"], ious["tiny"]
    assert pretrained.mean() > 0.45, pretrained
    assert (pretrained > 0.5).sum() >= 4, pretrained
    assert random.mean() < 0.15, random


def test_the_pretraining_script_runs_and_records_what_it_did(tmp_path):
    """benchmarks/pretrain_tiny.py for two steps: the weights load as tiny and the record holds
    the settings, the loss curve and the held-out scores (the shipped run took 3000 steps)."""
    import importlib.util

    import yaml

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "pretrain_tiny.py"
    spec = importlib.util.spec_from_file_location("pretrain_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "weights"
    assert module.main(["--steps", "2", "--curriculum", "2", "--warmup", "1", "--log-every", "1", "--eval-every", "0",
                        "--final-eval-images", "2", "--out", str(out)]) == 0  # fmt: skip
    record = yaml.safe_load((out / "pretrain.yaml").read_text())
    assert record["settings"]["steps"] == 2 and len(record["results"]["loss_curve"]) == 2
    assert {"box_miou", "point_miou", "objects"} <= set(record["results"]["held_out"])
    model = build_sam("tiny", str(out))
    assert model.config.vision_config.image_size == SIZE
