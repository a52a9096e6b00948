"""Checkpoints as standard peft adapter folders, written atomically.

In ``lora`` mode a folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (LoRA
weights and the trained mask decoder); in ``decoder_only``/``full`` mode a transformers SamModel
folder (``config.json``, ``model.safetensors``). Both get samtune's ``recipe.yaml`` and
``trainer_state.json``. It is written
to a temporary sibling and swapped in by rename, so an interrupted save never leaves a broken
checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from peft import PeftModel
from transformers import SamModel

from samtune import SamtuneError


def save_checkpoint(model: PeftModel | SamModel, folder: Path, recipe_yaml: str, state: dict) -> None:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
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


def load_checkpoint(folder: str | Path, build_base: Callable[[], SamModel]):
    """Load a checkpoint folder: a peft adapter onto ``build_base()``, or a full SamModel folder
    (written by ``train.mode: decoder_only`` / ``full``)."""
    folder = Path(folder)
    if (folder / "adapter_config.json").is_file():
        if not (folder / "adapter_model.safetensors").is_file():
            raise SamtuneError(f"--checkpoint {folder}: adapter_model.safetensors is missing; the save was interrupted or the folder was copied incompletely.")
        try:
            return PeftModel.from_pretrained(build_base(), str(folder))
        except RuntimeError as exc:  # size mismatch: the recipe builds a different base model
            raise SamtuneError(
                f"--checkpoint {folder}: does not fit the model the recipe builds ({exc}). Use the recipe "
                f"the checkpoint was trained with ({folder / 'recipe.yaml'})."
            ) from None
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return SamModel.from_pretrained(str(folder))
    raise SamtuneError(
        f"--checkpoint {folder}: neither a peft adapter folder (adapter_config.json) nor a SamModel folder "
        "(config.json + model.safetensors); pass a folder written by `samtune train`, e.g. runs/demo/checkpoints/best."
    )
