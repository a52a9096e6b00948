"""SAM 3 through the CLI: ``sam3-tiny-random`` trains two steps of ``task: both`` with class prompts
read from the class names (``automatic.init: text``), and its adapter folder round-trips through
``evaluate`` and ``predict``."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import yaml

from samtune.finetune.cli import main


def test_sam3_tiny_trains_both_tasks_and_its_adapter_evaluates_and_predicts(phantom, tmp_path):
    run = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "seed": 0, "task": "both",
        "data": {"kind": "nifti", "root": str(phantom), "val_fraction": 0.34},
        "model": {"name": "sam3-tiny-random", "image_size": 56},
        "automatic": {"ratio": 0.5, "tokens": 2, "init": "text"},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "eval_every": 2, "log_every": 1},
        "eval": {"batch_size": 8, "max_samples": 8},
        "output": {"dir": str(run)},
    }))  # fmt: skip
    assert main(["-q", "train", str(recipe)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["task"] == "both"
    best = run / "checkpoints" / "last"
    assert (best / "adapter_model.safetensors").is_file() and (best / "classes.json").is_file()

    evaluated = tmp_path / "eval.json"
    assert main(["-q", "evaluate", str(recipe), "--checkpoint", str(best), "--out", str(evaluated)]) == 0
    assert json.loads(evaluated.read_text())["semantic"]["miou"] == metrics["semantic"]["miou"]

    scans = tmp_path / "scans"
    scans.mkdir()
    source = sorted((phantom / "imagesTr").glob("*.nii.gz"))[0]
    nib.save(nib.load(source).slicer[:, :, 4:6], str(scans / "case.nii.gz"))
    out = tmp_path / "predicted"
    assert main(["-q", "predict", "--checkpoint", str(best), "--input", str(scans), "--out", str(out)]) == 0
    label = nib.load(out / "case.nii.gz")
    assert label.shape == nib.load(scans / "case.nii.gz").shape
    assert set(np.unique(np.asarray(label.dataobj))) <= {0, *json.loads((best / "classes.json").read_text())["label_space"]["ids"]}
