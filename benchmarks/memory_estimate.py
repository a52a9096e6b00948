"""Peak memory of one training step of a recipe, estimated without a GPU and without weights.

The recipe's model is built from its architecture (random init) under PyTorch's ``FakeTensorMode``
(shapes and dtypes only, no storage), and one step runs as the trainer runs it (LoRA / mode,
``model.attention``, ``train.precision``, ``train.gradient_checkpointing``, ``loss.resolution``,
``prompts.per_image`` objects per image, corrective rounds, the AdamW step and its state), tracked by
``torch.distributed._tools.mem_tracker.MemTracker``: parameters, gradients, optimiser state,
activations saved for the backward pass and temporaries, at their peak.

Attention is costed as a CUDA fused kernel keeps it (``--kernels cuda``, default: inputs, output and
a log-sum-exp saved, never an N×N matrix; the CPU's own dispatch would take the math path), and
MONAI's Dice + focal is replaced by a stand-in with the same tensor shapes (MONAI checks values,
which fake tensors do not have). Not seen: kernels' workspaces, allocator fragmentation, and the
CUDA context (~0.5 GB, in ``nvidia-smi`` only).

Calibration against the H100 figures in docs/explanation/measured.md (ViT-B @ 1024, batch 4, sdpa;
``benchmarks/train_step.py``, ``torch.cuda.max_memory_allocated``), estimate / measured in GiB:
fp32 22.70 / 23.6, bf16 12.26 / 12.8, fp32 + checkpointing 7.47 / 7.7, bf16 + checkpointing
4.32 / 4.5: 3–4 % low each time. Measure on the GPU when you have one.

    python benchmarks/memory_estimate.py recipes/medical/ct_organs_medsam_12gb.yaml
    python benchmarks/memory_estimate.py recipes/medical/ct_organs_medsam.yaml train.batch_size=2 --budget-gb 24
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import SamModel

sys.path.insert(0, str(Path(__file__).parent))
from encoder_speed import sam_config  # noqa: E402

from samtune.adapters.lora import prepare_trainable  # noqa: E402
from samtune.adapters.registry import family_of, get_variant  # noqa: E402
from samtune.datasets import sample as S  # noqa: E402
from samtune.finetune.automatic import class_low_res  # noqa: E402
from samtune.finetune.interaction import run_rounds  # noqa: E402
from samtune.finetune.train.losses import AutomaticLoss  # noqa: E402
from samtune.finetune.train.optim import build_optimizer  # noqa: E402
from samtune.finetune.recipe import load_recipe  # noqa: E402
from samtune.finetune.runtime import image_size_of  # noqa: E402
from train_step import make_batch  # noqa: E402


def build_architecture(recipe):
    """The recipe's model with random weights (same shapes as its checkpoint)."""
    variant = get_variant(recipe.model.name)
    if variant.family == "sam3":  # SAM 3's image model at the release's configuration (adapters/sam3_model.py)
        from samtune.adapters.sam3 import _ready
        from samtune.adapters.sam3_config import released_config
        from samtune.adapters.sam3_model import Sam3Segmenter

        config = variant.make_config(image_size_of(recipe)) if variant.make_config is not None else released_config(image_size_of(recipe))
        return _ready(Sam3Segmenter(config))
    if variant.family != "sam":
        raise SystemExit(f"memory_estimate.py builds SAM ViT and SAM 3 architectures; model.name={recipe.model.name!r} is of family {variant.family!r}")
    size = image_size_of(recipe)
    config = variant.make_config(size) if variant.make_config is not None else sam_config(variant.official_variant, size)
    return SamModel(config)


class FusedAttentionStandIn(torch.autograd.Function):
    """The memory of a CUDA fused attention kernel (flash / memory-efficient): the forward keeps
    q, k, v (and a mask, if any), the output and a per-row log-sum-exp, never an N×N matrix; the
    backward makes one gradient per input. The CPU's SDPA would take its math path here (N×N
    probabilities), which a GPU does not."""

    @staticmethod
    def forward(ctx, query, key, value, mask):
        ctx.save_for_backward(query, key, value, mask)
        ctx.lse = query.new_empty(query.shape[:-1], dtype=torch.float32)  # B×heads×N
        return query.new_empty(*query.shape[:-1], value.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        query, key, value, mask = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), torch.empty_like(mask) if ctx.needs_input_grad[3] else None


def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    mask = attn_mask if attn_mask is not None else query.new_empty(0)
    return FusedAttentionStandIn.apply(query, key, value, mask)


def mask_loss_stand_in(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice + BCE with the shapes of MONAI's DiceFocalLoss(reduction="none") (N×M×H×W out, same-sized
    temporaries): MONAI checks target values, which fake tensors do not have."""
    probs = torch.sigmoid(logits)
    dice = 1 - (2 * (probs * target).sum((2, 3), keepdim=True) + 1) / (probs.sum((2, 3), keepdim=True) + target.sum((2, 3), keepdim=True) + 1)
    return dice + 20 * torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")


def adopt_fake_tensors(model, fake) -> None:
    """peft deep-copies the modules it trains whole (``modules_to_save``), and a deep-copied fake
    tensor belongs to a new fake mode, which the running one refuses; give those a tensor of the
    running mode (same shape, dtype, requires_grad: the values do not matter here)."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is not None and getattr(tensor, "fake_mode", fake) is not fake:
                    new = torch.empty(tensor.shape, dtype=tensor.dtype)
                    store[name] = torch.nn.Parameter(new, requires_grad=tensor.requires_grad) if store is module._parameters else new


def estimate(recipe, classes: int, kernels: str = "cuda") -> dict:
    """Peak bytes by kind (parameters, gradients, optimiser state, activations, temporaries) of
    one step of each path the recipe trains (prompted, automatic)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    family = family_of(recipe.model.name)
    size, batch_size = image_size_of(recipe), recipe.train.batch_size
    paths = {"promptable": ["prompted"], "automatic": ["automatic"], "both": ["prompted", "automatic"]}[recipe.task]
    results = {}
    real_batch = make_batch(batch_size, recipe.prompts.per_image, size, "cpu")  # drawn for real: box corners are data
    for path in paths:
        with FakeTensorMode() as fake:
            base = build_architecture(recipe)
            if recipe.task != "promptable":
                family.add_class_prompts(base, classes, recipe.automatic.tokens, seed=recipe.seed)
            if recipe.train.gradient_checkpointing:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            # peft moves each new LoRA layer to its base layer's device with Module.to(), which cannot
            # swap fake parameters; everything is on the CPU here, so moves are skipped meanwhile
            move, torch.nn.Module.to = torch.nn.Module.to, lambda self, *args, **kwargs: self
            try:
                model = prepare_trainable(base, family, recipe.train.mode, recipe.adapter.lora).train()
            finally:
                torch.nn.Module.to = move
            adopt_fake_tensors(model, fake)
            family.set_attention(model, recipe.model.attention)
            optimizer = build_optimizer(model, recipe.train)
            batch = {k: fake.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in real_batch.items()}
            tracker = MemTracker()
            # MemTracker hooks the gradient of every parameter it meets, frozen ones too (an error);
            # without those hooks gradients are still counted, under another kind
            track = tracker._track_module_params_and_buffers
            tracker._track_module_params_and_buffers = lambda module, install_grad_hooks=True: track(module, False)
            tracker.track_external(model, optimizer)
            low_res = recipe.loss.resolution == "low_res"
            sdpa = torch.nn.functional.scaled_dot_product_attention
            if kernels == "cuda":
                torch.nn.functional.scaled_dot_product_attention = fused_sdpa
            # train.precision auto is bf16 on the GPUs this estimates for (Ampere and newer)
            with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.train.precision in ("bf16", "auto")):
                if path == "prompted":
                    _, loss = run_rounds(model, family, batch, recipe.prompts, size, True, torch.Generator(), mask_loss_stand_in,
                                         recipe.loss.iou_weight, low_res_loss=low_res)  # fmt: skip
                else:
                    labels = torch.zeros(batch_size, size, size, dtype=torch.uint8)
                    logits = class_low_res(model, family, batch[S.IMAGE])  # the class loss is always at the decoder's s×s
                    loss = AutomaticLoss(1.0, 20.0)(logits, labels)
                loss.backward()
                optimizer.step()
            torch.nn.functional.scaled_dot_product_attention = sdpa
            peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
        results[path] = {getattr(k, "name", k).lower(): v for k, v in peak.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key.path=value, as on the samtune command line")
    parser.add_argument("--classes", type=int, default=13, help="classes of the automatic path (K class prompts); default 13 (BTCV)")
    parser.add_argument("--kernels", choices=["cuda", "cpu"], default="cuda",
                        help="attention memory as a CUDA fused kernel keeps it (default) or as the CPU's dispatch does")
    parser.add_argument("--budget-gb", type=float, default=None, help="print PASS/FAIL against this many GiB (default: from the file name, *_12gb.yaml)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    budget = args.budget_gb
    if budget is None and Path(args.recipe).stem.split("_")[-1].endswith("gb"):
        budget = float(Path(args.recipe).stem.split("_")[-1][:-2])
    t = recipe.train
    print(f"{args.recipe}: {recipe.model.name} @ {image_size_of(recipe)} px, batch {t.batch_size} x {recipe.prompts.per_image} objects, "
          f"{t.mode}, {t.precision}, checkpointing {t.gradient_checkpointing}, attention {recipe.model.attention}, loss at {recipe.loss.resolution}")  # fmt: skip
    started = time.perf_counter()
    worst = 0.0
    for path, peak in estimate(recipe, args.classes, args.kernels).items():
        gib = {k: v / 2**30 for k, v in peak.items()}
        worst = max(worst, gib["total"])
        parts = ", ".join(f"{k} {v:.2f}" for k, v in gib.items() if k != "total" and v > 0.005)
        print(f"  {path:9s} peak {gib['total']:6.2f} GiB  ({parts})")
    verdict = "" if budget is None else (" PASS" if worst <= budget else " FAIL") + f" (budget {budget:g} GiB)"
    print(f"RESULT peak_gib={worst:.2f} estimated=fake_tensors_{args.kernels}_attention{verdict}  [{time.perf_counter() - started:.0f} s]")


if __name__ == "__main__":
    main()
