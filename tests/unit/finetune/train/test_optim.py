"""finetune/train/optim.py: learning rates per kind of trained weight, and the schedules."""

from __future__ import annotations

import pytest

from samtune.adapters.family import get_family
from samtune.adapters.lora import prepare_trainable
from samtune.adapters.registry import build_model
from samtune.finetune.train.optim import build_optimizer, build_scheduler
from samtune.finetune.recipe import validate_recipe


def _model_and_train(**train):
    recipe = validate_recipe({"data": {"kind": "nifti", "root": "-"}, "train": train})
    family = get_family("sam")
    base = build_model("tiny", image_size=64)
    family.add_class_prompts(base, 3, 2)
    return prepare_trainable(base, family, "lora", recipe.adapter.lora), recipe.train


def test_each_kind_of_weight_gets_its_learning_rate():
    model, train = _model_and_train(lr=1e-3, lr_decoder=2e-4, lr_class_prompts=5e-3)
    groups = {g["name"]: g for g in build_optimizer(model, train).param_groups}
    assert {k: g["lr"] for k, g in groups.items()} == {"lora": 1e-3, "modules": 2e-4, "class_prompts": 5e-3}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == trainable
    default = {g["name"]: g["lr"] for g in build_optimizer(*_model_and_train(lr=1e-3)).param_groups}
    assert default == {"lora": 1e-3, "modules": 1e-3, "class_prompts": 1e-3}


@pytest.mark.parametrize("schedule", ["cosine", "poly", "constant"])
def test_schedules_warm_up_then_decay(schedule):
    model, train = _model_and_train(lr=1e-3, lr_decoder=1e-4, steps=100, warmup_steps=10, schedule=schedule)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train)
    lrs = []
    for _ in range(100):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr())
    assert lrs[8][0] == pytest.approx(1e-3 * 9 / 10)  # linear warm-up
    assert lrs[8][1] == pytest.approx(1e-4 * 9 / 10)  # every group scaled alike
    if schedule == "constant":
        assert lrs[-1][0] == pytest.approx(1e-3)
    else:
        assert lrs[-1][0] == pytest.approx(0.0, abs=1e-12)
    if schedule == "poly":  # SAMed: lr (1 - t)^0.9 after warm-up
        assert lrs[54][0] == pytest.approx(1e-3 * (1 - 45 / 90) ** 0.9)
