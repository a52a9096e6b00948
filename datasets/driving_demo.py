"""Small synthetic BDD100K and ACDC trees: the street scenes of ``samtune.datasets.synthetic``
written in each dataset's published layout (see ``bdd100k.py`` and ``acdc.py`` for the layouts and
their sources), so the readers, recipes and tests run without downloading anything.

BDD100K gets JPEG images and trainId masks (as its sem_seg masks are); ACDC gets one sequence per
condition and split, PNG images given a crude look of the condition (fog: a grey veil growing
towards the horizon; night: dark with a cold tint; rain: darker with bright streaks; snow: white
flakes) and Cityscapes labelIds. Same determinism and atomic build as the other demo trees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from samtune.constants import ACDC_CONDITIONS as CONDITIONS
from samtune.datasets.cityscapes import map_label_ids
from samtune.datasets.synthetic import _MARKER, _build, _city_scene


def _check_size(n_train: int, n_val: int, w: int, h: int) -> None:
    if n_train < 0 or n_val < 0 or w < 64 or h < 32:
        raise ValueError(f"need n_train, n_val >= 0 and size_wh >= (64, 32), got {(w, h)}")


def generate_bdd100k(out_dir, n_train=4, n_val=2, size_wh=(256, 128), seed=0) -> Path:
    """Write ``out_dir/images/10k/{train,val}/*.jpg`` and ``out_dir/labels/sem_seg/masks/{train,
    val}/*.png`` (trainIds, 255 unknown) and return ``out_dir``. Names are 17 hex digits split as
    BDD100K's (``{8}-{8}``); the real images are 1280×720."""
    w, h = (int(v) for v in size_wh)
    _check_size(n_train, n_val, w, h)
    jobs = [("train", i) for i in range(n_train)] + [("val", i) for i in range(n_val)]

    def write(tmp: Path) -> None:
        for split, i in jobs:
            rng = np.random.default_rng([seed, 2, split == "val", i])
            img, label_ids = _city_scene(rng, w, h, ego=i % 2 == 0)
            name = f"{rng.integers(16**8):08x}-{rng.integers(16**8):08x}"
            for folder, arr, suffix, options in ((tmp / "images" / "10k" / split, img, ".jpg", {"quality": 95}),
                                                 (tmp / "labels" / "sem_seg" / "masks" / split, map_label_ids(label_ids), ".png", {})):  # fmt: skip
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(folder / f"{name}{suffix}", **options)
        for top in ("images", "labels"):
            (tmp / top).mkdir(exist_ok=True)
            (tmp / top / _MARKER).write_text(json.dumps({"kind": "bdd100k", "seed": seed}))

    _build(out_dir, ["labels", "images"], write)  # images last: its presence = complete
    return Path(out_dir)


def _weather(img: np.ndarray, condition: str, rng) -> np.ndarray:
    """H×W×3 uint8 RGB with a crude look of ``condition`` (the labels stay as they are)."""
    h, w = img.shape[:2]
    out = img.astype(np.float32)
    if condition == "fog":
        veil = np.linspace(0.75, 0.35, h, dtype=np.float32)[:, None, None]  # densest at the horizon (top)
        out = out * (1 - veil) + 200.0 * veil
    elif condition == "night":
        out = out * 0.25 + np.array([0.0, 2.0, 10.0])
    elif condition == "rain":
        out *= 0.7
        for _ in range(w // 4):  # short slanted streaks
            x, y, n = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(4, 10))
            rows, cols = np.arange(y, min(y + n, h)), np.clip(x + np.arange(min(n, h - y)) // 3, 0, w - 1)
            out[rows, cols] = 0.5 * out[rows, cols] + 110.0
    else:  # snow
        flakes = rng.random((h, w)) < 0.02
        out[flakes] = 245.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def generate_acdc(out_dir, n_train=1, n_val=1, size_wh=(256, 128), seed=0) -> Path:
    """Write ``out_dir/rgb_anon/{condition}/{train,val}/{sequence}/*_rgb_anon.png`` and
    ``out_dir/gt/.../*_gt_labelIds.png`` (Cityscapes labelIds), ``n_train``/``n_val`` images per
    condition, and return ``out_dir``. The real images are 1920×1080."""
    w, h = (int(v) for v in size_wh)
    _check_size(n_train, n_val, w, h)
    jobs = [(c, split, i) for c in CONDITIONS for split, n in (("train", n_train), ("val", n_val)) for i in range(n)]

    def write(tmp: Path) -> None:
        for condition, split, i in jobs:
            code = CONDITIONS.index(condition)
            rng = np.random.default_rng([seed, 3, code, split == "val", i])
            img, label_ids = _city_scene(rng, w, h, ego=i % 2 == 0)
            sequence = f"GOPR{400 + 10 * code + (split == 'val'):04d}"
            stem = f"{sequence}_frame_{i:06d}"
            for top, arr, suffix in (("rgb_anon", _weather(img, condition, rng), "_rgb_anon.png"), ("gt", label_ids, "_gt_labelIds.png")):
                folder = tmp / top / condition / split / sequence
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(folder / f"{stem}{suffix}")
        for top in ("rgb_anon", "gt"):
            (tmp / top).mkdir(exist_ok=True)
            (tmp / top / _MARKER).write_text(json.dumps({"kind": "acdc", "seed": seed}))

    _build(out_dir, ["gt", "rgb_anon"], write)  # rgb_anon last: its presence = complete
    return Path(out_dir)
