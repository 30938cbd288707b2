"""The multi-encoder baselines of Tab. 1 (docs/design.md §11): instead of distilling the teachers into the
LLM, feed their features to it as input, at train and at test time. The features are exactly OLA-VLM's
targets (depth (N, 1024), seg (N, 1536), gen (1, 1024) for N = 576 image tokens).

- feat-concat: per image token, the channels [base encoder | gen repeated N times | depth | seg] (always
  the paper's order) go through one mlp2x_gelu projector: 1024 + 1024 + 1024 + 1536 = 4608 -> H; N tokens.
- token-concat: the base encoder keeps its projector; each teacher gets its own mlp2x_gelu projector over
  N_seek tokens (spatial maps average-pooled in N_seek contiguous chunks of rows, the gen vector repeated),
  placed where OLA-VLM's special tokens go: [img N | gen 8 | depth 8 | seg 8].

ConcatVLM is OLA-VLM's model with the teachers as input and neither special tokens nor predictors."""

from __future__ import annotations

import torch
import torch.nn as nn

from llm import LLM
from ola import OLAVLM, OLAConfig, mlp2x_gelu
from predictors import pool_rows
from tasks import PAPER_TOKEN_ORDER, TASKS
from teachers import TargetEncoders


class TeacherInputs(nn.Module):
    """The frozen teachers' features as LLM input. `teachers` stays outside the state of this module (the
    model holds it as its `teachers` component); here live only the token-concat projectors."""

    def __init__(self, mode: str, order: tuple[str, ...], dims: dict[str, int], hidden: int, n_tokens: int):
        super().__init__()
        if mode not in ("feat-concat", "token-concat"):
            raise ValueError(f"mode {mode!r} is not a multi-encoder baseline")
        self.mode = mode
        self.order = order
        self.dims = dims
        self.n_tokens = n_tokens
        self.projectors = None
        if mode == "token-concat":
            self.projectors = nn.ModuleDict({task: mlp2x_gelu(dims[task], hidden) for task in order})

    @property
    def extra_width(self) -> int:
        """Channels feat-concat adds to the base encoder's (0 for token-concat)."""
        return sum(self.dims.values()) if self.mode == "feat-concat" else 0

    @property
    def n_positions(self) -> int:
        """Sequence positions token-concat adds after the image tokens (0 for feat-concat)."""
        return len(self.order) * self.n_tokens if self.mode == "token-concat" else 0

    @staticmethod
    @torch.no_grad()
    def features(teachers: TargetEncoders, pixels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{task: (B, N or 1, C)} from each teacher's pixels."""
        return teachers(pixels)

    def concat(self, base: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """feat-concat: (B, N, C_base) -> (B, N, C_base + Σ C_task), global features repeated over N, in the
        paper's channel order [base | gen | depth | seg] whatever --token-order is."""
        N = base.shape[1]
        order = [task for task in PAPER_TOKEN_ORDER if task in self.dims]
        parts = [base] + [feats[task].to(base.dtype).expand(-1, N, -1) for task in order]
        return torch.cat(parts, dim=-1)

    def tokens(self, feats: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """token-concat: (B, len(order) · N_seek, H) in token order."""
        blocks = []
        for task in self.order:
            x = feats[task].to(dtype)
            x = pool_rows(x, self.n_tokens) if TASKS[task].spatial else x.expand(-1, self.n_tokens, -1)
            blocks.append(self.projectors[task](x))
        return torch.cat(blocks, dim=1)


class ConcatVLM(OLAVLM):
    """A multi-encoder baseline of Tab. 1 (cfg.mode feat-concat or token-concat): the frozen `teachers` of
    cfg.tasks are a component of the model, and their features are an input to the LLM."""

    modes = ("feat-concat", "token-concat")

    def __init__(
        self,
        cfg: OLAConfig,
        llm: LLM,
        vision: nn.Module,
        teachers: TargetEncoders,
        sources: dict[str, str | None] | None = None,
    ):
        if teachers is None or set(teachers.dims) != set(cfg.tasks):
            raise ValueError(f"mode {cfg.mode} needs the teachers of {list(cfg.tasks)} as its input")
        inputs = TeacherInputs(
            cfg.mode, cfg.token_order, teachers.dims, llm.config.hidden_size, cfg.num_seek_tokens
        )
        super().__init__(cfg, llm, vision, sources=sources, extra_width=inputs.extra_width)
        self.teachers = teachers.requires_grad_(False)
        self.inputs = inputs
        self.image_seq_len += inputs.n_positions

    def encode_images(
        self, images: torch.Tensor, teacher_images: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(n, 3, S, S) -> (n, 576 + k, H): feat-concat widens every image token by the teachers' channels
        (k = 0); token-concat appends the teachers' N_seek tokens each (k = n_tasks · N_seek)."""
        if teacher_images is None:
            raise ValueError(f"mode {self.cfg.mode} feeds the teachers' features: pass teacher_images")
        dtype = self.projector[0].weight.dtype
        with torch.no_grad():
            feats = self.vision.features(images).to(dtype)  # (n, 576, 1024 | 3072)
        extra = self.inputs.features(self.teachers, teacher_images)  # {task: (n, 576 or 1, C)}
        if self.cfg.mode == "feat-concat":
            return self.projector(self.inputs.concat(feats, extra))  # (n, 576, 1024 + 4608 - 1024) -> H
        img = self.projector(feats)  # (n, 576, H)
        return torch.cat([img, self.inputs.tokens(extra, dtype)], dim=1)  # (n, 576 + 24, H)


def make_vlm(
    cfg: OLAConfig,
    llm: LLM,
    vision: nn.Module,
    target_dims: dict[str, int] | None = None,
    sources: dict[str, str | None] | None = None,
    teachers: TargetEncoders | None = None,
) -> OLAVLM:
    """The model of cfg.mode: OLAVLM (OLA-VLM, or LLaVA-1.5 without tasks) or a ConcatVLM baseline."""
    if cfg.mode == "ola":
        return OLAVLM(cfg, llm, vision, target_dims, sources)
    return ConcatVLM(cfg, llm, vision, teachers, sources)
