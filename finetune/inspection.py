"""``samtune inspect``: what the recipe's data folder holds, and what is wrong with it, before training.

The report is built from the same sources training uses (``data.open_split``), always in
skip mode so that every problem is listed at once; for NIfTI this also fills the preprocessing
cache, so a following ``samtune train`` starts at once. Keys of the JSON report (always all present):

- ``kind``, ``layout`` (nnunet_v2, msd, folders, cityscapes, folder2d), ``root``, ``cache_dir``
- ``cases``: ``{"train": [names], "val": [names]}`` (cases, or images for 2D kinds)
- ``slices``: ``{"total", "with_foreground", "train", "val"}`` (2D: images; train/val: what the sources serve)
- ``classes``: name -> ``{"id", "voxels", "slices", "cases"}`` (voxels: in the original grid; pixels for 2D)
- ``spacing_mm``: ``{"min", "median", "max"}`` per axis x, y, z as stored (NIfTI; else null)
- ``orientation``: axis codes as stored (before canonicalisation) -> number of cases (NIfTI; else null)
- ``intensity``: the NIfTI intensity setting (preset or [low, high]; else null)
- ``problems``: ``[{"case", "file", "problem"}]`` — each is a case/image left out (or a fatal problem)
- ``warnings``: suspicious but legal findings (all-background labels, classes named from values)
- ``notes``: files ignored (macOS ``._*`` forks, labels without images, ...)
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from samtune import SamtuneError
from samtune.datasets.source import DataSplit
from samtune.files import write_json_atomic
from samtune.finetune.data import open_split
from samtune.finetune.recipe import Recipe

def _empty_report(recipe: Recipe) -> dict:
    data = recipe.data
    intensity = data.intensity_setting()
    return {
        "kind": data.kind, "layout": None, "root": str(data.root), "cache_dir": None, "volumetric": False,
        "cases": {"train": [], "val": []}, "slices": {"total": 0, "with_foreground": 0, "train": 0, "val": 0},
        "classes": {}, "spacing_mm": None, "orientation": None,
        "intensity": list(intensity) if isinstance(intensity, tuple) else intensity,
        "problems": [], "warnings": [], "notes": [],
    }  # fmt: skip


def _nifti_summary(sources: DataSplit, report: dict) -> None:
    classes: dict[int, dict] = {}
    spacings, orientations, total, foreground = [], Counter(), 0, 0
    for side in ("train", "val"):
        src = getattr(sources, side)
        report["cases"][side] = [c.name for c in src.cases]
        for case in src.cases:
            meta = case.meta
            spacings.append(meta["original_spacing_mm"])
            orientations[meta["axcodes"]] += 1
            total += len(meta["slices"])
            foreground += sum(1 for entry in meta["slices"] if entry)
            for value, voxels in meta["voxels"].items():
                c = classes.setdefault(int(value), {"voxels": 0, "slices": 0, "cases": 0})
                c["voxels"] += voxels
                c["cases"] += 1
                c["slices"] += sum(1 for entry in meta["slices"] if value in entry)
    if spacings:
        arr = np.asarray(spacings, float)
        report["spacing_mm"] = {k: [round(float(v), 4) for v in f(arr, axis=0)] for k, f in (("min", np.min), ("median", np.median), ("max", np.max))}
        report["orientation"] = dict(sorted(orientations.items()))
    report["slices"].update(total=total, with_foreground=foreground)
    _fill_classes(report, sources.train.class_names, classes)


def _image_summary(sources: DataSplit, report: dict, progress: bool) -> None:
    classes: dict[int, dict] = {}
    total = foreground = 0
    for side in ("train", "val"):
        src = getattr(sources, side)
        report["cases"][side] = [src.item_id(i) for i in range(len(src))]
        for i in tqdm(range(len(src)), desc=f"{side} labels", unit="image", disable=not progress, leave=False):
            counts = {k: v for k, v in src.slice_classes(i).items() if k in src.class_names}
            total += 1
            foreground += bool(counts)
            for value, pixels in counts.items():
                c = classes.setdefault(int(value), {"voxels": 0, "slices": 0, "cases": 0})
                c["voxels"] += int(pixels)
                c["slices"] += 1
                c["cases"] += 1
    report["slices"].update(total=total, with_foreground=foreground)
    _fill_classes(report, sources.train.class_names, classes)
    report["problems"].extend(sources.train.consistency_problems())


def _fill_classes(report: dict, class_names: dict[int, str], found: dict[int, dict]) -> None:
    for value, name in sorted(class_names.items()):
        report["classes"][name] = {"id": int(value), **found.get(value, {"voxels": 0, "slices": 0, "cases": 0})}
    absent = [n for n, c in report["classes"].items() if c["voxels"] == 0]
    if absent and report["kind"] not in ("cityscapes", "bdd100k", "acdc", "mapillary"):  # driving subsets routinely lack rare classes
        report["warnings"].append(f"classes of the class map never found in the labels: {absent}")


def inspect_data(recipe: Recipe, progress: bool = True) -> dict:
    """The report described in the module docstring."""
    report = _empty_report(recipe)
    try:
        sources = open_split(recipe, on_bad_case="skip", progress=progress, require_both=False)
    except SamtuneError as exc:
        report["problems"].append({"case": None, "file": None, "problem": str(exc)})
        return report
    report.update(layout=sources.layout, cache_dir=str(sources.cache_dir) if sources.cache_dir else None, volumetric=sources.train.volumetric)
    report["problems"].extend(sources.skipped)
    report["notes"].extend(sources.notes)
    report["warnings"].extend(sources.warnings)
    if sources.train.volumetric:
        _nifti_summary(sources, report)
    else:
        _image_summary(sources, report, progress)
    report["slices"].update(train=len(sources.train), val=len(sources.val))
    for side in ("train", "val"):
        problem = getattr(sources, side).instance_problem() if len(getattr(sources, side)) else None
        if problem and recipe.prompts.per == "instance":
            report["problems"].append({"case": None, "file": None, "problem": f"prompts.per=instance, {side} split: {problem}"})
    for side in ("train", "val"):
        if not len(getattr(sources, side)):
            report["problems"].append({"case": None, "file": None, "problem": f"the {side} split is empty"})
    if report["layout"] in ("folders", "folder2d") and recipe.data.class_names is None:  # only these read class_names
        report["warnings"].append("no data.class_names: classes are named class_<value> from the label values found")
    return report


def format_report(report: dict) -> str:
    kind_word = "slices" if report["volumetric"] else "images"
    s = report["slices"]
    lines = [
        f"data        {report['kind']} ({report['layout']}) at {report['root']}",
        f"cases       {len(report['cases']['train'])} train, {len(report['cases']['val'])} val",
        f"{kind_word:<11} {s['total']} in total, {s['with_foreground']} with foreground; served: {s['train']} train, {s['val']} val",
    ]
    if report["cache_dir"]:
        lines.append(f"cache       {report['cache_dir']}")
    if report["spacing_mm"]:
        sp = report["spacing_mm"]
        axes = ", ".join(f"{a} {lo:g}-{hi:g}" for a, lo, hi in zip("xyz", sp["min"], sp["max"]))
        lines.append(f"spacing     {axes} mm (median {' × '.join(f'{v:g}' for v in sp['median'])})")
        lines.append("orientation " + ", ".join(f"{k}: {v}" for k, v in report["orientation"].items()) + " (as stored; slices are canonical RAS+)")
    if report["intensity"] is not None:
        lines.append(f"intensity   {report['intensity']}")
    if report["classes"]:
        unit = "voxels" if report["volumetric"] else "pixels"
        lines.append(f"classes     {'id':>4}  {'name':<20} {unit:>12} {kind_word:>8} {'cases' if report['kind'] == 'nifti' else '':>6}")
        for name, c in report["classes"].items():
            lines.append(f"            {c['id']:>4}  {name:<20} {c['voxels']:>12,} {c['slices']:>8} {c['cases'] if report['kind'] == 'nifti' else '':>6}")
    for key in ("problems", "warnings", "notes"):
        items = report[key]
        if items:
            lines.append(f"{key} ({len(items)})")
            for item in items[:50]:
                text = item if isinstance(item, str) else " ".join(p for p in (f"case {item['case']}:" if item["case"] else "", f"{item['file']}:" if item["file"] else "", item["problem"]) if p)
                lines.append(f"  - {text}")
            if len(items) > 50:
                lines.append(f"  ... and {len(items) - 50} more (see the JSON report)")
    return "\n".join(lines)


def run_inspect(recipe: Recipe, out: Path | None, progress: bool = True) -> int:
    """Print the report, write it as JSON; exit status 2 when there are problems, else 0."""
    report = inspect_data(recipe, progress)
    path = Path(out) if out else Path(recipe.output.dir) / "inspect.json"
    write_json_atomic(path, report)
    print(format_report(report))
    status = 2 if report["problems"] else 0
    print(f"{'problems found' if status else 'no problems'}; report written to {path}")
    return status
