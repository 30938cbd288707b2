"""The multi-encoder baselines of Tab. 1 (docs/design.md §11): instead of distilling the teachers into the
LLM, feed their features to it as input, at train and at test time. The features are exactly OLA-VLM's
targets (depth (N, 1024), seg (N, 1536), gen (1, 1024) for N = 576 image tokens).

- feat-concat: per image token, the channels [base encoder | gen repeated N times | depth | seg] (the
  token order) go through one mlp2x_gelu projector: 1024 + 1024 + 1024 + 1536 = 4608 -> H; N tokens.
- token-concat: the base encoder keeps its projector; each teacher gets its own mlp2x_gelu projector over
  N_seek tokens (spatial maps average-pooled in N_seek contiguous chunks of rows, the gen vector repeated),
  placed where OLA-VLM's special tokens go: [img N | gen 8 | depth 8 | seg 8]."""

from __future__ import annotations

import torch
import torch.nn as nn

from predictors import pool_rows
from tasks import TASKS
from teachers import TargetEncoders


def mlp2x_gelu(width: int, hidden: int) -> nn.Sequential:
    """LLaVA-1.5's projector: Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))


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
        """feat-concat: (B, N, C_base) -> (B, N, C_base + Σ C_task), global features repeated over N."""
        N = base.shape[1]
        parts = [base] + [feats[task].to(base.dtype).expand(-1, N, -1) for task in self.order]
        return torch.cat(parts, dim=-1)

    def tokens(self, feats: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """token-concat: (B, len(order) · N_seek, H) in token order."""
        blocks = []
        for task in self.order:
            x = feats[task].to(dtype)
            x = pool_rows(x, self.n_tokens) if TASKS[task].spatial else x.expand(-1, self.n_tokens, -1)
            blocks.append(self.projectors[task](x))
        return torch.cat(blocks, dim=1)
