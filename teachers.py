"""The frozen target encoders ("teachers", Sec. 3 and 4.1): each turns the square view of an image into the
features an embedding predictor must predict (docs/design.md §2). They run batched, in eval mode, under
no_grad; which teacher serves which task is the task table's business (tasks.py).

| teacher | encoder | input (square view) | target |
|---|---|---|---|
| depth | DINOv2-L/14 (Depth Anything V2) | grid·14 px (336) | mean of normed blocks 4, 11, 17, 23 |
| seg | Swin-L of OneFormer COCO | grid·32 px (768) | stage-4 map after its norm (B, 576, 1536) |
| gen | CLIP ViT-H/14 of SD-2.1-unCLIP | 224 px | projected image embedding (B, 1, 1024) |

The tiny teachers of the built-in world (docs/design.md §9) are random encoders of the same classes that read
what the real teachers' features stand for: the tiny depth teacher the image's true depth map, the tiny seg
teacher its true segmentation map (both drawn as pictures by `depth_picture` / `seg_picture`), the tiny gen
teacher the image itself.
"""

from __future__ import annotations

import colorsys
import os
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from encoders import CLIPVision, CLIPVisionConfig, DINOv2, DINOv2Config
from preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, resize_normalize
from swin import Swin, SwinConfig


def depth_picture(
    depth: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """A depth map (mode 'F', metres) as a grey picture: depth relative to the map's farthest point,
    bilinear to size², in three channels, normalised like an image. -> (3, size, size)"""
    d = torch.from_numpy(np.asarray(depth.resize((size, size), Image.BILINEAR), dtype=np.float32).copy())
    x = (d / d.max().clamp(min=1e-6)).expand(3, -1, -1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# A fixed colour per segment id (mod 256), hues a golden-ratio step apart; 0 (background) black. (256, 3)
SEGMENT_COLORS = torch.tensor(
    [(0.0, 0.0, 0.0)] + [colorsys.hsv_to_rgb(k * 0.618034 % 1, 0.8, 0.95) for k in range(1, 256)]
)


def seg_picture(seg: Image.Image, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """A segmentation map (mode 'I', segment ids) as a picture: nearest to size², SEGMENT_COLORS,
    normalised like an image. -> (3, size, size)"""
    ids = torch.from_numpy(np.asarray(seg.resize((size, size), Image.NEAREST), dtype=np.int64))
    x = SEGMENT_COLORS[ids % 256].permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


MAP_PICTURES = {"depth": depth_picture, "seg": seg_picture}  # what a map-reading teacher sees


def empty_picture(kind: str, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """What a map-reading teacher sees for a scene without shapes: depth the wall everywhere (a uniform map),
    seg background everywhere. -> (3, size, size)"""
    if kind == "depth":
        return depth_picture(Image.new("F", (size, size), 1.0), size, mean, std)
    return seg_picture(Image.new("I", (size, size), 0), size, mean, std)


class Teacher(nn.Module):
    """A frozen encoder, always in eval mode: `preprocess` (square view -> pixels at `input_size`), `forward`
    (pixels -> target (B, N, C)), `probe_target` (the probing target, Sec. 3). Subclasses define `features`
    (and `probe_features` where the probing target differs). `reads` is what it encodes: "image" (every real
    teacher: targets are its features), or a map of the record, "depth" or "seg" (the tiny teachers of the
    built-in world: targets are its features minus those of the empty scene's map, normed per token;
    docs/design.md §9)."""

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, encoder: nn.Module, input_size: int, reads: str = "image"):
        super().__init__()
        if reads != "image" and reads not in MAP_PICTURES:
            raise ValueError(f"a teacher reads 'image' or one of {list(MAP_PICTURES)}, not {reads!r}")
        self.encoder = encoder
        self.input_size = input_size
        self.reads = reads
        if reads != "image":  # non-persistent: rebuilt from `reads`, never stored in a checkpoint
            self.register_buffer(
                "empty", empty_picture(reads, input_size, self.mean, self.std), persistent=False
            )
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # teachers never leave eval mode

    def preprocess(self, square: Image.Image, maps: dict[str, Image.Image] | None = None) -> torch.Tensor:
        """The square view, or the map this teacher reads in that view (`maps`: data.read_map's), at its
        input size. A map reader given no maps at all (a caller that loads none) encodes the image and
        warns; one given maps without its own raises. -> (3, S, S)"""
        if self.reads == "image":
            return resize_normalize(square, self.input_size, self.mean, self.std)
        if maps is None:
            warnings.warn(
                f"the {self.reads} teacher encodes a true {self.reads} map but was given no maps: "
                f"it encodes the image instead",
                stacklevel=2,
            )
            return resize_normalize(square, self.input_size, self.mean, self.std)
        if self.reads not in maps:
            raise ValueError(
                f"this {self.reads} teacher encodes the record's true {self.reads} map "
                f"(docs/design.md §9), but the record names no {self.reads!r} file"
            )
        return MAP_PICTURES[self.reads](maps[self.reads], self.input_size, self.mean, self.std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._minus_empty(self.features, pixels)

    def probe_target(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._minus_empty(self.probe_features, pixels)

    def probe_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(pixels)

    def _minus_empty(self, encode, pixels: torch.Tensor) -> torch.Tensor:
        """encode(pixels) for an image reader; for a map reader, minus encode(the empty scene's map) (one
        batch), layer-normed per token like a real teacher's normed features: what the map shows beyond the
        wall that fills most of every scene (docs/design.md §9)."""
        if self.reads == "image":
            return encode(pixels)
        out = encode(torch.cat([pixels, self.empty[None].to(pixels)]))  # (B + 1, N, C)
        relative = out[:-1] - out[-1:]
        return F.layer_norm(relative, relative.shape[-1:])  # (B, N, C)


class DepthTeacher(Teacher):
    """DINOv2 of Depth Anything V2: the mean of the final-normed patch tokens of `blocks` (0-based DINOv2
    block indices, not LLM layers)."""

    def __init__(
        self,
        encoder: DINOv2,
        input_size: int,
        blocks: tuple[int, ...] = (4, 11, 17, 23),
        reads: str = "image",
    ):
        super().__init__(encoder, input_size, reads)
        self.blocks = tuple(blocks)

    @property
    def dim(self) -> int:
        return self.encoder.config.hidden_size

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        blocks = self.encoder.intermediate_layers(pixels, list(self.blocks))
        return torch.stack(blocks).mean(0)  # (B, N, 1024)

    def probe_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The probes regress the LAST block's normed patch tokens (Sec. 3; docs/design.md §7)."""
        return self.encoder.intermediate_layers(pixels, [-1])[0]

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, input_size: int, dtype: torch.dtype = torch.float32
    ) -> DepthTeacher:
        return cls(DINOv2.from_pretrained(path, dtype, interpolate_offset=0.1), input_size)

    @classmethod
    def tiny(cls, input_size: int) -> DepthTeacher:
        """A random tiny DINOv2 over the true depth map."""
        return cls(DINOv2(DINOv2Config.tiny()), input_size, blocks=(0, 1, 2, 3), reads="depth")


class SegTeacher(Teacher):
    """Swin-L of OneFormer: the stage-4 map after its stage norm, row-major tokens."""

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels)  # (B, N, 1536)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, input_size: int, dtype: torch.dtype = torch.float32
    ) -> SegTeacher:
        return cls(Swin.from_pretrained(path, dtype), input_size)

    @classmethod
    def tiny(cls, input_size: int) -> SegTeacher:
        """A random tiny Swin over the true segmentation map."""
        return cls(Swin(SwinConfig.tiny()), input_size, reads="seg")


class GenTeacher(Teacher):
    """CLIP ViT-H/14 of SD-2.1-unCLIP: the projected image embedding (not L2-normalised), one token; its input
    size is its own (224 px), not tied to the base grid."""

    mean = CLIP_MEAN
    std = CLIP_STD

    @property
    def dim(self) -> int:
        return self.encoder.config.projection_dim

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.image_embeds(pixels)[:, None]  # (B, 1, 1024)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, input_size: int | None = None, dtype: torch.dtype = torch.float32
    ) -> GenTeacher:
        encoder = CLIPVision.from_pretrained(path, dtype)
        return cls(encoder, encoder.config.image_size)

    @classmethod
    def tiny(cls, input_size: int | None = None) -> GenTeacher:
        """A random tiny CLIP over the image."""
        encoder = CLIPVision(CLIPVisionConfig.tiny_unclip())
        return cls(encoder, encoder.config.image_size)


class TargetEncoders(nn.Module):
    """The teachers of a model's tasks, keyed by task name: batched targets {task: (B, N, C)}."""

    def __init__(self, teachers: dict[str, Teacher]):
        super().__init__()
        self.teachers = nn.ModuleDict(teachers)
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> TargetEncoders:
        return super().train(False)  # teachers never leave eval mode

    @property
    def tasks(self) -> list[str]:
        return list(self.teachers)

    @property
    def dims(self) -> dict[str, int]:
        return {task: teacher.dim for task, teacher in self.teachers.items()}

    def preprocess(
        self, square: Image.Image, maps: dict[str, Image.Image] | None = None
    ) -> dict[str, torch.Tensor]:
        """The square view (and the record's maps in it) at each teacher's size -> {task: (3, S, S)}"""
        return {task: teacher.preprocess(square, maps) for task, teacher in self.teachers.items()}

    @torch.no_grad()
    def forward(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Targets for the tasks present in `pixels`: spatial (B, N, C), global (B, 1, C)."""
        unknown = set(pixels) - set(self.teachers)
        if unknown:
            raise ValueError(f"no teacher for task(s) {sorted(unknown)}: this model has {self.tasks}")
        return {task: self.teachers[task](x) for task, x in pixels.items()}

    @torch.no_grad()
    def probe_targets(self, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The probing targets (Sec. 3) of the tasks present in `pixels`."""
        return {task: self.teachers[task].probe_target(x) for task, x in pixels.items()}
