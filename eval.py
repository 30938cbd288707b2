"""Evaluate and use a trained OLA-VLM: CV-Bench (Sec. 5.1, Tab. 1; docs/design.md §10), the built-in held-out
QA, streaming chat, and pictures of what the PT embedding predictors learned (Fig. 6).

    python eval.py qa                                  # built-in held-out QA, the tiny run's IFT model
    python eval.py cvbench --model runs/llama3-8b/ift/final --data CV-Bench/test.jsonl --images CV-Bench
    python eval.py chat --image photo.jpg --prompt "What is in the image?"
    python eval.py show --image photo.jpg              # PCA of predicted vs target depth/seg features
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from itertools import takewhile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

import data
import shapes
from chat import ChatTokenizer
from ola import OLAVLM
from preprocess import square_view
from tasks import add_teacher_args, make_teachers, teacher_paths
from teachers import TargetEncoders

DEFAULT_RUN = Path("runs/tiny")  # where `python train.py` writes
BUILTIN = Path("data_cache/builtin")  # the built-in data (and tokenizer) train.py uses


# ----------------------------------------------------------------------------- 1. loading
def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), torch.float32


def load_model(
    folder: str | Path,
    tokenizer: str | Path | None = None,
    with_predictors: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[OLAVLM, ChatTokenizer]:
    """An OLA checkpoint (train.py's `final`) in eval mode and its chat tokenizer. Checkpoints do not record
    their tokenizer: default = the LLM source folder's tokenizer.json, or the built-in one for a tiny LLM."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder}: not an OLA checkpoint (no config.json); train one with "
            f"`python train.py` or pass the checkpoint folder"
        )
    model = OLAVLM.from_checkpoint(folder, dtype=dtype, device=device, with_predictors=with_predictors).eval()
    llm_folder = model.sources.get("llm")
    path = Path(
        tokenizer
        or (
            Path(llm_folder) / "tokenizer.json"
            if llm_folder
            else shapes.builtin_dataset(BUILTIN)["tokenizer"]
        )
    )
    tok = ChatTokenizer(path, "phi3" if model.llm.config.model_type == "phi3" else "llama3")
    if tok.vocab_size > model.llm.config.vocab_size:
        raise ValueError(
            f"tokenizer {path} has {tok.vocab_size} tokens, the LLM of {folder} only "
            f"{model.llm.config.vocab_size}: pass the tokenizer it was trained with (--tokenizer)"
        )
    return model, tok


def prompt_ids(tok: ChatTokenizer, prompt: str, with_image: bool = True) -> list[int]:
    """One user turn ("<image>\\n" + prompt) ending with the assistant header: a generation prompt."""
    return tok.encode_conversation([{"from": "human", "value": prompt}], with_image)[0]


def image_pixels(path: str | Path, tower, view: str = "pad") -> tuple[Image.Image, torch.Tensor]:
    """The square view (pad at inference, crop for PT; docs/design.md §2) and the base encoder's pixels."""
    try:
        with Image.open(path) as img:
            square = square_view(img.convert("RGB"), view)
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return square, tower.preprocess(square)


# ----------------------------------------------------------------------------- 2. answers
@torch.no_grad()
def answer(
    model: OLAVLM,
    tok: ChatTokenizer,
    prompts: list[str],
    images: list[torch.Tensor] | None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    streamer=None,
) -> list[str]:
    """Answers to a batch of prompts (one image each, or none), greedy by default. OLAVLM.generate
    left-pads the spliced sequences, so the batch can mix prompt lengths."""
    rows = [torch.tensor(prompt_ids(tok, p, images is not None)) for p in prompts]
    ids = pad_sequence(rows, batch_first=True, padding_value=tok.pad_id)  # (B, T) right-padded
    mask = torch.arange(ids.shape[1]) < torch.tensor([len(r) for r in rows])[:, None]  # (B, T)
    device, dtype = model.projector[0].weight.device, model.projector[0].weight.dtype
    pixels = torch.stack(images).to(device, dtype) if images is not None else None
    out = model.generate(
        ids.to(device),
        mask.to(device),
        images=pixels,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        eos_token_ids=tok.eos_ids,
        streamer=streamer,
    )  # (B, n_new)
    return [tok.decode(takewhile(lambda t: t not in tok.eos_ids, row)).strip() for row in out.tolist()]


CHOICE_PATTERNS = (
    re.compile(r"\(([A-Z])\)"),  # "(B)", "The answer is (C)."
    re.compile(r"^\s*([A-Z])\s*(?:[).:,]|$)"),  # "B", "B) because...", "B."
    re.compile(r"\banswer is:?\s*([A-Z])\b"),  # "The answer is C"
)


def parse_choice(text: str) -> str | None:
    """The option a free-form answer picks, as "(X)", or None when it names none (docs/design.md §10): an
    unparseable answer is wrong (the released parser reused the previous sample's answer instead)."""
    for pattern in CHOICE_PATTERNS:
        if m := pattern.search(text):
            return f"({m.group(1)})"
    return None


# ----------------------------------------------------------------------------- 3. multiple choice
def read_questions(path: str | Path) -> list[dict]:
    """CV-Bench `test.jsonl` or the built-in `qa_val.jsonl`: records with prompt, answer "(X)", an
    image path ("filename" in CV-Bench, "image" in ours), task and source."""
    records = data.read_records(path)
    for n, r in enumerate(records, 1):
        missing = [k for k in ("prompt", "answer") if k not in r] + (
            [] if "filename" in r or "image" in r else ["filename|image"]
        )
        if missing:
            raise ValueError(f"{path}: record {n} lacks {missing} (expected CV-Bench fields)")
    return records


def score(records: list[dict], outputs: list[str]) -> list[dict]:
    """One row per sample: the raw output, the parsed choice and whether it equals the answer.
    Each row depends on its own output only: nothing carries over between samples."""
    rows = []
    for r, out in zip(records, outputs, strict=True):
        pred = parse_choice(out)
        rows.append(
            {
                "id": r.get("id", r.get("idx")),
                "task": r.get("task"),
                "source": r.get("source"),
                "type": r.get("type"),
                "answer": r["answer"],
                "output": out,
                "prediction": pred,
                "correct": pred is not None and pred == r["answer"],
            }
        )
    return rows


def metrics(rows: list[dict]) -> dict:
    """Overall, per-task and per-source accuracy; plus CV-Bench's own aggregate (docs/design.md §10):
    2D = mean(acc ADE20K, acc COCO), 3D = acc Omni3D, Overall = (2D + 3D) / 2 (None when absent)."""

    def accuracy(rows: list[dict]) -> float | None:
        return sum(r["correct"] for r in rows) / len(rows) if rows else None

    def by(key: str) -> dict[str, float]:
        groups = sorted({str(r[key]) for r in rows})
        return {g: accuracy([r for r in rows if str(r[key]) == g]) for g in groups}

    sources = by("source")
    two_d = [sources[s] for s in ("ADE20K", "COCO") if s in sources]
    cv = {"2D": sum(two_d) / len(two_d) if two_d else None, "3D": sources.get("Omni3D")}
    cv["Overall"] = (cv["2D"] + cv["3D"]) / 2 if None not in cv.values() else None
    return {
        "n": len(rows),
        "accuracy": accuracy(rows),
        "unparsed": sum(r["prediction"] is None for r in rows),
        "tasks": by("task"),
        "sources": sources,
        "cvbench": cv,
    }


def run_questions(
    model: OLAVLM,
    tok: ChatTokenizer,
    records: list[dict],
    image_root: str | Path,
    batch_size: int = 8,
    max_new_tokens: int = 128,
) -> list[dict]:
    """Greedy answers to question + MC_SUFFIX (docs/design.md §10), batched, scored per sample."""
    rows = []
    for i in tqdm(range(0, len(records), batch_size), desc="answering", dynamic_ncols=True):
        chunk = records[i : i + batch_size]
        images = [
            image_pixels(Path(image_root) / r.get("filename", r.get("image")), model.vision)[1] for r in chunk
        ]
        outputs = answer(model, tok, [r["prompt"] + shapes.MC_SUFFIX for r in chunk], images, max_new_tokens)
        rows += score(chunk, outputs)
    return rows


def report(rows: list[dict], out: Path, **info) -> dict:
    """Print the accuracies and write them with every per-sample prediction to `out` (JSON)."""
    m = metrics(rows)
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}"
    print(f"accuracy {fmt(m['accuracy'])}% over {m['n']} questions ({m['unparsed']} unparseable answers)")
    for group in ("tasks", "sources", "cvbench"):
        print(f"  {group:<8} " + "  ".join(f"{k} {fmt(v)}" for k, v in m[group].items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**info, "metrics": m, "samples": rows}, indent=1))
    print(f"wrote {out}")
    return m


# ----------------------------------------------------------------------------- 4. chat
def chat(
    model: OLAVLM,
    tok: ChatTokenizer,
    prompt: str,
    image: str | Path | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    stream=sys.stdout,
) -> str:
    """Answer one prompt about one image (or none), printing the answer while it is generated."""
    ids, shown = [], ""

    def streamer(next_id: torch.Tensor) -> None:  # LLM.generate calls it with each new id (B=1,)
        nonlocal shown
        if int(next_id[0]) in tok.eos_ids:  # generation stops after it
            return
        ids.append(int(next_id[0]))
        text = tok.decode(ids).strip()  # as `answer` returns it
        if not text.endswith("\ufffd"):  # else half of a multi-byte character: wait for the rest
            stream.write(text[len(shown) :])
            stream.flush()
            shown = text

    images = [image_pixels(image, model.vision)[1]] if image else None
    text = answer(model, tok, [prompt], images, max_new_tokens, temperature, streamer)[0]
    stream.write("\n")
    return text


# ----------------------------------------------------------------------------- 5. pictures
@torch.no_grad()
def predicted_features(
    model: OLAVLM,
    tok: ChatTokenizer,
    teachers: TargetEncoders,
    image: str | Path,
    prompt: str = shapes.PT_PROMPTS[0],
) -> tuple[Image.Image, dict]:
    """PT predictors' outputs at every supervised layer and the teachers' targets for one image
    (PT's center-crop view) -> (square image, {(task, layer): (pred (N, C), target (N, C))})."""
    if model.predictors is None:
        raise ValueError(
            "this checkpoint has no embedding predictors: pass a PT checkpoint (e.g. runs/tiny/pt/final)"
        )
    square, pixels = image_pixels(image, model.vision, view="crop")
    device = model.projector[0].weight.device
    targets = teachers({t: x[None].to(device) for t, x in teachers.preprocess(square).items()})
    ids = torch.tensor([prompt_ids(tok, prompt)], device=device)
    out = model(
        ids,
        torch.ones_like(ids, dtype=torch.bool),
        images=pixels[None].to(device),
        has_image=torch.tensor([True], device=device),
        targets=targets,
    )
    return square, {
        (t, layer): (p[0].float(), targets[t][0].float()) for (t, layer), p in out.predictions.items()
    }


def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, N, C) x (B, N, C) -> (B,) cosine of the whole flattened maps (the probe score, §7)."""
    return F.cosine_similarity(pred.flatten(1).float(), target.flatten(1).float(), dim=1)


def pca_rgb(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) x 2 -> two (h, w, 3) images in [0, 1]: the top-3 principal components of the
    prediction and target tokens, fitted jointly so both use the same colours."""
    x = torch.cat([pred, target])
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # v: (min(2N, C), C)
    y = x @ v[:3].T  # (2N, 3)
    lo, hi = y.quantile(0.01, dim=0), y.quantile(0.99, dim=0)
    y = ((y - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1)
    side = math.isqrt(len(pred))
    return y[: len(pred)].view(side, side, -1), y[len(pred) :].view(side, side, -1)


def show(square: Image.Image, features: dict, path: Path) -> None:
    """One row per spatial task: the input, then per supervised layer the PCA of the prediction
    beside the target's (Fig. 6), titled with their cosine similarity."""
    from matplotlib.figure import Figure

    tasks = [t for t in ("depth", "seg") if any(k[0] == t for k in features)]
    layers = {t: sorted(layer for task, layer in features if task == t) for t in tasks}
    ncols = 1 + 2 * max(map(len, layers.values()))
    fig = Figure(figsize=(2.2 * ncols, 2.4 * len(tasks)))
    axes = fig.subplots(len(tasks), ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, t in zip(axes, tasks):
        row[0].imshow(square)
        row[0].set_title(f"input ({t})", fontsize=9)
        for k, layer in enumerate(layers[t]):
            pred, target = features[(t, layer)]
            cos = cosine(pred[None], target[None]).item()
            for ax, img, name in zip(
                row[1 + 2 * k : 3 + 2 * k], pca_rgb(pred, target), ("predicted", "target")
            ):
                ax.imshow(img.numpy(), interpolation="nearest")
                ax.set_title(
                    f"{t} L{layer} {name}" + (f"\ncos {cos:.2f}" if name == "predicted" else "\n"), fontsize=9
                )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- 6. CLI
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--run", default=str(DEFAULT_RUN), help="train.py output folder for the default --model"
    )
    common.add_argument(
        "--model", help="OLA checkpoint folder (default: <run>/ift/final; show: <run>/pt/final)"
    )
    common.add_argument("--tokenizer", help="tokenizer.json (default: the LLM folder's, or the built-in one)")
    common.add_argument("--out", help="output file (default: next to the checkpoint)")
    for name, what in (("qa", "built-in held-out multiple-choice QA"), ("cvbench", "CV-Bench test.jsonl")):
        s = sub.add_parser(name, parents=[common], help=what)
        s.add_argument(
            "--data", required=name == "cvbench", help="questions .jsonl (qa: the built-in qa_val)"
        )
        s.add_argument("--images", required=name == "cvbench", help="folder the image paths are relative to")
        s.add_argument("--limit", type=int, help="only the first N questions")
        s.add_argument("--batch-size", type=int, default=16)
        s.add_argument("--max-new-tokens", type=int, default=128)
    s = sub.add_parser("chat", parents=[common], help="answer one prompt, streaming")
    s.add_argument("--image", help="image file (omit for a text-only prompt)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0)
    s = sub.add_parser("show", parents=[common], help="PCA pictures of the PT predictors' depth/seg features")
    s.add_argument("--image", required=True)
    s.add_argument("--prompt", default=shapes.PT_PROMPTS[0])
    add_teacher_args(s)  # default: train.py's tiny random teachers
    s.add_argument("--seed", type=int, default=0, help="the tiny teachers' seed (train.py --seed)")
    args = p.parse_args(argv)
    args.model = Path(args.model or Path(args.run) / ("pt" if args.command == "show" else "ift") / "final")
    if args.command == "qa" and args.data and not args.images:
        p.error("qa --data needs --images (the folder its image paths are relative to)")
    if args.command == "show":
        args.teachers = teacher_paths(args, p.error)
    default_out = {"qa": "qa_results.json", "cvbench": "cvbench_results.json", "show": "predictions.png"}
    if args.command in default_out:
        args.out = Path(args.out or args.model.parent / default_out[args.command])
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device, dtype = device_and_dtype()
    model, tok = load_model(
        args.model, args.tokenizer, with_predictors=args.command == "show", device=device, dtype=dtype
    )
    if args.command in ("qa", "cvbench"):
        if args.command == "qa" and not args.data:
            builtin = shapes.builtin_dataset(BUILTIN)
            args.data, args.images = builtin["qa_val"], args.images or builtin["images"]
        records = read_questions(args.data)[: args.limit]
        rows = run_questions(model, tok, records, args.images, args.batch_size, args.max_new_tokens)
        report(rows, args.out, model=str(args.model), data=str(args.data))
    elif args.command == "chat":
        chat(model, tok, args.prompt, args.image, args.max_new_tokens, args.temperature)
    else:
        teachers = make_teachers(args.teachers, model.cfg.tasks, model.vision.grid, args.seed, dtype).to(
            device
        )
        square, features = predicted_features(model, tok, teachers, args.image, args.prompt)
        show(square, features, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
