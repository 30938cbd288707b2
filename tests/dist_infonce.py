"""torchrun worker for tests/test_losses.py::test_distributed_matches_single_process.

Each rank takes its slice of a fixed global batch, computes the losses, backpropagates and saves
losses and gradients to OUT_DIR/rank{r}.pt; the test compares them to one process on the whole
batch. Run: torchrun --standalone --nproc_per_node=2 tests/dist_infonce.py OUT_DIR
"""

import sys

import torch
import torch.distributed as dist

from losses import embedding_loss, info_nce, ntp_loss

B, WORLD, V = 3, 2, 7
# per-sample "has an image" flags of the global batch (rank 0 | rank 1): unequal valid counts,
# and in the second case rank 0 has no valid sample at all
VALID = {"mixed": [1, 0, 1, 1, 1, 1], "rank0_empty": [0, 0, 0, 1, 0, 1]}
NTP_SPLIT = 3  # rank 0 gets 3 logit rows, rank 1 gets the other 7


def global_batch():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(WORLD * B, 4, 5, generator=g)
    target = pred + 0.7 * torch.randn(WORLD * B, 4, 5, generator=g)  # some |d| < 1, some > 1
    logits = torch.randn(10, V, generator=g)
    labels = torch.randint(0, V, (10,), generator=g)
    labels[[1, 4, 5]] = -100
    return pred, target, logits, labels


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert dist.get_world_size() == WORLD
    pred, target, logits, labels = global_batch()
    rows = slice(rank * B, (rank + 1) * B)
    results = {}
    for name, flags in VALID.items():
        p = pred[rows].clone().requires_grad_()
        s = torch.tensor(1.5, requires_grad=True)
        total, sl1, con = embedding_loss(p, target[rows], s, torch.tensor(flags[rows]).bool())
        total.backward()
        results[name] = dict(
            total=total.detach(), sl1=sl1.detach(), con=con.detach(), pred_grad=p.grad, scale_grad=s.grad
        )
    part = slice(0, NTP_SPLIT) if rank == 0 else slice(NTP_SPLIT, None)
    lg = logits[part].clone().requires_grad_()
    loss = ntp_loss(lg, labels[part])
    loss.backward()
    results["ntp"] = dict(loss=loss.detach(), grad=lg.grad)
    try:  # unequal per-rank batch sizes must raise, not hang
        n = 2 if rank == 0 else 3
        info_nce(pred[:n], target[:n], torch.tensor(1.0), torch.ones(n, dtype=torch.bool))
        results["unequal_error"] = None
    except ValueError as e:
        results["unequal_error"] = str(e)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
