"""The public Python API: the README's example runs as written, on a small recipe."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import samtune

README = Path(__file__).resolve().parents[3] / "README.md"


def readme_api_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(phantom, tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    # the demo recipe's keys, on the small test phantom and a 64 px tiny model
    (tmp_path / "recipes" / "demo.yaml").write_text(
        f"data: {{kind: nifti, root: {phantom}, val_fraction: 0.34}}\n"
        "model: {name: tiny, image_size: 64}\ntrain: {batch_size: 4, lr: 1.0e-3}\nprompts: {box_jitter_px: 2}\n"
    )
    monkeypatch.chdir(tmp_path)
    code = readme_api_example()
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    metrics, again, loaded = namespace["metrics"], namespace["again"], namespace["loaded"]
    assert metrics["step"] == 40 and (tmp_path / "runs/api/metrics.json").is_file()
    assert again["miou"] == pytest.approx(metrics["best"]["miou"], abs=1e-9)
    assert loaded.checkpoint == Path("runs/api/checkpoints/best") and not loaded.model.training
    assert loaded.recipe == samtune.load_recipe("runs/api/recipe.yaml")


def test_importing_samtune_loads_no_torch():
    code = "import sys, samtune; samtune.SamtuneError; samtune.__version__; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_public_names():
    assert samtune.adapters.build_sam is samtune.adapters.registry.build_sam
    for name in ("load_recipe", "train", "evaluate", "load_model"):
        assert callable(getattr(samtune, name))
    with pytest.raises(AttributeError):
        samtune.no_such_name
