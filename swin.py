"""Swin Transformer from scratch (Liu et al. 2021): the backbone of OneFormer COCO Swin-L, the seg teacher
(Sec. 3, Sec. 5.1). Its stage-4 map after the stage norm is the seg target: at 768 px a 24×24 grid of
1536 channels, one token per base-encoder token (docs/design.md §2, §8)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders import ViTBlock
from weights import config_json, load_with_table, save_with_table


@dataclass
class SwinConfig:
    """Defaults: Swin-L (window 12) backbone of OneFormer COCO (docs/design.md §8)."""

    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    n_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5

    @classmethod
    def tiny(cls) -> SwinConfig:
        """At 256 px stage 4 is 8×8×128."""
        return cls(embed_dim=16, depths=(2, 2, 2, 2), n_heads=(1, 2, 2, 4), window_size=4)

    @classmethod
    def from_json(cls, cfg: dict) -> SwinConfig:
        """From a SwinBackbone config.json or a OneFormer one (backbone_config nested)."""
        c = cfg.get("backbone_config", cfg)
        if c.get("model_type", "swin") != "swin":
            raise ValueError(f"model_type {c['model_type']!r} is not a Swin config")
        if c.get("use_absolute_embeddings", False) or c.get("hidden_act", "gelu") != "gelu":
            raise ValueError("Swin: absolute position embeddings / non-gelu activations are not supported")
        return cls(
            patch_size=c.get("patch_size", 4),
            embed_dim=c.get("embed_dim", 96),
            depths=tuple(c.get("depths", (2, 2, 6, 2))),
            n_heads=tuple(c.get("num_heads", (3, 6, 12, 24))),
            window_size=c.get("window_size", 7),
            mlp_ratio=c.get("mlp_ratio", 4.0),
            layer_norm_eps=c.get("layer_norm_eps", 1e-5),
        )


SWIN_KEYS = [  # ours -> Hub (SwinBackbone; prefixed by "model.pixel_level_module.encoder." inside OneFormer)
    ("patch_embed.", "embeddings.patch_embeddings.projection."),
    ("embed_norm.", "embeddings.norm."),
    ("merges.{i}.", "encoder.layers.{i}.downsample."),
    ("stage_norms.", "hidden_states_norms."),
    ("stages.{i}.{j}.norm1.", "encoder.layers.{i}.blocks.{j}.layernorm_before."),
    ("stages.{i}.{j}.norm2.", "encoder.layers.{i}.blocks.{j}.layernorm_after."),
    ("stages.{i}.{j}.attn.q.", "encoder.layers.{i}.blocks.{j}.attention.self.query."),
    ("stages.{i}.{j}.attn.k.", "encoder.layers.{i}.blocks.{j}.attention.self.key."),
    ("stages.{i}.{j}.attn.v.", "encoder.layers.{i}.blocks.{j}.attention.self.value."),
    ("stages.{i}.{j}.attn.o.", "encoder.layers.{i}.blocks.{j}.attention.output.dense."),
    ("stages.{i}.{j}.fc1.", "encoder.layers.{i}.blocks.{j}.intermediate.dense."),
    ("stages.{i}.{j}.fc2.", "encoder.layers.{i}.blocks.{j}.output.dense."),
    ("stages.{i}.{j}.rel_table", "encoder.layers.{i}.blocks.{j}.attention.self.relative_position_bias_table"),
]
ONEFORMER_BACKBONE = "model.pixel_level_module.encoder."
# saved by SwinBackbone, never applied, absent from OneFormer: skipped
SWIN_DEAD_PREFIXES = ("swin.layernorm.",)


def windows(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, size², C), windows and their pixels in row-major order."""
    B, H, W, C = x.shape
    return x.view(B, H // size, size, W // size, size, C).transpose(2, 3).reshape(B, -1, size * size, C)


class SwinBlock(ViTBlock):
    """A ViT block attending in (shifted) windows, with a relative position bias."""

    def __init__(self, dim: int, n_heads: int, window: int, shift: int, c: SwinConfig):
        super().__init__(dim, n_heads, int(dim * c.mlp_ratio), "gelu", c.layer_norm_eps)
        self.window = window
        self.shift = shift
        self.rel_table = nn.Parameter(0.02 * torch.randn((2 * window - 1) ** 2, n_heads))
        grid = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        yx = torch.stack(grid).flatten(1)  # (2, ws²)
        rel = yx[:, :, None] - yx[:, None, :] + window - 1  # (2, ws², ws²)
        self.register_buffer("rel_index", rel[0] * (2 * window - 1) + rel[1], persistent=False)

    def region(self, n: int, device: torch.device) -> torch.Tensor:
        """Region id along one axis: 0 | 1 | 2 on [0, n - ws) | [n - ws, n - shift) | [n - shift, n)."""
        index = torch.arange(n, device=device)
        return (index >= n - self.window).long() + (index >= n - self.shift).long()

    def shift_mask(self, Hp: int, Wp: int, device: torch.device) -> torch.Tensor:
        """-100 between tokens of a shifted window from different image regions. -> (nW, ws², ws²)"""
        ids = self.region(Hp, device)[:, None] * 3 + self.region(Wp, device)[None, :]  # (Hp, Wp)
        ids = windows(ids[None, :, :, None], self.window)[0, ..., 0]  # (nW, ws²)
        return (ids[:, None, :] != ids[:, :, None]).float() * -100.0

    def window_order(self, Hp: int, Wp: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cyclic shift and the window partition as one permutation of the row-major map: windowed token
        k is map token order[k]; `inverse` undoes it. One index_select instead of roll + reshape copies."""
        s = self.shift
        rows = (torch.arange(Hp, device=device) + s) % Hp
        cols = (torch.arange(Wp, device=device) + s) % Wp
        source = rows[:, None] * Wp + cols[None, :]  # (Hp, Wp): the map token at each rolled position
        order = windows(source[None, :, :, None], self.window).flatten()  # (Hp·Wp,)
        return order, torch.argsort(order)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws = self.window
        h = self.norm1(x)
        if H % ws or W % ws:
            h = F.pad(h, (0, 0, 0, -W % ws, 0, -H % ws))  # pad after layernorm_before
        Hp, Wp = h.shape[1:3]
        order, inverse = self.window_order(Hp, Wp, x.device)
        bias = self.rel_table[self.rel_index].permute(2, 0, 1)  # (heads, ws², ws²)
        if self.shift:
            bias = bias + self.shift_mask(Hp, Wp, x.device)[:, None].to(bias.dtype)  # (nW, heads, ws², ws²)
        h = torch.index_select(h.reshape(B, Hp * Wp, C), 1, order).view(B, -1, ws * ws, C)  # (B, nW, ws², C)
        h = self.attn(h, bias.to(h.dtype))
        h = torch.index_select(h.reshape(B, Hp * Wp, C), 1, inverse).view(B, Hp, Wp, C)
        return h[:, :H, :W]


class PatchMerging(nn.Module):
    """2×2 neighbours -> LayerNorm(4C) -> Linear(4C -> 2C), halving the map (odd sizes zero-padded)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class Swin(nn.Module):
    """Swin Transformer backbone as used by OneFormer: returns the stage-4 map after its stage norm."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = c = config
        dims = [c.embed_dim * 2**i for i in range(len(c.depths))]
        self.dim = dims[-1]
        self.patch_embed = nn.Conv2d(3, c.embed_dim, c.patch_size, c.patch_size)
        self.embed_norm = nn.LayerNorm(c.embed_dim)
        # Shift ws//2 on odd blocks at every resolution: no window clamping (SwinBackbone's always_partition).
        stages = []
        for dim, depth, heads in zip(dims, c.depths, c.n_heads):
            shifts = [j % 2 * (c.window_size // 2) for j in range(depth)]
            stages.append(nn.Sequential(*(SwinBlock(dim, heads, c.window_size, s, c) for s in shifts)))
        self.stages = nn.ModuleList(stages)
        self.merges = nn.ModuleList(PatchMerging(dim) for dim in dims[:-1])
        self.stage_norms = nn.ModuleDict({f"stage{i + 1}": nn.LayerNorm(dim) for i, dim in enumerate(dims)})

    def feature_maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output before patch merging, through its stage norm. -> list of (B, H_k, W_k, C_k)"""
        p = self.config.patch_size
        pad = (0, -pixels.shape[-1] % p, 0, -pixels.shape[-2] % p)
        pixels = F.pad(pixels.to(self.embed_norm.weight.dtype), pad)
        x = self.embed_norm(self.patch_embed(pixels).permute(0, 2, 3, 1))  # (B, H/4, W/4, C)
        maps = []
        for stage, norm, merge in zip(self.stages, self.stage_norms.values(), [*self.merges, None]):
            x = stage(x)
            maps.append(norm(x))
            if merge is not None:
                x = merge(x)
        return maps

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """-> (B, h·w, C) row-major stage-4 tokens: (B, 576, 1536) for Swin-L at 768 px."""
        return self.feature_maps(pixels)[-1].flatten(1, 2)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Swin:
        """A SwinBackbone checkpoint, or OneFormer's (`model.pixel_level_module.encoder.*`, rest skipped)."""
        cfg = config_json(path)
        model = cls(SwinConfig.from_json(cfg))
        if "backbone_config" in cfg:

            def in_backbone(key: str) -> bool:
                return key.startswith(ONEFORMER_BACKBONE)

            return load_with_table(model, path, SWIN_KEYS, in_backbone, dtype, ONEFORMER_BACKBONE)

        def alive(key: str) -> bool:
            return not key.startswith(SWIN_DEAD_PREFIXES)

        return load_with_table(model, path, SWIN_KEYS, alive, dtype)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a Hub SwinBackbone folder that from_pretrained (and transformers) reads."""
        c = self.config
        stages = [f"stage{i + 1}" for i in range(len(c.depths))]
        config = {
            "architectures": ["SwinBackbone"],
            "model_type": "swin",
            "patch_size": c.patch_size,
            "num_channels": 3,
            "embed_dim": c.embed_dim,
            "depths": list(c.depths),
            "num_heads": list(c.n_heads),
            "window_size": c.window_size,
            "mlp_ratio": c.mlp_ratio,
            "hidden_act": "gelu",
            "layer_norm_eps": c.layer_norm_eps,
            "use_absolute_embeddings": False,
            "out_features": stages,
        }
        save_with_table(self, folder, SWIN_KEYS, config)
