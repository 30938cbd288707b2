"""The special tokens <t> and the embedding predictors P_task^l of OLA-VLM (Sec. 4.1, Fig. 4;
docs/design.md §3). Spatial tasks (depth, seg) own a query matrix Q_task whose chunk means are their
sequence tokens and which are also their predictors' queries; a global task (gen) owns its tokens and
queries its predictor with the mean of the layer's hidden states at those tokens."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from resampler import PerceiverResampler
from tasks import IMAGE, SYS, TASKS, TEXT

KEY_INPUTS = {  # which segments an embedding predictor reads as keys (App. Tab. I); "t" = its own <t>
    "img+t": ("img", "t"),
    "sys+img+t": ("sys", "img", "t"),
    "sys+img+t+txt": ("sys", "img", "t", "txt"),
}


def pool_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """(..., N, C) -> (..., k, C): the means of k contiguous chunks of rows (576 -> 8 × 72). When k does not
    divide N (e.g. N_seek 24 on the tiny 8×8 grid) the chunks are adaptive pooling's: rows
    [⌊iN/k⌋, ⌈(i+1)N/k⌉)."""
    lead, (N, C) = x.shape[:-2], x.shape[-2:]
    pooled = F.adaptive_avg_pool1d(x.reshape(-1, N, C).transpose(1, 2), k)  # (B, C, k)
    return pooled.transpose(1, 2).reshape(*lead, k, C)


class SeekTokens(nn.Module):
    """The special tokens <t> (Sec. 4.1). A spatial task owns a query matrix Q_task (N, H), e.g. `q_depth`;
    its N_seek sequence tokens are the means of N_seek contiguous chunks of it. A global task owns its
    N_seek tokens directly, e.g. `gen_tokens` (the <g> tokens)."""

    def __init__(self, tasks: tuple[str, ...], num_image_tokens: int, hidden: int, num_seek: int):
        super().__init__()
        if num_seek > num_image_tokens:
            raise ValueError(
                f"{num_seek} seek tokens per task, more than the {num_image_tokens} image tokens"
            )
        self.num_seek = num_seek
        self.names = {}
        for task in tasks:  # randn init, std 1, as released
            if TASKS[task].spatial:
                self.names[task] = f"q_{task}"
                self.register_parameter(self.names[task], nn.Parameter(torch.randn(num_image_tokens, hidden)))
            else:
                self.names[task] = f"{task}_tokens"
                self.register_parameter(self.names[task], nn.Parameter(torch.randn(num_seek, hidden)))

    def parameter(self, task: str) -> nn.Parameter:
        """Q_task (N, H) of a spatial task, the N_seek tokens of a global one."""
        return getattr(self, self.names[task])

    def forward(self, task: str) -> torch.Tensor:
        """The task's N_seek sequence tokens (N_seek, H): Q_task average-pooled in contiguous chunks."""
        p = self.parameter(task)
        if not TASKS[task].spatial:
            return p
        return pool_rows(p, self.num_seek)


class EmbeddingPredictors(nn.Module):
    """P_task^l for every task and every layer l of its layer set (Fig. 4): single-layer Perceiver resamplers
    (Sec. 4.1; 4 heads × 32 by default), and one learnable InfoNCE logit scale per task (Sec. 4.2) when
    `logit_scale_init` is given (the contrastive term is on). `key_input`: the segments the predictors read
    (App. Tab. I). `own_latents`: without special tokens (N_seek = 0) each predictor learns its own
    queries and works at its target's width (Q_depth 576 × 1024), as the released code does."""

    def __init__(
        self,
        layer_sets: dict[str, tuple[int, ...]],
        target_dims: dict[str, int],
        hidden: int,
        num_image_tokens: int,
        key_input: str = "sys+img+t+txt",
        heads: int = 4,
        dim_head: int = 32,
        depth: int = 1,
        logit_scale_init: float | None = 2.0,
        own_latents: bool = False,
    ):
        super().__init__()
        self.layer_sets = dict(layer_sets)
        self.key_input = key_input
        self.heads = nn.ModuleDict()
        for task, layers in self.layer_sets.items():
            spec = TASKS[task]
            width = hidden if spec.predictor_width == "llm" else target_dims[task]
            num_latents = None
            if own_latents:  # the released no-token heads (DepthHead, ...) are as wide as their output
                num_latents = num_image_tokens if spec.spatial else 1
                width = target_dims[task]
            resamplers = {}
            for layer in layers:
                resamplers[str(layer)] = PerceiverResampler(
                    hidden,
                    width,
                    target_dims[task],
                    num_latents=num_latents,
                    depth=depth,
                    heads=heads,
                    dim_head=dim_head,
                )
            self.heads[task] = nn.ModuleDict(resamplers)
        self.logit_scales = None
        if logit_scale_init is not None:
            scales = {task: nn.Parameter(torch.tensor(logit_scale_init)) for task in self.layer_sets}
            self.logit_scales = nn.ParameterDict(scales)

    def key_mask(self, task: str, segments: torch.Tensor) -> torch.Tensor:
        """(B, T) True where the task's predictor reads keys: the segments of key_input (App. Tab. I);
        never padding nor the other tasks' special tokens."""
        codes = {"sys": [SYS], "img": [IMAGE], "t": [TASKS[task].segment], "txt": [TEXT]}
        wanted = [code for part in KEY_INPUTS[self.key_input] for code in codes[part]]
        return torch.isin(segments, torch.tensor(wanted, device=segments.device))

    def predict(
        self, task: str, layer: int, hidden: torch.Tensor, segments: torch.Tensor, tokens: SeekTokens | None
    ) -> torch.Tensor:
        """Predict the task's target from layer `layer`'s hidden states (B, T, H). -> (B, N or 1, C)"""
        head = self.heads[task][str(layer)]
        keys = self.key_mask(task, segments)
        if head.latents is not None:  # own queries (no special tokens)
            return head(hidden, key_mask=keys)
        if TASKS[task].spatial:  # N queries: Q_task itself, shared by the batch
            latents = tokens.parameter(task).unsqueeze(0)  # (1, N, H)
        else:  # one query: the mean of the layer's hidden states at the task's N_seek <t> positions
            own = (segments == TASKS[task].segment).unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            latents = (hidden * own).sum(1, keepdim=True) / own.sum(1, keepdim=True).clamp(min=1)  # (B, 1, H)
        return head(hidden, latents, keys)

    def forward(
        self, hidden_states: tuple[torch.Tensor, ...], segments: torch.Tensor, tokens: SeekTokens | None
    ) -> dict[tuple[str, int], torch.Tensor]:
        """{(task, layer): prediction (B, N or 1, C)} for every predictor, from the LLM's hidden states."""
        return {
            (task, layer): self.predict(task, layer, hidden_states[layer], segments, tokens)
            for task, layers in self.layer_sets.items()
            for layer in layers
        }
