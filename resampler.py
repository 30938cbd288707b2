"""Perceiver resampler: the embedding predictor of OLA-VLM (Sec. 4.1, Fig. 4) and the
probe of Sec. 3 (docs/design.md §3, §7).

A set of latents (queries) cross-attends to keys = LLM hidden states. In each block the latents
attend over cat(keys, latents), so they also see each other. Biases follow the released code:
proj_in / proj_out are plain Linears WITH bias; to_q, to_kv, to_out and the feed-forward
Linears have none.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PerceiverAttention(nn.Module):
    """latents' = Attn(q = LN(latents), k/v = cat(LN(keys), LN(latents)))."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm_keys = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, keys: torch.Tensor, latents: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        B, Q, _ = latents.shape
        latents = self.norm_latents(latents)  # (B, Q, dim)
        context = torch.cat([self.norm_keys(keys), latents], dim=1)  # (B, T+Q, dim)
        q = self.to_q(latents)  # (B, Q, h*dh)
        k, v = self.to_kv(context).chunk(2, dim=-1)  # (B, T+Q, h*dh) each
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for t in (q, k, v))
        s = self.dim_head**-0.25  # on q and k: net 1/sqrt(dh), as released
        scores = ((q * s) @ (k * s).transpose(-2, -1)).float()  # (B, h, Q, T+Q) fp32
        if attend is not None:  # (B, T+Q) True=attend
            scores = scores.masked_fill(~attend[:, None, None, :], float("-inf"))
        weights = scores.softmax(dim=-1).to(v.dtype)
        out = (weights @ v).transpose(1, 2).reshape(B, Q, -1)  # (B, Q, h*dh)
        return self.to_out(out)  # (B, Q, dim)


class PerceiverResampler(nn.Module):
    """proj_in -> depth x [attention + feed-forward, both residual] -> proj_out -> LayerNorm.

    With `num_latents` the module owns learnable latents (1, Q, dim) living in `dim` space
    (probes, Sec. 3). Without it, latents are passed to forward in `in_dim` space and go
    through the same proj_in as the keys (OLA predictors: Q_depth, Q_seg, mean of <g> states).
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        out_dim: int,
        num_latents: int | None = None,
        depth: int = 1,
        heads: int = 4,
        dim_head: int = 32,
        ff_mult: int = 1,
    ):
        super().__init__()
        self.latents = (
            nn.Parameter(torch.randn(1, num_latents, dim) / dim**0.5) if num_latents is not None else None
        )
        self.proj_in = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleDict(
                {
                    "attn": PerceiverAttention(dim, heads, dim_head),
                    "ff": nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, dim * ff_mult, bias=False),
                        nn.GELU(),
                        nn.Linear(dim * ff_mult, dim, bias=False),
                    ),
                }
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)

    def forward(
        self, keys: torch.Tensor, latents: torch.Tensor | None = None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """keys (B, T, in_dim); latents (B or 1, Q, in_dim) iff the module has no own latents;
        key_mask (B, T) bool, True = attend (the latents are always attendable).
        Returns (B, Q, out_dim)."""
        if (latents is None) == (self.latents is None):
            raise ValueError(
                "PerceiverResampler: pass `latents` exactly when the module was built "
                f"without num_latents (own latents: {self.latents is not None})"
            )
        B = keys.shape[0]
        keys = self.proj_in(keys)  # (B, T, dim)
        latents = self.latents if latents is None else self.proj_in(latents)
        latents = latents.expand(B, -1, -1)  # (B, Q, dim)
        attend = None
        if key_mask is not None:
            if key_mask.shape != keys.shape[:2]:
                raise ValueError(
                    f"PerceiverResampler: key_mask shape {tuple(key_mask.shape)}, "
                    f"expected (B, T) = {tuple(keys.shape[:2])}"
                )
            attend = F.pad(key_mask.bool(), (0, latents.shape[1]), value=True)  # (B, T+Q)
        for layer in self.layers:
            latents = latents + layer["attn"](keys, latents, attend)
            latents = latents + layer["ff"](latents)
        return self.norm_out(self.proj_out(latents))  # (B, Q, out_dim)
