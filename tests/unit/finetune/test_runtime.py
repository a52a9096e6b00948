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


def _recipe(**model):
    from samtune.finetune.recipe import validate_recipe

    return validate_recipe({"data": {"kind": "nifti", "root": "-"}, "model": {"image_size": 64, **model}})


def test_model_attention_switches_the_encoder_and_keeps_its_output():
    """model.attention reaches every vision-encoder block of the base model; the kinds agree."""
    import torch

    from samtune.adapters.attention import FusedRelPosAttention
    from samtune.finetune.runtime import build_base_model

    fused, plain = build_base_model(_recipe(attention="fused_relpos")), build_base_model(_recipe())
    assert all(isinstance(layer.attn, FusedRelPosAttention) for layer in fused.vision_encoder.layers)
    assert not any(isinstance(layer.attn, FusedRelPosAttention) for layer in plain.vision_encoder.layers)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused.vision_encoder(x)[0], plain.vision_encoder(x)[0], rtol=1e-4, atol=1e-5)


def test_a_family_refuses_an_attention_it_does_not_have():
    from types import SimpleNamespace

    from samtune.adapters.family import ModelFamily

    one_kind = SimpleNamespace(name="one", attention_kinds=ModelFamily.attention_kinds)  # the base class's default
    with pytest.raises(SamtuneError, match=r"model.attention='fused_relpos': the one family has sdpa"):
        ModelFamily.set_attention(one_kind, None, "fused_relpos")
    ModelFamily.set_attention(one_kind, None, "sdpa")


def test_train_compile_compiles_the_encoder_in_place(monkeypatch):
    """train.compile: the encoder's forward goes through torch.compile, parameter names (what
    checkpoints and states store) are unchanged, and the output is the same. Inductor's C++ build
    takes minutes on this CPU, so the test compiles with the "eager" backend: graph capture only."""
    import torch

    from samtune.adapters.lora import prepare_trainable
    from samtune.finetune.runtime import build_base_model, compile_encoder, model_family

    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend="eager"))
    recipe = _recipe()
    family = model_family(recipe)
    model = prepare_trainable(build_base_model(recipe), family, "lora", recipe.adapter.lora)
    names = [n for n, _ in model.named_parameters()]
    x = torch.randn(1, 3, 64, 64)
    before = family.encode_images(model, x).image_embeddings.detach()
    compile_encoder(model, family)
    encoder = model.base_model.model.vision_encoder
    assert encoder._compiled_call_impl is not None
    assert [n for n, _ in model.named_parameters()] == names
    after = family.encode_images(model, x).image_embeddings
    torch.testing.assert_close(after, before)
    after.sum().backward()  # LoRA still receives its gradient through the compiled encoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
