"""The "did you mean" hint of every error about a misspelt name (recipe keys, presets, models, cases)."""

from __future__ import annotations

import difflib
from typing import Iterable


def closest(word: str, options: Iterable[str], cutoff: float = 0.5) -> str | None:
    matches = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=cutoff)
    return matches[0] if matches else None


def did_you_mean(word: str, options: Iterable[str], cutoff: float = 0.5, fmt: str = "`{}`") -> str:
    """``"did you mean `x`? "`` for the closest option, or ``""`` when none is close."""
    match = closest(word, options, cutoff)
    return f"did you mean {fmt.format(match)}? " if match else ""
