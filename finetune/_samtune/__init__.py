"""samtune: fine-tune Segment Anything for one domain at a time.

Subpackages: ``samtune.finetune`` (CLI, recipes, training, metrics), ``samtune.datasets``
(data adapters, prompts, demo data) and ``samtune.adapters`` (SAM models, LoRA, export).
"""

import os

__version__ = "0.1.0"

# albumentations asks PyPI for a newer release when imported; samtune runs on offline machines
# (hospital networks, GPU nodes), where that costs a timeout and a warning.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


class SamtuneError(Exception):
    """A problem the user can fix (bad recipe, missing file, wrong checkpoint).

    The CLI prints its message without a traceback and exits non-zero, so the message must name
    the file, key or value at fault and say how to fix it.
    """
