"""Image views and preprocessing (docs/design.md §2). Every encoder, base or teacher, sees the SAME square
view of an image: the center crop in PT, the image padded to a square with the CLIP mean colour in
VPT/IFT and at inference (LLaVA's expand2square). Each then resizes that view to its own input size."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIEWS = ("crop", "pad")


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = (122, 116, 104)) -> Image.Image:
    """LLaVA's expand2square: the image centred on a square of the CLIP mean colour (int(255 · mean))."""
    w, h = img.size
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def center_crop_square(img: Image.Image, side: int | None = None) -> Image.Image:
    """The central side² square, by default of side min(w, h): the PT view (what CLIP's center crop keeps)."""
    side = side or min(img.size)
    left = (img.size[0] - side) // 2  # transformers' rounding
    top = (img.size[1] - side) // 2
    return img.crop((left, top, left + side, top + side))


def square_view(img: Image.Image, mode: str) -> Image.Image:
    """The square view every encoder sees: 'crop' in PT, 'pad' in VPT/IFT and at inference (Sec. 5.1)."""
    if mode not in VIEWS:
        raise ValueError(f"square_view mode must be one of {VIEWS}, got {mode!r}")
    rgb = img.convert("RGB")
    if mode == "crop":
        return center_crop_square(rgb)
    return pad_to_square(rgb)


def normalize(img: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """PIL image -> (3, H, W) float tensor, (x / 255 - mean) / std."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def clip_preprocess(img: Image.Image, size: int) -> torch.Tensor:
    """CLIPImageProcessor: shortest side -> size (bicubic), center crop, CLIP mean/std. -> (3, size, size)"""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))  # the long side floored, as transformers does
    else:
        new = (int(size * w / h), size)
    resized = img.convert("RGB").resize(new, Image.BICUBIC)
    return normalize(center_crop_square(resized, size), CLIP_MEAN, CLIP_STD)


def resize_normalize(
    img: Image.Image,
    size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """Bicubic resize to size² and normalise: a teacher's input from the square view. -> (3, size, size)"""
    return normalize(img.convert("RGB").resize((size, size), Image.BICUBIC), mean, std)
