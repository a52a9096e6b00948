"""Every shipped recipe trains: one step and its evaluations, with the recipe's own settings (task,
mode, LoRA preset, prompts and rounds, loss, schedule, attention, cache, augmentation) and only
what needs weights, data or a GPU swapped: the model for ``tiny`` at 64 px (SAM 3 recipes:
``sam3-tiny-random`` at 56 px), the data for the
generated phantom (NIfTI or DICOM) / Cityscapes-, BDD100K-, ACDC- or Vistas-style tree or COCO tree, fp32 on the CPU.
A few recipes run a second time with an option that changes the class space or the objects (``VARIANTS``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from samtune.datasets.cityscapes import CLASS_NAMES
from samtune.datasets.mapillary import MAPPED_CLASS_SPACE
from samtune.finetune.cli import main

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
# shipped recipes run once more with these overrides: options that change the class space
VARIANTS = {"driving/mapillary_demo.yaml": ["data.version=v1.2", "data.cityscapes_classes=true"],
            "driving/cityscapes_demo.yaml": ["task=both", "prompts.per=instance", "eval.max_samples=null"]}
CASES = [pytest.param(p, [], id=str(p.relative_to(REPO / "recipes"))) for p in RECIPES] + [
    pytest.param(REPO / "recipes" / name, extra, id=f"{name}+{'+'.join(extra)}") for name, extra in VARIANTS.items()
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("path, extra", CASES)
def test_a_shipped_recipe_runs_one_step(path, extra, request, tmp_path):
    raw = yaml.safe_load(path.read_text())
    root = request.getfixturevalue({"nifti": "phantom", "cityscapes": "cs_root", "bdd100k": "bdd_root", "acdc": "acdc_root", "mapillary": "mapillary_root", "coco": "coco_root", "dicom": "dicom_root"}[raw["data"]["kind"]])
    # the family's random tiny variant: a SAM 3 recipe keeps its text encoder (automatic.init: text)
    tiny, size = ("sam3-tiny-random", 56) if raw["model"]["name"].startswith("sam3") else ("tiny", 64)
    overrides = [
        f"model.name={tiny}", "model.checkpoint=null", f"model.image_size={size}",
        f"data.root={root}", "data.classes=null", "data.min_pixels=10",
        "train.steps=1", "train.eval_every=1", "train.batch_size=2", "train.num_workers=0", "train.device=cpu",
        "train.precision=fp32", "eval.max_samples=4", "eval.batch_size=4", f"output.dir={tmp_path / 'run'}",
    ]  # fmt: skip
    if raw["data"]["kind"] in ("nifti", "dicom"):  # 3 phantom cases (patients): one for validation
        overrides += ["data.generate_demo=false", "data.val_fraction=0.34", "data.split_file=null"]
    assert main(["-q", "train", str(path), *overrides, *extra]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    if "data.cityscapes_classes=true" in extra:  # Vistas scored in the Cityscapes class space, and the protocol says so
        assert metrics["prompted"]["protocol"]["data"]["class_space"] == MAPPED_CLASS_SPACE
        assert metrics["prompted"]["per_class"] and set(metrics["prompted"]["per_class"]) <= set(CLASS_NAMES.values())
    if "prompts.per=instance" in extra:  # every instance prompted: the instance benchmark scores both modes
        assert {"prompted", "semantic"} <= set(metrics) and all("instances" in metrics[p] for p in ("prompted", "semantic"))
        assert "car" in metrics["semantic"]["instances"]["per_class"]  # (128×64 scenes: no car reaches the 100 px that count)
        raw["task"] = "both"
    assert metrics["step"] == 1 and metrics["task"] == raw.get("task", "promptable")
    expected = {"promptable": {"prompted"}, "automatic": {"semantic"}, "both": {"prompted", "semantic"}}[metrics["task"]]
    assert expected <= set(metrics) and all(p not in metrics for p in {"prompted", "semantic"} - expected)
    assert (tmp_path / "run" / "checkpoints" / "last" / "recipe.yaml").is_file()
