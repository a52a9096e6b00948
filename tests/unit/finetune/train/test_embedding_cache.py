"""The decoder_only embedding cache: the encoder's output to float16 precision, computed once, a new
folder when the key changes, refused where an embedding would change, training with it lands where
training without it does, and `samtune cache` builds and prunes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from samtune import SamtuneError
from samtune.finetune.recipe import validate_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _raw(phantom, tmp_path, **train) -> dict:
    return {
        "task": "both", "data": {"kind": "nifti", "root": str(phantom), "val_fraction": 0.34, "cache_dir": str(tmp_path / "cache")},
        "model": {"name": "tiny", "image_size": 64},
        "train": {"mode": "decoder_only", "embedding_cache": True, "steps": 3, "batch_size": 4, "eval_every": 1, "lr": 1e-3, **train},
        "prompts": {"box_jitter_px": 2}, "eval": {"max_samples": 8}, "output": {"dir": str(tmp_path / "run")},
    }  # fmt: skip


def _setup(recipe):
    from samtune.finetune.data import build_datasets
    from samtune.finetune.runtime import build_base_model, image_size_of, model_family

    family = model_family(recipe)
    data = build_datasets(recipe, family.make_transform(image_size_of(recipe)), progress=False)
    return family, data, build_base_model(recipe).eval()


def test_cached_embeddings_equal_the_encoder_and_are_computed_once(phantom, tmp_path, monkeypatch):
    from samtune.finetune.train.embedding_cache import EmbeddingCache, build_caches

    recipe = validate_recipe(_raw(phantom, tmp_path))
    family, data, model = _setup(recipe)
    caches = build_caches(recipe, family, model, data, torch.device("cpu"), progress=False)
    assert len(caches) == 1  # prompted and semantic training share one source
    cache = next(iter(caches.values()))
    assert cache.folder.parent == tmp_path / "cache" and cache.folder.name.startswith("embeddings-")
    assert cache.done_count == len(data.train_semantic) == cache.n
    assert {p.name for p in cache.folder.iterdir()} == {"embeddings.npy", "done.npy", "meta.json"}
    stored = np.load(cache.folder / "embeddings.npy", mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape[0] == cache.n

    indices = [0, 3, len(data.train_semantic) - 1]
    images = torch.stack([data.train_semantic[i]["image"] for i in indices])
    with torch.no_grad():
        expected = family.encode_images(model, images).image_embeddings
    got = cache.get(indices)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3 * expected.abs().max().item())
    # the prompted dataset serves the same pixels for the same source index
    k = next(k for k, (index, _) in enumerate(data.train.images) if index == indices[1])
    torch.testing.assert_close(data.train[k]["image"], images[1])

    calls = []
    original = family.encode_images
    monkeypatch.setattr(family, "encode_images", lambda m, x: calls.append(len(x)) or original(m, x))
    again = EmbeddingCache.open(recipe, family, model, data.train_semantic.source, data.train_semantic.transform)
    assert again.folder == cache.folder and again.done_count == cache.n
    assert again.fill(model, family, data.train_semantic, 4, "cpu", progress=False) == 0
    assert again.fill(model, family, data.train, 4, "cpu", progress=False) == 0
    assert calls == []


def test_an_interrupted_fill_is_completed_and_missing_rows_give_none(phantom, tmp_path):
    from samtune.finetune.train.embedding_cache import EmbeddingCache

    recipe = validate_recipe(_raw(phantom, tmp_path))
    family, data, model = _setup(recipe)
    dataset = data.train_semantic
    cache = EmbeddingCache.open(recipe, family, model, dataset.source, dataset.transform)
    assert cache.get([0]) is None
    cache.fill(model, family, dataset, 4, "cpu", progress=False)
    cache._done[2] = False  # as if killed after writing row 2, before marking it
    cache._done.flush()
    reopened = EmbeddingCache.open(recipe, family, model, dataset.source, dataset.transform)
    assert reopened.get([0, 2]) is None and reopened.get([0, 1]) is not None
    assert reopened.fill(model, family, dataset, 4, "cpu", progress=False) == 1


def test_a_changed_key_gives_another_folder(phantom, tmp_path):
    from samtune.finetune.train.embedding_cache import cache_folder

    def folder(**changes):
        raw = _raw(phantom, tmp_path)
        raw["model"].update(changes)
        recipe = validate_recipe(raw)
        family, data, _ = _setup(recipe)
        return cache_folder(recipe, family, data.train_semantic.source, data.train_semantic.transform)

    base = folder()
    assert folder() == base
    assert folder(image_size=32) != base
    assert folder(init_seed=1) != base


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train": {"mode": "lora"}}, r"train.embedding_cache=true needs train.mode=decoder_only \(now 'lora'\)"),
        ({"augment": [{"name": "HorizontalFlip", "p": 0.5}]}, r"train.embedding_cache=true cannot be combined with augment: .*cached embedding would be wrong"),
    ],
)
def test_refused_where_an_embedding_would_change(phantom, tmp_path, changes, message):
    raw = _raw(phantom, tmp_path)
    raw["train"].update(changes.get("train", {}))
    if "augment" in changes:
        raw["augment"] = changes["augment"]
    with pytest.raises(SamtuneError, match=message):
        validate_recipe(raw)


def test_training_with_the_cache_matches_training_without(phantom, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import samtune.finetune.train.loop as T
    import samtune.finetune.train.run as R

    used = []
    original = R.cached_embeddings
    monkeypatch.setattr(R, "cached_embeddings", lambda *a: used.append(original(*a) is not None) or original(*a))
    runs = {}
    for name, cached in (("plain", False), ("cached", True)):
        used.clear()
        raw = _raw(phantom, tmp_path, embedding_cache=cached, log_every=1)
        raw["output"]["dir"] = str(tmp_path / name)
        T.train(validate_recipe(raw))
        assert used and all(used) == cached and any(used) == cached  # every step read the cache, or none did
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert any(p.name.startswith("embeddings-") for p in (tmp_path / "cache").iterdir())
    plain = [h["loss"] for h in runs["plain"]["history"]]
    cached = [h["loss"] for h in runs["cached"]["history"]]
    assert len(plain) == len(cached) == 3
    np.testing.assert_allclose(cached, plain, rtol=1e-2)
    a = load_file(str(tmp_path / "plain" / "checkpoints" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "cached" / "checkpoints" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-2, atol=1e-3)


def test_cache_command_builds_and_prunes(phantom, tmp_path, capsys):
    from samtune.finetune.cli import main

    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(_raw(phantom, tmp_path)))
    cache_dir = tmp_path / "cache"
    assert main(["-q", "cache", str(recipe_file)]) == 0
    out = capsys.readouterr().out
    current = [p for p in cache_dir.iterdir() if p.name.startswith("embeddings-")]
    assert len(current) == 1 and str(current[0]) in out and "images cached" in out and "MB" in out
    assert main(["-q", "cache", str(recipe_file), "model.init_seed=1"]) == 0  # other weights: another cache
    stale = [p for p in cache_dir.iterdir() if p.name.startswith("embeddings-") and p != current[0]]
    assert len(stale) == 1
    # a NIfTI slice-cache entry of a case under an older key
    case_entry = next(p for p in cache_dir.iterdir() if not p.name.startswith("embeddings-") and p.is_dir())
    old_entry = cache_dir / (case_entry.name[:-24] + "0" * 24)
    shutil.copytree(case_entry, old_entry)
    capsys.readouterr()
    assert main(["-q", "cache", "--prune", str(recipe_file)]) == 0
    out = capsys.readouterr().out
    assert not stale[0].exists() and not old_entry.exists()
    assert current[0].is_dir() and case_entry.is_dir()
    assert "2 stale caches removed" in out


def test_cache_command_refuses_other_modes(phantom, tmp_path, capsys):
    from samtune.finetune.cli import main

    raw = _raw(phantom, tmp_path)
    raw["train"].update(mode="lora", embedding_cache=False)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(raw))
    assert main(["-q", "cache", str(recipe_file)]) == 2
    assert "needs train.mode=decoder_only" in capsys.readouterr().err
