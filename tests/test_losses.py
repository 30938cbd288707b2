"""Losses (Sec. 4.2, Eq. 1): hand-computed values, per-sample masking, and global-batch DDP semantics."""

import math
import os
import subprocess
import sys
from pathlib import Path

import dist_infonce
import pytest
import torch
import torch.nn.functional as F

from losses import embedding_loss, info_nce, ntp_loss, smooth_l1

ROOT = Path(__file__).resolve().parents[1]
ALL2 = torch.ones(2, dtype=torch.bool)


def test_info_nce_hand_computed():
    # after L2-normalising: preds (2,0)->(1,0), (0,0.5)->(0,1); targets (2,0)->(1,0), (3,3)->(1,1)/sqrt2
    pred = torch.tensor([[2.0, 0.0], [0.0, 0.5]])
    target = torch.tensor([[2.0, 0.0], [3.0, 3.0]])
    c = 1 / math.sqrt(2)
    for s in (0.0, math.log(4.0)):
        k = math.exp(s)
        # row 1: logits (k, k*c), positive = k ; row 2: logits (0, k*c), positive = k*c
        l1 = -math.log(math.exp(k) / (math.exp(k) + math.exp(k * c)))
        l2 = -math.log(math.exp(k * c) / (1 + math.exp(k * c)))
        got = info_nce(pred, target, torch.tensor(s), ALL2)
        assert got.item() == pytest.approx((l1 + l2) / 2, abs=1e-6)


def test_info_nce_flattens_maps():
    # (B, N, C) maps: the cosine is over the whole flattened map, not per token
    pred = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [0.0, 2.0]]])
    c = 1 / math.sqrt(2)  # p1.t1 = c, p1.t2 = 0, p2.t1 = c, p2.t2 = 1
    l1 = -math.log(math.exp(c) / (math.exp(c) + 1))
    l2 = -math.log(math.e / (math.exp(c) + math.e))
    assert info_nce(pred, target, torch.tensor(0.0), ALL2).item() == pytest.approx((l1 + l2) / 2, abs=1e-6)


def test_logit_scale_clamped_at_100():
    pred = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    target = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    # logits / scale: row 1 (0.8, 0), row 2 (0.96, 0.8); with scale 100, l = log(1 + e^{100(a-b)})
    expected = (math.log1p(math.exp(-80.0)) + math.log1p(math.exp(100 * (0.96 - 0.8)))) / 2
    s = torch.tensor(10.0, requires_grad=True)  # e^10 >> 100
    loss = info_nce(pred, target, s, ALL2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert s.grad == 0  # clamped: no gradient
    s = torch.tensor(1.0, requires_grad=True)
    info_nce(pred, target, s, ALL2).backward()
    assert s.grad != 0


def test_invalid_samples_excluded():
    torch.manual_seed(0)
    pred = torch.randn(5, 3, 4, requires_grad=True)
    target = torch.randn(5, 3, 4)
    valid = torch.tensor([True, False, True, True, False])
    s = torch.tensor(1.3)
    con = info_nce(pred, target, s, valid)
    sl1 = smooth_l1(pred, target, valid)
    sub = info_nce(pred[valid], target[valid], s, torch.ones(3, dtype=torch.bool))
    assert con.item() == pytest.approx(sub.item(), abs=1e-6)
    assert con.item() != pytest.approx(info_nce(pred, target, s, torch.ones(5, dtype=torch.bool)).item())
    assert sl1.item() == pytest.approx(F.smooth_l1_loss(pred[valid], target[valid]).item(), abs=1e-6)
    # invalid samples may hold anything (no image: placeholder or garbage) and get no gradient
    junk = target.clone()
    junk[~valid] = float("nan")
    junk_pred = pred.detach().clone()
    junk_pred[~valid] = 1e6
    junk_pred.requires_grad_()
    total, sl1_j, con_j = embedding_loss(junk_pred, junk, s, valid)
    assert sl1_j.item() == pytest.approx(sl1.item(), abs=1e-6)
    assert con_j.item() == pytest.approx(con.item(), abs=1e-6)
    total.backward()
    assert torch.isfinite(junk_pred.grad).all() and junk_pred.grad[~valid].abs().sum() == 0
    assert junk_pred.grad[valid].abs().sum() > 0


def test_smooth_l1_hand_computed():
    pred = torch.tensor([[0.5, 3.0], [9.0, 9.0], [-1.0, 0.0]])
    target = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.2]])
    valid = torch.tensor([True, False, True])
    # |d| = 0.5, 2, (invalid), 1, 0.2 -> 0.5*0.25, 2-0.5, 1-0.5, 0.5*0.04 ; mean over 4 elements
    expected = (0.125 + 1.5 + 0.5 + 0.02) / 4
    assert smooth_l1(pred, target, valid).item() == pytest.approx(expected, abs=1e-6)


def test_ntp_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    targets = torch.tensor([0, 2, -100])
    l1 = -math.log(math.exp(2) / (math.exp(2) + 2))
    l2 = -math.log(1 / (math.e + 2))
    assert ntp_loss(logits, targets).item() == pytest.approx((l1 + l2) / 2, abs=1e-6)


def test_embedding_loss_weights():
    torch.manual_seed(1)
    pred, target = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    valid, s = torch.tensor([True, True, False, True]), torch.tensor(2.0)
    sl1, con = smooth_l1(pred, target, valid), info_nce(pred, target, s, valid)
    total, sl1_e, con_e = embedding_loss(pred, target, s, valid)
    assert torch.equal(sl1_e, sl1) and torch.equal(con_e, con)
    assert total.item() == pytest.approx(sl1.item() + 0.3 * con.item(), abs=1e-6)
    total, _, _ = embedding_loss(pred, target, s, valid, contrastive_weight=1.0)
    assert total.item() == pytest.approx(sl1.item() + con.item(), abs=1e-6)


def test_nothing_valid_gives_connected_zero():
    pred = torch.randn(3, 4, requires_grad=True)
    s = torch.tensor(2.0, requires_grad=True)
    total, sl1, con = embedding_loss(pred, torch.randn(3, 4), s, torch.zeros(3, dtype=torch.bool))
    assert total.item() == 0 and sl1.item() == 0 and con.item() == 0
    total.backward()  # the graph reaches pred and the scale
    assert pred.grad is not None and pred.grad.abs().sum() == 0 and s.grad == 0
    logits = torch.randn(2, 5, requires_grad=True)
    loss = ntp_loss(logits, torch.tensor([-100, -100]))
    loss.backward()
    assert loss.item() == 0 and logits.grad.abs().sum() == 0


def test_distributed_matches_single_process(tmp_path):
    """torchrun, 2 ranks (gloo): per rank r, loss_r = W * (share of the single-process loss) so
    mean_r loss_r == single-process loss on the concatenated batch, grad(pred_r) == W * (the
    single-process grad of its rows), and mean_r grad(logit_scale) == single-process grad."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tests" / "dist_infonce.py"),
        str(tmp_path),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    W, B = dist_infonce.WORLD, dist_infonce.B
    pred, target, logits, labels = dist_infonce.global_batch()

    for name, flags in dist_infonce.VALID.items():
        p = pred.clone().requires_grad_()
        s = torch.tensor(1.5, requires_grad=True)
        total, sl1, con = embedding_loss(p, target, s, torch.tensor(flags).bool())
        total.backward()
        assert con.item() > 0 and sl1.item() > 0
        for key, single in (("total", total), ("sl1", sl1), ("con", con)):
            mean = sum(r[name][key] for r in ranks) / W
            assert mean.item() == pytest.approx(single.item(), abs=1e-6), (name, key)
        for r in range(W):
            assert torch.allclose(ranks[r][name]["pred_grad"], W * p.grad[r * B : (r + 1) * B], atol=1e-6)
        mean_scale_grad = sum(r[name]["scale_grad"] for r in ranks) / W
        assert mean_scale_grad.item() == pytest.approx(s.grad.item(), abs=1e-6), name
    assert ranks[0]["rank0_empty"]["pred_grad"].abs().sum() == 0

    lg = logits.clone().requires_grad_()
    loss = ntp_loss(lg, labels)
    loss.backward()
    assert (ranks[0]["ntp"]["loss"] + ranks[1]["ntp"]["loss"]).item() / W == pytest.approx(
        loss.item(), abs=1e-6
    )
    grads = torch.cat([ranks[0]["ntp"]["grad"], ranks[1]["ntp"]["grad"]])
    assert torch.allclose(grads, W * lg.grad, atol=1e-6)

    for r in ranks:
        assert r["unequal_error"] is not None and "same batch size" in r["unequal_error"]
