"""Checkpoints as standard peft adapter folders, written atomically.

In ``lora`` mode a folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (LoRA
weights and the trained mask decoder); in ``decoder_only``/``full`` mode the whole model as its
family saves it (SAM: a transformers SamModel folder, ``config.json`` + ``model.safetensors``).
Both get samtune's ``recipe.yaml`` and ``trainer_state.json``. A folder is written to a temporary
sibling and swapped in by rename, so an interrupted save never leaves a broken checkpoint where a
good one was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from peft import PeftModel

from samtune import SamtuneError
from samtune.adapters.family import CLASS_PROMPTS, ModelFamily
from samtune.finetune.recipe import Recipe, load_recipe
from samtune.finetune.runtime import build_base_model, image_size_of, model_family, resolve_device

log = logging.getLogger(__name__)

# the recipe keys that decide which base model an adapter fits
_BASE_KEYS = ("name", "checkpoint", "image_size", "init_seed")


CLASSES_FILE = "classes.json"


def save_checkpoint(model, folder: Path, recipe_yaml: str, state: dict, classes: dict | None = None, card: str | None = None) -> None:
    """``classes``: the task and, for automatic models, the label space of the class prompts
    (``classes.json``, what ``predict`` needs to name and write classes without the data);
    ``card``: the model card, written as ``README.md`` (``samtune.finetune.model_card``)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if classes is not None:
            (tmp / CLASSES_FILE).write_text(json.dumps(classes, indent=2))
        if card is not None:  # replaces peft's template
            (tmp / "README.md").write_text(card)
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _base_of(folder: Path) -> dict | None:
    """``model:`` keys of the recipe saved with a checkpoint (None when it has none)."""
    try:
        saved = yaml.safe_load((folder / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    model = saved.get("model") if isinstance(saved, dict) else None
    return {k: model.get(k) for k in _BASE_KEYS} if isinstance(model, dict) else None


def _mismatch(folder: Path, base: dict | None) -> SamtuneError:
    """A few lines instead of peft's size-mismatch dump (tens of thousands of characters)."""
    expected = _base_of(folder)
    if expected is None:
        wanted = "a different base model (its recipe.yaml is missing, so which one is unknown)"
    else:
        wanted = "the base " + ", ".join(f"model.{k}={v!r}" for k, v in expected.items())
    built = "" if base is None else "; the recipe builds " + ", ".join(f"model.{k}={v!r}" for k, v in base.items())
    return SamtuneError(
        f"--checkpoint {folder}: this adapter was trained on {wanted}{built}. Evaluate it with the recipe it "
        f"was trained with ({folder / 'recipe.yaml'}), or set the model keys above to match."
    )


def check_same_base(folder: Path, base_keys: dict | None) -> None:
    """An adapter loads onto any base of the same shapes (every ``tiny`` size, any init seed, any
    checkpoint of one architecture), so a different base would give wrong numbers without an error:
    refuse another model name, weights file or init seed; warn on another input size (LoRA and the
    decoder do not depend on it, so evaluating at another size is an experiment one may run)."""
    saved = _base_of(folder)
    if saved is None or base_keys is None:
        return
    name_of = lambda c: Path(str(c)).name if c else None  # noqa: E731  (weights move between machines)
    differ = [k for k in ("name", "init_seed") if saved.get(k) != base_keys.get(k)]
    if name_of(saved.get("checkpoint")) != name_of(base_keys.get("checkpoint")):
        differ.append("checkpoint")
    if differ:
        raise _mismatch(folder, base_keys)
    if saved.get("image_size") != base_keys.get("image_size"):
        log.warning("--checkpoint %s was trained at model.image_size=%s; the recipe runs it at %s", folder, saved.get("image_size"), base_keys.get("image_size"))


def read_classes(folder: str | Path) -> dict | None:
    """The checkpoint's ``classes.json`` (task, class prompt tokens, label space), None if absent."""
    path = Path(folder) / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        classes = json.loads(path.read_text())
        int(classes["tokens"]), dict(classes["label_space"])  # both present
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SamtuneError(f"{path}: not a readable samtune classes file ({type(exc).__name__}: {exc}); copy it again from the run folder.") from None
    return classes


def load_checkpoint(folder: str | Path, family: ModelFamily, build_base: Callable[[], object], base_keys: dict | None = None):
    """Load a checkpoint folder: a peft adapter onto ``build_base()``, or a whole model saved by
    ``train.mode: decoder_only`` / ``full``. ``base_keys``: the recipe's ``model:`` keys, named
    in the error when the adapter does not fit. An automatic model (``classes.json``) gets its
    class prompts on the base first, so plain peft loads them with the decoder."""
    folder = Path(folder)
    classes = read_classes(folder)
    n_classes = len(classes["label_space"]["ids"]) if classes and int(classes["tokens"]) else 0
    if (folder / "adapter_config.json").is_file():
        if not (folder / "adapter_model.safetensors").is_file():
            raise SamtuneError(f"--checkpoint {folder}: adapter_model.safetensors is missing; the save was interrupted or the folder was copied incompletely.")
        check_same_base(folder, base_keys)
        base = build_base()
        if n_classes:
            family.add_class_prompts(base, n_classes, int(classes["tokens"]))
        try:
            return PeftModel.from_pretrained(base, str(folder))
        except RuntimeError:  # size mismatch: the recipe builds a different base model
            raise _mismatch(folder, base_keys) from None
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        model = family.load_full(folder)
        if n_classes:  # the family's loader does not know the extra module: load it from the weights file
            from safetensors.torch import load_file

            family.add_class_prompts(model, n_classes, int(classes["tokens"]))
            state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k.startswith(CLASS_PROMPTS + ".")}
            getattr(model, CLASS_PROMPTS).load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()})
        return model
    raise SamtuneError(
        f"--checkpoint {folder}: neither a peft adapter folder (adapter_config.json) nor a whole-model folder "
        "(config.json + model.safetensors); pass a folder written by `samtune train`, e.g. runs/demo/checkpoints/best."
    )


@dataclass
class LoadedModel:
    """A fine-tuned model ready to run: ``model`` (eval mode, on ``device``), the ``recipe`` it was
    trained with, its ``family`` (preprocessing, encode/decode), and the ``checkpoint`` folder."""

    model: torch.nn.Module
    recipe: Recipe
    family: ModelFamily
    checkpoint: Path
    device: torch.device

    @property
    def image_size(self) -> int:
        return image_size_of(self.recipe)

    def transform(self):
        """The preprocessing this model expects (``transform(image=H×W×3 uint8, mask=H×W)``)."""
        return self.family.make_transform(self.image_size)


def checkpoint_folder(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its best checkpoint, else its last)."""
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path
    for name in ("best", "last"):
        if (path / "checkpoints" / name).is_dir():
            return path / "checkpoints" / name
    raise SamtuneError(f"{path}: neither a checkpoint folder (adapter_config.json) nor a run folder with checkpoints/best or checkpoints/last.")


def load_onto_base(recipe: Recipe, family: ModelFamily, checkpoint: str | Path):
    """A checkpoint folder loaded onto the recipe's base model (checked against the folder's recipe)."""
    model = load_checkpoint(checkpoint, family, lambda: build_base_model(recipe), recipe.model.model_dump())
    family.set_attention(model, recipe.model.attention)  # whole-model folders do not come from build_base_model
    return model


def load_model(run_dir_or_checkpoint: str | Path, recipe: Recipe | str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """The model of a run folder (its best checkpoint) or of a checkpoint folder, with its recipe
    (``CHECKPOINT/recipe.yaml`` unless ``recipe`` is given)."""
    folder = checkpoint_folder(Path(run_dir_or_checkpoint))
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe or folder / "recipe.yaml")
    family = model_family(recipe)
    model = load_onto_base(recipe, family, folder)
    target = resolve_device(device)
    return LoadedModel(model.to(target).eval(), recipe, family, folder, target)
