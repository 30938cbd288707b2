"""Losses of OLA-VLM (Sec. 4.2, Eq. 1; docs/design.md §4): next-token cross-entropy, and per predictor
layer the embedding loss L_emb = 1.0 * smooth-L1 + 0.3 * InfoNCE.

Every mean is a GLOBAL mean over all ranks: `global_mean` returns
    local_sum / global_count * world_size.
Each rank's loss is then world_size * (its share of the single-process loss on the concatenated
batch), so the mean over ranks (what DDP's gradient averaging computes) equals the
single-process loss, and its gradients, exactly — even when ranks hold different numbers of
valid samples or labelled tokens. Per rank: d(loss_r)/d(pred_r) = world_size * d(L)/d(pred_r).
Every function runs the same collectives on every rank, and returns a graph-connected zero when
nothing is valid anywhere, so DDP never hangs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_mean(local_sum: torch.Tensor, local_count: torch.Tensor | int) -> torch.Tensor:
    """local_sum / (count summed over ranks) * world_size (0 with graph if the count is 0)."""
    _, world = _rank_world()
    count = torch.as_tensor(local_count, dtype=torch.float32, device=local_sum.device).clone()
    if world > 1:
        dist.all_reduce(count)
    return local_sum / count.clamp(min=1) * world


@torch.no_grad()
def _all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (B, ...) of every rank along dim 0, in rank order (no gradient)."""
    _, world = _rank_world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def ntp_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy (fp32) over labelled positions; logits (N, V), targets (N,)
    already shifted, -100 = ignore."""
    total = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
    return global_mean(total, (targets != -100).sum())


def smooth_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 (beta 1, fp32), mean over the elements of valid samples; pred/target (B, ...),
    valid (B,) bool (False = sample without an image)."""
    valid = valid.bool()
    total = F.smooth_l1_loss(
        pred[valid].float(), target.to(pred.device)[valid].float(), reduction="sum", beta=1.0
    )
    return global_mean(total, valid.sum() * pred.shape[1:].numel())


def info_nce(
    pred: torch.Tensor, target: torch.Tensor, logit_scale: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """One-directional InfoNCE prediction -> target over the global batch (Sec. 4.2; docs/design.md §4).

    Maps are flattened and L2-normalised (fp32);
    logits = p_i . t_j * clamp(exp(logit_scale), max=100).
    Targets come from every rank (all-gathered, no gradient: they are frozen-teacher features);
    the positive of local sample i is global index rank * B + i. Invalid samples are neither
    anchors nor negatives. Every rank must pass the same batch size B.
    """
    rank, _ = _rank_world()
    B, valid = pred.shape[0], valid.bool()
    sizes = _all_gather(torch.tensor([B], device=pred.device))
    if (sizes != B).any():
        raise ValueError(
            f"info_nce: every rank must have the same batch size for the global-batch "
            f"negatives, got per-rank sizes {sizes.tolist()}"
        )
    p = F.normalize(pred[valid].flatten(1).float(), dim=-1)  # (B_valid, D)
    t = F.normalize(target.detach().to(pred.device).flatten(1).float(), dim=-1)  # (B, D)
    t_all = _all_gather(t.masked_fill(~valid[:, None], 0))  # (W*B, D)
    valid_all = _all_gather(valid.to(torch.uint8)).bool()  # (W*B,)
    scale = logit_scale.exp().clamp(max=100)
    logits = (p @ t_all.T * scale).masked_fill(~valid_all, float("-inf"))  # (B_valid, W*B)
    labels = (torch.arange(B, device=pred.device) + rank * B)[valid]  # (B_valid,)
    total = F.cross_entropy(logits, labels, reduction="sum")
    return global_mean(total, valid.sum())


def embedding_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    logit_scale: torch.Tensor | None,
    valid: torch.Tensor,
    sl1_weight: float = 1.0,
    contrastive_weight: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """L_emb = λ_sL1 · smooth-L1 + λ_con · InfoNCE for one predictor layer (Eq. 1). Returns (total, smooth-L1,
    InfoNCE), the terms unweighted for logging; without a logit scale (λ_con = 0) there is no InfoNCE term."""
    sl1 = smooth_l1(pred, target, valid)
    if logit_scale is None:
        return sl1_weight * sl1, sl1, None
    con = info_nce(pred, target, logit_scale, valid)
    return sl1_weight * sl1 + contrastive_weight * con, sl1, con


def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, N, C) x (B, N, C) -> (B,) cosine of the whole flattened maps: the probe score (Sec. 3)."""
    return F.cosine_similarity(pred.flatten(1).float(), target.flatten(1).float(), dim=1)
