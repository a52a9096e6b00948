from __future__ import annotations

import os

import pytest

from samtune import SamtuneError
from samtune.finetune.runtime import check_writable, resolve_device


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to read-only folders")
def test_unwritable_output_dir_is_one_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(SamtuneError, match=r"output\.dir=.*locked.*cannot write there.*Choose another folder"):
            check_writable(locked)
    finally:
        locked.chmod(0o700)


def test_output_dir_under_a_file_is_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SamtuneError, match=r"output\.dir=.*cannot write there"):
        check_writable(tmp_path / "file" / "run")


def test_writable_output_dir_is_created_and_left_clean(tmp_path):
    folder = check_writable(tmp_path / "a" / "b")
    assert folder.is_dir() and not list(folder.iterdir())


def test_cuda_device_without_cuda_is_named():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SamtuneError, match="train.device='cuda'"):
        resolve_device("cuda")


def test_mps_is_refused_clearly_where_apple_metal_is_missing(monkeypatch):
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SamtuneError, match="train.device='mps'.*use auto or cpu"):
        resolve_device("mps")
