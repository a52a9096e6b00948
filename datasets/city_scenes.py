"""Cityscapes-style street scenes drawn with numpy: the generator behind ``samtune demo-data``'s
Cityscapes tree (``synthetic.generate_cityscapes``) and the BDD100K, ACDC and Mapillary Vistas demo
trees (``driving_demo``). A scene is a road to a vanishing point, sidewalks, façades, cars,
people, poles, trees and clutter painted far to near, rendered with per-object colours, shading
and noise; labels are Cityscapes labelIds, and cars and persons are annotated objects
(``*_gtFine_instanceIds.png``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

CS_REQUIRED_IDS = (7, 8, 11, 23, 26)  # in every image


def smooth_field(rng, shape, grid):
    """Low-frequency random field in [-1, 1]: a coarse ``grid`` of normals, linearly upsampled."""
    field = ndimage.zoom(rng.standard_normal(grid), np.divide(shape, grid), order=1, mode="nearest")
    return field / max(np.abs(field).max(), 1e-6)


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

    missing = set(CS_REQUIRED_IDS) - set(np.unique(cv.label).tolist())
    if missing:
        raise RuntimeError(f"size {w}x{h} too small: scene lacks labelIds {sorted(missing)}")
    return _render(cv, rng, yh), cv.label, cv.instance_ids()


def _render(cv: _Canvas, rng, horizon: float) -> np.ndarray:
    """H×W×3 uint8: instance colours, a sky gradient, façade windows, low-frequency shading and noise."""
    yy, xx = cv.yy, cv.xx
    img = np.asarray(cv.colours)[cv.inst]
    img[cv.label == 23] += (30.0 * (yy / max(horizon, 1.0)))[cv.label == 23, None]
    px, py = rng.integers(8, 16), rng.integers(10, 18)
    windows = (cv.label == 11) & (xx % px < px * 0.45) & (yy % py < py * 0.5)
    img[windows] *= 0.7
    img *= 1.0 + 0.12 * smooth_field(rng, img.shape[:2], (4, 8))[..., None]
    img += rng.normal(0.0, 6.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
