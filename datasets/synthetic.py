"""Deterministic synthetic demo data: an abdominal CT phantom and a Cityscapes-style street tree.

Why: recipes, loaders and tests need data with the exact on-disk layout of the real datasets
(nnU-Net v2 raw ``Dataset900_CTPhantom/{imagesTr,labelsTr,dataset.json}``; Cityscapes
``leftImg8bit``/``gtFine`` with the real labelIds) without downloading or licensing anything. The
content is simple but not trivial: classes differ by appearance (HU or colour, plus texture and
noise) rather than by one exact value, and the CT carries a non-identity, LPS-style affine as
scanner exports do, so orientation handling is really exercised.

Determinism: case/image ``i`` draws only from ``default_rng([seed, stream, ..., i])``: a seed gives
byte-identical files (nibabel gzips with mtime 0; PNGs carry no time), whatever the case count.
Atomicity: each tree is built in a hidden ``.tmp-synthetic-*`` folder beside its destination and
renamed into place at the end, so an interrupted run never leaves a dataset that looks complete.
An existing destination is replaced only when it carries our marker file (never real data).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from samtune.datasets.city_scenes import city_scene, smooth_field as _smooth_field

CT_DATASET_NAME = "Dataset900_CTPhantom"
CT_LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4}
# Real Cityscapes labelIds used here. 0-4 are ignored in training (trainId 255).
CS_LABEL_IDS = {"unlabeled": 0, "ego vehicle": 1, "out of roi": 3, "static": 4, "road": 7,
                "sidewalk": 8, "building": 11, "pole": 17, "traffic sign": 20, "vegetation": 21,
                "terrain": 22, "sky": 23, "person": 24, "car": 26}
_MARKER = ".samtune_synthetic"  # marks folders this module wrote (and may therefore replace)

# Organs in the body frame (RAS+: +x = patient Right, +y = Anterior, +z = Superior). Centres and
# radii are fractions of the body semi-axes (a, b) in-plane and of the half z field of view, so any
# volume shape holds a complete abdomen. Listed in painting priority: later organs are carved
# around earlier ones (right kidney indents the liver, left kidney the spleen).
_ORGANS = (  # (label, centre, radii, mean HU, portal-venous phase)
    (3, (+0.30, -0.48, -0.30), (0.14, 0.22, 0.40), 160.0),  # kidney_right: posterior, right
    (4, (-0.30, -0.48, -0.22), (0.14, 0.22, 0.40), 160.0),  # kidney_left: slightly higher
    (2, (-0.52, -0.22, +0.35), (0.17, 0.30, 0.40), 120.0),  # spleen: left, posterolateral, high
    (1, (+0.42, +0.05, +0.20), (0.36, 0.58, 0.60), 100.0),  # liver: right, large z range
)
_HU_AIR, _HU_FAT, _HU_SOFT, _HU_BONE = -1000.0, -100.0, 40.0, 700.0
_IN_PLANE = ndimage.generate_binary_structure(2, 1)[..., None]  # 4-neighbourhood within a slice


def _build(out_dir, names, write) -> None:
    """Run ``write(tmp)`` in a temp folder inside ``out_dir``, then move each ``tmp/name`` to
    ``out_dir/name`` in order. Old synthetic copies are all moved away first (into ``tmp``), so an
    interruption leaves missing folders, never a mix of old and new data; list last the folder a
    loader looks for first (e.g. ``leftImg8bit``)."""
    parent = Path(out_dir)
    parent.mkdir(parents=True, exist_ok=True)
    for name in names:  # checked before spending time and again before replacing
        if (parent / name).exists() and not (parent / name / _MARKER).is_file():
            raise FileExistsError(f"{parent / name} exists and was not written by "
                                  "samtune.datasets.synthetic; refusing to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-synthetic-", dir=parent))
    try:
        write(tmp)
        for name in names:
            if (parent / name / _MARKER).is_file():
                os.replace(parent / name, tmp / f"old-{name}")
        for name in names:
            os.replace(tmp / name, parent / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------- (a) CT phantom ----------------------------------------
def _ct_case(rng, shape, spacing):
    """One case: (HU int16, label uint8, affine voxel -> RAS+ mm); arrays are (x, y, z)."""
    n, sp = np.asarray(shape), np.asarray(spacing, float)
    # Scanner geometry. Voxel i runs toward patient Left and j toward Posterior (LPS storage as in
    # DICOM-derived NIfTI), so the affine diagonal is (-sx, -sy, +sz); plus a small rotation about
    # z and a table-dependent, non-zero origin (world position of voxel (0, 0, 0), mm).
    ang = np.deg2rad(rng.uniform(-4.0, 4.0))
    rot = np.array([[np.cos(ang), -np.sin(ang), 0], [np.sin(ang), np.cos(ang), 0], [0, 0, 1]])
    lin = rot @ np.diag([-sp[0], -sp[1], sp[2]])
    centre = np.array([rng.uniform(-15, 15), rng.uniform(-40, 0), rng.uniform(-700, -400)])
    affine = nib.affines.from_matvec(lin, centre - lin @ ((n - 1) / 2.0))

    # World (RAS+ mm) coordinates relative to the body centre. The rotation is about z only, so
    # x, y depend on (i, j) and z on k alone: px, py are (nx, ny), pz is (nz,).
    half = sp * n / 2.0  # half field of view, mm
    body_c = centre + np.array([*(rng.uniform(-0.03, 0.03, 2) * half[:2]), 0.0])
    ii, jj = np.meshgrid(np.arange(n[0]), np.arange(n[1]), indexing="ij")
    px = lin[0, 0] * ii + lin[0, 1] * jj + affine[0, 3] - body_c[0]
    py = lin[1, 0] * ii + lin[1, 1] * jj + affine[1, 3] - body_c[1]
    pz = lin[2, 2] * np.arange(n[2]) + affine[2, 3] - body_c[2]

    # Body: elliptical cross-section filling most of the in-plane FOV; a subcutaneous fat rim.
    a, b = 0.86 * half[0] * rng.uniform(0.95, 1.02), 0.62 * half[1] * rng.uniform(0.95, 1.05)
    fat = rng.uniform(0.10, 0.16) * b  # 12-19 mm at the default size
    body = (px / a) ** 2 + (py / b) ** 2 < 1
    inner = (px / (a - fat)) ** 2 + (py / (b - fat)) ** 2 < 1
    # Spine, posterior midline: vertebral body disc and a posterior arch ring around the canal.
    arch_r = np.hypot(px, py + 0.78 * b)
    bone = (np.hypot(px, py + 0.55 * b) < 0.16 * b) | ((arch_r < 0.12 * b) & (arch_r > 0.06 * b))

    # Organs: deformed ellipsoids. A smooth random displacement field (mm) shared by all organs,
    # plus a per-organ low-frequency radial wobble; centres shift, radii vary by +-15 %.
    scale = np.array([a, b, half[2]])
    disp = [0.05 * min(a, b) * _smooth_field(rng, tuple(n), (4, 4, 3)) for _ in range(3)]
    p = (px[..., None] + disp[0], py[..., None] + disp[1], pz[None, None, :] + disp[2])
    allowed = inner[..., None] & ~ndimage.binary_dilation(bone, iterations=2)[..., None]
    label = np.zeros(shape, np.uint8)
    hu = np.select([bone, inner, body], [_HU_BONE, _HU_SOFT, _HU_FAT], _HU_AIR)  # (nx, ny)
    hu = hu[..., None].repeat(n[2], axis=2)
    for lab, c, r, mean_hu in _ORGANS:
        c = np.multiply(c, scale) + rng.normal(0.0, 0.03, 3) * scale
        r = np.multiply(r, scale) * rng.uniform(0.85, 1.15, 3)
        q = [(p[d] - c[d]) / r[d] for d in range(3)]
        theta = np.arctan2(q[1], q[0])
        wobble = sum(rng.uniform(0.03, 0.08) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                     for k in (2, 3))
        mask = (q[0] ** 2 + q[1] ** 2 + q[2] ** 2 < (1 + wobble) ** 2) & allowed
        mask &= ~ndimage.binary_dilation(label > 0)  # a soft-tissue gap to organs already placed
        area = mask.sum(axis=(0, 1))  # drop polar caps: each organ slice is clearly visible
        mask[:, :, area < 0.2 * max(area.max(), 1)] = False
        if lab in (3, 4):  # perirenal fat around the kidneys
            ring = ndimage.binary_dilation(mask, _IN_PLANE) & ~mask & allowed & (label == 0)
            hu[ring] = _HU_FAT + 10.0
        label[mask] = lab
        hu[mask] = mean_hu + rng.uniform(-5.0, 5.0)

    # Appearance: smooth texture (+-15 HU) inside the body, slight partial-volume blur,
    # Gaussian noise (sigma 15 HU) everywhere; stored as int16 HU in the scanner range.
    hu += 15.0 * _smooth_field(rng, tuple(n), (6, 6, 4)) * body[..., None]
    hu = ndimage.gaussian_filter(hu, sigma=(0.5, 0.5, 0.3))
    hu += rng.normal(0.0, 15.0, hu.shape)
    present = set(np.unique(label).tolist())
    if present != set(CT_LABELS.values()):  # a contract, not a statistic: fail loudly
        raise RuntimeError(f"shape {shape} too small: labels present {sorted(present)}")
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label, affine


def _save_nifti(arr, affine, path: Path) -> None:
    img = nib.Nifti1Image(arr, affine)
    img.set_qform(affine, code=1)  # 1 = scanner anatomical
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def generate_ct_phantom(out_dir, n_cases=8, shape=(128, 128, 32), spacing_mm=(3.0, 3.0, 5.0),
                        seed=0) -> Path:
    """Write ``out_dir/Dataset900_CTPhantom`` in nnU-Net v2 raw layout and return that folder.

    ``shape`` is voxels (x, y, z), at least (40, 40, 10) so organs span several slices;
    ``spacing_mm`` is mm per voxel. Images are int16 HU (``imagesTr/phantom_000_0000.nii.gz``),
    labels uint8 with ``CT_LABELS`` (``labelsTr/phantom_000.nii.gz``); both share one affine.
    """
    if n_cases < 1 or len(shape) != 3 or min(shape[0], shape[1]) < 40 or shape[2] < 10:
        raise ValueError(f"need n_cases >= 1 and shape >= (40, 40, 10), got {n_cases}, {shape}")

    def write(tmp: Path) -> None:
        root = tmp / CT_DATASET_NAME
        (root / "imagesTr").mkdir(parents=True)
        (root / "labelsTr").mkdir()
        for case in range(n_cases):
            hu, label, affine = _ct_case(np.random.default_rng([seed, 0, case]), shape, spacing_mm)
            _save_nifti(hu, affine, root / "imagesTr" / f"phantom_{case:03d}_0000.nii.gz")
            _save_nifti(label, affine, root / "labelsTr" / f"phantom_{case:03d}.nii.gz")
        meta = {"channel_names": {"0": "CT"}, "labels": dict(CT_LABELS), "numTraining": n_cases,
                "file_ending": ".nii.gz", "name": CT_DATASET_NAME,
                "description": "synthetic abdominal CT phantom (liver, spleen, kidneys) in HU; "
                               f"generated by samtune.datasets.synthetic with seed {seed}"}
        (root / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        (root / _MARKER).write_text(json.dumps({"kind": "ct", "seed": seed}) + "\n")

    _build(out_dir, [CT_DATASET_NAME], write)
    return Path(out_dir) / CT_DATASET_NAME


# ---------------------------------- (b) Cityscapes-style scenes ----------------------------------
def generate_cityscapes(out_dir, n_train=24, n_val=8, size_wh=(512, 256), seed=0) -> Path:
    """Write ``out_dir/leftImg8bit`` and ``out_dir/gtFine`` (labelIds and 16-bit instanceIds PNGs, each
    scene with a row of touching parked cars) and return ``out_dir``.

    Train images are split between "aachen" and "bochum", val images go to "frankfurt"; names
    follow ``{city}_{seq:06d}_000019_{leftImg8bit,gtFine_labelIds}.png``. ``size_wh`` is (width,
    height) in px, at least (64, 32); the real data is 2048x1024.
    """
    w, h = (int(v) for v in size_wh)
    if n_train < 0 or n_val < 0 or w < 64 or h < 32:
        raise ValueError(f"need n_train, n_val >= 0 and size_wh >= (64, 32), got {size_wh}")
    n_aachen = (n_train + 1) // 2
    jobs = [("train", "aachen", 0, i) for i in range(n_aachen)]  # (split, city, city code, index)
    jobs += [("train", "bochum", 1, i) for i in range(n_train - n_aachen)]
    jobs += [("val", "frankfurt", 2, i) for i in range(n_val)]

    def write(tmp: Path) -> None:
        for split, city, code, i in jobs:
            img, lab, inst = city_scene(np.random.default_rng([seed, 1, code, i]), w, h, i % 2 == 0,
                                        np.random.default_rng([seed, 2, code, i]))
            stem = f"{city}_{i:06d}_000019"
            for top, suffix, arr in (("leftImg8bit", "leftImg8bit", img),
                                     ("gtFine", "gtFine_labelIds", lab), ("gtFine", "gtFine_instanceIds", inst)):
                folder = tmp / top / split / city
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(folder / f"{stem}_{suffix}.png")
        for top in ("leftImg8bit", "gtFine"):
            (tmp / top).mkdir(exist_ok=True)
            (tmp / top / _MARKER).write_text(json.dumps({"kind": "cityscapes", "seed": seed}))

    _build(out_dir, ["gtFine", "leftImg8bit"], write)  # leftImg8bit last: its presence = complete
    return Path(out_dir)


def generate_demo_data(out_dir, seed=0, kinds=("ct", "cityscapes")) -> dict[str, Path]:
    """Write default-sized ``out_dir/Dataset900_CTPhantom`` and ``out_dir/cityscapes`` (those in
    ``kinds``); return ``{"ct": path, "cityscapes": path}`` for the kinds written. The DICOM export
    of the phantom builds on this module: ``samtune.datasets.dicom_demo``."""
    unknown = set(kinds) - {"ct", "cityscapes"}
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}; choose from 'ct', 'cityscapes'")
    out, paths = Path(out_dir), {}
    if "ct" in kinds:
        paths["ct"] = generate_ct_phantom(out, seed=seed)
    if "cityscapes" in kinds:
        paths["cityscapes"] = generate_cityscapes(out / "cityscapes", seed=seed)
    return paths
