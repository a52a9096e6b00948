"""Training state for exact resume: ``<output.dir>/states/step_NNNNNN/`` every ``train.save_every``
steps, written atomically (temporary folder, fsync, rename), the last ``train.keep_states`` kept.

A state holds everything the rest of the run depends on: the trained weights (``trainable.safetensors``),
the optimiser and scheduler (``optimizer.pt``, read back with ``torch.load(weights_only=True)``),
every random state the loop draws from (Python, NumPy, torch CPU and CUDA, and the loop's own
generators: corrective clicks, box-or-points, automatic-or-prompted), the data order (how many
batches each loader has served; the order itself is a seeded list, ``DataOrder``), the prompt
jitter counter of the prompted dataset, and the loop's bookkeeping (best, history, baseline).
On the CPU, a run killed at any moment and resumed from its latest state ends with the same
bytes in its adapter files as an uninterrupted run (tested with SIGKILL). DataLoader workers
(``train.num_workers > 0``) and albumentations' own random state are not captured: with either,
a resumed run is statistically, not bitwise, the same.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import Sampler

from samtune import SamtuneError

STATES = "states"
# recipe keys that cannot change a run's numbers: --resume-force lets them differ
NEUTRAL_KEYS = frozenset({
    "train.eval_every", "train.log_every", "train.save_every", "train.keep_states", "train.num_workers", "output.dir",
})  # fmt: skip


class DataOrder(Sampler):
    """The sample order of ``torch.utils.data.RandomSampler(replacement=True)`` with a seeded
    generator (same draws: chunks of 32), computed up front so that a resumed run can start at
    any position; ``start`` skips that many samples. With ``world`` > 1 processes, the draws are
    cut into batches of ``batch_size`` and rank ``r`` takes batches r, r + world, ...: one step of
    all ranks together trains on the draws of one world·batch_size batch of a single process."""

    def __init__(self, n: int, total: int, seed: int, start: int = 0, batch_size: int = 1, rank: int = 0, world: int = 1):
        generator = torch.Generator().manual_seed(seed)
        order = [torch.randint(high=n, size=(32,), dtype=torch.int64, generator=generator) for _ in range(total // 32)]
        order.append(torch.randint(high=n, size=(total % 32,), dtype=torch.int64, generator=generator))
        self.order = torch.cat(order).tolist()[start:]
        if world > 1:
            batches = [self.order[i : i + batch_size] for i in range(0, len(self.order), batch_size)]
            self.order = [i for batch in batches[rank::world] for i in batch]

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix == "automatic." and k == "class_weights"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _with_defaults(saved_yaml: str) -> str:
    """The saved recipe with every key samtune has added since at its default (a run saved before
    ``automatic.corrective_rounds`` existed trained with its default, 0); as saved if it no longer
    validates (the difference is then reported key by key)."""
    from samtune.finetune.recipe import Recipe, dump_recipe

    try:
        return dump_recipe(Recipe.model_validate(yaml.safe_load(saved_yaml)))
    except Exception:  # noqa: BLE001  (an old key the schema no longer has)
        return saved_yaml


def check_same_recipe(saved_yaml: str, current_yaml: str, folder: Path, force: bool) -> None:
    """Refuse to resume with a changed recipe, naming the keys; ``force`` allows NEUTRAL_KEYS."""
    saved, current = _flat(yaml.safe_load(_with_defaults(saved_yaml))), _flat(yaml.safe_load(current_yaml))
    differ = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if not differ:
        return
    blocking = [k for k in differ if not (force and k in NEUTRAL_KEYS)]
    if blocking:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in blocking)
        neutral = [k for k in blocking if k in NEUTRAL_KEYS]
        hint = (f" --resume-force allows {', '.join(neutral)} (they cannot change results)" if neutral else
                " these keys change results: resume with the recipe the run was started with, or start a new run")  # fmt: skip
        raise SamtuneError(f"--resume {folder}: the recipe differs from the run's ({shown});{hint}.")


def state_folders(out: Path) -> list[Path]:
    root = Path(out) / STATES
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "state.json").is_file()) if root.is_dir() else []


def find_state(out: Path, given: str | Path | None) -> Path:
    """The state to resume: ``given`` (a state folder or a run folder: its latest) or ``out``'s latest."""
    where = Path(given) if given not in (None, "latest") else Path(out)
    if (where / "state.json").is_file():
        return where
    found = state_folders(where)
    if not found:
        raise SamtuneError(f"--resume: no training state in {where / STATES} (states are written every train.save_every steps); start the run without --resume.")
    return found[-1]


def rng_states(generators: dict) -> tuple[dict, dict]:
    """(JSON-able states, tensor states) of the global generators and the loop's own."""
    as_json = {"python": _to_json(random.getstate()), "numpy": _to_json(np.random.get_state(legacy=False))}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    for name, gen in generators.items():
        if isinstance(gen, torch.Generator):
            tensors[f"gen_{name}"] = gen.get_state()
        else:  # numpy Generator
            as_json[f"gen_{name}"] = gen.bit_generator.state
    return as_json, tensors


def restore_rng_states(as_json: dict, tensors: dict, generators: dict) -> None:
    random.setstate(_from_json(as_json["python"]))
    numpy_state = dict(as_json["numpy"])
    numpy_state["state"] = {"key": np.asarray(numpy_state["state"]["key"], np.uint32), "pos": numpy_state["state"]["pos"]}
    np.random.set_state(numpy_state)
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    for name, gen in generators.items():
        if isinstance(gen, torch.Generator):
            gen.set_state(tensors[f"gen_{name}"])
        else:
            gen.bit_generator.state = as_json[f"gen_{name}"]


def _to_json(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(value):
    return tuple(_from_json(v) for v in value) if isinstance(value, list) else value


def save_state(out: Path, step: int, model, optimizer, scheduler, loop: dict, rank_states: list[tuple[dict, dict]], recipe_yaml: str, keep: int) -> Path:
    """Write ``states/step_NNNNNN`` atomically and drop all but the newest ``keep``. ``rank_states``:
    each rank's ``rng_states`` (JSON, tensors), in rank order (one entry with one process)."""
    from safetensors.torch import save_file

    root = Path(out) / STATES
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}.tmp-"))
    try:
        trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        for rank, (_, tensors) in enumerate(rank_states):
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / _rng_file(rank)))
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        saved = {"step": step, "world_size": len(rank_states), "loop": loop, "rng": [as_json for as_json, _ in rank_states]}
        (tmp / "state.json").write_text(json.dumps(saved, allow_nan=True))
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in state_folders(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _rng_file(rank: int) -> str:
    return "rng.safetensors" if rank == 0 else f"rng_rank{rank}.safetensors"


def load_state(folder: Path, model, optimizer, scheduler, rank: int = 0, world: int = 1) -> tuple[int, dict, dict, dict]:
    """Weights, optimiser and scheduler restored in place; returns (step, loop bookkeeping, this
    rank's RNG states as JSON and as tensors) for the caller to restore once its loaders exist."""
    from safetensors.torch import load_file

    try:
        saved = json.loads((folder / "state.json").read_text())
        trainable = load_file(str(folder / "trainable.safetensors"))
        opt = torch.load(folder / "optimizer.pt", weights_only=True)
        tensors = load_file(str(folder / _rng_file(rank)))
    except (OSError, ValueError, RuntimeError) as exc:
        raise SamtuneError(f"--resume {folder}: the state cannot be read ({type(exc).__name__}: {exc}); resume from an older one in {folder.parent}.") from None
    saved_world = int(saved.get("world_size", 1))
    if saved_world != world:
        raise SamtuneError(
            f"--resume {folder}: the state was written by {saved_world} process(es), this run has {world}; resume with the "
            f"same number (torchrun --nproc_per_node {saved_world} ...) so that every process continues its own data order."
        )
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in trainable]
    if missing:
        raise SamtuneError(f"--resume {folder}: the state does not hold {missing[0]} (and {len(missing) - 1} more trained weights); was it written by another recipe?")
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # states written before multi-process runs held one dict
    return int(saved["step"]), saved["loop"], rng[rank], tensors
