"""The four benchmarks of Tab. 1 (Sec. 5.1) — CV-Bench, MMStar, RealWorldQA, OK-VQA — and the built-in
held-out QA as ONE table: how to read each, which prompt to send, how long to answer, how to score and
aggregate; then the markdown report in Tab. 1's column order.

    bench = BENCHMARKS["mmstar"]
    rows = bench.read("MMStar")                    # a .jsonl or .parquet file, or an HF dataset folder
    outputs = [generate(r["prompt"], open_image(r), bench.max_new_tokens) for r in rows]   # greedy
    summary = bench.aggregate([bench.score(r, o) for r, o in zip(rows, outputs)])
    print(report_table({"ours": {"mmstar": summary}}, paper=True))

Rows are dicts {"id", "where" ("file:line", for messages), "prompt" (the text to send, suffix included),
"image", + what the scorer needs}. "image" is a `pathlib.Path` (a file, checked to exist when read) or
`bytes` (the encoded image file a parquet/JSONL embeds); `open_image(row)` opens either as RGB on demand
(preprocess.read_image, the one guard), so reading 5k questions opens no image. Summaries hold fractions
in [0, 1] (None for an empty group); only the report shows percentages. No model code (pyarrow for parquet
only): the answers come from eval.py.
"""

from __future__ import annotations

import base64
import io
import os
import re
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from preprocess import IMAGE_FORMATS, read_image
from scoring import normalize_answer, parse_choice, plain_text, vqa_accuracy
from weights import read_jsonl


# ----------------------------------------------------------------------------- 2. files, rows, images
class MissingPackage(ImportError, ValueError):
    """An optional package that reading some input needs; a ValueError too, so the command line ends in
    one line naming the file (cli.user_errors)."""


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """("file:line", record) for each non-blank line."""
    for n, record in read_jsonl(path):
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got a {type(record).__name__}")
        yield f"{path}:{n}", record


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    """("file: row n", record) for each row; images come as HF stores them, {"bytes": ..., "path": ...}."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingPackage(f"{path}: reading .parquet files needs pyarrow: pip install pyarrow") from None
    records = (r for batch in pq.ParquetFile(path).iter_batches(batch_size=256) for r in batch.to_pylist())
    for n, record in enumerate(records, 1):
        yield f"{path}: row {n}", record


def _files(path: Path) -> list[Path]:
    """A .jsonl or .parquet file, or the data files of a folder (an HF dataset export, possibly under
    data/; hidden folders skipped): all its *.parquet if it has any, else all its *.jsonl, sorted."""
    if path.is_dir():
        for ext in ("parquet", "jsonl"):
            found = [
                f
                for f in path.rglob(f"*.{ext}")
                if not any(p.startswith(".") for p in f.relative_to(path).parts)
            ]
            if found:
                return sorted(found)
        raise FileNotFoundError(f"{path}: no *.parquet or *.jsonl file in this folder")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{path}: expected a .jsonl or .parquet file, or a folder of them")
    return [path]


def _records(path: str | os.PathLike) -> Iterator[tuple[str, Path, dict]]:
    """(where, folder of its file, record) for every record behind `path` (see `_files`)."""
    for file in _files(Path(path)):
        read = _read_parquet if file.suffix == ".parquet" else _read_jsonl
        for where, record in read(file):
            yield where, file.parent, record


def _require(where: str, record: dict, fields: tuple[str, ...]) -> None:
    missing = [f"'{f}'" for f in fields if record.get(f) is None]
    if missing:
        raise ValueError(f"{where}: missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")


def _letter(where: str, value: object, example: str) -> str:
    """An answer key "(A)" or "A" -> "A"."""
    match = re.fullmatch(r"\(?([A-Z])\)?", str(value).strip())
    if match is None:
        raise ValueError(
            f"{where}: field 'answer' should be an option letter like {example!r}, got {value!r}"
        )
    return match.group(1)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # e.g. a base64 string far longer than a file name may be
        return False


def _base64_image(text: str) -> bytes | None:
    """The image file encoded in base64 `text`, or None when it is not one."""
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except ValueError:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS):
            return data
    except Image.DecompressionBombError:  # an image all the same: open_image refuses it, naming the row
        return data
    except OSError:
        return None


def _image(where: str, value: object, folder: Path) -> Path | bytes:
    """A row's image: embedded bytes ({"bytes": ...} as HF parquet stores images, raw bytes, base64 text
    or a data: URI), else an existing file, absolute or relative to `folder`."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: field 'image' should be a file path or image bytes, got {value!r:.60}")
    if value.startswith("data:image/"):
        value = value.partition(",")[2]
    file = folder / value
    if _is_file(file):
        return file
    data = _base64_image(value)
    if data is None:
        raise ValueError(
            f"{where}: image {value!r:.80} is neither a file (looked in {folder}) nor base64 image bytes"
        )
    return data


def open_image(row: dict) -> Image.Image:
    """The row's image as RGB, read now; an unreadable or refused one (preprocess.read_image: format,
    shape, decompression bomb) is a ValueError naming the row."""
    image = row["image"]
    source, name = (
        (io.BytesIO(image), f"of {len(image)} bytes") if isinstance(image, bytes) else (image, None)
    )
    try:
        return read_image(source, name)
    except ValueError as e:
        raise ValueError(f"{row['where']}: {e}") from None


def _unique(rows: list[dict]) -> list[dict]:
    """`rows`, after checking that no two share an id (records are matched to questions by id)."""
    seen = {}
    for r in rows:
        if r["id"] in seen:
            raise ValueError(f"{r['where']}: id {r['id']!r} already used at {seen[r['id']]}")
        seen[r["id"]] = r["where"]
    return rows


def _mean(records: list[dict], key: str) -> float | None:
    return sum(r[key] for r in records) / len(records) if records else None


def _by(records: list[dict], field: str, key: str = "correct") -> dict[str, float]:
    """{group: mean of `key`} over the groups of `field`, sorted by name."""
    groups = sorted({str(r[field]) for r in records})
    return {g: _mean([r for r in records if str(r[field]) == g], key) for g in groups}


def _score_choice(row: dict, output: str, groups: tuple[str, ...]) -> dict:
    """A multiple-choice record: the parsed letter is right iff it is the key; `groups` are copied."""
    prediction = parse_choice(output)
    record = {"id": row["id"], "output": output, "prediction": prediction, "answer": row["answer"]}
    return {**record, "correct": prediction == row["answer"], **{g: row[g] for g in groups}}


def _unparsed(records: list[dict]) -> int:
    return sum(r["prediction"] is None for r in records)


# ------------------------------------------------------------------------- 3. CV-Bench (and the built-in QA)
CVBENCH_SUFFIX = (
    "\nOnly answer the option as the output. For example, if your answer is the option A, answer (A)."
)
CVBENCH_LAYOUTS = (("test.jsonl",), ("test_2d.jsonl", "test_3d.jsonl"))  # older revisions; current main


def _cvbench_files(root: Path) -> list[Path]:
    for names in CVBENCH_LAYOUTS:
        if all((root / n).is_file() for n in names):
            return [root / n for n in names]
    raise FileNotFoundError(
        f"{root}: not a CV-Bench root (expected test.jsonl, or test_2d.jsonl and test_3d.jsonl)"
    )


def _cvbench_row(where: str, record: dict, folder: Path) -> dict:
    """CV-Bench's fields (idx, filename, prompt, answer "(X)", task, source, type), or the built-in QA's
    (id and image instead of idx and filename)."""
    id_key = "id" if "id" in record else "idx"
    image_key = "image" if "image" in record else "filename"
    _require(where, record, (id_key, image_key, "prompt", "answer", "task", "source"))
    return {
        "id": record[id_key],
        "where": where,
        "prompt": record["prompt"] + CVBENCH_SUFFIX,
        "image": _image(where, record[image_key], folder),
        "answer": _letter(where, record["answer"], "(A)"),
        "task": record["task"],
        "source": record["source"],
        "type": record.get("type"),
    }


def read_cvbench(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[dict]:
    """CV-Bench from its root folder — test.jsonl, or test_2d.jsonl + test_3d.jsonl: the same rows, sorted
    by idx — or one .jsonl in its layout. Image paths are relative to `image_root` (default: the file's
    folder, i.e. the root)."""
    path = Path(path)
    files = _cvbench_files(path) if path.is_dir() else [path]
    rows = []
    for file in files:
        folder = Path(image_root or file.parent)
        rows += [_cvbench_row(where, record, folder) for where, record in _read_jsonl(file)]
    if path.is_dir():
        rows.sort(key=lambda r: r["id"])
    return _unique(rows)


def read_builtin(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[dict]:
    """The built-in held-out QA (shapes.builtin_dataset's qa_val.jsonl, CV-Bench's layout with tasks Count,
    Relation, Size and source "builtin"); its images are in `image_root` (default: images/ beside it)."""
    path = Path(path)
    return read_cvbench(path, image_root or path.parent / "images")


def score_cvbench(row: dict, output: str) -> dict:
    return _score_choice(row, output, ("task", "source", "type"))


def aggregate_cvbench(records: list[dict]) -> dict:
    """Plain accuracy, per task and per source, and CV-Bench's own numbers as the paper computes them:
    2D = mean(acc ADE20K, acc COCO) (of those present), 3D = acc Omni3D, overall = (2D + 3D) / 2; None
    when their sources are absent (the built-in QA)."""
    sources = _by(records, "source")
    two_d = [sources[s] for s in ("ADE20K", "COCO") if s in sources]
    summary = {"n": len(records), "accuracy": _mean(records, "correct"), "unparsed": _unparsed(records)}
    summary |= {"tasks": _by(records, "task"), "sources": sources}
    summary |= {
        "2D": statistics.fmean(two_d) if two_d else None,
        "3D": sources.get("Omni3D"),
        "overall": None,
    }
    if summary["2D"] is not None and summary["3D"] is not None:
        summary["overall"] = (summary["2D"] + summary["3D"]) / 2
    return summary


# ----------------------------------------------------------------------------- 4. MMStar
MMSTAR_SUFFIX = (
    "\nAnswer with the option's letter from the given choices directly, such as answer letter 'A' only. \n"
)


def read_mmstar(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[dict]:
    """MMStar's val split (index, question with its options, image, answer "A".."D", category,
    l2_category): a .jsonl/.parquet file or an HF export folder."""
    rows = []
    for where, folder, record in _records(path):
        _require(where, record, ("index", "question", "image", "answer", "category", "l2_category"))
        rows.append(
            {
                "id": record["index"],
                "where": where,
                "prompt": record["question"] + MMSTAR_SUFFIX,
                "image": _image(where, record["image"], Path(image_root or folder)),
                "answer": _letter(where, record["answer"], "A"),
                "category": record["category"],
                "l2_category": record["l2_category"],
            }
        )
    return _unique(rows)


def score_mmstar(row: dict, output: str) -> dict:
    return _score_choice(row, output, ("category", "l2_category"))


def aggregate_mmstar(records: list[dict]) -> dict:
    """Official scoring: accuracy overall and per category / sub-category (250 questions per category)."""
    return {
        "n": len(records),
        "accuracy": _mean(records, "correct"),
        "unparsed": _unparsed(records),
        "category": _by(records, "category"),
        "l2_category": _by(records, "l2_category"),
    }


# ----------------------------------------------------------------------------- 5. RealWorldQA
def read_realworldqa(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[dict]:
    """RealWorldQA's test split (image, question with its options and answer instruction, answer: a
    letter, or a number/word for open items). No prompt suffix; the id is the position, from 0."""
    rows = []
    for n, (where, folder, record) in enumerate(_records(path)):
        _require(where, record, ("question", "image", "answer"))
        answer = str(record["answer"]).strip()
        if not answer:
            raise ValueError(f"{where}: field 'answer' is empty")
        image = _image(where, record["image"], Path(image_root or folder))
        rows.append({"id": n, "where": where, "prompt": record["question"], "image": image, "answer": answer})
    return rows


def score_realworldqa(row: dict, output: str) -> dict:
    """Letter keys: the parsed letter must match. Open keys: lmms-eval's exact match, ignoring case and
    punctuation, after number words -> digits."""
    if re.fullmatch(r"[A-Z]", row["answer"]):
        kind = "choice"
        prediction = parse_choice(output)
        correct = prediction == row["answer"]
    else:
        kind = "open"
        prediction = plain_text(output)
        correct = prediction == plain_text(row["answer"])
    record = {"id": row["id"], "output": output, "prediction": prediction, "answer": row["answer"]}
    return {**record, "correct": correct, "kind": kind}


def aggregate_realworldqa(records: list[dict]) -> dict:
    """Accuracy overall and per kind of key ("choice" / "open"); unparsed counts letter items only."""
    choice = [r for r in records if r["kind"] == "choice"]
    return {
        "n": len(records),
        "accuracy": _mean(records, "correct"),
        "unparsed": _unparsed(choice),
        "kind": _by(records, "kind"),
    }


# ----------------------------------------------------------------------------- 6. OK-VQA
OKVQA_SUFFIX = (
    "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
    "\nAnswer the question using a single word or phrase."
)


def _answers(where: str, value: object) -> list[str]:
    """The human answers: strings, or VQA-style {"answer": ...} dicts."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field 'answers' should be a non-empty list, got {value!r:.60}")
    return [str(a["answer"]) if isinstance(a, dict) else str(a) for a in value]


def read_okvqa(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[dict]:
    """OK-VQA's val2014 split (question_id, question, answers: 10 human answers, image)."""
    rows = []
    for where, folder, record in _records(path):
        _require(where, record, ("question_id", "question", "answers", "image"))
        rows.append(
            {
                "id": record["question_id"],
                "where": where,
                "prompt": record["question"] + OKVQA_SUFFIX,
                "image": _image(where, record["image"], Path(image_root or folder)),
                "answers": _answers(where, record["answers"]),
            }
        )
    return _unique(rows)


def score_okvqa(row: dict, output: str) -> dict:
    prediction = normalize_answer(output)
    accuracy = vqa_accuracy(output, row["answers"])
    return {
        "id": row["id"],
        "output": output,
        "prediction": prediction,
        "answers": row["answers"],
        "accuracy": accuracy,
    }


def aggregate_okvqa(records: list[dict]) -> dict:
    """The mean VQA accuracy over questions."""
    return {"n": len(records), "accuracy": _mean(records, "accuracy")}


# ----------------------------------------------------------------------------- 7. the table
@dataclass(frozen=True)
class Benchmark:
    """One benchmark: read(path, image_root=None) -> rows; greedy answers of at most `max_new_tokens`;
    score(row, output) -> per-question record; aggregate(records) -> summary (fractions)."""

    name: str
    read: Callable[..., list[dict]]
    max_new_tokens: int
    score: Callable[[dict, str], dict]
    aggregate: Callable[[list[dict]], dict]


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("cvbench", read_cvbench, 128, score_cvbench, aggregate_cvbench),
        Benchmark("mmstar", read_mmstar, 128, score_mmstar, aggregate_mmstar),
        Benchmark("realworldqa", read_realworldqa, 16, score_realworldqa, aggregate_realworldqa),
        Benchmark("okvqa", read_okvqa, 16, score_okvqa, aggregate_okvqa),
        Benchmark("builtin", read_builtin, 128, score_cvbench, aggregate_cvbench),
    )
}


# ----------------------------------------------------------------------------- 8. the report
# Tab. 1's columns: (header, benchmark, CV-Bench task or None for the benchmark's accuracy).
TAB1_COLUMNS = (
    ("Count", "cvbench", "Count"),
    ("Depth", "cvbench", "Depth"),
    ("Relation", "cvbench", "Relation"),
    ("Distance", "cvbench", "Distance"),
    ("MMStar", "mmstar", None),
    ("RWQA", "realworldqa", None),
    ("OK-VQA", "okvqa", None),
)
# Tab. 1, Llama3-8b with CLIP-ViT-L, as published (Count .. OK-VQA, Avg). The OLA-VLM Avg is the mean of
# its seven cells; LLaVA-1.5's printed 55.1 is not (that mean is 55.8).
PAPER_ROWS = {
    "LLaVA-1.5 (paper, Tab. 1)": (50.4, 73.3, 64.9, 48.7, 38.8, 57.8, 56.9, 55.1),
    "OLA-VLM (paper, Tab. 1)": (51.3, 74.2, 69.4, 54.3, 39.5, 57.9, 56.6, 57.6),
}


def _cell(summaries: dict[str, dict], benchmark: str, task: str | None) -> float | None:
    """One cell in percent, or None when the summary (or the task) is missing."""
    summary = summaries.get(benchmark)
    if summary is None:
        return None
    value = summary.get("tasks", {}).get(task) if task else summary.get("accuracy")
    return None if value is None else 100 * value


def _line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def report_table(summaries: dict[str, dict[str, dict]], paper: bool = False) -> str:
    """{model label: {benchmark name: summary}} -> one markdown table in Tab. 1's column order, percentages
    with one decimal, "–" for a missing cell; Avg = mean of the cells present (Tab. 1 averages all seven).
    `paper` appends the paper's two rows."""
    lines = [
        _line(["Model", *(c[0] for c in TAB1_COLUMNS), "Avg"]),
        "|:---|" + "---:|" * (len(TAB1_COLUMNS) + 1),
    ]
    for label, by_name in summaries.items():
        cells = [_cell(by_name, benchmark, task) for _, benchmark, task in TAB1_COLUMNS]
        present = [c for c in cells if c is not None]
        average = statistics.fmean(present) if present else None
        lines.append(_line([label, *map(_percent, cells), _percent(average)]))
    if paper:
        lines += [_line([label, *map(_percent, values)]) for label, values in PAPER_ROWS.items()]
    return "\n".join(lines)
