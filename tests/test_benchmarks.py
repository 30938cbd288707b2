"""benchmarks.py (Tab. 1, Sec. 5.1): each benchmark read from its published layouts (JSONL, parquet, HF
folders; image files, embedded bytes, base64) and scored with fake outputs, the errors that name file and
line, and the Tab. 1 report; plus the scoring.py rules they share (choice parser, EvalAI normalisation,
VQA accuracy). Every expected number is worked out by hand here."""

import base64
import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from benchmarks import BENCHMARKS, open_image, report_table
from scoring import normalize_answer, parse_choice, vqa_accuracy


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (4, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(name: str, path: Path, outputs: list[str], **kwargs) -> tuple[list[dict], list[dict], dict]:
    bench = BENCHMARKS[name]
    rows = bench.read(path, **kwargs)
    records = [bench.score(r, o) for r, o in zip(rows, outputs, strict=True)]
    return rows, records, bench.aggregate(records)


# ----------------------------------------------------------------------------- parsing and normalising
@pytest.mark.parametrize(
    "text, expected",
    [
        ("(B)", "B"),
        ("B", "B"),
        ("B.", "B"),
        ("Answer: B", "B"),
        ("The answer is (C).", "C"),
        ("option c", "C"),
        ("b)", "B"),
        ("A", "A"),
        ("A.", "A"),
        ("A)", "A"),
        ("  D.", "D"),
        ("**C**", "C"),
        ("(A) left", "A"),
        ("B. The red one", "B"),
        ("B) because it is closer", "B"),
        ("The answer is A", "A"),
        ("The correct option is D.", "D"),
        ("I think it is blue", None),
        ("A cat", None),
        ("A circle on the left.", None),
        ("the answer is a cat", None),
        ("Answer: B because", None),
        ("U.S. flag", None),
        ("two cat(s)", None),
        ("Apple", None),
        ("", None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


@pytest.mark.parametrize(
    "a, b",
    [
        ("the cat", "cat"),
        ("yes!", "yes"),
        ("two", "2"),
        ("dont", "don't"),
        ("dog.", "dog"),
        ("An Apple\n", "apple"),
    ],
)
def test_normalize_answer_equates(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2.5", "2.5"),  # the decimal point stays
        ("dog.", "dog"),
        ("The two dogs", "2 dogs"),
        ("t-shirt", "t shirt"),  # a mark inside a word becomes a space
        ("hello, world", "hello world"),  # ... and is deleted next to a space
        ("1,000", "1000"),
        ("Isnt\tit", "isn't it"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(k, expected):
    # k matches: k leave-one-outs see k-1 matches, the other 10-k see k; acc = mean of min(1, matches/3)
    answers = ["two"] * k + ["three"] * (10 - k)
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    assert vqa_accuracy("The Dog.", ["dog"] * 10) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one"):
        vqa_accuracy("dog", [])


# ----------------------------------------------------------------------------- CV-Bench
CVBENCH = [  # (idx, type, task, source, answer, fake output, right?)
    (0, "2D", "Count", "ADE20K", "(A)", "(A)", True),
    (1, "2D", "Count", "ADE20K", "(B)", "I think it is blue", False),
    (2, "2D", "Relation", "COCO", "(B)", "B", True),
    (3, "2D", "Relation", "COCO", "(A)", "Answer: A", True),
    (4, "3D", "Depth", "Omni3D", "(A)", "(A) the chair", True),
    (5, "3D", "Distance", "Omni3D", "(B)", "(C)", False),
]


def cvbench_record(idx, type_, task, source, answer):
    filename = f"img/{type_}/{task.lower()}/{source.lower()}_{idx}.png"
    prompt = f"Question {idx}? Select from the following choices.\n(A) one\n(B) two\n(C) three"
    return {
        "idx": idx,
        "type": type_,
        "task": task,
        "image": None,
        "question": f"Question {idx}?",
        "choices": ["one", "two", "three"],
        "answer": answer,
        "prompt": prompt,
        "filename": filename,
        "source": source,
        "source_dataset": source,
    }


def cvbench_root(root: Path, split: bool) -> Path:
    records = [cvbench_record(*spec[:5]) for spec in CVBENCH]
    for r in records:
        r.pop("image")
        write_png(root / r["filename"], (10 * r["idx"], 0, 0))
    if split:  # the current main branch: one file per type, here in reverse order
        write_jsonl(root / "test_2d.jsonl", [r for r in records if r["type"] == "2D"][::-1])
        write_jsonl(root / "test_3d.jsonl", [r for r in records if r["type"] == "3D"][::-1])
    else:
        write_jsonl(root / "test.jsonl", records)
    return root


def test_cvbench_both_layouts_read_and_score_the_same(tmp_path):
    outputs = [spec[5] for spec in CVBENCH]
    old = run("cvbench", cvbench_root(tmp_path / "old", split=False), outputs)
    new = run("cvbench", cvbench_root(tmp_path / "new", split=True), outputs)
    for (rows, records, _), root in ((old, tmp_path / "old"), (new, tmp_path / "new")):
        assert [r["id"] for r in rows] == [0, 1, 2, 3, 4, 5]
        assert rows[4]["image"] == root / "img/3D/depth/omni3d_4.png"
        assert rows[0]["prompt"] == (
            "Question 0? Select from the following choices.\n(A) one\n(B) two\n(C) three\n"
            "Only answer the option as the output. For example, if your answer is the option A, answer (A)."
        )
        assert [r["correct"] for r in records] == [spec[6] for spec in CVBENCH]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("where", "image")} for r in rows]
    assert strip(old[0]) == strip(new[0])
    assert old[1] == new[1]
    assert old[2] == new[2]
    summary = old[2]
    assert summary["tasks"] == {"Count": 0.5, "Depth": 1.0, "Distance": 0.0, "Relation": 1.0}
    assert summary["sources"] == {"ADE20K": 0.5, "COCO": 1.0, "Omni3D": 0.5}
    assert summary["2D"] == pytest.approx((0.5 + 1.0) / 2)
    assert summary["3D"] == pytest.approx(0.5)
    assert summary["overall"] == pytest.approx((0.75 + 0.5) / 2)
    assert summary["accuracy"] == pytest.approx(4 / 6)
    assert summary["n"] == 6
    assert summary["unparsed"] == 1
    assert BENCHMARKS["cvbench"].max_new_tokens == 128


def test_unparseable_answer_is_wrong_and_nothing_carries_over(tmp_path):
    rows = BENCHMARKS["cvbench"].read(cvbench_root(tmp_path, split=False))
    score = BENCHMARKS["cvbench"].score
    first = score(rows[0], "(A)")
    second = score(rows[4], "I think it is blue")  # same key "(A)" as rows[0]
    assert (first["prediction"], first["correct"]) == ("A", True)
    assert (second["prediction"], second["correct"]) == (None, False)
    assert second["output"] == "I think it is blue"


def test_cvbench_root_errors(tmp_path):
    write_jsonl(tmp_path / "test_2d.jsonl", [])
    with pytest.raises(FileNotFoundError, match="test.jsonl, or test_2d.jsonl and test_3d.jsonl"):
        BENCHMARKS["cvbench"].read(tmp_path)
    record = cvbench_record(*CVBENCH[0][:5])
    record.pop("image")
    write_png(tmp_path / record["filename"], (0, 0, 0))
    write_jsonl(tmp_path / "test.jsonl", [record, {**record, "answer": "one"}])
    with pytest.raises(
        ValueError, match=r"test.jsonl:2: field 'answer' should be an option letter like '\(A\)'"
    ):
        BENCHMARKS["cvbench"].read(tmp_path)
    write_jsonl(tmp_path / "test.jsonl", [record, {**record, "filename": "img/missing.png", "idx": 1}])
    with pytest.raises(ValueError, match=r"test.jsonl:2: image 'img/missing.png' is neither a file"):
        BENCHMARKS["cvbench"].read(tmp_path)
    write_jsonl(tmp_path / "test.jsonl", [record, record])
    with pytest.raises(ValueError, match=r"test.jsonl:2: id 0 already used at .*test.jsonl:1"):
        BENCHMARKS["cvbench"].read(tmp_path)


def test_builtin_qa_uses_the_cvbench_layout(tmp_path):
    # data.builtin_dataset's qa_val.jsonl: id and image instead of idx and filename; images/ beside it
    specs = [
        ("val_00000", "Count", "(A)", "A"),
        ("val_00001", "Relation", "(B)", "(A)"),
        ("val_00002", "Size", "(B)", "B."),
    ]
    records = []
    for rid, task, answer, _ in specs:
        write_png(tmp_path / "images" / f"{rid}.png", (0, 0, 255))
        prompt = "Which object is bigger? Select from the following choices.\n(A) the circle\n(B) the square"
        records.append(
            {
                "id": rid,
                "image": f"{rid}.png",
                "task": task,
                "type": "2D",
                "source": "builtin",
                "prompt": prompt,
                "answer": answer,
            }
        )
    rows, records, summary = run(
        "builtin", write_jsonl(tmp_path / "qa_val.jsonl", records), [s[3] for s in specs]
    )
    assert [r["id"] for r in rows] == ["val_00000", "val_00001", "val_00002"]
    assert rows[2]["image"] == tmp_path / "images" / "val_00002.png"
    assert summary["tasks"] == {"Count": 1.0, "Relation": 0.0, "Size": 1.0}
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert (summary["2D"], summary["3D"], summary["overall"]) == (None, None, None)
    other = tmp_path / "elsewhere"
    (tmp_path / "images").rename(other)
    assert BENCHMARKS["builtin"].read(tmp_path / "qa_val.jsonl", other)[0]["image"] == other / "val_00000.png"


# ----------------------------------------------------------------------------- MMStar
def mmstar_records(tmp_path: Path) -> list[dict]:
    """3 MMStar questions in the published layout; images: base64 text, a relative and an absolute path."""
    write_png(tmp_path / "images" / "2.png", (0, 255, 0))
    write_png(tmp_path / "abs" / "3.png", (0, 0, 255))
    images = [
        base64.b64encode(png_bytes((255, 0, 0))).decode(),
        "images/2.png",
        str(tmp_path / "abs" / "3.png"),
    ]
    categories = [
        ("coarse perception", "image scene and topic"),
        ("math", "numeric commonsense and calculation"),
    ]
    return [
        {
            "index": i,
            "question": f"Question {i}?\nOptions: A: one, B: two, C: three, D: four",
            "image": image,
            "answer": answer,
            "category": categories[i > 1][0],
            "l2_category": categories[i > 1][1],
            "meta_info": {"source": "SEEDBench_IMG", "split": "val", "image_path": f"{i}.jpg"},
        }
        for i, image, answer in zip((0, 1, 2), images, ("A", "C", "D"))
    ]


def test_mmstar_jsonl_end_to_end(tmp_path):
    path = write_jsonl(tmp_path / "mmstar.jsonl", mmstar_records(tmp_path))
    rows, records, summary = run("mmstar", path, ["A", "The answer is B", "(D)"])
    assert rows[0]["prompt"] == (
        "Question 0?\nOptions: A: one, B: two, C: three, D: four\n"
        "Answer with the option's letter from the given choices directly, such as answer letter 'A' only. \n"
    )
    assert isinstance(rows[0]["image"], bytes)
    assert rows[1]["image"] == tmp_path / "images" / "2.png"
    assert rows[2]["image"] == tmp_path / "abs" / "3.png"
    assert open_image(rows[0]).getpixel((0, 0)) == (255, 0, 0)
    assert open_image(rows[2]).getpixel((0, 0)) == (0, 0, 255)
    assert [r["prediction"] for r in records] == ["A", "B", "D"]
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["category"] == {"coarse perception": 0.5, "math": 1.0}
    assert BENCHMARKS["mmstar"].max_new_tokens == 128


def test_mmstar_category_aggregation():
    rows = [
        {"id": i, "answer": "A", "category": c, "l2_category": f"{c}/{i % 2}"}
        for i, c in enumerate(["coarse perception"] * 3 + ["math"] * 2)
    ]
    outputs = ["A", "(A)", "B", "C", "blue"]  # coarse: 2 of 3 right; math: 0 of 2
    score = BENCHMARKS["mmstar"].score
    summary = BENCHMARKS["mmstar"].aggregate([score(r, o) for r, o in zip(rows, outputs)])
    assert summary["n"] == 5
    assert summary["accuracy"] == pytest.approx(2 / 5)
    assert summary["category"] == {"coarse perception": pytest.approx(2 / 3), "math": 0.0}
    # l2: coarse/0 = ids 0, 2 (A right, B wrong); coarse/1 = id 1 (right); math/0 = id 4, math/1 = id 3
    assert summary["l2_category"] == {
        "coarse perception/0": 0.5,
        "coarse perception/1": 1.0,
        "math/0": 0.0,
        "math/1": 0.0,
    }
    assert summary["unparsed"] == 1


def test_mmstar_parquet_with_embedded_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    records = mmstar_records(tmp_path)
    for r in records:  # as HF datasets stores an Image feature
        r["image"] = {"bytes": png_bytes((0, 128, 0)), "path": f"{r['index']}.jpg"}
    (tmp_path / "hf" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "hf" / "data" / "val-00000-of-00001.parquet")
    rows, records, summary = run("mmstar", tmp_path / "hf", ["A", "C", "A"])
    assert rows[2]["where"].endswith("val-00000-of-00001.parquet: row 3")
    assert open_image(rows[1]).size == (4, 3)
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["category"] == {"coarse perception": 1.0, "math": 0.0}


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "mmstar.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(
        ImportError, match="mmstar.parquet: reading .parquet files needs pyarrow: pip install pyarrow"
    ):
        BENCHMARKS["mmstar"].read(tmp_path / "mmstar.parquet")


def test_missing_field_names_file_and_line(tmp_path):
    records = mmstar_records(tmp_path)
    del records[2]["answer"]
    path = write_jsonl(tmp_path / "mmstar.jsonl", records)
    with pytest.raises(ValueError, match=r"mmstar.jsonl:3: missing field 'answer'$"):
        BENCHMARKS["mmstar"].read(path)
    good = json.dumps(records[0])
    (tmp_path / "bad.jsonl").write_text(f'{good}\n\n{{"index": \n')  # line 2 blank, line 3 cut short
    with pytest.raises(ValueError, match=r"bad.jsonl:3: malformed JSON line"):
        BENCHMARKS["mmstar"].read(tmp_path / "bad.jsonl")
    (tmp_path / "mmstar.json").write_text("[]")
    with pytest.raises(ValueError, match=r"mmstar.json: expected a .jsonl or .parquet file"):
        BENCHMARKS["mmstar"].read(tmp_path / "mmstar.json")


def test_unreadable_images_name_the_row(tmp_path):
    records = mmstar_records(tmp_path)[:1]
    records[0]["image"] = {"bytes": base64.b64encode(b"not an image").decode()}
    with pytest.raises(
        ValueError, match=r"m.jsonl:1: image 'bm90IGFu.*' is neither a file .* nor base64 image"
    ):
        BENCHMARKS["mmstar"].read(write_jsonl(tmp_path / "m.jsonl", records))
    with pytest.raises(ValueError, match=r"x.parquet: row 2: cannot read image"):
        open_image({"image": b"not an image", "where": "x.parquet: row 2"})


# ----------------------------------------------------------------------------- RealWorldQA
def test_realworldqa_hf_folder_end_to_end(tmp_path):
    instruction = "Please answer directly with only the letter of the correct option and nothing else."
    records = [
        {
            "image": {"bytes": base64.b64encode(png_bytes((9, 9, 9))).decode(), "path": None},
            "answer": "A",
            "question": f"Which way is the car facing?\nA. left\nB. right\n{instruction}",
        },
        {"image": "0.png", "answer": "B", "question": f"Is the light red?\nA. yes\nB. no\n{instruction}"},
        {
            "image": "1.png",
            "answer": "3",
            "question": "How many lanes are there? Please answer directly with a single word or number.",
        },
    ]
    write_png(tmp_path / "data" / "0.png", (1, 1, 1))
    write_png(tmp_path / "data" / "1.png", (2, 2, 2))
    write_jsonl(
        tmp_path / "data" / "test-00000-of-00002.jsonl", records[:2]
    )  # two shards, read in name order
    write_jsonl(tmp_path / "data" / "test-00001-of-00002.jsonl", records[2:])
    rows, records, summary = run("realworldqa", tmp_path, ["(B)", "B", "Three."])
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert rows[1]["prompt"] == f"Is the light red?\nA. yes\nB. no\n{instruction}"  # no suffix
    assert open_image(rows[0]).getpixel((1, 1)) == (9, 9, 9)
    assert rows[2]["image"] == tmp_path / "data" / "1.png"
    assert [(r["kind"], r["prediction"], r["correct"]) for r in records] == [
        ("choice", "B", False),
        ("choice", "B", True),
        ("open", "3", True),
    ]
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["kind"] == {"choice": 0.5, "open": 1.0}
    assert BENCHMARKS["realworldqa"].max_new_tokens == 16


# ----------------------------------------------------------------------------- OK-VQA
def okvqa_records(tmp_path: Path) -> list[dict]:
    write_png(tmp_path / "COCO_val2014_000000000042.jpg", (5, 5, 5))
    image = str(tmp_path / "COCO_val2014_000000000042.jpg")
    return [
        {
            "question_id": 2971475,
            "question": "How many wheels?",
            "answers": ["2"] * 3 + ["4"] * 7,
            "image": image,
        },
        {"question_id": 5723996, "question": "What animal is this?", "answers": ["dog"] * 10, "image": image},
        {"question_id": 1010, "question": "What is the sport?", "answers": ["tennis"] * 10, "image": image},
    ]


def test_okvqa_jsonl_end_to_end(tmp_path):
    path = write_jsonl(tmp_path / "okvqa.jsonl", okvqa_records(tmp_path))
    rows, records, summary = run("okvqa", path, ["Two", "The dog.", "cat"])
    assert rows[0]["prompt"] == (
        "How many wheels?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase."
    )
    assert [r["prediction"] for r in records] == ["2", "dog", "cat"]
    # "2" matches 3 of 10 answers: (3 * 2/3 + 7 * 1) / 10 = 0.9; "dog" all 10: 1.0; "cat" none: 0
    assert [r["accuracy"] for r in records] == pytest.approx([0.9, 1.0, 0.0])
    assert summary["accuracy"] == pytest.approx(1.9 / 3)
    assert summary["n"] == 3
    assert BENCHMARKS["okvqa"].max_new_tokens == 16


# ----------------------------------------------------------------------------- the report
def test_report_table_tab1_columns(tmp_path):
    cv = run("cvbench", cvbench_root(tmp_path / "cv", split=True), [spec[5] for spec in CVBENCH])[2]
    mmstar = run("mmstar", write_jsonl(tmp_path / "mmstar.jsonl", mmstar_records(tmp_path)), ["A", "B", "D"])[
        2
    ]
    rwqa = {"n": 3, "accuracy": 2 / 3}
    okvqa = run("okvqa", write_jsonl(tmp_path / "okvqa.jsonl", okvqa_records(tmp_path)), ["Two", "dog", "x"])[
        2
    ]
    table = report_table({"ours": {"cvbench": cv, "mmstar": mmstar, "realworldqa": rwqa, "okvqa": okvqa}})
    header, rule, row = table.splitlines()
    assert header == "| Model | Count | Depth | Relation | Distance | MMStar | RWQA | OK-VQA | Avg |"
    assert rule == "|:---|---:|---:|---:|---:|---:|---:|---:|---:|"
    # Count 50, Depth 100, Relation 100, Distance 0, MMStar 66.7, RWQA 66.7, OK-VQA 63.3;
    # Avg = (250 + 200/3 + 200/3 + 190/3) / 7 = 1340 / 21 = 63.81
    assert row == "| ours | 50.0 | 100.0 | 100.0 | 0.0 | 66.7 | 66.7 | 63.3 | 63.8 |"


def test_report_table_missing_cells_and_paper_rows():
    table = report_table(
        {"partial": {"mmstar": {"accuracy": 0.4}, "okvqa": {"accuracy": 0.5}}, "empty": {}}, paper=True
    )
    lines = table.splitlines()
    assert lines[2] == "| partial | – | – | – | – | 40.0 | – | 50.0 | 45.0 |"  # Avg over the two present
    assert lines[3] == "| empty | – | – | – | – | – | – | – | – |"
    assert lines[4] == "| LLaVA-1.5 (paper, Tab. 1) | 50.4 | 73.3 | 64.9 | 48.7 | 38.8 | 57.8 | 56.9 | 55.1 |"
    assert lines[5] == "| OLA-VLM (paper, Tab. 1) | 51.3 | 74.2 | 69.4 | 54.3 | 39.5 | 57.9 | 56.6 | 57.6 |"
    assert len(lines) == 6
