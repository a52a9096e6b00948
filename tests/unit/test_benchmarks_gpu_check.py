"""benchmarks/gpu_check.sh --dry-run: on a machine without a GPU, every command of the prepared
GPU check is parsed by its own script's parser (samtune train's recipe and overrides validated),
and the script exits 0 with one line per step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("train_step", "compile", "estimate", "train20", "predict")


@pytest.mark.slow  # one Python process importing torch, transformers and every benchmark: ~10 s idle, more on a busy 2-core machine
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_WORK=str(tmp_path / "work"))
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    for step in STEPS:
        assert any(line.startswith(f"step {step}: ok") for line in out.splitlines()), f"no line for step {step}:\n{out}"
    assert "FAILED" not in out
    assert out.strip().splitlines()[-1].startswith("RESULT dry_run=ok")


def test_gpu_check_rejects_unknown_arguments():
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "unknown argument" in done.stderr
