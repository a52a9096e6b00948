"""`samtune train`, `evaluate` and `predict` with an EdgeTAM model (``edgetam-tiny-random``): two
steps of ``task: both`` on the CT phantom, then the adapter folder read back by the other commands,
memory propagation (EdgeTAM's video model) included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import pytest
import yaml

from samtune.finetune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def edgetam_run(phantom_template, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("edgetam_run")
    shutil.copytree(phantom_template, tmp / "data")
    recipe = {
        "seed": 0, "task": "both", "data": {"kind": "nifti", "root": str(tmp / "data"), "val_fraction": 0.34},
        "model": {"name": "edgetam-tiny-random", "image_size": 64}, "adapter": {"lora": {"preset": "encoder_all_linear"}},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "eval_every": 2, "log_every": 2, "image_every": 0},
        "eval": {"batch_size": 8, "max_samples": 12}, "output": {"dir": str(tmp / "run")},
    }  # fmt: skip
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["-q", "train", str(tmp / "recipe.yaml")]) == 0
    return tmp / "recipe.yaml", tmp / "run"


def test_two_steps_write_an_adapter_with_lora_on_repvit_convolutions(edgetam_run):
    _, run = edgetam_run
    folder = run / "checkpoints" / "last"
    assert {"adapter_config.json", "adapter_model.safetensors", "classes.json", "recipe.yaml"} <= {p.name for p in folder.iterdir()}
    targets = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    assert "se" in targets and "channel_mixer" in targets
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 2 and {"prompted", "semantic"} <= set(metrics)
    assert metrics["parameters"]["encoder_lora"] > 0 and metrics["parameters"]["class_prompts"] > 0


def test_evaluate_reads_the_adapter_back_and_propagates_with_memory(edgetam_run, tmp_path):
    recipe, run = edgetam_run
    out = tmp_path / "eval.json"
    assert main(["-q", "evaluate", str(recipe), "--checkpoint", str(run / "checkpoints" / "last"), "--out", str(out)]) == 0
    trained, evaluated = json.loads((run / "metrics.json").read_text()), json.loads(out.read_text())
    assert evaluated["miou"] == pytest.approx(trained["miou"], abs=1e-9)
    assert main(["-q", "evaluate", str(recipe), "--checkpoint", str(run / "checkpoints" / "last"), "--out", str(out),
                 "eval.volume_mode=propagate", "eval.propagation=memory"]) == 0  # fmt: skip
    assert json.loads(out.read_text())["propagated"]["propagation"] == "memory"


def test_predict_writes_labels_automatically_and_from_a_propagated_box(edgetam_run, tmp_path, capsys):
    _, run = edgetam_run
    scan = sorted((run.parent / "data" / "imagesTr").glob("*.nii.gz"))[0]
    out = tmp_path / "out"
    assert main(["-q", "predict", "--checkpoint", str(run), "--input", str(scan), "--out", str(out)]) == 0
    name = scan.name.replace("_0000.nii.gz", "")
    assert nib.load(out / f"{name}.nii.gz").shape == nib.load(scan).shape
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"coordinates": "voxel", "prompts": [{"class": "liver", "box": [[8, 8, 6], [30, 30, 6]]}]}))
    assert main(["-q", "predict", "--checkpoint", str(run), "--input", str(scan), "--out", str(tmp_path / "prompted"), "--prompts", str(prompts)]) == 0
    assert nib.load(tmp_path / "prompted" / f"{name}.nii.gz").shape == nib.load(scan).shape
