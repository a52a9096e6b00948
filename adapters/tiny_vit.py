"""TinyViT (Wu et al., "TinyViT: Fast Pretraining Distillation for Small Vision Transformers", ECCV 2022)
as MobileSAM's image encoder (Zhang et al., "Faster Segment Anything", 2023).

MobileSAM distils SAM ViT-H's encoder into TinyViT-5M and keeps SAM's prompt encoder and mask
decoder. This module is that encoder, written from the paper and the public checkpoint: module
and parameter names are those of the official ``mobile_sam.pt``'s ``image_encoder.*`` keys
(``mobile_sam/modeling/tiny_vit_sam.py``), so loading one is a prefix change. Pure torch.

Shapes for TinyViT-5M at S = 1024 px (MobileSAM): B×3×S×S normalised pixels
  -> ``patch_embed`` (two stride-2 3×3 conv+BN)            B×64×S/4×S/4      (256×256)
  -> ``layers.0``: MBConv blocks, then patch merging (s2)  B×(S/8)²×128      (128×128 tokens)
  -> ``layers.1``: 2 TinyViT blocks (window 7), merge (s2) B×(S/16)²×160     (64×64)
  -> ``layers.2``: 6 TinyViT blocks (window 14), merge (s1) B×(S/16)²×320    (64×64; MobileSAM's stride-1 merge)
  -> ``layers.3``: 2 TinyViT blocks (window 7)             B×(S/16)²×320
  -> ``neck`` (SAM's: 1×1 conv, LN2d, 3×3 conv, LN2d)       B×256×S/16×S/16   (64×64 image embeddings)

A TinyViT block is window attention with a learnt per-head bias for each (|dy|, |dx|) offset
inside the window (LeViT's attention bias; no position embedding anywhere, so any image size that
is a multiple of 16 runs with the same weights), a depthwise 3×3 conv+BN, and an MLP; the
attention and the MLP each carry their own pre-LayerNorm (``attn.norm``, ``mlp.norm``).

Differences from the reference code, none of them numerical: the attention runs through
``F.scaled_dot_product_attention`` with the bias table as its additive mask (the reference
caches the gathered bias in eval mode; it is gathered on every call here, so it can train);
feature-map sizes come from the input instead of being fixed at construction (the reference
hard-codes a 64×64 output grid); TinyViT's ImageNet classifier (``norm_head``, ``head``), which
MobileSAM never runs, is left out (samtune.adapters.mobile_sam drops those keys on load and writes
neutral ones on export); and BatchNorm always normalises with its stored statistics, also in
``train()`` mode (fine-tuning batches are small and the statistics come with the checkpoint; in
``train.mode: full`` the BN scale and shift still train), as detectron2's FrozenBatchNorm does.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyViTConfig:
    """Stage layout; stage 0 is convolutional (MBConv), stages 1.. are TinyViT blocks.

    ``downsample_strides[i]`` is the stride of the patch merging after stage i (one fewer than
    stages); with the 4× patch embedding the encoder's total stride is 4·prod(strides), 16 for
    MobileSAM (whose reference code picks stride 1 for the last merge by its output width, 320).
    """

    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)  # stage 0 (MBConv) has no attention: unused
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)  # stage 0: unused
    downsample_strides: tuple[int, ...] = (2, 2, 1)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    in_chans: int = 3
    out_chans: int = 256  # image-embedding width (SAM's prompt/decoder width)
    drop_path_rate: float = 0.0  # stochastic depth, linear over all blocks; 0 = off (MobileSAM, fine-tuning)

    def __post_init__(self):
        for name in ("embed_dims", "depths", "num_heads", "window_sizes", "downsample_strides"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        n = len(self.embed_dims)
        if not (len(self.depths) == len(self.num_heads) == len(self.window_sizes) == n and len(self.downsample_strides) == n - 1 and n >= 2):
            raise ValueError(f"TinyViTConfig: {n} stages need {n} depths/num_heads/window_sizes and {n - 1} downsample_strides; got {self}")
        for dim, heads in zip(self.embed_dims[1:], self.num_heads[1:]):
            if dim % heads:
                raise ValueError(f"TinyViTConfig: width {dim} is not divisible by {heads} heads")

    @property
    def stride(self) -> int:
        """Input pixels per image-embedding cell (16 for MobileSAM)."""
        out = 4
        for s in self.downsample_strides:
            out *= s
        return out

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drop a sample's residual branch with probability p."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


def _drop_path(p: float) -> nn.Module:
    return DropPath(p) if p > 0.0 else nn.Identity()


class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (keys ``c.weight``, ``bn.*``)."""

    def __init__(self, in_chans, out_chans, kernel_size=1, stride=1, padding=0, groups=1, bn_weight_init=1.0):
        super().__init__()
        self.add_module("c", nn.Conv2d(in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(out_chans))
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)


class PatchEmbed(nn.Module):
    """B×3×S×S -> B×D×S/4×S/4: two stride-2 3×3 ConvBN with a GELU between (keys ``seq.0``, ``seq.2``)."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, embed_dim // 2, 3, 2, 1), nn.GELU(), ConvBN(embed_dim // 2, embed_dim, 3, 2, 1))

    def forward(self, x):
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual (MobileNetV2): 1×1 expand, 3×3 depthwise, 1×1 project; B×C×H×W -> same."""

    def __init__(self, dim: int, expand_ratio: float, drop_path: float):
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, dim, bn_weight_init=0.0)  # the block starts as the identity (+ GELU)
        self.act3 = nn.GELU()
        self.drop_path = _drop_path(drop_path)

    def forward(self, x):
        shortcut = x
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        x = self.drop_path(self.conv3(x))
        return self.act3(x + shortcut)


class PatchMerging(nn.Module):
    """B×C×H×W -> B×(H/s·W/s)×C' tokens: 1×1 ConvBN, GELU, depthwise 3×3 ConvBN with stride s, GELU, 1×1 ConvBN."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.act = nn.GELU()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x)  # B×C'×H'×W'


class Mlp(nn.Module):
    """Pre-LN MLP on tokens: LayerNorm, fc1, GELU, fc2 (keys ``norm``, ``fc1``, ``fc2``)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


def _offset_index(window: int) -> tuple[int, torch.Tensor]:
    """(number of distinct offsets, N×N index of the (|dy|, |dx|) offset of each query/key pair),
    N = window²; offsets numbered in order of first appearance, as the reference does (the
    checkpoint's ``attention_biases`` columns follow this order)."""
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    idxs = []
    for p1 in points:
        for p2 in points:
            offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
            idxs.append(offsets.setdefault(offset, len(offsets)))
    return len(offsets), torch.tensor(idxs, dtype=torch.long).view(len(points), len(points))


class Attention(nn.Module):
    """Multi-head self-attention within one window with a learnt bias per head and offset.

    ``qkv`` is one Linear whose output is laid out per head as [q (d) | k (d) | v (d)], d = C/heads
    (TinyViT's attn_ratio = 1); ``attention_biases`` is heads×window² (one value per (|dy|, |dx|)).
    """

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        n_offsets, idxs = _offset_index(window)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, n_offsets))
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)  # N×N, rebuilt from the window size

    def forward(self, x):  # x: B'×N×C (B' = batch · windows, N = window²)
        batch, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=3)  # each B'×heads×N×d
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # heads×N×N
        # scale d^-0.5, as the reference; the mask given 4-D (1×heads×N×N): a 3-D mask sends PyTorch's CPU
        # attention to its slow path (2.8× slower on 256 windows of 7×7, same results; MobileSAM encoder at 512 px
        # 0.497 -> 0.434 s per image: benchmarks/backbones.py --models mobile-sam --image-size 512 --batch 1 --threads 1,
        # 2-core EPYC)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None])
        return self.proj(out.transpose(1, 2).reshape(batch, n, self.num_heads * self.head_dim))


class TinyViTBlock(nn.Module):
    """Window attention + residual, depthwise ConvBN (``local_conv``), MLP + residual; B×H·W×C tokens.

    The feature map is zero-padded at the bottom/right to whole windows; padded tokens take part
    in the attention of their window (as in the reference) and are cut off afterwards.
    """

    def __init__(self, dim, num_heads, window_size, mlp_ratio, local_conv_size, drop_path):
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)
        self.drop_path = _drop_path(drop_path)

    def forward(self, x, height: int, width: int):  # x: B×L×C, L = H·W
        batch, length, channels = x.shape
        w = self.window_size
        pad_b, pad_r = (w - height % w) % w, (w - width % w) % w
        windows = x.view(batch, height, width, channels)
        if pad_b or pad_r:
            windows = F.pad(windows, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = height + pad_b, width + pad_r
        nh, nw = ph // w, pw // w
        windows = windows.view(batch, nh, w, nw, w, channels).transpose(2, 3).reshape(batch * nh * nw, w * w, channels)
        attended = self.attn(windows)  # B·nh·nw × w² × C
        attended = attended.view(batch, nh, nw, w, w, channels).transpose(2, 3).reshape(batch, ph, pw, channels)
        if pad_b or pad_r:
            attended = attended[:, :height, :width].contiguous()
        x = x + self.drop_path(attended.view(batch, length, channels))
        x = self.local_conv(x.transpose(1, 2).reshape(batch, channels, height, width))  # B×C×H×W
        x = x.view(batch, channels, length).transpose(1, 2)
        return x + self.drop_path(self.mlp(x))


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks on B×C×H×W, then patch merging to tokens (keys ``blocks.j``, ``downsample``)."""

    def __init__(self, dim, depth, expand_ratio, drop_paths, downsample: PatchMerging | None):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio, drop_paths[j]) for j in range(depth))
        self.downsample = downsample

    def forward(self, x):  # B×C×H×W -> B×C'×H'×W'
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class BasicLayer(nn.Module):
    """Stage i ≥ 1: TinyViT blocks on tokens, then (except the last stage) patch merging."""

    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio, local_conv_size, drop_paths, downsample: PatchMerging | None):
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size, drop_paths[j]) for j in range(depth)
        )
        self.downsample = downsample

    def forward(self, x):  # B×C×H×W -> B×C'×H'×W' (tokens inside)
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # B×H·W×C
        for block in self.blocks:
            tokens = block(tokens, height, width)
        x = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return self.downsample(x) if self.downsample is not None else x


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of B×C×H×W (SAM's neck norm, eps 1e-6)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class TinyViT(nn.Module):
    """B×3×S×S normalised pixels -> B×out_chans×S/16×S/16 image embeddings (S a multiple of the stride)."""

    def __init__(self, config: TinyViTConfig = TinyViTConfig()):
        super().__init__()
        self.config = config
        dims, depths = config.embed_dims, config.depths
        self.patch_embed = PatchEmbed(config.in_chans, dims[0])
        rates = torch.linspace(0, config.drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            drop_paths = rates[sum(depths[:i]) : sum(depths[: i + 1])]
            last = i == len(depths) - 1
            downsample = None if last else PatchMerging(dims[i], dims[i + 1], config.downsample_strides[i])
            if i == 0:
                layer = ConvLayer(dims[0], depth, config.mbconv_expand_ratio, drop_paths, downsample)
            else:
                layer = BasicLayer(
                    dims[i], depth, config.num_heads[i], config.window_sizes[i], config.mlp_ratio, config.local_conv_size,
                    drop_paths, downsample,
                )  # fmt: skip
            self.layers.append(layer)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )
        self.apply(_init_weights)

    def train(self, mode: bool = True):
        """Batch statistics never replace the stored ones (see the module docstring)."""
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
        return self

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        stride = self.config.stride
        if pixel_values.shape[-1] % stride or pixel_values.shape[-2] % stride:
            raise ValueError(f"TinyViT: input {tuple(pixel_values.shape[-2:])} px is not a multiple of {stride}")
        x = self.patch_embed(pixel_values)  # B×D0×S/4×S/4
        for layer in self.layers:
            x = layer(x)  # B×D(i+1)×S/(4·s0·…·si)×…
        return self.neck(x)  # B×out_chans×S/16×S/16


def _init_weights(module: nn.Module) -> None:
    """The reference's random initialisation (truncated normal 0.02 for Linear, unit LayerNorm);
    convolutions keep torch's default, BatchNorm the values set in ConvBN."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
