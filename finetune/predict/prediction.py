"""``samtune predict``: a trained checkpoint applied to new scans and images, no labels needed.

- Automatic (default when the checkpoint has class prompts): every class of every slice/image,
  fused into one label map (``samtune.finetune.automatic``).
- Prompted (``--prompts FILE``): boxes and/or points per class from a JSON file (format in the
  docs/howto/predict.md, ``load_prompts``); on a volume the prompt is given on one slice and carried through the
  volume in both directions (``eval.propagation``: SAM 2's memory, or slice by slice with the
  previous mask's box plus a margin until the mask vanishes; samtune.finetune.predict.propagation).

Outputs, per input: a volume -> ``<name>.nii.gz`` on exactly the scan's grid (shape, affine,
sform/qform and codes from its header; ``samtune.datasets.nifti_geometry``), ``<name>.json``
(class names, voxels and mL per class), ``<name>.ctbl`` and ``<name>_itksnap.txt`` (the classes'
names and colours for 3D Slicer and ITK-SNAP); an image -> ``<name>.png`` (class values at the original
resolution; Cityscapes labelIds) and ``<name>_overlay.png``. Volumes are read and predicted one at
a time, slices in batches of ``eval.batch_size``, so memory stays bounded by one scan.
"""

from __future__ import annotations

import glob
import logging
import re
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from samtune import SamtuneError
from samtune.datasets.formats import open_images
from samtune.datasets.semantic import SemanticDataset, collate_semantic
from samtune.datasets.source import LabelSpace, SliceSource
from samtune.files import write_json_atomic
from samtune.finetune.automatic import has_class_prompts, predict_index_maps
from samtune.finetune.predict.dicom_io import SEG_SUFFIX, check_output_format, predict_dicom, split_dicom_inputs
from samtune.finetune.predict.label_files import label_classes, write_label_png, write_overlay, write_viewer_tables
from samtune.finetune.checkpoints import read_classes
from samtune.finetune.predict.prompt_file import PromptSet, check_pixel_prompt, display_prompt, load_prompts
from samtune.finetune.predict.propagation import SlicePrompt, make_propagator, predict_slice
from samtune.finetune.predict.onnx_engine import ENGINES, onnx_family
from samtune.finetune.runtime import autocast, inference_model, resolve_precision

log = logging.getLogger(__name__)
# files written per scan: the label, its summary, a 3D Slicer colour table, an ITK-SNAP label description
VOLUME_SUFFIXES = (".nii.gz", ".json", ".ctbl", "_itksnap.txt")
VOLUME_KINDS = ("nifti", "dicom")  # data formats of 3D scans: their checkpoints predict NIfTI files and DICOM series
PRECISIONS = ("auto", "fp32", "bf16", "int8")  # samtune predict --precision: train.precision's values + int8 (CPU)



def uniform_key(image: torch.Tensor, meta: dict) -> tuple | None:
    """For a C×S×S model input whose image part (``meta["resized_size"]``, the rest is padding) holds
    one value per channel: (those values, resized size, original size), equal for equal inputs;
    else None."""
    height, width = meta["resized_size"]
    values = image[:, :height, :width].reshape(image.shape[0], -1)
    first = values[:, :1]
    if not bool((values == first).all()):
        return None
    return tuple(first[:, 0].tolist()), (height, width), tuple(meta["original_size"])


def expand_inputs(inputs: list[str]) -> list[str]:
    """Paths as given; a pattern that is not a path itself is expanded as a glob (quoted globs)."""
    out = []
    for item in inputs:
        if not Path(item).exists() and any(c in item for c in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise SamtuneError(f"--input {item}: the pattern matches no file.")
            out += found
        else:
            out.append(item)
    return out


class Predictor:
    """A loaded checkpoint that predicts label maps of one source at a time.

    ``model`` is ``loaded.model`` arranged for inference (``runtime.inference_model``: LoRA merged,
    BatchNorm folded, channels-last; a copy, the same numbers up to rounding). ``precision``:
    ``auto`` / ``fp32`` / ``bf16`` as ``train.precision`` (default: the recipe's), or ``int8``: the
    image encoder's Linear layers quantised (CPU). bf16 and int8 change the numbers (agreement with
    fp32 in docs/howto/predict.md). ``engine="onnxruntime"``: the image encoder and the class
    decoder run in ONNX Runtime (``predict.onnx_engine``; CPU, float32)."""

    def __init__(self, loaded, batch_size: int, threshold: float, precision: str | None = None, engine: str = "torch"):
        self.loaded = loaded
        self.model, self.family, self.device = loaded.model, loaded.family, loaded.device
        self.transform = loaded.transform()
        self.batch_size = batch_size
        self.threshold = threshold
        self.precision = resolve_precision(precision or loaded.recipe.train.precision, self.device)
        if self.precision not in PRECISIONS:
            raise SamtuneError(f"--precision {self.precision}: not one of {', '.join(PRECISIONS)}.")
        if self.precision == "int8" and self.device.type != "cpu":
            raise SamtuneError(f"--precision int8 runs on the CPU only (dynamic int8 quantisation), not on {self.device}; use auto, fp32 or bf16 there.")
        self.model = inference_model(loaded.model, self.family, self.precision)
        if engine not in ENGINES:
            raise SamtuneError(f"--engine {engine}: not one of {', '.join(ENGINES)}.")
        if engine == "onnxruntime":  # the family's encoder and class decoder answered by ONNX Runtime sessions
            self.family = onnx_family(self.model, self.family, self.transform.image_size, self.device, self.precision)
        classes = read_classes(loaded.checkpoint)
        self.automatic = has_class_prompts(self.model)
        if classes is None:
            raise SamtuneError(f"--checkpoint {loaded.checkpoint}: classes.json is missing (written by `samtune train` since automatic mode); retrain or evaluate it instead.")
        self.space = LabelSpace.from_dict(classes["label_space"])
        self.classes = label_classes(self.space, classes.get("codes"))  # file values, names, codes
        self._propagator = None

    # --- automatic ---
    @torch.no_grad()
    def automatic_maps(self, source: SliceSource, desc: str):
        """(index, H×W class-index map) for every image of ``source``, in order, in batches.

        A uniform image (one value everywhere, e.g. a CT slice of air above or below the body, which
        the window maps to 0) is run through the model once per value and size; the others reuse
        its map: the same input gives the same output, so the labels are those of running every
        slice (tested), and such slices cost no encoder pass."""
        dataset = SemanticDataset(source, self.transform, self.space, training=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate_semantic)
        uniform_maps: dict[tuple, np.ndarray] = {}  # uniform_key -> its map
        for batch in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):  # None: no bar when not a terminal
            images, metas = batch["image"], batch["meta"]
            keys = [uniform_key(image, meta) for image, meta in zip(images, metas)]
            run = [i for i, key in enumerate(keys) if key is None or (key not in uniform_maps and key not in keys[:i])]
            maps = {}
            if run:
                with autocast(self.device, self.precision):
                    found = predict_index_maps(self.model, self.family, images[run].to(self.device), [metas[i] for i in run], self.threshold)
                maps = dict(zip(run, found))
                uniform_maps.update((keys[i], maps[i]) for i in run if keys[i] is not None)
            for i, meta in enumerate(metas):
                yield meta["index"], maps[i] if i in maps else uniform_maps[keys[i]].copy()

    # --- prompted ---
    def prompted_mask(self, image: np.ndarray, box: np.ndarray | None, points: np.ndarray | None, labels: np.ndarray | None) -> np.ndarray:
        """H×W bool mask of one image from a box (x0, y0, x1, y1: pixel edges, x1 one past the last
        column, as training's boxes) and/or points (x, y: pixel indices, column and row), original px."""
        with autocast(self.device, self.precision):
            return predict_slice(self.model, self.family, self.transform, self.device, image, box, points, labels)

    def propagator(self):
        """How a prompt on one slice is carried through a volume (``eval.propagation`` of the recipe)."""
        if self._propagator is None:
            from samtune.adapters.registry import get_variant

            recipe = self.loaded.recipe
            self._propagator = make_propagator(recipe.eval.propagation, self.model, self.family, get_variant(recipe.model.name),
                                               recipe.model.checkpoint, self.transform, self.device, self.prompted_mask)  # fmt: skip
        return self._propagator


def predict(
    loaded, inputs: list[str], out: str | Path, prompts_file: str | Path | None = None, *, batch_size: int | None = None, quiet: bool = False,
    series: str | None = None, output_format: str | None = None, resample: bool = False, seg_type: str = "BINARY", precision: str | None = None,
    engine: str = "torch",
) -> list[dict]:
    """Predict every input; returns one summary record per input (also printed). Volume models
    also take DICOM series folders (``series``: the SeriesInstanceUID to read where a folder holds
    several; ``output_format``: nifti / dicom-seg / both; ``resample``: interpolate irregular
    series; ``seg_type``: BINARY or LABELMAP DICOM-SEG; ``samtune.finetune.predict.dicom_io``);
    ``precision``, ``engine``: ``Predictor``'s (default: the recipe's ``train.precision``; PyTorch)."""
    recipe = loaded.recipe
    predictor = Predictor(loaded, batch_size or recipe.eval.batch_size, recipe.automatic.threshold, precision, engine)
    prompts = load_prompts(prompts_file, predictor.space.names) if prompts_file else None
    if prompts is None and not predictor.automatic:
        raise SamtuneError(
            f"--checkpoint {loaded.checkpoint} was trained with task: promptable (no automatic mode): pass --prompts FILE "
            "with a box or points per class, or train with task: both / automatic."
        )
    out = Path(out)
    inputs = expand_inputs(inputs)
    section = recipe.data
    if "class_names" in type(section).model_fields:
        # the classes are the checkpoint's: the training data (data.root, its dataset.json and channels) is not read
        section = section.model_copy(update={"class_names": dict(zip(predictor.space.ids, predictor.space.names))})
    # every input and its output name first: nothing is written before the whole run is known to be consistent
    volumes = recipe.data.kind in VOLUME_KINDS
    dicom, inputs = split_dicom_inputs(inputs, series) if volumes else ([], inputs)
    output_format = check_output_format(output_format, dicom, inputs)
    if volumes:
        planned, suffixes = _plan_volumes(inputs, getattr(recipe.data, "channel", 0)) if inputs else [], VOLUME_SUFFIXES
        planned += [(d.folder, d.name) for d in dicom]
        suffixes += (SEG_SUFFIX,) if dicom else ()
    else:
        source = open_images(section, inputs)
        files = getattr(source, "files", None)
        planned = [(Path(files[i]) if files is not None else None, source.item_id(i)) for i in range(len(source))]
        suffixes = (".png", "_overlay.png")
    _check_outputs(planned, out, suffixes)
    if prompts is not None:
        _check_prompt_inputs(prompts, planned)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    if volumes:
        for path, name in planned[: len(planned) - len(dicom)]:
            source = open_images(section, [path])  # one scan in memory at a time
            if len(source) == 0:  # another channel file of an nnU-Net case (planned already skips them)
                continue
            records.append(_predict_volume(predictor, source, path, out, prompts))
            del source
        def predict_volume(source, path, label):
            return _predict_volume(predictor, source, path, out, prompts, input_label=label)

        for d in dicom:
            records.append(predict_dicom(predictor, lambda path: open_images(section, [path]), predict_volume, d, out, output_format, resample, seg_type))
    else:
        for index in range(len(source)):
            records.append(_predict_image(predictor, source, index, out, prompts))
    if not quiet:
        for r in records:
            print(r["summary"])
        print(f"{len(records)} input{'s' if len(records) != 1 else ''} predicted; files in {out}")
    return records


def _plan_volumes(inputs: list[str], channel: int) -> list[tuple[Path, str]]:
    """(file, case name) of every scan to predict, as ``open_nifti_images`` names them: nnU-Net
    channel files ``{case}_{XXXX}`` give the case name, and only ``data.channel``'s file is read."""
    from samtune.datasets.checks import list_input_files
    from samtune.datasets.nifti import NIFTI_SUFFIXES, _strip_suffix
    from samtune.datasets.nifti_geometry import _load

    planned, other_channels = [], []
    for path in list_input_files(inputs, NIFTI_SUFFIXES):
        stem = _strip_suffix(path.name)
        m = re.fullmatch(r"(.+)_(\d{4})", stem)
        if m and int(m.group(2)) != channel:
            other_channels.append(path)
            continue
        _load(path)  # the header only: an unreadable file or a 2D image stops the run before anything is written
        planned.append((path, m.group(1) if m else stem))
    if other_channels:
        log.info("data.channel=%d: %d channel files of other channels left out (%s)", channel, len(other_channels), ", ".join(p.name for p in other_channels[:5]))
    if not planned:
        raise SamtuneError(
            f"--input {' '.join(inputs)}: no scan to predict: {', '.join(p.name for p in other_channels[:5])} are nnU-Net channel "
            f"files of other channels than data.channel={channel} (files ending _{channel:04d}); set data.channel=N to use another."
        )
    return planned


def _check_outputs(planned: list[tuple[Path | None, str]], out: Path, suffixes: tuple[str, ...]) -> None:
    """No two inputs write the same output file, and no output overwrites an input."""
    inputs = {p.resolve(): p for p, _ in planned if p is not None}
    written: dict[Path, Path | str] = {}
    for path, name in planned:
        for suffix in suffixes:
            target = out / f"{name}{suffix}"
            key = target.resolve()
            if key in inputs:
                raise SamtuneError(f"--out {out}: the prediction {target} would overwrite the input {inputs[key]}; choose another --out folder.")
            if key in written:
                raise SamtuneError(
                    f"--input: {written[key]} and {path or name} would both be predicted into {target}; give the inputs "
                    "different names, or predict them into separate --out folders."
                )
            written[key] = path or name


def _check_prompt_inputs(prompts: PromptSet, planned: list[tuple[Path | None, str]]) -> None:
    """A prompt naming an input names one of the inputs (a misspelt name would be silently unused)."""
    from samtune.suggest import did_you_mean

    names = [name for _, name in planned]
    for p in prompts.prompts:
        if p.input is not None and not any(p.applies_to(name, path) for path, name in planned):
            listed = ", ".join(names[:10]) + (f", ... ({len(names)} inputs)" if len(names) > 10 else "")
            raise SamtuneError(f"{p.where}: input {p.input!r} is not one of the inputs; {did_you_mean(p.input, names)}(inputs: {listed}).")


def _predict_image(predictor: Predictor, source: SliceSource, index: int, out: Path, prompts: PromptSet | None) -> dict:
    space = predictor.space
    name = source.item_id(index)
    file = Path(source.files[index]) if hasattr(source, "files") else None
    image, _ = source.load(index)
    given = prompts.for_input(name, file) if prompts is not None else []
    if prompts is None:
        index_map = next(predictor.automatic_maps(_One(source, index), name))[1]
        values = space.to_file_ids(index_map)
    else:
        values = np.full(image.shape[:2], space.file_background, np.int64)
        for p in given:
            if (prompts.coordinates or "pixel") != "pixel":
                raise SamtuneError(f"{p.where}: images take coordinates \"pixel\", not {prompts.coordinates!r}.")
            check_pixel_prompt(p, image.shape[:2], str(file or name))
            mask = predictor.prompted_mask(image, p.box, p.points, p.labels)
            values[mask] = space.file_values()[space.names.index(p.class_name)]
    path = write_label_png(values, out / f"{name}.png")
    write_overlay(image, values, space, out / f"{name}_overlay.png")
    found = {n: int((values == v).sum()) for n, v in zip(space.names, space.file_values()) if (values == v).any()}
    parts = ", ".join(f"{n} {c:,} px" for n, c in found.items()) or ("no prompt for this input" if prompts is not None and not given else "no class found")
    summary = f"{name}: {parts} -> {path}"
    return {"input": name, "output": str(path), "pixels": found, "summary": summary}


class _One(SliceSource):
    """One image of a source, as a source (the automatic path runs on sources)."""

    def __init__(self, source: SliceSource, index: int):
        self.source, self.index = source, index
        self.class_names, self.ignore_index, self.skipped = source.class_names, source.ignore_index, []

    def __len__(self) -> int:
        return 1

    def item_id(self, index: int) -> str:
        return self.source.item_id(self.index)

    def load(self, index: int):
        return self.source.load(self.index)


def _predict_volume(predictor: Predictor, source, path: Path, out: Path, prompts: PromptSet | None, input_label: str | None = None) -> dict:
    """Predict one scan (``path``, opened as ``source``) and write its label on the scan's grid, the
    summary and the viewers' class tables; ``input_label``: how records name the input (default the path)."""
    import nibabel as nib

    from samtune.datasets.nifti_geometry import display_to_file_order, write_label_like

    space = predictor.space
    case = source.cases[0]
    name = case.name
    depth, height, width = case.image.shape
    label = np.full((depth, height, width), space.background_id, np.uint8)  # source ids, display layout
    given = []
    if prompts is None:
        for index, index_map in predictor.automatic_maps(source, name):
            label[source.slice_position(index)[1]] = space.to_source_ids(index_map)
    else:
        # every prompt mapped (and checked) before any slice is predicted
        given = [(p, display_prompt(p, prompts.coordinates or "voxel", path, case.meta)) for p in prompts.for_input(name, Path(path))]
        for p, (z, box, points) in given:
            _propagate(predictor, source, label, z, box, points, p.labels, space.ids[space.names.index(p.class_name)])
    file_label = display_to_file_order(label, path, case.meta)
    values = _source_to_file_lut(space)[file_label] if _needs_mapping(space) else file_label
    target = out / f"{name}.nii.gz"
    write_label_like(values, path, target)
    # the voxel volume of the grid the label is written on (the affine viewers use; pixdim may be stale)
    ml_per_voxel = abs(float(np.linalg.det(nib.load(str(path)).affine[:3, :3]))) / 1000.0
    counts = {v: int(np.count_nonzero(values == v)) for v in space.file_values()}  # no int64 copy of the volume
    found = {n: counts[v] for n, v in zip(space.names, space.file_values()) if counts[v]}
    sidecar = {
        "input": input_label or str(path), "output": str(target), "checkpoint": str(predictor.loaded.checkpoint),
        "mode": "prompted" if prompts is not None else "automatic",
        "classes": {str(v): n for n, v in zip(space.names, space.file_values())}, "background": space.file_background,
        "voxels": found, "ml": {n: round(c * ml_per_voxel, 3) for n, c in found.items()},
    }  # fmt: skip
    write_json_atomic(out / f"{name}.json", sidecar)
    write_viewer_tables(out / name, predictor.classes)
    parts = ", ".join(f"{n} {c:,} voxels ({c * ml_per_voxel:.1f} mL)" for n, c in found.items()) or (
        "no prompt for this input" if prompts is not None and not given else "no class found")
    return {"input": input_label or str(path), "output": str(target), "voxels": found, "summary": f"{name}: {parts} -> {target}"}


def _needs_mapping(space: LabelSpace) -> bool:
    return space.file_values() != space.ids or space.file_background != space.background_id


def _source_to_file_lut(space: LabelSpace) -> np.ndarray:
    """256 entries: source id (a class id or the background id) -> the value the file holds."""
    lut = np.full(256, space.file_background, np.uint8 if max(space.file_values(), default=0) < 256 else np.int64)
    lut[space.ids] = space.file_values()
    return lut


def _propagate(predictor: Predictor, source, label: np.ndarray, z0: int, box, points, labels, value: int) -> str:
    """Predict the prompted slice, then follow the object through the volume both ways
    (samtune.finetune.predict.propagation); returns the way it was followed ("memory" or "box")."""
    propagate, way = predictor.propagator()
    volume = propagate(lambda z: source.load(z)[0], len(label), SlicePrompt(z0, box, points, None if labels is None else np.asarray(labels)))
    label[volume] = value
    return way
