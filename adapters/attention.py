"""SAM's image-encoder attention with the decomposed relative-position bias folded into q·k.

SAM (after MViTv2) adds to every attention logit a bias that depends on the query and on the key's
row and column: ``logit[q, (i, j)] = scale·q·k + rel_h[q, i] + rel_w[q, j]`` with rel_h = q·R_h
(Kh values per query) and rel_w = q·R_w (Kw values). transformers' ``SamVisionSdpaAttention``
expands that to a dense B·heads×N×N float ``attn_mask``, which costs N² memory (N = 4096 tokens in
the global blocks at 1024 px: 64 MiB per image and head in float32) and rules out the flash kernel.
Here the bias becomes part of the dot product instead, by widening query and key:

    q' = [scale·q, rel_h (Kh), rel_w (Kw), 0…]      k' = [k, one-hot(row of k) (Kh), one-hot(col of k) (Kw), 0…]

so that q'·k' = scale·q·k + rel_h[row(k)] + rel_w[col(k)] exactly, and SDPA runs with scale=1 and
no mask. The zeros pad the width to a multiple of 8 (the fused kernels' alignment).

Cost: the q·k product widens from head_dim to head_dim + Kh + Kw. For ViT-B at 1024 px in a global
block (head_dim 64, grid 64×64) that is 64 → 192, so q·k FLOPs triple (2·N²·192 instead of
2·N²·64), the p·v product stays at 64, and attention as a whole goes from 2·N²·128 to 2·N²·256
(2×) — or to 2·N²·384 (3×) when v is zero-padded for the flash kernel, see
``FusedRelPosAttention._pad_value``. In exchange no N×N tensor is read or written: the transformers
path builds the bias (2 einsums + a broadcast add, N²·heads per image) and the kernel reads it
back, in forward and backward. In the windowed blocks (14×14 windows, N = 196) the width goes
64 → 92, padded to 96; their N² is small, so the gain, if any, is in the global blocks.

Whether this is faster is a GPU question (on CPU the math kernel is used; see below). Measure it
with the training-step benchmark, which runs sdpa and fused_relpos side by side:

    python benchmarks/train_step.py --device cuda --variant vit_b --image-size 1024 --batch 4

(s/step and peak GiB for bf16 with and without checkpointing; repeat with
``FusedRelPosAttention.pad_value_for_flash = False`` to compare flash with the efficient kernel.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.sam.modeling_sam import (
    SamVisionAttention,
    SamVisionSdpaAttention,
)


def _flash_could_run(cuda_capability: tuple[int, int], width: int, training: bool) -> bool:
    """PyTorch's own gates for its flash kernel (sdp_utils.cpp): sm80+, head dim ≤ 256, and no
    backward with a head dim in (192, 224] on sm86-89 and sm120-121
    (check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120)."""
    narrow_backward = (8, 6) <= cuda_capability <= (8, 9) or (12, 0) <= cuda_capability <= (12, 1)
    return cuda_capability >= (8, 0) and width <= 256 and not (training and narrow_backward and 192 < width <= 224)


class FusedRelPosAttention(SamVisionSdpaAttention):
    """SamVisionAttention whose rel-pos bias rides in widened q/k: one SDPA call, no N×N mask.

    Same parameters, state-dict keys and child modules as transformers' classes (it only replaces
    ``forward``), so an existing module can be switched in place; see ``set_vision_attention``.
    """

    # Set False to keep v at head_dim on CUDA (efficient kernel) instead of padding it (flash).
    pad_value_for_flash = True

    def forward(self, hidden_states: torch.Tensor, output_attentions=None) -> tuple[torch.Tensor, None]:
        batch, height, width, _ = hidden_states.shape  # B×h×w×C (B = images × windows)
        tokens, heads = height * width, self.num_attention_heads
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # each B×heads×N×d
        head_dim = query.shape[-1]
        dropout = self.dropout if self.training else 0.0  # as eager; transformers' SDPA class ignores it
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=self.scale)
        else:
            query_aug, key_aug = self._widen(query, key, height, width)
            pad_v = query_aug.shape[-1] - head_dim if self._pad_value(query_aug) else 0
            value = F.pad(value, (0, pad_v)) if pad_v else value
            out = F.scaled_dot_product_attention(query_aug, key_aug, value, dropout_p=dropout, scale=1.0)
            out = out[..., :head_dim] if pad_v else out  # the padded v columns are zero: drop them
        out = out.reshape(batch, heads, height, width, head_dim).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
        return self.proj(out), None

    def _widen(self, query: torch.Tensor, key: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(q', k'), each B×heads×N×D with D = d + h + w rounded up to a multiple of 8."""
        batch, heads, tokens, head_dim = query.shape
        # get_rel_pos picks (and interpolates, when the table was made for another grid) the
        # embedding of every (query row, key row) offset: h×h×d and w×w×d.
        table_h = self.get_rel_pos(height, height, self.rel_pos_h)
        table_w = self.get_rel_pos(width, width, self.rel_pos_w)
        grid = query.reshape(batch, heads, height, width, head_dim)  # unscaled q, as transformers uses
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, table_h).reshape(batch, heads, tokens, height)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, table_w).reshape(batch, heads, tokens, width)
        wide = head_dim + height + width
        pad = -wide % 8
        query_aug = torch.cat(
            [query * self.scale, rel_h.to(query.dtype), rel_w.to(query.dtype), query.new_zeros(batch, heads, tokens, pad)], dim=-1
        )
        # Key token t sits at row t // w, column t % w (the B×h×w×C input flattened row-major);
        # its one-hots pick rel_h[·, row] and rel_w[·, col] out of the query's extra columns.
        index = torch.arange(tokens, device=key.device)
        position = torch.cat([F.one_hot(index // width, height), F.one_hot(index % width, width)], dim=-1)
        position = F.pad(position, (0, pad)).to(key.dtype)  # N×(h + w + pad), shared by batch and heads
        key_aug = torch.cat([key, position.expand(batch, heads, tokens, -1)], dim=-1)
        return query_aug, key_aug

    def _pad_value(self, query_aug: torch.Tensor) -> bool:
        """Whether to zero-pad v to q'/k''s width so that PyTorch's flash kernel can be chosen.

        SDPA itself takes a v narrower than q/k (query ...×L×E, value ...×S×Ev; the output is
        ...×L×Ev), but the kernels differ (aten/src/ATen/native/transformers/cuda/sdp_utils.cpp):
        flash needs q, k and v of one head dim ≤ 256 (check_head_dim_size_flash) and fp16/bf16;
        the efficient (cutlass) kernel takes E ≠ Ev, each a multiple of 8 (4 in fp32 on sm80+)
        (check_head_dim_size_mem_efficient); cuDNN is last in the default order. So: unpadded v
        (192 | 64 for ViT-B global blocks) gets the efficient kernel; padded v (192 | 192) gets
        flash, at 1.5× the attention FLOPs of the unpadded one (p·v at 192 wide, 2/3 of it on
        zeros). Flash 2 is usually well over 1.5× the efficient kernel's throughput on sm80/sm90,
        so padding is the default where flash can run; the GPU benchmark must confirm it.
        CPU's fused kernel wants equal dims too (sdp_utils_cpp.cpp), but v stays unpadded there:
        the math kernel runs (N×N weights in memory, yet no bias tensor); CPU is for tests.
        """
        if not (self.pad_value_for_flash and query_aug.is_cuda and query_aug.dtype in (torch.float16, torch.bfloat16)):
            return False  # fp32: no flash kernel at all, the efficient one takes the narrow v
        capability = torch.cuda.get_device_capability(query_aug.device)
        return _flash_could_run(capability, query_aug.shape[-1], torch.is_grad_enabled())


ATTENTION_KINDS = {"sdpa": SamVisionSdpaAttention, "eager": SamVisionAttention, "fused_relpos": FusedRelPosAttention}


def set_vision_attention(model: torch.nn.Module, kind: str) -> int:
    """Switch every SAM image-encoder attention in ``model`` to ``kind``; returns how many switched.

    The class is swapped in place (``module.__class__``) rather than the module rebuilt: weights,
    module names (``vision_encoder.layers.N.attn.qkv``, peft's LoRA targets), peft's LoRA wrappers
    inside and optimizer references all stay. Works on a SamModel, a bare vision encoder or a
    PeftModel around either, since modules are found by type, not by path.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown vision attention kind {kind!r}; known: {', '.join(ATTENTION_KINDS)}")
    target = ATTENTION_KINDS[kind]
    switched = 0
    for module in model.modules():
        if isinstance(module, SamVisionAttention):  # all three kinds derive from it
            module.__class__ = target
            switched += 1
    return switched
