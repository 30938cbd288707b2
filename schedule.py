"""The learning-rate schedule every training loop here uses (Sec. 5.1): linear warmup, then cosine decay."""

from __future__ import annotations

import math

import torch


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """The factor on the peak learning rate at `step`: linear warmup over `warmup` steps (3 % of the steps
    in the paper), then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total: int, warmup_ratio: float = 0.03
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR of `cosine_schedule` over `total` steps, warming up for warmup_ratio of them (>= 1)."""
    warmup = max(1, round(warmup_ratio * total))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, total, warmup))
