"""The pictures of ``samtune report``, as PNG bytes for the HTML page: per-class IoU/Dice bars,
learning curves, mIoU/mDice by prompt round, and the montage of the best and worst validation
cases, predicted again from the run's checkpoint.

Matplotlib through its object-oriented API (``Figure`` saved by the Agg canvas), never ``pyplot``:
no global backend is switched, so a report made from a notebook leaves the notebook's plots alone.
torch and matplotlib are imported inside the functions (``samtune`` must import neither).
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass, field

import numpy as np

DPI = 100
BEFORE, AFTER = "#a0a8b3", "#1f6fb2"  # grey for the model before fine-tuning, blue after
PART_COLOURS = {"prompted": "#1f6fb2", "semantic": "#d9711c"}
TRUTH_RGB, PRED_RGB = np.array((230, 30, 30), np.float32), np.array((40, 200, 60), np.float32)  # as overlays.py draws them


def _figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white")
    return buffer.getvalue()


def class_bars(part: str, after: dict, before: dict | None) -> bytes:
    """Per-class IoU (top) and Dice (bottom), before and after fine-tuning; absent classes (NaN) have no bar."""
    names = list(after)
    x = np.arange(len(names))
    fig = _figure(max(6.0, 0.45 * len(names) + 2.0), 5.6)
    width = 0.4 if before else 0.6
    for ax, metric, label in zip(fig.subplots(2, 1, sharex=True), ("iou", "dice"), ("IoU", "Dice")):
        if before:
            ax.bar(x - width / 2, [before.get(n, {}).get(metric, math.nan) for n in names], width, color=BEFORE, label="before fine-tuning")
        ax.bar(x + (width / 2 if before else 0), [after[n][metric] for n in names], width, color=AFTER, label="after fine-tuning")
        ax.set_ylim(0, 1)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(f"{part}: per-class {label}", fontsize=10)
    ax.set_xticks(x, names, rotation=40 if len(names) > 5 else 0, ha="right" if len(names) > 5 else "center")
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside upper right", ncols=2, fontsize=8)  # never over a bar
    return _png(fig)


def learning_curves(history: list[dict], baseline: dict | None) -> bytes:
    """Validation mIoU per part at every evaluation step, from step 0 (the model before fine-tuning,
    also dashed), and the training loss of the batch at each evaluation step."""
    from matplotlib.ticker import MaxNLocator

    steps = [h["step"] for h in history]
    fig = _figure(9.0, 3.4)
    ax_miou, ax_loss = fig.subplots(1, 2)
    parts = [p for p in ("prompted", "semantic") if any(f"{p}_miou" in h for h in history)]
    for part in parts:
        colour = PART_COLOURS[part]
        before = [baseline[part]["miou"]] if baseline and part in baseline else []  # step 0: the model before fine-tuning
        values = before + [h.get(f"{part}_miou", math.nan) for h in history]
        ax_miou.plot([0] * len(before) + steps, values, marker="o", color=colour, label=f"{part} mIoU")
        if before:
            ax_miou.axhline(before[0], ls="--", color=colour, alpha=0.6, label=f"{part}, before")
    if not parts:  # histories written before per-part keys: the headline only
        ax_miou.plot(steps, [h["miou"] for h in history], marker="o", color=AFTER, label="mIoU")
    below = [h for h in history if h.get("below_baseline")]
    if below:
        ax_miou.scatter([h["step"] for h in below], [h["miou"] for h in below], marker="x", s=60, color="red", zorder=3, label="below baseline")
    ax_miou.set(xlabel="training step", ylabel="validation mIoU", title="validation mIoU", ylim=(0, 1))
    ax_miou.legend(fontsize=8)
    ax_loss.plot(steps, [h.get("loss", math.nan) for h in history], marker="o", color="#444444")
    ax_loss.set(xlabel="training step", ylabel="loss", title="training loss at the evaluation steps")
    for ax in (ax_miou, ax_loss):
        ax.grid(alpha=0.3)
        ax.set_xlim(0, max(steps) * 1.05)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    return _png(fig)


def rounds_curve(by_round: list[dict], corrective_rounds: int) -> bytes:
    """mDice and mIoU after each prompt round: round 0 is the first prompt, rounds 1..C add one
    corrective click each, later rounds feed the previous mask only."""
    rounds = [r["round"] for r in by_round]
    fig = _figure(6.0, 3.4)
    ax = fig.subplots()
    ax.plot(rounds, [r["mdice"] for r in by_round], marker="o", color=AFTER, label="mDice")
    ax.plot(rounds, [r["miou"] for r in by_round], marker="s", color=BEFORE, label="mIoU")
    if corrective_rounds < rounds[-1]:
        ax.axvspan(corrective_rounds + 0.5, rounds[-1] + 0.5, color="#eeeeee", label="mask-only rounds")
    ax.set_xticks(rounds, [f"{r}" for r in rounds])
    ax.set(xlabel="corrective clicks added (round)", ylabel="score", title="prompted validation by round", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


@dataclass
class Shown:
    """The picture of one validation sample: truth and prediction kept zlib-compressed (a label map
    compresses ~100×; 64 uncompressed 2048×1024 maps would hold 270 MB)."""

    index: int  # in the source
    title: str
    errors: int  # FP + FN pixels
    shape: tuple[int, int]
    packed: bytes  # uint8 [truth, prediction]: bool masks (prompted) or source class ids (semantic)
    box_xyxy: list[float] | None = None  # the first prompt, in original pixels
    points_xy: list[list[float]] | None = None
    point_labels: list[int] | None = None

    def maps(self) -> tuple[np.ndarray, np.ndarray]:
        both = np.frombuffer(zlib.decompress(self.packed), np.uint8).reshape(2, *self.shape)
        return both[0], both[1]


@dataclass
class Unit:
    """What is ranked: a case (volumes), an image (semantic) or a prompted object (2D); its score
    is the mean over its classes of Dice from TP/FP/FN summed over its scored samples."""

    name: str
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # class -> TP, FP, FN
    shown: Shown | None = None  # its sample with the most error pixels
    samples: int = 0

    def add(self, class_name: str, tp: int, fp: int, fn: int) -> None:
        self.counts.setdefault(class_name, np.zeros(3, np.int64))
        self.counts[class_name] += (tp, fp, fn)

    def offer(self, shown: Shown) -> None:
        self.samples += 1
        if self.shown is None or shown.errors > self.shown.errors:
            self.shown = shown

    @property
    def score(self) -> float:
        dices = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in self.counts.values() if 2 * tp + fp + fn]
        return float(np.mean(dices)) if dices else math.nan  # nothing to find and nothing found: not ranked


def _pack(truth: np.ndarray, pred: np.ndarray) -> bytes:
    return zlib.compress(np.stack([truth, pred]).astype(np.uint8).tobytes(), 1)


def spread(total: int, cap: int) -> list[int]:
    """At most ``cap`` indexes evenly spread over ``range(total)`` (every case of a split is seen)."""
    return sorted(set(np.linspace(0, total - 1, min(cap, total)).round().astype(int).tolist())) if total else []


def _unit_key(source, index: int, fallback: str) -> tuple[str, str]:
    """(key, where): volumes are ranked by case, the picture says which slice."""
    if source.volumetric:
        case, z = source.slice_position(index)
        return case, f"{case} · z={z}"
    return fallback, source.item_id(index)


def score_prompted(loaded, dataset, indices: list[int]) -> dict[str, Unit]:
    """The evaluation protocol's prediction (first prompt, then the recipe's rounds) on ``indices``."""
    import torch

    from samtune.datasets import sample as S
    from samtune.finetune.scoring.protocol import uses_box
    from samtune.finetune.interaction import run_rounds
    from samtune.finetune.runtime import autocast

    model, family, recipe, device = loaded.model, loaded.family, loaded.recipe, loaded.device
    use_box, units = uses_box(recipe), {}
    generator = torch.Generator(device=device)
    batch_size = recipe.eval.batch_size
    for number, start in enumerate(range(0, len(indices), batch_size)):
        chosen = indices[start : start + batch_size]
        batch = S.collate_samples([dataset[k] for k in chosen])
        metas = batch[S.META]
        batch = {k: (v.to(device) if k != S.META else v) for k, v in batch.items()}
        generator.manual_seed(recipe.seed * 1_000_003 + number)  # as evaluation seeds its corrective clicks
        with torch.no_grad(), autocast(device, recipe.train.precision):
            outputs, _ = run_rounds(model, family, batch, recipe.prompts, dataset.image_size, use_box, generator)
        logits = outputs[-1].float().cpu()
        for i, (k, meta) in enumerate(zip(chosen, metas)):
            pred = (family.logits_to_original(logits[i], meta["resized_size"], meta["original_size"]) > 0).numpy()
            target, valid = meta["targets"][0], ~meta["ignore"]
            tp, fp, fn = (int(np.count_nonzero(m & valid)) for m in (pred & target, pred & ~target, ~pred & target))
            name = meta["class_names"][0]
            key, where = _unit_key(dataset.source, meta["index"], f"{k}")
            unit = units.setdefault(key, Unit(key if dataset.source.volumetric else f"{where} · {name}"))
            unit.add(name, tp, fp, fn)
            xy_scale = np.array(meta["original_size"][::-1], np.float64) / np.array(meta["resized_size"][::-1], np.float64)
            shown = Shown(meta["index"], f"{where} · {name}", fp + fn, target.shape, _pack(target, pred))
            if use_box:
                shown.box_xyxy = (batch[S.BOXES][i, 0].cpu().numpy() * np.tile(xy_scale, 2)).tolist()
            else:
                shown.points_xy = (batch[S.POINTS][i, 0].cpu().numpy() * xy_scale).tolist()
                shown.point_labels = batch[S.POINT_LABELS][i, 0].cpu().tolist()
            unit.offer(shown)
    return units


def score_semantic(loaded, dataset, indices: list[int]) -> dict[str, Unit]:
    """Label maps from the class prompts (no input) on ``indices``, scored per class."""
    import torch

    from samtune.datasets import semantic as SEM
    from samtune.finetune.automatic import predict_index_maps
    from samtune.finetune.runtime import autocast

    model, family, recipe, device = loaded.model, loaded.family, loaded.recipe, loaded.device
    space, source, units = dataset.space, dataset.source, {}
    for start in range(0, len(indices), recipe.eval.batch_size):
        batch = SEM.collate_semantic([dataset[k] for k in indices[start : start + recipe.eval.batch_size]])
        with torch.no_grad(), autocast(device, recipe.train.precision):
            maps = predict_index_maps(model, family, batch[SEM.IMAGE].to(device), batch[SEM.META], recipe.automatic.threshold)
        for meta, index_map in zip(batch[SEM.META], maps):
            truth, pred = meta["label"], space.to_source_ids(index_map)
            valid = truth != source.ignore_index
            key, where = _unit_key(source, meta["index"], source.item_id(meta["index"]))
            unit = units.setdefault(key, Unit(key))
            for class_id, name in zip(space.ids, space.names):
                t, p = (truth == class_id) & valid, (pred == class_id) & valid
                unit.add(name, int(np.count_nonzero(t & p)), int(np.count_nonzero(p & ~t)), int(np.count_nonzero(t & ~p)))
            unit.offer(Shown(meta["index"], where, int(np.count_nonzero((pred != truth) & valid)), truth.shape, _pack(truth, pred)))
    return units


def best_and_worst(units: dict[str, Unit], n: int) -> tuple[list[Unit], list[Unit]]:
    """The ``n`` highest and ``n`` lowest scored units, never the same unit twice (worst first)."""
    ranked = sorted((u for u in units.values() if not math.isnan(u.score)), key=lambda u: (-u.score, u.name))
    n_best = min(n, (len(ranked) + 1) // 2)
    return ranked[:n_best], ranked[n_best:][::-1][:n]


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, 2) if image.ndim == 2 else np.ascontiguousarray(image[..., :3])


def _tint(rgb: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    out = rgb.astype(np.float32)
    out[mask] = 0.55 * out[mask] + 0.45 * colour
    return out.round().astype(np.uint8)


def _draw_prompt(ax, shown: Shown) -> None:
    from matplotlib.patches import Rectangle

    if shown.box_xyxy is not None:
        x0, y0, x1, y1 = shown.box_xyxy
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="#fadc00", linewidth=1.5))
    for (x, y), label in zip(shown.points_xy or [], shown.point_labels or []):
        if label >= 0:  # -1 marks padding
            ax.plot(x, y, marker="o", markersize=6, markeredgecolor="white", color="#28c83c" if label == 1 else "#e61e1e")


def montage(units: list[Unit], heading: str, source, space=None) -> bytes:
    """One row per unit: image (with the prompt), ground truth, prediction. ``space``: the label
    space of semantic maps (classes tinted in the palette of ``samtune predict`` overlays); None:
    prompted masks (truth red, prediction green with the truth outlined)."""
    from matplotlib.patches import Patch

    from samtune.finetune.predict.label_files import _PALETTE, tint_labels  # the palette prediction overlays use

    first = source.load(units[0].shown.index)[0]
    aspect = first.shape[0] / first.shape[1]
    fig = _figure(9.0, 0.5 + len(units) * max(1.6, 3.0 * aspect))
    fig.suptitle(heading, fontsize=11)
    present = set()
    for row, unit in zip(fig.subplots(len(units), 3, squeeze=False), units):
        shown = unit.shown
        image = _rgb(source.load(shown.index)[0])
        truth, pred = shown.maps()
        if space is None:
            panels = [image, _tint(image, truth > 0, TRUTH_RGB), _tint(image, pred > 0, PRED_RGB)]
        else:
            panels = [image, tint_labels(image, truth, space, values=space.ids), tint_labels(image, pred, space, values=space.ids)]
            present |= {k for k, class_id in enumerate(space.ids) if (truth == class_id).any() or (pred == class_id).any()}
        score = f"Dice {unit.score:.3f}" if unit.samples == 1 else f"mean Dice {unit.score:.3f} over {unit.samples} samples"
        titles = [f"{shown.title}\n{score}", "ground truth", "prediction"]
        for ax, panel, title in zip(row, panels, titles):
            ax.imshow(panel, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
        if space is None:
            row[2].contour(truth > 0, levels=[0.5], colors=["#e61e1e"], linewidths=0.8)
            _draw_prompt(row[0], shown)
            _draw_prompt(row[2], shown)
    if space is not None and present:
        fig.legend(handles=[Patch(color=_PALETTE[k % len(_PALETTE)] / 255, label=space.names[k]) for k in sorted(present)],
                   loc="outside lower center", ncols=min(6, len(present)), fontsize=8)  # fmt: skip
    return _png(fig)
