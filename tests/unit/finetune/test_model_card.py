"""The model card of a checkpoint: intended use, input protocol, data, base weights and their
licence, the scores with their protocol, what the guardrails saw."""

from __future__ import annotations

from types import SimpleNamespace

from samtune.adapters.registry import get_variant
from samtune.finetune.model_card import render_model_card
from samtune.finetune.recipe import validate_recipe


class _Source:
    def __init__(self, cases: int, slices: int):
        self.cases, self.slices = list(range(cases)), slices

    def __len__(self) -> int:
        return self.slices


def _data():
    split = SimpleNamespace(train=_Source(6, 120), val=_Source(2, 40))
    return SimpleNamespace(split=split, space=SimpleNamespace(names=["liver", "spleen"]), skipped=[{"case": "c7"}])


def test_the_card_names_use_protocol_data_licence_scores_and_limits():
    recipe = validate_recipe({"task": "both", "data": {"kind": "nifti", "root": "-", "window_hu": [-125, 275]},
                              "model": {"name": "sam-vit-base", "checkpoint": "/w/sam_vit_b_01ec64.pth"}})  # fmt: skip
    protocol = {"first_prompt": "box", "resolution": "original image resolution", "empty_mask_rule": "absent -> NaN"}
    metrics = {"headline": "semantic", "miou": 0.7, "mdice": 0.8,
               "prompted": {"per_class": {"liver": {"iou": 0.9, "dice": 0.95}, "spleen": {"iou": float("nan"), "dice": float("nan")}},
                            "miou": 0.9, "mdice": 0.95, "protocol": protocol}}  # fmt: skip
    card = render_model_card(recipe, get_variant("sam-vit-base"), _data(), 400, metrics, {"headline": "semantic", "miou": 0.1},
                             {"below_baseline_at": [200], "stopped_early": {"step": 400, "patience": 2, "best_step": 300}})  # fmt: skip
    assert card.startswith("# samtune checkpoint: both segmentation of liver, spleen")
    assert "Research use only" in card and "Not a medical device" in card
    assert "weights: `/w/sam_vit_b_01ec64.pth`" in card and "Apache-2.0 (LICENSE of facebookresearch/segment-anything" in card
    assert "window [-125, 275] (HU for CT)" in card and "model input 1024 px" in card
    assert "- training: 6 cases, 120 slices" in card and "- validation: 2 cases, 40 slices" in card and "1 cases were left out" in card
    assert "| liver | 0.900 | 0.950 |" in card and "| spleen | n/a | n/a |" in card and "Empty-mask rule: absent -> NaN." in card
    assert "below the model before fine-tuning at steps 200" in card and "stopped early at step 400" in card


def test_a_variant_without_a_recorded_licence_says_so():
    recipe = validate_recipe({"data": {"kind": "nifti", "root": "-"}, "model": {"name": "medsam2"}})
    card = render_model_card(recipe, get_variant("medsam2"), _data(), 10, {"miou": 0.5}, {"miou": 0.4}, {})
    assert "not recorded by samtune: check the terms where the weights came from" in card
