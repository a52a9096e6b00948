"""Preprocess once, train many: a cache of NIfTI cases as memory-mapped uint8 slice stacks.

Layout: ``<cache_dir>/<case>-<key>/{image.npy, label.npy, meta.json}`` where ``image.npy`` and
``label.npy`` are Z×H×W uint8 display slices (see ``volume.py``) and ``meta.json`` holds the
slice index (per slice, classes present with pixel counts and connected-component sizes), the
voxel counts, spacing, orientation and intensity window — everything sampling needs, so it never
opens a volume. ``<key>`` hashes the input files (absolute path, size, mtime) and every setting
that changes the arrays: unchanged inputs reuse the entry, a touched file or a new setting builds a
new one. An entry is written into a hidden temporary folder and renamed into place, so an
interrupted build never leaves a half entry (the rename is atomic; a folder that exists is complete).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from tqdm.auto import tqdm

from samtune import SamtuneError
from samtune.constants import DEFAULT_WINDOW_HU
from samtune.datasets.checks import BadCase, handle_bad
from samtune.datasets.volume import preprocess, read_case

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the preprocessing changes what is stored
CACHE_FOLDER = ".samtune_cache"
_STALE_TMP_S = 6 * 3600  # temporary folders older than this are leftovers of killed builds


class CaseFiles(Protocol):
    name: str
    image: Path
    label: Path | None  # None: no labels (a scan to predict on)
    channel: int


@dataclass(frozen=True)
class VolumeSettings:
    """What turns a case's files into cached arrays (all of it is part of the cache key)."""

    intensity: str | tuple[float, float] = DEFAULT_WINDOW_HU  # preset name or [low, high]
    spacing_mm: tuple[float, float] | None = None  # in-plane target [x, y], None keeps the scan's
    classes: tuple[int, ...] | None = None  # allowed label values besides 0 and 255 (None: 1..254)

    def as_dict(self) -> dict:
        intensity = self.intensity if isinstance(self.intensity, str) else [float(v) for v in self.intensity]
        spacing = None if self.spacing_mm is None else [float(v) for v in self.spacing_mm]
        classes = None if self.classes is None else sorted(int(c) for c in self.classes)
        return {"intensity": intensity, "spacing_mm": spacing, "classes": classes}


class CachedCase:
    """A preprocessed case: Z×H×W uint8 ``image`` and ``label`` (memory-mapped, or in memory) + ``meta``."""

    def __init__(self, name: str, meta: dict, folder: Path | None = None, arrays: tuple[np.ndarray, np.ndarray] | None = None):
        self.name, self.meta, self.folder = name, meta, folder
        self._arrays = arrays

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:  # opened lazily, once per process (DataLoader workers reopen)
            # plain ndarray views of the read-only maps: indexing an np.memmap costs more per slice
            self._arrays = tuple(np.load(self.folder / f"{n}.npy", mmap_mode="r").view(np.ndarray) for n in ("image", "label"))
        return self._arrays

    @property
    def image(self) -> np.ndarray:
        return self._open()[0]

    @property
    def label(self) -> np.ndarray:
        return self._open()[1]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.folder is not None:  # pickling a memmap would copy the whole volume
            state["_arrays"] = None
        return state


def default_cache_dir(root: Path) -> Path:
    """``<root>/.samtune_cache``, or the user cache (``~/.cache/samtune``) when ``root`` is read-only."""
    root = Path(root)
    preferred = root / CACHE_FOLDER
    if os.access(preferred if preferred.is_dir() else root, os.W_OK):  # False on read-only mounts, even for root
        try:
            preferred.mkdir(exist_ok=True)
            return preferred
        except OSError:
            pass
    fallback = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "samtune"
    log.info("%s is not writable: the preprocessing cache goes to %s (set data.cache_dir to choose)", root, fallback)
    return fallback


def _stat(path: Path, case: str) -> list:
    try:
        st = Path(path).stat()
    except FileNotFoundError:
        raise BadCase(case, path, "the file is missing", "every image needs its label file and vice versa") from None
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def case_key(case: CaseFiles, settings: VolumeSettings) -> str:
    """Hex digest of the inputs (path, size, mtime of image and label), channel and settings."""
    data = {
        "version": CACHE_VERSION,
        "image": _stat(case.image, case.name),
        "label": _stat(case.label, case.name) if case.label is not None else None,
        "channel": int(case.channel),
        "settings": settings.as_dict(),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def _entry(cache_dir: Path, name: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]
    return cache_dir / f"{safe}-{key}"


def _compute(case: CaseFiles, settings: VolumeSettings) -> tuple[np.ndarray, np.ndarray, dict]:
    classes = set(settings.classes) if settings.classes is not None else None
    label_file = Path(case.label) if case.label is not None else None  # None: a scan without labels
    raw = read_case(case.name, Path(case.image), label_file, int(case.channel), classes)
    image, label, meta = preprocess(raw, settings.intensity, settings.spacing_mm)
    meta.update(case=case.name, image_file=str(case.image), label_file=str(label_file) if label_file else None)
    return image, label, meta


def _read_entry(entry: Path, key: str) -> dict | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("key") == key else None


def build_entry(case: CaseFiles, settings: VolumeSettings, entry: Path, key: str) -> dict:
    """Compute the case and write its entry atomically (temporary folder + rename); returns meta."""
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
    try:
        image, label, meta = _compute(case, settings)
        meta.update(key=key, version=CACHE_VERSION, settings=settings.as_dict())
        np.save(tmp / "image.npy", image)
        np.save(tmp / "label.npy", label)
        (tmp / "meta.json").write_text(json.dumps(meta))  # last: an entry with meta.json is complete
        try:
            os.replace(tmp, entry)
        except OSError:  # another process finished the same entry first: keep theirs
            if _read_entry(entry, key) is None:
                raise
        return meta
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _clean_stale(cache_dir: Path) -> None:
    now = time.time()
    for tmp in cache_dir.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def prune_slice_cache(cache_dir: Path, sources: Sequence) -> list[Path]:
    """``samtune cache --prune``: remove temporary leftovers of killed builds (``_clean_stale``) and
    the entries of the given sources' cases that no longer match (an older key of the same case:
    its files or settings changed); entries of other datasets sharing the folder stay. Returns the
    entries removed."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    _clean_stale(cache_dir)
    current = {c.folder.resolve() for src in sources for c in getattr(src, "cases", []) if c.folder is not None}
    names = {_entry(cache_dir, c.name, "").name for src in sources for c in getattr(src, "cases", [])}  # "<safe name>-"
    removed = []
    for entry in sorted(cache_dir.iterdir()):
        m = re.fullmatch(r"(.+-)[0-9a-f]{24}", entry.name)
        if entry.is_dir() and m and m.group(1) in names and entry.resolve() not in current:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def prepare_cases(
    cases: Sequence[CaseFiles],
    settings: VolumeSettings,
    cache_dir: Path | None,
    on_bad_case: str = "error",
    progress: bool = True,
    desc: str = "preprocessing",
) -> tuple[list[CachedCase], list[dict]]:
    """Every case as a ``CachedCase`` (from the cache, built when missing; in memory when
    ``cache_dir`` is None) and the records of bad cases skipped (``on_bad_case='skip'``)."""
    skipped: list[dict] = []
    if cache_dir is None:
        ready = []
        for case in tqdm(cases, desc=desc, unit="case", disable=not progress, leave=False):
            try:
                image, label, meta = _compute(case, settings)
            except BadCase as bad:
                handle_bad(bad, on_bad_case, skipped)
                continue
            ready.append(CachedCase(case.name, meta, arrays=(image, label)))
        return ready, skipped

    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SamtuneError(f"data.cache_dir={str(cache_dir)!r}: cannot create the cache folder ({exc}); choose a writable folder.") from None
    _clean_stale(cache_dir)
    found: dict[int, CachedCase] = {}
    missing: list[tuple[int, Path, str]] = []
    for i, case in enumerate(cases):
        try:
            key = case_key(case, settings)
        except BadCase as bad:
            handle_bad(bad, on_bad_case, skipped)
            continue
        entry = _entry(cache_dir, case.name, key)
        meta = _read_entry(entry, key)
        if meta is not None:
            found[i] = CachedCase(case.name, meta, folder=entry)
        else:
            if entry.exists():  # unreadable leftover (disk trouble): rebuild it
                shutil.rmtree(entry, ignore_errors=True)
            missing.append((i, entry, key))
    reused = len(found)
    for i, entry, key in tqdm(missing, desc=f"{desc} (cache)", unit="case", disable=not progress or not missing):
        try:
            meta = build_entry(cases[i], settings, entry, key)
        except BadCase as bad:
            handle_bad(bad, on_bad_case, skipped)
            continue
        found[i] = CachedCase(cases[i].name, meta, folder=entry)
    if cases:
        log.info("cache %s: %d cases reused, %d built", cache_dir, reused, len(found) - reused)
    return [found[i] for i in sorted(found)], skipped
