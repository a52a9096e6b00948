"""What a run shows while it trains: rank 0's TrainLog writes TensorBoard scalars and, without a
terminal, a progress line every train.log_every steps; other ranks' SilentLog has the same methods and writes nothing."""

from __future__ import annotations

import torch

from samtune.finetune.recipe import validate_recipe
from samtune.finetune.train.log import SilentLog, TrainLog, progress_line
from samtune.finetune.train.state import Decision, LoopState
from samtune.finetune.train.step import StepResult


def _optimizer():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"name": "lora", "params": [param], "lr": 1e-3}])
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


def test_progress_line_names_step_loss_path_rate_and_eta():
    assert progress_line(5, 10, 0.25, "automatic", 1e-3, 2.5) == "step 5/10  loss 0.2500 (automatic)  lr 1.00e-03  2.00 steps/s  ETA 0m02s"


def test_rank_zero_logs_lines_and_tensorboard(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = validate_recipe({"data": {"kind": "nifti", "root": "-"}, "train": {"steps": 4, "log_every": 2, "eval_every": 4}})
    log = TrainLog(tmp_path, recipe, torch.device("cpu"))
    log.interactive = False  # as in a log file
    optimizer, scheduler = _optimizer()
    metrics = {"headline": "prompted", "miou": 0.4, "mdice": 0.5, "prompted": {"miou": 0.4, "mdice": 0.5, "per_class": {"liver": {"iou": 0.4}}}}
    state = LoopState.from_baseline(dict(metrics, miou=0.6))
    with caplog.at_level("INFO", logger="samtune.finetune.train"):
        log.start(1, 4, resumed=False)
        for step in range(1, 5):
            log.step(step, "prompted", StepResult(loss=1.0 / step, grad_norm=0.5, masks=8), optimizer, scheduler)
        log.evaluation(4, metrics, state, Decision(best=True, below_baseline=True, stop=False))
        log.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split("  ")[0] for line in lines if line.startswith("step ") and "loss" in line] == ["step 1/4", "step 2/4", "step 4/4"]
    assert any("BELOW the model before fine-tuning (0.6000)" in line for line in lines)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss_prompted")] == [1, 2, 4]
    assert {"train/lr_lora", "train/grad_norm", "train/masks_per_s", "train/peak_memory_gb", "val_prompted/miou",
            "val_prompted_iou/liver"} <= set(events.Tags()["scalars"])  # fmt: skip


def test_the_silent_log_answers_everything_the_loop_calls():
    """Other ranks get a SilentLog: every method the loop calls on rank 0's log exists there too."""
    public = {n for n in vars(TrainLog) if not n.startswith("_") and callable(getattr(TrainLog, n))}
    assert public == {"start", "step", "pictures", "evaluation", "close"}
    assert all(getattr(SilentLog, n) is not getattr(TrainLog, n) for n in public)  # overridden with writing, not inherited
