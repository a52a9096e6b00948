"""The public Python API (re-exported as ``samtune.train``, ``samtune.evaluate``,
``samtune.load_model``) and what the CLI's ``evaluate`` and ``export`` run.

    import samtune
    recipe = samtune.load_recipe("recipes/demo.yaml", ["train.steps=100", "output.dir=runs/short"])
    metrics = samtune.train(recipe)
    loaded = samtune.load_model("runs/short")          # run folder or checkpoint folder
    low_res, iou = loaded.family.decode_prompts(loaded.model, embeddings, boxes=...)
"""

from __future__ import annotations

from pathlib import Path

from samtune import SamtuneError
from samtune.files import write_json_atomic
from samtune.finetune.automatic import has_class_prompts
from samtune.finetune.checkpoints import LoadedModel, checkpoint_folder, load_model, read_classes
from samtune.finetune.checkpoints import load_onto_base as _load_onto_base
from samtune.finetune.data import build_datasets
from samtune.finetune.recipe import Recipe, dump_recipe, load_recipe
from samtune.finetune.report.page import write_report
from samtune.finetune.runtime import check_writable, image_size_of, model_family, resolve_device, seed_everything
from samtune.finetune.predict.label_files import write_label_volumes
from samtune.finetune.scoring.tables import json_ready, print_results, write_per_case
from samtune.finetune.scoring.protocol import evaluate_with_recipe
from samtune.finetune.train.loop import train

# the public API (samtune.<name> for the first five); load_model and LoadedModel live beside the checkpoint files
__all__ = ["train", "evaluate", "load_model", "report", "LoadedModel", "load_recipe", "checkpoint_folder", "export_checkpoint"]


def evaluate(recipe: Recipe, checkpoint: str | Path, out: str | Path | None = None, *, quiet: bool = False) -> dict:
    """Rebuild the base model from the recipe, load the checkpoint, evaluate on the val split
    (prompted and/or semantic, by the recipe's ``task``); writes the metrics JSON (default
    ``<output.dir>/eval/metrics.json``), ``per_case.csv`` beside it for volumes, and with
    ``eval.save_predictions`` the label maps into ``predictions/`` beside it (and, for Cityscapes
    instances, the official instance evaluator's files into ``instances/{prompted,automatic}/``);
    returns the metrics."""
    out_path = Path(out) if out else Path(recipe.output.dir) / "eval" / "metrics.json"
    check_writable(out_path.parent, "--out" if out else "output.dir")
    seed_everything(recipe.seed)
    device = resolve_device(recipe.train.device)
    family = model_family(recipe)
    model = _load_onto_base(recipe, family, checkpoint).to(device)
    if recipe.task != "promptable" and not has_class_prompts(model):
        raise SamtuneError(f"task={recipe.task!r}: checkpoint {checkpoint} has no class prompts (it was trained with task: promptable); evaluate it with task=promptable.")
    data = build_datasets(recipe, family.make_transform(image_size_of(recipe)), training=False)
    saved = read_classes(checkpoint_folder(Path(checkpoint)))
    if data.space is not None and saved and saved["label_space"]["ids"] != data.space.ids:
        raise SamtuneError(f"--checkpoint {checkpoint}: its class prompts are for class ids {saved['label_space']['ids']}, the data has {data.space.ids}; evaluate on data with the same classes (data.classes).")
    predictions = out_path.parent / "predictions" if recipe.eval.save_predictions else None
    instances = out_path.parent / "instances" if recipe.eval.save_predictions else None
    metrics = evaluate_with_recipe(model, family, data, recipe, device, predictions=predictions, instance_predictions=instances)
    if predictions is not None and "semantic" in metrics and "label_volumes" in metrics["semantic"]:
        write_label_volumes(metrics["semantic"]["label_volumes"], data.val_semantic.source, data.space, predictions)
    metrics = json_ready(metrics)
    metrics["checkpoint"] = str(checkpoint)
    write_json_atomic(out_path, metrics)
    write_per_case(metrics, out_path.parent)
    # the page beside the metrics, from the model and data already loaded (not read again)
    page = report([out_path], out_path.parent / "report.html", loaded=LoadedModel(model, recipe, family, Path(checkpoint), device), data=data)
    if not quiet:
        print_results({Path(checkpoint).name: metrics}, recipe)
        print(f"{metrics['headline']} mIoU {metrics['miou']:.3f}; written to {out_path}; report: {page}")
    return metrics


def report(runs, out: str | Path | None = None, *, cases: int = 4, max_samples: int = 64, device: str = "cpu",
           loaded: LoadedModel | None = None, data=None) -> Path:  # fmt: skip
    """One static HTML page (no server, no network) of one or more run folders (or metrics JSON
    files of ``samtune evaluate``): protocol, per-class tables and charts before/after, learning
    curves, mIoU by round, the ``cases`` best and worst validation cases predicted again from each
    run's best checkpoint (at most ``max_samples`` samples scored), recipe, parameters, skipped
    cases; a comparison table first when there are several. Default ``out``:
    ``<first run>/report.html``; returns the file written. ``loaded``/``data``: the model and data
    of the first run when already in memory (``evaluate`` passes its own)."""
    paths = [runs] if isinstance(runs, (str, Path)) else list(runs)
    recipe_text = dump_recipe(loaded.recipe) if loaded is not None else None
    return write_report(paths, out, cases=cases, max_samples=max_samples, device=device, loaded=loaded, data=data, recipe_text=recipe_text)


def export_checkpoint(recipe: Recipe, checkpoint: str | Path, fmt: str, out: str | Path) -> list[Path]:
    """Load a checkpoint on the recipe's base model and export it merged, as its family writes it."""
    family = model_family(recipe)
    if fmt not in family.export_formats:
        raise SamtuneError(f"--format {fmt!r}: model family {family.name!r} exports {', '.join(family.export_formats)}.")
    model = _load_onto_base(recipe, family, checkpoint)
    return family.export(model, fmt, out)
