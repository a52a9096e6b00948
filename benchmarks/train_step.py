"""One LoRA training step of SAM (the trainer's hot path, `run_rounds` + AdamW): time and peak
GPU memory for float32 vs bfloat16 autocast, with and without gradient checkpointing, for each
image-encoder attention (``--attention``: transformers' ``sdpa``, its ``eager``, and
``fused_relpos``, samtune.adapters.attention; default sdpa and fused_relpos), side by side in one
run, and the model FLOPs utilisation (MFU): the FLOPs of one step (forward + backward, counted by
``torch.utils.flop_counter``; recomputation under checkpointing is not counted) per second, over
the GPU's dense bf16 peak from its name (``PEAK_BF16``). The FLOPs are counted once, with sdpa
attention, for every row: fused_relpos's wider q·k is overhead, not model work, so TFLOP/s and MFU
compare the kinds by time. Random weights and data: cost depends on shapes, not values.

    python benchmarks/train_step.py --device cuda --variant vit_b --image-size 1024 --batch 4
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import numpy as np
import torch
from samtune.adapters.attention import ATTENTION_KINDS, set_vision_attention
from samtune.adapters.lora import prepare_trainable
from samtune.adapters.registry import family_of
from samtune.datasets import sample as S
from samtune.finetune.interaction import run_rounds
from samtune.finetune.train.losses import make_mask_loss
from samtune.finetune.recipe import LoraSection, PromptsSection
from transformers import SamModel

# The sibling script, found however this one is started; imported as a call, not a statement, so
# no import has to follow code (E402 in older ruff defaults, an unused noqa under newer ones).
sys.path.insert(0, str(Path(__file__).parent))
sam_config = importlib.import_module("encoder_speed").sam_config


# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets; the first name
# contained in torch.cuda.get_device_name() wins (so "H100 PCIe" before "H100").
PEAK_BF16 = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
    "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12,
}  # fmt: skip


def peak_flops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def count_flops(args) -> float:
    """FLOPs of one training step (forward and backward of the prompt rounds; float32)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    config = sam_config(args.variant, args.image_size)
    model = prepare_trainable(SamModel(config), family_of("sam-vit-base"), "lora", LoraSection()).to(args.device).train()
    set_vision_attention(model, "sdpa")  # the reference computation's FLOPs, whatever kinds are timed
    batch = make_batch(args.batch, args.per_image, args.image_size, args.device)
    generator = torch.Generator(device=args.device).manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        _, loss = run_rounds(model, family_of("sam-vit-base"), batch, PromptsSection(corrective_rounds=args.corrective_rounds),
                             args.image_size, True, generator, make_mask_loss(1.0, 20.0), 1.0)  # fmt: skip
        loss.backward()
    del model
    return float(counter.get_total_flops())


def make_batch(batch: int, per_image: int, size: int, device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(batch, per_image, size, size)
    boxes = torch.zeros(batch, per_image, 4)
    for b in range(batch):
        for p in range(per_image):
            x0, y0 = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            x1, y1 = x0 + size // 4, y0 + size // 3
            masks[b, p, y0:y1, x0:x1] = 1
            boxes[b, p] = torch.tensor([x0, y0, x1, y1], dtype=torch.float32)
    return {
        S.IMAGE: torch.randn(batch, 3, size, size, generator=generator).to(device),
        S.MASKS: masks.to(device),
        S.BOXES: boxes.to(device),
        S.POINTS: torch.zeros(batch, per_image, 0, 2, device=device),
        S.POINT_LABELS: torch.zeros(batch, per_image, 0, dtype=torch.long, device=device),
        S.META: [{"resized_size": (size, size)}] * batch,
    }


def measure(args, attention: str, precision: str, checkpointing: bool) -> tuple[float, float, float]:
    torch.manual_seed(0)
    config = sam_config(args.variant, args.image_size)
    config.vision_config.initializer_range = 0.02
    base = SamModel(config)
    if checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    family = family_of("sam-vit-base")
    model = prepare_trainable(base, family, "lora", LoraSection()).to(args.device).train()
    set_vision_attention(model, attention)  # in place, under peft's LoRA wrappers
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = make_mask_loss(1.0, 20.0)
    batch = make_batch(args.batch, args.per_image, args.image_size, args.device)
    prompts = PromptsSection(corrective_rounds=args.corrective_rounds)
    generator = torch.Generator(device=args.device).manual_seed(0)
    cuda = args.device.startswith("cuda")
    times = []
    for step in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
            if step == args.warmup:
                torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            _, loss = run_rounds(model, family, batch, prompts, args.image_size, True, generator, loss_fn, 1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del model, base, optimizer
    if cuda:
        torch.cuda.empty_cache()
    return float(np.median(times)), peak, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--per-image", type=int, default=1)
    parser.add_argument("--corrective-rounds", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attention", nargs="+", choices=list(ATTENTION_KINDS), default=["sdpa", "fused_relpos"],
                        help="image-encoder attention kinds to time (default: sdpa fused_relpos)")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="default both; fp32 alone for a quick CPU check (bf16 autocast on CPU is far slower)")
    parser.add_argument("--no-flops", action="store_true", help="skip counting FLOPs (one extra step)")
    args = parser.parse_args()
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"{args.variant} LoRA (encoder_qkv, rank 4) training step, batch {args.batch} × {args.per_image} prompts "
          f"@ {args.image_size} px, {args.corrective_rounds} corrective rounds; torch {torch.__version__}, {where}")
    flops = None if args.no_flops else count_flops(args)
    peak = peak_flops(args.device)
    if flops is not None:
        where_peak = f"{peak / 1e12:.0f} TFLOP/s dense bf16 peak" if peak else "peak unknown for this device: no MFU"
        print(f"one step = {flops / 1e12:.3f} TFLOP (forward + backward, torch.utils.flop_counter); {where_peak}")
    print(f"{'attention':<13} {'precision':<10} {'checkpointing':<14} {'s/step':>8} {'images/s':>9} {'peak GiB':>9} {'TFLOP/s':>8} {'MFU':>6} {'loss':>8}")
    results = [f"tflop_per_step={flops / 1e12:.3f}"] if flops is not None else []
    for precision in args.precision:
        for checkpointing in (False, True):
            for attention in args.attention:  # innermost: the kinds compared sit on adjacent rows
                seconds, peak_gib, loss = measure(args, attention, precision, checkpointing)
                rate = flops / seconds / 1e12 if flops is not None else float("nan")
                mfu = flops / seconds / peak if flops is not None and peak else float("nan")
                print(f"{attention:<13} {precision:<10} {checkpointing!s:<14} {seconds:>8.4f} {args.batch / seconds:>9.1f} {peak_gib:>9.2f} "
                      f"{rate:>8.1f} {mfu:>6.1%} {loss:>8.4f}")  # fmt: skip
                # sdpa keeps the keys this script wrote before --attention existed.
                tag = f"{precision}{'_ckpt' if checkpointing else ''}{'' if attention == 'sdpa' else '_' + attention}"
                results += [f"{tag}_s_per_step={seconds:.4f}", f"{tag}_peak_gib={peak_gib:.2f}", f"{tag}_mfu={mfu:.3f}"]
    print("RESULT " + " ".join(results))


if __name__ == "__main__":
    main()
