"""SAM ViT-B/L/H: LoRA parameter counts per preset, and image-encoder forward time per input size.

Random weights (no download needed): the timing depends on shapes, not values. Sizes run side by
side in one process so their ratios are comparable; absolute times depend on the machine.

    .venv/bin/python benchmarks/encoder_speed.py                      # CPU, ViT-B, 256/512/1024
    .venv/bin/python benchmarks/encoder_speed.py --device cuda --variants vit_b vit_l vit_h --batch 4
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

from samtune.adapters.lora import select_lora_modules
from samtune.adapters.registry import family_of
from samtune.constants import LORA_PRESETS
from samtune.finetune.recipe import LoraSection

VARIANTS = {  # width, depth, heads, global attention blocks (Kirillov et al., 2023)
    "vit_b": (768, 12, 12, [2, 5, 8, 11]),
    "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
    "vit_h": (1280, 32, 16, [7, 15, 23, 31]),
}


def sam_config(variant: str, image_size: int) -> SamConfig:
    width, depth, heads, global_blocks = VARIANTS[variant]
    vision = SamVisionConfig(
        hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, global_attn_indexes=global_blocks,
        image_size=image_size, mlp_dim=4 * width,
    )  # fmt: skip
    prompt = SamPromptEncoderConfig(image_size=image_size)
    return SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=SamMaskDecoderConfig())


def lora_counts(variant: str, rank: int = 4) -> list[tuple[str, int, int, int]]:
    with torch.device("meta"):
        model = SamModel(sam_config(variant, 1024))
    modules = dict(model.named_modules())
    decoder = sum(p.numel() for p in model.mask_decoder.parameters())
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for preset in LORA_PRESETS:
        names = select_lora_modules(model, family_of("sam-vit-base"), LoraSection(preset=preset, rank=rank))
        lora = sum(rank * (modules[n].in_features + modules[n].out_features) for n in names)
        trained_decoder = 0 if any(n.startswith("mask_decoder.") for n in names) else decoder
        rows.append((preset, len(names), lora, lora + trained_decoder))
    return rows, total, decoder


@torch.no_grad()
def time_encoder(variant: str, sizes: list[int], device: str, batch: int, repeats: int) -> list[tuple[int, int, float]]:
    rows = []
    for size in sizes:
        torch.manual_seed(0)
        model = SamModel(sam_config(variant, size)).vision_encoder.to(device).eval()
        pixels = torch.randn(batch, 3, size, size, device=device)
        model(pixels)  # warm-up (allocations, kernel selection)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(pixels)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        tokens = (size // 16) ** 2
        rows.append((size, tokens, min(times) / batch))
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["vit_b"], choices=list(VARIANTS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512, 1024])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else f", {torch.get_num_threads()} threads"))
    results = []
    for variant in args.variants:
        rows, total, decoder = lora_counts(variant, args.rank)
        print(f"\n{variant}: {total:,} parameters (mask decoder {decoder:,}); LoRA rank {args.rank}")
        print(f"{'preset':<32} {'modules':>7} {'LoRA params':>12} {'trainable':>12} {'% of model':>10}")
        for preset, n, lora, trainable in rows:
            print(f"{preset:<32} {n:>7} {lora:>12,} {trainable:>12,} {100 * trainable / total:>9.2f}%")
        timing = time_encoder(variant, args.sizes, args.device, args.batch, args.repeats)
        base = timing[-1][2]
        print(f"\n{variant} image encoder forward, batch {args.batch}, best of {args.repeats}")
        print(f"{'size':>6} {'tokens':>7} {'s/image':>9} {'vs ' + str(timing[-1][0]):>9}")
        for size, tokens, seconds in timing:
            print(f"{size:>6} {tokens:>7} {seconds:>9.4f} {seconds / base:>9.3f}")
        results += [f"{variant}_{size}_s_per_image={seconds:.4f}" for size, _, seconds in timing]
    print(f"RESULT {' '.join(results)}")


if __name__ == "__main__":
    main()
