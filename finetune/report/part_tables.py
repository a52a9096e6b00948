"""The tables of one evaluated part on the report page: per class before and after (with the
per-case 3D scores of volumes), per group (ACDC conditions), the Cityscapes instance AP, and
Dice/NSD by click of ``eval.volume_mode: interactive``."""

from __future__ import annotations

import math

from samtune.finetune.report.markup import dl, esc, flatten, num, table


def per_class_table(part: str, metrics: dict, before: dict | None) -> str:
    after = metrics[part]["per_class"]
    volume = metrics[part].get("volume")
    header = ["class", *(["IoU before", "Dice before"] if before else []), "IoU after", "Dice after", *(["ΔIoU"] if before else [])]
    header += ["samples"] if part == "prompted" else []
    header += ["3D Dice", "HD95 mm", "NSD", "cases"] if volume else []
    rows = []
    for name, c in after.items():
        cells = [esc(name)]
        if before:
            b = before["per_class"].get(name, {})
            cells += [num(b.get("iou")), num(b.get("dice"))]
        cells += [num(c["iou"]), num(c["dice"])]
        if before:
            cells.append(_delta(c["iou"], before["per_class"].get(name, {}).get("iou")))
        cells += [num(c.get("samples"))] if part == "prompted" else []
        if volume:
            v = volume["per_class"].get(name, {})
            cells += [num(v.get("dice")), num(v.get("hd95_mm"), 1), num(v.get("nsd")), num(v.get("cases"))]
        rows.append(({"data-class": name}, cells))
    mean = ["mean", *([num(before["miou"]), num(before["mdice"])] if before else []), num(metrics[part]["miou"]), num(metrics[part]["mdice"])]
    mean += [_delta(metrics[part]["miou"], before["miou"])] if before else []
    mean += [num(metrics[part].get("n_samples"))] if part == "prompted" else []
    mean += [num(volume["mdice"]), num(volume["mhd95_mm"], 1), num(volume["mnsd"]), ""] if volume else []
    rows.append(({"class": "mean"}, mean))
    out = table(header, rows, "per-class", f' data-part="{part}"')
    if "pixel_accuracy" in metrics[part]:
        before_accuracy = f" (before fine-tuning {num(before.get('pixel_accuracy'))})" if before else ""
        out += f"<p>pixel accuracy {num(metrics[part]['pixel_accuracy'])}{before_accuracy}</p>"
    if volume:
        out += _per_case_details(volume)
    return out


def _delta(after, before) -> str:
    if after is None or before is None or math.isnan(after) or math.isnan(before):
        return "—"
    return f'<span class="{"up" if after >= before else "down"}">{after - before:+.3f}</span>'


def _per_case_details(volume: dict) -> str:
    rows = [({}, [esc(pc["case"]), esc(name), num(pc["dice"]), num(pc["hd95_mm"], 1), num(pc["nsd"])])
            for name, c in volume["per_class"].items() for pc in c.get("per_case", [])]  # fmt: skip
    tolerance = volume.get("nsd_tolerance_mm")
    return (f"<details><summary>per case, 3D ({len(rows)} rows; NSD at {num(tolerance, 1)} mm; "
            f"{esc(volume.get('accumulation', ''))})</summary>{table(['case', 'class', 'Dice', 'HD95 mm', 'NSD'], rows, 'per-case')}</details>")  # fmt: skip


def interactive_table(part: dict) -> str:
    """``eval.volume_mode: interactive``: per class (and their mean) Dice and NSD after step 0 and
    each click, the challenge's AUC over the clicks and the final value; per case in a <details>."""
    steps = len(part["mean"]["dice"])
    first = "box" if part.get("first_prompt") == "box" else "automatic"
    header = ["class", "metric", f"step 0 ({first})", *[f"click {s}" for s in range(1, steps)], f"AUC (0–{steps - 2})", "final", "cases"]

    def rows(name: str, c: dict, attrs: dict, cases: str) -> list[tuple[dict, list[str]]]:
        return [({**attrs, "data-metric": key}, [esc(name) if key == "dice" else "", label, *[num(v) for v in c[key]],
                                                  num(c[f"{key}_auc"]), num(c[f"final_{key}"]), cases if key == "dice" else ""])
                for key, label in (("dice", "Dice"), ("nsd", "NSD"))]  # fmt: skip

    body = [row for name, c in part["per_class"].items() if c["cases"] for row in rows(name, c, {"data-class": name}, num(c["cases"]))]
    body += rows("mean", part["mean"], {"class": "mean"}, "")
    cases = [({}, [esc(pc["case"]), esc(name), *[num(v) for v in pc["dice"]], num(pc["dice_auc"]), num(pc["nsd"][-1]), num(pc["nsd_auc"]),
                   esc(" ".join(str(c[3]) for c in pc["clicks"]) or "none")])
             for name, c in part["per_class"].items() for pc in c["per_case"]]  # fmt: skip
    dice_steps = ["Dice step 0", *[f"Dice click {s}" for s in range(1, steps)]]
    case_header = ["case", "class", *dice_steps, "Dice AUC", "final NSD", "NSD AUC", "clicks"]
    return (table(header, body, "interactive") + f"<p>{num(part.get('seconds'), 1)} s; NSD at {num(part.get('nsd_tolerance_mm'), 1)} mm</p>"
            + f"<details><summary>per case ({len(cases)} rows)</summary>{table(case_header, cases, 'interactive-per-case')}</details>")  # fmt: skip


def group_table(key: str, groups: dict) -> str:
    """``by_condition`` (ACDC): per group mIoU, mDice and per-class IoU, from the same evaluation."""
    classes = list(dict.fromkeys(c for g in groups.values() for c in g["per_class"]))
    header = [key.removeprefix("by_"), "mIoU", "mDice", *[f"IoU {c}" for c in classes]]
    rows = [({f"data-{key.removeprefix('by_')}": name}, [esc(name), num(g["miou"]), num(g["mdice"]),
                                                      *[num(g["per_class"].get(c, {}).get("iou")) for c in classes]])
            for name, g in groups.items()]  # fmt: skip
    return f"<p>each {esc(key.removeprefix('by_'))} on its own, from the same predictions:</p>" + table(header, rows, "by-group")


def instance_table(part: dict) -> str:
    """The Cityscapes instance benchmark of one part: AP and AP50 per thing class and their mean, with its protocol."""
    rows = [({"data-class": name}, [esc(name), num(c["ap"]), num(c["ap50"]), num(c["instances"]), num(c["predictions"])])
            for name, c in part["per_class"].items()]  # fmt: skip
    rows.append(({"class": "mean"}, ["mean", num(part["ap"]), num(part["ap50"]), "", ""]))
    protocol = f"<details><summary>instance protocol</summary>{dl(flatten(part.get('protocol', {})))}</details>"
    return table(["class", "AP", "AP50", "instances", "predictions"], rows, "instances") + protocol
