"""The model card written as ``README.md`` into every checkpoint folder (replacing peft's empty
template): what the model is for and not for, the input protocol it expects, the data it was
trained on, the base model and the licence of its weights, the validation scores with their
protocol, and what the run's guardrails noticed. A team that receives only the checkpoint folder
learns from it how the model was made and how far to trust it.

The card is text for people; the machine-readable facts stay in ``recipe.yaml``,
``classes.json`` and ``trainer_state.json`` beside it.
"""

from __future__ import annotations

import math

from samtune import __version__
from samtune.finetune.recipe import Recipe

INTENDED_USE = (
    "Research use only. Not a medical device: not cleared or approved for diagnosis or treatment, "
    "and not validated beyond the validation split summarised below. Every output needs review by a "
    "qualified person."
)


def _score(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _input_protocol(recipe: Recipe, image_size: int) -> list[str]:
    data = recipe.data
    lines = [f"- data format: `{data.kind}`; model input {image_size} px (longest side), slices/images as 3-channel images"]
    setting = data.intensity_setting()
    if setting is not None:
        lines.append(f"- intensities to 0-255: {setting if isinstance(setting, str) else f'window [{setting[0]:g}, {setting[1]:g}] (HU for CT)'}")
    spacing = getattr(data, "spacing_mm", None)
    if spacing is not None:
        lines.append(f"- slices resampled in-plane to {spacing[0]:g} × {spacing[1]:g} mm")
    if getattr(data, "context_slices", 0):
        lines.append(f"- 2.5D: slices z-{data.context_slices}, z, z+{data.context_slices} as the three channels")
    return lines


def _data_summary(data) -> list[str]:
    lines = []
    for side, source in (("training", data.split.train), ("validation", data.split.val)):
        cases = getattr(source, "cases", None)
        unit = f"{len(cases)} cases, {len(source)} slices" if cases is not None else f"{len(source)} images"
        lines.append(f"- {side}: {unit}")
    lines.append(f"- classes: {', '.join(data.space.names)}")
    if data.skipped:
        lines.append(f"- {len(data.skipped)} cases were left out as unusable (`samtune inspect` lists them)")
    return lines


def _scores(metrics: dict) -> list[str]:
    lines = []
    for part in ("prompted", "semantic"):
        if part not in metrics:
            continue
        m = metrics[part]
        protocol = m.get("protocol", {})
        how = protocol.get("first_prompt", protocol.get("prompts", ""))
        lines += ["", f"**{part}** ({how}; {protocol.get('resolution', '')}):", "", "| class | IoU | Dice |", "|---|---|---|"]
        lines += [f"| {name} | {_score(c.get('iou'))} | {_score(c.get('dice'))} |" for name, c in m["per_class"].items()]
        lines.append(f"| **mean** | **{_score(m['miou'])}** | **{_score(m['mdice'])}** |")
        rule = protocol.get("empty_mask_rule")
        if rule:
            lines += ["", f"Empty-mask rule: {rule}."]
    return lines


def render_model_card(recipe: Recipe, variant, data, step: int, metrics: dict, baseline: dict, guardrails: dict) -> str:
    """The card of the checkpoint saved at ``step`` with these validation ``metrics``.
    ``variant``: the base model's ``ModelVariant``; ``guardrails``: ``below_baseline_at`` (steps)
    and ``stopped_early`` as the run recorded them."""
    from samtune.finetune.runtime import image_size_of

    weights = recipe.model.checkpoint or variant.hub_id or "random initialisation"
    licence = variant.licence or "not recorded by samtune: check the terms where the weights came from"
    lines = [
        f"# samtune checkpoint: {recipe.task} segmentation of {', '.join(data.space.names)}",
        "",
        "## Intended use", "", INTENDED_USE, "",
        "## Model", "",
        f"- base model: `{recipe.model.name}` ({variant.description}); weights: `{weights}`",
        f"- licence of the base weights: {licence}",
        f"- fine-tuned with samtune {__version__}: `train.mode: {recipe.train.mode}`, {step} of {recipe.train.steps} steps; task `{recipe.task}`",
        "- files: `recipe.yaml` (the full recipe), `classes.json` (classes and their codes), `trainer_state.json`",
        "", "## Input protocol", "", *_input_protocol(recipe, image_size_of(recipe)),
        "", "## Training data", "", *_data_summary(data),
        "", f"## Validation at step {step}", *_scores(metrics),
        "", f"Before fine-tuning: {baseline.get('headline', '')} mIoU {_score(baseline.get('miou'))}; this checkpoint: {_score(metrics.get('miou'))}.",
        "", "## Known limits", "",
    ]  # fmt: skip
    below, stopped = guardrails.get("below_baseline_at") or [], guardrails.get("stopped_early")
    if below:
        lines.append(f"- the validation score fell below the model before fine-tuning at steps {', '.join(map(str, below))}")
    if stopped:
        lines.append(f"- training stopped early at step {stopped['step']} (no better score for {stopped['patience']} evaluations)")
    lines.append("- scores come from the validation split above only; other scanners, protocols and populations were not tested")
    return "\n".join(lines) + "\n"
