"""SMOKE TEST of bench.py (fast: seconds, tiny sizes). The released-style transformers assembly and ours,
built from the same saved weights, give the same PT and IFT losses (before and through one optimizer step)
and the same greedy tokens; the table and the 8B estimate render. `python bench.py` itself is not run."""

import argparse

import pytest
import torch

import bench

SIZES = {
    "hidden": 64,
    "layers": 4,
    "heads": 4,
    "kv-heads": 2,
    "mlp": 128,
    "vocab": 300,
    "batch": 3,
    "grid": 4,
}
SIZES |= {"text": 12, "vision-width": 64, "vision-layers": 4, "swin-dim": 16, "prompt": 12, "new-tokens": 5}
TINY = [x for k, v in SIZES.items() for x in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    a = bench.parse_args(TINY)
    folder = tmp_path_factory.mktemp("bench")
    bench.save_weights(a, folder)
    ours, teachers = bench.build_ours(a, folder)
    return a, folder, ours, teachers, bench.Released(a, folder)


def test_pt_losses_and_targets_agree(sides):
    a, _, ours, teachers, theirs = sides
    batch = bench.make_batch(a, torch.device("cpu"))
    ours_targets, batched, looped = (
        teachers(batch["px"]),
        theirs.targets(batch["px"], False),
        theirs.targets(batch["px"]),
    )
    for task in ours_targets:
        assert torch.allclose(ours_targets[task], batched[task], atol=1e-5)
        assert torch.allclose(looped[task], batched[task], atol=1e-5)
    with torch.no_grad():
        lo = ours(*bench.inputs(batch), ours_targets).loss
        lt = theirs(*bench.inputs(batch), looped)
    assert lo > 1 and abs(lo - lt) / lt <= bench.TOLERANCE["fp32"]
    step_lo = bench.step("ours", ours, teachers, batch, bench.adamw(ours), bench.nullcontext)
    step_lt = bench.step("theirs", theirs, None, batch, bench.adamw(theirs), bench.nullcontext)
    assert abs(step_lo - step_lt) / step_lt <= bench.TOLERANCE["fp32"]


def test_ift_losses_and_greedy_tokens_agree(sides):
    a, folder, ours, _, theirs = sides
    batch = bench.make_batch(a, torch.device("cpu"))
    ift_ours, _ = bench.build_ours(a, folder, "ift")
    ift_theirs = bench.Released(a, folder, "ift")
    assert ift_ours.predictors is None and ift_theirs.teachers is None
    with torch.no_grad():
        lo, lt = ift_ours(*bench.inputs(batch)).loss, ift_theirs(*bench.inputs(batch))
    assert abs(lo - lt) / lt <= bench.TOLERANCE["fp32"]
    theirs.llm.generation_config.eos_token_id = None
    ids = torch.randint(3, a.vocab, (4, a.prompt), generator=torch.Generator().manual_seed(0))
    mine = ours.llm.generate(ids, max_new_tokens=a.new_tokens, eos_token_ids=())
    kw = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0
    )
    assert torch.equal(mine, theirs.llm.generate(ids, **kw)[:, a.prompt :])


def test_table_and_estimate():
    res = {
        "config": vars(bench.parse_args(TINY)),
        "loss": {"ours": 5.0, "theirs": 5.0, "rel_diff": 0.0},
        "pt_step_s": {"ours": 1.0, "theirs": 2.0},
        "pt_flops": {"ours": 1e9, "theirs": 2e9},
        "teachers_s": {"ours": 1.0, "theirs_batched": 1.2, "theirs_looped": 1.5},
        "generate": {
            "batch4": {
                "same_tokens": True,
                **{s: {"decode_tok_s": 1.0, "e2e_tok_s": 1.0} for s in ("ours", "theirs")},
            }
        },
        "matmul_peak_flops": 1e10,
    }
    text = bench.table(res)
    assert "| PT step (s) | 1.000 | 2.000 | 2.00x | >= 2.0x |" in text
    assert "same tokens" in text
    estimate = bench.estimate_table(0.4)
    assert "PT (LLaVA-558K)" in estimate and "IFT, micro-batch 16, checkpointing, FSDP2" in estimate
    assert isinstance(bench.parse_args(["--estimate"]), argparse.Namespace)
