"""Training throughput: samtune's training step vs a SAMed/MedSAM-style step on Meta's official SAM.

One process, the same image size, encoder sizes, batch and threads for every configuration. The
configurations are interleaved (round-robin: each repetition runs every configuration once, in an
order rotated by one each repetition), so drift in the machine's load hits all of them alike; the
table gives the median seconds per step of each. Random weights and random data: the cost of a
step depends on shapes, not values.

(a) baseline: Meta's ``segment_anything`` (1.0) ``Sam`` built from its ``modeling`` subpackage
    (loaded without the package ``__init__``, which imports torchvision; as
    tests/unit/adapters/helpers_official.py does) with the same sizes as samtune's model (both are
    built from one ``transformers.SamConfig``: ``encoder_speed.sam_config`` for ViT-B,
    ``adapters.sam.make_tiny_config`` for tiny; the two parameter counts are printed). peft LoRA
    (samtune's default rank and alpha, ``LoraSection``) on ``image_encoder.blocks.N.attn.qkv``, mask
    decoder trained (peft ``modules_to_save``), prompt encoder frozen. A step: ``image_encoder`` on
    the batch → per image (as the official ``Sam.forward`` loops: its ``MaskDecoder`` repeats the
    image embedding once per prompt, so a batch of B images with one box each cannot be decoded in
    one call without MedSAM's patch of the decoder) ``prompt_encoder(boxes)`` → ``mask_decoder
    (multimask_output=False)`` → low-res logits upsampled to the input size → MedSAM's loss (MONAI
    Dice, sigmoid, squared denominator + BCE with logits) → AdamW (MedSAM's: weight decay 0.01).
    With gradients (the official ``Sam.forward`` runs under no_grad). One box, so one mask, per
    image.
(b) samtune lora, k = 1 and k = 8 prompted objects per image: the trainer's hot path as
    benchmarks/train_step.py runs it: ``prepare_trainable(model, family, "lora", LoraSection())``,
    ``run_rounds`` (box prompts, no corrective rounds; Dice + focal 1:20 + IoU head MSE, the
    recipe's ``loss:`` defaults), backward, the trainer's ``build_optimizer`` (AdamW, fused on
    CUDA) step. B·k masks per step (one encoder pass per image).
(c) samtune decoder_only, no cache: ``prepare_trainable(..., "decoder_only", ...)``; the encoder runs
    every step (the trainer's ``prompted_loss`` with ``embeddings=None``): its weights are frozen
    and the input needs no gradient, so autograd records nothing there (no_grad in effect).
(d) samtune decoder_only with the embedding cache: the batch's image embeddings computed once
    (model in eval mode, no_grad) and stored as a float16 numpy array, as
    ``EmbeddingCache.fill`` stores its rows; every step reads the rows back as
    ``EmbeddingCache.get`` does (``np.ascontiguousarray`` of the rows, to float32 on the device) and
    passes ``embeddings=ImageEmbeddings(rows)`` to ``run_rounds``, as ``step.cached_embeddings``
    does. The array stays in memory instead of a memory-mapped ``embeddings.npy`` (the OS page
    cache holds a small cache anyway). The fill time is reported on its own, not in s/step.

Peak memory: on CUDA, per configuration, the largest ``max_memory_allocated`` during a timed step
minus what was allocated before it (activations, gradients, temporaries; the weights and optimiser
states of all the resident models are excluded). On CPU "n/a": one process holds all the models,
so its peak RSS says nothing about one configuration.

Defaults (ViT-B at 256 px, batch 2): the real encoder width and depth, so the encoder's share of a
step is realistic (the tiny 4-block model's encoder forward costs less than its decoder's
training step, so neither the cache nor several prompts per image can gain much there), at a size where one repetition of the five
configurations takes about half a minute on 2 CPU cores (1024 px would take 16× the tokens).
Besides the median wall time the table gives each configuration's median process CPU time per
step. On a shared CPU pass ``--threads 1``: with other jobs running, two threads on two cores wait
for each other (a ViT-B k=1 step took about 19 s with 2 threads and 9 s with 1 here), which makes
the wall times of the default run noisy (the interleaving spreads the noise, it does not remove
it). Targets on CPU (printed with pass/fail): lora k1 s/step ≤ 1.0× the baseline's, lora k8 masks/s
≥ 5× the baseline's, the cache ≥ 30× faster than no cache. Last line:
``RESULT lora_k1_step_vs_baseline=<k1 s/step ÷ baseline s/step> lora_k8_masks_vs_baseline=<k8
masks/s ÷ baseline masks/s> cache_vs_nocache=<no-cache s/step ÷ cache s/step>``.

    .venv/bin/python benchmarks/train_throughput.py                                   # CPU, ViT-B @ 256, batch 2
    .venv/bin/python benchmarks/train_throughput.py --threads 1                       # the same on a shared CPU
    .venv/bin/python benchmarks/train_throughput.py --variant tiny --image-size 128 --steps 3
    .venv/bin/python benchmarks/train_throughput.py --device cuda --variant vit_b --image-size 1024 --batch 4 --precision bf16
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)  # peft asks transformers a deprecated question

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import SamConfig, SamModel

sys.path.insert(0, str(Path(__file__).parent))
from encoder_speed import sam_config
from samtune.adapters.family import ImageEmbeddings
from samtune.adapters.lora import prepare_trainable
from samtune.adapters.registry import family_of
from samtune.adapters.sam import make_tiny_config
from samtune.datasets import sample as S
from samtune.finetune.interaction import run_rounds
from samtune.finetune.train.losses import make_mask_loss
from samtune.finetune.train.optim import build_optimizer
from samtune.finetune.recipe import (
    LoraSection,
    LossSection,
    PromptsSection,
    TrainSection,
)
from train_step import make_batch

TARGETS = {"k1": 1.0, "k8": 5.0, "cache": 30.0}  # k1 s/step ≤ ×baseline, k8 masks/s ≥ ×baseline, cache ≥ ×faster
LR = 1e-4


# ------------------------------------------------------------------ models
def hf_config(variant: str, image_size: int) -> SamConfig:
    """The one configuration both models are built from."""
    if variant == "tiny":
        return make_tiny_config(image_size)
    config = sam_config(variant, image_size)
    config.vision_config.initializer_range = 0.02  # transformers' 1e-10 default is for loaded weights
    return config


def build_samtune(config: SamConfig) -> SamModel:
    torch.manual_seed(0)
    return SamModel(config)


def import_official_modeling() -> types.ModuleType:
    """``segment_anything.modeling`` without the package ``__init__`` (which imports torchvision)."""
    name = "segment_anything"
    if f"{name}.modeling" in sys.modules:
        return sys.modules[f"{name}.modeling"]
    if name not in sys.modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            sys.exit("segment_anything is not installed: .venv/bin/pip install segment-anything==1.0 --no-deps")
        parent = types.ModuleType(name)  # an empty stand-in: submodules resolve through __path__
        parent.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = parent
    return importlib.import_module(f"{name}.modeling")


def build_official(config: SamConfig) -> torch.nn.Module:
    """Meta's ``Sam`` as ``segment_anything.build_sam._build_sam`` builds it, with ``config``'s sizes."""
    modeling = import_official_modeling()
    vision, prompt, decoder = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    grid = vision.image_size // vision.patch_size
    torch.manual_seed(0)
    image_encoder = modeling.ImageEncoderViT(
        img_size=vision.image_size, patch_size=vision.patch_size, embed_dim=vision.hidden_size, depth=vision.num_hidden_layers,
        num_heads=vision.num_attention_heads, mlp_ratio=vision.mlp_dim / vision.hidden_size, out_chans=vision.output_channels,
        qkv_bias=vision.qkv_bias, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=vision.use_rel_pos,
        window_size=vision.window_size, global_attn_indexes=tuple(vision.global_attn_indexes),
    )  # fmt: skip
    prompt_encoder = modeling.PromptEncoder(
        embed_dim=prompt.hidden_size, image_embedding_size=(grid, grid), input_image_size=(vision.image_size, vision.image_size),
        mask_in_chans=prompt.mask_input_channels,
    )  # fmt: skip
    mask_decoder = modeling.MaskDecoder(
        num_multimask_outputs=decoder.num_multimask_outputs,
        transformer=modeling.TwoWayTransformer(depth=decoder.num_hidden_layers, embedding_dim=decoder.hidden_size,
                                               mlp_dim=decoder.mlp_dim, num_heads=decoder.num_attention_heads),
        transformer_dim=decoder.hidden_size, iou_head_depth=decoder.iou_head_depth, iou_head_hidden_dim=decoder.iou_head_hidden_dim,
    )  # fmt: skip
    return modeling.Sam(image_encoder, prompt_encoder, mask_decoder, pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def base_params(model: torch.nn.Module) -> int:
    """Parameters of the model under peft: without the LoRA matrices and peft's trained decoder copy."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and ".modules_to_save." not in n)


# ------------------------------------------------------------------ configurations
@dataclass
class Config:
    name: str
    masks: int  # masks per step
    step: Callable[[], float]  # one training step; returns the loss
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds (all threads)
    peaks: list[float] = field(default_factory=list)  # GiB above the pre-step allocation (CUDA)
    loss: float = float("nan")


def autocast(args):
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def optimise(model, loss: torch.Tensor, optimizer) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()  # the trainer reads the loss every step (check_finite)


def baseline_config(args, config: SamConfig, batch: dict) -> tuple[Config, torch.nn.Module]:
    from monai.losses import DiceLoss

    lora = LoraSection()
    peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                             target_modules=r"image_encoder\.blocks\.\d+\.attn\.qkv", modules_to_save=["mask_decoder"])  # fmt: skip
    model = get_peft_model(build_official(config), peft_config).to(args.device).train()
    sam = model.base_model.model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)  # MedSAM's
    dice, bce = DiceLoss(sigmoid=True, squared_pred=True, reduction="mean"), torch.nn.BCEWithLogitsLoss(reduction="mean")
    images, boxes, masks = batch[S.IMAGE], batch[S.BOXES][:, 0], batch[S.MASKS][:, :1]  # B×3×S×S, B×4, B×1×S×S

    def step() -> float:
        with autocast(args):
            embeddings = sam.image_encoder(images)
            image_pe = sam.prompt_encoder.get_dense_pe()
            low_res = []
            for i in range(len(images)):  # as Sam.forward: one image embedding, its prompts
                sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[i : i + 1], masks=None)
                logits, _ = sam.mask_decoder(image_embeddings=embeddings[i : i + 1], image_pe=image_pe, sparse_prompt_embeddings=sparse,
                                             dense_prompt_embeddings=dense, multimask_output=False)  # fmt: skip
                low_res.append(logits)
        logits = F.interpolate(torch.cat(low_res).float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return optimise(model, dice(logits, masks) + bce(logits, masks), optimizer)

    return Config("baseline (official SAM + peft LoRA)", len(images), step), model


def samtune_config(
    args, name: str, config: SamConfig, mode: str, batch: dict, cached: np.ndarray | None = None
) -> tuple[Config, torch.nn.Module]:
    family = family_of("sam-vit-base")
    model = prepare_trainable(build_samtune(config), family, mode, LoraSection()).to(args.device).train()
    optimizer = build_optimizer(model, TrainSection(lr=LR))  # the trainer's (fused on CUDA)
    loss_fn, iou_weight = make_mask_loss(LossSection().dice_weight, LossSection().focal_weight), LossSection().iou_weight
    prompts = PromptsSection(corrective_rounds=0, mask_only_rounds=0)
    generator = torch.Generator(device=args.device).manual_seed(0)
    indices = np.arange(len(batch[S.IMAGE]))  # the batch's rows of the cache (meta["index"])
    image_size = batch[S.IMAGE].shape[-1]

    def step() -> float:
        embeddings = None
        if cached is not None:  # EmbeddingCache.get + step.cached_embeddings
            rows = torch.from_numpy(np.ascontiguousarray(cached[indices])).to(device=args.device, dtype=torch.float32)
            embeddings = ImageEmbeddings(rows)
        with autocast(args):  # step.prompted_loss
            _, loss = run_rounds(model, family, batch, prompts, image_size, True, generator, loss_fn, iou_weight, embeddings=embeddings)
        return optimise(model, loss, optimizer)

    masks = batch[S.MASKS].shape[0] * batch[S.MASKS].shape[1]
    return Config(name, masks, step), model


def fill_cache(args, model, batch: dict) -> tuple[np.ndarray, float]:
    """The batch's embeddings as EmbeddingCache.fill stores them (eval mode, no_grad, float16); the seconds it took."""
    family = family_of("sam-vit-base")
    was_training = model.training
    model.eval()
    sync(args)
    start = time.perf_counter()
    with torch.no_grad():  # no autocast, as EmbeddingCache.fill
        rows = family.encode_images(model, batch[S.IMAGE]).image_embeddings.float().cpu().numpy().astype(np.float16)
    seconds = time.perf_counter() - start
    model.train(was_training)
    return rows, seconds


def sync(args) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_step(args, config: Config, record: bool) -> None:
    cuda = args.device.startswith("cuda")
    sync(args)
    if cuda:
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start, cpu = time.perf_counter(), time.process_time()
    config.loss = config.step()
    sync(args)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if record:
        config.times.append(seconds)
        config.cpu_times.append(cpu)
        if cuda:
            config.peaks.append((torch.cuda.max_memory_allocated() - before) / 2**30)


# ------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variant", default="vit_b", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--per-image", type=int, default=8, help="prompted objects per image of the samtune k configuration")
    parser.add_argument("--steps", type=int, default=5, help="timed repetitions (each runs every configuration once)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: the machine's cores)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (CUDA)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    k = args.per_image
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads of {os.cpu_count()} cores"
    print(f"torch {torch.__version__}, {where}; load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")

    config = hf_config(args.variant, args.image_size)
    batch1 = make_batch(args.batch, 1, args.image_size, args.device)
    batch_k = make_batch(args.batch, k, args.image_size, args.device)
    built = time.perf_counter()
    baseline, official = baseline_config(args, config, batch1)
    lora1, samtune_model = samtune_config(args, "samtune lora, k=1", config, "lora", batch1)
    lora_k, _ = samtune_config(args, f"samtune lora, k={k}", config, "lora", batch_k)
    nocache, decoder_model = samtune_config(args, "samtune decoder_only, no cache", config, "decoder_only", batch1)
    cached, fill_s = fill_cache(args, decoder_model, batch1)
    cache, _ = samtune_config(args, "samtune decoder_only, cache", config, "decoder_only", batch1, cached)
    configs = [baseline, lora1, lora_k, nocache, cache]
    print(f"{args.variant} @ {args.image_size} px, batch {args.batch} images, {args.precision}; parameters: official SAM "
          f"{base_params(official):,}, samtune (transformers) {base_params(samtune_model):,}; "
          f"5 models built in {time.perf_counter() - built:.1f} s")  # fmt: skip
    print(f"embedding cache fill: {fill_s:.3f} s for {args.batch} images ({fill_s / args.batch:.3f} s/image, once; not in s/step)")

    for rep in range(args.warmup + args.steps):
        order = configs[rep % len(configs) :] + configs[: rep % len(configs)]
        for c in order:
            timed_step(args, c, record=rep >= args.warmup)

    median = {c.name: float(np.median(c.times)) for c in configs}
    print(f"\ns/step: median wall time of {args.steps} interleaved steps (after {args.warmup} warm-up round{'s' * (args.warmup != 1)}); "
          "min, max: of the wall times; CPU s: median process CPU time of a step (all threads; less sensitive to other jobs); "
          f"peak = {'max allocated during a step above the allocation before it' if args.device == 'cuda' else 'n/a on CPU (one process holds every model)'}")  # fmt: skip
    print(f"{'configuration':<38} {'masks':>5} {'s/step':>8} {'min':>8} {'max':>8} {'CPU s':>8} {'masks/s':>8} {'peak GiB':>9} {'loss':>8}")
    for c in configs:
        peak = f"{max(c.peaks):.2f}" if c.peaks else "n/a"
        s = median[c.name]
        print(f"{c.name:<38} {c.masks:>5} {s:>8.4f} {min(c.times):>8.4f} {max(c.times):>8.4f} {np.median(c.cpu_times):>8.4f} "
              f"{c.masks / s:>8.2f} {peak:>9} {c.loss:>8.4f}")  # fmt: skip
    k1 = median[lora1.name] / median[baseline.name]
    k8 = (lora_k.masks / median[lora_k.name]) / (baseline.masks / median[baseline.name])
    speedup = median[nocache.name] / median[cache.name]
    checks = [
        (f"lora k=1 s/step ≤ {TARGETS['k1']:.1f}× baseline", k1, k1 <= TARGETS["k1"]),
        (f"lora k={k} masks/s ≥ {TARGETS['k8']:.0f}× baseline", k8, k8 >= TARGETS["k8"]),
        (f"cache ≥ {TARGETS['cache']:.0f}× faster than no cache", speedup, speedup >= TARGETS["cache"]),
    ]
    print(f"\ntargets (set for CPU{'; this run is on CUDA' if args.device == 'cuda' else ''}):")
    for what, value, ok in checks:
        print(f"  {what:<40} {value:>8.3f}×  {'PASS' if ok else 'FAIL'}")
    print(f"RESULT lora_k1_step_vs_baseline={k1:.3f} lora_k8_masks_vs_baseline={k8:.3f} cache_vs_nocache={speedup:.3f}")


if __name__ == "__main__":
    main()
