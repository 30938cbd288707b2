"""The frozen target encoders ("teachers", Sec. 3 and 4.1): each turns the square view of an image into the
features an embedding predictor must predict (docs/design.md §2). They run batched, in eval mode, under
no_grad; which teacher serves which task is the task table's business (tasks.py).

| teacher | encoder | input (square view) | target |
|---|---|---|---|
| depth | DINOv2-L/14 (Depth Anything V2) | grid·14 px (336) | mean of normed blocks 4, 11, 17, 23 |
| seg | Swin-L of OneFormer COCO | grid·32 px (768) | stage-4 map after its norm (B, 576, 1536) |
| gen | CLIP ViT-H/14 of SD-2.1-unCLIP | 224 px | projected image embedding (B, 1, 1024) |

The built-in world's teachers (docs/design.md §9) are the same classes at miniature size, trained for their
task from the image (pretrain.py) and loaded from the official layouts like the real ones; `tiny` gives a
random one of each, for tests.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from PIL import Image

from encoders import CLIPVision, CLIPVisionConfig, DINOv2, DINOv2Config
from preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, resize_normalize
from swin import Swin, SwinConfig
from weights import config_json


class Teacher(nn.Module):
    """A frozen encoder, always in eval mode: `preprocess` (square view -> pixels at `input_size`), `forward`
    (pixels -> target (B, N, C)). Subclasses define `features` (and `probe_features` where the probing
    target, Sec. 3, differs)."""

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, encoder: nn.Module, input_size: int):
        super().__init__()
        self.encoder = encoder
        self.input_size = input_size
        self.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # teachers never leave eval mode

    def preprocess(self, square: Image.Image) -> torch.Tensor:
        """The square view at the teacher's input size, normalised. -> (3, S, S)"""
        return resize_normalize(square, self.input_size, self.mean, self.std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(pixels)

    def probe_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(pixels)


class DepthTeacher(Teacher):
    """DINOv2 of Depth Anything V2: the mean of the final-normed patch tokens of `blocks` (0-based DINOv2
    block indices, not LLM layers)."""

    def __init__(self, encoder: DINOv2, input_size: int, blocks: tuple[int, ...] = (4, 11, 17, 23)):
        super().__init__(encoder, input_size)
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
        """A Depth-Anything-V2 (or plain DINOv2) folder; the averaged blocks are its config's `out_indices`
        (1-based hidden states: DAv2-L's 5, 12, 18, 24 = blocks 4, 11, 17, 23), else DAv2-L's."""
        encoder = DINOv2.from_pretrained(path, dtype, interpolate_offset=0.1)
        config = config_json(path)
        out_indices = config.get("backbone_config", config).get("out_indices") or (5, 12, 18, 24)
        n = encoder.config.n_layers
        if any(not 1 <= i <= n for i in out_indices):
            raise ValueError(f"{path}: out_indices {list(out_indices)} name hidden states outside 1..{n}")
        return cls(encoder, input_size, blocks=tuple(i - 1 for i in out_indices))

    @classmethod
    def tiny(cls, input_size: int) -> DepthTeacher:
        """A random tiny DINOv2 (tests)."""
        return cls(DINOv2(DINOv2Config.tiny()), input_size, blocks=(0, 1, 2, 3))


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
        """A random tiny Swin (tests)."""
        return cls(Swin(SwinConfig.tiny()), input_size)


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
        """A random tiny CLIP (tests)."""
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

    def preprocess(self, square: Image.Image) -> dict[str, torch.Tensor]:
        """The square view at each teacher's size -> {task: (3, S, S)}"""
        return {task: teacher.preprocess(square) for task, teacher in self.teachers.items()}

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
        return {task: self.teachers[task].probe_features(x) for task, x in pixels.items()}
