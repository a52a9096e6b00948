"""RepViT (Wang et al., "RepViT: Revisiting Mobile CNN From ViT Perspective", CVPR 2024) as EdgeTAM's
image encoder (Zhou et al., "EdgeTAM: On-Device Track Anything Model", CVPR 2025: RepViT-M1, ImageNet
distilled, in place of SAM 2's Hiera).

Why samtune has its own: transformers' ``EdgeTamModel`` builds its encoder through ``TimmWrapperModel``,
which needs the ``timm`` package, and timm imports torchvision at import (``timm.layers.create_norm``:
``torchvision.ops.misc.FrozenBatchNorm2d``), which pins its own torch release. This module is the same
network in plain torch, with timm's module names (timm 1.0's ``timm/models/repvit.py``, built with
``features_only=True``, whose ``FeatureListNet`` flattens ``stages.i`` to ``stages_i``), so a state dict
of transformers' EdgeTAM (``vision_encoder.backbone.timm_model.*``) or of the official checkpoint
(``image_encoder.trunk.body.*``) loads by a prefix change and an exported model loads in transformers
with timm installed. Checked against timm's own code on stored weights and outputs
(tests/unit/adapters/test_edgetam.py).

Shapes for RepViT-M1 at S = 1024 px (EdgeTAM), four maps, one per stage:
  ``stem`` (two stride-2 3×3 ConvNorm, GELU between)      B×48×S/4×S/4
  ``stages_0``: 2 RepViT blocks                           B×48×S/4×S/4    (256×256)
  ``stages_1``: downsample (stride 2) + 2 blocks          B×96×S/8×S/8    (128×128)
  ``stages_2``: downsample + 14 blocks                    B×192×S/16×S/16 (64×64)
  ``stages_3``: downsample + 2 blocks                     B×384×S/32×S/32 (32×32)

A RepViT block is a MetaFormer block made of convolutions: the token mixer is a depthwise 3×3 ConvNorm
plus a depthwise 1×1 ConvNorm plus identity (RepVGG-style, ``legacy`` layout of the released M1),
then squeeze-and-excitation on every other block (channel attention, its only attention); the channel
mixer is a 1×1 ConvNorm MLP (ratio 2) with a residual. A downsample between stages is a block without
SE, a depthwise stride-2 ConvNorm, a 1×1 ConvNorm to the next width and an MLP with a residual.

BatchNorm always normalises with its stored statistics, also in ``train()`` mode (fine-tuning batches
are small and the statistics come with the checkpoint; the BN scale and shift still train in
``train.mode: full``), as samtune's TinyViT does (adapters/tiny_vit.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from samtune.adapters.tiny_vit import ConvBN


@dataclass(frozen=True)
class RepViTLayout:
    """Widths and block counts per stage; the MLP ratio and token-mixer kernel of every released RepViT."""

    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    mlp_ratio: int = 2
    kernel_size: int = 3

    def __post_init__(self):
        object.__setattr__(self, "embed_dims", tuple(int(v) for v in self.embed_dims))
        object.__setattr__(self, "depths", tuple(int(v) for v in self.depths))
        if len(self.embed_dims) != len(self.depths) or not self.depths or min(self.depths) < 1:
            raise ValueError(f"RepViTLayout: one width and at least one block per stage; got {self}")

    @property
    def stride(self) -> int:
        """Input pixels per cell of the last map (4 for the stem, 2 per later stage)."""
        return 4 * 2 ** (len(self.depths) - 1)


# timm's repvit_m1 (embed_dim (48, 96, 192, 384), depth (2, 2, 14, 2), legacy=True): EdgeTAM's encoder
REPVIT_M1 = RepViTLayout((48, 96, 192, 384), (2, 2, 14, 2))


def se_width(channels: int) -> int:
    """Squeeze width: a quarter of the channels rounded to a multiple of 8, at least 8 (timm's
    ``SqueezeExcite(C, 0.25)``: ``make_divisible(C / 4, 8, round_limit=0)``)."""
    return max(8, int(channels / 4 + 4) // 8 * 8)


# Conv2d without bias + BatchNorm2d (keys ``c.weight``, ``bn.*``): TinyViT's ConvBN is the same block
# with the same key names, as in timm's RepViT
ConvNorm = ConvBN


class RepVggDw(nn.Module):
    """Token mixer: depthwise k×k ConvNorm + depthwise 1×1 ConvNorm + identity (``bn`` is an identity
    in the released ``legacy`` layout: no keys)."""

    def __init__(self, dim: int, kernel_size: int):
        super().__init__()
        self.conv = ConvNorm(dim, dim, kernel_size, 1, (kernel_size - 1) // 2, groups=dim)
        self.conv1 = ConvNorm(dim, dim, 1, 1, 0, groups=dim)
        self.bn = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)


class SqueezeExcite(nn.Module):
    """x · sigmoid(fc2(relu(fc1(mean over H, W of x)))): 1×1 convolutions with bias (keys ``fc1``, ``fc2``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, se_width(channels), 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(se_width(channels), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class RepVitMlp(nn.Module):
    """Channel mixer: 1×1 ConvNorm to ``hidden``, GELU, 1×1 ConvNorm back (its BN scale starts at 0:
    a new block starts as the identity)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.conv1 = ConvNorm(dim, hidden)
        self.act = nn.GELU()
        self.conv2 = ConvNorm(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class RepViTBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: int, kernel_size: int, use_se: bool):
        super().__init__()
        self.token_mixer = RepVggDw(dim, kernel_size)
        self.se = SqueezeExcite(dim) if use_se else nn.Identity()
        self.channel_mixer = RepVitMlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.token_mixer(x))
        return x + self.channel_mixer(x)


class RepVitStem(nn.Module):
    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.conv1 = ConvNorm(in_chans, out_chans // 2, 3, 2, 1)
        self.act1 = nn.GELU()
        self.conv2 = ConvNorm(out_chans // 2, out_chans, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act1(self.conv1(x)))


class RepVitDownsample(nn.Module):
    """Between stages: a block without SE, a depthwise stride-2 ConvNorm, a 1×1 ConvNorm to the new
    width, and an MLP with a residual."""

    def __init__(self, dim: int, mlp_ratio: int, out_dim: int, kernel_size: int):
        super().__init__()
        self.pre_block = RepViTBlock(dim, mlp_ratio, kernel_size, use_se=False)
        self.spatial_downsample = ConvNorm(dim, dim, kernel_size, 2, (kernel_size - 1) // 2, groups=dim)
        self.channel_downsample = ConvNorm(dim, out_dim, 1, 1)
        self.ffn = RepVitMlp(out_dim, out_dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_downsample(self.spatial_downsample(self.pre_block(x)))
        return x + self.ffn(x)


class RepVitStage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int, mlp_ratio: int, kernel_size: int, downsample: bool):
        super().__init__()
        self.downsample = RepVitDownsample(in_dim, mlp_ratio, out_dim, kernel_size) if downsample else nn.Identity()
        # squeeze-and-excitation on the first block of a stage and every other one after it
        self.blocks = nn.Sequential(*(RepViTBlock(out_dim, mlp_ratio, kernel_size, use_se=i % 2 == 0) for i in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class RepViTFeatures(nn.Module):
    """B×3×S×S -> one B×C_i×S/(4·2^i)×S/(4·2^i) map per stage, as timm's ``features_only`` RepViT
    (module names ``stem``, ``stages_0`` ..., no classifier)."""

    def __init__(self, layout: RepViTLayout, in_chans: int = 3):
        super().__init__()
        self.layout = layout
        dims = layout.embed_dims
        self.stem = RepVitStem(in_chans, dims[0])
        for i, depth in enumerate(layout.depths):
            stage = RepVitStage(dims[max(i - 1, 0)], dims[i], depth, layout.mlp_ratio, layout.kernel_size, downsample=i > 0)
            self.add_module(f"stages_{i}", stage)

    @property
    def stages(self) -> list[RepVitStage]:
        return [getattr(self, f"stages_{i}") for i in range(len(self.layout.depths))]

    def train(self, mode: bool = True):
        """Batch statistics never replace the stored ones (see the module docstring)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        stride = self.layout.stride
        if pixel_values.shape[-1] % stride or pixel_values.shape[-2] % stride:
            raise ValueError(f"RepViT: input {tuple(pixel_values.shape[-2:])} px is not a multiple of {stride}")
        x = self.stem(pixel_values)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
