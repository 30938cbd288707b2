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

import argparse
import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import shapes
from chat import ChatTokenizer
from checkpoint import read_json, replace_folder
from distributed import all_mean, gather_states, load_optimizer_state, setup_distributed, sync_context, wrap
from encoders import VISION_TOWERS, CLIPVisionConfig, detect_tower
from llm import LLM, LLMConfig
from ola import OLAVLM, OLAConfig, set_trainable
from tasks import TASKS, add_teacher_args, make_teachers, teacher_paths
from teachers import TargetEncoders

# Paper recipe per stage (Sec. 5.1): learning rate, global batch, image view, what a checkpoint stores.
STAGES = {
    "pt": dict(lr=1e-3, batch_size=256, view="crop", stored=("projector", "tokens", "predictors")),
    "vpt": dict(lr=2e-5, batch_size=128, view="pad", stored=("llm", "projector", "tokens")),
    "ift": dict(lr=2e-5, batch_size=128, view="pad", stored=("llm", "projector", "tokens")),
}
# The built-in tiny model trains in minutes on a CPU: its own (larger) learning rates and batches.
TINY = dict(
    pt=dict(lr=2e-3, batch_size=16, epochs=6),
    vpt=dict(lr=1e-3, batch_size=16, epochs=6),
    ift=dict(lr=1e-3, batch_size=16, epochs=8),
)
BUILTIN = Path("data_cache/builtin")
PRESETS = {"tiny": "llama3", "llama3-8b": "llama3", "phi3-mini": "phi3"}  # preset -> chat template (Sec. 5.1)


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument(
        "--stage", default=None, help="pt, vpt, ift or a comma list run in order (tiny default: pt,ift)"
    )
    p.add_argument("--llm", help="LLM weight folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--vision", help="base encoder folder: CLIP ViT-L/14-336 or open_clip ConvNeXt-XXL")
    p.add_argument(
        "--vision-type", choices=sorted(VISION_TOWERS), help="base encoder kind (default: detected)"
    )
    p.add_argument(
        "--tasks", default=",".join(TASKS), help="distilled tasks, comma list ('' = none; App. Tab. II)"
    )
    add_teacher_args(p)
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in --llm)")
    p.add_argument("--init", help="OLA checkpoint to start from (IFT/VPT start from PT's final)")
    p.add_argument("--data", help="LLaVA .json/.jsonl records (default: built-in data)")
    p.add_argument("--image-folder", help="folder the records' image paths are relative to")
    p.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    p.add_argument("--batch-size", type=int, help="global batch (default: the stage's, Sec. 5.1)")
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
    for stage in args.stages:
        if stage not in STAGES:
            p.error(f"unknown stage {stage!r}: expected pt, vpt or ift")
    args.tasks = tuple(t for t in args.tasks.split(",") if t)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        p.error(f"--tasks: unknown task(s) {unknown}; expected some of {list(TASKS)}")
    args.teachers = teacher_paths(args, p.error)
    if args.preset != "tiny":
        check_real_inputs(args, p.error)
    args.out = Path(args.out or f"runs/{args.preset}")
    args.max_length = args.max_length or (512 if args.preset == "tiny" else 4096)
    return args


def check_real_inputs(args: argparse.Namespace, error) -> None:
    """A real preset needs its weights and data; PT needs a teacher per task and no other."""
    missing = [f"--{name}" for name in ("llm", "vision") if getattr(args, name) is None and not args.init]
    if "pt" in args.stages:
        missing += [f"--teacher {t}=PATH" for t in args.tasks if t not in args.teachers]
    if args.data is None:
        missing.append("--data")
    if missing:
        error(f"--preset {args.preset} needs {', '.join(missing)} (see README: downloading the weights)")
    extra = sorted(set(args.teachers) - set(args.tasks))
    if extra:
        error(f"teachers given for {extra}, which --tasks {','.join(args.tasks)} does not distill")


# ----------------------------------------------------------------------------- model
def tiny_model(
    cfg: OLAConfig, tok: ChatTokenizer, target_dims: dict[str, int] | None, seed: int, kind: str = "clip"
) -> OLAVLM:
    """The built-in tiny OLA-VLM (a random LLM and base encoder of `kind`, CPU-sized), reproducible from
    `seed`. Both tiny towers give an 8×8 grid of image tokens."""
    torch.manual_seed(seed)
    bos = tok.bos_ids[0] if tok.bos_ids else None
    llm_cfg = replace(
        LLMConfig.preset("tiny"),
        vocab_size=tok.vocab_size,
        bos_token_id=bos,
        eos_token_ids=tuple(tok.eos_ids),
        pad_token_id=tok.pad_id,
    )
    llm = LLM(llm_cfg)
    tower_cls, tower_cfg = VISION_TOWERS[kind]
    vision = tower_cls(tower_cfg.tiny())
    return OLAVLM(cfg, llm, vision, target_dims)


def build_model(
    args, tok: ChatTokenizer, teachers: TargetEncoders | None, device: torch.device, dtype: torch.dtype
) -> OLAVLM:
    """A fresh OLA-VLM from base weights (or tiny random ones), or the --init / previous-stage checkpoint.
    `dtype` is the LLM's (bf16 when it is frozen on a GPU); the new parts are fp32."""
    dims = teachers.dims if teachers is not None else None
    if args.init:  # the checkpoint's projector and special tokens are kept (and its predictors, in PT)
        model = OLAVLM.from_checkpoint(args.init, device=device, with_predictors=bool(dims))
        model.llm.to(dtype)
        if dims and model.predictors is None:  # PT from a checkpoint without predictors: fresh ones
            fresh = OLAVLM(model.cfg, model.llm, model.vision, dims, model.sources).to(device)
            fresh.projector = model.projector
            fresh.tokens = model.tokens
            model = fresh
        return model
    cfg = OLAConfig(tasks=args.tasks)
    if args.preset == "tiny":
        return tiny_model(cfg, tok, dims, args.seed, args.vision_type or "clip").to(device)
    llm = LLM.from_pretrained(args.llm, dtype=dtype, device=device)
    kind = args.vision_type or detect_tower(args.vision)
    vision = VISION_TOWERS[kind][0].from_pretrained(args.vision, dtype=dtype)
    sources = {"llm": str(Path(args.llm).resolve()), "vision": str(Path(args.vision).resolve())}
    return OLAVLM(cfg, llm, vision, dims, sources).to(device)


def base_grid(args) -> int:
    """The base encoder's token grid (24 for both real towers), which sizes the spatial teachers."""
    if args.preset == "tiny":
        config = CLIPVisionConfig.tiny()
        return config.image_size // config.patch_size
    return 24


def build_teachers(args, tasks: tuple[str, ...], device, dtype) -> TargetEncoders | None:
    paths = {} if args.preset == "tiny" else args.teachers
    teachers = make_teachers(paths, tasks, base_grid(args), seed=args.seed, dtype=dtype)
    return None if teachers is None else teachers.to(device)


def tokenizer_path(args, builtin: dict | None) -> Path:
    """--tokenizer, else the built-in one (tiny), else tokenizer.json of the LLM folder (or of the folder
    the --init checkpoint's LLM came from)."""
    if args.tokenizer:
        return Path(args.tokenizer)
    if args.preset == "tiny":
        return builtin["tokenizer"] if builtin else shapes.builtin_dataset(BUILTIN)["tokenizer"]
    llm = args.llm or read_json(Path(args.init) / "config.json")["sources"]["llm"]
    return Path(llm) / "tokenizer.json"


def stage_tasks(args, stage: str) -> tuple[str, ...]:
    """The tasks whose embedding losses this stage trains: PT only (Sec. 4), those of the --init checkpoint
    when PT starts from one."""
    if stage != "pt":
        return ()
    if args.init:
        return OLAConfig.from_dict(read_json(Path(args.init) / "config.json")["ola"]).tasks
    return args.tasks


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Linear warmup (3% of the steps) then cosine decay to 0 (Sec. 5.1)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ----------------------------------------------------------------------------- checkpoints
def json_args(args) -> dict:
    """The run's arguments as plain JSON values (paths as strings)."""
    return json.loads(json.dumps(vars(args), default=str))


# ----------------------------------------------------------------------------- one stage
@dataclass
class Run:
    """Everything one stage trains with."""

    stage: str
    model: OLAVLM
    wrapped: torch.nn.Module
    teachers: TargetEncoders | None
    dataset: data.LLaVADataset
    loader: data.Loader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total: int  # optimizer steps of the stage
    accum: int  # micro-batches per optimizer step
    folder: Path
    step: int = 0


def build_run(args, stage: str, rank: int, world: int, device: torch.device) -> Run:
    """Data, teachers, model, optimizer and schedule of one stage (weights of a --resume checkpoint loaded
    before sharding, the optimizer state after)."""
    cuda = device.type == "cuda"
    frozen = torch.bfloat16 if cuda else torch.float32  # frozen weights are bf16 on GPUs (docs/design.md §6)
    hp = {**STAGES[stage], **(TINY[stage] if args.preset == "tiny" else {})}
    lr = hp["lr"] if args.lr is None else args.lr
    batch_size = args.batch_size or hp["batch_size"]
    builtin = (
        shapes.builtin_dataset(BUILTIN) if args.data is None else None
    )  # rank-safe: temp folder + rename
    tok = ChatTokenizer(tokenizer_path(args, builtin), template=PRESETS[args.preset])
    teachers = build_teachers(args, stage_tasks(args, stage), device, frozen)
    model = build_model(args, tok, teachers, device, frozen if stage == "pt" else torch.float32)
    model.vision.to(frozen)
    set_trainable(model, stage, verbose=rank == 0)
    model.llm.gradient_checkpointing = args.grad_checkpointing
    records = args.data or builtin["pt" if stage == "pt" else "ift"]
    image_folder = args.image_folder or (builtin["images"] if builtin else None)
    dataset = data.LLaVADataset(
        records,
        image_folder,
        tok,
        view=hp["view"],
        image_size=model.vision.image_size,
        target_preprocess=teachers.preprocess if teachers else None,
        max_length=args.max_length,
        image_seq_len=model.image_seq_len,
        max_bad_fraction=args.max_bad_fraction,
        image_preprocess=model.vision.preprocess,
    )
    micro = args.micro_batch_size or batch_size // world
    accum = batch_size // (micro * world)
    if accum < 1 or micro * world * accum != batch_size:
        raise ValueError(
            f"global batch {batch_size} is not a multiple of micro batch {micro} x {world} ranks"
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
        model.load_components(checkpoint / "model")
    wrapped = wrap(model, args, stage, device)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    warmup = max(1, round(args.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, total, warmup))
    folder = args.out / stage
    run = Run(stage, model, wrapped, teachers, dataset, loader, optimizer, scheduler, total, accum, folder)
    if checkpoint is not None:
        resume(run, checkpoint, args, rank)
    return run


def latest_checkpoint(args, stage: str) -> Path | None:
    """The newest complete step_* checkpoint of the stage when --resume is on."""
    if not args.resume:
        return None
    found = sorted((args.out / stage).glob("step_*[0-9]"))
    if not found:
        print(f"--resume: no checkpoint in {args.out / stage}; starting {stage} from scratch")
        return None
    return found[-1]


def resume(run: Run, checkpoint: Path, args, rank: int) -> None:
    """Optimizer, schedule, step, data position and RNG from a checkpoint's trainer.pt (tensors only)."""
    trainer = torch.load(checkpoint / "trainer.pt", weights_only=True)
    load_optimizer_state(run.wrapped, run.optimizer, trainer["optimizer"], args)
    run.scheduler.load_state_dict(trainer["scheduler"])
    run.step = trainer["step"]
    run.loader.load_state_dict(trainer["loader"])
    torch.set_rng_state(trainer["rng"])
    if rank == 0:
        print(f"resumed {run.stage} from {checkpoint} at step {run.step}")


def save_checkpoint(run: Run, args, rank: int) -> None:
    """step_<n>/ = model/ (an OLA checkpoint) + trainer.pt, written to a temporary folder then renamed;
    only the newest --keep are kept."""
    state, optimizer_state = gather_states(run.wrapped, run.optimizer, args)
    if rank != 0:
        return
    folder = run.folder / f"step_{run.step:06d}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run.model.save(tmp / "model", STAGES[run.stage]["stored"], state=state)
    trainer = {
        "optimizer": optimizer_state,
        "scheduler": run.scheduler.state_dict(),
        "step": run.step,
        "loader": run.loader.state_dict(),
        "rng": torch.get_rng_state(),
    }
    torch.save(trainer, tmp / "trainer.pt")
    (tmp / "args.json").write_text(json.dumps(json_args(args), indent=1))
    replace_folder(tmp, folder)
    for old in sorted(run.folder.glob("step_*[0-9]"))[: -args.keep]:
        shutil.rmtree(old, ignore_errors=True)


def open_metrics(run: Run, resumed: bool):
    """metrics.jsonl of the stage; on resume the rows up to the checkpoint are kept (later ones re-run)."""
    path = run.folder / "metrics.jsonl"
    kept = []
    if resumed and path.exists():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):  # a kill tore the line being written
                print(f"{path}:{n}: dropping an incomplete metrics line")
                continue
            if step <= run.step:
                kept.append(line)
    metrics = open(path, "w")  # noqa: SIM115 (closed at the end of the stage)
    metrics.writelines(line + "\n" for line in kept)
    return metrics


def to_device(batch: dict, device: torch.device) -> dict:
    def move(value):
        return value.to(device, non_blocking=True) if torch.is_tensor(value) else value

    out = {}
    for key, value in batch.items():
        out[key] = {t: move(x) for t, x in value.items()} if isinstance(value, dict) else move(value)
    return out


def train_step(run: Run, batches, args, device: torch.device, world: int) -> tuple[dict[str, float], int]:
    """One optimizer step over `accum` micro-batches -> (the mean of every loss term, samples seen)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    terms_sum: dict[str, float] = {}
    seen = 0
    for micro_step in range(run.accum):
        batch = to_device(next(batches), device)
        last = micro_step == run.accum - 1
        with sync_context(run.wrapped, args, last), autocast:
            # every rank computes the embedding losses every step (they all-gather), images or not
            targets = run.teachers(batch["target_images"]) if run.teachers is not None else None
            out = run.wrapped(
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                batch["images"],
                batch["has_image"],
                targets,
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
    metrics = open_metrics(run, resumed) if rank == 0 else None
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
            save_checkpoint(run, args, rank)
    bar.close()
    final = run.folder / "final"
    if rank == 0:
        tmp = final.with_name("final.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(run.folder / f"step_{run.step:06d}" / "model", tmp)
        replace_folder(tmp, final)
        metrics.close()
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
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for stage in args.stages:
            final = run_stage(args, stage, rank, world, device)
            args.init = str(final)  # the next stage starts where this one ended
    except FloatingPointError as e:  # a diverged run: the message says which step and term
        raise SystemExit(f"error: {e}") from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
