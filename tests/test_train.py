"""End-to-end trainer tests, each a real `train.py` run on the tiny preset in a subprocess.

Marked `slow` (about a minute in all) but kept in CI: they are the only proof that torchrun DDP,
FSDP2 and resume really work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
COMMON = ["--num-workers", "0", "--batch-size", "8", "--save-every", "2"]


def run(args: list[str], cwd: Path, nproc: int = 1, wait: bool = True):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = launcher + [str(ROOT / "train.py"), *COMMON, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def metrics(folder: Path) -> list[dict]:
    return [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_losses(a: list[dict], b: list[dict], tol: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert abs(ra[k] - rb[k]) <= tol, f"step {ra['step']} {k}: {ra[k]} vs {rb[k]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


def test_two_ranks_equal_one_rank_with_double_batch(workdir):
    """torchrun 2 x b (gloo) == 1 x 2b: global-batch losses and InfoNCE negatives (Sec. 4.2)."""
    run(["--stage", "pt", "--max-steps", "3", "--out", "one"], workdir)
    run(["--stage", "pt", "--max-steps", "3", "--out", "two"], workdir, nproc=2)
    one, two = metrics(workdir / "one" / "pt"), metrics(workdir / "two" / "pt")
    assert len(one) == 3 and {"ntp", "emb", "depth@2/con"} <= one[0].keys()
    assert_same_losses(one, two, tol=1e-5)


def test_resume_after_kill_reproduces_the_uninterrupted_run(workdir):
    args = ["--stage", "pt", "--max-steps", "6"]
    run(args + ["--out", "full"], workdir)
    proc = run(args + ["--out", "killed"], workdir, wait=False)
    deadline = time.time() + 300
    while not (workdir / "killed" / "pt" / "step_000002").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = sorted(p.name for p in (workdir / "killed" / "pt").glob("step_*[0-9]"))[-1]
    assert last < "step_000006", "the run finished before it was killed"
    run(args + ["--out", "killed", "--resume"], workdir)
    assert_same_losses(metrics(workdir / "full" / "pt"), metrics(workdir / "killed" / "pt"), tol=1e-6)
    assert sorted(p.name for p in (workdir / "killed" / "pt").iterdir()) == [
        "final",
        "metrics.jsonl",
        "step_000002",
        "step_000004",
        "step_000006",
    ]


def test_fsdp2_ift_step_matches_ddp(workdir):
    """FSDP2 (fully_shard per decoder block) on 2 gloo ranks gives the DDP losses, with gradient
    accumulation (2 micro-batches of 2 per rank: the reduce happens on the last one only)."""
    init = str(workdir / "one" / "pt" / "final") if (workdir / "one").exists() else None
    if init is None:
        run(["--stage", "pt", "--max-steps", "2", "--out", "one"], workdir)
        init = str(workdir / "one" / "pt" / "final")
    args = ["--stage", "ift", "--max-steps", "3", "--micro-batch-size", "2", "--init", init]
    run(args + ["--out", "ddp"], workdir, nproc=2)
    run(args + ["--out", "fsdp", "--fsdp"], workdir, nproc=2)
    assert_same_losses(metrics(workdir / "ddp" / "ift"), metrics(workdir / "fsdp" / "ift"), tol=1e-5)
    # the gathered FSDP2 checkpoint loads strictly and holds the DDP run's weights
    from ola import OLAVLM

    ddp, fsdp = (
        OLAVLM.from_checkpoint(workdir / run / "ift" / "final").state_dict() for run in ("ddp", "fsdp")
    )
    assert ddp.keys() == fsdp.keys()
    assert max((ddp[k] - fsdp[k]).abs().max().item() for k in ddp) < 1e-5


@pytest.mark.parametrize("tasks", ["depth", ""], ids=["depth-only", "llava"])
def test_two_rank_pt_with_a_task_subset_or_none(workdir, tasks):
    """A task subset (or none: LLaVA-1.5) builds no parameters for the other tasks, so 2-rank DDP runs
    without an "unused parameters" crash, and logs only the enabled task's terms."""
    out = f"subset-{tasks or 'none'}"
    run(["--stage", "pt", "--max-steps", "1", "--tasks", tasks, "--out", out], workdir, nproc=2)
    (record,) = metrics(workdir / out / "pt")
    emb_terms = {k.split("@")[0] for k in record if "@" in k}
    assert emb_terms == ({"depth"} if tasks else set())
    assert ("emb" in record) == bool(tasks)


def test_a_diverging_run_stops_before_writing_nan(workdir):
    """--lr 1e9: the first non-finite loss stops the run, naming the step and the terms; no checkpoint."""
    cmd = [sys.executable, str(ROOT / "train.py"), *COMMON, "--stage", "pt", "--lr", "1e9", "--out", "nan"]
    p = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "non-finite loss = nan" in p.stderr and "step 2" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (workdir / "nan" / "pt" / "final").exists()


def test_pt_init_keeps_the_checkpoints_projector_and_tokens(workdir):
    """PT --init from an IFT checkpoint (no predictors): the projector and special tokens come from the
    checkpoint, bit-identical (lr 0 keeps them), and fresh predictors are added."""
    from safetensors.torch import load_file

    run(["--stage", "pt,ift", "--max-steps", "1", "--out", "base"], workdir)
    init = workdir / "base" / "ift" / "final"
    run(["--stage", "pt", "--max-steps", "1", "--lr", "0", "--init", str(init), "--out", "again"], workdir)
    before = load_file(init / "model.safetensors")
    after = load_file(workdir / "again" / "pt" / "final" / "model.safetensors")
    kept = [k for k in before if k.startswith(("projector.", "tokens."))]
    assert len(kept) == 7 and all(torch.equal(before[k], after[k]) for k in kept)
    assert any(k.startswith("predictors.") for k in after)
