"""The data-format registry: one module per ``data.kind`` registers its recipe section and the
factory that opens its sources.

A format module (``cityscapes.py``, ``nifti.py``, ``folder2d.py``) declares a ``DataSectionBase``
subclass with ``kind: Literal["<kind>"]`` and its own keys, and decorates its factory::

    @register_format(CityscapesData)
    def open_cityscapes(section, seed, on_bad_case, progress) -> DataSplit: ...

The recipe's ``data:`` is the union of the registered sections, told apart by ``kind``; a key of
another kind is a recipe error naming the kind it belongs to. Adding a format is one new module
plus one import line in ``FORMAT_MODULES``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Literal, Optional

from pydantic import Field

from samtune.errors import SamtuneError
from samtune.schema import Section
from samtune.suggest import did_you_mean

# imported by ``all_formats()`` so that every format has registered itself
FORMAT_MODULES = ("samtune.datasets.cityscapes", "samtune.datasets.bdd100k", "samtune.datasets.acdc", "samtune.datasets.mapillary", "samtune.datasets.nifti", "samtune.datasets.folder2d", "samtune.datasets.coco", "samtune.datasets.dicom")


class DataSectionBase(Section):
    """Keys every data format has."""

    kind: str = Field(description="dataset format: `cityscapes` (leftImg8bit/gtFine tree), `bdd100k` (images/10k + labels/sem_seg/masks), `acdc` (rgb_anon/ + gt/ by condition), `mapillary` (Mapillary Vistas {split}/images + labels, classes from its config), `nifti` (nnU-Net v2, MSD, or images/ + labels/ NIfTI folders), `folder2d` (images/ PNG/JPEG/TIFF + labels/ PNG label maps), `coco` (COCO instances JSON: polygons or RLE) or `dicom` (a PACS export: DICOM image series with their DICOM-SEG labels)")
    root: str = Field(description="dataset folder (relative paths are relative to the current directory)")
    on_bad_case: Literal["error", "skip"] = Field("error", description="unusable case or image (unreadable, shape/affine mismatch, unknown label values, NaN, ...): `error` stops naming the file and the fix; `skip` leaves it out, logs it and lists it in `samtune inspect`")
    classes: Optional[list[str]] = Field(None, description="class names to train and evaluate on (default: all classes of the dataset)")
    min_pixels: int = Field(10, ge=1, description="smallest object, in pixels of the original image/slice, that becomes a prompted sample")

    def intensity_setting(self) -> str | tuple[float, float] | None:
        """How intensities map to 0-255 (a preset or [low, high]); None for formats read as 8-bit RGB."""
        return None

    def scored_subset(self) -> dict:
        """What validation reads, beyond kind and root, for the evaluation protocol in metrics.json
        (formats with split filters or a fixed class space say so)."""
        return {}


class SplitKeys(Section):
    """Keys of formats whose train/val split is chosen by samtune (per case or per image)."""

    val_fraction: float = Field(0.25, gt=0, lt=1, description="fraction of cases (patients) or images held out for validation, seeded by `seed` (without `split_file` or a val/ folder)")
    split_file: Optional[str] = Field(None, description='JSON split, `{"train": [names], "val": [names]}` or nnU-Net\'s splits_final.json (list of folds, see `fold`); a relative path is looked up in the current directory, then in `root`')
    fold: int = Field(0, ge=0, description="fold of an nnU-Net splits_final.json `split_file`")


class CaseSplitKeys(SplitKeys):
    """The split keys, and class names for label files that carry none (formats whose classes come
    with the labels, as DICOM-SEG segment labels, take ``SplitKeys`` alone)."""

    class_names: dict[int, str] | None = Field(None, description="label value -> class name, e.g. `{1: polyp}`, for images/ + labels/ folders (replaces dataset.json's labels); default `class_<k>` for every value found")


class DemoKeys(Section):
    """Keys of formats that have a synthetic demo dataset (``DataFormat.make_demo``)."""

    generate_demo: bool = Field(False, description="when `root` does not exist, generate this kind's synthetic demo dataset there (CT phantom as NIfTI or as a DICOM export / Cityscapes-style tree)")


OpenSources = Callable[..., "object"]  # (section, *, seed, on_bad_case, progress) -> DataSplit


@dataclass
class DataFormat:
    kind: str
    section: type[DataSectionBase]
    open: OpenSources
    make_demo: Callable | None = None  # (folder, seed) -> path of the generated dataset
    # (section, paths) -> SliceSource without labels: new scans or images to predict on
    open_images: Callable | None = None


_FORMATS: dict[str, DataFormat] = {}


def kind_of(section: type[DataSectionBase]) -> str:
    """The ``data.kind`` a section declares with ``kind: Literal["<kind>"]``."""
    return section.model_fields["kind"].annotation.__args__[0]


def register_format(section: type[DataSectionBase], make_demo: Callable | None = None):
    """Decorator for a format's ``open`` factory; the kind is the section's ``kind`` literal."""
    kind = kind_of(section)

    def decorate(open_fn: OpenSources) -> OpenSources:
        if kind in _FORMATS and _FORMATS[kind].open is not open_fn:
            raise ValueError(f"data format {kind!r} registered twice")
        _FORMATS[kind] = DataFormat(kind, section, open_fn, make_demo)
        return open_fn

    return decorate


def register_images(section: type[DataSectionBase]):
    """Decorator for a format's label-free factory ``(section, paths) -> SliceSource`` (files or
    folders of images as the format stores them; every label is background, ``has_labels`` False)."""
    kind = kind_of(section)

    def decorate(open_fn: Callable) -> Callable:
        _FORMATS[kind].open_images = open_fn
        return open_fn

    return decorate


def open_images(section: DataSectionBase, paths: list) -> "object":
    """New images of ``section``'s format, without labels (for prediction)."""
    fmt = get_format(section.kind)
    if fmt.open_images is None:
        raise SamtuneError(f"data.kind={section.kind}: opening images without labels is not supported for this format.")
    return fmt.open_images(section, paths)


def all_formats() -> dict[str, DataFormat]:
    """Every registered format, in ``FORMAT_MODULES`` order (whatever order a caller imported them in)."""
    for module in FORMAT_MODULES:
        importlib.import_module(module)
    rank = {module: i for i, module in enumerate(FORMAT_MODULES)}
    return dict(sorted(_FORMATS.items(), key=lambda item: rank.get(item[1].section.__module__, len(rank))))


def get_format(kind: str) -> DataFormat:
    formats = all_formats()
    if kind not in formats:
        raise SamtuneError(f"data.kind={kind!r} is unknown; {did_you_mean(kind, formats)}(known: {', '.join(formats)})")
    return formats[kind]


def kinds_with_key(key: str) -> list[str]:
    """The kinds whose section has ``key`` (for "this key belongs to data.kind=nifti")."""
    return [kind for kind, fmt in all_formats().items() if key in fmt.section.model_fields]
