"""Vision transformers from scratch: CLIP ViT (the base encoder CLIP-ViT-L/14-336, and the gen teacher's
CLIP ViT-H/14 of SD-2.1-unCLIP) and DINOv2 (the depth teacher of Depth Anything V2), loading the official
Hugging Face checkpoints strictly (docs/design.md §8, §12). Swin (the seg teacher) lives in swin.py and
ConvNeXt (the second base encoder, Tab. 1-2) in convnext.py.

The base encoder is a *vision tower*: any module with `kind`, `config`, `image_size`, `grid`, `num_tokens`,
`width`, `features(pixels) -> (B, num_tokens, width)`, `preprocess(square_view) -> (3, S, S)` and
`from_pretrained(path, dtype)`. `VISION_TOWERS` maps a checkpoint's recorded kind to its class."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from convnext import ConvNeXt, ConvNeXtConfig
from preprocess import clip_preprocess
from weights import config_json, load_with_table, save_with_table


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's activation, x · sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}  # gelu = the exact (erf) GELU


# --------------------------------------------------------------------------- shared blocks
class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis; any leading axes (batch, windows)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., T, C); bias broadcastable to (..., heads, T, T). Leading axes are folded into one batch
        axis: SDPA's fused kernels take 4-D inputs only (5-D Swin windows would fall back to plain math)."""
        *lead, T, C = x.shape
        x = x.reshape(-1, T, C)  # (N, T, C)
        q, k, v = (
            proj(x).view(len(x), T, self.n_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v)
        )
        if bias is not None and bias.dim() > 3:  # (..., heads, T, T) -> (N, heads, T, T)
            bias = bias.expand(*lead, *bias.shape[-3:]).reshape(-1, *bias.shape[-3:])
        elif bias is not None:  # (heads, T, T) -> (1, heads, T, T): a 3-D mask would also fall back to math
            bias = bias[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (N, heads, T, d)
        return self.o(out.transpose(1, 2).reshape(*lead, T, C))


class ViTBlock(nn.Module):
    """Pre-LN block: x + ls1·attn(norm1(x)), then x + ls2·fc2(act(fc1(norm2(x)))); LayerScale: DINOv2."""

    def __init__(self, dim: int, n_heads: int, mlp_dim: int, act: str, eps: float, layerscale: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, n_heads)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.act = ACTIVATIONS[act]
        self.ls1 = nn.Parameter(torch.ones(dim)) if layerscale else None
        self.ls2 = nn.Parameter(torch.ones(dim)) if layerscale else None

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attend(x)
        if self.ls1 is not None:
            a = a * self.ls1
        x = x + a
        m = self.fc2(self.act(self.fc1(self.norm2(x))))
        if self.ls2 is not None:
            m = m * self.ls2
        return x + m


# -------------------------------------------------------------------- CLIP ViT (base encoder, gen teacher)
@dataclass
class CLIPVisionConfig:
    """Defaults: CLIP ViT-L/14-336, the base encoder (docs/design.md §8)."""

    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    n_layers: int = 24
    n_heads: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 768  # None: no visual projection
    select_layer: int = -2  # the base encoder's features: LLaVA's penultimate block (Sec. 5.1)

    @classmethod
    def unclip_h(cls) -> CLIPVisionConfig:
        """The SD-2.1-unCLIP image encoder: ViT-H/14, exact gelu, projection 1024 (the gen teacher)."""
        return cls(
            image_size=224,
            hidden_size=1280,
            intermediate_size=5120,
            n_layers=32,
            hidden_act="gelu",
            projection_dim=1024,
        )

    @classmethod
    def tiny(cls) -> CLIPVisionConfig:
        """The tiny base encoder: 112 px / 14 -> 8×8 = 64 image tokens."""
        return cls(
            image_size=112, hidden_size=64, intermediate_size=256, n_layers=3, n_heads=4, projection_dim=None
        )

    @classmethod
    def tiny_unclip(cls) -> CLIPVisionConfig:
        """The tiny gen teacher: 56 px, gelu, with a projection."""
        return replace(cls.tiny(), image_size=56, n_layers=2, hidden_act="gelu", projection_dim=32)

    @classmethod
    def from_json(cls, cfg: dict, select_layer: int = -2) -> CLIPVisionConfig:
        """From a full CLIPModel config.json (vision_config nested) or a vision-only one (HF defaults)."""
        vision = cfg.get("vision_config", cfg)
        for part in (cfg, vision):  # a SigLIP / EVA config nests a vision_config too
            if part.get("model_type", "clip") not in ("clip_vision_model", "clip"):
                raise ValueError(
                    f"config model_type {part['model_type']!r} is not CLIP: expected 'clip' or "
                    f"'clip_vision_model' (use --vision-type convnext for open_clip ConvNeXt)"
                )
        act = vision.get("hidden_act", "quick_gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {act!r} unsupported: expected one of {list(ACTIVATIONS)}")
        with_projection = "vision_config" in cfg or "CLIPVisionModelWithProjection" in cfg.get(
            "architectures", []
        )
        projection_dim = cfg.get("projection_dim", 512) if with_projection else None
        return cls(
            image_size=vision.get("image_size", 224),
            patch_size=vision.get("patch_size", 32),
            hidden_size=vision.get("hidden_size", 768),
            intermediate_size=vision.get("intermediate_size", 3072),
            n_layers=vision.get("num_hidden_layers", 12),
            n_heads=vision.get("num_attention_heads", 12),
            hidden_act=act,
            layer_norm_eps=vision.get("layer_norm_eps", 1e-5),
            projection_dim=projection_dim,
            select_layer=select_layer,
        )


CLIP_KEYS = [  # ours -> Hub (CLIPModel / CLIPVisionModelWithProjection)
    ("class_embedding", "vision_model.embeddings.class_embedding"),
    ("patch_embed.", "vision_model.embeddings.patch_embedding."),
    ("pos_embed", "vision_model.embeddings.position_embedding.weight"),
    ("pre_norm.", "vision_model.pre_layrnorm."),
    ("blocks.{i}.norm1.", "vision_model.encoder.layers.{i}.layer_norm1."),
    ("blocks.{i}.norm2.", "vision_model.encoder.layers.{i}.layer_norm2."),
    ("blocks.{i}.fc1.", "vision_model.encoder.layers.{i}.mlp.fc1."),
    ("blocks.{i}.fc2.", "vision_model.encoder.layers.{i}.mlp.fc2."),
    ("blocks.{i}.attn.q.", "vision_model.encoder.layers.{i}.self_attn.q_proj."),
    ("blocks.{i}.attn.k.", "vision_model.encoder.layers.{i}.self_attn.k_proj."),
    ("blocks.{i}.attn.v.", "vision_model.encoder.layers.{i}.self_attn.v_proj."),
    ("blocks.{i}.attn.o.", "vision_model.encoder.layers.{i}.self_attn.out_proj."),
    ("post_norm.", "vision_model.post_layernorm."),
    ("proj.", "visual_projection."),
]
CLIP_TEXT_PREFIXES = ("text_model.", "text_projection.", "logit_scale")  # text tower of a full CLIPModel


class CLIPVision(nn.Module):
    """Pre-LN ViT with class token and pre_layrnorm (Radford et al. 2021), as in HF CLIPVisionModel."""

    kind = "clip"

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = c = config
        self.grid = c.image_size // c.patch_size
        self.patch_embed = nn.Conv2d(3, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(0.02 * torch.randn(c.hidden_size))
        # unit-scale positions in random (tiny) towers: patch tokens carry where they are, like trained CLIP's
        self.pos_embed = nn.Parameter(torch.randn(self.grid**2 + 1, c.hidden_size))
        self.pre_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        blocks = [
            ViTBlock(c.hidden_size, c.n_heads, c.intermediate_size, c.hidden_act, c.layer_norm_eps)
            for _ in range(c.n_layers)
        ]
        self.blocks = nn.Sequential(*blocks)
        self.post_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.proj = nn.Linear(c.hidden_size, c.projection_dim, bias=False) if c.projection_dim else None

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2  # 576 for CLIP-L/14 at 336 px

    @property
    def width(self) -> int:
        return self.config.hidden_size

    def _run(self, pixels: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """Embeddings + pre_layrnorm, then the first n_blocks blocks. -> (B, 1 + grid², C)"""
        if pixels.shape[-2:] != (self.config.image_size,) * 2:
            raise ValueError(
                f"CLIPVision expects {self.config.image_size}² pixels, got {tuple(pixels.shape[-2:])}"
            )
        x = self.patch_embed(pixels.to(self.pos_embed.dtype)).flatten(2).transpose(1, 2)  # (B, grid², C)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.pre_norm(torch.cat([cls, x], dim=1) + self.pos_embed)
        return self.blocks[:n_blocks](x)

    def features(self, pixels: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """Patch tokens of hidden_states[layer] (0 = embeddings, k = block k), CLS dropped; by default the
        config's select_layer (-2, LLaVA's). -> (B, 576, 1024) for CLIP-L/14-336"""
        layer = self.config.select_layer if layer is None else layer
        n = self.config.n_layers
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"layer {layer} out of range for {n} blocks")
        return self._run(pixels, layer % (n + 1))[:, 1:]

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """visual_projection(post_layernorm(CLS)), not L2-normalised: the gen target. -> (B, P)"""
        if self.proj is None:
            raise ValueError("this CLIPVision has no visual projection (projection_dim=None)")
        return self.proj(self.post_norm(self._run(pixels, self.config.n_layers)[:, 0]))

    def preprocess(self, square: Image.Image) -> torch.Tensor:
        """The square view -> CLIP pixels (3, S, S)."""
        return clip_preprocess(square, self.config.image_size)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, select_layer: int = -2
    ) -> CLIPVision:
        """A full CLIPModel checkpoint (text tower skipped) or a CLIPVisionModelWithProjection one."""
        model = cls(CLIPVisionConfig.from_json(config_json(path), select_layer))

        def keep(key: str) -> bool:
            return not key.startswith(CLIP_TEXT_PREFIXES)

        return load_with_table(model, path, CLIP_KEYS, keep, dtype)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write a Hub CLIPVisionModel(WithProjection) folder that from_pretrained and transformers read."""
        c = self.config
        config = {
            "architectures": ["CLIPVisionModelWithProjection" if c.projection_dim else "CLIPVisionModel"],
            "model_type": "clip_vision_model",
            "image_size": c.image_size,
            "patch_size": c.patch_size,
            "num_channels": 3,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "hidden_act": c.hidden_act,
            "layer_norm_eps": c.layer_norm_eps,
        }
        if c.projection_dim:
            config["projection_dim"] = c.projection_dim
        save_with_table(self, folder, CLIP_KEYS, config)


# --------------------------------------------------------------------------- DINOv2 (depth teacher)
@dataclass
class DINOv2Config:
    """Defaults: DINOv2-L/14 of Depth Anything V2 Large (docs/design.md §8)."""

    image_size: int = 518  # the position table's grid: 518 / 14 = 37
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    n_layers: int = 24
    n_heads: int = 16
    layer_norm_eps: float = 1e-6
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1  # the original DINOv2 / DAv2 code (docs/design.md §2); 0 = transformers 5
    interpolate_antialias: bool = False  # True only for the register models (as in transformers)

    @classmethod
    def tiny(cls) -> DINOv2Config:
        """A table for a 10×10 grid, run at 112 px (8×8), so the interpolation runs."""
        return cls(image_size=140, hidden_size=64, intermediate_size=256, n_layers=4, n_heads=4)

    @classmethod
    def from_json(cls, cfg: dict, interpolate_offset: float = 0.1) -> DINOv2Config:
        """From a Dinov2(WithRegisters) config.json or a DepthAnything one (backbone_config nested)."""
        c = cfg.get("backbone_config", cfg)
        if c.get("model_type", "dinov2") not in ("dinov2", "dinov2_with_registers"):
            raise ValueError(f"model_type {c['model_type']!r} is not a DINOv2 config")
        if c.get("use_swiglu_ffn", False) or c.get("hidden_act", "gelu") != "gelu":
            raise ValueError("DINOv2: only the gelu MLP (ViT-S/B/L) is supported, not SwiGLU (ViT-g)")
        hidden = c.get("hidden_size", 768)
        with_registers = c.get("model_type") == "dinov2_with_registers"
        return cls(
            image_size=c.get("image_size", 224),
            patch_size=c.get("patch_size", 14),
            hidden_size=hidden,
            intermediate_size=int(hidden * c.get("mlp_ratio", 4)),
            n_layers=c.get("num_hidden_layers", 12),
            n_heads=c.get("num_attention_heads", 12),
            layer_norm_eps=c.get("layer_norm_eps", 1e-6),
            num_register_tokens=c.get("num_register_tokens", 4 if with_registers else 0),
            interpolate_offset=interpolate_offset,
            interpolate_antialias=with_registers,
        )


DINOV2_KEYS = [  # ours -> Hub (Dinov2Model; prefixed by "backbone." inside DepthAnythingForDepthEstimation)
    ("cls_token", "embeddings.cls_token"),
    ("mask_token", "embeddings.mask_token"),
    ("register_tokens", "embeddings.register_tokens"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.", "embeddings.patch_embeddings.projection."),
    ("norm.", "layernorm."),
    ("blocks.{i}.norm1.", "encoder.layer.{i}.norm1."),
    ("blocks.{i}.norm2.", "encoder.layer.{i}.norm2."),
    ("blocks.{i}.fc1.", "encoder.layer.{i}.mlp.fc1."),
    ("blocks.{i}.fc2.", "encoder.layer.{i}.mlp.fc2."),
    ("blocks.{i}.attn.q.", "encoder.layer.{i}.attention.attention.query."),
    ("blocks.{i}.attn.k.", "encoder.layer.{i}.attention.attention.key."),
    ("blocks.{i}.attn.v.", "encoder.layer.{i}.attention.attention.value."),
    ("blocks.{i}.attn.o.", "encoder.layer.{i}.attention.output.dense."),
    ("blocks.{i}.ls1", "encoder.layer.{i}.layer_scale1.lambda1"),
    ("blocks.{i}.ls2", "encoder.layer.{i}.layer_scale2.lambda1"),
]
DEPTH_ANYTHING_HEADS = ("neck.", "head.")  # DAv2's DPT decoder: not needed for the targets, skipped


class DINOv2(nn.Module):
    """DINOv2 ViT (Oquab et al. 2023): CLS (+ registers), LayerScale, interpolated position embeddings."""

    def __init__(self, config: DINOv2Config):
        super().__init__()
        self.config = c = config
        self.grid = c.image_size // c.patch_size
        self.patch_embed = nn.Conv2d(3, c.hidden_size, c.patch_size, c.patch_size)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, c.hidden_size))
        # masked pre-training only: strict loads
        self.mask_token = nn.Parameter(torch.zeros(1, c.hidden_size))
        self.register_tokens = None
        if c.num_register_tokens:
            self.register_tokens = nn.Parameter(0.02 * torch.randn(1, c.num_register_tokens, c.hidden_size))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.grid**2 + 1, c.hidden_size))
        blocks = [
            ViTBlock(c.hidden_size, c.n_heads, c.intermediate_size, "gelu", c.layer_norm_eps, layerscale=True)
            for _ in range(c.n_layers)
        ]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def position_embeddings(self, h: int, w: int) -> torch.Tensor:
        """The table resized to an h×w patch grid, bicubic: offset > 0 as the original DINOv2 / DAv2 code
        (scale_factor (h + offset) / M), 0 as transformers 5 (size h×w); untouched at the native grid."""
        pos = self.pos_embed
        m = self.grid
        offset = self.config.interpolate_offset
        if h == w == m:
            return pos
        table = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()  # (1, C, M, M)
        if offset:
            size = dict(scale_factor=((h + offset) / m, (w + offset) / m))
        else:
            size = dict(size=(h, w))
        table = F.interpolate(table, mode="bicubic", antialias=self.config.interpolate_antialias, **size)
        table = table.to(pos.dtype).flatten(2).transpose(1, 2)  # (1, h·w, C)
        return torch.cat([pos[:, :1], table], dim=1)  # (1, 1 + h·w, C)

    def intermediate_layers(
        self, pixels: torch.Tensor, blocks: list[int], norm: bool = True
    ) -> list[torch.Tensor]:
        """Patch tokens after each DINOv2 block in `blocks` (0-based), final-normed if `norm` (as DAv2).
        -> [(B, h·w, C)], e.g. (B, 576, 1024) at 336 px"""
        n = self.config.n_layers
        if not blocks or any(not -n <= b < n for b in blocks):
            raise ValueError(f"DINOv2 block indices must be in [-{n}, {n}), got {blocks}")
        blocks = [b % n for b in blocks]
        x = self.patch_embed(pixels.to(self.pos_embed.dtype)).flatten(2).transpose(1, 2)  # (B, h·w, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        grid = [s // self.config.patch_size for s in pixels.shape[-2:]]
        x = x + self.position_embeddings(*grid)
        if self.register_tokens is not None:  # registers get no position embedding
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        first_patch = 1 + self.config.num_register_tokens
        outs = {}
        for index, block in enumerate(self.blocks[: max(blocks) + 1]):
            x = block(x)
            if index in blocks:
                outs[index] = (self.norm(x) if norm else x)[:, first_patch:]
        return [outs[b] for b in blocks]

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, interpolate_offset: float = 0.1
    ) -> DINOv2:
        """A plain Dinov2 checkpoint, or Depth-Anything-V2-*-hf (`backbone.*`; neck/head skipped)."""
        cfg = config_json(path)
        prefix = "backbone." if "backbone_config" in cfg else ""
        model = cls(DINOv2Config.from_json(cfg, interpolate_offset))

        def keep(key: str) -> bool:
            return not key.startswith(DEPTH_ANYTHING_HEADS)

        return load_with_table(model, path, DINOV2_KEYS, keep, dtype, prefix)

    def save_pretrained(self, folder: str | os.PathLike, out_indices: tuple[int, ...] | None = None) -> None:
        """Write a Hub Dinov2 folder that from_pretrained (and transformers) reads; `out_indices` (1-based
        hidden states, as a Depth Anything config) name the blocks a depth teacher averages."""
        c = self.config
        if c.num_register_tokens:
            raise ValueError("save_pretrained writes DINOv2 without registers only")
        ratio = c.intermediate_size / c.hidden_size
        if ratio.is_integer():  # transformers' config wants an int where it is one
            ratio = int(ratio)
        config = {
            "architectures": ["Dinov2Model"],
            "model_type": "dinov2",
            "image_size": c.image_size,
            "patch_size": c.patch_size,
            "num_channels": 3,
            "hidden_size": c.hidden_size,
            "mlp_ratio": ratio,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "hidden_act": "gelu",
            "layer_norm_eps": c.layer_norm_eps,
            "use_swiglu_ffn": False,
        }
        if out_indices:
            config["out_indices"] = list(out_indices)
        save_with_table(self, folder, DINOV2_KEYS, config)


# --------------------------------------------------------------------------- base encoders (vision towers)
VISION_TOWERS = {"clip": (CLIPVision, CLIPVisionConfig), "convnext": (ConvNeXt, ConvNeXtConfig)}


def detect_tower(path: str | os.PathLike) -> str:
    """The vision tower kind of a weight folder: an open_clip ConvNeXt, else a CLIP (Hugging Face) one."""
    folder = os.fspath(path)
    if os.path.exists(os.path.join(folder, "open_clip_config.json")):
        return "convnext"
    if "convnext" in os.path.basename(folder.rstrip("/")).lower():
        return "convnext"
    return "clip"


def load_vision_tower(path: str | os.PathLike, kind: str | None = None, dtype: torch.dtype = torch.float32):
    """The base encoder in a weight folder (`kind` 'clip' | 'convnext', detected when None)."""
    kind = kind or detect_tower(path)
    if kind not in VISION_TOWERS:
        raise ValueError(f"unknown vision tower {kind!r}: expected one of {sorted(VISION_TOWERS)}")
    return VISION_TOWERS[kind][0].from_pretrained(path, dtype=dtype)
