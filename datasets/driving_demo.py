"""Small synthetic BDD100K, ACDC and Mapillary Vistas trees: the street scenes of
``samtune.datasets.synthetic`` written in each dataset's published layout (see ``bdd100k.py``,
``acdc.py`` and ``mapillary.py`` for the layouts and their sources), so the readers, recipes and
tests run without downloading anything.

BDD100K gets JPEG images and trainId masks (as its sem_seg masks are); ACDC gets one sequence per
condition and split, PNG images given a crude look of the condition (fog: a grey veil growing
towards the horizon; night: dark with a cold tint; rain: darker with bright streaks; snow: white
flakes) and Cityscapes labelIds; Mapillary Vistas gets JPEGs and, as the v2.0 download has, both
label versions: palette label PNGs and a small generated config per version (a dozen labels named
as in that version's official config, two not evaluated; v1.2 in the official alphabetical order,
so its label values differ from v2.0's), not the official configs. Same determinism and atomic
build as the other demo trees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from samtune.constants import ACDC_CONDITIONS as CONDITIONS
from samtune.datasets.cityscapes import map_label_ids
from samtune.datasets.city_scenes import _city_scene
from samtune.datasets.synthetic import _MARKER, _build


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


# The demo's Mapillary Vistas class list: a dozen entries shaped like the official configs' (v1.2
# name, v2.0 name, readable, color, evaluate) with the Cityscapes labelId of the synthetic scene that
# becomes that label. Names as in the official config_v1.2.json / config_v2.0.json (v2.0 splits
# "human--person" into "--individual" and "--person-group"); the v1.2 ones are all in
# mapillary.VISTAS_TO_CITYSCAPES (except the void labels), so data.cityscapes_classes maps them.
_VISTAS_DEMO_LABELS = (
    ("construction--flat--road", "construction--flat--road", "Road", (128, 64, 128), True, 7),
    ("construction--flat--sidewalk", "construction--flat--sidewalk", "Sidewalk", (244, 35, 232), True, 8),
    ("construction--structure--building", "construction--structure--building", "Building", (70, 70, 70), True, 11),
    ("nature--vegetation", "nature--vegetation", "Vegetation", (107, 142, 35), True, 21),
    ("nature--sky", "nature--sky", "Sky", (70, 130, 180), True, 23),
    ("human--person", "human--person--individual", "Person", (220, 20, 60), True, 24),
    ("object--vehicle--car", "object--vehicle--car", "Car", (0, 0, 142), True, 26),
    ("object--support--pole", "object--support--pole", "Pole", (153, 153, 153), True, 17),
    ("object--traffic-sign--front", "object--traffic-sign--front", "Traffic Sign (Front)", (220, 220, 0), True, 20),
    ("nature--terrain", "nature--terrain", "Terrain", (152, 251, 152), True, 22),
    ("void--ego-vehicle", "void--ego-vehicle", "Ego Vehicle", (120, 10, 10), False, 1),
    ("void--unlabeled", "void--unlabeled", "Unlabeled", (0, 0, 0), False, None),  # every other labelId
)  # fmt: skip


def _vistas_demo_version(version: str) -> tuple[dict, np.ndarray, list[int]]:
    """(config, labelId -> label value LUT, palette) of one label version: v2.0 in the order above,
    v1.2 sorted by name as the official v1.2 config is."""
    column = 0 if version == "v1.2" else 1
    entries = sorted(_VISTAS_DEMO_LABELS, key=lambda e: e[0]) if version == "v1.2" else list(_VISTAS_DEMO_LABELS)
    unlabeled = next(v for v, e in enumerate(entries) if e[5] is None)
    lut = np.full(256, unlabeled, np.uint8)
    for value, entry in enumerate(entries):
        if entry[5] is not None:
            lut[entry[5]] = value
    config = {"labels": [{"name": e[column], "readable": e[2], "color": list(e[3]), "instances": False, "evaluate": e[4]}
                         for e in entries]}  # fmt: skip
    palette = [c for e in entries for c in e[3]]
    return config, lut, palette + [0] * (768 - len(palette))  # 256 entries: PIL writes a shorter palette with fewer bits per pixel


def generate_mapillary(out_dir, n_train=3, n_val=2, size_wh=(256, 128), seed=0) -> Path:
    """Write ``out_dir/{training,validation}/images/*.jpg``, ``.../{v1.2,v2.0}/labels/*.png`` (palette
    PNGs of label values) and small ``config_v1.2.json`` / ``config_v2.0.json`` (12 labels each, two
    with ``evaluate: false``) and return ``out_dir``. Names are 22-character keys as Vistas' are; the
    real images vary in size."""
    w, h = (int(v) for v in size_wh)
    _check_size(n_train, n_val, w, h)
    versions = {version: _vistas_demo_version(version) for version in ("v1.2", "v2.0")}
    jobs = [("training", i) for i in range(n_train)] + [("validation", i) for i in range(n_val)]
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))

    def write(tmp: Path) -> None:
        for split, i in jobs:
            rng = np.random.default_rng([seed, 4, split == "validation", i])
            img, label_ids = _city_scene(rng, w, h, ego=i % 2 == 0)
            key = "".join(rng.choice(alphabet, 22))
            (tmp / split / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tmp / split / "images" / f"{key}.jpg", quality=95)
            for version, (_, lut, palette) in versions.items():
                folder = tmp / split / version / "labels"
                folder.mkdir(parents=True, exist_ok=True)
                label = Image.fromarray(lut[label_ids], mode="P")
                label.putpalette(palette)
                label.save(folder / f"{key}.png")
        for split in ("training", "validation"):
            (tmp / split).mkdir(exist_ok=True)
            (tmp / split / _MARKER).write_text(json.dumps({"kind": "mapillary", "seed": seed}))

    _build(out_dir, ["validation", "training"], write)  # training last: its presence = complete
    for version, (config, _, _) in versions.items():  # written after _build's refusal check, atomically
        config_path = Path(out_dir) / f"config_{version}.json"
        config_path.with_suffix(".tmp").write_text(json.dumps(config, indent=1))
        config_path.with_suffix(".tmp").replace(config_path)
    return Path(out_dir)
