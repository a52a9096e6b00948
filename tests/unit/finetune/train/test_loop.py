"""The training loop end to end on the tiny phantom: accumulation, clipping, below-baseline and
early stopping as a user sees them in metrics.json and the log."""

from __future__ import annotations

import pytest
import torch

from samtune import SamtuneError
from samtune.adapters.family import get_family
from samtune.adapters.lora import prepare_trainable
from samtune.adapters.registry import build_model
from samtune.finetune.recipe import validate_recipe


def _run(phantom, tmp_path, name: str, **train) -> dict:
    import json

    from samtune.finetune.train.loop import train as run_training

    recipe = validate_recipe({
        "data": {"kind": "nifti", "root": str(phantom), "val_fraction": 0.34}, "model": {"name": "tiny", "image_size": 64},
        "train": {"steps": 3, "batch_size": 4, "eval_every": 3, "lr": 1e-3, **train}, "prompts": {"box_jitter_px": 2},
        "eval": {"max_samples": 8}, "output": {"dir": str(tmp_path / name)},
    })  # fmt: skip
    run_training(recipe)
    return json.loads((tmp_path / name / "metrics.json").read_text())


def _adapter(tmp_path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(tmp_path / name / "checkpoints" / "last" / "adapter_model.safetensors"))


def test_accumulating_two_half_batches_equals_one_full_batch(phantom, tmp_path):
    """The same samples in the same order: batch 4 vs 2 × 2 accumulated give the same weights."""
    _run(phantom, tmp_path, "full", batch_size=4)
    _run(phantom, tmp_path, "halves", batch_size=2, accumulate=2)
    full, halves = _adapter(tmp_path, "full"), _adapter(tmp_path, "halves")
    assert full.keys() == halves.keys()
    for key in full:
        torch.testing.assert_close(halves[key], full[key], atol=2e-5, rtol=1e-4)
    _run(phantom, tmp_path, "quarter", batch_size=1, accumulate=1)  # and it is not trivially equal
    assert any(not torch.allclose(_adapter(tmp_path, "quarter")[k], full[k], atol=2e-5) for k in full)


def test_clipping_the_gradient_norm_bounds_the_update(phantom, tmp_path):
    _run(phantom, tmp_path, "free")
    _run(phantom, tmp_path, "clipped", clip_grad_norm=1e-12)  # Adam divides by sqrt(v) + 1e-8: tiny steps
    lora_b = [k for k in _adapter(tmp_path, "free") if "lora_B" in k]
    free = max(_adapter(tmp_path, "free")[k].abs().max().item() for k in lora_b)
    clipped = max(_adapter(tmp_path, "clipped")[k].abs().max().item() for k in lora_b)
    assert free > 1e-3 and clipped < 1e-5, (free, clipped)


def test_below_baseline_is_reported_and_early_stopping_stops(phantom, tmp_path, monkeypatch, caplog):
    import samtune.finetune.train.loop as T

    scores = iter([0.5, 0.6, 0.4, 0.45, 0.45, 0.9])  # baseline, then one per evaluation

    def fake_eval(model, family, data, recipe, device, desc="eval", predictions=None):
        value = next(scores)
        part = {"per_class": {}, "miou": value, "mdice": value}
        return {"prompted": part, "headline": "prompted", "miou": value, "mdice": value}

    monkeypatch.setattr(T, "evaluate_with_recipe", fake_eval)
    monkeypatch.setattr(T, "print_results", lambda *a, **k: None)
    with caplog.at_level("INFO", logger="samtune.finetune.train"):
        metrics = _run(phantom, tmp_path, "run", steps=10, eval_every=1, early_stop_patience=2, log_every=1)
    assert metrics["below_baseline_at"] == [2, 3]  # 0.4 and 0.45 < 0.5
    assert [h.get("below_baseline", False) for h in metrics["history"]] == [False, True, True]
    assert metrics["stopped_early"] == {"step": 3, "patience": 2, "best_step": 1} and metrics["step"] == 3
    assert metrics["best"]["step"] == 1
    assert "BELOW the model before fine-tuning" in caplog.text
    assert "step 1/10  loss" in caplog.text and "ETA" in caplog.text  # not a terminal: progress as log lines


def test_non_finite_weights_are_never_saved():
    from samtune.finetune.train.step import check_finite_weights

    recipe = validate_recipe({"data": {"kind": "nifti", "root": "-"}})
    model = prepare_trainable(build_model("tiny", image_size=64), get_family("sam"), "lora", recipe.adapter.lora)
    check_finite_weights(model, 3, "the last good state is X")
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n)[0, 0] = float("nan")
    with pytest.raises(SamtuneError, match=r"non-finite at step 5 .*lora_A.*the last good state is X"):
        check_finite_weights(model, 5, "the last good state is X")
