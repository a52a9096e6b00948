"""samtune: fine-tune Segment Anything for one domain at a time.

The root package holds what every subpackage may import (errors, constants, file writing, the
recipe section base) and the public Python API; it imports none of ``samtune.finetune``,
``samtune.datasets`` or ``samtune.adapters`` (nor torch) until an API function is first used, so
``samtune --help``, ``samtune validate`` and ``samtune recipe-keys`` start quickly.

Public API (see the README, "Python API")::

    import samtune
    recipe = samtune.load_recipe("recipes/demo.yaml", ["train.steps=100"])
    metrics = samtune.train(recipe)                         # writes recipe.output.dir
    metrics = samtune.evaluate(recipe, "runs/demo/checkpoints/best")
    loaded = samtune.load_model("runs/demo")                # .model, .recipe, .family
    sam = samtune.adapters.build_sam("tiny", image_size=128)

Subpackages: ``samtune.finetune`` (CLI, recipes, training, metrics), ``samtune.datasets`` (data
formats, prompts, demo data) and ``samtune.adapters`` (model families, LoRA, export).
"""

import importlib
import os

from samtune.errors import SamtuneError

__version__ = "0.1.0"

# albumentations asks PyPI for a newer release when imported; samtune runs on offline machines
# (hospital networks, GPU nodes), where that costs a timeout and a warning.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# public name -> module that defines it (imported on first use: PEP 562)
_API = {
    "load_recipe": "samtune.finetune.recipe",
    "train": "samtune.finetune.api",
    "evaluate": "samtune.finetune.api",
    "load_model": "samtune.finetune.api",
    "report": "samtune.finetune.api",
    "LoadedModel": "samtune.finetune.api",
    "Recipe": "samtune.finetune.recipe",
}
_SUBPACKAGES = ("finetune", "datasets", "adapters")

__all__ = ["SamtuneError", "__version__", *_API, *_SUBPACKAGES]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"samtune.{name}")
    raise AttributeError(f"module 'samtune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
