"""SAM 3 through the CLI: ``sam3-tiny-random`` trains two steps of ``task: both`` with class prompts
read from the class names (``automatic.init: text``), and its adapter folder round-trips through
``evaluate`` and ``predict``, memory propagation (``Sam3TrackerVideoModel``) included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from samtune.finetune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sam3_run(phantom_template, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("sam3_run")
    shutil.copytree(phantom_template, tmp / "data")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "seed": 0, "task": "both",
        "data": {"kind": "nifti", "root": str(tmp / "data"), "val_fraction": 0.34},
        "model": {"name": "sam3-tiny-random", "image_size": 56},
        "automatic": {"ratio": 0.5, "tokens": 2, "init": "text"},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "eval_every": 2, "log_every": 1},
        "eval": {"batch_size": 8, "max_samples": 8},
        "output": {"dir": str(tmp / "run")},
    }))  # fmt: skip
    assert main(["-q", "train", str(recipe)]) == 0
    return recipe, tmp / "run"


def test_sam3_tiny_trains_both_tasks_and_its_adapter_evaluates_and_predicts(sam3_run, tmp_path):
    recipe, run = sam3_run
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["task"] == "both"
    best = run / "checkpoints" / "last"
    assert (best / "adapter_model.safetensors").is_file() and (best / "classes.json").is_file()

    evaluated = tmp_path / "eval.json"
    assert main(["-q", "evaluate", str(recipe), "--checkpoint", str(best), "--out", str(evaluated)]) == 0
    assert json.loads(evaluated.read_text())["semantic"]["miou"] == metrics["semantic"]["miou"]

    scans = tmp_path / "scans"
    scans.mkdir()
    source = sorted((run.parent / "data" / "imagesTr").glob("*.nii.gz"))[0]
    nib.save(nib.load(source).slicer[:, :, 4:6], str(scans / "case.nii.gz"))
    out = tmp_path / "predicted"
    assert main(["-q", "predict", "--checkpoint", str(best), "--input", str(scans), "--out", str(out)]) == 0
    label = nib.load(out / "case.nii.gz")
    assert label.shape == nib.load(scans / "case.nii.gz").shape
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, *json.loads((best / "classes.json").read_text())["label_space"]["ids"]}


def test_evaluate_and_predict_propagate_one_slice_prompt_with_memory(sam3_run, tmp_path):
    recipe, run = sam3_run
    best = run / "checkpoints" / "last"
    out = tmp_path / "eval.json"
    assert main(["-q", "evaluate", str(recipe), "--checkpoint", str(best), "--out", str(out),
                 "eval.volume_mode=propagate", "eval.propagation=memory"]) == 0  # fmt: skip
    assert json.loads(out.read_text())["propagated"]["propagation"] == "memory"
    scan = sorted((run.parent / "data" / "imagesTr").glob("*.nii.gz"))[0]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"coordinates": "voxel", "prompts": [{"class": "liver", "box": [[8, 8, 6], [30, 30, 6]]}]}))
    assert main(["-q", "predict", "--checkpoint", str(best), "--input", str(scan), "--out", str(tmp_path / "prompted"),
                 "--prompts", str(prompts), "eval.propagation=memory"]) == 0  # fmt: skip
    name = scan.name.replace("_0000.nii.gz", "")
    assert nib.load(tmp_path / "prompted" / f"{name}.nii.gz").shape == nib.load(scan).shape
