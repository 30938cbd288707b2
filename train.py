r"""Train OLA-VLM: PT (with embedding losses) -> optional VPT -> IFT (SPEC §4, Sec. 5.1).

    python train.py                                   # tiny model, built-in data, PT then IFT on CPU
    torchrun --nproc_per_node=8 train.py --preset llama3-8b --stage pt \
        --llm weights/llama3-8b-instruct --vision weights/clip-vit-large-patch14-336 \
        --depth weights/depth-anything-v2-large-hf --seg weights/oneformer_coco_swin_large \
        --gen weights/sd21-unclip/image_encoder \
        --data LLaVA-Pretrain/blip_laion_cc_sbu_558k.json --image-folder LLaVA-Pretrain/images
    torchrun --nproc_per_node=8 train.py --preset llama3-8b --stage ift --fsdp \
        --init runs/llama3-8b/pt/final --data llava_v1_5_mix665k.json --image-folder datasets
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from encoders import CLIPVision, CLIPVisionConfig, TargetEncoders
from ola import LLM, LLMConfig, OLAConfig, OLAVLM, set_trainable

# Paper recipe per stage (SPEC §4): learning rate, global batch, image view, what PT/IFT store.
STAGES = {
    "pt":  dict(lr=1e-3, batch_size=256, view="crop", stored=("projector", "tokens", "predictors")),
    "vpt": dict(lr=2e-5, batch_size=128, view="pad", stored=("llm", "projector", "tokens")),
    "ift": dict(lr=2e-5, batch_size=128, view="pad", stored=("llm", "projector", "tokens")),
}
# The built-in tiny model trains in minutes on a CPU; its own (larger) learning rates and batches.
TINY = dict(pt=dict(lr=2e-3, batch_size=16, epochs=6), vpt=dict(lr=1e-3, batch_size=16, epochs=6),
            ift=dict(lr=1e-3, batch_size=16, epochs=8))
BUILTIN = Path("data_cache/builtin")
PRESETS = {"tiny": "llama3", "llama3-8b": "llama3", "phi3-mini": "phi3"}   # preset -> chat template (SPEC §4)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--stage", default=None, help="pt, vpt, ift or a comma list run in order (tiny default: pt,ift)")
    p.add_argument("--llm", help="LLM weight folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--vision", help="CLIP ViT-L/14-336 weight folder")
    p.add_argument("--depth", help="Depth-Anything-V2-Large-hf folder (PT teacher)")
    p.add_argument("--seg", help="oneformer_coco_swin_large folder (PT teacher)")
    p.add_argument("--gen", help="stable-diffusion-2-1-unclip/image_encoder folder (PT teacher)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in --llm)")
    p.add_argument("--init", help="OLA checkpoint to start from (IFT/VPT start from PT's final)")
    p.add_argument("--data", help="LLaVA .json/.jsonl records (default: built-in data)")
    p.add_argument("--image-folder", help="folder the records' image paths are relative to")
    p.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    p.add_argument("--batch-size", type=int, help="global batch (default: the stage's, SPEC §4)")
    p.add_argument("--micro-batch-size", type=int, help="per-rank batch per forward (default: all of it)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the stage's)")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--epochs", type=float, help="passes over the data (default 1; tiny 6)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--max-length", type=int, help="token budget per sample (default 4096; tiny 512)")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept per stage")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard per decoder block)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--max-bad-fraction", type=float, default=0.05, help="stop when more samples are bad")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.stages = (args.stage or ("pt,ift" if args.preset == "tiny" else "pt")).split(",")
    for s in args.stages:
        if s not in STAGES:
            p.error(f"unknown stage {s!r}: expected pt, vpt or ift")
    if args.preset != "tiny":
        need = ["llm", "vision"] + (["depth", "seg", "gen"] if "pt" in args.stages else [])
        missing = [f"--{n}" for n in need if getattr(args, n) is None and not (n in ("llm", "vision") and args.init)]
        if args.data is None:
            missing.append("--data")
        if missing:
            p.error(f"--preset {args.preset} needs {', '.join(missing)} (see README: downloading the weights)")
    args.out = Path(args.out or f"runs/{args.preset}")
    args.max_length = args.max_length or (512 if args.preset == "tiny" else 4096)
    return args


# ----------------------------------------------------------------------------- distributed
def setup_distributed() -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE: NCCL on GPUs, gloo on CPU; a plain run is rank 0 of 1."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")


def all_mean(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over ranks of each per-rank loss share (losses are normalised so this is the global loss);
    one stacked all-reduce and one host sync for all terms."""
    x = torch.stack([v.detach().float() for v in terms.values()])
    if dist.is_initialized():
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return dict(zip(terms, x.tolist()))


# ----------------------------------------------------------------------------- model
def build_model(args, stage: str, tok: data.ChatTokenizer, teachers: TargetEncoders | None,
                device: torch.device, dtype: torch.dtype) -> OLAVLM:
    """A fresh OLA-VLM from base weights (or tiny random ones), or the --init / previous-stage checkpoint.
    `dtype` is the LLM's (bf16 when it is frozen on a GPU); the new parts are fp32."""
    dims = teachers.dims if teachers is not None else None
    if args.init:
        model = OLAVLM.from_checkpoint(args.init, device=device, with_predictors=False)
        if dims:  # PT from an OLA checkpoint: add fresh predictors
            model = OLAVLM(model.cfg, model.llm.to(dtype), model.vision, dims, model.sources).to(device)
        return model
    if args.preset == "tiny":
        torch.manual_seed(args.seed)
        llm = LLM(replace(LLMConfig.preset("tiny"), vocab_size=tok.vocab_size,
                          bos_token_id=tok.bos_ids[0] if tok.bos_ids else None,
                          eos_token_ids=tuple(tok.eos_ids), pad_token_id=tok.pad_id))
        vision = CLIPVision(CLIPVisionConfig.tiny())
        sources = {"llm": None, "vision": None}
    else:
        llm = LLM.from_pretrained(args.llm, dtype=dtype, device=device)
        vision = CLIPVision.from_pretrained(args.vision, dtype=dtype)
        sources = {"llm": str(Path(args.llm).resolve()), "vision": str(Path(args.vision).resolve())}
    return OLAVLM(OLAConfig(), llm, vision, dims, sources).to(device)


def tokenizer_path(args, builtin: dict | None) -> Path:
    """--tokenizer, else the built-in one (tiny), else tokenizer.json of the LLM folder (or of the
    folder the --init checkpoint's LLM came from)."""
    if args.tokenizer:
        return Path(args.tokenizer)
    if args.preset == "tiny":
        return builtin["tokenizer"] if builtin else data.builtin_dataset(BUILTIN)["tokenizer"]
    llm = args.llm or json.loads((Path(args.init) / "config.json").read_text())["sources"]["llm"]
    return Path(llm) / "tokenizer.json"


def build_teachers(args, device, dtype) -> TargetEncoders:
    if args.preset == "tiny":
        return TargetEncoders.tiny(seed=args.seed).to(device=device, dtype=dtype)
    return TargetEncoders.from_pretrained(args.depth, args.seg, args.gen, dtype=dtype).to(device)


def wrap(model: OLAVLM, args, stage: str, device: torch.device):
    """DDP over the trainable set, or FSDP2 with one shard group per decoder block (SPEC §8)."""
    if not dist.is_initialized():
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
        for block in model.llm.layers:
            fully_shard(block)
        fully_shard(model.vision)  # its own group: frozen bf16 on GPUs, and a group needs one dtype
        register_fsdp_forward_method(model.vision, "features")   # called instead of forward()
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               find_unused_parameters=stage != "pt")  # IFT batches may be text-only: projector unused


def gather_states(model, optimizer, args) -> tuple[dict | None, dict]:
    """Model and optimizer states to save. Under FSDP2: unsharded on CPU (a collective: every rank calls it);
    otherwise (None = the model's own state_dict, the optimizer's state_dict)."""
    if args.fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None, optimizer.state_dict()


def load_optimizer_state(model, optimizer, state: dict, args) -> None:
    if args.fsdp and dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Linear warmup (3% of the steps) then cosine decay to 0 (SPEC §4)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(folder: Path, model: OLAVLM, wrapped, optimizer, scheduler, step: int, loader_state: dict,
                    stage: str, args, rank: int) -> None:
    """model/ (OLA checkpoint) + trainer.pt, written to <folder>.tmp then renamed."""
    state, opt = gather_states(wrapped, optimizer, args)
    if rank != 0:
        return
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save(tmp / "model", STAGES[stage]["stored"], state=state)
    torch.save({"optimizer": opt, "scheduler": scheduler.state_dict(), "step": step, "loader": loader_state,
                "rng": torch.get_rng_state(), "args": vars(args)}, tmp / "trainer.pt")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    for old in sorted(folder.parent.glob("step_*[0-9]"))[:-args.keep]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- one stage
def run_stage(args, stage: str, rank: int, world: int, device: torch.device) -> Path:
    cuda = device.type == "cuda"
    # Trained weights stay fp32 (bf16 autocast computes on GPUs); frozen ones are bf16 on GPUs (SPEC §8).
    frozen = torch.bfloat16 if cuda else torch.float32
    hp = {**STAGES[stage], **(TINY[stage] if args.preset == "tiny" else {})}
    lr, batch_size = args.lr or hp["lr"], args.batch_size or hp["batch_size"]
    stage_dir = args.out / stage

    # data
    builtin = data.builtin_dataset(BUILTIN) if args.data is None else None   # rank-safe: temp folder + rename
    tok = data.ChatTokenizer(tokenizer_path(args, builtin), template=PRESETS[args.preset])
    teachers = build_teachers(args, device, frozen) if stage == "pt" else None
    model = build_model(args, stage, tok, teachers, device, frozen if stage == "pt" else torch.float32)
    model.vision.to(frozen)
    set_trainable(model, stage, verbose=rank == 0)
    model.llm.gradient_checkpointing = args.grad_checkpointing
    records = args.data or builtin[stage if stage == "pt" else "ift"]
    dataset = data.LLaVADataset(records, args.image_folder or (builtin["images"] if builtin else None), tok,
                                view=hp["view"], image_size=model.vision.config.image_size,
                                target_preprocess=teachers.preprocess if teachers else None,
                                max_length=args.max_length, image_seq_len=model.image_seq_len,
                                max_bad_fraction=args.max_bad_fraction)
    micro = args.micro_batch_size or batch_size // world
    accum = batch_size // (micro * world)
    if accum < 1 or micro * world * accum != batch_size:
        raise ValueError(f"global batch {batch_size} is not a multiple of micro batch {micro} x {world} ranks")
    loader = data.make_loader(dataset, micro, shuffle=True, seed=args.seed, rank=rank, world_size=world,
                              num_workers=args.num_workers)
    total = int(len(loader) * (args.epochs or hp.get("epochs", 1))) // accum
    total = min(total, args.max_steps) if args.max_steps else total
    if total < 1:
        raise ValueError(f"{len(dataset)} samples give no optimizer step at global batch {batch_size}")

    ckpts = sorted(stage_dir.glob("step_*[0-9]")) if args.resume else []
    ckpt = ckpts[-1] if ckpts else None
    if ckpt is not None:  # model weights go in before sharding, optimizer state after
        model.load_components(ckpt / "model")
    wrapped = wrap(model, args, stage, device)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    warmup = max(1, round(args.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, total, warmup))

    step = 0
    if ckpt is not None:
        trainer = torch.load(ckpt / "trainer.pt", weights_only=False)
        load_optimizer_state(wrapped, optimizer, trainer["optimizer"], args)
        scheduler.load_state_dict(trainer["scheduler"])
        step = trainer["step"]
        loader.load_state_dict(trainer["loader"])
        torch.set_rng_state(trainer["rng"])
        if rank == 0:
            print(f"resumed {stage} from {ckpt} at step {step}")
    elif stage_dir.exists() and rank == 0 and not args.resume:
        for f in stage_dir.glob("step_*"):
            shutil.rmtree(f, ignore_errors=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    metrics = None
    if rank == 0:  # on resume, keep the rows up to the checkpoint (later ones are re-run)
        path = stage_dir / "metrics.jsonl"
        kept = [l for l in path.read_text().splitlines() if json.loads(l)["step"] <= step] if ckpt else []
        metrics = open(path, "w")
        metrics.writelines(l + "\n" for l in kept)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    bar = tqdm(total=total, initial=step, desc=stage, disable=rank != 0, dynamic_ncols=True)
    history, t0, seen = [], time.time(), 0
    batches = iter(loader)
    wrapped.train()
    while step < total:
        terms_sum: dict[str, float] = {}
        for micro_step in range(accum):
            batch = next(batches, None)
            if batch is None:  # the loader moved on to the next epoch
                batches = iter(loader)
                batch = next(batches)
            batch = to_device(batch, device)
            last = micro_step == accum - 1
            with sync_context(wrapped, args, last), autocast:
                # every rank computes the embedding losses every step (they all-gather), images or not
                targets = teachers(batch["target_images"]) if teachers is not None else None
                out = wrapped(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["images"],
                              batch["has_image"], targets)
                (out.loss / accum).backward()
            for k, v in all_mean({"loss": out.loss, **out.terms}).items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v / accum
            seen += len(batch["ids"]) * world
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, "lr": scheduler.get_last_lr()[0], **terms_sum}
        history.append(record)
        if rank == 0:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "ntp", "emb")})
            bar.update()
        if step % args.save_every == 0 or step == total:
            save_checkpoint(stage_dir / f"step_{step:06d}", model, wrapped, optimizer, scheduler, step,
                            loader.state_dict(), stage, args, rank)
    bar.close()
    final = stage_dir / "final"
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        shutil.copytree(stage_dir / f"step_{step:06d}" / "model", final)
        metrics.close()
        summarize(stage, history, seen, time.time() - t0, final, dataset)
    if dist.is_initialized():
        dist.barrier()
    return final


def to_device(batch: dict, device: torch.device) -> dict:
    move = lambda v: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
    return {k: ({t: move(x) for t, x in v.items()} if isinstance(v, dict) else move(v)) for k, v in batch.items()}


def sync_context(wrapped, args, last: bool):
    """Reduce gradients across ranks only on the last micro-step of an accumulation."""
    if not dist.is_initialized():
        return nullcontext()
    if args.fsdp:
        wrapped.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last else wrapped.no_sync()


def summarize(stage: str, history: list[dict], seen: int, seconds: float, final: Path, dataset) -> None:
    """Closing summary: steps, throughput, mean of the first vs the last 10 steps of every loss term."""
    keys = [k for k in history[0] if k not in ("step", "lr")]
    n = min(10, len(history))
    print(f"\n{stage}: {len(history)} steps, {seen / seconds:.1f} samples/s, {seconds:.0f} s")
    for k in keys:
        first = sum(h[k] for h in history[:n]) / n
        last = sum(h[k] for h in history[-n:]) / n
        print(f"  {k:<16} first {n}: {first:8.4f}   last {n}: {last:8.4f}")
    print(dataset.summary())
    print(f"  checkpoint: {final}")


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for stage in args.stages:
            final = run_stage(args, stage, rank, world, device)
            args.init = str(final)  # the next stage starts where this one ended
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
