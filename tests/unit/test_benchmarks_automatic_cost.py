"""benchmarks/automatic_cost.py: its arguments (fast), and a two-step run of both tasks on a small
Cityscapes demo that ends with the RESULT line (slow: two training runs with their evaluations)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "automatic_cost.py"


def load_script():
    spec = importlib.util.spec_from_file_location("automatic_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments_and_recipe_overrides_are_parsed():
    script = load_script()
    args = script.parse_args(["--steps", "5", "--repeats", "2", "model.image_size=64"])
    assert (args.steps, args.repeats, args.threads, args.overrides) == (5, 2, 1, ["model.image_size=64"])
    assert args.recipe == "recipes/driving/cityscapes_demo.yaml" and (ROOT / args.recipe).is_file()
    with pytest.raises(SystemExit):
        script.parse_args(["--steps", "0"])


@pytest.mark.slow  # two runs (build, two evaluations, report) of a 64 px demo: ~40 s idle on 2 cores
def test_a_two_step_run_prints_the_table_and_the_result_line(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "2", "--data-root", str(tmp_path / "cityscapes"), "--out", str(tmp_path / "runs"),
         "model.image_size=64", "train.batch_size=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert any(line.startswith("both ") for line in lines) and any(line.startswith("promptable ") for line in lines)
    assert re.fullmatch(r"RESULT both_vs_prompted_wall=\d+\.\d\d prompted_s=\d+\.\d both_s=\d+\.\d", lines[-1]), lines[-1]
    assert (tmp_path / "runs" / "both_0" / "metrics.json").is_file()
