"""Encode once, train many: a cache of image embeddings for ``train.mode: decoder_only``.

With the image encoder frozen and without LoRA, a training image's embedding never changes, so it
is computed once and read back at every step. Layout: ``<cache_dir>/embeddings-<key>/`` with
``embeddings.npy`` (N×C×g×g float16, memory-mapped), ``done.npy`` (N bool: which rows hold an
embedding) and ``meta.json``. ``<key>`` hashes everything that changes an embedding: the base
model (``model.name``, the checkpoint file's path, size and mtime, ``image_size``, ``init_seed``),
the preprocessing (input size, the family's transform class and settings) and the data (the
``data:`` section and the source's item ids, in order). A row is written and flushed before it is
marked done, so an interrupted fill never leaves a wrong entry: the next fill completes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from samtune import SamtuneError
from samtune.adapters.family import ModelFamily
from samtune.datasets.cache import default_cache_dir

log = logging.getLogger(__name__)

EMBEDDING_CACHE_VERSION = 1  # bump when what is stored changes
PREFIX = "embeddings-"


def cache_root(recipe) -> Path:
    """``data.cache_dir`` when the data section has one, else ``<data.root>/.samtune_cache`` (or
    ``~/.cache/samtune`` when the root is read-only)."""
    cache_dir = getattr(recipe.data, "cache_dir", None)
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir(Path(recipe.data.root))


def _checkpoint_identity(checkpoint: str | None) -> list | str | None:
    """A local checkpoint by resolved path, size and mtime (a rewritten file gives a new key); a
    hub id or None as written."""
    if checkpoint is None:
        return None
    path = Path(checkpoint).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return checkpoint


def _transform_identity(transform) -> dict:
    settings = {k: v for k, v in sorted(vars(transform).items()) if isinstance(v, (int, float, str, tuple))}  # sizes, pixel mean/std
    return {"class": f"{type(transform).__module__}.{type(transform).__qualname__}", "settings": json.loads(json.dumps(settings, default=str))}


def cache_inputs(recipe, family: ModelFamily, source, transform) -> dict:
    """What the key hashes (also written to meta.json, readable)."""
    from samtune.finetune.runtime import image_size_of

    data = recipe.data.model_dump(mode="json")
    data.pop("cache_dir", None)  # where caches live changes no embedding
    return {
        "version": EMBEDDING_CACHE_VERSION,
        "model": {"name": recipe.model.name, "family": family.name, "checkpoint": _checkpoint_identity(recipe.model.checkpoint),
                  "image_size": image_size_of(recipe), "init_seed": recipe.model.init_seed},  # fmt: skip
        "preprocessing": {"image_size": transform.image_size, "transform": _transform_identity(transform)},
        "data": data,
        "items": [source.item_id(i) for i in range(len(source))],
    }


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def cache_folder(recipe, family: ModelFamily, source, transform, root: Path | None = None) -> Path:
    """Where the cache of this recipe and source lives (whether or not it exists yet)."""
    return (root or cache_root(recipe)) / f"{PREFIX}{cache_key(cache_inputs(recipe, family, source, transform))}"


def _scope(recipe) -> dict:
    """What a stale cache must share with the recipe to be pruned: the same dataset and model name."""
    return {"data_root": str(Path(recipe.data.root).expanduser().resolve()), "model": recipe.model.name}


class EmbeddingCache:
    """The embeddings of one source's images (rows indexed by source index, ``meta["index"]``)."""

    def __init__(self, folder: Path, key: str, n: int):
        self.folder, self.key, self.n = Path(folder), key, n
        self._embeddings: np.ndarray | None = None
        self._done: np.ndarray | None = None

    @classmethod
    def open(cls, recipe, family: ModelFamily, model, source, transform) -> "EmbeddingCache":
        """The cache folder of this recipe, model and source (created, empty, when missing).
        ``model`` is not read: the key comes from the recipe's model keys (the weights it builds)."""
        root = cache_root(recipe)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SamtuneError(f"data.cache_dir={str(root)!r}: cannot create the cache folder ({exc}); choose a writable folder.") from None
        inputs = cache_inputs(recipe, family, source, transform)
        key = cache_key(inputs)
        folder = cache_folder(recipe, family, source, transform, root)
        folder.mkdir(exist_ok=True)
        meta_file = folder / "meta.json"
        if not meta_file.is_file():
            meta = {"key": key, "n": len(source), "scope": _scope(recipe), "inputs": inputs}
            tmp = folder / ".meta.json.tmp"
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, meta_file)
        cache = cls(folder, key, len(source))
        cache._load()
        return cache

    def _load(self) -> None:
        emb, done = self.folder / "embeddings.npy", self.folder / "done.npy"
        if emb.is_file() and done.is_file():
            try:
                self._embeddings = np.load(emb, mmap_mode="r+")
                self._done = np.load(done, mmap_mode="r+")
            except (OSError, ValueError):  # a damaged leftover: start over
                self._embeddings = self._done = None
            if self._done is not None and (len(self._done) != self.n or len(self._embeddings) != self.n):
                self._embeddings = self._done = None

    def _create(self, shape: tuple[int, ...]) -> None:
        """The two arrays, written under temporary names and renamed into place."""
        for name, dtype, full in (("embeddings", np.float16, (self.n, *shape)), ("done", np.bool_, (self.n,))):
            tmp = self.folder / f".{name}.tmp.npy"
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=full)
            if name == "done":
                array[:] = False
            array.flush()
            del array
            os.replace(tmp, self.folder / f"{name}.npy")
        self._load()

    @property
    def done_count(self) -> int:
        return int(self._done.sum()) if self._done is not None else 0

    def missing(self, indices) -> list[int]:
        if self._done is None:
            return list(indices)
        return [int(i) for i in indices if not self._done[int(i)]]

    def get(self, indices, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The cached embeddings (B×C×g×g) of source ``indices`` as float32 on ``device``; None when any is missing."""
        if self._done is None:
            return None
        idx = np.asarray([int(i) for i in indices])
        if not self._done[idx].all():
            return None
        rows = torch.from_numpy(np.ascontiguousarray(self._embeddings[idx]))
        return rows.to(device=device, dtype=torch.float32)

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())

    @torch.no_grad()
    def fill(self, model, family: ModelFamily, dataset, batch_size: int, device, progress: bool = True) -> int:
        """Encode every image of ``dataset`` not cached yet (its own preprocessing, no augmentation);
        returns how many were computed."""
        indices = _source_indices(dataset)
        todo = self.missing(indices)
        if not todo:
            return 0
        position = {index: k for k, (index, _) in enumerate(dataset.images)} if hasattr(dataset, "images") else None
        was_training = model.training
        model.eval()
        try:
            bar = tqdm(range(0, len(todo), batch_size), desc="embedding cache", unit="batch", disable=not progress, leave=False)
            for start in bar:
                chunk = todo[start : start + batch_size]
                images = torch.stack([_plain_image(dataset, i if position is None else position[i]) for i in chunk]).to(device)
                out = family.encode_images(model, images)
                if out.high_res_features:
                    raise SamtuneError("train.embedding_cache: this model family's decoder also reads high-resolution "
                                       "features, which the cache does not store; set train.embedding_cache=false.")  # fmt: skip
                rows = out.image_embeddings.float().cpu().numpy().astype(np.float16)
                if self._embeddings is None:
                    self._create(tuple(rows.shape[1:]))
                self._embeddings[chunk] = rows
                self._embeddings.flush()  # the rows on disk first, then the marks: never a wrong entry
                self._done[chunk] = True
                self._done.flush()
        finally:
            model.train(was_training)
        return len(todo)


def _source_indices(dataset) -> list[int]:
    """The source indices a training dataset can serve: a prompted dataset's images with objects,
    a semantic dataset's every image."""
    if hasattr(dataset, "images"):
        return [index for index, _ in dataset.images]
    return list(range(len(dataset.source)))


def _plain_image(dataset, k: int) -> torch.Tensor:
    """The model input of sample ``k`` exactly as ``dataset`` serves it, without augmentation and
    without advancing a prompted dataset's jitter sequence."""
    augment, dataset.augment = dataset.augment, None
    draws = getattr(dataset, "_draws", None)
    try:
        return dataset[k]["image"]
    finally:
        dataset.augment = augment
        if draws is not None:
            dataset._draws = draws


def check_usable(recipe) -> None:
    """The recipe rules (also enforced when a recipe with ``train.embedding_cache`` is validated)."""
    if recipe.train.mode != "decoder_only":
        raise SamtuneError(f"the embedding cache needs train.mode=decoder_only (now {recipe.train.mode}): only a frozen "
                           "image encoder without LoRA gives an image the same embedding at every step.")  # fmt: skip
    if recipe.augment:
        raise SamtuneError("the embedding cache cannot be used with augment: (non-empty): augmentations change the pixels "
                           "at every step, so a cached embedding would be wrong.")  # fmt: skip


def training_datasets(data) -> list:
    """The training datasets of a ``DataBundle`` that read images (prompted and/or semantic)."""
    return [d for d in (data.train, data.train_semantic) if d is not None]


def build_caches(recipe, family: ModelFamily, model, data, device, progress: bool = True) -> dict[int, EmbeddingCache]:
    """One filled cache per training source (prompted and semantic share ``split.train``), by
    ``id(source)``."""
    check_usable(recipe)
    caches: dict[int, EmbeddingCache] = {}
    for dataset in training_datasets(data):
        source = dataset.source
        if id(source) not in caches:
            caches[id(source)] = EmbeddingCache.open(recipe, family, model, source, dataset.transform)
        cache = caches[id(source)]
        computed = cache.fill(model, family, dataset, recipe.eval.batch_size, device, progress=progress)
        log.info("embedding cache %s: %d images encoded, %d cached in all", cache.folder, computed, cache.done_count)
    return caches


def prune(recipe, keep: list[Path]) -> list[Path]:
    """Remove the embedding caches of this recipe's dataset and model name whose key is not one of
    ``keep`` (built under other settings or files), and unreadable ones; returns what was removed."""
    root = cache_root(recipe)
    if not root.is_dir():
        return []
    keep = {Path(k).resolve() for k in keep}
    scope = _scope(recipe)
    removed = []
    for folder in sorted(root.glob(f"{PREFIX}*")):
        if not folder.is_dir() or folder.resolve() in keep:
            continue
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            meta = None
        if meta is None or meta.get("scope") == scope:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def run_cache(recipe, prune_stale: bool = False, progress: bool = True) -> dict:
    """``samtune cache``: build (fill) the embedding caches of the recipe's training data as
    ``samtune train`` would, or with ``prune_stale`` remove stale caches instead (embedding caches
    of this dataset and model name under other keys, and the NIfTI slice cache's stale entries)."""
    from samtune.datasets.cache import prune_slice_cache
    from samtune.finetune.data import build_datasets
    from samtune.finetune.runtime import build_base_model, image_size_of, model_family, resolve_device

    check_usable(recipe)
    family = model_family(recipe)
    data = build_datasets(recipe, family.make_transform(image_size_of(recipe)), progress=progress)
    datasets = training_datasets(data)
    if prune_stale:
        current = [cache_folder(recipe, family, d.source, d.transform) for d in datasets]
        removed = prune(recipe, current)
        if data.split.cache_dir is not None:
            removed += prune_slice_cache(data.split.cache_dir, [src for src in (data.split.train, data.split.val)])
        return {"removed": [str(p) for p in removed], "kept": sorted({str(p) for p in current if p.exists()})}
    device = resolve_device(recipe.train.device)
    model = build_base_model(recipe).to(device)
    caches = build_caches(recipe, family, model, data, device, progress=progress)
    return {"caches": [{"folder": str(c.folder), "entries": c.done_count, "images": c.n, "mb": c.nbytes() / 2**20} for c in caches.values()]}
