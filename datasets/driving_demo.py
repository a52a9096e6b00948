"""Small synthetic BDD100K, ACDC and Mapillary Vistas trees: the street scenes of
``samtune.datasets.synthetic`` written in each dataset's published layout (see ``bdd100k.py``,
``acdc.py`` and ``mapillary.py`` for the layouts and their sources), so the readers, recipes and
tests run without downloading anything.

BDD100K gets JPEG images and trainId masks (as its sem_seg masks are); ACDC gets one sequence per
condition and split, PNG images given a crude look of the condition (fog: a grey veil growing
towards the horizon; night: dark with a cold tint; rain: darker with bright streaks; snow: white
flakes) and Cityscapes labelIds; Mapillary Vistas gets JPEGs, palette label PNGs and a small
generated config of its own (a few classes, two not evaluated), not the official one. Same
determinism and atomic build as the other demo trees.
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


# The demo's Mapillary Vistas class list: a handful of entries shaped like the official config's
# (name, readable, color, evaluate); Cityscapes labelId of the synthetic scene -> label value.
_VISTAS_DEMO_LABELS = (
    ("construction--flat--road", "Road", (128, 64, 128), True, 7),
    ("construction--flat--sidewalk", "Sidewalk", (244, 35, 232), True, 8),
    ("construction--structure--building", "Building", (70, 70, 70), True, 11),
    ("nature--vegetation", "Vegetation", (107, 142, 35), True, 21),
    ("nature--sky", "Sky", (70, 130, 180), True, 23),
    ("human--person", "Person", (220, 20, 60), True, 24),
    ("object--vehicle--car", "Car", (0, 0, 142), True, 26),
    ("void--ego-vehicle", "Ego Vehicle", (120, 10, 10), False, 1),
    ("void--unlabeled", "Unlabeled", (0, 0, 0), False, None),  # every other labelId
)


def generate_mapillary(out_dir, n_train=3, n_val=2, size_wh=(256, 128), seed=0) -> Path:
    """Write ``out_dir/{training,validation}/images/*.jpg``, ``.../v2.0/labels/*.png`` (palette PNGs
    of label values) and a small ``config_v2.0.json`` (9 labels, two with ``evaluate: false``) and
    return ``out_dir``. Names are 22-character keys as Vistas' are; the real images vary in size."""
    w, h = (int(v) for v in size_wh)
    _check_size(n_train, n_val, w, h)
    unlabeled = len(_VISTAS_DEMO_LABELS) - 1
    lut = np.full(256, unlabeled, np.uint8)
    for value, (*_, label_id) in enumerate(_VISTAS_DEMO_LABELS):
        if label_id is not None:
            lut[label_id] = value
    palette = [c for *_, color, _, _ in _VISTAS_DEMO_LABELS for c in color]
    palette += [0] * (768 - len(palette))  # 256 entries: PIL writes a shorter palette with fewer bits per pixel
    jobs = [("training", i) for i in range(n_train)] + [("validation", i) for i in range(n_val)]
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))

    config = {"labels": [{"name": n, "readable": r, "color": list(c), "instances": False, "evaluate": e}
                         for n, r, c, e, _ in _VISTAS_DEMO_LABELS]}  # fmt: skip

    def write(tmp: Path) -> None:
        for split, i in jobs:
            rng = np.random.default_rng([seed, 4, split == "validation", i])
            img, label_ids = _city_scene(rng, w, h, ego=i % 2 == 0)
            key = "".join(rng.choice(alphabet, 22))
            for folder in (tmp / split / "images", tmp / split / "v2.0" / "labels"):
                folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tmp / split / "images" / f"{key}.jpg", quality=95)
            label = Image.fromarray(lut[label_ids], mode="P")
            label.putpalette(palette)
            label.save(tmp / split / "v2.0" / "labels" / f"{key}.png")
        for split in ("training", "validation"):
            (tmp / split).mkdir(exist_ok=True)
            (tmp / split / _MARKER).write_text(json.dumps({"kind": "mapillary", "seed": seed}))

    _build(out_dir, ["validation", "training"], write)  # training last: its presence = complete
    config_path = Path(out_dir) / "config_v2.0.json"  # written after _build's refusal check, atomically
    config_path.with_suffix(".tmp").write_text(json.dumps(config, indent=1))
    config_path.with_suffix(".tmp").replace(config_path)
    return Path(out_dir)
