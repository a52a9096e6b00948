"""Backbones side by side at one input size: parameters, image-encoder latency per image, one LoRA
training step (the trainer's hot path: ``run_rounds`` + backward + AdamW) and the automatic
prediction of a CT volume (every slice encoded once, all class prompts in one decoder call), each
as seconds and as a ratio to SAM ViT-B measured in the same run.

Random weights (cost depends on shapes, not values), built from each family's architecture:
``sam-vit-base`` (ViT-B, ``encoder_speed.sam_config``), ``mobile-sam`` (TinyViT-5M,
``adapters.mobile_sam.mobile_sam_config``) and ``sam2-hiera-tiny|small|base-plus|large`` (SAM 2.1,
``adapters.sam2_config.sam2_config``), ``edgetam`` (RepViT-M1 EdgeTAM, ``adapters.edgetam_config.edgetam_config``;
its encoder's BatchNorm unfolded, as training runs it) and ``sam3`` (SAM 3 at the release's configuration,
``adapters.sam3_config.released_config``; ~850 M parameters, so not in the default list, and its
14 px patches need ``--image-size`` a multiple of 14: 448 suits every family).
Timings interleave the backbones per repetition (median of ``--repeats``), so load on a shared
machine hits all alike; on a shared CPU pass ``--threads 1``.

    .venv/bin/python benchmarks/backbones.py --threads 1                       # CPU, 512 px
    python benchmarks/backbones.py --device cuda --image-size 1024 --repeats 10
    python benchmarks/backbones.py --device cuda --image-size 448 --models sam-vit-base sam2-hiera-tiny sam3
    .venv/bin/python benchmarks/backbones.py --models mobile-sam edgetam --image-size 1024 --batch 1 --threads 1

Last line: ``RESULT <name>_encoder_vs_vit_b=<ratio> <name>_step_vs_vit_b=<ratio> <name>_volume_vs_vit_b=<ratio> ...``
(ratios of seconds: below 1 is faster than ViT-B).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import SamModel

sys.path.insert(0, str(Path(__file__).parent))
from encoder_speed import sam_config  # noqa: E402
from train_step import make_batch  # noqa: E402

from samtune.adapters.lora import prepare_trainable  # noqa: E402
from samtune.adapters.registry import family_of  # noqa: E402
from samtune.finetune.automatic import class_low_res  # noqa: E402
from samtune.finetune.interaction import run_rounds  # noqa: E402
from samtune.finetune.train.losses import make_mask_loss  # noqa: E402
from samtune.finetune.train.optim import build_optimizer  # noqa: E402
from samtune.finetune.recipe import LoraSection, PromptsSection, TrainSection  # noqa: E402

CLASSES = 4  # the CT phantom's organs: class prompts decoded per slice


def build(name: str, image_size: int) -> SamModel:
    if name == "sam-vit-base":
        return SamModel(sam_config("vit_b", image_size))
    if name == "mobile-sam":
        from samtune.adapters.mobile_sam import assemble, mobile_sam_config

        return assemble(mobile_sam_config(image_size))
    if name.startswith("sam2-hiera-"):  # SAM 2.1 Hiera-T/S/B+/L image model (transformers Sam2Model)
        from transformers import Sam2Model

        from samtune.adapters.sam2_config import HIERA, sam2_config, single_mask_token_only

        model = Sam2Model(sam2_config(image_size, HIERA["hiera_" + name.removeprefix("sam2-hiera-").replace("-", "_")]))
        single_mask_token_only(model)
        return model
    if name == "edgetam":  # EdgeTAM's image model: RepViT-M1 under SAM 2's neck and decoder (transformers EdgeTamModel)
        from transformers import EdgeTamModel

        from samtune.adapters.edgetam_config import edgetam_config, single_mask_token_only

        model = EdgeTamModel(edgetam_config(image_size))
        single_mask_token_only(model)
        return model
    if name == "sam3":  # SAM 3's image model (ViT 1024 × 32, detector, tracker, text encoder): adapters/sam3_model.py
        from samtune.adapters.sam3 import _ready
        from samtune.adapters.sam3_config import released_config
        from samtune.adapters.sam3_model import Sam3Segmenter

        return _ready(Sam3Segmenter(released_config(image_size)))
    raise ValueError(name)


def timed(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["sam-vit-base", "mobile-sam", "sam2-hiera-tiny"])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="images per training step")
    parser.add_argument("--volume-slices", type=int, default=8, help="slices of the CT volume predicted (batches of --batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "sam-vit-base" not in args.models:
        args.models.insert(0, "sam-vit-base")
    size, device = args.image_size, args.device
    torch.manual_seed(0)
    setups = {}
    for name in args.models:
        family = family_of(name)
        base = build(name, size)
        family.add_class_prompts(base, CLASSES, 2)
        model = prepare_trainable(base, family, "lora", LoraSection()).to(device).train()
        optimizer = build_optimizer(model, TrainSection())
        # the base model: no LoRA, no class prompts, and peft's trained copy of the decoder counted once
        named = [(n, p) for n, p in model.named_parameters() if not any(k in n for k in ("lora_", "class_prompts", "original_module"))]
        params = {"total": sum(p.numel() for _, p in named),
                  "encoder": sum(p.numel() for n, p in named if f"{family.image_encoder}." in n),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}  # fmt: skip
        setups[name] = (family, model, optimizer, params)
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in make_batch(args.batch, 1, size, "cpu").items()}
    volume = torch.randn(args.volume_slices, 3, size, size, device=device)
    loss_fn = make_mask_loss(1.0, 20.0)
    prompts = PromptsSection()

    def encoder(name):
        family, model, _, _ = setups[name]
        with torch.no_grad():
            family.encode_images(model, volume[:1])

    def step(name):
        family, model, optimizer, _ = setups[name]
        _, loss = run_rounds(model, family, batch, prompts, size, True, torch.Generator(device=device).manual_seed(0), loss_fn, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def predict_volume(name):
        family, model, _, _ = setups[name]
        model.eval()
        with torch.no_grad():
            for start in range(0, len(volume), args.batch):
                class_low_res(model, family, volume[start : start + args.batch]).argmax(1)
        model.train()

    work = {"encoder": encoder, "step": step, "volume": predict_volume}
    times = {(name, kind): [] for name in args.models for kind in work}
    for name in args.models:  # warm-up
        for fn in work.values():
            fn(name)
    for r in range(args.repeats):
        order = args.models[r % len(args.models):] + args.models[: r % len(args.models)]
        for name in order:
            for kind, fn in work.items():
                times[(name, kind)].append(timed(lambda: fn(name), device))
    median = {key: statistics.median(v) for key, v in times.items()}
    print(f"{size} px, batch {args.batch}, {args.volume_slices}-slice volume, device {device}, threads {torch.get_num_threads()}, median of {args.repeats}")
    print(f"{'model':14s} {'params':>9s} {'encoder':>9s} {'trainable':>10s} | {'enc s/img':>9s} {'step s':>8s} {'volume s':>9s} | ratios to ViT-B")
    ref = {kind: median[("sam-vit-base", kind)] for kind in work}
    result = []
    for name in args.models:
        p = setups[name][3]
        ratios = {kind: median[(name, kind)] / ref[kind] for kind in work}
        print(f"{name:14s} {p['total'] / 1e6:8.2f}M {p['encoder'] / 1e6:8.2f}M {p['trainable'] / 1e6:9.2f}M | "
              f"{median[(name, 'encoder')]:9.3f} {median[(name, 'step')]:8.3f} {median[(name, 'volume')]:9.3f} | "
              + " ".join(f"{k} {v:.3f}" for k, v in ratios.items()))  # fmt: skip
        if name != "sam-vit-base":
            key = name.replace("-", "_")
            result += [f"{key}_{kind}_vs_vit_b={ratios[kind]:.3f}" for kind in work]
    print("RESULT " + " ".join(result))


if __name__ == "__main__":
    main()
