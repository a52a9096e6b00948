"""Names and files at the server's edge: ids that cannot name a path, paths checked against their
root after resolving symlinks, and uploads written to a temporary sibling then renamed into place
(an interrupted upload leaves nothing half-written)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from samtune.finetune.serve.errors import BadRequest, NotFound

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_id(value: str, field: str) -> str:
    """An image id or tag as a plain file-name stem, else 400 naming ``field``."""
    if not isinstance(value, str) or not ID_PATTERN.match(value) or ".." in value:
        raise BadRequest(field, f"{value!r} is not a valid id (letters, digits, '.', '_', '-'; no path separators or '..')")
    return value


def inside(root: Path, path: Path, field: str) -> Path:
    """``path`` resolved (symlinks followed); 404 naming ``field`` when it leaves ``root``."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise NotFound(field, f"{path.name} is not in the studies folder")
    return resolved


def write_atomic(data_from: Path, target: Path) -> None:
    """Move a finished temporary file into place (same folder: an atomic rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(data_from, target)


def temp_in(folder: Path, suffix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".upload-", suffix=suffix, dir=folder)
    os.close(fd)
    return Path(name)
