"""Training augmentation declared in the recipe, built from albumentations by class name.

Applied to the image and its label map together (label maps use nearest-neighbour interpolation,
albumentations' default for masks), before objects and prompts are chosen, so prompts always
describe the augmented object.
"""

from __future__ import annotations

import warnings

import albumentations as A

from samtune.suggest import did_you_mean


def _transform_names() -> list[str]:
    return sorted(
        n for n in dir(A) if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), A.BasicTransform)
    )


def build_transform(name: str, params: dict) -> A.BasicTransform:
    """``albumentations.<name>(**params)``; a ValueError that names the problem otherwise."""
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        hint = did_you_mean(name, _transform_names(), cutoff=0.6, fmt="{!r}")
        raise ValueError(f"{name!r} is not an albumentations transform" + (f"; {hint.rstrip()}" if hint else ""))
    if not issubclass(cls, A.DualTransform) and not issubclass(cls, A.ImageOnlyTransform):
        raise ValueError(f"{name!r} cannot be applied to an image and its label map together")
    call = f"{name}({', '.join(f'{k}={v!r}' for k, v in params.items())})"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            transform = cls(**params)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{call}: {exc}") from None
    for warning in caught:  # albumentations only warns about unknown arguments; a typo must not pass
        if "not valid for transform" in str(warning.message):
            raise ValueError(f"{call}: {warning.message}")
    return transform


def build_augmentation(steps: list[dict]) -> A.Compose | None:
    """``steps``: [{"name": "HorizontalFlip", "p": 0.5}, ...] -> one Compose, or None when empty."""
    if not steps:
        return None
    transforms = [build_transform(s["name"], {k: v for k, v in s.items() if k != "name"}) for s in steps]
    return A.Compose(transforms)
