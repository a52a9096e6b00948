"""Recipe -> train and validation datasets (generating the demo data when the recipe asks).

``build_sources`` turns the ``data:`` section into two slice sources (the split, the cache, the bad
cases left out); ``build_datasets`` wraps them into prompted datasets for the trainer, and
``samtune inspect`` reports on the same sources.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samtune import SamtuneError
from samtune.datasets.augment import build_augmentation
from samtune.datasets.cache import default_cache_dir
from samtune.datasets.checks import log_skipped
from samtune.datasets.cityscapes import CityscapesSource
from samtune.datasets.folder2d import Folder2DSource, discover_folder2d
from samtune.datasets.nifti import NiftiSliceSource, discover_dataset
from samtune.datasets.prompted import PromptedDataset
from samtune.datasets.prompts import PromptSettings
from samtune.datasets.splits import resolve_split_file, split_by_file, split_by_fraction
from samtune.finetune.recipe import DataSection, Recipe

log = logging.getLogger(__name__)


@dataclass
class Sources:
    """The two sides of a dataset and what was found on the way."""

    train: object  # a SliceSource (see samtune.datasets.prompted)
    val: object
    layout: str  # cityscapes | nnunet_v2 | msd | folders | folder2d
    skipped: list[dict] = field(default_factory=list)  # {"case", "file", "problem"} per bad case left out
    notes: list[str] = field(default_factory=list)  # files ignored (macOS forks, labels without image, ...)
    cache_dir: Path | None = None
    channel_names: dict[int, str] = field(default_factory=dict)


def ensure_demo_data(kind: str, root: Path, seed: int = 0) -> None:
    """Generate the synthetic demo dataset of ``kind`` at ``root`` (atomically: temp folder, rename)."""
    from samtune.datasets import synthetic

    if kind not in ("nifti", "cityscapes"):
        raise SamtuneError(f"data.generate_demo: there is no demo dataset of kind {kind!r} (only nifti and cityscapes).")
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info("data.root %s is missing: generating the synthetic %s demo dataset there", root, kind)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.") as tmp:
        if kind == "nifti":
            made = synthetic.generate_ct_phantom(Path(tmp), seed=seed)
        else:
            made = synthetic.generate_cityscapes(Path(tmp) / "cityscapes", seed=seed)
        if not root.exists():
            shutil.move(str(made), str(root))


def prompt_settings(recipe: Recipe) -> PromptSettings:
    p = recipe.prompts
    # points are only ever used when some first prompts are points: skip sampling them otherwise
    positives, negatives = (p.positive_points, p.negative_points) if p.box_probability < 1 else (0, 0)
    return PromptSettings(p.per, p.box_jitter_px, p.box_jitter_frac, positives, negatives, p.point_placement)


def intensity_of(data: DataSection) -> str | tuple[float, float]:
    """``data.intensity`` (preset or [low, high]) when set, else the explicit ``data.window_hu``."""
    if data.intensity is None:
        return tuple(float(v) for v in data.window_hu)
    return data.intensity if isinstance(data.intensity, str) else tuple(float(v) for v in data.intensity)


def _split(items: list, data: DataSection, root: Path, seed: int, skipped: list[dict]) -> tuple[list, list]:
    name = lambda item: item.name  # noqa: E731
    if data.split_file:
        path = resolve_split_file(data.split_file, root)
        train, val = split_by_file(items, path, data.fold, name, skipped={s["case"] for s in skipped if s["case"]})
        log.info("split from %s (data.fold=%d applies to a list of folds)", path, data.fold)
    else:
        train, val = split_by_fraction(items, data.val_fraction, seed, name)
    log.info("cases: %d train, %d val (%s)", len(train), len(val), ", ".join(name(c) for c in val[:20]))
    return train, val


def _unify_class_names(train, val) -> None:
    """Classes found in the labels (no class map given): the same map on both sides."""
    names = {**train.class_names, **val.class_names}
    train.class_names = val.class_names = dict(sorted(names.items()))


def _class_ids(names: list[str] | None, class_names: dict[int, str] | None) -> set[int] | None:
    if not names:
        return None
    if class_names is not None:
        return {k for k, v in class_names.items() if v in names}
    return {int(m.group(1)) for n in names if (m := re.fullmatch(r"class_(\d+)", n))}


def build_sources(recipe: Recipe, *, on_bad_case: str | None = None, progress: bool = True, require_both: bool = True) -> Sources:
    """The recipe's train and val sources; ``on_bad_case`` overrides ``data.on_bad_case``;
    ``require_both``: an empty side is an error (training) rather than left to the caller (inspect)."""
    data = recipe.data
    on_bad = on_bad_case or data.on_bad_case
    root = Path(data.root)
    if not root.exists():
        if not data.generate_demo:
            raise SamtuneError(
                f"data.root={data.root!r}: no such folder (resolved to {root.resolve()}). Point data.root "
                "at your dataset, or set data.generate_demo=true to create the synthetic demo data there."
            )
        ensure_demo_data(data.kind, root)
    if data.kind == "cityscapes":
        train_src = CityscapesSource(root, data.train_split, on_bad, data.cities)
        val_src = CityscapesSource(root, data.val_split, on_bad, data.val_cities)
        sources = Sources(train_src, val_src, "cityscapes", train_src.skipped + val_src.skipped)
    elif data.kind == "folder2d":
        layout = discover_folder2d(root, on_bad)
        if layout.val is None:
            train_items, val_items = _split(layout.train, data, root, recipe.seed, layout.skipped)
        else:
            if data.split_file:
                raise SamtuneError(f"data.split_file is set but {root / 'val'} exists: use one way to choose validation images.")
            train_items, val_items = layout.train, layout.val
        train_src = Folder2DSource(train_items, data.class_names, on_bad, progress, desc="train labels")
        val_src = Folder2DSource(val_items, data.class_names, on_bad, progress, desc="val labels")
        if data.class_names is None:
            _unify_class_names(train_src, val_src)
        sources = Sources(train_src, val_src, "folder2d", layout.skipped + train_src.skipped + val_src.skipped, layout.notes)
    else:
        ds = discover_dataset(root, data.channel, data.class_names, on_bad)
        train_cases, val_cases = _split(ds.cases, data, root, recipe.seed, ds.skipped)
        cache_dir = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir(root)
        common = dict(
            spacing_mm=tuple(data.spacing_mm) if data.spacing_mm else None, cache_dir=cache_dir,
            context_slices=data.context_slices, empty_slice_ratio=data.empty_slice_ratio,
            foreground=_class_ids(data.classes, ds.classes), seed=recipe.seed, on_bad_case=on_bad, progress=progress,
        )  # fmt: skip
        train_src = NiftiSliceSource(train_cases, ds.classes, intensity_of(data), desc="train cases", **common)
        val_src = NiftiSliceSource(val_cases, ds.classes, intensity_of(data), desc="val cases", **common)
        if ds.classes is None:
            _unify_class_names(train_src, val_src)
        background = [c.name for src in (train_src, val_src) for c in src.cases if c.meta["warnings"]]
        if background:
            log.warning("%d cases have an all-background label (legal, but check them): %s", len(background), ", ".join(background[:10]))
        skipped = ds.skipped + train_src.skipped + val_src.skipped
        sources = Sources(train_src, val_src, ds.layout, skipped, ds.notes, cache_dir, ds.channel_names)
    for side, src in (("training", sources.train), ("validation", sources.val)):
        if require_both and len(src) == 0:
            why = f" ({len(sources.skipped)} bad cases were skipped)" if sources.skipped else ""
            raise SamtuneError(f"data.root={data.root!r}: the {side} split has no images or slices left{why}.")
    return sources


def make_prompted(source, recipe: Recipe, image_size: int, training: bool) -> PromptedDataset:
    """A source wrapped as the recipe's prompted dataset (training: augmentation, per_image objects)."""
    common = dict(image_size=image_size, prompts=prompt_settings(recipe), min_pixels=recipe.data.min_pixels, seed=recipe.seed, classes=recipe.data.classes)
    if not training:
        return PromptedDataset(source, training=False, **common)
    return PromptedDataset(
        source, training=True, per_image=recipe.prompts.per_image,
        augment=build_augmentation([step.model_dump() for step in recipe.augment]), **common,
    )  # fmt: skip


def build_datasets(
    recipe: Recipe, image_size: int, *, progress: bool = True, training: bool = True
) -> tuple[PromptedDataset | None, PromptedDataset]:
    """Train and val prompted datasets; both carry ``skipped`` (bad cases left out, skip mode).
    ``training=False`` (evaluation only) skips indexing the training split and returns None for it."""
    data = recipe.data
    sources = build_sources(recipe, progress=progress)
    log_skipped(sources.skipped)
    train_src, val_src = sources.train, sources.val
    if data.classes:
        known = set(train_src.class_names.values())
        unknown = [c for c in data.classes if c not in known]
        if unknown:
            raise SamtuneError(f"data.classes: {unknown} not in the dataset's classes {sorted(known)}.")
    train = make_prompted(train_src, recipe, image_size, training=True) if training else None
    val = make_prompted(val_src, recipe, image_size, training=False)
    if (train is not None and len(train) == 0) or len(val) == 0:
        raise SamtuneError(
            f"data.root={data.root!r}: no objects of at least data.min_pixels={data.min_pixels} px in the "
            f"{'validation' if len(val) == 0 else 'training'} split; lower data.min_pixels or check the labels."
        )
    if recipe.eval.max_samples and len(val) > recipe.eval.max_samples:
        keep = np.sort(np.random.default_rng(recipe.seed).permutation(len(val))[: recipe.eval.max_samples])
        val.pairs = [val.pairs[i] for i in keep]
        val.subset = True  # volumes are incomplete: no per-case 3D metrics
    for dataset in (train, val):
        if dataset is not None:
            dataset.skipped = list(sources.skipped)
    return train, val
