"""``samtune report``: one static HTML page of one or more runs, opened from disk with no server and
no network (charts embedded as base64 PNG, CSS inline, no script).

Per run: the evaluation protocol of each part, per-class IoU/Dice before and after fine-tuning
(and the per-case 3D means of volumes; per ACDC condition; the Cityscapes instance AP with its
protocol; Dice/NSD by click of ``eval.volume_mode: interactive``: ``part_tables``),
bar charts, learning curves, mIoU/mDice by prompt round, the best and worst validation cases
predicted again from the run's best checkpoint, the recipe, parameter counts, skipped cases and
the guardrails' findings. Several runs get a comparison table
first. The numbers come from ``metrics.json`` only, so a run whose checkpoint or data is gone
still gets its report; the montage then says why it is missing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from samtune import SamtuneError
from samtune.files import write_atomic
from samtune.finetune.report.markup import count, dl, esc, flatten, img, note, num, table  # noqa: F401 (num: the tables' number format, also imported from here)
from samtune.finetune.report.part_tables import group_table, instance_table, interactive_table, per_class_table

log = logging.getLogger(__name__)

PARTS = ("prompted", "semantic")
SECTIONS = ("Overview", "Evaluation protocol", "Per-class results", "Per-class chart", "Learning curves", "Dice vs clicks",
            "Best and worst cases", "Recipe", "Parameters", "Skipped cases", "Guardrails")  # fmt: skip
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 2px solid #1f6fb2; padding-bottom: .2em; margin-top: 2em; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ccd; padding: .25em .6em; } th { background: #eef2f7; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } tr.mean td { font-weight: bold; background: #f6f8fa; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; } dt { font-weight: bold; } dd { margin: 0; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: .85em; }
.scroll { overflow-x: auto; } pre.recipe { max-height: 30em; }
img { max-width: 100%; display: block; margin: .5em 0; border: 1px solid #eee; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: .5em .8em; }
.up { color: #1a7f37; } .down { color: #c62828; }
"""


@dataclass
class Run:
    """One run to report: its metrics, the recipe as written (YAML text and mapping, not validated:
    older recipes still render) and the checkpoint the montage is predicted from."""

    folder: Path
    metrics_file: Path
    metrics: dict
    recipe_text: str | None
    recipe: dict
    checkpoint: Path | None

    @property
    def name(self) -> str:
        return self.folder.name if self.metrics_file.name == "metrics.json" else f"{self.folder.name}/{self.metrics_file.name}"


def _checkpoint_of(folder: Path, metrics: dict) -> Path | None:
    """The best checkpoint of a run folder, else its last, else the one an evaluation names."""
    for candidate in (folder / "checkpoints" / "best", folder / "checkpoints" / "last", metrics.get("checkpoint")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def read_run(path: str | Path) -> Run:
    """A run folder (``samtune train``'s output.dir) or a metrics JSON file (``samtune evaluate --out``)."""
    path = Path(path)
    metrics_file = path if path.is_file() else path / "metrics.json"
    if not metrics_file.is_file():
        raise SamtuneError(f"{path}: not a run folder (no metrics.json in it); give folders written by `samtune train` (output.dir) "
                           "or the metrics JSON written by `samtune evaluate`.")  # fmt: skip
    try:
        metrics = json.loads(metrics_file.read_text())
    except (ValueError, OSError) as exc:
        raise SamtuneError(f"{metrics_file}: cannot be read as JSON ({exc}); it is not a metrics file written by samtune.") from None
    if not isinstance(metrics, dict) or not any(isinstance(metrics.get(p), dict) and "per_class" in metrics[p] for p in PARTS):
        raise SamtuneError(f"{metrics_file}: has no 'prompted' or 'semantic' part with 'per_class'; not a metrics file written by `samtune train` or `samtune evaluate`.")
    folder = metrics_file.parent
    checkpoint = _checkpoint_of(folder, metrics)
    recipe_file = next((f for f in (folder / "recipe.yaml", checkpoint and checkpoint / "recipe.yaml") if f and f.is_file()), None)
    text = recipe_file.read_text() if recipe_file else None
    try:
        recipe = yaml.safe_load(text) if text else {}
    except yaml.YAMLError:
        recipe = {}  # shown as text all the same
    return Run(folder, metrics_file, metrics, text, recipe if isinstance(recipe, dict) else {}, checkpoint)


def _model_name(run: Run) -> str:
    model = run.recipe.get("model") or {}
    return f"{model.get('name', '?')} @ {model.get('image_size', '?')} px" if model else "unknown (no recipe.yaml)"


def comparison_table(runs: list[Run]) -> str:
    """Headline figures of every run side by side, with the headline part's per-class IoU."""
    classes = list(dict.fromkeys(c for r in runs for c in r.metrics[_headline(r)]["per_class"]))
    header = ["run", "task", "model", "headline", "mIoU", "mDice", "mIoU gain", *[f"IoU {c}" for c in classes]]
    rows = []
    for i, run in enumerate(runs, 1):
        m, part = run.metrics, _headline(run)
        per_class = m[part]["per_class"]
        cells = [f'<a href="#run-{i}">{esc(run.name)}</a>', esc(m.get("task", run.recipe.get("task", "?"))), esc(_model_name(run)), part,
                 num(m[part]["miou"]), num(m[part]["mdice"]), num(m.get("miou_gain")),
                 *[num(per_class.get(c, {}).get("iou")) for c in classes]]  # fmt: skip
        rows.append(({"data-run": run.name}, cells))
    return "<h2 id=\"comparison\">Comparison</h2>" + table(header, rows, "comparison")


def _headline(run: Run) -> str:
    part = run.metrics.get("headline")
    return part if part in run.metrics else next(p for p in PARTS if p in run.metrics)


def _extra_tables(part: dict) -> str:
    """A part's per-group scores (ACDC conditions) and instance AP (Cityscapes), where it has them."""
    out = [f"<h5>per {esc(k.removeprefix('by_'))}</h5>" + group_table(k, v) for k, v in part.items() if k.startswith("by_") and isinstance(v, dict)]
    if isinstance(part.get("instances"), dict):
        out.append("<h5>instances (Cityscapes instance-level AP)</h5>" + instance_table(part["instances"]))
    return "".join(out)


def _protocol_pairs(protocol: dict) -> list[tuple[str, str]]:
    """A protocol for a <dl>: nested keys flattened, lists (e.g. differences from a challenge) one line each."""
    return flatten({k: "; ".join(map(str, v)) if isinstance(v, list) else v for k, v in protocol.items()})


def run_section(i: int, run: Run, montage_html: str) -> str:
    """Every section of one run, in ``SECTIONS`` order; a section with nothing to show says why."""
    from samtune.finetune.report import figures as F

    m = run.metrics
    baseline = m.get("baseline") if isinstance(m.get("baseline"), dict) else None
    parts = [p for p in PARTS if p in m]
    out = [f'<h2 id="run-{i}">Run {i}: {esc(run.name)}</h2>']

    best = m.get("best") or {}
    overview = [("run folder", esc(run.folder.resolve())), ("metrics file", esc(run.metrics_file.name)),
                ("task", esc(m.get("task", run.recipe.get("task", "?")))), ("model", esc(_model_name(run))),
                ("evaluated checkpoint", esc(m.get("checkpoint", "—"))),
                ("headline", f"{esc(_headline(run))}: mIoU {num(m.get('miou'))}, mDice {num(m.get('mdice'))}"
                             + (f" (before fine-tuning {num(baseline.get('miou'))}, gain {num(m.get('miou_gain'))})" if baseline else ""))]  # fmt: skip
    if best:
        overview.append(("best checkpoint", f"step {esc(best.get('step'))}, mIoU {num(best.get('miou'))}"))
    for key, label in (("step", "steps trained"), ("train_seconds", "training seconds"), ("device", "device"), ("processes", "processes")):
        if key in m:
            overview.append((label, esc(m[key])))
    out.append(f"<h3>{SECTIONS[0]}</h3>" + dl(overview))

    protocol = [f"<h4>{p}</h4>" + dl(flatten(m[p].get("protocol", {})) + [("accumulation", esc(m[p].get("accumulation", "—")))]) for p in parts]
    if isinstance(m.get("interactive"), dict):
        protocol.append("<h4>interactive</h4>" + dl(_protocol_pairs(m["interactive"].get("protocol", {}))))
    out.append(f"<h3>{SECTIONS[1]}</h3>" + "".join(protocol))

    if baseline is None:
        tables = [note("No 'baseline' in this metrics file (samtune evaluate scores one checkpoint): only the 'after' columns are shown.")]
    else:
        tables = []
    tables += [f"<h4>{p}</h4>" + per_class_table(p, m, (baseline or {}).get(p)) + _extra_tables(m[p]) for p in parts]
    if isinstance(m.get("interactive"), dict):
        tables.append("<h4>interactive (eval.volume_mode: interactive, per case 3D)</h4>" + interactive_table(m["interactive"]))
    out.append(f"<h3>{SECTIONS[2]}</h3>" + "".join(tables))

    charts = [img(F.class_bars(p, m[p]["per_class"], (baseline or {}).get(p, {}).get("per_class")), f"{p}: per-class IoU and Dice") for p in parts]
    out.append(f"<h3>{SECTIONS[3]}</h3>" + "".join(charts))

    history = m.get("history") or []
    curves = img(F.learning_curves(history, baseline), "learning curves") if history else note("No 'history' in this metrics file: it was not written by training.")
    out.append(f"<h3>{SECTIONS[4]}</h3>" + curves)

    by_round = (m.get("prompted") or {}).get("by_round")
    if by_round:
        corrective = m["prompted"].get("protocol", {}).get("corrective_rounds", len(by_round) - 1)
        rounds = img(F.rounds_curve(by_round, corrective), "mIoU and mDice by round")
        rows = [({}, [str(r["round"]), num(r["miou"]), num(r["mdice"])]) for r in by_round]
        rounds += table(["round (clicks added)", "mIoU", "mDice"], rows, "by-round")
    elif "prompted" in m:
        rounds = note("Only the first prompt was evaluated (prompts.corrective_rounds and mask_only_rounds are 0): no curve by round.")
    else:
        rounds = note("This task has no prompted part: no curve by round.")
    out.append(f"<h3>{SECTIONS[5]}</h3>" + rounds)
    out.append(f"<h3>{SECTIONS[6]}</h3>" + montage_html)
    out.append(f"<h3>{SECTIONS[7]}</h3>" + (f'<pre class="recipe">{esc(run.recipe_text)}</pre>' if run.recipe_text else note("No recipe.yaml in the run folder or its checkpoint.")))

    params = m.get("parameters") or {}
    total = params.get("total")
    rows = [({}, [esc(k), num(v), f"{100 * v / total:.2f} %" if total else "—"]) for k, v in params.items() if isinstance(v, int)]
    out.append(f"<h3>{SECTIONS[8]}</h3>" + (table(["parameters", "count", "of total"], rows, "parameters") if rows else note("No parameter counts in this metrics file.")))

    skipped = m.get("skipped_cases") or []
    rows = [({}, [esc(s.get("case", "")), esc(s.get("file", "")), esc(s.get("problem", ""))]) for s in skipped]
    out.append(f"<h3>{SECTIONS[9]}</h3>" + (table(["case", "file", "problem"], rows, "skipped") if rows else "<p>None: every case was read.</p>"))

    below, stopped = m.get("below_baseline_at") or [], m.get("stopped_early")
    guard = [("scored below the model before fine-tuning at steps", esc(", ".join(map(str, below)) or "none")),
             ("stopped early", esc(", ".join(f"{k} {v}" for k, v in stopped.items()) if stopped else "no"))]  # fmt: skip
    out.append(f"<h3>{SECTIONS[10]}</h3>" + (note("The validation score fell below the model before fine-tuning.") if below else "") + dl(guard))
    return "\n".join(out)


def montage_section(run: Run, cases: int, max_samples: int, device: str, loaded=None, data=None) -> str:
    """The best and worst validation cases, or a visible note saying why there are none (never raises)."""
    if cases == 0:
        return note("No montage: --cases 0.")
    try:
        return _montage(run, cases, max_samples, device, loaded, data)
    except SamtuneError as exc:
        return note(f"No montage: {exc}")
    except Exception as exc:  # a report must still render its numbers; the cause goes to the log as well
        log.warning("report %s: the montage failed", run.name, exc_info=True)
        return note(f"No montage: predicting the cases failed ({type(exc).__name__}: {exc}).")


def _montage(run: Run, cases: int, max_samples: int, device: str, loaded, data) -> str:
    from samtune.finetune.report import figures as F

    if loaded is None:
        if run.checkpoint is None:
            return note(f"No montage: no checkpoint to predict with (no checkpoints/best or checkpoints/last in {run.folder}, "
                         f"and the checkpoint metrics.json names, {run.metrics.get('checkpoint', 'none')}, is not a folder).")  # fmt: skip
        from samtune.finetune.checkpoints import load_model
        from samtune.finetune.recipe import load_recipe

        recipe = load_recipe(run.checkpoint / "recipe.yaml")
        root = Path(recipe.data.root)
        if not root.exists():  # checked here: building the data would otherwise generate demo data (data.generate_demo)
            return note(f"No montage: data.root={recipe.data.root!r} of {run.checkpoint / 'recipe.yaml'} does not exist here "
                         f"(resolved to {root.resolve()}); the validation data is needed to predict the cases.")  # fmt: skip
        loaded = load_model(run.checkpoint, recipe, device=device)
    if data is None:
        from samtune.finetune.data import build_datasets

        data = build_datasets(loaded.recipe, loaded.transform(), progress=False, training=False)
    prompted = data.val is not None
    dataset = data.val if prompted else data.val_semantic
    indices = F.spread(len(dataset), max_samples)
    units = (F.score_prompted if prompted else F.score_semantic)(loaded, dataset, indices)
    best, worst = F.best_and_worst(units, cases)
    if not best:
        return note(f"No montage: none of the {len(indices)} scored validation samples has ground truth or a prediction to rank by.")
    source = dataset.source
    space = None if prompted else dataset.space
    kind = "case" if source.volumetric else ("prompted object" if prompted else "image")
    state = loaded.checkpoint / "trainer_state.json"
    step = json.loads(state.read_text()).get("step") if state.is_file() else None
    where = (" Each row shows the case's slice with the most wrong pixels (FP + FN)." if source.volumetric else "")
    how = ("Left: the image with the first prompt (box yellow, clicks green/red; corrective clicks are not drawn); middle: the ground truth "
           "(red); right: the prediction (green) with the ground truth outlined." if prompted else
           "Left: the image; middle: the ground truth; right: the label map predicted with no prompt (classes in the legend's colours).")  # fmt: skip
    text = (f"Predicted again with {esc(Path(loaded.checkpoint).resolve())}{f' (step {step})' if step is not None else ''} on {len(indices)} of the "
            f"{len(dataset)} validation samples of the {'prompted' if prompted else 'semantic'} evaluation (evenly spread over the split, "
            f"at most {max_samples}: samtune report --max-samples), {count(len(units), kind)} ranked by mean Dice over their classes.{where} {how}")  # fmt: skip
    out = [f"<p>{text}</p>"]
    for label, chosen in (("best", best), ("worst", worst)):
        if chosen:
            heading = f"{label} {count(len(chosen), kind)}{' (worst first)' if label == 'worst' and len(chosen) > 1 else ''}"
            listed = ", ".join(f"{u.shown.title} (mean Dice {u.score:.3f})" for u in chosen)
            out.append(f'<p class="caption"><b>{esc(heading.capitalize())}</b>: {esc(listed)}</p>')
            out.append(img(F.montage(chosen, heading, source, space), f"{label} cases"))
    return "".join(out)


def render(runs: list[Run], montages: list[str]) -> str:
    title = f"samtune report: {', '.join(r.name for r in runs)}"
    body = [f"<h1>{esc(title)}</h1>"]
    if len(runs) > 1:
        body.append(comparison_table(runs))
    body += [run_section(i, run, montage) for i, (run, montage) in enumerate(zip(runs, montages), 1)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")  # fmt: skip


def write_report(paths: list[str | Path], out: str | Path | None = None, *, cases: int = 4, max_samples: int = 64,
                 device: str = "cpu", loaded=None, data=None, recipe_text: str | None = None) -> Path:  # fmt: skip
    """Read every run first (a folder that is not a run stops here, before any work), render, write
    ``out`` (default ``<first run>/report.html``). ``loaded``/``data``/``recipe_text``: the model,
    data and recipe already in memory for the first run (``samtune evaluate``)."""
    if cases < 0 or max_samples < 1:
        raise SamtuneError(f"--cases {cases} / --max-samples {max_samples}: need --cases >= 0 and --max-samples >= 1.")
    if not paths:
        raise SamtuneError("no run folder given.")
    runs = [read_run(p) for p in paths]
    if recipe_text is not None:
        runs[0].recipe_text, runs[0].recipe = recipe_text, yaml.safe_load(recipe_text) or {}
    out = Path(out) if out else runs[0].folder / "report.html"
    montages = [montage_section(run, cases, max_samples, device, *((loaded, data) if i == 0 else (None, None))) for i, run in enumerate(runs)]
    try:
        write_atomic(out, render(runs, montages))
    except OSError as exc:
        raise SamtuneError(f"--out {out}: cannot write there ({exc.strerror or exc}); choose another file.") from None
    return out


def report_after_run(folder: Path, device, cases: int = 4) -> Path | None:
    """``<folder>/report.html`` at the end of training; a failure is a warning, never a failed run.
    ``cases=0``: no montage (no checkpoint reload, no prediction: about a second of charts)."""
    try:
        return write_report([folder], cases=cases, device=str(device))
    except Exception as exc:
        log.warning("report.html was not written (%s); `samtune report %s` makes it later.", exc, folder)
        return None
