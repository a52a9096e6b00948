"""Bad data, caught before hours of training are lost: one error type, shared file listing and checks.

Every problem found in a user's data is a ``BadCase``: a ``SamtuneError`` whose message names the
case, the file at fault, what is wrong and how to fix it. With ``data.on_bad_case: error`` (the
default) the first one stops the run; with ``skip`` the case (or image) is left out and its
``record()`` — ``{"case", "file", "problem"}`` — is listed in the run's log, ``metrics.json``
(``skipped_cases``) and ``samtune inspect``.

Policy decisions (documented in docs/howto/own_data.md, "Checking the data and bad data"):
- an all-background label is legal (a case without the organ) but suspicious: a warning, not a problem;
- macOS ``._*`` resource forks, ``.DS_Store`` and other hidden files are ignored with a note;
- any other file in a data folder that is not of the expected type is a problem (it is either a
  mistake, or data that would silently be left out).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from samtune import SamtuneError

log = logging.getLogger(__name__)

ON_BAD_CASE = ("error", "skip")
_JUNK_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini"}


class BadCase(SamtuneError):
    """One case (volume pair) or image pair that cannot be used as it is."""

    def __init__(self, case: str | None, file: str | Path | None, problem: str, fix: str = ""):
        self.case = case
        self.file = str(file) if file is not None else None
        fix = fix.strip().rstrip(".")
        if fix.split(" ", 1)[0].replace("-", "").isalpha():  # a sentence; not a key (data.x) or a path
            fix = fix[:1].upper() + fix[1:]
        self.problem = problem.rstrip(".") + "." + (f" {fix}." if fix else "")
        where = " ".join(p for p in (f"case {case}:" if case else "", f"{file}:" if file else "") if p)
        super().__init__(f"{where} {self.problem}".strip())

    def record(self) -> dict:
        return {"case": self.case, "file": self.file, "problem": self.problem}


def handle_bad(bad: BadCase, on_bad_case: str, skipped: list[dict]) -> None:
    """Raise ``bad`` (``error`` mode) or add its record to ``skipped`` (``skip`` mode)."""
    if on_bad_case not in ON_BAD_CASE:
        raise ValueError(f"on_bad_case must be one of {ON_BAD_CASE}, got {on_bad_case!r}")
    if on_bad_case == "error":
        raise bad
    skipped.append(bad.record())


_LOGGED_SKIPPED = 20  # the log names this many bad cases with their file and problem; inspect lists all


def describe_skipped(record: dict) -> str:
    """``case X (path/file.nii.gz): problem`` (or ``path/file: problem`` for a stray file)."""
    case, file = record.get("case"), record.get("file")
    if case:
        where = f"case {case}" + (f" ({file})" if file else "")
    else:
        where = file or "?"
    return f"{where}: {record.get('problem', '')}"


def log_skipped(skipped: list[dict], what: str = "cases") -> None:
    """One warning: how many were left out, then each one's case, file and problem."""
    if skipped:
        names = ", ".join(str(s["case"] or Path(s["file"] or "?").name) for s in skipped)
        lines = [f"  - {describe_skipped(s)}" for s in skipped[:_LOGGED_SKIPPED]]
        if len(skipped) > _LOGGED_SKIPPED:
            lines.append(f"  ... and {len(skipped) - _LOGGED_SKIPPED} more (`samtune inspect` lists every one)")
        log.warning("data.on_bad_case=skip: %d %s left out: %s\n%s", len(skipped), what, names, "\n".join(lines))


def is_junk(path: Path) -> bool:
    """macOS resource forks (``._name``), Finder/Explorer metadata and other hidden files."""
    return path.name.startswith(".") or path.name in _JUNK_NAMES


def list_data_files(
    folder: Path, suffixes: tuple[str, ...], what: str, notes: list[str]
) -> tuple[list[Path], list[BadCase]]:
    """Files of ``folder`` (not recursive) whose name ends with one of ``suffixes`` (lower-case),
    sorted; junk files add a note; any other file is a ``BadCase`` (returned, not raised)."""
    files, bad = [], []
    for path in sorted(folder.iterdir()):
        if is_junk(path):
            kind = "macOS resource fork" if path.name.startswith("._") else "hidden file"
            notes.append(f"{path}: ignored ({kind})")
        elif path.is_dir():
            notes.append(f"{path}: ignored (a folder inside {folder.name}/)")
        elif path.name.lower().endswith(suffixes):
            files.append(path)
        else:
            bad.append(
                BadCase(
                    None, path, f"not a {what} file (expected {' or '.join(suffixes)})",
                    f"move it out of {folder}, or set data.on_bad_case=skip to ignore it",
                )
            )  # fmt: skip
    return files, bad


def check_label_values(values: np.ndarray, allowed: set[int] | None, ignore_index: int, case: str | None, file: Path) -> None:
    """``values``: the distinct values of a label map. They must be integers, 0 (background),
    ``ignore_index`` or a class of the class map (``allowed``; None accepts 1..254)."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)):
            raise BadCase(case, file, "the label holds NaN or infinite values", "re-export the segmentation as integers")
        if not np.all(values == np.round(values)):
            odd = values[values != np.round(values)][:5].tolist()
            raise BadCase(
                case, file, f"the label holds non-integer values {odd}: it is not a label map (resampled with "
                "linear interpolation, or an image saved as a label?)", "resample labels with nearest neighbour",
            )  # fmt: skip
    ints = {int(v) for v in values.tolist()}
    negative = sorted(v for v in ints if v < 0)
    if negative:
        raise BadCase(case, file, f"the label holds negative values {negative[:5]}", "use 0 for background and 1.. for classes")
    known = {0, ignore_index} | (set(allowed) if allowed is not None else set(range(1, 255)))
    unknown = sorted(ints - known)
    if unknown:
        shown = f"{sorted(allowed)}" if allowed is not None else "1..254"
        raise BadCase(
            case, file, f"label values {unknown[:10]} are not in the class map (classes {shown}, background 0"
            f"{f', ignored {ignore_index}' if ignore_index >= 0 else ''})",
            "add them to dataset.json `labels` or data.class_names, or remap them to 0",
        )  # fmt: skip


def check_finite_image(image: np.ndarray, case: str | None, file: Path) -> None:
    """NaN/inf voxels and empty (zero-size or single-valued) images are problems."""
    if image.size == 0:
        raise BadCase(case, file, f"the image is empty (shape {image.shape})", "re-export it")
    if image.dtype.kind == "f":
        bad = ~np.isfinite(image)
        if bad.any():
            raise BadCase(
                case, file, f"the image has {int(bad.sum())} NaN or infinite voxels",
                "replace them (e.g. with the air value, -1024 HU for CT) or re-export the scan",
            )  # fmt: skip
    lo, hi = float(image.min()), float(image.max())
    if lo == hi:
        raise BadCase(case, file, f"the image has the single value {lo:g} everywhere (empty or a failed export)", "re-export it")


def list_input_files(paths: list, suffixes: tuple[str, ...], pattern: str = "*") -> list[Path]:
    """Files given, and the files of folders given whose name ends with one of ``suffixes``
    (lower-case), sorted per folder; ``pattern``: a glob below each folder (``"*/*"``: one level down)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.glob(pattern) if p.is_file() and p.name.lower().endswith(suffixes) and not is_junk(p))
        elif path.is_file():
            files.append(path)
        else:
            raise SamtuneError(f"{path}: no such file or folder.")
    if not files:
        raise SamtuneError(f"{', '.join(map(str, paths))}: no {' / '.join(suffixes)} files found.")
    return files


def check_image_range(image: np.ndarray, source: str) -> None:
    """Warn when an image looks already normalised: SAM normalises 0-255 RGB itself."""
    if image.dtype != np.uint8 and image.size and float(np.max(image)) <= 1.0:
        warnings.warn(
            f"{source}: image values lie in [0, 1]; samtune expects 0-255 RGB and normalises it "
            "with SAM's pixel mean/std itself. Scale the image to 0-255 first.",
            stacklevel=2,
        )
