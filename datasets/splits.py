"""Train/validation splits at the level of cases (patients) or images: a split file or a seeded fraction.

A split file is JSON, either ``{"train": [names], "val": [names]}`` or nnU-Net's
``splits_final.json`` (a list of such folds; ``data.fold`` picks one). Names are case names
(NIfTI) or image file stems (folder2d). Slices of one case are never on both sides.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np

from samtune import SamtuneError
from samtune.suggest import did_you_mean

log = logging.getLogger(__name__)
T = TypeVar("T")


def split_by_fraction(items: Sequence[T], val_fraction: float, seed: int, name: Callable[[T], str]) -> tuple[list[T], list[T]]:
    """Seeded shuffle; round(val_fraction × n) items (at least one on each side) go to validation."""
    if len(items) < 2:
        raise SamtuneError(f"need at least 2 cases to split into train and val, found {len(items)}.")
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = min(len(items) - 1, max(1, int(round(val_fraction * len(items)))))
    val = sorted((items[i] for i in order[:n_val]), key=name)
    train = sorted((items[i] for i in order[n_val:]), key=name)
    return train, val


def resolve_split_file(split_file: str, root: Path) -> Path:
    """Relative paths: from the current directory, else from the dataset folder."""
    path = Path(split_file).expanduser()
    if not path.is_absolute() and not path.is_file() and (root / path).is_file():
        path = root / path
    if not path.is_file():
        raise SamtuneError(f"data.split_file={split_file!r}: no such file (looked in the current directory and in {root}).")
    return path


def read_split_file(path: Path, fold: int) -> tuple[list[str], list[str]]:
    """(train names, val names) from a split file; errors name the file and what is expected."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SamtuneError(f"{path}: not a readable JSON split file ({exc}).") from None
    if isinstance(data, list):  # nnU-Net splits_final.json: one {"train", "val"} per fold
        if not data:
            raise SamtuneError(f"{path}: the list of folds is empty.")
        if not 0 <= fold < len(data):
            raise SamtuneError(f"data.fold={fold}: {path} has folds 0..{len(data) - 1}.")
        data = data[fold]
    if not isinstance(data, dict) or not isinstance(data.get("train"), list) or not isinstance(data.get("val"), list):
        raise SamtuneError(
            f'{path}: expected {{"train": [names], "val": [names]}} or a list of such folds (nnU-Net\'s '
            "splits_final.json)."
        )
    train, val = [str(n) for n in data["train"]], [str(n) for n in data["val"]]
    both = sorted(set(train) & set(val))
    if both:
        raise SamtuneError(f"{path}: {len(both)} names are in both train and val (e.g. {both[:3]}); a case must be on one side.")
    if not train or not val:
        raise SamtuneError(f"{path}: the {'train' if not train else 'val'} list is empty.")
    return train, val


def split_by_file(
    items: Sequence[T], path: Path, fold: int, name: Callable[[T], str], skipped: set[str] = frozenset()
) -> tuple[list[T], list[T]]:
    """Items named in the split file's train and val lists (order of the file's names).

    Names the file lists but the dataset lacks are an error (with the closest names found),
    except ``skipped`` ones (bad cases already left out); items in neither list are left out,
    with an info line.
    """
    train_names, val_names = read_split_file(path, fold)
    by_name = {name(item): item for item in items}
    train_names = [n for n in train_names if n not in skipped]
    val_names = [n for n in val_names if n not in skipped]
    missing = [n for n in train_names + val_names if n not in by_name]
    if missing:
        hint = did_you_mean(missing[0], by_name, cutoff=0.6, fmt="{!r}")
        raise SamtuneError(
            f"{path}: {len(missing)} names are not cases of the dataset: {missing[:5]}; {hint}Names are case names "
            "(NIfTI, without channel suffix or extension) or image file stems (folder2d)."
        )
    unused = len(by_name) - len(set(train_names) | set(val_names))
    if unused:
        log.info("split file %s: %d cases are in neither list and are not used", path, unused)
    return [by_name[n] for n in train_names], [by_name[n] for n in val_names]


def choose_split(items: Sequence[T], section, root: Path, seed: int, skipped: list[dict]) -> tuple[list[T], list[T]]:
    """Train/val items by ``section.split_file`` (and ``fold``) or a seeded ``section.val_fraction``;
    ``section`` is a format's recipe section with the ``CaseSplitKeys``; items have a ``name``."""
    name = lambda item: item.name  # noqa: E731
    if section.split_file:
        path = resolve_split_file(section.split_file, root)
        train, val = split_by_file(items, path, section.fold, name, skipped={s["case"] for s in skipped if s["case"]})
        log.info("split from %s (data.fold=%d applies to a list of folds)", path, section.fold)
    else:
        train, val = split_by_fraction(items, section.val_fraction, seed, name)
    log.info("cases: %d train, %d val (%s)", len(train), len(val), ", ".join(name(c) for c in val[:20]))
    return train, val


def unify_class_names(train, val) -> None:
    """Classes found in the labels (no class map given): the same map on both sides of the split."""
    names = {**train.class_names, **val.class_names}
    train.class_names = val.class_names = dict(sorted(names.items()))
