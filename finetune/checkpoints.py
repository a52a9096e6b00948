"""Checkpoints as standard peft adapter folders, written atomically.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (LoRA weights and the
trained mask decoder), plus samtune's ``recipe.yaml`` and ``trainer_state.json``. It is written
to a temporary sibling and swapped in by rename, so an interrupted save never leaves a broken
checkpoint where a good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel

from samtune import SamtuneError


def save_checkpoint(model: PeftModel, folder: Path, recipe_yaml: str, state: dict) -> None:
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


def load_checkpoint(base_model, folder: str | Path) -> PeftModel:
    """Load an adapter folder onto a freshly built base model (plain peft)."""
    folder = Path(folder)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise SamtuneError(
                f"--checkpoint {folder}: {name} is missing; pass a folder written by `samtune train` "
                "(e.g. runs/demo/checkpoints/best)."
            )
    try:
        return PeftModel.from_pretrained(base_model, str(folder))
    except RuntimeError as exc:  # size mismatch: the recipe builds a different base model
        raise SamtuneError(
            f"--checkpoint {folder}: does not fit the model the recipe builds ({exc}). Use the recipe the "
            f"checkpoint was trained with ({folder / 'recipe.yaml'})."
        ) from None
