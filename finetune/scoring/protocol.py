"""Evaluation as the recipe prescribes it, the same call in training and ``samtune evaluate``:

- ``prompted``: prompts from the ground truth, per-class IoU/Dice at the original resolution after
  the initial prompt and after every corrective round. The first prompt is the box when
  ``prompts.box_probability >= 0.5``, else the points; the box is tight unless
  ``eval.box_jitter_px`` (jitter seeded by the sample index); corrective clicks seeded by ``seed``
  and the batch number (``eval.batch_size`` therefore matters when ``prompts.corrective_rounds > 0``).
- ``semantic`` (task automatic/both): full label maps from the class prompts on every validation
  pixel (``samtune.finetune.automatic``): one confusion matrix over the split (Cityscapes-style
  per-class IoU, void/255 excluded) and, for volumes, the whole predicted label volume of each
  case (every slice) scored in 3D.

Each part carries its ``protocol`` in metrics.json; ``headline`` names the part ``miou`` comes from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from samtune.adapters.family import ModelFamily
from samtune.datasets import sample as S
from samtune.datasets import semantic as SEM
from samtune.datasets.prompted import PromptedDataset
from samtune.datasets.semantic import SemanticDataset, collate_semantic
from samtune.datasets.source import LabelSpace
from samtune.finetune.automatic import predict_index_maps, predict_scored_maps
from samtune.finetune.interaction import run_rounds, total_rounds
from samtune.finetune.predict.label_files import write_label_png
from samtune.finetune.recipe import Recipe
from samtune.finetune.runtime import autocast
from samtune.finetune.scoring.interactive import evaluate_interactive
from samtune.finetune.scoring.instance_eval import AutomaticInstances, PromptedInstances
from samtune.finetune.scoring.instance_metrics import has_instance_benchmark
from samtune.finetune.scoring.metrics import ClassIoUAccumulator
from samtune.finetune.scoring.semantic_metrics import ConfusionAccumulator
from samtune.finetune.scoring.volume_metrics import SemanticVolumeAccumulator, VolumeMetricAccumulator
from samtune.finetune.distributed import merge_across_ranks, shard


EMPTY_MASK_RULE = (
    "IoU/Dice from TP/FP/FN summed over the split per class; a class with no ground truth and no "
    "prediction in the split is absent (NaN, left out of the mean); per case (3D): empty ground truth and "
    "empty prediction -> absent (NaN), empty ground truth with a prediction -> Dice 0 and HD95 undefined, "
    "ground truth with an empty prediction -> Dice 0, NSD 0, HD95 undefined (undefined HD95 counted)"
)


def evaluate_with_recipe(model, family, data, recipe: Recipe, device: torch.device, desc: str = "eval", predictions=None,
                         instance_predictions=None) -> dict:  # fmt: skip
    """Evaluation as the recipe prescribes it (prompted and/or semantic, by ``task``; prompts,
    rounds, ``train.precision``): the same call during training and in `samtune evaluate`."""
    with autocast(device, recipe.train.precision):
        return evaluate_all(model, family, data, recipe, device, desc, predictions, instance_predictions)


def data_protocol(recipe: Recipe) -> dict:
    """The data scored: kind, root and the section's subset (split, ACDC conditions, class space),
    so that a cross-dataset evaluation (Cityscapes checkpoint on ACDC night) says what it measured."""
    return {"kind": recipe.data.kind, "root": recipe.data.root, **recipe.data.scored_subset()}


OBJECTS = {"class": "class", "component": "connected component (8-connectivity) of each class",
           "instance": "annotated instance of each class (a class without instances: the class)"}


def prompted_protocol(recipe: Recipe) -> dict:
    p = recipe.prompts
    box = uses_box(recipe)
    return {
        "data": data_protocol(recipe),
        "prompts": "from the ground truth of each object",
        "objects": f"every {OBJECTS[p.per]} present in a validation "
                   f"image with >= data.min_pixels={recipe.data.min_pixels} px; images without it are not prompted",
        "first_prompt": "box" if box else "points",
        "box_jitter_px": recipe.eval.box_jitter_px if box else None,
        "points": None if box else {"positive": p.positive_points, "negative": p.negative_points, "placement": p.point_placement},
        "corrective_rounds": p.corrective_rounds,
        "mask_only_rounds": p.mask_only_rounds,
        "resolution": "original image resolution (logits resized back from the model input)",
        "empty_mask_rule": EMPTY_MASK_RULE,
    }  # fmt: skip


def semantic_protocol(recipe: Recipe) -> dict:
    return {
        "data": data_protocol(recipe),
        "prompts": "none: the learnt class prompts of the checkpoint",
        "fusion": f"per pixel the class of highest probability, background where none reaches {recipe.automatic.threshold}",
        "pixels": "every pixel of every validation image (every slice of every case for volumes); ignored/void (255) excluded",
        "resolution": "original image resolution (logits resized back from the model input)",
        "empty_mask_rule": EMPTY_MASK_RULE,
    }


def source_groups(source) -> list[str]:
    """The groups scored on their own besides the whole split (ACDC conditions), when there are two or more."""
    if source.group_name is None:
        return []
    groups = sorted({source.group(i) for i in range(len(source))})
    return groups if len(groups) > 1 else []


def _summary(result: dict) -> dict:
    return {k: result[k] for k in ("miou", "mdice", "per_class") if k in result}


def uses_box(recipe: Recipe) -> bool:
    """Evaluation's first prompt: the box when training mostly starts from boxes."""
    return recipe.prompts.box_probability >= 0.5


@torch.no_grad()
def evaluate(model, family: ModelFamily, dataset: PromptedDataset, recipe: Recipe, device: torch.device, desc: str = "eval",
             instance_folder: Path | None = None) -> dict:  # fmt: skip
    """Headline metrics are those after the last round; ``by_round`` lists mIoU per round;
    ``instances``: Cityscapes instance AP where prompts are per instance (``instance_folder``: the
    prediction files of the official evaluator)."""
    was_training = model.training
    model.eval()
    use_box = uses_box(recipe)
    rounds = total_rounds(recipe.prompts)
    batch_size = recipe.eval.batch_size
    items = shard(len(dataset), batch_size)  # this rank's whole batches (all of them with one process)
    loader = DataLoader(Subset(dataset, items), batch_size=batch_size, shuffle=False, collate_fn=S.collate_samples)
    accumulators = [ClassIoUAccumulator() for _ in range(rounds)]
    volumes = None  # volumetric sources with every slice evaluated: per-case 3D metrics in mm
    if dataset.source.volumetric and not dataset.is_subset:
        volumes = VolumeMetricAccumulator(dataset.source, dataset.class_names)
    instances = PromptedInstances(dataset, instance_folder) if PromptedInstances.wanted(dataset, recipe.prompts.per) else None
    by_group = {g: ClassIoUAccumulator() for g in source_groups(dataset.source)}  # final round, per ACDC condition
    generator = torch.Generator(device=device)
    first_batch = items.start // batch_size
    for number, batch in enumerate(tqdm(loader, desc=desc, leave=False, unit="batch", disable=None), first_batch):  # None: no bar when not a terminal
        # corrective clicks seeded per batch: the same on every evaluation and on any number of ranks
        generator.manual_seed(recipe.seed * 1_000_003 + number)
        batch = {k: (v.to(device) if k != S.META else v) for k, v in batch.items()}
        outputs, _ = run_rounds(model, family, batch, recipe.prompts, dataset.image_size, use_box, generator)
        for round_index, (round_logits, acc) in enumerate(zip(outputs, accumulators)):
            logits = round_logits.cpu()
            last = round_index == len(outputs) - 1
            for i, meta in enumerate(batch[S.META]):
                original = family.logits_to_original(logits[i], meta["resized_size"], meta["original_size"])
                pred = (original > 0).numpy()
                acc.add(meta["class_names"][0], pred, meta["targets"][0], meta["ignore"])
                if volumes is not None and last:
                    volumes.add(meta["index"], meta["class_ids"][0], pred)
                if instances is not None and last:
                    instances.add(meta, original, pred)
                if by_group and last:
                    by_group[dataset.source.group(meta["index"])].add(meta["class_names"][0], pred, meta["targets"][0], meta["ignore"])
    model.train(was_training)
    merge_across_ranks(*accumulators, *([volumes] if volumes is not None else []), *by_group.values())
    results = [acc.result() for acc in accumulators]
    metrics = results[-1]
    if by_group:
        metrics[f"by_{dataset.source.group_name}"] = {g: _summary(acc.result()) for g, acc in by_group.items()}
    metrics["prompt"] = "box" if use_box else "points"
    metrics["rounds"] = rounds
    metrics["protocol"] = prompted_protocol(recipe)
    if volumes is not None:
        metrics["volume"] = volumes.result()
    if instances is not None:
        metrics["instances"] = instances.result()
    if rounds > 1:
        metrics["by_round"] = [{"round": r, "miou": m["miou"], "mdice": m["mdice"]} for r, m in enumerate(results)]
    return metrics


def propagation_protocol(recipe: Recipe, way: str, memory_note: str) -> dict:
    return {
        "prompts": "one tight box (jitter 0) per class and case, from the ground truth of the slice where the class covers the most pixels",
        "propagation": {"memory": "SAM 2's video tracker: slices as frames, memory attention, both directions from the prompted slice; "
                                  "slices its object score rejects are empty",
                        "box": "slice by slice in both directions, each slice prompted with the bounding box (+10 %, at least 2 px) of the mask "
                               "predicted on the slice before it; the object ends at the first empty prediction"}[way] + memory_note,  # fmt: skip
        "scored": "per case in 3D (Dice, HD95, NSD) over the whole volume: every slice counts, prompted or not",
        "resolution": "original slice resolution (logits resized back from the model input)",
        "empty_mask_rule": EMPTY_MASK_RULE,
    }


@torch.no_grad()
def evaluate_propagation(model, family: ModelFamily, source, class_names: dict[int, str], recipe: Recipe, device: torch.device,
                         desc: str = "eval (propagate)") -> dict:  # fmt: skip
    """``eval.volume_mode: propagate``: per validation case and class present, one tight box on the
    class's largest slice, carried through the volume (``samtune.finetune.predict.propagation``)."""
    import numpy as np

    from samtune.adapters.registry import get_variant
    from samtune.finetune.predict.propagation import SlicePrompt, bbox, make_propagator

    was_training = model.training
    model.eval()
    source = source.every_slice()
    transform = family.make_transform(recipe.model.image_size or get_variant(recipe.model.name).default_image_size)
    propagate, way = make_propagator(recipe.eval.propagation, model, family, get_variant(recipe.model.name), recipe.model.checkpoint, transform, device)
    memory_note = ""
    if way == "memory" and recipe.model.checkpoint is None and get_variant(recipe.model.name).make_config is not None:
        memory_note = " (memory modules at random init: this model has no pretrained memory)"
    slices: dict[str, dict[int, int]] = {}
    for index in range(len(source)):
        case, z = source.slice_position(index)
        slices.setdefault(case, {})[z] = index
    volumes = VolumeMetricAccumulator(source, class_names)
    todo = [(case, cid) for case in sorted(slices) for cid in class_names]
    for case, class_id in tqdm(todo, desc=desc, leave=False, unit="object", disable=None):
        label = np.asarray(source.case_volume(case)[0]) == class_id
        if not label.any():
            continue
        z0 = int(label.reshape(len(label), -1).sum(1).argmax())
        indexes = slices[case]

        def load(z: int, indexes=indexes) -> np.ndarray:
            return source.load(indexes[z])[0]

        volumes.add_volume(case, class_id, propagate(load, len(label), SlicePrompt(z0, box=bbox(label[z0]))))
    model.train(was_training)
    return {"volume": volumes.result(), "propagation": way, "protocol": propagation_protocol(recipe, way, memory_note)}


def evaluate_all(model, family: ModelFamily, data, recipe: Recipe, device: torch.device, desc: str = "eval", predictions=None,
                 instance_predictions: Path | None = None) -> dict:  # fmt: skip
    """``{"prompted": ..., "semantic": ..., "headline": name, "miou", "mdice"}`` for the parts the
    recipe's task has (``data``: a ``DataBundle``); ``predictions``: folder for semantic label maps;
    ``instance_predictions``: folder for the instance benchmark's files (``prompted/``, ``automatic/``)."""

    def folder(part: str) -> Path | None:
        return None if instance_predictions is None else Path(instance_predictions) / part
    out = {}
    if data.val is not None:
        out["prompted"] = evaluate(model, family, data.val, recipe, device, desc, folder("prompted"))
    if data.val_semantic is not None:
        semantic = evaluate_semantic(
            model, family, data.val_semantic, recipe.automatic.threshold, device, recipe.eval.batch_size,
            f"{desc} (automatic)", predictions, folder("automatic"),
        )  # fmt: skip
        semantic["protocol"] = semantic_protocol(recipe)
        out["semantic"] = semantic
    source = data.val.source if data.val is not None else data.val_semantic.source if data.val_semantic is not None else None
    if recipe.eval.volume_mode == "propagate" and source is not None and source.volumetric:
        names = data.val.class_names if data.val is not None else dict(zip(data.space.ids, data.space.names))
        out["propagated"] = evaluate_propagation(model, family, source, names, recipe, device, f"{desc} (propagate)")
    if recipe.eval.volume_mode == "interactive" and source is not None and source.volumetric:
        names = data.val.class_names if data.val is not None else dict(zip(data.space.ids, data.space.names))
        out["interactive"] = evaluate_interactive(model, family, source, names, recipe, device, f"{desc} (interactive)",
                                                  data.space.ids if data.space is not None else None)
    out["headline"] = "semantic" if "semantic" in out else "prompted"
    out["miou"] = out[out["headline"]]["miou"]
    out["mdice"] = out[out["headline"]]["mdice"]
    return out


@torch.no_grad()
def evaluate_semantic(
    model, family: ModelFamily, dataset: SemanticDataset, threshold: float, device: torch.device, batch_size: int,
    desc: str = "eval (automatic)", predictions: Path | None = None, instance_folder: Path | None = None,
) -> dict:
    """Label maps of every image of ``dataset`` against its labels; ``predictions``: a folder to
    write each 2D label map into (file ids, e.g. Cityscapes labelIds, named by the source).
    Cityscapes with instanceIds: also instance AP of the automatic instances, each connected
    component of a thing class (``instance_folder``: their files for the official evaluator)."""
    was_training = model.training
    model.eval()
    space: LabelSpace = dataset.space
    source = dataset.source
    class_names = dict(zip(space.ids, space.names))
    confusion = ConfusionAccumulator(class_names, source.ignore_index)
    volumes = SemanticVolumeAccumulator(source, class_names) if source.volumetric else None
    by_group = {g: ConfusionAccumulator(class_names, source.ignore_index) for g in source_groups(source)}
    loader = DataLoader(Subset(dataset, shard(len(dataset), batch_size)), batch_size=batch_size, shuffle=False, collate_fn=collate_semantic)
    instances = AutomaticInstances(source, space, instance_folder) if not source.volumetric and has_instance_benchmark(source) else None
    for batch in tqdm(loader, desc=desc, leave=False, unit="batch", disable=None):  # None: no bar when not a terminal
        metas = batch[SEM.META]
        images = batch[SEM.IMAGE].to(device)
        if instances is None:
            maps = [(m, None) for m in predict_index_maps(model, family, images, metas, threshold)]
        else:
            maps = predict_scored_maps(model, family, images, metas, threshold)
        for meta, (index_map, scores) in zip(metas, maps):
            if instances is not None:
                instances.add(meta["index"], index_map, scores)
            pred = space.to_source_ids(index_map)
            confusion.add(pred, meta["label"])
            if by_group:
                by_group[source.group(meta["index"])].add(pred, meta["label"])
            if volumes is not None:
                volumes.add_label(meta["index"], pred.astype(np.uint8))
            elif predictions is not None:
                write_label_png(space.to_file_ids(index_map), predictions / source.prediction_name(meta["index"]))
    model.train(was_training)
    merge_across_ranks(confusion, *([volumes] if volumes is not None else []), *by_group.values())
    metrics = confusion.result()
    metrics.pop("confusion", None)
    if by_group:
        metrics[f"by_{source.group_name}"] = {g: _summary(acc.result()) for g, acc in by_group.items()}
    if instances is not None:
        metrics["instances"] = instances.result()
    if volumes is not None:
        metrics["volume"] = volumes.result()
        metrics["label_volumes"] = volumes.volumes  # not JSON: the caller writes or drops them
    return metrics

