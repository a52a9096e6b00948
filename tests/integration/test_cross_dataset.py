"""Cross-dataset evaluation in the Cityscapes class space: a checkpoint trained on Cityscapes
evaluated on ACDC night, the dataset, condition and class space named in the protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from samtune.finetune.cli import main

REPO = Path(__file__).resolve().parents[2]
TINY = ["model.name=tiny", "model.checkpoint=null", "model.image_size=64", "train.device=cpu", "train.precision=fp32",
        "train.num_workers=0", "train.batch_size=2", "eval.max_samples=4", "eval.batch_size=4", "data.min_pixels=10"]  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("task", ["promptable", "automatic"])
def test_cityscapes_checkpoint_evaluated_on_acdc_night(task, cs_root, acdc_root, tmp_path, capsys):
    run = tmp_path / "cs_run"
    train = [*TINY, f"task={task}", f"data.root={cs_root}", "train.steps=1", "train.eval_every=1", f"output.dir={run}"]
    assert main(["-q", "train", str(REPO / "recipes" / "driving" / "cityscapes_demo.yaml"), *train]) == 0
    out = tmp_path / "acdc_night" / "metrics.json"
    evaluate = [*TINY, f"task={task}", f"data.root={acdc_root}", "data.val_conditions=[night]", f"output.dir={tmp_path / 'acdc'}"]
    assert main(["-q", "evaluate", str(REPO / "recipes" / "driving" / "acdc_demo.yaml"), "--checkpoint",
                 str(run / "checkpoints" / "last"), "--out", str(out), *evaluate]) == 0  # fmt: skip
    metrics = json.loads(out.read_text())
    part = metrics["prompted" if task == "promptable" else "semantic"]
    assert part["protocol"]["data"] == {"kind": "acdc", "root": str(acdc_root), "split": "val", "conditions": ["night"],
                                        "class_space": "Cityscapes 19 trainIds (labelIds mapped by the official table), 255 ignored"}  # fmt: skip


@pytest.mark.parametrize("task", ["promptable", "automatic"])
def test_one_evaluation_scores_each_acdc_condition_as_its_own_evaluation_does(task, acdc_root, tmp_path, capsys):
    """by_condition of an evaluation over every condition = the scores of one evaluation per condition
    (tight boxes, every object: the same prompts either way)."""
    run = tmp_path / "run"
    common = [*TINY, "eval.max_samples=null", f"task={task}", f"data.root={acdc_root}", f"output.dir={run}"]
    assert main(["-q", "train", str(REPO / "recipes" / "driving" / "acdc_demo.yaml"), *common, "train.steps=1", "train.eval_every=1"]) == 0
    part = "prompted" if task == "promptable" else "semantic"

    def evaluate(name: str, *extra: str) -> dict:
        out = tmp_path / name / "metrics.json"
        assert main(["-q", "evaluate", str(REPO / "recipes" / "driving" / "acdc_demo.yaml"), "--checkpoint",
                     str(run / "checkpoints" / "last"), "--out", str(out), *common, *extra]) == 0  # fmt: skip
        return json.loads(out.read_text())[part]

    together = evaluate("all")
    assert sorted(together["by_condition"]) == ["fog", "night", "rain", "snow"]
    assert "per condition" in capsys.readouterr().out
    for condition, scores in together["by_condition"].items():
        alone = evaluate(condition, f"data.val_conditions=[{condition}]")
        assert "by_condition" not in alone
        assert scores["miou"] == pytest.approx(alone["miou"], abs=1e-12, nan_ok=True), condition
        for name, c in alone["per_class"].items():
            assert scores["per_class"][name]["iou"] == pytest.approx(c["iou"], abs=1e-12, nan_ok=True), (condition, name)
