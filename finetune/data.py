"""Recipe -> train and validation datasets (generating the demo data when the recipe asks)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from samtune import SamtuneError
from samtune.datasets.cityscapes import CityscapesSource
from samtune.datasets.nifti import NiftiSliceSource, read_dataset, split_cases
from samtune.datasets.prompted import PromptedDataset
from samtune.finetune.recipe import Recipe

log = logging.getLogger(__name__)


def ensure_demo_data(kind: str, root: Path, seed: int = 0) -> None:
    """Generate the synthetic demo dataset of ``kind`` at ``root`` (atomically: temp folder, rename)."""
    from samtune.datasets import synthetic

    root.parent.mkdir(parents=True, exist_ok=True)
    log.info("data.root %s is missing: generating the synthetic %s demo dataset there", root, kind)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.") as tmp:
        if kind == "nifti":
            made = synthetic.generate_ct_phantom(Path(tmp), seed=seed)
        else:
            made = synthetic.generate_cityscapes(Path(tmp) / "cityscapes", seed=seed)
        if not root.exists():
            shutil.move(str(made), str(root))


def build_datasets(recipe: Recipe, image_size: int) -> tuple[PromptedDataset, PromptedDataset]:
    data = recipe.data
    root = Path(data.root)
    if not root.exists():
        if not data.generate_demo:
            raise SamtuneError(
                f"data.root={data.root!r}: no such folder (resolved to {root.resolve()}). Point data.root "
                "at your dataset, or set data.generate_demo=true to create the synthetic demo data there."
            )
        ensure_demo_data(data.kind, root)
    if data.kind == "cityscapes":
        train_src = CityscapesSource(root, data.train_split)
        val_src = CityscapesSource(root, data.val_split)
    else:
        cases, classes = read_dataset(root)
        train_cases, val_cases = split_cases(cases, data.val_fraction, recipe.seed)
        log.info("cases: %d train, %d val (%s)", len(train_cases), len(val_cases), ", ".join(c.name for c in val_cases))
        train_src = NiftiSliceSource(train_cases, classes, tuple(data.window_hu))
        val_src = NiftiSliceSource(val_cases, classes, tuple(data.window_hu))
    if data.classes:
        known = set(train_src.class_names.values())
        unknown = [c for c in data.classes if c not in known]
        if unknown:
            raise SamtuneError(f"data.classes: {unknown} not in the dataset's classes {sorted(known)}.")
    common = dict(image_size=image_size, box_jitter_px=recipe.prompts.box_jitter_px, min_pixels=data.min_pixels, seed=recipe.seed, classes=data.classes)
    train = PromptedDataset(train_src, training=True, **common)
    val = PromptedDataset(val_src, training=False, **common)
    if len(train) == 0 or len(val) == 0:
        raise SamtuneError(
            f"data.root={data.root!r}: no objects of at least data.min_pixels={data.min_pixels} px in the "
            f"{'training' if len(train) == 0 else 'validation'} split; lower data.min_pixels or check the labels."
        )
    if recipe.eval.max_samples and len(val) > recipe.eval.max_samples:
        keep = np.sort(np.random.default_rng(recipe.seed).permutation(len(val))[: recipe.eval.max_samples])
        val.pairs = [val.pairs[i] for i in keep]
    return train, val
