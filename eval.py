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
from pathlib import Path

from tqdm import tqdm

import miniature
import shapes
from benchmarks import BENCHMARKS, Benchmark, open_image, report_table
from chat import ChatTokenizer
from checkpoint import last_complete
from cli import user_errors
from inference import (
    DEFAULT_RUN,
    PRECISIONS,
    answer,
    chat,
    device_and_dtype,
    image_inputs,
    load_model,
)
from ola import OLAVLM
from preprocess import square_view
from scoring import normalize_answer, parse_choice, vqa_accuracy
from tasks import add_teacher_args, make_teachers, teacher_paths

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
    """<out>/predictions.jsonl and <out>/summary.json."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record, default=str) + "\n")
    (out / "summary.json").write_text(json.dumps({**info, "metrics": summary}, indent=1))


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
            result = json.loads(path.read_text())
            if "benchmark" not in result:
                continue
            summaries.setdefault(result["model"], {})[result["benchmark"]] = result["metrics"]
    if not summaries:
        raise FileNotFoundError(f"no benchmark summary.json under {folders}")
    return summaries


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
        s.add_argument("--limit", type=int, help="only the first N questions")
        s.add_argument("--batch-size", type=int, default=16)
        s.add_argument("--max-new-tokens", type=int, help="default: the benchmark's (128 or 16)")
    s = sub.add_parser("report", help="one markdown table (Tab. 1's columns) of every summary.json found")
    s.add_argument("folders", nargs="+", help="eval folders, e.g. runs/*/eval")
    s.add_argument("--paper", action="store_true", help="add the paper's Tab. 1 rows")
    s = sub.add_parser("chat", parents=[common], help="answer one prompt, streaming")
    s.add_argument("--image", help="image file (omit for a text-only prompt)")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=256)
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
    device, dtype = device_and_dtype(args.dtype)
    with_predictors = args.command == "show"
    model, tok = load_model(
        args.model, args.tokenizer, with_predictors=with_predictors, device=device, dtype=dtype
    )
    if args.command in BENCHMARK_HELP:
        name = "builtin" if args.command == "qa" else args.command
        if args.command == "qa" and not args.data:
            builtin = miniature.builtin()
            args.data, args.images = builtin["qa_val"], args.images or builtin["images"]
        benchmark = BENCHMARKS[name]
        rows = benchmark.read(args.data, args.images)[: args.limit]
        records = run_benchmark(model, tok, benchmark, rows, args.batch_size, args.max_new_tokens)
        summary = benchmark.aggregate(records)
        print_summary(name, summary)
        info = {"benchmark": name, "model": str(args.model), "data": str(args.data)}
        write_results(args.out, records, summary, info)
        print(f"wrote {args.out / 'predictions.jsonl'} and {args.out / 'summary.json'}")
    elif args.command == "chat":
        chat(model, tok, args.prompt, args.image, args.max_new_tokens, args.temperature)
    else:
        from pictures import predicted_features, show  # matplotlib only when a picture is asked for

        paths = args.teachers or miniature.teacher_folders(model.cfg.tasks)
        teachers = make_teachers(paths, model.cfg.tasks, model.vision.grid, dtype).to(device)
        square, features = predicted_features(model, tok, teachers, args.image, args.prompt)
        show(square, features, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    with user_errors():  # bad input, a diverged run, a full disk: one line, no traceback
        main()
