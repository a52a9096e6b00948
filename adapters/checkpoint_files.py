"""Safe reading of checkpoint files into flat CPU state dicts.

Reads `.pth`/`.pt` (tensor-only pickles, never executing code from the file) and `.safetensors`,
unwraps training wrappers (`{"model": sd}`, `{"state_dict": sd}`) and DDP's `module.` prefix, and
turns unreadable, unsafe or non-tensor files into a `CheckpointError` that names the file and the fix.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from samtune import SamtuneError


class CheckpointError(SamtuneError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file and the fix."""


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """Read a `.pth`/`.pt` (tensor-only pickle) or `.safetensors` file into a flat CPU state dict.

    Unwraps `{"model": sd}` / `{"state_dict": sd}` training wrappers and strips DDP's `module.`
    prefix. Never executes code from the file: pickles are read with `weights_only=True`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file. Check the path or download the checkpoint first.")
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            obj = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own (Rust) error type for bad headers/lengths
            raise _corrupt_error(path, exc) from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights only load failed" not in str(exc).lower():
                raise _corrupt_error(path, exc) from exc
            culprit = re.search(r"GLOBAL (\S+)", str(exc))  # e.g. "posix.system"
            raise CheckpointError(
                f"{path}: refused: unpickling this file would execute code (it references "
                f"{culprit[1] if culprit else 'objects other than tensors'}); no code was run. Use a checkpoint "
                f"from a trusted source, or re-save only its tensors (torch.save(state_dict)) or as .safetensors."
            ) from exc
        except Exception as exc:  # truncated zip archives raise RuntimeError, short legacy pickles EOFError
            raise _corrupt_error(path, exc) from exc
    return _unwrap_state_dict(obj, path)


def _corrupt_error(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {exc}); the file ({path.stat().st_size} "
        f"bytes) is truncated or corrupt. Download it again and compare its size/checksum with the published one."
    )


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    wrappers = ("state_dict", "model", "model_state_dict")
    for _ in range(3):  # e.g. {"model": {"state_dict": sd}, "epoch": 3}; training scripts nest no deeper
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in wrappers if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path}: holds {'an empty ' if isinstance(obj, Mapping) else 'a '}{type(obj).__name__}, not a state "
            f"dict of tensors. Point the config at the weights file (e.g. sam_vit_b_01ec64.pth)."
        )
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(
            f"{path}: entries that are not tensors: {not_tensors[:8]}. Save only the model's state_dict() "
            f"(or wrap it as {{'model': state_dict}})."
        )
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_exactly(model, state: dict, source: str, what: str, fix: str, *, unknown=(), named=lambda k: k, assign: bool = True,
                 tie: bool = False):  # fmt: skip
    """Load ``state`` into ``model`` (built on the meta device when ``assign``) with every key
    accounted for: missing or unexpected keys (``unknown``: checkpoint keys no conversion knew),
    shape mismatches and parameters left on the meta device are ``CheckpointError``s naming
    ``source``, ``what`` it should fit and the ``fix``; keys in messages go through ``named``
    (e.g. back to the checkpoint's own names). ``tie``: re-tie shared parameters after ``assign``."""
    expected = set(model.state_dict())
    missing = sorted(named(k) for k in expected - state.keys())
    unexpected = sorted([*unknown, *(named(k) for k in state.keys() - expected)])
    if missing or unexpected:
        raise CheckpointError(f"{source}: does not fit {what}. Missing keys ({len(missing)}): {missing[:20]}; "
                              f"unexpected keys ({len(unexpected)}): {unexpected[:20]}. {fix}")  # fmt: skip
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{source}: tensor shapes do not fit {what}: {exc}. {fix}") from exc
    if tie:
        model.tie_weights()  # assign=True gave tied parameters separate objects
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"{source}: no values for {left_on_meta[:10]}. {fix}")
    return model


def load_part(model, tensors: dict, belongs, what: str) -> None:
    """Load ``tensors`` into the part of ``model`` whose state-dict keys satisfy ``belongs`` (a video
    tracker's memory modules, beside modules it shares with the image model): exactly those keys,
    with their shapes, or a ``CheckpointError`` saying they do not fit ``what``."""
    expected = {k for k in model.state_dict() if belongs(k)}
    missing, unexpected = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(f"the memory modules do not fit {what}: missing {missing[:8]}, unexpected {unexpected[:8]}.")
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shapes
        raise CheckpointError(f"the memory modules do not fit {what}: {exc}") from None
