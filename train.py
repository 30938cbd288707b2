r"""Train OLA-VLM: PT (with embedding losses) -> optional VPT -> IFT (Sec. 5.1; docs/design.md §5, §6, §12).

    python train.py                                   # tiny model, built-in data, PT then IFT on CPU
    torchrun --nproc_per_node=8 train.py --preset llama3-8b --stage pt \
        --llm weights/llama3-8b-instruct --vision weights/clip-vit-large-patch14-336 \
        --teacher depth=weights/depth-anything-v2-large-hf --teacher seg=weights/oneformer_coco_swin_large \
        --teacher gen=weights/sd21-unclip/image_encoder \
        --data LLaVA-Pretrain/blip_laion_cc_sbu_558k.json --image-folder LLaVA-Pretrain/images
    torchrun --nproc_per_node=8 train.py --preset llama3-8b --stage ift --fsdp \
        --init runs/llama3-8b/pt/final --data llava_v1_5_mix665k.json --image-folder datasets
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import miniature
from checkpoint import from_checkpoint, load_components
from cli import user_errors
from concat import make_vlm
from convnext import ConvNeXt, ConvNeXtConfig
from distributed import all_mean, setup_distributed, sync_context, wrap
from encoders import VISION_TOWERS, CLIPVisionConfig, detect_tower
from llm import LLM
from ola import OLAVLM
from precision import autocast, compute_dtype
from recipe import PRESETS, STAGES, TINY, parse_args, set_trainable, stage_tasks
from run_state import Run, latest_checkpoint, open_metrics, record_config, resume, save_step, sole_writer
from schedule import warmup_cosine
from tasks import make_teachers
from teachers import TargetEncoders
from tokenizer import ChatTokenizer, check_vocabulary, find_tokenizer
from weights import COMPLETE, read_json, write_folder


# ----------------------------------------------------------------------------- model
def builtin_defaults(args, rank: int) -> None:
    """The tiny preset is the paper's pipeline on the miniature (miniature.py; rank 0 builds it on first
    use): its LLM, CLIP base encoder and teachers are the defaults of --llm, --vision and --teacher, its PT
    and IFT records those of --data. A random tiny ConvNeXt serves --vision-type convnext (the miniature
    pretrains no ConvNeXt: on 2 cores it would take longer than all the other parts)."""
    args.builtin = None
    if args.preset != "tiny":
        return
    if rank == 0:
        miniature.builtin()
    if dist.is_initialized():
        dist.barrier()
    args.builtin = miniature.builtin()
    args.llm = args.llm or str(args.builtin["llm"])
    if args.vision is None and args.vision_type != "convnext":
        args.vision = str(args.builtin["clip"])
    for task in args.tasks:
        args.teachers.setdefault(task, str(args.builtin[task]))
    if args.image_folder is None and args.data is None:
        args.image_folder = str(args.builtin["images"])


def build_model(
    args, tok: ChatTokenizer, teachers: TargetEncoders | None, device: torch.device, dtype: torch.dtype
) -> OLAVLM:
    """A fresh OLA-VLM from base weights (its new parts seeded by --seed), or the --init / previous-stage
    checkpoint. `dtype` is the LLM's (bf16 when it is frozen on a GPU); the new parts are fp32."""
    dims = teachers.dims if teachers is not None else None
    if args.init:  # the checkpoint's configuration, projector and special tokens are kept (and predictors)
        model = from_checkpoint(args.init, device=device, with_predictors=bool(dims))
        model.llm.to(dtype)
        if dims and model.target_dims and model.target_dims != dims:
            raise ValueError(
                f"{args.init}: its predictors predict {model.target_dims} channels, the teachers give {dims}"
            )
        if dims and model.predictors is None:  # embedding losses, a checkpoint without predictors: fresh ones
            fresh = OLAVLM(model.cfg, model.llm, model.vision, dims, model.sources).to(device)
            fresh.projector = model.projector
            fresh.tokens = model.tokens
            model = fresh
        return model
    cfg = copy.deepcopy(args.ola)  # a stage may change its copy (--ift-tokens none)
    inputs = None  # the multi-encoder baselines' teachers, part of the model (Tab. 1)
    if cfg.mode != "ola":
        inputs = build_teachers(args, cfg.tasks, device, dtype)
    llm = LLM.from_pretrained(args.llm, dtype=dtype, device=device)
    sources = {"llm": str(Path(args.llm).resolve())}
    torch.manual_seed(args.seed)
    if args.vision is None:  # the tiny preset's random ConvNeXt (builtin_defaults), stored in checkpoints
        vision = ConvNeXt(ConvNeXtConfig.tiny())
    else:
        kind = args.vision_type or detect_tower(args.vision)
        vision = VISION_TOWERS[kind][0].from_pretrained(args.vision, dtype=dtype)
        sources["vision"] = str(Path(args.vision).resolve())
    if inputs is not None:
        sources["teachers"] = {task: str(Path(args.teachers[task]).resolve()) for task in cfg.tasks}
    return make_vlm(cfg, llm, vision, dims, sources, inputs).to(device)


def base_grid(args) -> int:
    """The base encoder's token grid (24 for both real towers, 8 for the miniature's), which sizes the
    spatial teachers."""
    if args.preset == "tiny":
        config = CLIPVisionConfig.tiny()
        return config.image_size // config.patch_size
    return 24


def build_teachers(args, tasks: tuple[str, ...], device, dtype) -> TargetEncoders | None:
    teachers = make_teachers(args.teachers, tasks, base_grid(args), dtype=dtype)
    return None if teachers is None else teachers.to(device)


def tokenizer_of(args) -> Path:
    """--tokenizer, else the --init folder's own, else that of the LLM folder (or of the folder the --init
    checkpoint's LLM came from)."""
    llm = args.llm
    if not llm and args.init:
        llm = read_json(Path(args.init) / "config.json").get("sources", {}).get("llm")
    path = find_tokenizer(args.tokenizer, args.init, llm)
    if path is None:
        raise ValueError(f"--init {args.init}: no tokenizer.json there nor an LLM folder: pass --tokenizer")
    return path


# ----------------------------------------------------------------------------- one stage
def build_run(args, stage: str, rank: int, world: int, device: torch.device) -> Run:
    """Data, teachers, model, optimizer and schedule of one stage (weights of a --resume checkpoint loaded
    before sharding, the optimizer state after)."""
    frozen = compute_dtype(device, args.dtype)  # frozen weights: bf16 on GPUs by default (docs/design.md §6)
    hp = {**STAGES[stage], **(TINY[stage] if args.preset == "tiny" else {})}
    lr = hp["lr"] if args.lr is None else args.lr
    batch_size = args.batch_size or hp["batch_size"]
    tok = ChatTokenizer(tokenizer_of(args), template=PRESETS[args.preset])
    teachers = build_teachers(args, stage_tasks(args, stage), device, frozen)
    model = build_model(args, tok, teachers, device, frozen if stage == "pt" else torch.float32)
    check_vocabulary(tok, model.llm.config.vocab_size)
    model.vision.to(frozen)
    emb_losses = stage in args.emb_stages
    set_trainable(model, stage, verbose=rank == 0, emb_losses=emb_losses, tokens=args.ift_tokens)
    model.llm.gradient_checkpointing = args.grad_checkpointing
    records = args.data or args.builtin["pt" if stage == "pt" else "ift"]
    image_folder = args.image_folder
    fed = teachers if teachers is not None else model.teachers  # the teachers that get pixels, if any
    dataset = data.LLaVADataset(
        records,
        image_folder,
        tok,
        view=hp["view"],
        image_size=model.vision.image_size,
        target_preprocess=fed.preprocess if fed is not None else None,
        max_length=args.max_length,
        image_seq_len=model.image_seq_len,
        max_bad_fraction=args.max_bad_fraction,
        image_preprocess=model.vision.preprocess,
    )
    if stage == "pt":
        check_images(dataset)
    micro = args.micro_batch_size or batch_size // world
    accum = batch_size // (micro * world)
    if accum < 1 or micro * world * accum != batch_size:
        raise ValueError(
            f"global batch {batch_size} is not a multiple of micro batch {micro} x {world} ranks"
        )
    if accum > 1 and teachers is not None and model.cfg.contrastive_weight and rank == 0:
        print(
            f"note: InfoNCE negatives are {micro * world} samples per micro-batch, not the global batch "
            f"{batch_size} (docs/design.md §4)"
        )
    loader = data.Loader(
        dataset, micro, seed=args.seed, rank=rank, world_size=world, num_workers=args.num_workers
    )
    total = int(len(loader) * (args.epochs or hp.get("epochs", 1))) // accum
    if args.max_steps:
        total = min(total, args.max_steps)
    if total < 1:
        raise ValueError(f"{len(dataset)} samples give no optimizer step at global batch {batch_size}")
    checkpoint = latest_checkpoint(args, stage)
    if checkpoint is not None:  # model weights go in before sharding, the optimizer state after
        load_components(model, checkpoint / "model")
    wrapped = wrap(model, args, stage, device)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    scheduler = warmup_cosine(optimizer, total, args.warmup_ratio)
    folder = args.out / stage
    run = Run(
        stage, model, wrapped, teachers, dataset, loader, optimizer, scheduler, total, accum, folder, frozen
    )
    if checkpoint is not None:
        resume(run, checkpoint, args, rank)
    return run


def check_images(dataset: data.LLaVADataset) -> None:
    """PT learns from images (Sec. 4, 5.1): refuse PT data without any, and say how many records have none
    (their embedding losses are 0)."""
    with_image = sum(isinstance(r, dict) and "image" in r for r in dataset.records)
    if with_image == 0:
        raise ValueError(f"{dataset.path}: no record has an 'image', but PT trains on images (Sec. 5.1)")
    if with_image < len(dataset.records):
        print(f"note: {len(dataset.records) - with_image} of {len(dataset.records)} PT records have no image")


def to_device(batch: dict, device: torch.device) -> dict:
    def move(value):
        return value.to(device, non_blocking=True) if torch.is_tensor(value) else value

    out = {}
    for key, value in batch.items():
        out[key] = {t: move(x) for t, x in value.items()} if isinstance(value, dict) else move(value)
    return out


def train_step(run: Run, batches, args, device: torch.device, world: int) -> tuple[dict[str, float], int]:
    """One optimizer step over `accum` micro-batches -> (the mean of every loss term, samples seen)."""
    mixed = autocast(device, run.dtype)
    terms_sum: dict[str, float] = {}
    seen = 0
    for micro_step in range(run.accum):
        batch = to_device(next(batches), device)
        last = micro_step == run.accum - 1
        with sync_context(run.wrapped, args, last), mixed:
            # every rank computes the embedding losses every step (they all-gather), images or not
            targets = run.teachers(batch["target_images"]) if run.teachers is not None else None
            fed = batch["target_images"] if run.model.teachers is not None else None  # concat baselines
            out = run.wrapped(
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                batch["images"],
                batch["has_image"],
                targets,
                teacher_images=fed,
            )
            (out.loss / run.accum).backward()
        for key, value in all_mean({"loss": out.loss, **out.terms}).items():
            terms_sum[key] = terms_sum.get(key, 0.0) + value / run.accum
        seen += len(batch["ids"]) * world
    check_finite(run, terms_sum)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return terms_sum, seen


def check_finite(run: Run, terms: dict[str, float]) -> None:
    """Stop before an optimizer step that would write NaN / inf into the weights (and a checkpoint)."""
    bad = [f"{key} = {value}" for key, value in terms.items() if not math.isfinite(value)]
    params = [p for p in run.wrapped.parameters() if p.grad is not None]
    if not bad and params:
        norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))  # measures, does not clip
        if not torch.isfinite(norm):
            bad.append(f"gradient norm = {norm.item()}")
    if bad:
        raise FloatingPointError(
            f"{run.stage} step {run.step + 1}: non-finite {', '.join(bad)}; stopped before the optimizer "
            f"step, the last checkpoint in {run.folder} is intact (try a lower --lr)"
        )


def endless(loader: data.Loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def run_stage(args, stage: str, rank: int, world: int, device: torch.device) -> Path:
    """Train one stage to its last step; returns its final checkpoint folder."""
    run = build_run(args, stage, rank, world, device)
    resumed = run.step > 0
    if rank == 0 and not resumed:
        for old in run.folder.glob("step_*"):
            shutil.rmtree(old, ignore_errors=True)
    run.folder.mkdir(parents=True, exist_ok=True)
    metrics = None
    if rank == 0:
        metrics = open_metrics(run, resumed)
        record_config(run, args)
    bar = tqdm(total=run.total, initial=run.step, desc=stage, disable=rank != 0, dynamic_ncols=True)
    history, t0, seen = [], time.time(), 0
    batches = endless(run.loader)
    run.wrapped.train()
    while run.step < run.total:
        terms, n = train_step(run, batches, args, device, world)
        seen += n
        run.step += 1
        record = {"step": run.step, "lr": run.scheduler.get_last_lr()[0], **terms}
        history.append(record)
        if rank == 0:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "ntp", "emb")})
            bar.update()
        if run.step % args.save_every == 0 or run.step == run.total:
            save_step(run, args, rank)
    bar.close()
    final = run.folder / "final"
    if rank == 0:
        last = run.folder / f"step_{run.step:06d}" / "model"
        skip = shutil.ignore_patterns(COMPLETE)  # a marker left by a kill must not mark final.tmp early
        write_folder(final, lambda tmp: shutil.copytree(last, tmp, ignore=skip, dirs_exist_ok=True))
        metrics.close()
        if history:  # empty when a resumed run had already saved its last step
            summarize(stage, history, seen, time.time() - t0, final, run.dataset)
    if dist.is_initialized():
        dist.barrier()
    return final


def summarize(stage: str, history: list[dict], seen: int, seconds: float, final: Path, dataset) -> None:
    """Closing summary: steps, throughput, mean of the first vs the last 10 steps of every loss term."""
    keys = [k for k in history[0] if k not in ("step", "lr")]
    n = min(10, len(history))
    print(f"\n{stage}: {len(history)} steps, {seen / seconds:.1f} samples/s, {seconds:.0f} s")
    for key in keys:
        first = sum(h[key] for h in history[:n]) / n
        last = sum(h[key] for h in history[-n:]) / n
        print(f"  {key:<16} first {n}: {first:8.4f}   last {n}: {last:8.4f}")
    print(dataset.summary())
    print(f"  checkpoint: {final}")


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    builtin_defaults(args, rank)
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with sole_writer(args.out) if rank == 0 else nullcontext():
            run_stages(args, rank, world, device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_stages(args, rank: int, world: int, device: torch.device) -> None:
    """The --stage chain, each stage starting from the previous one's final checkpoint."""
    for stage in args.stages:
        final = args.out / stage / "final"
        if args.resume and final.exists():  # a pt,ift chain killed in IFT resumes in IFT
            print(f"--resume: {stage} is complete ({final}); going on from it")
        else:
            final = run_stage(args, stage, rank, world, device)
        args.init = str(final)  # the next stage starts where this one ended


if __name__ == "__main__":
    with user_errors():  # bad input, a diverged run, a full disk: one line, no traceback
        main()
