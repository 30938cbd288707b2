"""Image views and preprocessing (docs/design.md §2). Every encoder, base or teacher, sees the SAME square
view of an image: the center crop in PT, the image padded to a square with the CLIP mean colour in
VPT/IFT and at inference (LLaVA's expand2square). Each then resizes that view to its own input size."""

from __future__ import annotations

import os
from typing import IO

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIEWS = ("crop", "pad")
# What every image opener accepts (read_image; docs/design.md §12, Faults): the datasets' formats and common
# photo formats, never PIL's others (EPS runs Ghostscript). Phone JPEGs (MPO) open as JPEG.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
# Pad-to-square allocates max(w, h)² pixels, so shapes no real photo, screenshot or chart has are refused
# before any view is made (a 48 MP phone photo is 8064×6048).
MAX_ASPECT = 20  # long side / short side
MAX_SIDE = 10_000  # long side in pixels: a padded square of at most 300 MB (RGB, 8 bit)


def check_image_size(size: tuple[int, int]) -> None:
    """Refuse an image of `size` (w, h) beyond MAX_SIDE or MAX_ASPECT (ValueError saying which)."""
    w, h = size
    if min(w, h) < 1:
        raise ValueError(f"{w}×{h} pixels: an empty image")
    if max(w, h) > MAX_SIDE:
        raise ValueError(f"{w}×{h} pixels: the long side is over the {MAX_SIDE} px limit (MAX_SIDE)")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ValueError(
            f"{w}×{h} pixels: aspect ratio {max(w, h) / min(w, h):.0f}:1, over the {MAX_ASPECT}:1 limit "
            f"(MAX_ASPECT)"
        )


def read_image(source: str | os.PathLike | IO[bytes], name: object = None) -> Image.Image:
    """The image file (path or open binary file) `source` as RGB, decoded now: every opener's one way in.
    Its format must be one of IMAGE_FORMATS and its size pass check_image_size, checked from the header
    before anything is decoded. Raises ValueError `cannot read image <name (default: source)>: <why>` for
    a missing, damaged or refused file and for a decompression bomb (over 2 × Image.MAX_IMAGE_PIXELS)."""
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as img:
            check_image_size(img.size)
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {source if name is None else name}: {e}") from None


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
