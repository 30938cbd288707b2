"""CLIP-ConvNeXT-XXL from scratch: the paper's second base encoder (the ConvNeXt rows of Tab. 1 and Tab. 2),
the visual trunk of open_clip's `laion/CLIP-convnext_xxlarge-laion2B-s34B-b82K-augreg-soup`.

A timm-style ConvNeXt (Liu et al. 2022): a stride-4 patchify stem, then four stages (depths 3-4-30-3, widths
384-768-1536-3072) of depthwise-7×7 blocks, stages 1-3 opened by a stride-2 downsample. OLA-VLM feeds the LLM
the last stage's map, flattened row-major: 768 px / 32 = 24×24 = 576 tokens × 3072 channels. The CLIP head
(`trunk.head.*` pooling norm, `head.proj`) and the text tower are not used.

`ConvNeXt` is a vision tower (see encoders.py): `kind`, `config`, `image_size`, `grid`, `num_tokens`, `width`,
`features`, `preprocess`, `from_pretrained`. Our parameter names are open_clip's trunk names, so the
checkpoint
key of ours is just `visual.trunk.` + ours."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from preprocess import clip_preprocess
from weights import load_strict, read_state_dict

STRIDE = 32  # stem 4 × three stride-2 downsamples


@dataclass
class ConvNeXtConfig:
    """Defaults: convnext_xxlarge, the trunk of CLIP-ConvNeXT-XXL, at OLA-VLM's 768 px (Tab. 1-2)."""

    image_size: int = 768
    depths: tuple[int, ...] = (3, 4, 30, 3)
    dims: tuple[int, ...] = (384, 768, 1536, 3072)
    layer_norm_eps: float = 1e-5  # timm's convnext_xxlarge sets norm_eps=1e-5 on every LayerNorm

    def __post_init__(self) -> None:
        self.depths = tuple(self.depths)
        self.dims = tuple(self.dims)
        if len(self.depths) != len(self.dims) or not self.depths:
            raise ValueError(
                f"depths {self.depths} and dims {self.dims} must name the same (>0) number of stages"
            )

    @classmethod
    def tiny(cls) -> ConvNeXtConfig:
        """A CPU-test size: 256 px -> 8×8 = 64 tokens of width 64."""
        return cls(image_size=256, depths=(1, 1, 2, 1), dims=(16, 32, 48, 64))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)  # (B, C, H, W)


class Mlp(nn.Module):
    """Linear(C, 4C) -> exact GELU -> Linear(4C, C), on channels-last tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """x + gamma · Mlp(LayerNorm(DWConv7×7(x))), the ConvNeXt block with layer scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))  # layer scale; the checkpoint overwrites it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.gamma * self.mlp(self.norm(y))
        return x + y.permute(0, 3, 1, 2)  # (B, C, H, W)


class Stage(nn.Module):
    """An optional stride-2 downsample (LayerNorm2d + 2×2 conv), then `depth` blocks."""

    def __init__(self, in_dim: int, dim: int, depth: int, eps: float, downsample: bool):
        super().__init__()
        if downsample:
            self.downsample = nn.Sequential(LayerNorm2d(in_dim, eps=eps), nn.Conv2d(in_dim, dim, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[Block(dim, eps) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXt(nn.Module):
    """The convnext_xxlarge trunk: stem -> stages (norm_pre is Identity), features flattened row-major."""

    kind = "convnext"

    def __init__(self, config: ConvNeXtConfig):
        super().__init__()
        self.config = c = config
        stem_conv = nn.Conv2d(3, c.dims[0], kernel_size=4, stride=4)
        self.stem = nn.Sequential(stem_conv, LayerNorm2d(c.dims[0], eps=c.layer_norm_eps))
        stages = []
        in_dim = c.dims[0]
        for i, (depth, dim) in enumerate(zip(c.depths, c.dims)):
            stages.append(Stage(in_dim, dim, depth, c.layer_norm_eps, downsample=i > 0))
            in_dim = dim
        self.stages = nn.ModuleList(stages)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def grid(self) -> int:
        return self.config.image_size // STRIDE  # 24 at 768 px

    @property
    def num_tokens(self) -> int:
        return self.grid**2  # 576 at 768 px

    @property
    def width(self) -> int:
        return self.config.dims[-1]  # 3072

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) CLIP pixels -> last-stage map flattened row-major, (B, (S // 32)², C): (B, 576, 3072)
        at 768 px. Any side works: the stride-4 stem and stride-2 downsamples floor."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"ConvNeXt expects (B, 3, H, W) pixels, got {tuple(pixels.shape)}")
        x = self.stem(pixels.to(self.stem[0].weight.dtype))  # (B, 384, S/4, S/4)
        for stage in self.stages:
            x = stage(x)  # ... -> (B, 3072, S/32, S/32)
        return x.flatten(2).transpose(1, 2)  # (B, 576, 3072)

    def preprocess(self, square: Image.Image) -> torch.Tensor:
        """The square view -> CLIP pixels (3, S, S): open_clip's eval transform at S (bicubic shortest side,
        center crop, CLIP mean/std)."""
        return clip_preprocess(square, self.config.image_size)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        layer_norm_eps: float = 1e-5,
        image_size: int = 768,
    ) -> ConvNeXt:
        """An open_clip checkpoint (folder or file): `visual.trunk.*` loaded strictly, `visual.head.*`,
        `visual.trunk.head.*` and every key outside `visual.` (the text tower) skipped. A visual-only state
        dict (`trunk.*`, `head.*`) is accepted too. Depths and widths come from the tensor shapes."""
        state = read_state_dict(path, keep_open_clip)
        prefix = "visual.trunk."
        if not state:
            state = read_state_dict(path, keep_visual_only)
            prefix = "trunk."
        trunk = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        depths, dims = infer_shape(trunk, path)
        config = ConvNeXtConfig(
            image_size=image_size, depths=depths, dims=dims, layer_norm_eps=layer_norm_eps
        )
        model = cls(config)
        names = {k: prefix + k for k in model.state_dict()}
        ours_of = {theirs: k for k, theirs in names.items()}
        state = {ours_of.get(k, k): v for k, v in state.items()}  # unknown keys keep their checkpoint name
        return load_strict(model, state, path, names).to(dtype).eval()


# --------------------------------------------------------------------------- checkpoint key rules
# Skipped by name: the CLIP head (the pooling norm of timm's head and open_clip's projection to 1024).
SKIPPED_HEADS = ("visual.head.", "visual.trunk.head.")
SKIPPED_HEADS_VISUAL_ONLY = ("head.", "trunk.head.")


def keep_open_clip(key: str) -> bool:
    """A full open_clip checkpoint: every `visual.` key but the heads; the text tower (no `visual.`)
    is skipped."""
    return key.startswith("visual.") and not key.startswith(SKIPPED_HEADS)


def keep_visual_only(key: str) -> bool:
    """A visual-only state dict (no `visual.` anywhere): every key but the heads."""
    return not key.startswith(SKIPPED_HEADS_VISUAL_ONLY)


BLOCK_KEY = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.")
DOWNSAMPLE_KEY = re.compile(r"stages\.(\d+)\.downsample\.1\.weight$")


def infer_shape(
    trunk: dict[str, torch.Tensor], source: str | os.PathLike
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(depths, dims) of a trunk state dict in our names: blocks counted per stage, each width read from a
    block's depthwise conv (or the stage's downsample conv), the stem's width from the stem conv."""
    n_blocks: dict[int, int] = {}
    widths: dict[int, int] = {}
    for key, value in trunk.items():
        block = BLOCK_KEY.match(key)
        if block:
            i = int(block[1])
            n_blocks[i] = max(n_blocks.get(i, 0), int(block[2]) + 1)
            if key.endswith(".conv_dw.weight"):
                widths[i] = value.shape[0]
        downsample = DOWNSAMPLE_KEY.match(key)
        if downsample and int(downsample[1]) not in widths:
            widths[int(downsample[1])] = value.shape[0]
    if "stem.0.weight" in trunk and 0 not in widths:
        widths[0] = trunk["stem.0.weight"].shape[0]
    if not n_blocks:
        raise ValueError(
            f"{source}: no ConvNeXt trunk blocks (stages.{{i}}.blocks.{{j}}.*) in the checkpoint"
        )
    n_stages = max(n_blocks) + 1
    absent = [i for i in range(n_stages) if i not in n_blocks or i not in widths]
    if absent:
        raise ValueError(f"{source}: cannot infer the depth and width of trunk stage(s) {absent}")
    depths = tuple(n_blocks[i] for i in range(n_stages))
    dims = tuple(widths[i] for i in range(n_stages))
    return depths, dims
