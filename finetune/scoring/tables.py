"""What a run prints and writes besides checkpoints: the PROMPTED / SEMANTIC tables with their
protocol, per-case 3D lines, ``per_case.csv``, and metrics as JSON keeps them (training and
``samtune evaluate`` share them).
"""

from __future__ import annotations

from samtune.files import write_atomic
from samtune.finetune.scoring.protocol import uses_box
from samtune.finetune.scoring.metrics import format_table
from samtune.finetune.recipe import Recipe
from samtune.finetune.scoring.volume_metrics import per_case_rows


def describe_volume(metrics: dict, label: str = "per case, 3D") -> str:
    """A summary line and one line per class of the per-case 3D metrics of volumetric data."""
    volume = metrics["volume"]
    lines = [f"{label}: mean Dice {volume['mdice']:.3f}, HD95 {volume['mhd95_mm']:.1f} mm, "
             f"NSD@{volume['nsd_tolerance_mm']:g}mm {volume['mnsd']:.3f}"]  # fmt: skip
    for name, c in volume["per_class"].items():
        undefined = f" (HD95 undefined in {c['hd95_undefined']})" if c["hd95_undefined"] else ""
        lines.append(f"  {name}: Dice {c['dice']:.3f}, HD95 {c['hd95_mm']:.1f} mm, NSD {c['nsd']:.3f}, {c['cases']} cases{undefined}")
    return "\n".join(lines)


def describe_prompts(recipe: Recipe) -> str:
    p = recipe.prompts
    first = f"tight box (jitter {recipe.eval.box_jitter_px:g} px)" if uses_box(recipe) else f"{p.positive_points}+/{p.negative_points}- point"
    rounds = f" + {p.corrective_rounds} corrective clicks" if p.corrective_rounds else ""
    return f"{first} prompts from ground truth{rounds}, per {p.per}"


def print_results(columns: dict[str, dict], recipe: Recipe) -> None:
    """The prompted and semantic tables (and per-case 3D lines) of one or more evaluations, each
    part labelled with its protocol."""
    last = list(columns.values())[-1]
    if "prompted" in last:
        print(format_table({k: m["prompted"] for k, m in columns.items()}, title=f"PROMPTED validation: {describe_prompts(recipe)}"))
        if "volume" in last["prompted"]:
            print(describe_volume(last["prompted"], "prompted, per case 3D (unprompted slices count as empty)"))
    if "semantic" in last:
        print(format_table(
            {k: m["semantic"] for k, m in columns.items()},
            title=f"SEMANTIC validation (no prompts; every pixel, void excluded; background below p={recipe.automatic.threshold:g})",
        ))  # fmt: skip
        if "volume" in last["semantic"]:
            print(describe_volume(last["semantic"], "semantic, per case 3D (whole predicted volumes)"))
    if "propagated" in last:
        print(describe_propagation(last))


def describe_propagation(metrics: dict) -> str:
    """The propagated part: the per-case 3D summary, and per case and class its Dice beside the
    slice-by-slice prompted Dice when both were evaluated."""
    part = metrics["propagated"]
    lines = [describe_volume(part, f"PROPAGATED validation ({part['propagation']}, one box per organ and case), per case 3D")]
    if "volume" in metrics.get("prompted", {}):
        slices = {(s["case"], name): s["dice"] for name, c in metrics["prompted"]["volume"]["per_class"].items() for s in c["per_case"]}
        lines.append(f"  {'case':<20} {'class':<16} {'Dice, box on every slice':>24} {'Dice, propagated':>17}")
        for name, c in part["volume"]["per_class"].items():
            for s in c["per_case"]:
                if s["dice"] == s["dice"]:  # not NaN: the class is in the case
                    lines.append(f"  {s['case']:<20} {name:<16} {slices.get((s['case'], name), float('nan')):>24.3f} {s['dice']:>17.3f}")
    return "\n".join(lines)


def write_per_case(metrics: dict, out) -> None:
    """``<out>/per_case.csv``: the per-case 3D scores (semantic when there, else prompted)."""
    import csv
    import io

    part = next((metrics[k] for k in ("semantic", "prompted") if k in metrics and "volume" in metrics[k]), None)
    if part is None:
        return
    rows = per_case_rows(part["volume"])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case", "class", "dice", "hd95_mm", "nsd"])
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "per_case.csv", buffer.getvalue())


def json_ready(metrics: dict) -> dict:
    """Metrics without what JSON cannot hold (the semantic label volumes)."""
    out = dict(metrics)
    if "semantic" in out:
        out["semantic"] = {k: v for k, v in out["semantic"].items() if k != "label_volumes"}
    return out


def baseline_summary(metrics: dict) -> dict:
    """The baseline as metrics.json keeps it: per part, the per-class table and the means."""
    keep = ("per_class", "miou", "mdice", "miou_per_sample", "mdice_per_sample", "pixel_accuracy")
    out = {part: {k: metrics[part][k] for k in keep if k in metrics[part]} for part in ("prompted", "semantic") if part in metrics}
    out.update(headline=metrics["headline"], miou=metrics["miou"], mdice=metrics["mdice"])
    return out
