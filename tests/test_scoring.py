"""The benchmark scoring (scoring.py, benchmarks.py), expected values computed by hand here: the shared
multiple-choice parser, VQA accuracy with EvalAI normalisation, MMStar categories, CV-Bench's 2D / 3D /
overall from both published layouts."""

import json

import pytest
from PIL import Image

from benchmarks import BENCHMARKS
from eval import parse_choice as parse_choice_from_eval
from eval import vqa_accuracy as vqa_accuracy_from_eval
from scoring import normalize_answer, parse_choice, vqa_accuracy


def test_eval_exposes_the_scoring_functions():
    assert parse_choice_from_eval is parse_choice and vqa_accuracy_from_eval is vqa_accuracy
    assert parse_choice("option c") == "C" and parse_choice("A cat on a mat.") is None


def test_an_unparseable_answer_is_wrong_and_never_reuses_the_previous_one():
    bench = BENCHMARKS["mmstar"]
    rows = [
        {"id": i, "where": f"x:{i}", "answer": "A", "category": "c", "l2_category": "s"} for i in range(3)
    ]
    records = [bench.score(r, out) for r, out in zip(rows, ["A", "no idea", "B"])]
    assert [r["correct"] for r in records] == [True, False, False]  # the released parser would score row 2
    assert bench.aggregate(records)["unparsed"] == 1


@pytest.mark.parametrize("k, expected", [(1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (0, 0.0)])
def test_vqa_accuracy_leave_one_out(k, expected):
    """k of 10 annotators give the prediction. Leaving out one of the k matches leaves k-1 matches, leaving
    out another leaves k: acc = (k·min(1,(k-1)/3) + (10-k)·min(1,k/3)) / 10 -> 0.3, 0.6, 0.9, 1.0."""
    answers = ["red"] * k + ["blue"] * (10 - k)
    assert vqa_accuracy("red", answers) == pytest.approx(expected)


def test_decimal_point_is_kept():
    assert normalize_answer("2.5") == "2.5" and normalize_answer("2.5") != normalize_answer("25")


def test_mmstar_category_aggregation():
    bench = BENCHMARKS["mmstar"]
    rows = [
        {"id": i, "where": f"x:{i}", "answer": "A", "category": c, "l2_category": c + "-s"}
        for i, c in enumerate(["math"] * 4 + ["science"] * 2)
    ]
    outputs = ["A", "A", "B", "A", "B", "B"]  # math 3 / 4, science 0 / 2
    summary = bench.aggregate([bench.score(r, o) for r, o in zip(rows, outputs)])
    assert summary["accuracy"] == pytest.approx(3 / 6)
    assert summary["category"] == {"math": 0.75, "science": 0.0}


def cvbench_records():
    kinds = (
        [("2D", "Count", "ADE20K")] * 2 + [("2D", "Relation", "COCO")] * 2 + [("3D", "Depth", "Omni3D")] * 2
    )
    return [
        {
            "idx": i,
            "type": t,
            "task": task,
            "source": src,
            "filename": f"img/{i}.png",
            "prompt": "q",
            "answer": "(A)",
        }
        for i, (t, task, src) in enumerate(kinds)
    ]


def test_cvbench_both_layouts_give_identical_rows_and_numbers(tmp_path):
    """6 questions: ADE20K 1/2, COCO 2/2, Omni3D 1/2 right -> 2D = (0.5 + 1) / 2 = 0.75, 3D = 0.5,
    overall = 0.625; plain accuracy 4/6."""
    records = cvbench_records()
    for root in (tmp_path / "old", tmp_path / "new"):
        (root / "img").mkdir(parents=True)
        for r in records:
            Image.new("RGB", (8, 8)).save(root / r["filename"])
    (tmp_path / "old" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    two_d = "".join(json.dumps(r) + "\n" for r in records if r["type"] == "2D")
    three_d = "".join(json.dumps(r) + "\n" for r in records if r["type"] == "3D")
    (tmp_path / "new" / "test_2d.jsonl").write_text(two_d)
    (tmp_path / "new" / "test_3d.jsonl").write_text(three_d)
    bench = BENCHMARKS["cvbench"]
    old, new = bench.read(tmp_path / "old"), bench.read(tmp_path / "new")
    assert [r["id"] for r in old] == [r["id"] for r in new] == list(range(6))
    outputs = ["(A)", "(B)", "A", "(A)", "The answer is (A).", "C"]
    summaries = [bench.aggregate([bench.score(r, o) for r, o in zip(rows, outputs)]) for rows in (old, new)]
    assert summaries[0] == summaries[1]
    summary = summaries[0]
    assert summary["2D"] == pytest.approx(0.75) and summary["3D"] == pytest.approx(0.5)
    assert summary["overall"] == pytest.approx(0.625) and summary["accuracy"] == pytest.approx(4 / 6)
    assert summary["tasks"] == {"Count": 0.5, "Depth": 0.5, "Relation": 1.0}
