"""Recipe -> train and validation datasets (generating the demo data when the recipe asks).

``open_split`` opens the recipe's ``data:`` through its format (``samtune.datasets.formats``):
two slice sources, the split, the cache, the bad cases left out. ``build_datasets`` wraps them into
prompted datasets with the model family's preprocessing; ``samtune inspect`` reports on the same
split.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from samtune import SamtuneError
from samtune.datasets.augment import build_augmentation
from samtune.datasets.checks import log_skipped
from samtune.datasets.formats import DemoKeys, get_format
from samtune.datasets.prompted import InputTransform, PromptedDataset
from samtune.datasets.semantic import SemanticDataset
from samtune.datasets.source import DataSplit, LabelSpace, SliceSource
from samtune.finetune.recipe import Recipe

log = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """What training and evaluation read: the prompted datasets (``task`` promptable/both), the
    semantic ones with their label space (automatic/both), and the split they came from."""

    train: PromptedDataset | None  # None when only evaluating or when the task has no prompts
    val: PromptedDataset | None
    split: DataSplit
    space: LabelSpace | None = None
    train_semantic: SemanticDataset | None = None
    val_semantic: SemanticDataset | None = None

    @property
    def skipped(self) -> list[dict]:
        """Every bad case left out (``data.on_bad_case: skip``), each once."""
        return list(self.split.skipped)


def ensure_demo_data(recipe: Recipe, root: Path) -> None:
    """Generate the format's synthetic demo dataset at ``root`` (atomically: temp folder, rename)."""
    fmt = get_format(recipe.data.kind)
    if fmt.make_demo is None:
        raise SamtuneError(f"data.generate_demo: there is no demo dataset of kind {fmt.kind!r}.")
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info("data.root %s is missing: generating the synthetic %s demo dataset there", root, fmt.kind)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{root.name}.") as tmp:
        made = fmt.make_demo(Path(tmp), seed=0)
        if not root.exists():
            shutil.move(str(made), str(root))


def open_split(recipe: Recipe, *, on_bad_case: str | None = None, progress: bool = True, require_both: bool = True) -> DataSplit:
    """The recipe's train and val sources; ``on_bad_case`` overrides ``data.on_bad_case``;
    ``require_both``: an empty side is an error (training) rather than left to the caller (inspect)."""
    data = recipe.data
    root = Path(data.root)
    if not root.exists():
        if not (isinstance(data, DemoKeys) and data.generate_demo):
            demo = " or set data.generate_demo=true to create the synthetic demo data there" if isinstance(data, DemoKeys) else ""
            raise SamtuneError(f"data.root={data.root!r}: no such folder (resolved to {root.resolve()}). Point data.root at your dataset{demo}.")
        ensure_demo_data(recipe, root)
    split = get_format(data.kind).open(data, seed=recipe.seed, on_bad_case=on_bad_case or data.on_bad_case, progress=progress)
    unlabelled = [n for n in split.notes if "still to be labelled" in n]
    if unlabelled:
        log.info("data.root %s: %d image(s) without a label left out (e.g. %s)", root, len(unlabelled), unlabelled[0])
    for side, src in (("training", split.train), ("validation", split.val)):
        if require_both and len(src) == 0:
            why = f" ({len(split.skipped)} bad cases were skipped)" if split.skipped else ""
            raise SamtuneError(f"data.root={data.root!r}: the {side} split has no images or slices left{why}.")
    return split


def eval_prompts(recipe: Recipe):
    """The prompts of the evaluation protocol: the training settings with the box jitter of
    ``eval.box_jitter_px`` (default 0: the tight ground-truth box) and no fractional jitter."""
    return recipe.prompts.model_copy(update={"box_jitter_px": recipe.eval.box_jitter_px, "box_jitter_frac": 0.0})


def make_prompted(source: SliceSource, recipe: Recipe, transform: InputTransform, training: bool) -> PromptedDataset:
    """A source wrapped as the recipe's prompted dataset (training: augmentation, per_image objects)."""
    common = dict(transform=transform, min_pixels=recipe.data.min_pixels, seed=recipe.seed, classes=recipe.data.classes)
    if not training:
        return PromptedDataset(source, prompts=eval_prompts(recipe), training=False, max_samples=recipe.eval.max_samples, **common)
    return PromptedDataset(
        source, prompts=recipe.prompts, training=True, per_image=recipe.prompts.per_image,
        augment=build_augmentation([step.model_dump() for step in recipe.augment]), **common,
    )  # fmt: skip


def label_space(split: DataSplit, recipe: Recipe) -> LabelSpace:
    """The automatic model's classes: the dataset's (or ``data.classes``), by id."""
    names = split.train.class_names
    wanted = set(recipe.data.classes) if recipe.data.classes else None
    ids = sorted(i for i, n in names.items() if wanted is None or n in wanted)
    if not ids:
        raise SamtuneError(f"data.root={recipe.data.root!r}: no classes to predict (class names: {names}).")
    return split.train.label_space(ids)


def build_datasets(recipe: Recipe, transform: InputTransform, *, progress: bool = True, training: bool = True) -> DataBundle:
    """Train and val prompted datasets. ``training=False`` (evaluation only) skips indexing the
    training split (``DataBundle.train`` is None)."""
    data = recipe.data
    split = open_split(recipe, progress=progress)
    log_skipped(split.skipped)
    if data.classes:
        known = set(split.train.class_names.values())
        unknown = [c for c in data.classes if c not in known]
        if unknown:
            raise SamtuneError(f"data.classes: {unknown} not in the dataset's classes {sorted(known)}.")
    bundle = DataBundle(None, None, split)
    if recipe.task != "automatic":
        bundle.train = make_prompted(split.train, recipe, transform, training=True) if training else None
        bundle.val = make_prompted(split.val, recipe, transform, training=False)
        if (bundle.train is not None and len(bundle.train) == 0) or len(bundle.val) == 0:
            raise SamtuneError(
                f"data.root={data.root!r}: no objects of at least data.min_pixels={data.min_pixels} px in the "
                f"{'validation' if len(bundle.val) == 0 else 'training'} split; lower data.min_pixels or check the labels."
            )
    bundle.space = label_space(split, recipe)  # saved with every checkpoint (class names for predict)
    if recipe.task != "promptable":
        if training:
            augment = build_augmentation([step.model_dump() for step in recipe.augment])
            bundle.train_semantic = SemanticDataset(split.train, transform, bundle.space, training=True, augment=augment)
        bundle.val_semantic = SemanticDataset(split.val.every_slice(), transform, bundle.space, training=False)
    return bundle
