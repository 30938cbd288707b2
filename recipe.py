r"""The training recipe and train.py's command line: the paper's per-stage hyper-parameters (Sec. 5.1), the
presets, and every ablation knob of the paper as a flag with the paper's default and the table it belongs
to (docs/design.md §5; docs/reproduce.md maps each table row to its command)."""

from __future__ import annotations

import argparse
from pathlib import Path

from checkpoint import stored_config
from cli import positive_float, positive_int
from encoders import VISION_TOWERS
from ola import MODES, OLAVLM, OLAConfig
from precision import PRECISIONS
from predictors import KEY_INPUTS
from tasks import TASKS, add_teacher_args, teacher_paths

# Paper recipe per stage (Sec. 5.1): learning rate, global batch, image view, and the components it trains
# (the frozen base encoder and, after PT, the frozen special tokens are never among them).
STAGES = {
    "pt": dict(lr=1e-3, batch_size=256, view="crop", trains=("projector", "tokens", "predictors")),
    "vpt": dict(lr=2e-5, batch_size=128, view="pad", trains=("llm", "projector")),
    "ift": dict(lr=2e-5, batch_size=128, view="pad", trains=("llm", "projector")),
}
COMPONENTS = ("vision", "teachers", "projector", "inputs", "tokens", "llm", "predictors")  # of a model
# The tiny preset (the miniature) trains in minutes on a CPU: its own (larger) learning rates and batches.
TINY = dict(
    pt=dict(lr=2e-3, batch_size=16, epochs=2),
    vpt=dict(lr=1e-3, batch_size=16, epochs=2),
    ift=dict(lr=1e-3, batch_size=16, epochs=2),
)
PRESETS = {"tiny": "llama3", "llama3-8b": "llama3", "phi3-mini": "phi3"}  # preset -> chat template (Sec. 5.1)
IFT_TOKENS = ("frozen", "learnable", "none")  # the special tokens during IFT (Tab. 6)
# stages with embedding losses (Tab. 4; "none": the special tokens learn from NTP alone, its second row)
EMB_LOSSES = {"pt": ("pt",), "ift": ("ift",), "pt+ift": ("pt", "ift"), "none": ()}


def task_values(items: list[str] | None, flag: str, parse, error) -> dict:
    """{task: value} from repeated TASK=VALUE flags (e.g. --layers depth=8,20)."""
    out = {}
    for item in items or []:
        task, sep, value = item.partition("=")
        if not sep or task not in TASKS:
            error(f"{flag} {item!r}: expected TASK=VALUE with TASK one of {list(TASKS)}")
        try:
            out[task] = parse(value)
        except ValueError:
            error(f"{flag} {item!r}: cannot read the value {value!r}")
    return out


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(t for t in text.split(",") if t)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument(
        "--stage", default=None, help="pt, vpt, ift or a comma list run in order (tiny default: pt,ift)"
    )
    p.add_argument("--llm", help="LLM weight folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("--vision", help="base encoder folder: CLIP ViT-L/14-336 or open_clip ConvNeXt-XXL")
    p.add_argument(
        "--vision-type", choices=sorted(VISION_TOWERS), help="base encoder kind (default: detected; Tab. 2)"
    )
    add_teacher_args(p)
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one in --llm)")
    p.add_argument("--init", help="OLA checkpoint to start from (IFT/VPT start from PT's final)")
    p.add_argument("--data", help="LLaVA .json/.jsonl records (default: built-in data)")
    p.add_argument("--image-folder", help="folder the records' image paths are relative to")
    p.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    p.add_argument("--batch-size", type=positive_int, help="global batch (default: the stage's, Sec. 5.1)")
    p.add_argument(
        "--micro-batch-size", type=positive_int, help="per-rank batch per forward (default: all of it)"
    )
    p.add_argument("--lr", type=float, help="peak learning rate (default: the stage's)")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--epochs", type=positive_float, help="passes over the data (default 1; tiny 2)")
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    p.add_argument("--max-length", type=positive_int, help="token budget per sample (default 4096; tiny 512)")
    p.add_argument("--save-every", type=positive_int, default=200, help="optimizer steps between checkpoints")
    p.add_argument("--keep", type=positive_int, default=3, help="checkpoints kept per stage")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard per decoder block)")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default="auto",
        help="frozen weights and autocast: bf16 (trained weights stay fp32), fp32, or auto = bf16 on a GPU, "
        "fp32 on a CPU",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        help="data-loading processes (default 0 for the tiny preset: on 2 cores loading in the training "
        "process is 16 %% faster; 2 otherwise)",
    )
    p.add_argument("--max-bad-fraction", type=float, default=0.05, help="stop when more samples are bad")
    p.add_argument("--seed", type=int, default=0)

    d = OLAConfig()  # the paper's defaults
    k = p.add_argument_group("model and ablation knobs (the paper's defaults; docs/reproduce.md)")
    k.add_argument(
        "--mode",
        default="ola",
        choices=("llava", *MODES),
        help="ola; llava = the LLaVA-1.5 baseline (no tasks); feat-concat / token-concat = the teachers' "
        "features as input (Tab. 1)",
    )
    k.add_argument("--tasks", default=",".join(d.tasks), help="distilled tasks, comma list (App. Tab. II)")
    k.add_argument(
        "--layers",
        action="append",
        metavar="TASK=L1,L2",
        help="a task's layer set, 1-based, for a 32-layer LLM (Tab. 3; default "
        + " ".join(f"{t}={','.join(map(str, task.layers))}" for t, task in TASKS.items())
        + ")",
    )
    k.add_argument(
        "--task-weight",
        action="append",
        metavar="TASK=X",
        help=f"λ of a task's embedding loss (App. Tab. IV; default {d.task_weight('depth')})",
    )
    k.add_argument("--sl1-weight", type=float, default=d.sl1_weight, help="λ_sL1 (App. Tab. V; 0 = off)")
    k.add_argument(
        "--contrastive-weight", type=float, default=d.contrastive_weight, help="λ_con (App. Tab. V; 0 = off)"
    )
    k.add_argument(
        "--num-seek-tokens", type=int, default=d.num_seek_tokens, help="N_seek per task (Tab. 5; 0 = none)"
    )
    k.add_argument("--token-order", help="order of the <t> blocks, comma list (App. Tab. III; gen,depth,seg)")
    k.add_argument(
        "--key-input", default=d.key_input, choices=list(KEY_INPUTS), help="predictor keys (App. Tab. I)"
    )
    k.add_argument(
        "--ift-tokens", default="frozen", choices=IFT_TOKENS, help="special tokens during IFT (Tab. 6)"
    )
    k.add_argument(
        "--emb-losses", default="pt", choices=list(EMB_LOSSES), help="stages with embedding losses (Tab. 4)"
    )
    args = p.parse_args(argv)

    args.stages = (args.stage or ("pt,ift" if args.preset == "tiny" else "pt")).split(",")
    for stage in args.stages:
        if stage not in STAGES:
            p.error(f"unknown stage {stage!r}: expected pt, vpt or ift")
    args.tasks = () if args.mode == "llava" else comma_list(args.tasks)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        p.error(f"--tasks: unknown task(s) {unknown}; expected some of {list(TASKS)}")
    args.layer_sets = task_values(
        args.layers, "--layers", lambda v: tuple(int(x) for x in v.split(",")), p.error
    )
    args.task_weights = task_values(args.task_weight, "--task-weight", float, p.error)
    for flag, values in (("--layers", args.layer_sets), ("--task-weight", args.task_weights)):
        if disabled := sorted(set(values) - set(args.tasks)):
            p.error(f"{flag} {'/'.join(disabled)}: not among --tasks {','.join(args.tasks) or '(none)'}")
    args.emb_stages = EMB_LOSSES[args.emb_losses] if args.mode in ("ola", "llava") else ()
    if not 0 <= args.warmup_ratio < 1:
        p.error(f"--warmup-ratio {args.warmup_ratio}: expected a fraction of the steps in [0, 1)")
    if not 0 <= args.max_bad_fraction <= 1:
        p.error(f"--max-bad-fraction {args.max_bad_fraction}: expected a fraction in [0, 1]")
    if args.num_workers is not None and args.num_workers < 0:
        p.error(f"--num-workers {args.num_workers}: expected 0 (load in the training process) or more")
    args.teachers = teacher_paths(args, p.error)
    try:
        args.ola = ola_config(args)
    except ValueError as e:
        p.error(str(e))
    if args.preset != "tiny":
        check_real_inputs(args, p.error)
    args.out = Path(args.out or f"runs/{args.preset}")
    args.max_length = args.max_length or (512 if args.preset == "tiny" else 4096)
    if args.num_workers is None:
        args.num_workers = 0 if args.preset == "tiny" else 2
    return args


def ola_config(args: argparse.Namespace) -> OLAConfig:
    """The model's configuration from the flags (OLAConfig checks it)."""
    return OLAConfig(
        tasks=args.tasks,
        mode="ola" if args.mode == "llava" else args.mode,
        layer_sets=args.layer_sets,
        num_seek_tokens=args.num_seek_tokens,
        token_order=comma_list(args.token_order) if args.token_order else None,
        task_weights=args.task_weights,
        sl1_weight=args.sl1_weight,
        contrastive_weight=args.contrastive_weight,
        key_input=args.key_input,
    )


def needs_teachers(args: argparse.Namespace) -> bool:
    """Teachers run when a stage of the run has embedding losses, or always for the concat baselines."""
    return bool(args.tasks) and (args.mode != "ola" or bool(set(args.emb_stages) & set(args.stages)))


def check_real_inputs(args: argparse.Namespace, error) -> None:
    """A real preset needs its weights and data; a stage with teachers needs one per task and no other."""
    missing = [f"--{name}" for name in ("llm", "vision") if getattr(args, name) is None and not args.init]
    if needs_teachers(args):
        missing += [f"--teacher {t}=PATH" for t in args.tasks if t not in args.teachers]
    if args.data is None:
        missing.append("--data")
    if missing:
        error(f"--preset {args.preset} needs {', '.join(missing)} (see README: downloading the weights)")
    extra = sorted(set(args.teachers) - set(args.tasks))
    if extra:
        error(f"teachers given for {extra}, which --tasks {','.join(args.tasks)} does not distill")


# ----------------------------------------------------------------------------- the stages
def stored_components(stage: str) -> tuple[str, ...]:
    """What a checkpoint of the stage stores: every small trained part (the predictors only where the stage
    has them: PT, or IFT with --emb-losses pt+ift), and the LLM where the stage trains it."""
    llm = ("llm",) if "llm" in STAGES[stage]["trains"] else ()
    return (*llm, "projector", "inputs", "tokens", "predictors")


def stage_tasks(args: argparse.Namespace, stage: str) -> tuple[str, ...]:
    """The tasks whose embedding losses this stage trains: in the --emb-losses stages (PT only, Sec. 4;
    Tab. 4), those of the --init checkpoint when the stage starts from one."""
    if stage not in args.emb_stages:
        return ()
    if args.init:
        return stored_config(args.init).tasks
    return args.tasks


def set_trainable(
    model: OLAVLM, stage: str, verbose: bool = True, emb_losses: bool | None = None, tokens: str = "frozen"
) -> dict[str, tuple[int, int]]:
    """Freeze per stage (Sec. 5.1): PT trains projector, special tokens, predictors (+ logit scales);
    VPT/IFT train LLM and projector and keep the base encoder and the tokens frozen. `emb_losses` (default:
    PT only; Tab. 4) keeps and trains the predictors, else they are dropped; `tokens` = "learnable" also
    trains the special tokens in IFT, "none" drops them from IFT on (Tab. 6). VPT keeps them frozen whatever
    `tokens` is (Tab. 2 trains the whole model but the special tokens). Returns (and prints) {component:
    (trainable, total) parameters}."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: expected one of {list(STAGES)}")
    trainable = STAGES[stage]["trains"]
    if emb_losses is None:
        emb_losses = stage == "pt"
    if emb_losses:
        trainable = (*trainable, "predictors")
    else:  # IFT and inference keep the (frozen) special tokens, not the predictors (Sec. 4.1)
        model.predictors = None
        model.target_dims = None
    if stage == "ift" and tokens == "learnable":
        trainable = (*trainable, "tokens")
    if stage == "ift" and tokens == "none":
        model.drop_tokens()
    trainable = (*trainable, "inputs")  # the baselines' feature projectors train with the projector
    counts = {}
    for name in COMPONENTS:
        module = getattr(model, name, None)
        if module is None:
            continue
        module.requires_grad_(name in trainable)
        n = sum(p.numel() for p in module.parameters())
        counts[name] = (n if name in trainable else 0, n)
    counts["total"] = tuple(map(sum, zip(*counts.values())))
    if verbose:
        print(f"stage {stage}: trainable / all parameters")
        print("\n".join(f"  {name:<10} {t:>14,} / {n:>14,}" for name, (t, n) in counts.items()))
    return counts
