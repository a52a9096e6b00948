"""torchrun DDP on the CPU (gloo): two processes score the validation split like one process,
write the run's files once, and a run resumed from a state of a 2-process run ends with the same
adapter bytes as the uninterrupted 2-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from samtune.finetune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe(path: Path, phantom: Path, out: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "seed": 0, "task": "both",
        "data": {"kind": "nifti", "root": str(phantom), "val_fraction": 0.34, "empty_slice_ratio": 0.3},
        "model": {"name": "tiny", "image_size": 64},
        "train": {"steps": 4, "batch_size": 2, "eval_every": 2, "save_every": 2, "keep_states": 3, "lr": 1e-3, "device": "cpu"},
        # small evaluation batches: each rank scores several, and the validation case is split between ranks
        "prompts": {"box_jitter_px": 2, "corrective_rounds": 1}, "eval": {"max_samples": 12, "batch_size": 3},
        "output": {"dir": str(out)},
    }))  # fmt: skip
    return path


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "samtune", "-q", "train", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def two_process_run(phantom_template, tmp_path_factory) -> tuple[Path, Path]:
    """A finished 2-process run of the recipe (its states kept) and the recipe."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp / phantom_template.name  # a private copy: the run writes its slice cache into the dataset
    shutil.copytree(phantom_template, data)
    run = tmp / "ddp"
    recipe = _recipe(tmp / "r.yaml", data, run)
    _torchrun(str(recipe))
    return run, recipe


def test_two_processes_score_like_one_and_write_once(two_process_run, phantom, tmp_path):
    run, _ = two_process_run
    single = tmp_path / "single"
    assert main(["-q", "train", str(_recipe(tmp_path / "s.yaml", phantom, single)), "train.steps=1"]) == 0
    ddp, one = json.loads((run / "metrics.json").read_text()), json.loads((single / "metrics.json").read_text())
    assert ddp["processes"] == 2 and one["processes"] == 1
    # the model before fine-tuning, scored by 2 ranks (shards merged) and by 1: the same numbers
    for part in ("prompted", "semantic"):
        assert ddp["baseline"][part]["per_class"] == one["baseline"][part]["per_class"], part
        assert ddp["baseline"][part]["miou"] == one["baseline"][part]["miou"]
    # rank 0 alone writes: one TensorBoard file, one set of checkpoints, every rank's random states
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (run / "states").iterdir()) == ["step_000002"]
    state = run / "states" / "step_000002"
    assert {"rng.safetensors", "rng_rank1.safetensors"} <= {p.name for p in state.iterdir()}
    assert json.loads((state / "state.json").read_text())["world_size"] == 2
    assert (run / "checkpoints" / "last" / "adapter_model.safetensors").is_file()


def test_a_two_process_run_resumes_to_the_same_bytes(two_process_run, tmp_path, capsys):
    run, recipe = two_process_run
    resumed = tmp_path / "resumed"
    # one process cannot continue a 2-process state: the data order would differ
    assert main(["-q", "train", str(recipe), f"output.dir={resumed}", "--resume", str(run / "states" / "step_000002"), "--resume-force"]) == 2
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().err
    _torchrun(str(recipe), f"output.dir={resumed}", "--resume", str(run / "states" / "step_000002"), "--resume-force")
    for name in ("last", "best"):
        a = (run / "checkpoints" / name / "adapter_model.safetensors").read_bytes()
        b = (resumed / "checkpoints" / name / "adapter_model.safetensors").read_bytes()
        assert a == b, name
    ours, theirs = json.loads((resumed / "metrics.json").read_text()), json.loads((run / "metrics.json").read_text())
    for key in ("miou", "mdice", "history", "baseline", "best"):
        assert ours[key] == (theirs[key] if key != "best" else {**theirs[key], "checkpoint": ours[key]["checkpoint"]}), key
