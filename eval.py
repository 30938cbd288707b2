r"""Evaluate a trained OLA-VLM on the benchmarks of Tab. 1 (Sec. 5.1; docs/design.md §10) — CV-Bench, MMStar,
RealWorldQA, OK-VQA — and on the built-in held-out QA; chat with it; picture its PT predictors (Fig. 6).

    python eval.py qa                                  # built-in held-out QA, the tiny run's IFT model
    python eval.py cvbench --model runs/llama3-8b/ift/final --data CV-Bench      # test.jsonl or test_2d/3d
    python eval.py mmstar --model ... --data MMStar    # a .jsonl / .parquet file or an HF dataset folder
    python eval.py report runs/*/eval --paper          # one markdown table in Tab. 1's column order
    python eval.py chat --image photo.jpg --prompt "What is in the image?"
    python eval.py show --image photo.jpg              # PCA of predicted vs target depth/seg features

Each benchmark run writes <out>/predictions.jsonl (one line per question: output, parsed prediction,
score) and <out>/summary.json (the metrics), by default in <checkpoint's run>/eval/<benchmark>/.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

import miniature
import shapes
from benchmarks import BENCHMARKS, Benchmark, open_image, report_table
from cli import positive_int, user_errors
from inference import DEFAULT_RUN, answer, chat, image_inputs, image_pixels, load_model, prompt_ids
from losses import cosine
from ola import OLAVLM
from precision import PRECISIONS, device_and_dtype
from preprocess import square_view
from scoring import normalize_answer, parse_choice, vqa_accuracy
from tasks import add_teacher_args, make_teachers, teacher_paths
from teachers import TargetEncoders
from tokenizer import ChatTokenizer
from weights import last_complete

__all__ = ["BENCHMARKS", "normalize_answer", "parse_choice", "run_benchmark", "vqa_accuracy"]


# ----------------------------------------------------------------------------- benchmarks
def run_benchmark(
    model: OLAVLM,
    tok: ChatTokenizer,
    benchmark: Benchmark,
    rows: list[dict],
    batch_size: int = 8,
    max_new_tokens: int | None = None,
) -> list[dict]:
    """Greedy answers to every row's prompt in batches (left-padded), each scored on its own output only:
    nothing carries over between questions. -> one record per question"""
    max_new_tokens = max_new_tokens or benchmark.max_new_tokens
    records = []
    bar = tqdm(total=len(rows), desc=benchmark.name, dynamic_ncols=True)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        # the inference view: the image padded to a square (docs/design.md §2)
        squares = [square_view(open_image(row), "pad") for row in chunk]
        images, fed = image_inputs(model, squares)
        outputs = answer(
            model, tok, [row["prompt"] for row in chunk], images, max_new_tokens, teacher_images=fed
        )
        records += [benchmark.score(row, output) for row, output in zip(chunk, outputs, strict=True)]
        bar.update(len(chunk))
    bar.close()
    return records


def write_results(out: Path, records: list[dict], summary: dict, info: dict) -> None:
    """<out>/predictions.jsonl and <out>/summary.json, as a pair (docs/design.md §12, Faults): both are
    written to hidden temporary names first, so a failed write (a full disk) leaves the previous pair as it
    was and names the file; then the old summary goes, the new predictions and the new summary are renamed
    in, so a reader never sees a summary beside predictions that are not its own."""
    files = {
        out / "predictions.jsonl": "".join(json.dumps(record, default=str) + "\n" for record in records),
        out / "summary.json": json.dumps({**info, "metrics": summary}, indent=1),
    }
    temporary = {path: path.with_name(f".{path.name}.tmp") for path in files}
    out.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        try:
            temporary[path].write_text(text)
        except OSError as e:
            for tmp in temporary.values():
                tmp.unlink(missing_ok=True)
            reason = getattr(e, "strerror", None) or e
            raise OSError(f"could not write {path}: {reason}; nothing there was replaced") from None
    (out / "summary.json").unlink(missing_ok=True)
    for path, tmp in temporary.items():  # predictions first: the summary arrives last
        tmp.replace(path)


def print_summary(name: str, summary: dict) -> None:
    def percent(value) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}"

    print(f"{name}: accuracy {percent(summary.get('accuracy'))}% over {summary.get('n')} questions")
    for key in ("tasks", "sources", "category"):
        if summary.get(key):
            print(f"  {key:<10} " + "  ".join(f"{k} {percent(v)}" for k, v in summary[key].items()))
    if summary.get("2D") is not None:
        cvbench = f"2D {percent(summary['2D'])}  3D {percent(summary['3D'])}"
        print(f"  cvbench    {cvbench}  overall {percent(summary['overall'])}")


def collect_summaries(folders: list[str]) -> dict[str, dict[str, dict]]:
    """Every summary.json under `folders` -> {model: {benchmark: metrics}} for report_table."""
    summaries: dict[str, dict[str, dict]] = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("summary.json")):
            try:
                result = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a readable summary.json ({e}); rerun its benchmark") from None
            if not isinstance(result, dict) or "benchmark" not in result:
                continue  # another tool's summary
            missing = [f"'{key}'" for key in ("model", "metrics") if key not in result]
            if missing:
                raise ValueError(f"{path}: a benchmark summary without {' and '.join(missing)}")
            summaries.setdefault(result["model"], {})[result["benchmark"]] = result["metrics"]
    if not summaries:
        raise FileNotFoundError(f"no benchmark summary.json under {folders}")
    return summaries


# ----------------------------------------------------------------------------- show (Fig. 6)
# For one image, the predictors' outputs at every supervised layer beside the teachers' targets, as PCA colour
# maps fitted jointly on both (Fig. 6).
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


# ----------------------------------------------------------------------------- CLI
BENCHMARK_HELP = {
    "qa": "the built-in held-out multiple-choice QA",
    "cvbench": "CV-Bench: a root with test.jsonl, or test_2d.jsonl + test_3d.jsonl",
    "mmstar": "MMStar (val): a .jsonl / .parquet file or an HF dataset folder",
    "realworldqa": "RealWorldQA (test): a .jsonl / .parquet file or an HF dataset folder",
    "okvqa": "OK-VQA (val2014): a .jsonl / .parquet file or an HF dataset folder",
}


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
    common.add_argument("--out", help="output folder / file (default: next to the checkpoint)")
    common.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default="auto",
        help="the model's weights (auto: bf16 on a GPU, else fp32)",
    )
    for name, what in BENCHMARK_HELP.items():
        s = sub.add_parser(name, parents=[common], help=what)
        s.add_argument("--data", required=name != "qa", help="the benchmark's file or folder")
        s.add_argument("--images", help="folder image paths are relative to (default: the data's folder)")
        s.add_argument("--limit", type=positive_int, help="only the first N questions")
        s.add_argument("--batch-size", type=positive_int, default=16)
        s.add_argument("--max-new-tokens", type=positive_int, help="default: the benchmark's (128 or 16)")
    s = sub.add_parser("report", help="one markdown table (Tab. 1's columns) of every summary.json found")
    s.add_argument("folders", nargs="+", help="eval folders, e.g. runs/*/eval")
    s.add_argument("--paper", action="store_true", help="add the paper's Tab. 1 rows")
    s = sub.add_parser("chat", parents=[common], help="answer one prompt, streaming")
    s.add_argument("--image", help="image file (omit for a text-only prompt)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=positive_int, default=256)
    s.add_argument("--temperature", type=float, default=0.0)
    s = sub.add_parser("show", parents=[common], help="PCA pictures of the PT predictors' depth/seg features")
    s.add_argument("--image", required=True)
    s.add_argument("--prompt", default=shapes.PT_PROMPTS[0])
    add_teacher_args(s)  # default: the miniature's teachers
    args = p.parse_args(argv)
    if args.command == "report":
        return args
    if args.model is None:  # the stage's final/, or its newest complete checkpoint after a kill
        try:
            args.model = last_complete(Path(args.run) / ("pt" if args.command == "show" else "ift"))
        except FileNotFoundError as e:
            p.error(f"{e}: pass --model or --run")
    args.model = Path(args.model)
    if args.command == "show":
        args.teachers = teacher_paths(args, p.error)
        args.out = Path(args.out or args.model.parent / "predictions.png")
    elif args.command in BENCHMARK_HELP:
        args.out = Path(args.out or args.model.parent.parent / "eval" / args.command)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "report":
        print(report_table(collect_summaries(args.folders), paper=args.paper))
        return
    if args.command in BENCHMARK_HELP:  # the questions first: bad data fails before the model loads
        name = "builtin" if args.command == "qa" else args.command
        if args.command == "qa" and not args.data:
            builtin = miniature.builtin()
            args.data, args.images = builtin["qa_val"], args.images or builtin["images"]
        benchmark = BENCHMARKS[name]
        rows = benchmark.read(args.data, args.images)[: args.limit]
        if not rows:
            raise ValueError(f"{args.data}: no questions, expected at least one {name} record")
    device, dtype = device_and_dtype(args.dtype)
    with_predictors = args.command == "show"
    model, tok = load_model(
        args.model, args.tokenizer, with_predictors=with_predictors, device=device, dtype=dtype
    )
    if args.command in BENCHMARK_HELP:
        records = run_benchmark(model, tok, benchmark, rows, args.batch_size, args.max_new_tokens)
        summary = benchmark.aggregate(records)
        print_summary(name, summary)
        info = {"benchmark": name, "model": str(args.model), "data": str(args.data)}
        write_results(args.out, records, summary, info)
        print(f"wrote {args.out / 'predictions.jsonl'} and {args.out / 'summary.json'}")
    elif args.command == "chat":
        chat(model, tok, args.prompt, args.image, args.max_new_tokens, args.temperature)
    else:
        paths = args.teachers or miniature.teacher_folders(model.cfg.tasks)
        teachers = make_teachers(paths, model.cfg.tasks, model.vision.grid, dtype).to(device)
        square, features = predicted_features(model, tok, teachers, args.image, args.prompt)
        show(square, features, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    with user_errors():  # bad input, a diverged run, a full disk: one line, no traceback
        main()
