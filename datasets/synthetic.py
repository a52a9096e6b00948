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

CT_DATASET_NAME = "Dataset900_CTPhantom"
CT_LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4}
# Real Cityscapes labelIds used here. 0-4 are ignored in training (trainId 255).
CS_LABEL_IDS = {"unlabeled": 0, "ego vehicle": 1, "out of roi": 3, "static": 4, "road": 7,
                "sidewalk": 8, "building": 11, "pole": 17, "traffic sign": 20, "vegetation": 21,
                "terrain": 22, "sky": 23, "person": 24, "car": 26}
CS_REQUIRED_IDS = (7, 8, 11, 23, 26)  # in every image
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


def _smooth_field(rng, shape, grid):
    """Low-frequency random field in [-1, 1]: a coarse ``grid`` of normals, linearly upsampled."""
    field = ndimage.zoom(rng.standard_normal(grid), np.divide(shape, grid), order=1, mode="nearest")
    return field / max(np.abs(field).max(), 1e-6)


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
_CS_COLOUR = {0: (20, 20, 20), 1: (35, 35, 42), 3: (8, 8, 8), 4: (125, 100, 70), 7: (92, 90, 98),
              8: (165, 155, 145), 11: (150, 118, 96), 17: (78, 78, 84), 20: (205, 175, 40),
              21: (62, 112, 46), 22: (135, 150, 82), 23: (130, 175, 230), 24: (105, 75, 95),
              26: (70, 85, 140)}  # RGB base colour per labelId; instances jitter around it


class _Canvas:
    """Label map plus instance map; each painted instance gets its own jittered colour, so the
    image edges are exactly the label edges. Coordinates are pixels, (x, y) = (column, row)."""

    def __init__(self, w, h, rng):
        self.rng, self.yy, self.xx = rng, *np.mgrid[0:h, 0:w].astype(np.float32)
        self.label, self.inst = np.zeros((h, w), np.uint8), np.zeros((h, w), int)
        self.obj = np.zeros((h, w), np.int32)  # annotated object (thing classes): 0 none, painted over -> 0
        self.colours = [np.zeros(3)]  # instance 0: never shown, everything is painted over

    def paint(self, mask, cls, sd=12.0, colour=None, obj=0, rng=None):
        base = np.asarray(_CS_COLOUR[cls] if colour is None else colour, float)
        self.colours.append(base + (rng or self.rng).normal(0.0, sd, 3))
        self.label[mask], self.inst[mask], self.obj[mask] = cls, len(self.colours) - 1, obj

    def instance_ids(self) -> np.ndarray:
        """H×W uint16 Cityscapes instanceIds: labelId × 1000 + n for the n-th (from 0) visible object
        of a class, as cityscapesScripts' json2instanceImg numbers them; the labelId elsewhere."""
        ids = self.label.astype(np.uint16)
        counts: dict[int, int] = {}
        for obj in np.unique(self.obj[self.obj > 0]).tolist():
            where = self.obj == obj
            cls = int(self.label[where][0])
            ids[where] = cls * 1000 + counts.get(cls, 0)
            counts[cls] = counts.get(cls, 0) + 1
        return ids

    def rect(self, x0, y0, x1, y1):
        return (self.xx >= x0) & (self.xx < x1) & (self.yy >= y0) & (self.yy < y1)

    def ellipse(self, cx, cy, rx, ry):
        return ((self.xx - cx) / max(rx, 0.5)) ** 2 + ((self.yy - cy) / max(ry, 0.5)) ** 2 < 1


def _parked_cars(cv: _Canvas, rng, row: bool, road_edges: tuple[float, float], y: float, m: float, n_obj: int) -> int:
    """Cars parked along one road edge with their base on row ``y`` (``m`` px per metre): a row of
    2-4 touching cars, each an object (``row``), or one "car group" region that is none. Returns the
    objects numbered so far."""
    left = rng.uniform() < 0.5
    cw, ch = m * rng.uniform(1.7, 2.0), m * rng.uniform(1.35, 1.6)
    n = int(rng.integers(2, 5)) if row else 1
    x0 = road_edges[0] + 0.1 * m if left else road_edges[1] - 0.1 * m - n * cw
    for j in range(n):
        n_obj += row
        box = cv.rect(x0 + j * cw, y - 0.6 * ch, x0 + (j + 1) * cw, y)
        cabin = cv.rect(x0 + (j + 0.15) * cw, y - ch, x0 + (j + 0.85) * cw, y - 0.6 * ch)
        cv.paint(box | cabin, 26, sd=45, obj=n_obj if row else 0, rng=rng)
    return n_obj


def _city_scene(rng, w, h, ego):
    """One street scene of ``w`` x ``h`` px: (RGB uint8 (h, w, 3), labelIds uint8 (h, w))."""
    return city_scene(rng, w, h, ego)[:2]


def city_scene(rng, w, h, ego, row_rng=None):
    """(RGB uint8 (h, w, 3), labelIds uint8 (h, w), instanceIds uint16 (h, w)) of one street scene.

    Cars and persons are annotated objects. ``row_rng``: also a row of 2-4 cars parked bumper to
    bumper along a curb (touching: one connected component, several instances) and, in some
    scenes, a "car group" region (labelId 26 without an instance number, as Cityscapes marks a
    crowd of cars), drawn from this generator so the rest of the scene stays as without it.
    """
    cv, U = _Canvas(w, h, rng), rng.uniform
    yy, xx = cv.yy, cv.xx
    yh, xv = h * U(0.36, 0.5), w * U(0.35, 0.65)  # horizon row, vanishing-point column
    t = np.clip((yy - yh) / (h - yh), 0, None)  # ground depth factor: 0 at horizon, 1 bottom row
    xl, xr = w * U(0.08, 0.22), w * U(0.78, 0.92)  # road edges on the bottom row
    sl, sr = xl - w * U(0.12, 0.25), xr + w * U(0.12, 0.25)  # outer sidewalk edges
    line = lambda xb: xv + (xb - xv) * t  # noqa: E731  ground line through the vanishing point
    ground = yy > yh
    cv.paint(np.ones((h, w), bool), 23, sd=8)  # sky
    cv.paint(yy > yh - h * U(0.03, 0.08), 11)  # distant buildings along the horizon
    cv.paint(ground & (xx >= line(sl)) & (xx < line(xl)), 8)  # left and right sidewalks
    cv.paint(ground & (xx >= line(xr)) & (xx < line(sr)), 8)
    cv.paint(ground & (xx >= line(xl)) & (xx < line(xr)), 7)  # road
    if U() < 0.4:  # a grass verge on the outer part of the left sidewalk
        cv.paint(ground & (xx >= line(sl)) & (xx < line(sl + 0.3 * (xl - sl))), 22)
    for x_out, x_edge in ((sl, 0.0), (sr, float(w))):  # façades standing on the sidewalk edges
        yb = yh + (h - yh) * (xx - xv) / (x_out - xv)  # row where this column meets the façades
        u = 1.0 + U(0.0, 0.3)  # block edges are spaced geometrically: wider near the camera
        while u > 0.08:
            u_next = u * U(0.55, 0.8)
            xa, xb = sorted((xv + (x_edge - xv) * u, xv + (x_edge - xv) * u_next))
            hedge = U() < 0.2  # a low, ragged-topped hedge instead of a façade
            k = U(0.3, 0.9) + 0.1 * np.sin(xx / U(2, 6)) if hedge else U(1.2, 4.0)  # / eye height
            top = yh - k * (yb - yh)  # roof line, also through the vanishing point
            cv.paint((xx >= xa) & (xx < xb) & (yy < yb) & (yy >= top), 21 if hedge else 11)
            u = u_next

    # Objects standing on the ground, painted far to near so nearer ones occlude.
    ego_top = h * (1 - U(0.07, 0.12)) if ego else float(h)
    y_of = lambda t0, t1: yh + (ego_top - yh) * U(t0, t1)  # noqa: E731  base row in a depth range
    objs = [("car", y_of(0.25, 0.6))]  # at a middle distance: every scene shows a car
    objs += [("car", y_of(0.15, 0.95)) for _ in range(rng.integers(1, 6))]
    objs += [("person", y_of(0.2, 0.95)) for _ in range(rng.integers(1, 5) if U() < 0.85 else 0)]
    objs += [("pole", y_of(0.15, 0.9)) for _ in range(rng.integers(1, 4) if U() < 0.85 else 0)]
    objs += [("tree", y_of(0.1, 0.8)) for _ in range(rng.integers(1, 4) if U() < 0.85 else 0)]
    objs += [("static", y_of(0.2, 0.9)) for _ in range(rng.integers(1, 4))]
    if row_rng is not None:
        objs += [("row", yh + (ego_top - yh) * row_rng.uniform(0.35, 0.8))]
        objs += [("group", yh + (ego_top - yh) * row_rng.uniform(0.2, 0.4))] if row_rng.uniform() < 0.5 else []
    n_obj = 0
    for kind, y in sorted(objs, key=lambda o: o[1]):
        tt = (y - yh) / (h - yh)
        m = (xr - xl) * tt / 8.0  # pixels per metre at this row: the road is 8 m wide
        if kind in ("row", "group"):  # parked cars from row_rng: the main generator's draws are untouched
            edges = (xv + (xl - xv) * tt, xv + (xr - xv) * tt)  # the road's edges at this row
            n_obj = _parked_cars(cv, row_rng, kind == "row", edges, y, m, n_obj)
            continue
        curb, out = (xl, sl) if U() < 0.5 else (xr, sr)  # which sidewalk; its edges at this row:
        x_curb, x_out = xv + (curb - xv) * tt, xv + (out - xv) * tt
        xs = x_curb + (x_out - x_curb) * U(0.15, 0.85)  # somewhere on that sidewalk
        if kind == "car":
            cw, ch = m * U(1.7, 2.0), m * U(1.35, 1.6)
            cx = xv + (xl - xv) * tt + 8 * m * U(0.12, 0.88)
            n_obj += 1
            cv.paint(cv.rect(cx - cw / 2, y - 0.6 * ch, cx + cw / 2, y), 26, sd=45, obj=n_obj)  # body
            cv.paint(cv.rect(cx - 0.35 * cw, y - ch, cx + 0.35 * cw, y - 0.6 * ch), 26, sd=10,
                     colour=(45, 55, 70), obj=n_obj)  # cabin with dark glass
        elif kind == "person":
            ph = m * U(1.55, 1.9)
            body = cv.rect(xs - 0.12 * ph, y - 0.8 * ph, xs + 0.12 * ph, y - 0.48 * ph)
            legs = cv.rect(xs - 0.08 * ph, y - 0.48 * ph, xs + 0.08 * ph, y)
            head = cv.ellipse(xs, y - 0.88 * ph, 0.07 * ph, 0.08 * ph)
            n_obj += 1
            cv.paint(body | legs | head, 24, sd=40, obj=n_obj)
        elif kind == "pole":
            xp, pw = x_curb + (x_out - x_curb) * 0.1, max(1.0, 0.15 * m)
            cv.paint(cv.rect(xp - pw / 2, y - 6 * m, xp + pw / 2 + 0.5, y), 17)
            if U() < 0.6:
                cv.paint(cv.rect(xp - 0.35 * m, y - 5.8 * m, xp + 0.35 * m, y - 5.1 * m), 20)
        elif kind == "tree":
            rx, ry = m * U(1.2, 2.5), m * U(1.5, 2.8)
            crown = cv.ellipse(xs, y - 2.5 * m - ry, rx, ry)
            cv.paint(crown | cv.rect(xs - 0.2 * m, y - 2.8 * m, xs + 0.2 * m + 0.5, y), 21)
        else:  # static clutter: bins, boxes, benches
            sw, shh = m * U(0.5, 1.3), m * U(0.5, 1.1)
            cv.paint(cv.rect(xs - sw / 2, y - shh, xs + sw / 2 + 0.5, y), 4)

    if ego:  # bonnet of the recording car: highest mid-image, falling off to the sides
        cv.paint(yy >= ego_top - h * 0.04 * (1 - ((xx - w / 2) / (w / 2)) ** 2), 1, sd=5)
    border = int(rng.integers(1, 3))  # "out of roi": a thin frame from image rectification
    frame = (xx < border) | (xx >= w - border) | (yy >= h - border)
    cv.paint(frame, 3, sd=3)
    for _ in range(rng.integers(2, 5)):  # a few small regions the annotators left unlabeled
        cv.paint(cv.ellipse(U(0, w), U(0, h), U(1, 4), U(1, 4)) & ~frame, 0, sd=30)

    # Render: instance colours, a sky gradient, façade windows, low-frequency shading and noise.
    img = np.asarray(cv.colours)[cv.inst]
    img[cv.label == 23] += (30.0 * (yy / max(yh, 1.0)))[cv.label == 23, None]
    px, py = rng.integers(8, 16), rng.integers(10, 18)
    windows = (cv.label == 11) & (xx % px < px * 0.45) & (yy % py < py * 0.5)
    img[windows] *= 0.7
    img *= 1.0 + 0.12 * _smooth_field(rng, (h, w), (4, 8))[..., None]
    img += rng.normal(0.0, 6.0, img.shape)
    missing = set(CS_REQUIRED_IDS) - set(np.unique(cv.label).tolist())
    if missing:
        raise RuntimeError(f"size {w}x{h} too small: scene lacks labelIds {sorted(missing)}")
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), cv.label, cv.instance_ids()


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
