"""Exact resume: a run killed with SIGKILL and resumed from its latest training state ends with
the same adapter bytes and metrics as a run that was never interrupted (CPU, one thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from samtune import SamtuneError
from samtune.finetune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe(path: Path, phantom: Path, out: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "seed": 0, "task": "both",
        "data": {"kind": "nifti", "root": str(phantom), "val_fraction": 0.34, "empty_slice_ratio": 0.3},
        "model": {"name": "tiny", "image_size": 64},
        "train": {"steps": 12, "batch_size": 4, "eval_every": 6, "save_every": 3, "lr": 1e-3, "device": "cpu"},
        "prompts": {"box_jitter_px": 2}, "eval": {"max_samples": 12}, "output": {"dir": str(out)},
    }))  # fmt: skip
    return path


def _numbers(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    out = {k: m[k] for k in ("miou", "mdice", "history", "below_baseline_at", "step", "baseline")}
    return out | {"best": (m["best"]["step"], m["best"]["miou"]), "prompted": m["prompted"]["per_class"], "semantic": m["semantic"]["per_class"]}


def test_a_killed_run_resumes_to_the_same_bytes(phantom, tmp_path):
    straight = tmp_path / "straight"
    assert main(["-q", "train", str(_recipe(tmp_path / "a.yaml", phantom, straight))]) == 0

    killed = tmp_path / "killed"
    recipe = _recipe(tmp_path / "b.yaml", phantom, killed)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "samtune", "-q", "train", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (killed / "states" / "step_000003" / "state.json").is_file():
        assert proc.poll() is None, "the run ended before its first state was written"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # mid-run: somewhere after step 3
    proc.wait()
    assert not (killed / "metrics.json").exists()
    assert main(["-q", "train", str(recipe), "--resume"]) == 0

    for name in ("last", "best"):
        a = (straight / "checkpoints" / name / "adapter_model.safetensors").read_bytes()
        b = (killed / "checkpoints" / name / "adapter_model.safetensors").read_bytes()
        assert a == b, name
    assert _numbers(killed) == _numbers(straight)
    assert len(list((killed / "states").glob("step_*"))) <= 2  # train.keep_states
    assert not list((killed / "states").glob(".*tmp*"))  # no half-written state left behind


def test_resume_refuses_a_changed_recipe_naming_the_keys(phantom, tmp_path, capsys):
    run = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.yaml", phantom, run)
    assert main(["-q", "train", str(recipe), "train.steps=3", "train.save_every=1", "train.eval_every=3"]) == 0
    assert main(["-q", "train", str(recipe), "train.steps=3", "train.save_every=1", "train.eval_every=3", "train.lr=0.01", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.001 -> 0.01" in err and "Traceback" not in err
    assert main(["-q", "train", str(recipe), "train.steps=3", "train.save_every=1", "train.eval_every=1", "--resume"]) == 2
    assert "--resume-force allows train.eval_every" in capsys.readouterr().err
    assert main(["-q", "train", str(recipe), "train.steps=3", "train.save_every=1", "train.eval_every=1", "--resume", "--resume-force"]) == 0
    with pytest.raises(SamtuneError, match="no training state"):
        from samtune.finetune.train.resume import find_state

        find_state(tmp_path / "nothing", None)


def test_a_state_written_by_the_earlier_trainer_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    """``data/state_d7f6b21``: step 3 of 6 of a tiny run, written by the code before the training
    loop was split into build_run / LoopState / fit (commit d7f6b21; recipe.yaml in the folder,
    relative paths). Resumed by today's code, it ends where today's code ends uninterrupted."""
    import shutil

    from samtune.datasets.synthetic import generate_ct_phantom

    old = Path(__file__).parent / "data" / "state_d7f6b21" / "step_000003"
    monkeypatch.chdir(tmp_path)
    generate_ct_phantom(tmp_path, n_cases=3, shape=(48, 48, 12))  # the data it was trained on: Dataset900_CTPhantom
    recipe = tmp_path / "recipe.yaml"
    shutil.copy(old / "recipe.yaml", recipe)
    shutil.copytree(old, tmp_path / "run" / "states" / old.name)
    assert main(["-q", "train", str(recipe), "--resume"]) == 0
    assert main(["-q", "train", str(recipe), "output.dir=straight"]) == 0
    # Steps 1-3 of the state were trained with the class loss at the input resolution; since issue 20
    # it is computed at the decoder's (same loss value, other rounding), so the resumed run cannot end
    # on the straight run's bytes any more. What an old state must still give: it loads (weights,
    # optimiser, every generator, the data order) and the run continues from step 3 to the end,
    # with the same evaluations at the same steps and numbers within rounding of a straight run.
    resumed, straight = _numbers(tmp_path / "run"), _numbers(tmp_path / "straight")
    assert (tmp_path / "run" / "checkpoints" / "last" / "adapter_model.safetensors").is_file()
    assert resumed["step"] == straight["step"] and resumed["baseline"] == straight["baseline"]
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in straight["history"]]
    assert resumed["miou"] == pytest.approx(straight["miou"], abs=0.02) and resumed["mdice"] == pytest.approx(straight["mdice"], abs=0.02)
