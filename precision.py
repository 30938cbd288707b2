"""Precision (docs/design.md §6), shared by training, probing and evaluation: --dtype {auto, fp32, bf16}
-> the dtype of the frozen weights and of autocast; trained weights stay fp32 master weights."""

from __future__ import annotations

from contextlib import nullcontext

import torch

PRECISIONS = ("auto", "fp32", "bf16")  # --dtype of train.py, probe.py, eval.py


def compute_dtype(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype of the frozen weights and of autocast (docs/design.md §6): 'bf16', 'fp32', or 'auto' = bf16
    on a GPU, fp32 on a CPU. Trained weights stay fp32 (master weights) whatever it is."""
    if precision not in PRECISIONS:
        raise ValueError(f"--dtype: expected one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def device_and_dtype(precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """cuda when there is one, else cpu, and its compute dtype."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, compute_dtype(device, precision)


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast when the compute dtype is bf16 (on a CPU too: AMX), else nothing."""
    if dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
