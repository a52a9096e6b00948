"""Every module of the installed samtune.* packages imports, and the repo folders never leak out
under their bare names (``datasets`` / ``adapters`` / ``finetune`` would shadow Hugging Face
``datasets`` and AdapterHub ``adapters``)."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import samtune
import samtune.adapters
import samtune.datasets
import samtune.finetune

REPO = Path(__file__).resolve().parents[2]
BARE = ("datasets", "adapters", "finetune")
PACKAGES = (samtune, samtune.finetune, samtune.datasets, samtune.adapters)


def _discover() -> list[str]:
    names = set()
    for pkg in PACKAGES:
        names.add(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            names.add(info.name)
    return sorted(names)


MODULES = _discover()
# ``finetune/__main__.py`` runs the CLI at import time (no ``if __name__ == "__main__"`` guard, unlike
# ``samtune/__main__.py``), so importing it (pydoc, API-doc generators, pkgutil walks) exits the process.
_KNOWN_BROKEN: dict[str, str] = {}


def test_discovery_finds_the_expected_modules():
    # Guards the parametrisation below against silently discovering nothing (e.g. a broken finder).
    for name in (
        "samtune.finetune.recipe", "samtune.finetune.scoring.metrics", "samtune.finetune.cli",
        "samtune.datasets.cityscapes", "samtune.datasets.nifti", "samtune.datasets.prompted",
        "samtune.adapters.lora", "samtune.adapters.registry", "samtune.adapters.sam", "samtune.adapters.family",
        "samtune.datasets.formats", "samtune.constants", "samtune.files",
    ):  # fmt: skip
        assert name in MODULES


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(m, marks=pytest.mark.xfail(reason=_KNOWN_BROKEN[m], strict=True)) if m in _KNOWN_BROKEN else m
        for m in MODULES
    ],
)
def test_module_imports(name, monkeypatch):
    # A harmless argv in case a module runs the CLI on import (that is itself a failure below).
    monkeypatch.setattr(sys, "argv", ["samtune", "--version"])
    try:
        module = importlib.import_module(name)
    except SystemExit as exc:
        pytest.fail(f"importing {name} raised SystemExit({exc.code}): it runs code at import time")
    assert module.__name__ == name
    # Installed from the repo folders, never from somewhere else on sys.path.
    assert Path(module.__file__).resolve().is_relative_to(REPO)


def _env_without_pythonpath() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.parametrize("bare", BARE)
def test_bare_repo_folder_import_is_refused(bare):
    """With the repo root on sys.path, ``import datasets`` must hit our guard, not half-work."""
    env = _env_without_pythonpath()
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", f"import {bare}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert f"samtune.{bare}" in proc.stderr, proc.stderr


def test_nothing_installed_under_the_bare_names():
    code = (
        "import importlib.util, json, sys\n"
        f"repo = {str(REPO)!r}\n"
        "sys.path[:] = [p for p in sys.path if p not in ('', '.', repo) and not p.startswith(repo + '/')]\n"
        f"print(json.dumps({{n: importlib.util.find_spec(n) is not None for n in {list(BARE)!r}}}))\n"
        "import samtune.datasets, samtune.adapters, samtune.finetune\n"  # the real names still work
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd="/tmp", env=_env_without_pythonpath(), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    import json

    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {n: False for n in BARE}


@pytest.mark.parametrize("argv", [["--help"], ["recipe-keys"], ["validate", "recipes/demo.yaml"]])
def test_light_commands_do_not_import_torch(argv):
    """`samtune --help`, `recipe-keys` and `validate` answer without loading torch, transformers,
    peft or MONAI (several seconds on a laptop); see docs/explanation/measured.md."""
    code = (
        "import sys\nfrom samtune.finetune.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'monai', 'albumentations') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"
