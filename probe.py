r"""Layer-wise probing of a frozen MLLM (Sec. 3, Fig. 3, Tab. 8; docs/design.md §7): per LLM layer and task
(depth, seg, gen) a one-layer Perceiver resampler probe regresses a frozen teacher's features from
the layer's hidden states. Its score, the mean held-out cosine of prediction and target, says how
much of the teacher's visual information the layer holds in a readable form. All probes train
together from ONE no-grad forward of the frozen MLLM per batch.

    python probe.py                                    # the tiny run's PT and IFT checkpoints
    python probe.py --models runs/a/pt/final runs/b/pt/final --labels baseline OLA \
        --teacher depth=weights/depth-anything-v2-large-hf --teacher seg=weights/oneformer_coco_swin_large \
        --teacher gen=weights/sd21-unclip/image_encoder \
        --coco-captions coco/annotations/captions_train2017.json --coco-images coco/train2017 \
        --coco-val-captions coco/annotations/captions_val2017.json --coco-val-images coco/val2017 \
        --tasks depth --batch-size 32 --out runs/probe/depth

One process, one device: the hidden states of every layer are kept for each batch, so at 8B
probe one task at a time (--tasks) with a --batch-size that fits (the paper: 8 GPUs x 32).

Differences from the released probing code (docs/design.md §11): it crashes before training
(unpacking bug, undefined fields); its probes also attend to padding; it inserts the special
tokens while training but not at evaluation. Here the model's own splice is used in both, and
the depth target is the last DINOv2 block's normed patch tokens, as in the paper.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate
from tqdm import tqdm

import data
import miniature
from cli import user_errors
from inference import DEFAULT_RUN, image_pixels, load_model, prompt_ids
from losses import cosine
from precision import PRECISIONS, autocast, device_and_dtype
from resampler import PerceiverResampler
from schedule import warmup_cosine
from tasks import PAD, TASKS, add_teacher_args, make_teachers, teacher_paths
from teachers import TargetEncoders
from tokenizer import ChatTokenizer
from weights import last_complete

PROMPT = "Describe the image in two lines."  # the probing prompt (Sec. 3), empty answer
# The built-in miniature gets more steps and a larger learning rate, as train.py's TINY does (at lr 1e-3 its
# probes do not reach the mean-target level), and 750 of its 2,800 training images (≈ 3 minutes).
TINY = dict(lr=1e-2, batch_size=16, epochs=3)
TINY_TRAIN_IMAGES = 750


@dataclass
class ProbeConfig:
    """Probe training (Sec. 3; docs/design.md §7): smooth-L1, AdamW lr 1e-3, cosine with 3% warmup,
    batch 256, two epochs (Sec. 3; the released probe script runs one)."""

    lr: float = 1e-3
    batch_size: int = 256
    epochs: int = 2
    warmup_ratio: float = 0.03
    heads: int = 4  # the predictors' resampler shape (Sec. 4.1)
    dim_head: int = 32


@dataclass
class ProbeBatch:
    hidden_states: tuple[torch.Tensor, ...]  # n_layers + 1 tensors (B, T, H); [l] = output of block l
    key_mask: torch.Tensor  # (B, T) bool, True = real token (padding masked)
    targets: dict[str, torch.Tensor]  # task -> (B, N, C): N = 576 (depth, seg) or 1 (gen)


# ----------------------------------------------------------------------------- the probes
class Probes(nn.Module):
    """P_task^l for every task and every layer l: PerceiverResampler(H -> C -> C) with N own queries,
    where (N, C) is the task's target shape (docs/design.md §7: depth/seg 576 queries, gen 1; dim = out)."""

    def __init__(
        self,
        hidden: int,
        layers: list[int],
        target_shapes: dict[str, tuple[int, int]],
        heads: int = 4,
        dim_head: int = 32,
    ):
        super().__init__()
        self.layers, self.tasks = list(layers), list(target_shapes)
        self.heads = nn.ModuleDict(
            {
                t: nn.ModuleDict(
                    {
                        str(layer): PerceiverResampler(
                            hidden, C, C, num_latents=N, heads=heads, dim_head=dim_head
                        )
                        for layer in self.layers
                    }
                )
                for t, (N, C) in target_shapes.items()
            }
        )

    def forward(self, hidden_states: tuple[torch.Tensor, ...], key_mask: torch.Tensor) -> dict:
        """-> {(task, layer): prediction (B, N, C)}"""
        with autocast(key_mask.device, hidden_states[-1].dtype):  # bf16 hidden states: a bf16 MLLM
            return {
                (t, layer): self.heads[t][str(layer)](hidden_states[layer].float(), key_mask=key_mask)
                for t in self.tasks
                for layer in self.layers
            }


def train_probes(probes: Probes, batches, cfg: ProbeConfig) -> dict[str, torch.Tensor]:
    """Train every probe on `batches` (re-iterable, with len) for cfg.epochs: loss = Σ_task Σ_l
    smooth-L1 (docs/design.md §7: no contrastive term, no weights). Returns the mean target of each task
    over the first epoch: the trivial "predict the average" probe that evaluate() compares against."""
    optimizer = torch.optim.AdamW(probes.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=0.0)
    total = cfg.epochs * len(batches)
    scheduler = warmup_cosine(optimizer, total, cfg.warmup_ratio)
    sums, count = {}, 0
    probes.train()
    bar = tqdm(total=total, desc="probe train", dynamic_ncols=True)
    for epoch in range(cfg.epochs):
        for batch in batches:
            if epoch == 0:
                for t, y in batch.targets.items():
                    sums[t] = sums.get(t, 0) + y.float().sum(0)
                count += len(batch.key_mask)
            preds = probes(batch.hidden_states, batch.key_mask)
            loss = sum(
                F.smooth_l1_loss(p.float(), batch.targets[t].float(), beta=1.0) for (t, _), p in preds.items()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.set_postfix(loss=f"{loss.item() / len(preds):.4f}")
            bar.update()
    bar.close()
    return {t: s / count for t, s in sums.items()}


@torch.no_grad()
def evaluate(
    probes: Probes, batches, mean_targets: dict[str, torch.Tensor] | None = None
) -> tuple[dict[str, dict[int, float]], dict[str, float]]:
    """Mean over images of cosine(prediction, target) per task and layer -> {task: {layer: score}},
    and, given `mean_targets`, the same score of the constant mean-target predictor -> {task: score}."""
    probes.eval()
    sums, trivial, n = {}, {}, 0
    for batch in tqdm(batches, desc="probe eval", dynamic_ncols=True):
        preds = probes(batch.hidden_states, batch.key_mask)
        for (t, layer), p in preds.items():
            sums[(t, layer)] = sums.get((t, layer), 0.0) + cosine(p, batch.targets[t]).sum().item()
        for t, m in (mean_targets or {}).items():
            y = batch.targets[t]
            trivial[t] = trivial.get(t, 0.0) + cosine(m.to(y.device).expand_as(y), y).sum().item()
        n += len(batch.key_mask)
    scores = {t: {layer: sums[(t, layer)] / n for layer in probes.layers} for t in probes.tasks}
    return scores, {t: s / n for t, s in trivial.items()}


# ----------------------------------------------------------------------------- data
def builtin_images(paths: dict[str, Path], split: str) -> list[Path]:
    """The built-in set's unique images: 'train' = those of pt.json and ift.json, 'val' = of qa_val.jsonl."""
    if split == "val":
        files = [r["image"] for r in data.read_records(paths["qa_val"])]
    else:
        files = [r["image"] for s in ("pt", "ift") for r in data.read_records(paths[s]) if "image" in r]
    return [paths["images"] / f for f in dict.fromkeys(files)]


def coco_images(captions: str | Path, folder: str | Path) -> list[Path]:
    """One entry per unique image of a COCO captions file (as the released `prepare_coco` does); errors name
    the file (and the image id an annotation points to without its image)."""
    try:
        coco = json.loads(Path(captions).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{captions}: not a readable COCO captions JSON file ({e})") from None
    if not isinstance(coco, dict) or not {"images", "annotations"} <= coco.keys():
        raise ValueError(f"{captions}: expected a COCO captions file with 'images' and 'annotations'")
    try:
        names = {im["id"]: im["file_name"] for im in coco["images"]}
        ids = dict.fromkeys(a["image_id"] for a in coco["annotations"])
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"{captions}: expected images with 'id' and 'file_name' and annotations with 'image_id' ({e!r})"
        ) from None
    missing = [i for i in ids if i not in names]
    if missing:
        raise ValueError(
            f"{captions}: annotations point to image id {missing[0]!r}, not among its 'images' "
            f"({len(missing)} such id{'s' if len(missing) > 1 else ''})"
        )
    return [Path(folder) / names[i] for i in ids]


def load_views(paths: list[Path], tower, teachers: TargetEncoders):
    """Image paths -> base-encoder pixels (B, 3, S, S) and teacher pixels {task: (B, 3, s, s)} of the same
    square view: padded, the view of inference (docs/design.md §2), for PT and IFT checkpoints alike."""
    views = [image_pixels(p, tower, view="pad") for p in paths]
    pixels = [teachers.preprocess(square) for square, _ in views]
    return torch.stack([x for _, x in views]), default_collate(pixels)


class MLLMFeatures:
    """Re-iterable ProbeBatches: per batch one no-grad forward of the frozen MLLM (all hidden states) and
    of the teachers. Every image gets the same prompt, PROMPT, with an empty answer in the chat template."""

    def __init__(
        self,
        model,
        tok: ChatTokenizer,
        teachers: TargetEncoders,
        paths: list[Path],
        tasks,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        num_workers: int = 0,
    ):
        self.model, self.teachers, self.tasks = model, teachers, tasks
        self.ids = torch.tensor(prompt_ids(tok, PROMPT))  # (T,)
        collate = partial(load_views, tower=model.vision, teachers=teachers)
        self.loader = DataLoader(
            paths,
            batch_size,
            shuffle=shuffle,
            collate_fn=collate,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        device = next(self.model.parameters()).device
        for pixels, target_pixels in self.loader:
            ids = self.ids.expand(len(pixels), -1).to(device)
            pixels_on_device = {t: x.to(device) for t, x in target_pixels.items()}
            fed = None  # a multi-encoder baseline (Tab. 1) takes its teachers' pixels as input too
            if self.model.teachers is not None:
                fed = {t: pixels_on_device[t] for t in self.model.cfg.tasks}
            with torch.no_grad(), autocast(device, self.model.projector[0].weight.dtype):
                out = self.model(
                    ids,
                    torch.ones_like(ids, dtype=torch.bool),
                    images=pixels.to(device, self.model.projector[0].weight.dtype),
                    output_hidden_states=True,
                    teacher_images=fed,
                )
                targets = {t: y.float() for t, y in self.teachers.probe_targets(pixels_on_device).items()}
            for t, y in targets.items():
                if t != "gen" and y.shape[1] != self.model.num_image_tokens:
                    raise ValueError(
                        f"{t} teacher gives {y.shape[1]} tokens, the MLLM {self.model.num_image_tokens} "
                        f"image tokens: a spatial teacher's grid must be the base encoder's (design.md §2)"
                    )
            yield ProbeBatch(out.hidden_states, out.segments != PAD, targets)


# ----------------------------------------------------------------------------- main
def plot(scores: dict, trivial: dict, path: Path) -> None:
    """One panel per task, one curve per checkpoint across layers (Fig. 3), dashed: the mean-target level."""
    from matplotlib.figure import Figure

    tasks = list(next(iter(scores.values())))
    fig = Figure(figsize=(4.2 * len(tasks), 3.4))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        for label, s in scores.items():
            layers = sorted(int(layer) for layer in s[t])
            ax.plot(layers, [s[t][str(layer)] for layer in layers], marker="o", label=label)
        if t in trivial:
            ax.axhline(trivial[t], color="gray", linestyle="--", label="mean target")
        ax.set(title=f"{t} probe", xlabel="LLM layer", ylabel="cosine similarity")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=str(DEFAULT_RUN), help="a train.py output folder (default: the tiny run)")
    p.add_argument("--models", nargs="+", help="OLA checkpoints (default: <run>/pt/final <run>/ift/final)")
    p.add_argument(
        "--labels", nargs="+", help="one legend label per checkpoint (default: PT, IFT / folder names)"
    )
    p.add_argument("--tokenizer", help="tokenizer.json (default: the LLM folder's, or the built-in one)")
    add_teacher_args(p)  # default: the miniature's teachers
    p.add_argument("--coco-captions", help="captions_train2017.json (default: the built-in images)")
    p.add_argument("--coco-images", help="train2017/ image folder")
    p.add_argument("--coco-val-captions", help="captions_val2017.json")
    p.add_argument("--coco-val-images", help="val2017/ image folder")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma list of probed tasks")
    p.add_argument("--max-train-images", type=int, help=f"default all (built-in: {TINY_TRAIN_IMAGES})")
    p.add_argument("--max-val-images", type=int)
    p.add_argument("--batch-size", type=int, help="default 256 (tiny: 16)")
    p.add_argument("--epochs", type=int, help="default 2, as Sec. 3 (tiny: 3)")
    p.add_argument("--lr", type=float, help="default 1e-3 (tiny: 1e-2)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default="auto",
        help="the MLLM's weights and autocast (auto: bf16 on a GPU)",
    )
    p.add_argument("--seed", type=int, default=0, help="probe init and shuffling")
    p.add_argument("--out", help="output folder (default <run>/probe)")
    args = p.parse_args(argv)
    args.teachers = teacher_paths(args, p.error)
    coco = [args.coco_captions, args.coco_images, args.coco_val_captions, args.coco_val_images]
    if any(coco) and not all(coco):
        p.error(
            "COCO probing needs --coco-captions, --coco-images, --coco-val-captions and --coco-val-images"
        )
    args.tasks = args.tasks.split(",")
    if unknown := set(args.tasks) - set(TASKS):
        p.error(f"unknown task(s) {sorted(unknown)}: expected a comma list of {', '.join(TASKS)}")
    run = Path(args.run)
    if not args.models:  # each stage's final/, or its newest complete checkpoint after a kill
        try:
            args.models = [str(last_complete(run / stage)) for stage in ("pt", "ift")]
        except FileNotFoundError as e:
            p.error(f"{e}: pass --models or --run")
        args.labels = args.labels or ["PT", "IFT"]
    if not args.labels:  # <run>/pt/final -> "PT"; the full paths if that is ambiguous
        args.labels = [
            Path(m).parent.name.upper() if Path(m).name == "final" else Path(m).name for m in args.models
        ]
        args.labels = args.labels if len(set(args.labels)) == len(args.labels) else args.models
    if len(args.labels) != len(args.models) or len(set(args.labels)) != len(args.labels):
        p.error(f"--labels must give {len(args.models)} distinct names, one per checkpoint")
    defaults = asdict(ProbeConfig()) if args.teachers else TINY
    for k in ("lr", "batch_size", "epochs"):
        setattr(args, k, getattr(args, k) or defaults[k])
    args.out = Path(args.out or run / "probe")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = device_and_dtype(args.dtype)
    teachers = None  # built with the first checkpoint, sized for its base encoder's grid
    if args.coco_captions:
        train_paths = coco_images(args.coco_captions, args.coco_images)
        val_paths = coco_images(args.coco_val_captions, args.coco_val_images)
    else:
        builtin = miniature.builtin()
        train_paths, val_paths = builtin_images(builtin, "train"), builtin_images(builtin, "val")
        args.max_train_images = args.max_train_images or TINY_TRAIN_IMAGES
    train_paths, val_paths = train_paths[: args.max_train_images], val_paths[: args.max_val_images]
    cfg = ProbeConfig(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs)
    print(
        f"probing {len(args.models)} checkpoint(s) on {len(train_paths)} train / {len(val_paths)} val "
        f"images, "
        f"tasks {args.tasks}, {cfg}"
    )
    scores, trivial = {}, {}
    for label, folder in zip(args.labels, args.models):
        model, tok = load_model(folder, args.tokenizer, device=device, dtype=dtype)
        if model.teachers is not None and not set(model.cfg.tasks) <= set(args.tasks):
            raise ValueError(
                f"{folder} takes the {list(model.cfg.tasks)} teachers as input: probe those tasks"
            )
        if teachers is None:
            paths = args.teachers or miniature.teacher_folders(args.tasks)
            teachers = make_teachers(paths, tuple(args.tasks), model.vision.grid, dtype).to(device)
        torch.manual_seed(args.seed)
        features = partial(
            MLLMFeatures,
            model,
            tok,
            teachers,
            tasks=args.tasks,
            batch_size=cfg.batch_size,
            seed=args.seed,
            num_workers=args.num_workers,
        )
        train, val = features(train_paths, shuffle=True), features(val_paths, shuffle=False)
        target_shapes = {}
        for t in args.tasks:
            target_shapes[t] = (model.num_image_tokens if TASKS[t].spatial else 1, teachers.dims[t])
        layers = list(range(1, model.llm.config.n_layers + 1))  # block outputs; the last after the final norm
        probes = Probes(model.llm.config.hidden_size, layers, target_shapes, cfg.heads, cfg.dim_head)
        probes = probes.to(device)
        print(
            f"{label} ({folder}): {len(layers)} layers x {len(target_shapes)} tasks, "
            f"{sum(p.numel() for p in probes.parameters()):,} probe parameters"
        )
        mean_targets = train_probes(probes, train, cfg)
        s, trivial = evaluate(probes, val, mean_targets)
        scores[label] = {t: {str(layer): v for layer, v in per_layer.items()} for t, per_layer in s.items()}
        for t, per_layer in s.items():
            best = max(per_layer, key=per_layer.get)
            print(
                f"  {t:<5} cosine per layer: "
                + " ".join(f"{v:.3f}" for v in per_layer.values())
                + f"  (best layer {best}; mean-target level {trivial[t]:.3f})"
            )
        del model, probes, train, val
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "scores": scores,
        "mean_target": trivial,
        "checkpoints": dict(zip(args.labels, args.models)),
        "images": {"train": len(train_paths), "val": len(val_paths)},
        "config": asdict(cfg),
    }
    (args.out / "scores.json").write_text(json.dumps(result, indent=2))
    plot(scores, trivial, args.out / "probe.png")
    print(f"wrote {args.out / 'scores.json'} and {args.out / 'probe.png'}")


if __name__ == "__main__":
    with user_errors():  # bad input, a diverged run, a full disk: one line, no traceback
        main()
