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


# ------------------------------------------------------------------ train.precision: auto


@pytest.mark.parametrize(("flags", "want"), [
    ({"avx2", "fma"}, "fp32"),  # the development machine: AVX2 only, bfloat16 emulated
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),  # Cooper Lake, Zen 4
    ({"avx2", "amx_tile", "amx_bf16"}, "bf16"),  # Sapphire Rapids
    ({"asimd", "bf16"}, "bf16"),  # Arm BF16 (Graviton 3)
])  # fmt: skip
def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(flags, want, monkeypatch):
    import torch
    from samtune.finetune import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    cpu = torch.device("cpu")
    assert runtime.resolve_precision("auto", cpu) == want
    with runtime.autocast(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu") is (want == "bf16")
    for given in ("fp32", "bf16", "int8"):  # explicit choices are kept, whatever the CPU
        assert runtime.resolve_precision(given, cpu) == given


@pytest.mark.parametrize("supported", [True, False])
def test_auto_precision_on_cuda_asks_torch(supported, monkeypatch):
    import torch
    from samtune.finetune import runtime

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"amx_bf16"}))  # the host CPU does not count
    assert runtime.resolve_precision("auto", torch.device("cuda")) == ("bf16" if supported else "fp32")
    assert runtime.resolve_precision("auto", torch.device("mps")) == "fp32"


def test_cpu_flags_are_read_from_this_machine():
    from samtune.finetune.runtime import cpu_flags

    flags = cpu_flags()
    assert isinstance(flags, frozenset)
    import platform

    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert "sse2" in flags  # every x86-64 CPU has it


@pytest.mark.parametrize(("precision", "flags", "warned"), [
    ("bf16", {"avx2"}, True), ("bf16", {"avx512_bf16"}, False), ("auto", {"avx2"}, False), ("fp32", {"avx2"}, False),
])  # fmt: skip
def test_bf16_on_a_cpu_without_native_bf16_is_warned(precision, flags, warned, monkeypatch, caplog):
    import logging

    import torch
    from samtune.finetune import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    with caplog.at_level(logging.INFO, logger="samtune.finetune.runtime"):
        got = runtime.check_precision(precision, torch.device("cpu"))
    assert got == runtime.resolve_precision(precision, torch.device("cpu"))
    assert any("slower than fp32" in r.message for r in caplog.records if r.levelno == logging.WARNING) is warned
    assert any(f"precision: {got}" in r.message for r in caplog.records)


# ------------------------------------------------------------------ the model prediction runs


@pytest.mark.parametrize("variant", ["tiny", "mobile-sam-tiny"])
def test_inference_model_gives_the_same_logits_and_leaves_the_model_alone(variant):
    """LoRA merged (with non-zero LoRA weights), BatchNorm folded (TinyViT's ConvBN), channels-last:
    the class logits agree to float rounding; the loaded model keeps its LoRA, BatchNorm and layout."""
    import torch
    from samtune.adapters.lora import prepare_trainable
    from samtune.adapters.registry import build_model, family_of
    from samtune.finetune.automatic import class_low_res
    from samtune.finetune.recipe import LoraSection
    from samtune.finetune.runtime import inference_model

    torch.manual_seed(0)
    family = family_of(variant)
    base = build_model(variant, None, image_size=64, init_seed=0)
    family.add_class_prompts(base, 3, 2)
    model = prepare_trainable(base, family, "lora", LoraSection()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)  # a trained adapter: merging must change the weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 64, 64)
    ready = inference_model(model, family)
    with torch.no_grad():
        want, got = class_low_res(model, family, images), class_low_res(ready, family, images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in ready.parameters())
    assert not any("lora_" in name for name, _ in ready.named_modules())
    batch_norms = [m for m in ready.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert (variant == "mobile-sam-tiny") is any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not batch_norms  # every ConvBN folded
    state = model.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)


def test_fold_batch_norms_only_inside_sequential_and_in_eval_mode():
    import torch
    from samtune.finetune.runtime import fold_batch_norms

    class Branches(torch.nn.Module):  # a conv and a BN as children, but forward may run them in any order
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4), torch.nn.GELU(), Branches())
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
    model.train()
    assert fold_batch_norms(model) == 0  # training mode: batch statistics, nothing to fold
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model[:3](x)
        assert fold_batch_norms(model) == 1
        torch.testing.assert_close(model[:3](x), want, rtol=1e-5, atol=1e-5)
    assert isinstance(model[1], torch.nn.Identity) and isinstance(model[3].bn, torch.nn.BatchNorm2d)


def test_int8_quantises_the_image_encoder_linears_only():
    import torch
    from samtune.adapters.registry import build_model, family_of
    from samtune.finetune.runtime import inference_model

    family = family_of("tiny")
    model = build_model("tiny", None, image_size=64, init_seed=0).eval()
    ready = inference_model(model, family, "int8")
    encoder = getattr(ready, family.image_encoder)
    assert not any(type(m) is torch.nn.Linear for m in encoder.modules())
    assert any(type(m) is torch.nn.Linear for m in ready.mask_decoder.modules())  # the decoder stays float32
    assert any(type(m) is torch.nn.Linear for m in getattr(model, family.image_encoder).modules())  # the original is untouched
