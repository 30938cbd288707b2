r"""Performance, side by side: our OLA-VLM against the same steps assembled from transformers modules the way
the released code assembles them (README "Performance"; docs/design.md §11).

    python bench.py                      # CPU fp32, default sizes: one table (< 3 minutes on 2 cores)
    python bench.py --dtype bf16 --json runs/bench-bf16.json
    python bench.py --device cuda --dtype bf16 --hidden 4096 --layers 4 --heads 32 --kv-heads 8 --mlp 14336 \
        --vocab 128256 --grid 24 --vision-width 1024 --vision-layers 24 --swin-dim 192 --batch 8
    python bench.py --estimate           # the 8B budget from the real configs (budget.py)

Both sides load the same random weights, saved with `save_pretrained` in the official key layouts (the
tests' recipe). Theirs: LlamaForCausalLM with output_hidden_states and full-vocabulary logits,
CLIPVisionModel, the teachers (Dinov2 of Depth Anything, SwinBackbone, CLIP-H with projection) one image at a
time, and our predictors and losses. Times are medians of interleaved rounds; "advantage" is how many times
better ours is. Like the tests, this file may import transformers; runtime files never do.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.flop_counter import FlopCounterMode

from bench_models import Released, build_ours, dtypes, save_weights
from budget import estimate_table
from llm import LLM
from tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX

TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}  # relative loss difference the two sides may have


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="fp32", choices=TOLERANCE, help="bf16: frozen weights bf16 + autocast")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: least noise on shared cores)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    for name, value in (("hidden", 512), ("layers", 8), ("heads", 8), ("kv-heads", 2), ("mlp", 1408)):
        p.add_argument(f"--{name}", type=int, default=value, help="LLM size")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--grid", type=int, default=12, help="base grid: grid² image tokens")
    p.add_argument("--text", type=int, default=48, help="text tokens of the longest sample")
    p.add_argument("--vision-width", type=int, default=384, help="base CLIP, DINOv2 and CLIP-H width")
    p.add_argument("--vision-layers", type=int, default=6)
    p.add_argument("--swin-dim", type=int, default=48, help="Swin stage-1 width (stage 4: 8x)")
    p.add_argument("--prompt", type=int, default=128, help="generation prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-ift", action="store_true", help="skip the IFT step")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--estimate", action="store_true", help="print the 8B budget (budget.py) and exit")
    p.add_argument("--mfu", type=float, default=0.4, help="--estimate: model FLOP utilisation assumed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=("ours", "theirs"), help=argparse.SUPPRESS)  # peak-memory subprocess
    p.add_argument("--folder", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- inputs and steps
def make_batch(a, device: torch.device) -> dict:
    """PT samples: 6 system tokens, <image>, text of decreasing length (right padded), the last 8 labelled;
    random pixels for the base encoder and each teacher at their input sizes (docs/design.md §2)."""
    g = torch.Generator().manual_seed(a.seed)
    lengths = torch.linspace(a.text, max(10, a.text // 2), a.batch).long().tolist()
    rows = [torch.randint(3, a.vocab, (7 + n,), generator=g) for n in lengths]
    labels = []
    for r in rows:
        r[6] = IMAGE_TOKEN_INDEX
        labels.append(torch.cat([torch.full((len(r) - 8,), IGNORE_INDEX), r[-8:]]))
    batch = {
        "ids": pad_sequence(rows, batch_first=True),
        "mask": pad_sequence([torch.ones(len(r), dtype=torch.bool) for r in rows], batch_first=True),
        "labels": pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX),
        "has_image": torch.ones(a.batch, dtype=torch.bool),
    }
    sizes = {"images": a.grid * 14, "depth": a.grid * 14, "seg": a.grid * 32, "gen": 112}
    px = {k: torch.randn(a.batch, 3, s, s, generator=g) for k, s in sizes.items()}
    batch = {k: v.to(device) for k, v in (batch | {"images": px.pop("images")}).items()}
    return batch | {"px": {k: v.to(device) for k, v in px.items()}}


def inputs(batch: dict) -> tuple:
    return batch["ids"], batch["mask"], batch["labels"], batch["images"], batch["has_image"]


def step(side: str, model, teachers, batch, opt, autocast) -> torch.Tensor:
    """One optimizer step as train.train_step takes it: targets, forward, backward, AdamW (None: none)."""
    with autocast():
        if side == "ours":
            targets = teachers(batch["px"]) if teachers is not None else None
            loss = model(*inputs(batch), targets).loss
        else:
            loss = model(*inputs(batch), model.targets(batch["px"]) if model.teachers is not None else None)
        loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.detach()


def adamw(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function over `rounds` interleaved rounds (alternating), after a warm-up."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for r in range(rounds):
        for k in list(fns)[:: 1 if r % 2 == 0 else -1]:
            sync(device)
            t0 = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def flops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048) -> float:
    """This machine's matmul FLOP/s in `dtype`: the best of 5 n×n products."""
    x, y = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        x @ y
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ----------------------------------------------------------------------------- measurements
def measure(a) -> dict:
    """Every number of the table (seconds, tokens/s, MiB, FLOP) for one dtype and device."""
    frozen, device, _ = dtypes(a)
    res: dict = {"config": {k: v for k, v in vars(a).items() if k not in ("child", "folder", "json")}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_weights(a, folder)
        res |= measure_pt(a, folder)
        if not a.no_ift:
            ift = {"ours": build_ours(a, folder, "ift")[0], "theirs": Released(a, folder, "ift")}
            opts = {side: adamw(model) for side, model in ift.items()}
            batch, autocast = make_batch(a, device), dtypes(a)[2]
            fns = {s: (lambda s=s: step(s, ift[s], None, batch, opts[s], autocast)) for s in ift}
            res["ift_step_s"] = interleaved(fns, a.rounds, device)
        if not a.no_memory:
            res["pt_step_peak_mib"] = {side: child_memory(a, folder, side) for side in ("ours", "theirs")}
    res["matmul_peak_flops"] = matmul_peak(frozen, device)
    return res


def measure_pt(a, folder: Path) -> dict:
    """Loss parity, the PT step, its FLOPs, the teachers and generation (and in bf16 our fp32 step)."""
    _, device, autocast = dtypes(a)
    ours, teachers = build_ours(a, folder)
    theirs = Released(a, folder)
    batch = make_batch(a, device)
    with autocast():  # parity, before any optimizer step
        lo = ours(*inputs(batch), teachers(batch["px"])).loss.item()
        lt = theirs(*inputs(batch), theirs.targets(batch["px"])).item()
    res = {"loss": {"ours": lo, "theirs": lt, "rel_diff": abs(lo - lt) / abs(lt)}}
    models = {"ours": (ours, teachers), "theirs": (theirs, None)}
    opts = {side: adamw(model) for side, (model, _) in models.items()}
    pt = {s: (lambda s=s: step(s, *models[s], batch, opts[s], autocast)) for s in models}
    res["pt_step_s"] = interleaved(pt, a.rounds, device)
    res["pt_flops"] = {s: flops(lambda s=s: step(s, *models[s], batch, None, autocast)) for s in models}
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    with autocast():
        fns = {
            "ours": lambda: teachers(batch["px"]),
            "theirs_batched": lambda: theirs.targets(batch["px"], looped=False),
            "theirs_looped": lambda: theirs.targets(batch["px"]),
        }
        res["teachers_s"] = interleaved(fns, a.rounds, device)
    res["generate"] = {f"batch{b}": generation(a, ours.llm, theirs.llm, b, device) for b in (1, 4)}
    if a.dtype == "bf16":  # our bf16 step against our fp32 step
        ours32, teachers32 = build_ours(argparse.Namespace(**{**vars(a), "dtype": "fp32"}), folder)
        opt32 = adamw(ours32)
        fp32 = {
            "bf16": pt["ours"],
            "fp32": lambda: step("ours", ours32, teachers32, batch, opt32, nullcontext),
        }
        res["bf16_vs_fp32_s"] = interleaved(fp32, a.rounds, device)
    return res


def generation(a, ours: LLM, theirs, B: int, device: torch.device) -> dict:
    """Greedy decoding of random prompts (B, a.prompt): decode tokens/s = B (n - 1) / (t(n new) - t(1 new)),
    end-to-end tokens/s = B n / t(n new), and whether both sides produce the same tokens."""
    theirs.generation_config.eos_token_id = None
    g = torch.Generator().manual_seed(a.seed + B)
    ids = torch.randint(3, a.vocab, (B, a.prompt), generator=g).to(device)
    n = a.new_tokens

    def run(side: str, new: int) -> torch.Tensor:
        if side == "ours":
            return ours.generate(ids, max_new_tokens=new, eos_token_ids=())
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0)
        return theirs.generate(ids, **kw)[:, a.prompt :]

    with torch.no_grad():
        same = torch.equal(run("ours", n), run("theirs", n))
        runs = [(side, new) for side in ("ours", "theirs") for new in (n, 1)]
        fns = {f"{side}{new}": (lambda s=side, k=new: run(s, k)) for side, new in runs}
        t = interleaved(fns, a.rounds, device)
    out = {"same_tokens": same}
    for side in ("ours", "theirs"):
        decode = max(t[f"{side}{n}"] - t[f"{side}1"], 1e-9)
        out[side] = {"decode_tok_s": B * (n - 1) / decode, "e2e_tok_s": B * n / t[f"{side}{n}"]}
    return out


def child_memory(a, folder: Path, side: str) -> dict:
    """The peak memory of one PT step in a fresh process per side: MiB above the built model, and in all."""
    skip = {"child", "folder", "json", "estimate", "no_memory", "no_ift", "mfu", "rounds"}
    argv = [x for k, v in vars(a).items() if k not in skip for x in (f"--{k.replace('_', '-')}", str(v))]
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", side, "--folder", str(folder)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, in bytes."""
    return 1024 * int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


def child(a) -> None:
    """--child: build one side, reset the peak, run one PT step, print its peak memory (MiB) as JSON."""
    import gc

    folder, (_, device, autocast) = Path(a.folder), dtypes(a)
    model, teachers = build_ours(a, folder) if a.child == "ours" else (Released(a, folder), None)
    batch, opt = make_batch(a, device), adamw(model)
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set size (VmHWM)
    base = torch.cuda.memory_allocated() if cuda else rss("VmRSS")
    step(a.child, model, teachers, batch, opt, autocast)
    peak = torch.cuda.max_memory_allocated() if cuda else rss("VmHWM")
    print(json.dumps({"step": (peak - base) / 2**20, "total": peak / 2**20}))


# ----------------------------------------------------------------------------- the table
def table(res: dict) -> str:
    """One markdown table. 'advantage': how many times better ours is (time and memory: theirs / ours)."""
    c, rows = res["config"], []

    def row(name, o, t, adv, target="", fmt="{:.3f}"):
        rows.append(f"| {name} | {fmt.format(o)} | {fmt.format(t)} | {adv} | {target} |")

    loss = res["loss"]
    diff, tol = f"rel. diff {loss['rel_diff']:.1e}", f"<= {TOLERANCE[c['dtype']]:.0e}"
    row("PT loss, same weights and batch", loss["ours"], loss["theirs"], diff, tol, "{:.6f}")
    for key, name, target in (("pt_step_s", "PT step (s)", ">= 2.0x"), ("ift_step_s", "IFT step (s)", "")):
        if key in res:
            o, t = res[key]["ours"], res[key]["theirs"]
            row(name, o, t, f"{t / o:.2f}x", target)
    tg = res["teachers_s"]
    for key, target in (("theirs_batched", ">= 1.2x"), ("theirs_looped", "")):
        name = f"teacher targets (s), theirs {key[7:]}"
        row(name, tg["ours"], tg[key], f"{tg[key] / tg['ours']:.2f}x", target)
    for b, g in res["generate"].items():
        for kind, label in (("decode_tok_s", "decode"), ("e2e_tok_s", "prefill + decode")):
            o, t = g["ours"][kind], g["theirs"][kind]
            same = "" if kind == "e2e_tok_s" else "; same tokens" if g["same_tokens"] else "; tokens differ"
            target = ">= 1.5x" if (b, kind) == ("batch4", "decode_tok_s") else ""
            row(f"generation tokens/s, {b}, {label}", o, t, f"{o / t:.2f}x{same}", target, "{:.1f}")
    for key, name in (("step", "above the built model"), ("total", "whole process")):
        if "pt_step_peak_mib" in res:
            o, t = (res["pt_step_peak_mib"][side][key] for side in ("ours", "theirs"))
            target = "<= 0.5x theirs" if key == "step" else ""
            row(
                f"PT step peak memory (MiB), {name}",
                o,
                t,
                f"{t / o:.2f}x (ours {o / t:.2f}x)",
                target,
                "{:.0f}",
            )
    f, s, peak = res["pt_flops"], res["pt_step_s"], res["matmul_peak_flops"]
    row(
        "PT step GFLOP (counted)",
        f["ours"] / 1e9,
        f["theirs"] / 1e9,
        f"{f['theirs'] / f['ours']:.2f}x",
        fmt="{:.1f}",
    )
    ach = {k: f[k] / s[k] for k in f}
    pct = " vs ".join(f"{100 * ach[k] / peak:.0f} %" for k in ("ours", "theirs"))
    row(
        f"PT GFLOP/s (of {peak / 1e9:.0f} matmul peak)",
        ach["ours"] / 1e9,
        ach["theirs"] / 1e9,
        pct,
        fmt="{:.1f}",
    )
    if "bf16_vs_fp32_s" in res:
        bf = res["bf16_vs_fp32_s"]
        row(
            "our PT step (s): bf16, our fp32",
            bf["bf16"],
            bf["fp32"],
            f"{bf['fp32'] / bf['bf16']:.2f}x",
            ">= 1.8x",
        )
    head = (
        f"{c['device']} {c['dtype']}, {c['threads']} thread(s), median of {c['rounds']} interleaved rounds; "
        f"LLM {c['hidden']}x{c['layers']} ({c['heads']} heads, {c['kv_heads']} KV, MLP {c['mlp']}, vocab "
        f"{c['vocab']}); batch {c['batch']} x ({c['grid'] ** 2} image + 24 special + <= {c['text'] + 6} text "
        f"tokens); vision width {c['vision_width']} x {c['vision_layers']}, Swin {c['swin_dim']}; generation "
        f"prompt {c['prompt']}, {c['new_tokens']} new tokens"
    )
    return "\n".join(
        [head, "", "| measure | ours | theirs | advantage | target |", "|---|---|---|---|---|", *rows]
    )


def main(argv=None) -> dict | None:
    a = parse_args(argv)
    if a.estimate:
        print(estimate_table(a.mfu))
        return None
    torch.set_num_threads(a.threads)
    if a.child:
        child(a)
        return None
    t0 = time.time()
    res = measure(a)
    res["wall_s"] = time.time() - t0
    print(table(res) + f"\n\n({res['wall_s']:.0f} s)")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
