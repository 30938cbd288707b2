"""Data parallelism for train.py (docs/design.md §6): torchrun process groups (NCCL on GPUs, gloo on CPU),
DDP over the trainable set or FSDP2 with one shard group per decoder block, gradient sync only on the last
micro-step of an accumulation, global loss means for logging, and full (unsharded) states for checkpoints."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist


def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE: NCCL on GPUs, gloo on CPU; a plain run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        return dist.get_rank(), dist.get_world_size(), torch.device("cpu")
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local}")


def all_mean(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of each per-rank loss share (losses are normalised so this is the global loss);
    one stacked all-reduce and one host sync for all terms."""
    x = torch.stack([v.detach().float() for v in terms.values()])
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return dict(zip(terms, x.tolist()))


def wrap(model: torch.nn.Module, args, stage: str, device: torch.device):
    """DDP over the trainable set, or FSDP2 with one shard group per decoder block (docs/design.md §6)."""
    if not dist.is_initialized():
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        for block in model.llm.layers:
            fully_shard(block)
        fully_shard(model.vision)  # its own group: frozen bf16 on GPUs, and a group needs one dtype
        register_fsdp_forward_method(model.vision, "features")  # called instead of forward()
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [device.index] if device.type == "cuda" else None
    # IFT batches may be text-only (the projector then gets no gradient); PT has no unused parameters
    return DDP(model, device_ids=device_ids, find_unused_parameters=stage != "pt")


def gather_states(model, optimizer, args) -> tuple[dict | None, dict]:
    """Model and optimizer states to save. Under FSDP2: unsharded on CPU (a collective: every rank calls it);
    otherwise (None = the model's own state_dict, the optimizer's state_dict)."""
    if args.fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return None, optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict, args) -> None:
    if args.fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def sync_context(wrapped, args, last: bool):
    """Reduce gradients across ranks only on the last micro-step of an accumulation."""
    if not dist.is_initialized():
        return nullcontext()
    if args.fsdp:
        wrapped.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last else wrapped.no_sync()
