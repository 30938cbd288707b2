"""Vision encoders from scratch: the base encoder (CLIP ViT) and the three frozen target encoders of OLA-VLM
(SPEC §1): DINOv2 (depth), Swin (seg), CLIP ViT-H (gen). Also home of the checkpoint reader every
`from_pretrained` in this project uses (safetensors, sharded safetensors, or pytorch_model.bin; strict key checks)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

# Buffers that old checkpoint files carry but that we recompute (SPEC §7): skipped by name.
SKIPPED_BUFFERS = ("position_ids", "relative_position_index", "rotary_emb.inv_freq")


# --------------------------------------------------------------------------- checkpoints
def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The weight files of a checkpoint folder (or a single file)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    index = path / "model.safetensors.index.json"
    if index.exists():
        return [path / s for s in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name]
    if found := sorted(path.glob("*.safetensors")):
        return found
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors, model.safetensors.index.json "
                            f"(+ shards) or pytorch_model.bin")


def read_state_dict(path: str | os.PathLike, keep=lambda key: True) -> dict[str, torch.Tensor]:
    """The tensors whose key passes `keep` and does not end in one of SKIPPED_BUFFERS: safetensors read lazily
    key by key, `.bin`/`.pth` via torch.load(weights_only=True) (a {"model"|"state_dict": ...} wrapper unwrapped)."""
    wanted = lambda k: keep(k) and not k.endswith(SKIPPED_BUFFERS)
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(path):
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                out.update({k: sf.get_tensor(k) for k in sf.keys() if wanted(k)})
        else:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            for wrapper in ("model", "state_dict"):
                if isinstance(sd.get(wrapper), dict):
                    sd = sd[wrapper]
            out.update({k: v for k, v in sd.items() if wanted(k)})
    return out


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike,
                names: dict[str, str] | None = None) -> nn.Module:
    """Copy `state` (our key names) into `module`; every missing, unexpected or mis-shaped key is listed, with
    expected and found shapes, in one ValueError. `names` (our key -> checkpoint key) lets it name both."""
    names, ours = names or {}, module.state_dict()
    label = lambda k: f"{k} (checkpoint key {names[k]})" if k in names and names[k] != k else k
    problems = [f"  missing    {label(k)}: expected {list(v.shape)}" for k, v in ours.items() if k not in state]
    problems += [f"  unexpected {label(k)}: found {list(v.shape)}" for k, v in state.items() if k not in ours]
    problems += [f"  wrong shape {label(k)}: expected {list(ours[k].shape)}, found {list(v.shape)}"
                 for k, v in state.items() if k in ours and ours[k].shape != v.shape]
    if problems:
        raise ValueError(f"cannot load {source} into {type(module).__name__}:\n" + "\n".join(problems))
    with torch.no_grad():
        for k, p in ours.items():
            p.copy_(state[k])
    return module


def _config_json(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint folder, or the one next to a weights file."""
    path = Path(path)
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"no config.json next to the checkpoint {path} (expected {cfg})")
    return json.loads(cfg.read_text())


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    """Our key -> checkpoint key by the first matching (ours, theirs) prefix rule; {i}, {j} are indices."""
    for ours, theirs in rules:
        pattern = re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
        if m := re.match(pattern + "(?P<rest>.*)$", key):
            return theirs.format(**m.groupdict()) + m["rest"]
    raise KeyError(f"no checkpoint name for parameter {key}")


def _load(module: nn.Module, path, rules: list[tuple[str, str]], keep, dtype, prefix: str = "") -> nn.Module:
    """Strictly load the checkpoint keys that pass `keep` into `module` via the key table `rules` (+ prefix)."""
    names = {k: prefix + _rename(k, rules) for k in module.state_dict()}
    ours = {theirs: k for k, theirs in names.items()}
    state = {ours.get(k, k): v for k, v in read_state_dict(path, keep).items()}
    return load_strict(module, state, path, names).to(dtype).eval()


# --------------------------------------------------------------------------- preprocessing: PIL -> (3, S, S) tensor
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = (122, 116, 104)) -> Image.Image:
    """LLaVA's expand2square: paste the image centred on a square of the CLIP mean colour (int(255 · mean))."""
    w, h = img.size
    out = Image.new(img.mode, (max(w, h),) * 2, fill)
    out.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return out


def center_crop_square(img: Image.Image, side: int | None = None) -> Image.Image:
    """The central side² square, by default of side min(w, h): the PT view (what CLIP's center crop keeps)."""
    side = side or min(img.size)
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2      # transformers' rounding
    return img.crop((left, top, left + side, top + side))


def square_view(img: Image.Image, mode: str) -> Image.Image:
    """The square view every encoder sees (SPEC §1): 'crop' in PT, 'pad' in IFT."""
    if mode not in ("crop", "pad"):
        raise ValueError(f"square_view mode must be 'crop' or 'pad', got {mode!r}")
    return center_crop_square(img.convert("RGB")) if mode == "crop" else pad_to_square(img.convert("RGB"))


def _normalize(img: Image.Image, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def clip_preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """CLIPImageProcessor: shortest side -> size (bicubic), center crop size², CLIP mean/std. -> (3, size, size)"""
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)     # long side floored, as transformers
    return _normalize(center_crop_square(img.convert("RGB").resize(new, Image.BICUBIC), size), CLIP_MEAN, CLIP_STD)


def resize_normalize(img: Image.Image, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Bicubic resize to size² and normalise (the teachers' input on the square view). -> (3, size, size)"""
    return _normalize(img.convert("RGB").resize((size, size), Image.BICUBIC), mean, std)


# --------------------------------------------------------------------------- shared blocks
ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}  # exact GELU; OpenAI CLIP's


class Attention(nn.Module):
    """Multi-head self-attention over the second-to-last axis; any leading axes (batch, windows)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shape = (*x.shape[:-1], self.n_heads, -1)                          # (..., T, heads, d)
        q, k, v = (p(x).view(shape).transpose(-2, -3) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)     # (..., heads, T, d)
        return self.o(out.transpose(-2, -3).flatten(-2))


class ViTBlock(nn.Module):
    """Pre-LN block: x + ls1·attn(norm1(x)), then x + ls2·fc2(act(fc1(norm2(x)))); LayerScale only in DINOv2."""

    def __init__(self, dim: int, n_heads: int, mlp_dim: int, act: str, eps: float, layerscale: bool = False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, n_heads)
        self.fc1, self.fc2, self.act = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim), ACTIVATIONS[act]
        self.ls1, self.ls2 = (nn.Parameter(torch.ones(dim)) for _ in range(2)) if layerscale else (None, None)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attend(x)
        x = x + (a if self.ls1 is None else a * self.ls1)
        m = self.fc2(self.act(self.fc1(self.norm2(x))))
        return x + (m if self.ls2 is None else m * self.ls2)


# --------------------------------------------------------------------------- CLIP ViT (base encoder, gen target)
@dataclass
class CLIPVisionConfig:
    """Defaults: CLIP ViT-L/14-336, the base encoder (weights.md §2.3)."""
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    n_layers: int = 24
    n_heads: int = 16
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 768        # None: no visual projection

    @classmethod
    def clip_l_336(cls) -> "CLIPVisionConfig":
        return cls()

    @classmethod
    def unclip_h(cls) -> "CLIPVisionConfig":      # SD-2.1-unCLIP image encoder: ViT-H/14, exact gelu (weights.md §2.7)
        return cls(image_size=224, hidden_size=1280, intermediate_size=5120, n_layers=32, hidden_act="gelu",
                   projection_dim=1024)

    @classmethod
    def tiny(cls) -> "CLIPVisionConfig":          # tiny base encoder: 112 px / 14 -> 8×8 = 64 image tokens
        return cls(image_size=112, hidden_size=64, intermediate_size=256, n_layers=3, n_heads=4, projection_dim=None)

    @classmethod
    def tiny_unclip(cls) -> "CLIPVisionConfig":   # tiny gen teacher: 56 px, gelu, with projection
        return replace(cls.tiny(), image_size=56, n_layers=2, hidden_act="gelu", projection_dim=32)

    @classmethod
    def from_json(cls, cfg: dict) -> "CLIPVisionConfig":
        """From a full CLIPModel config.json (vision_config nested) or a vision-only one (HF defaults for gaps)."""
        v = cfg.get("vision_config", cfg)
        if v.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {v['hidden_act']!r} unsupported: expected one of {list(ACTIVATIONS)}")
        with_proj = "vision_config" in cfg or "CLIPVisionModelWithProjection" in cfg.get("architectures", [])
        return cls(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
                   hidden_size=v.get("hidden_size", 768), intermediate_size=v.get("intermediate_size", 3072),
                   n_layers=v.get("num_hidden_layers", 12), n_heads=v.get("num_attention_heads", 12),
                   hidden_act=v.get("hidden_act", "quick_gelu"), layer_norm_eps=v.get("layer_norm_eps", 1e-5),
                   projection_dim=cfg.get("projection_dim", 512) if with_proj else None)


_V, _VL = "vision_model.", "vision_model.encoder.layers.{i}."
CLIP_KEYS = [  # ours -> Hub (CLIPModel / CLIPVisionModelWithProjection)
    ("class_embedding", _V + "embeddings.class_embedding"), ("patch_embed.", _V + "embeddings.patch_embedding."),
    ("pos_embed", _V + "embeddings.position_embedding.weight"), ("pre_norm.", _V + "pre_layrnorm."),
    ("blocks.{i}.norm", _VL + "layer_norm"), ("blocks.{i}.fc", _VL + "mlp.fc"),         # norm1/norm2, fc1/fc2
    ("blocks.{i}.attn.q.", _VL + "self_attn.q_proj."), ("blocks.{i}.attn.k.", _VL + "self_attn.k_proj."),
    ("blocks.{i}.attn.v.", _VL + "self_attn.v_proj."), ("blocks.{i}.attn.o.", _VL + "self_attn.out_proj."),
    ("post_norm.", _V + "post_layernorm."), ("proj.", "visual_projection."),
]
CLIP_TEXT_PREFIXES = ("text_model.", "text_projection.", "logit_scale")  # text tower of a full CLIPModel


class CLIPVision(nn.Module):
    """Pre-LN ViT with class token and pre_layrnorm (Radford et al. 2021), as in HF CLIPVisionModel."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = c = config
        self.grid = c.image_size // c.patch_size
        self.patch_embed = nn.Conv2d(3, c.hidden_size, c.patch_size, c.patch_size, bias=False)
        self.class_embedding = nn.Parameter(0.02 * torch.randn(c.hidden_size))
        # unit-scale positions in random (tiny) towers so patch tokens carry where they are, as trained CLIP's do
        self.pos_embed = nn.Parameter(torch.randn(self.grid ** 2 + 1, c.hidden_size))
        self.pre_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.blocks = nn.Sequential(*(ViTBlock(c.hidden_size, c.n_heads, c.intermediate_size, c.hidden_act,
                                               c.layer_norm_eps) for _ in range(c.n_layers)))
        self.post_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.proj = nn.Linear(c.hidden_size, c.projection_dim, bias=False) if c.projection_dim else None

    def _run(self, pixels: torch.Tensor, n_blocks: int) -> torch.Tensor:
        """Embeddings + pre_layrnorm, then the first n_blocks blocks. -> (B, 1 + grid², C)"""
        if pixels.shape[-2:] != (self.config.image_size,) * 2:
            raise ValueError(f"CLIPVision expects {self.config.image_size}² pixels, got {tuple(pixels.shape[-2:])}")
        x = self.patch_embed(pixels.to(self.pos_embed.dtype)).flatten(2).transpose(1, 2)   # (B, grid², C)
        x = self.pre_norm(torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.pos_embed)
        return self.blocks[:n_blocks](x)

    def features(self, pixels: torch.Tensor, layer: int = -2) -> torch.Tensor:
        """Patch tokens of hidden_states[layer] (0 = embeddings, k = block k), CLS dropped; LLaVA uses -2 (SPEC §1)."""
        n = self.config.n_layers
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"layer {layer} out of range for {n} blocks")
        return self._run(pixels, layer % (n + 1))[:, 1:]

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """visual_projection(post_layernorm(CLS)), not L2-normalised: the gen target (weights.md §2.7). -> (B, P)"""
        if self.proj is None:
            raise ValueError("this CLIPVision has no visual projection (projection_dim=None)")
        return self.proj(self.post_norm(self._run(pixels, self.config.n_layers)[:, 0]))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "CLIPVision":
        """A full CLIPModel checkpoint (text tower skipped by prefix) or a CLIPVisionModelWithProjection one."""
        model = cls(CLIPVisionConfig.from_json(_config_json(path)))
        return _load(model, path, CLIP_KEYS, lambda k: not k.startswith(CLIP_TEXT_PREFIXES), dtype)


# --------------------------------------------------------------------------- DINOv2 (depth target)
@dataclass
class DINOv2Config:
    """Defaults: DINOv2-L/14 of Depth Anything V2 Large (weights.md §2.5)."""
    image_size: int = 518                   # the position table's grid: 518 / 14 = 37
    patch_size: int = 14
    hidden_size: int = 1024
    intermediate_size: int = 4096
    n_layers: int = 24
    n_heads: int = 16
    layer_norm_eps: float = 1e-6
    num_register_tokens: int = 0
    interpolate_offset: float = 0.1         # original DINOv2/DAv2 code (SPEC §1); 0 = transformers 5
    interpolate_antialias: bool = False     # True only for the register models (as in transformers)

    @classmethod
    def tiny(cls) -> "DINOv2Config":              # table for a 10×10 grid, run at 112 px (8×8): interpolation runs
        return cls(image_size=140, hidden_size=64, intermediate_size=256, n_layers=4, n_heads=4)

    @classmethod
    def from_json(cls, cfg: dict, interpolate_offset: float = 0.1) -> "DINOv2Config":
        """From a Dinov2(WithRegisters) config.json or a DepthAnything one (backbone_config nested)."""
        c = cfg.get("backbone_config", cfg)
        if c.get("use_swiglu_ffn", False) or c.get("hidden_act", "gelu") != "gelu":
            raise ValueError("DINOv2: only the gelu MLP (ViT-S/B/L) is supported, not SwiGLU (ViT-g)")
        hidden, with_registers = c.get("hidden_size", 768), c.get("model_type") == "dinov2_with_registers"
        return cls(image_size=c.get("image_size", 224), patch_size=c.get("patch_size", 14), hidden_size=hidden,
                   intermediate_size=int(hidden * c.get("mlp_ratio", 4)), n_layers=c.get("num_hidden_layers", 12),
                   n_heads=c.get("num_attention_heads", 12), layer_norm_eps=c.get("layer_norm_eps", 1e-6),
                   num_register_tokens=c.get("num_register_tokens", 4 if with_registers else 0),
                   interpolate_offset=interpolate_offset, interpolate_antialias=with_registers)


_L = "encoder.layer.{i}."
DINOV2_KEYS = [  # ours -> Hub (Dinov2Model; prefixed by "backbone." inside DepthAnythingForDepthEstimation)
    ("cls_token", "embeddings.cls_token"), ("mask_token", "embeddings.mask_token"),
    ("register_tokens", "embeddings.register_tokens"), ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.", "embeddings.patch_embeddings.projection."), ("norm.", "layernorm."),
    ("blocks.{i}.norm", _L + "norm"), ("blocks.{i}.fc", _L + "mlp.fc"),                # norm1/norm2, fc1/fc2
    ("blocks.{i}.attn.q.", _L + "attention.attention.query."), ("blocks.{i}.attn.k.", _L + "attention.attention.key."),
    ("blocks.{i}.attn.v.", _L + "attention.attention.value."), ("blocks.{i}.attn.o.", _L + "attention.output.dense."),
    ("blocks.{i}.ls1", _L + "layer_scale1.lambda1"), ("blocks.{i}.ls2", _L + "layer_scale2.lambda1"),
]


class DINOv2(nn.Module):
    """DINOv2 ViT (Oquab et al. 2023): CLS (+ registers), LayerScale, interpolated position embeddings."""

    def __init__(self, config: DINOv2Config):
        super().__init__()
        self.config = c = config
        self.grid = c.image_size // c.patch_size
        self.patch_embed = nn.Conv2d(3, c.hidden_size, c.patch_size, c.patch_size)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, c.hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, c.hidden_size))  # masked pre-training only; kept for strict loads
        self.register_tokens = (nn.Parameter(0.02 * torch.randn(1, c.num_register_tokens, c.hidden_size))
                                if c.num_register_tokens else None)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.grid ** 2 + 1, c.hidden_size))
        self.blocks = nn.ModuleList(
            ViTBlock(c.hidden_size, c.n_heads, c.intermediate_size, "gelu", c.layer_norm_eps, layerscale=True)
            for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def position_embeddings(self, h: int, w: int) -> torch.Tensor:
        """The table resized to an h×w patch grid (SPEC §1), bicubic: offset > 0 as the original DINOv2 / DAv2
        code (scale_factor (h + offset) / M), 0 as transformers 5 (size h×w); untouched at the native grid."""
        pos, m, off = self.pos_embed, self.grid, self.config.interpolate_offset
        if h == w == m:
            return pos
        table = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2).float()              # (1, C, M, M)
        size = dict(scale_factor=((h + off) / m, (w + off) / m)) if off else dict(size=(h, w))
        table = F.interpolate(table, mode="bicubic", antialias=self.config.interpolate_antialias, **size)
        return torch.cat([pos[:, :1], table.to(pos.dtype).flatten(2).transpose(1, 2)], dim=1)   # (1, 1 + h·w, C)

    def intermediate_layers(self, pixels: torch.Tensor, indices, norm: bool = True) -> list[torch.Tensor]:
        """Patch tokens after each block in `indices` (0-based), final-normed if `norm` (DAv2). -> [(B, h·w, C)]"""
        n = self.config.n_layers
        if not indices or any(not -n <= i < n for i in indices):
            raise ValueError(f"block indices must be in [-{n}, {n}), got {indices}")
        indices = [i % n for i in indices]
        x = self.patch_embed(pixels.to(self.pos_embed.dtype)).flatten(2).transpose(1, 2)     # (B, h·w, C)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_embeddings(*(s // self.config.patch_size for s in pixels.shape[-2:]))
        if self.register_tokens is not None:                                               # no position embedding
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        outs = {}
        for i, block in enumerate(self.blocks[: max(indices) + 1]):
            x = block(x)
            if i in indices:
                outs[i] = (self.norm(x) if norm else x)[:, 1 + self.config.num_register_tokens:]
        return [outs[i] for i in indices]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        interpolate_offset: float = 0.1) -> "DINOv2":
        """A plain Dinov2 checkpoint, or Depth-Anything-V2-*-hf (`backbone.*`; neck/head skipped by prefix)."""
        cfg = _config_json(path)
        prefix = "backbone." if "backbone_config" in cfg else ""
        return _load(cls(DINOv2Config.from_json(cfg, interpolate_offset)), path, DINOV2_KEYS,
                     lambda k: not k.startswith(("neck.", "head.")), dtype, prefix)    # DAv2's DPT head: not needed


# --------------------------------------------------------------------------- Swin (seg target)
@dataclass
class SwinConfig:
    """Defaults: Swin-L (window 12) backbone of OneFormer COCO (weights.md §2.6)."""
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    n_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5

    @classmethod
    def tiny(cls) -> "SwinConfig":                # at 256 px stage 4 is 8×8×128
        return cls(embed_dim=16, depths=(2, 2, 2, 2), n_heads=(1, 2, 2, 4), window_size=4)

    @classmethod
    def from_json(cls, cfg: dict) -> "SwinConfig":
        """From a SwinBackbone config.json or a OneFormer one (backbone_config nested)."""
        c = cfg.get("backbone_config", cfg)
        if c.get("use_absolute_embeddings", False) or c.get("hidden_act", "gelu") != "gelu":
            raise ValueError("Swin: absolute position embeddings / non-gelu activations are not supported")
        return cls(patch_size=c.get("patch_size", 4), embed_dim=c.get("embed_dim", 96),
                   depths=tuple(c.get("depths", (2, 2, 6, 2))), n_heads=tuple(c.get("num_heads", (3, 6, 12, 24))),
                   window_size=c.get("window_size", 7), mlp_ratio=c.get("mlp_ratio", 4.0),
                   layer_norm_eps=c.get("layer_norm_eps", 1e-5))


_B = "encoder.layers.{i}.blocks.{j}."
SWIN_KEYS = [  # ours -> Hub (SwinBackbone; prefixed by "model.pixel_level_module.encoder." inside OneFormer)
    ("patch_embed.", "embeddings.patch_embeddings.projection."), ("embed_norm.", "embeddings.norm."),
    ("merges.{i}.", "encoder.layers.{i}.downsample."), ("stage_norms.", "hidden_states_norms."),
    ("stages.{i}.{j}.norm1.", _B + "layernorm_before."), ("stages.{i}.{j}.norm2.", _B + "layernorm_after."),
    ("stages.{i}.{j}.attn.q.", _B + "attention.self.query."), ("stages.{i}.{j}.attn.k.", _B + "attention.self.key."),
    ("stages.{i}.{j}.attn.v.", _B + "attention.self.value."), ("stages.{i}.{j}.fc1.", _B + "intermediate.dense."),
    ("stages.{i}.{j}.attn.o.", _B + "attention.output.dense."), ("stages.{i}.{j}.fc2.", _B + "output.dense."),
    ("stages.{i}.{j}.rel_table", _B + "attention.self.relative_position_bias_table"),
]
ONEFORMER_BACKBONE = "model.pixel_level_module.encoder."
SWIN_DEAD_PREFIXES = ("swin.layernorm.",)  # saved by SwinBackbone, never applied, absent from OneFormer: skipped


def _windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, ws², C), windows and their pixels in row-major order."""
    B, H, W, C = x.shape
    return x.view(B, H // ws, ws, W // ws, ws, C).transpose(2, 3).reshape(B, -1, ws * ws, C)


class SwinBlock(ViTBlock):
    """A ViT block attending in (shifted) windows, with relative position bias (Liu et al. 2021; weights.md §2.6)."""

    def __init__(self, dim: int, n_heads: int, ws: int, shift: int, c: SwinConfig):
        super().__init__(dim, n_heads, int(dim * c.mlp_ratio), "gelu", c.layer_norm_eps)
        self.ws, self.shift = ws, shift
        self.rel_table = nn.Parameter(0.02 * torch.randn((2 * ws - 1) ** 2, n_heads))
        yx = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, ws²)
        rel = yx[:, :, None] - yx[:, None, :] + ws - 1                                          # (2, ws², ws²)
        self.register_buffer("rel_index", rel[0] * (2 * ws - 1) + rel[1], persistent=False)

    def shift_mask(self, Hp: int, Wp: int, device) -> torch.Tensor:
        """-100 between tokens of a shifted window that come from different image regions. -> (nW, ws², ws²)"""
        def region(n):  # 0 | 1 | 2 on [0, n - ws) | [n - ws, n - shift) | [n - shift, n)
            return sum((torch.arange(n, device=device) >= n - e).long() for e in (self.ws, self.shift))
        ids = _windows((region(Hp)[:, None] * 3 + region(Wp)[None, :])[None, :, :, None], self.ws)[0, ..., 0]
        return (ids[:, None, :] != ids[:, :, None]).float() * -100.0

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        ws, s = self.ws, self.shift
        h = F.pad(self.norm1(x), (0, 0, 0, -W % ws, 0, -H % ws))       # pad after layernorm_before
        Hp, Wp = h.shape[1:3]
        bias = self.rel_table[self.rel_index].permute(2, 0, 1)          # (heads, ws², ws²)
        if s:
            h = torch.roll(h, (-s, -s), (1, 2))
            bias = bias + self.shift_mask(Hp, Wp, x.device)[:, None].to(bias.dtype)   # (nW, heads, ws², ws²)
        h = self.attn(_windows(h, ws), bias.to(h.dtype))                # (B, nW, ws², C), back to (B, Hp, Wp, C):
        h = h.view(B, Hp // ws, Wp // ws, ws, ws, C).transpose(2, 3).reshape(B, Hp, Wp, C)
        if s:
            h = torch.roll(h, (s, s), (1, 2))
        return h[:, :H, :W]


class PatchMerging(nn.Module):
    """2×2 neighbours -> LayerNorm(4C) -> Linear(4C -> 2C), halving the map (odd sizes zero-padded)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.reduction = nn.LayerNorm(4 * dim), nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class Swin(nn.Module):
    """Swin Transformer backbone as used by OneFormer: returns the stage-4 map after its stage norm."""

    def __init__(self, config: SwinConfig):
        super().__init__()
        self.config = c = config
        dims = [c.embed_dim * 2 ** i for i in range(len(c.depths))]
        self.dim = dims[-1]
        self.patch_embed = nn.Conv2d(3, c.embed_dim, c.patch_size, c.patch_size)
        self.embed_norm = nn.LayerNorm(c.embed_dim)
        # Shift ws//2 on odd blocks at every resolution: no window clamping (SwinBackbone's always_partition).
        self.stages = nn.ModuleList(nn.Sequential(*(SwinBlock(d, h, c.window_size, j % 2 * (c.window_size // 2), c)
                                                    for j in range(n))) for d, n, h in zip(dims, c.depths, c.n_heads))
        self.merges = nn.ModuleList(PatchMerging(d) for d in dims[:-1])
        self.stage_norms = nn.ModuleDict({f"stage{i + 1}": nn.LayerNorm(d) for i, d in enumerate(dims)})

    def feature_maps(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output before patch merging, through its stage norm. -> list of (B, H_k, W_k, C_k)"""
        p = self.config.patch_size
        pixels = F.pad(pixels.to(self.embed_norm.weight.dtype), (0, -pixels.shape[-1] % p, 0, -pixels.shape[-2] % p))
        x = self.embed_norm(self.patch_embed(pixels).permute(0, 2, 3, 1))              # (B, H/4, W/4, C)
        maps = []
        for stage, norm, merge in zip(self.stages, self.stage_norms.values(), [*self.merges, None]):
            x = stage(x)
            maps.append(norm(x))
            x = merge(x) if merge is not None else x
        return maps

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """-> (B, h·w, C) row-major stage-4 tokens: (B, 576, 1536) for Swin-L at 768 px (SPEC §1)."""
        return self.feature_maps(pixels)[-1].flatten(1, 2)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> "Swin":
        """A SwinBackbone checkpoint, or OneFormer's (`model.pixel_level_module.encoder.*`; the rest skipped)."""
        cfg = _config_json(path)
        model = cls(SwinConfig.from_json(cfg))
        if "backbone_config" in cfg:
            return _load(model, path, SWIN_KEYS, lambda k: k.startswith(ONEFORMER_BACKBONE), dtype, ONEFORMER_BACKBONE)
        return _load(model, path, SWIN_KEYS, lambda k: not k.startswith(SWIN_DEAD_PREFIXES), dtype)


# --------------------------------------------------------------------------- target encoders (SPEC §1)
@dataclass
class TargetConfig:
    """The three frozen teachers and their input sizes; defaults are the paper's (SPEC §1)."""
    depth: DINOv2Config = field(default_factory=DINOv2Config)
    seg: SwinConfig = field(default_factory=SwinConfig)
    gen: CLIPVisionConfig = field(default_factory=CLIPVisionConfig.unclip_h)
    depth_size: int = 336                               # -> 24×24 = 576 patches; gen: its own image_size
    seg_size: int = 768                                 # -> stage 4 is 24×24
    depth_layers: tuple[int, ...] = (4, 11, 17, 23)     # 0-based DINOv2 blocks averaged for the depth target

    @classmethod
    def tiny(cls) -> "TargetConfig":              # spatial N = 64 = the tiny base CLIP's 8×8 image tokens
        return cls(DINOv2Config.tiny(), SwinConfig.tiny(), CLIPVisionConfig.tiny_unclip(), 112, 256, (0, 1, 2, 3))


class TargetEncoders(nn.Module):
    """Depth / seg / gen teachers: frozen, always in eval mode, batched under no_grad (SPEC §1, §8)."""

    def __init__(self, config: TargetConfig, depth: DINOv2 | None = None, seg: Swin | None = None,
                 gen: CLIPVision | None = None):
        super().__init__()
        self.config = config
        self.depth, self.seg = depth or DINOv2(config.depth), seg or Swin(config.seg)
        self.gen = gen or CLIPVision(config.gen)
        self.requires_grad_(False).eval()
        self.dims = {"depth": config.depth.hidden_size, "seg": self.seg.dim, "gen": config.gen.projection_dim}

    def train(self, mode: bool = True) -> "TargetEncoders":
        return super().train(False)                     # teachers never leave eval mode

    def preprocess(self, square_img: Image.Image) -> dict[str, torch.Tensor]:
        """The square view (SPEC §1) at each teacher's size -> {task: (3, S_task, S_task)}"""
        return {"depth": resize_normalize(square_img, self.config.depth_size),        # ImageNet mean/std
                "seg": resize_normalize(square_img, self.config.seg_size),
                "gen": resize_normalize(square_img, self.config.gen.image_size, CLIP_MEAN, CLIP_STD)}

    @torch.no_grad()
    def forward(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Targets for the tasks present in `pixels`: depth (B, N, Cd), seg (B, N, Cs), gen (B, 1, Cg)."""
        targets = {"depth": lambda x: torch.stack(self.depth.intermediate_layers(x, self.config.depth_layers)).mean(0),
                   "seg": self.seg, "gen": lambda x: self.gen.image_embeds(x)[:, None]}
        if set(pixels) - set(targets):
            raise ValueError(f"unknown target tasks {sorted(set(pixels) - set(targets))}: expected {sorted(targets)}")
        return {task: targets[task](x) for task, x in pixels.items()}

    @torch.no_grad()
    def depth_last(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normed patch tokens of the last DINOv2 block, the probing target (SPEC §5). -> (B, N, Cd)"""
        return self.depth.intermediate_layers(pixels, [-1])[0]

    @classmethod
    def from_pretrained(cls, depth_path, seg_path, gen_path, dtype: torch.dtype = torch.float32,
                        interpolate_offset: float = 0.1, **sizes) -> "TargetEncoders":
        """The three official checkpoints (SPEC §7); `sizes`: depth_size / seg_size / depth_layers overrides."""
        depth = DINOv2.from_pretrained(depth_path, dtype, interpolate_offset)
        seg, gen = Swin.from_pretrained(seg_path, dtype), CLIPVision.from_pretrained(gen_path, dtype)
        return cls(TargetConfig(depth.config, seg.config, gen.config, **sizes), depth, seg, gen)

    @classmethod
    def tiny(cls, seed: int = 0, dtype: torch.dtype = torch.float32) -> "TargetEncoders":
        """Random tiny teachers (built-in CPU training), reproducible from `seed`."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(TargetConfig.tiny()).to(dtype)
