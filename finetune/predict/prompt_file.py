"""The prompts file of ``samtune predict --prompts FILE``: boxes and/or points per class, in
pixel, voxel or world (RAS/LPS mm) coordinates, read and checked before any prediction runs.

    {"coordinates": "voxel",
     "prompts": [{"class": "liver", "box": [[40, 52, 20], [95, 110, 20]]},
                 {"class": "spleen", "points": [[130, 80, 24]], "labels": [1], "input": "case_007"}]}

Every problem is a ``SamtuneError`` naming the file, the prompt's index and what to write instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samtune import SamtuneError
from samtune.suggest import did_you_mean

COORDINATES = ("pixel", "voxel", "RAS", "LPS")


@dataclass
class Prompt:
    """One prompt of the prompts file, as given (coordinates not yet mapped)."""

    class_name: str
    box: list | None = None
    points: list | None = None
    labels: list | None = None
    input: str | None = None  # the input it applies to (file name or stem); None: every input
    where: str = ""  # "prompts.json: prompts[2]" for messages

    def applies_to(self, name: str, file: Path | None = None) -> bool:
        """Whether this prompt is for the input named ``name`` (output name) read from ``file``:
        every input when no input is given; else the name, the file name or the file's stem."""
        if self.input is None:
            return True
        given = {self.input, _strip(self.input)}
        return name in given or (file is not None and bool({file.name, _strip(file.name)} & given))


@dataclass
class PromptSet:
    coordinates: str | None
    prompts: list[Prompt] = field(default_factory=list)

    def for_input(self, name: str, file: Path | None = None) -> list[Prompt]:
        return [p for p in self.prompts if p.applies_to(name, file)]


def _strip(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_prompts(path: str | Path, class_names: list[str]) -> PromptSet:
    """Read and check a prompts JSON: ``{"coordinates": "pixel|voxel|RAS|LPS", "prompts": [{"class":
    "liver", "box": ..., "points": [...], "labels": [1, 0], "input": "case_001"}]}``."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise SamtuneError(f"--prompts {path}: cannot read it ({exc.strerror or exc}).") from None
    except ValueError as exc:
        raise SamtuneError(f"--prompts {path}: not valid JSON ({exc}).") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("prompts"), list):
        raise SamtuneError(f'--prompts {path}: expected {{"coordinates": ..., "prompts": [{{"class": ..., "box": ...}}, ...]}}.')
    unknown = set(raw) - {"coordinates", "prompts"}
    if unknown:
        raise SamtuneError(f"--prompts {path}: unknown keys {sorted(unknown)} (keys: coordinates, prompts).")
    coordinates = raw.get("coordinates")
    if coordinates is not None and coordinates not in COORDINATES:
        raise SamtuneError(f"--prompts {path}: coordinates={coordinates!r}; use one of {', '.join(COORDINATES)}.")
    if not raw["prompts"]:
        raise SamtuneError(f"--prompts {path}: the prompts list is empty; give at least one box or points per class to segment.")
    out = PromptSet(coordinates)
    for k, item in enumerate(raw["prompts"]):
        where = f"--prompts {path}: prompts[{k}]"
        if not isinstance(item, dict):
            raise SamtuneError(f"{where}: expected an object with class and box and/or points.")
        extra = set(item) - {"class", "box", "points", "labels", "input"}
        if extra:
            raise SamtuneError(f"{where}: unknown keys {sorted(extra)} (keys: class, box, points, labels, input).")
        name = item.get("class")
        if name not in class_names:
            raise SamtuneError(f"{where}: class {name!r} is not a class of this checkpoint; {did_you_mean(str(name), class_names)}(classes: {', '.join(class_names)}).")
        box, points, labels = item.get("box"), item.get("points"), item.get("labels")
        if box is None and points is None:
            raise SamtuneError(f"{where}: give a box and/or points.")
        if labels is not None and points is None:
            raise SamtuneError(f"{where}: labels without points; labels give one 1 (inside) or 0 (outside) per point.")
        if item.get("input") is not None and not isinstance(item["input"], str):
            raise SamtuneError(f"{where}: input={item['input']!r}; give the input's file name or name as a string.")
        try:
            if box is not None:
                box = np.asarray(box, float)
                if box.shape not in ((4,), (2, 3)):
                    raise ValueError("box must be [x0, y0, x1, y1] (pixel) or two opposite corners [[.,.,.], [.,.,.]] (voxel/RAS/LPS)")
            if points is not None:
                points = np.asarray(points, float)
                if points.ndim != 2 or points.shape[1] not in (2, 3) or len(points) == 0:
                    raise ValueError("points must be a list of [x, y] (pixel) or [., ., .] (voxel/RAS/LPS)")
                labels = np.ones(len(points), int) if labels is None else np.asarray(labels, int)
                if labels.shape != (len(points),) or not set(labels.tolist()) <= {0, 1}:
                    raise ValueError("labels must hold one 1 (inside) or 0 (outside) per point")
            if any(v is not None and not np.isfinite(v).all() for v in (box, points)):
                raise ValueError("coordinates must be finite numbers")
        except (ValueError, TypeError) as exc:
            raise SamtuneError(f"{where}: {exc}.") from None
        out.prompts.append(Prompt(name, box, points, labels, item.get("input"), where))
    return out


def check_pixel_prompt(prompt: Prompt, shape: tuple[int, int], name: str) -> None:
    """A prompt on an image: a box [x0, y0, x1, y1] within 0..w, 0..h (pixel edges) with x0 < x1 and
    y0 < y1; points [x, y] on a pixel (indices -0.5..w-0.5, -0.5..h-0.5)."""
    h, w = shape
    box, points = prompt.box, prompt.points
    if box is not None:
        if box.shape != (4,):
            raise SamtuneError(f"{prompt.where}: a box on an image (coordinates \"pixel\") is [x0, y0, x1, y1], not {box.tolist()} ({name}).")
        if not (box[0] < box[2] and box[1] < box[3]):
            raise SamtuneError(f"{prompt.where}: box {box.tolist()} is empty or inverted; give [x0, y0, x1, y1] with x0 < x1 and y0 < y1.")
        if box.min() < 0 or box[0::2].max() > w or box[1::2].max() > h:
            raise SamtuneError(f"{prompt.where}: box {box.tolist()} lies outside {name} ({w}×{h} px: x 0..{w}, y 0..{h}).")
    if points is not None:
        if points.shape[1] != 2:
            raise SamtuneError(f"{prompt.where}: coordinates \"pixel\" take 2 numbers per point (x, y) on {name}, not {points.tolist()}.")
        if (points < -0.5).any() or (points[:, 0] > w - 0.5).any() or (points[:, 1] > h - 0.5).any():
            raise SamtuneError(f"{prompt.where}: points {points.tolist()} lie outside {name} ({w}×{h} px: x 0..{w - 1}, y 0..{h - 1}).")


def display_prompt(p: Prompt, coordinates: str, path: Path, meta: dict):
    """A volume prompt -> (display slice z, box xyxy or None, points N×2 or None) in slice px."""
    from samtune.datasets.nifti_geometry import voxel_to_display, world_to_display

    if coordinates == "pixel":
        raise SamtuneError(f"{p.where}: volumes take coordinates \"voxel\" (i, j, k of the file), \"RAS\" or \"LPS\" (mm), not \"pixel\".")

    def to_display(xyz) -> np.ndarray:
        xyz = np.asarray(xyz, float)
        if xyz.shape != (3,):
            raise SamtuneError(f"{p.where}: coordinates {coordinates!r} take 3 numbers per point, got {xyz.tolist()}.")
        if coordinates == "voxel":
            zrc = np.asarray(voxel_to_display(xyz, path, meta))
        else:
            zrc = np.asarray(world_to_display(xyz, coordinates, path, meta))
        # the same voxel given in mm (RAS/LPS) lands within rounding error of its index: snap it,
        # so voxel, RAS and LPS prompts for the same place give the same box
        return np.where(np.abs(zrc - np.round(zrc)) < 1e-6, np.round(zrc), zrc)

    if p.box is not None and p.box.shape != (2, 3):
        raise SamtuneError(f"{p.where}: a volume box is two opposite corners [[., ., .], [., ., .]] (coordinates {coordinates!r}), not {p.box.tolist()}.")
    corners = [to_display(c) for c in p.box] if p.box is not None else []
    points = [to_display(c) for c in p.points] if p.points is not None else []
    allz = [c[0] for c in corners + points]
    z = int(round(allz[0]))
    if max(abs(v - z) for v in allz) > 0.5 + 1e-6:
        raise SamtuneError(f"{p.where}: the box corners and points lie on different axial slices ({sorted(set(int(round(v)) for v in allz))}); give a prompt on one slice, it is propagated through the volume.")
    box = None
    if corners:
        rows, cols = [c[1] for c in corners], [c[2] for c in corners]
        box = np.array([min(cols), min(rows), max(cols) + 1, max(rows) + 1], float)  # voxel centres -> pixel edges
    pts = np.array([[c[2], c[1]] for c in points], float) if points else None  # (x, y) = (column, row) indices
    return z, box, pts
