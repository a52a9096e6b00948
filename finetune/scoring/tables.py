"""What a run prints and writes besides checkpoints: the PROMPTED / SEMANTIC (and PROPAGATED,
INTERACTIVE) tables with their protocol, per-case 3D lines, ``per_case.csv``, and metrics as JSON
keeps them (training and ``samtune evaluate`` share them).
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
    for part in ("prompted", "semantic"):
        for key, groups in last.get(part, {}).items():
            if key.startswith("by_") and isinstance(groups, dict):  # by_round is a list
                print(format_table(groups, title=f"{part.upper()} per {key[3:]} (the same evaluation, each {key[3:]} on its own)"))
    for part, how in (("prompted", "one prompted mask per instance"), ("semantic", "connected components of the automatic label map")):
        if "instances" in last.get(part, {}):
            print(describe_instances(last[part]["instances"], f"INSTANCES ({how}): Cityscapes instance-level AP"))
    if "propagated" in last:
        print(describe_propagation(last))
    if "interactive" in last:
        print(describe_interactive(last["interactive"]))


def describe_instances(part: dict, title: str) -> str:
    """Per thing class AP, AP50, the instances scored and the predictions, and the class means."""
    lines = [f"{title}, overlaps 0.50:0.95, instances >= 100 px", f"{'class':<12} {'AP':>6} {'AP50':>6} {'instances':>9} {'predicted':>9}"]
    for name, c in part["per_class"].items():
        lines.append(f"{name:<12} {c['ap']:>6.3f} {c['ap50']:>6.3f} {c['instances']:>9} {c['predictions']:>9}")
    lines.append(f"{'mean':<12} {part['ap']:>6.3f} {part['ap50']:>6.3f}")
    return "\n".join(lines)


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


def describe_interactive(part: dict) -> str:
    """The INTERACTIVE table: per class and their mean, Dice and NSD after step 0 and each click,
    the challenge's AUC over the clicks (0-4) and the final value."""
    steps = len(part["mean"]["dice"])
    first = "box" if part["first_prompt"] == "box" else "auto"
    step0 = (f"the box on its middle slice, propagated ({part['propagation']}) and cut to its z range" if first == "box"
             else "the automatic result")  # fmt: skip
    width = max([len(n) for n in part["per_class"]] + [5])
    lines = [f"INTERACTIVE validation (CVPR 2025 interactive 3D challenge protocol): per organ and case, step 0 = {step0}, then "
             f"{part['clicks']} clicks at the centre of the largest 3D error; per case 3D, NSD@{part['nsd_tolerance_mm']:g}mm; "
             f"AUC over the clicks (0-{steps - 2}); {part['seconds']:g} s"]  # fmt: skip
    head = f"{'class':<{width}} {'':<4} {first:>6}" + "".join(f" {f'click {s}':>7}" for s in range(1, steps)) + f" {'AUC':>6} {'final':>6} cases"
    lines += [head, "-" * len(head)]

    def rows(name: str, c: dict, cases: str) -> list[str]:
        return [f"{name if key == 'dice' else '':<{width}} {label:<4} {c[key][0]:>6.3f}" + "".join(f" {v:>7.3f}" for v in c[key][1:])
                + f" {c[key + '_auc']:>6.3f} {c['final_' + key]:>6.3f} {cases if key == 'dice' else ''}"
                for key, label in (("dice", "Dice"), ("nsd", "NSD"))]  # fmt: skip

    for name, c in part["per_class"].items():
        if c["cases"]:
            lines += rows(name, c, f"{c['cases']:>5}")
    lines.append("-" * len(head))
    lines += rows("mean", part["mean"], "")
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
